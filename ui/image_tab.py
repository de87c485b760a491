"""Tab 3: Voice to pose-guided image. Endpoints ``/voice_prompt``, ``/extract_pose``, ``/generate_image`` (live
previews while it denoises) and ``/generate_image_compare`` (FP16 vs INT8 image models), each in Fast or
Quality mode."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import gradio as gr
from PIL import Image, UnidentifiedImageError

from pipelines.core.devices import validate_device
from pipelines.core.types import check_precision
from pipelines.image.request import GenerationCancelled
from pipelines.services import Services
from pipelines.speech.audio import AudioError, load_audio
from pipelines.speech.catalogue import translation_refusal
from pipelines.speech.types import TranscribeOptions

from .common import (AUTO_LANGUAGE, compare_columns, language_dropdown, precision_radio, progress_fn, request_dir,
                     speed_summary, user_errors, whisper_pickers, whisper_request)
from .image_examples import example_rows
from .image_request import (ARGS_DOC, DEFAULT_NEGATIVE, MODE_DOC, ImageRequest, mode_radio, mode_settings,
                            ui_default_mode)
from .live import LiveRun


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
                     language: str = AUTO_LANGUAGE, progress: gr.Progress = gr.Progress()) -> tuple[str, str, str]:
        """Spoken prompt in any language -> English prompt.

        Args:
            audio: a recording or audio file of the spoken prompt.
            model: Whisper model (multilingual for translation).
            device: OpenVINO device.
            precision: Whisper precision, "fp16" or "int8" (the first INT8 use quantizes the model: minutes).
            language: the spoken language's code (e.g. "fr"), or "auto" to detect it (short prompts are
                where detection errs most).
        Returns:
            the English prompt, the spoken language (as given, or detected), the original transcript.
        """
        if not audio:
            raise gr.Error("No voice prompt was given. Record or upload a short spoken description.")
        report = progress_fn(progress)
        with user_errors():
            choice, options = whisper_request(services.settings, model, precision, device, language=language,
                                              timestamps=False)
            samples = load_audio(Path(audio), max_seconds=min(VOICE_PROMPT_MAX_SECONDS,
                                                               services.settings.max_audio_seconds))
            original = services.whisper.transcribe(samples, choice, options, report)
            if not original.text:
                raise AudioError("No speech was heard in the recording. Speak a little louder or longer.")
            prompt = original.text
            if original.language not in (None, "en") and translation_refusal(choice.model) is None:
                english = services.whisper.transcribe(
                    samples, choice, TranscribeOptions(task="translate", language=original.language,
                                                       timestamps=False), report)
                prompt = english.text or prompt
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
        with user_errors():
            device = validate_device(device or services.settings.default_device)
            progress(0.1, desc="load pose model")
            services.pose.model_folder(progress_fn(progress))
            progress(0.6, desc="detect pose")
            return services.pose.estimate(photo, device=device)

    return extract_pose


def _seconds_per_step(result) -> Optional[float]:
    value = (result.extra.get("timings") or {}).get("seconds_per_step")
    return float(value) if value is not None else None


@contextmanager
def _generation(cancels: CancelRegistry, request: Optional[gr.Request]) -> Iterator[threading.Event]:
    """This session's cancellable generation: yields its cancel event; cancellation and bad input
    become a ``gr.Error`` that says so, and the session's slot is freed however it ends."""
    session = getattr(request, "session_hash", None) or "api"
    cancel = cancels.start(session)
    try:
        with user_errors():
            yield cancel
    except GenerationCancelled as exc:
        raise gr.Error("Generation was cancelled.", title="Cancelled") from exc
    finally:
        cancels.finish(session, cancel)


def _preview_update(preview, images: int) -> tuple[list, str]:
    """The gallery and status while an image forms: its newest preview, captioned."""
    where = f"image {preview.index + 1} of {images}, " if images > 1 else ""
    text = f"Preview: {where}step {preview.step} of {preview.steps}"
    return [(preview.image, text)], f"{text} (the image is still forming)"


def _summary(result, count: int, precision: str) -> str:
    per_step = _seconds_per_step(result)
    return (f"{count} image(s), seeds {', '.join(map(str, result.seeds))}, "
            f"{result.elapsed:.1f} s" + (f" ({per_step:.3f} s per step)" if per_step is not None else "")
            + f", {result.extra.get('precision', precision).upper()}"
            + (", Fast mode" if result.options.mode == "fast" else ""))


def make_generate_handler(services: Services, cancels: CancelRegistry):
    def generate_image(image: ImageRequest, precision: str = "fp16", mode: str = "quality", request: gr.Request = None,
                       progress: gr.Progress = gr.Progress()) -> Iterator[tuple[list, str]]:
        report = progress_fn(progress)
        with _generation(cancels, request) as cancel:
            options, precision = image.options(mode), check_precision(precision or "fp16")
            models, device = image.models(services.settings), image.device_for(services.settings)
            run = LiveRun(lambda preview: services.image.generate(
                options, image.pose, **models, device=device, progress=report, cancel=cancel, load_progress=report,
                precision=precision, preview=preview), cancel)
            try:
                for preview in run:  # the gallery shows the image forming; Cancel keeps the last one shown
                    yield _preview_update(preview, options.num_images)
            finally:
                run.stop()
            result = run.result
        paths = result.save(request_dir("image"))
        for warning in result.warnings:
            gr.Warning(warning)
        yield [str(p) for p in paths], _summary(result, len(paths), precision)

    return ImageRequest.handler(generate_image, extra=[("precision", "fp16"), ("mode", "quality")],
                                doc=f"""Stable Diffusion 1.5 + ControlNet OpenPose on OpenVINO, Fast or Quality mode.

        While it denoises, the gallery shows live previews of the image forming (every step in Fast
        mode, every 4 in Quality mode); a gradio_client call gets the final images.

        Args:
{ARGS_DOC}
            precision: image models' precision, "fp16" or "int8" (the first INT8 use quantizes them: minutes).
{MODE_DOC}
        Returns:
            PNG files (each carries its settings as metadata) and a summary of seeds, precision, mode and time.
        """)


def make_generate_compare_handler(services: Services, cancels: CancelRegistry):
    def generate_image_compare(image: ImageRequest, mode: str = "quality", request: gr.Request = None,
                               progress: gr.Progress = gr.Progress()) -> tuple[list[str], float, list[str], float, str]:
        with _generation(cancels, request) as cancel:
            options = image.options(mode)
            runs = services.image.compare(options, image.pose, **image.models(services.settings),
                                          device=image.device_for(services.settings), cancel=cancel,
                                          progress=progress_fn(progress))
        folder = request_dir("image-compare")
        paths = {r.precision: [str(p) for p in r.value.save(folder, prefix=r.precision)] for r in runs}
        per_step = [_seconds_per_step(r.value) or r.seconds / max(options.steps * options.num_images, 1)
                    for r in runs]
        seeds = ", ".join(map(str, runs[0].value.seeds))
        summary = f"{speed_summary(runs, unit='s per step', seconds=per_step)} Seeds {seeds} for both."
        for warning in dict.fromkeys(w for r in runs for w in r.value.warnings):
            gr.Warning(warning)
        return paths["fp16"], round(per_step[0], 4), paths["int8"], round(per_step[1], 4), summary

    return ImageRequest.handler(generate_image_compare, extra=[("mode", "quality")], doc=f"""The same images from the FP16 and the INT8 image models (same seed), each timed per step.

        Each pipeline is loaded before its run (the first INT8 use quantizes the models: minutes), so
        the times are generation only. Cancel stops the comparison too. Seed -1 picks one random seed
        for both runs.

        Args:
{ARGS_DOC}
{MODE_DOC}
        Returns:
            FP16 images, FP16 seconds per step, INT8 images, INT8 seconds per step, and a summary (ratio, seeds).
        """)


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
    cancels = CancelRegistry()
    with gr.Row():
        with gr.Column():
            ui = _prompt_and_pose(services.settings)
        with gr.Column():
            ui.update(_image_settings_and_results(services.settings))
    with gr.Accordion("Compare FP16 and INT8: the same settings and seed through both image models, timed",
                      open=False):
        compare_button = gr.Button("Compare FP16 and INT8", elem_id="image-compare")
        compared = compare_columns(lambda name: gr.Gallery(label=name, columns=2, format="png"),
                                   time_label="seconds per step")
        compare_summary = gr.Textbox(label="Comparison", interactive=False)
    ui["voice_button"].click(make_voice_prompt_handler(services),
                             inputs=[ui["voice"], ui["whisper_model"], ui["device"], ui["whisper_precision"],
                                     ui["voice_language"]],
                             outputs=[ui["prompt"], ui["detected"], ui["original"]], api_name="voice_prompt",
                             concurrency_id="whisper")
    ui["pose_button"].click(make_extract_pose_handler(services), inputs=[ui["photo"], ui["device"]],
                            outputs=[ui["pose"]], api_name="extract_pose", concurrency_id="pose")
    # /generate_image and /generate_image_compare take the same settings; only the first takes a precision.
    # The mode comes last in both, with a default: calls written before it keep their results.
    generating = ui["generate_button"].click(
        make_generate_handler(services, cancels), inputs=ImageRequest.inputs(ui) + [ui["image_precision"], ui["mode"]],
        outputs=[ui["gallery"], ui["summary"]], api_name="generate_image", concurrency_id="image")
    comparing = compare_button.click(
        make_generate_compare_handler(services, cancels), inputs=ImageRequest.inputs(ui) + [ui["mode"]],
        outputs=compared + [compare_summary], api_name="generate_image_compare", concurrency_id="image")
    _wire_mode(ui, services.settings.default_device)
    # The handler sets this browser's cancel flags: a generation stops after its current step, one
    # waiting for the image slot gives up; `cancels` drops those still waiting in Gradio's queue.
    ui["cancel_button"].click(make_cancel_handler(cancels), outputs=[ui["summary"]], api_name="cancel_generation",
                              concurrency_limit=None, queue=False, cancels=[generating, comparing])
    if ui["release_button"] is not None:
        ui["release_button"].click(make_release_handler(services), outputs=[ui["summary"]],
                                   api_name="release_models", concurrency_limit=None)


def _wire_mode(ui: dict, device: str) -> None:
    """The mode sets the steps and guidance ranges (and the scheduler); the page opens in the server's UI
    default mode (Fast on a CPU). Neither is an API endpoint."""
    settings = [ui["steps"], ui["guidance_scale"], ui["scheduler"]]
    ui["mode"].change(mode_settings, inputs=[ui["mode"]], outputs=settings, queue=False, api_visibility="private")
    start = ui_default_mode(device)
    gr.on(triggers=None, fn=lambda: (start, *mode_settings(start)), inputs=None, outputs=[ui["mode"], *settings],
          queue=False, api_visibility="private")


def _prompt_and_pose(settings) -> dict:
    """Steps 1 and 2 of the tab: the prompt (spoken or typed) and the pose (extracted or uploaded)."""
    gr.Markdown("**1. Prompt**: speak it in any language, or type it.")
    ui = dict(voice=gr.Audio(sources=["microphone", "upload"], type="filepath", label="Spoken prompt"))
    ui["whisper_model"], ui["whisper_precision"], ui["device"] = whisper_pickers(settings, "Whisper precision")
    with gr.Row():
        ui["voice_language"] = language_dropdown()
        ui["voice_button"] = gr.Button("Prompt from my voice")
    with gr.Row():
        ui.update(detected=gr.Textbox(label="Detected language", interactive=False),
                  original=gr.Textbox(label="What was said", interactive=False))
    ui.update(prompt=gr.Textbox(label="Prompt (English)", lines=2),
              negative_prompt=gr.Textbox(label="Negative prompt", value=DEFAULT_NEGATIVE))
    gr.Markdown("**2. Pose**: extract it from a photo, or upload a ready skeleton.")
    with gr.Row():
        ui["photo"] = readable_image(gr.Image(label="Reference photo", type="pil"))
        # PNG: Gradio's default WebP is lossy and blurs the limb colours ControlNet OpenPose reads.
        ui["pose"] = readable_image(gr.Image(label="Pose skeleton", type="pil", format="png"))
    ui["pose_button"] = gr.Button("Extract pose from photo")
    # Ready prompts with the skeletons the app ships (its calibration poses): press Generate at once.
    gr.Examples(example_rows(), inputs=[ui["prompt"], ui["pose"]], label="Examples: a prompt and a pose",
                examples_per_page=4)
    return ui


def _image_settings_and_results(settings) -> dict:
    """Step 3 of the tab: the generation settings, the buttons and the gallery."""
    gr.Markdown("**3. Image**")
    ui = {"mode": mode_radio()}
    with gr.Accordion("Settings", open=False):
        ui.update(ImageRequest.settings_inputs(settings))
        ui["image_precision"] = precision_radio(
            "Image model precision", info="INT8 models are smaller and 1.2-1.3x faster per step "
                                          "(measured); their first use quantizes them (minutes).")
    with gr.Row():
        ui.update(generate_button=gr.Button("Generate", variant="primary"), cancel_button=gr.Button("Cancel"))
        # Unloading every model is for whoever runs the server, not for visitors of a shared one.
        ui["release_button"] = None if settings.shared else gr.Button("Free memory")
    ui.update(gallery=gr.Gallery(label="Images", columns=2, format="png"),
              summary=gr.Textbox(label="Result", interactive=False))
    return ui
