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

from pipelines.core.layout import SPACE_DATA_DIR  # standard library only: importing does no work
from pipelines.serve.flags import ClusterError, add_ray_flags, ray_options  # standard library only

ENV_PREFIX = "VOICE_STUDIO_"
DEFAULT_PORT = 7860
DEFAULT_QUEUE_SIZE = 64
DEFAULT_MAX_UPLOAD_MB = 500.0
DEFAULT_MAX_AUDIO_MINUTES = 180.0
CONCURRENCY_KINDS = ("whisper", "image", "pose", "network", "batch", "live")
TRUE_WORDS = {"1", "true", "yes", "on"}

log = logging.getLogger("voice_studio")


# --------------------------------------------------------------------------- flags
def _env_flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(ENV_PREFIX + name, "").strip().lower() in TRUE_WORDS


def _concurrency_pair(text: str) -> tuple[str, int]:
    kind, sep, number = text.partition("=")
    kind = kind.strip()
    if not sep or kind not in CONCURRENCY_KINDS:
        raise argparse.ArgumentTypeError(f"expected KIND=N with KIND one of {', '.join(CONCURRENCY_KINDS)}: {text!r}")
    try:
        value = int(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"at least 1 request must run at once: {text!r}")
    return kind, value


def _positive(cast):
    def convert(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
        return value
    convert.__name__ = cast.__name__
    return convert


def _preload_kind(text: str) -> str:
    if text.strip().lower() != "words":
        raise argparse.ArgumentTypeError(f"--preload takes no value or 'words': {text!r}")
    return "words"


def default_host(environ: Mapping[str, str]) -> str:
    return (environ.get(f"{ENV_PREFIX}HOST") or environ.get("GRADIO_SERVER_NAME")
            or ("0.0.0.0" if environ.get("SPACE_ID") else "127.0.0.1"))


def parse_args(argv: Optional[Sequence[str]] = None, environ: Optional[Mapping[str, str]] = None,
               data_dir: Path = SPACE_DATA_DIR) -> argparse.Namespace:
    """Flags, with defaults from VOICE_STUDIO_* variables and, when SPACE_ID is set, a Space's conventions."""
    from pipelines.speech.catalogue import INT8_METHODS

    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="app.py",
        description="Voice Studio: speech to text, video to subtitles and voice to pose-guided image, on OpenVINO. "
                    "Every flag but --share can also be set with the environment variable named after it.",
    )
    _serving_flags(parser.add_argument_group("serving"), environ)
    _limit_flags(parser.add_argument_group("limits and security"), environ)
    _model_flags(parser.add_argument_group("models"), environ, data_dir)
    _housekeeping_flags(parser.add_argument_group(
        "models folder housekeeping (these run, print and exit; no server)"))
    add_ray_flags(parser.add_argument_group(
        "Ray Serve: Whisper and image work in deployments across a Ray cluster (README, Ray Serve)"), environ)
    args = parser.parse_args(argv)
    if args.unused_days is not None and not (args.list_models or args.prune_models):
        parser.error("--unused-days goes with --list-models or --prune-models")
    if args.prepare_int8 and args.prepare is None:
        parser.error("--prepare-int8 goes with --prepare")
    try:  # VOICE_STUDIO_CONCURRENCY first, so that flags win
        from_env = [_concurrency_pair(p) for p in (environ.get(f"{ENV_PREFIX}CONCURRENCY") or "").split(",")
                    if p.strip()]
    except argparse.ArgumentTypeError as exc:
        parser.error(f"VOICE_STUDIO_CONCURRENCY: {exc}")
    args.concurrency = from_env + list(args.concurrency or [])
    if args.whisper_int8 not in INT8_METHODS:  # argparse checks the choices of flags, not of defaults
        parser.error(f"VOICE_STUDIO_WHISPER_INT8: invalid choice '{args.whisper_int8}' "
                     f"(choose from {', '.join(INT8_METHODS)})")
    args.ray_options = ray_options(args, environ, parser)
    if args.fast_decoder not in ("taesd", "vae"):
        parser.error(f"VOICE_STUDIO_FAST_DECODER: invalid choice '{args.fast_decoder}' (choose from taesd, vae)")
    args.space_id = environ.get("SPACE_ID") or None
    args.auth_env = environ.get(f"{ENV_PREFIX}AUTH") or None  # user:password lines, e.g. from a Space secret
    return args


def _serving_flags(group, environ: Mapping[str, str]) -> None:
    env = environ.get
    group.add_argument("--host", default=default_host(environ),
                       help="address to listen on (env VOICE_STUDIO_HOST; default 127.0.0.1, on a Hugging Face "
                            "Space 0.0.0.0; 0.0.0.0 serves the network and makes the app shared)")
    # String defaults go through each flag's type, so a bad environment value is reported like a bad flag.
    group.add_argument("--port", type=int,
                       default=env(f"{ENV_PREFIX}PORT") or env("GRADIO_SERVER_PORT") or str(DEFAULT_PORT),
                       help="port (env VOICE_STUDIO_PORT or GRADIO_SERVER_PORT; default 7860)")
    group.add_argument("--share", action="store_true", help="also open a public Gradio share link (shared)")
    group.add_argument("--queue-size", type=_positive(int),
                       default=env(f"{ENV_PREFIX}QUEUE_SIZE") or str(DEFAULT_QUEUE_SIZE),
                       help="requests that may wait at once, over all kinds of work; more are refused with "
                            "'busy, try again' (env VOICE_STUDIO_QUEUE_SIZE; default 64)")
    group.add_argument("--concurrency", type=_concurrency_pair, action="append", metavar="KIND=N", default=[],
                       help="requests of one kind run at once (for whisper and image: work slots; a few "
                            "more may get their model ready meanwhile; batch: batch subtitle jobs; live: live "
                            "caption streams), repeatable: whisper=2 image=1 pose=1 network=4 batch=1 live=4 "
                            "(env VOICE_STUDIO_CONCURRENCY='whisper=2,image=1')")
    group.add_argument("--preload", nargs="?", const=True, type=_preload_kind, metavar="words",
                       default="words" if env(f"{ENV_PREFIX}PRELOAD", "").strip().lower() == "words"
                       else _env_flag(environ, "PRELOAD"),
                       help="load the default Whisper model in the background at start; the server answers "
                            "at once; '--preload words' also loads its word-timestamp pipelines (subtitles, live "
                            "captions) (env VOICE_STUDIO_PRELOAD=1 or words)")


def _limit_flags(group, environ: Mapping[str, str]) -> None:
    env = environ.get
    group.add_argument("--max-upload-mb", type=_positive(float),
                       default=env(f"{ENV_PREFIX}MAX_UPLOAD_MB") or str(DEFAULT_MAX_UPLOAD_MB),
                       help="largest upload in MB (env VOICE_STUDIO_MAX_UPLOAD_MB; default 500)")
    group.add_argument("--max-audio-minutes", type=_positive(float),
                       default=env(f"{ENV_PREFIX}MAX_AUDIO_MINUTES") or str(DEFAULT_MAX_AUDIO_MINUTES),
                       help="longest audio or video accepted, in minutes (env VOICE_STUDIO_MAX_AUDIO_MINUTES; "
                            "default 180)")
    group.add_argument("--auth", action="append", default=[], metavar="USER:PASSWORD",
                       help="require a login, repeatable (visible in the process list: prefer --auth-file or "
                            "env VOICE_STUDIO_AUTH, one user:password a line)")
    group.add_argument("--auth-file", type=Path, default=Path(env(f"{ENV_PREFIX}AUTH_FILE")) if env(
                       f"{ENV_PREFIX}AUTH_FILE") else None, metavar="PATH",
                       help="file of user:password lines, # comments (env VOICE_STUDIO_AUTH_FILE)")
    group.add_argument("--allow-local-models", action="store_true", default=_env_flag(environ, "ALLOW_LOCAL_MODELS"),
                       help="on a shared server, still let users give local folders as models "
                            "(env VOICE_STUDIO_ALLOW_LOCAL_MODELS=1)")


def _model_flags(group, environ: Mapping[str, str], data_dir: Path) -> None:
    from pipelines.core.layout import default_models_dir
    from pipelines.image.convert import DEFAULT_LCM_LORA, DEFAULT_TAESD
    from pipelines.speech.catalogue import INT8_METHODS

    env = environ.get
    group.add_argument("--models-dir", type=Path, default=default_models_dir(environ, data_dir),
                       help="where converted OpenVINO models are cached (env VOICE_STUDIO_MODELS_DIR; default "
                            "models_cache/, on a Space with persistent storage /data/models_cache)")
    group.add_argument("--device", default=env(f"{ENV_PREFIX}DEVICE", "CPU"),
                       help="default OpenVINO device: CPU, GPU, NPU or AUTO (env VOICE_STUDIO_DEVICE; default CPU)")
    group.add_argument("--model", default=env(f"{ENV_PREFIX}MODEL", None),
                       help="default Whisper model: a listed id, a Hugging Face id or a local folder "
                            "(env VOICE_STUDIO_MODEL; default: the bundled multilingual whisper-base)")
    group.add_argument("--whisper-int8", choices=INT8_METHODS,
                       default=env(f"{ENV_PREFIX}WHISPER_INT8") or "decoder-weights",
                       help="how INT8 Whisper is made: decoder-weights (INT8 decoder weights, FP16 encoder: the "
                            "fastest and most accurate on AVX-512/AMX CPUs) or calibrated (NNCF post-training "
                            "quantization of the encoder, calibrated on speech) (env VOICE_STUDIO_WHISPER_INT8)")
    group.add_argument("--lcm-lora", default=env(f"{ENV_PREFIX}LCM_LORA") or DEFAULT_LCM_LORA,
                       help="the image tab's Fast mode LoRA: a Hugging Face id or a local folder / .safetensors file "
                            f"(env VOICE_STUDIO_LCM_LORA; default {DEFAULT_LCM_LORA})")
    group.add_argument("--taesd", default=env(f"{ENV_PREFIX}TAESD") or DEFAULT_TAESD,
                       help="the tiny decoder of live previews and Fast mode: a Hugging Face id or a local folder "
                            f"(env VOICE_STUDIO_TAESD; default {DEFAULT_TAESD})")
    group.add_argument("--fast-decoder", choices=("taesd", "vae"),
                       default=env(f"{ENV_PREFIX}FAST_DECODER") or "taesd",
                       help="Fast mode's final image: taesd (the tiny decoder, about 30x faster) or vae (the full "
                            "VAE, finer detail) (env VOICE_STUDIO_FAST_DECODER)")
    group.add_argument("--max-loaded-models", type=_positive(int),
                       default=env(f"{ENV_PREFIX}MAX_LOADED_MODELS") or "3",
                       help="Whisper pipelines kept loaded at once; subtitles use a second pipeline of a model, "
                            "with word timestamps (env VOICE_STUDIO_MAX_LOADED_MODELS; default 3)")


def _housekeeping_flags(group) -> None:
    group.add_argument("--prepare", nargs="*", metavar="MODEL",
                       help="convert these models into the models folder now, so that no request waits for "
                            "it, then exit: Whisper models (listed ids, Hugging Face ids, local folders), "
                            "'image' (Stable Diffusion + ControlNet) and 'pose' (OpenPose); none: the default "
                            "Whisper model (--model)")
    group.add_argument("--prepare-int8", action="store_true",
                       help="with --prepare: also quantize each model to INT8, as its first INT8 use would "
                            "(for 'image': calibration, minutes and several GB)")
    group.add_argument("--list-models", action="store_true",
                       help="list the models folder: each converted model with its size, when it was last "
                            "used and whether this install can still use it")
    group.add_argument("--prune-models", action="store_true",
                       help="remove what this install can no longer use: models converted by other library "
                            "versions (before an upgrade), leftovers of conversions that did not finish, and "
                            "OpenVINO's compile cache (rebuilt when a model next loads)")
    group.add_argument("--unused-days", type=_positive(float), metavar="DAYS",
                       help="with --list-models / --prune-models: also count as prunable the models not "
                            "used for DAYS days (they are converted again when next asked for)")


# --------------------------------------------------------------------------- services and UI
def make_services(args: argparse.Namespace):
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
    if getattr(args, "ray_options", None) is not None:  # models in Ray Serve replicas, this app their front end
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

        failed = [r for r in prepare_models(make_services(args), args.prepare, args.prepare_int8) if not r.ok]
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
