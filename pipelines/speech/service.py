"""Whisper on OpenVINO GenAI: transcribe (or translate) audio of any length, models loaded once.

The request's path: :meth:`WhisperService.transcribe` checks what the model can do, gets the model
ready on disk (:class:`~pipelines.speech.store.WhisperModelStore`: converted once, cached), takes a
work slot, loads the pipeline from the shared :class:`~pipelines.core.pool.ModelPool`, finds speech
with voice activity detection (:mod:`pipelines.speech.vad`: windows of at most 30 s) and decodes each
window (:mod:`pipelines.speech.decoding`: guarded against loops), then puts the windows' segments on
one time line.

One ``openvino_genai.WhisperPipeline`` is loaded per (model, precision, device); a pipeline with
word timestamps is a separate one, loaded only for requests that ask for words (subtitles), because
GenAI's word-timestamp decoder is slower for every request it serves (0.7 s more on a 63 s file,
words asked for or not). Each pipeline has its own run lock (an infer request is not shared between
two generations), and every call passes its own generation settings, so one request never sees
another's language, task or timestamps.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import numpy as np

from pipelines.core.cache import compile_lock
from pipelines.core.compare import PrecisionRun, compare_precisions
from pipelines.core.devices import validate_device
from pipelines.core.pool import ModelPool
from pipelines.core.progress import ProgressFn, int8_first_use_note, no_progress
from pipelines.core.types import PRECISIONS, ModelChoice, ResolvedModel
from pipelines.speech import vad
from pipelines.speech.audio import SAMPLE_RATE
from pipelines.speech.catalogue import translation_refusal
from pipelines.speech.decoding import (DecodeGuards, Decoded, TranscriptionRefused, decode_window, language_token,
                                       make_prompt)
from pipelines.speech.store import WhisperModelStore
from pipelines.speech.types import TASKS, Segment, TranscribeOptions, Transcript, Word

log = logging.getLogger(__name__)
KIND = "whisper"  # the model pool's kind and work slots
PipelineKey = tuple[str, str, str, str, bool]  # kind, model, precision, device, word timestamps
Audio = Union[np.ndarray, Path]  # 16 kHz mono samples, or a 16 kHz mono WAV read a window at a time


def refuse_unsupported(model: str, options: Optional[TranscribeOptions]) -> None:
    """Refuse, before any model is loaded or downloaded, a task the model cannot do (the catalogue
    knows which models cannot translate; a model outside it is checked once loaded)."""
    if options is None:
        return
    if options.task not in TASKS:
        raise TranscriptionRefused(f"Unknown task '{options.task}'; use 'transcribe' or 'translate'.")
    refusal = translation_refusal(model) if options.task == "translate" else None
    if refusal:
        raise TranscriptionRefused(refusal)


@dataclass
class LoadedWhisper:
    pipeline: Any
    resolved: ResolvedModel
    device: str
    multilingual: bool
    lang_to_id: dict[str, int]
    load_seconds: float
    word_timestamps: bool = False
    tokenizer: Any = None
    max_length: int = 448  # decoder positions: prompt + special tokens + new tokens
    run_lock: threading.Lock = field(default_factory=threading.Lock)


class WhisperService:
    """Transcribes audio with Whisper on OpenVINO; models load lazily, once, bounded by the pool."""

    def __init__(self, store: WhisperModelStore, max_loaded: int = 3, guards: Optional[DecodeGuards] = None,
                 workers: int = 2, pool: Optional[ModelPool] = None, ov_config: Optional[dict] = None):
        self.store = store
        self.ov_config = dict(ov_config or {})  # extra OpenVINO properties (e.g. INFERENCE_NUM_THREADS)
        self.pool = pool or ModelPool({KIND: max_loaded}, {KIND: workers}, {KIND: "transcription"})
        self.slots = self.pool.slots(KIND)  # at most this many decode at once
        self.guards = guards or DecodeGuards()
        self._words_possible: dict[tuple[str, str, str], bool] = {}  # has alignment heads, once resolved

    # -- models -----------------------------------------------------------------------------
    def loaded_keys(self) -> list[tuple[str, str, str]]:
        """The loaded models as (model, precision, device), least recently used first; a model loaded
        with and without word timestamps is listed once."""
        return list(dict.fromkeys(key[1:4] for key in self.pool.keys(KIND)))

    def is_loaded(self, choice: ModelChoice, words: bool = False) -> bool:
        """Whether a request for ``choice`` (with word timestamps or not) finds its pipeline loaded."""
        return self._pipeline_key(choice, words) in self.pool

    def release(self) -> None:
        """Drop every loaded pipeline (frees memory for another tab); one a request is still running
        on is freed when that request ends."""
        self.pool.release(KIND)

    @staticmethod
    def _key(choice: ModelChoice, words: bool = False) -> PipelineKey:
        return KIND, choice.model, choice.precision, validate_device(choice.device), bool(words)

    def _pipeline_key(self, choice: ModelChoice, words: bool) -> PipelineKey:
        """The pipeline a request uses: a model known to have no alignment heads has only its plain one."""
        key = self._key(choice, words)
        return key[:4] + (False,) if words and self._words_possible.get(key[1:4]) is False else key

    def load(self, choice: ModelChoice, progress: ProgressFn = no_progress, words: bool = False) -> LoadedWhisper:
        """The pipeline for ``choice``, loaded once; ``words``: one that can give word timestamps (a model
        without alignment heads cannot, and gets its plain pipeline)."""
        key = self._pipeline_key(choice, words)
        if key[4] and key[1:4] not in self._words_possible and not self.pool.alive(key):
            self._resolve(choice, progress)  # learns whether the model has alignment heads
            key = self._pipeline_key(choice, words)

        def load() -> LoadedWhisper:
            resolved = self._resolve(choice, progress)
            progress(0.8, f"compile {choice.model} for {key[3]}")
            loaded = self._compile(resolved, key[3], key[4])
            self._load_vad()
            return loaded

        return self.pool.get(key, load)

    def _resolve(self, choice: ModelChoice, progress: ProgressFn) -> ResolvedModel:
        """The model's IR folder (converted once), noting whether it can give word timestamps."""
        resolved = self.store.resolve(choice.model, choice.precision, progress)
        self._words_possible[(choice.model, choice.precision, validate_device(choice.device))] = \
            self._has_alignment_heads(resolved.path)
        return resolved

    @staticmethod
    def _load_vad() -> None:
        """Load the voice activity model with the first Whisper model (once per process), so that the first
        transcription, and the first run of an FP16/INT8 compare, does not include loading it."""
        try:
            vad.load_vad_model()
        except vad.VadError as exc:  # said again, to the user, by the transcription that needs it
            log.warning("%s", exc)

    def _compile(self, resolved: ResolvedModel, device: str, words: bool) -> LoadedWhisper:
        """Build the pipeline, with word timestamps when ``words`` (the caller checked that the model's
        generation config has alignment heads: GenAI refuses word timestamps without them), and with
        OpenVINO's compiled-model cache under the models folder, so a later start compiles faster.
        Compiles into that cache take turns across processes (:func:`~pipelines.core.cache.compile_lock`)."""
        import openvino_genai as ov_genai

        start = time.perf_counter()
        cache_dir = self.store.layout.compile_cache
        properties = {**self.ov_config, "CACHE_DIR": str(cache_dir)}
        with compile_lock(cache_dir):
            pipeline = ov_genai.WhisperPipeline(str(resolved.path), device, word_timestamps=words, **properties)
        config = pipeline.get_generation_config()
        return LoadedWhisper(
            pipeline=pipeline, resolved=resolved, device=device, multilingual=bool(config.is_multilingual),
            lang_to_id=dict(config.lang_to_id), load_seconds=time.perf_counter() - start, word_timestamps=words,
            tokenizer=pipeline.get_tokenizer(), max_length=int(config.max_length or 448),
        )

    @staticmethod
    def _has_alignment_heads(folder: Path) -> bool:
        try:
            config = json.loads((folder / "generation_config.json").read_text())
        except (OSError, ValueError):
            return False
        return bool(config.get("alignment_heads"))

    def prepare(self, choice: ModelChoice, progress: ProgressFn = no_progress,
                options: Optional[TranscribeOptions] = None) -> None:
        """Refuse what the model cannot do (``options``), then download, convert or quantize the model
        to disk if that is still to do, saying so when it is not loaded yet. Runs outside the work
        slots: a model no one used yet does not hold up transcriptions on ready ones."""
        refuse_unsupported(choice.model, options)
        words = bool(options and options.word_timestamps)
        if self.pool.alive(self._pipeline_key(choice, words)):
            return
        progress(0.0, int8_first_use_note(choice.model) if choice.precision == "int8" else f"load {choice.model}")
        if any(self.pool.alive(key) for key in (self._key(choice, words), self._key(choice))):
            return  # its files are on disk: a loaded pipeline of either kind came from them
        self.store.resolve(choice.model, choice.precision, progress)

    # -- transcription ----------------------------------------------------------------------
    def transcribe(self, audio: Audio, choice: ModelChoice, options: TranscribeOptions = TranscribeOptions(),
                   progress: ProgressFn = no_progress) -> Transcript:
        """Transcribe (or translate to English) 16 kHz mono float32 audio, or a 16 kHz mono WAV file read
        one window at a time, of any length.

        Steps: 1. refuse what the model cannot do; 2. get the model ready (once); 3. in a work slot,
        load it; 4. find speech with voice activity detection and group it into windows of at most
        30 s; 5. decode each window with guards against repetition loops; 6. join the windows'
        segments on one time line.
        """
        self.prepare(choice, progress, options)
        with self.slots.turn(progress, 0.8):
            loaded = self._load_for(choice, options, progress)
            progress(0.85, "find speech")
            duration, windows, pieces = self._pieces(audio, options)
            return self._run_windows(loaded, choice, options, duration, pieces, len(windows), progress)

    def transcribe_file(self, wav_path: Path, choice: ModelChoice, options: TranscribeOptions = TranscribeOptions(),
                        progress: ProgressFn = no_progress) -> Transcript:
        """:meth:`transcribe` of a 16 kHz mono WAV file, read one window at a time."""
        return self.transcribe(Path(wav_path), choice, options, progress)

    def compare(self, audio: Audio, choice: ModelChoice, options: TranscribeOptions,
                progress: ProgressFn = no_progress) -> list[PrecisionRun]:
        """The same audio transcribed by ``choice``'s model in FP16 and in INT8, each run timed
        (:func:`pipelines.core.compare.compare_precisions`: models ready and loaded first)."""
        choices = {p: replace(choice, precision=p) for p in PRECISIONS}
        transcribe = self.transcribe_file if isinstance(audio, Path) else self.transcribe
        return compare_precisions(
            lambda p, part: self.load(choices[p], part, words=options.word_timestamps),
            lambda p, part: transcribe(audio, choices[p], options, part),
            progress, slots=self.slots, prepare=lambda p, part: self.prepare(choices[p], part, options))

    def load_checked(self, choice: ModelChoice, options: TranscribeOptions,
                     progress: ProgressFn = no_progress) -> LoadedWhisper:
        """The pipeline ``options`` need (with word timestamps or not), loaded once; a task or language
        the model cannot take is refused (live captions decode with it outside :meth:`transcribe`)."""
        return self._load_for(choice, options, progress)

    def _load_for(self, choice: ModelChoice, options: TranscribeOptions, progress: ProgressFn) -> LoadedWhisper:
        loaded = self.load(choice, progress, words=options.word_timestamps)
        if options.task == "translate" and not loaded.multilingual:
            raise TranscriptionRefused(translation_refusal(choice.model, multilingual=False)
                                       or f"{choice.model} is English-only and cannot translate.")
        language_token(loaded, options.language)  # validate before any decoding
        return loaded

    @staticmethod
    def _pieces(audio: Audio, options: TranscribeOptions) -> tuple[float, list[vad.Window], Iterable]:
        """The audio's duration, its windows, and (window, samples) for each, lazily."""
        if isinstance(audio, Path):
            import soundfile as sf

            duration = sf.info(str(audio)).duration
            regions = vad.speech_regions_from_file(audio) if options.vad else [(0.0, duration)]
            windows = vad.plan_windows(regions, duration)
            return duration, windows, vad.iter_window_audio(audio, windows)
        duration = audio.size / SAMPLE_RATE
        windows = vad.plan_windows(vad.speech_regions(audio) if options.vad else [(0.0, duration)], duration)
        return duration, windows, ((w, audio[int(w.start * SAMPLE_RATE):int(w.end * SAMPLE_RATE)]) for w in windows)

    def _run_windows(self, loaded: LoadedWhisper, choice: ModelChoice, options: TranscribeOptions, duration: float,
                     pieces: Iterable[tuple[vad.Window, np.ndarray]], count: int, progress: ProgressFn) -> Transcript:
        language = language_token(loaded, options.language)
        segments: list[Segment] = []
        texts: list[str] = []
        context: list[str] = []  # text since the last reset: the next window's prompt
        detected: Optional[str] = None
        previous: Optional[str] = None  # the last segment of the window before: a loop may cross windows
        for index, (window, samples) in enumerate(pieces):
            progress(0.9 + 0.1 * index / max(count, 1), f"transcribe part {index + 1} of {count}")
            prompt = make_prompt(loaded, context, self.guards.prompt_tokens)
            decoded = decode_window(loaded, samples, options, language, prompt, self.guards, previous)
            if decoded.chunks or decoded.text:
                previous = decoded.chunks[-1].text if decoded.chunks else decoded.text
            if decoded.temperature > self.guards.prompt_reset_temperature:
                context.clear()  # a window that needed hot sampling is no context for the next one
            elif decoded.text:
                context.append(decoded.text)
            if detected is None and decoded.language:
                detected = decoded.language
                if language is None and loaded.multilingual:
                    language = f"<|{detected}|>"  # one language for the whole recording: the first speech decides
            segments += _on_time_line(decoded, window, duration)
            if decoded.text:
                texts.append(decoded.text)
        return Transcript(
            text=" ".join(texts).strip(), language=(detected or language or "").strip("<|>") or None,
            segments=tuple(segments) if options.timestamps else (), task=options.task, model=choice.model,
            duration=round(duration, 3),
        )


def _on_time_line(decoded: Decoded, window: vad.Window, duration: float) -> list[Segment]:
    """A window's chunks as segments of the whole recording (times clamped to the window)."""
    window_end = window.end if window.end > window.start else duration
    segments = []
    for chunk in decoded.chunks:
        start = min(window.start + chunk.start, window_end)
        end = min(max(window.start + chunk.end, start), window_end)
        words = tuple(Word(w.text, round(min(window.start + w.start, window_end), 3),
                           round(min(window.start + w.end, window_end), 3)) for w in chunk.words)
        segments.append(Segment(start=round(start, 3), end=round(end, 3), text=chunk.text, words=words))
    return segments
