"""The pose-guided denoising pipeline: Stable Diffusion 1.5 + ControlNet OpenPose over OpenVINO IR.

The call reads as numbered steps (as diffusers' ``StableDiffusionControlNetPipeline`` does): check
the inputs, encode the prompt, prepare the control image, then for each image its own seeded
latents, the denoising loop (:mod:`pipelines.image.denoise`: ControlNet residuals feed the UNet at
every step, live previews on the way) and the decode (the VAE, or the tiny TAESD decoder).

One class serves both modes. Quality: the SD1.5 UNet, a chosen scheduler, the VAE. Fast: the same
text encoder, ControlNet and VAE with the LCM-LoRA fused into the UNet (its own IR folder, see
:func:`pipelines.image.sources.ensure_lcm_unet`), the LCM scheduler, and TAESD for the final image.
The components are compiled lazily (:mod:`pipelines.image.components`).

Determinism: image ``i`` of a request uses its own ``torch.Generator().manual_seed(seed + i)``
(never the global RNG) for its initial noise and for ancestral / LCM samplers' noise, so a given
seed and settings always give the same picture, whatever else runs, and image ``i`` of a batch is
the picture a single-image request with seed ``seed + i`` makes.
"""
from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import numpy as np
from PIL import Image

from pipelines.core.progress import ProgressFn, no_progress
from pipelines.image.components import Components, ModelSource
from pipelines.image.convert import (CONTROLNET_IR, PIPELINE_JSON, TAESD_DECODER_IR, TEXT_ENCODER_IR, UNET_IR,
                                     VAE_DECODER_IR)
from pipelines.image.denoise import Denoising, InputObserver, PreviewFn
from pipelines.image.request import (FAST, QUALITY, CancelCheck, GenerationResult, ImageOptions, PoseImageInput,
                                     check_inputs, parameters_text, resolve_seeds)

if TYPE_CHECKING:  # pragma: no cover
    import openvino as ov


class OVControlNetPipeline:
    """SD1.5 + ControlNet denoising over OpenVINO models, compiled lazily per device.

    Components are passed in as ``ov.Model`` objects or IR paths (``taesd_decoder`` is optional: live
    previews and TAESD final images need it) and compiled on first use; :meth:`to` switches device
    and drops compiled models, :meth:`release` drops them to free memory (they are compiled again
    on the next call). One lock guards each pipeline, so concurrent requests run one after another
    and never share scheduler, generator or infer-request state.

    ``mode`` is what the UNet was made for: ``"quality"`` (SD1.5 as trained) or ``"fast"`` (the
    LCM-LoRA fused in); a request of the other mode is refused. With ``static_shapes`` (default)
    the models are compiled for each request's batch and size (see :mod:`~pipelines.image.components`).
    """

    COMPONENTS = ("text_encoder", "controlnet", "unet", "vae_decoder", "taesd_decoder")

    def __init__(self, *, text_encoder: ModelSource, unet: ModelSource, controlnet: ModelSource,
                 vae_decoder: ModelSource, tokenizer: Any, scheduler_config: dict, vae_scale_factor: int = 8,
                 vae_scaling_factor: float = 0.18215, unet_in_channels: int = 4, device: str = "CPU",
                 ov_config: Optional[dict] = None, core: Optional["ov.Core"] = None, info: Optional[dict] = None,
                 static_shapes: bool = True, taesd_decoder: Optional[ModelSource] = None,
                 taesd_scaling_factor: float = 1.0, mode: str = QUALITY):
        self._lock = threading.RLock()
        self.info = {"mode": mode, **dict(info or {})}
        self.mode = self.info["mode"]
        self.components = Components(
            {"text_encoder": text_encoder, "controlnet": controlnet, "unet": unet, "vae_decoder": vae_decoder,
             "taesd_decoder": taesd_decoder}, device=device, ov_config=ov_config, core=core, lock=self._lock,
            int8=self.info.get("precision") == "int8", static_shapes=static_shapes)
        self._tokenizer = tokenizer  # a CLIPTokenizer or the folder to load it from
        self.scheduler_config = dict(scheduler_config)
        self.vae_scale_factor = int(vae_scale_factor)
        self.vae_scaling_factor = float(vae_scaling_factor)
        self.taesd_scaling_factor = float(taesd_scaling_factor)
        self.unet_in_channels = int(unet_in_channels)
        self._processors = None
        self.observer: Optional[InputObserver] = None

    @classmethod
    def from_folders(cls, sd_folder: Path, controlnet_folder: Path, *, device: str = "CPU",
                     ov_config: Optional[dict] = None, core: Optional["ov.Core"] = None, info: Optional[dict] = None,
                     static_shapes: bool = True, int8_folder: Optional[Path] = None,
                     lcm_folder: Optional[Path] = None, taesd_folder: Optional[Path] = None) -> "OVControlNetPipeline":
        """Build from IR folders made by :mod:`pipelines.image.sources` (``ensure_sd15`` / ``ensure_controlnet``).

        ``lcm_folder`` (``ensure_lcm_unet``) makes it a Fast-mode pipeline: its UNet has the LCM-LoRA
        fused in. With ``int8_folder`` (:func:`pipelines.image.int8.ensure_sd_int8`, made from these
        folders) the UNet and ControlNet are its INT8 models; the text encoder and VAE stay FP16.
        ``taesd_folder`` (``ensure_taesd``) adds the TAESD decoder: live previews, Fast's final image.
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
        unet_folder = Path(lcm_folder) if lcm_folder is not None else sd_folder
        taesd = json.loads((Path(taesd_folder) / PIPELINE_JSON).read_text()) if taesd_folder else {}
        return cls(
            text_encoder=sd_folder / TEXT_ENCODER_IR,
            unet=(denoisers or unet_folder) / UNET_IR,
            controlnet=(denoisers or controlnet_folder) / CONTROLNET_IR,
            vae_decoder=sd_folder / VAE_DECODER_IR,
            taesd_decoder=Path(taesd_folder) / TAESD_DECODER_IR if taesd_folder else None,
            taesd_scaling_factor=taesd.get("scaling_factor", 1.0),
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
            mode=FAST if lcm_folder is not None else QUALITY,
        )

    # ---- lazy loading -------------------------------------------------------------------

    @property
    def tokenizer(self):
        with self._lock:
            if isinstance(self._tokenizer, (str, Path)):
                from transformers import CLIPTokenizer

                self._tokenizer = CLIPTokenizer.from_pretrained(str(self._tokenizer))
            return self._tokenizer

    @property
    def device(self) -> str:
        return self.components.device

    @property
    def can_preview(self) -> bool:
        """Whether it has the TAESD decoder that live previews use."""
        return self.components.has("taesd_decoder")

    def compiled(self, name: str, shapes: Optional[dict] = None):
        """The compiled model ``name`` (see :meth:`Components.compiled`)."""
        return self.components.compiled(name, shapes)

    def shapes(self, width: int, height: int, do_cfg: bool, text_shape: tuple[int, int]) -> dict[str, dict]:
        """Each component's input shapes for a request of this size (batch 2 with guidance)."""
        batch = 2 if do_cfg else 1
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        length, hidden = text_shape
        latent = [batch, self.unet_in_channels, h, w]
        unet = {"sample": latent, "timestep": [], "encoder_hidden_states": [batch, length, hidden]}
        decoder = {"latent_sample": [1, self.unet_in_channels, h, w]}
        return {"controlnet": {**unet, "controlnet_cond": [batch, 3, height, width], "conditioning_scale": []},
                "unet": unet, "vae_decoder": decoder, "taesd_decoder": decoder}

    def compile(self, width: int = 512, height: int = 512, guidance: bool = True) -> "OVControlNetPipeline":
        """Load the tokenizer and compile every component now (otherwise the first request does).

        With static shapes the models are compiled for ``width`` x ``height`` (and a CFG batch of 2
        when ``guidance``), so a first request of that size starts denoising at once. The final
        image's decoder of the pipeline's mode (and TAESD, which previews use) is compiled too.
        """
        with self._lock:
            self.tokenizer  # noqa: B018 - loads it (and imports transformers) now, not on the first request
            self._image_processors()
            text_encoder = self.compiled("text_encoder")
            decoders = [name for name in ("vae_decoder" if self.mode == QUALITY else None, "taesd_decoder")
                        if name and self.components.has(name)]
            if self.components.static_shapes:
                hidden = int(text_encoder.outputs[0].get_partial_shape()[2].get_length())
                shapes = self.shapes(width, height, guidance, (self.tokenizer.model_max_length, hidden))
                self.components.denoisers(shapes)
                for name in decoders:
                    self.compiled(name, shapes[name])
            else:
                for name in ("controlnet", "unet", *decoders):
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
            self.observer = observer
            try:
                yield self
            finally:
                self.observer = None

    @property
    def is_compiled(self) -> bool:
        return self.components.is_compiled

    def to(self, device: str) -> "OVControlNetPipeline":
        """Run on ``device`` from now on (compiled models are dropped and rebuilt lazily)."""
        self.components.to(device)
        return self

    def release(self) -> None:
        """Drop the compiled models (frees their memory); the next call compiles again."""
        self.components.release()

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
        """The VAE's picture of ``latents``."""
        import torch

        _, image_processor = self._image_processors()
        request = self.compiled("vae_decoder", shapes).create_infer_request()
        scaled = np.ascontiguousarray((latents / self.vae_scaling_factor).numpy(), dtype=np.float32)
        image = torch.from_numpy(np.array(request.infer({"latent_sample": scaled})[0], copy=True))
        return image_processor.postprocess(image, output_type="pil")[0]

    def decode_taesd(self, latents, shapes: Optional[dict] = None) -> Image.Image:
        """TAESD's picture of ``latents``: its IR ends in the 0-255 rounding diffusers' postprocessing
        does, so its output is the picture's pixels."""
        if not self.can_preview:
            raise ValueError("This pipeline has no TAESD decoder; decode with the VAE instead.")
        request = self.compiled("taesd_decoder", shapes).create_infer_request()
        scaled = np.ascontiguousarray((latents / self.taesd_scaling_factor).numpy(), dtype=np.float32)
        return Image.fromarray(np.array(request.infer({"latent_sample": scaled})[0][0], dtype=np.uint8, copy=True))

    def __call__(self, options: ImageOptions, pose_image: PoseImageInput, progress: ProgressFn = no_progress,
                 cancel: CancelCheck = None, preview: Optional[PreviewFn] = None) -> GenerationResult:
        """Generate ``options.num_images`` images guided by the pose (progress: one update per step;
        ``preview``: live previews, when the pipeline has TAESD)."""
        import torch

        started = time.perf_counter()
        # 0. Validate everything before heavy work.
        pose = check_inputs(options, pose_image)
        self._check_mode(options)
        seeds = resolve_seeds(options)
        do_cfg = options.guidance_scale > 1.0
        with self._lock, torch.inference_mode():
            # 1. Encode the prompt (+ negative prompt; CFG batch of 2 when guidance > 1).
            prompt_embeds, warnings = self.encode_prompt(options.prompt, options.negative_prompt, do_cfg)
            # 2. Prepare the control image and the models compiled for this size.
            run = Denoising(self, options, self.prepare_control_image(pose, options.width, options.height, do_cfg),
                            prompt_embeds, progress, cancel, images=len(seeds), preview=preview)
            timings = {"prepare": time.perf_counter() - started, "denoise": 0.0, "decode": 0.0}
            images = []
            for index, seed in enumerate(seeds):
                # 3. Prepare timesteps and the initial latents (per-image generator); 4. denoise.
                denoise_started = time.perf_counter()
                latents = run.denoise(seed, index)
                # 5. Decode the latents (VAE, or TAESD) into a PIL image.
                decode_started = time.perf_counter()
                timings["denoise"] += decode_started - denoise_started
                images.append(self._decode_final(options, latents, run.shapes))
                timings["decode"] += time.perf_counter() - decode_started
        timings["denoise"] -= run.preview_seconds  # a step's time is the step's, previews are reported apart
        timings.update(previews=run.preview_seconds, seconds_per_step=timings["denoise"] / max(run.done, 1))
        extra = {**self.info, "device": self.device, "timings": {k: round(v, 3) for k, v in timings.items()}}
        for image, seed in zip(images, seeds):
            image.info["parameters"] = parameters_text(options, seed, extra)
        return GenerationResult(images=tuple(images), seeds=seeds, options=options,
                                elapsed=time.perf_counter() - started, extra=extra, warnings=tuple(warnings))

    def _check_mode(self, options: ImageOptions) -> None:
        if options.mode != self.mode:
            raise ValueError(f"This pipeline's UNet is made for {self.mode} mode, not {options.mode} mode: "
                             f"load the {options.mode} pipeline (ImageService picks it from the mode).")
        if options.final_decoder == "taesd" and not self.can_preview:
            raise ValueError("The TAESD decoder is not loaded in this pipeline; decode with the VAE (decoder='vae').")

    def _decode_final(self, options: ImageOptions, latents, shapes: dict) -> Image.Image:
        if options.final_decoder == "taesd":
            return self.decode_taesd(latents, shapes["taesd_decoder"])
        return self.decode(latents, shapes["vae_decoder"])
