"""Stable Diffusion INT8 (issue 6): NNCF post-training quantization of the UNet and ControlNet, calibrated
by running the FP16 pipeline, cached in the model store, served by ``ImageService(precision="int8")``.

Runs on the session's tiny random-weight SD1.5 + ControlNet (tests/conftest.py), with a small
calibration (a few 256x256 images of 2 steps), so the whole file takes seconds of CPU.
"""
from __future__ import annotations

import json
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

try:
    import pipelines  # noqa: F401
except ImportError:  # running pytest without the project root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    import image_fixtures as fx
    from conftest import runtime_layers
except ImportError:  # tests/ turned into a package
    from tests import image_fixtures as fx
    from tests.conftest import runtime_layers
from pipelines.core import cpu_int8  # noqa: E402
from pipelines.core.cache import READY_MARKER  # noqa: E402
from pipelines.core.cpu_int8 import count_int8  # noqa: E402
from pipelines.image import int8 as quantize  # noqa: E402
from pipelines.image.int8 import SDCalibration  # noqa: E402
from pipelines.image.request import ImageOptions, read_png_metadata  # noqa: E402
from pipelines.image.service import ImageService  # noqa: E402

PROMPT = "a dancer on a beach at sunset"
OPTIONS = ImageOptions(prompt=PROMPT, steps=4, width=256, height=256, seed=7)
# 2 FP16 images x 2 steps -> 4 samples per model; 256x256 like the test requests.
CALIBRATION = SDCalibration(subset_size=4, steps=2, width=256, height=256)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def _mad(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(_pixels(a) - _pixels(b)).mean())


@pytest.fixture(scope="module")
def quantize_calls():
    """Counts real runs of the SD INT8 quantization (the function the model store calls)."""
    calls: list[Path] = []
    real = quantize.quantize_sd_int8

    def counting(sd_folder, controlnet_folder, out_dir, *args, **kwargs):
        calls.append(Path(out_dir))
        hook = counting.before
        if hook is not None:
            hook()
        return real(sd_folder, controlnet_folder, out_dir, *args, **kwargs)

    counting.before = None
    patch = pytest.MonkeyPatch()
    patch.setattr(quantize, "quantize_sd_int8", counting)
    yield calls, counting
    patch.undo()


@pytest.fixture(scope="module")
def pose_image():
    from pipelines.image.pose import draw_skeleton, poses_from_detection

    candidate, subset = fx.known_detection()
    return draw_skeleton(poses_from_detection(candidate, subset, 256, 256), 256, 256)


@pytest.fixture(scope="module")
def int8_service(cache_root, tiny_models, ir_folders):
    return ImageService(cache_root, sd_model=str(tiny_models["sd"]), controlnet_model=str(tiny_models["controlnet"]),
                        calibration=CALIBRATION, max_loaded=2)


@pytest.fixture(scope="module")
def int8_first(int8_service, quantize_calls):
    """Two first INT8 requests at once (with progress): they quantize once and share one pipeline.

    While the pair is being quantized, an FP16 request for the same models is served at once: the
    quantization holds no lock that other users wait for.
    """
    calls, counting = quantize_calls
    started, release = threading.Event(), threading.Event()

    def hold():
        started.set()
        release.wait(120)

    counting.before = hold
    messages, pipes, errors = [], [], []

    def first_request(progress):
        try:
            pipes.append(int8_service.get_pipeline(precision="int8", progress=progress))
        except BaseException as error:  # noqa: BLE001 - reported by the tests
            errors.append(error)

    threads = [threading.Thread(target=first_request, args=(lambda f, m: messages.append((f, m)),)),
               threading.Thread(target=first_request, args=(lambda f, m: None,))]
    fp16 = None
    try:
        for thread in threads:
            thread.start()
        if started.wait(120):
            fp16 = int8_service.get_pipeline()  # same models, FP16, while INT8 quantization is under way
    finally:
        release.set()
        for thread in threads:
            thread.join(300)
        counting.before = None
    return {"pipes": pipes, "errors": errors, "messages": messages, "calls": list(calls), "fp16": fp16}


def test_concurrent_first_requests_quantize_once_without_blocking_other_users(int8_first):
    assert not int8_first["errors"], int8_first["errors"]
    assert len(int8_first["calls"]) == 1
    pipes = int8_first["pipes"]
    assert len(pipes) == 2 and pipes[0] is pipes[1] and pipes[0].info["precision"] == "int8"
    assert int8_first["fp16"] is not None and int8_first["fp16"].info["precision"] == "fp16"


def _attention_nodes(xml: Path) -> list:
    import openvino as ov

    return [op for op in ov.Core().read_model(xml).get_ops() if op.get_type_name() == "ScaledDotProductAttention"]


def _fed_by_fake_quantize(node, depth: int = 4) -> bool:
    """Whether a FakeQuantize reaches ``node``'s inputs through shape-only operations."""
    for port in node.inputs():
        source = port.get_source_output().get_node()
        kind = source.get_type_name()
        if kind == "FakeQuantize" or (depth and kind in ("Reshape", "Transpose", "Convert", "Squeeze", "Unsqueeze")
                                      and _fed_by_fake_quantize(source, depth - 1)):
            return True
    return False


def test_int8_ir_holds_int8_operations_and_marker_records_the_method(int8_service, int8_first, ir_folders):
    messages = int8_first["messages"]
    folders = int8_service.model_folders(precision="int8")
    int8 = folders["int8"]
    assert folders["sd"] == ir_folders["sd"] and folders["controlnet"] == ir_folders["controlnet"]
    # The INT8 folder is keyed by the FP16 folder it came from.
    assert int8.parent.name == ir_folders["sd"].name and int8.name.startswith(ir_folders["controlnet"].name[:40])
    for name, fp16_folder in (("unet.xml", folders["sd"]), ("controlnet.xml", folders["controlnet"])):
        quantized, original = count_int8(int8 / name), count_int8(fp16_folder / name)
        assert quantized["fake_quantize"] >= 10, (name, quantized)
        assert quantized["int8_constants"] >= 10, (name, quantized)  # weights stored as INT8
        assert original == {"fake_quantize": 0, "int8_constants": 0}
        # attention stays one fused FP16 kernel (no FakeQuantize feeds it, through its reshapes), except
        # on a CPU with AMX-INT8, where the fused kernel runs in INT8 and every attention is quantized
        attention = _attention_nodes(int8 / name)
        quantized_attention = [op for op in attention if _fed_by_fake_quantize(op)]
        assert attention and len(quantized_attention) == (len(attention) if cpu_int8.int8_attention() else 0), name
    assert folders["unet_xml"] == int8 / "unet.xml" and folders["controlnet_xml"] == int8 / "controlnet.xml"
    # The text encoder and VAE stay the FP16 folder's: not copied.
    assert not (int8 / "text_encoder.xml").exists() and not (int8 / "vae_decoder.xml").exists()

    marker = json.loads((int8 / READY_MARKER).read_text())
    assert marker["precision"] == "int8" and marker["kind"] == "sd15_int8"
    assert "nncf.quantize" in marker["method"] and "TRANSFORMER" in marker["method"]
    assert "bias correction off" in marker["method"]
    assert marker["nncf"]["disable_bias_correction"] is True and marker["nncf"]["model_type"] == "TRANSFORMER"
    if cpu_int8.int8_attention():
        assert marker["nncf"]["ignored_types"] == [] and "attention quantized too" in marker["method"]
    else:
        assert marker["nncf"]["ignored_types"] == ["ScaledDotProductAttention"] and "left in FP16" in marker["method"]
    # 7-bit weights where this CPU's INT8 kernels would saturate (no VNNI), NNCF's default elsewhere
    assert marker["nncf"]["overflow_fix"] == quantize.sd_overflow_fix()
    assert marker["calibration_samples"] == 4 and marker["calibration_samples_per_model"] == {"controlnet": 4, "unet": 4}
    assert "shipped" in marker["calibration_sources"]["prompts"]
    assert "keypoint sets shipped" in marker["calibration_sources"]["poses"]
    assert "2 FP16 images x 2 UniPC steps at 256x256" in marker["calibration"]
    assert marker["fp16_models"] == {"sd": str(ir_folders["sd"]), "controlnet": str(ir_folders["controlnet"])}
    assert marker["stays_fp16"] == ["text_encoder", "vae_decoder"]
    # Nothing half-written is left beside it.
    assert not list(int8.parent.glob(f".tmp-{int8.name}-*"))
    # Progress was reported during calibration and quantization, in order, ending at 1.
    texts = [m for _, m in messages]
    assert any("Calibrating" in m for m in texts) and any("Quantizing the UNet" in m for m in texts)
    fractions = [f for f, _ in messages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_int8_pipeline_makes_valid_deterministic_images(int8_service, int8_first, pose_image, tmp_path):
    pipeline = int8_first["pipes"][0]
    result = int8_service.generate(OPTIONS, pose_image, precision="int8")
    image = result.images[0]
    assert image.size == (256, 256) and result.extra["precision"] == "int8"
    pixels = _pixels(image)
    assert np.isfinite(pixels).all() and pixels.std() > 1.0  # a picture, not a flat or broken one
    again = int8_service.generate(OPTIONS, pose_image, precision="int8")
    assert _mad(again.images[0], image) == 0.0  # same seed, same image
    other_size = int8_service.generate(replace(OPTIONS, width=320, height=256), pose_image, precision="int8")
    assert other_size.images[0].size == (320, 256)
    # The FP16 pipeline of the same pair is another one, and its picture differs (INT8 really ran).
    fp16 = int8_service.generate(OPTIONS, pose_image)
    assert fp16.extra["precision"] == "fp16" and _mad(fp16.images[0], image) > 0.0
    assert int8_service.get_pipeline(precision="int8") is pipeline
    # On a CPU whose INT8 matmul kernel is no faster than fp32 (AVX2 without VNNI), the denoisers'
    # INT8 matmuls run as INT8 1x1 convolutions; elsewhere as INT8 fully connected layers.
    for name in ("unet", "controlnet"):
        compiled = pipeline.components.compiled_now(name)  # as the requests above compiled it
        int8_fc = [kind for kind, precision in runtime_layers(compiled)
                   if kind.startswith("FullyConnected") and precision in ("u8", "i8")]
        if cpu_int8.matmuls_as_convolutions("CPU"):
            assert not int8_fc, (name, int8_fc)
        else:
            assert int8_fc, name
    pair = (int8_service.sd_model, int8_service.controlnet_model, "CPU")
    assert set(int8_service.loaded()) == {pair, pair + ("int8",)}
    # The PNG says which precision made it.
    (path,) = result.save(tmp_path)
    meta = read_png_metadata(path)
    assert meta["settings"]["precision"] == "int8" and "Precision: INT8" in meta["parameters"]


def test_second_request_reuses_the_cached_int8(int8_first, cache_root, tiny_models, quantize_calls, pose_image):
    calls = quantize_calls[0]
    before = len(calls)
    folder = ImageService(cache_root, sd_model=str(tiny_models["sd"]), controlnet_model=str(tiny_models["controlnet"]),
                          calibration=CALIBRATION).model_folders(precision="int8")["int8"]
    created = json.loads((folder / READY_MARKER).read_text())["created"]
    fresh = ImageService(cache_root, sd_model=str(tiny_models["sd"]), controlnet_model=str(tiny_models["controlnet"]),
                         calibration=CALIBRATION)
    result = fresh.generate(OPTIONS, pose_image, precision="int8")
    assert len(calls) == before and result.extra["precision"] == "int8"
    assert json.loads((folder / READY_MARKER).read_text())["created"] == created


def test_bad_precision_is_a_clear_error_before_any_work(int8_service, pose_image):
    with pytest.raises(ValueError, match=r"Precision 'int4' is not offered.*fp16, int8"):
        int8_service.generate(OPTIONS, pose_image, precision="int4")
    with pytest.raises(ValueError, match="Precision 'fp32' is not offered"):
        int8_service.get_pipeline(precision="fp32")
    with pytest.raises(ValueError, match="Precision None is not offered"):
        int8_service.model_folders(precision=None)


def test_users_own_calibration_prompts_and_poses(tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a knight in a forest\n\na robot dancing in the rain\n")
    poses = tmp_path / "poses"
    poses.mkdir()
    quantize.draw_pose_keypoints(
        [[[0.5, 0.2], [0.5, 0.3], [0.4, 0.3], [0.35, 0.45], [0.3, 0.6], [0.6, 0.3], [0.65, 0.45], [0.7, 0.6],
          [0.45, 0.55], [0.44, 0.75], [0.43, 0.92], [0.55, 0.55], [0.56, 0.75], [0.57, 0.92], None, None, None, None]],
        256, 256).save(poses / "mine.png")
    (poses / "notes.txt").write_text("not an image")
    monkeypatch.setenv(quantize.ENV_SD_CALIBRATION_PROMPTS, str(prompts))
    monkeypatch.setenv(quantize.ENV_SD_CALIBRATION_POSES, str(poses))
    mine = SDCalibration.from_env(subset_size=4, steps=2, width=256, height=256).load()
    assert mine.prompts == [("a knight in a forest", ""), ("a robot dancing in the rain", "")]
    assert len(mine.poses) == 1 and mine.poses[0].size == (256, 256)
    assert mine.sources["prompts"] == f"2 prompts from {prompts}"
    assert mine.sources["poses"] == f"1 pose images from {poses}"
    # Other calibration data makes another INT8 folder (the key follows the data), never a stale one.
    assert mine.key != CALIBRATION.load().key
    # The service picks the variables up, and a broken folder is refused before any work.
    (poses / "mine.png").write_bytes(b"not a png")
    service = ImageService(tmp_path / "cache", sd_model="unused", controlnet_model="unused")
    assert service.calibration.poses == poses
    with pytest.raises(ValueError, match="holds no readable images"):
        quantize.ensure_sd_int8(tmp_path / "cache", tmp_path, tmp_path, calibration=service.calibration)


def test_calibration_sources_from_the_environment_and_clear_errors(tmp_path, monkeypatch):
    from pipelines.image.pose import looks_like_skeleton

    shipped = SDCalibration(width=256, height=256).load()
    assert len(shipped.prompts) >= 10 and len(shipped.poses) >= 6
    assert all(pose.size == (256, 256) and looks_like_skeleton(pose) for pose in shipped.poses)

    monkeypatch.setenv(quantize.ENV_SD_CALIBRATION_POSES, str(tmp_path / "none"))
    monkeypatch.setenv(quantize.ENV_SD_CALIBRATION_PROMPTS, str(tmp_path / "p.json"))
    monkeypatch.setenv(quantize.ENV_SD_CALIBRATION_SUBSET, "12")
    settings = SDCalibration.from_env(steps=3)
    assert settings.poses == tmp_path / "none" and settings.subset_size == 12 and settings.runs == 4
    with pytest.raises(ValueError, match="prompts file .* does not exist"):
        settings.load()
    (tmp_path / "p.json").write_text(json.dumps(["a cat", {"prompt": "a dog", "negative_prompt": "blurry"}]))
    with pytest.raises(ValueError, match=f"pose folder .* does not exist.*{quantize.ENV_SD_CALIBRATION_POSES}"):
        settings.load()
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="holds no readable images"):
        settings.load()
    (tmp_path / "p.json").write_text("[]")
    with pytest.raises(ValueError, match="holds no prompts"):
        SDCalibration(prompts=tmp_path / "p.json").load()
    monkeypatch.setenv(quantize.ENV_SD_CALIBRATION_SUBSET, "many")
    with pytest.raises(ValueError, match="whole number"):
        SDCalibration.from_env()
