"""What an image request is: its options, the checks they pass before any heavy work, the seeds
of its images, and the PNG files that carry their settings.

* :class:`ImageOptions` - what to generate (frozen), in one of two modes (:data:`MODES`): **quality**
  (SD1.5 as trained: 20 steps, classifier-free guidance, a choice of schedulers, the full VAE) or
  **fast** (the LCM-LoRA fused into the UNet, the LCM scheduler, 4 steps without guidance, the tiny
  TAESD decoder), each with its own step and guidance ranges (:data:`MODE_LIMITS`);
  :func:`check_inputs` validates options and the pose image before any model is touched and raises
  ``ValueError`` with a message for the user. Cheap: imports only Pillow/numpy.
* :func:`resolve_seeds` - image ``i`` of a request is the picture a single-image request with seed
  ``seed + i`` makes (the pipeline gives each its own ``torch.Generator``).
* :class:`GenerationResult`, :func:`save_png` / :func:`read_png_metadata` - PNG files carrying their
  settings (an A1111-style ``parameters`` text chunk plus a JSON ``voice_studio`` chunk).
"""
from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from pipelines.core.types import check_choice

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
#: Fast mode's scheduler: the one the LCM-LoRA was distilled for (not offered in Quality mode).
FAST_SCHEDULER = "LCM"
ALL_SCHEDULERS: dict[str, tuple[str, dict]] = {**SCHEDULERS, FAST_SCHEDULER: ("LCMScheduler", {})}

MIN_SIZE, MAX_SIZE, SIZE_MULTIPLE = 256, 1024, 8
MIN_IMAGES, MAX_IMAGES = 1, 4
MIN_CONTROLNET_SCALE, MAX_CONTROLNET_SCALE = 0.0, 2.0
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 2000
PNG_JSON_KEY = "voice_studio"

QUALITY, FAST = "quality", "fast"
MODES: tuple[str, ...] = (QUALITY, FAST)
#: The decoders of the final image: the SD VAE, or TAESD (tiny: about 1/30 of the VAE's time).
DECODERS: tuple[str, ...] = ("vae", "taesd")


@dataclass(frozen=True)
class ModeLimits:
    """What a mode takes: its steps and guidance ranges and defaults, and the final image's decoder."""

    label: str
    steps: tuple[int, int]
    default_steps: int
    guidance: tuple[float, float]
    default_guidance: float
    decoder: str
    previews_every: int  # a live preview every this many steps (the final step gives the image itself)


MODE_LIMITS: dict[str, ModeLimits] = {
    # SD1.5 as trained; a preview every 4 steps costs under 2% of a step each (TAESD).
    QUALITY: ModeLimits("Quality", (1, 100), 20, (1.0, 20.0), 7.5, "vae", 4),
    # LCM-LoRA: 2-8 steps; guidance 1 runs no classifier-free guidance (one UNet batch, half the work),
    # up to 2 is the small CFG the LCM-LoRA recipe allows.
    FAST: ModeLimits("Fast", (1, 8), 4, (1.0, 2.0), 1.0, "taesd", 1),
}

PoseImageInput = Union[Image.Image, np.ndarray, str, Path, None]
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
    scheduler: str = "UniPC"  # Quality mode's; Fast mode always runs the LCM scheduler
    mode: str = QUALITY
    decoder: Optional[str] = None  # the final image's decoder ("vae" or "taesd"); None: the mode's

    @property
    def sampler(self) -> str:
        """The scheduler that runs: Fast mode's LCM, else the chosen one."""
        return FAST_SCHEDULER if self.mode == FAST else self.scheduler

    @property
    def limits(self) -> ModeLimits:
        return MODE_LIMITS.get(self.mode, MODE_LIMITS[QUALITY])

    @property
    def final_decoder(self) -> str:
        return self.decoder or self.limits.decoder

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
    problems += _mode_problems(options)
    if not _is_int(options.num_images) or not MIN_IMAGES <= options.num_images <= MAX_IMAGES:
        problems.append(f"Number of images is {options.num_images!r}; choose from {MIN_IMAGES} to {MAX_IMAGES}.")
    if not _is_number(options.controlnet_scale) or not MIN_CONTROLNET_SCALE <= options.controlnet_scale <= MAX_CONTROLNET_SCALE:
        problems.append(
            f"ControlNet strength is {options.controlnet_scale!r}; choose from {MIN_CONTROLNET_SCALE:g} "
            f"to {MAX_CONTROLNET_SCALE:g} (1.0 follows the pose closely, 0 ignores it)."
        )
    if not _is_int(options.seed) or not -1 <= options.seed <= MAX_SEED:
        problems.append(f"Seed is {options.seed!r}; use a whole number from 0 to {MAX_SEED}, or -1 for a random seed.")
    if options.mode != FAST and options.scheduler not in SCHEDULERS:
        problems.append(f"Unknown sampler {options.scheduler!r}; choose one of: {', '.join(SCHEDULER_NAMES)}.")
    if options.decoder is not None and options.decoder not in DECODERS:
        problems.append(f"Unknown decoder {options.decoder!r}; choose one of: {', '.join(DECODERS)}.")
    if any(isinstance(v, float) and not np.isfinite(v) for v in (options.guidance_scale, options.controlnet_scale)):
        problems.append("Guidance and ControlNet strength must be finite numbers.")
    if problems:
        raise ValueError(" ".join(dict.fromkeys(problems)))


def check_mode(mode: Any) -> str:
    """``mode`` as one of :data:`MODES` (any case), or a ``ValueError`` that says what to give."""
    return check_choice(mode, MODES, "Mode", "fast: LCM-LoRA, 4 steps and the tiny TAESD decoder, seconds on "
                        "a CPU; quality: 20 steps with guidance")


def _mode_problems(options: ImageOptions) -> list[str]:
    """The steps and guidance checks of the options' mode (each mode has its own ranges)."""
    if options.mode not in MODES:
        try:
            check_mode(options.mode)
        except ValueError as error:
            return [str(error)]
    limits, problems = options.limits, []
    (low, high), mode = limits.steps, f" in {limits.label} mode" if options.mode == FAST else ""
    if not _is_int(options.steps) or not low <= options.steps <= high:
        problems.append(f"Steps is {options.steps!r}; choose a whole number from {low} to {high}{mode} "
                        f"({limits.default_steps} is typical).")
    (low, high) = limits.guidance
    if not _is_number(options.guidance_scale) or not low <= options.guidance_scale <= high:
        problems.append(f"Guidance scale is {options.guidance_scale!r}; choose from {low:g} to {high:g}{mode} "
                        f"({limits.default_guidance:g} is typical).")
    return problems


def check_inputs(options: ImageOptions, pose_image: PoseImageInput) -> Image.Image:
    """Validate everything before heavy work (diffusers-style); return the pose image as RGB PIL.

    Raises ``ValueError`` with a message for the user: what is wrong and what to do.
    """
    check_options(options)
    return load_pose_image(pose_image)


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
        f"Sampler: {options.sampler}",
        f"CFG scale: {options.guidance_scale:g}",
        f"Seed: {seed}",
        f"Size: {options.width}x{options.height}",
    ]
    if extra.get("sd_model"):
        fields.append(f"Model: {extra['sd_model']}")
    if extra.get("controlnet_model"):
        fields.append(f"ControlNet: {extra['controlnet_model']}")
    fields.append(f"ControlNet weight: {options.controlnet_scale:g}")
    fields.append(f"Mode: {options.limits.label}")
    if options.mode == FAST and extra.get("lcm_lora"):
        fields.append(f"LoRA: {extra['lcm_lora']}")
    fields.append(f"Decoder: {options.final_decoder.upper()}")
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


def is_cancelled(cancel: CancelCheck) -> bool:
    """Whether the caller's cancel check (an event, or a function) has fired."""
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event) or hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


def uint8_pixels(array: np.ndarray) -> np.ndarray:
    """Pixel values as uint8: floats in [0, 1] (matplotlib / skimage style) are scaled to 0-255, other
    values are rounded and clipped to 0-255."""
    if array.dtype == np.uint8:
        return array
    values = np.nan_to_num(array.astype(np.float64))
    if array.dtype.kind == "f" and values.max(initial=0.0) <= 1.0:
        values = values * 255.0
    return np.clip(values, 0, 255).round().astype(np.uint8)
