"""Live captions (issue #21): the stream bookkeeping with a decoder that knows the words (fast), and the
real bundled Whisper base through the runner and the Speech tab's stream handler (slow).

The fast tests speak the paragraph with espeak (tests/spoken_words.py gives each word's start and end)
and decode with :class:`KnowingEngine`: it "hears" exactly the words wholly inside the audio it gets
and mishears the one cut at its end, so what is checked is the bookkeeping (what gets confirmed, when,
the buffer, the VAD), not Whisper. The VAD is the real Silero model.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from conftest import SPEECH_CLIPS, word_error_rate
from pipelines.speech import live
from pipelines.speech.audio import StreamResampler
from spoken_words import word_times

SR = 16000


@pytest.fixture(scope="module")
def spoken():
    """The paragraph's first 40 words, 1 s of silence before, 2 s after; word times in stream seconds."""
    clip = SPEECH_CLIPS["english_long"]
    text = " ".join(clip["text"].split()[:40])
    audio, words = word_times(text, clip["voice"], clip["speed"])
    for w in words:
        w["start"] += 1.0
        w["end"] += 1.0
    return np.concatenate([np.zeros(SR, np.float32), audio, np.zeros(2 * SR, np.float32)]), words, text


class KnowingEngine:
    """Hears the words wholly inside the decoded audio; the one cut at its end comes out misheard."""

    def __init__(self, words, seconds: float = 0.0):
        self.words, self.seconds, self.calls = words, seconds, 0

    def decode(self, job: live.DecodeJob) -> live.Hypothesis:
        self.calls += 1
        time.sleep(self.seconds)
        end = job.start + job.audio.size / SR
        heard = [live.TimedWord(w["word"], w["start"] - job.start, w["end"] - job.start) for w in self.words
                 if w["start"] >= job.start - 0.05 and w["end"] <= end]
        heard += [live.TimedWord("xx" + w["word"][:2], w["start"] - job.start, end - job.start) for w in self.words
                  if w["start"] < end < w["end"]][:1]
        return live.Hypothesis(words=heard, language="en", seconds=self.seconds)


def feed_in_chunks(state, engine, audio, chunk):
    history = []
    for k in range(0, audio.size, int(chunk * SR)):
        live.step(state, audio[k:k + int(chunk * SR)], engine)
        history.append(state.confirmed_text())
    return history


@pytest.mark.parametrize("chunk", [0.5, 1.0])
@pytest.mark.parametrize("trim_after", [0.0, 10.0])
def test_confirmed_text_only_grows_and_ends_complete(spoken, chunk, trim_after):
    audio, words, text = spoken
    state = live.LiveState(config=live.LiveConfig(trim_after=trim_after, language="en"))
    engine = KnowingEngine(words)
    history = feed_in_chunks(state, engine, audio, chunk)
    assert all(after.startswith(before) for before, after in zip(history, history[1:]))
    assert history[len(history) // 2]  # words are confirmed while the speech goes on, not only at the end
    live.flush(state, engine)
    transcript = live.transcript_of(state)
    assert word_error_rate(text, transcript.text) == 0.0 and "xx" not in transcript.text, transcript.text
    assert transcript.segments[0].start >= 0.9 and transcript.segments[-1].end <= audio.size / SR
    assert transcript.language == "en"


def test_a_word_is_confirmed_once_two_decodes_agree_on_it(spoken):
    """LocalAgreement-2: the first decode confirms nothing, the words two decodes share are confirmed; the
    misheard word at the cut is only ever tentative."""
    audio, words, _ = spoken
    state = live.LiveState(config=live.LiveConfig(language="en"))
    engine = KnowingEngine(words)
    confirmed_after = []
    for k in range(0, 6 * SR, SR):
        live.step(state, audio[k:k + SR], engine)
        confirmed_after.append((engine.calls, len(state.confirmed), state.tentative_text()))
    first_decode = next(c for c in confirmed_after if c[0] == 1)
    assert first_decode[1] == 0 and first_decode[2]
    assert confirmed_after[-1][1] > 0
    assert all("xx" not in w.text for w in state.confirmed)


def test_silence_and_noise_are_never_decoded_nor_kept():
    rng = np.random.default_rng(0)
    for audio in (np.zeros(20 * SR, np.float32), (rng.standard_normal(20 * SR) * 0.003).astype(np.float32)):
        state = live.LiveState()
        engine = KnowingEngine([])
        for k in range(0, audio.size, SR // 2):
            live.step(state, audio[k:k + SR // 2], engine)
            assert state.buffer.size <= 1.5 * SR
        live.flush(state, engine)
        assert engine.calls == 0 and live.transcript_of(state).text == ""


def test_language_auto_waits_for_two_seconds_of_speech(spoken):
    audio, words, _ = spoken
    state = live.LiveState()  # language auto
    engine = KnowingEngine(words)
    live.step(state, audio[: int(2.5 * SR)], engine)  # 1.5 s of speech
    assert engine.calls == 0
    live.step(state, audio[int(2.5 * SR): 4 * SR], engine)
    assert engine.calls == 1


def test_a_half_hour_stream_runs_in_bounded_memory(spoken, tmp_path):
    """30 minutes of speech (the clip over and over): the buffer never holds more than 30 s, the VAD keeps
    probabilities of the held audio only, the transcript keeps growing, the recording goes to disk."""
    audio, words, _ = spoken
    seconds = audio.size / SR
    repeats = int(np.ceil(1800 / seconds))
    all_words = [dict(w, start=w["start"] + r * seconds, end=w["end"] + r * seconds)
                 for r in range(repeats) for w in words]
    state = live.LiveState(config=live.LiveConfig(language="en"), record_path=str(tmp_path / "rec.pcm"))
    engine = KnowingEngine(all_words)
    largest = 0
    for r in range(repeats):
        for k in range(0, audio.size, 2 * SR):
            live.step(state, audio[k:k + 2 * SR], engine)
            largest = max(largest, state.buffer.size, state.probs.size * 512)
    live.flush(state, engine)
    assert state.end >= 1800 and largest <= 30 * SR
    assert len(state.confirmed) >= 0.98 * len(all_words)
    assert (tmp_path / "rec.pcm").stat().st_size == 2 * state.received


def test_the_stream_resampler_is_continuous_across_chunks():
    """Chrome sends 48 kHz int16 chunks: resampled one after the other they make the same 16 kHz signal
    as the whole recording resampled at once (no clicks or gaps at chunk edges)."""
    t = np.arange(48000 * 3) / 48000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    resample = StreamResampler()
    out = np.concatenate([resample(48000, tone[k:k + 24000]) for k in range(0, tone.size, 24000)])
    reference = 0.5 * np.sin(2 * np.pi * 440 * np.arange(out.size) / 16000)
    assert abs(out.size - 48000) <= 32
    assert np.abs(out[1000:-100] - reference[1000:-100]).max() < 1e-3
    assert resample(16000, tone[:1600]).size == 1600 and resample(48000, tone[:0]).size == 0


# --------------------------------------------------------------------------- the runner
class HeldEngine(KnowingEngine):
    """A KnowingEngine whose decodes wait until the test lets them go (a decoder slower than real time)."""

    def __init__(self, words, fail_with: Exception | None = None):
        super().__init__(words)
        self.go, self.jobs, self.fail_with = threading.Event(), [], fail_with
        self.choice = type("Choice", (), {"model": "knowing"})()

    def ready(self, task, language, progress=None):
        if self.fail_with is not None:
            raise self.fail_with

    def decode(self, job):
        self.jobs.append(job)
        assert self.go.wait(30), "the test never let the decode go"
        return super().decode(job)


@pytest.fixture
def live_service(services):
    from pipelines.speech.live_stream import LiveService

    return LiveService(services.whisper, max_streams=2, max_seconds=120.0)


def open_stream(live_service, engine, folder, **config):
    from pipelines.core.types import ModelChoice

    folder.mkdir(exist_ok=True)
    return live_service.open(ModelChoice("knowing"), live.LiveConfig(language="en", **config), folder, engine=engine)


def test_chunks_never_wait_for_the_decoder_and_pile_up_into_the_next_decode(spoken, live_service, tmp_path):
    """While a decode hangs, every chunk is still taken (the handler answers at once) and the captions say
    the stream is behind; the next decode hears all the audio that came meanwhile (merged, not queued)."""
    audio, words, text = spoken
    engine = HeldEngine(words)
    stream = open_stream(live_service, engine, tmp_path)
    chunks = [audio[k:k + SR // 2] for k in range(0, audio.size, SR // 2)]
    for chunk in chunks[:14]:  # 7 s: the first decode starts after 1 s of speech and hangs
        stream.push(chunk)
    assert stream.state.received == 14 * (SR // 2) and len(engine.jobs) == 1
    captions = stream.captions()
    assert captions.status == "behind" and "catching up" in captions.message and captions.behind > 3
    stream.settle(0.05)  # a hanging decode: settle gives up after its timeout
    engine.go.set()
    stream.settle(10)
    deadline = time.monotonic() + 10
    while len(engine.jobs) < 2 and time.monotonic() < deadline:
        stream.settle(0.1)
    assert engine.jobs[1].end - engine.jobs[0].end >= 5.0  # one decode for the piled-up chunks
    for chunk in chunks[14:]:
        stream.push(chunk)
        stream.settle(5)
    transcript = stream.finish(refine=False)
    assert word_error_rate(text, transcript.text) == 0.0, transcript.text
    assert not (tmp_path / "recording.pcm").exists()  # the recording goes with the stream


def test_a_stream_that_cannot_start_says_why(live_service, tmp_path):
    from pipelines.core.errors import Refused

    stream = open_stream(live_service, HeldEngine([], fail_with=Refused("Language 'xx' is not one Whisper knows.")),
                         tmp_path)
    stream.settle(5)
    deadline = time.monotonic() + 10
    while stream.captions().status == "loading" and time.monotonic() < deadline:
        stream.settle(0.1)
    assert stream.captions().status == "error" and "not one Whisper knows" in stream.captions().message
    with pytest.raises(Refused, match="not one Whisper knows"):
        stream.finish()


def test_at_most_max_streams_are_open_at_once(live_service, tmp_path):
    from pipelines.core.errors import Refused

    engine = HeldEngine([])
    engine.go.set()
    first, second = open_stream(live_service, engine, tmp_path / "a"), open_stream(live_service, engine, tmp_path / "b")
    with pytest.raises(Refused, match="already runs 2 live caption streams"):
        open_stream(live_service, engine, tmp_path)
    first.finish(refine=False)
    third = open_stream(live_service, engine, tmp_path)
    assert live_service.open_streams() == 2
    second.close(), third.close()


# --------------------------------------------------------------------------- the Speech tab's handlers
def test_live_mode_handlers_stream_render_and_finish(services, tiny_whisper_hf, english_clip):
    """The Live mode's handlers on the tiny random Whisper (nonsense text, real path): each chunk answers at
    once with the captions as HTML (confirmed and tentative in their own spans), a new recording starts a
    new stream, stop gives the whole text, segments and the four download files, and the page's state is
    the stream (nothing kept elsewhere)."""
    from pathlib import Path

    from pipelines.speech.audio import load_audio
    from ui.live_captions import make_live_handlers, render

    on_chunk, on_stop, on_start = make_live_handlers(services)
    pcm = (np.repeat(load_audio(english_clip), 3) * 32767).astype(np.int16)  # 48 kHz, as Chrome sends it
    stream = None
    for k in range(0, pcm.size, 4800):  # 0.1 s chunks
        stream, page = on_chunk((48000, pcm[k:k + 4800]), stream, str(tiny_whisper_hf), "fp16", "CPU",
                                "transcribe", "en")
        assert "class='live-confirmed'" in page and "class='live-tentative'" in page
    assert stream.state.received + sum(s.size for s in stream._waiting) == pytest.approx(pcm.size / 3, abs=64)
    cleared = on_start(stream)
    assert cleared[0] is None and cleared[2] == "" and not Path(stream.state.record_path).exists()
    stream = None
    for k in range(0, pcm.size, 24000):
        stream, _ = on_chunk((48000, pcm[k:k + 24000]), stream, str(tiny_whisper_hf), "fp16", "CPU", "transcribe", "en")
    state, page, text, language, segments, files = on_stop(stream, progress=lambda *a, **k: None)
    assert state is None and language == "en" and isinstance(text, str)
    assert sorted(Path(f).suffix for f in files) == [".json", ".srt", ".txt", ".vtt"]
    assert all(Path(f).parent == stream.folder for f in files)
    assert not Path(stream.state.record_path).exists()
    from pipelines.speech.live_stream import Captions

    shown = render(Captions("<b>said</b>", "maybe", "en", 3.0, 0.0, "listening", ""))
    assert "&lt;b&gt;said&lt;/b&gt;" in shown and "<span class='live-tentative'>maybe</span>" in shown
