"""Tab 2: Video to subtitles. Endpoints ``/video_info`` and ``/subtitles``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import gradio as gr

from pipelines import subtitle_job, video, youtube
from pipelines.asr import TranscriptionRefused
from pipelines.audio import AudioError
from pipelines.devices import validate_device
from pipelines.model_store import ModelUnavailable
from pipelines.services import Services
from pipelines.subtitles import CueRules
from pipelines.types import ModelChoice, TranscribeOptions

from .common import (AUTO_LANGUAGE, device_dropdown, language_dropdown, precision_radio, progress_fn,
                     request_dir, task_radio, whisper_model_dropdown)

USER_ERRORS = (youtube.YouTubeError, video.MediaError, subtitle_job.SubtitleInputError, AudioError,
               ModelUnavailable, TranscriptionRefused, ValueError)


def _message(exc: Exception) -> str:
    return getattr(exc, "user_message", None) or str(exc)


def make_info_handler(yt_factory=youtube.YouTube):
    def video_info(url: str) -> tuple[str, Optional[str]]:
        """Title, length and thumbnail of a YouTube video, before any download.

        Args:
            url: a YouTube link (youtube.com/watch, youtu.be, shorts).
        Returns:
            a Markdown description and the thumbnail URL.
        """
        if not url or not url.strip():
            return "", None
        try:
            info = youtube.fetch_info(url, yt_factory=yt_factory)
        except youtube.YouTubeError as exc:
            raise gr.Error(_message(exc)) from exc
        minutes, seconds = divmod(int(info.length_seconds or 0), 60)
        return f"**{info.title}** by {info.author}, {minutes}:{seconds:02d}", info.thumbnail_url

    return video_info


def make_subtitles_handler(services: Services, yt_factory=youtube.YouTube):
    def subtitles(
        url: str,
        video_file: Optional[str],
        model: str,
        precision: str,
        device: str,
        task: str,
        language: str,
        max_line_chars: float,
        max_duration: float,
        burn_in: bool,
        soft_track: bool,
        progress: gr.Progress = gr.Progress(),
    ):
        """Timed subtitles for a YouTube video or an uploaded video.

        Args:
            url: a YouTube link; leave empty to use `video_file`.
            video_file: an uploaded video (or audio) file.
            model, precision, device: as in /transcribe.
            task: "transcribe" (spoken language) or "translate" (English subtitles).
            language: spoken language code or "auto".
            max_line_chars: longest subtitle line in characters.
            max_duration: longest time one subtitle stays on screen, in seconds.
            burn_in: also make a copy of the video with the subtitles burned in.
            soft_track: also make a copy with the subtitles as a selectable track.
        Returns:
            the player (the video with its WebVTT subtitles), the subtitle text, and files [srt, vtt, ...videos].
        """
        report = progress_fn(progress)
        try:
            request = subtitle_job.SubtitleRequest(
                choice=ModelChoice(model=services.settings.check_model(model or services.settings.default_model),
                                   precision=precision or "fp16",
                                   device=validate_device(device or services.settings.default_device)),
                options=TranscribeOptions(task=task or "transcribe",
                                          language=None if language in (None, "", AUTO_LANGUAGE) else language,
                                          word_timestamps=True),  # cue times follow the words
                rules=CueRules(max_line_chars=int(max_line_chars or 42), max_duration=float(max_duration or 6.0)),
                url=url or None,
                video_path=Path(video_file) if video_file else None,
                burn_in=bool(burn_in),
                soft_track=bool(soft_track),
                max_seconds=services.settings.max_audio_seconds,
            )
            result = subtitle_job.make_subtitles(services.whisper, request, request_dir("subtitles"), report,
                                                 yt_factory=yt_factory)
        except USER_ERRORS as exc:
            raise gr.Error(_message(exc)) from exc
        files = [str(result.files[k]) for k in ("srt", "vtt", "burned", "muxed") if k in result.files]
        # Gradio 6's Video takes its subtitles as a property, not as a (video, subtitles) value
        player = (gr.update(value=str(result.video), subtitles=str(result.files["vtt"])) if result.video
                  else gr.update(value=None, subtitles=None))
        text = "\n".join(f"[{c.start:.2f} → {c.end:.2f}] {c.text}" for c in result.cues)
        for note in result.notes:
            gr.Info(note)
        return player, text, files

    return subtitles


def build_subtitles_tab(services: Services) -> None:
    settings = services.settings
    with gr.Row():
        with gr.Column():
            url = gr.Textbox(label="YouTube link", placeholder="https://www.youtube.com/watch?v=…")
            with gr.Row():
                info = gr.Markdown()
                thumbnail = gr.Image(label="Thumbnail", height=120, interactive=False)
            video_file = gr.File(label="…or upload a video", file_types=["video", "audio"], type="filepath")
            with gr.Row():
                model = whisper_model_dropdown(settings.default_model, settings.allow_local_models)
                precision = precision_radio()
                device = device_dropdown(settings.default_device)
            with gr.Row():
                task = task_radio()
                language = language_dropdown()
            with gr.Row():
                max_line_chars = gr.Slider(20, 80, value=42, step=1, label="Max characters per line")
                max_duration = gr.Slider(2, 10, value=6, step=0.5, label="Max seconds per subtitle")
            with gr.Row():
                burn_in = gr.Checkbox(label="Burn subtitles into a video copy")
                soft_track = gr.Checkbox(label="Add subtitles as a soft track")
            run = gr.Button("Make subtitles", variant="primary")
        with gr.Column():
            player = gr.Video(label="Video with subtitles", interactive=False)
            cues = gr.Textbox(label="Subtitles", lines=10)
            files = gr.File(label="Downloads", file_count="multiple")
    url.blur(make_info_handler(), inputs=[url], outputs=[info, thumbnail], api_name="video_info",
             concurrency_id="network", concurrency_limit=settings.concurrency["network"])
    run.click(
        make_subtitles_handler(services),
        inputs=[url, video_file, model, precision, device, task, language, max_line_chars, max_duration,
                burn_in, soft_track],
        outputs=[player, cues, files],
        api_name="subtitles",
        concurrency_id="whisper",
        concurrency_limit=settings.concurrency["whisper"],
    )
