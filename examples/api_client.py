#!/usr/bin/env python3
"""Call a running Voice Studio server from the command line, through its named API endpoints.

    python examples/api_client.py transcribe speech.mp3 --precision int8
    python examples/api_client.py transcribe speech.mp3 --word-timestamps --vtt-word-timing --out subs/
    python examples/api_client.py compare speech.mp3          # FP16 vs INT8: both texts and times
    python examples/api_client.py --server http://127.0.0.1:7860/ subtitles --video talk.mp4 --burn-in --out subs/
    python examples/api_client.py subtitles --url https://youtu.be/VIDEO_ID
    python examples/api_client.py subtitles-batch talk1.mp4 talk2.mp4 --url https://www.youtube.com/playlist?list=ID --out subs/
    python examples/api_client.py voice-prompt prompt_de.wav
    python examples/api_client.py extract-pose person.jpg --out poses/
    python examples/api_client.py generate --prompt "a dancer on a beach" --pose poses/skeleton.png --steps 20
    python examples/api_client.py generate --prompt "a dancer on a beach" --pose poses/skeleton.png --mode fast

Only gradio_client is needed (``pip install gradio_client``). Options left out take the server's
defaults (its default Whisper model, device and so on). ``--json`` prints one JSON object instead of
text; ``--out DIR`` copies the files the server returned into DIR. A server with a login: give
``--user NAME`` and the password in VOICE_STUDIO_PASSWORD (or type it when asked).
"""
from __future__ import annotations

import argparse
import getpass
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable, Optional

DEFAULT_SERVER = os.environ.get("VOICE_STUDIO_SERVER", "http://127.0.0.1:7860/")


def _given(**kwargs: Any) -> dict:
    """Only the parameters the user set: the server's defaults fill the rest."""
    return {k: v for k, v in kwargs.items() if v is not None}


def _file(path: Optional[str]):
    from gradio_client import handle_file

    if path is None:
        return None
    if not Path(path).is_file():
        raise SystemExit(f"error: no such file: {path}")
    return handle_file(path)


def _paths(value: Any) -> list[str]:
    """File paths in an endpoint's output (a path, a list of paths, gallery items, {"path": ...})."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if Path(value).is_file() else []
    if isinstance(value, dict):
        for key in ("path", "video", "image", "name"):
            if key in value:
                return _paths(value[key])
        return []
    if isinstance(value, (list, tuple)):
        return [p for item in value for p in _paths(item)]
    return []


def _copy_out(paths: Iterable[str], out: Optional[Path]) -> list[str]:
    paths = list(dict.fromkeys(paths))
    if out is None:
        return paths
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in paths:
        target = out / Path(path).name
        shutil.copyfile(path, target)
        copied.append(str(target))
    return copied


# --------------------------------------------------------------------------- commands
def transcribe(client, args) -> dict:
    text, language, segments, files = client.predict(
        audio=_file(args.file), media_file=None,
        **_given(model=args.model, precision=args.precision, device=args.device, task=args.task,
                 language=args.language, timestamps=False if args.no_timestamps else None,
                 word_timestamps=args.word_timestamps or None, vtt_word_timing=args.vtt_word_timing or None),
        api_name="/transcribe")
    rows = (segments or {}).get("data", []) if isinstance(segments, dict) else []
    result = {"text": text, "language": language,
              "segments": [{"start": float(r[0]), "end": float(r[1]), "text": r[2]} for r in rows]}
    if args.word_timestamps or args.vtt_word_timing:  # the words are in the JSON file
        data = json.loads(Path(next(p for p in _paths(files) if p.endswith(".json"))).read_text(encoding="utf-8"))
        result["words"] = [w for s in data.get("segments", []) for w in s.get("words", [])]
    return {**result, "files": _copy_out(_paths(files), args.out)}


def subtitles(client, args) -> dict:
    player, cues, files = client.predict(
        url=args.url or "", video_file=_file(args.video),
        **_given(model=args.model, precision=args.precision, device=args.device, task=args.task,
                 language=args.language, max_line_chars=args.max_line_chars, max_duration=args.max_duration),
        burn_in=args.burn_in, soft_track=args.soft_track, api_name="/subtitles")
    return {"subtitles": cues, "files": _copy_out(_paths(files), args.out)}


def subtitles_batch(client, args) -> dict:
    """Several files and/or links at once; prints each item's line as the server reports it."""
    job = client.submit(
        files=[_file(f) for f in args.files] or None, links="\n".join(args.url) or None,
        **_given(model=args.model, precision=args.precision, device=args.device, task=args.task,
                 language=args.language, max_line_chars=args.max_line_chars, max_duration=args.max_duration),
        api_name="/subtitles_batch")
    shown = None
    for table, _archive, summary in job:  # each update of the items' table while they run
        if summary != shown and not args.json:
            print(summary, file=sys.stderr)
            shown = summary
    table, archive, summary = job.result()
    items = [dict(zip(table["headers"], row)) for row in table["data"]]
    return {"summary": summary, "items": items, "files": _copy_out(_paths(archive), args.out)}


def compare(client, args) -> dict:
    fp16_text, fp16_seconds, int8_text, int8_seconds, summary = client.predict(
        audio=_file(args.file), media_file=None,
        **_given(model=args.model, device=args.device, task=args.task, language=args.language),
        api_name="/transcribe_compare")
    return {"fp16": {"text": fp16_text, "seconds": fp16_seconds}, "int8": {"text": int8_text, "seconds": int8_seconds},
            "summary": summary}


def voice_prompt(client, args) -> dict:
    prompt, language, said = client.predict(
        audio=_file(args.file), **_given(model=args.model, device=args.device, precision=args.precision),
        api_name="/voice_prompt")
    return {"prompt": prompt, "language": language, "said": said}


def extract_pose(client, args) -> dict:
    skeleton = client.predict(photo=_file(args.photo), **_given(device=args.device), api_name="/extract_pose")
    return {"pose": _copy_out(_paths(skeleton), args.out)}


def generate(client, args) -> dict:
    fast = args.mode == "fast"  # Fast mode's own defaults (the server's are Quality's: 20 steps, guidance 7.5)
    steps = args.steps if args.steps is not None or not fast else 4
    guidance = args.guidance_scale if args.guidance_scale is not None or not fast else 1.0
    gallery, summary = client.predict(
        prompt=args.prompt, pose=_file(args.pose),
        **_given(negative_prompt=args.negative_prompt, steps=steps, guidance_scale=guidance,
                 seed=args.seed, controlnet_scale=args.controlnet_scale, num_images=args.num_images,
                 width=args.width, height=args.height, scheduler=args.scheduler, sd_model=args.sd_model,
                 controlnet_model=args.controlnet_model, device=args.device, precision=args.precision,
                 mode=args.mode),
        api_name="/generate_image")
    return {"summary": summary, "images": _copy_out(_paths(gallery), args.out)}


def show(result: dict) -> str:
    """Plain text for a person: the main text first, then the files."""
    lines = [f"{key.upper()} ({result[key]['seconds']:.2f} s): {result[key]['text']}" for key in ("fp16", "int8")
             if isinstance(result.get(key), dict)]
    for key in ("text", "subtitles", "prompt", "summary"):
        if result.get(key):
            lines.append(str(result[key]))
    if result.get("language"):
        lines.append(f"language: {result['language']}")
    if result.get("said"):
        lines.append(f"said: {result['said']}")
    lines += [f"{w['start']:8.2f} {w['end']:8.2f}  {w['text']}" for w in result.get("words", [])]
    lines += [f"{item['#']}. {item['status']}: {item['source']} ({item['details']})" for item in result.get("items", [])]
    for key in ("files", "images", "pose"):
        lines += [f"file: {p}" for p in result.get(key, [])]
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="api_client.py", description="Call a Voice Studio server's API.")
    parser.add_argument("--server", default=DEFAULT_SERVER,
                        help="the server's URL (env VOICE_STUDIO_SERVER; default http://127.0.0.1:7860/)")
    parser.add_argument("--user", help="login name, when the server asks for one (password: env "
                                       "VOICE_STUDIO_PASSWORD, or typed when asked)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--out", type=Path, help="copy the returned files into this folder")
    commands = parser.add_subparsers(dest="command", required=True)
    # --json and --out also work after the command (`subtitles --url ... --out subs/`); not given there,
    # they keep the value given before it.
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="as before the command")
    after.add_argument("--out", type=Path, default=argparse.SUPPRESS, help="as before the command")

    def command(name: str, help: str) -> argparse.ArgumentParser:  # noqa: A002 - argparse's own name
        return commands.add_parser(name, parents=[after], help=help)

    def whisper_options(p: argparse.ArgumentParser, task: bool = True, precision: bool = True) -> None:
        p.add_argument("--model", help="Whisper model (a listed id or a Hugging Face id; default: the server's)")
        p.add_argument("--device", help="OpenVINO device (CPU, GPU, NPU, AUTO)")
        if precision:
            p.add_argument("--precision", choices=["fp16", "int8"],
                           help="Whisper precision (default fp16; the first INT8 use quantizes the model)")
        if task:
            p.add_argument("--task", choices=["transcribe", "translate"])
            p.add_argument("--language", help="spoken language code (en, de, ...) or auto")

    p = command("transcribe", "speech to text (/transcribe)")
    p.add_argument("file", help="an audio or video file")
    whisper_options(p)
    p.add_argument("--no-timestamps", action="store_true", help="no timed segments")
    p.add_argument("--word-timestamps", action="store_true", help="the time of every word (slower)")
    p.add_argument("--vtt-word-timing", action="store_true",
                   help="tag each word of the .vtt with its start, karaoke-style (implies --word-timestamps)")
    p.set_defaults(run=transcribe)

    p = command("compare", "the same audio through the FP16 and the INT8 Whisper, timed (/transcribe_compare)")
    p.add_argument("file", help="an audio or video file")
    whisper_options(p, precision=False)
    p.set_defaults(run=compare)

    p = command("subtitles", "video to subtitles (/subtitles)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--url", help="a YouTube link")
    source.add_argument("--video", help="a video (or audio) file")
    whisper_options(p)
    p.add_argument("--max-line-chars", type=int)
    p.add_argument("--max-duration", type=float, help="longest time one subtitle stays on screen, seconds")
    p.add_argument("--burn-in", action="store_true", help="also return a copy with the subtitles burned in")
    p.add_argument("--soft-track", action="store_true", help="also return a copy with a subtitle track")
    p.set_defaults(run=subtitles)

    p = command("subtitles-batch", "subtitles for several files and/or YouTube links at once; a zip of them "
                                   "(/subtitles_batch)")
    p.add_argument("files", nargs="*", help="video or audio files")
    p.add_argument("--url", action="append", default=[], help="a YouTube link or playlist link (repeatable)")
    whisper_options(p)
    p.add_argument("--max-line-chars", type=int)
    p.add_argument("--max-duration", type=float, help="longest time one subtitle stays on screen, seconds")
    p.set_defaults(run=subtitles_batch)

    p = command("voice-prompt", "spoken prompt in any language -> English prompt (/voice_prompt)")
    p.add_argument("file", help="a recording of the spoken prompt")
    whisper_options(p, task=False)
    p.set_defaults(run=voice_prompt)

    p = command("extract-pose", "OpenPose skeleton of a photo (/extract_pose)")
    p.add_argument("photo")
    p.add_argument("--device")
    p.set_defaults(run=extract_pose)

    p = command("generate", "Stable Diffusion 1.5 + ControlNet OpenPose (/generate_image)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--pose", required=True, help="a pose skeleton image (from extract-pose)")
    p.add_argument("--negative-prompt")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--seed", type=int, help="-1 = random")
    p.add_argument("--controlnet-scale", type=float)
    p.add_argument("--num-images", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--scheduler", help="UniPC, Euler a, DPM++ 2M, DDIM, PNDM, LMS")
    p.add_argument("--sd-model")
    p.add_argument("--controlnet-model")
    p.add_argument("--device")
    p.add_argument("--precision", choices=["fp16", "int8"],
                   help="image models' precision (default fp16; the first INT8 use quantizes them)")
    p.add_argument("--mode", choices=["fast", "quality"],
                   help="fast: LCM-LoRA, 4 steps, guidance 1, seconds on a CPU; quality (the default): 20 steps")
    p.set_defaults(run=generate)
    return parser


def connect(server: str, user: Optional[str]):
    from gradio_client import Client

    auth = None
    if user:
        password = os.environ.get("VOICE_STUDIO_PASSWORD") or getpass.getpass(f"password for {user}: ")
        auth = (user, password)
    return Client(server, auth=auth, verbose=False)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        client = connect(args.server, args.user)
        result = args.run(client, args)
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - the server's message is what the user needs
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, ensure_ascii=False, indent=2) if args.json else show(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
