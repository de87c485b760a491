"""Pose-guided images for the app: models converted once, pipelines loaded once, generations in slots.

The request's path: :meth:`ImageService.generate` checks the options and the pose image
(:mod:`pipelines.image.request`), gets the models its mode needs ready on disk outside the work slots
(:mod:`pipelines.image.sources`: converted once; Fast mode's UNet with the LCM-LoRA fused in, and the
TAESD decoder of previews; for INT8 :mod:`pipelines.image.int8`: quantized once), takes a work slot,
gets the pipeline from the shared :class:`~pipelines.core.pool.ModelPool` and runs it
(:class:`~pipelines.image.pipeline.OVControlNetPipeline`), handing live previews to the caller.
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
from pipelines.core.progress import ProgressFn, int8_first_use_note, no_progress, scaled
from pipelines.core.types import PRECISIONS, check_precision
from pipelines.image.convert import (CONTROLNET_IR, DEFAULT_CONTROLNET, DEFAULT_LCM_LORA, DEFAULT_SD_MODEL,
                                     DEFAULT_TAESD, UNET_IR, taesd_how)
from pipelines.image.denoise import PreviewFn
from pipelines.image.int8 import SDCalibration, ensure_sd_int8
from pipelines.image.lora import DEFAULT_LORA_SCALE
from pipelines.image.pipeline import OVControlNetPipeline
from pipelines.image.request import (DECODERS, FAST, MAX_SEED, MODE_LIMITS, QUALITY, CancelCheck,
                                     GenerationCancelled, GenerationResult, ImageOptions, PoseImageInput,
                                     check_inputs, check_mode, is_cancelled)
from pipelines.image.sources import (Needed, ensure_all, ensure_controlnet, ensure_lcm_unet, ensure_sd15,
                                     ensure_taesd, resolve_lcm_lora)

KIND = "image"  # the model pool's kind and work slots


class ImageService:
    """Converts (once, cached on disk) and loads (once, lazily) pose-guided SD pipelines.

    Pipelines live in the model pool under (SD model, ControlNet, device, precision, mode):
    concurrent first requests convert, quantize and load once, and the conversion or quantization of
    one pair never holds up users of other models. At most ``max_loaded`` pipelines stay loaded;
    loading another releases the least recently used one (its compiled models are dropped at once).

    ``generate`` converts (and quantizes) outside the work slots (``workers``: generations at once)
    and takes a slot only to load and run, so one visitor's new model does not hold up images from
    ready ones. Quantizing takes a slot too: its FP16 pipeline and NNCF need the memory a running
    generation would hold.

    Modes (the options' ``mode``): ``"quality"`` runs SD1.5 as trained; ``"fast"`` runs the UNet with
    the LCM-LoRA ``lcm_lora`` fused in at ``lora_scale``, and decodes with TAESD (``fast_decoder``:
    "taesd", or "vae" for the full VAE). TAESD (``taesd``) also makes the live previews of both modes;
    without it Quality mode runs without previews.

    ``precision="int8"`` runs the UNet and ControlNet quantized by NNCF post-training quantization,
    made once per FP16 pair (and mode) from calibration data gathered by running the FP16 pipeline
    (``calibration``: a :class:`~pipelines.image.calibration.SDCalibration`, default from the
    ``VOICE_STUDIO_SD_CALIBRATION_*`` environment variables).
    """

    def __init__(self, models: "ModelsLayout | Path | str", *, sd_model: str = DEFAULT_SD_MODEL,
                 controlnet_model: str = DEFAULT_CONTROLNET, device: str = "CPU", ov_config: Optional[dict] = None,
                 local_files_only: bool = False, max_loaded: int = 1, calibration: Optional[SDCalibration] = None,
                 workers: int = 1, pool: Optional[ModelPool] = None, lcm_lora: str = DEFAULT_LCM_LORA,
                 taesd: str = DEFAULT_TAESD, lora_scale: float = DEFAULT_LORA_SCALE, fast_decoder: str = "taesd"):
        self.layout = ModelsLayout.of(models)
        self.cache_root = self.layout.root
        self.sd_model, self.controlnet_model, self.device = sd_model, controlnet_model, device
        self.lcm_lora, self.taesd, self.lora_scale = lcm_lora, taesd, float(lora_scale)
        if fast_decoder not in DECODERS:
            raise ValueError(f"Fast mode's decoder {fast_decoder!r} is not one of {', '.join(DECODERS)}.")
        self.fast_decoder = fast_decoder
        self.ov_config = dict(ov_config or {})
        self.local_files_only = local_files_only
        self.pool = pool or ModelPool({KIND: max_loaded}, {KIND: workers}, {KIND: "image generation"})
        self.slots = self.pool.slots(KIND)
        self.calibration = calibration if calibration is not None else SDCalibration.from_env()
        self._prepared: dict[tuple, dict[str, Path]] = {}  # (sd, controlnet, precision, mode) -> model_folders()
        self._guard = threading.Lock()
        self._core = None
        self._previews_note_given = False

    @property
    def max_loaded(self) -> int:
        return self.pool.limits.get(KIND, 1)

    def _key(self, sd_ref, controlnet_ref, device, precision="fp16", mode=QUALITY) -> tuple:
        return (KIND, sd_ref or self.sd_model, controlnet_ref or self.controlnet_model,
                (device or self.device).upper(), check_precision(precision), check_mode(mode))

    def loaded(self) -> list[tuple]:
        """``(sd_model, controlnet_model, device)`` of each loaded pipeline, with ``"int8"`` appended for
        INT8 ones and ``"fast"`` for Fast-mode ones."""
        return [key[1:4] + tuple(value for value, plain in ((key[4], "fp16"), (key[5], QUALITY)) if value != plain)
                for key in self.pool.keys(KIND)]

    def _needed(self, sd: str, cn: str, mode: str, progress: ProgressFn) -> list[Needed]:
        """The models a mode needs, in order (Fast mode's UNet is made from the SD1.5 folder)."""
        local = self.local_files_only
        parts = [scaled(progress, i / 4, (i + 1) / 4) for i in range(4)]

        def lcm(found: dict) -> Path:
            if found.get("sd") is None:  # the SD1.5 is missing: only say whether the LoRA is there too
                return resolve_lcm_lora(self.lcm_lora, local_files_only=local).path
            return ensure_lcm_unet(self.layout, sd, found["sd"], self.lcm_lora, scale=self.lora_scale,
                                   local_files_only=local, progress=parts[2])

        needed = [Needed("sd", lambda found: ensure_sd15(self.layout, sd, local_files_only=local, progress=parts[0])),
                  Needed("controlnet", lambda found: ensure_controlnet(self.layout, cn, local_files_only=local,
                                                                       progress=parts[1]))]
        if mode == FAST:
            needed.append(Needed("lcm", lcm))
        # TAESD: Fast mode's decoder; in Quality mode only the live previews need it
        needed.append(Needed("taesd", lambda found: ensure_taesd(self.layout, self.taesd, local_files_only=local,
                                                                 progress=parts[3]), optional=mode == QUALITY))
        return needed

    def model_folders(self, sd_ref: Optional[str] = None, controlnet_ref: Optional[str] = None,
                      precision: str = "fp16", progress: ProgressFn = no_progress,
                      mode: str = QUALITY) -> dict[str, Optional[Path]]:
        """Convert (and for INT8 quantize) the models of this mode once; their cached folders, nothing loaded.

        When models are missing, one error names each of them and how to provide it. Quantizing holds
        a work slot, and releases the pipeline it replaces when ``max_loaded`` is reached, so that no
        generation runs beside it. Returns ``{"sd", "controlnet"}`` (the FP16 IR folders), ``"taesd"``
        (None when Quality mode has to do without), ``"lcm"`` for Fast mode (its UNet), ``"int8"`` for
        INT8, and the ``"unet_xml"`` / ``"controlnet_xml"`` files the pipeline will run.
        """
        precision, mode = check_precision(precision), check_mode(mode)
        sd, cn = sd_ref or self.sd_model, controlnet_ref or self.controlnet_model
        share = 0.8 if precision == "fp16" else 0.3
        found = ensure_all(self._needed(sd, cn, mode, scaled(progress, 0.0, share)),
                           what=f"{MODE_LIMITS[mode].label} mode")
        folders = {**found, "unet_xml": (found.get("lcm") or found["sd"]) / UNET_IR,
                   "controlnet_xml": found["controlnet"] / CONTROLNET_IR}
        if precision == "int8":
            int8 = ensure_sd_int8(
                self.layout, found["sd"], found["controlnet"], calibration=self.calibration, ov_config=self.ov_config,
                progress=lambda f, m: progress(share + (0.95 - share) * f, m),
                quantizing=lambda: self._quantizing(progress, share), lcm_folder=found.get("lcm"),
                taesd_folder=found.get("taesd"))
            folders.update(int8=int8, unet_xml=int8 / UNET_IR, controlnet_xml=int8 / CONTROLNET_IR)
        return folders

    def prepare(self, sd_ref: Optional[str] = None, controlnet_ref: Optional[str] = None, device: Optional[str] = None,
                precision: str = "fp16", progress: ProgressFn = no_progress, mode: str = QUALITY) -> None:
        """Download, convert and quantize what :meth:`get_pipeline` will need, unless it is loaded:
        work done outside the work slots (quantizing takes one, see :meth:`model_folders`). Says that
        the first INT8 use quantizes (minutes) when the INT8 pipeline is not loaded yet."""
        key = self._key(sd_ref, controlnet_ref, device, precision, mode)
        if key in self.pool:
            return
        _kind, sd, cn, _device, precision, mode = key
        if precision == "int8":
            progress(0.0, int8_first_use_note("image models", plural=True))
        folders = self.model_folders(sd, cn, precision, progress=progress, mode=mode)
        with self._guard:  # get_pipeline takes these as they are: no second hub check inside the slot
            self._prepared[(sd, cn, precision, mode)] = folders

    def get_pipeline(self, sd_ref: Optional[str] = None, controlnet_ref: Optional[str] = None,
                     device: Optional[str] = None, progress: ProgressFn = no_progress,
                     precision: str = "fp16", mode: str = QUALITY) -> OVControlNetPipeline:
        """The pipeline for these models on ``device`` at ``precision`` ("fp16" or "int8") in ``mode``
        ("quality" or "fast"), converting, quantizing and loading them once."""
        key = self._key(sd_ref, controlnet_ref, device, precision, mode)
        _kind, sd, cn, dev, precision, mode = key

        def load() -> OVControlNetPipeline:
            with self._guard:
                folders = self._prepared.get((sd, cn, precision, mode))
            if folders is None or not all(Path(folders[k]).is_file() for k in ("unet_xml", "controlnet_xml")):
                folders = self.model_folders(sd, cn, precision, progress=progress, mode=mode)
            fast = {"lcm_lora": self.lcm_lora, "lora_scale": self.lora_scale} if mode == FAST else {}
            pipeline = OVControlNetPipeline.from_folders(
                folders["sd"], folders["controlnet"], device=dev, ov_config=self.ov_config, core=self._ov_core(),
                info={"sd_model": sd, "controlnet_model": cn, "precision": precision, **fast,
                      **({"taesd": self.taesd} if folders.get("taesd") else {})},
                int8_folder=folders.get("int8"), lcm_folder=folders.get("lcm"), taesd_folder=folders.get("taesd"))
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

    def _with_decoder(self, options: ImageOptions) -> ImageOptions:
        """Fast mode's final decoder as this service is set up (TAESD, or the full VAE)."""
        if options.mode == FAST and options.decoder is None and self.fast_decoder != MODE_LIMITS[FAST].decoder:
            return replace(options, decoder=self.fast_decoder)
        return options

    def generate(self, options: ImageOptions, pose_image: PoseImageInput, *, sd_ref: Optional[str] = None,
                 controlnet_ref: Optional[str] = None, device: Optional[str] = None,
                 progress: ProgressFn = no_progress, cancel: CancelCheck = None,
                 load_progress: ProgressFn = no_progress, precision: str = "fp16",
                 preview: Optional[PreviewFn] = None) -> GenerationResult:
        """Check inputs, get (convert/quantize/load once) the pipeline of the options' mode, and generate
        (``progress``: the denoising steps; ``load_progress``: getting the models ready; ``preview``:
        live previews, when TAESD is there).

        The result's ``extra["precision"]`` / ``["mode"]`` (and each PNG's metadata) say what made it.
        """
        precision, options = check_precision(precision), self._with_decoder(options)
        pose = check_inputs(options, pose_image)  # fail fast, before any conversion or loading

        def stop_if_cancelled() -> None:
            if is_cancelled(cancel):
                raise GenerationCancelled("Image generation was cancelled before it started.")

        self.prepare(sd_ref, controlnet_ref, device, precision, load_progress, mode=options.mode)
        stop_if_cancelled()
        with self.slots.turn(load_progress, 0.95, while_waiting=stop_if_cancelled):
            stop_if_cancelled()
            pipeline = self.get_pipeline(sd_ref, controlnet_ref, device, progress=load_progress, precision=precision,
                                         mode=options.mode)
            result = pipeline(options, pose, progress=progress, cancel=cancel, preview=preview)
        return self._note_previews(result, pipeline, preview)

    def _note_previews(self, result: GenerationResult, pipeline: OVControlNetPipeline,
                       preview: Optional[PreviewFn]) -> GenerationResult:
        """Say once that live previews are off when TAESD is missing (Quality mode works without it)."""
        if preview is None or pipeline.can_preview or self._previews_note_given:
            return result
        self._previews_note_given = True
        note = f"Live previews are off: they need the TAESD decoder '{self.taesd}'. {taesd_how(self.taesd)}"
        return replace(result, warnings=result.warnings + (note,))

    def compare(self, options: ImageOptions, pose_image: PoseImageInput, *, sd_ref: Optional[str] = None,
                controlnet_ref: Optional[str] = None, device: Optional[str] = None, cancel: CancelCheck = None,
                progress: ProgressFn = no_progress) -> list[PrecisionRun]:
        """The same images from the FP16 and the INT8 models of the options' mode (one seed for both: seed
        -1 draws one), each generation timed; each pipeline is loaded and compiled for this size before
        its timed run."""
        options = self._with_decoder(options)
        pose = check_inputs(options, pose_image)  # fail fast, before any model is loaded
        if options.seed == -1:
            options = replace(options, seed=random.SystemRandom().randrange(0, MAX_SEED + 1))
        refs = dict(sd_ref=sd_ref, controlnet_ref=controlnet_ref, device=device)

        def load(precision: str, part: ProgressFn) -> None:
            pipeline = self.get_pipeline(**refs, progress=part, precision=precision, mode=options.mode)
            part(0.0, f"compile the image models for {options.width}x{options.height}")  # not in the timed run
            pipeline.compile(options.width, options.height, guidance=options.guidance_scale > 1.0)

        def run(precision: str, part: ProgressFn) -> GenerationResult:
            return self.generate(options, pose, **refs, cancel=cancel, load_progress=part, precision=precision,
                                 progress=part)

        return compare_precisions(load, run, progress, PRECISIONS, slots=self.slots,
                                  prepare=lambda p, part: self.prepare(sd_ref, controlnet_ref, device, p, part,
                                                                       mode=options.mode))

    def release(self) -> None:
        """Drop every loaded pipeline and its compiled models."""
        self.pool.release(KIND)
