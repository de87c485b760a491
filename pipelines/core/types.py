"""Small frozen values every domain shares: which model to run and how, and a model pinned to files."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Precision = Literal["fp16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp16", "int8")


def check_choice(value: Any, choices: tuple[str, ...], name: str, explained: str) -> str:
    """``value`` as one of ``choices`` (any case), or a ``ValueError`` naming the ``name`` and the
    choices, ``explained`` in brackets after them."""
    chosen = value.strip().lower() if isinstance(value, str) else value
    if chosen not in choices:
        raise ValueError(f"{name} {value!r} is not offered; choose one of {', '.join(choices)} ({explained}).")
    return chosen


def check_precision(precision: Any) -> str:
    """``precision`` as one of :data:`PRECISIONS` (any case), or a ``ValueError`` that says what to give."""
    return check_choice(precision, PRECISIONS, "Precision",
                        "fp16: the converted model as is; int8: quantized, smaller and faster on a CPU")


@dataclass(frozen=True)
class ModelChoice:
    """Which model to run and how: a model reference, a precision and an OpenVINO device."""

    model: str
    precision: str = "fp16"
    device: str = "CPU"


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference pinned to local files: ``path`` is a folder (a file for the pose network).

    ``source`` says where it came from ("bundled", "hub", "local", "local-hf", "local-ct2",
    "local-ir"); ``revision`` is a hub commit, a package version or ``local-<fingerprint>``.
    """

    reference: str
    path: Path
    source: str
    revision: str = ""
    precision: str = "fp16"
