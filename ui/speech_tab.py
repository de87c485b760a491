"""Tab 1: Speech to text. Endpoint ``/transcribe``."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import gradio as gr

from pipelines.asr import TranscriptionRefused
from pipelines.audio import AudioError, load_audio
from pipelines.devices import validate_device
from pipelines.model_store import ModelUnavailable
from pipelines.services import Services
from pipelines.subtitles import CueRules, write_outputs
from pipelines.types import ModelChoice, TranscribeOptions, Transcript

from .common import (AUTO_LANGUAGE, device_dropdown, duration_text, language_dropdown, precision_radio,
                     progress_fn, request_dir, task_radio, whisper_model_dropdown)

log = logging.getLogger(__name__)
SEGMENT_COLUMNS = ["start", "end", "text"]

# Errors whose message is written for the user: shown as is.
USER_ERRORS = (AudioError, ModelUnavailable, TranscriptionRefused, ValueError)


def segments_table(transcript: Transcript) -> list[list]:
    return [[f"{s.start:.2f}", f"{s.end:.2f}", s.text] for s in transcript.segments]


def make_transcribe_handler(services: Services):
    """The event handler behind the tab and the /transcribe endpoint."""

    def transcribe(
        audio: Optional[str],
        media_file: Optional[str],
        model: str,
        precision: str,
        device: str,
        task: str,
        language: str,
        timestamps: bool,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[str, str, list[list], list[str]]:
        """Transcribe or translate speech.

        Args:
            audio: a recording or uploaded audio file (wav, mp3, flac, ogg, m4a).
            media_file: alternatively any audio or video file; used when `audio` is empty.
            model: Whisper model id, bundled model, or local folder.
            precision: "fp16" or "int8".
            device: OpenVINO device (CPU, GPU, NPU, AUTO).
            task: "transcribe" or "translate" (to English).
            language: spoken language code, or "auto" to detect it.
            timestamps: whether to return timed segments.
        Returns:
            text, detected language, segments [start, end, text], files [srt, vtt, txt, json].
        """
        source = audio or media_file
        if not source:
            raise gr.Error("No audio was given. Record with the microphone or upload an audio or video file.")
        report = progress_fn(progress)
        try:
            choice = ModelChoice(model=services.settings.check_model(model or services.settings.default_model),
                                 precision=precision or "fp16",
                                 device=validate_device(device or services.settings.default_device))
            options = TranscribeOptions(task=task or "transcribe",
                                        language=None if language in (None, "", AUTO_LANGUAGE) else language,
                                        timestamps=bool(timestamps))
            report(0.0, "decode audio")
            samples = load_audio(Path(source))
            seconds = samples.size / 16000
            if seconds > services.settings.max_audio_seconds:
                raise AudioError(f"The audio is {duration_text(seconds)} long; this server accepts up to "
                                 f"{duration_text(services.settings.max_audio_seconds)}. Cut it into parts.")
            transcript = services.whisper.transcribe(samples, choice, options, report)
        except USER_ERRORS as exc:
            raise gr.Error(str(exc)) from exc
        out_dir = request_dir("speech")
        files = write_outputs(transcript, out_dir, Path(source).stem or "transcript", CueRules())
        report(1.0, "done")
        return transcript.text, transcript.language or "", segments_table(transcript), [
            str(files[k]) for k in ("srt", "vtt", "txt", "json")]

    return transcribe


def build_speech_tab(services: Services) -> None:
    settings = services.settings
    with gr.Row():
        with gr.Column():
            audio = gr.Audio(sources=["microphone", "upload"], type="filepath", label="Record or upload audio")
            media_file = gr.File(label="…or any audio/video file (its audio track is used)",
                                 file_types=["audio", "video"], type="filepath", elem_id="speech-file")
            with gr.Row():
                model = whisper_model_dropdown(settings.default_model, settings.allow_local_models)
                precision = precision_radio()
                device = device_dropdown(settings.default_device)
            with gr.Row():
                task = task_radio()
                language = language_dropdown()
                timestamps = gr.Checkbox(value=True, label="Timestamps")
            run = gr.Button("Transcribe", variant="primary", elem_id="speech-run")
        with gr.Column():
            text = gr.Textbox(label="Text", lines=8, buttons=["copy"], elem_id="speech-text")
            detected = gr.Textbox(label="Detected language", elem_id="speech-language")
            segments = gr.Dataframe(headers=SEGMENT_COLUMNS, label="Segments", wrap=True, interactive=False)
            files = gr.File(label="Downloads (SRT, WebVTT, TXT, JSON)", file_count="multiple")
    run.click(
        make_transcribe_handler(services),
        inputs=[audio, media_file, model, precision, device, task, language, timestamps],
        outputs=[text, detected, segments, files],
        api_name="transcribe",
        concurrency_id="whisper",
        concurrency_limit=settings.concurrency["whisper"],
    )
