"""The pose-guided denoising pipeline: Stable Diffusion 1.5 + ControlNet OpenPose over OpenVINO IR.

The call reads as numbered steps (as diffusers' ``StableDiffusionControlNetPipeline`` does): check
the inputs, encode the prompt, prepare the control image, then for each image its own seeded
latents, the denoising loop (ControlNet residuals feed the UNet at every step) and the VAE decode.

Determinism: image ``i`` of a request uses its own ``torch.Generator().manual_seed(seed + i)``
(never the global RNG) for its initial noise and for ancestral samplers' noise, so a given
seed and settings always give the same picture, whatever else runs, and image ``i`` of a batch is
the picture a single-image request with seed ``seed + i`` makes.
"""
from __future__ import annotations

import inspect
import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Union

import numpy as np
from PIL import Image

from pipelines.core import cpu_int8
from pipelines.core.progress import ProgressFn, no_progress
from pipelines.image.convert import CONTROLNET_IR, PIPELINE_JSON, TEXT_ENCODER_IR, UNET_IR, VAE_DECODER_IR
from pipelines.image.request import (SCHEDULER_NAMES, SCHEDULERS, CancelCheck, GenerationCancelled,
                                     GenerationResult, ImageOptions, PoseImageInput, check_inputs, is_cancelled,
                                     parameters_text, resolve_seeds)

if TYPE_CHECKING:  # pragma: no cover
    import openvino as ov

InputObserver = Callable[[str, dict], Any]  # observer(component, inputs) before each ControlNet/UNet infer


def make_scheduler(name: str, config: dict):
    """A fresh diffusers scheduler ``name`` (one of :data:`SCHEDULER_NAMES`) from a scheduler config."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"Unknown sampler {name!r}; choose one of: {', '.join(SCHEDULER_NAMES)}.")
    class_name, kwargs = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(config, **kwargs)


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

    def __init__(self, *, text_encoder: ModelSource, unet: ModelSource, controlnet: ModelSource,
                 vae_decoder: ModelSource, tokenizer: Any, scheduler_config: dict, vae_scale_factor: int = 8,
                 vae_scaling_factor: float = 0.18215, unet_in_channels: int = 4, device: str = "CPU",
                 ov_config: Optional[dict] = None, core: Optional["ov.Core"] = None, info: Optional[dict] = None,
                 static_shapes: bool = True):
        self._sources: dict[str, ModelSource] = {"text_encoder": text_encoder, "controlnet": controlnet,
                                                 "unet": unet, "vae_decoder": vae_decoder}
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
    def from_folders(cls, sd_folder: Path, controlnet_folder: Path, *, device: str = "CPU",
                     ov_config: Optional[dict] = None, core: Optional["ov.Core"] = None, info: Optional[dict] = None,
                     static_shapes: bool = True, int8_folder: Optional[Path] = None) -> "OVControlNetPipeline":
        """Build from IR folders made by :func:`pipelines.image.sources.ensure_sd15` / ``ensure_controlnet``.

        With ``int8_folder`` (made by :func:`pipelines.image.int8.ensure_sd_int8` from these two
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
                    raise ValueError(f"OpenVINO device {self.device!r} is not available here; choose one of: "
                                     f"{', '.join(core.available_devices)}.") from error
                raise
            self._compiled[name] = (key, compiled)
            return compiled

    def _shapes(self, width: int, height: int, do_cfg: bool, text_shape: tuple[int, int]) -> dict[str, dict]:
        batch = 2 if do_cfg else 1
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        length, hidden = text_shape
        latent = [batch, self.unet_in_channels, h, w]
        unet = {"sample": latent, "timestep": [], "encoder_hidden_states": [batch, length, hidden]}
        return {"controlnet": {**unet, "controlnet_cond": [batch, 3, height, width], "conditioning_scale": []},
                "unet": unet, "vae_decoder": {"latent_sample": [1, self.unet_in_channels, h, w]}}

    def _denoisers(self, shapes: dict[str, dict]):
        """Compiled ControlNet and UNet for these shapes (UNet residual shapes = ControlNet outputs)."""
        controlnet = self.compiled("controlnet", shapes["controlnet"])
        unet_shapes = {}
        if not any(port.get_partial_shape().is_dynamic for port in controlnet.outputs):
            unet_shapes = dict(shapes["unet"])
            for name, port in zip(self._unet_residual_names(), controlnet.outputs):
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

    def __call__(self, options: ImageOptions, pose_image: PoseImageInput, progress: ProgressFn = no_progress,
                 cancel: CancelCheck = None) -> GenerationResult:
        """Generate ``options.num_images`` images guided by the pose (progress: one update per step)."""
        import torch

        started = time.perf_counter()
        # 0. Validate everything before heavy work.
        pose = check_inputs(options, pose_image)
        seeds = resolve_seeds(options)
        do_cfg = options.guidance_scale > 1.0
        with self._lock, torch.inference_mode():
            # 1. Encode the prompt (+ negative prompt; CFG batch of 2 when guidance > 1).
            prompt_embeds, warnings = self.encode_prompt(options.prompt, options.negative_prompt, do_cfg)
            # 2. Prepare the control image and the models compiled for this size.
            run = _Run(self, options, self.prepare_control_image(pose, options.width, options.height, do_cfg),
                       prompt_embeds, progress, cancel, images=len(seeds))
            timings = {"prepare": time.perf_counter() - started, "denoise": 0.0, "decode": 0.0}
            images = []
            for seed in seeds:
                # 3. Prepare timesteps and the initial latents (per-image generator); 4. denoise.
                denoise_started = time.perf_counter()
                latents = run.denoise(seed)
                # 5. Decode the latents with the VAE into a PIL image.
                decode_started = time.perf_counter()
                timings["denoise"] += decode_started - denoise_started
                images.append(self.decode(latents, run.shapes["vae_decoder"]))
                timings["decode"] += time.perf_counter() - decode_started
        timings["seconds_per_step"] = timings["denoise"] / max(run.done, 1)
        extra = {**self.info, "device": self.device, "timings": {k: round(v, 3) for k, v in timings.items()}}
        for image, seed in zip(images, seeds):
            image.info["parameters"] = parameters_text(options, seed, extra)
        return GenerationResult(images=tuple(images), seeds=seeds, options=options,
                                elapsed=time.perf_counter() - started, extra=extra, warnings=tuple(warnings))


class _Run:
    """One request's denoising state: compiled models and infer requests for its shapes, its inputs,
    and how many steps are done (over all of its images)."""

    def __init__(self, pipeline: OVControlNetPipeline, options: ImageOptions, control: np.ndarray,
                 prompt_embeds: np.ndarray, progress: ProgressFn, cancel: CancelCheck, images: int):
        self.pipeline, self.options, self.control, self.prompt_embeds = pipeline, options, control, prompt_embeds
        self.progress, self.cancel, self.images, self.done = progress, cancel, images, 0
        self.total: Optional[int] = None  # the scheduler's steps (PNDM takes one more) times the images
        self.do_cfg = options.guidance_scale > 1.0
        self.shapes = pipeline._shapes(options.width, options.height, self.do_cfg, prompt_embeds.shape[1:])
        controlnet, unet = pipeline._denoisers(self.shapes)
        self.controlnet, self.unet = controlnet.create_infer_request(), unet.create_infer_request()
        if pipeline._observer is not None:
            self.controlnet = _ObservedRequest(self.controlnet, "controlnet", pipeline._observer)
            self.unet = _ObservedRequest(self.unet, "unet", pipeline._observer)
        self.controlnet_outputs = [port.get_any_name() for port in controlnet.outputs]
        self.unet_residual_names = pipeline._unet_residual_names()
        self.scale = np.array(options.controlnet_scale, dtype=np.float32)

    def check_cancel(self) -> None:
        if is_cancelled(self.cancel):
            raise GenerationCancelled(f"Image generation was cancelled after {self.done} of {self.total} steps.")

    def denoise(self, seed: int):
        """The final latents of one image: ControlNet residuals feed the UNet at every step."""
        scheduler = make_scheduler(self.options.scheduler, self.pipeline.scheduler_config)
        scheduler.set_timesteps(self.options.steps, device="cpu")
        self.total = self.total or len(scheduler.timesteps) * self.images
        latents, generator = self.pipeline.prepare_latents(seed, self.options.width, self.options.height, scheduler)
        step_kwargs = _step_kwargs(scheduler, generator)
        for t in scheduler.timesteps:
            self.check_cancel()
            noise_pred = self.predict_noise(scheduler.scale_model_input(self._cfg_batch(latents), t), t)
            latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
            self.done += 1
            self.progress(self.done / max(self.total, 1), f"denoising step {self.done} of {self.total}")
        self.check_cancel()
        return latents

    def _cfg_batch(self, latents):
        import torch

        return torch.cat([latents] * 2) if self.do_cfg else latents

    def predict_noise(self, latent_input, t):
        """ControlNet, then the UNet with its residuals; classifier-free guidance applied."""
        import torch

        sample = np.ascontiguousarray(latent_input.numpy(), dtype=np.float32)
        timestep = np.array(float(t), dtype=np.float32)
        residuals = self.controlnet.infer({"sample": sample, "timestep": timestep,
                                           "encoder_hidden_states": self.prompt_embeds,
                                           "controlnet_cond": self.control, "conditioning_scale": self.scale},
                                          share_inputs=True)
        unet_inputs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": self.prompt_embeds}
        for name, output_name in zip(self.unet_residual_names, self.controlnet_outputs):
            unet_inputs[name] = residuals[output_name]
        noise = self.unet.infer(unet_inputs, share_inputs=True)[0]
        noise_pred = torch.from_numpy(np.array(noise, dtype=np.float32, copy=True))
        if self.do_cfg:
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + self.options.guidance_scale * (text - uncond)
        return noise_pred


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


