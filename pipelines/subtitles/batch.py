"""Batch subtitle jobs: several uploads and YouTube links (a playlist link stands for its videos) ->
subtitles for each, with each item's own progress and outcome, and one zip of every SRT and WebVTT.

Each item goes the single job's way (:mod:`pipelines.subtitles.job`): fetch the source (no preview
video), extract its audio, transcribe it with ``whisper`` (word timestamps, as the Subtitles tab asks),
write its files. :class:`BatchJob` runs ``width`` items at once: embedded one or two (one downloads
or extracts while another transcribes, both in the work slots), on Ray as many as the Whisper
replicas take, so the items fan out over them (``whisper`` is then
:class:`pipelines.serve.remote.RemoteWhisper`: the transcription of an item whose replica dies is
tried again on another one).

- A failed item (bad link, no audio, unreadable file, its replica lost twice) is reported with its
  error and does not stop the others.
- A finished item is never redone: its files are written, then its ``done.json`` (atomically, last);
  an item whose folder holds one is reported done without running again.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from pipelines.core.errors import ModelUnavailable, ServiceUnavailable
from pipelines.core.progress import ProgressFn, scaled
from pipelines.subtitles import youtube
from pipelines.subtitles.formats import write_outputs
from pipelines.subtitles.job import SubtitleRequest, extract_audio, fetch_source

log = logging.getLogger(__name__)

#: Items in one batch at most, playlists counted video by video.
MAX_ITEMS = 100
QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
DONE_MARKER = "done.json"
ZIP_NAME = "subtitles.zip"
SUBTITLE_KINDS = ("srt", "vtt")

ItemRunner = Callable[["BatchItem", Path, ProgressFn], dict]  # item, its folder, progress -> outcome


class BatchInputError(ValueError):
    """The batch as given cannot start (nothing given, too many items); the message says what to do."""


class ItemError(ValueError):
    """An item known to fail before any work (e.g. a playlist that could not be read)."""


@dataclass(frozen=True)
class BatchItem:
    number: int  # 1-based, in the order given
    source: str  # what the user gave: a file name or a link
    url: Optional[str] = None
    path: Optional[Path] = None
    error: Optional[str] = None  # fails at once with this message


@dataclass
class ItemStatus:
    """Where one item is: its state, progress and, once done, its files."""

    item: BatchItem
    state: str = QUEUED
    fraction: float = 0.0
    message: str = "waiting"
    title: str = ""
    language: str = ""
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- what the batch holds
def split_links(text: Optional[str]) -> list[str]:
    """The links in ``text``: one a line (spaces and commas separate them too)."""
    return [part for part in re.split(r"[\s,]+", text or "") if part]


def collect_items(files: Sequence[Any] = (), links: Optional[str] = None,
                  playlist_factory: youtube.PlaylistFactory = youtube.Playlist,
                  max_items: int = MAX_ITEMS) -> list[BatchItem]:
    """The batch's items: each uploaded file, then each link in order, a playlist link standing for
    its videos. A playlist that cannot be read is an item that fails with the reason (the others go
    on); a link that is not YouTube's fails as its item runs, before any connection is made."""
    sources: list[tuple[str, Optional[str], Optional[Path], Optional[str]]] = []
    for upload in files or ():
        path = Path(upload if isinstance(upload, (str, Path)) else getattr(upload, "name", str(upload)))
        sources.append((path.name, None, path, None))
    for link in split_links(links):
        if youtube.playlist_id(link) is None:
            sources.append((link, link, None, None))
            continue
        try:
            videos = youtube.playlist_video_urls(link, playlist_factory, limit=max_items + 1)
        except youtube.YouTubeError as exc:
            sources.append((link, None, None, exc.user_message))
            continue
        sources += [(f"{url} (playlist {index} of {len(videos)})", url, None, None)
                    for index, url in enumerate(videos, start=1)]
    if not sources:
        raise BatchInputError("Upload one or more videos or audio files, or paste YouTube links (one a line; a "
                              "playlist link adds all its videos).")
    if len(sources) > max_items:
        raise BatchInputError(f"This batch has more than {max_items} items (playlists count video by video); at "
                              f"most {max_items} are taken at once. Split it into smaller batches.")
    return [BatchItem(number, source, url, path, error)
            for number, (source, url, path, error) in enumerate(sources, start=1)]


# --------------------------------------------------------------------------- one item
def subtitle_item(whisper: Any, request: SubtitleRequest, item: BatchItem, folder: Path, progress: ProgressFn,
                  yt_factory: youtube.YouTubeFactory = youtube.YouTube) -> dict:
    """Subtitles for one item, written into ``folder``: fetch, extract the audio, transcribe (with
    ``whisper``: a WhisperService, or its Ray client), write SRT and WebVTT. The downloaded and the
    extracted audio are deleted afterwards. Raises the item's error."""
    if item.error:
        raise ItemError(item.error)
    request = replace(request, url=item.url, video_path=item.path, burn_in=False, soft_track=False)
    source = fetch_source(request, folder, progress, yt_factory, preview=False)
    wav = extract_audio(source, request, folder, progress)
    try:
        transcript = whisper.transcribe_file(wav, request.choice, request.options, scaled(progress, 0.3, 0.95))
    finally:
        wav.unlink(missing_ok=True)
        if item.url:
            source.media.unlink(missing_ok=True)
        shutil.rmtree(folder / "source", ignore_errors=True)  # the job's own link to an upload
    files = write_outputs(transcript, folder, f"{item.number:02d}-{source.stem}", request.rules)
    return {"title": source.stem, "language": transcript.language or "",
            "files": {kind: str(files[kind]) for kind in SUBTITLE_KINDS}}


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is one of the errors the pipelines word for the user (bad input, a model that
    cannot be had, a media or YouTube problem, workers unavailable) rather than a bug."""
    return isinstance(exc, (ValueError, OSError, ModelUnavailable, ServiceUnavailable)) or hasattr(exc, "user_message")


def error_message(exc: BaseException) -> str:
    """What an item's failure says: the message written for the user, else the exception's name and text."""
    message = getattr(exc, "user_message", None) or str(exc)
    if is_user_error(exc):
        return message or type(exc).__name__
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the job
class BatchJob:
    """Runs ``run_item`` over the items, ``width`` at once, in folders under ``job_dir``; the UI polls
    :meth:`snapshot`. :attr:`cancel` stops items from starting (running ones finish)."""

    def __init__(self, items: Sequence[BatchItem], run_item: ItemRunner, job_dir: Path, width: int):
        self.statuses = [ItemStatus(item) for item in items]
        self.run_item = run_item
        self.job_dir = Path(job_dir)
        self.width = max(1, int(width))
        self.cancel = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        self.job_dir.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(min(self.width, len(self.statuses)) or 1, thread_name_prefix="vs-batch") as pool:
            list(pool.map(self._one, self.statuses))

    def _update(self, status: ItemStatus, **changes: Any) -> None:
        with self._lock:
            for name, value in changes.items():
                setattr(status, name, value)

    def _one(self, status: ItemStatus) -> None:
        folder = self.job_dir / f"{status.item.number:02d}"
        marker = folder / DONE_MARKER
        if marker.is_file():  # finished before: never redone
            self._update(status, **json.loads(marker.read_text()), state=DONE, fraction=1.0, message="already done")
            return
        if self.cancel.is_set():
            self._update(status, state=CANCELLED, message="cancelled before it started")
            return
        self._update(status, state=RUNNING, message="started")
        started = time.perf_counter()

        def progress(fraction: float, message: str) -> None:
            self._update(status, fraction=max(0.0, min(1.0, float(fraction))), message=message)

        try:
            outcome = self.run_item(status.item, folder, progress)
        except Exception as exc:  # noqa: BLE001 - one bad item must not stop the batch
            if not is_user_error(exc):
                log.warning("batch item %s (%s) failed", status.item.number, status.item.source, exc_info=True)
            self._update(status, state=FAILED, fraction=1.0, message=error_message(exc),
                         seconds=round(time.perf_counter() - started, 2))
            return
        record = {"title": outcome.get("title", ""), "language": outcome.get("language", ""),
                  "files": outcome.get("files", {}), "seconds": round(time.perf_counter() - started, 2)}
        _write_atomic(marker, json.dumps(record))  # after the files: done means its files are there
        self._update(status, **record, state=DONE, fraction=1.0, message="done")

    # -- what the UI shows ----------------------------------------------------------------------
    def snapshot(self) -> list[ItemStatus]:
        with self._lock:
            return [replace(status, files=dict(status.files)) for status in self.statuses]

    def fraction(self) -> float:
        statuses = self.snapshot()
        return sum(s.fraction for s in statuses) / max(len(statuses), 1)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for status in self.snapshot():
            counts[status.state] = counts.get(status.state, 0) + 1
        return counts

    def summary(self) -> str:
        counts = self.counts()
        parts = [f"{counts[state]} {state}" for state in (RUNNING, QUEUED, DONE, FAILED, CANCELLED)
                 if counts.get(state)]
        return f"{len(self.statuses)} item{'s' if len(self.statuses) != 1 else ''}: " + ", ".join(parts) + "."

    def zip(self) -> Optional[Path]:
        """A zip of every done item's SRT and WebVTT files (None when no item is done)."""
        files = [Path(f) for s in self.snapshot() if s.state == DONE for f in s.files.values()]
        files = [f for f in files if f.is_file()]
        if not files:
            return None
        path = self.job_dir / ZIP_NAME
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for file in files:
                archive.write(file, file.name)
        return path
