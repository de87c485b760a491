"""Stable Diffusion 1.5 + ControlNet INT8: calibration on the FP16 pipeline's own inputs, NNCF
post-training quantization of the UNet and ControlNet, and the cached INT8 folder (ensure_sd_int8)."""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Optional, Sequence

import numpy as np

from pipelines.core import cpu_int8
from pipelines.core.cpu_int8 import count_int8
from pipelines.core.layout import ModelsLayout
from pipelines.core.progress import ProgressFn, no_progress, scaled
from pipelines.image.convert import CONTROLNET_IR, PIPELINE_JSON, UNET_IR
from pipelines.image.pipeline import OVControlNetPipeline
from pipelines.image.pose import draw_skeleton
from pipelines.image.request import ImageOptions

log = logging.getLogger(__name__)

# ================================================================================================
# Stable Diffusion 1.5 + ControlNet INT8
# ================================================================================================
#
# Measured on this CPU (2 cores, AVX-512 + AMX; full SD1.5 + ControlNet OpenPose, 512x512, CFG,
# see /work/shared/MEASUREMENTS.md), seconds per denoising step (ControlNet + UNet):
#   FP16 IR (runs bf16)                          7.0   (6.25 with static shapes)
#   INT8 weight-only (nncf.compress_weights)     7.9   -> no gain: AMX bf16 matmuls are compute-bound here,
#                                                         and weights are dequantised before them
#   INT8 PTQ (nncf.quantize, TRANSFORMER,        5.4   (4.25 with static shapes): activations are INT8 too,
#        bias correction off)                             so the convolutions and matmuls run on AMX-INT8
# So SD INT8 is full post-training quantization of the two models run at every step, the UNet and
# the ControlNet; the text encoder (once per image) and the VAE decoder (once, and sensitive) stay FP16.
#
# Except attention: measured on an AVX2-only CPU (AMD EPYC, no VNNI; per UNet call, CFG batch 2,
# 512x512, static shapes, in turns), FP16 13.0 s, full PTQ 12.2 s (1.06x), PTQ with the
# ScaledDotProductAttention nodes left alone 10.7-11.1 s (1.21-1.26x); ControlNet 5.08 / 4.31 / 4.03 s.
# With INT8 inputs the CPU plugin splits attention there into INT8 MatMuls and a separate Softmax,
# slower than the fused attention kernel it runs otherwise. On a Xeon with AMX-INT8 it is the other
# way round: the fused kernel runs in INT8 and the UNet call is faster with attention quantized
# (1.42 s against 1.50 s, FP16 1.99 s; pipelines/cpu_int8.py), so attention is quantized there only.
# The INT8 convolutions (jit_avx2_I8) are 2.2-2.5x faster than fp32 there; the INT8 fully
# connected layers (jit_gemm_i8) gain nothing without VNNI but do with AMX, so they stay quantized,
# and on such a CPU they are compiled as INT8 1x1 convolutions instead (pipelines/cpu_int8.py:
# UNet call 1.25x -> 1.5x faster than FP16). There too, INT8 kernels without VNNI saturate int16
# sums, so the weights are quantized on 7 bits (NNCF's overflow fix; sd_overflow_fix()).

ENV_SD_CALIBRATION_PROMPTS = "VOICE_STUDIO_SD_CALIBRATION_PROMPTS"
ENV_SD_CALIBRATION_POSES = "VOICE_STUDIO_SD_CALIBRATION_POSES"
ENV_SD_CALIBRATION_SUBSET = "VOICE_STUDIO_SD_CALIBRATION_SUBSET"
SD_CALIBRATION_PROMPTS = Path(__file__).parent / "data" / "calibration_prompts.json"
SD_CALIBRATION_POSES = Path(__file__).parent / "data" / "calibration_poses.json"
POSE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
SD_INT8_FORMAT = 2  # bump when what the quantization writes changes: part of the cache key (2: attention FP16)
#: Node types NNCF leaves unquantized by default: attention stays one fused FP16 kernel (see above);
#: on CPUs with AMX-INT8 nothing is left out (:func:`sd_ignored_types`).
SD_INT8_IGNORED_TYPES = ("ScaledDotProductAttention",)
#: NNCF's own overflow fix (7-bit weights in the first layer only): SD INT8's where kernels do not saturate.
NNCF_DEFAULT_OVERFLOW_FIX = "first_layer_only"


@dataclass(frozen=True)
class SDCalibration:
    """How SD INT8 calibration data is made: which prompts and poses, how many samples.

    Calibration runs the FP16 pipeline ``ceil(subset_size / steps)`` times (prompt ``i`` with pose
    ``i`` modulo their counts, seed ``i``) at ``width`` x ``height`` with CFG, and keeps the real
    ControlNet and UNet inputs of every denoising step: ``subset_size`` samples per model. The
    defaults cost about 30 FP16 steps on top of the quantization itself: small enough for a
    2-core machine. ``prompts``: a JSON list (strings or ``{"prompt", "negative_prompt"}``) or a
    text file with one prompt a line; ``poses``: a folder of OpenPose skeleton images. Without
    them, the prompts and the keypoint sets shipped in ``pipelines/data`` are used.
    """

    prompts: Optional[Path] = None
    poses: Optional[Path] = None
    subset_size: int = 30
    steps: int = 10
    width: int = 512
    height: int = 512
    guidance_scale: float = 7.5

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
        from dataclasses import replace

        return replace(self, **changes)

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


class _InputRecorder:
    """Keeps the ControlNet and UNet inputs of each denoising step (copies: requests reuse their memory).

    Large float tensors (the ControlNet residuals) are kept as float16 to halve the memory of the
    calibration set and cast back to float32 when NNCF reads them; arrays that stay the same over
    a whole image (text embeddings, control image) are stored once.
    """

    def __init__(self):
        self.samples: dict[str, list[dict]] = {"controlnet": [], "unet": []}
        self._shared: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, name: str, inputs: dict) -> None:
        kept = {}
        for key, value in inputs.items():
            array = np.asarray(value)
            if key in ("encoder_hidden_states", "controlnet_cond"):
                held = self._shared.get(id(value))
                if held is None or held[0] is not value:
                    held = (value, np.array(array, copy=True))
                    self._shared[id(value)] = held
                kept[key] = held[1]
            elif array.dtype == np.float32 and array.size > 65536:
                kept[key] = array.astype(np.float16)
            else:
                kept[key] = np.array(array, copy=True)
        self.samples[name].append(kept)

    @staticmethod
    def to_model_input(sample: dict) -> dict:
        return {k: (v.astype(np.float32) if v.dtype == np.float16 else v) for k, v in sample.items()}


def gather_sd_calibration(pipeline: OVControlNetPipeline, data: SDCalibrationSet, settings: SDCalibration,
                          progress: ProgressFn = no_progress) -> dict[str, list[dict]]:
    """Run the FP16 ``pipeline`` on the calibration prompts and poses; return the ControlNet and UNet
    inputs it saw (``subset_size`` of each)."""
    recorder = _InputRecorder()
    runs = settings.runs
    with pipeline.observe_inputs(recorder):
        for run in range(runs):
            prompt, negative = data.prompts[run % len(data.prompts)]
            options = ImageOptions(prompt=prompt, negative_prompt=negative, steps=settings.steps,
                                   guidance_scale=settings.guidance_scale, seed=run, width=settings.width,
                                   height=settings.height, scheduler="UniPC")
            step = scaled(progress, run / runs, (run + 1) / runs, f"Calibrating: FP16 image {run + 1} of {runs}")
            pipeline(options, data.poses[run % len(data.poses)], progress=step)
    samples = {}
    for name, items in recorder.samples.items():
        keep = np.linspace(0, len(items) - 1, num=min(settings.subset_size, len(items))).round().astype(int)
        samples[name] = [items[i] for i in sorted(set(keep.tolist()))]
    return samples


def sd_ignored_types() -> tuple[str, ...]:
    """Node types SD INT8 made on this CPU leaves in FP16: attention, except where the CPU has AMX-INT8
    and quantized attention is faster (:func:`pipelines.core.cpu_int8.int8_attention`)."""
    return () if cpu_int8.int8_attention() else SD_INT8_IGNORED_TYPES


def sd_int8_method(ignored_types: Sequence[str]) -> str:
    """The method recorded in the INT8 folder's marker."""
    attention = ("attention (ScaledDotProductAttention) left in FP16" if "ScaledDotProductAttention" in ignored_types
                 else "attention quantized too (AMX-INT8)")
    return ("INT8 post-training quantization of UNet and ControlNet (nncf.quantize, ModelType.TRANSFORMER, "
            f"bias correction off, {attention}), calibrated on their inputs while the FP16 pipeline denoises; "
            "text encoder and VAE FP16")


def sd_overflow_fix() -> str:
    """NNCF's overflow fix for SD INT8 made on this CPU: ``enable`` (7-bit weights everywhere) where
    INT8 kernels saturate (x86 without VNNI, see :mod:`pipelines.core.cpu_int8`), else NNCF's default
    ``first_layer_only``."""
    return cpu_int8.overflow_fix(NNCF_DEFAULT_OVERFLOW_FIX)


def quantize_sd_model(model, samples: list[dict], overflow_fix: str = NNCF_DEFAULT_OVERFLOW_FIX,
                      ignored_types: Sequence[str] = SD_INT8_IGNORED_TYPES):
    """NNCF post-training quantization of an SD UNet or ControlNet ``ov.Model`` on recorded inputs,
    leaving the ``ignored_types`` nodes unquantized."""
    import nncf

    return nncf.quantize(
        model,
        nncf.Dataset(samples, _InputRecorder.to_model_input),
        subset_size=len(samples),
        model_type=nncf.ModelType.TRANSFORMER,
        advanced_parameters=nncf.AdvancedQuantizationParameters(
            disable_bias_correction=True, overflow_fix=nncf.OverflowFix(overflow_fix)),
        # validate=False: a model exported without fused attention nodes is quantized all the same
        ignored_scope=nncf.IgnoredScope(types=list(ignored_types), validate=False) if ignored_types else None,
    )


def quantize_sd_int8(sd_folder: Path, controlnet_folder: Path, out_dir: Path, settings: Optional[SDCalibration] = None,
                     *, data: Optional[SDCalibrationSet] = None, ov_config: Optional[dict] = None,
                     progress: ProgressFn = no_progress) -> dict:
    """Write INT8 ``unet.xml`` and ``controlnet.xml`` for this FP16 SD1.5 + ControlNet pair into ``out_dir``.

    Why full post-training quantization and not INT8 weights only: measured on this AMX CPU (full
    SD1.5 + ControlNet OpenPose, 512x512, CFG), a denoising step takes 7.0 s in FP16, 7.9 s with
    INT8 weight-only compression (no speed-up: weights are dequantised before bf16 AMX matmuls) and
    5.4 s with ``nncf.quantize`` (ModelType.TRANSFORMER, bias correction off); 6.25 s vs 4.25 s
    with static shapes. Attention nodes stay FP16 except on CPUs with AMX-INT8 (:func:`sd_ignored_types`:
    elsewhere quantizing them splits the fused attention kernel and costs more than it saves). Where INT8 kernels saturate (no VNNI) the weights
    use 7 bits (:func:`sd_overflow_fix`). Only the UNet and ControlNet, which run at every
    step, are quantized; the text encoder and VAE decoder stay FP16.

    Calibration data is gathered by running the FP16 pipeline (see :class:`SDCalibration`); then
    the ControlNet and the UNet are quantized one after the other, each freed before the next, to
    keep the peak memory down. Returns the facts recorded in the cache marker.
    """
    report = progress
    settings = settings or SDCalibration.from_env()
    data = data or settings.load()
    started = time.perf_counter()
    report(0.0, f"Calibrating INT8: {settings.runs} FP16 images of {settings.steps} steps")
    pipeline = OVControlNetPipeline.from_folders(sd_folder, controlnet_folder, device="CPU", ov_config=ov_config)
    try:
        samples = gather_sd_calibration(pipeline, data, settings, lambda f, m: report(0.4 * f, m))
    finally:
        pipeline.release()
        del pipeline
        gc.collect()
    timings = {"gather_s": round(time.perf_counter() - started, 1)}
    overflow_fix, ignored_types = sd_overflow_fix(), sd_ignored_types()
    used = {name: len(items) for name, items in samples.items()}
    counts = {}
    for index, (name, xml, label) in enumerate((("controlnet", Path(controlnet_folder) / CONTROLNET_IR, "ControlNet"),
                                                ("unet", Path(sd_folder) / UNET_IR, "UNet"))):
        part_started = time.perf_counter()
        report(0.4 + 0.3 * index, f"Quantizing the {label} to INT8 ({len(samples[name])} calibration samples)")
        counts[name] = _quantize_one(xml, samples.pop(name), Path(out_dir) / xml.name, label, overflow_fix,
                                     ignored_types)
        timings[f"{name}_s"] = round(time.perf_counter() - part_started, 1)
    report(1.0, "INT8 models ready")
    return {
        "precision": "int8",
        "method": sd_int8_method(ignored_types),
        "nncf": {"function": "nncf.quantize", "model_type": "TRANSFORMER", "disable_bias_correction": True,
                 "ignored_types": list(ignored_types), "overflow_fix": overflow_fix,
                 "subset_size": settings.subset_size},
        "calibration_samples": used["unet"],
        "calibration_samples_per_model": used,
        "calibration": (f"{settings.runs} FP16 images x {settings.steps} UniPC steps at {settings.width}x{settings.height}, "
                        f"CFG {settings.guidance_scale:g}; {data.sources['prompts']}; {data.sources['poses']}"),
        "calibration_sources": data.sources,
        "calibration_key": data.key,
        "int8_ops": counts,
        "timings": timings,
        "fp16_models": {"sd": str(sd_folder), "controlnet": str(controlnet_folder)},
        "stays_fp16": ["text_encoder", "vae_decoder"],
    }


def _quantize_one(xml: Path, samples: list[dict], out: Path, label: str, overflow_fix: str,
                  ignored_types: Sequence[str]) -> dict[str, int]:
    """Quantize one FP16 IR on its calibration samples into ``out`` (the model freed right after);
    how much of it is INT8."""
    import openvino as ov

    quantized = quantize_sd_model(ov.Core().read_model(xml), samples, overflow_fix, ignored_types)
    ov.save_model(quantized, out, compress_to_fp16=True)
    del quantized, samples
    gc.collect()
    counts = count_int8(out)
    if not counts["fake_quantize"]:
        raise RuntimeError(f"NNCF left the {label} without any INT8 operation; the FP16 model cannot be quantized.")
    return counts


def ensure_sd_int8(
    models: "ModelsLayout | Path | str",
    sd_folder: Path,
    controlnet_folder: Path,
    *,
    calibration: Optional[SDCalibration] = None,
    ov_config: Optional[dict] = None,
    progress: ProgressFn = no_progress,
    quantizing: Callable[[], ContextManager] = nullcontext,
) -> Path:
    """Return the folder with the INT8 ``unet.xml`` and ``controlnet.xml`` for FP16 IR folders
    ``sd_folder`` + ``controlnet_folder`` (made by :func:`ensure_sd15` / :func:`ensure_controlnet`),
    quantizing once (see :func:`quantize_sd_int8`).

    The UNet and the ControlNet are quantized as a pair because the calibration runs them together
    (the UNet's inputs include the ControlNet's residuals). ``calibration`` is a
    :class:`SDCalibration` (default: from the environment). The marker file
    records the method, the number of calibration samples and where the prompts and poses came from.
    ``quantizing()`` is a context the quantization runs in, entered only when it has to run (e.g. to
    free memory for it and keep other work from taking that memory back meanwhile).
    """
    settings = calibration or SDCalibration.from_env()
    data = settings.load()  # cheap (prompts + a few skeleton images); user-data errors surface here
    sd_folder, controlnet_folder = Path(sd_folder), Path(controlnet_folder)
    sd_summary = json.loads((sd_folder / PIPELINE_JSON).read_text())
    cn_summary = json.loads((controlnet_folder / PIPELINE_JSON).read_text())
    layout = ModelsLayout.of(models)
    folder = layout.sd_int8(sd_folder, controlnet_folder, data.key)

    def build(tmp: Path) -> dict:
        with quantizing():
            facts = quantize_sd_int8(sd_folder, controlnet_folder, tmp, settings, data=data,
                                     ov_config=ov_config, progress=progress)
        (tmp / PIPELINE_JSON).write_text(json.dumps({
            "kind": "sd15_int8", "unet": UNET_IR, "controlnet": CONTROLNET_IR,
            "sd_folder": sd_folder.name, "controlnet_folder": controlnet_folder.name,
        }, indent=2))
        return facts

    return layout.cache.get_or_build(
        folder, build,
        description={"kind": "sd15_int8", "precision": "int8", "model": sd_summary.get("model"),
                     "controlnet": cn_summary.get("model")},
    )
