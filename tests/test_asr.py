"""WhisperService on the tiny random model: structure, timestamps, load-once, errors."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from pipelines.speech.service import TranscriptionRefused, WhisperService
from pipelines.speech.audio import AudioError, load_audio
from pipelines.core.types import ModelChoice
from pipelines.speech.types import TranscribeOptions


@pytest.fixture(scope="module")
def service(whisper_store):
    return WhisperService(whisper_store, max_loaded=2)


@pytest.fixture(scope="module")
def choice(tiny_whisper_hf):
    return ModelChoice(model=str(tiny_whisper_hf), precision="fp16", device="CPU")


def test_transcript_structure(service, choice, english_clip):
    audio = load_audio(english_clip)
    transcript = service.transcribe(audio, choice, TranscribeOptions(language="en", timestamps=True))
    assert isinstance(transcript.text, str)
    assert transcript.duration == pytest.approx(audio.size / 16000, abs=0.01)
    assert transcript.model == choice.model and transcript.task == "transcribe"
    assert transcript.language == "en"  # a language forced by the user is reported back
    for seg in transcript.segments:
        assert 0.0 <= seg.start <= seg.end <= transcript.duration
    starts = [s.start for s in transcript.segments]
    assert starts == sorted(starts)


def test_language_detection_reports_a_whisper_language(service, choice, english_clip):
    from pipelines.speech.catalogue import LANGUAGES

    transcript = service.transcribe(load_audio(english_clip), choice, TranscribeOptions())
    assert transcript.language in LANGUAGES  # random weights: any language, but a real code


def test_long_audio_is_transcribed_whole_with_timestamps_across_it(service, choice, english_clip):
    clip = load_audio(english_clip)
    audio = np.concatenate([clip, np.zeros(16000, np.float32)] * 14)  # ~70 s
    transcript = service.transcribe(audio, choice, TranscribeOptions(language="en"))
    assert transcript.duration > 60
    assert transcript.segments, "long audio gave no segments"
    assert max(s.end for s in transcript.segments) > 30.0, "timestamps stop at the first 30 s window"
    assert all(s.end <= transcript.duration for s in transcript.segments)


def test_timestamps_off_gives_text_without_segments(service, choice, english_clip):
    transcript = service.transcribe(load_audio(english_clip), choice,
                                    TranscribeOptions(language="en", timestamps=False))
    assert transcript.segments == ()


def record_compiles(monkeypatch) -> list[bool]:
    """Each pipeline WhisperService compiles from now on, as whether it has word timestamps."""
    compiled: list[bool] = []
    original = WhisperService._compile
    monkeypatch.setattr(WhisperService, "_compile",
                        lambda self, resolved, device, words: compiled.append(words)
                        or original(self, resolved, device, words))
    return compiled


def test_model_loads_once_under_concurrent_requests(whisper_store, choice, english_clip, monkeypatch):
    service = WhisperService(whisper_store)
    compiled = record_compiles(monkeypatch)
    audio = load_audio(english_clip)
    results, errors = [], []

    def run(lang):
        try:
            results.append(service.transcribe(audio, choice, TranscribeOptions(language=lang)).language)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(lang,)) for lang in ("en", "de", "es", "fr")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(compiled) == 1
    assert sorted(results) == ["de", "en", "es", "fr"]  # each request kept its own language


def test_loaded_models_are_bounded(whisper_store, choice, tiny_whisper_hf, tiny_whisper_ir):
    service = WhisperService(whisper_store, max_loaded=1)
    service.load(choice)
    service.load(ModelChoice(model=str(tiny_whisper_ir), device="CPU"))
    assert service.loaded_keys() == [(str(tiny_whisper_ir), "fp16", "CPU")]


def test_word_timestamps_get_a_pipeline_of_their_own(whisper_store, choice, english_clip, monkeypatch):
    """GenAI's word-timestamp pipeline decomposes the decoder's cross-attention, which slows every request it
    serves; so only requests that ask for words use it, and the others a plain pipeline, each compiled once."""
    service = WhisperService(whisper_store)
    compiled = record_compiles(monkeypatch)
    audio = load_audio(english_clip)
    service.transcribe(audio, choice, TranscribeOptions(language="en"))
    assert compiled == [False] and service.is_loaded(choice) and not service.is_loaded(choice, words=True)
    service.transcribe(audio, choice, TranscribeOptions(language="en", word_timestamps=True))
    service.transcribe(audio, choice, TranscribeOptions(language="en"))
    service.transcribe(audio, choice, TranscribeOptions(language="en", word_timestamps=True))
    assert compiled == [False, True] and service.is_loaded(choice, words=True)
    assert service.loaded_keys() == [(choice.model, "fp16", "CPU")]  # one model, listed once

    plain, worded = service.load(choice), service.load(choice, words=True)
    config = plain.pipeline.get_generation_config()
    config.word_timestamps, config.return_timestamps = True, False
    with pytest.raises(Exception, match="not decomposed"):  # the plain pipeline's attention stays fused
        plain.pipeline.generate(np.zeros(16000, np.float32), generation_config=config)
    worded.pipeline.generate(np.zeros(16000, np.float32), generation_config=config)


def test_a_model_without_alignment_heads_serves_word_requests_with_its_plain_pipeline(
        whisper_store, tiny_whisper_ir, english_clip, tmp_path, monkeypatch):
    import json
    import shutil

    folder = tmp_path / "no-heads"
    shutil.copytree(tiny_whisper_ir, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    del config["alignment_heads"]
    (folder / "generation_config.json").write_text(json.dumps(config))
    service = WhisperService(whisper_store)
    compiled = record_compiles(monkeypatch)
    choice = ModelChoice(model=str(folder), device="CPU")
    audio = load_audio(english_clip)
    words = service.transcribe(audio, choice, TranscribeOptions(language="en", word_timestamps=True))
    service.transcribe(audio, choice, TranscribeOptions(language="en"))
    assert compiled == [False] and service.is_loaded(choice, words=True)
    assert all(not s.words for s in words.segments)  # no words to give, and no error


def test_a_model_unloaded_while_a_request_runs_on_it_is_taken_back_not_compiled_twice(
        whisper_store, choice, tiny_whisper_ir, monkeypatch):
    import gc

    service = WhisperService(whisper_store, max_loaded=1)
    compiled = record_compiles(monkeypatch)
    other = ModelChoice(model=str(tiny_whisper_ir), device="CPU")
    running = service.load(choice)  # a long subtitle job holds it ...
    service.load(other)  # ... while another request's model takes its place
    assert service.loaded_keys() == [(other.model, "fp16", "CPU")]
    assert service.load(choice) is running and len(compiled) == 2  # taken back, not compiled again
    assert service.loaded_keys() == [(choice.model, "fp16", "CPU")]  # and the limit still holds

    service.release()  # "free memory" while the job still runs: freed when it ends
    assert service.loaded_keys() == [] and service.load(choice) is running
    service.release()
    del running
    gc.collect()
    service.load(choice)  # nobody held it any more: it was really freed
    assert len(compiled) == 3


@pytest.mark.parametrize("model", ["bundled/whisper-tiny.en", "openai/whisper-base.en",
                                   "openai/whisper-large-v3-turbo"])
def test_translate_on_a_model_that_cannot_is_refused_before_loading(service, model):
    with pytest.raises(TranscriptionRefused, match="(English-only|transcription only)"):
        service.transcribe(np.zeros(16000, np.float32), ModelChoice(model=model),
                           TranscribeOptions(task="translate"))


def test_unknown_language_and_device_are_refused(service, choice):
    with pytest.raises(TranscriptionRefused, match="not one Whisper knows"):
        service.transcribe(np.zeros(16000, np.float32), choice, TranscribeOptions(language="xx"))
    with pytest.raises(ValueError, match="Device 'TPU' is not available"):
        service.transcribe(np.zeros(16000, np.float32), ModelChoice(choice.model, device="TPU"))


def test_empty_and_non_audio_files_are_explained(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match="empty"):
        load_audio(empty)
    text = tmp_path / "notes.mp3"
    text.write_text("this is not audio at all\n" * 50)
    with pytest.raises(AudioError, match="not a readable audio"):
        load_audio(text)
    silence = tmp_path / "tiny.wav"
    from conftest import write_wav

    write_wav(silence, np.zeros(100, np.float32))
    with pytest.raises(AudioError, match="no audio"):
        load_audio(silence)


def test_too_long_audio_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    """The length limit holds before decoding (header) and, for streams that state no length, while decoding."""
    from conftest import write_wav

    from pipelines.speech import audio

    long_wav = tmp_path / "long.wav"
    write_wav(long_wav, np.full(200 * 16000, 0.01, np.float32))  # 3 min 20 s
    decoded = []
    real_iter = audio.iter_audio
    monkeypatch.setattr(audio, "iter_audio", lambda *a, **k: (decoded.append(p) or p for p in real_iter(*a, **k)))
    with pytest.raises(AudioError, match="is 3 minutes long; this server accepts up to 60 seconds"):
        load_audio(long_wav, max_seconds=60)
    assert decoded == []  # refused from the header, nothing decoded

    monkeypatch.setattr(audio, "duration_of", lambda path: 0.0)  # a stream that does not state its length
    with pytest.raises(AudioError, match="more than 60 seconds long; this server accepts up to 60 seconds"):
        load_audio(long_wav, max_seconds=60)
    assert len(decoded) == 2  # stopped at the first minute-long piece past the limit, not at the end
    assert load_audio(long_wav, max_seconds=300).size == 200 * 16000


def test_decoding_resamples_any_rate_and_format_to_16k_mono(tmp_path, english_clip):
    import subprocess

    stereo = tmp_path / "stereo.ogg"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(english_clip), "-ac", "2", "-ar", "44100",
                    str(stereo)], check=True)
    a, b = load_audio(english_clip), load_audio(stereo)
    assert b.dtype == np.float32 and b.ndim == 1
    assert abs(a.size - b.size) < 16000 * 0.1


def test_each_window_is_conditioned_on_whole_words_of_the_text_before_it(service, choice):
    """The prompt is the end of the text so far, in whole words, within the token limit."""
    from pipelines.speech.decoding import DecodeGuards, make_prompt

    loaded = service.load(choice)
    earlier = [" ".join(f"word{i}," for i in range(300)), "The last sentence before this window."]
    prompt = make_prompt(loaded, earlier, service.guards.prompt_tokens)
    assert prompt.text.endswith("The last sentence before this window.")
    assert prompt.text.split()[0] in earlier[0].split()  # starts on a whole word
    assert 200 <= prompt.tokens <= service.guards.prompt_tokens
    ids = loaded.tokenizer.encode(" " + prompt.text, add_special_tokens=False).input_ids
    assert ids.get_shape()[-1] == prompt.tokens
    assert make_prompt(loaded, [], service.guards.prompt_tokens) is None
    assert make_prompt(loaded, earlier, DecodeGuards(prompt_tokens=0).prompt_tokens) is None


def test_loading_a_model_loads_the_voice_activity_model_too(whisper_store, choice, monkeypatch):
    """The first transcription (and the first run of an FP16/INT8 compare, whose loads are not timed) does
    not pay for loading the VAD model: it is loaded with the Whisper model."""
    from pipelines.speech import vad

    vad._load_vad_model.cache_clear()
    fresh = WhisperService(whisper_store, max_loaded=1)
    fresh.load(choice)
    assert vad._load_vad_model.cache_info().currsize == 1

    def broken():
        raise vad.VadError("The voice activity model could not be loaded (no onnxruntime).")

    monkeypatch.setattr(vad, "load_vad_model", broken)  # a load without VAD still works (vad=False does not need it)
    assert WhisperService(whisper_store, max_loaded=1).load(choice).pipeline is not None


@pytest.mark.parametrize("seconds, limit, expected", [
    (200, 60, "The audio is 3 minutes long; this server accepts up to 60 seconds."),
    (4 * 3600, 3 * 3600, "The audio is 4 hours long; this server accepts up to 3 hours."),
    (4 * 3600 + 20, 3 * 3600, "The audio is 240 minutes long; this server accepts up to 3 hours."),
    (91 * 60, 90 * 60, "The audio is 91 minutes long; this server accepts up to 90 minutes."),
    # so close that rounding would read as the limit: to the second
    (3 * 3600 + 20, 3 * 3600, "The audio is 3:00:20 long; this server accepts up to 3:00:00."),
    (90 * 60 + 10, 90 * 60, "The audio is 1:30:10 long; this server accepts up to 1:30:00."),
    (170, 165, "The audio is 2:50 long; this server accepts up to 2:45."),
    (45.4, 45, "The audio is 0:46 long; this server accepts up to 0:45."),
    (45.9, 45.5, "The audio is 0:46 long; this server accepts up to 0:45."),
    (60, 60, None),
    (None, 60, None),
])
def test_a_length_over_the_limit_never_reads_as_the_limit(seconds, limit, expected):
    from pipelines.speech.audio import too_long

    assert too_long("The audio", seconds, limit) == expected


def test_work_slots_take_turns_say_so_while_waiting_and_are_reentrant():
    from pipelines.core.slots import WorkSlots

    slots = WorkSlots(1, "transcription")
    order, messages = [], []

    def another_request():
        with slots.turn(lambda fraction, message: messages.append(message)):
            order.append("other")

    with slots.turn():
        with slots.turn():  # a compare's runs inside the compare's own slot
            order.append("nested")
        other = threading.Thread(target=another_request)
        other.start()
        _wait_until(lambda: slots.waiting == 1, other)  # it found the slot busy and waits for it
        assert order == ["nested"]
        order.append("first done")
    other.join(10)
    assert order == ["nested", "first done", "other"]
    assert messages == ["waiting for the transcription slot of this server"]


def _wait_until(condition, thread: threading.Thread, timeout: float = 120.0) -> None:
    """Wait (polling) until ``condition()`` holds, failing if ``thread`` ends first or it takes too long."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline and thread.is_alive(), "the condition never held"
        time.sleep(0.02)


def test_a_transcription_decodes_only_in_a_work_slot(whisper_store, choice, english_clip):
    """The model gets ready outside the slots; decoding waits for a free one and says so."""
    service = WhisperService(whisper_store, workers=1)
    audio = load_audio(english_clip)
    messages, results = [], []
    with service.slots.turn():  # another request is decoding
        worker = threading.Thread(target=lambda: results.append(service.transcribe(
            audio, choice, TranscribeOptions(language="en"), lambda fraction, message: messages.append(message))))
        worker.start()
        _wait_until(lambda: service.slots.waiting == 1, worker)  # ready, and waiting for the slot
        assert "waiting for the transcription slot of this server" in messages
        assert service.store.resolve(choice.model, "fp16").path.is_dir()  # ready on disk meanwhile
        assert not results and "find speech" not in messages
    worker.join(120)
    assert len(results) == 1 and results[0].language == "en"
