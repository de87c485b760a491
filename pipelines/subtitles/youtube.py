"""YouTube input through pytubefix: check the link, read the video's details, download media.

Only YouTube hosts are ever contacted: :func:`normalize_youtube_url` turns every accepted link
into ``https://www.youtube.com/watch?v=ID`` and rejects everything else before pytubefix sees it.

Typical use (the UI shows the info first, then does the long work)::

    info = fetch_info(url)                       # title, length, thumbnail, author
    audio = download_audio(url, work_dir, progress=report)        # for transcription
    preview = download_preview(url, work_dir, max_height=360)     # small progressive mp4

Only what is needed is downloaded: one audio-only stream of modest bitrate, and for the
preview a progressive (audio+video) mp4 at or below ``max_height``, never the best resolution.

Every failure is raised as a :class:`YouTubeError` whose ``user_message`` says what happened and
what to do (:mod:`pipelines.subtitles.youtube_errors`).

``yt_factory`` lets callers (and tests) choose how the ``pytubefix.YouTube`` object is built,
e.g. ``functools.partial(YouTube, client="WEB", use_po_token=True)``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union
from urllib.parse import parse_qs, urlsplit

from pytubefix import Playlist, YouTube

from pipelines.core.progress import ProgressFn
from pipelines.subtitles.youtube_errors import (AgeRestrictedVideo, BotDetectedError, InvalidYouTubeURL, LiveStreamVideo,
                                               NoSuitableStream, RegionBlockedVideo, VideoUnavailableError,
                                               YouTubeDownloadError, YouTubeError, YouTubeNetworkError,
                                               translate_error, translated_errors)

__all__ = [
    "YouTubeError",
    "InvalidYouTubeURL",
    "VideoUnavailableError",
    "AgeRestrictedVideo",
    "RegionBlockedVideo",
    "LiveStreamVideo",
    "BotDetectedError",
    "YouTubeNetworkError",
    "NoSuitableStream",
    "YouTubeDownloadError",
    "VideoInfo",
    "YOUTUBE_HOSTS",
    "normalize_youtube_url",
    "extract_video_id",
    "translate_error",
    "choose_audio_stream",
    "choose_preview_stream",
    "fetch_info",
    "download_audio",
    "download_preview",
    "playlist_id",
    "playlist_video_urls",
]

PathLike = Union[str, Path]
YouTubeFactory = Callable[[str], Any]
PlaylistFactory = Callable[[str], Any]  # url -> an object with ``video_urls`` (pytubefix.Playlist)

#: Hosts accepted in links (lower case, without a port).
YOUTUBE_HOSTS: frozenset[str] = frozenset({
    "youtube.com", "www.youtube.com", "m.youtube.com", "music.youtube.com",
    "youtube-nocookie.com", "www.youtube-nocookie.com", "youtu.be", "www.youtu.be",
})
_SHORT_HOSTS = frozenset({"youtu.be", "www.youtu.be"})
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{11}$")
_LIST_RE = re.compile(r"^[A-Za-z0-9_-]{10,64}$")
# Path prefixes whose next part is the video id: /shorts/ID, /embed/ID, /live/ID, /v/ID, /e/ID.
_ID_PATHS = ("shorts", "embed", "live", "v", "e")
# Audio bitrates (kbps) up to this are "modest": plenty for speech recognition at 16 kHz.
_MODEST_AUDIO_KBPS = 160


# --------------------------------------------------------------------------- links


def extract_video_id(url: str) -> str:
    """The 11-character video id of a YouTube link (see :func:`normalize_youtube_url`).

    Raises:
        InvalidYouTubeURL: For anything that is not a link to one YouTube video.
    """
    if not isinstance(url, str) or not url.strip():
        raise InvalidYouTubeURL("Paste a YouTube link, for example https://www.youtube.com/watch?v=… "
                                "or https://youtu.be/….")
    text = url.strip()
    if any(ch.isspace() for ch in text):
        raise InvalidYouTubeURL("This YouTube link contains spaces. Paste the link exactly as "
                                "copied from YouTube's Share button or address bar.")
    if "://" not in text and not text.startswith("//"):
        text = "https://" + text  # "youtu.be/ID", "www.youtube.com/watch?v=ID"
    try:
        parts = urlsplit(text)
        port = parts.port
        host = (parts.hostname or "").lower().rstrip(".")
    except ValueError:
        raise InvalidYouTubeURL("This is not a valid link. Paste the address of a YouTube "
                                "video, for example https://www.youtube.com/watch?v=….") from None
    if parts.scheme.lower() not in ("http", "https", ""):
        raise InvalidYouTubeURL("Only web links (https://…) to YouTube videos are accepted.")
    if host not in YOUTUBE_HOSTS or parts.username or parts.password or port not in (None, 80, 443):
        raise InvalidYouTubeURL(
            "This is not a YouTube link. Only youtube.com and youtu.be video links are accepted; "
            "for other videos, download the file and upload it.")

    segments = [p for p in parts.path.split("/") if p]
    query = parse_qs(parts.query)
    video_id: Optional[str] = None
    if host in _SHORT_HOSTS:
        if len(segments) == 1:
            video_id = segments[0]
    elif segments == ["watch"]:
        values = query.get("v")
        if not values:
            raise InvalidYouTubeURL("This YouTube link has no video id (the v=… part is missing). "
                                    "Copy the link again from the video's page.")
        video_id = values[0]
    elif len(segments) == 2 and segments[0] in _ID_PATHS:
        video_id = segments[1]
    elif segments and segments[0] == "playlist":
        raise InvalidYouTubeURL("This is a link to a playlist. Open one video of the playlist "
                                "and paste that video's link.")
    if video_id is None:
        raise InvalidYouTubeURL("This YouTube link does not point to a single video (channel, "
                                "search or home page?). Open the video and copy its link.")
    if not _ID_RE.match(video_id):
        raise InvalidYouTubeURL(f"This YouTube link's video id {video_id[:40]!r} is not valid "
                                "(it should be 11 letters, digits, '-' or '_'). Copy the link again.")
    return video_id


def normalize_youtube_url(url: str) -> str:
    """Check a YouTube link and return it as ``https://www.youtube.com/watch?v=ID``.

    Accepts ``youtube.com/watch?v=ID`` (also ``www.``, ``m.``, ``music.``), ``youtu.be/ID``,
    ``/shorts/ID``, ``/embed/ID``, ``/live/ID`` and ``/v/ID``, with or without a scheme and with
    extra query parameters (``t=``, ``si=``, ``list=``, …), which are dropped.

    Raises:
        InvalidYouTubeURL: Not a YouTube host, malformed link, playlist/channel link or bad id.
    """
    return f"https://www.youtube.com/watch?v={extract_video_id(url)}"


def playlist_id(url: str) -> Optional[str]:
    """The list id when ``url`` is a link to a YouTube playlist page (``youtube.com/playlist?list=ID``),
    else None. A video link that also names a playlist (``watch?v=ID&list=...``) is that one video."""
    text = (url or "").strip()
    if "://" not in text and not text.startswith("//"):
        text = "https://" + text
    try:
        parts = urlsplit(text)
        host = (parts.hostname or "").lower().rstrip(".")
    except ValueError:
        return None
    if host not in YOUTUBE_HOSTS or parts.username or [p for p in parts.path.split("/") if p] != ["playlist"]:
        return None
    values = parse_qs(parts.query).get("list") or [""]
    return values[0] if _LIST_RE.match(values[0]) else None


def playlist_video_urls(url: str, playlist_factory: PlaylistFactory = Playlist, limit: int = 500) -> list[str]:
    """The links of a playlist's videos (``https://www.youtube.com/watch?v=ID``), in the playlist's
    order, at most ``limit`` of them (the page is read no further).

    Raises:
        InvalidYouTubeURL: ``url`` is not a playlist link.
        YouTubeError: The playlist could not be read (private, removed, network, ...), or it is empty.
    """
    list_id = playlist_id(url)
    if list_id is None:
        raise InvalidYouTubeURL("This is not a link to a YouTube playlist (https://www.youtube.com/playlist?list=…).")
    urls: list[str] = []
    with translated_errors():
        for video_url in playlist_factory(f"https://www.youtube.com/playlist?list={list_id}").video_urls:
            urls.append(normalize_youtube_url(video_url))
            if len(urls) >= limit:
                break
    if not urls:
        raise VideoUnavailableError("This YouTube playlist shows no videos: it may be private, empty or removed. "
                                    "Open it in a browser to check, or paste the videos' links instead.")
    return urls


# --------------------------------------------------------------------------- info


@dataclass(frozen=True)
class VideoInfo:
    """What the UI shows before downloading."""

    video_id: str
    title: str
    length_seconds: int
    thumbnail_url: str
    author: str

    @property
    def url(self) -> str:
        """Canonical watch link."""
        return f"https://www.youtube.com/watch?v={self.video_id}"


def _open(url: str, yt_factory: YouTubeFactory) -> tuple[str, Any]:
    video_id = extract_video_id(url)
    with translated_errors():
        return video_id, yt_factory(f"https://www.youtube.com/watch?v={video_id}")


def fetch_info(url: str, yt_factory: YouTubeFactory = YouTube) -> VideoInfo:
    """Title, length, thumbnail and author of a video (one metadata request, no media).

    Raises:
        YouTubeError: Invalid link, unavailable video, network problems, … (see module doc).
    """
    video_id, yt = _open(url, yt_factory)
    with translated_errors():
        check = getattr(yt, "check_availability", None)
        if callable(check):
            check()
        title = str(yt.title or "")
        try:
            length = int(yt.length or 0)
        except (TypeError, ValueError):  # lengthSeconds missing (e.g. upcoming live)
            length = 0
        thumbnail = str(yt.thumbnail_url or "")
        author = str(yt.author or "")
    return VideoInfo(video_id=video_id, title=title or video_id, length_seconds=max(0, length),
                     thumbnail_url=thumbnail, author=author)


# --------------------------------------------------------------------------- streams


def _kbps(stream: Any) -> int:
    digits = "".join(ch for ch in str(getattr(stream, "abr", "") or "") if ch.isdigit())
    return int(digits) if digits else 0


def _height(stream: Any) -> int:
    height = getattr(stream, "height", None)
    if isinstance(height, int) and height > 0:
        return height
    digits = re.match(r"\d+", str(getattr(stream, "resolution", "") or ""))
    return int(digits.group()) if digits else 0


def choose_audio_stream(streams: Any) -> Optional[Any]:
    """Pick the audio-only stream to transcribe from a ``StreamQuery`` (None if there is none).

    Prefers the original (not dubbed), normal-volume (not DRC) track, mp4/m4a (AAC) over webm,
    and the highest bitrate up to 160 kbps (the lowest above when none is that modest).
    """
    def rank(s: Any) -> tuple:
        kbps = _kbps(s)
        modest = 0 < kbps <= _MODEST_AUDIO_KBPS
        return (
            bool(getattr(s, "is_default_audio_track", True)),
            not bool(getattr(s, "is_drc", False)),
            getattr(s, "subtype", "") == "mp4",
            modest,
            kbps if modest else -kbps,
        )

    return max(streams.filter(only_audio=True), key=rank, default=None)


def choose_preview_stream(streams: Any, max_height: int = 360) -> Optional[Any]:
    """Pick a progressive (audio+video) stream for the preview (None if there is none).

    mp4 first; the tallest at or below ``max_height``, else the shortest above it.
    """
    def rank(s: Any) -> tuple:
        h = _height(s)
        fits = 0 < h <= max_height
        return (getattr(s, "subtype", "") == "mp4", fits, h if fits else -h)

    return max(streams.filter(progressive=True), key=rank, default=None)


def _download(stream: Any, yt: Any, out_dir: Path, filename: str,
              progress: Optional[ProgressFn], what: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)

    def on_progress(stream_: Any, chunk: bytes, bytes_remaining: int) -> None:
        total = getattr(stream_, "filesize", 0) or 0
        if progress is not None and total > 0:
            progress(min(1.0, max(0.0, 1.0 - bytes_remaining / total)), what)

    if progress is not None:
        progress(0.0, what)
        yt.register_on_progress_callback(on_progress)
    with translated_errors():
        result = stream.download(output_path=str(out_dir), filename=filename)
    path = Path(result) if result else out_dir / filename
    if not path.is_file() or path.stat().st_size == 0:
        raise YouTubeDownloadError(
            "The download from YouTube did not complete (the file is missing or empty). Try "
            "again; if it keeps failing, download the video yourself and upload the file.")
    if progress is not None:
        progress(1.0, what)
    return path


def download_audio(
    url: str,
    out_dir: PathLike,
    progress: Optional[ProgressFn] = None,
    yt_factory: YouTubeFactory = YouTube,
) -> Path:
    """Download only the audio of a video (see :func:`choose_audio_stream`).

    Falls back to the smallest progressive stream when YouTube offers no audio-only stream.

    Args:
        url: Any accepted YouTube link.
        out_dir: Folder for the file (created if missing); named ``<id>-audio.<ext>``.
        progress: Called with the fraction downloaded, from 0.0 to 1.0, and what is downloaded.
        yt_factory: Builds the ``pytubefix.YouTube`` object from the canonical link.

    Raises:
        NoSuitableStream: The video has no stream with audio.
        YouTubeError: Any other problem (see module doc).
    """
    video_id, yt = _open(url, yt_factory)
    with translated_errors():
        streams = yt.streams
        stream = choose_audio_stream(streams)
        if stream is None:
            stream = choose_preview_stream(streams, max_height=0)
    if stream is None:
        raise NoSuitableStream(
            "YouTube offers no audio stream for this video, so there is nothing to transcribe. "
            "Check that the video has sound, or download it yourself and upload the file.")
    audio_only = getattr(stream, "type", "audio") == "audio"
    ext = ("m4a" if audio_only else "mp4") if stream.subtype == "mp4" else stream.subtype
    return _download(stream, yt, Path(out_dir), f"{video_id}-audio.{ext}", progress, "download audio")


def download_preview(
    url: str,
    out_dir: PathLike,
    max_height: int = 360,
    progress: Optional[ProgressFn] = None,
    yt_factory: YouTubeFactory = YouTube,
) -> Path:
    """Download a modest progressive (audio+video) file to preview, not the best resolution.

    Args:
        url: Any accepted YouTube link.
        out_dir: Folder for the file (created if missing); named ``<id>-preview-<h>p.<ext>``.
        max_height: Tallest picture wanted (see :func:`choose_preview_stream`).
        progress: Called with the fraction downloaded, from 0.0 to 1.0, and what is downloaded.
        yt_factory: Builds the ``pytubefix.YouTube`` object from the canonical link.

    Raises:
        NoSuitableStream: No progressive stream exists (the audio can still be transcribed).
        YouTubeError: Any other problem (see module doc).
    """
    video_id, yt = _open(url, yt_factory)
    with translated_errors():
        stream = choose_preview_stream(yt.streams, max_height=max_height)
    if stream is None:
        raise NoSuitableStream(
            "YouTube offers no combined video-and-audio stream for this video, so no preview can "
            "be shown. The transcription can still run from the audio.")
    name = f"{video_id}-preview-{_height(stream)}p.{stream.subtype}"
    return _download(stream, yt, Path(out_dir), name, progress, "download preview")
