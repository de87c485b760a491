"""The command line of app.py: its flags, each with a VOICE_STUDIO_* environment variable (and, when
SPACE_ID is set, a Hugging Face Space's conventions). Standard library only at import, so
``python app.py --help`` answers at once; the model packages are read only while parsing.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

from pipelines.core.layout import SPACE_DATA_DIR  # standard library only: importing does no work
from pipelines.serve.flags import add_ray_flags, ray_options  # standard library only

ENV_PREFIX = "VOICE_STUDIO_"
DEFAULT_PORT = 7860
DEFAULT_QUEUE_SIZE = 64
DEFAULT_MAX_UPLOAD_MB = 500.0
DEFAULT_MAX_AUDIO_MINUTES = 180.0
CONCURRENCY_KINDS = ("whisper", "image", "pose", "network", "batch", "live")
TRUE_WORDS = {"1", "true", "yes", "on"}
FAST_DECODERS = ("taesd", "vae")  # --fast-decoder (pipelines.image.request.DECODERS; not imported: --help stays quick)


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
    if args.fast_decoder not in FAST_DECODERS:
        parser.error(f"VOICE_STUDIO_FAST_DECODER: invalid choice '{args.fast_decoder}' "
                     f"(choose from {', '.join(FAST_DECODERS)})")
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
    group.add_argument("--fast-decoder", choices=FAST_DECODERS,
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
