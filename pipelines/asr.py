"""Whisper on OpenVINO GenAI: a lazy, bounded, load-once set of WhisperPipelines and transcribe().

One ``openvino_genai.WhisperPipeline`` is loaded per (model, precision, device) on first use and
kept in a small LRU set; a pipeline with word timestamps is a separate one, loaded only for requests
that ask for words (subtitles), because GenAI's word-timestamp decoder is slower for every request
it serves (0.7 s more on a 63 s file, words asked for or not). Loading is guarded per key, so two
requests asking for the same model at the same time wait for one load. Each pipeline has its own run lock (an infer request is not
shared between two generations), and every call passes its own generation settings, so one
request never sees another's language, task or timestamps.
"""
from __future__ import annotations

import logging
import re
import threading
import time
import weakref
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from . import vad
from .audio import SAMPLE_RATE
from .cache import ProgressFn, no_progress
from .devices import validate_device
from .model_store import ResolvedModel, WhisperModelStore
from .slots import WorkSlots
from .types import ModelChoice, Segment, TranscribeOptions, Transcript, Word
from .whisper_models import LANGUAGES, translation_refusal

log = logging.getLogger(__name__)
PipelineKey = tuple[str, str, str, bool]  # model, precision, device, word timestamps


class TranscriptionRefused(ValueError):
    """The request cannot be served as asked (e.g. translate on an English-only model)."""


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
    """Transcribes audio with Whisper on OpenVINO; models load lazily, once, and stay bounded."""

    def __init__(self, store: WhisperModelStore, max_loaded: int = 3, guards: "DecodeGuards | None" = None,
                 workers: int = 2):
        self.store = store
        self.slots = WorkSlots(workers, "transcription")  # at most this many decode at once
        self.guards = guards or DecodeGuards()
        self.max_loaded = max(1, max_loaded)
        # keyed by (model, precision, device, word timestamps)
        self._loaded: "OrderedDict[PipelineKey, LoadedWhisper]" = OrderedDict()
        self._guard = threading.Lock()
        self._key_locks: dict[PipelineKey, threading.Lock] = {}
        self._retired: "weakref.WeakValueDictionary[PipelineKey, LoadedWhisper]" = weakref.WeakValueDictionary()
        self._words_possible: dict[tuple[str, str, str], bool] = {}  # has alignment heads, once resolved

    # -- models -----------------------------------------------------------------------------
    def loaded_keys(self) -> list[tuple[str, str, str]]:
        """The loaded models as (model, precision, device), least recently used first; a model loaded
        with and without word timestamps is listed once."""
        with self._guard:
            return list(dict.fromkeys(key[:3] for key in self._loaded))

    def is_loaded(self, choice: ModelChoice, words: bool = False) -> bool:
        """Whether a request for ``choice`` (with word timestamps or not) finds its pipeline loaded."""
        key = self._pipeline_key(choice, words)
        with self._guard:
            return key in self._loaded

    def release(self) -> None:
        """Drop every loaded pipeline (frees memory for another tab); one a request is still running
        on is freed when that request ends."""
        with self._guard:
            while self._loaded:
                self._retire_oldest()

    @staticmethod
    def _key(choice: ModelChoice, words: bool = False) -> PipelineKey:
        return choice.model, choice.precision, validate_device(choice.device), bool(words)

    def _pipeline_key(self, choice: ModelChoice, words: bool) -> PipelineKey:
        """The pipeline a request uses: a model known to have no alignment heads has only its plain one."""
        key = self._key(choice, words)
        return key[:3] + (False,) if words and self._words_possible.get(key[:3]) is False else key

    def load(self, choice: ModelChoice, progress: ProgressFn = no_progress, words: bool = False) -> LoadedWhisper:
        """The pipeline for ``choice``, loaded once; ``words``: one that can give word timestamps (a model
        without alignment heads cannot, and gets its plain pipeline)."""
        key = self._pipeline_key(choice, words)
        words, device = key[3], key[2]
        with self._guard:
            loaded = self._reuse(key)
            if loaded is not None:
                return loaded
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._guard:
                loaded = self._reuse(key)
                if loaded is not None:
                    return loaded
            resolved = self.store.resolve(choice.model, choice.precision, progress)
            can_give_words = self._has_alignment_heads(resolved.path)
            with self._guard:
                self._words_possible[key[:3]] = can_give_words
            if words and not can_give_words:  # the plain pipeline is all this model has
                return self.load(choice, progress, words=False)
            progress(0.8, f"compile {choice.model} for {device}")
            loaded = self._compile(resolved, device, words)
            self._load_vad()
            with self._guard:
                self._loaded[key] = loaded
                self._keep_within_limit()
            return loaded

    def _reuse(self, key: PipelineKey) -> Optional[LoadedWhisper]:
        """The pipeline for ``key`` if one is alive (call with ``_guard`` held): a loaded one, or one
        unloaded while a request still runs on it, which is taken back instead of compiled twice."""
        loaded = self._loaded.get(key) or self._retired.pop(key, None)
        if loaded is None:
            return None
        if key not in self._loaded:
            log.info("took back %s, unloaded while a request still ran on it", key)
            self._loaded[key] = loaded
        self._loaded.move_to_end(key)
        self._keep_within_limit()
        return loaded

    def _keep_within_limit(self) -> None:
        while len(self._loaded) > self.max_loaded:
            self._retire_oldest()

    def _retire_oldest(self) -> None:
        """Unload the least recently used pipeline. It is freed once no running request holds it (only
        a weak reference stays, through which a new request for it takes it back meanwhile)."""
        key, loaded = self._loaded.popitem(last=False)
        self._retired[key] = loaded
        log.info("unloaded %s (at most %d models stay loaded)", key, self.max_loaded)

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
        OpenVINO's compiled-model cache under the models folder, so a later start compiles faster."""
        import openvino_genai as ov_genai

        start = time.perf_counter()
        properties = {"CACHE_DIR": str(self.store.root / "ov_compile_cache")}
        pipeline = ov_genai.WhisperPipeline(str(resolved.path), device, word_timestamps=words, **properties)
        config = pipeline.get_generation_config()
        return LoadedWhisper(
            pipeline=pipeline,
            resolved=resolved,
            device=device,
            multilingual=bool(config.is_multilingual),
            lang_to_id=dict(config.lang_to_id),
            load_seconds=time.perf_counter() - start,
            word_timestamps=words,
            tokenizer=pipeline.get_tokenizer(),
            max_length=int(config.max_length or 448),
        )

    @staticmethod
    def _has_alignment_heads(folder: Path) -> bool:
        import json

        try:
            config = json.loads((folder / "generation_config.json").read_text())
        except (OSError, ValueError):
            return False
        return bool(config.get("alignment_heads"))

    # -- transcription ----------------------------------------------------------------------
    def transcribe(
        self,
        audio: np.ndarray,
        choice: ModelChoice,
        options: TranscribeOptions = TranscribeOptions(),
        progress: ProgressFn = no_progress,
    ) -> Transcript:
        """Transcribe (or translate to English) 16 kHz mono float32 audio of any length.

        Steps: 1. refuse what the model cannot do; 2. load the model (once); 3. find speech with
        voice activity detection and group it into windows of at most 30 s; 4. decode each window
        with guards against repetition loops; 5. join the windows' segments on one time line.
        """
        self.prepare(choice, progress, options)
        with self.slots.turn(progress, 0.8):
            loaded = self._load_for(choice, options, progress)
            duration = audio.size / SAMPLE_RATE
            progress(0.85, "find speech")
            windows = self._windows(audio, duration, options)
            return self._run_windows(
                loaded, choice, options, duration,
                ((w, audio[int(w.start * SAMPLE_RATE):int(w.end * SAMPLE_RATE)]) for w in windows),
                len(windows), progress)

    def transcribe_file(
        self,
        wav_path: Path,
        choice: ModelChoice,
        options: TranscribeOptions = TranscribeOptions(),
        progress: ProgressFn = no_progress,
    ) -> Transcript:
        """Like :meth:`transcribe`, for a 16 kHz mono WAV of any length read one window at a time."""
        import soundfile as sf

        self.prepare(choice, progress, options)
        with self.slots.turn(progress, 0.8):
            loaded = self._load_for(choice, options, progress)
            duration = sf.info(str(wav_path)).duration
            progress(0.85, "find speech")
            regions = vad.speech_regions_from_file(wav_path) if options.vad else [(0.0, duration)]
            windows = vad.plan_windows(regions, duration)
            return self._run_windows(loaded, choice, options, duration, vad.iter_window_audio(wav_path, windows),
                                     len(windows), progress)

    def prepare(self, choice: ModelChoice, progress: ProgressFn = no_progress,
                options: Optional[TranscribeOptions] = None) -> None:
        """Refuse what the model cannot do (``options``), then download, convert or quantize the model
        to disk if that is still to do. Runs outside the work slots: a model no one used yet does not
        hold up transcriptions on ready ones."""
        if options is not None:
            if options.task not in ("transcribe", "translate"):
                raise TranscriptionRefused(f"Unknown task '{options.task}'; use 'transcribe' or 'translate'.")
            refusal = translation_refusal(choice.model) if options.task == "translate" else None
            if refusal:
                raise TranscriptionRefused(refusal)
        words = bool(options and options.word_timestamps)
        with self._guard:
            if any(key in self._loaded or key in self._retired for key in {self._key(choice, words), self._key(choice)}):
                return  # its files are on disk: a loaded pipeline of either kind came from them
        self.store.resolve(choice.model, choice.precision, progress)

    def _load_for(self, choice: ModelChoice, options: TranscribeOptions, progress: ProgressFn) -> LoadedWhisper:
        loaded = self.load(choice, progress, words=options.word_timestamps)
        if options.task == "translate" and not loaded.multilingual:
            raise TranscriptionRefused(translation_refusal(choice.model, multilingual=False)
                                       or f"{choice.model} is English-only and cannot translate.")
        self._language_token(loaded, options.language)  # validate before any decoding
        return loaded

    @staticmethod
    def _windows(audio: np.ndarray, duration: float, options: TranscribeOptions) -> list[vad.Window]:
        regions = vad.speech_regions(audio) if options.vad else [(0.0, duration)]
        return vad.plan_windows(regions, duration)

    def _run_windows(
        self,
        loaded: LoadedWhisper,
        choice: ModelChoice,
        options: TranscribeOptions,
        duration: float,
        pieces: Iterable[tuple[vad.Window, np.ndarray]],
        count: int,
        progress: ProgressFn,
    ) -> Transcript:
        language = self._language_token(loaded, options.language)
        segments: list[Segment] = []
        texts: list[str] = []
        context: list[str] = []  # text since the last reset: the next window's prompt
        detected: Optional[str] = None
        for index, (window, samples) in enumerate(pieces):
            progress(0.9 + 0.1 * index / max(count, 1), f"transcribe part {index + 1} of {count}")
            decoded = self._decode(loaded, samples, options, language, self._prompt(loaded, context))
            if decoded.temperature > self.guards.prompt_reset_temperature:
                context.clear()  # a window that needed hot sampling is no context for the next one
            elif decoded.text:
                context.append(decoded.text)
            if detected is None and decoded.language:
                detected = decoded.language
                if language is None and loaded.multilingual:
                    # one language for the whole recording: the first speech decides it
                    language = f"<|{detected}|>"
            window_end = window.end if window.end > window.start else duration
            for chunk in decoded.chunks:
                start = min(window.start + chunk.start, window_end)
                end = min(max(window.start + chunk.end, start), window_end)
                words = tuple(Word(w.text, round(min(window.start + w.start, window_end), 3),
                                   round(min(window.start + w.end, window_end), 3)) for w in chunk.words)
                segments.append(Segment(start=round(start, 3), end=round(end, 3), text=chunk.text, words=words))
            if decoded.text:
                texts.append(decoded.text)
        if language and not detected:
            detected = language
        return Transcript(
            text=" ".join(texts).strip(),
            language=(detected or "").strip("<|>") or None,
            segments=tuple(segments) if options.timestamps else (),
            task=options.task,
            model=choice.model,
            duration=round(duration, 3),
        )

    def _prompt(self, loaded: LoadedWhisper, context: list[str]) -> Optional["Prompt"]:
        """The end of the text so far, whole words, at most ``guards.prompt_tokens`` tokens, as
        Whisper's reference decoder conditions each 30 s window on the text before it."""
        limit = self.guards.prompt_tokens
        if not context or limit <= 0 or loaded.tokenizer is None:
            return None
        words = " ".join(context)[-limit * 8:].split()  # a token is rarely longer than 8 characters

        def tokens(first: int) -> int:
            ids = loaded.tokenizer.encode(" " + " ".join(words[first:]), add_special_tokens=False).input_ids
            return int(ids.get_shape()[-1])

        low, high = 0, len(words)  # the fewest words to drop so that the rest fits
        while low < high:
            middle = (low + high) // 2
            if tokens(middle) <= limit:
                high = middle
            else:
                low = middle + 1
        if low >= len(words):
            return None
        return Prompt(" ".join(words[low:]), tokens(low))

    def _decode(self, loaded: LoadedWhisper, samples: np.ndarray, options: TranscribeOptions,
                language: Optional[str], prompt: Optional["Prompt"] = None) -> "Decoded":
        """One window (<= 30 s): greedy first, conditioned on the text before it; on a
        repetition loop, retry unconditioned with sampling at rising temperatures (as Whisper's
        reference decoder does) and keep the least repetitive result."""
        seconds = samples.size / SAMPLE_RATE
        candidates: list[Decoded] = []
        budget = int(self.guards.base_tokens + self.guards.tokens_per_second * seconds)
        for temperature in self.guards.temperatures:
            config = loaded.pipeline.get_generation_config()  # a copy: this request's settings only
            config.task = options.task if loaded.multilingual else None
            config.language = language
            with_words = bool(options.word_timestamps and loaded.word_timestamps)
            config.word_timestamps = with_words
            # GenAI 2026.4 can crash the process (SIGSEGV in add_word_level_timestamps) when the decoded
            # tokens carry timestamp tokens as well (seen on degenerate output). Word mode therefore
            # decodes without timestamp tokens and takes segment times from the words: on real speech
            # the word times are the same either way.
            config.return_timestamps = not with_words
            config.max_new_tokens = budget
            if prompt and temperature == 0:
                config.initial_prompt = prompt.text
                # <|startofprev|> prompt <|startoftranscript|> <|lang|> <|task|> <|0.00|>, then new tokens
                config.max_new_tokens = max(1, min(budget, loaded.max_length - prompt.tokens - 5))
            if temperature > 0:
                config.do_sample = True
                config.temperature = temperature
                config.rng_seed = self.guards.seed
            with loaded.run_lock:
                result = loaded.pipeline.generate(np.ascontiguousarray(samples, dtype=np.float32),
                                                  generation_config=config)
            decoded = Decoded.from_result(result, seconds, temperature)
            candidates.append(decoded)
            if not looks_degenerate(decoded.text, self.guards.compression_ratio_threshold):
                return decoded
            log.info("window of %.1f s looks degenerate at temperature %.1f: %r", seconds, temperature,
                     decoded.text[:80])
        best = min(candidates, key=lambda d: compression_ratio(d.text))
        return best.without_repeats()

    @staticmethod
    def _language_token(loaded: LoadedWhisper, language: Optional[str]) -> Optional[str]:
        if not language or language == "auto":
            return None
        code = language.strip().lower()
        if code in LANGUAGES.values():  # a name like "german"
            code = next(k for k, v in LANGUAGES.items() if v == code)
        token = f"<|{code.strip('<|>')}|>"
        if not loaded.multilingual:
            if token != "<|en|>":
                raise TranscriptionRefused(
                    f"{loaded.resolved.reference} is English-only; it cannot transcribe '{language}'. "
                    "Choose a multilingual model or leave the language on auto.")
            return None
        if token not in loaded.lang_to_id:
            raise TranscriptionRefused(f"Language '{language}' is not one Whisper knows. Use a code such as "
                                       "'en', 'de' or 'es', or leave it on auto-detect.")
        return token



@dataclass(frozen=True)
class DecodeGuards:
    """Limits that keep greedy decoding from looping (values from Whisper's reference decoder)."""

    compression_ratio_threshold: float = 2.4
    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8)
    base_tokens: int = 24  # token budget per window: base + per second of audio
    tokens_per_second: float = 7.0
    seed: int = 1234
    # Each window is conditioned on the end of the text before it (Whisper's
    # condition_on_previous_text): at most this many tokens (223 = half the decoder's 448
    # positions, as in the reference decoder; 0: no prompt). A window that needed sampling above
    # prompt_reset_temperature is not used as context, so a loop cannot carry over.
    prompt_tokens: int = 223
    prompt_reset_temperature: float = 0.5


@dataclass(frozen=True)
class Prompt:
    """Text the next window is conditioned on, and its length in tokens."""

    text: str
    tokens: int


@dataclass(frozen=True)
class Chunk:
    start: float
    end: float
    text: str
    words: tuple[Word, ...] = ()


@dataclass(frozen=True)
class Decoded:
    """One window's decoding: text, timed chunks relative to the window, detected language."""

    text: str
    chunks: tuple[Chunk, ...]
    language: Optional[str]
    temperature: float = 0.0  # the temperature that produced it

    @classmethod
    def from_result(cls, result: Any, seconds: float, temperature: float = 0.0) -> "Decoded":
        if not result.chunks and result.words:  # word mode: segments are made from the timed words
            chunks = [c for c in chunks_from_words(result.words, seconds) if not is_empty_text(c.text)]
            text = " ".join(c.text for c in chunks)
            language = (getattr(result, "language", "") or "").strip("<|>") or None
            return cls(text=text, chunks=tuple(chunks), language=language, temperature=temperature)
        chunks = []
        for chunk in result.chunks or []:
            text = chunk.text.strip()
            if is_empty_text(text):
                continue  # "", ".", "..." and the like are silence, not speech
            start = max(0.0, float(chunk.start_ts))
            end = float(chunk.end_ts) if chunk.end_ts >= 0 else seconds
            chunks.append(Chunk(start, max(start, end), text))
        chunks = _attach_words(chunks, result.words or [])
        text = " ".join(c.text for c in chunks) if result.chunks else result.texts[0].strip()
        if is_empty_text(text):
            text = ""
        language = (getattr(result, "language", "") or "").strip("<|>") or None
        return cls(text=text, chunks=tuple(chunks), language=language, temperature=temperature)

    def without_repeats(self) -> "Decoded":
        """Cut a phrase loop that survived every fallback down to its first occurrences."""
        kept: list[Chunk] = []
        for chunk in self.chunks:
            cleaned = collapse_repeats(chunk.text)
            if kept and cleaned == kept[-1].text:
                continue
            kept.append(Chunk(chunk.start, chunk.end, cleaned, chunk.words if cleaned == chunk.text else ()))
        text = " ".join(c.text for c in kept) if kept else collapse_repeats(self.text)
        return Decoded(text=text, chunks=tuple(kept), language=self.language, temperature=self.temperature)


SENTENCE_END = (".", "!", "?", "\u3002", "\uff01", "\uff1f")


def chunks_from_words(words: Iterable[Any], seconds: float, pause: float = 1.0, max_seconds: float = 12.0
                      ) -> list[Chunk]:
    """Group GenAI's timed words (relative to the window) into sentence-like segments: a segment ends
    after sentence punctuation, before a pause longer than ``pause`` s, or when it would pass ``max_seconds``."""
    chunks: list[Chunk] = []
    current: list[Word] = []

    def close() -> None:
        if current:
            text = " ".join(w.text for w in current)
            chunks.append(Chunk(current[0].start, max(w.end for w in current), text, tuple(current)))
            current.clear()

    for w in words:
        text = w.word.strip()
        if is_empty_text(text):  # a lone "..." or "-" is not speech
            continue
        start = min(max(0.0, float(w.start_ts)), seconds)
        end = min(max(start, float(w.end_ts)), seconds)
        if current and (start - current[-1].end > pause or end - current[0].start > max_seconds):
            close()
        current.append(Word(text, start, end))
        if text.endswith(SENTENCE_END):
            close()
    close()
    return chunks


def _attach_words(chunks: list[Chunk], words: Iterable[Any]) -> list[Chunk]:
    """Give each chunk the words whose middle falls inside it (GenAI returns words separately)."""
    buckets: list[list[Word]] = [[] for _ in chunks]
    for w in words:
        text = w.word.strip()
        if not text or not chunks:
            continue
        middle = (float(w.start_ts) + float(w.end_ts)) / 2
        index = next((i for i, c in enumerate(chunks) if c.start <= middle <= c.end),
                     min(range(len(chunks)), key=lambda i: abs((chunks[i].start + chunks[i].end) / 2 - middle)))
        buckets[index].append(Word(text, max(0.0, float(w.start_ts)), max(0.0, float(w.end_ts))))
    return [Chunk(c.start, c.end, c.text, tuple(b)) for c, b in zip(chunks, buckets)]


_WORDS = re.compile(r"\w+", re.UNICODE)


def is_empty_text(text: str) -> bool:
    """True for text with no letters or digits (silence hallucinations such as "." or "...")."""
    return not _WORDS.search(text or "")


def compression_ratio(text: str) -> float:
    """How well the text compresses: loops ("a coffee, a coffee, ...") compress far better than speech."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def longest_repeat_run(text: str, max_ngram: int = 6) -> int:
    """The most consecutive repetitions of any word n-gram (n <= max_ngram) in ``text``."""
    words = [w.lower() for w in _WORDS.findall(text)]
    best = 1
    for n in range(1, max_ngram + 1):
        i = 0
        while i + 2 * n <= len(words):
            run = 1
            while words[i + run * n:i + (run + 1) * n] == words[i:i + n]:
                run += 1
            best = max(best, run)
            i += max(1, (run - 1) * n) if run > 1 else 1
    return best


def looks_degenerate(text: str, threshold: float = 2.4, max_run: int = 4) -> bool:
    return compression_ratio(text) > threshold or longest_repeat_run(text) > max_run


def collapse_repeats(text: str, max_ngram: int = 6, keep: int = 2) -> str:
    """Keep at most ``keep`` consecutive copies of any repeated word n-gram (punctuation kept)."""
    tokens = text.split()
    keys = [" ".join(_WORDS.findall(t.lower())) for t in tokens]
    n = max_ngram
    while n >= 1:
        i = 0
        out_tokens, out_keys = [], []
        while i < len(tokens):
            run = 1
            while keys[i + run * n:i + (run + 1) * n] == keys[i:i + n] and i + (run + 1) * n <= len(tokens):
                run += 1
            take = min(run, keep) * n if run > 1 else 1
            out_tokens += tokens[i:i + take]
            out_keys += keys[i:i + take]
            i += run * n if run > 1 else 1
        tokens, keys = out_tokens, out_keys
        n -= 1
    return " ".join(tokens)
