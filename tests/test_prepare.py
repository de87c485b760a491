"""``python app.py --prepare`` (issue #23): models converted ahead of the first request, progress on the
terminal, a clear message and a failing exit code for a model that cannot be had, and the Dockerfile
using it."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_prepare_converts_and_quantizes_and_reports_what_it_could_not_have(tmp_path, tiny_whisper_hf, capsys,
                                                                          monkeypatch):
    import app
    from pipelines.speech.store import WhisperModelStore

    models = tmp_path / "models_cache"
    tiny = str(tiny_whisper_hf)
    # offline (tests/conftest.py), the image models are only a download away: they fail, the rest goes on
    with pytest.raises(SystemExit) as exit_:
        app.main(["--prepare", "image", tiny, "--prepare-int8", "--models-dir", str(models)])
    out, err = capsys.readouterr()
    assert str(exit_.value.code) == "app.py: error: could not prepare image fp16, image int8 (see above)"
    assert "[image FP16] failed: Quality mode needs 2 models that are not available here" in err
    assert "Stable Diffusion model 'stable-diffusion-v1-5/stable-diffusion-v1-5'" in err
    # progress on the terminal, step by step, for each precision
    for label, step in ((f"{tiny} FP16", "export to OpenVINO IR"), (f"{tiny} INT8", "compress the decoder's weights")):
        lines = [line for line in out.splitlines() if line.startswith(f"[{label}]")]
        assert any(step in line for line in lines), out
        assert re.fullmatch(rf"\[{re.escape(label)}\] ready in [\d.]+ s: .+", lines[-1]), lines
    # a later start finds both ready: nothing is converted or quantized again
    store = WhisperModelStore(models)

    def must_not_run(*args, **kwargs):
        raise AssertionError("prepared model converted again")

    monkeypatch.setattr(store, "_export", must_not_run)
    monkeypatch.setattr(store, "_compress_decoder", must_not_run)
    assert store.resolve(tiny, "fp16").path.is_dir() and store.resolve(tiny, "int8").path.is_dir()


def test_prepare_without_names_takes_the_default_model_and_its_flags_are_checked(tmp_path, capsys):
    import app
    from pipelines.prepare import prepare_models
    from pipelines.services import Services, Settings

    services = Services(Settings(models_dir=tmp_path, default_model="/no/such/whisper"))
    [result] = prepare_models(services, [])
    assert (result.name, result.ok) == ("/no/such/whisper", False) and "does not exist" in result.error
    assert "[/no/such/whisper FP16] failed: The folder '/no/such/whisper' does not exist" in capsys.readouterr().err
    alone = subprocess.run([sys.executable, "app.py", "--prepare-int8"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
    assert alone.returncode == 2 and "--prepare-int8 goes with --prepare" in alone.stderr
    assert app.parse_args(["--prepare"]).prepare == [] and app.parse_args([]).prepare is None


def test_the_dockerfile_prepares_the_default_model_at_build_time_as_the_app_user():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    runs = {n: line for n, line in enumerate(lines) if line.startswith("RUN ")}
    prepare = next(n for n, line in runs.items() if re.fullmatch(r"RUN python app\.py --prepare", line))
    pip = next(n for n, line in runs.items() if "pip install" in line and "requirements.txt" in line)
    copy = max(n for n, line in enumerate(lines) if line.startswith("COPY ") and " . ." in line)
    user = max(n for n, line in enumerate(lines) if line.startswith("USER ") and n < prepare)
    volume = next(n for n, line in enumerate(lines) if line.startswith("VOLUME "))
    assert pip < copy < user < prepare < volume  # with the code, as the app user, before the volume freezes
    assert lines[user] == "USER 1000:1000"
    assert "ENV" in " ".join(lines[:prepare]) and "VOICE_STUDIO_MODELS_DIR=/app/models_cache" in " ".join(lines)
