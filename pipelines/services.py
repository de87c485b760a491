"""The composition root: settings -> the long-lived services one app process shares.

Built by app.py and handed to the UI. One models folder layout (:mod:`pipelines.core.layout`) and
one model pool (:mod:`pipelines.core.pool`) serve every domain: speech (Whisper), image (SD1.5 +
ControlNet) and pose. Building them loads nothing: every model is converted and compiled on first use.

With ``app.py --ray`` the same :class:`Services` is built once inside each Ray Serve replica (one pool
per replica), and the front end gets :class:`pipelines.serve.frontend.RayServices` instead: the same
attributes, whose services call the replicas (:mod:`pipelines.serve`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pipelines.core.layout import ModelsLayout
from pipelines.core.pool import ModelPool
from pipelines.core.security import check_model_reference
from pipelines.image import pose, service as image_service
from pipelines.image.convert import DEFAULT_CONTROLNET, DEFAULT_LCM_LORA, DEFAULT_POSE_MODEL, DEFAULT_SD_MODEL, DEFAULT_TAESD
from pipelines.image.pose import PoseService
from pipelines.image.service import ImageService
from pipelines.speech import service as speech_service
from pipelines.speech import live_stream
from pipelines.speech.catalogue import DEFAULT_MODEL, HUB_EXAMPLE
from pipelines.speech.live_stream import LiveService
from pipelines.speech.service import WhisperService
from pipelines.speech.store import WhisperModelStore

#: How many requests of each kind of work run at once (Gradio concurrency ids). Transcriptions and
#: image generation have separate ids, so a long generation never holds up a transcription. For
#: whisper and image these are the work slots (decoding, generating: pipelines/slots.py); batch is how
#: many batch subtitle jobs run at once (each runs its items through the whisper slots); live is how
#: many live caption streams run at once.
DEFAULT_CONCURRENCY: dict[str, int] = {"whisper": 2, "image": 1, "pose": 1, "network": 4, "batch": 1, "live": 4}
#: Requests of a kind that may get ready beside its busy work slots (download, convert or quantize a
#: model; fetch a video and extract its audio): Gradio admits this many more than there are slots, so
#: a model no one used yet does not hold up everyone whose model is ready.
PREPARING_ALONGSIDE: dict[str, int] = {"whisper": 2, "image": 1}
DEFAULT_QUEUE_SIZE = 64
#: Live caption decodes at once, over all streams (their own work slot: a stream's steps never wait for a
#: transcription slot, nor hold one up; measured in benchmarks/README.md, "Live captions").
LIVE_DECODE_SLOTS = 1
#: Models of each kind kept loaded at once (Whisper's is --max-loaded-models).
IMAGE_PIPELINES_LOADED = 1
POSE_MODELS_LOADED = 2
#: Items of a batch subtitle job worked on at once in one process (one downloads or extracts while
#: another transcribes); on Ray a batch is as wide as the Whisper replicas take.
EMBEDDED_BATCH_WIDTH = 2
SLOT_NAMES = {speech_service.KIND: "transcription", image_service.KIND: "image generation",
              live_stream.KIND: "live caption"}
#: The kinds of model users name (as ``Settings.check_model`` calls them) and a Hugging Face id of
#: each kind, which a refusal suggests instead of a local path.
MODEL_ID_EXAMPLES = {"Whisper model": HUB_EXAMPLE, "Stable Diffusion model": DEFAULT_SD_MODEL,
                     "ControlNet model": DEFAULT_CONTROLNET}


@dataclass
class Settings:
    models_dir: Path
    default_model: str = DEFAULT_MODEL
    default_device: str = "CPU"
    max_loaded_whisper: int = 3  # pipelines: a model used for subtitles (word timestamps) has a second one
    max_audio_seconds: float = 3 * 3600.0
    whisper_int8: Optional[str] = None  # how INT8 Whisper is made (catalogue.INT8_METHODS; None: env/default)
    sd_model: str = DEFAULT_SD_MODEL
    controlnet_model: str = DEFAULT_CONTROLNET
    pose_model: str = DEFAULT_POSE_MODEL
    lcm_lora: str = DEFAULT_LCM_LORA  # Fast mode's LoRA: a hub id or a local folder / .safetensors file
    taesd: str = DEFAULT_TAESD  # the tiny decoder of live previews and Fast mode: a hub id or a local folder
    fast_decoder: str = "taesd"  # Fast mode's final image: "taesd", or "vae" (the full VAE: slower)
    # Serving (see app.py and pipelines/security.py).
    shared: bool = False  # reachable by others: non-loopback host, share link or a Hugging Face Space
    allow_local_models: bool = True  # users may give local folders as model references
    queue_size: int = DEFAULT_QUEUE_SIZE  # requests waiting at most, over all kinds of work
    concurrency: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_CONCURRENCY))
    #: Extra OpenVINO properties for every compiled model (a Ray replica sets its thread count here).
    ov_config: dict = field(default_factory=dict)

    def queue_limit(self, kind: str) -> int:
        """Requests of ``kind`` Gradio lets in at once: its work slots, plus those that may get ready beside them."""
        return self.concurrency[kind] + PREPARING_ALONGSIDE.get(kind, 0)

    def check_model(self, reference: str, *trusted: str, kind: str = "model") -> str:
        """A user-given model reference, stripped; refused (ValueError) when this server does not take it.

        The configured models (``default_model``, ``sd_model``, ``controlnet_model`` and ``trusted``)
        always pass; local paths pass only when ``allow_local_models``. ``kind`` (a key of
        ``MODEL_ID_EXAMPLES``) decides the Hugging Face id the refusal suggests.
        """
        return check_model_reference(
            reference, allow_local=self.allow_local_models, kind=kind, example=MODEL_ID_EXAMPLES.get(kind),
            trusted=(self.default_model, self.sd_model, self.controlnet_model, *trusted))


@dataclass
class Services:
    settings: Settings
    layout: ModelsLayout = field(init=False)
    pool: ModelPool = field(init=False)
    whisper: WhisperService = field(init=False)
    live: LiveService = field(init=False)
    image: ImageService = field(init=False)
    pose: PoseService = field(init=False)

    def __post_init__(self) -> None:
        settings = self.settings
        self.layout = ModelsLayout.of(settings.models_dir)
        self.pool = ModelPool(
            limits={speech_service.KIND: settings.max_loaded_whisper, image_service.KIND: IMAGE_PIPELINES_LOADED,
                    pose.KIND: POSE_MODELS_LOADED},
            slots={speech_service.KIND: settings.concurrency["whisper"], image_service.KIND: settings.concurrency["image"],
                   live_stream.KIND: LIVE_DECODE_SLOTS}, slot_names=SLOT_NAMES)
        store = WhisperModelStore(self.layout, int8_method=settings.whisper_int8)
        ov_config = settings.ov_config
        self.whisper = WhisperService(store, pool=self.pool, ov_config=ov_config)
        # --concurrency live=N: live caption streams at once (browser and WebSocket)
        self.live = LiveService(self.whisper, max_streams=settings.concurrency.get("live", DEFAULT_CONCURRENCY["live"]),
                                max_seconds=settings.max_audio_seconds)
        self.image = ImageService(self.layout, sd_model=settings.sd_model, controlnet_model=settings.controlnet_model,
                                  device=settings.default_device, pool=self.pool, ov_config=ov_config,
                                  lcm_lora=settings.lcm_lora, taesd=settings.taesd, fast_decoder=settings.fast_decoder)
        self.pose = PoseService(self.layout, pose_model=settings.pose_model, device=settings.default_device,
                                pool=self.pool, ov_config=ov_config)

    @property
    def batch_width(self) -> int:
        """Items of a batch subtitle job worked on at once: one or two in one process."""
        return max(1, min(EMBEDDED_BATCH_WIDTH, self.settings.concurrency[speech_service.KIND]))

    def release_all(self) -> None:
        """Unload every model (they load again on next use)."""
        self.pool.release()
