"""INT8 on x86 CPUs without VNNI (AVX2-only CPUs such as the AMD EPYC of benchmarks/README.md).

Two things differ there, both measured on the full SD1.5 UNet and ControlNet (random weights, 512x512,
CFG, static shapes; benchmarks/README.md, "AVX2: INT8 without saturation, matmuls as 1x1 convolutions"):

1. **Saturation.** Without VNNI, oneDNN's INT8 kernels multiply u8 activations by s8 weights with
   ``vpmaddubsw``, which adds each pair of products into a *saturating* int16. With weights that use
   the whole 8-bit range the sums clip: the INT8 ControlNet's outputs were 19% off FP16 (relative L2),
   against 4-5% for an exact float emulation of the same quantized model. NNCF's overflow fix (weights
   on 7 bits, so pairs cannot clip) brings the real kernels to the emulation's 5%. SD INT8 and the
   calibrated Whisper encoder made on such a CPU use it (:func:`overflow_fix`; it is part of their
   folders' keys).
2. **Kernels.** The INT8 fully connected kernel there (``jit_gemm_i8``) runs at 0.7-0.8x fp32, while
   the INT8 1x1 convolution (``jit_avx2_1x1_I8``) is 1.1-1.3x faster than fp32 on the UNet's matmul
   shapes. So on such a CPU every INT8 MatMul over ``[B, T, C]`` activations is compiled as a 1x1
   convolution over ``[B*T, C, 1, 1]`` (:func:`int8_matmuls_as_convolutions`): the same quantizers
   and INT8 weights, only reshapes around it (no copies). A UNet call went from 11.2 to 9.2 s
   (FP16: 14.7 s). The IR on disk is NNCF's usual one; the rewrite happens when compiling.

CPUs with VNNI or AMX have neither problem, and nothing above changes what they run.

3. **Attention.** With INT8 inputs the CPU plugin runs SD's attention differently: on the AVX2 EPYC it
   splits the fused kernel into INT8 MatMuls and a Softmax, slower than the FP16 kernel (UNet call
   12.2 s against 10.7-11.1 s with attention left FP16); on a Xeon with AMX-INT8 the fused kernel runs
   in INT8 (``Subgraph jit_avx512_i8``: 0.68 s against 0.89 s bf16 per 512x512 UNet call), and the UNet
   call is faster with attention quantized (1.42 s against 1.50 s; FP16 1.99 s). So SD INT8 quantizes
   attention only where the CPU has AMX-INT8 (:func:`int8_attention`).
"""
from __future__ import annotations

import functools
from pathlib import Path

#: Any of these gives the CPU INT8 dot products that do not saturate (VNNI) or matrix units (AMX).
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def saturating_int8(flags: frozenset | None = None) -> bool:
    """Whether this is an x86 CPU whose INT8 kernels saturate (SSE/AVX2/AVX-512 without VNNI).

    Unknown CPUs (no flags to read) count as not saturating: their INT8 models stay NNCF's default.
    """
    flags = cpu_flags() if flags is None else flags
    return "sse4_1" in flags and not (flags & VNNI_FLAGS)


def overflow_fix(default: str) -> str:
    """NNCF's ``overflow_fix`` for models quantized here: ``enable`` (7-bit weights, nothing can
    saturate) where INT8 kernels saturate, else ``default`` (NNCF's own default, or optimum-intel's)."""
    return "enable" if saturating_int8() else default


def int8_attention(flags: frozenset | None = None) -> bool:
    """Whether SD INT8 made on this CPU quantizes attention too: only with AMX-INT8, where the fused
    attention kernel runs in INT8 and gains (measured); elsewhere INT8 inputs split it and lose."""
    flags = cpu_flags() if flags is None else flags
    return "amx_int8" in flags


def matmuls_as_convolutions(device: str, available: tuple | None = None, flags: frozenset | None = None) -> bool:
    """Whether INT8 matmuls compiled for ``device`` run faster as 1x1 convolutions: on an AVX2 CPU
    without VNNI (measured there; AVX-512 CPUs without VNNI were not, so they keep the usual form).
    ``available``: the devices AUTO may pick from (default: this machine's, ``devices.available_devices``)."""
    flags = cpu_flags() if flags is None else flags
    if available is None:
        from pipelines.core.devices import available_devices

        available = available_devices()
    name = (device or "").split(":")[0].split(".")[0].upper()
    on_cpu = name == "CPU" or (name == "AUTO" and [d for d in available if d != "AUTO"] == ["CPU"])
    return on_cpu and saturating_int8(flags) and "avx2" in flags and "avx512f" not in flags


_SHAPE_ONLY = {"Constant", "Convert", "Subtract", "Multiply", "Reshape", "Transpose", "Unsqueeze", "Squeeze"}


def _constant(output) -> bool:
    """Whether ``output`` is computed from constants only (INT8 weights and their dequantization)."""
    node = output.get_node()
    if node.get_type_name() not in _SHAPE_ONLY:
        return False
    return all(_constant(port.get_source_output()) for port in node.inputs())


def int8_matmuls_as_convolutions(model) -> int:
    """Rewrite each INT8 MatMul of ``model`` (an ``ov.Model``, changed in place) as a 1x1 convolution.

    A MatMul qualifies when its activations ``[..., C]`` (``[B, T, C]`` in attention and feed-forward
    layers, ``[B, C]`` in the time embedding) come from a FakeQuantize and its weights ``[D, C]`` (or
    ``[C, D]``) from constants; it becomes ``Reshape([-1, C, 1, 1])`` -> ``Convolution`` (weights
    reshaped to ``[D, C, 1, 1]``) -> ``Reshape([..., D])``. OpenVINO's
    low-precision transformations then run it as an INT8 convolution. Returns how many it rewrote.
    """
    import numpy as np
    from openvino import opset13 as ops

    rewritten = 0
    for node in list(model.get_ordered_ops()):
        if node.get_type_name() != "MatMul":
            continue
        activations, weights = node.input_value(0), node.input_value(1)
        attributes = node.get_attributes()
        shape, weight_shape = activations.get_partial_shape(), weights.get_partial_shape()
        if (activations.get_node().get_type_name() != "FakeQuantize" or attributes["transpose_a"]
                or shape.rank.is_dynamic or shape.rank.get_length() < 2 or shape[-1].is_dynamic
                or weight_shape.is_dynamic or len(weight_shape.to_shape()) != 2 or not _constant(weights)):
            continue
        if not attributes["transpose_b"]:
            weights = ops.transpose(weights, ops.constant(np.array([1, 0], np.int64))).output(0)
        out_channels, in_channels = (int(d) for d in weights.get_shape())
        kernel = ops.reshape(weights, ops.constant(np.array([out_channels, in_channels, 1, 1], np.int64)), False)
        flat = ops.reshape(activations, ops.constant(np.array([-1, in_channels, 1, 1], np.int64)), False)
        convolution = ops.convolution(flat, kernel, [1, 1], [0, 0], [0, 0], [1, 1])
        leading = ops.gather(ops.shape_of(activations, "i64"),
                             ops.constant(np.arange(shape.rank.get_length() - 1, dtype=np.int64)),
                             ops.constant(np.array(0, np.int64)))
        target = ops.concat([leading, ops.constant(np.array([out_channels], np.int64))], 0)
        result = ops.reshape(convolution, target, False)
        result.set_friendly_name(node.get_friendly_name())
        node.output(0).replace(result.output(0))
        rewritten += 1
    if rewritten:
        model.validate_nodes_and_infer_types()
    return rewritten


def count_int8(xml_path: Path) -> dict[str, int]:
    """How much of an IR is INT8: FakeQuantize nodes and u8/i8 weight constants."""
    import openvino as ov

    model = ov.Core().read_model(xml_path)
    counts = {"fake_quantize": 0, "int8_constants": 0}
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind == "FakeQuantize":
            counts["fake_quantize"] += 1
        elif kind == "Constant" and op.get_output_element_type(0).get_type_name() in ("u8", "i8"):
            counts["int8_constants"] += 1
    return counts
