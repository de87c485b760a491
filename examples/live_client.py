#!/usr/bin/env python3
"""Live captions from a program: stream audio to a running Voice Studio and print the captions as they
settle (the WebSocket route ``/live/ws``; README, "Live captions from a program").

    python examples/live_client.py speech.wav                          # sent in real time, 0.5 s chunks
    python examples/live_client.py speech.wav --language de --task translate
    python examples/live_client.py speech.wav --fast --json            # as fast as it can; one JSON object
    python examples/live_client.py --server https://host:7860/ --user ann speech.wav

Only ``websockets`` is needed (gradio_client installs it). The audio is a 16-bit WAV file at any rate,
mono or stereo, sent as it would be recorded; any program that records can send its PCM chunks the
same way. Confirmed text (final) is printed as it grows, the tentative tail in [brackets]; at the end
the whole text (the recording transcribed as a file) and its timed segments. A server with a login:
``--user NAME`` and the password in VOICE_STUDIO_PASSWORD (or typed when asked).
"""
from __future__ import annotations

import argparse
import array
import base64
import getpass
import json
import os
import sys
import threading
import time
import wave
from typing import Optional

DEFAULT_SERVER = os.environ.get("VOICE_STUDIO_SERVER", "http://127.0.0.1:7860/")


def read_wav(path: str) -> tuple[array.array, int]:
    """16-bit samples of a WAV file, mixed down to mono, and its sample rate."""
    with wave.open(path, "rb") as fh:
        if fh.getsampwidth() != 2:
            raise SystemExit(f"error: {path} is not 16-bit PCM (convert it: ffmpeg -i IN -ac 1 -c:a pcm_s16le OUT.wav)")
        channels, rate = fh.getnchannels(), fh.getframerate()
        samples = array.array("h", fh.readframes(fh.getnframes()))
    if sys.byteorder == "big":
        samples.byteswap()
    if channels > 1:
        samples = array.array("h", (sum(samples[k:k + channels]) // channels
                                    for k in range(0, len(samples), channels)))
    return samples, rate


def live_url(server: str) -> str:
    base = server.rstrip("/")
    for web, socket in (("https://", "wss://"), ("http://", "ws://")):
        if base.startswith(web):
            base = socket + base[len(web):]
    return base + "/live/ws"


def _show(update: dict, out) -> None:
    line = update["confirmed"][-90:] + (f" [{update['tentative'][-40:]}]" if update["tentative"] else "")
    note = f"  ({update['message']})" if update.get("message") else ""
    print(f"\r\033[K{line}{note}", end="", file=out, flush=True)


def stream(path: str, server: str = DEFAULT_SERVER, settings: Optional[dict] = None, chunk: float = 0.5,
           realtime: bool = True, auth: Optional[tuple[str, str]] = None, out=None) -> dict:
    """Send ``path`` to the server in chunks; returns {"updates": [captions...], "final": {...}}.
    ``out``: where captions are printed as they come (None: not printed)."""
    from websockets.sync.client import connect

    samples, rate = read_wav(path)
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    updates: list[dict] = []
    final: dict = {}
    with connect(live_url(server), additional_headers=headers, max_size=None, open_timeout=30) as ws:
        ws.send(json.dumps({**(settings or {}), "sample_rate": rate}))
        answer = json.loads(ws.recv())
        if answer.get("type") != "ready":
            raise SystemExit(f"error: {answer.get('message', answer)}")

        def receive() -> None:
            for message in ws:
                update = json.loads(message)
                if update["type"] == "captions":
                    updates.append(dict(update, received_at=time.monotonic()))
                    if out is not None:
                        _show(update, out)
                elif update["type"] in ("final", "error"):
                    final.update(update)
                    return

        reader = threading.Thread(target=receive, daemon=True)
        reader.start()
        step, start = max(1, int(chunk * rate)), time.monotonic()
        for first in range(0, len(samples), step):
            if realtime:  # each chunk when it would have been recorded
                time.sleep(max(0.0, start + (first + step) / rate - time.monotonic()))
            ws.send(samples[first:first + step].tobytes())
        ws.send("end")
        reader.join(timeout=3600)
    if final.get("type") == "error":
        raise SystemExit(f"error: {final['message']}")
    return {"updates": updates, "final": final}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wav", help="a 16-bit WAV file (any rate, mono or stereo)")
    parser.add_argument("--server", default=DEFAULT_SERVER, help=f"the app's address (default {DEFAULT_SERVER})")
    parser.add_argument("--model", help="Whisper model (default: the server's)")
    parser.add_argument("--precision", choices=("fp16", "int8"), help="default: the Live mode's (int8)")
    parser.add_argument("--device", help="OpenVINO device (default: the server's)")
    parser.add_argument("--task", choices=("transcribe", "translate"), default="transcribe")
    parser.add_argument("--language", default="auto", help="spoken language code, or auto (default)")
    parser.add_argument("--chunk", type=float, default=0.5, help="seconds of audio per message (default 0.5)")
    parser.add_argument("--fast", action="store_true", help="send as fast as possible instead of in real time")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end instead of text")
    parser.add_argument("--user", help="login name (password: env VOICE_STUDIO_PASSWORD, or asked)")
    args = parser.parse_args(argv)
    auth = None
    if args.user:
        auth = (args.user, os.environ.get("VOICE_STUDIO_PASSWORD") or getpass.getpass(f"password for {args.user}: "))
    settings = {k: v for k, v in dict(model=args.model, precision=args.precision, device=args.device,
                                      task=args.task, language=args.language).items() if v}
    result = stream(args.wav, args.server, settings, args.chunk, not args.fast, auth,
                    out=None if args.json else sys.stdout)
    final = result["final"]
    if args.json:
        print(json.dumps({"captions": [u["confirmed"] for u in result["updates"]], **final}, ensure_ascii=False))
    else:
        print(f"\n\nwhole text ({final.get('language')}, {final.get('duration')} s):\n{final.get('text')}")
        for start, end, text in final.get("segments", []):
            print(f"  {start:7.2f} {end:7.2f}  {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
