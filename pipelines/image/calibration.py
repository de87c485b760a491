"""What SD INT8 is calibrated on, and the settings that decide the INT8 folder's key.

* :class:`SDCalibration` - how calibration data is made: which prompts and poses, how many samples,
  at what size, and with which recipe: Quality mode's (the SD1.5 UNet, UniPC, classifier-free
  guidance: a batch of 2) or Fast mode's (the LCM-LoRA UNet, LCM scheduler, 4 steps, batch 1).
* :meth:`SDCalibration.load` - the prompts and pose images (shipped, or the user's own), where they
  came from, and the key of the INT8 folder they make, which also follows how NNCF quantizes on
  this CPU (:func:`sd_ignored_types`, :func:`sd_overflow_fix`).

Cheap: no model runtime is imported here.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from pipelines.core import cpu_int8
from pipelines.image.pose import draw_skeleton
from pipelines.image.request import FAST, QUALITY, check_mode

log = logging.getLogger(__name__)

ENV_SD_CALIBRATION_PROMPTS = "VOICE_STUDIO_SD_CALIBRATION_PROMPTS"
ENV_SD_CALIBRATION_POSES = "VOICE_STUDIO_SD_CALIBRATION_POSES"
ENV_SD_CALIBRATION_SUBSET = "VOICE_STUDIO_SD_CALIBRATION_SUBSET"
SD_CALIBRATION_PROMPTS = Path(__file__).parent / "data" / "calibration_prompts.json"
SD_CALIBRATION_POSES = Path(__file__).parent / "data" / "calibration_poses.json"
POSE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
SD_INT8_FORMAT = 2  # bump when what the quantization writes changes: part of the cache key (2: attention FP16)
#: Node types NNCF leaves unquantized by default: attention stays one fused FP16 kernel (int8.py says why);
#: on CPUs with AMX-INT8 nothing is left out (:func:`sd_ignored_types`).
SD_INT8_IGNORED_TYPES = ("ScaledDotProductAttention",)
#: NNCF's own overflow fix (7-bit weights in the first layer only): SD INT8's where kernels do not saturate.
NNCF_DEFAULT_OVERFLOW_FIX = "first_layer_only"


@dataclass(frozen=True)
class SDCalibration:
    """How SD INT8 calibration data is made: which prompts and poses, how many samples.

    Calibration runs the FP16 pipeline ``ceil(subset_size / steps)`` times (prompt ``i`` with pose
    ``i`` modulo their counts, seed ``i``) at ``width`` x ``height`` and keeps the real ControlNet
    and UNet inputs of every denoising step: ``subset_size`` samples per model. ``mode`` is the
    recipe the models will run: ``"quality"`` (UniPC with CFG ``guidance_scale``: a batch of 2) or
    ``"fast"`` (the LCM-LoRA UNet, LCM scheduler, batch 1; see :meth:`for_mode`). The defaults cost
    about 30 FP16 steps on top of the quantization itself: small enough for a 2-core machine.
    ``prompts``: a JSON list (strings or ``{"prompt", "negative_prompt"}``) or a text file with one
    prompt a line; ``poses``: a folder of OpenPose skeleton images. Without them, the prompts and the
    keypoint sets shipped in ``pipelines/image/data`` are used.
    """

    prompts: Optional[Path] = None
    poses: Optional[Path] = None
    subset_size: int = 30
    steps: int = 10
    width: int = 512
    height: int = 512
    guidance_scale: float = 7.5
    mode: str = QUALITY

    @classmethod
    def from_env(cls, **overrides) -> "SDCalibration":
        """Defaults, with the ``VOICE_STUDIO_SD_CALIBRATION_*`` variables applied, then ``overrides``."""
        values: dict = {}
        if os.environ.get(ENV_SD_CALIBRATION_PROMPTS):
            values["prompts"] = Path(os.environ[ENV_SD_CALIBRATION_PROMPTS]).expanduser()
        if os.environ.get(ENV_SD_CALIBRATION_POSES):
            values["poses"] = Path(os.environ[ENV_SD_CALIBRATION_POSES]).expanduser()
        if os.environ.get(ENV_SD_CALIBRATION_SUBSET):
            raw = os.environ[ENV_SD_CALIBRATION_SUBSET]
            if not raw.strip().isdigit() or int(raw) < 1:
                raise ValueError(f"{ENV_SD_CALIBRATION_SUBSET} is {raw!r}; set it to a whole number of samples such as 30.")
            values["subset_size"] = int(raw)
        values.update(overrides)
        return cls(**values)

    def with_changes(self, **changes) -> "SDCalibration":
        return replace(self, **changes)

    def for_mode(self, mode: str) -> "SDCalibration":
        """The same data with the recipe of ``mode``: Fast mode calibrates as Fast mode runs (4 LCM steps,
        guidance 1: no CFG, batch 1); the prompts, poses, sample count and size stay."""
        mode = check_mode(mode)
        if mode == self.mode:
            return self
        if mode == FAST:
            return replace(self, mode=FAST, steps=4, guidance_scale=1.0)
        return replace(self, mode=QUALITY, steps=SDCalibration.steps, guidance_scale=SDCalibration.guidance_scale)

    @property
    def scheduler(self) -> str:
        return "LCM" if self.mode == FAST else "UniPC"

    def describe(self) -> str:
        """'3 FP16 images x 10 UniPC steps at 512x512, CFG 7.5' (what the marker says about the recipe)."""
        recipe = (f"CFG {self.guidance_scale:g}" if self.guidance_scale > 1 else "no CFG (batch 1)")
        mode = " (Fast mode: LCM-LoRA UNet)" if self.mode == FAST else ""
        return (f"{self.runs} FP16 images x {self.steps} {self.scheduler} steps at {self.width}x{self.height}, "
                f"{recipe}{mode}")

    @property
    def runs(self) -> int:
        return -(-int(self.subset_size) // int(self.steps))

    def check(self) -> None:
        for name in ("subset_size", "steps", "width", "height"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SD calibration {name} is {value!r}; it must be a positive whole number.")
        if self.width % 8 or self.height % 8:
            raise ValueError(f"SD calibration size {self.width}x{self.height} must be a multiple of 8 (e.g. 512x512).")

    def load(self) -> "SDCalibrationSet":
        """The prompts and pose images to calibrate with, and where they came from.

        Raises ``ValueError`` saying what to fix when a user-given file or folder is unusable.
        """
        self.check()
        prompts, prompt_source = _calibration_prompts(self.prompts)
        poses, pose_source, pose_digest = _calibration_poses(self.poses, self.width, self.height)
        runs = self.runs
        facts = {
            "prompts": prompt_source, "poses": pose_source, "subset_size": self.subset_size, "steps": self.steps,
            "size": f"{self.width}x{self.height}", "guidance_scale": self.guidance_scale,
            **({"mode": FAST, "scheduler": self.scheduler} if self.mode == FAST else {}),  # Quality keys stay
        }
        # How NNCF quantizes on this CPU is part of the key too, only when it is not the default (so
        # folders made with the default keep their keys): a folder made where INT8 kernels saturate
        # uses 7-bit weights, one made elsewhere would saturate there; one made with AMX-INT8 has
        # INT8 attention, which splits into slow kernels elsewhere.
        overflow_fix, ignored_types = sd_overflow_fix(), sd_ignored_types()
        digest = hashlib.sha1(json.dumps(
            {"prompts": prompts[:runs], "poses": pose_digest, "format": SD_INT8_FORMAT,
             **({"overflow_fix": overflow_fix} if overflow_fix != NNCF_DEFAULT_OVERFLOW_FIX else {}),
             **({"ignored_types": list(ignored_types)} if tuple(ignored_types) != SD_INT8_IGNORED_TYPES else {}),
             **{k: v for k, v in facts.items() if k not in ("prompts", "poses")}},
            sort_keys=True).encode()).hexdigest()[:12]
        return SDCalibrationSet(prompts=prompts, poses=poses, sources=facts, key=digest)


@dataclass(frozen=True)
class SDCalibrationSet:
    prompts: list  # [(prompt, negative_prompt)]
    poses: list  # PIL images, RGB
    sources: dict  # what made it, for the cache marker
    key: str  # content key (calibration data, quantization format, overflow fix): the INT8 folder depends on it


def _calibration_prompts(path: Optional[Path]) -> tuple[list[tuple[str, str]], str]:
    source = Path(path) if path else SD_CALIBRATION_PROMPTS
    how = (f"Give a JSON list of prompts (strings or {{\"prompt\": ..., \"negative_prompt\": ...}}) or a text file with "
           f"one prompt a line ({ENV_SD_CALIBRATION_PROMPTS}).")
    if not source.is_file():
        raise ValueError(f"The SD calibration prompts file '{source}' does not exist. {how}")
    text = source.read_text(encoding="utf-8")
    try:
        items = json.loads(text) if source.suffix.lower() == ".json" else [line for line in text.splitlines()]
    except json.JSONDecodeError as error:
        raise ValueError(f"The SD calibration prompts file '{source}' is not valid JSON ({error}). {how}") from None
    prompts = []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, str) and item.strip():
            prompts.append((item.strip(), ""))
        elif isinstance(item, dict) and str(item.get("prompt", "")).strip():
            prompts.append((str(item["prompt"]).strip(), str(item.get("negative_prompt") or "")))
    if not prompts:
        raise ValueError(f"The SD calibration prompts file '{source}' holds no prompts. {how}")
    origin = "the prompts shipped with the app" if path is None else str(source)
    return prompts, f"{len(prompts)} prompts from {origin}"


def _calibration_poses(folder: Optional[Path], width: int, height: int) -> tuple[list, str, str]:
    """User pose images from ``folder``, else the shipped keypoint sets drawn by controlnet-aux."""
    from PIL import Image, UnidentifiedImageError

    if folder is not None:
        folder = Path(folder)
        how = (f"Point {ENV_SD_CALIBRATION_POSES} at a folder of OpenPose skeleton images (PNG or JPEG), or unset it "
               "to use the poses shipped with the app.")
        if not folder.is_dir():
            raise ValueError(f"The SD calibration pose folder '{folder}' does not exist. {how}")
        images, digest = [], hashlib.sha1()
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in POSE_SUFFIXES):
            try:
                with Image.open(path) as opened:
                    images.append(opened.convert("RGB"))
            except (UnidentifiedImageError, OSError) as error:
                log.warning("SD calibration: skipping %s (%s)", path, error)
                continue
            digest.update(hashlib.sha1(path.read_bytes()).digest())
        if not images:
            raise ValueError(f"The SD calibration pose folder '{folder}' holds no readable images. {how}")
        return images, f"{len(images)} pose images from {folder}", digest.hexdigest()
    sets = {k: v for k, v in json.loads(SD_CALIBRATION_POSES.read_text()).items() if not k.startswith("_")}
    images = [draw_pose_keypoints(people, width, height) for people in sets.values()]
    digest = hashlib.sha1(json.dumps(sets, sort_keys=True).encode()).hexdigest()
    return images, f"{len(images)} OpenPose skeletons drawn from the keypoint sets shipped with the app", digest


def draw_pose_keypoints(people: list, width: int, height: int):
    """An OpenPose skeleton image (controlnet-aux's drawing) of ``people``: each a list of 18 ``[x, y]``
    fractions of the image (or ``None`` for a hidden keypoint), COCO-18 body order."""
    from controlnet_aux.open_pose import PoseResult
    from controlnet_aux.open_pose.body import BodyResult, Keypoint

    poses = []
    for person in people:
        keypoints = [Keypoint(x=float(p[0]), y=float(p[1])) if p is not None else None for p in person]
        poses.append(PoseResult(BodyResult(keypoints, float(sum(k is not None for k in keypoints)),
                                           sum(k is not None for k in keypoints)), None, None, None))
    return draw_skeleton(poses, width, height)


def sd_ignored_types() -> tuple[str, ...]:
    """Node types SD INT8 made on this CPU leaves in FP16: attention, except where the CPU has AMX-INT8
    and quantized attention is faster (:func:`pipelines.core.cpu_int8.int8_attention`)."""
    return () if cpu_int8.int8_attention() else SD_INT8_IGNORED_TYPES


def sd_overflow_fix() -> str:
    """NNCF's overflow fix for SD INT8 made on this CPU: ``enable`` (7-bit weights everywhere) where
    INT8 kernels saturate (x86 without VNNI, see :mod:`pipelines.core.cpu_int8`), else NNCF's default
    ``first_layer_only``."""
    return cpu_int8.overflow_fix(NNCF_DEFAULT_OVERFLOW_FIX)


