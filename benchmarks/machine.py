"""What the benchmarks ran on: CPU model, the vector/matrix extensions that decide OpenVINO's kernels,
and the precision OpenVINO's CPU plugin runs FP16 models in on it.

The same scripts give very different FP16/INT8 ratios on different CPUs: with AMX (recent Xeons)
OpenVINO runs FP16 IR as bf16 on the matrix units, and INT8 activations gain little; with AVX2 only
it runs FP16 IR as fp32, and INT8 weights halve or quarter what each decoder step reads. So every
result file and table title carries this description.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def describe() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    info = {"cpu": model, "cpus": os.cpu_count(), "isa": [f for f in ISA_FLAGS if f in flags]}
    try:
        import openvino as ov

        core = ov.Core()
        info["openvino"] = ov.__version__
        info["openvino_cpu_capabilities"] = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        info["openvino_cpu_precision"] = core.get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
    except Exception as exc:  # the description must never stop a benchmark
        info["openvino_error"] = str(exc)
    return info


def summary(info: dict) -> str:
    """One line for table titles, e.g. 'AMD EPYC, 2 CPUs, AVX2 (no AVX-512, no AMX), OpenVINO CPU runs FP16 IR as f32'."""
    isa = info.get("isa", [])
    parts = ["AMX" if "amx_bf16" in isa else None, "AVX-512" if "avx512f" in isa else None]
    simd = ", ".join(p for p in parts if p) or ("AVX2 (no AVX-512, no AMX)" if "avx2" in isa else "no AVX2")
    return (f"{info.get('cpu', '?')}, {info.get('cpus')} CPUs, {simd}, "
            f"OpenVINO CPU runs FP16 IR as {info.get('openvino_cpu_precision', '?')}")


if __name__ == "__main__":
    print(summary(describe()))
