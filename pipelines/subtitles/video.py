"""Media work with ffmpeg and PyAV: probe files, pull out the audio, add subtitles to videos.

* :func:`probe` reads a file's duration and tracks with PyAV (no subprocess).
* :func:`extract_audio` writes the first audio track as mono 16-bit WAV (16 kHz by default).
* :func:`burn_subtitles` renders SRT/VTT/ASS subtitles into the picture (ffmpeg ``subtitles``
  filter, i.e. libass) and re-encodes the video; the audio is copied when the container allows.
* :func:`mux_subtitles` adds the subtitles as a soft track that players can switch on and off
  (``mov_text`` in MP4/MOV, SRT in Matroska, WebVTT in WebM), copying audio and video.

ffmpeg is the system ``ffmpeg`` when there is one on ``PATH``, else the binary shipped by
``imageio-ffmpeg``. It is run with argument lists (never through a shell). Outputs are written
under a temporary name next to the target and renamed when ffmpeg succeeds, so a failed run
never leaves a half-written file at ``out_path``. Failures raise :class:`MediaError`, whose
``user_message`` says what went wrong and ends with the tail of ffmpeg's own error output.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence, Union

from pipelines.core.progress import ProgressFn

__all__ = [
    "MediaError",
    "MediaInfo",
    "ffmpeg_exe",
    "has_libass",
    "probe",
    "extract_audio",
    "burn_subtitles",
    "mux_subtitles",
    "escape_filter_value",
]

PathLike = Union[str, Path]

_STDERR_TAIL_LINES = 15
_STDERR_TAIL_CHARS = 1500
# Audio codecs that can be copied into an MP4/MOV file unchanged.
_MP4_AUDIO = frozenset({"aac", "mp3", "ac3", "eac3", "alac", "opus", "flac"})
_MP4_SUFFIXES = frozenset({".mp4", ".m4v", ".mov"})
_SOFT_SUB_CODECS = {".mp4": "mov_text", ".m4v": "mov_text", ".mov": "mov_text",
                    ".mkv": "srt", ".webm": "webvtt"}


class MediaError(Exception):
    """A media file could not be read or written; ``user_message`` is meant for the user."""

    def __init__(self, user_message: str, stderr_tail: str = "") -> None:
        super().__init__(user_message)
        self.user_message = user_message
        self.stderr_tail = stderr_tail


@dataclass(frozen=True)
class MediaInfo:
    """What :func:`probe` found in a file.

    Attributes:
        duration: Length in seconds (0.0 when the file does not say).
        has_audio: The file has at least one audio track.
        has_video: The file has a moving picture (cover art of a music file does not count).
        audio_codec: Codec of the first audio track (e.g. ``"aac"``), if any.
        video_codec: Codec of the first video track (e.g. ``"h264"``), if any.
        subtitle_tracks: Number of subtitle tracks.
    """

    duration: float
    has_audio: bool
    has_video: bool
    audio_codec: Optional[str] = None
    video_codec: Optional[str] = None
    subtitle_tracks: int = 0


# --------------------------------------------------------------------------- ffmpeg


@lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    """Path of the ffmpeg to use: the system one, else imageio-ffmpeg's.

    Raises:
        MediaError: Neither is available.
    """
    system = shutil.which("ffmpeg")
    if system:
        return system
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as exc:  # noqa: BLE001 - ImportError, RuntimeError("no ffmpeg exe")
        raise MediaError("ffmpeg is not installed, so video files cannot be processed. Install "
                         "it (for example `apt-get install ffmpeg`) and restart Voice Studio.") from exc


@lru_cache(maxsize=8)
def _ffmpeg_lists(exe: str, what: str) -> str:
    """Output of ``ffmpeg -filters`` / ``-encoders`` (cached per binary)."""
    try:
        done = subprocess.run([exe, "-hide_banner", f"-{what}"], capture_output=True, text=True,
                              timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout


def _has_filter(exe: str, name: str) -> bool:
    return re.search(rf"^\s*\S+\s+{re.escape(name)}\s", _ffmpeg_lists(exe, "filters"), re.M) is not None


def _has_encoder(exe: str, name: str) -> bool:
    return re.search(rf"^\s*\S+\s+{re.escape(name)}\s", _ffmpeg_lists(exe, "encoders"), re.M) is not None


def has_libass() -> bool:
    """Whether the chosen ffmpeg has the libass ``subtitles`` filter (needed to burn in)."""
    return _has_filter(ffmpeg_exe(), "subtitles")


def _tail(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    tail = "\n".join(lines[-_STDERR_TAIL_LINES:])
    return tail[-_STDERR_TAIL_CHARS:]


def _partial_path(out: Path) -> Path:
    return out.with_name(f".{out.stem}.partial{out.suffix}")


def _run_ffmpeg(args: Sequence[str], out: Path, what: str,
                progress: Optional[ProgressFn] = None, duration: float = 0.0) -> Path:
    """Run ffmpeg writing to a temporary name, then rename it to ``out``.

    ``args`` are the arguments after the executable, ending just before the output path.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_path(out)
    cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args]
    if progress is not None:
        cmd += ["-progress", "pipe:1", "-nostats"]
    cmd.append(str(partial))
    with tempfile.TemporaryFile(mode="w+b") as err:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=err,
                                    stdout=subprocess.PIPE if progress else subprocess.DEVNULL)
        except OSError as exc:
            raise MediaError(f"{what} failed: ffmpeg could not be started ({exc}).") from exc
        try:
            if progress is not None and proc.stdout is not None:
                for raw in proc.stdout:
                    key, _, value = raw.decode("utf-8", "replace").strip().partition("=")
                    if key in ("out_time_us", "out_time_ms") and duration > 0 and value.isdigit():
                        progress(min(1.0, int(value) / 1e6 / duration), what)
            code = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            partial.unlink(missing_ok=True)
            raise
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
    if code != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        tail = _tail(stderr)
        detail = f"\nffmpeg said:\n{tail}" if tail else ""
        raise MediaError(f"{what} failed (ffmpeg exit code {code}).{detail}", tail)
    os.replace(partial, out)
    if progress is not None:
        progress(1.0, what)
    return out


def escape_filter_value(value: str) -> str:
    """Escape ``value`` for use as an option value inside an ffmpeg filter graph string.

    Two levels, as ffmpeg's filter documentation describes: first the option value
    (``\\``, ``'``, ``:``), then the filter graph description (``\\``, ``'``, ``[``, ``]``,
    ``,``, ``;``). No shell level: ffmpeg is run with an argument list.
    """
    level1 = re.sub(r"([\\':])", r"\\\1", value)
    return re.sub(r"([\\'\[\],;])", r"\\\1", level1)


# --------------------------------------------------------------------------- probe


def _unreadable(path: Path, exc: BaseException) -> MediaError:
    return MediaError(f"Could not read '{path.name}': it is not a supported audio or video file "
                      f"or it is damaged ({exc}). Try another file or convert it to MP4, MP3 or WAV.")


def probe(path: PathLike) -> MediaInfo:
    """Duration and tracks of a media file, read with PyAV.

    Raises:
        MediaError: The file is missing or not a readable media file.
    """
    import av

    p = Path(path)
    if not p.is_file():
        raise MediaError(f"The file '{p.name}' was not found. Upload it again.")
    try:
        with av.open(str(p)) as container:
            audio = list(container.streams.audio)
            video = [s for s in container.streams.video
                     if not (s.disposition & av.stream.Disposition.attached_pic)]
            duration = container.duration / 1_000_000 if container.duration else 0.0
            if duration <= 0:
                for stream in container.streams:
                    if stream.duration and stream.time_base:
                        duration = max(duration, float(stream.duration * stream.time_base))
            if not audio and not video and not list(container.streams.subtitles):
                raise MediaError(f"'{p.name}' has neither audio nor video in it. Choose an audio "
                                 "or video file.")
            return MediaInfo(
                duration=max(0.0, float(duration)),
                has_audio=bool(audio),
                has_video=bool(video),
                audio_codec=audio[0].codec_context.name if audio else None,
                video_codec=video[0].codec_context.name if video else None,
                subtitle_tracks=len(container.streams.subtitles),
            )
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise _unreadable(p, exc) from exc


# --------------------------------------------------------------------------- audio


def extract_audio(video_path: PathLike, out_wav: PathLike, sample_rate: int = 16000) -> Path:
    """Write the first audio track of a media file as a mono 16-bit PCM WAV.

    Args:
        video_path: Any audio or video file ffmpeg can read.
        out_wav: The WAV to write (parent folders are created).
        sample_rate: Output sample rate in Hz (16 kHz is what Whisper wants).

    Returns:
        ``out_wav`` as a Path.

    Raises:
        MediaError: Unreadable file, no audio track, or ffmpeg failed.
    """
    src = Path(video_path).resolve()
    info = probe(src)
    if not info.has_audio:
        raise MediaError(f"'{src.name}' has no audio track, so there is nothing to transcribe. "
                         "Choose a file with sound.")
    args = ["-i", str(src), "-map", "0:a:0", "-vn", "-sn", "-dn",
            "-ac", "1", "-ar", str(int(sample_rate)), "-c:a", "pcm_s16le", "-f", "wav"]
    return _run_ffmpeg(args, Path(out_wav).resolve(), "Extracting the audio")


# --------------------------------------------------------------------------- subtitles


def _check_subtitle_file(path: Path) -> None:
    if not path.is_file():
        raise MediaError(f"The subtitle file '{path.name}' was not found. Make the subtitles again.")
    with open(path, encoding="utf-8", errors="replace") as fh:
        head = fh.read(4096).strip()
    if not head or head.upper() == "WEBVTT":  # what pysubs2 writes for zero cues
        raise MediaError("The subtitles are empty (no speech was found), so there is nothing to "
                         "add to the video.")


def _video_codec_args(exe: str) -> list[str]:
    if _has_encoder(exe, "libx264"):
        return ["-c:v", "libx264", "-preset", "veryfast", "-crf", "22", "-pix_fmt", "yuv420p"]
    return ["-c:v", "mpeg4", "-q:v", "3"]  # every ffmpeg build has this one


def burn_subtitles(
    video: PathLike,
    subtitles: PathLike,
    out_path: PathLike,
    force_style: Optional[str] = None,
    progress: Optional[ProgressFn] = None,
) -> Path:
    """Render subtitles into the picture (hard subtitles) and write a new video.

    Args:
        video: The source video.
        subtitles: An SRT, VTT or ASS file.
        out_path: The video to write (``.mp4``, ``.mov``, ``.m4v`` or ``.mkv``).
        force_style: Optional libass style override, e.g. ``"FontSize=24,Outline=2"``.
        progress: Called with the fraction done (0.0 to 1.0) and what is done, while ffmpeg runs.

    Raises:
        MediaError: No video track, unreadable input, ffmpeg without libass, or ffmpeg failed.
        ValueError: Unsupported output extension.
    """
    src, subs, out = Path(video).resolve(), Path(subtitles).resolve(), Path(out_path).resolve()
    suffix = out.suffix.lower()
    if suffix not in _MP4_SUFFIXES | {".mkv"}:
        raise ValueError(f"Cannot write burned-in video as {suffix or 'a file without extension'}; "
                         "use .mp4, .mov, .m4v or .mkv.")
    _check_subtitle_file(subs)
    info = probe(src)
    if not info.has_video:
        raise MediaError(f"'{src.name}' has no video picture to put subtitles on. Use a video file.")
    exe = ffmpeg_exe()
    if not _has_filter(exe, "subtitles"):
        raise MediaError(f"The installed ffmpeg ({exe}) was built without libass, so it cannot "
                         "burn subtitles into video. Install an ffmpeg with libass (Debian's "
                         "`apt-get install ffmpeg` has it) or use the soft subtitle track instead.")
    vf = f"subtitles=filename={escape_filter_value(str(subs))}"
    if force_style:
        vf += f":force_style={escape_filter_value(force_style)}"
    args = ["-i", str(src), "-map", "0:v:0", "-map", "0:a:0?", "-vf", vf, *_video_codec_args(exe)]
    if info.has_audio:
        if suffix == ".mkv" or (info.audio_codec in _MP4_AUDIO):
            args += ["-c:a", "copy"]
        else:
            args += ["-c:a", "aac", "-b:a", "160k"]
    if suffix in _MP4_SUFFIXES:
        args += ["-movflags", "+faststart"]
    return _run_ffmpeg(args, out, "Burning in the subtitles", progress, info.duration)


def mux_subtitles(
    video: PathLike,
    srt: PathLike,
    out_path: PathLike,
    language: Optional[str] = None,
    default: bool = False,
) -> Path:
    """Add subtitles as a soft track (switchable in players); audio and video are copied.

    The subtitle codec follows the output: ``mov_text`` for .mp4/.m4v/.mov, SRT for .mkv,
    WebVTT for .webm.

    Args:
        video: The source video.
        srt: An SRT (or VTT) subtitle file.
        out_path: The video to write.
        language: ISO 639-2 code for the track (e.g. ``"eng"``, ``"deu"``), optional.
        default: Mark the subtitle track to be shown by default.

    Raises:
        MediaError: Unreadable input or ffmpeg failed (e.g. codecs the container cannot hold).
        ValueError: Unsupported output extension.
    """
    src, subs, out = Path(video).resolve(), Path(srt).resolve(), Path(out_path).resolve()
    codec = _SOFT_SUB_CODECS.get(out.suffix.lower())
    if codec is None:
        raise ValueError(f"Cannot add a subtitle track to {out.suffix or 'a file without extension'}; "
                         f"use one of {', '.join(sorted(_SOFT_SUB_CODECS))}.")
    _check_subtitle_file(subs)
    info = probe(src)
    if not info.has_video and not info.has_audio:
        raise MediaError(f"'{src.name}' has no audio or video to add subtitles to.")
    args = ["-i", str(src), "-i", str(subs), "-map", "0:v?", "-map", "0:a?", "-map", "1:s:0",
            "-c:v", "copy", "-c:a", "copy", "-c:s", codec,
            "-disposition:s:0", "default" if default else "0"]
    if language:
        args += ["-metadata:s:s:0", f"language={language}"]
    if out.suffix.lower() in _MP4_SUFFIXES:
        args += ["-movflags", "+faststart"]
    return _run_ffmpeg(args, out, "Adding the subtitle track")
