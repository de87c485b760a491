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
what to do; pytubefix's own exceptions and network errors are translated by
:func:`translate_error` (the original stays available as ``__cause__``).

``yt_factory`` lets callers (and tests) choose how the ``pytubefix.YouTube`` object is built,
e.g. ``functools.partial(YouTube, client="WEB", use_po_token=True)``.
"""
from __future__ import annotations

import http.client
import re
import socket
import ssl
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union
from urllib.error import HTTPError, URLError
from urllib.parse import parse_qs, urlsplit

from pytubefix import YouTube
from pytubefix import exceptions as pytube_exc

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
    "ProgressFn",
    "YOUTUBE_HOSTS",
    "normalize_youtube_url",
    "extract_video_id",
    "translate_error",
    "choose_audio_stream",
    "choose_preview_stream",
    "fetch_info",
    "download_audio",
    "download_preview",
]

PathLike = Union[str, Path]
#: Receives the download progress as a fraction in [0, 1].
ProgressFn = Callable[[float], None]
YouTubeFactory = Callable[[str], Any]

#: Hosts accepted in links (lower case, without a port).
YOUTUBE_HOSTS: frozenset[str] = frozenset({
    "youtube.com", "www.youtube.com", "m.youtube.com", "music.youtube.com",
    "youtube-nocookie.com", "www.youtube-nocookie.com", "youtu.be", "www.youtu.be",
})
_SHORT_HOSTS = frozenset({"youtu.be", "www.youtu.be"})
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{11}$")
# Path prefixes whose next part is the video id: /shorts/ID, /embed/ID, /live/ID, /v/ID, /e/ID.
_ID_PATHS = ("shorts", "embed", "live", "v", "e")
# Audio bitrates (kbps) up to this are "modest": plenty for speech recognition at 16 kHz.
_MODEST_AUDIO_KBPS = 160
_PAGE_CHANGED_HINT = ("YouTube may have changed something on its side. Try again later or update "
                      "the app (pytubefix); meanwhile you can download the video yourself and "
                      "upload the file.")


# --------------------------------------------------------------------------- errors


class YouTubeError(Exception):
    """A YouTube problem with a message meant for the user (what happened, what to do)."""

    def __init__(self, user_message: str) -> None:
        super().__init__(user_message)
        self.user_message = user_message


class InvalidYouTubeURL(YouTubeError):
    """The text is not a link to a single YouTube video."""


class VideoUnavailableError(YouTubeError):
    """Private, members-only, removed or otherwise unavailable video."""


class AgeRestrictedVideo(YouTubeError):
    """YouTube wants a signed-in, age-verified account."""


class RegionBlockedVideo(YouTubeError):
    """Not available in the country the server is in."""


class LiveStreamVideo(YouTubeError):
    """A live stream that is running, not started yet, or has no recording."""


class BotDetectedError(YouTubeError):
    """YouTube refused the client as a bot (or wants a PO token / sign-in)."""


class YouTubeNetworkError(YouTubeError):
    """YouTube could not be reached or the connection broke."""


class NoSuitableStream(YouTubeError):
    """The video has no stream of the needed kind (audio, or a progressive preview)."""


class YouTubeDownloadError(YouTubeError):
    """Anything else that went wrong while reading or downloading the video."""


def _network_message(detail: str) -> str:
    return (f"Could not reach YouTube ({detail}). Check the internet connection of the machine "
            "running Voice Studio and try again, or download the video yourself and upload the file.")


def translate_error(exc: BaseException) -> Optional[YouTubeError]:
    """The :class:`YouTubeError` for a pytubefix or network exception, or None if unknown.

    More specific pytubefix classes are checked before their bases (they all derive from
    ``VideoUnavailable``).
    """
    if isinstance(exc, YouTubeError):
        return exc
    e = pytube_exc
    if isinstance(exc, e.VideoPrivate):
        return VideoUnavailableError(
            "This YouTube video is private, so it cannot be downloaded. Ask its owner to make it "
            "public or unlisted, or use a video you can download and upload the file.")
    if isinstance(exc, e.MembersOnly):
        return VideoUnavailableError(
            "This YouTube video is for channel members only, so it cannot be downloaded here. "
            "Use a public video, or download it yourself and upload the file.")
    if isinstance(exc, (e.AgeRestrictedError, e.AgeCheckRequiredError, e.AgeCheckRequiredAccountError)):
        return AgeRestrictedVideo(
            "This YouTube video is age-restricted: YouTube only shows it to signed-in, "
            "age-verified accounts. Download it yourself and upload the file instead.")
    if isinstance(exc, (e.VideoRegionBlocked, e.VideoBlockedByCopyright)):
        return RegionBlockedVideo(
            "This YouTube video is blocked in the country this server is in. Download it "
            "yourself where it is available and upload the file.")
    if isinstance(exc, e.LiveStreamError):
        return LiveStreamVideo(
            "This is a live stream that is still running; it cannot be transcribed while it is "
            "live. Try again once the stream has ended and its recording is available.")
    if isinstance(exc, e.LiveStreamOffline):
        return LiveStreamVideo(
            "This live stream or premiere has not started yet, so there is nothing to download. "
            "Try again after it has been broadcast.")
    if isinstance(exc, (e.RecordingUnavailable, e.LiveStreamEnded)):
        return LiveStreamVideo(
            "This live stream has ended and YouTube offers no recording of it, so there is "
            "nothing to download. Use another video.")
    if isinstance(exc, (e.BotDetection, e.PoTokenRequired)):
        return BotDetectedError(
            "YouTube refused this client as a bot. Try again later, use a cookies/PO token "
            "option, or download the video yourself and upload the file.")
    if isinstance(exc, e.LoginRequired):
        reason = f" (YouTube says: {exc.reason})" if getattr(exc, "reason", None) else ""
        return VideoUnavailableError(
            f"This YouTube video can only be watched when signed in{reason}. Download it "
            "yourself and upload the file.")
    if isinstance(exc, (e.VideoRemovedByUploader, e.VideoRemovedByYouTubeForViolatingTOS,
                        e.AccountTerminated)):
        return VideoUnavailableError(
            "This YouTube video has been removed and can no longer be downloaded. Check the "
            "link, or use another video.")
    if isinstance(exc, e.InnerTubeResponseError):
        return YouTubeNetworkError(_network_message("YouTube did not answer the request"))
    if isinstance(exc, e.UnknownVideoError):
        return VideoUnavailableError(
            "YouTube would not give out this video and did not say why. Open the link in a "
            "browser to check that it plays there; if it does, " + _PAGE_CHANGED_HINT)
    if isinstance(exc, e.VideoUnavailable):
        return VideoUnavailableError(
            "This YouTube video is unavailable: it may have been removed, made private, or the "
            "link may be wrong. Open the link in a browser to check it, or use another video.")
    if isinstance(exc, e.MaxRetriesExceeded):
        return YouTubeNetworkError(_network_message("the download kept failing after several tries"))
    if isinstance(exc, (e.RegexMatchError, e.ExtractError, e.HTMLParseError,
                        e.InterpretationError, e.SABRError)):
        return YouTubeDownloadError(
            "Could not read this video's details from YouTube. " + _PAGE_CHANGED_HINT)
    if isinstance(exc, HTTPError):  # before URLError: HTTPError is a URLError
        if exc.code == 429:
            return BotDetectedError(
                "YouTube refused this client because of too many requests (HTTP 429), as it "
                "does with bots. Try again later, use a cookies/PO token option, or download "
                "the video yourself and upload the file.")
        if exc.code == 403:
            return YouTubeDownloadError(
                "YouTube refused the download (HTTP 403 Forbidden). " + _PAGE_CHANGED_HINT)
        if exc.code == 404:
            return VideoUnavailableError(
                "YouTube answered that this video was not found (HTTP 404). Check the link.")
        return YouTubeNetworkError(_network_message(f"YouTube answered with HTTP error {exc.code}"))
    if isinstance(exc, ssl.SSLError):
        return YouTubeNetworkError(_network_message(f"the secure connection failed: {exc}"))
    if isinstance(exc, URLError):
        reason = exc.reason
        if isinstance(reason, BaseException):
            inner = translate_error(reason)
            if isinstance(inner, YouTubeNetworkError):
                return inner
        return YouTubeNetworkError(_network_message(f"network error: {reason}"))
    if isinstance(exc, socket.gaierror):
        return YouTubeNetworkError(_network_message("the name youtube.com could not be resolved; "
                                                    "is the machine offline?"))
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return YouTubeNetworkError(_network_message("the connection timed out"))
    if isinstance(exc, (ConnectionError, http.client.HTTPException)):
        return YouTubeNetworkError(_network_message(f"the connection failed: {exc}"))
    if isinstance(exc, e.PytubeFixError):
        return YouTubeDownloadError(
            f"Could not get this video from YouTube ({exc}). " + _PAGE_CHANGED_HINT)
    return None


@contextmanager
def _translated_errors() -> Iterator[None]:
    """Re-raise known pytubefix / network exceptions as :class:`YouTubeError`."""
    try:
        yield
    except YouTubeError:
        raise
    except Exception as exc:  # noqa: BLE001 - only known kinds are translated, others re-raised
        mapped = translate_error(exc)
        if mapped is None:
            raise
        raise mapped from exc


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
    with _translated_errors():
        return video_id, yt_factory(f"https://www.youtube.com/watch?v={video_id}")


def fetch_info(url: str, yt_factory: YouTubeFactory = YouTube) -> VideoInfo:
    """Title, length, thumbnail and author of a video (one metadata request, no media).

    Raises:
        YouTubeError: Invalid link, unavailable video, network problems, … (see module doc).
    """
    video_id, yt = _open(url, yt_factory)
    with _translated_errors():
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
    candidates = list(streams.filter(only_audio=True))
    if not candidates:
        return None

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

    return max(candidates, key=rank)


def choose_preview_stream(streams: Any, max_height: int = 360) -> Optional[Any]:
    """Pick a progressive (audio+video) stream for the preview (None if there is none).

    mp4 first; the tallest at or below ``max_height``, else the shortest above it.
    """
    candidates = list(streams.filter(progressive=True))
    if not candidates:
        return None

    def rank(s: Any) -> tuple:
        h = _height(s)
        fits = 0 < h <= max_height
        return (getattr(s, "subtype", "") == "mp4", fits, h if fits else -h)

    return max(candidates, key=rank)


def _download(stream: Any, yt: Any, out_dir: Path, filename: str,
              progress: Optional[ProgressFn]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)

    def on_progress(stream_: Any, chunk: bytes, bytes_remaining: int) -> None:
        total = getattr(stream_, "filesize", 0) or 0
        if progress is not None and total > 0:
            progress(min(1.0, max(0.0, 1.0 - bytes_remaining / total)))

    if progress is not None:
        progress(0.0)
        yt.register_on_progress_callback(on_progress)
    with _translated_errors():
        result = stream.download(output_path=str(out_dir), filename=filename)
    path = Path(result) if result else out_dir / filename
    if not path.is_file() or path.stat().st_size == 0:
        raise YouTubeDownloadError(
            "The download from YouTube did not complete (the file is missing or empty). Try "
            "again; if it keeps failing, download the video yourself and upload the file.")
    if progress is not None:
        progress(1.0)
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
        progress: Called with the fraction downloaded, from 0.0 to 1.0.
        yt_factory: Builds the ``pytubefix.YouTube`` object from the canonical link.

    Raises:
        NoSuitableStream: The video has no stream with audio.
        YouTubeError: Any other problem (see module doc).
    """
    video_id, yt = _open(url, yt_factory)
    with _translated_errors():
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
    return _download(stream, yt, Path(out_dir), f"{video_id}-audio.{ext}", progress)


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
        progress: Called with the fraction downloaded, from 0.0 to 1.0.
        yt_factory: Builds the ``pytubefix.YouTube`` object from the canonical link.

    Raises:
        NoSuitableStream: No progressive stream exists (the audio can still be transcribed).
        YouTubeError: Any other problem (see module doc).
    """
    video_id, yt = _open(url, yt_factory)
    with _translated_errors():
        stream = choose_preview_stream(yt.streams, max_height=max_height)
    if stream is None:
        raise NoSuitableStream(
            "YouTube offers no combined video-and-audio stream for this video, so no preview can "
            "be shown. The transcription can still run from the audio.")
    name = f"{video_id}-preview-{_height(stream)}p.{stream.subtype}"
    return _download(stream, yt, Path(out_dir), name, progress)
