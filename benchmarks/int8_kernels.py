"""One linear layer of the SD1.5 UNet / Whisper encoder, three ways on this CPU: why the app compiles
INT8 matmuls as 1x1 convolutions on AVX2 CPUs without VNNI, and why it quantizes weights on 7 bits there.

    python benchmarks/int8_kernels.py            # ~2 minutes on 2 cores

For each matmul shape of the UNet's attention and feed-forward layers (CFG batch 2, 512x512) and of
Whisper base's encoder, in one process, in turns (median of ``--rounds``):
- ``fp32 FC``: the FP16 IR's layer (OpenVINO runs it fp32 where the CPU has no bf16/fp16 units);
- ``INT8 FC``: that layer quantized by the app's SD quantization (``quantize.quantize_sd_model``), as
  OpenVINO compiles it (a fully connected layer);
- ``INT8 1x1 conv``: the same quantized layer after ``cpu_int8.int8_matmuls_as_convolutions``.
Then the saturation check: a layer whose u8 x s8 product pairs overflow int16 on CPUs without VNNI,
quantized with NNCF's overflow fix off and on; its error against fp32 (relative L2).

Prints tables and writes JSON (default benchmarks/results/int8-kernels.json).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import machine  # benchmarks/machine.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (where, batch, tokens, in channels, out channels)
SHAPES = [
    ("UNet 64x64 attention projection", 2, 4096, 320, 320),
    ("UNet 64x64 feed-forward in (GEGLU)", 2, 4096, 320, 2560),
    ("UNet 64x64 feed-forward out", 2, 4096, 1280, 320),
    ("UNet 32x32 attention projection", 2, 1024, 640, 640),
    ("UNet 32x32 feed-forward in (GEGLU)", 2, 1024, 640, 5120),
    ("UNet 16x16 feed-forward in (GEGLU)", 2, 256, 1280, 10240),
    ("UNet 8x8 attention projection", 2, 64, 1280, 1280),
    ("UNet cross-attention key/value (text)", 2, 77, 768, 320),
    ("Whisper base encoder projection", 1, 1500, 512, 512),
    ("Whisper base encoder feed-forward in", 1, 1500, 512, 2048),
]


def linear(batch, tokens, channels, out, rng, positive=False):
    import openvino as ov
    from openvino import opset13 as ops

    weights = rng.standard_normal((out, channels)).astype(np.float32) * 0.05
    if positive:
        weights = np.abs(weights) + 0.05
    x = ops.parameter([batch, tokens, channels], np.float32, name="x")
    y = ops.add(ops.matmul(x, ops.constant(weights), False, True), ops.constant(np.zeros(out, np.float32)))
    return ov.Model([y], [x])


def time_in_turns(requests: dict, inputs, rounds: int) -> dict:
    times = {name: [] for name in requests}
    for _ in range(rounds):
        for name, request in requests.items():
            started = time.perf_counter()
            request.infer(inputs)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) * 1000 for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "int8-kernels.json")
    args = parser.parse_args()

    import nncf
    import openvino as ov

    from pipelines.core import cpu_int8
    from pipelines.image import int8 as quantize

    nncf.set_log_level(logging.ERROR)
    host = machine.describe()
    core, rng = ov.Core(), np.random.default_rng(0)
    rows = []
    for where, batch, tokens, channels, out in SHAPES:
        model = linear(batch, tokens, channels, out, rng)
        samples = [{"x": rng.standard_normal((batch, tokens, channels)).astype(np.float32)} for _ in range(3)]
        quantized = quantize.quantize_sd_model(model.clone(), samples, quantize.sd_overflow_fix())
        as_convolution = quantized.clone()
        cpu_int8.int8_matmuls_as_convolutions(as_convolution)
        requests = {name: core.compile_model(m, "CPU").create_infer_request()
                    for name, m in (("fp32 FC", model), ("INT8 FC", quantized), ("INT8 1x1 conv", as_convolution))}
        for request in requests.values():
            request.infer(samples[0])  # warm-up
        ms = time_in_turns(requests, samples[1], args.rounds)
        rows.append({"layer": where, "shape": [batch, tokens, channels, out],
                     "gflop": round(2 * batch * tokens * channels * out / 1e9, 2), "ms": {k: round(v, 2) for k, v in ms.items()},
                     "int8_fc_vs_fp32": round(ms["fp32 FC"] / ms["INT8 FC"], 2),
                     "int8_conv_vs_fp32": round(ms["fp32 FC"] / ms["INT8 1x1 conv"], 2)})

    # Saturation: activations at the top of their range times same-sign weights.
    model = linear(2, 64, 64, 32, rng, positive=True)
    samples = [{"x": (4.0 * (rng.random((2, 64, 64)) > 0.1)).astype(np.float32)} for _ in range(4)]
    reference = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(samples[0])[0]
    saturation = {}
    for fix in ("disable", "enable"):
        out = core.compile_model(quantize.quantize_sd_model(model.clone(), samples, fix), "CPU")(samples[0])[0]
        saturation[fix] = round(float(np.linalg.norm(out - reference) / np.linalg.norm(reference)), 4)

    title = f"INT8 linear layers, {args.rounds} rounds in turns, {time.strftime('%Y-%m-%d %H:%M')}, {machine.summary(host)}"
    print(title)
    print("\n| layer | [B, T, C] -> D | GFLOP | fp32 FC ms | INT8 FC ms | INT8 1x1 conv ms | INT8 FC vs fp32 | INT8 conv vs fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        b, t, c, d = row["shape"]
        ms = row["ms"]
        print(f"| {row['layer']} | [{b}, {t}, {c}] -> {d} | {row['gflop']} | {ms['fp32 FC']} | {ms['INT8 FC']} | "
              f"{ms['INT8 1x1 conv']} | {row['int8_fc_vs_fp32']}x | {row['int8_conv_vs_fp32']}x |")
    print(f"\nSaturation (u8 x s8 pairs at the top of their range), error vs fp32: overflow fix off "
          f"{saturation['disable']:.2%}, on {saturation['enable']:.2%}; this CPU saturates: {cpu_int8.saturating_int8()}; "
          f"the app compiles INT8 matmuls as convolutions here: {cpu_int8.matmuls_as_convolutions('CPU')}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"title": title, "command": " ".join(["python", "benchmarks/int8_kernels.py"] + sys.argv[1:]),
                                    "machine": host, "rows": rows, "saturation_error": saturation,
                                    "saturating_int8": cpu_int8.saturating_int8(),
                                    "matmuls_as_convolutions": cpu_int8.matmuls_as_convolutions("CPU")}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
