"""The live-caption WebSocket route (/live/ws) on a real server: its protocol, its login, the shared-mode
rules and the stream limit (tiny random-weight Whisper: the text is nonsense, the path is real), and
examples/live_client.py with the real bundled base (slow)."""
from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import word_error_rate
from test_serving import PASSWORD, clean_env, running

websockets_client = pytest.importorskip("websockets.sync.client")
ROOT = Path(__file__).resolve().parent.parent
BASIC = {"Authorization": "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, models_dir, tiny_whisper_ir, tiny_whisper_hf):
    """Shared (as on a Space), with a login, and at most one live stream at once."""
    import app

    folder = tmp_path_factory.mktemp("live-guarded")
    logins = folder / "logins.txt"
    logins.write_text(f"alice:{PASSWORD}\n")
    logins.chmod(0o600)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(app, "SPACE_DATA_DIR", folder / "no-persistent-storage")
        with running(["--model", str(tiny_whisper_hf), "--models-dir", str(models_dir), "--auth-file", str(logins),
                      "--concurrency", "live=1"], environ={"SPACE_ID": "someone/voice-studio"}) as server:
            yield server


def connect(server, headers=None, cookies: str = ""):
    url = server.base.replace("http://", "ws://") + "/live/ws"
    if cookies:
        headers = dict(headers or {}, Cookie=cookies)
    return websockets_client.connect(url, additional_headers=headers or {}, open_timeout=30)


def speech_pcm(path: Path) -> bytes:
    from pipelines.speech.audio import load_audio

    return (np.clip(load_audio(path), -1, 1) * 32767).astype("<i2").tobytes()


def test_the_route_needs_the_servers_login(guarded):
    with connect(guarded) as ws:  # refused before it says anything
        refusal = json.loads(ws.recv())
    assert refusal["type"] == "error" and "needs a login" in refusal["message"]
    with connect(guarded, {"Authorization": "Basic " + base64.b64encode(b"alice:guess").decode()}) as ws:
        assert "needs a login" in json.loads(ws.recv())["message"]


def test_a_stream_over_the_route_from_settings_to_the_final_text(guarded, english_clip):
    """Basic auth, settings, PCM chunks, captions while streaming (at least the model's loading and
    ready), then "end": the final text and segments, and the stream's place is free again."""
    pcm = speech_pcm(english_clip)
    with connect(guarded, BASIC) as ws:
        ws.send(json.dumps({"precision": "fp16", "language": "en"}))
        assert json.loads(ws.recv()) == {"type": "ready"}
        for first in range(0, len(pcm), 16000):  # 0.5 s messages
            ws.send(pcm[first:first + 16000])
        ws.send("end")
        messages = [json.loads(m) for m in ws]
    captions = [m for m in messages if m["type"] == "captions"]
    final = messages[-1]
    assert captions and {"confirmed", "tentative", "status", "behind", "seconds"} <= set(captions[0])
    assert final["type"] == "final" and isinstance(final["text"], str) and final["duration"] > 3
    assert all(len(s) == 3 for s in final["segments"])
    assert guarded.services.live.open_streams() == 0


def test_the_login_cookie_works_too_and_the_shared_rules_hold(guarded):
    cookies = httpx.Client(base_url=guarded.base).post("/login", data={"username": "alice", "password": PASSWORD}).cookies
    header = "; ".join(f"{k}={v}" for k, v in cookies.items())
    with connect(guarded, cookies=header) as ws:
        ws.send(json.dumps({"model": "/srv/whisper", "precision": "fp16"}))  # a local path on a shared server
        refusal = json.loads(ws.recv())
    assert refusal["type"] == "error" and "local" in refusal["message"].lower()
    with connect(guarded, BASIC) as ws:
        ws.send(json.dumps({"sample_rate": 1000}))
        assert "sample_rate" in json.loads(ws.recv())["message"]


def test_streams_beyond_the_limit_are_refused_with_try_again_later(guarded):
    from websockets.exceptions import ConnectionClosed

    with connect(guarded, BASIC) as first:
        first.send(json.dumps({"precision": "fp16"}))
        assert json.loads(first.recv())["type"] == "ready"
        with connect(guarded, BASIC) as second:
            second.send(json.dumps({"precision": "fp16"}))
            refusal = json.loads(second.recv())
            with pytest.raises(ConnectionClosed) as closed:
                second.recv()
        assert "already runs 1 live caption stream" in refusal["message"] and closed.value.rcvd.code == 1013
        first.send("end")
        assert [json.loads(m) for m in first][-1]["type"] == "final"


@pytest.mark.slow
def test_example_client_streams_a_paragraph_in_real_time(models_dir, speech_clips, tmp_path):
    """examples/live_client.py against the app's default (bundled base): captions grow while it sends,
    and the final text is the recording's as a file."""
    from pipelines.speech.audio import load_audio
    from conftest import write_wav

    clip = speech_clips["english_long"]
    audio = load_audio(clip["path"])[: 22 * 16000]
    path = write_wav(tmp_path / "first-20s.wav", audio)
    reference = " ".join(clip["text"].split()[:52])  # the words of the first 20 s of speech
    with running(["--models-dir", str(models_dir)]) as server:
        out = subprocess.run([sys.executable, "examples/live_client.py", str(path), "--server", server.url,
                              "--language", "en", "--json"], cwd=ROOT, env=clean_env(), capture_output=True,
                             text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    confirmed = [c for c in result["captions"] if c]
    assert len(set(confirmed)) >= 3, result["captions"]  # the captions grew while the audio was being sent
    assert all(b.startswith(a) for a, b in zip(confirmed, confirmed[1:]))
    print(f"final WER {word_error_rate(reference, result['text']):.3f}: {result['text']}")
    assert word_error_rate(reference, result["text"]) <= 0.2 and result["language"] == "en"
    assert result["segments"] and result["segments"][-1][1] <= 22.5
