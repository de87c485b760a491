"""Stable Diffusion 1.5 + ControlNet INT8: calibration on the FP16 pipeline's own inputs, NNCF
post-training quantization of the UNet and ControlNet, and the cached INT8 folder (:func:`ensure_sd_int8`).

Quality mode's pair (the SD1.5 UNet) is calibrated as Quality runs (UniPC, CFG); Fast mode's pair (the
UNet with the LCM-LoRA fused in) as Fast runs (4 LCM steps, batch 1), and its folder's key includes the
LoRA, its revision and scale. Both are made in bounded memory (:mod:`pipelines.image.lowmem`: each
phase in a child process, samples on disk, static shapes, statistics in chunks), after a check that
the memory is there (:func:`int8_memory_needed`): otherwise INT8 is refused with a message, rather
than the process being killed half-way.
"""
from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, ContextManager, Optional, Sequence

import numpy as np

from pipelines.core.cpu_int8 import count_int8
from pipelines.core.layout import ModelsLayout
from pipelines.core.memory import GB, check_memory
from pipelines.core.progress import ProgressFn, no_progress, scaled
from pipelines.image.calibration import (ENV_SD_CALIBRATION_POSES, ENV_SD_CALIBRATION_PROMPTS,  # noqa: F401 - the API
                                         ENV_SD_CALIBRATION_SUBSET, NNCF_DEFAULT_OVERFLOW_FIX, SD_INT8_IGNORED_TYPES,
                                         SDCalibration, SDCalibrationSet, draw_pose_keypoints, sd_ignored_types,
                                         sd_overflow_fix)
from pipelines.image.convert import CONTROLNET_IR, PIPELINE_JSON, UNET_IR
from pipelines.image.lowmem import DiskRecorder, LazySamples, chunked_statistics, folder_size_mb, in_process, run_in_child
from pipelines.image.pipeline import OVControlNetPipeline
from pipelines.image.request import FAST, QUALITY, ImageOptions

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

#: Measured making the INT8 pair of the full SD1.5 (UNet IR 1,639 MB FP16) from 512x512 calibration with
#: this module's low-memory path: the largest child (the UNet's quantization) peaked at 10.1 GB. What a
#: pair needs is scaled from that by its UNet's size (and calibration area), plus a margin.
MEASURED_PEAK_BYTES = int(10.1 * GB)
MEASURED_UNET_IR_BYTES = 1_639 * 2**20
MEMORY_MARGIN = 1.14
MIN_MEMORY_BYTES = 1 * GB  # Python, torch, OpenVINO and NNCF in a child process, whatever the model
#: NNCF statistics in this many chunks (per batch item): the UNet's peak 10.1 GB instead of 14.7 GB, same result.
STAT_CHUNKS = 4


def int8_memory_needed(unet_xml: Path, settings: SDCalibration) -> int:
    """Bytes making the INT8 pair of this UNet needs (the measured peak, scaled by the UNet's size and the
    calibration area, with a margin): 11.5 GB for SD1.5 at 512x512."""
    weights = Path(unet_xml).with_suffix(".bin")
    size = weights.stat().st_size if weights.is_file() else MEASURED_UNET_IR_BYTES
    area = max(1.0, settings.width * settings.height / (512 * 512))
    return max(MIN_MEMORY_BYTES, int(MEASURED_PEAK_BYTES * MEMORY_MARGIN * size / MEASURED_UNET_IR_BYTES * area))


def sd_int8_method(ignored_types: Sequence[str]) -> str:
    """The method recorded in the INT8 folder's marker."""
    attention = ("attention (ScaledDotProductAttention) left in FP16" if "ScaledDotProductAttention" in ignored_types
                 else "attention quantized too (AMX-INT8)")
    return ("INT8 post-training quantization of UNet and ControlNet (nncf.quantize, ModelType.TRANSFORMER, "
            f"bias correction off, {attention}), calibrated on their inputs while the FP16 pipeline denoises; "
            "text encoder and VAE FP16")


def _to_model_input(sample: dict) -> dict:
    return {k: (v.astype(np.float32) if v.dtype == np.float16 else v) for k, v in sample.items()}


def quantize_sd_model(model, samples: Sequence, overflow_fix: str = NNCF_DEFAULT_OVERFLOW_FIX,
                      ignored_types: Sequence[str] = SD_INT8_IGNORED_TYPES, *, transform: Optional[Callable] = None,
                      stat_chunks: int = 1):
    """NNCF post-training quantization of an SD UNet or ControlNet ``ov.Model`` on recorded inputs
    (``samples``, each made a model input by ``transform``), leaving the ``ignored_types`` nodes
    unquantized; NNCF's statistics in ``stat_chunks`` chunks (same result, less memory)."""
    import nncf

    with chunked_statistics(stat_chunks):
        return nncf.quantize(
            model,
            nncf.Dataset(samples, transform or _to_model_input),
            subset_size=len(samples),
            model_type=nncf.ModelType.TRANSFORMER,
            advanced_parameters=nncf.AdvancedQuantizationParameters(
                disable_bias_correction=True, overflow_fix=nncf.OverflowFix(overflow_fix)),
            # validate=False: a model exported without fused attention nodes is quantized all the same
            ignored_scope=nncf.IgnoredScope(types=list(ignored_types), validate=False) if ignored_types else None,
        )


def gather_phase(sd_folder: str, controlnet_folder: str, samples_dir: str, settings: SDCalibration,
                 lcm_folder: Optional[str] = None, taesd_folder: Optional[str] = None,
                 ov_config: Optional[dict] = None, progress: ProgressFn = no_progress) -> dict:
    """Run the FP16 pipeline on the calibration prompts and poses as its mode runs, writing the
    ControlNet's and UNet's inputs to ``samples_dir`` (``subset_size`` of each kept)."""
    data, runs = settings.load(), settings.runs
    pipeline = OVControlNetPipeline.from_folders(Path(sd_folder), Path(controlnet_folder), device="CPU",
                                                 ov_config=ov_config, lcm_folder=lcm_folder, taesd_folder=taesd_folder)
    recorder = DiskRecorder(Path(samples_dir))
    with pipeline.observe_inputs(recorder):
        for run in range(runs):
            prompt, negative = data.prompts[run % len(data.prompts)]
            options = ImageOptions(prompt=prompt, negative_prompt=negative, steps=settings.steps,
                                   guidance_scale=settings.guidance_scale, seed=run, width=settings.width,
                                   height=settings.height, scheduler="UniPC", mode=settings.mode,
                                   decoder="taesd" if taesd_folder else "vae")
            step = scaled(progress, run / runs, (run + 1) / runs, f"Calibrating: FP16 image {run + 1} of {runs}")
            pipeline(options, data.poses[run % len(data.poses)], progress=step)
    kept = recorder.save_index(settings.subset_size)
    pipeline.release()
    return {"kept": kept, "disk_mb": folder_size_mb(Path(samples_dir))}


def quantize_phase(xml: str, samples_dir: str, name: str, out_xml: str, overflow_fix: str,
                   ignored_types: Sequence[str], stat_chunks: int = STAT_CHUNKS,
                   progress: ProgressFn = no_progress) -> dict:
    """Quantize one FP16 IR on its recorded inputs (read from disk one at a time) at their static shape, with
    NNCF's statistics in ``stat_chunks`` chunks per batch item (a CFG batch of 2 holds twice the activations),
    and save it with its dynamic shapes back; how much of it is INT8."""
    import openvino as ov

    samples = LazySamples(Path(samples_dir), name)
    chunks = stat_chunks * samples.batch
    model = ov.Core().read_model(xml)
    dynamic = {port.get_any_name(): port.get_partial_shape() for port in model.inputs}
    model.reshape(samples.shapes())
    quantized = quantize_sd_model(model, samples, overflow_fix, ignored_types, transform=samples.to_model_input,
                                  stat_chunks=chunks)
    del model
    gc.collect()
    quantized.reshape(dynamic)  # the IR on disk stays dynamic like the FP16 one (the pipeline reshapes per request)
    ov.save_model(quantized, out_xml, compress_to_fp16=True)
    del quantized
    gc.collect()
    counts = count_int8(Path(out_xml))
    if not counts["fake_quantize"]:
        raise RuntimeError(f"NNCF left the {name} without any INT8 operation; the FP16 model cannot be quantized.")
    progress(1.0, f"{name} quantized")
    return {"int8_ops": counts, "samples": len(samples), "statistics_chunks": chunks}


def quantize_sd_int8(sd_folder: Path, controlnet_folder: Path, out_dir: Path, settings: Optional[SDCalibration] = None,
                     *, data: Optional[SDCalibrationSet] = None, ov_config: Optional[dict] = None,
                     progress: ProgressFn = no_progress, lcm_folder: Optional[Path] = None,
                     taesd_folder: Optional[Path] = None, children: bool = True,
                     stat_chunks: int = STAT_CHUNKS) -> dict:
    """Write INT8 ``unet.xml`` and ``controlnet.xml`` for this FP16 SD1.5 + ControlNet pair into ``out_dir``
    (with ``lcm_folder``, Fast mode's pair: its fused UNet, calibrated the Fast way): full post-training
    quantization of the two models that run at every step (why: the comment at the top of this module).

    Calibration data is gathered by running the FP16 pipeline (see :class:`SDCalibration`); then the
    ControlNet and the UNet are quantized one after the other, each phase in its own child process
    (``children``; :mod:`pipelines.image.lowmem`). Returns the facts recorded in the cache marker.
    """
    mode = FAST if lcm_folder is not None else QUALITY
    settings = (settings or SDCalibration.from_env()).for_mode(mode)
    data = data or settings.load()
    run = run_in_child if children else in_process
    samples_dir, phases = Path(out_dir) / ".calibration", {}
    overflow_fix, ignored_types = sd_overflow_fix(), sd_ignored_types()
    progress(0.0, f"Calibrating INT8: {settings.runs} FP16 images of {settings.steps} steps")
    try:
        phases["gather"] = _timed(run, gather_phase, scaled(progress, 0.0, 0.4), sd_folder=str(sd_folder),
                                  controlnet_folder=str(controlnet_folder), samples_dir=str(samples_dir),
                                  settings=settings, lcm_folder=str(lcm_folder) if lcm_folder else None,
                                  taesd_folder=str(taesd_folder) if taesd_folder else None, ov_config=ov_config)
        for index, (name, xml, label) in enumerate((("controlnet", Path(controlnet_folder) / CONTROLNET_IR, "ControlNet"),
                                                    ("unet", Path(lcm_folder or sd_folder) / UNET_IR, "UNet"))):
            progress(0.4 + 0.3 * index, f"Quantizing the {label} to INT8 ({phases['gather']['kept'][name]} "
                                        "calibration samples; statistics in several passes, to save memory)")
            phases[name] = _timed(run, quantize_phase, scaled(progress, 0.4 + 0.3 * index, 0.7 + 0.3 * index),
                                  xml=str(xml), samples_dir=str(samples_dir), name=name,
                                  out_xml=str(Path(out_dir) / f"{name}.xml"), overflow_fix=overflow_fix,
                                  ignored_types=list(ignored_types), stat_chunks=stat_chunks)
    finally:
        shutil.rmtree(samples_dir, ignore_errors=True)
    progress(1.0, "INT8 models ready")
    used = phases["gather"]["kept"]
    return {
        "precision": "int8",
        "mode": mode,
        "method": sd_int8_method(ignored_types),
        "nncf": {"function": "nncf.quantize", "model_type": "TRANSFORMER", "disable_bias_correction": True,
                 "ignored_types": list(ignored_types), "overflow_fix": overflow_fix,
                 "subset_size": settings.subset_size},
        "calibration_samples": used["unet"],
        "calibration_samples_per_model": used,
        "calibration": f"{settings.describe()}; {data.sources['prompts']}; {data.sources['poses']}",
        "calibration_sources": data.sources,
        "calibration_key": data.key,
        "int8_ops": {name: phases[name]["int8_ops"] for name in ("controlnet", "unet")},
        "timings": {f"{name}_s": phase["seconds"] for name, phase in phases.items()},
        "low_memory": {"child_processes": children,
                       "statistics_chunks": {name: phases[name]["statistics_chunks"] for name in ("controlnet", "unet")},
                       "peak_rss_mb": {name: phase["peak_rss_mb"] for name, phase in phases.items()},
                       "calibration_on_disk_mb": phases["gather"]["disk_mb"]},
        "fp16_models": {"sd": str(sd_folder), "controlnet": str(controlnet_folder)},
        **({"lcm_unet": str(lcm_folder)} if lcm_folder is not None else {}),
        "stays_fp16": ["text_encoder", "vae_decoder"],
    }


def _timed(run: Callable, target: Callable, progress: ProgressFn, **kwargs) -> dict:
    """``run(target, progress, **kwargs)`` (in a child process, or here) with its time in ``"seconds"``."""
    started = time.perf_counter()
    result = run(target, progress, **kwargs)
    return {**result, "seconds": round(time.perf_counter() - started, 1)}


def ensure_sd_int8(
    models: "ModelsLayout | Path | str",
    sd_folder: Path,
    controlnet_folder: Path,
    *,
    calibration: Optional[SDCalibration] = None,
    ov_config: Optional[dict] = None,
    progress: ProgressFn = no_progress,
    quantizing: Callable[[], ContextManager] = nullcontext,
    lcm_folder: Optional[Path] = None,
    taesd_folder: Optional[Path] = None,
) -> Path:
    """Return the folder with the INT8 ``unet.xml`` and ``controlnet.xml`` for FP16 IR folders
    ``sd_folder`` + ``controlnet_folder`` (made by :func:`ensure_sd15` / :func:`ensure_controlnet`; with
    ``lcm_folder``, Fast mode's fused UNet instead of SD1.5's), quantizing once (see :func:`quantize_sd_int8`).

    The UNet and the ControlNet are quantized as a pair because the calibration runs them together
    (the UNet's inputs include the ControlNet's residuals). ``calibration`` is a :class:`SDCalibration`
    (default: from the environment), used with the mode's recipe. The marker file records the method,
    the number of calibration samples and where the prompts and poses came from. ``quantizing()`` is a
    context the quantization runs in, entered only when it has to run (e.g. to free memory for it and
    keep other work from taking that memory back meanwhile); inside it the memory is checked first
    (:func:`int8_memory_needed`): too little refuses INT8 with a message
    (:class:`~pipelines.core.memory.NotEnoughMemory`).
    """
    settings = (calibration or SDCalibration.from_env()).for_mode(FAST if lcm_folder is not None else QUALITY)
    data = settings.load()  # cheap (prompts + a few skeleton images); user-data errors surface here
    sd_folder, controlnet_folder = Path(sd_folder), Path(controlnet_folder)
    sd_summary = json.loads((sd_folder / PIPELINE_JSON).read_text())
    cn_summary = json.loads((controlnet_folder / PIPELINE_JSON).read_text())
    layout = ModelsLayout.of(models)
    folder = layout.sd_int8(sd_folder, controlnet_folder, data.key, lcm_folder=lcm_folder)

    def build(tmp: Path) -> dict:
        with quantizing():
            needed = int8_memory_needed(Path(lcm_folder or sd_folder) / UNET_IR, settings)
            memory = check_memory(needed, "making the INT8 image models",
                                  "Precision FP16 works without them (it needs no quantization).")
            facts = quantize_sd_int8(sd_folder, controlnet_folder, tmp, settings, data=data, ov_config=ov_config,
                                     progress=progress, lcm_folder=lcm_folder, taesd_folder=taesd_folder)
        facts["low_memory"].update(needed_gb=round(needed / GB, 2), available_gb=(
            round(memory["available"] / GB, 1) if memory.get("available") else None))
        (tmp / PIPELINE_JSON).write_text(json.dumps({
            "kind": "sd15_int8", "unet": UNET_IR, "controlnet": CONTROLNET_IR, "mode": facts["mode"],
            "sd_folder": sd_folder.name, "controlnet_folder": controlnet_folder.name,
        }, indent=2))
        return facts

    return layout.cache.get_or_build(
        folder, build,
        description={"kind": "sd15_int8", "precision": "int8", "model": sd_summary.get("model"),
                     "controlnet": cn_summary.get("model")},
    )
