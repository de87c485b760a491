"""The pytubefix boundary (pipelines.subtitles.youtube), with fakes shaped like pytubefix's objects.

The fakes go through the real ``pytubefix.StreamQuery`` and raise the real pytubefix exception
classes, so stream choice and error mapping are tested against the installed library.
"""
from __future__ import annotations

import http.client
import socket
import ssl
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.error import HTTPError, URLError

import pytest
from pytubefix import StreamQuery
from pytubefix import exceptions as px

from pipelines.subtitles import youtube as yt_mod
from pipelines.subtitles.youtube import (
    AgeRestrictedVideo,
    BotDetectedError,
    InvalidYouTubeURL,
    LiveStreamVideo,
    NoSuitableStream,
    RegionBlockedVideo,
    VideoInfo,
    VideoUnavailableError,
    YouTubeDownloadError,
    YouTubeError,
    YouTubeNetworkError,
    download_audio,
    download_preview,
    fetch_info,
    normalize_youtube_url,
    translate_error,
)

VID = "dQw4w9WgXcQ"
CANON = f"https://www.youtube.com/watch?v={VID}"


# --------------------------------------------------------------------------- fakes


class FakeStream:
    """Has the attributes StreamQuery and pipelines.subtitles.youtube read; download() streams chunks."""

    def __init__(self, owner: "FakeYouTube", itag: int, mime_type: str, *, abr: Optional[str] = None,
                 resolution: Optional[str] = None, progressive: bool = False, size: int = 5000,
                 is_drc: bool = False, default_track: bool = True) -> None:
        self.owner = owner
        self.itag = itag
        self.mime_type = mime_type
        self.type, self.subtype = mime_type.split("/")
        self.abr = abr
        self.resolution = resolution
        self.height = int(resolution[:-1]) if resolution else None
        self.is_progressive = progressive
        self.is_adaptive = not progressive
        self.includes_audio_track = progressive or self.type == "audio"
        self.includes_video_track = progressive or self.type == "video"
        self.is_drc = is_drc
        self.is_default_audio_track = default_track and self.includes_audio_track
        self.filesize = size
        self.downloaded_to: list[Path] = []

    def download(self, output_path: Optional[str] = None, filename: Optional[str] = None,
                 **_: Any) -> Optional[str]:
        if self.owner.download_error is not None:
            raise self.owner.download_error
        path = Path(output_path or ".") / (filename or f"video.{self.subtype}")
        remaining = self.filesize
        with open(path, "wb") as fh:
            while remaining > 0:
                chunk = b"\0" * min(1024, remaining)
                fh.write(chunk)
                remaining -= len(chunk)
                if self.owner.on_progress is not None:
                    self.owner.on_progress(self, chunk, remaining)
        self.downloaded_to.append(path)
        return str(path)


class FakeYouTube:
    """Like pytubefix.YouTube: lazy properties that may raise, streams as a StreamQuery."""

    def __init__(self, url: str, *, error: Optional[BaseException] = None,
                 download_error: Optional[BaseException] = None,
                 specs: Optional[list[dict]] = None) -> None:
        self.url = url
        self.error = error
        self.download_error = download_error
        self.on_progress: Optional[Callable[[Any, bytes, int], None]] = None
        self._streams = [FakeStream(self, **spec) for spec in (specs if specs is not None else DEFAULT_SPECS)]

    def check_availability(self) -> None:
        if self.error is not None:
            raise self.error

    @property
    def title(self) -> str:
        self.check_availability()
        return "A test video"

    @property
    def length(self) -> int:
        self.check_availability()
        return 213

    @property
    def thumbnail_url(self) -> str:
        return f"https://i.ytimg.com/vi/{VID}/hqdefault.jpg"

    @property
    def author(self) -> str:
        return "Test Channel"

    @property
    def streams(self) -> StreamQuery:
        self.check_availability()
        return StreamQuery(self._streams)

    def register_on_progress_callback(self, func: Callable[[Any, bytes, int], None]) -> None:
        self.on_progress = func


DEFAULT_SPECS = [
    dict(itag=18, mime_type="video/mp4", resolution="360p", progressive=True, size=9000),
    dict(itag=22, mime_type="video/mp4", resolution="720p", progressive=True),
    dict(itag=137, mime_type="video/mp4", resolution="1080p"),
    dict(itag=139, mime_type="audio/mp4", abr="48kbps"),
    dict(itag=140, mime_type="audio/mp4", abr="128kbps", size=7000),
    dict(itag=141, mime_type="audio/mp4", abr="256kbps"),
    dict(itag=251, mime_type="audio/webm", abr="160kbps"),
    dict(itag=599, mime_type="audio/mp4", abr="31kbps", is_drc=True),
]


class Factory:
    """yt_factory that records the URLs pytubefix would have been given."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.urls: list[str] = []
        self.made: list[FakeYouTube] = []

    def __call__(self, url: str) -> FakeYouTube:
        self.urls.append(url)
        yt = FakeYouTube(url, **self.kwargs)
        self.made.append(yt)
        return yt


# --------------------------------------------------------------------------- URLs

ACCEPTED = [
    f"https://www.youtube.com/watch?v={VID}",
    f"http://www.youtube.com/watch?v={VID}",
    f"https://youtube.com/watch?v={VID}",
    f"https://m.youtube.com/watch?v={VID}",
    f"https://music.youtube.com/watch?v={VID}&feature=share",
    f"https://www.youtube.com/watch?v={VID}&t=42s",
    f"https://www.youtube.com/watch?t=42&v={VID}&list=PLabc123&index=3",
    f"https://www.youtube.com/watch?feature=youtu.be&v={VID}#comments",
    f"https://youtu.be/{VID}",
    f"https://youtu.be/{VID}?si=AbCdEf123&t=10",
    f"youtu.be/{VID}",
    f"www.youtube.com/watch?v={VID}",
    f"https://www.youtube.com/shorts/{VID}",
    f"https://youtube.com/shorts/{VID}?feature=share",
    f"https://www.youtube.com/embed/{VID}?start=5",
    f"https://www.youtube-nocookie.com/embed/{VID}",
    f"https://www.youtube.com/live/{VID}?si=xyz",
    f"https://www.youtube.com/v/{VID}",
    f"  https://WWW.YOUTUBE.COM/watch?v={VID}  ",
    f"https://www.youtube.com:443/watch?v={VID}",
    "https://www.youtube.com/watch?v=a-b_c1D2e3F",
]

REJECTED = [
    ("", "Paste a YouTube link"),
    ("   ", "Paste a YouTube link"),
    ("not a url at all", "spaces"),
    (f"https://vimeo.com/{VID}", "not a YouTube link"),
    (f"https://www.youtube.com.evil.example/watch?v={VID}", "not a YouTube link"),
    (f"https://evil.example/?u=https://www.youtube.com/watch?v={VID}", "not a YouTube link"),
    (f"https://www.youtube.com@evil.example/watch?v={VID}", "not a YouTube link"),
    (f"https://user@www.youtube.com/watch?v={VID}", "not a YouTube link"),
    (f"https://notyoutube.com/watch?v={VID}", "not a YouTube link"),
    (f"https://www.youtube.com:8080/watch?v={VID}", "not a YouTube link"),
    (f"https://www.youtube.com:99999/watch?v={VID}", "not a valid link"),
    (f"ftp://www.youtube.com/watch?v={VID}", "web links"),
    (f"javascript://www.youtube.com/watch?v={VID}", "web links"),
    ("https://[::1/watch", "not a valid link"),
    ("https://www.youtube.com/watch?v=", "no video id"),
    ("https://www.youtube.com/watch?list=PLabc", "no video id"),
    ("https://www.youtube.com/watch?v=short", "not valid"),
    ("https://www.youtube.com/watch?v=dQw4w9WgXcQX", "not valid"),
    ("https://www.youtube.com/watch?v=dQw4w9WgX%3F", "not valid"),
    ("https://youtu.be/dQw4w9WgX!Q", "not valid"),
    ("https://youtu.be/", "single video"),
    (f"https://youtu.be/{VID}/extra", "single video"),
    ("https://www.youtube.com/playlist?list=PLabc123", "playlist"),
    ("https://www.youtube.com/@SomeChannel", "single video"),
    ("https://www.youtube.com/", "single video"),
    ("https://www.youtube.com/results?search_query=cats", "single video"),
    (f"https://www.youtube.com/shorts/{VID}/more", "single video"),
    (None, "Paste a YouTube link"),
]


@pytest.mark.parametrize("url", ACCEPTED)
def test_accepted_urls_normalize(url: str) -> None:
    expected_id = "a-b_c1D2e3F" if "a-b_c1D2e3F" in url else VID
    assert normalize_youtube_url(url) == f"https://www.youtube.com/watch?v={expected_id}"


@pytest.mark.parametrize("url,fragment", REJECTED)
def test_rejected_urls(url: Any, fragment: str) -> None:
    with pytest.raises(InvalidYouTubeURL) as info:
        normalize_youtube_url(url)
    assert fragment.lower() in info.value.user_message.lower()
    assert isinstance(info.value, YouTubeError)
    assert str(info.value) == info.value.user_message


def test_rejected_url_never_reaches_pytubefix() -> None:
    factory = Factory()
    with pytest.raises(InvalidYouTubeURL):
        fetch_info(f"https://evil.example/watch?v={VID}", yt_factory=factory)
    with pytest.raises(InvalidYouTubeURL):
        download_audio(f"https://evil.example/watch?v={VID}", "/nonexistent", yt_factory=factory)
    assert factory.urls == []


# --------------------------------------------------------------------------- info


def test_fetch_info_uses_canonical_url() -> None:
    factory = Factory()
    info = fetch_info(f"https://youtu.be/{VID}?si=abc&t=3", yt_factory=factory)
    assert factory.urls == [CANON]
    assert info == VideoInfo(video_id=VID, title="A test video", length_seconds=213,
                             thumbnail_url=f"https://i.ytimg.com/vi/{VID}/hqdefault.jpg",
                             author="Test Channel")
    assert info.url == CANON
    assert factory.made[0]._streams[0].downloaded_to == []  # no media fetched for info


# --------------------------------------------------------------------------- streams


def test_audio_stream_choice_and_progress(tmp_path: Path) -> None:
    factory = Factory()
    fractions: list[float] = []
    path = download_audio(CANON, tmp_path / "dl", progress=lambda fraction, message: fractions.append(fraction), yt_factory=factory)
    assert path == tmp_path / "dl" / f"{VID}-audio.m4a"
    assert path.stat().st_size == 7000  # itag 140: mp4 audio, 128 kbps, not the 256 kbps one
    chosen = [s for s in factory.made[0]._streams if s.downloaded_to]
    assert [s.itag for s in chosen] == [140]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert fractions == sorted(fractions) and len(fractions) > 3
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert any(0.0 < f < 1.0 for f in fractions)


@pytest.mark.parametrize("specs,itag,ext", [
    # No mp4 audio: webm/opus is fine.
    ([dict(itag=251, mime_type="audio/webm", abr="160kbps"),
      dict(itag=250, mime_type="audio/webm", abr="70kbps")], 251, "webm"),
    # Only big ones: the smallest above the modest limit.
    ([dict(itag=141, mime_type="audio/mp4", abr="256kbps"),
      dict(itag=999, mime_type="audio/mp4", abr="320kbps")], 141, "m4a"),
    # A dubbed track is not the original.
    ([dict(itag=140, mime_type="audio/mp4", abr="128kbps", default_track=False),
      dict(itag=139, mime_type="audio/mp4", abr="48kbps")], 139, "m4a"),
    # No audio-only stream: the smallest progressive one.
    ([dict(itag=22, mime_type="video/mp4", resolution="720p", progressive=True),
      dict(itag=18, mime_type="video/mp4", resolution="360p", progressive=True),
      dict(itag=137, mime_type="video/mp4", resolution="1080p")], 18, "mp4"),
])
def test_audio_stream_fallbacks(tmp_path: Path, specs: list[dict], itag: int, ext: str) -> None:
    factory = Factory(specs=specs)
    path = download_audio(CANON, tmp_path, yt_factory=factory)
    assert path.suffix == f".{ext}"
    assert [s.itag for s in factory.made[0]._streams if s.downloaded_to] == [itag]


def test_no_audio_stream(tmp_path: Path) -> None:
    factory = Factory(specs=[dict(itag=137, mime_type="video/mp4", resolution="1080p")])
    with pytest.raises(NoSuitableStream, match="no audio stream"):
        download_audio(CANON, tmp_path, yt_factory=factory)


@pytest.mark.parametrize("max_height,itag", [(360, 18), (480, 18), (720, 22), (1080, 22), (240, 18)])
def test_preview_stream_choice(tmp_path: Path, max_height: int, itag: int) -> None:
    factory = Factory()
    fractions: list[float] = []
    path = download_preview(CANON, tmp_path, max_height=max_height, progress=lambda fraction, message: fractions.append(fraction),
                            yt_factory=factory)
    chosen = [s for s in factory.made[0]._streams if s.downloaded_to]
    assert [s.itag for s in chosen] == [itag]  # never the adaptive 1080p, never above the limit if avoidable
    assert path.name == f"{VID}-preview-{chosen[0].height}p.mp4"
    assert fractions[-1] == 1.0


def test_preview_prefers_mp4_and_lowest_above_limit(tmp_path: Path) -> None:
    factory = Factory(specs=[
        dict(itag=43, mime_type="video/webm", resolution="360p", progressive=True),
        dict(itag=22, mime_type="video/mp4", resolution="720p", progressive=True),
        dict(itag=37, mime_type="video/mp4", resolution="1080p", progressive=True),
    ])
    download_preview(CANON, tmp_path, max_height=360, yt_factory=factory)
    assert [s.itag for s in factory.made[0]._streams if s.downloaded_to] == [22]


def test_no_preview_stream(tmp_path: Path) -> None:
    factory = Factory(specs=[dict(itag=140, mime_type="audio/mp4", abr="128kbps")])
    with pytest.raises(NoSuitableStream, match="preview"):
        download_preview(CANON, tmp_path, yt_factory=factory)


def test_empty_download_is_an_error(tmp_path: Path) -> None:
    factory = Factory(specs=[dict(itag=140, mime_type="audio/mp4", abr="128kbps", size=0)])
    with pytest.raises(YouTubeDownloadError, match="did not complete"):
        download_audio(CANON, tmp_path, yt_factory=factory)


# --------------------------------------------------------------------------- errors

ERRORS = [
    (px.VideoPrivate(VID), VideoUnavailableError, "private"),
    (px.MembersOnly(VID), VideoUnavailableError, "members only"),
    (px.VideoUnavailable(VID), VideoUnavailableError, "unavailable"),
    (px.VideoRemovedByUploader(VID), VideoUnavailableError, "removed"),
    (px.VideoRemovedByYouTubeForViolatingTOS(VID), VideoUnavailableError, "removed"),
    (px.AccountTerminated(VID), VideoUnavailableError, "removed"),
    (px.LoginRequired(VID, "Sign in to view"), VideoUnavailableError, "signed in"),
    (px.AgeRestrictedError(VID), AgeRestrictedVideo, "age-restricted"),
    (px.AgeCheckRequiredError(VID), AgeRestrictedVideo, "age-restricted"),
    (px.AgeCheckRequiredAccountError(VID), AgeRestrictedVideo, "age-restricted"),
    (px.VideoRegionBlocked(VID), RegionBlockedVideo, "country"),
    (px.VideoBlockedByCopyright(VID), RegionBlockedVideo, "country"),
    (px.LiveStreamError(VID), LiveStreamVideo, "live"),
    (px.LiveStreamOffline(VID, "Premieres in 2 hours"), LiveStreamVideo, "not started"),
    (px.RecordingUnavailable(VID), LiveStreamVideo, "no recording"),
    (px.BotDetection(VID), BotDetectedError, "refused this client as a bot"),
    (px.PoTokenRequired(VID, "WEB"), BotDetectedError, "cookies/PO token"),
    (px.RegexMatchError("get_throttling_function_name", "abc"), YouTubeDownloadError, "update"),
    (px.HTMLParseError("bad html"), YouTubeDownloadError, "details"),
    (px.MaxRetriesExceeded(), YouTubeNetworkError, "Could not reach YouTube"),
    (px.InnerTubeResponseError(VID, "WEB"), YouTubeNetworkError, "Could not reach YouTube"),
    (URLError(socket.gaierror(-3, "Temporary failure in name resolution")), YouTubeNetworkError,
     "offline"),
    (URLError("unknown url type"), YouTubeNetworkError, "Could not reach YouTube"),
    (socket.gaierror(-2, "Name or service not known"), YouTubeNetworkError, "offline"),
    (socket.timeout("timed out"), YouTubeNetworkError, "timed out"),
    (ConnectionResetError(104, "Connection reset by peer"), YouTubeNetworkError, "connection failed"),
    (http.client.RemoteDisconnected("Remote end closed connection"), YouTubeNetworkError,
     "connection failed"),
    (http.client.IncompleteRead(b"abc", 10), YouTubeNetworkError, "connection failed"),
    (ssl.SSLError(1, "CERTIFICATE_VERIFY_FAILED"), YouTubeNetworkError, "secure connection"),
    (HTTPError(CANON, 429, "Too Many Requests", {}, None), BotDetectedError, "429"),
    (HTTPError(CANON, 403, "Forbidden", {}, None), YouTubeDownloadError, "403"),
    (HTTPError(CANON, 404, "Not Found", {}, None), VideoUnavailableError, "404"),
    (HTTPError(CANON, 503, "Unavailable", {}, None), YouTubeNetworkError, "503"),
    (px.PytubeFixError("something odd"), YouTubeDownloadError, "something odd"),
    (px.UnknownVideoError(VID, status="ODD", reason="odd"), VideoUnavailableError, "did not say why"),
]


@pytest.mark.parametrize("exc,kind,fragment", ERRORS, ids=[type(e[0]).__name__ for e in ERRORS])
def test_errors_from_info_are_translated(exc: BaseException, kind: type, fragment: str) -> None:
    with pytest.raises(kind) as info:
        fetch_info(CANON, yt_factory=Factory(error=exc))
    message = info.value.user_message
    assert fragment.lower() in message.lower()
    assert info.value.__cause__ is exc
    assert "DO NOT OPEN AN ISSUE" not in message  # pytubefix's developer text stays out
    assert message.rstrip().endswith(".")


def test_bot_message_says_what_to_do() -> None:
    err = translate_error(px.BotDetection(VID))
    assert err is not None
    assert err.user_message == (
        "YouTube refused this client as a bot. Try again later, use a cookies/PO token option, "
        "or download the video yourself and upload the file.")


@pytest.mark.parametrize("exc,kind", [
    (px.VideoPrivate(VID), VideoUnavailableError),
    (px.BotDetection(VID), BotDetectedError),
    (URLError(OSError(101, "Network is unreachable")), YouTubeNetworkError),
])
def test_errors_from_streams_and_download_are_translated(tmp_path: Path, exc: BaseException,
                                                         kind: type) -> None:
    with pytest.raises(kind):
        download_audio(CANON, tmp_path, yt_factory=Factory(error=exc))
    with pytest.raises(kind):
        download_preview(CANON, tmp_path, yt_factory=Factory(download_error=exc))


def test_unknown_errors_are_not_hidden(tmp_path: Path) -> None:
    assert translate_error(ValueError("bug")) is None
    with pytest.raises(ValueError, match="bug"):
        fetch_info(CANON, yt_factory=Factory(error=ValueError("bug")))

    def failing_progress(fraction: float, message: str) -> None:
        if fraction > 0.5:
            raise KeyboardInterrupt  # e.g. the user cancelled
    with pytest.raises(KeyboardInterrupt):
        download_audio(CANON, tmp_path, progress=failing_progress, yt_factory=Factory())


def test_factory_errors_are_translated() -> None:
    def factory(url: str) -> Any:
        raise px.RegexMatchError("video_id", "regex")
    with pytest.raises(YouTubeDownloadError):
        fetch_info(CANON, yt_factory=factory)


def test_default_factory_is_pytubefix() -> None:
    import inspect

    from pytubefix import YouTube

    for fn in (yt_mod.fetch_info, yt_mod.download_audio, yt_mod.download_preview):
        assert inspect.signature(fn).parameters["yt_factory"].default is YouTube
