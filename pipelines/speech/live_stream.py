"""Live captions at run time: the engine that decodes through WhisperService, one stream's runner, and
the service that opens streams (a bounded number at once).

- :class:`LiveEngine`: one (model, precision, device). A decode takes a **live work slot** (the pool's
  kind ``live``, separate from the transcription slots, so live steps never hold up file transcriptions
  and file transcriptions never stall every stream), loads the model's word-timestamp pipeline from the
  pool (loaded once, shared with subtitles) and decodes through :func:`decoding.decode_window` with
  the loop guards (one fallback temperature: a live step is tried again a second later anyway).
- :class:`LiveStream`: chunks in, captions out. :meth:`push` only appends (resampling, VAD, the
  recording on disk: milliseconds), so a chunk handler never blocks on the decoder; the decodes run on a
  worker thread, one at a time per stream, each hearing all the audio that came meanwhile (chunks that
  arrive during a slow decode are merged into the next one, never queued). :meth:`settle` waits, up to
  a deadline, for the decode running now: captions go out as soon as it ends. :meth:`finish` confirms
  the rest and transcribes the recording as a file (the same text, segments and files as an upload).
- :class:`LiveService`: opens streams, at most ``max_streams`` at once (a stream idle for a minute, e.g.
  a closed browser tab, no longer counts), each at most ``max_seconds`` long.

Nothing here is global per stream: the runner is the page's ``gr.State`` (or the WebSocket's local).
"""
from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from pipelines.core.errors import ModelUnavailable, Refused
from pipelines.core.progress import ProgressFn, no_progress
from pipelines.core.slots import WorkSlots
from pipelines.core.types import ModelChoice
from pipelines.speech import live
from pipelines.speech.audio import SAMPLE_RATE, StreamResampler, duration_text
from pipelines.speech.decoding import DecodeGuards, Decoded, decode_window, language_token, make_prompt
from pipelines.speech.service import WhisperService
from pipelines.speech.types import TranscribeOptions, Transcript

log = logging.getLogger(__name__)
KIND = "live"  # the live decodes' work slots in the model pool
#: The Live mode's default precision (measured: the same final text as FP16, shorter caption delays on
#: AMX and AVX-512 CPUs; benchmarks/README.md, "Live captions").
LIVE_PRECISION = "int8"
LIVE_GUARDS = DecodeGuards(temperatures=(0.0, 0.4))
IDLE_SECONDS = 60.0  # a stream without a chunk for this long no longer counts as open
BEHIND_AFTER = 3.0  # seconds of audio no decode has heard yet (at least; 1.5 decode cadences) to say "behind"


# --------------------------------------------------------------------------------- engine
def words_of(decoded: Decoded) -> list[live.TimedWord]:
    """A decode's timed words; a model without word timing (no alignment heads) spreads each segment's
    words evenly over the segment."""
    words = [live.TimedWord(w.text, w.start, w.end) for c in decoded.chunks for w in c.words]
    if words or not decoded.chunks:
        return words
    for chunk in decoded.chunks:
        parts = chunk.text.split()
        step = (chunk.end - chunk.start) / max(len(parts), 1)
        words += [live.TimedWord(p, chunk.start + k * step, chunk.start + (k + 1) * step) for k, p in enumerate(parts)]
    return words


class LiveEngine:
    """Decodes live steps of one (model, precision, device) with WhisperService's pipelines and slots."""

    def __init__(self, whisper: WhisperService, choice: ModelChoice, slots: WorkSlots,
                 guards: DecodeGuards = LIVE_GUARDS):
        self.whisper, self.choice, self.slots, self.guards = whisper, choice, slots, guards

    def _options(self, task: str, language: Optional[str], words: bool = True) -> TranscribeOptions:
        return TranscribeOptions(task=task, language=language, word_timestamps=words)

    def ready(self, task: str, language: Optional[str], progress: ProgressFn = no_progress) -> None:
        """Refuse what the model cannot do, then get it ready and loaded (once: the pool keeps it)."""
        options = self._options(task, language)
        self.whisper.prepare(self.choice, progress, options)
        self.whisper.load_checked(self.choice, options, progress)

    def decode(self, job: live.DecodeJob) -> live.Hypothesis:
        start = time.perf_counter()
        options = self._options(job.task, job.language)
        with self.slots.turn():
            loaded = self.whisper.load_checked(self.choice, options)
            prompt = make_prompt(loaded, [job.prompt], self.guards.prompt_tokens) if job.prompt else None
            decoded = decode_window(loaded, job.audio, options, language_token(loaded, job.language), prompt,
                                    self.guards)
        return live.Hypothesis(words_of(decoded), decoded.language, decoded.temperature,
                               time.perf_counter() - start)

    def transcribe_recording(self, wav: Path, task: str, language: Optional[str],
                             progress: ProgressFn = no_progress) -> Transcript:
        """The whole recording as a file (VAD windows, 30 s of context, the plain pipeline, a transcription slot)."""
        return self.whisper.transcribe_file(wav, self.choice, self._options(task, language, words=False), progress)


def record_to_wav(raw: Path) -> Path:
    """The headerless 16-bit recording as a 16 kHz WAV beside it (copied a minute at a time)."""
    import soundfile as sf

    wav = raw.with_suffix(".wav")
    with sf.SoundFile(str(wav), "w", samplerate=SAMPLE_RATE, channels=1, subtype="PCM_16") as out, \
            open(raw, "rb") as fh:
        while block := fh.read(SAMPLE_RATE * 2 * 60):
            out.write(np.frombuffer(block, "<i2"))
    return wav


# --------------------------------------------------------------------------------- captions
@dataclass(frozen=True)
class Captions:
    """What a stream shows now. ``status``: loading, listening, behind, limit, error, finished."""

    confirmed: str
    tentative: str
    language: Optional[str]
    seconds: float  # audio received
    behind: float  # audio no finished decode has heard yet
    status: str
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------- one stream
class LiveStream:
    """One stream's runner (see the module docstring). Thread-safe: chunks, decodes and readers meet
    under one condition."""

    def __init__(self, service: "LiveService", engine: LiveEngine, config: live.LiveConfig, folder: Path,
                 max_seconds: float):
        self.engine, self.max_seconds, self.folder = engine, max_seconds, Path(folder)
        self.state = live.LiveState(config=config, record_path=str(self.folder / "recording.pcm"))
        Path(self.state.record_path).touch()
        self.error: Optional[str] = None
        self.last_push = time.monotonic()
        self._executor = service.executor
        self._resample = StreamResampler()
        self._waiting: list[np.ndarray] = []
        self._cond = threading.Condition()
        self._ready = self._closing = self._closed = False
        self._busy, self._version = True, 0
        self._executor.submit(self._guarded, self._prepare)

    # -- worker side ----------------------------------------------------------------------
    def _guarded(self, work, *args) -> None:
        try:
            work(*args)
        except (ValueError, ModelUnavailable, OSError) as exc:  # written for the user (Refused is a ValueError)
            self._fail(getattr(exc, "user_message", None) or str(exc))
        except Exception as exc:  # noqa: BLE001 - a failed decode ends this stream's captions, not the server
            log.exception("live captions stopped")
            self._fail(f"Live captions stopped ({type(exc).__name__}: {exc}). Stop and start again.")

    def _fail(self, message: str) -> None:
        with self._cond:
            self.error, self._busy = message, False
            self._version += 1
            self._cond.notify_all()

    def _prepare(self) -> None:
        config = self.state.config
        self.engine.ready(config.task, config.language)
        with self._cond:
            for samples in self._waiting:  # the chunks that came while the model loaded
                live.feed(self.state, samples)
            self._waiting.clear()
            self._ready, self._busy = True, False
            self._version += 1
            self._start_if_due()

    def _decode(self, job: live.DecodeJob) -> None:
        hypothesis = self.engine.decode(job)
        with self._cond:
            live.apply(self.state, job, hypothesis)
            self._version += 1
            self._busy = False
            self._start_if_due()

    def _start_if_due(self) -> None:
        """Start the next decode when one is due (call with the condition held)."""
        if self._ready and not self._busy and not self._closing and self.error is None:
            job = live.plan(self.state)
            if job is not None:
                self._busy = True
                self._executor.submit(self._guarded, self._decode, job)
        self._cond.notify_all()

    # -- caller side ----------------------------------------------------------------------
    def push(self, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
        """Append a chunk (any rate; 16 kHz mono float32 passes as it is) and start a decode when one is due."""
        samples = self._resample(sample_rate, samples)
        with self._cond:
            self.last_push = time.monotonic()
            if self._closing or self.error is not None:
                return
            room = int(self.max_seconds * SAMPLE_RATE) - self.state.received - sum(s.size for s in self._waiting)
            if room > 0 and samples.size and not self._ready:
                self._waiting.append(samples[:room])  # the VAD and the model are still loading
            elif room > 0 and samples.size:
                live.feed(self.state, samples[:room])
            self._start_if_due()

    def settle(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) for the decode running now to end, so its captions go out at once."""
        with self._cond:
            version = self._version
            self._cond.wait_for(lambda: self._version != version or not self._busy or self.error is not None,
                                timeout=max(0.0, timeout))

    def wait_for_update(self, seen: int, timeout: float) -> int:
        """Wait (at most ``timeout`` s) until the captions change after version ``seen``; returns the
        version now (a program's connection sends captions each time it moves)."""
        with self._cond:
            self._cond.wait_for(lambda: self._version != seen, timeout=max(0.0, timeout))
            return self._version

    def captions(self) -> Captions:
        with self._cond:
            state = self.state
            status, message = self._status()
            return Captions(state.confirmed_text(), state.tentative_text(), state.language or state.last_language,
                            round(state.end, 2), round(state.behind, 2), status, message)

    def _status(self) -> tuple[str, str]:
        state = self.state
        if self.error is not None:
            return "error", self.error
        if self._closing:
            return "finished", ""
        if not self._ready:
            return "loading", "loading the model..."
        if state.received >= int(self.max_seconds * SAMPLE_RATE):
            return "limit", (f"The recording reached this server's limit of {duration_text(self.max_seconds)}: "
                             "stop to get the whole text.")
        config, step = state.config, state.last_step_seconds
        usual = max(config.min_new_audio, step / max(config.max_share, 1e-3)) + step  # a decode's cadence, busy or not
        if state.behind > max(BEHIND_AFTER, 1.5 * usual):
            return "behind", f"behind by {state.behind:.1f} s: catching up (the server is busy)"
        return "listening", ""

    def end(self) -> Transcript:
        """Stop taking chunks, decode the rest and confirm all of it: the confirmed words as a Transcript
        (what the captions showed). The recording stays for :meth:`finish`."""
        with self._cond:
            self._closing = True
            self._cond.wait_for(lambda: not self._busy)
            if self.error is not None:
                raise Refused(self.error)
        if self._ready:
            live.flush(self.state, self.engine)
        return live.transcript_of(self.state, self.engine.choice.model)

    def finish(self, refine: bool = True, progress: ProgressFn = no_progress) -> Transcript:
        """:meth:`end`, then with ``refine`` the recording transcribed as a file (the same text, segments and
        files as an upload); the recording is deleted."""
        try:
            confirmed = self.end()
            if not (refine and self.state.received):
                return confirmed
            config = self.state.config
            return self.engine.transcribe_recording(record_to_wav(Path(self.state.record_path)), config.task,
                                                    self.state.language or config.language, progress)
        finally:
            self.close()

    def close(self) -> None:
        """Stop taking chunks and delete the recording (also when the page goes away without a stop)."""
        with self._cond:
            self._closing = self._closed = True
        for path in (Path(self.state.record_path), Path(self.state.record_path).with_suffix(".wav")):
            try:
                os.unlink(path)
            except OSError:
                pass

    def is_open(self, now: Optional[float] = None) -> bool:
        return not self._closed and (now if now is not None else time.monotonic()) - self.last_push < IDLE_SECONDS


# --------------------------------------------------------------------------------- the service
class LiveService:
    """Opens live streams: at most ``max_streams`` at once, each at most ``max_seconds`` of audio."""

    def __init__(self, whisper: WhisperService, max_streams: int = 4, max_seconds: float = 3 * 3600.0,
                 engines: Optional[Callable[[ModelChoice], LiveEngine]] = None):
        """``engines(choice)`` makes a stream's decoder; by default a :class:`LiveEngine` on ``whisper``
        and its pool's live slots (Ray mode passes engines that decode on the Whisper replicas)."""
        self.engines = engines or (lambda choice: LiveEngine(whisper, choice, whisper.pool.slots(KIND)))
        self.max_streams, self.max_seconds = max(1, int(max_streams)), float(max_seconds)
        self.executor = ThreadPoolExecutor(max_workers=self.max_streams + 2, thread_name_prefix="live-captions")
        self._streams: "weakref.WeakSet[LiveStream]" = weakref.WeakSet()
        self._lock = threading.Lock()

    def engine(self, choice: ModelChoice) -> LiveEngine:
        return self.engines(choice)

    def open_streams(self) -> int:
        now = time.monotonic()
        with self._lock:
            return sum(1 for s in list(self._streams) if s.is_open(now))

    def open(self, choice: ModelChoice, config: live.LiveConfig, folder: Path,
             engine: Optional[LiveEngine] = None) -> LiveStream:
        """A new stream recording into ``folder`` (decoded by ``engine``, by default this service's for
        ``choice``); refused while ``max_streams`` are open."""
        with self._lock:
            now = time.monotonic()
            if sum(1 for s in list(self._streams) if s.is_open(now)) >= self.max_streams:
                raise Refused(f"This server already runs {self.max_streams} live caption streams, its limit. "
                              "Try again in a minute, or transcribe a recording instead.")
            stream = LiveStream(self, engine or self.engine(choice), config, folder, self.max_seconds)
            self._streams.add(stream)
        return stream


def live_config(task: Optional[str], language: Optional[str], **overrides) -> live.LiveConfig:
    """The stream settings for a task and language ("auto" or empty: detect), with measured defaults."""
    config = live.LiveConfig(task=task or "transcribe",
                             language=None if language in (None, "", "auto") else language)
    return replace(config, **overrides) if overrides else config
