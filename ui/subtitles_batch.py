"""The Subtitles tab's batch section and the ``/subtitles_batch`` endpoint: several uploads and/or
YouTube links (a playlist link adds its videos) -> subtitles for each, a table of every item's
progress and outcome that fills in as they run, and one zip of all the SRT and WebVTT files.

The items run through ``services.whisper`` like one subtitles request (:mod:`pipelines.subtitles.batch`):
embedded one or two at a time, on Ray over the Whisper replicas (``services.batch_width``).
"""
from __future__ import annotations

import threading
import time
from typing import Any, Iterator, Optional, Sequence

import gradio as gr

from pipelines.subtitles import youtube
from pipelines.subtitles.batch import BatchJob, ItemStatus, collect_items, subtitle_item

from .common import progress_fn, subtitle_request, user_errors, working_dir

BATCH_COLUMNS = ["#", "source", "status", "progress", "details", "language", "seconds"]
#: How often the table is refreshed while the items run.
POLL_SECONDS = 0.5


def batch_table(statuses: Sequence[ItemStatus]) -> list[list]:
    """One row per item: number, what was given, state, progress, its last message or error, language, seconds."""
    rows = []
    for s in statuses:
        details = f"{s.title}: {s.message}" if s.title and s.state == "done" else s.message
        rows.append([s.item.number, s.item.source, s.state, f"{s.fraction:.0%}", details, s.language,
                     s.seconds or ""])
    return rows


def make_batch_handler(services, yt_factory=youtube.YouTube, playlist_factory=youtube.Playlist):
    def subtitles_batch(
        files: Optional[list[str]] = None, links: Optional[str] = None,  # what to subtitle
        model: Optional[str] = None, precision: Optional[str] = None, device: Optional[str] = None,  # the tab's pickers
        task: Optional[str] = None, language: Optional[str] = None,
        max_line_chars: Optional[float] = None, max_duration: Optional[float] = None,  # cue rules
        progress: gr.Progress = gr.Progress(),
    ) -> Iterator[tuple[list[list], Optional[str], str]]:
        """Subtitles for several videos at once: uploaded files and/or YouTube links, each item on its own.

        A failed item (a bad link, a file without audio) is reported in the table and does not stop
        the others. The table fills in while the items run (gradio_client's `submit` sees each update;
        `predict` returns the last).

        Args:
            files: uploaded videos or audio files.
            links: YouTube links, one a line (spaces or commas also separate them); a playlist link
                (youtube.com/playlist?list=...) adds each of its videos.
            model: Whisper model id, bundled model, or local folder (empty: the server's default).
            precision: "fp16" or "int8" (the first INT8 use quantizes the model: minutes).
            device: OpenVINO device (CPU, GPU, NPU, AUTO; empty: the server's default).
            task: "transcribe" (spoken language) or "translate" (English subtitles).
            language: spoken language code or "auto".
            max_line_chars: longest subtitle line in characters (20-80, default 42).
            max_duration: longest time one subtitle stays on screen, in seconds (2-10, default 6).
        Returns:
            the items [number, source, status (queued, running, done, failed, cancelled), progress,
            details (title, or the error), language, seconds], a zip of every done item's SRT and
            WebVTT files (none until the end, or when no item is done), and a summary.
        """
        report = progress_fn(progress)
        with user_errors():
            request = subtitle_request(services, None, None, model, precision, device, task, language,
                                       max_line_chars, max_duration)
            items = collect_items(files or [], links, playlist_factory)
        with working_dir("subtitles-batch") as job_dir:
            job = BatchJob(items, lambda item, folder, part: subtitle_item(
                services.whisper, request, item, folder, part, yt_factory), job_dir, services.batch_width)
            yield from _follow(job, report)

    return subtitles_batch


def _follow(job: BatchJob, report) -> Iterator[tuple[list[list], Optional[str], str]]:
    """Run ``job`` in a thread and yield its table whenever it changes (at least every few seconds),
    then the table, the zip and the summary. Closed early (the page was left, the call cancelled),
    items not started yet are not started."""
    worker = threading.Thread(target=job.run, name="vs-batch-job", daemon=True)
    worker.start()
    shown: Any = None
    last = 0.0
    try:
        while worker.is_alive():
            worker.join(POLL_SECONDS)
            table = batch_table(job.snapshot())
            report(job.fraction(), job.summary())
            if table != shown or time.monotonic() - last > 5.0:
                shown, last = table, time.monotonic()
                yield table, None, job.summary()
        archive = job.zip()
        report(1.0, "done")
        yield batch_table(job.snapshot()), (str(archive) if archive else None), job.summary()
    finally:
        job.cancel.set()


def build_batch_section(services, settings_inputs: list) -> None:
    """The batch accordion; ``settings_inputs`` are the tab's model, precision, device, task, language
    and cue pickers, which the batch shares."""
    settings = services.settings
    with gr.Accordion("Batch: subtitles for several videos or links at once", open=False):
        with gr.Row():
            files = gr.File(label="Videos or audio files", file_count="multiple", file_types=["video", "audio"],
                            type="filepath", elem_id="batch-files")
            links = gr.Textbox(label="YouTube links, one a line (a playlist link adds all its videos)", lines=4,
                               placeholder="https://www.youtube.com/watch?v=…\n"
                                           "https://www.youtube.com/playlist?list=…",
                               elem_id="batch-links")
        run = gr.Button("Make subtitles for all", elem_id="batch-run")
        summary = gr.Textbox(label="Batch", interactive=False, elem_id="batch-summary")
        table = gr.Dataframe(headers=BATCH_COLUMNS, label="Items", wrap=True, interactive=False,
                             elem_id="batch-items")
        archive = gr.File(label="All subtitles (zip of the SRT and WebVTT files)", elem_id="batch-zip")
    run.click(make_batch_handler(services), inputs=[files, links, *settings_inputs], outputs=[table, archive, summary],
              api_name="subtitles_batch", concurrency_id="batch", concurrency_limit=settings.queue_limit("batch"))
