"""Pose-guided image generation: Stable Diffusion 1.5 + ControlNet OpenPose on OpenVINO.

Public API (the Gradio tab calls these; nothing here imports gradio):

* :class:`ImageOptions` - what to generate (frozen).
* :func:`check_inputs` - validates options and the pose image before any heavy work; raises
  ``ValueError`` with a message meant for the user. Cheap: imports only Pillow/numpy.
* :class:`OVControlNetPipeline` - the denoising pipeline over converted IR; ``__call__`` returns a
  :class:`GenerationResult`.
* :class:`ImageService` - converts (once, cached) and loads (once, lazily) a pipeline per
  model pair, device and precision (``"fp16"``, or ``"int8"``: the UNet and ControlNet
  quantized by NNCF, see :mod:`pipelines.quantize`); ``generate``, ``release``.
* :func:`check_precision`.
* :func:`save_png` / :func:`read_png_metadata` - PNG files carrying their settings (an A1111-style
  ``parameters`` text chunk plus a JSON ``voice_studio`` chunk).
* :class:`GenerationCancelled`.

Determinism: image ``i`` of a request uses its own ``torch.Generator().manual_seed(seed + i)``
(never the global RNG) for its initial noise and for ancestral samplers' noise, so a given
seed and settings always give the same picture, whatever else runs, and image ``i`` of a batch is
the picture a single-image request with seed ``seed + i`` makes.
"""
from __future__ import annotations

import inspect
import json
import random
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Union

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from . import cpu_int8
from .cache import AtomicFolderCache, ProgressFn, no_progress
from .sd_convert import (
    CONTROLNET_IR,
    DEFAULT_CONTROLNET,
    DEFAULT_SD_MODEL,
    PIPELINE_JSON,
    TEXT_ENCODER_IR,
    UNET_IR,
    VAE_DECODER_IR,
    ensure_controlnet,
    ensure_sd15,
    ensure_sd_int8,
)
from .pose import uint8_pixels
from .slots import WorkSlots
from .types import PRECISIONS

if TYPE_CHECKING:  # pragma: no cover
    import openvino as ov

# Scheduler names offered to users -> diffusers class (+ settings), built ``from_config``.
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "UniPC": ("UniPCMultistepScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DDIM": ("DDIMScheduler", {}),
    "PNDM": ("PNDMScheduler", {"skip_prk_steps": True}),
    "LMS": ("LMSDiscreteScheduler", {}),
}
SCHEDULER_NAMES: tuple[str, ...] = tuple(SCHEDULERS)

MIN_SIZE, MAX_SIZE, SIZE_MULTIPLE = 256, 1024, 8
MIN_STEPS, MAX_STEPS = 1, 100
MIN_IMAGES, MAX_IMAGES = 1, 4
MIN_GUIDANCE, MAX_GUIDANCE = 1.0, 20.0
MIN_CONTROLNET_SCALE, MAX_CONTROLNET_SCALE = 0.0, 2.0
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 2000
PNG_JSON_KEY = "voice_studio"

PoseImageInput = Union[Image.Image, np.ndarray, str, Path, None]
InputObserver = Callable[[str, dict], Any]  # observer(component, inputs) before each ControlNet/UNet infer
StepProgress = Callable[[int, int], Any]  # progress(done_steps, total_steps)
CancelCheck = Union[Callable[[], bool], threading.Event, None]


class GenerationCancelled(Exception):
    """The caller's cancel check fired; no images were produced."""


@dataclass(frozen=True)
class ImageOptions:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    guidance_scale: float = 7.5
    seed: int = 0  # -1 = pick a random seed (reported in the result)
    controlnet_scale: float = 1.0
    num_images: int = 1
    width: int = 512
    height: int = 512
    scheduler: str = "UniPC"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ImageOptions":
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class GenerationResult:
    """Images of one request, each with the seed that made it (``seeds[i]`` for ``images[i]``)."""

    images: tuple  # tuple[PIL.Image.Image, ...]
    seeds: tuple[int, ...]
    options: ImageOptions
    elapsed: float = 0.0
    extra: dict = field(default_factory=dict)  # model references, device, timings
    warnings: tuple[str, ...] = ()

    def parameters(self, index: int = 0) -> str:
        return parameters_text(self.options, self.seeds[index], self.extra)

    def save(self, folder: Path, prefix: str = "image") -> list[Path]:
        """Write every image as PNG with its settings; returns the paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return [
            save_png(image, folder / f"{prefix}-{stamp}-{seed}-{i}.png", self.options, self.extra, seed=seed)
            for i, (image, seed) in enumerate(zip(self.images, self.seeds))
        ]


# --------------------------------------------------------------------------------------------
# Input checking (cheap: no torch/openvino)
# --------------------------------------------------------------------------------------------


def load_pose_image(pose_image: PoseImageInput) -> Image.Image:
    """Return ``pose_image`` as an RGB PIL image, or raise ``ValueError`` saying what is wrong."""
    if pose_image is None:
        raise ValueError(
            "No pose image was given. Upload an OpenPose skeleton image, or a photo of a person and "
            "extract the pose from it first."
        )
    if isinstance(pose_image, (str, Path)):
        path = Path(pose_image)
        if not path.is_file():
            raise ValueError(f"The pose image file '{path}' does not exist. Upload the image again.")
        try:
            with Image.open(path) as opened:
                opened.load()
                image = opened.copy()
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise ValueError(
                f"The pose image '{path.name}' could not be read as an image ({error}). "
                "Upload a PNG, JPEG or WebP picture."
            ) from None
    elif isinstance(pose_image, np.ndarray):
        array = pose_image
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)) or array.size == 0:
            raise ValueError(
                f"The pose image array has shape {array.shape}; expected height x width (x 1, 3 or 4 channels). "
                "Pass a normal picture."
            )
        array = uint8_pixels(array)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        image = Image.fromarray(array)
    elif isinstance(pose_image, Image.Image):
        image = pose_image
    else:
        raise ValueError(
            f"The pose image must be a picture (PIL image, numpy array or image file path), not "
            f"{type(pose_image).__name__}. Upload a PNG or JPEG picture."
        )
    if image.width < 8 or image.height < 8:
        raise ValueError(f"The pose image is only {image.width}x{image.height} pixels. Use a picture of at least 64x64.")
    return image.convert("RGB") if image.mode != "RGB" else image


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_options(options: ImageOptions) -> None:
    """Validate ``options``; raise one ``ValueError`` listing every problem and how to fix it."""
    if not isinstance(options, ImageOptions):
        raise ValueError(f"Expected ImageOptions, got {type(options).__name__}.")
    problems: list[str] = []
    if not isinstance(options.prompt, str) or not options.prompt.strip():
        problems.append("The prompt is empty: describe the picture you want, e.g. 'a dancer on a beach, sunset'.")
    elif len(options.prompt) > MAX_PROMPT_CHARS:
        problems.append(f"The prompt has {len(options.prompt)} characters; keep it under {MAX_PROMPT_CHARS}.")
    if not isinstance(options.negative_prompt, str):
        problems.append("The negative prompt must be text (it may be empty).")
    elif len(options.negative_prompt) > MAX_PROMPT_CHARS:
        problems.append(f"The negative prompt is longer than {MAX_PROMPT_CHARS} characters; shorten it.")
    for name, value in (("Width", options.width), ("Height", options.height)):
        if not _is_int(value) or not MIN_SIZE <= value <= MAX_SIZE or value % SIZE_MULTIPLE:
            problems.append(
                f"{name} is {value!r}; it must be a whole number of pixels from {MIN_SIZE} to {MAX_SIZE} "
                f"and a multiple of {SIZE_MULTIPLE} (e.g. 512)."
            )
    if not _is_int(options.steps) or not MIN_STEPS <= options.steps <= MAX_STEPS:
        problems.append(f"Steps is {options.steps!r}; choose a whole number from {MIN_STEPS} to {MAX_STEPS} (20 is typical).")
    if not _is_int(options.num_images) or not MIN_IMAGES <= options.num_images <= MAX_IMAGES:
        problems.append(f"Number of images is {options.num_images!r}; choose from {MIN_IMAGES} to {MAX_IMAGES}.")
    if not _is_number(options.guidance_scale) or not MIN_GUIDANCE <= options.guidance_scale <= MAX_GUIDANCE:
        problems.append(
            f"Guidance scale is {options.guidance_scale!r}; choose from {MIN_GUIDANCE:g} to {MAX_GUIDANCE:g} (7.5 is typical)."
        )
    if not _is_number(options.controlnet_scale) or not MIN_CONTROLNET_SCALE <= options.controlnet_scale <= MAX_CONTROLNET_SCALE:
        problems.append(
            f"ControlNet strength is {options.controlnet_scale!r}; choose from {MIN_CONTROLNET_SCALE:g} "
            f"to {MAX_CONTROLNET_SCALE:g} (1.0 follows the pose closely, 0 ignores it)."
        )
    if not _is_int(options.seed) or not -1 <= options.seed <= MAX_SEED:
        problems.append(f"Seed is {options.seed!r}; use a whole number from 0 to {MAX_SEED}, or -1 for a random seed.")
    if options.scheduler not in SCHEDULERS:
        problems.append(f"Unknown sampler {options.scheduler!r}; choose one of: {', '.join(SCHEDULER_NAMES)}.")
    if any(isinstance(v, float) and not np.isfinite(v) for v in (options.guidance_scale, options.controlnet_scale)):
        problems.append("Guidance and ControlNet strength must be finite numbers.")
    if problems:
        raise ValueError(" ".join(dict.fromkeys(problems)))


def check_inputs(options: ImageOptions, pose_image: PoseImageInput) -> Image.Image:
    """Validate everything before heavy work (diffusers-style); return the pose image as RGB PIL.

    Raises ``ValueError`` with a message for the user: what is wrong and what to do.
    """
    check_options(options)
    return load_pose_image(pose_image)


def check_precision(precision: Any) -> str:
    """``precision`` as one of :data:`pipelines.types.PRECISIONS` (``"fp16"``, ``"int8"``), or ``ValueError``."""
    value = precision.strip().lower() if isinstance(precision, str) else precision
    if value not in PRECISIONS:
        raise ValueError(
            f"Unknown precision {precision!r} for image generation; choose one of: {', '.join(PRECISIONS)} "
            "(fp16 = the converted model as is, int8 = UNet and ControlNet quantized to INT8: faster on CPU)."
        )
    return value


def resolve_seeds(options: ImageOptions) -> tuple[int, ...]:
    """One seed per image: ``seed + i`` (wrapping at 2**32); seed -1 picks a random base seed."""
    base = options.seed
    if base == -1:
        base = random.SystemRandom().randrange(0, MAX_SEED + 1)
    return tuple((int(base) + i) % (MAX_SEED + 1) for i in range(options.num_images))


# --------------------------------------------------------------------------------------------
# PNG metadata
# --------------------------------------------------------------------------------------------


def parameters_text(options: ImageOptions, seed: Optional[int] = None, extra: Optional[dict] = None) -> str:
    """An AUTOMATIC1111-style ``parameters`` text for one image."""
    extra = extra or {}
    seed = options.seed if seed is None else seed
    lines = [options.prompt]
    if options.negative_prompt:
        lines.append(f"Negative prompt: {options.negative_prompt}")
    fields = [
        f"Steps: {options.steps}",
        f"Sampler: {options.scheduler}",
        f"CFG scale: {options.guidance_scale:g}",
        f"Seed: {seed}",
        f"Size: {options.width}x{options.height}",
    ]
    if extra.get("sd_model"):
        fields.append(f"Model: {extra['sd_model']}")
    if extra.get("controlnet_model"):
        fields.append(f"ControlNet: {extra['controlnet_model']}")
    fields.append(f"ControlNet weight: {options.controlnet_scale:g}")
    if extra.get("precision"):
        fields.append(f"Precision: {str(extra['precision']).upper()}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def png_info(options: ImageOptions, seed: Optional[int] = None, extra: Optional[dict] = None) -> PngImagePlugin.PngInfo:
    seed = options.seed if seed is None else seed
    info = PngImagePlugin.PngInfo()
    info.add_itxt("parameters", parameters_text(options, seed, extra))
    settings = {"options": replace(options, seed=seed).to_dict(), "seed": seed, **(extra or {})}
    info.add_itxt(PNG_JSON_KEY, json.dumps(settings, default=str))
    return info


def save_png(
    image: Image.Image,
    path: Path,
    options: ImageOptions,
    extra: Optional[dict] = None,
    seed: Optional[int] = None,
) -> Path:
    """Save ``image`` as PNG carrying its settings (``parameters`` text + ``voice_studio`` JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=png_info(options, seed, extra))
    return path


def read_png_metadata(path: Path) -> dict:
    """``{"parameters": str | None, "settings": dict | None}`` from a PNG written by :func:`save_png`."""
    with Image.open(path) as image:
        image.load()
        text = dict(getattr(image, "text", {}) or {})
    raw = text.get(PNG_JSON_KEY)
    return {"parameters": text.get("parameters"), "settings": json.loads(raw) if raw else None}


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


def make_scheduler(name: str, config: dict):
    """A fresh diffusers scheduler ``name`` (one of :data:`SCHEDULER_NAMES`) from a scheduler config."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"Unknown sampler {name!r}; choose one of: {', '.join(SCHEDULER_NAMES)}.")
    class_name, kwargs = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(config, **kwargs)


def _cancelled(cancel: CancelCheck) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event) or hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


ModelSource = Union["ov.Model", str, Path]


class OVControlNetPipeline:
    """SD1.5 + ControlNet denoising over OpenVINO models, compiled lazily per device.

    Components are passed in as ``ov.Model`` objects or IR paths and compiled on first use (as
    optimum-intel does); :meth:`to` switches device and drops compiled models, :meth:`release`
    drops them to free memory (they are compiled again on the next call). One lock guards each
    pipeline, so concurrent requests run one after another and never share scheduler, generator
    or infer-request state.

    With ``static_shapes`` (default) the ControlNet, UNet and VAE decoder are reshaped to the
    request's batch/height/width before compiling: on CPU that runs a 512x512 step about 1.8x faster
    than the dynamic-shape IR. A request of another size recompiles them (seconds) and drops the
    previous ones. ``static_shapes=False`` compiles the dynamic IR once for all sizes.
    """

    COMPONENTS = ("text_encoder", "controlnet", "unet", "vae_decoder")

    def __init__(
        self,
        *,
        text_encoder: ModelSource,
        unet: ModelSource,
        controlnet: ModelSource,
        vae_decoder: ModelSource,
        tokenizer: Any,
        scheduler_config: dict,
        vae_scale_factor: int = 8,
        vae_scaling_factor: float = 0.18215,
        unet_in_channels: int = 4,
        device: str = "CPU",
        ov_config: Optional[dict] = None,
        core: Optional["ov.Core"] = None,
        info: Optional[dict] = None,
        static_shapes: bool = True,
    ):
        self._sources: dict[str, ModelSource] = {
            "text_encoder": text_encoder,
            "controlnet": controlnet,
            "unet": unet,
            "vae_decoder": vae_decoder,
        }
        self._tokenizer = tokenizer  # a CLIPTokenizer or the folder to load it from
        self.scheduler_config = dict(scheduler_config)
        self.vae_scale_factor = int(vae_scale_factor)
        self.vae_scaling_factor = float(vae_scaling_factor)
        self.unet_in_channels = int(unet_in_channels)
        self.device = device
        self.ov_config = dict(ov_config or {})
        self._core = core
        self.info = dict(info or {})
        self.static_shapes = bool(static_shapes)
        self._compiled: dict[str, tuple[Any, Any]] = {}  # name -> (static shape key or None, compiled)
        self._lock = threading.RLock()
        self._processors = None
        self._residual_names: Optional[list[str]] = None
        self._observer: Optional[InputObserver] = None

    @classmethod
    def from_folders(
        cls,
        sd_folder: Path,
        controlnet_folder: Path,
        *,
        device: str = "CPU",
        ov_config: Optional[dict] = None,
        core: Optional["ov.Core"] = None,
        info: Optional[dict] = None,
        static_shapes: bool = True,
        int8_folder: Optional[Path] = None,
    ) -> "OVControlNetPipeline":
        """Build from IR folders made by :func:`pipelines.sd_convert.ensure_sd15` / ``ensure_controlnet``.

        With ``int8_folder`` (made by :func:`pipelines.sd_convert.ensure_sd_int8` from these two
        folders) the UNet and ControlNet are its INT8 models; the text encoder and VAE stay FP16.
        """
        sd_folder, controlnet_folder = Path(sd_folder), Path(controlnet_folder)
        summary = json.loads((sd_folder / PIPELINE_JSON).read_text())
        cn_summary = json.loads((controlnet_folder / PIPELINE_JSON).read_text())
        if cn_summary.get("num_down_residuals") != summary.get("num_down_residuals"):
            raise ValueError(
                f"The ControlNet ({cn_summary.get('model')}) does not fit the Stable Diffusion model "
                f"({summary.get('model')}): {cn_summary.get('num_down_residuals')} vs "
                f"{summary.get('num_down_residuals')} residuals. Use an SD1.5 ControlNet with an SD1.5 model."
            )
        scheduler_config = json.loads((sd_folder / "scheduler" / "scheduler_config.json").read_text())
        denoisers = Path(int8_folder) if int8_folder is not None else None
        return cls(
            text_encoder=sd_folder / TEXT_ENCODER_IR,
            unet=(denoisers or sd_folder) / UNET_IR,
            controlnet=(denoisers or controlnet_folder) / CONTROLNET_IR,
            vae_decoder=sd_folder / VAE_DECODER_IR,
            tokenizer=sd_folder / "tokenizer",
            scheduler_config=scheduler_config,
            vae_scale_factor=summary["vae_scale_factor"],
            vae_scaling_factor=summary["vae_scaling_factor"],
            unet_in_channels=summary["unet_in_channels"],
            device=device,
            ov_config=ov_config,
            core=core,
            info={"sd_model": summary.get("model"), "controlnet_model": cn_summary.get("model"),
                  "precision": "int8" if denoisers else "fp16", **(info or {})},
            static_shapes=static_shapes,
        )

    # ---- lazy loading -------------------------------------------------------------------

    @property
    def tokenizer(self):
        with self._lock:
            if isinstance(self._tokenizer, (str, Path)):
                from transformers import CLIPTokenizer

                self._tokenizer = CLIPTokenizer.from_pretrained(str(self._tokenizer))
            return self._tokenizer

    def _get_core(self):
        if self._core is None:
            import openvino as ov

            self._core = ov.Core()
        return self._core

    def compiled(self, name: str, shapes: Optional[dict] = None):
        """The compiled model ``name`` on the current device, compiling it on first use.

        ``shapes`` (input name -> static shape) applies when ``static_shapes`` is on: the model is
        reshaped to them and recompiled whenever they change.
        """
        with self._lock:
            key = None
            if shapes and self.static_shapes:
                key = tuple(sorted((k, tuple(int(d) for d in v)) for k, v in shapes.items()))
            entry = self._compiled.get(name)
            if entry is not None and entry[0] == key:
                return entry[1]
            self._compiled.pop(name, None)  # free the old one before compiling its replacement
            core = self._get_core()
            source = self._sources[name]
            # INT8 matmuls run as 1x1 convolutions on CPUs where that is faster (see cpu_int8)
            as_convolutions = (self.info.get("precision") == "int8" and name in ("controlnet", "unet")
                               and cpu_int8.matmuls_as_convolutions(self.device))
            if key is not None or as_convolutions:
                model = source.clone() if hasattr(source, "clone") else core.read_model(str(source))
                if key is not None:
                    model.reshape({k: list(v) for k, v in key})
                if as_convolutions:
                    cpu_int8.int8_matmuls_as_convolutions(model)
            else:
                model = str(source) if isinstance(source, Path) else source
            try:
                compiled = core.compile_model(model, self.device, self.ov_config)
            except RuntimeError as error:
                if self.device.split(":")[0].split(".")[0] not in (*core.available_devices, "AUTO", "HETERO", "MULTI"):
                    raise ValueError(
                        f"OpenVINO device {self.device!r} is not available here; choose one of: "
                        f"{', '.join(core.available_devices)}."
                    ) from error
                raise
            self._compiled[name] = (key, compiled)
            return compiled

    def _shapes(self, width: int, height: int, do_cfg: bool, text_shape: tuple[int, int]) -> dict[str, dict]:
        batch = 2 if do_cfg else 1
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        length, hidden = text_shape
        latent = [batch, self.unet_in_channels, h, w]
        return {
            "controlnet": {
                "sample": latent,
                "timestep": [],
                "encoder_hidden_states": [batch, length, hidden],
                "controlnet_cond": [batch, 3, height, width],
                "conditioning_scale": [],
            },
            "unet": {"sample": latent, "timestep": [], "encoder_hidden_states": [batch, length, hidden]},
            "vae_decoder": {"latent_sample": [1, self.unet_in_channels, h, w]},
        }

    def _denoisers(self, shapes: dict[str, dict]):
        """Compiled ControlNet and UNet for these shapes (UNet residual shapes = ControlNet outputs)."""
        controlnet = self.compiled("controlnet", shapes["controlnet"])
        unet_shapes = dict(shapes["unet"])
        for port in controlnet.outputs:
            if port.get_partial_shape().is_dynamic:
                unet_shapes = {}
                break
        if unet_shapes:
            unet_inputs = self._unet_residual_names()
            for name, port in zip(unet_inputs, controlnet.outputs):
                unet_shapes[name] = list(port.get_partial_shape().to_shape())
        return controlnet, self.compiled("unet", unet_shapes or None)

    def _unet_residual_names(self) -> list[str]:
        if self._residual_names is None:
            source = self._sources["unet"]
            model = source if hasattr(source, "inputs") else self._get_core().read_model(str(source))
            self._residual_names = [port.get_any_name() for port in model.inputs[3:]]
        return self._residual_names

    def compile(self, width: int = 512, height: int = 512, guidance: bool = True) -> "OVControlNetPipeline":
        """Load the tokenizer and compile every component now (otherwise the first request does).

        With static shapes the models are compiled for ``width`` x ``height`` (and a CFG batch of 2
        when ``guidance``), so a first request of that size starts denoising at once.
        """
        with self._lock:
            self.tokenizer  # noqa: B018 - loads it (and imports transformers) now, not on the first request
            self._image_processors()
            text_encoder = self.compiled("text_encoder")
            if self.static_shapes:
                hidden = int(text_encoder.outputs[0].get_partial_shape()[2].get_length())
                shapes = self._shapes(width, height, guidance, (self.tokenizer.model_max_length, hidden))
                self._denoisers(shapes)
                self.compiled("vae_decoder", shapes["vae_decoder"])
            else:
                for name in self.COMPONENTS:
                    self.compiled(name)
        return self

    @contextmanager
    def observe_inputs(self, observer: InputObserver) -> Iterator["OVControlNetPipeline"]:
        """Call ``observer(component, inputs)`` before every ControlNet and UNet inference while inside.

        ``component`` is ``"controlnet"`` or ``"unet"``, ``inputs`` the dict of named arrays passed to
        the infer request. They are shared with the request and reused at the next step, so an
        observer that keeps them must copy. This is how INT8 calibration collects the models' real
        inputs while the FP16 pipeline denoises (as the OpenVINO ControlNet/SD notebooks wrap the
        compiled models). The pipeline's lock is held throughout: other calls wait.
        """
        with self._lock:
            self._observer = observer
            try:
                yield self
            finally:
                self._observer = None

    @property
    def is_compiled(self) -> bool:
        return bool(self._compiled)

    def to(self, device: str) -> "OVControlNetPipeline":
        """Run on ``device`` from now on (compiled models are dropped and rebuilt lazily)."""
        with self._lock:
            if device != self.device:
                self._compiled.clear()
                self.device = device
        return self

    def release(self) -> None:
        """Drop the compiled models (frees their memory); the next call compiles again."""
        with self._lock:
            self._compiled.clear()
        import gc

        gc.collect()

    def _image_processors(self):
        if self._processors is None:
            from diffusers.image_processor import VaeImageProcessor

            self._processors = (
                VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True, do_normalize=False),
                VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True),
            )
        return self._processors

    # ---- steps ---------------------------------------------------------------------------

    def encode_prompt(self, prompt: str, negative_prompt: str, do_cfg: bool) -> tuple[np.ndarray, list[str]]:
        """Text embeddings, ``[negative; positive]`` when ``do_cfg`` (as diffusers concatenates them)."""
        tokenizer = self.tokenizer
        texts = [negative_prompt, prompt] if do_cfg else [prompt]
        tokens = tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="np"
        )
        warnings = []
        for label, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
            if text and len(tokenizer(text).input_ids) > tokenizer.model_max_length:
                warnings.append(
                    f"The {label} is longer than CLIP's {tokenizer.model_max_length} tokens; its end was ignored."
                )
        request = self.compiled("text_encoder").create_infer_request()
        output = request.infer({"input_ids": np.ascontiguousarray(tokens.input_ids, dtype=np.int64)})
        return np.array(output[0], dtype=np.float32, copy=True), warnings

    def prepare_control_image(self, pose: Image.Image, width: int, height: int, do_cfg: bool) -> np.ndarray:
        """The pose image resized to width x height, RGB, 0..1, NCHW (doubled for CFG)."""
        control_processor, _ = self._image_processors()
        control = control_processor.preprocess(pose, height=height, width=width).float().numpy()
        if do_cfg:
            control = np.concatenate([control, control])
        return np.ascontiguousarray(control, dtype=np.float32)

    def prepare_latents(self, seed: int, width: int, height: int, scheduler):
        """Initial noise from a per-image ``torch.Generator`` (diffusers' ``randn_tensor``)."""
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        shape = (1, self.unet_in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        latents = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=torch.float32)
        return latents * scheduler.init_noise_sigma, generator

    def decode(self, latents, shapes: Optional[dict] = None) -> Image.Image:
        import torch

        _, image_processor = self._image_processors()
        request = self.compiled("vae_decoder", shapes).create_infer_request()
        scaled = np.ascontiguousarray((latents / self.vae_scaling_factor).numpy(), dtype=np.float32)
        image = torch.from_numpy(np.array(request.infer({"latent_sample": scaled})[0], copy=True))
        return image_processor.postprocess(image, output_type="pil")[0]

    def __call__(
        self,
        options: ImageOptions,
        pose_image: PoseImageInput,
        progress: Optional[StepProgress] = None,
        cancel: CancelCheck = None,
    ) -> GenerationResult:
        import torch

        started = time.perf_counter()
        # 0. Validate everything before heavy work.
        pose = check_inputs(options, pose_image)
        seeds = resolve_seeds(options)
        width, height = options.width, options.height
        do_cfg = options.guidance_scale > 1.0
        with self._lock, torch.inference_mode():
            # 1. Encode the prompt (+ negative prompt; CFG batch of 2 when guidance > 1).
            prompt_embeds, warnings = self.encode_prompt(options.prompt, options.negative_prompt, do_cfg)
            # 2. Prepare the control image.
            control = self.prepare_control_image(pose, width, height, do_cfg)
            shapes = self._shapes(width, height, do_cfg, prompt_embeds.shape[1:])
            controlnet, unet = self._denoisers(shapes)
            controlnet_request = controlnet.create_infer_request()
            unet_request = unet.create_infer_request()
            if self._observer is not None:
                controlnet_request = _ObservedRequest(controlnet_request, "controlnet", self._observer)
                unet_request = _ObservedRequest(unet_request, "unet", self._observer)
            controlnet_outputs = [port.get_any_name() for port in controlnet.outputs]
            unet_residual_names = self._unet_residual_names()
            scale = np.array(options.controlnet_scale, dtype=np.float32)
            images = []
            done, total = 0, None
            timings = {"prepare": time.perf_counter() - started, "denoise": 0.0, "decode": 0.0}
            for seed in seeds:
                # 3. Prepare timesteps and the initial latents (per-image generator).
                scheduler = make_scheduler(options.scheduler, self.scheduler_config)
                scheduler.set_timesteps(options.steps, device="cpu")
                timesteps = scheduler.timesteps
                total = total or len(timesteps) * len(seeds)
                latents, generator = self.prepare_latents(seed, width, height, scheduler)
                step_kwargs = _step_kwargs(scheduler, generator)
                denoise_started = time.perf_counter()
                # 4. Denoise: ControlNet residuals feed the UNet at every step.
                for t in timesteps:
                    if _cancelled(cancel):
                        raise GenerationCancelled(f"Image generation was cancelled after {done} of {total} steps.")
                    latent_input = torch.cat([latents] * 2) if do_cfg else latents
                    latent_input = scheduler.scale_model_input(latent_input, t)
                    sample = np.ascontiguousarray(latent_input.numpy(), dtype=np.float32)
                    timestep = np.array(float(t), dtype=np.float32)
                    residuals = controlnet_request.infer(
                        {
                            "sample": sample,
                            "timestep": timestep,
                            "encoder_hidden_states": prompt_embeds,
                            "controlnet_cond": control,
                            "conditioning_scale": scale,
                        },
                        share_inputs=True,
                    )
                    unet_inputs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": prompt_embeds}
                    for name, output_name in zip(unet_residual_names, controlnet_outputs):
                        unet_inputs[name] = residuals[output_name]
                    noise = unet_request.infer(unet_inputs, share_inputs=True)[0]
                    noise_pred = torch.from_numpy(np.array(noise, dtype=np.float32, copy=True))
                    if do_cfg:
                        uncond, text = noise_pred.chunk(2)
                        noise_pred = uncond + options.guidance_scale * (text - uncond)
                    latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
                    done += 1
                    if progress is not None:
                        progress(done, total)
                if _cancelled(cancel):
                    raise GenerationCancelled(f"Image generation was cancelled after {done} of {total} steps.")
                # 5. Decode the latents with the VAE into a PIL image.
                decode_started = time.perf_counter()
                timings["denoise"] += decode_started - denoise_started
                images.append(self.decode(latents, shapes["vae_decoder"]))
                timings["decode"] += time.perf_counter() - decode_started
        timings["seconds_per_step"] = timings["denoise"] / max(done, 1)
        extra = {**self.info, "device": self.device, "timings": {k: round(v, 3) for k, v in timings.items()}}
        for image, seed in zip(images, seeds):
            image.info["parameters"] = parameters_text(options, seed, extra)
        return GenerationResult(
            images=tuple(images),
            seeds=seeds,
            options=options,
            elapsed=time.perf_counter() - started,
            extra=extra,
            warnings=tuple(warnings),
        )


class _ObservedRequest:
    """An infer request that shows its inputs to an observer first (see ``observe_inputs``)."""

    def __init__(self, request, name: str, observer: InputObserver):
        self._request, self._name, self._observer = request, name, observer

    def infer(self, inputs: dict, share_inputs: bool = False):
        self._observer(self._name, inputs)
        return self._request.infer(inputs, share_inputs=share_inputs)


def _step_kwargs(scheduler, generator) -> dict:
    """eta (DDIM) and generator (ancestral samplers) when the scheduler's ``step`` takes them."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs


# --------------------------------------------------------------------------------------------
# The service
# --------------------------------------------------------------------------------------------


class ImageService:
    """Converts (once, cached on disk) and loads (once, lazily) pose-guided SD pipelines.

    ``get_pipeline`` is lock-guarded per (SD model, ControlNet, device, precision): concurrent first
    requests convert, quantize and load once, and the conversion or quantization of one pair never
    holds a lock that users of other models wait for (the service-wide lock guards only the
    table of loaded pipelines). At most ``max_loaded`` pipelines stay loaded; loading another
    releases the least recently used one.

    ``generate`` converts (and quantizes) outside the work slots (``workers``: generations at once)
    and takes a slot only to load and run, so one visitor's new model does not hold up images from
    ready ones. Quantizing takes a slot too: its FP16 pipeline and NNCF need the memory a running
    generation would hold.

    ``precision="int8"`` runs the UNet and ControlNet quantized by NNCF post-training quantization,
    made once per FP16 pair from calibration data gathered by running the FP16 pipeline
    (``calibration``: a :class:`pipelines.quantize.SDCalibration`, default from the
    ``VOICE_STUDIO_SD_CALIBRATION_*`` environment variables).
    """

    def __init__(
        self,
        cache_root: Path,
        *,
        sd_model: str = DEFAULT_SD_MODEL,
        controlnet_model: str = DEFAULT_CONTROLNET,
        device: str = "CPU",
        ov_config: Optional[dict] = None,
        local_files_only: bool = False,
        max_loaded: int = 1,
        calibration=None,
        workers: int = 1,
    ):
        from .quantize import SDCalibration

        self.cache_root = Path(cache_root)
        self.sd_model = sd_model
        self.controlnet_model = controlnet_model
        self.device = device
        self.ov_config = dict(ov_config or {})
        self.local_files_only = local_files_only
        self.max_loaded = max(1, int(max_loaded))
        self.slots = WorkSlots(workers, "image generation")
        self.calibration = calibration if calibration is not None else SDCalibration.from_env()
        self._cache = AtomicFolderCache(self.cache_root)
        self._guard = threading.Lock()
        self._key_locks: dict[tuple, threading.Lock] = {}
        self._pipelines: dict[tuple, OVControlNetPipeline] = {}
        self._prepared: dict[tuple, dict[str, Path]] = {}  # (sd, controlnet, precision) -> model_folders()
        self._core = None

    def _key(self, sd_ref, controlnet_ref, device, precision="fp16") -> tuple:
        return (sd_ref or self.sd_model, controlnet_ref or self.controlnet_model, (device or self.device).upper(),
                check_precision(precision))

    def loaded(self) -> list[tuple]:
        """``(sd_model, controlnet_model, device)`` of each loaded pipeline, with ``"int8"`` appended
        for INT8 ones."""
        with self._guard:
            return [key[:3] if key[3] == "fp16" else key for key in self._pipelines]

    def model_folders(
        self,
        sd_ref: Optional[str] = None,
        controlnet_ref: Optional[str] = None,
        precision: str = "fp16",
        progress: ProgressFn = no_progress,
    ) -> dict[str, Path]:
        """Convert (and for INT8 quantize) these models once; their cached folders, nothing loaded.

        Quantizing holds a work slot, and releases the pipeline it replaces when ``max_loaded`` is
        reached, so that no generation runs beside it.
        Returns ``{"sd", "controlnet"}`` (the FP16 IR folders), ``"int8"`` for INT8, and the
        ``"unet_xml"`` / ``"controlnet_xml"`` files the pipeline will run.
        """
        precision = check_precision(precision)
        sd, cn = sd_ref or self.sd_model, controlnet_ref or self.controlnet_model
        share = 0.8 if precision == "fp16" else 0.3
        sd_folder = ensure_sd15(
            self.cache_root, sd, local_files_only=self.local_files_only, cache=self._cache,
            progress=lambda f, m: progress(share * 0.8 * f, m),
        )
        cn_folder = ensure_controlnet(
            self.cache_root, cn, local_files_only=self.local_files_only, cache=self._cache,
            progress=lambda f, m: progress(share * (0.8 + 0.2 * f), m),
        )
        folders = {"sd": sd_folder, "controlnet": cn_folder,
                   "unet_xml": sd_folder / UNET_IR, "controlnet_xml": cn_folder / CONTROLNET_IR}
        if precision == "int8":
            int8 = ensure_sd_int8(
                self.cache_root, sd_folder, cn_folder, calibration=self.calibration, ov_config=self.ov_config,
                cache=self._cache, progress=lambda f, m: progress(share + (0.95 - share) * f, m),
                quantizing=lambda: self._quantizing(progress, share),
            )
            folders.update(int8=int8, unet_xml=int8 / UNET_IR, controlnet_xml=int8 / CONTROLNET_IR)
        return folders

    def prepare(self, sd_ref: Optional[str] = None, controlnet_ref: Optional[str] = None, device: Optional[str] = None,
                precision: str = "fp16", progress: ProgressFn = no_progress) -> None:
        """Download, convert and quantize what :meth:`get_pipeline` will need, unless it is loaded:
        work done outside the work slots (quantizing takes one, see :meth:`model_folders`)."""
        key = self._key(sd_ref, controlnet_ref, device, precision)
        with self._guard:
            if key in self._pipelines:
                return
        sd, cn, _device, precision = key
        folders = self.model_folders(sd, cn, precision, progress=progress)
        with self._guard:  # get_pipeline takes these as they are: no second hub check inside the slot
            self._prepared[(sd, cn, precision)] = folders

    def get_pipeline(
        self,
        sd_ref: Optional[str] = None,
        controlnet_ref: Optional[str] = None,
        device: Optional[str] = None,
        progress: ProgressFn = no_progress,
        precision: str = "fp16",
    ) -> OVControlNetPipeline:
        """The pipeline for these models on ``device`` at ``precision`` ("fp16" or "int8"),
        converting, quantizing and loading them once."""
        key = self._key(sd_ref, controlnet_ref, device, precision)
        with self._guard:
            pipeline = self._pipelines.get(key)
            if pipeline is not None:
                self._pipelines[key] = self._pipelines.pop(key)  # most recently used last
                return pipeline
            lock = self._key_locks.setdefault(key, threading.Lock())
        with lock:
            with self._guard:
                pipeline = self._pipelines.get(key)
            if pipeline is not None:
                return pipeline
            sd, cn, dev, precision = key
            with self._guard:
                folders = self._prepared.get((sd, cn, precision))
            if folders is None or not all(Path(folders[k]).is_file() for k in ("unet_xml", "controlnet_xml")):
                folders = self.model_folders(sd, cn, precision, progress=progress)
            if self._core is None:
                import openvino as ov

                self._core = ov.Core()
            pipeline = OVControlNetPipeline.from_folders(
                folders["sd"], folders["controlnet"], device=dev, ov_config=self.ov_config, core=self._core,
                info={"sd_model": sd, "controlnet_model": cn, "precision": precision},
                int8_folder=folders.get("int8"),
            )
            with self._guard:
                self._pipelines[key] = pipeline
            self._release_oldest(keep=self.max_loaded)  # another request may have loaded one meanwhile
            progress(1.0, "Image models ready")
            return pipeline

    @contextmanager
    def _quantizing(self, progress: ProgressFn, fraction: float) -> Iterator[None]:
        """Quantizing runs an FP16 pipeline of its own (calibration) and NNCF: it holds a work slot and
        the pipeline it replaces is released first, so that the two never sit in memory together."""
        with self.slots.turn(progress, fraction):
            self._release_oldest(keep=self.max_loaded - 1)
            yield

    def _release_oldest(self, keep: int) -> None:
        """Release the least recently used pipelines until at most ``keep`` stay loaded."""
        with self._guard:
            evicted = []
            while len(self._pipelines) > max(keep, 0):
                evicted.append(self._pipelines.pop(next(iter(self._pipelines))))
        for old in evicted:
            old.release()  # waits for a generation in progress on it to finish

    def generate(
        self,
        options: ImageOptions,
        pose_image: PoseImageInput,
        *,
        sd_ref: Optional[str] = None,
        controlnet_ref: Optional[str] = None,
        device: Optional[str] = None,
        progress: Optional[StepProgress] = None,
        cancel: CancelCheck = None,
        load_progress: ProgressFn = no_progress,
        precision: str = "fp16",
    ) -> GenerationResult:
        """Check inputs, get (convert/quantize/load once) the pipeline, and generate.

        The result's ``extra["precision"]`` (and each PNG's metadata) says which precision made it.
        """
        precision = check_precision(precision)
        pose = check_inputs(options, pose_image)  # fail fast, before any conversion or loading
        def stop_if_cancelled() -> None:
            if _cancelled(cancel):
                raise GenerationCancelled("Image generation was cancelled before it started.")

        self.prepare(sd_ref, controlnet_ref, device, precision, load_progress)
        stop_if_cancelled()
        with self.slots.turn(load_progress, 0.95, while_waiting=stop_if_cancelled):
            stop_if_cancelled()
            pipeline = self.get_pipeline(sd_ref, controlnet_ref, device, progress=load_progress, precision=precision)
            return pipeline(options, pose, progress=progress, cancel=cancel)

    def release(self) -> None:
        """Drop every loaded pipeline and its compiled models."""
        with self._guard:
            pipelines = list(self._pipelines.values())
            self._pipelines.clear()
        for pipeline in pipelines:
            pipeline.release()
