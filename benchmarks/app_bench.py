"""How long the app takes to be usable: page served, and first transcription with a cold and a warm cache.

    python benchmarks/app_bench.py                      # bundled base, FP16, a fresh models folder
    python benchmarks/app_bench.py --precision int8     # the same with INT8

Each start runs ``python app.py --port <free port> --models-dir <dir>`` as a user would and polls the
port until the page answers (HTTP 200 on ``/``). Then one transcription of a spoken English clip
(espeak-ng, ~9 s) goes through ``gradio_client`` to ``/transcribe`` with the chosen model:
- **cold**: the models folder is new, so the first request converts the bundled model (CTranslate2 ->
  Hugging Face -> OpenVINO IR, and INT8 compression with ``--precision int8``), compiles it and
  fills OpenVINO's compiled-model cache;
- **warm**: the app is stopped and started again on the same folder: the converted model and the
  compile cache are reused;
- **prepared**: a second new models folder, filled by ``python app.py --prepare MODEL`` (as the
  Dockerfile does at build time; ``--prepare-int8`` too with ``--precision int8``), then a first start.
A second transcription in each start shows the time once the model is loaded.

Prints a table and writes JSON (default benchmarks/results/app.json).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import machine  # benchmarks/machine.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
CLIP_TEXT = ("The history of the bicycle is a story of small improvements made by many people over a long time. "
             "The first machines had no pedals at all.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_page(url: str, proc: subprocess.Popen, timeout: float) -> float:
    """Seconds until ``url`` answers 200 (the process is polled so a crash is reported at once)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode} before serving the page")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return time.perf_counter()
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def one_start(label: str, models_dir: Path, clip: Path, args: argparse.Namespace, log_dir: Path) -> dict:
    from gradio_client import Client, handle_file

    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    log = (log_dir / f"{label}.log").open("w")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--models-dir", str(models_dir)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        page = wait_for_page(url, proc, args.timeout) - start
        client = Client(url, verbose=False)
        calls = []
        for _ in range(2):
            t = time.perf_counter()
            text, language, _segments, _files = client.predict(
                audio=handle_file(str(clip)), media_file=None, model=args.model, precision=args.precision,
                device="CPU", task="transcribe", language="en", timestamps=True, api_name="/transcribe")
            calls.append((time.perf_counter() - t, time.perf_counter() - start, text))
        return {"start": label, "page_s": page, "first_transcription_s": calls[0][0],
                "first_text_after_start_s": calls[0][1], "second_transcription_s": calls[1][0],
                "text": calls[0][2], "language": language}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the app's own process group (start_new_session)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def prepare(models_dir: Path, args: argparse.Namespace, log_path: Path) -> float:
    """Seconds of ``python app.py --prepare MODEL`` into ``models_dir`` (a new folder)."""
    command = [sys.executable, "app.py", "--prepare", args.model, "--models-dir", str(models_dir)]
    if args.precision == "int8":
        command.append("--prepare-int8")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    with log_path.open("w") as log:
        subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled/whisper-base")
    parser.add_argument("--precision", default="fp16", choices=("fp16", "int8"))
    parser.add_argument("--timeout", type=float, default=600.0, help="longest wait for the page, seconds")
    parser.add_argument("--models-dir", type=Path, help="models folder to start cold in (default: a new temporary one)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "app.json")
    args = parser.parse_args()
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is needed to speak the test clip (apt-get install espeak-ng)")

    with tempfile.TemporaryDirectory(prefix="app-bench-") as tmp:
        tmp = Path(tmp)
        models_dir = args.models_dir or tmp / "models_cache"
        if models_dir.exists() and any(models_dir.iterdir()):
            raise SystemExit(f"{models_dir} is not empty: the cold start needs a fresh models folder")
        clip = tmp / "clip.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(clip), CLIP_TEXT], check=True)
        rows = [one_start(label, models_dir, clip, args, tmp) for label in ("cold", "warm")]
        prepare_s = prepare(tmp / "models_prepared", args, tmp / "prepare.log")
        rows.append(one_start("prepared", tmp / "models_prepared", clip, args, tmp))
        logs = {label: (tmp / f"{label}.log").read_text()[-2000:] for label in ("cold", "warm", "prepare", "prepared")}

    host = machine.describe()
    title = (f"app.py start-up, {args.model} {args.precision}, CPU, {time.strftime('%Y-%m-%d %H:%M')}, "
             f"{machine.summary(host)}")
    lines = ["| start | page served s | first transcription s | first text after start s | second transcription s |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['start']} | {r['page_s']:.1f} | {r['first_transcription_s']:.1f} | "
                     f"{r['first_text_after_start_s']:.1f} | {r['second_transcription_s']:.2f} |")
    table = "\n".join(lines)
    table += f"\n\n`python app.py --prepare {args.model}` before the prepared start: {prepare_s:.1f} s."
    print(f"\n{title}\n{table}")
    for r in rows:
        print(f"{r['start']}: {r['language']!r} {r['text'][:100]!r}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"title": title, "command": " ".join(["python", "benchmarks/app_bench.py"] + sys.argv[1:]),
                                    "machine": host, "table": table, "results": rows, "prepare_s": prepare_s,
                                    "logs_tail": logs}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
