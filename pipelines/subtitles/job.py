"""Video to subtitles, as one straight line: source -> audio -> transcript -> cues -> files -> video.

The source is a YouTube URL (downloaded with pytubefix: an audio stream for transcription and a
modest progressive stream for the preview) or a local video file. The audio is extracted to a
16 kHz mono WAV and transcribed window by window (voice activity detection picks the windows), so
an hour of video never sits in memory as one array.

:func:`make_subtitles` runs the line once; :func:`compare_subtitles` fetches the video and extracts
its audio once, then transcribes that audio with the FP16 and the INT8 model, timed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

from pipelines.core.compare import PrecisionRun
from pipelines.core.progress import ProgressFn, no_progress, scaled
from pipelines.core.types import ModelChoice
from pipelines.speech import audio
from pipelines.speech.service import WhisperService
from pipelines.speech.types import TranscribeOptions, Transcript
from pipelines.subtitles import video, youtube
from pipelines.subtitles.cues import Cue, CueRules, make_cues
from pipelines.subtitles.formats import write_outputs


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


@dataclass
class Source:
    """The request's media, fetched: where the audio comes from, what to play, and what is known of it."""

    media: Path
    player: Path
    info: Optional[youtube.VideoInfo]
    probe: Optional[video.MediaInfo] = None

    @property
    def stem(self) -> str:
        name = self.info.title if self.info else self.media.stem
        cleaned = "".join(c if c.isalnum() or c in " ._-" else "_" for c in name).strip()[:60]
        return cleaned or "subtitles"


class SubtitleInputError(ValueError):
    """The request names no usable source; the message says what to do."""


def _refuse_longer(seconds: Optional[float], max_seconds: float) -> None:
    message = audio.too_long("The video", seconds, max_seconds)
    if message:
        raise SubtitleInputError(message)


def make_subtitles(whisper: WhisperService, request: SubtitleRequest, work_dir: Path,
                   progress: ProgressFn = no_progress, yt_factory: Callable[[str], Any] = youtube.YouTube
                   ) -> SubtitleResult:
    """Subtitles for ``request``'s video, written under ``work_dir``. The extracted WAV (about 115 MB
    per hour) and a downloaded audio-only stream are deleted once transcribed."""
    source = fetch_source(request, work_dir, progress, yt_factory)
    wav = extract_audio(source, request, work_dir, progress)
    try:
        transcript = whisper.transcribe_file(wav, request.choice, request.options, scaled(progress, 0.3, 0.9))
    finally:
        wav.unlink(missing_ok=True)
    return finish(source, transcript, request, work_dir, progress)


@dataclass
class SubtitleComparison:
    """The same audio's subtitles by the FP16 and the INT8 model: each run timed, its cues and files."""

    runs: list[PrecisionRun]
    cues: dict[str, list[Cue]]
    files: dict[str, dict[str, Path]]  # precision -> {"srt", "vtt", "txt", "json"}


def compare_subtitles(whisper: WhisperService, request: SubtitleRequest, work_dir: Path,
                      progress: ProgressFn = no_progress, yt_factory: Callable[[str], Any] = youtube.YouTube
                      ) -> SubtitleComparison:
    """Fetch the video and extract its audio once, transcribe it with both precisions (timed, see
    :meth:`WhisperService.compare`), and write each one's files as ``<title>.fp16.srt`` and so on."""
    source = fetch_source(request, work_dir, progress, yt_factory)
    wav = extract_audio(source, request, work_dir, progress)
    try:
        runs = whisper.compare(wav, replace(request.choice, precision="fp16"), request.options,
                               scaled(progress, 0.3, 0.95))
    finally:
        wav.unlink(missing_ok=True)
    cues = {run.precision: make_cues(run.value, request.rules) for run in runs}
    files = {run.precision: write_outputs(run.value, work_dir, f"{source.stem}.{run.precision}", request.rules)
             for run in runs}
    progress(1.0, "done")
    return SubtitleComparison(runs, cues, files)


def fetch_source(request: SubtitleRequest, work_dir: Path, progress: ProgressFn = no_progress,
                 yt_factory: Callable[[str], Any] = youtube.YouTube, preview: bool = True) -> Source:
    """Step 1, the source media: a YouTube download (audio, and with ``preview`` a small video to play
    the subtitles with) or the uploaded file."""
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    if request.url and request.url.strip():
        url = youtube.normalize_youtube_url(request.url)  # raises for any non-YouTube link
        progress(0.0, "read video details")
        info = youtube.fetch_info(url, yt_factory=yt_factory)
        _refuse_longer(info.length_seconds, request.max_seconds)
        media = youtube.download_audio(url, work_dir, yt_factory=yt_factory, progress=scaled(progress, 0.02, 0.2))
        if not preview:
            return Source(media, media, info)
        try:
            player = youtube.download_preview(url, work_dir, yt_factory=yt_factory,
                                              progress=scaled(progress, 0.2, 0.25))
        except youtube.NoSuitableStream:
            player = media  # no progressive stream to preview: subtitles from the audio alone
        return Source(media, player, info)
    if request.video_path:
        media = _own_link(Path(request.video_path), Path(work_dir))
        return Source(media, media, None)
    raise SubtitleInputError("Give a YouTube link or upload a video file.")


def extract_audio(source: Source, request: SubtitleRequest, work_dir: Path, progress: ProgressFn = no_progress) -> Path:
    """Step 2, its audio track as a 16 kHz mono WAV; a downloaded audio-only stream is deleted then."""
    progress(0.25, "extract audio")
    source.probe = video.probe(source.media)
    _refuse_longer(source.probe.duration, request.max_seconds)
    wav = video.extract_audio(source.media, Path(work_dir) / "audio.wav")
    if source.media != source.player:  # a downloaded audio-only stream: its samples are in the WAV now
        source.media.unlink(missing_ok=True)
    return wav


def finish(source: Source, transcript: Transcript, request: SubtitleRequest, work_dir: Path,
           progress: ProgressFn = no_progress) -> SubtitleResult:
    """Steps 4 and 5: readable cues, the files to download, and the videos with subtitles when asked."""
    progress(0.9, "write subtitles")
    work_dir, stem = Path(work_dir), source.stem
    cues = make_cues(transcript, request.rules)
    files = write_outputs(transcript, work_dir, stem, request.rules)
    result = SubtitleResult(transcript=transcript, cues=cues, files=files, video=source.player, info=source.info)
    player_info = video.probe(source.player) if source.player != source.media or source.probe is None else source.probe
    if not player_info.has_video:
        result.video = None
        result.notes.append("The source has no picture: subtitles only.")
        return result
    if request.burn_in and cues:
        progress(0.92, "burn in subtitles")
        files["burned"] = video.burn_subtitles(source.player, files["srt"], work_dir / f"{stem}.subtitled.mp4")
    if request.soft_track and cues:
        progress(0.97, "add subtitle track")
        files["muxed"] = video.mux_subtitles(source.player, files["srt"], work_dir / f"{stem}.softsubs.mp4")
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
