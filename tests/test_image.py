"""Pose-guided image generation (SD1.5 + ControlNet OpenPose on OpenVINO) with tiny random models.

The tiny models are built once per session from configs, saved as diffusers folders (safetensors)
and converted by the same code as real checkpoints. Parity is checked against diffusers'
``StableDiffusionControlNetPipeline`` running the same weights, scheduler, seed and inputs.
"""
from __future__ import annotations

import json
import shutil
import sys
import threading
import time
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
    import image_fixtures as fx  # tests/ on sys.path (pytest's default rootdir-relative import)
except ImportError:  # tests/ turned into a package
    from tests import image_fixtures as fx
from pipelines.core.cache import versions_key  # noqa: E402
from pipelines.core.errors import ModelUnavailable  # noqa: E402
from pipelines.core.layout import ModelsLayout  # noqa: E402
from pipelines.image import sources  # noqa: E402
from pipelines.image.denoise import make_scheduler  # noqa: E402
from pipelines.image.pipeline import OVControlNetPipeline  # noqa: E402
from pipelines.image.request import (SCHEDULER_NAMES, GenerationCancelled, ImageOptions, check_inputs,  # noqa: E402
                                     read_png_metadata, save_png)
from pipelines.image.service import ImageService  # noqa: E402

# f32 inference so the comparison with diffusers measures the conversion, not bf16 rounding (this
# CPU would otherwise run bf16 by default).
F32 = {"INFERENCE_PRECISION_HINT": "f32"}
PROMPT = "a dancer on a beach at sunset"
FAST = dict(steps=4, width=256, height=256)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def _mad(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(_pixels(a) - _pixels(b)).mean())


# ---------------------------------------------------------------------------------------------
# Session fixtures: tiny models, their IR, one OpenVINO pipeline, one diffusers pipeline
# ---------------------------------------------------------------------------------------------


# tiny_models, cache_root and ir_folders are session fixtures in conftest.py.


@pytest.fixture(scope="session")
def ov_pipe(ir_folders):
    return OVControlNetPipeline.from_folders(ir_folders["sd"], ir_folders["controlnet"], ov_config=F32)


@pytest.fixture(scope="session")
def torch_pipe(tiny_models):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    controlnet = ControlNetModel.from_pretrained(tiny_models["controlnet"], use_safetensors=True)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_models["sd"], controlnet=controlnet, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, use_safetensors=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def pose_image():
    """A synthetic OpenPose skeleton (one person), as the UI would pass it."""
    from pipelines.image.pose import draw_skeleton, poses_from_detection

    candidate, subset = fx.known_detection()
    return draw_skeleton(poses_from_detection(candidate, subset, 256, 256), 256, 256)


@pytest.fixture(scope="session")
def base_result(ov_pipe, pose_image):
    return ov_pipe(ImageOptions(prompt=PROMPT, seed=7, **FAST), pose_image)


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------


def test_conversion_layout_and_dynamic_shapes(ir_folders, cache_root, tiny_models):
    import openvino as ov

    sd, cn = ir_folders["sd"], ir_folders["controlnet"]
    for name in ("text_encoder.xml", "unet.xml", "vae_decoder.xml", "pipeline.json", "tokenizer/vocab.json",
                 "scheduler/scheduler_config.json", "unet_config.json", "vae_config.json"):
        assert (sd / name).is_file(), name
    assert (cn / "controlnet.xml").is_file() and (cn / "config.json").is_file()
    cache = ModelsLayout.of(cache_root).cache
    assert cache.describe(sd)["precision"] == "fp16" and cache.describe(cn)["kind"] == "controlnet"
    assert sd.parent.name == "sd15" and versions_key() in sd.name

    core = ov.Core()
    unet = core.read_model(sd / "unet.xml")
    names = [port.get_any_name() for port in unet.inputs]
    assert names[:3] == ["sample", "timestep", "encoder_hidden_states"]
    assert names[3:] == [f"down_block_additional_residual_{i}" for i in range(12)] + ["mid_block_additional_residual"]
    assert str(unet.inputs[0].get_partial_shape()) == "[?,4,?,?]"
    controlnet = core.read_model(cn / "controlnet.xml")
    assert [p.get_any_name() for p in controlnet.inputs] == [
        "sample", "timestep", "encoder_hidden_states", "controlnet_cond", "conditioning_scale"]
    assert len(controlnet.outputs) == 13
    assert str(controlnet.inputs[3].get_partial_shape()) == "[?,3,?,?]"
    # Weights are stored as fp16 (compress_to_fp16).
    assert any(op.get_type_name() == "Constant" and str(op.get_element_type()) == "<Type: 'float16'>"
               for op in unet.get_ops())

    # A second request for the same models reuses the cached folders.
    assert sources.ensure_sd15(cache_root, str(tiny_models["sd"])) == sd
    assert sources.ensure_controlnet(cache_root, str(tiny_models["controlnet"])) == cn


def test_tokenizer_built_from_open_clip_matches_real_clip_ids(ov_pipe):
    ids = ov_pipe.tokenizer("a photo of an astronaut riding a horse").input_ids
    assert ids == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]
    assert ov_pipe.tokenizer.model_max_length == 77


def test_hub_id_offline_raises_model_unavailable(tmp_path):
    with pytest.raises(ModelUnavailable) as info:
        sources.ensure_sd15(tmp_path, "no-such-owner/no-such-sd15-model", local_files_only=True)
    message = str(info.value)
    assert "no-such-owner/no-such-sd15-model" in message and "local diffusers folder" in message
    with pytest.raises(ModelUnavailable, match="ControlNet"):
        sources.ensure_controlnet(tmp_path, "no-such-owner/no-such-controlnet", local_files_only=True)
    with pytest.raises(ModelUnavailable, match="No such folder"):
        sources.ensure_sd15(tmp_path, str(tmp_path / "missing" / "folder" / "x"))
    with pytest.raises(ModelUnavailable, match="lacks"):
        sources.ensure_sd15(tmp_path, str(tmp_path))  # a folder that is not a diffusers model
    assert not (tmp_path / "sd15").exists()  # nothing half-made is left in the cache


def test_hub_model_converted_earlier_works_offline(tmp_path, ir_folders, monkeypatch):
    """A hub model converted once keeps working when the hub cannot be reached and the Hugging Face cache
    was cleaned: its IR folder in the models cache is used, not an error."""
    from pipelines.core.cache import READY_MARKER

    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # (conftest sets it too) and the HF cache has no such model
    ref = "someone/sd15-converted-online"
    earlier = {}
    for kind, convert_kind, source in (("sd15", "sd15", ir_folders["sd"]),
                                       ("controlnet", "controlnet", ir_folders["controlnet"])):
        folder = ModelsLayout(tmp_path / "cache").converted(kind, ref, "0123abcd" * 5)
        shutil.copytree(source, folder)
        marker = json.loads((folder / READY_MARKER).read_text())
        (folder / READY_MARKER).write_text(json.dumps({**marker, "model": ref, "kind": convert_kind}))
        earlier[kind] = folder
    # a newer folder whose name matches but whose marker names another model is not taken for it
    other = shutil.copytree(earlier["sd15"], earlier["sd15"].parent / earlier["sd15"].name.replace(
        "converted-online--", "converted-online--v2--"))
    marker = json.loads((other / READY_MARKER).read_text())
    (other / READY_MARKER).write_text(json.dumps({**marker, "model": "someone/other", "created": "2099-01-01"}))

    assert sources.ensure_sd15(tmp_path / "cache", ref) == earlier["sd15"]
    assert sources.ensure_controlnet(tmp_path / "cache", ref) == earlier["controlnet"]
    with pytest.raises(ModelUnavailable, match="someone/never-converted"):
        sources.ensure_sd15(tmp_path / "cache", "someone/never-converted")
    with pytest.raises(ModelUnavailable):  # a revision asked for explicitly must match
        sources.ensure_sd15(tmp_path / "cache", ref, revision="feedbeef" * 5)

    # Online, with the Hugging Face cache cleaned: while the hub is still at the converted commit,
    # nothing is downloaded again; a new commit is downloaded (here the download fails: the earlier one serves).
    downloads = []

    def snapshot_download(repo_id, *args, **kwargs):
        downloads.append(repo_id)
        raise OSError("connection reset")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    commit = {"sha": "0123abcd" * 5}
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info",
                        lambda self, repo_id, revision=None, **kw: type("Info", (), dict(commit))())
    assert sources.ensure_sd15(tmp_path / "cache", ref) == earlier["sd15"] and downloads == []
    commit["sha"] = "99999999" * 5
    assert sources.ensure_sd15(tmp_path / "cache", ref) == earlier["sd15"] and downloads == [ref]


def test_full_disk_is_not_reported_as_a_missing_model(tmp_path, monkeypatch):
    import errno

    import huggingface_hub

    from pipelines.core.errors import DiskFull

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", full)
    with pytest.raises(DiskFull, match="disk is full.*Free some space"):
        sources.ensure_sd15(tmp_path, "someone/sd15")

    def xet_full(*args, **kwargs):  # hf_xet's errors carry the OS message, not an errno
        raise RuntimeError("Data processing error: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", xet_full)
    with pytest.raises(DiskFull, match="disk is full"):
        sources.ensure_controlnet(tmp_path, "someone/controlnet")


# ---------------------------------------------------------------------------------------------
# Parity with diffusers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scheduler,width,height",
    [("UniPC", 256, 256), ("Euler a", 264, 256)],  # 264: not a multiple of 64; Euler a: generator noise
)
def test_parity_with_diffusers(ov_pipe, torch_pipe, pose_image, scheduler, width, height):
    import torch

    options = ImageOptions(
        prompt=PROMPT, negative_prompt="blurry, low quality", steps=5, guidance_scale=7.5, seed=1234,
        controlnet_scale=0.8, width=width, height=height, scheduler=scheduler,
    )
    ours = ov_pipe(options, pose_image).images[0]
    torch_pipe.scheduler = make_scheduler(scheduler, ov_pipe.scheduler_config)
    reference = torch_pipe(
        options.prompt, image=pose_image, negative_prompt=options.negative_prompt,
        num_inference_steps=options.steps, guidance_scale=options.guidance_scale,
        controlnet_conditioning_scale=options.controlnet_scale, width=width, height=height,
        generator=torch.Generator().manual_seed(options.seed), output_type="pil",
    ).images[0]
    assert ours.size == reference.size == (width, height)
    diff = np.abs(_pixels(ours) - _pixels(reference))
    # Measured: mean 0.02, max 1 (0..255) with f32 inference; the images themselves vary by ~40.
    print(f"parity {scheduler} {width}x{height}: mean abs diff {diff.mean():.3f}, max {diff.max():.0f}")
    assert diff.mean() < 0.5 and diff.max() <= 8


# ---------------------------------------------------------------------------------------------
# Behaviour
# ---------------------------------------------------------------------------------------------


def test_same_seed_same_image_and_no_global_rng(ov_pipe, pose_image, base_result):
    import torch

    torch.manual_seed(999)
    state = torch.random.get_rng_state()
    again = ov_pipe(base_result.options, pose_image)
    assert torch.equal(state, torch.random.get_rng_state()), "the global torch RNG must not be used"
    assert again.seeds == base_result.seeds == (7,)
    assert again.extra["timings"]["seconds_per_step"] > 0 and again.extra["device"] == "CPU"
    assert _mad(again.images[0], base_result.images[0]) == 0.0


def test_different_seeds_differ(ov_pipe, pose_image, base_result):
    other = ov_pipe(replace(base_result.options, seed=8), pose_image)
    print(f"seed 7 vs 8: mean abs diff {_mad(other.images[0], base_result.images[0]):.1f}")
    assert _mad(other.images[0], base_result.images[0]) > 5.0


def test_count_size_and_per_image_seeds(ov_pipe, pose_image, base_result):
    options = replace(base_result.options, num_images=2, width=320, height=256, seed=41)
    result = ov_pipe(options, pose_image)
    assert result.seeds == (41, 42) and len(result.images) == 2
    assert all(image.size == (320, 256) and image.mode == "RGB" for image in result.images)
    # Image i of a batch is exactly the single image made with seed + i.
    single = ov_pipe(replace(options, num_images=1, seed=42), pose_image)
    assert _mad(single.images[0], result.images[1]) == 0.0


def test_random_seed_is_reported_and_reproducible(ov_pipe, pose_image, base_result):
    result = ov_pipe(replace(base_result.options, seed=-1), pose_image)
    (seed,) = result.seeds
    assert 0 <= seed < 2**32
    again = ov_pipe(replace(base_result.options, seed=seed), pose_image)
    assert _mad(again.images[0], result.images[0]) == 0.0


def test_controlnet_strength_matters(ov_pipe, pose_image, base_result):
    without = ov_pipe(replace(base_result.options, controlnet_scale=0.0), pose_image)
    print(f"controlnet strength 0 vs 1: mean abs diff {_mad(without.images[0], base_result.images[0]):.1f}")
    assert _mad(without.images[0], base_result.images[0]) > 1.0


def test_progress_and_cancel(ov_pipe, pose_image, base_result):
    calls = []
    ov_pipe(base_result.options, pose_image, progress=lambda fraction, message: calls.append((fraction, message)))
    assert calls == [(i / 4, f"denoising step {i} of 4") for i in range(1, 5)]

    stop = threading.Event()

    def progress(fraction, message):
        if message == "denoising step 2 of 4":
            stop.set()

    with pytest.raises(GenerationCancelled, match="2 of 4"):
        ov_pipe(base_result.options, pose_image, progress=progress, cancel=stop)
    with pytest.raises(GenerationCancelled):
        ov_pipe(base_result.options, pose_image, cancel=lambda: True)
    # The pipeline is usable afterwards and still deterministic.
    assert _mad(ov_pipe(base_result.options, pose_image).images[0], base_result.images[0]) == 0.0


def test_png_metadata(tmp_path, base_result):
    (path,) = base_result.save(tmp_path)
    meta = read_png_metadata(path)
    assert meta["parameters"].startswith(PROMPT)
    assert "Steps: 4, Sampler: UniPC, CFG scale: 7.5, Seed: 7, Size: 256x256" in meta["parameters"]
    assert meta["settings"]["seed"] == 7 and meta["settings"]["options"]["prompt"] == PROMPT
    assert Image.open(path).size == (256, 256)
    other = save_png(base_result.images[0], tmp_path / "x.png", replace(base_result.options, negative_prompt="ugly"), seed=3)
    assert "Negative prompt: ugly" in read_png_metadata(other)["parameters"]


@pytest.mark.parametrize(
    "change,pose,match",
    [
        ({}, None, "No pose image"),
        ({}, "not-an-image.txt", "could not be read as an image"),
        ({}, 12345, "must be a picture"),
        ({"prompt": "   "}, "ok", "prompt is empty"),
        ({"width": 128}, "ok", "Width is 128"),
        ({"height": 2048}, "ok", "Height is 2048"),
        ({"width": 260}, "ok", "multiple of 8"),
        ({"steps": 0}, "ok", "Steps is 0"),
        ({"num_images": 5}, "ok", "Number of images is 5"),
        ({"guidance_scale": 0.5}, "ok", "Guidance scale"),
        ({"controlnet_scale": 3.0}, "ok", "ControlNet strength"),
        ({"seed": -5}, "ok", "Seed is -5"),
        ({"scheduler": "Heun"}, "ok", "Unknown sampler"),
    ],
)
def test_bad_inputs_give_clear_errors(tmp_path, ov_pipe, pose_image, change, pose, match):
    if pose == "ok":
        pose = pose_image
    elif pose == "not-an-image.txt":
        pose = tmp_path / pose
        pose.write_text("hello")
    options = replace(ImageOptions(prompt=PROMPT, **FAST), **change)
    with pytest.raises(ValueError, match=match):
        check_inputs(options, pose)
    with pytest.raises(ValueError, match=match):
        ov_pipe(options, pose)


def test_check_inputs_accepts_paths_arrays_and_rgba(tmp_path, pose_image):
    options = ImageOptions(prompt=PROMPT)
    path = tmp_path / "pose.png"
    pose_image.convert("RGBA").save(path)
    assert check_inputs(options, path).mode == "RGB"
    assert check_inputs(options, np.asarray(pose_image)).size == pose_image.size
    assert set(SCHEDULER_NAMES) == {"UniPC", "Euler a", "DPM++ 2M", "DDIM", "PNDM", "LMS"}


@pytest.mark.parametrize("scheduler", ["DPM++ 2M", "DDIM", "PNDM", "LMS"])
def test_every_scheduler_runs(ov_pipe, pose_image, scheduler):
    options = ImageOptions(prompt=PROMPT, scheduler=scheduler, steps=3, width=256, height=256)
    result = ov_pipe(options, pose_image)
    assert result.images[0].size == (256, 256) and 0 < _pixels(result.images[0]).std()


def test_release_and_device_switch(ov_pipe, pose_image, base_result):
    ov_pipe.compiled("vae_decoder")
    assert ov_pipe.to("NPU") is ov_pipe and not ov_pipe.is_compiled  # switching device drops compiled models
    with pytest.raises(ValueError, match="not available"):
        ov_pipe.compiled("vae_decoder")
    ov_pipe.to("CPU")
    ov_pipe.compiled("vae_decoder")
    ov_pipe.release()
    assert not ov_pipe.is_compiled
    result = ov_pipe(base_result.options, pose_image)
    assert ov_pipe.is_compiled and _mad(result.images[0], base_result.images[0]) == 0.0


def test_service_loads_once_and_serves_concurrent_requests(cache_root, tiny_models, ir_folders, pose_image, base_result):
    service = ImageService(
        cache_root, sd_model=str(tiny_models["sd"]), controlnet_model=str(tiny_models["controlnet"]), ov_config=F32
    )
    pipes = []
    threads = [threading.Thread(target=lambda: pipes.append(service.get_pipeline())) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(pipes) == 3 and all(p is pipes[0] for p in pipes)
    assert service.loaded() == [(str(tiny_models["sd"]), str(tiny_models["controlnet"]), "CPU")]

    # Two requests at once: each gets exactly its own seed's image.
    results = {}

    def run(seed):
        results[seed] = service.generate(replace(base_result.options, seed=seed), pose_image)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (7, 8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert _mad(results[7].images[0], base_result.images[0]) == 0.0
    assert results[8].seeds == (8,) and _mad(results[8].images[0], results[7].images[0]) > 5.0
    assert results[7].extra["sd_model"] == str(tiny_models["sd"])

    with pytest.raises(ValueError, match="No pose image"):
        service.generate(base_result.options, None)
    service.release()
    assert service.loaded() == [] and not pipes[0].is_compiled


def test_the_pipeline_being_replaced_is_released_before_quantizing_and_kept_after_a_bad_request(
        cache_root, tiny_models, ir_folders, monkeypatch):
    """Quantizing (an FP16 pipeline of its own plus NNCF) never runs while the pipeline it replaces still
    holds its compiled models; a request for a model that cannot be had leaves the loaded one alone."""
    from pipelines.image import int8 as quantize

    sd, cn = str(tiny_models["sd"]), str(tiny_models["controlnet"])
    calibration = quantize.SDCalibration(subset_size=3, steps=2, width=128, height=128)  # a key no other test makes
    service = ImageService(cache_root, sd_model=sd, controlnet_model=cn, ov_config=F32, max_loaded=1,
                           calibration=calibration, local_files_only=True)
    first = service.get_pipeline().compile(128, 128)
    with pytest.raises(ModelUnavailable, match="no-such-owner/no-such-sd15"):
        service.get_pipeline("no-such-owner/no-such-sd15")
    assert service.loaded() == [(sd, cn, "CPU")] and first.is_compiled

    class Stop(Exception):
        pass

    seen = []

    def spy(*args, **kwargs):
        seen.append((service.loaded(), first.is_compiled))
        raise Stop  # what was loaded while quantizing is all this test needs

    monkeypatch.setattr(quantize, "quantize_sd_int8", spy)
    with pytest.raises(Stop):
        service.get_pipeline(precision="int8")
    assert seen == [([], False)]
    service.release()


def test_quantizing_waits_for_a_running_generation_and_converting_does_not(
        cache_root, tiny_models, ir_folders, pose_image, monkeypatch):
    """Getting models ready runs outside the work slot (a new model does not hold up generations on a
    ready one), except quantizing: its FP16 pipeline and NNCF need the memory a generation holds. A
    request cancelled while it waits for the slot gives up."""
    from pipelines.image import int8 as quantize
    from pipelines.image.request import GenerationCancelled

    sd, cn = str(tiny_models["sd"]), str(tiny_models["controlnet"])
    calibration = quantize.SDCalibration(subset_size=3, steps=2, width=128, height=128)  # never made: see above
    service = ImageService(cache_root, sd_model=sd, controlnet_model=cn, ov_config=F32, max_loaded=1,
                           calibration=calibration, local_files_only=True, workers=1)

    class Stop(Exception):
        pass

    quantized, messages, outcomes = threading.Event(), [], {}

    def spy(*args, **kwargs):
        quantized.set()
        raise Stop

    def in_thread(name, work):
        def run():
            try:
                outcomes[name] = work()
            except Exception as exc:  # noqa: BLE001 - asserted below
                outcomes[name] = exc
        thread = threading.Thread(target=run)
        thread.start()
        return thread

    def wait_for(message, thread):
        deadline = time.monotonic() + 60
        while message not in messages:
            assert time.monotonic() < deadline and thread.is_alive(), (messages, outcomes)
            time.sleep(0.05)

    monkeypatch.setattr(quantize, "quantize_sd_int8", spy)
    waiting = "waiting for the image generation slot of this server"
    with service.slots.turn():  # a generation is running
        converting = in_thread("fp16", lambda: service.prepare(precision="fp16"))
        converting.join(120)  # FP16 folders: converted (or found) without a slot
        assert not converting.is_alive() and outcomes["fp16"] is None

        quantizing = in_thread("int8", lambda: service.prepare(
            precision="int8", progress=lambda fraction, message: messages.append(message)))
        wait_for(waiting, quantizing)
        deadline = time.monotonic() + 60
        while service.slots.waiting != 1:  # it found the slot busy and waits for it
            assert time.monotonic() < deadline and quantizing.is_alive(), (messages, outcomes)
            time.sleep(0.02)
        assert not quantized.is_set()

        messages.clear()
        cancel = threading.Event()
        options = ImageOptions(prompt=PROMPT, seed=7, **FAST)
        generating = in_thread("cancelled", lambda: service.generate(
            options, pose_image, cancel=cancel, load_progress=lambda fraction, message: messages.append(message)))
        wait_for(waiting, generating)
        cancel.set()
        generating.join(10)
        assert isinstance(outcomes["cancelled"], GenerationCancelled)
    quantizing.join(60)
    assert quantized.is_set() and isinstance(outcomes["int8"], Stop)


def test_loading_after_prepare_does_not_resolve_the_models_again(cache_root, tiny_models, ir_folders, monkeypatch):
    """prepare() resolves the models (for hub ids: a commit check on the network) outside the work slot;
    loading them inside the slot takes its folders as they are."""
    sd, cn = str(tiny_models["sd"]), str(tiny_models["controlnet"])
    service = ImageService(cache_root, sd_model=sd, controlnet_model=cn, ov_config=F32, local_files_only=True)
    service.prepare()

    def must_not_resolve(*args, **kwargs):
        raise AssertionError("resolved again inside the work slot")

    monkeypatch.setattr(service, "model_folders", must_not_resolve)
    assert service.get_pipeline().info["precision"] == "fp16"
    service.release()


# ---------------------------------------------------------------------------------------------
# Pose
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pose_service(tiny_models, cache_root):
    from pipelines.image.pose import PoseService

    return PoseService(cache_root, pose_model=str(tiny_models["pose"]))


def test_pose_network_conversion_matches_torch(pose_service):
    import torch
    from controlnet_aux.open_pose import util as pose_util
    from controlnet_aux.open_pose.model import bodypose_model

    model = bodypose_model()
    model.load_state_dict(pose_util.transfer(model, torch.load(pose_service.pose_model, weights_only=True)))
    model.eval()
    data = torch.rand(1, 3, 96, 128) - 0.5
    with torch.no_grad():
        paf, heatmap = model(data)
    result = pose_service.compiled().create_infer_request().infer({"image": data.numpy()})
    assert result["paf"].shape == (1, 38, 12, 16) and result["heatmap"].shape == (1, 19, 12, 16)
    scale = float(heatmap.abs().max())
    assert np.abs(result["heatmap"] - heatmap.numpy()).max() <= 0.02 * scale + 1e-4
    assert np.abs(result["paf"] - paf.numpy()).max() <= 0.02 * float(paf.abs().max()) + 1e-4


def test_pose_estimate_blank_image_finds_no_person(pose_service):
    from pipelines.image.pose import NoPersonFound

    with pytest.raises(NoPersonFound, match="No person was found"):
        pose_service.estimate(Image.new("RGB", (300, 200), "white"))
    with pytest.raises(ValueError, match="No photo"):
        pose_service.estimate(None)


def test_pose_estimate_runs_on_a_photo_and_returns_input_size(pose_service, monkeypatch):
    from pipelines.image.pose import NoPersonFound, poses_from_detection

    photo = Image.fromarray(np.random.default_rng(3).integers(0, 255, (240, 180, 3), dtype=np.uint8))
    poses, (width, height) = pose_service.detect(photo)  # the real network + post-processing run
    assert isinstance(poses, list) and min(width, height) == 512
    try:
        skeleton = pose_service.estimate(photo)
        assert skeleton.size == photo.size
    except NoPersonFound:
        pass  # random weights: expected
    # The drawing path, with a known detection standing in for the network's.
    candidate, subset = fx.known_detection(scale=2.0)
    monkeypatch.setattr(type(pose_service), "detect", lambda self, image, device=None: (
        poses_from_detection(candidate, subset, 512, 512), (512, 512)))
    skeleton = pose_service.estimate(photo)
    assert skeleton.size == photo.size and _pixels(skeleton).max() > 100


def test_pose_download_does_not_hold_up_release(tmp_path, monkeypatch):
    """Fetching and converting the pose model (minutes on a first start) does not block "free memory"."""
    from pipelines.image import pose

    started, finish = threading.Event(), threading.Event()

    def slow_ensure(*args, **kwargs):
        started.set()
        finish.wait(30)
        return tmp_path

    monkeypatch.setattr(pose, "ensure_body_pose", slow_ensure)
    service = pose.PoseService(tmp_path)
    fetching = threading.Thread(target=service.model_folder)
    fetching.start()
    assert started.wait(10)
    releasing = threading.Thread(target=service.release)
    releasing.start()
    releasing.join(30)  # the fetch is still blocked (finish is not set): release must not wait for it
    assert not releasing.is_alive()
    finish.set()
    fetching.join(10)
    assert service.model_folder() == tmp_path


def test_pose_photo_as_float_array_is_read_like_the_picture():
    """A float array in [0, 1] (matplotlib, scikit-image) is the same photo as its uint8 form, not black."""
    from pipelines.image.request import load_pose_image
    from pipelines.image.pose import _to_rgb_array

    pixels = np.random.default_rng(4).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    as_float = pixels.astype(np.float32) / 255.0
    assert np.abs(_to_rgb_array(as_float).astype(int) - pixels).max() <= 1
    assert np.abs(_to_rgb_array(pixels.astype(np.int64)).astype(int) - pixels).max() == 0
    assert np.abs(_pixels(load_pose_image(as_float)).astype(int) - pixels).max() <= 1


def test_skeleton_drawing_from_known_detection():
    from pipelines.image.pose import draw_skeleton, looks_like_skeleton, poses_from_detection

    candidate, subset = fx.known_detection()
    poses = poses_from_detection(candidate, subset, 256, 256)
    assert len(poses) == 1 and poses[0].body.keypoints[0].x == pytest.approx(128 / 256)
    image = draw_skeleton(poses, 256, 256, size=(200, 300))
    assert image.size == (200, 300)
    small = draw_skeleton(poses, 256, 256)
    arr = np.asarray(small)
    nose = arr[40, 128]  # keypoint 0 is drawn in red
    assert nose[0] > 200 and nose[1] < 60 and nose[2] < 60
    assert arr[5, 5].sum() == 0  # black background
    assert looks_like_skeleton(small)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert not looks_like_skeleton(photo) and not looks_like_skeleton(Image.new("RGB", (64, 64)))


def test_dynamic_shape_ir_matches_static_compilation(ir_folders, ov_pipe, pose_image, base_result):
    dynamic = OVControlNetPipeline.from_folders(
        ir_folders["sd"], ir_folders["controlnet"], ov_config=F32, static_shapes=False
    )
    for width, height in ((256, 256), (264, 320)):
        options = replace(base_result.options, width=width, height=height)
        a, b = dynamic(options, pose_image).images[0], ov_pipe(options, pose_image).images[0]
        assert a.size == b.size == (width, height) and _mad(a, b) < 0.1
    # compile() ahead of time for a size: the next request of that size needs no compilation.
    ov_pipe.compile(width=320, height=256)
    compiled_unet = ov_pipe.components.compiled_now("unet")
    ov_pipe(replace(base_result.options, width=320, height=256), pose_image)
    assert ov_pipe.components.compiled_now("unet") is compiled_unet
