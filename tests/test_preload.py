"""--preload and --preload words (issue #21): the word-timestamp pipelines of the default model can be loaded
at start too, for servers that make subtitles or live captions."""
from __future__ import annotations

import time

import pytest

from test_serving import running


@pytest.mark.parametrize("argv, env, expected", [
    ([], {}, False),
    (["--preload"], {}, True),  # as before: the plain pipeline
    (["--preload", "words"], {}, "words"),
    ([], {"VOICE_STUDIO_PRELOAD": "1"}, True),
    ([], {"VOICE_STUDIO_PRELOAD": "words"}, "words"),
])
def test_preload_flag_and_environment(argv, env, expected):
    import app

    assert app.parse_args(argv, environ=env).preload == expected


def test_preload_takes_no_other_value(capsys):
    import app

    with pytest.raises(SystemExit):
        app.parse_args(["--preload", "everything"], environ={})
    assert "'words'" in capsys.readouterr().err


def test_preload_words_loads_the_word_timestamp_pipelines_too(tmp_path, models_dir, tiny_whisper_ir, tiny_whisper_hf):
    """The plain pipeline, the FP16 word-timestamp one (subtitles) and the Live mode's (INT8), in the background."""
    from pipelines.core.types import ModelChoice
    from pipelines.speech.live_stream import LIVE_PRECISION

    with running(["--preload", "words", "--model", str(tiny_whisper_hf), "--models-dir", str(models_dir)]) as server:
        deadline = time.monotonic() + 600
        while server.preload.state == "loading":
            assert time.monotonic() < deadline, "preload did not finish"
            time.sleep(0.5)
        assert server.preload.state == "ready", server.preload.error
        whisper = server.services.whisper
        choice = ModelChoice(str(tiny_whisper_hf))
        assert whisper.is_loaded(choice) and whisper.is_loaded(choice, words=True)
        assert whisper.is_loaded(ModelChoice(str(tiny_whisper_hf), LIVE_PRECISION), words=True)
