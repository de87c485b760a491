"""The app: instant --help, no model at start, the Speech tab's handler and its /transcribe endpoint."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pysubs2
import pytest
from servers import serving

ROOT = Path(__file__).resolve().parent.parent


def test_help_answers_at_once_and_lists_the_flags():
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert time.perf_counter() - start < 5.0
    for flag in ("--host", "--port", "--share", "--models-dir", "--device", "--model"):
        assert flag in out.stdout


def test_importing_the_app_does_no_work(tmp_path):
    code = ("import sys, app; heavy = [m for m in ('openvino', 'openvino_genai', 'torch', 'gradio') if m in sys.modules];"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def demo(services):
    from app import build_app

    return build_app(services)


def test_blocks_build_without_loading_a_model(demo, services):
    assert services.whisper.loaded_keys() == []
    names = {d.get("api_name") for d in demo.config["dependencies"]}
    assert "transcribe" in names


def test_gradio_cache_of_uploads_and_served_files_is_swept_like_the_outputs(demo, services, monkeypatch):
    from app import build_app

    assert demo.delete_cache == (3600, 24 * 3600)  # VOICE_STUDIO_KEEP_OUTPUTS_HOURS default: 24 h
    monkeypatch.setenv("VOICE_STUDIO_KEEP_OUTPUTS_HOURS", "0.25")
    assert build_app(services).delete_cache == (900, 900)
    # a near-zero lifetime would sweep non-stop and delete results before their download link is clicked
    monkeypatch.setenv("VOICE_STUDIO_KEEP_OUTPUTS_HOURS", "0.0001")
    assert build_app(services).delete_cache == (600, 600)


@pytest.mark.parametrize("value, hours", [("", 24.0), ("2", 2.0), ("0.0001", 1 / 6), ("0", 24.0), ("-3", 24.0),
                                          ("soon", 24.0), ("nan", 24.0), ("inf", 24.0)])
def test_output_lifetime_from_the_environment(value, hours):
    from ui.common import keep_outputs_hours

    assert keep_outputs_hours({"VOICE_STUDIO_KEEP_OUTPUTS_HOURS": value}) == pytest.approx(hours)


def test_every_api_parameter_is_documented_one_per_line(demo):
    """Gradio reads an endpoint's description and its parameters' from the handler's docstring (API page, MCP)."""
    from gradio import utils

    endpoints = [fn for fn in demo.fns.values() if fn.api_name and fn.api_visibility == "public"]
    assert len(endpoints) >= 12
    for fn in endpoints:
        description, params, _ = utils.get_function_description(fn.fn)
        assert description, fn.api_name
        undocumented = [name for name, doc in params.items() if not doc and name not in ("request", "progress")]
        assert not undocumented, f"/{fn.api_name} does not document {undocumented}"


def test_handler_returns_text_language_segments_and_valid_files(services, tiny_whisper_hf, english_clip):
    from ui.speech_tab import make_transcribe_handler

    handler = make_transcribe_handler(services)
    text, language, segments, files = handler(str(english_clip), None, str(tiny_whisper_hf), "fp16", "CPU",
                                              "transcribe", "en", True, progress=lambda *a, **k: None)
    assert isinstance(text, str) and language == "en"
    assert {Path(f).suffix for f in files} == {".srt", ".vtt", ".txt", ".json"}
    srt = next(f for f in files if f.endswith(".srt"))
    vtt = next(f for f in files if f.endswith(".vtt"))
    assert len(pysubs2.load(srt)) == len(pysubs2.load(vtt))
    assert Path(vtt).read_text().startswith("WEBVTT")
    data = json.loads(Path(next(f for f in files if f.endswith(".json"))).read_text())
    assert data["language"] == "en" and data["text"] == text
    for row in segments:
        assert float(row[0]) <= float(row[1])
    # without timestamps there is nothing to time subtitles by: text and JSON only, no empty SRT/VTT
    _text, _language, segments, files = handler(str(english_clip), None, str(tiny_whisper_hf), "fp16", "CPU",
                                                "transcribe", "en", False, progress=lambda *a, **k: None)
    assert segments == [] and [Path(f).suffix for f in files] == [".txt", ".json"]


@pytest.mark.parametrize("args, message", [
    ((None, None), "No audio was given"),
    (("README.md", None), "not a readable audio"),
])
def test_handler_errors_are_clear_gradio_errors(services, tiny_whisper_hf, args, message):
    import gradio as gr

    from ui.speech_tab import make_transcribe_handler

    handler = make_transcribe_handler(services)
    with pytest.raises(gr.Error, match=message):
        handler(*args, str(tiny_whisper_hf), "fp16", "CPU", "transcribe", "auto", True,
                progress=lambda *a, **k: None)


def test_translate_on_english_only_model_is_a_clear_error(services, english_clip):
    import gradio as gr

    from ui.speech_tab import make_transcribe_handler

    with pytest.raises(gr.Error, match="English-only"):
        make_transcribe_handler(services)(str(english_clip), None, "openai/whisper-tiny.en", "fp16", "CPU",
                                          "translate", "auto", True, progress=lambda *a, **k: None)


@pytest.fixture(scope="module")
def server(demo):
    with serving(demo) as url:
        yield url


def test_gradio_client_transcribe_endpoint(server, tiny_whisper_hf, english_clip):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    text, language, segments, files = client.predict(
        audio=handle_file(str(english_clip)), media_file=None, model=str(tiny_whisper_hf), precision="fp16",
        device="CPU", task="transcribe", language="en", timestamps=True, api_name="/transcribe")
    assert isinstance(text, str) and language == "en"
    assert isinstance(segments, dict) and segments["headers"] == ["start", "end", "text"]
    assert sorted(Path(f).suffix for f in files) == [".json", ".srt", ".txt", ".vtt"]


def test_positional_calls_written_before_word_timestamps_still_work(server, tiny_whisper_hf, english_clip):
    """Issue #23 added word_timestamps and vtt_word_timing last, with defaults (off): a call giving the
    eight parameters before them by position gets what it got before."""
    from gradio_client import Client, handle_file

    from conftest import parse_webvtt, read_json

    client = Client(server, verbose=False)
    text, language, segments, files = client.predict(
        handle_file(str(english_clip)), None, str(tiny_whisper_hf), "fp16", "CPU", "transcribe", "en", True,
        api_name="/transcribe")
    assert language == "en" and sorted(Path(f).suffix for f in files) == [".json", ".srt", ".txt", ".vtt"]
    assert all(cue["tags"] == [] for cue in parse_webvtt(next(f for f in files if f.endswith(".vtt"))))
    assert all(s["words"] == [] for s in read_json(next(f for f in files if f.endswith(".json")))["segments"])
    # the new parameters by name: the random model's words (if any) lie inside their segments
    *_, files = client.predict(audio=handle_file(str(english_clip)), model=str(tiny_whisper_hf), language="en",
                               word_timestamps=True, vtt_word_timing=True, api_name="/transcribe")
    for segment in read_json(next(f for f in files if f.endswith(".json")))["segments"]:
        assert all(segment["start"] <= w["start"] <= w["end"] <= segment["end"] for w in segment["words"])


def test_example_client_asks_for_word_timestamps(server, tiny_whisper_hf, english_clip):
    out = subprocess.run([sys.executable, "examples/api_client.py", "--server", server, "--json", "transcribe",
                          str(english_clip), "--model", str(tiny_whisper_hf), "--language", "en", "--word-timestamps"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert isinstance(result["words"], list) and all({"text", "start", "end"} <= set(w) for w in result["words"])


def test_gradio_client_gets_the_error_message(server, tiny_whisper_hf):
    from gradio_client import Client

    client = Client(server, verbose=False)
    with pytest.raises(Exception, match="No audio was given"):
        client.predict(audio=None, media_file=None, model=str(tiny_whisper_hf), precision="fp16", device="CPU",
                       task="transcribe", language="auto", timestamps=True, api_name="/transcribe")
