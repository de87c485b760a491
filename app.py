"""Voice Studio: Whisper and Stable Diffusion + ControlNet on OpenVINO, in one Gradio app.

    python app.py            # serves http://127.0.0.1:7860
    python app.py --help     # flags (each also read from a VOICE_STUDIO_* environment variable)

Importing this module does no work: flags are parsed, services built and the UI made only in main().
"""
from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from cli import parse_args  # the command line (standard library only at import)
from pipelines.core.layout import SPACE_DATA_DIR  # standard library only: importing does no work
from pipelines.serve.flags import ClusterError  # standard library only

log = logging.getLogger("voice_studio")


# --------------------------------------------------------------------------- services and UI
def make_services(args: argparse.Namespace, ray: bool = True):
    """The services the UI runs on: in this process, or (``--ray`` and ``ray``) Ray Serve's replicas."""
    from pipelines.core.devices import default_device
    from pipelines.core.security import is_shared
    from pipelines.services import DEFAULT_CONCURRENCY, Services, Settings
    from pipelines.speech.catalogue import DEFAULT_MODEL

    shared = is_shared(args.host, args.share, {"SPACE_ID": args.space_id} if args.space_id else {})
    settings = Settings(
        models_dir=args.models_dir,
        default_model=args.model or DEFAULT_MODEL,
        default_device=_startup_device(args.device) if args.device else default_device(),
        max_loaded_whisper=args.max_loaded_models,
        max_audio_seconds=args.max_audio_minutes * 60.0,
        whisper_int8=args.whisper_int8,
        lcm_lora=args.lcm_lora, taesd=args.taesd, fast_decoder=args.fast_decoder,
        shared=shared,
        allow_local_models=args.allow_local_models or not shared,
        queue_size=args.queue_size,
        concurrency={**DEFAULT_CONCURRENCY, **dict(args.concurrency or [])},
    )
    if ray and getattr(args, "ray_options", None) is not None:  # models in Ray Serve replicas, this app their front end
        from pipelines.serve.frontend import start_ray_services

        return start_ray_services(settings, args.ray_options)
    return Services(settings)


def _startup_device(device: str) -> str:
    """The --device / VOICE_STUDIO_DEVICE value, checked against what OpenVINO finds here, or a clear exit."""
    from pipelines.core.devices import validate_device

    try:
        return validate_device(device)
    except ValueError as exc:
        raise SystemExit(f"app.py: error: --device (or VOICE_STUDIO_DEVICE): {exc}") from None


@dataclass
class Preload:
    """The background warm-up of the default Whisper model (``--preload``)."""

    state: str = "off"  # off, loading, ready, failed
    seconds: float = 0.0
    error: str = ""
    thread: Optional[threading.Thread] = field(default=None, repr=False)

    def start(self, services, words: bool = False) -> "Preload":
        """Load the default model's plain pipeline; with ``words`` also its word-timestamp pipelines: FP16
        (subtitles) and the Live mode's precision."""
        from dataclasses import replace

        from pipelines.core.types import ModelChoice
        from pipelines.speech.live_stream import LIVE_PRECISION

        choice = ModelChoice(model=services.settings.default_model, device=services.settings.default_device)
        loads = [(choice, False)] + ([(choice, True), (replace(choice, precision=LIVE_PRECISION), True)] if words else [])

        def run() -> None:
            start = time.perf_counter()
            try:
                for each, with_words in dict.fromkeys(loads):
                    services.whisper.load(each, words=with_words)
            except Exception as exc:  # noqa: BLE001 - a failed warm-up must not stop the server
                self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
                log.warning("preloading %s failed: %s", choice.model, self.error)
            else:
                self.state = "ready"
                log.info("preloaded %s in %.1f s", choice.model, time.perf_counter() - start)
            self.seconds = time.perf_counter() - start

        self.state = "loading"
        self.thread = threading.Thread(target=run, name="voice-studio-preload", daemon=True)
        self.thread.start()
        return self


def make_status_handler(services, preload: Preload):
    from pipelines.core.security import looks_like_local_path

    def status() -> dict:
        """Which Whisper models are loaded, and the state of the start-up preload (off, loading, ready, failed).

        Returns:
            {"whisper_loaded": [[model, precision, device], ...], "preload": state, "shared": bool}; with
            --ray also "mode": "ray" and "ray": the deployments, their replicas and the requests waiting.
        """
        loaded = [[("local folder" if services.settings.shared and looks_like_local_path(m) else m), p, d]
                  for m, p, d in services.whisper.loaded_keys()]
        ray = getattr(services, "status", None)  # Ray mode: {"mode": "ray", "ray": deployments, replicas, queues}
        return {"whisper_loaded": loaded, "preload": preload.state, "shared": services.settings.shared,
                **(ray() if callable(ray) else {})}

    return status


def apply_concurrency_limits(demo, limits: Mapping[str, int]) -> None:
    """Give every event of a kind of work (its concurrency id) that kind's limit.

    Gradio keeps one queue per concurrency id and takes the smallest limit among its events, so one
    event left at the default would lower its whole kind; this pass keeps the table the one truth.
    """
    for fn in demo.fns.values():
        if fn.concurrency_id in limits:
            fn.concurrency_limit = limits[fn.concurrency_id]


def explain_full_queue(demo, size: int) -> None:
    """Word the refusal a caller gets (HTTP 503) when ``size`` requests already wait.

    The browser shows "This application is currently busy. Please try again." and gradio_client raises
    QueueError("Queue is full! Please try again."); raw HTTP callers get this detail.
    """
    queue = getattr(demo, "_queue", None)
    push = getattr(queue, "push", None)
    if push is None:  # Gradio changed: its own message stays
        return

    async def push_with_message(*args: Any, **kwargs: Any):
        ok, detail, state = await push(*args, **kwargs)
        if state == "queue_full":
            detail = (f"The server is busy: {size} requests are already waiting. Please try again in a minute.")
        return ok, detail, state

    queue.push = push_with_message


def build_app(services, preload: Optional[Preload] = None):
    """The Gradio Blocks app over ready services (no model is loaded here)."""
    import gradio as gr

    from ui.common import keep_outputs_hours
    from ui.image_tab import build_image_tab
    from ui.speech_tab import build_speech_tab
    from ui.subtitles_tab import build_subtitles_tab

    settings = services.settings
    # Gradio keeps its own copy of every upload and every file it served; on a long-running shared
    # server those go after the same lifetime as the app's output folders (checked hourly).
    keep_seconds = int(keep_outputs_hours() * 3600)
    with gr.Blocks(title="Voice Studio", analytics_enabled=False,
                   delete_cache=(min(3600, keep_seconds), keep_seconds)) as demo:
        gr.Markdown("# Voice Studio\nWhisper and Stable Diffusion on OpenVINO, fast on an ordinary CPU.")
        with gr.Tabs():
            with gr.Tab("Speech to text", id="speech"):
                build_speech_tab(services)
            with gr.Tab("Video to subtitles", id="subtitles"):
                build_subtitles_tab(services)
            with gr.Tab("Voice to pose-guided image", id="image"):
                build_image_tab(services)
        gr.api(make_status_handler(services, preload or Preload()), api_name="status", queue=False,
               concurrency_limit=None)
    demo.queue(default_concurrency_limit=1, max_size=settings.queue_size)
    apply_concurrency_limits(demo, {kind: settings.queue_limit(kind) for kind in settings.concurrency})
    explain_full_queue(demo, settings.queue_size)
    return demo


# --------------------------------------------------------------------------- launch
def launch_options(args: argparse.Namespace, auth) -> dict:
    """What demo.launch() gets: address, login, upload limit and the folders never served."""
    blocked = [str(Path(args.models_dir).resolve())]
    if args.auth_file:
        blocked.append(str(Path(args.auth_file).expanduser().resolve()))
    return dict(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        auth=auth,
        auth_message="Voice Studio: sign in." if auth else None,
        max_file_size=int(args.max_upload_mb * 1024 * 1024),
        # No allowed_paths: Gradio serves only its own upload/cache folders and what the app returns.
        blocked_paths=blocked,
    )


def serve(args: argparse.Namespace, block: bool = True):
    """Build everything and launch. Returns (demo, services, preload) once serving (block=False)."""
    from pipelines.core.security import load_auth

    # fails before any work when a login is malformed
    auth = load_auth(args.auth, args.auth_file, {"VOICE_STUDIO_AUTH": getattr(args, "auth_env", None) or ""})
    if args.space_id and SPACE_DATA_DIR.is_dir() and not os.environ.get("HF_HOME"):
        os.environ["HF_HOME"] = str(SPACE_DATA_DIR / "huggingface")  # hub downloads persist on the Space too
    services = make_services(args)
    if services.settings.shared and not auth:
        log.warning("the app is shared (host %s%s) and has no login: anyone who can reach it can use it "
                    "(--auth-file adds one)", args.host, ", Hugging Face Space" if args.space_id else "")
    preload = Preload()
    demo = build_app(services, preload)
    demo.launch(prevent_thread_lock=True, **launch_options(args, auth))
    from ui.live_route import mount_live_route

    mount_live_route(demo, services)  # /live/ws: live captions for programs, on the page's own server
    if args.preload:
        preload.start(services, words=args.preload == "words")  # after launch: the server answers meanwhile
    if block:
        demo.block_thread()
    return demo, services, preload


# --------------------------------------------------------------------------- housekeeping
def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def models_housekeeping(args: argparse.Namespace, out=None) -> list:
    """--list-models / --prune-models: print the models folder's entries (or what was removed)."""
    import sys

    from pipelines.core.housekeeping import CURRENT, prune_models, scan_models

    out = out or sys.stdout
    root = Path(args.models_dir)
    if not root.is_dir():
        print(f"{root}: no models folder yet (models are converted into it when first used).", file=out)
        return []
    entries = (prune_models if args.prune_models else scan_models)(root, args.unused_days)
    print(f"{'removed' if args.prune_models else 'models folder'}: {root}", file=out)
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        note = f"  ({e.note})" if e.note else ""
        print(f"  {e.state:<14} {_size(e.size):>9}  {used}  {e.path.relative_to(root)}{note}", file=out)
    prunable = [e for e in entries if e.state != CURRENT]
    freed = sum(e.size for e in prunable)
    if args.prune_models:
        print(f"freed {_size(freed)} ({len(prunable)} entr{'y' if len(prunable) == 1 else 'ies'}).", file=out)
    elif prunable:
        print(f"--prune-models{f' --unused-days {args.unused_days:g}' if args.unused_days else ''} would free "
              f"{_size(freed)}.", file=out)
    else:
        print("nothing to prune.", file=out)
    return entries


def main(argv: Optional[Sequence[str]] = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name in ("voice_studio", "pipelines"):
        logging.getLogger(name).setLevel(logging.INFO)
    from pipelines.core.security import AuthConfigError

    args = parse_args(argv)
    if args.list_models or args.prune_models:
        models_housekeeping(args)
        return
    if args.prepare is not None:
        from pipelines.prepare import prepare_models

        services = make_services(args, ray=False)  # a cluster's replicas share the models folder: fill it here
        failed = [r for r in prepare_models(services, args.prepare, args.prepare_int8) if not r.ok]
        if failed:
            raise SystemExit(f"app.py: error: could not prepare {', '.join(f'{r.name} {r.precision}' for r in failed)}"
                             " (see above)")
        return
    try:
        serve(args)
    except (AuthConfigError, ClusterError) as exc:  # a clear line, not a traceback (and never a password)
        raise SystemExit(f"app.py: error: {exc}") from None


if __name__ == "__main__":
    main()
