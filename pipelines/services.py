"""The long-lived services one app process shares: built by app.py, handed to the UI.

Building them loads nothing: every model is converted and compiled on first use.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .asr import WhisperService
from .image import ImageService
from .model_store import WhisperModelStore
from .pose import PoseService
from .sd_convert import DEFAULT_CONTROLNET, DEFAULT_POSE_MODEL, DEFAULT_SD_MODEL
from .security import check_model_reference
from .whisper_models import DEFAULT_MODEL

#: How many requests of each kind of work run at once (Gradio concurrency ids). Transcriptions and
#: image generation have separate ids, so a long generation never holds up a transcription. For
#: whisper and image these are the work slots (decoding, generating: pipelines/slots.py).
DEFAULT_CONCURRENCY: dict[str, int] = {"whisper": 2, "image": 1, "pose": 1, "network": 4}
#: Requests of a kind that may get ready beside its busy work slots (download, convert or quantize a
#: model; fetch a video and extract its audio): Gradio admits this many more than there are slots, so
#: a model no one used yet does not hold up everyone whose model is ready.
PREPARING_ALONGSIDE: dict[str, int] = {"whisper": 2, "image": 1}
DEFAULT_QUEUE_SIZE = 64


@dataclass
class Settings:
    models_dir: Path
    default_model: str = DEFAULT_MODEL
    default_device: str = "CPU"
    max_loaded_whisper: int = 3  # pipelines: a model used for subtitles (word timestamps) has a second one
    max_audio_seconds: float = 3 * 3600.0
    whisper_int8: Optional[str] = None  # how INT8 Whisper is made (model_store.INT8_METHODS; None: env/default)
    sd_model: str = DEFAULT_SD_MODEL
    controlnet_model: str = DEFAULT_CONTROLNET
    pose_model: str = DEFAULT_POSE_MODEL
    # Serving (see app.py and pipelines/security.py).
    shared: bool = False  # reachable by others: non-loopback host, share link or a Hugging Face Space
    allow_local_models: bool = True  # users may give local folders as model references
    queue_size: int = DEFAULT_QUEUE_SIZE  # requests waiting at most, over all kinds of work
    concurrency: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_CONCURRENCY))

    def queue_limit(self, kind: str) -> int:
        """Requests of ``kind`` Gradio lets in at once: its work slots, plus those that may get ready beside them."""
        return self.concurrency[kind] + PREPARING_ALONGSIDE.get(kind, 0)

    def check_model(self, reference: str, *trusted: str, kind: str = "model") -> str:
        """A user-given model reference, stripped; refused (ValueError) when this server does not take it.

        The configured models (``default_model``, ``sd_model``, ``controlnet_model`` and ``trusted``)
        always pass; local paths pass only when ``allow_local_models``.
        """
        return check_model_reference(
            reference, allow_local=self.allow_local_models, kind=kind,
            trusted=(self.default_model, self.sd_model, self.controlnet_model, *trusted))


@dataclass
class Services:
    settings: Settings
    whisper: WhisperService = field(init=False)
    image: ImageService = field(init=False)
    pose: PoseService = field(init=False)

    def __post_init__(self) -> None:
        root = Path(self.settings.models_dir)
        store = WhisperModelStore(root, int8_method=self.settings.whisper_int8)
        self.whisper = WhisperService(store, max_loaded=self.settings.max_loaded_whisper,
                                      workers=self.settings.concurrency["whisper"])
        self.image = ImageService(root, sd_model=self.settings.sd_model,
                                  controlnet_model=self.settings.controlnet_model,
                                  device=self.settings.default_device, workers=self.settings.concurrency["image"])
        self.pose = PoseService(root, pose_model=self.settings.pose_model, device=self.settings.default_device)

    def release_all(self) -> None:
        """Unload every model (they load again on next use)."""
        self.image.release()
        self.pose.release()
        self.whisper.release()
