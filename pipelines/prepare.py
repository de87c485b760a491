"""``python app.py --prepare [MODELS...]``: get models ready in the models folder, then exit.

A fresh models folder makes the first request wait for its model's conversion (about 35 s for the
bundled Whisper base, minutes for Stable Diffusion); a Docker image or a Space's persistent storage
can have that done once, ahead of time. Each name is
- a Whisper model: a listed id (``bundled/whisper-base``), a Hugging Face id or a local folder; it is
  converted to OpenVINO IR exactly as a first request would convert it. It is not compiled: that
  takes about 1 s at the first request (0.6 s from OpenVINO's compile cache, measured on the bundled
  base), while the cache would add 148 MB to a Docker image, for a CPU that may not be the one the
  image runs on;
- ``image``: the configured Stable Diffusion 1.5 and ControlNet OpenPose, converted;
- ``pose``: the OpenPose body network, converted.

No name means the default Whisper model. With ``int8`` each model is also quantized to INT8, as the
first INT8 request would (for the image models: calibrated by running them, minutes and GBs).
Progress goes to the terminal; a model that cannot be had is reported with its clear message and
the others are still prepared.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, TextIO

from pipelines.core.errors import DiskFull, ModelUnavailable
from pipelines.core.progress import ProgressFn

IMAGE = "image"
POSE = "pose"
#: Errors whose message is written for the user: reported as they are, the other models still prepared.
USER_ERRORS = (ModelUnavailable, DiskFull, ValueError)


@dataclass(frozen=True)
class Prepared:
    """What preparing one model gave: its folder, or the message saying why it could not be had."""

    name: str
    precision: str
    seconds: float
    path: Optional[Path] = None
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None


def terminal_progress(label: str, out: TextIO) -> ProgressFn:
    """A progress callback that prints a line (``[label]  40%  export to OpenVINO IR``) whenever the step changes."""
    last = [""]

    def report(fraction: float, message: str) -> None:
        if message != last[0]:
            last[0] = message
            print(f"[{label}] {max(0.0, min(1.0, fraction)):4.0%}  {message}", file=out, flush=True)

    return report


def prepare_one(services, name: str, precision: str, progress: ProgressFn) -> Path:
    """Get one model ready (``name``: a Whisper reference, ``image`` or ``pose``); its folder."""
    if name == IMAGE:
        folders = services.image.model_folders(precision=precision, progress=progress)
        return folders.get("int8", folders["sd"])
    if name == POSE:
        if precision != "fp16":
            raise ValueError("The OpenPose body network has no INT8 form; prepare it without int8.")
        return services.pose.model_folder(progress)
    return services.whisper.store.resolve(name, precision, progress).path  # converted (and quantized) once


def prepare_models(services, names: Iterable[str] = (), int8: bool = False, out: Optional[TextIO] = None,
                   err: Optional[TextIO] = None) -> list[Prepared]:
    """Prepare every named model (none: the default Whisper model) in FP16, and with ``int8`` in INT8 too;
    progress to ``out``, failures to ``err`` (default: the terminal's stdout and stderr)."""
    out, err = out or sys.stdout, err or sys.stderr
    names = [n.strip() for n in names if n.strip()] or [services.settings.default_model]
    precisions = ("fp16", "int8") if int8 else ("fp16",)
    print(f"preparing {', '.join(names)} ({' and '.join(p.upper() for p in precisions)}) in "
          f"{services.settings.models_dir}", file=out, flush=True)
    results = []
    for name in names:
        for precision in precisions:
            if name == POSE and precision != "fp16":
                continue  # nothing to quantize
            label = f"{name} {precision.upper()}"
            start = time.perf_counter()
            try:
                path = prepare_one(services, name, precision, terminal_progress(label, out))
            except USER_ERRORS as exc:
                results.append(Prepared(name, precision, time.perf_counter() - start, error=str(exc)))
                print(f"[{label}] failed: {exc}", file=err, flush=True)
                continue
            results.append(Prepared(name, precision, time.perf_counter() - start, path=path))
            print(f"[{label}] ready in {results[-1].seconds:.1f} s: {path}", file=out, flush=True)
    return results
