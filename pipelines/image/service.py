"""Pose-guided images for the app: models converted once, pipelines loaded once, generations in slots.

The request's path: :meth:`ImageService.generate` checks the options and the pose image
(:mod:`pipelines.image.request`), gets the models ready on disk outside the work slots
(:mod:`pipelines.image.sources`: converted once; for INT8 :mod:`pipelines.image.int8`: quantized
once), takes a work slot, gets the pipeline from the shared :class:`~pipelines.core.pool.ModelPool`
and runs it (:class:`~pipelines.image.pipeline.OVControlNetPipeline`).
"""
from __future__ import annotations

import random
import threading
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional

from pipelines.core.compare import PrecisionRun, compare_precisions
from pipelines.core.layout import ModelsLayout
from pipelines.core.pool import ModelPool
from pipelines.core.progress import ProgressFn, int8_first_use_note, no_progress
from pipelines.core.types import PRECISIONS, check_precision
from pipelines.image.convert import CONTROLNET_IR, DEFAULT_CONTROLNET, DEFAULT_SD_MODEL, UNET_IR
from pipelines.image.int8 import SDCalibration, ensure_sd_int8
from pipelines.image.pipeline import OVControlNetPipeline
from pipelines.image.request import (MAX_SEED, CancelCheck, GenerationCancelled, GenerationResult, ImageOptions,
                                     PoseImageInput, check_inputs, is_cancelled)
from pipelines.image.sources import ensure_controlnet, ensure_sd15

KIND = "image"  # the model pool's kind and work slots


class ImageService:
    """Converts (once, cached on disk) and loads (once, lazily) pose-guided SD pipelines.

    Pipelines live in the model pool under (SD model, ControlNet, device, precision): concurrent
    first requests convert, quantize and load once, and the conversion or quantization of one pair
    never holds up users of other models. At most ``max_loaded`` pipelines stay loaded; loading
    another releases the least recently used one (its compiled models are dropped at once).

    ``generate`` converts (and quantizes) outside the work slots (``workers``: generations at once)
    and takes a slot only to load and run, so one visitor's new model does not hold up images from
    ready ones. Quantizing takes a slot too: its FP16 pipeline and NNCF need the memory a running
    generation would hold.

    ``precision="int8"`` runs the UNet and ControlNet quantized by NNCF post-training quantization,
    made once per FP16 pair from calibration data gathered by running the FP16 pipeline
    (``calibration``: a :class:`~pipelines.image.int8.SDCalibration`, default from the
    ``VOICE_STUDIO_SD_CALIBRATION_*`` environment variables).
    """

    def __init__(self, models: "ModelsLayout | Path | str", *, sd_model: str = DEFAULT_SD_MODEL,
                 controlnet_model: str = DEFAULT_CONTROLNET, device: str = "CPU", ov_config: Optional[dict] = None,
                 local_files_only: bool = False, max_loaded: int = 1, calibration: Optional[SDCalibration] = None,
                 workers: int = 1, pool: Optional[ModelPool] = None):
        self.layout = ModelsLayout.of(models)
        self.cache_root = self.layout.root
        self.sd_model, self.controlnet_model, self.device = sd_model, controlnet_model, device
        self.ov_config = dict(ov_config or {})
        self.local_files_only = local_files_only
        self.pool = pool or ModelPool({KIND: max_loaded}, {KIND: workers}, {KIND: "image generation"})
        self.slots = self.pool.slots(KIND)
        self.calibration = calibration if calibration is not None else SDCalibration.from_env()
        self._prepared: dict[tuple, dict[str, Path]] = {}  # (sd, controlnet, precision) -> model_folders()
        self._guard = threading.Lock()
        self._core = None

    @property
    def max_loaded(self) -> int:
        return self.pool.limits.get(KIND, 1)

    def _key(self, sd_ref, controlnet_ref, device, precision="fp16") -> tuple:
        return (KIND, sd_ref or self.sd_model, controlnet_ref or self.controlnet_model,
                (device or self.device).upper(), check_precision(precision))

    def loaded(self) -> list[tuple]:
        """``(sd_model, controlnet_model, device)`` of each loaded pipeline, with ``"int8"`` appended
        for INT8 ones."""
        return [key[1:4] if key[4] == "fp16" else key[1:] for key in self.pool.keys(KIND)]

    def model_folders(self, sd_ref: Optional[str] = None, controlnet_ref: Optional[str] = None,
                      precision: str = "fp16", progress: ProgressFn = no_progress) -> dict[str, Path]:
        """Convert (and for INT8 quantize) these models once; their cached folders, nothing loaded.

        Quantizing holds a work slot, and releases the pipeline it replaces when ``max_loaded`` is
        reached, so that no generation runs beside it.
        Returns ``{"sd", "controlnet"}`` (the FP16 IR folders), ``"int8"`` for INT8, and the
        ``"unet_xml"`` / ``"controlnet_xml"`` files the pipeline will run.
        """
        precision = check_precision(precision)
        sd, cn = sd_ref or self.sd_model, controlnet_ref or self.controlnet_model
        share = 0.8 if precision == "fp16" else 0.3
        sd_folder = ensure_sd15(self.layout, sd, local_files_only=self.local_files_only,
                                progress=lambda f, m: progress(share * 0.8 * f, m))
        cn_folder = ensure_controlnet(self.layout, cn, local_files_only=self.local_files_only,
                                      progress=lambda f, m: progress(share * (0.8 + 0.2 * f), m))
        folders = {"sd": sd_folder, "controlnet": cn_folder,
                   "unet_xml": sd_folder / UNET_IR, "controlnet_xml": cn_folder / CONTROLNET_IR}
        if precision == "int8":
            int8 = ensure_sd_int8(
                self.layout, sd_folder, cn_folder, calibration=self.calibration, ov_config=self.ov_config,
                progress=lambda f, m: progress(share + (0.95 - share) * f, m),
                quantizing=lambda: self._quantizing(progress, share))
            folders.update(int8=int8, unet_xml=int8 / UNET_IR, controlnet_xml=int8 / CONTROLNET_IR)
        return folders

    def prepare(self, sd_ref: Optional[str] = None, controlnet_ref: Optional[str] = None, device: Optional[str] = None,
                precision: str = "fp16", progress: ProgressFn = no_progress) -> None:
        """Download, convert and quantize what :meth:`get_pipeline` will need, unless it is loaded:
        work done outside the work slots (quantizing takes one, see :meth:`model_folders`). Says that
        the first INT8 use quantizes (minutes) when the INT8 pipeline is not loaded yet."""
        key = self._key(sd_ref, controlnet_ref, device, precision)
        if key in self.pool:
            return
        _kind, sd, cn, _device, precision = key
        if precision == "int8":
            progress(0.0, int8_first_use_note("image models", plural=True))
        folders = self.model_folders(sd, cn, precision, progress=progress)
        with self._guard:  # get_pipeline takes these as they are: no second hub check inside the slot
            self._prepared[(sd, cn, precision)] = folders

    def get_pipeline(self, sd_ref: Optional[str] = None, controlnet_ref: Optional[str] = None,
                     device: Optional[str] = None, progress: ProgressFn = no_progress,
                     precision: str = "fp16") -> OVControlNetPipeline:
        """The pipeline for these models on ``device`` at ``precision`` ("fp16" or "int8"),
        converting, quantizing and loading them once."""
        key = self._key(sd_ref, controlnet_ref, device, precision)
        _kind, sd, cn, dev, precision = key

        def load() -> OVControlNetPipeline:
            with self._guard:
                folders = self._prepared.get((sd, cn, precision))
            if folders is None or not all(Path(folders[k]).is_file() for k in ("unet_xml", "controlnet_xml")):
                folders = self.model_folders(sd, cn, precision, progress=progress)
            pipeline = OVControlNetPipeline.from_folders(
                folders["sd"], folders["controlnet"], device=dev, ov_config=self.ov_config, core=self._ov_core(),
                info={"sd_model": sd, "controlnet_model": cn, "precision": precision},
                int8_folder=folders.get("int8"))
            progress(1.0, "Image models ready")
            return pipeline

        # an evicted pipeline drops its compiled models at once (it waits for a generation running on it)
        return self.pool.get(key, load, on_evict=OVControlNetPipeline.release)

    def _ov_core(self):
        with self._guard:
            if self._core is None:
                import openvino as ov

                self._core = ov.Core()
            return self._core

    @contextmanager
    def _quantizing(self, progress: ProgressFn, fraction: float) -> Iterator[None]:
        """Quantizing runs an FP16 pipeline of its own (calibration) and NNCF: it holds a work slot and
        the pipeline it replaces is released first, so that the two never sit in memory together."""
        with self.slots.turn(progress, fraction):
            self.pool.release(KIND, keep=self.max_loaded - 1)
            yield

    def generate(self, options: ImageOptions, pose_image: PoseImageInput, *, sd_ref: Optional[str] = None,
                 controlnet_ref: Optional[str] = None, device: Optional[str] = None,
                 progress: ProgressFn = no_progress, cancel: CancelCheck = None,
                 load_progress: ProgressFn = no_progress, precision: str = "fp16") -> GenerationResult:
        """Check inputs, get (convert/quantize/load once) the pipeline, and generate (``progress``: the
        denoising steps; ``load_progress``: getting the models ready).

        The result's ``extra["precision"]`` (and each PNG's metadata) says which precision made it.
        """
        precision = check_precision(precision)
        pose = check_inputs(options, pose_image)  # fail fast, before any conversion or loading

        def stop_if_cancelled() -> None:
            if is_cancelled(cancel):
                raise GenerationCancelled("Image generation was cancelled before it started.")

        self.prepare(sd_ref, controlnet_ref, device, precision, load_progress)
        stop_if_cancelled()
        with self.slots.turn(load_progress, 0.95, while_waiting=stop_if_cancelled):
            stop_if_cancelled()
            pipeline = self.get_pipeline(sd_ref, controlnet_ref, device, progress=load_progress, precision=precision)
            return pipeline(options, pose, progress=progress, cancel=cancel)

    def compare(self, options: ImageOptions, pose_image: PoseImageInput, *, sd_ref: Optional[str] = None,
                controlnet_ref: Optional[str] = None, device: Optional[str] = None, cancel: CancelCheck = None,
                progress: ProgressFn = no_progress) -> list[PrecisionRun]:
        """The same images from the FP16 and the INT8 models (one seed for both: seed -1 draws one), each
        generation timed; each pipeline is loaded and compiled for this size before its timed run."""
        pose = check_inputs(options, pose_image)  # fail fast, before any model is loaded
        if options.seed == -1:
            options = replace(options, seed=random.SystemRandom().randrange(0, MAX_SEED + 1))
        refs = dict(sd_ref=sd_ref, controlnet_ref=controlnet_ref, device=device)

        def load(precision: str, part: ProgressFn) -> None:
            pipeline = self.get_pipeline(**refs, progress=part, precision=precision)
            part(0.0, f"compile the image models for {options.width}x{options.height}")  # not in the timed run
            pipeline.compile(options.width, options.height, guidance=options.guidance_scale > 1.0)

        def run(precision: str, part: ProgressFn) -> GenerationResult:
            return self.generate(options, pose, **refs, cancel=cancel, load_progress=part, precision=precision,
                                 progress=part)

        return compare_precisions(load, run, progress, PRECISIONS, slots=self.slots,
                                  prepare=lambda p, part: self.prepare(sd_ref, controlnet_ref, device, p, part))

    def release(self) -> None:
        """Drop every loaded pipeline and its compiled models."""
        self.pool.release(KIND)
