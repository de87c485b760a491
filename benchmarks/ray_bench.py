"""Ray Serve mode against the embedded app: batch subtitle throughput and the overhead of a request
through Serve, with the real bundled Whisper base (FP16, CPU), in one process and one run.

- **throughput**: the batch subtitle job (``pipelines.subtitles.batch``: each item's audio extracted
  with ffmpeg on the front end, transcribed with word timestamps, SRT/WebVTT written) over ``--items``
  clips of espeak-ng speech (~30 s each), in minutes of audio per wall minute, for:
  embedded (the app as it runs: 2 work slots, OpenVINO's default threads, batch width 2) and Ray with
  1 replica x 1 CPU, 2 replicas x 1 CPU (one OpenVINO thread each, pinning off; 1 work slot each) and
  1 replica x 2 CPUs with 2 slots (the embedded app's setup, in a replica), each batch as wide as its
  replicas take (replicas x max_ongoing_requests, which is slots + 1). The systems run in
  turns, ``--rounds`` times; CPU seconds are those of this process and every process under it (the
  local Ray instance's included), over the batch.
- **overhead**: the same short clip transcribed ``--calls`` times by the embedded service and through
  a deployment handle (1 replica x 2 CPUs, the embedded threads), interleaved; the median added latency,
  and the client's time minus the replica's own time for the call (what Serve and the transport add).

    python benchmarks/ray_bench.py [--rounds 3] [--items 8] [--calls 40] [--models-dir models_cache]

Prints a Markdown table and writes JSON (benchmarks/results/ray_bench.json) with the CPU and the load.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import machine  # benchmarks/machine.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MODEL = "bundled/whisper-base"
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.", "A journey of a thousand miles begins with a single step.",
    "Please call me back after lunch tomorrow.", "Our train leaves from platform seven at noon.",
    "The children played football in the park after school.", "My brother bought a new car last week.",
    "We will meet in the library on Monday morning.", "Please turn off the lights when you leave the room.",
]
RAY_SYSTEMS = [  # label, replicas, CPUs each, work slots each
    ("Ray, 1 replica x 1 CPU", 1, 1.0, 1),
    ("Ray, 2 replicas x 1 CPU", 2, 1.0, 1),
    ("Ray, 1 replica x 2 CPUs, 2 slots", 1, 2.0, 2),
]


def speech_items(folder: Path, count: int) -> list[Path]:
    """``count`` WAV files of ~30 s: the sentences, each file starting at another one, with short pauses."""
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    spoken = []
    for index, text in enumerate(SENTENCES):
        path = folder / f"s{index}.wav"
        subprocess.run(["espeak-ng", "-v", "en", "-s", "150", "-w", str(path), text], check=True)
        samples, rate = sf.read(str(path), dtype="float32")
        spoken.append((samples, rate))
    items = []
    for item in range(count):
        parts = []
        for k in range(12):
            samples, rate = spoken[(item + k) % len(spoken)]
            parts += [samples, np.zeros(int(0.6 * rate), np.float32)]
        path = folder / f"item{item:02d}.wav"
        sf.write(str(path), np.concatenate(parts), spoken[0][1])
        items.append(path)
    return items


def tree_cpu_seconds() -> float:
    """user + system CPU seconds of this process and every living process under it (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    mine, todo = set(), [os.getpid()]
    while todo:
        pid = todo.pop()
        mine.add(pid)
        todo += [child for child, parent in parents.items() if parent == pid and child not in mine]
    return sum(times.get(pid, 0.0) for pid in mine)


def run_batch(whisper, items: list[Path], width: int, work: Path) -> dict:
    from pipelines.core.types import ModelChoice
    from pipelines.speech.types import TranscribeOptions
    from pipelines.subtitles.batch import BatchItem, BatchJob, subtitle_item
    from pipelines.subtitles.job import SubtitleRequest

    request = SubtitleRequest(choice=ModelChoice(model=MODEL), options=TranscribeOptions(word_timestamps=True))
    batch = [BatchItem(n, p.name, path=p) for n, p in enumerate(items, start=1)]
    job = BatchJob(batch, lambda item, folder, part: subtitle_item(whisper, request, item, folder, part),
                   Path(tempfile.mkdtemp(dir=work)), width)
    cpu, started = tree_cpu_seconds(), time.perf_counter()
    job.run()
    wall = time.perf_counter() - started
    statuses = job.snapshot()
    failed = [s.message for s in statuses if s.state != "done"]
    if failed:
        raise SystemExit(f"batch items failed: {failed}")
    texts = [Path(s.files["srt"]).read_text() for s in statuses]
    return {"wall_s": wall, "cpu_s": tree_cpu_seconds() - cpu, "srt": texts}


def deploy_whisper(models_dir: Path, replicas: int, cpus: float, slots: int = 1):
    """The whisper application alone on the local instance (no image replica: its CPUs are the whisper's)."""
    from ray import serve

    from pipelines.serve.client import ReplicaBook
    from pipelines.serve.deployments import build
    from pipelines.serve.remote import RemoteWhisper

    args = {"models_dir": str(models_dir), "slots": slots, "threads": "auto"}
    options = {"num_replicas": replicas, "max_ongoing_requests": slots + 1, "ray_actor_options": {"num_cpus": cpus}}
    serve.run(build("whisper", args, options), name="whisper", route_prefix=None)
    remote = RemoteWhisper(serve.get_deployment_handle("whisper", app_name="whisper"), ReplicaBook())
    from pipelines.core.types import ModelChoice

    remote.load(ModelChoice(model=MODEL), words=True)  # every replica loads the word-timestamp pipeline
    return remote


def audio_minutes(items: list[Path]) -> float:
    import soundfile as sf

    return sum(sf.info(str(p)).duration for p in items) / 60.0


def overhead(embedded, remote, clip: np.ndarray, calls: int) -> dict:
    from pipelines.core.types import ModelChoice
    from pipelines.speech.types import TranscribeOptions

    choice, options = ModelChoice(model=MODEL), TranscribeOptions()
    for _ in range(3):  # warm both
        embedded.transcribe(clip, choice, options)
        remote.transcribe(clip, choice, options)
    local, through, inside = [], [], []
    for index in range(calls):
        order = (("local", embedded), ("ray", remote)) if index % 2 == 0 else (("ray", remote), ("local", embedded))
        for label, service in order:
            started = time.perf_counter()
            service.transcribe(clip, choice, options)
            (local if label == "local" else through).append(time.perf_counter() - started)
            if label == "ray":
                inside.append(remote.call.last.info["replica_seconds"])
    ms = lambda xs: round(statistics.median(xs) * 1000, 1)  # noqa: E731
    return {"calls": calls, "clip_s": round(clip.size / 16000, 2), "embedded_median_ms": ms(local),
            "ray_median_ms": ms(through), "added_median_ms": round(ms(through) - ms(local), 1),
            "paired_added_median_ms": ms([r - e for e, r in zip(local, through)]),
            "client_minus_replica_median_ms": ms([t - i for t, i in zip(through, inside)]),
            "client_minus_replica_p90_ms": round(float(np.percentile([t - i for t, i in zip(through, inside)], 90))
                                                 * 1000, 1)}


def table(results: dict) -> str:
    lines = ["| system | batch wall s (median of rounds) | audio min per wall min | vs embedded | CPU s per batch |"
             " all rounds, wall s |", "|---|---|---|---|---|---|"]
    base = statistics.median(results["rows"]["embedded (2 slots)"]["wall_s"])
    for label, row in results["rows"].items():
        wall = statistics.median(row["wall_s"])
        lines.append(f"| {label} | {wall:.2f} | {results['audio_minutes'] / (wall / 60):.1f} | {base / wall:.2f}x | "
                     f"{statistics.median(row['cpu_s']):.1f} | {', '.join(f'{w:.1f}' for w in row['wall_s'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models_cache")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ray_bench.json")
    args = parser.parse_args()
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="vsr-bench-", dir="/tmp"))
    from pipelines.serve.cluster import connect
    from pipelines.serve.flags import RayOptions
    from pipelines.services import Services, Settings

    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    items = speech_items(work / "items", args.items)
    results = {"command": " ".join(["python", "benchmarks/ray_bench.py"] + sys.argv[1:]), "machine": machine.describe(),
               "when": time.strftime("%Y-%m-%d %H:%M"), "loadavg_start": os.getloadavg(), "items": args.items,
               "audio_minutes": round(audio_minutes(items), 2), "rows": {}}
    embedded = Services(Settings(models_dir=args.models_dir))
    run_batch(embedded.whisper, items[:2], embedded.batch_width, work)  # converts and loads once
    connect(RayOptions())
    from ray import serve

    serve.start(proxy_location="Disabled")  # as the app: handles only, no HTTP proxy (nor its port 8000)
    srts: dict[str, list[str]] = {}
    for round_index in range(args.rounds):
        for label, replicas, cpus, slots in [("embedded (2 slots)", 0, 0.0, 2)] + RAY_SYSTEMS:
            if replicas:  # deployed for this turn (it replaces the last one), each replica loaded
                whisper, width = deploy_whisper(args.models_dir, replicas, cpus, slots), replicas * (slots + 1)
            else:
                whisper, width = embedded.whisper, embedded.batch_width
            out = run_batch(whisper, items, width, work)
            row = results["rows"].setdefault(label, {"wall_s": [], "cpu_s": []})
            row["wall_s"].append(round(out["wall_s"], 2))
            row["cpu_s"].append(round(out["cpu_s"], 1))
            srts[label] = out["srt"]
            print(f"round {round_index + 1}: {label}: {out['wall_s']:.2f} s, {out['cpu_s']:.1f} CPU s "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    results["same_subtitles_as_embedded"] = {label: sum(a == b for a, b in zip(s, srts["embedded (2 slots)"]))
                                             for label, s in srts.items()}
    clip_path = work / "items" / "s2.wav"
    from pipelines.speech.audio import load_audio

    results["overhead"] = overhead(embedded.whisper, deploy_whisper(args.models_dir, 1, 2.0), load_audio(clip_path),
                                   args.calls)
    results["loadavg_end"] = os.getloadavg()
    title = (f"Batch subtitles, {args.items} items, {results['audio_minutes']:.1f} min of speech, {MODEL} FP16, "
             f"{results['when']}, {machine.summary(results['machine'])}, load {results['loadavg_start'][0]:.1f}"
             f"-{results['loadavg_end'][0]:.1f}")
    results["table"] = table(results)
    print(f"\n{title}\n{results['table']}\n\noverhead per request: {json.dumps(results['overhead'])}")
    print(f"subtitles identical to embedded (of {args.items}): {results['same_subtitles_as_embedded']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"title": title, **results}, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
