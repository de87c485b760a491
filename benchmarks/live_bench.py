"""Live captions, replayed: a spoken paragraph streamed in real time through the app's live runner.

The speech is espeak-ng reading tests/data/speech_clips.json's paragraph (63 s, 167 words; 2 s of
silence before, 3 s after), with each word's end in the audio from espeak's own events
(tests/spoken_words.py). It goes through ``LiveService.open(...).push`` (the runner behind the Speech
tab's Live mode and the /live/ws route) in ``--chunk`` s pieces, each at the moment it would have been
recorded; an observer takes the captions each time they move, as the WebSocket route sends them (the
page shows them with its next 0.1 s microphone chunk). Per reference word that the final confirmed
text has right: the delay from its end in the audio to its first appearance as **confirmed** text and
as **shown** (confirmed or tentative) text. Also: decode seconds per audio second ("processing", a
decode's wall time, waiting for the live slot included), the process's CPU seconds per audio second,
the live (confirmed) WER, and the final WER (the recording transcribed as a file on stop) against a
file transcription of the same audio. Per decode, GenAI's split: features, encoder, decoder, word timing.

    python benchmarks/live_bench.py                       # the default configs, 2 runs each (medians)
    python benchmarks/live_bench.py --configs int8-1.0 --repeat 1
    python benchmarks/live_bench.py --contention          # also: a stream beside two file transcriptions

Prints tables and writes JSON (default benchmarks/results/live-<model>.json).
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import machine  # noqa: E402  (benchmarks/machine.py, beside this script)

SR = 16000
LEAD, TAIL = 2.0, 3.0
TARGETS = {"confirmed_median": 2.0, "confirmed_p90": 3.5, "shown_median": 1.0, "processing": 0.6, "final_wer": 0.01}
#: name -> (precision, LiveConfig fields)
CONFIGS = {
    "fp16-1.0": ("fp16", {"min_new_audio": 1.0}),
    "int8-1.0": ("int8", {"min_new_audio": 1.0}),
    "fp16-0.5": ("fp16", {"min_new_audio": 0.5}),
    "int8-0.5": ("int8", {"min_new_audio": 0.5}),
    "int8-1.0-no-pause-decode": ("int8", {"min_new_audio": 1.0, "decode_at_pause": False}),
    "int8-1.0-trim15": ("int8", {"min_new_audio": 1.0, "trim_after": 15.0}),
    "int8-1.0-no-prompt": ("int8", {"min_new_audio": 1.0, "prompt_words": 0}),
}


def paragraph() -> tuple[np.ndarray, list[dict], str]:
    from conftest import SPEECH_CLIPS
    from spoken_words import word_times

    clip = SPEECH_CLIPS["english_long"]
    speech, words = word_times(clip["text"], clip["voice"], clip["speed"])
    for w in words:
        w["start"] += LEAD
        w["end"] += LEAD
    audio = np.concatenate([np.zeros(int(LEAD * SR), np.float32), speech, np.zeros(int(TAIL * SR), np.float32)])
    return audio, words, clip["text"]


def normalised(text: str) -> list[str]:
    from conftest import normalised_words

    return normalised_words(text).split()


def matches(reference: list[str], hypothesis: list[str]) -> dict[int, int]:
    """Reference word index -> hypothesis word index, for the words that match (difflib)."""
    out = {}
    for block in difflib.SequenceMatcher(a=reference, b=hypothesis, autojunk=False).get_matching_blocks():
        out.update({block.a + k: block.b + k for k in range(block.size)})
    return out


# --------------------------------------------------------------------------- per-decode profile
class Recorder:
    """A WhisperPipeline wrapper keeping each generate()'s perf metrics (GenAI's own split of the time)."""

    def __init__(self, pipeline, sink: list):
        self._pipeline, self._sink = pipeline, sink

    def generate(self, *args, **kwargs):
        result = self._pipeline.generate(*args, **kwargs)
        raw = result.perf_metrics.whisper_raw_metrics
        parts = {"features": sum(raw.features_extraction_durations) / 1e6,
                 "encoder": sum(raw.encode_inference_durations) / 1e6,
                 "word_timing": sum(raw.word_level_timestamps_processing_durations) / 1e6}
        total = result.perf_metrics.get_generate_duration().mean / 1e3
        self._sink.append(dict(parts, generate=total, decoder=total - sum(parts.values()),
                               thread=threading.get_ident()))
        return result

    def __getattr__(self, name):
        return getattr(self._pipeline, name)


def profile_generations(services) -> list:
    """Wrap every pipeline the live engines load so each generate() is profiled; returns the list it fills."""
    sink: list = []
    load_checked = services.whisper.load_checked

    def profiled(choice, options, progress=None):
        loaded = load_checked(choice, options) if progress is None else load_checked(choice, options, progress)
        return replace(loaded, pipeline=Recorder(loaded.pipeline, sink))

    services.whisper.load_checked = profiled
    return sink


# --------------------------------------------------------------------------- one replay
def replay(services, choice, config, audio: np.ndarray, words: list[dict], chunk: float, folder: Path) -> dict:
    """Stream ``audio`` in real time; returns the caption updates, decodes and the final transcript."""
    from pipelines.speech.live_stream import record_to_wav

    stream = services.live.open(choice, config, folder)
    decodes: list[dict] = []
    decode = stream.engine.decode

    def timed_decode(job):
        hypothesis = decode(job)
        decodes.append({"audio_s": round(job.audio.size / SR, 2), "wall": hypothesis.seconds,
                        "at_pause": job.at_pause, "prompt_words": len(job.prompt.split()),
                        "thread": threading.get_ident(), "temperature": hypothesis.temperature})
        return hypothesis

    stream.engine.decode = timed_decode
    while stream.captions().status == "loading":
        stream.settle(0.1)
    updates: list[tuple[float, str, str]] = []
    done = threading.Event()
    start = time.monotonic()

    def observe():
        seen = -1
        while not done.is_set():
            seen = stream.wait_for_update(seen, 0.2)
            c = stream.captions()
            if not updates or (c.confirmed, c.tentative) != updates[-1][1:]:
                updates.append((time.monotonic() - start, c.confirmed, c.tentative))

    observer = threading.Thread(target=observe, daemon=True)
    cpu0 = time.process_time()
    observer.start()
    step = int(chunk * SR)
    for k, first in enumerate(range(0, audio.size, step)):
        time.sleep(max(0.0, start + (first + step) / SR - time.monotonic()))
        stream.push(audio[first:first + step])
    live_text = stream.end().text
    flushed_at = time.monotonic() - start
    cpu = time.process_time() - cpu0
    done.set()
    observer.join()
    refine_start = time.perf_counter()
    final = stream.engine.transcribe_recording(record_to_wav(Path(stream.state.record_path)), config.task, "en")
    stream.close()
    updates.append((flushed_at, live_text, ""))
    return {"updates": updates, "decodes": decodes, "cpu_s": cpu, "live_text": live_text, "final_text": final.text,
            "refine_s": time.perf_counter() - refine_start}


def delays(run: dict, words: list[dict]) -> dict:
    """Per reference word the final confirmed text has right: seconds from its end to confirmed / shown."""
    reference = [" ".join(normalised(w["word"])) for w in words]
    confirmed_count_at: list[tuple[float, int]] = [(t, len(normalised(c))) for t, c, _ in run["updates"]]
    final = matches(reference, normalised(run["live_text"]))
    shown_first: dict[int, float] = {}
    for t, confirmed, tentative in run["updates"]:
        for r in matches(reference, normalised(f"{confirmed} {tentative}")):
            shown_first.setdefault(r, t)
    confirmed, shown = [], []
    for r, h in final.items():
        at = next(t for t, count in confirmed_count_at if count > h)
        confirmed.append(at - words[r]["end"])
        shown.append(min(shown_first.get(r, at), at) - words[r]["end"])
    return {"confirmed": confirmed, "shown": shown, "matched": len(final)}


def summarise(runs: list[dict], words: list[dict], text: str, duration: float, file_wer: float) -> dict:
    from conftest import word_error_rate

    per_run = []
    for run in runs:
        d = delays(run, words)
        walls = [x["wall"] for x in run["decodes"]]
        per_run.append({
            "confirmed_median": statistics.median(d["confirmed"]), "confirmed_p90": float(np.percentile(d["confirmed"], 90)),
            "shown_median": statistics.median(d["shown"]), "shown_p90": float(np.percentile(d["shown"], 90)),
            "processing": sum(walls) / duration, "cpu": run["cpu_s"] / duration, "decodes": len(walls),
            "step_median": statistics.median(walls) if walls else 0.0, "matched": d["matched"],
            "live_wer": word_error_rate(text, run["live_text"]), "final_wer": word_error_rate(text, run["final_text"])})
    out = {key: statistics.median(r[key] for r in per_run) for key in per_run[0]}
    out["file_wer"] = file_wer
    return out


def profile_table(sink: list, decodes: list[dict]) -> dict:
    """Medians per decode: wall (slot wait included), and GenAI's features / encoder / decoder / word timing."""
    if not sink:
        return {}
    keys = ("features", "encoder", "decoder", "word_timing", "generate")
    out = {k: statistics.median(x[k] for x in sink) for k in keys}
    out["wall"] = statistics.median(x["wall"] for x in decodes) if decodes else 0.0
    out["audio_s"] = statistics.median(x["audio_s"] for x in decodes) if decodes else 0.0
    out["generate_calls_per_decode"] = len(sink) / max(len(decodes), 1)
    return out


# --------------------------------------------------------------------------- scenarios
def run_config(services, name, audio, words, text, chunk, repeat, file_wers, sink) -> dict:
    from pipelines.core.types import ModelChoice
    from pipelines.speech.live_stream import live_config

    precision, fields = CONFIGS[name]
    choice = ModelChoice(services.settings.default_model, precision, "CPU")
    config = live_config("transcribe", "en", **fields)
    runs, loads, profiles = [], [os.getloadavg()[0]], []
    for _ in range(repeat):
        del sink[:]
        with tempfile.TemporaryDirectory() as folder:
            runs.append(replay(services, choice, config, audio, words, chunk, Path(folder)))
        profiles.append(profile_table(sink, runs[-1]["decodes"]))
        loads.append(os.getloadavg()[0])
    summary = summarise(runs, words, text, audio.size / SR, file_wers[precision])
    summary.update(config=name, precision=precision, fields=fields, load=statistics.median(loads),
                   profile={k: statistics.median(p[k] for p in profiles if p) for k in profiles[0]} if profiles[0] else {},
                   live_text=runs[0]["live_text"], runs=[{k: v for k, v in r.items() if k != "updates"} for r in runs])
    print(format_row(summary), flush=True)
    return summary


def _in_threads(jobs) -> list:
    results = [None] * len(jobs)

    def run(k, job):
        results[k] = job()

    threads = [threading.Thread(target=run, args=(k, job)) for k, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def contention(services, audio, words, text, chunk, name: str) -> dict:
    """Two file transcriptions of the paragraph at once (started 5 s into a stream): alone, beside a
    stream whose decodes take the live slot, and beside one whose decodes take the transcription slots
    (the design not taken); then two streams at once."""
    from pipelines.core.types import ModelChoice
    from pipelines.speech.live_stream import live_config
    from pipelines.speech.types import TranscribeOptions

    precision, fields = CONFIGS[name]
    file_choice, options = ModelChoice(services.settings.default_model, "fp16", "CPU"), TranscribeOptions(language="en")
    live_choice, config = ModelChoice(services.settings.default_model, precision, "CPU"), live_config("transcribe", "en", **fields)

    def transcribe(delay: float = 0.0):
        time.sleep(delay)
        start = time.perf_counter()
        services.whisper.transcribe(audio, file_choice, options)
        return time.perf_counter() - start

    def stream():
        with tempfile.TemporaryDirectory() as folder:
            run = replay(services, live_choice, config, audio, words, chunk, Path(folder))
        d = delays(run, words)
        return {"confirmed_median": statistics.median(d["confirmed"]), "shown_median": statistics.median(d["shown"]),
                "confirmed_p90": float(np.percentile(d["confirmed"], 90)), "decodes": len(run["decodes"])}

    results = {"two files alone": {"files_s": _in_threads([transcribe, transcribe]), "load": os.getloadavg()[0]}}
    print(f"contention: two files at once, no stream: {results['two files alone']['files_s']}", flush=True)
    for design, slots in (("live slot", services.live.slots), ("transcription slots", services.whisper.slots)):
        services.live.slots = slots
        got = _in_threads([stream, lambda: transcribe(5.0), lambda: transcribe(5.0)])
        results[f"stream + two files, {design}"] = dict(got[0], files_s=got[1:], load=os.getloadavg()[0])
        print(f"contention, live decodes in the {design}: {results[f'stream + two files, {design}']}", flush=True)
    services.live.slots = services.whisper.pool.slots("live")
    results["two streams"] = {"streams": _in_threads([stream, stream]), "load": os.getloadavg()[0]}
    print(f"contention: two streams at once: {results['two streams']}", flush=True)
    return results


# --------------------------------------------------------------------------- tables
def format_row(r: dict) -> str:
    return (f"| {r['config']} | {r['confirmed_median']:.2f} / {r['confirmed_p90']:.2f} | {r['shown_median']:.2f} / "
            f"{r['shown_p90']:.2f} | {r['processing']:.2f} | {r['cpu']:.2f} | {r['step_median']:.2f} | {r['decodes']:.0f} | "
            f"{100 * r['live_wer']:.1f}% | {100 * r['final_wer']:.1f}% ({100 * r['file_wer']:.1f}%) | {r['load']:.1f} |")


HEADER = ("| config | confirmed delay median / p90 s | shown delay median / p90 s | processing s per audio s | "
          "CPU s per audio s | median decode s | decodes | live WER | final WER (file) | load avg |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def format_profile(results: list[dict]) -> str:
    lines = ["| config | decode wall s | GenAI generate s | features | encoder | decoder | word timing | audio per decode s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        p = r.get("profile") or {}
        if p:
            lines.append(f"| {r['config']} | {p['wall']:.3f} | {p['generate']:.3f} | {p['features']:.3f} | "
                         f"{p['encoder']:.3f} | {p['decoder']:.3f} | {p['word_timing']:.3f} | {p['audio_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled/whisper-base")
    parser.add_argument("--configs", nargs="*",
                        default=["int8-1.0", "fp16-1.0", "int8-0.5", "fp16-0.5", "int8-1.0-no-pause-decode"],
                        choices=sorted(CONFIGS))
    parser.add_argument("--repeat", type=int, default=2, help="runs per config (medians reported)")
    parser.add_argument("--chunk", type=float, default=0.1, help="seconds per pushed chunk (the browser sends 0.1)")
    parser.add_argument("--contention", action="store_true",
                        help="also: a stream beside two file transcriptions (live slot or transcription slots), "
                             "two streams at once")
    parser.add_argument("--contention-config", default="int8-1.0", choices=sorted(CONFIGS))
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models_cache")
    parser.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/live-<model>.json)")
    args = parser.parse_args()

    from pipelines.core.types import ModelChoice
    from pipelines.services import Services, Settings
    from pipelines.speech.types import TranscribeOptions

    from conftest import word_error_rate

    services = Services(Settings(models_dir=args.models_dir, default_model=args.model))
    audio, words, text = paragraph()
    file_wers = {}
    for precision in sorted({CONFIGS[c][0] for c in args.configs + [args.contention_config]} | {"fp16"}):
        choice = ModelChoice(args.model, precision, "CPU")
        services.whisper.load(choice)
        services.live.engine(choice).ready("transcribe", "en")
        file_wers[precision] = word_error_rate(text, services.whisper.transcribe(
            audio, choice, TranscribeOptions(language="en")).text)
    sink = profile_generations(services)
    info = machine.describe()
    title = (f"Live captions, {args.model}, {args.chunk:g} s chunks in real time, {time.strftime('%Y-%m-%d %H:%M')}, "
             f"{machine.summary(info)}; load avg (1 min) at start {os.getloadavg()[0]:.1f}")
    print(title + "\n" + HEADER, flush=True)
    results = [run_config(services, name, audio, words, text, args.chunk, args.repeat, file_wers, sink)
               for name in args.configs]
    out = {"title": title, "machine": info, "targets": TARGETS, "file_wer": file_wers, "results": results}
    if args.contention:
        out["contention"] = contention(services, audio, words, text, args.chunk, args.contention_config)
    print("\nper decode (medians, s):\n" + format_profile(results))
    path = args.out or ROOT / "benchmarks" / "results" / f"live-{args.model.replace('/', '-')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
