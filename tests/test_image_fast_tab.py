"""The Image tab's Fast / Quality choice and live previews (issue #20): the generate handler streams
previews and then the final images, Cancel keeps the last preview and frees the slot, the UI opens in
Fast mode on a CPU while the API's ``mode`` defaults to Quality, the examples, and ``mode`` over
``gradio_client``.

Tiny random-weight models (tests/image_fixtures.py; session fixtures in conftest.py).
"""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from pipelines.image.request import read_png_metadata
from pipelines.services import Services, Settings
from servers import launched

PROMPT = "a dancer on a beach at sunset"
QUIET = dict(progress=lambda *a, **k: None)
# generate_image's settings up to the device: Fast mode, the smallest size; the models are the configured ones
FAST_ARGS = dict(negative_prompt="", steps=4, guidance_scale=1.0, seed=7, controlnet_scale=1.0, num_images=1,
                 width=256, height=256, scheduler="UniPC", sd_model="", controlnet_model="", device="CPU")


@pytest.fixture(scope="module")
def services(models_dir, tiny_models, fast_models) -> Services:
    return Services(Settings(models_dir=models_dir, sd_model=str(tiny_models["sd"]),
                             controlnet_model=str(tiny_models["controlnet"]), pose_model=str(tiny_models["pose"]),
                             lcm_lora=str(fast_models["lcm_lora"]), taesd=str(fast_models["taesd"])))


def session(name: str):
    return SimpleNamespace(session_hash=name)


def args(pose, **change) -> list:
    values = {**FAST_ARGS, **change}
    return [values.pop("prompt", PROMPT), values["negative_prompt"], pose] + [values[k] for k in list(FAST_ARGS)[1:]]


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def fast_outputs(services, skeleton):
    """Everything /generate_image yields for one Fast image: previews, then the final images."""
    from ui.image_tab import CancelRegistry, make_generate_handler

    handler = make_generate_handler(services, CancelRegistry())
    return list(handler(*args(skeleton), "fp16", "fast", **QUIET))


def test_generate_streams_previews_then_the_final_png(fast_outputs):
    *previews, (paths, summary) = fast_outputs
    assert previews, "no live preview was shown"
    steps = []
    for gallery, status in previews:
        ((image, caption),) = gallery  # one picture: the image forming
        assert isinstance(image, Image.Image) and image.size == (256, 256)
        assert status.startswith(caption) and caption.startswith("Preview: step ")
        steps.append(int(caption.split()[2]))
    assert steps == sorted(set(steps)) and set(steps) <= {1, 2, 3}
    assert len(paths) == 1 and paths[0].endswith(".png") and summary.endswith("FP16, Fast mode")
    meta = read_png_metadata(paths[0])
    assert meta["settings"]["options"]["mode"] == "fast" and "Sampler: LCM" in meta["parameters"]


def test_the_mode_parameter_defaults_to_quality_and_checks_fast_ranges(services, skeleton, fast_outputs):
    from ui.image_tab import CancelRegistry, make_generate_handler

    handler = make_generate_handler(services, CancelRegistry())
    *_, (paths, summary) = handler(*args(skeleton, steps=3, guidance_scale=7.5), **QUIET)  # no mode: Quality
    assert read_png_metadata(paths[0])["settings"]["options"]["mode"] == "quality"
    assert not summary.endswith("Fast mode")
    with pytest.raises(gr.Error, match="Steps is 20; choose a whole number from 1 to 8 in Fast mode"):
        list(handler(*args(skeleton, steps=20), "fp16", "fast", **QUIET))
    with pytest.raises(gr.Error, match="Mode 'turbo' is not offered"):
        list(handler(*args(skeleton), "fp16", "turbo", **QUIET))


def test_the_ui_opens_in_fast_mode_on_a_cpu_with_fast_ranges(services):
    from app import build_app
    from ui.image_request import mode_settings, ui_default_mode

    demo = build_app(services)
    radios = [c for c in demo.config["components"] if c["props"].get("label") == "Mode"]
    assert len(radios) == 1 and radios[0]["props"]["value"] == "quality"  # as built: the API's default
    mode_id = radios[0]["id"]
    loads = [fn for fn in demo.fns.values() if not fn.inputs and any(o._id == mode_id for o in fn.outputs)]
    assert len(loads) == 1 and loads[0].api_visibility == "private"
    start, steps, guidance, scheduler = loads[0].fn()
    assert start == "fast" == ui_default_mode("CPU") and ui_default_mode("GPU") == "quality"
    assert (steps["maximum"], steps["value"], guidance["maximum"], guidance["value"]) == (8, 4, 2.0, 1.0)
    assert scheduler["interactive"] is False
    steps, guidance, scheduler = mode_settings("quality")
    assert (steps["maximum"], steps["value"], guidance["maximum"], guidance["value"]) == (100, 20, 20.0, 7.5)
    assert scheduler["interactive"] is True
    changes = [fn for fn in demo.fns.values() if [i._id for i in fn.inputs] == [mode_id]]
    assert len(changes) == 1 and changes[0].api_visibility == "private"


def test_examples_are_the_shipped_skeletons_with_prompts(services):
    import json

    from app import build_app
    from pipelines.image.calibration import SD_CALIBRATION_POSES, draw_pose_keypoints
    from pipelines.image.pose import looks_like_skeleton
    from ui.image_examples import EXAMPLE_SIZE, EXAMPLES, example_pose, example_rows

    sets = json.loads(SD_CALIBRATION_POSES.read_text())
    for _, name in EXAMPLES:
        with Image.open(example_pose(name)) as committed:
            drawn = draw_pose_keypoints(sets[name], EXAMPLE_SIZE, EXAMPLE_SIZE)
            # (redraw: draw_pose_keypoints(...).save(example_pose(name), optimize=True) for each of EXAMPLES)
            assert np.array_equal(np.asarray(committed.convert("RGB")), np.asarray(drawn)), name
            assert looks_like_skeleton(committed.convert("RGB")) and example_pose(name).stat().st_size < 20_000
    demo = build_app(services)
    datasets = [c for c in demo.config["components"] if c["type"] == "dataset"]
    assert len(datasets) == 1 and len(datasets[0]["props"]["samples"]) == len(example_rows()) == 4


# --------------------------------------------------------------------------- cancel


def _slot_is_free(services) -> bool:
    with services.image.slots.turn():  # re-entrant per thread: a fresh thread tests it
        return True


def _free_within(services, seconds: float) -> bool:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(_slot_is_free(services)), daemon=True)
    thread.start()
    thread.join(seconds)
    return bool(result)


def test_cancel_keeps_the_last_preview_and_frees_the_slot(services, skeleton):
    from ui.image_tab import CancelRegistry, make_cancel_handler, make_generate_handler

    cancels = CancelRegistry()
    handler, cancel = make_generate_handler(services, cancels), make_cancel_handler(cancels)
    seen = []
    # Quality, 60 steps: a preview every 4; Cancel after the second one.
    outputs = handler(*args(skeleton, steps=60, guidance_scale=7.5), "fp16", "quality", request=session("carol"),
                      **QUIET)
    with pytest.raises(gr.Error, match="cancelled"):
        for output in outputs:
            seen.append(output)
            if len(seen) == 2:
                assert cancel(request=session("carol")).startswith("Cancel requested")
    gallery, status = seen[-1]
    assert status.startswith("Preview: step ") and int(status.split()[2]) < 60  # what the page keeps showing
    assert isinstance(gallery[0][0], Image.Image)
    assert _free_within(services, 10.0)
    # A browser that goes away (Gradio closes the handler's generator): the generation stops and frees its slot.
    outputs = handler(*args(skeleton, steps=60, guidance_scale=7.5), "fp16", "quality", request=session("dave"),
                      **QUIET)
    next(outputs)
    started = time.perf_counter()
    outputs.close()
    assert _free_within(services, 10.0)
    print(f"slot free {time.perf_counter() - started:.2f} s after the handler was closed")
    assert cancel(request=session("dave")) == "Nothing to cancel."


# --------------------------------------------------------------------------- gradio_client


@pytest.fixture(scope="module")
def client(services):
    from gradio_client import Client

    with launched(services) as url:
        yield Client(url, verbose=False)


def test_gradio_client_fast_mode_gets_the_final_images_after_previews(client, skeleton_png, fast_outputs):
    from gradio_client import handle_file

    settings = {**FAST_ARGS, "prompt": PROMPT, "pose": handle_file(str(skeleton_png))}
    job = client.submit(**settings, precision="fp16", mode="fast", api_name="/generate_image")
    gallery, summary = job.result(timeout=300)
    assert summary.endswith("FP16, Fast mode") and len(gallery) == 1
    path = gallery[0]["image"]
    assert read_png_metadata(path)["settings"]["options"]["mode"] == "fast"
    assert np.array_equal(pixels(path), pixels(fast_outputs[-1][0][0]))  # the same picture as the handler's
    outputs = job.outputs()
    assert len(outputs) >= 2 and outputs[-1][1] == summary  # previews came first
    assert all(status.startswith("Preview: step ") for _, status in outputs[:-1])
    # the same call without mode is a Quality one, as before the parameter existed
    gallery, summary = client.predict(**{**settings, "steps": 3, "guidance_scale": 7.5}, api_name="/generate_image")
    assert read_png_metadata(gallery[0]["image"])["settings"]["options"]["mode"] == "quality"


def test_compare_fp16_and_int8_in_fast_mode(services, skeleton, monkeypatch):
    from test_image_lowmem import CALIBRATION  # Fast INT8 of the tiny pair: made once per session

    from ui.image_tab import CancelRegistry, make_generate_compare_handler

    monkeypatch.setattr(services.image, "calibration", CALIBRATION)
    fp16, fp16_per_step, int8, int8_per_step, summary = make_generate_compare_handler(services, CancelRegistry())(
        *args(skeleton), "fast", **QUIET)
    metas = [read_png_metadata(gallery[0])["settings"] for gallery in (fp16, int8)]
    assert [(m["precision"], m["mode"], m["seed"]) for m in metas] == [("fp16", "fast", 7), ("int8", "fast", 7)]
    assert fp16_per_step > 0 and int8_per_step > 0 and "as fast as FP16" in summary


def test_gradio_client_int8_refused_when_memory_is_short(client, services, skeleton_png, monkeypatch):
    from gradio_client import handle_file

    from pipelines.image.calibration import SDCalibration

    # the server runs in this process: a calibration never used (its INT8 pair would have to be made), and
    # less memory than making it needs; no INT8 pipeline loaded (one loaded would serve without quantizing)
    services.image.release()
    monkeypatch.setattr(services.image, "calibration", SDCalibration(subset_size=5, steps=5, width=256, height=256))
    monkeypatch.setenv("VOICE_STUDIO_AVAILABLE_MEMORY_GB", "0.25")
    settings = {**FAST_ARGS, "prompt": PROMPT, "pose": handle_file(str(skeleton_png))}
    with pytest.raises(Exception, match="Not enough free memory for making the INT8 image models.*FP16 works"):
        client.predict(**settings, precision="int8", mode="fast", api_name="/generate_image")
    assert services.image.loaded() == [] and services.image.slots.waiting == 0
