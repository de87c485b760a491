"""Pickers and helpers shared by the tabs."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import gradio as gr

from pipelines.devices import available_devices
from pipelines.types import PRECISIONS
from pipelines.whisper_models import CATALOGUE, LANGUAGES

AUTO_LANGUAGE = "auto"


def whisper_model_dropdown(default: str, allow_local: bool = True) -> gr.Dropdown:
    choices = [(m.label, m.id) for m in CATALOGUE]
    if default not in {m.id for m in CATALOGUE}:
        choices.insert(0, (default, default))
    info = ("A listed model, a Hugging Face id, or a local folder (HF, CTranslate2 or OpenVINO IR)." if allow_local
            else "A listed model or a Hugging Face id.")
    return gr.Dropdown(choices=choices, value=default, label="Whisper model", allow_custom_value=True, info=info)


def precision_radio() -> gr.Radio:
    return gr.Radio(choices=list(PRECISIONS), value="fp16", label="Precision")


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


def duration_text(seconds: float) -> str:
    """'3 hours', '90 minutes', '45 seconds': a limit or a length as people say it."""
    if seconds >= 2 * 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:.0f} hours"
    if seconds >= 120:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds:.0f} seconds"


def progress_fn(progress: gr.Progress) -> Callable[[float, str], None]:
    """Adapt a gr.Progress to the pipelines' (fraction, step) callback."""
    def report(fraction: float, message: str) -> None:
        progress(fraction, desc=message)
    return report


def request_dir(prefix: str) -> Path:
    """A fresh folder for one request's output files (Gradio serves files under the temp dir)."""
    return Path(tempfile.mkdtemp(prefix=f"voice-studio-{prefix}-"))
