"""Video to subtitles, as one straight line: source -> audio -> transcript -> cues -> files -> video.

The source is a YouTube URL (downloaded with pytubefix: an audio stream for transcription and a
modest progressive stream for the preview) or a local video file. The audio is extracted to a
16 kHz mono WAV and transcribed window by window (voice activity detection picks the windows), so
an hour of video never sits in memory as one array.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from . import audio, video, youtube
from .asr import WhisperService
from .cache import ProgressFn, no_progress
from .subtitles import Cue, CueRules, make_cues, write_outputs
from .types import ModelChoice, TranscribeOptions, Transcript


@dataclass(frozen=True)
class SubtitleRequest:
    choice: ModelChoice
    options: TranscribeOptions = TranscribeOptions()
    rules: CueRules = CueRules()
    url: Optional[str] = None
    video_path: Optional[Path] = None
    burn_in: bool = False
    soft_track: bool = False
    max_seconds: float = 3 * 3600.0


@dataclass
class SubtitleResult:
    transcript: Transcript
    cues: list[Cue]
    files: dict[str, Path]  # srt, vtt, txt, json (+ burned, muxed when asked)
    video: Optional[Path]  # the video to play with the subtitles
    info: Optional[youtube.VideoInfo] = None
    notes: list[str] = field(default_factory=list)


class SubtitleInputError(ValueError):
    """The request names no usable source; the message says what to do."""


def _refuse_longer(seconds: Optional[float], max_seconds: float) -> None:
    message = audio.too_long("The video", seconds, max_seconds)
    if message:
        raise SubtitleInputError(message)


def scaled(progress: ProgressFn, lo: float, hi: float) -> ProgressFn:
    """A progress callback mapping 0..1 of one step onto lo..hi of the whole job."""
    return lambda fraction, message: progress(lo + (hi - lo) * max(0.0, min(1.0, fraction)), message)


def make_subtitles(
    whisper: WhisperService,
    request: SubtitleRequest,
    work_dir: Path,
    progress: ProgressFn = no_progress,
    yt_factory: Callable[[str], Any] = youtube.YouTube,
    keep_audio: bool = False,
) -> SubtitleResult:
    """Subtitles for ``request``'s video, written under ``work_dir``.

    The extracted WAV (about 115 MB per hour) and a downloaded audio-only stream are deleted once
    transcribed, unless ``keep_audio`` (the caller transcribes the WAV again, then deletes it).
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    info = None
    # 1. the source media: a YouTube download or the uploaded file
    if request.url and request.url.strip():
        url = youtube.normalize_youtube_url(request.url)  # raises for any non-YouTube link
        progress(0.0, "read video details")
        info = youtube.fetch_info(url, yt_factory=yt_factory)
        _refuse_longer(info.length_seconds, request.max_seconds)
        media = youtube.download_audio(url, work_dir, yt_factory=yt_factory,
                                       progress=lambda f: progress(0.02 + 0.18 * f, "download audio"))
        try:
            player = youtube.download_preview(url, work_dir, yt_factory=yt_factory,
                                              progress=lambda f: progress(0.2 + 0.05 * f, "download preview"))
        except youtube.NoSuitableStream:
            player = media  # no progressive stream to preview: subtitles from the audio alone
    elif request.video_path:
        media = player = _own_link(Path(request.video_path), work_dir)
    else:
        raise SubtitleInputError("Give a YouTube link or upload a video file.")
    # 2. its audio track as 16 kHz mono WAV
    progress(0.25, "extract audio")
    probe = video.probe(media)
    _refuse_longer(probe.duration, request.max_seconds)
    wav = video.extract_audio(media, work_dir / "audio.wav")
    if media != player:  # a downloaded audio-only stream: its samples are in the WAV now
        media.unlink(missing_ok=True)
    # 3. transcript, window by window
    try:
        transcript = whisper.transcribe_file(wav, request.choice, request.options, scaled(progress, 0.3, 0.9))
    finally:
        if not keep_audio:
            wav.unlink(missing_ok=True)
    # 4. readable cues and the files to download
    progress(0.9, "write subtitles")
    stem = _stem(info, media)
    cues = make_cues(transcript, request.rules)
    files = write_outputs(transcript, work_dir, stem, request.rules)
    result = SubtitleResult(transcript=transcript, cues=cues, files=files, video=player, info=info)
    player_info = video.probe(player) if player != media else probe
    if not player_info.has_video:
        result.video = None
        result.notes.append("The source has no picture: subtitles only.")
        return result
    # 5. optional videos with the subtitles burned in or as a soft track
    if request.burn_in and cues:
        progress(0.92, "burn in subtitles")
        files["burned"] = video.burn_subtitles(player, files["srt"], work_dir / f"{stem}.subtitled.mp4")
    if request.soft_track and cues:
        progress(0.97, "add subtitle track")
        files["muxed"] = video.mux_subtitles(player, files["srt"], work_dir / f"{stem}.softsubs.mp4")
    if not cues:
        result.notes.append("No speech was found, so there are no subtitles.")
    progress(1.0, "done")
    return result


def _own_link(path: Path, work_dir: Path) -> Path:
    """The job's own hard link to an uploaded file (in ``work_dir/source/``, same name): the uploader's
    copy may be swept by age (Gradio's cache) while a long job still reads it. Across file systems,
    or for a missing file, the path itself."""
    target = work_dir / "source" / path.name
    try:
        target.parent.mkdir(exist_ok=True)
        os.link(path, target)
    except OSError:
        return path
    return target


def _stem(info: Optional[youtube.VideoInfo], media: Path) -> str:
    name = info.title if info else media.stem
    cleaned = "".join(c if c.isalnum() or c in " ._-" else "_" for c in name).strip()[:60]
    return cleaned or "subtitles"
