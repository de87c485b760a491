"""Voice activity detection (Silero VAD) and planning of transcription windows for long audio.

Which Silero model
------------------
silero-vad 6.2.3 ships its weights in the wheel (``silero_vad/data``) in three runnable forms:
TorchScript (``load_silero_vad()``), ONNX run frame by frame (``onnx=True``: onnxruntime does
the maths, but a Python loop with torch tensors calls it every 32 ms of audio) and a "sequence"
ONNX model (``sequence=True``) that onnxruntime runs on blocks of up to 512 frames (16 s) per
call, with only numpy around it. All three give the same speech timestamps; the sequence model
is the lightest and fastest (about 3x faster than ``onnx=True`` and 6x faster than TorchScript on
this CPU), so it is used here. Its session is single-threaded and stateless between calls, so
one cached instance is shared by all threads.

Importing ``silero_vad`` still imports torch (its package ``__init__``) and calls
``torch.set_num_threads(1)`` as a side effect; :func:`_silero` restores the previous thread
count so the rest of the app keeps its torch threads. Nothing is imported or loaded until the
first call.

Long audio in bounded memory
----------------------------
1. :func:`speech_regions_from_file` reads a 16 kHz WAV block by block (``block_seconds``) and
   feeds the model frame-exactly across block boundaries (carrying the LSTM state and the
   64-sample context), keeping only one speech probability per 32 ms frame
   (about 0.45 MB per hour). :func:`speech_regions` does the same for an array already in
   memory; both give the same regions.
2. :func:`plan_windows` groups the speech regions into :class:`Window` s of at most
   ``max_window`` seconds (Whisper's 30 s input): regions closer than ``max_gap`` share a window
   as long as it fits, longer silences start a new window (silence is never sent to the model,
   which also avoids Whisper's hallucinations on silence). When a window is full and the speech
   goes on, it ends at the *longest pause* in its second half rather than at the last pause that
   fits: sentence ends pause longer than commas, so windows end where sentences do. (Packing to
   the last fitting pause cut "Today, | the bicycle is ..." on the benchmark paragraph: the next
   window then started mid-sentence and the word before the cut was dropped or the word after it
   misheard.) Regions longer than a window are cut
   into equal pieces (pass ``max_speech_duration`` to the VAD so Silero itself cuts long speech
   at its longest pause instead). Each window starts ``lead`` (as ``pad``, 0.2 s) before its first speech and
   ends ``pad`` (0.2 s) after its last, never overlapping its neighbours: where the two meet, the
   silence goes to the next window's lead first (its first phoneme is inside), the previous window
   keeps the rest. (A 0.5 s lead measured neutral on the benchmark files' WER, 4.8% either way, but
   Whisper then timed a window's first words from the window's start, up to 0.5 s before the speech:
   cues began before the voice, and a short French clip lost words. So 0.2 s.)
3. The transcriber then reads one window at a time (:func:`iter_window_audio`: at most
   ``max_window`` seconds of samples in memory, 1.9 MB for 30 s) and adds ``window.start`` to
   the timestamps it gets back.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

__all__ = [
    "SAMPLE_RATE",
    "VadError",
    "VadOptions",
    "Window",
    "FrameStream",
    "load_vad_model",
    "speech_probabilities",
    "speech_regions",
    "speech_regions_from_file",
    "plan_windows",
    "iter_window_audio",
]

PathLike = Union[str, Path]
Region = tuple[float, float]

#: The only sample rate handled here (what :func:`pipelines.subtitles.video.extract_audio` writes).
SAMPLE_RATE = 16000
_FRAME = 512  # samples per VAD frame at 16 kHz (32 ms)
FRAME_SECONDS = _FRAME / SAMPLE_RATE  # one speech probability per this many seconds
_CONTEXT = 64  # samples of the previous frame the model sees in front of each frame
_BLOCK_FRAMES = 512  # frames per onnxruntime call (~16 s)


class VadError(Exception):
    """Voice activity detection could not run; ``user_message`` is meant for the user."""

    def __init__(self, user_message: str) -> None:
        super().__init__(user_message)
        self.user_message = user_message


@dataclass(frozen=True)
class VadOptions:
    """Silero's knobs, in seconds (Silero's own defaults).

    Attributes:
        threshold: Speech probability above which a frame is speech.
        min_speech_duration: Shorter bursts are dropped.
        min_silence_duration: Pauses shorter than this do not end a region.
        speech_pad: Added on both sides of each region.
        max_speech_duration: Longer regions are cut at their longest pause (inf: never).
    """

    threshold: float = 0.5
    min_speech_duration: float = 0.25
    min_silence_duration: float = 0.1
    speech_pad: float = 0.03
    max_speech_duration: float = math.inf


@dataclass(frozen=True)
class Window:
    """A stretch of audio to transcribe in one go.

    Attributes:
        start: Start in seconds from the start of the audio.
        end: End in seconds.
        speech: The speech regions inside it (absolute seconds), in order.
    """

    start: float
    end: float
    speech: tuple[Region, ...]

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.end - self.start


# --------------------------------------------------------------------------- model


# One lock for the first import and load: two first requests at once (Whisper runs two at a time) load
# the model once, and the torch thread count saved around the import is not restored out of order.
_LOAD_LOCK = threading.Lock()


def _silero() -> tuple[Any, Any]:
    """(silero_vad module, get_speech_timestamps_from_probs), imported once, torch threads kept."""
    with _LOAD_LOCK:
        return _import_silero()


@lru_cache(maxsize=1)
def _import_silero() -> tuple[Any, Any]:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is a dependency
        raise VadError("Voice activity detection needs PyTorch, which is not installed.") from exc
    threads = torch.get_num_threads()
    try:
        import silero_vad
        from silero_vad.utils_vad import get_speech_timestamps_from_probs
    except ImportError as exc:
        raise VadError("Voice activity detection is not available: the silero-vad package is "
                       "not installed (pip install -r requirements.txt).") from exc
    finally:
        torch.set_num_threads(threads)
    return silero_vad, get_speech_timestamps_from_probs


def load_vad_model() -> Any:
    """The Silero VAD sequence model (onnxruntime), loaded once and shared."""
    with _LOAD_LOCK:
        return _load_vad_model()


@lru_cache(maxsize=1)
def _load_vad_model() -> Any:
    silero_vad, _ = _import_silero()
    try:
        return silero_vad.load_silero_vad(sequence=True, sampling_rate=SAMPLE_RATE,
                                          max_frames=_BLOCK_FRAMES)
    except Exception as exc:  # noqa: BLE001 - onnxruntime missing / model file unreadable
        raise VadError(f"The voice activity model could not be loaded ({exc}).") from exc


@dataclass
class FrameStream:
    """Feeds audio of any chunk size to the sequence model, frame-exactly across chunks (the LSTM state
    and the 64-sample context carried). Its state is plain arrays, so a live stream can keep one in the
    page's state (:mod:`pipelines.speech.live`); the shared model is looked up at each call."""

    h: np.ndarray = field(default_factory=lambda: np.zeros((1, 1, 128), dtype=np.float32))
    c: np.ndarray = field(default_factory=lambda: np.zeros((1, 1, 128), dtype=np.float32))
    context: np.ndarray = field(default_factory=lambda: np.zeros(_CONTEXT, dtype=np.float32))
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    samples: int = 0

    def _run(self, frames: np.ndarray) -> np.ndarray:
        """Probabilities for whole frames (shape (n, _FRAME)), carrying state and context."""
        session = load_vad_model().session
        out = []
        for first in range(0, len(frames), _BLOCK_FRAMES):
            block = frames[first:first + _BLOCK_FRAMES]
            contexts = np.empty((len(block), _CONTEXT), dtype=np.float32)
            contexts[0] = self.context
            contexts[1:] = block[:-1, -_CONTEXT:]
            self.context = block[-1, -_CONTEXT:].copy()
            probs, self.h, self.c = session.run(
                ["speech_probs", "hn", "cn"],
                {"input": np.concatenate((contexts, block), axis=1), "h": self.h, "c": self.c})
            out.append(np.asarray(probs, dtype=np.float32).reshape(-1))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def feed(self, audio: np.ndarray) -> np.ndarray:
        """Probabilities of the whole frames completed by ``audio`` (the rest waits for the next call)."""
        self.samples += audio.size
        data = np.concatenate((self.pending, audio)) if self.pending.size else audio
        whole = data.size // _FRAME * _FRAME
        self.pending = data[whole:].copy()
        if not whole:
            return np.zeros(0, dtype=np.float32)
        return self._run(data[:whole].reshape(-1, _FRAME))

    def finish(self) -> np.ndarray:
        """The probability of the last, partial frame (zero-padded), if any."""
        if not self.pending.size:
            return np.zeros(0, dtype=np.float32)
        last = np.zeros((1, _FRAME), dtype=np.float32)
        last[0, : self.pending.size] = self.pending
        self.pending = np.zeros(0, dtype=np.float32)
        return self._run(last)


def _as_mono_float(audio: Any) -> np.ndarray:
    arr = np.asarray(audio)
    if arr.ndim == 2:  # (samples, channels) as soundfile reads it
        arr = arr.mean(axis=1) if arr.shape[1] <= arr.shape[0] else arr.mean(axis=0)
    elif arr.ndim != 1:
        raise ValueError(f"Expected mono audio as a 1-D array, got shape {arr.shape}.")
    if np.issubdtype(arr.dtype, np.integer):
        scale = float(np.iinfo(arr.dtype).max) + 1.0
        arr = arr.astype(np.float32) / scale
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        arr = np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=-1.0)
    return arr


def speech_probabilities(audio16k: Any) -> np.ndarray:
    """Speech probability of every 32 ms frame (512 samples) of 16 kHz mono audio."""
    stream = FrameStream()
    audio = _as_mono_float(audio16k)
    return np.concatenate((stream.feed(audio), stream.finish()))


def _regions_from_probs(probs: np.ndarray, n_samples: int, options: VadOptions) -> list[Region]:
    if n_samples <= 0 or probs.size == 0:
        return []
    _, from_probs = _silero()
    stamps = from_probs(
        probs.tolist(),
        sampling_rate=SAMPLE_RATE,
        threshold=options.threshold,
        min_speech_duration_ms=int(round(options.min_speech_duration * 1000)),
        max_speech_duration_s=options.max_speech_duration,
        min_silence_duration_ms=int(round(options.min_silence_duration * 1000)),
        speech_pad_ms=int(round(options.speech_pad * 1000)),
        return_seconds=False,
        audio_length_samples=n_samples,
    )
    regions = []
    for stamp in stamps:
        start = round(max(0, stamp["start"]) / SAMPLE_RATE, 3)
        end = round(min(n_samples, stamp["end"]) / SAMPLE_RATE, 3)
        if end > start:
            regions.append((start, end))
    return regions


def speech_regions(audio16k: np.ndarray, options: VadOptions = VadOptions()) -> list[Region]:
    """Where there is speech in 16 kHz mono audio: ``[(start_s, end_s), ...]`` in order.

    Args:
        audio16k: Samples at 16 kHz, float in [-1, 1] (integer PCM is scaled); 2-D input is
            mixed down to mono.
        options: Silero's thresholds and durations.

    Raises:
        VadError: The VAD model is unavailable.
    """
    audio = _as_mono_float(audio16k)
    if audio.size == 0:
        return []
    return _regions_from_probs(speech_probabilities(audio), audio.size, options)


def speech_regions_from_file(path: PathLike, options: VadOptions = VadOptions(),
                             block_seconds: float = 60.0) -> list[Region]:
    """Like :func:`speech_regions` for a 16 kHz audio file, reading it block by block.

    Memory stays bounded by ``block_seconds`` of samples plus one probability per 32 ms frame.

    Raises:
        VadError: The file is not 16 kHz audio, cannot be read, or the model is unavailable.
    """
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except (RuntimeError, OSError) as exc:  # soundfile.LibsndfileError is a RuntimeError
        raise VadError(f"Could not read the audio file '{Path(path).name}' ({exc}).") from exc
    if info.samplerate != SAMPLE_RATE:
        raise VadError(f"Voice activity detection needs 16 kHz audio, but '{Path(path).name}' is "
                       f"{info.samplerate} Hz; convert it first (pipelines.subtitles.video.extract_audio).")
    stream = FrameStream()
    block = max(_FRAME, int(block_seconds * SAMPLE_RATE))
    parts = []
    for chunk in sf.blocks(str(path), blocksize=block, dtype="float32", always_2d=True):
        parts.append(stream.feed(_as_mono_float(chunk.mean(axis=1))))
    parts.append(stream.finish())
    return _regions_from_probs(np.concatenate(parts), stream.samples, options)


# --------------------------------------------------------------------------- windows


def _clean(regions: Iterable[Sequence[float]], limit: float) -> list[list[float]]:
    """Clip to [0, limit], drop empty, sort and merge overlapping/touching regions."""
    spans = sorted((max(0.0, float(s)), min(limit, float(e))) for s, e in regions)
    merged: list[list[float]] = []
    for start, end in spans:
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def plan_windows(
    regions: Iterable[Sequence[float]],
    total_duration: float,
    max_window: float = 30.0,
    max_gap: float = 3.0,
    pad: float = 0.2,
    min_fill: float = 0.5,
    lead: Optional[float] = None,
) -> list[Window]:
    """Group speech regions into windows to transcribe one at a time (see the module docstring).

    Args:
        regions: ``(start, end)`` speech regions in seconds, e.g. from :func:`speech_regions`.
        total_duration: Length of the audio in seconds (windows never go past it; <= 0 means
            "unknown": the last region's end is used).
        max_window: Longest window in seconds, padding included.
        max_gap: Regions separated by more silence than this go to separate windows.
        pad: Seconds of audio added after the speech of each window (less where the next
            window's lead or the audio's end is closer).
        lead: Seconds of audio added before the speech of each window (less where the previous
            window's speech or the audio's start is closer); it wins over the previous window's ``pad``.
            None: ``pad``.
        min_fill: When a window is full and speech goes on, it ends at the longest pause
            that leaves it at least this share of ``max_window`` (the later pause on a tie).

    Returns:
        Non-overlapping windows in time order, each at most ``max_window`` long, together
        holding every region (regions longer than a window are split between windows).
    """
    if max_window <= 0 or pad < 0 or max_gap < 0:
        raise ValueError("max_window must be positive and pad, max_gap not negative")
    lead = pad if lead is None else lead
    if pad + lead >= max_window or lead < 0:
        raise ValueError("pad + lead must be less than max_window, lead not negative")
    regions = list(regions)
    limit = float(total_duration) if total_duration and total_duration > 0 else max(
        (float(e) for _, e in regions), default=0.0)
    usable = max_window - lead - pad
    groups = _group(_split_long(_clean(regions, limit), usable), usable, max_gap, min_fill)
    bounds = [[max(0.0, g[0][0] - lead), min(limit, g[-1][1] + pad)] for g in groups]
    for k in range(len(bounds) - 1):
        # paddings meet: the next window's lead first (its first phoneme), never into the previous
        # window's speech; the previous window keeps the rest of the silence as its trail
        bounds[k + 1][0] = max(bounds[k + 1][0], groups[k][-1][1])
        bounds[k][1] = min(bounds[k][1], bounds[k + 1][0])
    return [
        Window(start=round(b[0], 3), end=round(b[1], 3),
               speech=tuple((round(s, 3), round(e, 3)) for s, e in g))
        for b, g in zip(bounds, groups)
    ]


def _split_long(spans: list[list[float]], usable: float) -> list[tuple[float, float]]:
    """Regions longer than a window cut into equal pieces that fit."""
    pieces: list[tuple[float, float]] = []
    for start, end in spans:
        count = max(1, math.ceil((end - start) / usable - 1e-9))
        step = (end - start) / count
        pieces.extend((start + k * step, end if k == count - 1 else start + (k + 1) * step)
                      for k in range(count))
    return pieces


def _group(pieces: list[tuple[float, float]], usable: float, max_gap: float,
           min_fill: float) -> list[list[tuple[float, float]]]:
    """Consecutive pieces grouped into windows of at most ``usable`` seconds of speech."""
    groups: list[list[tuple[float, float]]] = []
    first = 0
    while first < len(pieces):
        # the most pieces that fit in one window without a long silence between them
        stop = first + 1
        while (stop < len(pieces) and pieces[stop][0] - pieces[stop - 1][1] <= max_gap
               and pieces[stop][1] - pieces[first][0] <= usable + 1e-9):
            stop += 1
        if stop < len(pieces) and pieces[stop][0] - pieces[stop - 1][1] <= max_gap:
            stop = _longest_pause(pieces, first, stop, min_fill * usable)
        groups.append(pieces[first:stop])
        first = stop
    return groups


def _longest_pause(pieces: list[tuple[float, float]], first: int, stop: int, min_speech: float) -> int:
    """A full window whose speech goes on ends at the longest pause in its later part (after at least
    ``min_speech`` seconds): the index of the first piece after it."""
    best_gap, best_stop = -1.0, stop
    for cut in range(first + 1, stop + 1):
        if pieces[cut - 1][1] - pieces[first][0] < min_speech - 1e-9:
            continue
        gap = pieces[cut][0] - pieces[cut - 1][1]
        if gap >= best_gap - 0.01:  # within 10 ms counts as a tie: keep the window fuller
            best_gap, best_stop = max(gap, best_gap), cut
    return best_stop


def iter_window_audio(path: PathLike, windows: Iterable[Window]) -> Iterator[tuple[Window, np.ndarray]]:
    """Read each window's samples (float32 mono) from an audio file, one window at a time."""
    import soundfile as sf

    with sf.SoundFile(str(path)) as fh:
        rate = fh.samplerate
        for window in windows:
            first = int(round(window.start * rate))
            last = int(round(window.end * rate))
            fh.seek(min(first, fh.frames))
            data = fh.read(max(0, last - first), dtype="float32", always_2d=True)
            yield window, data.mean(axis=1) if data.shape[1] > 1 else data[:, 0].copy()
