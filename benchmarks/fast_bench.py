"""Fast mode (issue #20) side by side, one process, in turns: this app's Fast mode on OpenVINO (FP16 and
INT8) against diffusers on PyTorch running the same recipe (bf16 and fp32), and this app's Quality mode.

The Hugging Face Hub is out of reach here, so the models are the **full architectures with random
weights**: SD1.5 and the OpenPose ControlNet of ``sd_bench.py``, a LoRA with the LCM-LoRA's real structure
(rank 64 on the 278 modules of diffusers' LCM training script: 67 M parameters) and a full-size TAESD
(``AutoencoderTiny()``'s defaults = ``madebyollin/taesd``'s config). Speed does not depend on the values.

Systems (512x512, the same prompt, pose and seed; warm: loaded and compiled before the rounds):

* ``ov-fast``       this app's Fast mode: the UNet with the LoRA fused in + ControlNet, FP16 IR (bf16 on AMX),
                    static batch-1 shapes, LCM scheduler, 4 steps, guidance 1 (no CFG), TAESD for the live
                    previews (after steps 1-3) and the final image
* ``ov-fast-int8``  the same with the INT8 UNet + ControlNet of Fast mode (``--int8``, or made by ``--quantize fast``)
* ``torch-bf16``    diffusers ``StableDiffusionControlNetPipeline`` + ``load_lora_weights`` + ``fuse_lora``,
                    ``LCMScheduler``, ``AutoencoderTiny``, 4 steps, guidance 1, under ``torch.autocast`` bf16
* ``torch-fp32``    the same in float32
* ``ov-quality``    this app's Quality mode (UniPC, CFG 7.5: batch 2, the full VAE), timed on
                    ``--quality-steps`` steps and extrapolated to 20 (prepare + 20 x s/step + VAE decode)

Reported per system: seconds per image (median and fastest round), CPU seconds (all threads: steadier
than wall time on a shared machine), seconds per step, time from Generate to the first live preview,
and with ``--peak-memory`` the peak RSS of a process that loads it and makes one image. ``--quantize
fast|quality`` makes that INT8 pair with the app's low-memory path and reports each phase's peak RSS
(its child process's) and time. Ratios per round, median; a targets table.

    python benchmarks/fast_bench.py --rounds 3                          # all systems (builds the models once)
    python benchmarks/fast_bench.py --systems ov-fast ov-fast-int8 --rounds 7
    python benchmarks/fast_bench.py --quantize fast --systems           # the INT8 pair's peak memory only

Models are built and converted once under ``--work-dir`` (default ``models_cache/fast_bench``);
``--prototype DIR`` takes the random models and IR a prototype already made (its ``diffusers/``,
``lcm-lora-random/``, ``taesd-random/`` and ``ir/{sd15,controlnet,sd15-lcm}``), read only. Writes JSON
(default ``benchmarks/results/fast.json``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(Path(__file__).resolve().parent)]

import machine  # noqa: E402  (benchmarks/machine.py)
import sd_bench  # noqa: E402  (the full SD1.5 / ControlNet configs and builders)

SYSTEMS = ("ov-fast", "ov-fast-int8", "torch-bf16", "torch-fp32", "ov-quality")
PROMPT, NEGATIVE, SEED = sd_bench.PROMPT, sd_bench.NEGATIVE, sd_bench.SEED
STEPS = 4
TARGETS = {"fast_s_amx": 8.0, "first_preview_s": 3.0, "quality_over_fast": 6.0, "bf16_over_fast": 2.0,
           "quantize_peak_gb": 12.0}


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)
    return float("nan")


# ------------------------------------------------------------------------------------------------
# Models: built once (or the prototype's), converted by the app's own code
# ------------------------------------------------------------------------------------------------


def prepare_models(args) -> dict:
    """Diffusers folders, the LoRA and TAESD (built when missing), and the IR folders the app runs."""
    import image_fixtures as fx

    from pipelines.core.layout import ModelsLayout
    from pipelines.image import sources

    source = Path(args.prototype) if args.prototype else Path(args.work_dir)
    models = sd_bench.build_models(source)  # finds the folders when they are there
    models["lcm_lora"], models["taesd"] = source / "lcm-lora-random", source / "taesd-random"
    if not (models["lcm_lora"] / "pytorch_lora_weights.safetensors").is_file():
        print("building a random rank-64 LCM-LoRA", file=sys.stderr, flush=True)
        fx.build_random_lora(models["sd"] / "unet", models["lcm_lora"], rank=64, alpha=64, std=0.02)
    if not (models["taesd"] / "config.json").is_file():
        fx.build_tiny_taesd(models["taesd"], encoder_block_out_channels=(64,) * 4,
                            decoder_block_out_channels=(64,) * 4, num_encoder_blocks=(1, 3, 3, 3),
                            num_decoder_blocks=(3, 3, 3, 1))
    layout = ModelsLayout.of(Path(args.work_dir) / "models_cache")
    ir = {"taesd": sources.ensure_taesd(layout, str(models["taesd"]))}
    if args.prototype:  # the prototype's IR, made by the same conversion code before it moved
        ir.update(sd=source / "ir" / "sd15", controlnet=source / "ir" / "controlnet", lcm=source / "ir" / "sd15-lcm")
    else:
        ir["sd"] = sources.ensure_sd15(layout, str(models["sd"]))
        ir["controlnet"] = sources.ensure_controlnet(layout, str(models["controlnet"]))
        ir["lcm"] = sources.ensure_lcm_unet(layout, str(models["sd"]), ir["sd"], str(models["lcm_lora"]))
    ir["int8"] = Path(args.int8) if args.int8 else None
    return {"diffusers": models, "ir": ir, "layout": layout}


def quantize(kind: str, found: dict, args) -> dict:
    """Make the INT8 pair of ``kind`` with the app's low-memory path; each phase's peak RSS and time."""
    from pipelines.image.calibration import SDCalibration
    from pipelines.image.int8 import quantize_sd_int8

    ir = found["ir"]
    out = Path(args.work_dir) / f"int8-{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True)
    started = time.perf_counter()
    facts = quantize_sd_int8(ir["sd"], ir["controlnet"], out, SDCalibration(subset_size=args.subset_size),
                             lcm_folder=ir["lcm"] if kind == "fast" else None, taesd_folder=ir["taesd"],
                             progress=lambda f, m: print(f"  [{f:4.0%}] {m}", file=sys.stderr, flush=True))
    peaks = facts["low_memory"]["peak_rss_mb"]
    if kind == "fast":
        ir["int8"] = out
    return {"pair": kind, "folder": str(out), "seconds": round(time.perf_counter() - started, 1),
            "peak_rss_mb": peaks, "peak_mb": max(max(peaks.values()), peak_rss_mb()), "parent_peak_mb": peak_rss_mb(),
            "calibration": facts["calibration"], "statistics_chunks": facts["low_memory"]["statistics_chunks"],
            "int8_ops": facts["int8_ops"], "timings": facts["timings"], "load1": os.getloadavg()[0]}


# ------------------------------------------------------------------------------------------------
# The systems
# ------------------------------------------------------------------------------------------------


def ov_runner(system: str, found: dict, args):
    from pipelines.image.pipeline import OVControlNetPipeline
    from pipelines.image.request import ImageOptions

    ir, fast = found["ir"], system != "ov-quality"
    if system == "ov-fast-int8" and ir["int8"] is None:
        raise SystemExit("ov-fast-int8 needs --int8 DIR or --quantize fast")
    pipe = OVControlNetPipeline.from_folders(ir["sd"], ir["controlnet"], lcm_folder=ir["lcm"] if fast else None,
                                             taesd_folder=ir["taesd"], int8_folder=ir["int8"] if system.endswith("int8")
                                             else None)
    pipe.compile(512, 512, guidance=not fast)
    steps = STEPS if fast else args.quality_steps
    options = ImageOptions(prompt=PROMPT, negative_prompt="" if fast else NEGATIVE, steps=steps,
                           guidance_scale=1.0 if fast else 7.5, seed=SEED, mode="fast" if fast else "quality")
    pose = sd_bench.pose_image(512)

    def run() -> dict:
        marks = []
        started = time.perf_counter()
        result = pipe(options, pose, preview=lambda preview: marks.append(time.perf_counter() - started))
        wall, t = time.perf_counter() - started, result.extra["timings"]
        row = {"s": wall, "per_step_s": t["seconds_per_step"], "prepare_s": t["prepare"], "decode_s": t["decode"],
               "preview_decode_s": t["previews"] / max(len(marks), 1), "previews": len(marks)}
        if fast:
            return {**row, "first_preview_s": marks[0] if marks else None}
        # Quality: measured on a few steps, extrapolated to 20 (its first preview comes after step 4)
        every = options.limits.previews_every
        return {**row, "measured_s": wall, "s": wall - t["denoise"] - t["previews"] + 20 * t["seconds_per_step"]
                + (20 - 1) // every * row["preview_decode_s"],
                "first_preview_s": t["prepare"] + every * t["seconds_per_step"] + row["preview_decode_s"]}

    return run


def torch_runner(system: str, found: dict, args, cache: dict):
    import torch

    models = found["diffusers"]
    if "pipe" not in cache:
        from diffusers import AutoencoderTiny, ControlNetModel, LCMScheduler, StableDiffusionControlNetPipeline

        controlnet = ControlNetModel.from_pretrained(models["controlnet"], torch_dtype=torch.float32)
        pipe = StableDiffusionControlNetPipeline.from_pretrained(
            models["sd"], controlnet=controlnet, vae=AutoencoderTiny.from_pretrained(models["taesd"]),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False, torch_dtype=torch.float32)
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        pipe.load_lora_weights(str(models["lcm_lora"]), weight_name="pytorch_lora_weights.safetensors")
        pipe.fuse_lora(lora_scale=1.0)
        pipe.unload_lora_weights()
        pipe.set_progress_bar_config(disable=True)
        cache["pipe"] = pipe
    pipe, pose = cache["pipe"], sd_bench.pose_image(512)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if system == "torch-bf16" else contextlib.nullcontext()

    def run() -> dict:
        marks = []
        started = time.perf_counter()

        def on_step(_pipe, _i, _t, kwargs):
            marks.append(time.perf_counter() - started)
            return kwargs

        with torch.inference_mode(), autocast:
            pipe(PROMPT, image=pose, num_inference_steps=STEPS, guidance_scale=1.0, width=512, height=512,
                 generator=torch.Generator().manual_seed(SEED), callback_on_step_end=on_step)
        return {"s": time.perf_counter() - started, "per_step_s": (marks[-1] - marks[0]) / (len(marks) - 1),
                "first_step_s": marks[0]}

    return run


def run_rounds(systems: list[str], found: dict, args) -> dict[str, list[dict]]:
    runners, torch_cache = {}, {}
    for system in systems:
        started = time.perf_counter()
        runners[system] = (torch_runner(system, found, args, torch_cache) if system.startswith("torch")
                           else ov_runner(system, found, args))
        warm = runners[system]()  # first-inference allocations
        wall = warm.get("measured_s", warm["s"])  # Quality's "s" is extrapolated to 20 steps
        print(f"{system}: load {time.perf_counter() - started - wall:.1f} s, warm-up image {wall:.2f} s, "
              f"peak RSS so far {peak_rss_mb():.0f} MB", flush=True)
    rows: dict[str, list[dict]] = {system: [] for system in systems}
    for index in range(args.rounds):
        line = []
        for system in systems:
            cpu, load = time.process_time(), os.getloadavg()[0]
            row = runners[system]()
            row.update(cpu_s=time.process_time() - cpu, load1=load)
            if "measured_s" in row:  # Quality: CPU time of the steps measured, scaled like its wall time
                row.update(cpu_measured_s=row["cpu_s"], cpu_s=row["cpu_s"] * row["s"] / row["measured_s"])
            rows[system].append(row)
            line.append(f"{system} {row['s']:.2f} s (cpu {row['cpu_s']:.1f})")
        print(f"round {index + 1}: " + " | ".join(line) + f" | load {os.getloadavg()[0]:.1f}", flush=True)
    return rows


def child_peak(system: str, args) -> float:
    """Peak RSS of a fresh process that loads ``system`` and makes one image (warm-up only, no rounds)."""
    out = Path(args.work_dir) / f"peak-{system}.json"
    command = [sys.executable, __file__, "--systems", system, "--rounds", "0", "--out", str(out),
               "--work-dir", str(args.work_dir), "--quality-steps", str(args.quality_steps)]
    command += (["--prototype", args.prototype] if args.prototype else []) + (["--int8", str(args.int8)] if args.int8
                                                                             else [])
    subprocess.run(command, check=True)
    return json.loads(out.read_text())["peak_rss_mb"]


# ------------------------------------------------------------------------------------------------
# Summary, targets, table
# ------------------------------------------------------------------------------------------------


def summarize(rows: dict[str, list[dict]]) -> tuple[dict, dict]:
    summary, ratios = {}, {}
    for system, items in rows.items():
        keys = [k for k in items[0] if isinstance(items[0][k], (int, float)) and items[0][k] is not None]
        summary[system] = {k: round(statistics.median(i[k] for i in items), 3) for k in keys}
        summary[system]["fastest_s"] = round(min(i["s"] for i in items), 3)
        summary[system]["load1_median"] = round(statistics.median(i["load1"] for i in items), 2)
    base = "ov-fast" if "ov-fast" in rows else next(iter(rows))
    for system, items in rows.items():
        if system == base:
            continue
        per_round = [o["s"] / b["s"] for o, b in zip(items, rows[base])]
        ratios[f"{system} / {base}"] = {
            "median": round(statistics.median(per_round), 2), "rounds": [round(x, 2) for x in per_round],
            "cpu_median": round(statistics.median(o["cpu_s"] / b["cpu_s"] for o, b in zip(items, rows[base])), 2)}
    return summary, ratios


def targets(summary: dict, ratios: dict, quantized: list[dict], host: dict) -> list[tuple[str, str, str]]:
    """(target, measured, met?) rows."""
    rows = []
    amx = "amx_bf16" in host.get("isa", [])

    def verdict(ok):
        return "-" if ok is None else ("met" if ok else "missed")

    fast = summary.get("ov-fast")
    if fast:
        rows.append((f"Fast 512x512 image <= {TARGETS['fast_s_amx']:g} s" + ("" if amx else " (AMX Xeon only)"),
                     f"median {fast['s']:.2f} s, fastest {fast['fastest_s']:.2f} s",
                     verdict(fast["s"] <= TARGETS["fast_s_amx"]) if amx else "n/a"))
        rows.append((f"first preview <= {TARGETS['first_preview_s']:g} s after Generate",
                     f"median {fast['first_preview_s']:.2f} s", verdict(fast["first_preview_s"] <= TARGETS["first_preview_s"])))
    for system, target, key in (("ov-quality", "Fast <= 1/6 of Quality's time", "quality_over_fast"),
                                ("torch-bf16", "Fast >= 2x faster than diffusers bf16, same recipe", "bf16_over_fast")):
        ratio = ratios.get(f"{system} / ov-fast")
        if ratio:
            rows.append((target, f"{ratio['median']:.2f}x (rounds {ratio['rounds']}; CPU time {ratio['cpu_median']}x)",
                         verdict(ratio["median"] >= TARGETS[key])))
    for item in quantized:
        rows.append((f"making the {item['pair']} INT8 pair peaks <= {TARGETS['quantize_peak_gb']:g} GB",
                     f"{item['peak_mb'] / 1024:.1f} GB ({item['peak_rss_mb']})",
                     verdict(item["peak_mb"] / 1024 <= TARGETS["quantize_peak_gb"])))
    return rows


def table(summary: dict, peaks: dict, quantized: list[dict], goal: list, host: dict, args) -> str:
    lines = [f"### {machine.summary(host)}, {time.strftime('%Y-%m-%d %H:%M')}, {args.rounds} rounds in turns",
             "", "| system | s / image (median, fastest) | CPU s / image | s / step | first preview s | peak RSS MB |",
             "|---|---|---|---|---|---|"]
    for system, row in summary.items():
        first = row.get("first_preview_s", row.get("first_step_s"))
        note = " (first step)" if "first_step_s" in row else ""
        lines.append(f"| {system} | {row['s']:.2f}, {row['fastest_s']:.2f} | {row['cpu_s']:.1f} | "
                     f"{row['per_step_s']:.3f} | {'-' if first is None else f'{first:.2f}{note}'} | "
                     f"{peaks.get(system, '-')} |")
    for item in quantized:
        lines.append(f"\nmaking the {item['pair']} INT8 pair: {item['seconds']:.0f} s, peak RSS per phase (its child "
                     f"process) {item['peak_rss_mb']} MB, parent {item['parent_peak_mb']} MB; {item['calibration']}; "
                     f"statistics in {item['statistics_chunks']} chunks; load {item['load1']:.1f}")
    lines += ["", "| target | measured | |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in goal]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", nargs="*", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quality-steps", type=int, default=3, help="Quality steps measured (extrapolated to 20)")
    parser.add_argument("--quantize", nargs="*", default=[], choices=("fast", "quality"),
                        help="make these INT8 pairs with the app's low-memory path first, reporting peak memory")
    parser.add_argument("--subset-size", type=int, default=6, help="calibration samples per model for --quantize")
    parser.add_argument("--peak-memory", action="store_true", help="also each system's peak RSS, each in its own process")
    parser.add_argument("--work-dir", default=str(ROOT / "models_cache" / "fast_bench"))
    parser.add_argument("--prototype", default=None, help="a prototype's models folder to read (see the docstring)")
    parser.add_argument("--int8", default=None, help="a Fast INT8 pair's folder (unet.xml + controlnet.xml)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fast.json"))
    args = parser.parse_args()
    host = machine.describe()
    print(f"{machine.summary(host)} | load {os.getloadavg()}", flush=True)
    import torch

    torch.set_num_threads(os.cpu_count() or 2)
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    found = prepare_models(args)
    quantized = []
    for kind in args.quantize:
        quantized.append(quantize(kind, found, args))
        print(f"quantized: {json.dumps(quantized[-1], default=str)} | load {os.getloadavg()}", flush=True)
    if found["ir"]["int8"] is not None:
        args.int8 = str(found["ir"]["int8"])
    rows = run_rounds(args.systems, found, args) if args.systems else {}
    result = {"host": host, "date": time.strftime("%Y-%m-%d %H:%M"), "rounds": args.rounds, "quantized": quantized,
              "all": rows, "peak_rss_mb": peak_rss_mb(), "load": os.getloadavg()}
    if args.rounds > 0 and rows:
        summary, ratios = summarize(rows)
        peaks = {system: child_peak(system, args) for system in args.systems} if args.peak_memory else {}
        goal = targets(summary, ratios, quantized, host)
        result.update(summary=summary, ratios=ratios, peaks=peaks, targets=goal)
        print(table(summary, peaks, quantized, goal, host, args))
    elif quantized:
        print(table({}, {}, quantized, targets({}, {}, quantized, host), host, args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
