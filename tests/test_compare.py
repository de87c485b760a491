"""The FP16 / INT8 switch and the FP16-vs-INT8 comparison (issue 6, UI half), and the life of output folders.

Speech runs on the session's tiny random-weight Whisper, named by its FP16 OpenVINO IR folder
(``tiny_whisper_ir``): the module's own ``Services`` keep their converted models in a folder of their
own, where INT8 is quantized from that IR calibrated on one clip (seconds instead of a minute with
the 32 shipped sentences), so the session's INT8 cache (calibrated on every sentence, checked by
tests/test_model_store.py) stays as it is. The tiny model decodes gibberish, which is fine here: the
tests check that the chosen precision is the one loaded and used, and that both runs come back with
their times. Subtitles use a silent video (the tiny model's word timestamps crash openvino_genai on
speech, see tests/test_subtitles_tab.py): both models load, voice activity detection runs, no text.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import gradio as gr
import pytest

from pipelines.core.cache import IN_USE_FILE
from pipelines.services import Services, Settings
from servers import launched

QUIET = dict(progress=lambda *a, **k: None)


class Progress:
    """Stands in for gr.Progress: records (fraction, message) as the user would see them."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, str]] = []

    def __call__(self, fraction, desc=None, **_):
        self.calls.append((float(fraction), desc or ""))

    @property
    def messages(self) -> list[str]:
        return [m for _, m in self.calls]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def outputs_in_tmp(monkeypatch, tmp_path):
    """The tabs' output folders (ui.common.request_dir, old ones swept) go under this test's tmp_path."""
    import ui.image_tab
    import ui.speech_tab
    import ui.subtitles_tab
    from ui.common import request_dir, working_dir

    for tab in (ui.speech_tab, ui.image_tab):
        monkeypatch.setattr(tab, "request_dir", lambda prefix: request_dir(prefix, root=tmp_path))
    monkeypatch.setattr(ui.subtitles_tab, "working_dir", lambda prefix: working_dir(prefix, root=tmp_path))


@pytest.fixture(scope="module")
def calibration_dir(tmp_path_factory, english_clip) -> Path:
    folder = tmp_path_factory.mktemp("calibration")
    shutil.copy(english_clip, folder / "clip.wav")
    return folder


def make_services(root: Path, calibration: Path, **settings) -> Services:
    services = Services(Settings(models_dir=root, **settings))
    services.whisper.store.calibration_dir = calibration  # one clip: INT8 in seconds
    return services


@pytest.fixture(scope="module")
def compare_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("compare-models")


@pytest.fixture(scope="module")
def tiny(tiny_whisper_ir) -> str:
    return str(tiny_whisper_ir)


@pytest.fixture(scope="module")
def svc(compare_root, calibration_dir, tiny) -> Services:
    return make_services(compare_root, calibration_dir, default_model=tiny)


@pytest.fixture(scope="module")
def quiet_video(tmp_path_factory) -> Path:
    """Three seconds of a test picture with a silent audio track."""
    from pipelines.subtitles.video import ffmpeg_exe

    path = tmp_path_factory.mktemp("quiet") / "quiet.mp4"
    subprocess.run([ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc=size=160x120:rate=10:duration=3", "-f", "lavfi", "-i",
                    "anullsrc=channel_layout=mono:sample_rate=16000", "-t", "3", "-c:v", "libx264", "-preset",
                    "veryfast", "-pix_fmt", "yuv420p", "-c:a", "aac", str(path)], check=True, capture_output=True)
    return path


# --------------------------------------------------------------------------- the shared pieces
def test_compare_loads_before_timing_and_runs_each_precision_in_turn(monkeypatch):
    from pipelines.core import compare
    from pipelines.core.compare import compare_precisions

    clock = [100.0]  # the comparison's clock: each step below takes the time it says, exactly
    monkeypatch.setattr(compare.time, "perf_counter", lambda: clock[0])
    order: list[str] = []

    def load(precision, report):
        order.append(f"load {precision}")
        report(0.5, "quantize" if precision == "int8" else "convert")
        clock[0] += 0.3 if precision == "int8" else 0.1  # slow loads (INT8 quantizes) are not timed

    def run(precision, report):
        order.append(f"run {precision}")
        report(1.0, "decode")
        clock[0] += 0.05 if precision == "fp16" else 0.02
        return precision.upper()

    progress = Progress()
    runs = compare_precisions(load, run, lambda f, m: progress(f, m))
    assert order == ["load fp16", "run fp16", "load int8", "run int8"]
    assert [(r.precision, r.value) for r in runs] == [("fp16", "FP16"), ("int8", "INT8")]
    assert [round(r.seconds, 6) for r in runs] == [0.05, 0.02]  # the runs alone
    assert [round(r.load_seconds, 6) for r in runs] == [0.1, 0.3]
    # the user sees which run a step belongs to, and the bar only moves forward within [0, 1]
    assert progress.calls == [(0.25, "FP16: convert"), (0.5, "FP16: decode"), (0.75, "INT8: quantize"),
                              (1.0, "INT8: decode"), (1.0, "done")]


def test_speed_summary_and_agreement_say_what_a_user_compares():
    from pipelines.core.compare import PrecisionRun
    from ui.common import agreement_text, speed_summary

    runs = [PrecisionRun("fp16", None, 2.0, 0.0), PrecisionRun("int8", None, 0.5, 9.0)]
    text = speed_summary(runs)
    assert text.startswith("FP16 2.000 s, INT8 0.500 s: INT8 is 4.00x as fast as FP16")
    assert "FP16 0.200 s per step, INT8 0.400 s per step: INT8 is 0.50x" in speed_summary(
        runs, unit="s per step", seconds=[0.2, 0.4])
    assert agreement_text("Hello, world.", "hello world") == "The texts are the same."
    assert agreement_text("", "") == "Both runs heard no speech."
    assert agreement_text("one two three four", "one two three five") == "The texts agree on 75% of their words."


def test_one_helper_builds_every_tabs_whisper_request(tmp_path, tiny):
    from pipelines.speech.service import TranscriptionRefused
    from pipelines.core.security import ModelReferenceRefused
    from ui.common import whisper_request

    settings = Settings(models_dir=tmp_path, default_model=tiny)
    choice, options = whisper_request(settings, "", "", "", "", "")
    assert (choice.model, choice.precision, choice.device) == (tiny, "fp16", "CPU")
    assert (options.task, options.language, options.timestamps) == ("transcribe", None, True)
    choice, options = whisper_request(settings, " openai/whisper-small ", "INT8", "CPU", "translate", "de",
                                      word_timestamps=True)
    assert (choice.model, choice.precision, options.task, options.language, options.word_timestamps) == (
        "openai/whisper-small", "int8", "translate", "de", True)
    with pytest.raises(ValueError, match="Precision 'fp32' is not offered; choose one of fp16, int8"):
        whisper_request(settings, tiny, "fp32", "CPU")
    with pytest.raises(TranscriptionRefused, match="English-only"):  # refused before any download
        whisper_request(settings, "openai/whisper-tiny.en", "int8", "CPU", "translate")
    shared = Settings(models_dir=tmp_path, shared=True, allow_local_models=False)
    with pytest.raises(ModelReferenceRefused, match="shared"):
        whisper_request(shared, str(tmp_path), "fp16", "CPU")


# --------------------------------------------------------------------------- speech
def test_speech_int8_switch_quantizes_once_says_so_and_uses_the_int8_model(tmp_path, calibration_dir, tiny,
                                                                           english_clip):
    from pipelines.core.types import ModelChoice
    from ui.speech_tab import make_transcribe_handler

    services = make_services(tmp_path / "models", calibration_dir)
    progress = Progress()
    text, language, _segments, files = make_transcribe_handler(services)(
        str(english_clip), None, tiny, "int8", "CPU", "transcribe", "en", True, progress=progress)
    assert isinstance(text, str) and language == "en" and len(files) == 4
    assert services.whisper.loaded_keys() == [(tiny, "int8", "CPU")]
    loaded = services.whisper.load(ModelChoice(tiny, "int8"))  # the loaded one, not a new load
    assert loaded.resolved.precision == "int8" and loaded.resolved.path.name.startswith("int8-")
    quantizing = [m for m in progress.messages if "quantiz" in m.lower()]
    assert quantizing and "can take a few minutes" in quantizing[0], progress.messages
    # the second INT8 request finds it loaded: no quantizing message
    again = Progress()
    make_transcribe_handler(services)(str(english_clip), None, tiny, "int8", "CPU", "transcribe", "en", True,
                                      progress=again)
    assert not [m for m in again.messages if "quantiz" in m.lower()], again.messages


def test_speech_bad_precision_is_a_clear_error_and_nothing_loads(svc, tiny, english_clip):
    from ui.speech_tab import make_transcribe_compare_handler, make_transcribe_handler

    before = svc.whisper.loaded_keys()
    with pytest.raises(gr.Error, match="Precision 'fp32' is not offered; choose one of fp16, int8"):
        make_transcribe_handler(svc)(str(english_clip), None, tiny, "fp32", "CPU", "transcribe", "en", True, **QUIET)
    with pytest.raises(gr.Error, match="No audio was given"):
        make_transcribe_compare_handler(svc)(None, None, tiny, "CPU", "transcribe", "en", **QUIET)
    with pytest.raises(gr.Error, match="English-only"):
        make_transcribe_compare_handler(svc)(str(english_clip), None, "openai/whisper-tiny.en", "CPU", "translate",
                                             "auto", **QUIET)
    assert svc.whisper.loaded_keys() == before


def test_transcribe_compare_gives_both_texts_times_and_their_ratio(svc, tiny, english_clip, monkeypatch):
    from ui.speech_tab import make_transcribe_compare_handler

    used: list[str] = []
    real = svc.whisper.transcribe
    monkeypatch.setattr(svc.whisper, "transcribe", lambda samples, choice, *a, **k: used.append(
        choice.precision) or real(samples, choice, *a, **k))
    progress = Progress()
    fp16_text, fp16_seconds, int8_text, int8_seconds, summary = make_transcribe_compare_handler(svc)(
        str(english_clip), None, tiny, "CPU", "transcribe", "en", progress=progress)
    assert used == ["fp16", "int8"]  # one run each, on the same audio
    assert isinstance(fp16_text, str) and isinstance(int8_text, str)
    assert 0 < fp16_seconds < 60 and 0 < int8_seconds < 60
    ratio = float(re.search(r"INT8 is (\d+\.\d\d)x as fast as FP16", summary)[1])
    assert ratio == pytest.approx(fp16_seconds / int8_seconds, rel=0.02, abs=0.011)
    assert f"FP16 {fp16_seconds:.3f} s, INT8 {int8_seconds:.3f} s" in summary
    assert re.search(r"The texts (are the same|agree on \d+% of their words)\.", summary), summary
    assert {(tiny, "fp16", "CPU"), (tiny, "int8", "CPU")} <= set(svc.whisper.loaded_keys())
    assert any(m.startswith("FP16: ") for m in progress.messages)
    assert any(m.startswith("INT8: ") for m in progress.messages)
    assert all(0.0 <= f <= 1.0 for f, _ in progress.calls)
    # getting the models ready fills the start of the bar; the runs go on from there, never back
    compare_start = next(i for i, (_, m) in enumerate(progress.calls) if m.startswith("FP16: "))
    assert max(f for f, _ in progress.calls[:compare_start]) <= min(f for f, _ in progress.calls[compare_start:])


# --------------------------------------------------------------------------- subtitles
def test_subtitles_int8_switch_uses_the_int8_model(svc, tiny, quiet_video, monkeypatch):
    from ui.subtitles_tab import make_subtitles_handler

    used: list[str] = []
    real = svc.whisper.transcribe_file
    monkeypatch.setattr(svc.whisper, "transcribe_file", lambda wav, choice, *a, **k: used.append(
        choice.precision) or real(wav, choice, *a, **k))
    player, text, files = make_subtitles_handler(svc)("", str(quiet_video), tiny, "int8", "CPU", "transcribe",
                                                      "auto", 42, 6, False, False, **QUIET)
    assert used == ["int8"] and (tiny, "int8", "CPU") in svc.whisper.loaded_keys()
    assert text == "" and [Path(f).suffix for f in files] == [".srt", ".vtt"]


def test_subtitles_compare_extracts_the_audio_once_and_times_both(svc, tiny, quiet_video, monkeypatch):
    from pipelines.subtitles import video
    from ui.subtitles_tab import make_subtitles_compare_handler

    extracted: list[Path] = []
    real_extract = video.extract_audio
    monkeypatch.setattr(video, "extract_audio", lambda *a, **k: extracted.append(a[0]) or real_extract(*a, **k))
    used: list[tuple[str, Path]] = []
    real = svc.whisper.transcribe_file
    monkeypatch.setattr(svc.whisper, "transcribe_file", lambda wav, choice, *a, **k: used.append(
        (choice.precision, Path(wav))) or real(wav, choice, *a, **k))
    progress = Progress()
    fp16, fp16_seconds, int8, int8_seconds, summary, files = make_subtitles_compare_handler(svc)(
        "", str(quiet_video), tiny, "CPU", "transcribe", "auto", 42, 6, progress=progress)
    assert len(extracted) == 1
    assert [p for p, _ in used] == ["fp16", "int8"] and used[0][1] == used[1][1]  # the same audio file
    assert not used[0][1].exists()  # deleted once both runs are done
    assert fp16 == int8 == "" and fp16_seconds >= 0 and int8_seconds >= 0
    assert summary.startswith("FP16 ") and "INT8 " in summary and "Both runs heard no speech." in summary
    assert [Path(f).name for f in files] == ["quiet.fp16.srt", "quiet.fp16.vtt", "quiet.int8.srt", "quiet.int8.vtt"]
    assert all(Path(f).is_file() for f in files)
    assert any(m.startswith("INT8: ") for m in progress.messages)


def test_subtitles_compare_errors_are_clear(svc, tiny):
    from ui.subtitles_tab import make_subtitles_compare_handler

    handler = make_subtitles_compare_handler(svc)
    with pytest.raises(gr.Error, match="Give a YouTube link or upload a video file"):
        handler("", None, tiny, "CPU", "transcribe", "auto", 42, 6, **QUIET)
    with pytest.raises(gr.Error, match="not a YouTube link"):
        handler("https://vimeo.com/123", None, tiny, "CPU", "transcribe", "auto", 42, 6, **QUIET)


# --------------------------------------------------------------------------- output folders
def _aged(path: Path, hours: float) -> Path:
    stamp = time.time() - hours * 3600
    os.utime(path, (stamp, stamp))
    return path


def test_old_output_folders_go_when_a_new_one_is_made(tmp_path, monkeypatch):
    from ui import common

    old = tmp_path / "voice-studio-speech-abcd1234"
    old.mkdir()
    (old / "talk.srt").write_text("1\n")
    _aged(old, 30)
    old_compare = _aged(Path(tempfile.mkdtemp(prefix="voice-studio-subtitles-compare-", dir=tmp_path)), 25)
    young = _aged(Path(tempfile.mkdtemp(prefix="voice-studio-image-", dir=tmp_path)), 23)
    other = tmp_path / "someone-elses-folder"
    other.mkdir()
    _aged(other, 100)
    log_file = tmp_path / "voice-studio-7860.log"
    log_file.write_text("a file, not a folder")
    _aged(log_file, 100)
    monkeypatch.setattr(common, "_last_clean", [float("-inf")])
    monkeypatch.delenv("VOICE_STUDIO_KEEP_OUTPUTS_HOURS", raising=False)

    new = common.request_dir("speech", root=tmp_path)
    assert new.is_dir() and new.name.startswith("voice-studio-speech-")
    assert not old.exists() and not old_compare.exists()
    assert young.exists() and other.exists() and log_file.exists()

    # at most one sweep a minute; the lifetime comes from VOICE_STUDIO_KEEP_OUTPUTS_HOURS
    monkeypatch.setenv("VOICE_STUDIO_KEEP_OUTPUTS_HOURS", "2")
    common.request_dir("image", root=tmp_path)
    assert young.exists()
    monkeypatch.setattr(common, "_last_clean", [float("-inf")])
    common.request_dir("image", root=tmp_path)
    assert not young.exists() and new.exists()


def test_a_long_subtitle_job_keeps_its_folder_through_a_sweep(svc, tiny, quiet_video, monkeypatch, tmp_path):
    """A job longer than the output lifetime: a sweep made by another request meanwhile leaves its folder alone."""
    from pipelines.subtitles import job as subtitle_job
    from ui import common
    from ui.subtitles_tab import make_subtitles_handler

    swept: list[list[Path]] = []
    real = subtitle_job.make_subtitles

    def another_request_sweeps_midway(whisper, request, work_dir, *args, **kwargs):
        _aged(work_dir, 48)  # untouched for longer than the lifetime
        swept.append(common.clean_request_dirs(1.0, tmp_path))
        return real(whisper, request, work_dir, *args, **kwargs)

    monkeypatch.setattr(subtitle_job, "make_subtitles", another_request_sweeps_midway)
    _player, _text, files = make_subtitles_handler(svc)("", str(quiet_video), tiny, "fp16", "CPU", "transcribe",
                                                        "auto", 42, 6, False, False, **QUIET)
    assert swept == [[]] and all(Path(f).is_file() for f in files)
    work_dir = Path(files[0]).parent
    assert not (work_dir / IN_USE_FILE).exists()  # released: the next sweep past its lifetime takes it
    _aged(work_dir, 48)
    assert common.clean_request_dirs(1.0, tmp_path) == [work_dir]


def test_a_transcription_clears_output_folders_past_their_life(svc, tiny, english_clip, tmp_path, monkeypatch):
    from ui import common
    from ui.speech_tab import make_transcribe_handler

    stale = _aged(Path(tempfile.mkdtemp(prefix="voice-studio-speech-", dir=tmp_path)), 48)
    monkeypatch.setattr(common, "_last_clean", [float("-inf")])
    _text, _language, _segments, files = make_transcribe_handler(svc)(
        str(english_clip), None, tiny, "fp16", "CPU", "transcribe", "en", True, **QUIET)
    assert not stale.exists()
    assert all(Path(f).parent.parent == tmp_path and Path(f).is_file() for f in files)


# --------------------------------------------------------------------------- a launched server
@pytest.fixture(scope="module")
def client(svc):
    from gradio_client import Client

    with launched(svc) as url:
        yield Client(url, verbose=False)


def test_the_api_names_the_switch_and_the_compare_endpoints(client):
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]

    def names(endpoint):
        return [p["parameter_name"] for p in endpoints[endpoint]["parameters"]]

    assert names("/transcribe_compare") == ["audio", "media_file", "model", "device", "task", "language"]
    assert names("/subtitles_compare") == ["url", "video_file", "model", "device", "task", "language",
                                           "max_line_chars", "max_duration"]
    assert "precision" in names("/transcribe") and "precision" in names("/subtitles")
    assert names("/generate_image_compare") == [n for n in names("/generate_image") if n != "precision"]
    # new parameters come last, with defaults: older calls keep working
    assert names("/voice_prompt") == ["audio", "model", "device", "precision", "language"]
    assert names("/generate_image")[-3:] == ["device", "precision", "mode"]
    for endpoint, name, default in [("/voice_prompt", "precision", "fp16"), ("/voice_prompt", "language", "auto"),
                                    ("/generate_image", "precision", "fp16"), ("/generate_image", "mode", "quality"),
                                    ("/generate_image_compare", "mode", "quality")]:
        param = {p["parameter_name"]: p for p in endpoints[endpoint]["parameters"]}[name]
        assert param["parameter_has_default"] and param["parameter_default"] == default, param
    # either-or inputs are optional: a client passes the one it has
    for endpoint, either_or in [("/transcribe", ("audio", "media_file")), ("/transcribe_compare", ("audio", "media_file")),
                                ("/subtitles", ("url", "video_file")), ("/subtitles_compare", ("url", "video_file"))]:
        params = {p["parameter_name"]: p for p in endpoints[endpoint]["parameters"]}
        assert all(params[name]["parameter_has_default"] for name in either_or), endpoint
    # every output has a stable name (an unlabelled component would be "value_<id>", changing with the layout)
    for endpoint, info in endpoints.items():
        assert not [r["label"] for r in info["returns"] if re.fullmatch(r"(value|parameter)_\d+", r["label"])], endpoint


def test_client_int8_transcription_runs_on_the_int8_model(client, tiny, english_clip):
    from gradio_client import handle_file

    text, language, _segments, files = client.predict(
        audio=handle_file(str(english_clip)), media_file=None, model=tiny, precision="int8", device="CPU",
        task="transcribe", language="en", timestamps=True, api_name="/transcribe")
    assert isinstance(text, str) and language == "en" and len(files) == 4
    assert [tiny, "int8", "CPU"] in client.predict(api_name="/status")["whisper_loaded"]
    with pytest.raises(Exception, match="fp32"):
        client.predict(audio=handle_file(str(english_clip)), media_file=None, model=tiny, precision="fp32",
                       api_name="/transcribe")


def test_client_transcribe_compare(client, tiny, english_clip):
    from gradio_client import handle_file

    fp16_text, fp16_seconds, int8_text, int8_seconds, summary = client.predict(
        audio=handle_file(str(english_clip)), media_file=None, model=tiny, device="CPU", task="transcribe",
        language="en", api_name="/transcribe_compare")
    assert isinstance(fp16_text, str) and isinstance(int8_text, str)
    assert fp16_seconds > 0 and int8_seconds > 0 and "as fast as FP16" in summary
    loaded = client.predict(api_name="/status")["whisper_loaded"]
    assert [tiny, "fp16", "CPU"] in loaded and [tiny, "int8", "CPU"] in loaded
    with pytest.raises(Exception, match="No audio was given"):
        client.predict(audio=None, media_file=None, api_name="/transcribe_compare")


def test_client_subtitles_compare(client, tiny, quiet_video):
    from gradio_client import handle_file

    fp16, fp16_seconds, int8, int8_seconds, summary, files = client.predict(
        url="", video_file=handle_file(str(quiet_video)), model=tiny, api_name="/subtitles_compare")
    assert fp16 == int8 == "" and fp16_seconds >= 0 and int8_seconds >= 0 and "INT8" in summary
    assert sorted(Path(f).name for f in files) == ["quiet.fp16.srt", "quiet.fp16.vtt", "quiet.int8.srt",
                                                   "quiet.int8.vtt"]


def test_client_voice_prompt_with_and_without_the_new_precision(client, svc, tiny, english_clip):
    from gradio_client import handle_file

    svc.whisper.release()
    old_call = client.predict(audio=handle_file(str(english_clip)), model=tiny, device="CPU",
                              api_name="/voice_prompt")
    assert len(old_call) == 3 and svc.whisper.loaded_keys() == [(tiny, "fp16", "CPU")]
    new_call = client.predict(audio=handle_file(str(english_clip)), model=tiny, device="CPU", precision="int8",
                              api_name="/voice_prompt")
    assert len(new_call) == 3 and (tiny, "int8", "CPU") in svc.whisper.loaded_keys()


def test_api_client_example_compare_and_precision(client, tiny, english_clip):
    import json
    import sys

    root = Path(__file__).resolve().parent.parent

    def api_client(*argv: str) -> dict:
        out = subprocess.run([sys.executable, "examples/api_client.py", "--server", client.src, "--json", *argv],
                             cwd=root, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    result = api_client("compare", str(english_clip), "--model", tiny, "--language", "en")
    assert result["fp16"]["seconds"] > 0 and result["int8"]["seconds"] > 0 and "as fast as FP16" in result["summary"]
    said = api_client("voice-prompt", str(english_clip), "--model", tiny, "--precision", "int8")
    assert set(said) == {"prompt", "language", "said"}
