"""The long-lived services one app process shares: built by app.py, handed to the UI."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .asr import WhisperService
from .model_store import WhisperModelStore
from .whisper_models import DEFAULT_MODEL


@dataclass
class Settings:
    models_dir: Path
    default_model: str = DEFAULT_MODEL
    default_device: str = "CPU"
    max_loaded_whisper: int = 2
    max_audio_seconds: float = 3 * 3600.0


@dataclass
class Services:
    settings: Settings
    whisper: WhisperService = field(init=False)

    def __post_init__(self) -> None:
        self.whisper = WhisperService(WhisperModelStore(self.settings.models_dir),
                                      max_loaded=self.settings.max_loaded_whisper)
