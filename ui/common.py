"""Pickers and helpers shared by the tabs: the Whisper request built from the pickers, errors shown to
the user, the FP16 / INT8 comparison's summary, and per-request output folders with a bounded life."""
from __future__ import annotations

import difflib
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import gradio as gr

from pipelines.core.cache import folder_held, folder_in_use
from pipelines.core.compare import PrecisionRun
from pipelines.core.devices import available_devices, validate_device
from pipelines.core.errors import DiskFull, ModelUnavailable, ServiceUnavailable
from pipelines.core.progress import ProgressFn
from pipelines.core.types import ModelChoice, check_precision
from pipelines.speech.catalogue import CATALOGUE, LANGUAGES
from pipelines.speech.service import refuse_unsupported
from pipelines.speech.types import TranscribeOptions
from pipelines.subtitles.cues import CueRules
from pipelines.subtitles.job import SubtitleRequest
from pipelines.subtitles.video import MediaError
from pipelines.subtitles.youtube import YouTubeError

log = logging.getLogger(__name__)

AUTO_LANGUAGE = "auto"


# --------------------------------------------------------------------------- pickers
def whisper_model_dropdown(default: str, allow_local: bool = True) -> gr.Dropdown:
    choices = [(m.label, m.id) for m in CATALOGUE]
    if default not in {m.id for m in CATALOGUE}:
        choices.insert(0, (default, default))
    info = ("A listed model, a Hugging Face id, or a local folder (HF, CTranslate2 or OpenVINO IR)." if allow_local
            else "A listed model or a Hugging Face id.")
    return gr.Dropdown(choices=choices, value=default, label="Whisper model", allow_custom_value=True, info=info)


def precision_radio(label: str = "Precision", info: Optional[str] = None, value: str = "fp16") -> gr.Radio:
    return gr.Radio(choices=[("FP16", "fp16"), ("INT8", "int8")], value=value, label=label,
                    info=info or "INT8 is smaller, with the same words, but at most about 1.2x faster "
                                 "(measured; README, Benchmarks). Its first use quantizes the model.")


def device_dropdown(default: str) -> gr.Dropdown:
    devices = list(available_devices())
    return gr.Dropdown(choices=devices, value=default if default in devices else devices[0], label="Device")


def language_dropdown() -> gr.Dropdown:
    choices = [("Detect automatically", AUTO_LANGUAGE)] + [(f"{name.title()} ({code})", code)
                                                           for code, name in LANGUAGES.items()]
    return gr.Dropdown(choices=choices, value=AUTO_LANGUAGE, label="Spoken language")


def task_radio() -> gr.Radio:
    return gr.Radio(choices=[("Transcribe", "transcribe"), ("Translate to English", "translate")],
                    value="transcribe", label="Task")


def whisper_pickers(settings, precision_label: str = "Precision") -> tuple[gr.Dropdown, gr.Radio, gr.Dropdown]:
    """One row of the Whisper model, precision and device pickers, as every Whisper action takes them."""
    with gr.Row():
        return (whisper_model_dropdown(settings.default_model, settings.allow_local_models),
                precision_radio(precision_label), device_dropdown(settings.default_device))


def compare_columns(result: Callable[[str], gr.Component], time_label: str = "seconds") -> list[gr.Component]:
    """The compare panel's two columns, FP16 then INT8: each a result made by ``result(name)`` over its
    time. Returns [FP16 result, FP16 time, INT8 result, INT8 time], the compare endpoints' first outputs."""
    outputs = []
    with gr.Row():
        for name in ("FP16", "INT8"):
            with gr.Column():
                outputs += [result(name), gr.Number(label=f"{name} {time_label}", interactive=False)]
    return outputs


# --------------------------------------------------------------------------- request values
def whisper_request(settings, model: Optional[str], precision: Optional[str], device: Optional[str],
                    task: Optional[str] = "transcribe", language: Optional[str] = AUTO_LANGUAGE,
                    **options: Any) -> tuple[ModelChoice, TranscribeOptions]:
    """The model choice and decoding options of one Whisper request, from the pickers' values.

    Empty values take the server's defaults; the model passes the shared-mode check
    (``settings.check_model``), the device and precision are validated, and a task the model cannot
    do is refused before any model is loaded. ``options`` are further :class:`TranscribeOptions`
    fields (timestamps, word_timestamps). Raises ValueError with a message written for the user.
    """
    choice = ModelChoice(model=settings.check_model(model or settings.default_model, kind="Whisper model"),
                         precision=check_precision(precision or "fp16"),
                         device=validate_device(device or settings.default_device))
    request = TranscribeOptions(task=task or "transcribe",
                                language=None if language in (None, "", AUTO_LANGUAGE) else language, **options)
    refuse_unsupported(choice.model, request)
    return choice, request


def subtitle_request(services, url, video_file, model, precision, device, task, language, max_line_chars,
                     max_duration, burn_in=False, soft_track=False) -> SubtitleRequest:
    """A subtitles request from the Subtitles tab's inputs (cue times follow the words)."""
    choice, options = whisper_request(services.settings, model, precision, device, task, language,
                                      word_timestamps=True)
    return SubtitleRequest(
        choice=choice, options=options,
        rules=CueRules(max_line_chars=int(max_line_chars or 42), max_duration=float(max_duration or 6.0)),
        url=url or None,
        video_path=Path(video_file) if video_file else None,
        burn_in=bool(burn_in),
        soft_track=bool(soft_track),
        max_seconds=services.settings.max_audio_seconds,
    )


# --------------------------------------------------------------------------- errors and progress
#: Errors whose message is written for the user (what is wrong, what to do): shown as they are.
USER_ERRORS = (ValueError, ModelUnavailable, DiskFull, YouTubeError, MediaError, ServiceUnavailable)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors the pipelines write for users into a ``gr.Error`` with their message."""
    try:
        yield
    except USER_ERRORS as exc:
        raise gr.Error(getattr(exc, "user_message", None) or str(exc)) from exc


def progress_fn(progress: gr.Progress) -> ProgressFn:
    """Adapt a gr.Progress to the pipelines' (fraction, step) callback."""
    def report(fraction: float, message: str) -> None:
        progress(fraction, desc=message)
    return report


# --------------------------------------------------------------------------- FP16 vs INT8, shown
def speed_summary(runs: Sequence[PrecisionRun], unit: str = "s", seconds: Optional[Sequence[float]] = None) -> str:
    """'FP16 2.10 s, INT8 1.05 s: INT8 is 2.00x as fast as FP16.' (``seconds`` overrides the runs' times)."""
    times = list(seconds) if seconds is not None else [r.seconds for r in runs]
    parts = ", ".join(f"{r.precision.upper()} {t:.3f} {unit}" for r, t in zip(runs, times))
    first, second = times[0], times[-1]
    if second <= 0 or first <= 0:
        return f"{parts}."
    ratio = first / second
    return (f"{parts}: {runs[-1].precision.upper()} is {ratio:.2f}x as fast as {runs[0].precision.upper()} "
            f"(time ratio {runs[0].precision.upper()}/{runs[-1].precision.upper()} = {ratio:.2f}).")


def agreement_text(first: str, second: str) -> str:
    """How far two texts agree, word for word (case and punctuation aside)."""
    def tokens(text: str) -> list[str]:
        return re.sub(r"[^\w' ]+", " ", text.lower()).split()

    a, b = tokens(first), tokens(second)
    if a == b:
        return "The texts are the same." if a else "Both runs heard no speech."
    share = difflib.SequenceMatcher(a=a, b=b, autojunk=False).ratio()
    return f"The texts agree on {share:.0%} of their words."


# --------------------------------------------------------------------------- output folders
OUTPUT_PREFIX = "voice-studio-"
#: Hours a request's output folder is kept; older ones go when a new one is made
#: (env VOICE_STUDIO_KEEP_OUTPUTS_HOURS). Gradio has its own copy of every file it served by then.
DEFAULT_KEEP_OUTPUTS_HOURS = 24.0
#: Shorter lifetimes are raised to this: a result must outlive the click on its download link, and
#: Gradio's cache sweep runs every min(1 h, lifetime), so a near-zero lifetime would sweep non-stop.
MIN_KEEP_OUTPUTS_HOURS = 10 / 60
CLEAN_EVERY_SECONDS = 60.0
_OUTPUT_DIR = re.compile(rf"^{re.escape(OUTPUT_PREFIX)}[a-z0-9]+(?:-[a-z0-9]+)*-[a-z0-9_]{{8}}$")
_last_clean = [float("-inf")]
_clean_lock = threading.Lock()


def keep_outputs_hours(environ=os.environ) -> float:
    """VOICE_STUDIO_KEEP_OUTPUTS_HOURS: the default when unset or not a positive number, at least 10 minutes."""
    value = environ.get("VOICE_STUDIO_KEEP_OUTPUTS_HOURS") or ""
    try:
        hours = float(value or DEFAULT_KEEP_OUTPUTS_HOURS)
    except ValueError:
        hours = float("nan")
    if not hours > 0 or math.isinf(hours):
        log.warning("VOICE_STUDIO_KEEP_OUTPUTS_HOURS=%r is not a positive number of hours; using %g",
                    value, DEFAULT_KEEP_OUTPUTS_HOURS)
        return DEFAULT_KEEP_OUTPUTS_HOURS
    if hours < MIN_KEEP_OUTPUTS_HOURS:
        log.warning("VOICE_STUDIO_KEEP_OUTPUTS_HOURS=%s is shorter than 10 minutes; keeping outputs 10 minutes",
                    value)
        return MIN_KEEP_OUTPUTS_HOURS
    return hours


def clean_request_dirs(max_age_hours: float, root: Optional[Path] = None, now: Optional[float] = None) -> list[Path]:
    """Remove this app's request folders (``voice-studio-<kind>-XXXXXXXX`` in ``root``, the temp dir by
    default) last changed more than ``max_age_hours`` ago. Returns what was removed."""
    root = Path(root or tempfile.gettempdir())
    limit = (time.time() if now is None else now) - max_age_hours * 3600.0
    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        if not _OUTPUT_DIR.match(entry.name):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_mtime >= limit:
                continue
        except OSError:
            continue
        if folder_in_use(Path(entry.path)):  # a long job (subtitles of a long video) still works in it
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    if removed:
        log.info("removed %d output folder(s) older than %g hours from %s", len(removed), max_age_hours, root)
    return removed


def request_dir(prefix: str, root: Optional[Path] = None) -> Path:
    """A fresh folder for one request's output files (Gradio serves files under the temp dir).

    Making one also removes this app's output folders older than ``keep_outputs_hours()`` (at most
    once a minute), so they do not pile up on a long-running server.
    """
    with _clean_lock:
        due = time.monotonic() - _last_clean[0] >= CLEAN_EVERY_SECONDS
        if due:
            _last_clean[0] = time.monotonic()
    if due:
        clean_request_dirs(keep_outputs_hours(), root)
    kind = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).strip("-") or "out"
    return Path(tempfile.mkdtemp(prefix=f"{OUTPUT_PREFIX}{kind}-", dir=root))


@contextmanager
def working_dir(prefix: str, root: Optional[Path] = None) -> Iterator[Path]:
    """:func:`request_dir` for a job that works in the folder for a long time (it may outlive the
    output lifetime): the sweep leaves it alone while the ``with`` block runs."""
    with folder_held(request_dir(prefix, root)) as folder:
        yield folder
