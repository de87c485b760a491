"""Stable Diffusion 1.5 + ControlNet OpenPose side by side, one run: diffusers on PyTorch against this
app's OpenVINO FP16 and INT8 (issues #6 and #8).

The Hugging Face Hub is out of reach here, so the models are the **full SD1.5 architecture with
random weights**: the UNet, VAE and CLIP text encoder configs of ``stable-diffusion-v1-5`` and the
ControlNet config of ``lllyasviel/control_v11p_sd15_openpose`` are written below, the models are
built from them and saved as ordinary diffusers folders (safetensors). Speed does not depend on the
weight values. The tokenizer is the real CLIP BPE (from open-clip-torch), as in the tests.

Systems (each in its own subprocess: honest peak memory, no interference):

* ``torch-fp32``  diffusers ``StableDiffusionControlNetPipeline``, float32
* ``torch-bf16``  the same under ``torch.autocast("cpu", dtype=torch.bfloat16)``
* ``ov-fp16``     this app: model store conversion + ``ImageService`` / ``OVControlNetPipeline``, FP16 IR
* ``ov-int8``     this app, ``precision="int8"``: NNCF post-training quantization of the UNet and
                  ControlNet, calibrated by running the FP16 pipeline (``--subset-size`` samples)

All at 512x512, ``--steps`` (20) UniPC steps, guidance 7.5 (CFG batch of 2), same prompt and pose.
Reported: seconds per denoising step (ControlNet + UNet, from step 2 on), seconds per image
(a warm call, VAE decode included), first-image latency from nothing loaded (load/compile included),
conversion and quantization time, model sizes on disk and peak memory. Ratios, not asserts.

    python benchmarks/sd_bench.py                       # everything (long: ~1 hour on 2 cores)
    python benchmarks/sd_bench.py --systems ov-fp16 ov-int8 --steps 10

Built models, converted and quantized IR are kept under ``--work-dir`` (default
``models_cache/sd_bench``), so a rerun skips them. Prints a markdown table and writes JSON
(default ``benchmarks/results/sd.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import machine  # noqa: E402  (benchmarks/machine.py, beside this script)

SYSTEMS = ("ov-fp16", "ov-int8", "torch-fp32", "torch-bf16")
PROMPT = "a dancer on a beach at sunset, detailed, best quality"
NEGATIVE = "lowres, bad anatomy, worst quality"
SEED = 42

# stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json
SD15_UNET = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# stable-diffusion-v1-5/stable-diffusion-v1-5 vae/config.json
SD15_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# text_encoder/config.json (openai/clip-vit-large-patch14's text tower); token ids of the real CLIP vocabulary
SD15_TEXT_ENCODER = {
    "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
    "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05,
    "projection_dim": 768, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
}
# lllyasviel/control_v11p_sd15_openpose config.json
OPENPOSE_CONTROLNET = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "class_embed_type": None, "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb", "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "num_class_embeds": None,
    "only_cross_attention": False, "projection_class_embeddings_input_dim": None,
    "resnet_time_scale_shift": "default", "upcast_attention": False, "use_linear_projection": False,
}


# ------------------------------------------------------------------------------------------------
# Building the full-size random-weight models (once, kept in the work dir)
# ------------------------------------------------------------------------------------------------


def build_models(work: Path) -> dict[str, Path]:
    """Full-size SD1.5 and OpenPose ControlNet diffusers folders with random weights (built once)."""
    sd, cn = work / "diffusers" / "sd15-random", work / "diffusers" / "controlnet-openpose-random"
    if not (sd / "done").is_file():
        _build_sd(sd)
    if not (cn / "done").is_file():
        _build_controlnet(cn)
    return {"sd": sd, "controlnet": cn}


def _build_sd(folder: Path) -> None:
    import gc
    import shutil

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    import image_fixtures as fx

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    print("building a random SD1.5 UNet (860M parameters)", file=sys.stderr, flush=True)
    unet = UNet2DConditionModel(**SD15_UNET)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    del unet
    gc.collect()
    AutoencoderKL(**SD15_VAE).save_pretrained(folder / "vae", safe_serialization=True)
    CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER)).save_pretrained(folder / "text_encoder", safe_serialization=True)
    fx.write_clip_tokenizer(folder / "tokenizer")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(fx.SD15_SCHEDULER_CONFIG, indent=2))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.39.0",
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None], "feature_extractor": [None, None],
    }, indent=2))
    (folder / "done").write_text("ok")


def _build_controlnet(folder: Path) -> None:
    import shutil

    import torch
    from diffusers import ControlNetModel

    import image_fixtures as fx

    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(1)
    print("building a random OpenPose ControlNet (361M parameters)", file=sys.stderr, flush=True)
    controlnet = ControlNetModel(**OPENPOSE_CONTROLNET)
    # Its zero convolutions start at exactly zero; random values keep the residuals (and their
    # calibration statistics) realistic rather than all-zero.
    fx._randomize_zeros(controlnet, torch.Generator().manual_seed(1), std=0.02)
    controlnet.save_pretrained(folder, safe_serialization=True)
    (folder / "done").write_text("ok")


def pose_image(size: int = 512):
    """One standing person (the tests' keypoints), drawn by controlnet-aux as the app does."""
    import image_fixtures as fx
    from pipelines.image.pose import draw_skeleton, poses_from_detection

    candidate, subset = fx.known_detection()
    return draw_skeleton(poses_from_detection(candidate, subset, 256, 256), 256, 256, size=(size, size))


def folder_mb(paths) -> float:
    total = 0
    for path in paths:
        path = Path(path)
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        total += sum(p.stat().st_size for p in files)
    return total / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------
# One system, in a child process
# ------------------------------------------------------------------------------------------------


def child_torch(system: str, models: dict, args) -> dict:
    import contextlib

    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UniPCMultistepScheduler

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    controlnet = ControlNetModel.from_pretrained(models["controlnet"], use_safetensors=True, torch_dtype=torch.float32)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        models["sd"], controlnet=controlnet, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, use_safetensors=True, torch_dtype=torch.float32,
    )
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - started
    pose = pose_image(args.size)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if system == "torch-bf16" else contextlib.nullcontext())

    def one_image() -> tuple[float, list[float]]:
        marks: list[float] = []

        def on_step(pipeline, step, timestep, kwargs):
            marks.append(time.perf_counter())
            return kwargs

        t0 = time.perf_counter()
        with torch.inference_mode(), autocast:
            image = pipe(PROMPT, image=pose, negative_prompt=NEGATIVE, num_inference_steps=args.steps,
                         guidance_scale=7.5, width=args.size, height=args.size,
                         generator=torch.Generator().manual_seed(SEED), callback_on_step_end=on_step).images[0]
        assert image.size == (args.size, args.size)
        return time.perf_counter() - t0, marks

    first, marks = one_image()
    per_step = (marks[-1] - marks[0]) / max(len(marks) - 1, 1)
    result = {"system": system, "load_s": load, "first_image_s": load + first, "per_step_s": per_step,
              "per_image_s": first, "per_image_note": "first call (no compilation in eager PyTorch)"}
    if args.warm_images_torch:
        times = [one_image()[0] for _ in range(args.warm_images_torch)]
        result["per_image_s"] = min(times)
        result["per_image_note"] = "warm call"
    result["size_mb"] = folder_mb([models["sd"] / "unet", models["sd"] / "vae", models["sd"] / "text_encoder",
                                   models["controlnet"]])
    return result


def _ov_service(system: str, models: dict, args):
    from pipelines.services import Services, Settings

    settings = Settings(models_dir=args.work_dir / "models", sd_model=str(models["sd"]),
                        controlnet_model=str(models["controlnet"]))
    service = Services(settings).image  # the app's own service, as app.py builds it
    if system == "ov-int8":
        service.calibration = service.calibration.with_changes(
            subset_size=args.subset_size, steps=args.calibration_steps, width=args.calibration_size,
            height=args.calibration_size)
    return service, ("int8" if system == "ov-int8" else "fp16")


def child_ov_prepare(system: str, models: dict, args) -> dict:
    """Conversion (FP16) or quantization (INT8) through the model store, in a process of its own
    (its peak memory is the conversion's / quantization's). Cached: a rerun takes no time, so the
    first run's figures are kept in the work dir and reported."""
    service, precision = _ov_service(system, models, args)
    record = args.work_dir / (f"{system}-prepare.json" if precision == "fp16" else
                              f"{system}-{args.subset_size}x{args.calibration_steps}-{args.calibration_size}-prepare.json")
    t0 = time.perf_counter()
    folders = service.model_folders(precision=precision)
    seconds = time.perf_counter() - t0
    if seconds > 5:
        record.write_text(json.dumps({"prepare_s": seconds, "prepare_peak_mb": peak_mb(), "date": time.strftime("%Y-%m-%d %H:%M")}))
    recorded = json.loads(record.read_text()) if record.is_file() else {"prepare_s": None, "prepare_peak_mb": None}
    result = {"system": system, **recorded, "prepare_cached": seconds <= 5,
              "folders": {k: str(v) for k, v in folders.items()}}
    if precision == "int8":
        result["quantization"] = service.layout.cache.describe(folders["int8"])
    mb = lambda xml: folder_mb([xml, xml.with_suffix(".bin")])  # noqa: E731
    result["sizes_mb"] = {"unet": mb(folders["unet_xml"]), "controlnet": mb(folders["controlnet_xml"]),
                          "text_encoder+vae": mb(folders["sd"] / "text_encoder.xml") + mb(folders["sd"] / "vae_decoder.xml")}
    result["size_mb"] = sum(result["sizes_mb"].values())
    return result


def child_ov(system: str, models: dict, args) -> dict:
    """This app's path: ImageService over the cached IR (converted / quantized by the prepare step)."""
    from pipelines.image.request import ImageOptions

    service, precision = _ov_service(system, models, args)
    pose = pose_image(args.size)
    options = ImageOptions(prompt=PROMPT, negative_prompt=NEGATIVE, steps=args.steps, guidance_scale=7.5,
                           seed=SEED, width=args.size, height=args.size, scheduler="UniPC")
    # First image from nothing loaded (IR on disk): read + compile + generate.
    t0 = time.perf_counter()
    first = service.generate(options, pose, precision=precision)
    result = {"system": system, "first_image_s": time.perf_counter() - t0}
    assert first.images[0].size == (args.size, args.size) and first.extra["precision"] == precision
    warm = []
    for _ in range(max(1, args.warm_images)):
        t0 = time.perf_counter()
        res = service.generate(options, pose, precision=precision)
        warm.append((time.perf_counter() - t0, res))
    best_time, best = min(warm, key=lambda item: item[0])
    result.update(per_image_s=best_time, per_step_s=best.extra["timings"]["seconds_per_step"],
                  decode_s=best.extra["timings"]["decode"], precision=best.extra["precision"],
                  per_image_note="warm call")
    return result


def child_ov_ab(models: dict, args) -> dict:
    """OpenVINO FP16 and INT8 loaded together and run in turns (short images, ``--ab-rounds`` times):
    the VM's speed drifts over minutes (other work on the machine), which this cancels out of the ratio."""
    from statistics import median

    from pipelines.image.request import ImageOptions

    service, _ = _ov_service("ov-int8", models, args)
    service.pool.limits["image"] = 2  # both pipelines stay loaded
    pose = pose_image(args.size)
    options = ImageOptions(prompt=PROMPT, negative_prompt=NEGATIVE, steps=args.ab_steps, guidance_scale=7.5,
                           seed=SEED, width=args.size, height=args.size, scheduler="UniPC")
    for precision in ("fp16", "int8"):  # load + compile + warm up
        service.generate(options, pose, precision=precision)
    steps: dict[str, list[float]] = {"fp16": [], "int8": []}
    for _ in range(args.ab_rounds):
        for precision in ("fp16", "int8"):
            steps[precision].append(service.generate(options, pose, precision=precision).extra["timings"]["seconds_per_step"])
    return {"system": "ov-fp16-vs-int8", "rounds": args.ab_rounds, "steps_per_image": args.ab_steps,
            "per_step_fp16_s": median(steps["fp16"]), "per_step_int8_s": median(steps["int8"]),
            "speedup": median(f / i for f, i in zip(steps["fp16"], steps["int8"])),
            # the fastest round of each: the least disturbed by other work on the VM (timeit's advice)
            "speedup_fastest": min(steps["fp16"]) / min(steps["int8"]), "all": steps}


def child_main(args) -> None:
    models = json.loads(args.models_json)
    models = {k: Path(v) for k, v in models.items()}
    if args.child.startswith("torch"):
        result = child_torch(args.child, models, args)
    elif args.child == "ov-fp16-vs-int8":
        result = child_ov_ab(models, args)
    elif args.child.endswith(":prepare"):
        result = child_ov_prepare(args.child.split(":")[0], models, args)
    else:
        result = child_ov(args.child, models, args)
    result["peak_mb"] = peak_mb()
    print("RESULT " + json.dumps(result, default=str), flush=True)


def run_child(system: str, models: dict, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, __file__, "--child", system, "--models-json", json.dumps({k: str(v) for k, v in models.items()}),
           "--work-dir", str(args.work_dir), "--steps", str(args.steps), "--size", str(args.size),
           "--threads", str(args.threads), "--warm-images", str(args.warm_images),
           "--warm-images-torch", str(args.warm_images_torch), "--subset-size", str(args.subset_size),
           "--calibration-steps", str(args.calibration_steps), "--calibration-size", str(args.calibration_size),
           "--ab-rounds", str(args.ab_rounds), "--ab-steps", str(args.ab_steps)]
    print(f"[{time.strftime('%H:%M:%S')}] {system} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=None, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"system": system, "error": f"exit code {proc.returncode}", "wall_s": time.perf_counter() - t0}
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall_s"] = time.perf_counter() - t0
    print(f"[{time.strftime('%H:%M:%S')}] {system}: {json.dumps(result, default=str)[:400]}", file=sys.stderr, flush=True)
    return result


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def _fmt(value, digits=2, suffix=""):
    return "" if value is None else f"{value:.{digits}f}{suffix}"


def report(rows: list[dict], args, ab: dict | None, host: dict) -> str:
    by = {r["system"]: r for r in rows if "error" not in r}
    fp16, fp32 = by.get("ov-fp16"), by.get("torch-fp32")
    lines = [
        f"SD1.5 + ControlNet OpenPose, full architecture, random weights, {args.size}x{args.size}, "
        f"{args.steps} UniPC steps, CFG 7.5 (batch 2), {args.threads} threads, {time.strftime('%Y-%m-%d')}, "
        f"{machine.summary(host)}",
        "",
        "| system | s / step | s / image | first image s | convert / quantize s | model MB on disk | peak MB generating | peak MB converting | step vs torch fp32 | step vs OV FP16 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['system']} | error: {r['error']} | | | | | | | | |")
            continue
        vs_torch = f"{fp32['per_step_s'] / r['per_step_s']:.2f}x" if fp32 else ""
        vs_fp16 = f"{fp16['per_step_s'] / r['per_step_s']:.2f}x" if fp16 else ""
        prepare = _fmt(r.get("prepare_s"), 0) if "prepare_s" in r else "-"
        lines.append(
            f"| {r['system']} | {r['per_step_s']:.2f} | {r['per_image_s']:.1f} | {r['first_image_s']:.1f} | {prepare} | "
            f"{r['size_mb']:.0f} | {r['peak_mb']:.0f} | {_fmt(r.get('prepare_peak_mb'), 0) or '-'} | {vs_torch} | {vs_fp16} |"
        )
    int8 = by.get("ov-int8")
    if int8 and fp16:
        q = int8.get("quantization", {})
        lines += [
            "",
            f"- UNet {fp16['sizes_mb']['unet']:.0f} MB FP16 -> {int8['sizes_mb']['unet']:.0f} MB INT8; "
            f"ControlNet {fp16['sizes_mb']['controlnet']:.0f} -> {int8['sizes_mb']['controlnet']:.0f} MB "
            "(text encoder and VAE stay FP16).",
            f"- INT8: {q.get('method', '?')}; {q.get('calibration_samples', '?')} calibration samples "
            f"({q.get('calibration', '?')}); quantization {_fmt(int8['prepare_s'], 0)} s "
            f"(gathering {q.get('timings', {}).get('gather_s', 0):.0f} s, ControlNet "
            f"{q.get('timings', {}).get('controlnet_s', 0):.0f} s, UNet {q.get('timings', {}).get('unet_s', 0):.0f} s), "
            f"peak {int8.get('prepare_peak_mb', 0) / 1024:.1f} GB"
            + (f" (measured {q.get('created')}, cached since)" if int8.get("prepare_cached") else "") + ".",
        ]
    if ab and "error" not in ab:
        lines.append(
            f"- OpenVINO FP16 and INT8 loaded together and run in turns ({ab['rounds']} rounds of "
            f"{ab['steps_per_image']}-step images, cancels the VM's speed drift): FP16 {ab['per_step_fp16_s']:.2f} s / step, "
            f"INT8 {ab['per_step_int8_s']:.2f} s / step: **INT8 {ab['speedup']:.2f}x faster per step** (median of the "
            f"rounds' ratios {', '.join(f'{f / i:.2f}' for f, i in zip(ab['all']['fp16'], ab['all']['int8']))}; "
            f"fastest round of each {min(ab['all']['fp16']):.2f} / {min(ab['all']['int8']):.2f} s: "
            f"{ab['speedup_fastest']:.2f}x).")
    lines.append("- s / step: ControlNet + UNet for the CFG batch, mean from step 2 on (OpenVINO: mean over all "
                 "steps of a warm call). s / image: a warm call including text encoding and VAE decode "
                 "(torch: the first call). First image: from nothing loaded, load + compile + generate.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--warm-images", type=int, default=1, help="warm OpenVINO images after the first")
    parser.add_argument("--warm-images-torch", type=int, default=0,
                        help="warm PyTorch images after the first (0: the first call is the per-image figure)")
    parser.add_argument("--subset-size", type=int, default=20,
                        help="INT8 calibration samples per model (the app's default is larger)")
    parser.add_argument("--calibration-steps", type=int, default=10, help="denoising steps per calibration image")
    parser.add_argument("--calibration-size", type=int, default=512, help="calibration image size")
    parser.add_argument("--ab-rounds", type=int, default=3,
                        help="rounds of the interleaved OpenVINO FP16 / INT8 comparison (0: skip it)")
    parser.add_argument("--ab-steps", type=int, default=5, help="steps per image in the interleaved comparison")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "models_cache" / "sd_bench")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sd.json")
    parser.add_argument("--build-only", action="store_true", help="build the random-weight models, then stop")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--models-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work_dir = args.work_dir.resolve()
    if args.child:
        child_main(args)
        return
    args.work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    models = build_models(args.work_dir)
    if args.build_only:
        return
    rows, ab = [], None
    for system in args.systems:
        if system.startswith("ov"):
            prepared = run_child(f"{system}:prepare", models, args)
            if "error" in prepared:
                rows.append(dict(prepared, system=system))
                continue
            prepared.pop("system")
            rows.append({**prepared, **run_child(system, models, args)})
        else:
            rows.append(run_child(system, models, args))
        done = {r["system"] for r in rows if "error" not in r}
        if ab is None and args.ab_rounds and {"ov-fp16", "ov-int8"} <= done:
            ab = run_child("ov-fp16-vs-int8", models, args)
    host = machine.describe()
    table = report(rows, args, ab, host)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M"), "size": args.size, "steps": args.steps, "threads": args.threads,
        "subset_size": args.subset_size, "calibration_steps": args.calibration_steps,
        "total_wall_s": time.perf_counter() - started, "machine": host, "results": rows, "interleaved": ab, "table": table,
    }, indent=2, default=str))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
