"""Video to subtitles (issue 4): the whole job, the tab's handlers, every listed error, the
``/subtitles`` endpoint of a launched server, and long input processed window by window.

Media is generated here: a ``testsrc`` picture with the espeak-ng sentence of ``english_clip``
between 3 s of silence at the start and at the end. Everything that decodes speech uses the real
bundled Whisper base (``slow``; converted once per session into the session's models cache through
the shared ``services`` fixture). The tiny random model is only used where nothing is decoded
(errors, silence): the tab asks for word timestamps, and openvino_genai's word-timestamp code
crashes the process (SIGSEGV) on the random model's output.
YouTube is faked with objects shaped like pytubefix's (see tests/test_youtube.py) whose streams
"download" by copying the generated files.
"""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any, Optional
from urllib.error import URLError

import numpy as np
import pysubs2
import pytest
import soundfile as sf
from pytubefix import exceptions as px

from conftest import espeak
from pipelines.speech import vad
from pipelines.subtitles import video as video_module
from pipelines.speech.audio import load_audio
from pipelines.subtitles.job import SubtitleRequest, make_subtitles
from pipelines.core.types import ModelChoice
from pipelines.speech.types import TranscribeOptions
from pipelines.subtitles.video import ffmpeg_exe, probe
from servers import launched
from test_youtube import CANON, VID, Factory, FakeStream, FakeYouTube

SENTENCE = "Hello world. This is a short test of the speech recognition system."  # english_clip's words
LEAD = TAIL = 3.0  # seconds of silence before and after the speech
EDGE = 0.35  # how far a cue may reach into the silence (VAD padding + window padding + rounding)
MAX_WER = 0.35
BASE = ModelChoice(model="bundled/whisper-base")
WORDS = TranscribeOptions(word_timestamps=True)  # what the tab asks for
QUIET = dict(progress=lambda *a, **k: None)


# --------------------------------------------------------------------------- helpers


def ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args],
                   check=True, capture_output=True)


def words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def wer(reference: str, hypothesis: str) -> float:
    import jiwer

    return jiwer.wer(words(reference), words(hypothesis))


def make_video(audio: Path, out: Path, seconds: float, rate: int = 15) -> Path:
    """testsrc frames plus ``audio`` (AAC) in an H.264 mp4 of exactly ``seconds``."""
    ffmpeg("-f", "lavfi", "-i", f"testsrc=size=160x120:rate={rate}:duration={seconds}", "-i", str(audio),
           "-map", "0:v", "-map", "1:a", "-t", str(seconds), "-c:v", "libx264", "-preset", "veryfast",
           "-pix_fmt", "yuv420p", "-c:a", "aac", "-ac", "1", str(out))
    return out


def gray_frame(path: Path, at: float) -> np.ndarray:
    """The first decoded frame at or after ``at`` seconds, as 8-bit gray."""
    import av

    with av.open(str(path)) as container:
        for frame in container.decode(container.streams.video[0]):
            if frame.time is not None and frame.time >= at:
                return frame.to_ndarray(format="gray").astype(np.int16)
    raise AssertionError(f"{path.name} has no frame at {at} s")


def changed_pixels(original: Path, burned: Path, at: float) -> float:
    """Share of pixels in the bottom half that the burned-in copy changed a lot (text, outline)."""
    a, b = gray_frame(original, at), gray_frame(burned, at)
    bottom = slice(a.shape[0] // 2, None)
    return float((np.abs(a[bottom] - b[bottom]) > 60).mean())


def call_subtitles(handler, url: str = "", video: Optional[Path] = None, model: str = BASE.model,
                   burn_in: bool = False, soft_track: bool = False):
    return handler(url, str(video) if video else None, model, "fp16", "CPU", "transcribe", "auto", 42, 6.0,
                   burn_in, soft_track, **QUIET)


_CUE_LINE = re.compile(r"^\[(\d+\.\d+) → (\d+\.\d+)\] (.*)$")


def parse_cue_text(text: str) -> list[tuple[float, float, str]]:
    """The tab's subtitle text ("[start → end] line 1\\nline 2" per cue) back into cues."""
    cues: list[tuple[float, float, str]] = []
    for line in text.splitlines():
        match = _CUE_LINE.match(line)
        if match:
            cues.append((float(match[1]), float(match[2]), match[3]))
        else:  # the second line of a two-line cue
            assert cues, f"text starts without a cue time: {text!r}"
            start, end, first = cues[-1]
            cues[-1] = (start, end, f"{first}\n{line}")
    return cues


def assert_files_parse_back(srt: Path, vtt: Path, cues: list[tuple[float, float, str]]) -> None:
    """Both subtitle files hold exactly the cues (times to the millisecond, text, line breaks)."""
    assert Path(vtt).read_text(encoding="utf-8").startswith("WEBVTT")
    for path in (srt, vtt):
        events = pysubs2.load(str(path))
        assert len(events) == len(cues), path
        for event, (start, end, text) in zip(events, cues):
            assert abs(event.start - round(start * 1000)) <= 10 and abs(event.end - round(end * 1000)) <= 10
            assert event.plaintext == text


# --------------------------------------------------------------------------- media


@pytest.fixture(scope="module")
def media(tmp_path_factory, english_clip) -> dict[str, Any]:
    """The test video (speech between silences), its audio as m4a, and the broken inputs."""
    d = tmp_path_factory.mktemp("subtitle-media")
    speech, rate = sf.read(str(english_clip), dtype="float32")
    loud = np.flatnonzero(np.abs(speech) > 0.02 * np.abs(speech).max())
    onset, offset = LEAD + loud[0] / rate, LEAD + (loud[-1] + 1) / rate
    padded = np.concatenate([np.zeros(int(LEAD * rate), np.float32), speech,
                             np.zeros(int(TAIL * rate), np.float32)])
    sf.write(str(d / "padded.wav"), padded, rate)
    seconds = round(padded.size / rate, 2)
    video = make_video(d / "padded.wav", d / "clip.mp4", seconds)
    audio = d / "clip.m4a"
    ffmpeg("-i", str(d / "padded.wav"), "-c:a", "aac", "-ac", "1", str(audio))
    silent = d / "no-audio.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=160x120:rate=15:duration=2", "-c:v", "libx264",
           "-pix_fmt", "yuv420p", str(silent))
    hush = d / "hush.wav"
    sf.write(str(hush), np.zeros(16000 * 4, np.float32), 16000)
    quiet_video = make_video(hush, d / "quiet.mp4", 4.0)
    text = d / "notes.mp4"
    text.write_text("These are meeting notes, not a video.\n" * 40)
    return dict(video=video, audio=audio, seconds=probe(video).duration, speech=(onset, offset),
                no_audio=silent, quiet_video=quiet_video, text_as_mp4=text)


@pytest.fixture(autouse=True)
def request_dirs_in_tmp(monkeypatch, tmp_path):
    """The tab's per-request folders go under this test's tmp_path instead of piling up in /tmp."""
    import ui.subtitles_tab as tab
    from ui.common import working_dir

    monkeypatch.setattr(tab, "working_dir", lambda prefix: working_dir(prefix, root=tmp_path))


# --------------------------------------------------------------------------- fake YouTube


class FileStream(FakeStream):
    """A pytubefix-like stream whose download() writes a real media file (a copy of ``source``)."""

    def __init__(self, owner: FakeYouTube, source: Path, **spec: Any) -> None:
        super().__init__(owner, size=source.stat().st_size, **spec)
        self.source = source

    def download(self, output_path: Optional[str] = None, filename: Optional[str] = None,
                 **_: Any) -> Optional[str]:
        if self.owner.download_error is not None:
            raise self.owner.download_error
        path = Path(output_path or ".") / (filename or f"video.{self.subtype}")
        shutil.copyfile(self.source, path)
        if self.owner.on_progress is not None:
            self.owner.on_progress(self, b"", 0)
        self.downloaded_to.append(path)
        return str(path)


class FileYouTube(FakeYouTube):
    """A video whose audio stream is ``audio`` and whose progressive 360p stream is ``video``."""

    def __init__(self, url: str, *, audio: Path, video: Path, length: int, progressive: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(url, specs=[], **kwargs)
        self._length = length
        self._streams = [FileStream(self, audio, itag=140, mime_type="audio/mp4", abr="128kbps")]
        if progressive:
            self._streams.append(FileStream(self, video, itag=18, mime_type="video/mp4", resolution="360p",
                                            progressive=True))

    @property
    def length(self) -> int:
        self.check_availability()
        return self._length


class FileFactory(Factory):
    """yt_factory handing out :class:`FileYouTube` objects (records URLs like ``Factory``)."""

    def __call__(self, url: str) -> FileYouTube:
        self.urls.append(url)
        yt = FileYouTube(url, **self.kwargs)
        self.made.append(yt)
        return yt

    def downloads(self) -> list[Path]:
        return [p for yt in self.made for s in yt._streams for p in s.downloaded_to]


def youtube_of(media: dict, **kwargs: Any) -> FileFactory:
    kwargs.setdefault("length", int(round(media["seconds"])))
    return FileFactory(audio=media["audio"], video=media["video"], **kwargs)


# --------------------------------------------------------------------------- the whole job, real model


@pytest.fixture(scope="module")
def real_job(services, media, tmp_path_factory):
    """One full job on the test video with the real model, burned-in and soft-track copies asked for."""
    steps: list[tuple[float, str]] = []
    result = make_subtitles(services.whisper,
                            SubtitleRequest(choice=BASE, options=WORDS, video_path=media["video"], burn_in=True,
                                            soft_track=True),
                            tmp_path_factory.mktemp("real-job"), progress=lambda f, m: steps.append((f, m)))
    return result, steps


@pytest.mark.slow
def test_job_subtitles_say_the_sentence(real_job):
    result, steps = real_job
    assert result.cues, result.transcript
    text = " ".join(c.text for c in result.cues)
    assert wer(SENTENCE, text) < MAX_WER, text
    assert wer(SENTENCE, result.transcript.text) < MAX_WER, result.transcript.text
    assert result.transcript.language == "en"
    assert result.notes == []
    assert steps[-1] == (1.0, "done")
    assert all(0.0 <= f <= 1.0 for f, _ in steps)


@pytest.mark.slow
def test_job_cues_are_timed_inside_the_speech(real_job, media):
    result, _ = real_job
    onset, offset = media["speech"]
    for cue in result.cues:
        assert 0.0 <= cue.start < cue.end <= media["seconds"], cue
        # the 3 s of silence at either end carry no subtitle
        assert onset - EDGE <= cue.start and cue.end <= offset + EDGE, (cue, media["speech"])
    assert [c.start for c in result.cues] == sorted(c.start for c in result.cues)
    assert all(a.end <= b.start for a, b in zip(result.cues, result.cues[1:]))
    # the subtitles cover the speech rather than a sliver of it
    assert result.cues[0].start <= onset + 1.0 and result.cues[-1].end >= offset - 1.5


@pytest.mark.slow
def test_job_files_parse_back(real_job):
    result, _ = real_job
    files = result.files
    assert {"srt", "vtt", "txt", "json", "burned", "muxed"} <= set(files)
    assert_files_parse_back(files["srt"], files["vtt"], [(c.start, c.end, c.text) for c in result.cues])
    data = json.loads(files["json"].read_text(encoding="utf-8"))
    assert data["text"] == result.transcript.text and data["language"] == "en"
    assert [c["text"] for c in data["cues"]] == [c.text for c in result.cues]
    assert words(files["txt"].read_text(encoding="utf-8")) == words(result.transcript.text)


@pytest.mark.slow
def test_burned_in_copy_has_the_same_duration_and_shows_the_text(real_job, media):
    result, _ = real_job
    burned, source = result.files["burned"], media["video"]
    info = probe(burned)
    assert info.has_video and info.has_audio and info.subtitle_tracks == 0
    assert info.duration == pytest.approx(media["seconds"], abs=0.15)
    cue = result.cues[0]
    assert changed_pixels(source, burned, at=(cue.start + cue.end) / 2) > 0.005  # text on screen
    assert changed_pixels(source, burned, at=1.0) < 0.001  # silence: nothing but re-encoding noise
    assert changed_pixels(source, burned, at=media["seconds"] - 1.0) < 0.001


@pytest.mark.slow
def test_muxed_copy_has_a_subtitle_track_with_the_cues(real_job, media, tmp_path):
    result, _ = real_job
    muxed = result.files["muxed"]
    info = probe(muxed)
    assert info.subtitle_tracks == 1 and info.has_video and info.has_audio
    assert info.duration == pytest.approx(media["seconds"], abs=0.15)
    ffmpeg("-i", str(muxed), "-map", "0:s:0", str(tmp_path / "track.srt"))
    track = pysubs2.load(str(tmp_path / "track.srt"))
    assert [e.plaintext for e in track] == [c.text for c in result.cues]
    assert [e.start for e in track] == [round(c.start * 1000) for c in result.cues]
    # the player plays the source with the subtitles beside it, through the job's own link to the upload
    # (a sweep of the uploader's copy, e.g. Gradio's cache, cannot take it away mid-job)
    assert result.video.parent == result.files["srt"].parent / "source" and result.video.name == media["video"].name
    assert result.video.samefile(media["video"])


def test_silent_video_gives_no_subtitles_and_no_copies(services, tiny_whisper_hf, media, tmp_path):
    request = SubtitleRequest(choice=ModelChoice(model=str(tiny_whisper_hf)), video_path=media["quiet_video"],
                              burn_in=True, soft_track=True)
    result = make_subtitles(services.whisper, request, tmp_path)
    assert result.cues == [] and result.transcript.segments == ()
    assert "No speech was found" in " ".join(result.notes)
    assert "burned" not in result.files and "muxed" not in result.files
    assert pysubs2.load(str(result.files["srt"]), format_="srt").events == []
    assert not (tmp_path / "audio.wav").exists()  # transcribed, then deleted


def test_an_uploaded_video_over_the_limit_is_refused_before_its_audio_is_extracted(services, media, tmp_path):
    from pipelines.subtitles.job import SubtitleInputError

    limit = media["seconds"] - 0.3  # just over: the message must not read as the limit itself
    request = SubtitleRequest(choice=BASE, video_path=media["video"], max_seconds=limit)
    with pytest.raises(SubtitleInputError) as info:
        make_subtitles(services.whisper, request, tmp_path)
    shown, allowed = re.match(r"The video is (\d+ seconds|0:\d\d) long; this server accepts up to "
                              r"(\d+ seconds|0:\d\d)\.$", str(info.value)).groups()
    assert int(re.findall(r"\d+", shown)[-1]) > int(re.findall(r"\d+", allowed)[-1])  # never "7 ... up to 7"
    assert not (tmp_path / "audio.wav").exists()


# --------------------------------------------------------------------------- YouTube through the tab


def test_info_handler_shows_title_length_and_thumbnail(media):
    from ui.subtitles_tab import make_info_handler

    factory = youtube_of(media)
    description, thumbnail = make_info_handler(factory)(f"https://youtu.be/{VID}?si=share")
    seconds = int(round(media["seconds"]))
    assert description == f"**A test video** by Test Channel, 0:{seconds:02d}"
    assert thumbnail == f"https://i.ytimg.com/vi/{VID}/hqdefault.jpg"
    assert factory.urls == [CANON] and factory.downloads() == []  # details only, nothing downloaded
    assert make_info_handler(factory)("  ") == ("", None)


@pytest.mark.slow
def test_youtube_link_to_subtitles_end_to_end(services, media):
    from ui.subtitles_tab import make_info_handler, make_subtitles_handler

    factory = youtube_of(media)
    url = f"https://www.youtube.com/watch?v={VID}&t=5s"
    description, _ = make_info_handler(factory)(url)
    assert description.startswith("**A test video**")
    player, text, files = call_subtitles(make_subtitles_handler(services, yt_factory=factory), url=url,
                                         burn_in=True, soft_track=True)
    downloaded = factory.downloads()
    assert sorted(p.name for p in downloaded) == [f"{VID}-audio.m4a", f"{VID}-preview-360p.mp4"]
    assert set(factory.urls) == {CANON}
    # the player shows the downloaded preview with the WebVTT subtitles
    preview = next(p for p in downloaded if p.suffix == ".mp4")
    assert player["value"] == str(preview)
    # the audio-only stream and the extracted WAV were only needed for transcribing: not kept
    audio = next(p for p in downloaded if p.suffix == ".m4a")
    assert preview.is_file() and not audio.exists() and not (audio.parent / "audio.wav").exists()
    assert player["subtitles"].endswith(".vtt") and player["subtitles"] in files
    names = [Path(f).name.replace("_", " ") for f in files]  # files are named after the video's title
    assert names == ["A test video.srt", "A test video.vtt", "A test video.subtitled.mp4",
                     "A test video.softsubs.mp4"]
    cues = parse_cue_text(text)
    assert wer(SENTENCE, " ".join(c[2] for c in cues)) < MAX_WER, text
    onset, offset = media["speech"]
    assert all(onset - EDGE <= start < end <= offset + EDGE for start, end, _ in cues), (cues, media["speech"])
    assert_files_parse_back(Path(files[0]), Path(files[1]), cues)
    assert probe(files[2]).duration == pytest.approx(probe(preview).duration, abs=0.15)
    assert probe(files[3]).subtitle_tracks == 1


@pytest.mark.slow
def test_youtube_video_without_a_preview_stream_still_gets_subtitles(services, media):
    """No progressive stream: the audio alone is transcribed (the player stays empty, no video copies)."""
    from ui.subtitles_tab import make_subtitles_handler

    factory = youtube_of(media, progressive=False)
    player, text, files = call_subtitles(make_subtitles_handler(services, yt_factory=factory), url=CANON,
                                         burn_in=True, soft_track=True)
    assert player["value"] is None and player["subtitles"] is None
    assert [Path(f).name.replace("_", " ") for f in files] == ["A test video.srt", "A test video.vtt"]
    assert [p.name for p in factory.downloads()] == [f"{VID}-audio.m4a"]
    cues = parse_cue_text(text)
    assert wer(SENTENCE, " ".join(c[2] for c in cues)) < MAX_WER, text
    assert_files_parse_back(Path(files[0]), Path(files[1]), cues)


# --------------------------------------------------------------------------- errors


def _no_network() -> URLError:
    return URLError(socket.gaierror(-3, "Temporary failure in name resolution"))


# (id, url, which file (key of ``media``), yt_factory arguments or None, message fragment)
ERRORS = [
    ("vimeo", "https://vimeo.com/123", None, None, "not a YouTube link"),
    ("malformed", "https://[::1/watch", None, None, "not a valid link"),
    ("no-video-id", "https://www.youtube.com/watch?v=", None, None, "no video id"),
    ("spaces", "youtube dot com slash watch", None, None, "contains spaces"),
    ("playlist", "https://www.youtube.com/playlist?list=PLabc123", None, None, "playlist"),
    ("private", CANON, None, dict(error=px.VideoPrivate(VID)), "private"),
    ("removed", CANON, None, dict(error=px.VideoRemovedByUploader(VID)), "removed"),
    ("age-restricted", CANON, None, dict(error=px.AgeRestrictedError(VID)), "age-restricted"),
    ("region-blocked", CANON, None, dict(error=px.VideoRegionBlocked(VID)), "country"),
    ("bot", CANON, None, dict(error=px.BotDetection(VID)), "refused this client as a bot"),
    ("bot-at-download", CANON, None, dict(download_error=px.BotDetection(VID)), "as a bot"),
    ("offline", CANON, None, dict(error=_no_network()), "Could not reach YouTube"),
    ("offline-at-download", CANON, None, dict(download_error=URLError(OSError(101, "Network is unreachable"))),
     "Could not reach YouTube"),
    ("too-long", CANON, None, dict(length=3 * 3600 + 20), "3:00:20 long; this server accepts up to 3:00:00"),
    ("no-audio-track", "", "no_audio", None, "no audio track"),
    ("not-a-video", "", "text_as_mp4", None, "not a supported audio or video file"),
    ("nothing", "", None, None, "Give a YouTube link or upload a video file"),
    ("blank-url-no-file", "   ", None, None, "Give a YouTube link or upload a video file"),
]


@pytest.mark.parametrize("url, file_key, yt, fragment", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_every_listed_error_is_a_clear_gradio_error_and_the_tab_keeps_working(
        services, tiny_whisper_hf, media, url, file_key, yt, fragment):
    import gradio as gr

    from ui.subtitles_tab import make_subtitles_handler

    tiny = str(tiny_whisper_hf)
    factory = youtube_of(media, **(yt or {}))
    handler = make_subtitles_handler(services, yt_factory=factory)
    with pytest.raises(gr.Error) as info:
        call_subtitles(handler, url=url, video=media[file_key] if file_key else None, model=tiny)
    message = info.value.message
    assert fragment.lower() in message.lower(), message
    assert "Traceback" not in message and message.rstrip().endswith((".", ")"))
    if not url.strip() or "youtu" not in url:
        assert factory.urls == []  # a bad link or a file never reaches pytubefix
    # the same handler and services serve the next request (a silent video: the model loads, VAD
    # runs, files are written; nothing is decoded, see the module docstring)
    player, text, files = call_subtitles(handler, video=media["quiet_video"], model=tiny)
    assert Path(player["value"]).samefile(media["quiet_video"]) and player["subtitles"].endswith(".vtt")
    assert [Path(f).suffix for f in files] == [".srt", ".vtt"] and text == ""


@pytest.mark.slow
def test_after_every_error_the_real_model_still_transcribes(services, media):
    import gradio as gr

    from ui.subtitles_tab import make_subtitles_handler

    for _, url, file_key, yt, fragment in ERRORS:
        handler = make_subtitles_handler(services, yt_factory=youtube_of(media, **(yt or {})))
        with pytest.raises(gr.Error, match=f"(?i){re.escape(fragment)}"):
            call_subtitles(handler, url=url, video=media[file_key] if file_key else None)
    player, text, files = call_subtitles(handler, video=media["video"])
    assert Path(player["value"]).samefile(media["video"])
    assert wer(SENTENCE, " ".join(c[2] for c in parse_cue_text(text))) < MAX_WER, text


@pytest.mark.parametrize("url, fragment", [
    ("https://vimeo.com/123", "not a YouTube link"),
    ("https://[::1/watch", "not a valid link"),
])
def test_info_handler_rejects_other_links(url, fragment):
    import gradio as gr

    from ui.subtitles_tab import make_info_handler

    factory = Factory()
    with pytest.raises(gr.Error, match=fragment):
        make_info_handler(factory)(url)
    assert factory.urls == []


@pytest.mark.parametrize("error, fragment", [
    (px.VideoPrivate(VID), "private"),
    (px.VideoRemovedByYouTubeForViolatingTOS(VID), "removed"),
    (px.AgeCheckRequiredError(VID), "age-restricted"),
    (px.VideoRegionBlocked(VID), "country"),
    (px.BotDetection(VID), "bot"),
    (_no_network(), "offline"),
], ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None)
def test_info_handler_errors_are_gradio_errors(error, fragment):
    import gradio as gr

    from ui.subtitles_tab import make_info_handler

    with pytest.raises(gr.Error) as info:
        make_info_handler(Factory(error=error))(CANON)
    assert fragment.lower() in info.value.message.lower()


# --------------------------------------------------------------------------- a launched server


@pytest.fixture(scope="module")
def server(services):
    with launched(services) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


@pytest.mark.slow
def test_client_subtitles_for_an_uploaded_video(client, media):
    from gradio_client import handle_file

    player, text, files = client.predict(
        url="", video_file=handle_file(str(media["video"])), model=BASE.model, precision="fp16", device="CPU",
        task="transcribe", language="auto", max_line_chars=42, max_duration=6, burn_in=False, soft_track=True,
        api_name="/subtitles")
    # the player value: the video and its WebVTT subtitles, both downloadable
    video, subtitles = Path(player["value"]), Path(player["subtitles"])
    assert video.suffix == ".mp4" and probe(video).duration == pytest.approx(media["seconds"], abs=0.05)
    assert subtitles.read_text(encoding="utf-8").startswith("WEBVTT")
    assert [Path(f).name for f in files] == ["clip.srt", "clip.vtt", "clip.softsubs.mp4"]
    cues = parse_cue_text(text)
    assert cues and wer(SENTENCE, " ".join(c[2] for c in cues)) < MAX_WER, text
    assert_files_parse_back(Path(files[0]), Path(files[1]), cues)
    assert len(pysubs2.load(str(subtitles))) == len(cues)
    assert probe(files[2]).subtitle_tracks == 1


def test_client_gets_the_error_messages(client):
    with pytest.raises(Exception, match="not a YouTube link"):
        client.predict(url="https://vimeo.com/123", video_file=None, model=BASE.model, precision="fp16",
                       device="CPU", task="transcribe", language="auto", max_line_chars=42, max_duration=6,
                       burn_in=False, soft_track=False, api_name="/subtitles")
    with pytest.raises(Exception, match="Give a YouTube link or upload a video file"):
        client.predict(url="", video_file=None, api_name="/subtitles")
    with pytest.raises(Exception, match="not a YouTube link"):
        client.predict("https://vimeo.com/123", api_name="/video_info")
    assert client.predict("", api_name="/video_info") == ("", None)


# --------------------------------------------------------------------------- long input


LONG_SECONDS = 360.0
LONG_CLIPS = [  # (start s, sentence, a word that must be heard there)
    (20.0, "The quick brown fox jumps over the lazy dog.", "fox"),
    (170.0, "Please call me back tomorrow morning.", "tomorrow"),
    (320.0, "Thank you very much for watching this video.", "watching"),
]


@pytest.fixture(scope="module")
def long_video(tmp_path_factory) -> tuple[Path, list[tuple[float, float, str, str]]]:
    """Six minutes of silence with three spoken clips spread across it (and a 2 fps picture)."""
    d = tmp_path_factory.mktemp("long")
    track = np.zeros(int(LONG_SECONDS * 16000), np.float32)
    spans = []
    for k, (start, sentence, keyword) in enumerate(LONG_CLIPS):
        clip = load_audio(espeak(sentence, d / f"clip{k}.wav"))
        first = int(start * 16000)
        track[first:first + clip.size] = clip
        spans.append((start, start + clip.size / 16000, sentence, keyword))
    sf.write(str(d / "long.wav"), track, 16000)
    return make_video(d / "long.wav", d / "long.mp4", LONG_SECONDS, rate=2), spans


@pytest.mark.slow
def test_long_video_is_transcribed_in_windows_with_cues_at_each_clip(services, long_video, tmp_path,
                                                                      monkeypatch):
    path, spans = long_video
    reads: list[tuple[vad.Window, int]] = []
    original = vad.iter_window_audio

    def spy(wav_path, windows):
        for window, samples in original(wav_path, windows):
            reads.append((window, samples.size))
            yield window, samples

    monkeypatch.setattr(vad, "iter_window_audio", spy)
    steps: list[str] = []
    result = make_subtitles(services.whisper, SubtitleRequest(choice=BASE, options=WORDS, video_path=path), tmp_path,
                            progress=lambda f, m: steps.append(m))

    assert result.transcript.duration == pytest.approx(LONG_SECONDS, abs=0.2)
    # read window by window: never more than 30 s at once, and only around the speech
    assert len(reads) >= len(spans)
    assert max(size for _, size in reads) <= 30 * 16000
    assert sum(size for _, size in reads) < 0.1 * LONG_SECONDS * 16000
    assert f"transcribe part {len(reads)} of {len(reads)}" in steps
    # a cue at each clip, saying it; none in the long silences between them
    for start, end, sentence, keyword in spans:
        near = [c for c in result.cues if c.end > start - EDGE and c.start < end + EDGE]
        assert near, f"no cue near {start:.0f}-{end:.0f} s: {result.cues}"
        heard = " ".join(c.text for c in near)
        assert keyword in words(heard).split() and wer(sentence, heard) < MAX_WER, heard
    for cue in result.cues:
        assert any(start - EDGE <= cue.start and cue.end <= end + EDGE for start, end, _, _ in spans), cue


# --------------------------------------------------------------------------- FP16 vs INT8


@pytest.fixture(scope="module")
def int8_ready_services(tmp_path_factory, english_clip):
    """Services with a models folder of their own whose Whisper INT8 is calibrated on one clip (seconds)."""
    from pipelines.services import Services, Settings

    calibration = tmp_path_factory.mktemp("calibration")
    shutil.copy(english_clip, calibration / "clip.wav")
    services = Services(Settings(models_dir=tmp_path_factory.mktemp("compare-models")))
    services.whisper.store.calibration_dir = calibration
    return services


def test_youtube_compare_downloads_and_extracts_once_for_both_precisions(int8_ready_services, tiny_whisper_ir, media,
                                                                         monkeypatch):
    """A silent video: both models load and run voice activity detection; nothing is decoded."""
    from ui.subtitles_tab import make_subtitles_compare_handler

    extracted: list[Path] = []
    real_extract = video_module.extract_audio
    monkeypatch.setattr(video_module, "extract_audio", lambda *a, **k: extracted.append(a[0]) or real_extract(*a, **k))
    factory = FileFactory(audio=media["quiet_video"], video=media["quiet_video"], length=4)
    tiny = str(tiny_whisper_ir)
    fp16, fp16_seconds, int8, int8_seconds, summary, files = make_subtitles_compare_handler(
        int8_ready_services, yt_factory=factory)(CANON, None, tiny, "CPU", "transcribe", "auto", 42, 6, **QUIET)
    assert sorted(p.name for p in factory.downloads()) == [f"{VID}-audio.m4a", f"{VID}-preview-360p.mp4"]
    assert len(extracted) == 1
    assert fp16 == int8 == "" and fp16_seconds >= 0 and int8_seconds >= 0 and "INT8" in summary
    assert [Path(f).name.replace("_", " ") for f in files] == [
        "A test video.fp16.srt", "A test video.fp16.vtt", "A test video.int8.srt", "A test video.int8.vtt"]
    assert {(tiny, "fp16", "CPU"), (tiny, "int8", "CPU")} <= set(int8_ready_services.whisper.loaded_keys())
