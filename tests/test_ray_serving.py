"""Ray Serve mode (issue 22) on a real local Ray instance: ``app.serve`` with ``--ray`` starts it
(127.0.0.1 only, a token of its own, no dashboard, Serve without its HTTP proxy, the machine's CPUs),
deploys 2 Whisper replicas and 1 image replica of 0.5 CPU each, and serves the UI over them.

One Ray instance for the whole run: every test that needs it is in this module and shares the
``ray_app`` fixture, which stops the instance (and kills, by pid, any of its processes still alive)
when the module is done, so it does not hold a gigabyte through the rest of the suite. The models
folder is the session's: the bundled Whisper base and the tiny image models are converted once per
run and shared with the other tests. Speech that is checked for its words uses the real bundled base;
conversions, errors and comparisons use the tiny random Whisper; images the tiny SD + ControlNet.

The tests that start Ray are ``slow`` (CI runs them); the option and config checks are not.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import espeak, word_error_rate
from servers import free_port

ROOT = Path(__file__).resolve().parent.parent
BASE = "bundled/whisper-base"
SENTENCES = [  # espeak-ng clips the bundled base hears right (0-1 word off each)
    "The quick brown fox jumps over the lazy dog.", "A journey of a thousand miles begins with a single step.",
    "Please call me back after lunch tomorrow.", "Our train leaves from platform seven at noon.",
    "The children played football in the park after school.", "My brother bought a new car last week.",
    "We will meet in the library on Monday morning.", "Please turn off the lights when you leave the room.",
]
RAY_ENV = ("RAY_TMPDIR", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
           "RAY_USAGE_STATS_ENABLED", "PYTHONPATH")
QUIET = dict(progress=lambda *a, **k: None)


# =========================================================================== options (no Ray started)
def parse(argv: list[str], environ: dict | None = None) -> argparse.Namespace:
    import app

    return app.parse_args(argv, environ=environ or {})


def test_ray_flags_and_their_environment_variables(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(Path(ROOT / "deploy" / "serve_config.yaml").read_text())
    assert parse([]).ray_options is None  # embedded by default
    options = parse(["--ray"]).ray_options
    assert (options.address, options.local, options.deploy, options.overrides) == ("local", True, "auto", {})
    options = parse(["--ray", "auto", "--ray-config", str(config), "--ray-replicas", "whisper=3", "--ray-cpus",
                     "whisper=0.5", "--ray-max-ongoing", "image=1", "--ray-autoscale", "image=1:4",
                     "--ray-deploy", "never"]).ray_options
    assert (options.address, options.local, options.config, options.deploy) == ("auto", False, config, "never")
    assert options.overrides == {
        "whisper": {"num_replicas": 3, "ray_actor_options": {"num_cpus": 0.5}},
        "image": {"max_ongoing_requests": 1,
                  "autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 1}}}
    env = {"VOICE_STUDIO_RAY": "10.0.0.5:6379", "VOICE_STUDIO_RAY_REPLICAS": "whisper=2,image=1",
           "VOICE_STUDIO_RAY_CPUS": "whisper=1", "VOICE_STUDIO_RAY_DEPLOY": "always"}
    options = parse([], env).ray_options
    assert (options.address, options.deploy) == ("10.0.0.5:6379", "always")
    assert options.overrides["whisper"] == {"num_replicas": 2, "ray_actor_options": {"num_cpus": 1.0}}
    # flags win over the environment
    assert parse(["--ray-replicas", "whisper=4"], env).ray_options.overrides["whisper"]["num_replicas"] == 4


@pytest.mark.parametrize("argv, message", [
    (["--ray", "ray://head:10001"], "Ray Client"),
    (["--ray-replicas", "whisper=2"], "only with --ray"),
    (["--ray", "--ray-replicas", "speech=2"], "KIND one of whisper, image"),
    (["--ray", "--ray-cpus", "whisper=0"], "must be more than 0"),
    (["--ray", "--ray-autoscale", "whisper=4:2"], "not a valid value"),
    (["--ray", "--ray-config", "/no/such/file.yaml"], "no file"),
])
def test_bad_ray_flags_are_refused_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse(argv)
    assert message in capsys.readouterr().err


def test_help_lists_the_ray_flags_and_imports_no_ray():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import sys, app; print('ray' in sys.modules)"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False"]
    text = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout
    for flag in ("--ray [ADDRESS]", "--ray-config", "--ray-replicas", "--ray-cpus", "--ray-max-ongoing",
                 "--ray-autoscale", "--ray-deploy"):
        assert flag in text, flag


def test_config_file_options_are_merged_under_the_flags():
    from pipelines.serve.cluster import app_args, deployment_options, load_config

    config = load_config(ROOT / "deploy" / "serve_config.yaml")
    assert app_args(config, "whisper") == {"models_dir": "/data/models_cache", "slots": 1, "threads": "auto"}
    whisper = deployment_options(config, "whisper", {"num_replicas": 3, "ray_actor_options": {"num_cpus": 0.5}})
    assert (whisper["num_replicas"], whisper["max_ongoing_requests"], whisper["health_check_period_s"]) == (3, 2, 2)
    assert whisper["ray_actor_options"] == {"num_cpus": 0.5, "memory": 2147483648}  # the file's memory stays
    image = deployment_options(config, "image", {})
    assert "num_replicas" not in image and image["autoscaling_config"]["max_replicas"] == 2
    assert "autoscaling_config" not in deployment_options(config, "image", {"num_replicas": 1})


def test_replica_settings_and_threads():
    from pipelines.serve.replica import replica_settings, settings_args, thread_config
    from pipelines.services import Settings

    assert thread_config("auto", 0.5) == {"INFERENCE_NUM_THREADS": 1, "ENABLE_CPU_PINNING": False}
    assert thread_config("auto", 2) == {"INFERENCE_NUM_THREADS": 2, "ENABLE_CPU_PINNING": False}
    assert thread_config(None, 2) == {} and thread_config(3, 1)["INFERENCE_NUM_THREADS"] == 3
    front = Settings(models_dir=Path("m"), sd_model="my/sd")
    args = {**settings_args(front), "slots": 2, "threads": None, "ov_config": {"INFERENCE_PRECISION_HINT": "f32"}}
    settings = replica_settings(args, cpus=1.0)
    assert settings.models_dir == Path("m").resolve() and settings.sd_model == "my/sd"
    assert settings.concurrency["whisper"] == settings.concurrency["image"] == 2
    assert settings.ov_config == {"INFERENCE_PRECISION_HINT": "f32"}
    with pytest.raises(ValueError, match="Unknown Voice Studio replica argument"):
        replica_settings({**args, "replicas": 2}, cpus=1.0)


def test_capacity_follows_replicas_and_slots():
    from pipelines.serve.cluster import capacity

    details = {"applications": {"whisper": {
        "deployed_app_config": {"args": {"slots": 2}},
        "deployments": {"whisper": {"deployment_config": {"num_replicas": 3, "max_ongoing_requests": 3}}}}}}
    assert capacity(details, "whisper") == {"max_replicas": 3, "slots": 6, "ongoing": 9}
    scaling = {"applications": {"image": {"deployments": {"image": {"deployment_config": {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 4}, "max_ongoing_requests": 2}}}}}}
    assert capacity(scaling, "image") == {"max_replicas": 4, "slots": 4, "ongoing": 8}


def test_a_wav_file_crosses_as_its_bytes(tmp_path):
    from pipelines.serve.protocol import WavFile, as_received, as_sent

    wav = tmp_path / "audio.wav"
    wav.write_bytes(b"RIFF1234WAVE")
    sent = as_sent(wav)
    assert isinstance(sent, WavFile) and sent.data == b"RIFF1234WAVE"
    with as_received(sent) as path:
        assert path != wav and path.read_bytes() == b"RIFF1234WAVE"
    assert not path.exists()
    samples = np.zeros(4, np.float32)
    assert as_sent(samples) is samples


# =========================================================================== a real local Ray instance
def _processes_mentioning(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.fixture(scope="module")
def ray_app(models_dir, tiny_models, fast_models, tmp_path_factory):
    """The app launched with ``--ray``: a local Ray instance, 2 Whisper replicas and 1 image replica."""
    import app

    saved = {name: os.environ.get(name) for name in RAY_ENV}
    ray_tmp = tempfile.mkdtemp(prefix="vsr-", dir="/tmp")  # short: Ray's unix sockets live under it
    os.environ["RAY_TMPDIR"] = ray_tmp
    config = tmp_path_factory.mktemp("ray") / "serve.yaml"
    config.write_text(json.dumps({"proxy_location": "Disabled", "applications": [
        {"name": "whisper", "route_prefix": None, "import_path": "pipelines.serve.deployments:whisper_app",
         "args": {}, "deployments": [{"name": "whisper", "health_check_period_s": 1}]},
        {"name": "image", "route_prefix": None, "import_path": "pipelines.serve.deployments:image_app",
         "args": {"sd_model": str(tiny_models["sd"]), "controlnet_model": str(tiny_models["controlnet"]),
                  "pose_model": str(tiny_models["pose"]), "lcm_lora": str(fast_models["lcm_lora"]),
                  "taesd": str(fast_models["taesd"]), "threads": None},  # OpenVINO's threads, as embedded
         "deployments": [{"name": "image", "health_check_period_s": 1}]}]}))  # JSON is YAML
    port = free_port()
    args = app.parse_args(["--ray", "--ray-config", str(config), "--ray-replicas", "whisper=2", "--ray-cpus",
                           "whisper=0.5", "--ray-cpus", "image=0.5", "--models-dir", str(models_dir),
                           "--host", "127.0.0.1", "--port", str(port)], environ={})
    started = time.perf_counter()
    demo = services = None
    try:
        demo, services, _preload = app.serve(args, block=False)
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", services=services, demo=demo, models_dir=models_dir,
                              config=config, start_seconds=time.perf_counter() - started, ray_tmp=ray_tmp)
    finally:
        if demo is not None:
            demo.close()
        if services is not None:
            services.close()
        elif "ray" in sys.modules:  # the start failed after Ray was up
            sys.modules["ray"].shutdown()
        for pid in _processes_mentioning(ray_tmp):  # what Ray left of this instance (agents can outlive it)
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def client(ray_app):
    from gradio_client import Client

    return Client(ray_app.url, verbose=False)


@pytest.fixture(scope="module")
def sentences(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("sentences")
    return [espeak(text, folder / f"sentence{i}.wav") for i, text in enumerate(SENTENCES)]


def whisper_replicas(services) -> list[dict]:
    return services.status()["ray"]["applications"]["whisper"]["replicas"]


def wait_for_replicas(services, count: int, without: str = "", timeout: float = 90.0) -> float:
    """Seconds until ``count`` whisper replicas run (none of them ``without``); fails past ``timeout``."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        replicas = whisper_replicas(services)
        if sum(r["state"] == "RUNNING" for r in replicas) == count and without not in {r["id"] for r in replicas}:
            return time.perf_counter() - started
        time.sleep(0.3)
    pytest.fail(f"the whisper replicas did not come back to {count}: {whisper_replicas(services)}")


def kill_running_replica(services) -> dict:
    """SIGKILL a whisper replica that is running a request of this front end now (waits for one)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        busy = [r for r in whisper_replicas(services) if r["running"] > 0 and r["state"] == "RUNNING"]
        if busy:
            os.kill(busy[0]["pid"], signal.SIGKILL)
            return busy[0]
        time.sleep(0.02)
    pytest.fail("no whisper replica was running a request")


def tiny_copy(tiny_whisper_hf: Path, tmp_path: Path, name: str) -> Path:
    """The tiny Whisper checkpoint in a folder of its own: a model no one has converted yet."""
    return Path(shutil.copytree(tiny_whisper_hf, tmp_path / name))


def converted_folders(models_dir: Path, model: Path) -> tuple[list[Path], list[Path]]:
    """(complete folders, leftovers of builds) of ``model`` under the models folder."""
    from pipelines.core.cache import READY_MARKER, slug

    root = models_dir / "whisper" / slug(str(model.resolve()))
    return [p.parent for p in root.rglob(READY_MARKER)], [p for p in root.rglob(".tmp-*")]


@pytest.mark.slow
def test_the_app_runs_on_its_local_ray_instance(ray_app, client):
    status = client.predict(api_name="/status")
    assert status["mode"] == "ray" and status["preload"] == "off" and status["shared"] is False
    assert status["ray"]["address"].startswith("127.0.0.1:")  # loopback only
    apps = status["ray"]["applications"]
    assert {name: (a["status"], a["deployment_status"]) for name, a in apps.items()} == {
        "whisper": ("RUNNING", "HEALTHY"), "image": ("RUNNING", "HEALTHY")}
    assert [r["state"] for r in apps["whisper"]["replicas"]] == ["RUNNING", "RUNNING"]
    assert all(r["pid"] and r["node"] == "127.0.0.1" for r in apps["whisper"]["replicas"] + apps["image"]["replicas"])
    assert (apps["whisper"]["slots"], apps["whisper"]["ongoing"], apps["image"]["slots"]) == (2, 4, 1)
    assert apps["whisper"]["waiting_for_a_replica"] == 0
    # Gradio lets in what the replicas take (their work slots) plus those getting ready, as embedded
    limits = {fn.api_name: fn.concurrency_limit for fn in ray_app.demo.fns.values() if isinstance(fn.api_name, str)}
    assert (limits["transcribe"], limits["generate_image"], limits["subtitles_batch"]) == (4, 2, 1)
    replicas = ray_app.services.whisper.handle.broadcast("stats").results(timeout_s=30)
    assert {r["cpus"] for r in replicas} == {0.5}
    # one OpenVINO thread each (not every core each), threads not pinned to core 0
    assert all(r["ov_config"] == {"INFERENCE_NUM_THREADS": 1, "ENABLE_CPU_PINNING": False} for r in replicas)


@pytest.mark.slow
def test_eight_concurrent_transcriptions_each_get_their_own_text_from_both_replicas(ray_app, sentences):
    from gradio_client import Client, handle_file

    before = {r["id"]: r["served"] for r in whisper_replicas(ray_app.services)}
    clients = [Client(ray_app.url, verbose=False) for _ in sentences]
    jobs = [c.submit(audio=handle_file(str(p)), media_file=None, model=BASE, api_name="/transcribe")
            for c, p in zip(clients, sentences)]
    texts = [job.result(timeout=600)[0] for job in jobs]
    for index, text in enumerate(texts):
        errors = [word_error_rate(reference, text) for reference in SENTENCES]
        assert errors[index] < 0.35 and errors.index(min(errors)) == index, (SENTENCES[index], text)
    served = {r["id"]: r["served"] - before.get(r["id"], 0) for r in whisper_replicas(ray_app.services)}
    assert len(served) == 2 and all(n > 0 for n in served.values()) and sum(served.values()) == 8, served


@pytest.mark.slow
def test_progress_and_the_services_own_errors_cross_the_boundary(ray_app, client, tiny_whisper_hf, tiny_whisper_ir,
                                                                  sentences):
    from gradio_client import handle_file

    from pipelines.core.types import ModelChoice
    from pipelines.speech.decoding import TranscriptionRefused
    from pipelines.speech.types import TranscribeOptions

    seen: list[tuple[float, str]] = []
    speech = np.zeros(16000 * 2, np.float32)
    ray_app.services.whisper.transcribe(speech, ModelChoice(model=str(tiny_whisper_hf)),
                                        TranscribeOptions(vad=False), lambda f, m: seen.append((f, m)))
    assert "find speech" in [m for _, m in seen] and "transcribe part 1 of 1" in [m for _, m in seen]
    assert [f for f, _ in seen] == sorted(f for f, _ in seen)
    with pytest.raises(TranscriptionRefused, match=r"^Language 'xx' is not one Whisper knows"):
        ray_app.services.whisper.transcribe(speech, ModelChoice(model=str(tiny_whisper_hf)),
                                            TranscribeOptions(language="xx"))
    with pytest.raises(Exception, match="is neither a local folder nor a Hugging Face model id"):
        client.predict(audio=handle_file(str(sentences[0])), media_file=None, model="not a model!",
                       api_name="/transcribe")


@pytest.mark.slow
def test_two_replicas_asking_for_the_same_unconverted_model_convert_it_once(ray_app, tiny_whisper_hf, tmp_path):
    from pipelines.core.types import ModelChoice

    model = tiny_copy(tiny_whisper_hf, tmp_path, "tiny-for-two")
    answers = ray_app.services.whisper.load(ModelChoice(model=str(model)))  # to every replica at once
    assert len({a["replica"] for a in answers}) == 2, answers
    exports = [a["replica"] for a in answers if "export to OpenVINO IR" in a["messages"]]
    waited = [a["replica"] for a in answers if any("another worker is converting" in m for m in a["messages"])]
    assert len(exports) == 1 and len(waited) == 1 and waited != exports, answers
    complete, leftovers = converted_folders(ray_app.models_dir, model)
    assert len(complete) == 1 and leftovers == []
    assert all([str(model), "fp16", "CPU"] in a["loaded"] for a in answers)  # both loaded the one folder


@pytest.mark.slow
def test_a_replica_killed_while_converting_leaves_no_half_written_folder(ray_app, tiny_whisper_hf, tmp_path):
    """The request goes on on the other replica, which sweeps the killed build and converts once."""
    from pipelines.core.types import ModelChoice

    model = tiny_copy(tiny_whisper_hf, tmp_path, "tiny-killed")
    messages: list[str] = []
    exporting = threading.Event()

    def progress(fraction: float, message: str) -> None:
        messages.append(message)
        if message == "export to OpenVINO IR":
            exporting.set()

    result: dict = {}
    worker = threading.Thread(target=lambda: result.setdefault("transcript", ray_app.services.whisper.transcribe(
        np.zeros(16000, np.float32), ModelChoice(model=str(model)), progress=progress)))
    worker.start()
    assert exporting.wait(120), messages
    victim = kill_running_replica(ray_app.services)
    worker.join(300)
    assert not worker.is_alive() and "transcript" in result, messages
    assert any("trying again on another one" in m for m in messages), messages
    assert messages.count("export to OpenVINO IR") == 2  # the killed build, then the one that finished
    complete, leftovers = converted_folders(ray_app.models_dir, model)
    assert len(complete) == 1 and leftovers == [], (complete, leftovers)
    wait_for_replicas(ray_app.services, 2, without=victim["id"])


@pytest.mark.slow
def test_a_replica_killed_mid_batch_each_item_is_done_once_or_reported(ray_app, sentences, tmp_path):
    from ui.subtitles_batch import make_batch_handler

    garbage = tmp_path / "notes.mp4"
    garbage.write_text("These are meeting notes, not a video.\n" * 20)
    files = [str(p) for p in sentences] + [str(garbage), str(tmp_path / "gone.wav")]
    before = ray_app.services.book.totals("whisper")
    outputs: list = []
    killed: dict = {}

    def run() -> None:
        for output in make_batch_handler(ray_app.services)(files=files, links="https://vimeo.com/76979871",
                                                           model=BASE, **QUIET):
            outputs.append(output)
            if not killed and sum(row[2] == "done" for row in output[0]) >= 2:
                killed.update(kill_running_replica(ray_app.services), at=time.perf_counter())

    batch = threading.Thread(target=run)
    batch.start()
    batch.join(600)
    assert not batch.is_alive(), "the batch hung"
    table, archive, summary = outputs[-1]
    assert killed, "no replica was killed"
    states = {row[1]: (row[2], row[4]) for row in table}
    assert [states[p.name][0] for p in sentences] == ["done"] * 8, table
    assert states["notes.mp4"][0] == "failed" and "not a supported audio or video file" in states["notes.mp4"][1]
    assert states["gone.wav"] == ("failed", "The file 'gone.wav' was not found. Upload it again.")
    assert states["https://vimeo.com/76979871"][0] == "failed" and "not a YouTube link" in states[
        "https://vimeo.com/76979871"][1]
    assert summary == "11 items: 8 done, 3 failed."
    names = zipfile.ZipFile(archive).namelist()
    assert sorted(names) == sorted(f"{i + 1:02d}-sentence{i}.{kind}" for i in range(8) for kind in ("srt", "vtt"))
    job_dir = Path(archive).parent
    assert sorted(p.parent.name for p in job_dir.glob("*/done.json")) == [f"{i:02d}" for i in range(1, 9)]
    for index, sentence in enumerate(SENTENCES):  # each item's own words
        srt = zipfile.ZipFile(archive).read(f"{index + 1:02d}-sentence{index}.srt").decode()
        text = " ".join(line for line in srt.splitlines() if line and not line[0].isdigit())
        assert word_error_rate(sentence, text) < 0.4, (sentence, srt)
    # every item transcribed to its end exactly once: the killed replica's in-flight item was tried
    # again on the other one, and no finished item ran again
    after = ray_app.services.book.totals("whisper")
    assert after["served"] - before["served"] == 8 and after["lost"] - before["lost"] >= 1, (before, after)
    back = wait_for_replicas(ray_app.services, 2, without=killed["id"])
    assert time.perf_counter() - killed["at"] < 90, back


@pytest.mark.slow
def test_a_lost_request_with_no_try_left_ends_with_a_clear_error_and_the_front_end_serves_on(
        ray_app, client, sentences):
    """When a request's last try loses its replica (here no retry is allowed, so the first loss is the
    last), the call ends at once with :class:`WorkerLost`, a message for the user, not a hang; the front
    end keeps answering, and Serve brings the replica count back."""
    from gradio_client import handle_file

    from pipelines.core.types import ModelChoice
    from pipelines.serve.client import WorkerLost
    from pipelines.serve.remote import RemoteWhisper
    from pipelines.speech.audio import load_audio

    once = RemoteWhisper(ray_app.services.whisper.handle, ray_app.services.book, retries=0)
    speech = np.concatenate([load_audio(path) for path in sentences])  # ~25 s: still running when killed
    outcome: dict = {}

    def run() -> None:
        try:
            once.transcribe(speech, ModelChoice(model=BASE))
        except Exception as exc:  # noqa: BLE001 - the test looks at what the caller got
            outcome["error"] = exc
        outcome["ended"] = time.perf_counter()

    worker = threading.Thread(target=run)
    worker.start()
    victim = kill_running_replica(ray_app.services)
    killed_at = time.perf_counter()
    worker.join(120)
    assert not worker.is_alive(), "the call hung after its replica was killed"
    error = outcome.get("error")
    assert isinstance(error, WorkerLost), outcome
    assert str(error).startswith("The whisper worker running this request stopped (") and str(error).endswith(
        "Please try again in a minute."), str(error)
    assert outcome["ended"] - killed_at < 60  # Ray reports the death at once; 60 s is the silent-replica bound
    assert client.predict(api_name="/status")["mode"] == "ray"  # the front end serves on meanwhile
    text = client.predict(audio=handle_file(str(sentences[5])), media_file=None, model=BASE,
                          api_name="/transcribe")[0]
    assert word_error_rate(SENTENCES[5], text) < 0.35, text
    wait_for_replicas(ray_app.services, 2, without=victim["id"])


@pytest.mark.slow
def test_image_and_pose_through_the_deployment_match_embedded_and_cancel_stops(ray_app, client):
    from PIL import Image, ImageDraw

    from pipelines.image.pose import NoPersonFound
    from pipelines.image.request import GenerationCancelled, ImageOptions
    from pipelines.services import DEFAULT_CONCURRENCY, Services

    embedded = Services(replace(ray_app.services.settings, concurrency=dict(DEFAULT_CONCURRENCY)))
    pose = Image.new("RGB", (256, 256), "black")
    draw = ImageDraw.Draw(pose)
    draw.line([(128, 40), (128, 160), (80, 230), (128, 160), (176, 230)], fill=(255, 0, 0), width=6)
    draw.line([(60, 90), (196, 90)], fill=(0, 255, 0), width=6)
    options = ImageOptions(prompt="a dancer on a beach", steps=3, seed=42, width=256, height=256)
    steps: list[str] = []
    remote = ray_app.services.image.generate(options, pose, progress=lambda f, m: steps.append(m))
    local = embedded.image.generate(options, pose)
    assert remote.seeds == local.seeds == (42,)
    assert np.array_equal(np.asarray(remote.images[0]), np.asarray(local.images[0]))  # the same pixels
    assert steps[-3:] == [f"denoising step {i} of 3" for i in (1, 2, 3)]
    # pose: the same outcome (the tiny random network finds no person in any picture)
    photo = Image.fromarray((np.random.default_rng(3).random((128, 128, 3)) * 255).astype(np.uint8))
    with pytest.raises(NoPersonFound) as far:
        ray_app.services.pose.estimate(photo)
    with pytest.raises(NoPersonFound) as near:
        embedded.pose.estimate(photo)
    assert str(far.value) == str(near.value)
    # cancel from the front end stops the replica after its current step
    cancel = threading.Event()
    seen: list[str] = []

    def progress(fraction: float, message: str) -> None:
        seen.append(message)
        if message == "denoising step 2 of 60":
            cancel.set()

    started = time.perf_counter()
    with pytest.raises(GenerationCancelled):
        ray_app.services.image.generate(replace(options, steps=60), pose, progress=progress, cancel=cancel)
    assert time.perf_counter() - started < 60 and "denoising step 10 of 60" not in seen
    time.sleep(1.0)
    stats = ray_app.services.image.handle.broadcast("stats").results(timeout_s=30)[0]
    assert stats["cancelled"] >= 1 and stats["ongoing"] == 0, stats


@pytest.mark.slow
def test_a_live_caption_stream_decodes_on_the_whisper_replicas(ray_app, sentences, tmp_path):
    """Issue #22 with #21: a live stream's steps run on the Whisper replicas (its state stays on the front
    end); captions only grow, and the stop gives the sentence, transcribed as a file on a replica."""
    from pipelines.core.types import ModelChoice
    from pipelines.speech.audio import load_audio
    from pipelines.speech.live_stream import live_config

    audio = np.concatenate([load_audio(sentences[1]), np.zeros(16000, np.float32)])
    before = sum(r["served"] for r in whisper_replicas(ray_app.services))
    stream = ray_app.services.live.open(ModelChoice(BASE, "fp16"), live_config("transcribe", "en"), tmp_path)
    history = []
    for k in range(0, audio.size, 8000):
        stream.push(audio[k:k + 8000])
        stream.settle(30)
        history.append(stream.captions().confirmed)
    confirmed = stream.end()
    final = stream.finish()
    assert all(after.startswith(before_) for before_, after in zip(history, history[1:]))
    assert word_error_rate(SENTENCES[1], confirmed.text) < 0.35, confirmed.text
    assert word_error_rate(SENTENCES[1], final.text) < 0.35 and final.segments, final.text
    served = sum(r["served"] for r in whisper_replicas(ray_app.services)) - before
    assert served >= 3, served  # getting ready, the steps and the final transcription, all on replicas


@pytest.mark.slow
def test_fast_mode_and_its_live_previews_cross_the_boundary(ray_app, skeleton):
    """Issue #20 on Ray: Fast mode runs in the image replica, its previews reach the front end in step
    order as they are made, and the image is the one embedded makes for the seed."""
    from pipelines.image.request import ImageOptions
    from pipelines.services import DEFAULT_CONCURRENCY, Services

    embedded = Services(replace(ray_app.services.settings, concurrency=dict(DEFAULT_CONCURRENCY)))
    pose = skeleton
    options = ImageOptions(prompt="a dancer", steps=3, guidance_scale=1.0, seed=5, width=256, height=256, mode="fast")
    previews: list = []
    remote = ray_app.services.image.generate(options, pose, preview=previews.append)
    local = embedded.image.generate(options, pose)
    assert remote.extra["mode"] == "fast" and remote.seeds == local.seeds == (5,)
    assert np.array_equal(np.asarray(remote.images[0]), np.asarray(local.images[0]))
    assert [(p.index, p.step, p.steps) for p in previews] == [(0, 1, 3), (0, 2, 3)]
    assert all(p.image.size == (256, 256) for p in previews)


@pytest.mark.slow
def test_the_ui_endpoints_work_over_the_deployments(ray_app, client, tiny_whisper_hf, sentences, tmp_path):
    """/generate_image and the FP16/INT8 compare (one call, on one replica) through gradio_client."""
    from gradio_client import handle_file
    from PIL import Image, ImageDraw

    pose = tmp_path / "pose.png"
    image = Image.new("RGB", (256, 256), "black")
    ImageDraw.Draw(image).line([(128, 40), (128, 160), (80, 230)], fill=(255, 0, 0), width=6)
    image.save(pose)
    files, summary = client.predict(prompt="a dancer", negative_prompt="", pose=handle_file(str(pose)), steps=2,
                                    seed=7, width=256, height=256, api_name="/generate_image")
    assert len(files) == 1 and "seeds 7" in summary and summary.endswith("FP16")
    before = {r["id"]: r["served"] for r in whisper_replicas(ray_app.services)}
    fp16_text, fp16_s, int8_text, int8_s, comparison = client.predict(
        audio=handle_file(str(sentences[1])), media_file=None, model=str(tiny_whisper_hf),
        api_name="/transcribe_compare")
    assert fp16_s > 0 and int8_s > 0 and "as fast as FP16" in comparison
    served = {r["id"]: r["served"] - before.get(r["id"], 0) for r in whisper_replicas(ray_app.services)}
    assert sorted(served.values()) == [0, 1], served  # both precisions in one call on one replica
    assert [str(tiny_whisper_hf), "int8", "CPU"] in client.predict(api_name="/status")["whisper_loaded"]


@pytest.mark.slow
def test_a_second_front_end_joins_the_running_cluster(ray_app, sentences):
    """``python app.py --ray ADDRESS --ray-deploy never``: a front end on a node of an existing cluster
    uses the applications that run there."""
    from gradio_client import Client, handle_file

    from test_serving import app_process

    address = ray_app.services.address
    argv = ["--ray", address, "--ray-deploy", "never", "--models-dir", str(ray_app.models_dir)]
    with app_process(argv, timeout=240) as url:
        joined = Client(url, verbose=False)
        status = joined.predict(api_name="/status")
        assert status["ray"]["address"] == address
        ids = {r["id"] for r in status["ray"]["applications"]["whisper"]["replicas"]}
        assert ids == {r["id"] for r in whisper_replicas(ray_app.services)}
        text = joined.predict(audio=handle_file(str(sentences[3])), media_file=None, model=BASE,
                              api_name="/transcribe")[0]
        assert word_error_rate(SENTENCES[3], text) < 0.35, text
    # the applications keep running for the first front end
    assert [r["state"] for r in whisper_replicas(ray_app.services)] == ["RUNNING", "RUNNING"]
