"""Tab 3: Voice to pose-guided image. Endpoints ``/voice_prompt``, ``/extract_pose``, ``/generate_image`` and
``/generate_image_compare`` (FP16 vs INT8 image models)."""
from __future__ import annotations

import math
import random
import threading
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Optional

import gradio as gr
from PIL import Image, UnidentifiedImageError

from pipelines import image as image_pipeline
from pipelines import sd_convert
from pipelines.asr import TranscriptionRefused
from pipelines.audio import AudioError, load_audio
from pipelines.cache import DiskFull
from pipelines.devices import validate_device
from pipelines.model_store import ModelUnavailable
from pipelines.pose import NoPersonFound
from pipelines.services import Services
from pipelines.types import TranscribeOptions
from pipelines.whisper_models import translation_refusal

from .common import (announce_whisper_load, check_precision, compare_columns, compare_precisions,
                     int8_first_use_note, precision_radio, progress_fn, request_dir, speed_summary, whisper_pickers,
                     whisper_request)

USER_ERRORS = (AudioError, ModelUnavailable, sd_convert.ModelUnavailable, DiskFull, TranscriptionRefused,
               NoPersonFound, ValueError)


def readable_image(image: gr.Image) -> gr.Image:
    """Make an unreadable upload to ``image`` (a text file named .png, a truncated picture) a clear ``gr.Error``.

    A plain ``gr.Image`` fails in preprocessing, before the handler runs, and the user (or a
    gradio_client caller) only hears that "the upstream Gradio app has raised an exception". The
    instance's ``preprocess`` is wrapped rather than subclassing ``gr.Image``: Gradio writes a
    ``.pyi`` stub next to the module of every Component subclass at import time.
    """
    original = image.preprocess

    def preprocess(payload):
        try:
            return original(payload)
        except gr.Error:
            raise
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
            name = getattr(payload, "orig_name", None) or Path(getattr(payload, "path", None) or "").name
            raise gr.Error(f"The {(image.label or 'image').lower()} '{name}' could not be read as an image "
                           f"({type(exc).__name__}). Upload a PNG, JPEG or WebP picture.") from exc

    image.preprocess = preprocess
    return image


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


class CancelRegistry:
    """Cancel flags of the running generations, by browser session: Cancel stops that session's
    generations (all of them, when one session runs several, e.g. threads sharing a gradio_client)."""

    def __init__(self) -> None:
        self._events: dict[str, set[threading.Event]] = {}
        self._lock = threading.Lock()

    def start(self, session: str) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._events.setdefault(session, set()).add(event)
        return event

    def cancel(self, session: str) -> bool:
        with self._lock:
            events = list(self._events.get(session, ()))
        for event in events:
            event.set()
        return bool(events)

    def finish(self, session: str, event: threading.Event) -> None:
        with self._lock:
            running = self._events.get(session, set())
            running.discard(event)
            if not running:
                self._events.pop(session, None)


# A spoken prompt is a description of a picture (the text encoder reads 77 tokens, about 50 words):
# longer recordings are refused rather than holding a Whisper slot for minutes.
VOICE_PROMPT_MAX_SECONDS = 60.0


def make_voice_prompt_handler(services: Services):
    def voice_prompt(audio: Optional[str], model: str, device: str, precision: str = "fp16",
                     progress: gr.Progress = gr.Progress()) -> tuple[str, str, str]:
        """Spoken prompt in any language -> English prompt.

        Args:
            audio: a recording or audio file of the spoken prompt.
            model: Whisper model (multilingual for translation).
            device: OpenVINO device.
            precision: Whisper precision, "fp16" or "int8" (the first INT8 use quantizes the model: minutes).
        Returns:
            the English prompt, the detected language, the original transcript.
        """
        if not audio:
            raise gr.Error("No voice prompt was given. Record or upload a short spoken description.")
        report = progress_fn(progress)
        try:
            choice, options = whisper_request(services.settings, model, precision, device, timestamps=False)
            samples = load_audio(Path(audio), max_seconds=min(VOICE_PROMPT_MAX_SECONDS,
                                                               services.settings.max_audio_seconds))
            announce_whisper_load(services.whisper, choice, report)
            original = services.whisper.transcribe(samples, choice, options, report)
            if not original.text:
                raise AudioError("No speech was heard in the recording. Speak a little louder or longer.")
            prompt = original.text
            if original.language not in (None, "en") and translation_refusal(choice.model) is None:
                english = services.whisper.transcribe(
                    samples, choice, TranscribeOptions(task="translate", language=original.language,
                                                       timestamps=False), report)
                prompt = english.text or prompt
        except USER_ERRORS as exc:
            raise gr.Error(str(exc)) from exc
        return prompt, original.language or "", original.text

    return voice_prompt


def make_extract_pose_handler(services: Services):
    def extract_pose(photo, device: str, progress: gr.Progress = gr.Progress()):
        """OpenPose skeleton of the person in a reference photo.

        Args:
            photo: a photo with a person in it.
            device: OpenVINO device.
        Returns:
            the skeleton image (use it as the pose for /generate_image).
        """
        if photo is None:
            raise gr.Error("No photo was given. Upload a photo of a person, or upload a ready pose skeleton.")
        try:
            validate_device(device or services.settings.default_device)
            progress(0.1, desc="load pose model")
            services.pose.model_folder(progress_fn(progress))
            progress(0.6, desc="detect pose")
            return services.pose.estimate(photo, device=device or services.settings.default_device)
        except USER_ERRORS as exc:
            raise gr.Error(str(exc)) from exc

    return extract_pose


def _image_options(prompt, negative_prompt, steps, guidance_scale, seed, controlnet_scale, num_images, width,
                   height, scheduler) -> image_pipeline.ImageOptions:
    # No int()/float() here: a cleared number box (None) or 260.5 reaches check_options, which
    # names the setting and its allowed range, instead of a TypeError reaching the user.
    return image_pipeline.ImageOptions(
        prompt=(prompt or "").strip(), negative_prompt=negative_prompt or "", steps=_whole(steps),
        guidance_scale=_real(guidance_scale), seed=_whole(seed), controlnet_scale=_real(controlnet_scale),
        num_images=_whole(num_images), width=_whole(width), height=_whole(height), scheduler=scheduler)


def _seconds_per_step(result) -> Optional[float]:
    value = (result.extra.get("timings") or {}).get("seconds_per_step")
    return float(value) if value is not None else None


def _image_models(services: Services, sd_model: str, controlnet_model: str) -> dict:
    """The user's model references, checked like Whisper's (a shared server takes no local paths)."""
    settings = services.settings
    return dict(sd_ref=settings.check_model(sd_model or "", kind="Stable Diffusion model") or None,
                controlnet_ref=settings.check_model(controlnet_model or "", kind="ControlNet model") or None)


@contextmanager
def _generation(cancels: CancelRegistry, request: Optional[gr.Request]) -> Iterator[threading.Event]:
    """This session's cancellable generation: yields its cancel event; cancellation and bad input
    become a ``gr.Error`` that says so, and the session's slot is freed however it ends."""
    session = getattr(request, "session_hash", None) or "api"
    cancel = cancels.start(session)
    try:
        yield cancel
    except image_pipeline.GenerationCancelled as exc:
        raise gr.Error("Generation was cancelled.", title="Cancelled") from exc
    except USER_ERRORS as exc:
        raise gr.Error(str(exc)) from exc
    finally:
        cancels.finish(session, cancel)


def _announce_image_load(services: Services, refs: dict, device: str, precision: str, report) -> None:
    """Say that the first INT8 use quantizes the image models (minutes), unless they are loaded already."""
    key = (refs["sd_ref"] or services.image.sd_model, refs["controlnet_ref"] or services.image.controlnet_model,
           device.upper(), "int8")
    if precision == "int8" and key not in services.image.loaded():
        report(0.0, int8_first_use_note("image models", plural=True))


# The image endpoints' parameters, one per line as Gradio reads them (API page, MCP), shared by both.
IMAGE_ARGS_DOC = """\
            prompt: English prompt.
            negative_prompt: what to avoid.
            pose: the OpenPose skeleton image (from /extract_pose or uploaded).
            steps: denoising steps (1-100).
            guidance_scale: classifier-free guidance (1 = none, which halves the work per step).
            seed: random seed, the same seed gives the same image; -1 picks a random one.
            controlnet_scale: how strongly the pose guides the image (0-2).
            num_images: images per request (1-4), seeds seed, seed+1, ...
            width: image width in pixels, a multiple of 8 from 256 to 1024.
            height: image height in pixels, a multiple of 8 from 256 to 1024.
            scheduler: UniPC, Euler a, DPM++ 2M, DDIM, PNDM or LMS.
            sd_model: Stable Diffusion 1.5 hub id or local folder (empty: the default).
            controlnet_model: ControlNet OpenPose hub id or local folder (empty: the default).
            device: OpenVINO device (CPU, GPU, NPU, AUTO; empty: the server's default)."""


def make_generate_handler(services: Services, cancels: CancelRegistry):
    def generate_image(
        prompt: str,
        negative_prompt: str,
        pose,
        steps: float,
        guidance_scale: float,
        seed: float,
        controlnet_scale: float,
        num_images: float,
        width: float,
        height: float,
        scheduler: str,
        sd_model: str,
        controlnet_model: str,
        device: str,
        precision: str = "fp16",
        request: gr.Request = None,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[list[str], str]:
        # the docstring (what Gradio documents for the API) is set below, from IMAGE_ARGS_DOC
        options = _image_options(prompt, negative_prompt, steps, guidance_scale, seed, controlnet_scale, num_images,
                                 width, height, scheduler)
        report = progress_fn(progress)
        with _generation(cancels, request) as cancel:
            precision = check_precision(precision)
            refs = _image_models(services, sd_model, controlnet_model)
            dev = validate_device(device or services.settings.default_device)
            _announce_image_load(services, refs, dev, precision, report)
            result = services.image.generate(
                options, pose, **refs, device=dev,
                progress=lambda done, total: report(done / max(total, 1), f"denoising step {done} of {total}"),
                cancel=cancel, load_progress=report, precision=precision)
        paths = result.save(request_dir("image"))
        per_step = _seconds_per_step(result)
        summary = (f"{len(paths)} image(s), seeds {', '.join(map(str, result.seeds))}, "
                   f"{result.elapsed:.1f} s" + (f" ({per_step:.3f} s per step)" if per_step is not None else "")
                   + f", {result.extra.get('precision', precision).upper()}")
        for warning in result.warnings:
            gr.Warning(warning)
        return [str(p) for p in paths], summary

    generate_image.__doc__ = f"""Stable Diffusion 1.5 + ControlNet OpenPose on OpenVINO.

        Args:
{IMAGE_ARGS_DOC}
            precision: image models' precision, "fp16" or "int8" (the first INT8 use quantizes them: minutes).
        Returns:
            PNG files (each carries its settings as metadata) and a summary of seeds, precision and time.
        """
    return generate_image


def make_generate_compare_handler(services: Services, cancels: CancelRegistry):
    def generate_image_compare(
        prompt: str,
        negative_prompt: str,
        pose,
        steps: float,
        guidance_scale: float,
        seed: float,
        controlnet_scale: float,
        num_images: float,
        width: float,
        height: float,
        scheduler: str,
        sd_model: str,
        controlnet_model: str,
        device: str,
        request: gr.Request = None,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[list[str], float, list[str], float, str]:
        # the docstring is set below, from IMAGE_ARGS_DOC
        options = _image_options(prompt, negative_prompt, steps, guidance_scale, seed, controlnet_scale, num_images,
                                 width, height, scheduler)
        report = progress_fn(progress)
        with _generation(cancels, request) as cancel:
            refs = _image_models(services, sd_model, controlnet_model)
            dev = validate_device(device or services.settings.default_device)
            pose_image = image_pipeline.check_inputs(options, pose)  # fail fast, before any model is loaded
            if options.seed == -1:  # one random seed, the same for both
                options = replace(options, seed=random.SystemRandom().randrange(0, image_pipeline.MAX_SEED + 1))

            def prepare(precision: str, part) -> None:  # downloads, conversion, quantizing: no work slot
                _announce_image_load(services, refs, dev, precision, part)
                services.image.prepare(refs["sd_ref"], refs["controlnet_ref"], dev, precision, part)

            def load(precision: str, part) -> None:
                pipeline = services.image.get_pipeline(refs["sd_ref"], refs["controlnet_ref"], dev, part,
                                                       precision=precision)
                part(0.0, f"compile the image models for {options.width}x{options.height}")  # not in the timed run
                pipeline.compile(options.width, options.height, guidance=options.guidance_scale > 1.0)

            def run(precision: str, part):
                return services.image.generate(
                    options, pose_image, **refs, device=dev, cancel=cancel, load_progress=part, precision=precision,
                    progress=lambda done, total: part(done / max(total, 1), f"denoising step {done} of {total}"))

            runs = compare_precisions(load, run, report, slots=services.image.slots, prepare=prepare)
        folder = request_dir("image-compare")
        paths = {r.precision: [str(p) for p in r.value.save(folder, prefix=r.precision)] for r in runs}
        per_step = [_seconds_per_step(r.value) or r.seconds / max(options.steps * options.num_images, 1)
                    for r in runs]
        seeds = ", ".join(map(str, runs[0].value.seeds))
        summary = f"{speed_summary(runs, unit='s per step', seconds=per_step)} Seeds {seeds} for both."
        for warning in dict.fromkeys(w for r in runs for w in r.value.warnings):
            gr.Warning(warning)
        return paths["fp16"], round(per_step[0], 4), paths["int8"], round(per_step[1], 4), summary

    generate_image_compare.__doc__ = f"""The same images from the FP16 and the INT8 image models (same seed), each timed per step.

        Each pipeline is loaded before its run (the first INT8 use quantizes the models: minutes), so
        the times are generation only. Cancel stops the comparison too. Seed -1 picks one random seed
        for both runs.

        Args:
{IMAGE_ARGS_DOC}
        Returns:
            FP16 images, FP16 seconds per step, INT8 images, INT8 seconds per step, and a summary (ratio, seeds).
        """
    return generate_image_compare


# Still true once the generation has stopped (the box is not rewritten when it has).
CANCEL_REQUESTED = "Cancel requested: the generation stops after its current step."


def make_cancel_handler(cancels: CancelRegistry):
    def cancel_generation(request: gr.Request = None) -> str:
        """Stop this session's image generation after the current denoising step."""
        stopped = cancels.cancel(getattr(request, "session_hash", None) or "api")
        return CANCEL_REQUESTED if stopped else "Nothing to cancel."

    return cancel_generation


def make_release_handler(services: Services):
    def release_models() -> str:
        """Unload every loaded model (image, pose, Whisper) to free memory; they reload on next use."""
        services.release_all()
        return "Models released; they load again on next use."

    return release_models


def build_image_tab(services: Services) -> None:
    settings = services.settings
    cancels = CancelRegistry()
    with gr.Row():
        with gr.Column():
            gr.Markdown("**1. Prompt**: speak it in any language, or type it.")
            voice = gr.Audio(sources=["microphone", "upload"], type="filepath", label="Spoken prompt")
            whisper_model, whisper_precision, device = whisper_pickers(settings, "Whisper precision")
            voice_button = gr.Button("Prompt from my voice")
            with gr.Row():
                detected = gr.Textbox(label="Detected language", interactive=False)
                original = gr.Textbox(label="What was said", interactive=False)
            prompt = gr.Textbox(label="Prompt (English)", lines=2)
            negative = gr.Textbox(label="Negative prompt", value="lowres, bad anatomy, worst quality, low quality")
            gr.Markdown("**2. Pose**: extract it from a photo, or upload a ready skeleton.")
            with gr.Row():
                photo = readable_image(gr.Image(label="Reference photo", type="pil"))
                # PNG: Gradio's default WebP is lossy and blurs the limb colours ControlNet OpenPose reads.
                pose = readable_image(gr.Image(label="Pose skeleton", type="pil", format="png"))
            pose_button = gr.Button("Extract pose from photo")
        with gr.Column():
            gr.Markdown("**3. Image**")
            with gr.Accordion("Settings", open=False):
                with gr.Row():
                    steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
                    guidance = gr.Slider(1, 20, value=7.5, step=0.5, label="Guidance scale")
                    strength = gr.Slider(0, 2, value=1.0, step=0.05, label="ControlNet strength")
                with gr.Row():
                    seed = gr.Number(value=42, precision=0, label="Seed (-1 = random)")
                    num_images = gr.Slider(1, 4, value=1, step=1, label="Images")
                    scheduler = gr.Dropdown(list(image_pipeline.SCHEDULER_NAMES), value="UniPC", label="Scheduler")
                with gr.Row():
                    width = gr.Slider(256, 1024, value=512, step=8, label="Width")
                    height = gr.Slider(256, 1024, value=512, step=8, label="Height")
                # The configured models (Settings), so the UI and API callers that leave these out use them.
                sd_model = gr.Textbox(value=settings.sd_model, label="Stable Diffusion 1.5 model")
                controlnet_model = gr.Textbox(value=settings.controlnet_model, label="ControlNet OpenPose model")
                image_precision = precision_radio(
                    "Image model precision", info="INT8 models are smaller and 1.2-1.3x faster per step "
                                                  "(measured); their first use quantizes them (minutes).")
            with gr.Row():
                generate_button = gr.Button("Generate", variant="primary")
                cancel_button = gr.Button("Cancel")
                # Unloading every model is for whoever runs the server, not for visitors of a shared one.
                release_button = None if settings.shared else gr.Button("Free memory")
            gallery = gr.Gallery(label="Images", columns=2, format="png")
            summary = gr.Textbox(label="Result", interactive=False)
    with gr.Accordion("Compare FP16 and INT8: the same settings and seed through both image models, timed",
                      open=False):
        compare_button = gr.Button("Compare FP16 and INT8", elem_id="image-compare")
        compared = compare_columns(lambda name: gr.Gallery(label=name, columns=2, format="png"),
                                   time_label="seconds per step")
        compare_summary = gr.Textbox(label="Comparison", interactive=False)
    voice_button.click(make_voice_prompt_handler(services), inputs=[voice, whisper_model, device, whisper_precision],
                       outputs=[prompt, detected, original], api_name="voice_prompt", concurrency_id="whisper")
    pose_button.click(make_extract_pose_handler(services), inputs=[photo, device], outputs=[pose],
                      api_name="extract_pose", concurrency_id="pose")
    # /generate_image and /generate_image_compare take the same settings; only the first takes a precision.
    image_settings = [prompt, negative, pose, steps, guidance, seed, strength, num_images, width, height, scheduler,
                      sd_model, controlnet_model, device]
    generating = generate_button.click(
        make_generate_handler(services, cancels),
        inputs=image_settings + [image_precision],
        outputs=[gallery, summary], api_name="generate_image", concurrency_id="image")
    comparing = compare_button.click(
        make_generate_compare_handler(services, cancels),
        inputs=image_settings,
        outputs=compared + [compare_summary],
        api_name="generate_image_compare", concurrency_id="image")
    # The handler sets this browser's cancel flags: a generation stops after its current step, one
    # waiting for the image slot gives up; `cancels` drops those still waiting in Gradio's queue.
    cancel_button.click(make_cancel_handler(cancels), outputs=[summary], api_name="cancel_generation",
                        concurrency_limit=None, queue=False, cancels=[generating, comparing])
    if release_button is not None:
        release_button.click(make_release_handler(services), outputs=[summary], api_name="release_models",
                             concurrency_limit=None)
