"""What can go wrong when asking YouTube for a video, said for the user.

Every failure is a :class:`YouTubeError` whose ``user_message`` says what happened and what to do;
pytubefix's own exceptions and network errors are translated by :func:`translate_error`, a reading of
the tables below, and :func:`translated_errors` re-raises them so (the original stays available as
``__cause__``).
"""
from __future__ import annotations

import http.client
import socket
import ssl
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Union
from urllib.error import HTTPError, URLError

from pytubefix import exceptions as pytube_exc

_PAGE_CHANGED_HINT = ("YouTube may have changed something on its side. Try again later or update "
                      "the app (pytubefix); meanwhile you can download the video yourself and "
                      "upload the file.")


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


_E = pytube_exc
#: pytubefix's exceptions, most specific first (they all derive from ``VideoUnavailable``): the
#: error each becomes and its message (a function of the exception where the message quotes it).
_PYTUBE_ERRORS: tuple[tuple[tuple[type, ...], type, Union[str, Callable[[Any], str]]], ...] = (
    ((_E.VideoPrivate,), VideoUnavailableError,
     "This YouTube video is private, so it cannot be downloaded. Ask its owner to make it public or unlisted, "
     "or use a video you can download and upload the file."),
    ((_E.MembersOnly,), VideoUnavailableError,
     "This YouTube video is for channel members only, so it cannot be downloaded here. Use a public video, or "
     "download it yourself and upload the file."),
    ((_E.AgeRestrictedError, _E.AgeCheckRequiredError, _E.AgeCheckRequiredAccountError), AgeRestrictedVideo,
     "This YouTube video is age-restricted: YouTube only shows it to signed-in, age-verified accounts. Download "
     "it yourself and upload the file instead."),
    ((_E.VideoRegionBlocked, _E.VideoBlockedByCopyright), RegionBlockedVideo,
     "This YouTube video is blocked in the country this server is in. Download it yourself where it is "
     "available and upload the file."),
    ((_E.LiveStreamError,), LiveStreamVideo,
     "This is a live stream that is still running; it cannot be transcribed while it is live. Try again once "
     "the stream has ended and its recording is available."),
    ((_E.LiveStreamOffline,), LiveStreamVideo,
     "This live stream or premiere has not started yet, so there is nothing to download. Try again after it "
     "has been broadcast."),
    ((_E.RecordingUnavailable, _E.LiveStreamEnded), LiveStreamVideo,
     "This live stream has ended and YouTube offers no recording of it, so there is nothing to download. Use "
     "another video."),
    ((_E.BotDetection, _E.PoTokenRequired), BotDetectedError,
     "YouTube refused this client as a bot. Try again later, use a cookies/PO token option, or download the "
     "video yourself and upload the file."),
    ((_E.LoginRequired,), VideoUnavailableError,
     lambda exc: "This YouTube video can only be watched when signed in"
                 + (f" (YouTube says: {exc.reason})" if getattr(exc, "reason", None) else "")
                 + ". Download it yourself and upload the file."),
    ((_E.VideoRemovedByUploader, _E.VideoRemovedByYouTubeForViolatingTOS, _E.AccountTerminated),
     VideoUnavailableError,
     "This YouTube video has been removed and can no longer be downloaded. Check the link, or use another video."),
    ((_E.InnerTubeResponseError,), YouTubeNetworkError,
     lambda exc: _network_message("YouTube did not answer the request")),
    ((_E.UnknownVideoError,), VideoUnavailableError,
     "YouTube would not give out this video and did not say why. Open the link in a browser to check that it "
     "plays there; if it does, " + _PAGE_CHANGED_HINT),
    ((_E.VideoUnavailable,), VideoUnavailableError,
     "This YouTube video is unavailable: it may have been removed, made private, or the link may be wrong. Open "
     "the link in a browser to check it, or use another video."),
    ((_E.MaxRetriesExceeded,), YouTubeNetworkError,
     lambda exc: _network_message("the download kept failing after several tries")),
    ((_E.RegexMatchError, _E.ExtractError, _E.HTMLParseError, _E.InterpretationError, _E.SABRError),
     YouTubeDownloadError, "Could not read this video's details from YouTube. " + _PAGE_CHANGED_HINT),
)
#: HTTP errors YouTube answers with, by status code (any other code is a network error).
_HTTP_ERRORS: dict[int, tuple[type, str]] = {
    429: (BotDetectedError, "YouTube refused this client because of too many requests (HTTP 429), as it does with "
                            "bots. Try again later, use a cookies/PO token option, or download the video yourself "
                            "and upload the file."),
    403: (YouTubeDownloadError, "YouTube refused the download (HTTP 403 Forbidden). " + _PAGE_CHANGED_HINT),
    404: (VideoUnavailableError, "YouTube answered that this video was not found (HTTP 404). Check the link."),
}
#: Network failures below HTTP, each as the detail of a "could not reach YouTube" message.
_NETWORK_ERRORS: tuple[tuple[tuple[type, ...], Callable[[Any], str]], ...] = (
    ((ssl.SSLError,), lambda exc: f"the secure connection failed: {exc}"),
    ((socket.gaierror,), lambda exc: "the name youtube.com could not be resolved; is the machine offline?"),
    ((socket.timeout, TimeoutError), lambda exc: "the connection timed out"),
    ((ConnectionError, http.client.HTTPException), lambda exc: f"the connection failed: {exc}"),
)


def translate_error(exc: BaseException) -> Optional[YouTubeError]:
    """The :class:`YouTubeError` for a pytubefix or network exception, or None if unknown (the tables
    above, in order: more specific pytubefix classes before their bases)."""
    if isinstance(exc, YouTubeError):
        return exc
    for kinds, error, message in _PYTUBE_ERRORS:
        if isinstance(exc, kinds):
            return error(message(exc) if callable(message) else message)
    if isinstance(exc, HTTPError):  # before URLError: HTTPError is a URLError
        error, message = _HTTP_ERRORS.get(exc.code, (None, ""))
        return error(message) if error else YouTubeNetworkError(
            _network_message(f"YouTube answered with HTTP error {exc.code}"))
    if isinstance(exc, URLError) and not isinstance(exc.reason, BaseException):
        return YouTubeNetworkError(_network_message(f"network error: {exc.reason}"))
    if isinstance(exc, URLError):
        inner = translate_error(exc.reason)
        return inner if isinstance(inner, YouTubeNetworkError) else YouTubeNetworkError(
            _network_message(f"network error: {exc.reason}"))
    for kinds, detail in _NETWORK_ERRORS:
        if isinstance(exc, kinds):
            return YouTubeNetworkError(_network_message(detail(exc)))
    if isinstance(exc, _E.PytubeFixError):
        return YouTubeDownloadError(f"Could not get this video from YouTube ({exc}). " + _PAGE_CHANGED_HINT)
    return None


@contextmanager
def translated_errors() -> Iterator[None]:
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
