"""INT8 that fits (issue #20): the SD INT8 models are made in bounded memory (each phase in a child
process, calibration inputs on disk, static shapes, CFG calls split to batch 1, NNCF statistics in
chunks) with the same result, Fast mode's pair is quantized the Fast way, and when the memory is not
there INT8 is refused with a message instead of the process being killed.

Tiny random-weight models (tests/image_fixtures.py), a small calibration (a few 256x256 steps).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import image_fixtures as fx
from pipelines.core import memory
from pipelines.core.cache import READY_MARKER
from pipelines.image import int8 as quantize
from pipelines.image.calibration import SDCalibration
from pipelines.image.request import ImageOptions, read_png_metadata
from pipelines.image.service import ImageService

PROMPT = "a dancer on a beach at sunset"
CALIBRATION = SDCalibration(subset_size=4, steps=2, width=256, height=256)
GB = 1024 ** 3


@pytest.fixture(scope="module")
def pose_image():
    from pipelines.image.pose import draw_skeleton, poses_from_detection

    candidate, subset = fx.known_detection()
    return draw_skeleton(poses_from_detection(candidate, subset, 256, 256), 256, 256)


def _service(cache_root, tiny_models, fast_models, calibration=CALIBRATION) -> ImageService:
    return ImageService(cache_root, sd_model=str(tiny_models["sd"]), controlnet_model=str(tiny_models["controlnet"]),
                        lcm_lora=str(fast_models["lcm_lora"]), taesd=str(fast_models["taesd"]),
                        calibration=calibration)


# --------------------------------------------------------------------------- memory


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_available_memory_follows_the_tightest_cgroup_limit(tmp_path, monkeypatch):
    # cgroup v2: a container of 8 GB using 6 GB, 1 GB of it reclaimable page cache -> 3 GB
    root = tmp_path / "v2"
    _write(tmp_path / "cgroup2", "0::/docker/abc\n")
    _write(root / "docker" / "abc" / "memory.max", str(8 * GB))
    _write(root / "docker" / "abc" / "memory.current", str(6 * GB))
    _write(root / "docker" / "abc" / "memory.stat", f"anon 123\ninactive_file {GB}\n")
    _write(root / "docker" / "memory.max", "max")
    found = memory.cgroup_headroom(tmp_path / "cgroup2", root)
    assert found["headroom"] == 3 * GB and found["limit"] == 8 * GB
    # cgroup v1: no limit of its own (~2**63), a parent's of 4 GB binds
    root = tmp_path / "v1"
    _write(tmp_path / "cgroup1", "5:cpu:/\n4:memory:/a/b\n")
    _write(root / "memory" / "a" / "b" / "memory.limit_in_bytes", str(2 ** 63 - 4096))
    _write(root / "memory" / "a" / "b" / "memory.usage_in_bytes", str(GB))
    _write(root / "memory" / "a" / "memory.limit_in_bytes", str(4 * GB))
    _write(root / "memory" / "a" / "memory.usage_in_bytes", str(3 * GB))
    _write(root / "memory" / "a" / "memory.stat", f"total_inactive_file {GB // 2}\n")
    assert memory.cgroup_headroom(tmp_path / "cgroup1", root)["headroom"] == GB + GB // 2
    assert memory.cgroup_headroom(tmp_path / "none", root) is None
    # this machine: something sensible, and the environment variable overrides it
    assert memory.available_memory()["available"] > 0
    monkeypatch.setenv(memory.ENV_AVAILABLE, "2.5")
    assert memory.available_memory()["available"] == int(2.5 * GB)
    monkeypatch.setenv(memory.ENV_AVAILABLE, "lots")
    with pytest.raises(ValueError, match="number of gigabytes"):
        memory.available_memory()


def test_the_memory_int8_needs_scales_from_the_measured_full_size_peak(tmp_path):
    unet = tmp_path / "unet.xml"
    with open(unet.with_suffix(".bin"), "wb") as handle:  # the full SD1.5 UNet's size, sparse
        handle.truncate(quantize.MEASURED_UNET_IR_BYTES)
    full = quantize.int8_memory_needed(unet, SDCalibration())
    assert 11.4 * GB < full < 11.6 * GB  # 10.1 GB measured + 14%
    assert quantize.int8_memory_needed(unet, SDCalibration(width=768, height=768)) > full
    unet.with_suffix(".bin").write_bytes(b"0" * 1000)
    assert quantize.int8_memory_needed(unet, CALIBRATION) == quantize.MIN_MEMORY_BYTES


def test_int8_is_refused_with_a_message_when_the_memory_is_short(cache_root, tiny_models, fast_models, ir_folders,
                                                                  pose_image, monkeypatch):
    # a calibration no other test uses: its INT8 folder does not exist, so making it is what would run
    service = _service(cache_root, tiny_models, fast_models, SDCalibration(subset_size=3, steps=3, width=256,
                                                                           height=256))
    monkeypatch.setenv(memory.ENV_AVAILABLE, "0.25")
    options = ImageOptions(prompt=PROMPT, steps=3, width=256, height=256)
    with pytest.raises(memory.NotEnoughMemory) as info:
        service.generate(options, pose_image, precision="int8")
    message = str(info.value)
    print(message)
    assert message.startswith("Not enough free memory for making the INT8 image models: it needs about 1.0 GB "
                              "and 0.2 GB is available.")
    assert "Precision FP16 works without them" in message and isinstance(info.value, ValueError)
    assert service.loaded() == [] and service.slots.waiting == 0
    sd, cn = ir_folders["sd"], ir_folders["controlnet"]
    key = service.calibration.load().key
    assert not service.layout.sd_int8(sd, cn, key).exists()
    # FP16 works, and takes the slot at once (the refusal left it free)
    assert service.generate(options, pose_image).images[0].size == (256, 256)


# --------------------------------------------------------------------------- same result, less memory


def _fake_quantize_ranges(xml: Path) -> dict[str, list]:
    """The ranges of the FakeQuantize feeding each input of each operation (keyed by that input: reshaping
    a model merges two identical FakeQuantize nodes on the same tensor into one, the same computation)."""
    import openvino as ov

    ranges = {}
    for op in ov.Core().read_model(xml).get_ops():
        if op.get_type_name() != "FakeQuantize":
            continue
        values = []
        for index in range(1, 5):
            node = op.input_value(index).get_node()
            while node.get_type_name() == "Convert":
                node = node.input_value(0).get_node()
            values.append(np.asarray(node.get_data(), dtype=np.float32))
        for target in op.output(0).get_target_inputs():
            ranges[f"{target.get_node().get_friendly_name()}:{target.get_index()}"] = values
    return ranges


def test_the_low_memory_path_quantizes_to_the_same_ranges(ir_folders, tmp_path):
    """Today's way (samples in memory, dynamic shapes, NNCF's statistics in one piece) and the low-memory way
    (samples on disk read one at a time, static shapes, statistics in 4 chunks per batch item) give the same
    FakeQuantize ranges, on CFG calibration (batch 2)."""
    import openvino as ov

    from pipelines.image.lowmem import DiskRecorder

    xml = ir_folders["controlnet"] / "controlnet.xml"
    rng = np.random.default_rng(0)
    text, control = (rng.standard_normal((2, 77, 32)).astype(np.float32),
                     rng.random((2, 3, 256, 256)).astype(np.float32))
    samples = [{"sample": rng.standard_normal((2, 4, 32, 32)).astype(np.float32) * 2,
                "timestep": np.array(float(t), dtype=np.float32), "encoder_hidden_states": text,
                "controlnet_cond": control, "conditioning_scale": np.array(1.0, dtype=np.float32)}
               for t in (999, 700, 400, 100)]
    recorder = DiskRecorder(tmp_path / "samples")
    for sample in samples:
        recorder("controlnet", sample)
    recorder.save_index(len(samples))
    fix, ignored = quantize.sd_overflow_fix(), quantize.sd_ignored_types()
    shared = ("encoder_hidden_states", "controlnet_cond")  # kept as they are, once per image
    in_memory = [{k: v.astype(np.float16) if k not in shared and v.dtype == np.float32 and v.size > 65536 else v
                  for k, v in s.items()} for s in samples]  # as recorded: other big float32 arrays as float16
    today = quantize.quantize_sd_model(ov.Core().read_model(xml), in_memory, fix, ignored)
    ov.save_model(today, tmp_path / "today.xml", compress_to_fp16=True)
    facts = quantize.quantize_phase(str(xml), str(tmp_path / "samples"), "controlnet", str(tmp_path / "low.xml"),
                                    fix, ignored, stat_chunks=4)
    assert facts["samples"] == 4 and facts["statistics_chunks"] == 8  # batch 2: twice the chunks
    expected, got = _fake_quantize_ranges(tmp_path / "today.xml"), _fake_quantize_ranges(tmp_path / "low.xml")
    assert len(expected) > 10 and got.keys() == expected.keys()
    for name in expected:
        for a, b in zip(expected[name], got[name]):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6, err_msg=name)
    # the IR on disk keeps its dynamic shapes, like the FP16 one
    assert ov.Core().read_model(tmp_path / "low.xml").inputs[0].get_partial_shape().is_dynamic


# --------------------------------------------------------------------------- Fast mode's INT8 pair


def test_fast_int8_pair_is_made_in_child_processes_calibrated_the_fast_way(cache_root, tiny_models, fast_models,
                                                                            ir_folders, pose_image, tmp_path):
    service = _service(cache_root, tiny_models, fast_models)
    messages = []
    options = ImageOptions(prompt=PROMPT, steps=4, guidance_scale=1.0, width=256, height=256, seed=5, mode="fast")
    # another test of the session (the Fast compare panel) may have made this pair first: then it is only loaded
    fp16 = service.model_folders(mode="fast")
    made_here = not service.layout.sd_int8(fp16["sd"], fp16["controlnet"], CALIBRATION.for_mode("fast").load().key,
                                           lcm_folder=fp16["lcm"]).exists()
    result = service.generate(options, pose_image, precision="int8", load_progress=lambda f, m: messages.append(m))
    assert result.extra["precision"] == "int8" and result.extra["mode"] == "fast"
    assert np.asarray(result.images[0], dtype=np.float64).std() > 1.0
    folders = service.model_folders(precision="int8", mode="fast")
    int8 = folders["int8"]
    assert int8 == service.layout.sd_int8(fp16["sd"], fp16["controlnet"], CALIBRATION.for_mode("fast").load().key,
                                          lcm_folder=fp16["lcm"])
    assert "--lcm-" in int8.name and int8.parent.name == ir_folders["sd"].name
    assert int8 != service.layout.sd_int8(ir_folders["sd"], ir_folders["controlnet"],
                                          CALIBRATION.load().key)  # not Quality's pair
    marker = json.loads((int8 / READY_MARKER).read_text())
    assert marker["mode"] == "fast" and marker["lcm_unet"] == str(folders["lcm"])
    assert marker["calibration"].startswith("1 FP16 images x 4 LCM steps at 256x256, no CFG (batch 1)")
    assert marker["calibration_samples_per_model"] == {"controlnet": 4, "unet": 4}
    low = marker["low_memory"]
    assert low["child_processes"] is True and low["statistics_chunks"] == {"controlnet": 4, "unet": 4}  # batch 1
    assert set(low["peak_rss_mb"]) == {"gather", "controlnet", "unet"} and min(low["peak_rss_mb"].values()) > 100
    assert low["needed_gb"] == 1.0 and marker["int8_ops"]["unet"]["fake_quantize"] > 10
    if made_here:
        assert any("Calibrating: FP16 image 1 of 1" in m for m in messages), messages
        assert any("Quantizing the UNet" in m for m in messages)
    assert not (int8 / ".calibration").exists()
    (path,) = result.save(tmp_path)
    assert "Precision: INT8" in read_png_metadata(path)["parameters"]
    fp16 = service.generate(options, pose_image)
    assert np.abs(np.asarray(fp16.images[0], np.float64) - np.asarray(result.images[0], np.float64)).mean() > 0


def test_fast_int8_folder_key_has_the_lora_its_revision_and_scale(tmp_path):
    """Fast mode's INT8 pair is its own cache folder per LoRA, LoRA revision and scale (and never Quality's)."""
    from pipelines.core.layout import ModelsLayout
    from pipelines.image.lora import lora_scale_tag

    layout = ModelsLayout.of(tmp_path)
    sd, cn = tmp_path / "sd15" / "sd--main--v--fp16", tmp_path / "controlnet" / "cn--main--v--fp16"
    lcm = {(lora, rev, scale): layout.sd_lcm(sd, lora, rev, lora_scale_tag(scale))
           for lora in ("latent-consistency/lcm-lora-sdv1-5", "/data/my-lora")
           for rev in ("abc123", "def456") for scale in (1.0, 0.5)}
    folders = {layout.sd_int8(sd, cn, "key", lcm_folder=folder) for folder in lcm.values()}
    assert len(folders) == len(lcm) == 8
    assert layout.sd_int8(sd, cn, "key") not in folders
    assert all(folder.parent == layout.sd_int8(sd, cn, "key").parent for folder in folders)
    assert lcm[("latent-consistency/lcm-lora-sdv1-5", "abc123", 0.5)].name.endswith("--scale0.5")
