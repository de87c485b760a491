"""Tab 2: Video to subtitles. Endpoints ``/video_info``, ``/subtitles`` and ``/subtitles_compare`` (FP16 vs INT8)."""
from __future__ import annotations

from typing import Optional

import gradio as gr

from pipelines.services import Services
from pipelines.subtitles import job as subtitle_job
from pipelines.subtitles import youtube

from .common import (agreement_text, compare_columns, language_dropdown, progress_fn, speed_summary,
                     subtitle_request, task_radio, user_errors, whisper_pickers, working_dir)
from .subtitles_batch import build_batch_section


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
        with user_errors():
            info = youtube.fetch_info(url, yt_factory=yt_factory)
        minutes, seconds = divmod(int(info.length_seconds or 0), 60)
        return f"**{info.title}** by {info.author}, {minutes}:{seconds:02d}", info.thumbnail_url

    return video_info


def cue_text(cues) -> str:
    return "\n".join(f"[{c.start:.2f} → {c.end:.2f}] {c.text}" for c in cues)


def make_subtitles_handler(services: Services, yt_factory=youtube.YouTube):
    def subtitles(
        url: Optional[str] = None,
        video_file: Optional[str] = None,
        model: Optional[str] = None,
        precision: Optional[str] = None,
        device: Optional[str] = None,
        task: Optional[str] = None,
        language: Optional[str] = None,
        max_line_chars: Optional[float] = None,
        max_duration: Optional[float] = None,
        burn_in: bool = False,
        soft_track: bool = False,
        progress: gr.Progress = gr.Progress(),
    ):
        """Timed subtitles for a YouTube video or an uploaded video.

        Args:
            url: a YouTube link; leave empty to use `video_file`.
            video_file: an uploaded video (or audio) file; used when `url` is empty.
            model: Whisper model id, bundled model, or local folder (empty: the server's default).
            precision: "fp16" or "int8" (the first INT8 use quantizes the model: minutes).
            device: OpenVINO device (CPU, GPU, NPU, AUTO; empty: the server's default).
            task: "transcribe" (spoken language) or "translate" (English subtitles).
            language: spoken language code or "auto".
            max_line_chars: longest subtitle line in characters (20-80, default 42).
            max_duration: longest time one subtitle stays on screen, in seconds (2-10, default 6).
            burn_in: also make a copy of the video with the subtitles burned in.
            soft_track: also make a copy with the subtitles as a selectable track.
        Returns:
            the player (an update: "value" the video, "subtitles" its WebVTT file), the subtitle text, and files
            [srt, vtt, then the burned-in and soft-track videos when asked for].
        """
        report = progress_fn(progress)
        with user_errors():
            request = subtitle_request(services, url, video_file, model, precision, device, task, language,
                                       max_line_chars, max_duration, burn_in, soft_track)
            with working_dir("subtitles") as out_dir:
                result = subtitle_job.make_subtitles(services.whisper, request, out_dir, report, yt_factory=yt_factory)
        files = [str(result.files[k]) for k in ("srt", "vtt", "burned", "muxed") if k in result.files]
        # Gradio 6's Video takes its subtitles as a property, not as a (video, subtitles) value
        player = (gr.update(value=str(result.video), subtitles=str(result.files["vtt"])) if result.video
                  else gr.update(value=None, subtitles=None))
        for note in result.notes:
            gr.Info(note)
        return player, cue_text(result.cues), files

    return subtitles


def make_subtitles_compare_handler(services: Services, yt_factory=youtube.YouTube):
    def subtitles_compare(
        url: Optional[str] = None,
        video_file: Optional[str] = None,
        model: Optional[str] = None,
        device: Optional[str] = None,
        task: Optional[str] = None,
        language: Optional[str] = None,
        max_line_chars: Optional[float] = None,
        max_duration: Optional[float] = None,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[str, float, str, float, str, list[str]]:
        """Subtitles of the same video with the FP16 and the INT8 model, each transcription timed.

        The video is fetched and its audio extracted once; both models transcribe that audio. Each
        model is loaded before its run (the first INT8 use quantizes the model: minutes), so the
        times are transcription only.

        Args:
            url: a YouTube link; leave empty to use `video_file`.
            video_file: an uploaded video (or audio) file; used when `url` is empty.
            model: Whisper model id, bundled model, or local folder (empty: the server's default).
            device: OpenVINO device (CPU, GPU, NPU, AUTO; empty: the server's default).
            task: "transcribe" (spoken language) or "translate" (English subtitles).
            language: spoken language code or "auto".
            max_line_chars: longest subtitle line in characters (20-80, default 42).
            max_duration: longest time one subtitle stays on screen, in seconds (2-10, default 6).
        Returns:
            FP16 subtitles, FP16 seconds, INT8 subtitles, INT8 seconds, a summary (time ratio, how far the
            texts agree), and files [FP16 srt, FP16 vtt, INT8 srt, INT8 vtt].
        """
        report = progress_fn(progress)
        with user_errors():
            request = subtitle_request(services, url, video_file, model, "fp16", device, task, language,
                                       max_line_chars, max_duration)
            with working_dir("subtitles-compare") as work_dir:
                compared = subtitle_job.compare_subtitles(services.whisper, request, work_dir, report, yt_factory)
        fp16, int8 = compared.runs
        summary = f"{speed_summary(compared.runs)} {agreement_text(fp16.value.text, int8.value.text)}"
        files = [str(compared.files[p][k]) for p in ("fp16", "int8") for k in ("srt", "vtt")]
        return (cue_text(compared.cues["fp16"]), round(fp16.seconds, 3), cue_text(compared.cues["int8"]),
                round(int8.seconds, 3), summary, files)

    return subtitles_compare


def build_subtitles_tab(services: Services) -> None:
    settings = services.settings
    with gr.Row():
        with gr.Column():
            url = gr.Textbox(label="YouTube link", placeholder="https://www.youtube.com/watch?v=…")
            with gr.Row():
                info = gr.Markdown(label="Video details")
                thumbnail = gr.Image(label="Thumbnail", height=120, interactive=False)
            video_file = gr.File(label="…or upload a video", file_types=["video", "audio"], type="filepath")
            model, precision, device = whisper_pickers(settings)
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
    with gr.Accordion("Compare FP16 and INT8: the same audio through both models, timed", open=False):
        compare = gr.Button("Compare FP16 and INT8", elem_id="subtitles-compare")
        compared = compare_columns(lambda name: gr.Textbox(label=f"{name} subtitles", lines=8))
        compare_summary = gr.Textbox(label="Comparison", interactive=False)
        compare_files = gr.File(label="Downloads (FP16 and INT8 SRT, WebVTT)", file_count="multiple")
    url.blur(make_info_handler(), inputs=[url], outputs=[info, thumbnail], api_name="video_info",
             concurrency_id="network", concurrency_limit=settings.queue_limit("network"))
    run.click(
        make_subtitles_handler(services),
        inputs=[url, video_file, model, precision, device, task, language, max_line_chars, max_duration,
                burn_in, soft_track],
        outputs=[player, cues, files],
        api_name="subtitles",
        concurrency_id="whisper",
        concurrency_limit=settings.queue_limit("whisper"),
    )
    compare.click(
        make_subtitles_compare_handler(services),
        inputs=[url, video_file, model, device, task, language, max_line_chars, max_duration],
        outputs=compared + [compare_summary, compare_files],
        api_name="subtitles_compare",
        concurrency_id="whisper",
        concurrency_limit=settings.queue_limit("whisper"),
    )
    build_batch_section(services, settings_inputs=[model, precision, device, task, language, max_line_chars,
                                                   max_duration])
