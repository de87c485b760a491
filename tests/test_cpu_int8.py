"""INT8 on CPUs without VNNI (pipelines/cpu_int8.py): no saturation, matmuls compiled as 1x1 convolutions.

Small OpenVINO models quantized by the app's own SD quantization (``quantize.quantize_sd_model``), so
this file takes seconds.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

try:
    import pipelines  # noqa: F401
except ImportError:  # running pytest without the project root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    from conftest import runtime_layers
except ImportError:  # tests/ turned into a package
    from tests.conftest import runtime_layers
from pipelines.core import cpu_int8
from pipelines.image import int8 as quantize  # noqa: E402
from pipelines.speech import int8 as whisper_int8  # noqa: E402

ov = pytest.importorskip("openvino")
nncf = pytest.importorskip("nncf")

EPYC = frozenset("fpu sse4_1 sse4_2 avx avx2 fma f16c bmi2 sha_ni".split())  # AVX2, no VNNI (the AMD EPYC)
SKYLAKE_X = EPYC | {"avx512f", "avx512bw"}  # AVX-512 without VNNI
ICE_LAKE = SKYLAKE_X | {"avx512_vnni"}
SAPPHIRE_RAPIDS = ICE_LAKE | {"amx_bf16", "amx_int8"}
ALDER_LAKE = EPYC | {"avx_vnni"}
F32 = {"INFERENCE_PRECISION_HINT": "f32"}  # compile without bf16 rounding


@pytest.fixture(autouse=True)
def quiet_nncf():
    level = nncf.get_log_level() if hasattr(nncf, "get_log_level") else logging.INFO
    nncf.set_log_level(logging.ERROR)
    yield
    nncf.set_log_level(level)


def _linear_model(batch=2, tokens=64, channels=64, out=32, positive_weights=False, seed=0):
    """x[batch, tokens, channels] -> MatMul(W[out, channels]^T) + bias: a transformer's linear layer
    (``tokens=None``: x[batch, channels], as the UNet's time embedding)."""
    from openvino import opset13 as ops

    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((out, channels)).astype(np.float32) * 0.1
    if positive_weights:
        weights = np.abs(weights) + 0.05
    x = ops.parameter([batch, tokens, channels] if tokens else [batch, channels], np.float32, name="x")
    y = ops.add(ops.matmul(x, ops.constant(weights), False, True),
                ops.constant(rng.standard_normal(out).astype(np.float32)))
    return ov.Model([y], [x])


def test_which_cpus_saturate_and_which_run_matmuls_as_convolutions():
    assert cpu_int8.saturating_int8(EPYC) and cpu_int8.saturating_int8(SKYLAKE_X)
    for flags in (ICE_LAKE, SAPPHIRE_RAPIDS, ALDER_LAKE, frozenset()):  # VNNI, AMX, or nothing known
        assert not cpu_int8.saturating_int8(flags), sorted(flags)
    assert cpu_int8.matmuls_as_convolutions("CPU", flags=EPYC)
    assert cpu_int8.matmuls_as_convolutions("AUTO", ("CPU", "AUTO"), flags=EPYC)  # AUTO can only pick the CPU
    assert not cpu_int8.matmuls_as_convolutions("AUTO", ("CPU", "GPU.0", "AUTO"), flags=EPYC)
    assert not cpu_int8.matmuls_as_convolutions("GPU", ("CPU", "GPU"), flags=EPYC)
    for flags in (SKYLAKE_X, ICE_LAKE, SAPPHIRE_RAPIDS, ALDER_LAKE):  # measured only on AVX2 without VNNI
        assert not cpu_int8.matmuls_as_convolutions("CPU", flags=flags), sorted(flags)
    assert cpu_int8.int8_attention(SAPPHIRE_RAPIDS)  # AMX-INT8: SD attention is quantized too
    for flags in (EPYC, SKYLAKE_X, ICE_LAKE, ALDER_LAKE, frozenset()):
        assert not cpu_int8.int8_attention(flags), sorted(flags)
    assert quantize.sd_ignored_types() == (() if cpu_int8.int8_attention() else ("ScaledDotProductAttention",))
    saturates = cpu_int8.saturating_int8()
    assert quantize.sd_overflow_fix() == ("enable" if saturates else "first_layer_only")  # NNCF's default
    assert whisper_int8.encoder_overflow_fix() == ("enable" if saturates else "disable")  # optimum-intel's


def test_int8_on_this_cpu_does_not_saturate():
    """Activations at the top of their range times same-sign weights: the pairs of u8 x s8 products
    overflow int16 on CPUs without VNNI unless the weights use 7 bits. With the overflow fix this CPU
    gets, the INT8 layer stays within 1% of FP32; with full 8-bit weights it is several times worse
    here (measured 6.7% against 0.2%)."""
    rng = np.random.default_rng(1)
    model = _linear_model(positive_weights=True)
    samples = [{"x": (4.0 * (rng.random((2, 64, 64)) > 0.1)).astype(np.float32)} for _ in range(4)]
    core = ov.Core()
    reference = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(samples[0])[0]

    def error(overflow_fix: str) -> float:
        quantized = quantize.quantize_sd_model(model.clone(), samples, overflow_fix)
        out = core.compile_model(quantized, "CPU")(samples[0])[0]
        return float(np.linalg.norm(out - reference) / np.linalg.norm(reference))

    assert error(quantize.sd_overflow_fix()) < 0.01
    if cpu_int8.saturating_int8():
        assert error("disable") > 3 * error("enable")


def test_int8_matmuls_compile_as_int8_convolutions_with_the_same_results():
    rng = np.random.default_rng(2)
    samples = [{"x": rng.standard_normal((2, 64, 64)).astype(np.float32)} for _ in range(4)]
    quantized = quantize.quantize_sd_model(_linear_model(), samples, "enable")
    rewritten = quantized.clone()
    assert cpu_int8.int8_matmuls_as_convolutions(rewritten) == 1
    assert not [op for op in rewritten.get_ops() if op.get_type_name() == "MatMul"]
    assert [op.get_friendly_name() for op in rewritten.get_results()] == [op.get_friendly_name() for op in quantized.get_results()]
    core = ov.Core()
    # f32 around the INT8 kernels: on a CPU with bf16 (AMX) their outputs would be rounded to bf16, and the
    # two forms round at different points; this compares the rewrite itself
    before, after = core.compile_model(quantized, "CPU", F32), core.compile_model(rewritten, "CPU", F32)
    assert ("Convolution", "u8") in runtime_layers(after) or ("Convolution", "i8") in runtime_layers(after)
    assert not [layer for layer in runtime_layers(after) if layer[0].startswith("FullyConnected")]
    x = samples[0]
    np.testing.assert_allclose(after(x)[0], before(x)[0], rtol=1e-4, atol=1e-4)
    assert after(x)[0].shape == (2, 64, 32)


def test_rewrite_keeps_dynamic_shapes_and_leaves_float_matmuls_alone():
    rng = np.random.default_rng(3)
    samples = [{"x": rng.standard_normal((2, 64, 64)).astype(np.float32)} for _ in range(4)]
    quantized = quantize.quantize_sd_model(_linear_model(), samples, "enable")
    quantized.reshape({"x": [-1, -1, 64]})  # batch and tokens dynamic, as the IR on disk
    assert cpu_int8.int8_matmuls_as_convolutions(quantized) == 1
    compiled = ov.Core().compile_model(quantized, "CPU")
    for shape in ((1, 77, 64), (2, 10, 64)):
        assert compiled(rng.standard_normal(shape).astype(np.float32))[0].shape == shape[:2] + (32,)
    flat = [{"x": rng.standard_normal((2, 64)).astype(np.float32)} for _ in range(4)]
    embedding = quantize.quantize_sd_model(_linear_model(tokens=None), flat, "enable")
    expected = ov.Core().compile_model(embedding, "CPU", F32)(flat[0])[0]
    assert cpu_int8.int8_matmuls_as_convolutions(embedding) == 1
    np.testing.assert_allclose(ov.Core().compile_model(embedding, "CPU", F32)(flat[0])[0], expected, rtol=1e-4, atol=1e-4)
    fp32 = _linear_model()  # no FakeQuantize: nothing to gain, nothing rewritten
    assert cpu_int8.int8_matmuls_as_convolutions(fp32) == 0
    assert [op for op in fp32.get_ops() if op.get_type_name() == "MatMul"]


def test_sd_int8_folder_key_follows_the_attention_choice(monkeypatch):
    """An SD INT8 folder made with INT8 attention (AMX-INT8) is not reused by a CPU that leaves attention FP16
    (its INT8 attention would split into slow kernels there), and the other way round."""
    calibration = quantize.SDCalibration(subset_size=2, steps=2, width=64, height=64)
    keys = {}
    for amx in (False, True):
        monkeypatch.setattr(cpu_int8, "int8_attention", lambda flags=None, amx=amx: amx)
        assert quantize.sd_ignored_types() == (() if amx else ("ScaledDotProductAttention",))
        keys[amx] = calibration.load().key
    assert keys[False] != keys[True]
