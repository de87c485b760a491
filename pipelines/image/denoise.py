"""One request's denoising loop, the same for Quality and Fast mode.

Each step runs the ControlNet, then the UNet with the ControlNet's residuals (classifier-free
guidance when the guidance scale is above 1: a batch of 2), then the scheduler's step: a chosen
Quality scheduler (UniPC, Euler a, ...) or Fast mode's LCM scheduler, whose step also draws fresh
noise from the image's own generator. After a step a live preview may be made from the scheduler's
estimate of the clean image (its ``denoised`` / ``pred_original_sample``, or for schedulers that do
not return one, the estimate computed from the UNet's noise prediction): previews of the noisy
latents would show mostly noise in a 4-step schedule. Previews only read the state, so the final
image is the same with or without them.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from pipelines.core.progress import ProgressFn
from pipelines.image.request import (ALL_SCHEDULERS, SCHEDULER_NAMES, CancelCheck, GenerationCancelled, ImageOptions,
                                     is_cancelled)

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

InputObserver = Callable[[str, dict], Any]  # observer(component, inputs) before each ControlNet/UNet infer


@dataclass(frozen=True)
class Preview:
    """A live preview: image ``index`` of the request after ``step`` of its ``steps`` denoising steps."""

    index: int
    step: int
    steps: int
    image: "Image.Image"


PreviewFn = Callable[[Preview], None]


def make_scheduler(name: str, config: dict):
    """A fresh diffusers scheduler ``name`` (one of :data:`SCHEDULER_NAMES`, or Fast mode's ``"LCM"``)
    from a scheduler config."""
    import diffusers

    if name not in ALL_SCHEDULERS:
        raise ValueError(f"Unknown sampler {name!r}; choose one of: {', '.join(SCHEDULER_NAMES)}.")
    class_name, kwargs = ALL_SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(config, **kwargs)


def x0_from_epsilon(scheduler, latents, noise_pred, t):
    """The denoised estimate x0 = (x_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t), for epsilon-predicting
    schedulers that do not return one (UniPC, DPM++, PNDM: their latents are not scaled by sigma)."""
    abar = scheduler.alphas_cumprod[int(t)]
    return (latents - (1 - abar).sqrt() * noise_pred) / abar.sqrt()


def denoised_estimate(scheduler, output, latents, noise_pred, t):
    """The scheduler's own estimate of the clean latents after a step, else :func:`x0_from_epsilon`."""
    for name in ("denoised", "pred_original_sample"):  # LCM; DDIM, Euler a, LMS
        value = getattr(output, name, None)
        if value is not None:
            return value
    return x0_from_epsilon(scheduler, latents, noise_pred, t)


class Denoising:
    """One request's denoising state: compiled models and infer requests for its shapes, its inputs,
    and how many steps are done (over all of its images). ``pipeline`` is the
    :class:`~pipelines.image.pipeline.OVControlNetPipeline` that runs it."""

    def __init__(self, pipeline: Any, options: ImageOptions, control: np.ndarray,
                 prompt_embeds: np.ndarray, progress: ProgressFn, cancel: CancelCheck, images: int,
                 preview: Optional[PreviewFn] = None):
        self.pipeline, self.options, self.control, self.prompt_embeds = pipeline, options, control, prompt_embeds
        self.progress, self.cancel, self.images, self.done = progress, cancel, images, 0
        self.preview = preview if pipeline.can_preview else None
        self.preview_seconds = 0.0
        self.total: Optional[int] = None  # the scheduler's steps (PNDM takes one more) times the images
        self.do_cfg = options.guidance_scale > 1.0
        self.shapes = pipeline.shapes(options.width, options.height, self.do_cfg, prompt_embeds.shape[1:])
        components = pipeline.components
        controlnet, unet = components.denoisers(self.shapes)
        self.controlnet, self.unet = controlnet.create_infer_request(), unet.create_infer_request()
        if pipeline.observer is not None:
            self.controlnet = ObservedRequest(self.controlnet, "controlnet", pipeline.observer)
            self.unet = ObservedRequest(self.unet, "unet", pipeline.observer)
        self.controlnet_outputs = [port.get_any_name() for port in controlnet.outputs]
        self.unet_residual_names = components.unet_residual_names()
        self.scale = np.array(options.controlnet_scale, dtype=np.float32)

    def check_cancel(self) -> None:
        if is_cancelled(self.cancel):
            raise GenerationCancelled(f"Image generation was cancelled after {self.done} of {self.total} steps.")

    def denoise(self, seed: int, index: int = 0):
        """The final latents of image ``index`` (its ``seed``): ControlNet residuals feed the UNet at every step."""
        scheduler = make_scheduler(self.options.sampler, self.pipeline.scheduler_config)
        scheduler.set_timesteps(self.options.steps, device="cpu")
        steps = len(scheduler.timesteps)
        self.total = self.total or steps * self.images
        latents, generator = self.pipeline.prepare_latents(seed, self.options.width, self.options.height, scheduler)
        step_kwargs = _step_kwargs(scheduler, generator)
        for step, t in enumerate(scheduler.timesteps, start=1):
            self.check_cancel()
            noise_pred = self.predict_noise(scheduler.scale_model_input(self._cfg_batch(latents), t), t)
            output = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=True)
            if self._preview_due(step, steps):
                self._show(denoised_estimate(scheduler, output, latents, noise_pred, t), index, step, steps)
            latents = output.prev_sample
            self.done += 1
            self.progress(self.done / max(self.total, 1), f"denoising step {self.done} of {self.total}")
        self.check_cancel()
        return latents

    def _preview_due(self, step: int, steps: int) -> bool:
        """A preview after every ``previews_every`` steps of the mode, but not after the last one (the
        image itself comes then)."""
        return self.preview is not None and step < steps and step % self.options.limits.previews_every == 0

    def _show(self, denoised, index: int, step: int, steps: int) -> None:
        started = time.perf_counter()
        image = self.pipeline.decode_taesd(denoised, self.shapes["taesd_decoder"])
        self.preview_seconds += time.perf_counter() - started
        self.preview(Preview(index=index, step=step, steps=steps, image=image))

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


class ObservedRequest:
    """An infer request that shows its inputs to an observer first (see ``observe_inputs``)."""

    def __init__(self, request, name: str, observer: InputObserver):
        self._request, self._name, self._observer = request, name, observer

    def infer(self, inputs: dict, share_inputs: bool = False):
        self._observer(self._name, inputs)
        return self._request.infer(inputs, share_inputs=share_inputs)


def _step_kwargs(scheduler, generator) -> dict:
    """eta (DDIM) and generator (ancestral samplers, LCM) when the scheduler's ``step`` takes them."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs
