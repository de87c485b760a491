"""One image request as the Image tab and the API give it: a dataclass that builds its Gradio inputs
and round-trips Gradio's positional arguments (as Whisper-WebUI's parameter classes do), so the image
endpoints take their 14 settings from one place instead of each spelling them out.

Gradio reads an endpoint's parameter names from the handler's signature; :meth:`ImageRequest.handler`
gives the handler the fields' names (then the endpoint's own extra parameters), so the named API
stays ``prompt, negative_prompt, pose, steps, ...`` while the code passes one :class:`ImageRequest`.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import astuple, dataclass, fields
from typing import Any, Callable, Optional, Sequence

import gradio as gr

from pipelines.core.devices import validate_device
from pipelines.image.request import FAST, MODE_LIMITS, QUALITY, SCHEDULER_NAMES, ImageOptions, check_mode

DEFAULT_NEGATIVE = "lowres, bad anatomy, worst quality, low quality"

# The image endpoints' parameters, one per line as Gradio reads them (API page, MCP), shared by both.
ARGS_DOC = """\
            prompt: English prompt.
            negative_prompt: what to avoid.
            pose: the OpenPose skeleton image (from /extract_pose or uploaded).
            steps: denoising steps (1-100; in Fast mode 1-8, 4 is typical).
            guidance_scale: classifier-free guidance (1 = none, which halves the work per step; in Fast mode 1-2).
            seed: random seed, the same seed gives the same image; -1 picks a random one.
            controlnet_scale: how strongly the pose guides the image (0-2).
            num_images: images per request (1-4), seeds seed, seed+1, ...
            width: image width in pixels, a multiple of 8 from 256 to 1024.
            height: image height in pixels, a multiple of 8 from 256 to 1024.
            scheduler: UniPC, Euler a, DPM++ 2M, DDIM, PNDM or LMS (Quality mode; Fast mode always runs LCM).
            sd_model: Stable Diffusion 1.5 hub id or local folder (empty: the default).
            controlnet_model: ControlNet OpenPose hub id or local folder (empty: the default).
            device: OpenVINO device (CPU, GPU, NPU, AUTO; empty: the server's default)."""

# The mode parameter of both image endpoints (last, with a default: calls written before it keep their results).
MODE_DOC = """\
            mode: "quality" (the default: SD1.5 as trained, 20 steps with guidance, the full VAE) or "fast"
                (the LCM-LoRA fused into the UNet, the LCM scheduler, the tiny TAESD decoder: seconds on a
                CPU; give it 1-8 steps, 4 is typical, and guidance 1-2, 1 is typical)."""
MODE_CHOICES = [("Fast: LCM-LoRA, 4 steps, seconds on a CPU", FAST), ("Quality: 20 steps with guidance", QUALITY)]


def mode_radio() -> gr.Radio:
    """The Fast / Quality choice. Its value as built is Quality: what the API's ``mode`` defaults to, so
    calls written before it keep their results; the page switches to the server's UI default on load."""
    return gr.Radio(choices=MODE_CHOICES, value=QUALITY, label="Mode",
                    info="Fast: LCM-LoRA fused into the UNet, 4 steps, no guidance, the tiny TAESD decoder. "
                         "Quality: Stable Diffusion 1.5 as trained.")


def ui_default_mode(device: str) -> str:
    """The mode the Image tab starts in: Fast on a CPU (where Quality takes tens of seconds to minutes)."""
    return FAST if (device or "CPU").upper().startswith("CPU") else QUALITY


def mode_settings(mode: str) -> tuple:
    """Updates of the steps and guidance sliders and the scheduler to ``mode``'s ranges and defaults."""
    mode = mode if mode in MODE_LIMITS else QUALITY
    limits = MODE_LIMITS[mode]
    fast = mode == FAST
    return (gr.update(minimum=limits.steps[0], maximum=limits.steps[1], value=limits.default_steps),
            gr.update(minimum=limits.guidance[0], maximum=limits.guidance[1], value=limits.default_guidance,
                      step=0.1 if fast else 0.5),
            gr.update(interactive=not fast, info="Fast mode always runs the LCM scheduler." if fast else None))


def _whole(value: Any) -> Any:
    """A whole number as int; anything else (None, 7.5, NaN, text) unchanged, for check_options to report."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value
    return int(number) if math.isfinite(number) and number.is_integer() else value


def _real(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


@dataclass(frozen=True)
class ImageRequest:
    """The values of one image request, as Gradio passes them (unchecked: :meth:`options` and the
    pipelines check them and say what is wrong)."""

    prompt: Any
    negative_prompt: Any
    pose: Any
    steps: Any
    guidance_scale: Any
    seed: Any
    controlnet_scale: Any
    num_images: Any
    width: Any
    height: Any
    scheduler: Any
    sd_model: Any
    controlnet_model: Any
    device: Any

    # -- Gradio's positional arguments --------------------------------------------------------
    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_args(cls, *args: Any) -> "ImageRequest":
        return cls(*args[:len(fields(cls))])

    def to_args(self) -> tuple:
        return astuple(self)

    @staticmethod
    def settings_inputs(settings) -> dict[str, gr.components.Component]:
        """The generation settings' inputs (the tab lays them out in its Settings accordion), by field name."""
        with gr.Row():
            inputs = dict(steps=gr.Slider(1, 100, value=20, step=1, label="Steps"),
                          guidance_scale=gr.Slider(1, 20, value=7.5, step=0.5, label="Guidance scale"),
                          controlnet_scale=gr.Slider(0, 2, value=1.0, step=0.05, label="ControlNet strength"))
        with gr.Row():
            inputs.update(seed=gr.Number(value=42, precision=0, label="Seed (-1 = random)"),
                          num_images=gr.Slider(1, 4, value=1, step=1, label="Images"),
                          scheduler=gr.Dropdown(list(SCHEDULER_NAMES), value="UniPC", label="Scheduler"))
        with gr.Row():
            inputs.update(width=gr.Slider(256, 1024, value=512, step=8, label="Width"),
                          height=gr.Slider(256, 1024, value=512, step=8, label="Height"))
        # The configured models (Settings), so the UI and API callers that leave these out use them.
        inputs.update(sd_model=gr.Textbox(value=settings.sd_model, label="Stable Diffusion 1.5 model"),
                      controlnet_model=gr.Textbox(value=settings.controlnet_model, label="ControlNet OpenPose model"))
        return inputs

    @classmethod
    def inputs(cls, components: dict[str, gr.components.Component]) -> list[gr.components.Component]:
        """The components in the order of the fields: what the endpoints take first."""
        return [components[name] for name in cls.names()]

    # -- what the pipelines take --------------------------------------------------------------
    def options(self, mode: Optional[str] = QUALITY) -> ImageOptions:
        # No int()/float() here: a cleared number box (None) or 260.5 reaches check_options, which
        # names the setting and its allowed range, instead of a TypeError reaching the user.
        return ImageOptions(
            prompt=(self.prompt or "").strip(), negative_prompt=self.negative_prompt or "", steps=_whole(self.steps),
            guidance_scale=_real(self.guidance_scale), seed=_whole(self.seed),
            controlnet_scale=_real(self.controlnet_scale), num_images=_whole(self.num_images),
            width=_whole(self.width), height=_whole(self.height), scheduler=self.scheduler,
            mode=check_mode(mode or QUALITY))

    def models(self, settings) -> dict[str, Optional[str]]:
        """The user's model references, checked like Whisper's (a shared server takes no local paths)."""
        return dict(sd_ref=settings.check_model(self.sd_model or "", kind="Stable Diffusion model") or None,
                    controlnet_ref=settings.check_model(self.controlnet_model or "", kind="ControlNet model") or None)

    def device_for(self, settings) -> str:
        return validate_device(self.device or settings.default_device)

    # -- the endpoint's function --------------------------------------------------------------
    @classmethod
    def handler(cls, fn: Callable[..., Any], extra: Sequence[tuple[str, Any]] = (), doc: str = "") -> Callable:
        """A Gradio handler with the fields' names as its first parameters, then ``extra`` (name, default)
        pairs, then ``request`` and ``progress``; it calls ``fn(image_request, *extras, request=,
        progress=)``. ``doc`` is the endpoint's description (Gradio reads its Args for the API page)."""
        keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD
        parameters = [inspect.Parameter(name, keyword, annotation=Any) for name in cls.names()]
        parameters += [inspect.Parameter(name, keyword, default=default, annotation=type(default))
                       for name, default in extra]
        parameters += [inspect.Parameter("request", keyword, default=None, annotation=gr.Request),
                       inspect.Parameter("progress", keyword, default=gr.Progress(), annotation=gr.Progress)]
        signature = inspect.Signature(parameters)

        def call(args: tuple, kwargs: dict) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            values = list(bound.arguments.values())
            count = len(fields(cls))
            return fn(cls.from_args(*values[:count]), *values[count:-2], request=bound.arguments["request"],
                      progress=bound.arguments["progress"])

        # Gradio streams a handler's outputs when the function it is given is a generator function.
        if inspect.isgeneratorfunction(fn):
            def endpoint(*args: Any, **kwargs: Any) -> Any:
                return (yield from call(args, kwargs))
        else:
            def endpoint(*args: Any, **kwargs: Any) -> Any:
                return call(args, kwargs)

        endpoint.__signature__ = signature  # type: ignore[attr-defined]
        endpoint.__annotations__ = {p.name: p.annotation for p in parameters}
        endpoint.__name__ = endpoint.__qualname__ = fn.__name__
        endpoint.__doc__ = doc
        return endpoint
