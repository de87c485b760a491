"""Live captions: Whisper on a growing buffer of streamed audio, LocalAgreement-2, VAD pauses.

Pure bookkeeping around a decoder (anything with ``decode(job) -> Hypothesis``; the real one is
:class:`pipelines.speech.live_stream.LiveEngine`). A stream's whole state is a :class:`LiveState`:
numpy arrays, lists and numbers, no handles, so it can live in the page's ``gr.State``.

One step (times in seconds of the stream):

1. :func:`feed`: append the samples; Silero speech probabilities for the new whole 32 ms frames (the
   VAD's recurrent state is carried in the state); append them to the recording on disk, if any.
2. :func:`plan`: decode only when enough new audio came (``min_new_audio``, or more while the last
   decodes were slow: live decodes take at most ``max_share`` of real time), or as soon as a pause ends
   a stretch of speech (its last words are then confirmed without waiting). No speech held: drop all
   but ``pad`` s, decode nothing (silence, breathing and noise never reach Whisper). Language auto:
   wait for ``min_detect_speech`` s of speech (a short first clip misleads detection).
3. the decoder hears the unconfirmed audio (at most 30 s), prompted with the confirmed words said
   before it; at a pause (``pause`` s of silence after the speech) only up to the speech end.
4. :func:`apply`: the words after the confirmed ones (by time, less a repeat of the confirmed tail);
   at a pause all of them are confirmed and the buffer is cut at the speech end; otherwise the longest
   common word prefix with the previous hypothesis is confirmed (LocalAgreement-2) and the rest is the
   tentative tail. A buffer longer than ``trim_after`` is cut after its last confirmed sentence (the
   confirmed audio before stays as context until then: cutting at every word costs accuracy), one
   longer than ``max_buffer`` with nothing agreed confirms all but its last ``keep_words`` words.

:func:`step` does 1-4 in one call; the live runner does 2-4 on a worker thread while chunks keep
coming (:mod:`pipelines.speech.live_stream`). :func:`finish` decodes the rest and confirms all of it.
Memory is bounded: at most 30 s of samples and their probabilities, the confirmed words, and the
recording on disk (115 MB an hour) for the final file transcription.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Optional, Protocol

import numpy as np

from pipelines.speech.audio import SAMPLE_RATE
from pipelines.speech.decoding import SENTENCE_END, chunks_from_words, looks_degenerate
from pipelines.speech.types import Segment, Transcript, Word
from pipelines.speech.vad import FRAME_SECONDS, FrameStream

MAX_INPUT = 30.0  # Whisper hears at most 30 s


@dataclass(frozen=True)
class TimedWord:
    text: str
    start: float  # seconds (relative to the decoded audio in a Hypothesis, to the stream in a LiveState)
    end: float


@dataclass
class Hypothesis:
    """One decode of the buffer: its words with times relative to the audio decoded."""

    words: list[TimedWord]
    language: Optional[str] = None
    temperature: float = 0.0
    seconds: float = 0.0  # wall time of the decode, waiting for a work slot included


@dataclass(frozen=True)
class DecodeJob:
    """What one decode hears: audio from ``start`` (stream time), the prompt, the language and task."""

    audio: np.ndarray
    start: float
    prompt: str
    language: Optional[str]
    task: str
    at_pause: bool = False  # confirm every word, then cut the buffer at ``cut_at``
    cut_at: float = 0.0
    end: float = 0.0  # stream time of the last sample received when planned


class Engine(Protocol):
    def decode(self, job: DecodeJob) -> Hypothesis: ...


@dataclass(frozen=True)
class LiveConfig:
    """How a stream is decoded (defaults measured: benchmarks/live_bench.py, README "Live captions")."""

    task: str = "transcribe"
    language: Optional[str] = None  # None: the first speech decides, then it is kept
    min_new_audio: float = 1.0  # decode when this much audio came since the last decode ...
    max_share: float = 0.6  # ... or more, so that decoding takes at most this share of real time
    pause: float = 0.5  # silence after speech that confirms everything before it
    decode_at_pause: bool = True  # decode as soon as a pause is heard (not only every min_new_audio) ...
    pause_min_new_audio: float = 0.3  # ... once at least this much audio came since the last decode
    pad: float = 0.3  # audio kept before speech (the first phoneme) and after it at a pause
    prompt_words: int = 40  # confirmed words given as Whisper's prompt (0: none)
    trim_after: float = 10.0  # keep confirmed audio as context until the buffer is this long
    max_buffer: float = 20.0  # a longer buffer with nothing agreed is force-confirmed
    keep_words: int = 2  # words left unconfirmed at a forced confirmation
    min_detect_speech: float = 2.0  # language auto: no decode before this much speech
    vad_threshold: float = 0.5
    min_speech: float = 0.25  # shorter VAD bursts are no speech


def _zeros() -> np.ndarray:
    return np.zeros(0, np.float32)


@dataclass
class LiveState:
    """One stream: the unconfirmed samples, the confirmed words, the last hypothesis, the VAD's state."""

    config: LiveConfig = field(default_factory=LiveConfig)
    buffer: np.ndarray = field(default_factory=_zeros)
    buffer_start: float = 0.0  # stream time of buffer[0]
    received: int = 0  # samples received in all
    decoded_at: int = 0  # ``received`` when the last decode was planned
    decoded_end: float = 0.0  # stream time up to which a finished decode has heard
    confirmed: list[TimedWord] = field(default_factory=list)
    previous: list[TimedWord] = field(default_factory=list)  # the last hypothesis' unconfirmed words
    tentative: list[TimedWord] = field(default_factory=list)
    language: Optional[str] = None  # fixed with the first confirmed words
    last_language: Optional[str] = None
    vad: FrameStream = field(default_factory=FrameStream)
    probs: np.ndarray = field(default_factory=_zeros)  # speech probability per frame of the held audio
    probs_first: int = 0  # stream frame index of probs[0]
    last_step_seconds: float = 0.0
    decodes: int = 0
    decode_seconds: float = 0.0
    loops: int = 0
    finished: bool = False
    record_path: Optional[str] = None  # the whole recording, 16-bit PCM without a header (None: not kept)

    @property
    def end(self) -> float:
        return self.received / SAMPLE_RATE

    @property
    def behind(self) -> float:
        """Seconds of received audio no finished decode has heard yet."""
        return max(0.0, self.end - max(self.decoded_end, self.buffer_start))

    def confirmed_text(self) -> str:
        return " ".join(w.text for w in self.confirmed)

    def tentative_text(self) -> str:
        return " ".join(w.text for w in self.tentative)


# --------------------------------------------------------------------------------- audio and VAD
def feed(state: LiveState, samples: np.ndarray) -> None:
    """Append 16 kHz mono samples: to the buffer, the VAD, and the recording on disk."""
    samples = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
    if not samples.size:
        return
    state.buffer = np.concatenate((state.buffer, samples)) if state.buffer.size else samples.copy()
    state.received += samples.size
    state.probs = np.concatenate((state.probs, state.vad.feed(samples)))
    if state.record_path:
        with open(state.record_path, "ab") as fh:
            fh.write((np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes())


def speech_spans(state: LiveState) -> list[tuple[float, float]]:
    """Speech regions (stream seconds) in the held audio, by Silero's rules: speech starts at
    p >= threshold and ends after 100 ms below threshold - 0.15; bursts shorter than ``min_speech``
    are dropped. A region still open runs to the end of the analysed frames."""
    on, off = state.config.vad_threshold, state.config.vad_threshold - 0.15
    min_silence = int(round(0.1 / FRAME_SECONDS))
    spans: list[tuple[int, int]] = []
    speaking, start, below = False, 0, 0
    for k, p in enumerate(state.probs):
        if not speaking and p >= on:
            speaking, start, below = True, k, 0
        elif speaking:
            below = below + 1 if p < off else 0
            if below >= min_silence:
                spans.append((start, k - below + 1))
                speaking = False
    if speaking:
        spans.append((start, len(state.probs) - below))
    first = state.probs_first
    timed = [((first + s) * FRAME_SECONDS, (first + e) * FRAME_SECONDS) for s, e in spans]
    return [(max(s, state.buffer_start), e) for s, e in timed
            if e - s >= state.config.min_speech and e - max(s, state.buffer_start) >= 0.1]


def _analysed_end(state: LiveState) -> float:
    return (state.probs_first + len(state.probs)) * FRAME_SECONDS


def _cut(state: LiveState, at: float) -> None:
    """Drop buffered audio (and its speech probabilities) before stream time ``at``."""
    at = min(max(at, state.buffer_start), state.end)
    drop = int(round((at - state.buffer_start) * SAMPLE_RATE))
    if drop <= 0:
        return
    state.buffer = state.buffer[drop:].copy()
    state.buffer_start += drop / SAMPLE_RATE
    first_frame = int(state.buffer_start / FRAME_SECONDS)
    if first_frame > state.probs_first:
        state.probs = state.probs[first_frame - state.probs_first:].copy()
        state.probs_first = first_frame


# --------------------------------------------------------------------------------- planning
def due(state: LiveState) -> bool:
    """Whether enough new audio came for a decode (more while decodes are slow: ``max_share``), or a
    pause just ended a stretch of speech no decode has heard to its end (its words are confirmed at once)."""
    config = state.config
    new = (state.received - state.decoded_at) / SAMPLE_RATE
    if new >= max(config.min_new_audio, state.last_step_seconds / max(config.max_share, 1e-3)):
        return True
    if not config.decode_at_pause or new < config.pause_min_new_audio:
        return False
    spans = speech_spans(state)
    return bool(spans) and spans[-1][1] > state.decoded_end and _analysed_end(state) - spans[-1][1] >= config.pause


def plan(state: LiveState, force: bool = False) -> Optional[DecodeJob]:
    """The next decode, or None (not due, no speech, or too little speech to detect the language).
    ``force``: decode whatever speech is held and confirm all of it (the end of the stream)."""
    config = state.config
    if not force and not due(state):
        return None
    spans = speech_spans(state)
    state.decoded_at = state.received
    if not spans:
        state.tentative, state.previous = [], []
        _cut(state, state.end - config.pad)  # silence is not kept
        state.decoded_end = state.end
        return None
    if spans[0][0] - config.pad > state.buffer_start:
        _cut(state, spans[0][0] - config.pad)  # nor the silence before the speech
    if state.end - state.buffer_start > MAX_INPUT:
        _cut(state, state.end - MAX_INPUT)  # far behind (a slow start, a busy server): the captions skip ahead
    language = state.language or (config.language if config.language not in (None, "", "auto") else None)
    if language is None and not force and sum(e - s for s, e in spans) < config.min_detect_speech:
        return None
    speech_end = spans[-1][1]
    at_pause = force or _analysed_end(state) - speech_end >= config.pause
    stop = state.end if force or not at_pause else min(state.end, speech_end + config.pad)
    audio = state.buffer[: int(round((stop - state.buffer_start) * SAMPLE_RATE))].copy()
    return DecodeJob(audio=audio, start=state.buffer_start, prompt=_prompt(state), language=language,
                     task=config.task, at_pause=at_pause, cut_at=state.end if force else speech_end, end=state.end)


def _prompt(state: LiveState) -> str:
    """The last ``prompt_words`` confirmed words said before the buffer (those inside it are heard)."""
    n = state.config.prompt_words
    k = len(state.confirmed)
    while k and state.confirmed[k - 1].end > state.buffer_start + 0.05:
        k -= 1
    return " ".join(w.text for w in state.confirmed[max(0, k - n):k]) if n > 0 else ""


# --------------------------------------------------------------------------------- confirming
_NOT_WORD = re.compile(r"[^\w']+", re.UNICODE)


def norm(word: str) -> str:
    """A word as hypotheses are compared: lower case, no punctuation."""
    return _NOT_WORD.sub("", word.lower())


def common_prefix(a: list[TimedWord], b: list[TimedWord]) -> int:
    n = 0
    while n < len(a) and n < len(b) and norm(a[n].text) == norm(b[n].text):
        n += 1
    return n


def _last_confirmed_end(state: LiveState) -> float:
    if state.confirmed and state.confirmed[-1].end > state.buffer_start:
        return state.confirmed[-1].end
    return state.buffer_start


def _new_words(state: LiveState, words: list[TimedWord]) -> list[TimedWord]:
    """The words after the confirmed ones: those starting after the last confirmed word's end - 0.1 s,
    less a 1-5 word repeat of the confirmed tail at their start (a word cut in two, or the prompt said again)."""
    boundary = _last_confirmed_end(state)
    if boundary > state.buffer_start:
        words = [w for w in words if w.start > boundary - 0.1]
    if not words or not state.confirmed or words[0].start > boundary + 1.0:
        return words
    tail = [norm(w.text) for w in state.confirmed[-5:]]
    head = [norm(w.text) for w in words[:5]]
    for n in range(min(len(tail), len(head)), 0, -1):
        if tail[-n:] == head[:n]:
            return words[n:]
    return words


def _confirm(state: LiveState, words: list[TimedWord]) -> list[TimedWord]:
    words = [w for w in words if norm(w.text)]
    if words and state.language is None and state.last_language:
        state.language = state.last_language  # one language per stream, fixed with its first words
    state.confirmed.extend(words)
    return words


def apply(state: LiveState, job: DecodeJob, hypothesis: Hypothesis) -> list[TimedWord]:
    """Take a decode's words into the state; returns the words it confirmed."""
    config = state.config
    state.decodes += 1
    state.decode_seconds += hypothesis.seconds
    state.last_step_seconds = hypothesis.seconds
    state.last_language = hypothesis.language or state.last_language
    state.decoded_end = max(state.decoded_end, job.start + job.audio.size / SAMPLE_RATE)
    words = _new_words(state, [TimedWord(w.text, job.start + w.start, job.start + w.end) for w in hypothesis.words])
    if words and looks_degenerate(" ".join(w.text for w in words)):  # a loop the fallback did not clear
        state.loops += 1
        words = []
    if job.at_pause:
        new = _confirm(state, words)
        state.tentative, state.previous = [], []
        _cut(state, job.cut_at)
        return new
    agreed = common_prefix(state.previous, words) if state.previous else 0
    if agreed == 0 and state.end - _last_confirmed_end(state) > config.max_buffer and len(words) > config.keep_words:
        agreed = len(words) - config.keep_words  # nothing agrees for too long: confirm all but the last words
    new = _confirm(state, words[:agreed])
    state.previous = state.tentative = words[agreed:]
    _trim(state)
    if state.end - state.buffer_start > MAX_INPUT:
        _cut(state, state.end - MAX_INPUT)
    return new


def _trim(state: LiveState) -> None:
    """Once the buffer is longer than ``trim_after``, cut it after the last confirmed sentence (after the
    last confirmed word once it is longer than ``max_buffer``), never into the next word."""
    config = state.config
    inside = [w for w in state.confirmed if w.end > state.buffer_start]
    if not inside or state.end - state.buffer_start <= config.trim_after:
        return
    ends = [k for k, w in enumerate(inside) if w.text.endswith(SENTENCE_END)]
    if not ends and state.end - state.buffer_start <= config.max_buffer:
        return  # wait for a sentence end while the buffer is short enough
    last = ends[-1] if ends else len(inside) - 1
    word = inside[last]
    following = inside[last + 1] if last + 1 < len(inside) else (state.tentative[0] if state.tentative else None)
    cut_at = word.end + 0.15
    if following is not None:
        cut_at = min(cut_at, max(following.start, word.end - 0.1))
    _cut(state, min(cut_at, state.end))


# --------------------------------------------------------------------------------- one call
def step(state: LiveState, samples: np.ndarray, engine: Engine) -> list[TimedWord]:
    """Feed ``samples`` and, when due, decode and confirm (all in this call). Returns the words confirmed."""
    feed(state, samples)
    job = plan(state)
    return apply(state, job, engine.decode(job)) if job is not None else []


def flush(state: LiveState, engine: Engine) -> list[TimedWord]:
    """The end of the stream: the last partial VAD frame, then decode what is held and confirm all of it."""
    if state.finished:
        return []
    state.probs = np.concatenate((state.probs, state.vad.finish()))
    job = plan(state, force=True) if state.buffer.size else None
    new = apply(state, job, engine.decode(job)) if job is not None else []
    state.tentative, state.previous, state.finished = [], [], True
    state.buffer = _zeros()
    return new


def transcript_of(state: LiveState, model: str = "") -> Transcript:
    """The confirmed words as a Transcript: segments made as the word-timestamp path makes them for files."""
    timed = (SimpleNamespace(word=w.text, start_ts=w.start, end_ts=w.end) for w in state.confirmed)
    segments = tuple(
        Segment(round(c.start, 3), round(c.end, 3), c.text, tuple(Word(w.text, round(w.start, 3), round(w.end, 3))
                                                                  for w in c.words))
        for c in chunks_from_words(timed, state.end))
    return Transcript(text=state.confirmed_text(), language=state.language, segments=segments,
                      task=state.config.task, model=model, duration=round(state.end, 3))
