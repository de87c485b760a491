"""Tab 1: Speech to text. Endpoints ``/transcribe`` and ``/transcribe_compare`` (FP16 vs INT8)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import gradio as gr
import numpy as np

from pipelines.services import Services
from pipelines.speech.audio import load_audio
from pipelines.speech.types import Transcript
from pipelines.subtitles.cues import CueRules
from pipelines.subtitles.formats import write_outputs

from .common import (agreement_text, compare_columns, language_dropdown, progress_fn, request_dir, speed_summary,
                     task_radio, user_errors, whisper_pickers, whisper_request)
from .live_captions import build_live_captions

log = logging.getLogger(__name__)
SEGMENT_COLUMNS = ["start", "end", "text"]
WORD_COLUMNS = ["start", "end", "word"]


def segments_table(transcript: Transcript) -> list[list]:
    return [[f"{s.start:.2f}", f"{s.end:.2f}", s.text] for s in transcript.segments]


def words_table(transcript: Transcript) -> list[list]:
    """Every timed word of the transcript, in order: [start, end, word]."""
    return [[f"{w.start:.2f}", f"{w.end:.2f}", w.text] for s in transcript.segments for w in s.words]


def show_words(files: Optional[list], word_timestamps: bool, vtt_word_timing: bool):
    """The tab's words table after a transcription, read from its JSON download (hidden without words)."""
    json_file = next((f for f in files or [] if str(f).endswith(".json")), None)
    if not (word_timestamps or vtt_word_timing) or json_file is None:
        return gr.update(value=[], visible=False)
    rows = words_table(Transcript.from_dict(json.loads(Path(json_file).read_text(encoding="utf-8"))))
    return gr.update(value=rows, visible=bool(rows))


def _samples(services: Services, audio: Optional[str], media_file: Optional[str]) -> tuple[Path, np.ndarray]:
    """The request's audio as 16 kHz mono samples, refused when missing or too long."""
    source = audio or media_file
    if not source:
        raise gr.Error("No audio was given. Record with the microphone or upload an audio or video file.")
    return Path(source), load_audio(Path(source), max_seconds=services.settings.max_audio_seconds)


def make_transcribe_handler(services: Services):
    """The event handler behind the tab and the /transcribe endpoint."""

    def transcribe(
        audio: Optional[str] = None,
        media_file: Optional[str] = None,
        model: Optional[str] = None,
        precision: Optional[str] = None,
        device: Optional[str] = None,
        task: Optional[str] = None,
        language: Optional[str] = None,
        timestamps: bool = True,
        word_timestamps: bool = False,
        vtt_word_timing: bool = False,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[str, str, list[list], list[str]]:
        """Transcribe or translate speech.

        Args:
            audio: a recording or uploaded audio file (wav, mp3, flac, ogg, m4a); give it or `media_file`.
            media_file: alternatively any audio or video file; used when `audio` is empty.
            model: Whisper model id, bundled model, or local folder (empty: the server's default).
            precision: "fp16" or "int8" (INT8 weights; the first use quantizes the model, which can take minutes).
            device: OpenVINO device (CPU, GPU, NPU, AUTO; empty: the server's default).
            task: "transcribe" or "translate" (to English).
            language: spoken language code, or "auto" to detect it.
            timestamps: whether to return timed segments.
            word_timestamps: also time every word (slower); the JSON lists each segment's words with start and end.
            vtt_word_timing: tag each word of the WebVTT with its start (`<00:00:01.500>`); implies word_timestamps.
        Returns:
            text, detected language, segments [start, end, text], files [srt, vtt, txt, json] ([txt, json]
            without timestamps).
        """
        if not (audio or media_file):
            raise gr.Error("No audio was given. Record with the microphone or upload an audio or video file.")
        words = bool(word_timestamps or vtt_word_timing)
        if words and not timestamps:
            raise gr.Error("Word timestamps need timestamps: turn Timestamps on, or word timestamps off.")
        report = progress_fn(progress)
        with user_errors():
            choice, options = whisper_request(services.settings, model, precision, device, task, language,
                                              timestamps=bool(timestamps), word_timestamps=words)
            report(0.0, "decode audio")
            source, samples = _samples(services, audio, media_file)
            transcript = services.whisper.transcribe(samples, choice, options, report)
        if words and transcript.segments and not any(s.words for s in transcript.segments):
            gr.Warning(f"{choice.model} cannot time words (its generation config has no alignment heads): "
                       "segments only.")
        out_dir = request_dir("speech")
        files = write_outputs(transcript, out_dir, source.stem or "transcript", CueRules(),
                              vtt_word_timing=bool(vtt_word_timing))
        report(1.0, "done")
        kinds = ("srt", "vtt", "txt", "json") if timestamps else ("txt", "json")  # no empty subtitle files
        return transcript.text, transcript.language or "", segments_table(transcript), [str(files[k]) for k in kinds]

    return transcribe


def make_transcribe_compare_handler(services: Services):
    """The handler behind the tab's comparison and the /transcribe_compare endpoint."""

    def transcribe_compare(
        audio: Optional[str] = None,
        media_file: Optional[str] = None,
        model: Optional[str] = None,
        device: Optional[str] = None,
        task: Optional[str] = None,
        language: Optional[str] = None,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[str, float, str, float, str]:
        """Transcribe the same audio with the FP16 and the INT8 model and time both.

        Each model is loaded before its run (the first INT8 use quantizes the model: minutes), so
        the times are transcription only.

        Args:
            audio: a recording or uploaded audio file; give it or `media_file`.
            media_file: alternatively any audio or video file; used when `audio` is empty.
            model: Whisper model id, bundled model, or local folder (empty: the server's default).
            device: OpenVINO device (CPU, GPU, NPU, AUTO; empty: the server's default).
            task: "transcribe" or "translate" (to English).
            language: spoken language code, or "auto" to detect it.
        Returns:
            FP16 text, FP16 seconds, INT8 text, INT8 seconds, and a summary (time ratio, how far the texts agree).
        """
        if not (audio or media_file):
            raise gr.Error("No audio was given. Record with the microphone or upload an audio or video file.")
        report = progress_fn(progress)
        with user_errors():
            choice, options = whisper_request(services.settings, model, "fp16", device, task, language,
                                              timestamps=False)
            report(0.0, "decode audio")
            _source, samples = _samples(services, audio, media_file)
            runs = services.whisper.compare(samples, choice, options, report)
        fp16, int8 = runs
        summary = f"{speed_summary(runs)} {agreement_text(fp16.value.text, int8.value.text)}"
        return fp16.value.text, round(fp16.seconds, 3), int8.value.text, round(int8.seconds, 3), summary

    return transcribe_compare


def build_speech_tab(services: Services) -> None:
    settings = services.settings
    with gr.Row():
        with gr.Column():
            audio = gr.Audio(sources=["microphone", "upload"], type="filepath", label="Record or upload audio")
            media_file = gr.File(label="…or any audio/video file (its audio track is used)",
                                 file_types=["audio", "video"], type="filepath", elem_id="speech-file")
            model, precision, device = whisper_pickers(settings)
            with gr.Row():
                task = task_radio()
                language = language_dropdown()
                timestamps = gr.Checkbox(value=True, label="Timestamps")
            with gr.Row():
                word_timestamps = gr.Checkbox(
                    value=False, label="Word timestamps",
                    info="The time of every word, in a table and the JSON download (slower: a pipeline of its own).")
                vtt_word_timing = gr.Checkbox(
                    value=False, label="Word timing in WebVTT",
                    info="Karaoke-style: each word of the .vtt tagged with its start time (turns word timestamps on).")
            run = gr.Button("Transcribe", variant="primary", elem_id="speech-run")
        with gr.Column():
            text = gr.Textbox(label="Text", lines=8, buttons=["copy"], elem_id="speech-text")
            detected = gr.Textbox(label="Detected language", elem_id="speech-language")
            segments = gr.Dataframe(headers=SEGMENT_COLUMNS, label="Segments", wrap=True, interactive=False)
            words = gr.Dataframe(headers=WORD_COLUMNS, label="Words", interactive=False, visible=False,
                                 elem_id="speech-words")
            files = gr.File(label="Downloads (SRT, WebVTT, TXT, JSON)", file_count="multiple")
    with gr.Accordion("Compare FP16 and INT8: the same audio through both models, timed", open=False):
        compare = gr.Button("Compare FP16 and INT8", elem_id="speech-compare")
        compared = compare_columns(lambda name: gr.Textbox(label=f"{name} text", lines=6,
                                                           elem_id=f"speech-{name.lower()}-text"))
        compare_summary = gr.Textbox(label="Comparison", interactive=False, elem_id="speech-compare-summary")
    run.click(
        make_transcribe_handler(services),
        inputs=[audio, media_file, model, precision, device, task, language, timestamps, word_timestamps,
                vtt_word_timing],
        outputs=[text, detected, segments, files],
        api_name="transcribe",
        concurrency_id="whisper",
        concurrency_limit=settings.queue_limit("whisper"),
    ).success(show_words, inputs=[files, word_timestamps, vtt_word_timing], outputs=[words], queue=False,
              api_visibility="private")  # the browser's table only: /transcribe's outputs stay as they were
    compare.click(
        make_transcribe_compare_handler(services),
        inputs=[audio, media_file, model, device, task, language],
        outputs=compared + [compare_summary],
        api_name="transcribe_compare",
        concurrency_id="whisper",
        concurrency_limit=settings.queue_limit("whisper"),
    )
    build_live_captions(services)  # the Live mode: its own block (ui/live_captions.py)
