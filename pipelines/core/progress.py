"""Progress: one callback type for every long piece of work, and one way to give a part of it its share.

Every step that may take long (download, conversion, quantizing, decoding windows, denoising steps)
reports ``progress(fraction, message)``, ``fraction`` from 0 to 1 of that step. A caller that runs
several steps gives each its share of its own bar with :func:`scaled`, so the bar only moves
forward. The UI adapts a ``gr.Progress`` to this type; nothing here knows about Gradio.
"""
from __future__ import annotations

from typing import Callable

ProgressFn = Callable[[float, str], None]


def no_progress(fraction: float, message: str) -> None:  # noqa: ARG001 - a ProgressFn that drops updates
    pass


def scaled(progress: ProgressFn, lo: float, hi: float, label: str = "") -> ProgressFn:
    """A callback for one part of a job: its 0..1 maps onto ``lo..hi`` of ``progress`` (clamped), and
    its messages get ``label: `` in front when a label is given."""
    def part(fraction: float, message: str) -> None:
        done = lo + (hi - lo) * max(0.0, min(1.0, float(fraction)))
        progress(done, f"{label}: {message}" if label else message)

    return part


def int8_first_use_note(what: str = "model", plural: bool = False) -> str:
    """The progress line shown before an INT8 model loads: its first use quantizes it, which takes long."""
    return f"load INT8 {what} (the first INT8 use quantizes {'them' if plural else 'it'}: this can take a few minutes)"
