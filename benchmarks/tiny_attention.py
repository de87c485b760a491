"""Do the tests' tiny image models pay for narrow attention heads? (issue #23)

A tiny random UNet + ControlNet with narrow attention heads (head dims of 4-8) ran at about 1.2 s a
denoising step at 256x256 in OpenVINO, ~95% of it in the fused attention kernel, for models that
should take milliseconds. The suite's tiny models (tests/image_fixtures.py) have channels of 8-16;
this script builds them with different head counts (same channels, so wider heads are fewer heads),
converts them with the app's own code, and times the tests' generation (4 UniPC steps, CFG batch of
2, 256x256) of each variant in turns, in one process:

    python benchmarks/tiny_attention.py                      # heads 2 (head dims 4/8) vs 1 (8/16)
    python benchmarks/tiny_attention.py --heads 2 1 --rounds 7

For each variant and inference precision (f32 as the parity tests run, and the CPU's default) it
reports seconds per denoising step and per image (medians over the rounds), and the share of one UNet call's time
spent in attention layers (OpenVINO's per-layer profile: layer types with "Attention" or "SDPA" in
their name). Prints a table and writes JSON (default benchmarks/results/tiny_attention.json).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import machine  # noqa: E402  (benchmarks/machine.py, beside this script)

PRECISIONS = {"f32": {"INFERENCE_PRECISION_HINT": "f32"}, "default": {}}


def build(work: Path, heads: int) -> dict[str, Path]:
    """The tiny SD1.5 and ControlNet with ``heads`` heads, converted to IR by the app's code."""
    import image_fixtures as fx
    from pipelines.image import sources

    models = work / f"heads{heads}"
    sd = fx.build_tiny_sd15(models / "sd15", heads=heads)
    cn = fx.build_tiny_controlnet(models / "controlnet", heads=heads)
    cache = work / "models_cache"
    return {"sd": sources.ensure_sd15(cache, str(sd)), "controlnet": sources.ensure_controlnet(cache, str(cn))}


def attention_share(pipeline, options, pose) -> float:
    """Share of one UNet call's time in attention layers (a PERF_COUNT profile of the compiled UNet)."""
    seen: dict = {}

    def keep(name: str, inputs: dict) -> None:
        if name == "unet" and not seen:
            seen.update({k: v.copy() for k, v in inputs.items()})

    with pipeline.observe_inputs(keep):
        pipeline(options, pose)
    request = pipeline._compiled["unet"][1].create_infer_request()
    request.infer(seen)
    request.infer(seen)
    layers = request.get_profiling_info()
    total = sum(p.real_time.total_seconds() for p in layers)
    # the CPU plugin fuses each attention (QK^T, softmax, x V) into one Subgraph kernel, named after
    # the diffusers module it came from (".../transformer_blocks.0.attn1/...")
    attention = sum(p.real_time.total_seconds() for p in layers if p.node_type == "Subgraph" and ".attn" in p.node_name)
    return attention / total if total else 0.0


def timed_run(pipeline, options, pose) -> tuple[float, float]:
    """(seconds per denoising step from the second step on, seconds for the whole image)."""
    stamps: list[float] = []
    start = time.perf_counter()
    pipeline(options, pose, progress=lambda fraction, message: stamps.append(time.perf_counter()))
    image = time.perf_counter() - start
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return (statistics.median(steps) if steps else image), image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "tiny_attention.json")
    args = parser.parse_args()

    import image_fixtures as fx
    from pipelines.image.pipeline import OVControlNetPipeline
    from pipelines.image.pose import draw_skeleton, poses_from_detection
    from pipelines.image.request import ImageOptions

    info = machine.describe()
    print(machine.summary(info))
    pose = draw_skeleton(poses_from_detection(*fx.known_detection(), 256, 256), 256, 256)
    options = ImageOptions(prompt="a dancer on a beach at sunset", seed=7, steps=args.steps,
                           width=args.size, height=args.size)
    with tempfile.TemporaryDirectory(prefix="tiny-attention-") as tmp:
        folders = {h: build(Path(tmp), h) for h in args.heads}
        variants = {(h, p): OVControlNetPipeline.from_folders(folders[h]["sd"], folders[h]["controlnet"],
                                                              ov_config=config)
                    for h in args.heads for p, config in PRECISIONS.items()}
        for pipeline in variants.values():
            pipeline(options, pose)  # compile for this size, warm up
        per_step: dict = {key: [] for key in variants}
        per_image: dict = {key: [] for key in variants}
        for _ in range(args.rounds):  # in turns: a busy neighbour slows every variant alike
            for key, pipeline in variants.items():
                step, image = timed_run(pipeline, options, pose)
                per_step[key].append(step)
                per_image[key].append(image)
        shares = {(h, p): attention_share(OVControlNetPipeline.from_folders(
            folders[h]["sd"], folders[h]["controlnet"], ov_config={**PRECISIONS[p], "PERF_COUNT": "YES"}), options, pose)
            for h, p in variants}
    rows = []
    for (heads, precision), times in per_step.items():
        widths = sorted({c // heads for c in fx.tiny_unet_config(heads)["block_out_channels"][:3]})
        rows.append({"heads": heads, "head_dims": widths, "precision": precision,
                     "seconds_per_step": statistics.median(times), "rounds": times,
                     "seconds_per_image": statistics.median(per_image[(heads, precision)]),
                     "attention_share": shares[(heads, precision)]})
    base = {r["precision"]: r["seconds_per_step"] for r in rows if r["heads"] == args.heads[0]}
    print(f"\n{args.size}x{args.size}, {args.steps} UniPC steps, CFG batch 2, median of {args.rounds} rounds in turns\n")
    print("| heads | head dims | inference | s / step | s / image | step vs first | attention share of a UNet call |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = base[r["precision"]] / r["seconds_per_step"]
        print(f"| {r['heads']} | {'/'.join(map(str, r['head_dims']))} | {r['precision']} | "
              f"{r['seconds_per_step']:.4f} | {r['seconds_per_image']:.3f} | {ratio:.2f}x | {r['attention_share']:.0%} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": info, "size": args.size, "steps": args.steps, "rows": rows}, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
