"""Live captions with the real bundled Whisper base (slow): the Speech tab's stream handler fed a spoken
clip the way Chrome sends it, a silent stream, two streams and a file transcription at once.

The handler answers each chunk at once and decodes on a worker thread; these tests feed the chunks as
fast as the machine allows (waiting for a running decode, as real time would give it), so the bookkeeping
sees the same sequence of decodes whatever the load.
"""
from __future__ import annotations

import html
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import normalised_words, word_error_rate
from pipelines.core.types import ModelChoice
from pipelines.speech.audio import load_audio
from pipelines.speech.catalogue import DEFAULT_MODEL
from pipelines.speech.types import TranscribeOptions

pytestmark = pytest.mark.slow
SR = 16000


def chrome_chunks(audio: np.ndarray, seconds: float) -> list[tuple[int, np.ndarray]]:
    """16 kHz float audio as Chrome's microphone stream gives it: 48 kHz int16 chunks."""
    wide = np.repeat(audio, 3)  # 48 kHz (a sample-and-hold upsampling; the stream resampler filters it)
    pcm = (np.clip(wide, -1, 1) * 32767).astype(np.int16)
    step = int(seconds * 48000)
    return [(48000, pcm[k:k + step]) for k in range(0, pcm.size, step)]


def captions_text(stream) -> str:
    return stream.captions().confirmed


@pytest.fixture(scope="module")
def paragraph(speech_clips):
    """The paragraph's first 30 s of speech, with its 2 s of silence before and 1 s after."""
    clip = speech_clips["english_long"]
    audio = load_audio(clip["path"])
    audio = np.concatenate([audio[: 32 * SR], np.zeros(SR, np.float32)])
    return audio, " ".join(clip["text"].split()[:78])


@pytest.mark.parametrize("chunk, language", [(0.5, "en"), (1.0, "auto")])
def test_stream_handler_on_real_speech(services, paragraph, chunk, language):
    """Confirmed text only grows and shows while the speech goes on; on stop, the whole text is within
    1 WER point of the same clip transcribed as a file, with segments and the four download files."""
    from ui.live_captions import make_live_handlers

    audio, reference = paragraph
    on_chunk, on_stop, _ = make_live_handlers(services)
    stream, history, pages = None, [], []
    for data in chrome_chunks(audio, chunk):
        stream, page = on_chunk(data, stream, DEFAULT_MODEL, "fp16", "CPU", "transcribe", language)
        stream.settle(30)
        history.append(captions_text(stream))
        pages.append(page)
    assert all(after.startswith(before) for before, after in zip(history, history[1:]))
    assert len(normalised_words(history[len(history) // 2]).split()) >= 15  # captions while speaking
    assert any("live-tentative'>" in p and "live-tentative'></span>" not in p for p in pages)  # a tentative tail
    live_text = history[-1]
    _, page, text, detected, segments, files = on_stop(stream, progress=lambda *a, **k: None)
    file_text = services.whisper.transcribe(audio, ModelChoice(DEFAULT_MODEL), TranscribeOptions()).text
    wer = {name: word_error_rate(reference, t) for name, t in (("live", live_text), ("final", text), ("file", file_text))}
    print(f"chunk {chunk} s: WER {wer}\nlive:  {live_text}\nfinal: {text}")
    assert wer["final"] <= wer["file"] + 0.01 and detected == "en"
    assert wer["live"] <= 0.2  # the captions themselves are a preview (README: about twice the file's WER)
    assert segments and float(segments[-1][1]) <= audio.size / SR + 0.1
    assert sorted(Path(f).suffix for f in files) == [".json", ".srt", ".txt", ".vtt"]
    assert html.escape(text) in page  # the captions end as the whole text


def test_a_silent_stream_gives_no_text(services):
    from ui.live_captions import make_live_handlers

    on_chunk, on_stop, _ = make_live_handlers(services)
    rng = np.random.default_rng(1)
    quiet = np.concatenate([np.zeros(6 * SR, np.float32), (rng.standard_normal(8 * SR) * 0.003).astype(np.float32)])
    stream = None
    for data in chrome_chunks(quiet, 0.5):
        stream, _ = on_chunk(data, stream, DEFAULT_MODEL, "fp16", "CPU", "transcribe", "auto")
        stream.settle(10)
    assert stream.state.decodes == 0 and captions_text(stream) == ""
    _, _, text, _, segments, _ = on_stop(stream, progress=lambda *a, **k: None)
    assert text == "" and segments == []


def test_two_streams_and_a_file_transcription_at_once(services, speech_clips, tmp_path):
    """An English and a German stream in real time, and a file transcription, all at once: each stream gets
    its own words and language, the file is transcribed meanwhile (live decodes have their own slot)."""
    from pipelines.speech.live_stream import live_config

    english = load_audio(speech_clips["english_long"]["path"])[: 20 * SR]
    german = load_audio(speech_clips["german"]["path"])
    results: dict = {}

    def stream(name, audio, language, folder):
        folder.mkdir()
        live_stream = services.live.open(ModelChoice(DEFAULT_MODEL, "int8"), live_config("transcribe", language), folder)
        start = time.monotonic()
        for k in range(0, audio.size, SR // 2):
            time.sleep(max(0.0, start + (k + SR // 2) / SR - time.monotonic()))
            live_stream.push(audio[k:k + SR // 2])
        results[name] = (live_stream.end(), live_stream.captions())
        live_stream.close()

    def file():
        time.sleep(3)
        results["file"] = services.whisper.transcribe(english, ModelChoice(DEFAULT_MODEL), TranscribeOptions())

    threads = [threading.Thread(target=stream, args=("en", english, "en", tmp_path / "en")),
               threading.Thread(target=stream, args=("de", german, "auto", tmp_path / "de")),
               threading.Thread(target=file)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    (en, _), (de, _) = results["en"], results["de"]
    print(f"en: {en.text}\nde: {de.text}\nfile: {results['file'].text}")
    assert en.language == "en" and {"history", "riders", "pedals"} & set(normalised_words(en.text).split()), en.text
    assert de.language == "de" and {"morgen", "wetter", "park"} & set(normalised_words(de.text).split()), de.text
    assert not {"bicycle", "history"} & set(normalised_words(de.text).split())
    assert not {"morgen", "wetter"} & set(normalised_words(en.text).split())
    assert "history" in results["file"].text.lower()
