"""Any audio or video file, or a microphone array -> 16 kHz mono float32 in [-1, 1].

Decoding and resampling use PyAV (FFmpeg's libraries, shipped inside the wheel): one library reads
wav, mp3, flac, ogg/opus, m4a/aac and the audio track of video containers, at any sample rate, and
resamples with FFmpeg's swresample. Long files can be read piece by piece (:func:`iter_audio`) so an
hour of audio never has to sit in memory at once.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

SAMPLE_RATE = 16000


class AudioError(ValueError):
    """Audio that cannot be used; the message says what is wrong and what to do."""


def _open(path: Path):
    import av

    path = Path(path)
    if not path.is_file():
        raise AudioError(f"The file {path.name} does not exist or is not a file.")
    if path.stat().st_size == 0:
        raise AudioError(f"The file {path.name} is empty. Record again or upload another file.")
    try:
        container = av.open(str(path))
    except (av.error.InvalidDataError, av.error.FFmpegError, UnicodeDecodeError) as exc:
        raise AudioError(
            f"{path.name} is not a readable audio or video file. Upload wav, mp3, flac, ogg, m4a or a video."
        ) from exc
    if not container.streams.audio:
        has_video = bool(container.streams.video)
        container.close()
        if has_video:
            raise AudioError(f"{path.name} has no audio track. Upload a file with sound in it.")
        raise AudioError(
            f"{path.name} is not a readable audio or video file. Upload wav, mp3, flac, ogg, m4a or a video."
        )
    return container


def iter_audio(path: Path | str, chunk_seconds: float = 30.0) -> Iterator[np.ndarray]:
    """Yield consecutive pieces of about ``chunk_seconds`` of 16 kHz mono float32 audio."""
    import av

    chunk = int(chunk_seconds * SAMPLE_RATE)
    container = _open(Path(path))
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    pending: list[np.ndarray] = []
    pending_len = 0
    try:
        stream = container.streams.audio[0]
        frames = container.decode(stream)
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                frame = None
            except av.error.FFmpegError as exc:
                raise AudioError(f"{Path(path).name} could not be decoded to the end ({exc}).") from exc
            for out in resampler.resample(frame):
                data = out.to_ndarray().reshape(-1)
                pending.append(data)
                pending_len += data.size
            while pending_len >= chunk:
                joined = np.concatenate(pending)
                yield joined[:chunk]
                rest = joined[chunk:]
                pending, pending_len = [rest], rest.size
            if frame is None:
                break
    finally:
        container.close()
    if pending_len:
        yield np.concatenate(pending)


def load_audio(path: Path | str, max_seconds: Optional[float] = None) -> np.ndarray:
    """The whole file as 16 kHz mono float32. Raises AudioError for unusable input.

    With ``max_seconds`` a longer file is refused before it is decoded when its container states its
    length, and otherwise as soon as decoding passes the limit: memory stays bounded by the limit
    whatever the upload holds (a 500 MB low-bitrate file can hold days of audio).
    """
    if max_seconds is not None:
        _refuse_longer(duration_of(path), max_seconds)
    pieces: list[np.ndarray] = []
    decoded = 0
    for piece in iter_audio(path, chunk_seconds=60.0):
        pieces.append(piece)
        decoded += piece.size
        if max_seconds is not None:
            _refuse_longer(decoded / SAMPLE_RATE, max_seconds, at_least=True)
    audio = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
    return check_audio(audio, Path(path).name)


def _spoken(seconds: float) -> tuple[int, int, str]:
    """(count, seconds per unit, unit name) of a length as people say it."""
    if seconds >= 2 * 3600 and seconds % 3600 == 0:
        return round(seconds / 3600), 3600, "hours"
    if seconds >= 120:
        return round(seconds / 60), 60, "minutes"
    return round(seconds), 1, "seconds"


def duration_text(seconds: float) -> str:
    """'3 hours', '90 minutes', '45 seconds': a limit or a length as people say it."""
    count, _unit, name = _spoken(seconds)
    return f"{count} {name}"


def clock_text(seconds: float) -> str:
    """'3:00:20', '2:50', '0:46'."""
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def too_long(what: str, seconds: Optional[float], max_seconds: float, at_least: bool = False) -> Optional[str]:
    """"The video is 240 minutes long; this server accepts up to 3 hours." or None when it fits.

    A length so close to the limit that rounding would make it read as the limit (or less) is given
    to the second: "3:00:20 long; this server accepts up to 3:00:00". ``at_least``: only a lower
    bound of the length is known (decoding stopped at the limit).
    """
    if not seconds or seconds <= max_seconds:
        return None
    limit = duration_text(max_seconds)
    if at_least:
        length = f"more than {limit}"
    else:
        count, unit, _name = _spoken(seconds)
        limit_count, limit_unit, _name = _spoken(max_seconds)
        if count * unit > limit_count * limit_unit:
            length = duration_text(seconds)
        else:
            length, limit = clock_text(math.ceil(seconds)), clock_text(math.floor(max_seconds))
    return f"{what} is {length} long; this server accepts up to {limit}."


def _refuse_longer(seconds: float, max_seconds: float, at_least: bool = False) -> None:
    message = too_long("The audio", seconds, max_seconds, at_least)
    if message:
        raise AudioError(f"{message} Cut it into parts.")


def _mono_float(data: np.ndarray) -> np.ndarray:
    """Samples as Gradio gives them (int16 or float, mono or (samples, channels)) -> mono float32."""
    data = np.asarray(data)
    if data.ndim == 1:
        data = data[:, None]
    if np.issubdtype(data.dtype, np.integer):
        data = data.astype(np.float32) / float(np.iinfo(data.dtype).max + 1)
    return np.ascontiguousarray(data.astype(np.float32).mean(axis=1))


def _resample(resampler, mono: np.ndarray, sample_rate: int) -> list[np.ndarray]:
    import av

    frame = av.AudioFrame.from_ndarray(mono[None, :], format="flt", layout="mono")
    frame.sample_rate = int(sample_rate)
    return [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]


def _resampler():
    import av

    return av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)


def from_array(sample_rate: int, data: np.ndarray) -> np.ndarray:
    """A microphone recording (Gradio gives (rate, int16 array, maybe stereo)) -> 16 kHz mono float32."""
    if np.asarray(data).size == 0:
        raise AudioError("The recording is empty. Record again, a little longer.")
    resampler = _resampler()
    out = _resample(resampler, _mono_float(data), sample_rate)
    out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return check_audio(np.concatenate(out) if out else np.zeros(0, np.float32), "The recording")


class StreamResampler:
    """Microphone chunks of one stream (any rate, int16 or float, maybe stereo) -> 16 kHz mono float32.
    The resampler's filter state runs on from chunk to chunk (no clicks at chunk edges; a few samples
    wait for the next chunk). Browsers send 48 kHz (Chrome) or 44.1 kHz."""

    def __init__(self) -> None:
        self._rate = 0
        self._resampler = None

    def __call__(self, sample_rate: int, data: np.ndarray) -> np.ndarray:
        mono = _mono_float(data) if np.asarray(data).size else np.zeros(0, np.float32)
        if int(sample_rate) == SAMPLE_RATE or not mono.size:
            return mono
        if self._resampler is None or int(sample_rate) != self._rate:
            self._resampler, self._rate = _resampler(), int(sample_rate)
        out = _resample(self._resampler, mono, sample_rate)
        return np.concatenate(out) if out else np.zeros(0, np.float32)


def check_audio(audio: np.ndarray, name: str) -> np.ndarray:
    if audio.size < SAMPLE_RATE // 10:
        raise AudioError(f"{name} holds no audio (or less than 0.1 s). Record or upload a longer clip.")
    if not np.isfinite(audio).all():
        raise AudioError(f"{name} holds invalid samples (NaN or infinity).")
    return np.clip(audio, -1.0, 1.0).astype(np.float32, copy=False)


def duration_of(path: Path | str) -> float:
    """Duration in seconds from the container (0.0 when unknown), without decoding."""
    container = _open(Path(path))
    try:
        stream = container.streams.audio[0]
        if stream.duration is not None and stream.time_base is not None:
            return float(stream.duration * stream.time_base)
        return float(container.duration or 0) / 1_000_000
    finally:
        container.close()
