"""ffmpeg / PyAV media work (pipelines.subtitles.video) on small generated clips."""
from __future__ import annotations

import shutil
import subprocess
import wave
from pathlib import Path

import av
import pytest

from pipelines.subtitles.video import (
    MediaError,
    burn_subtitles,
    escape_filter_value,
    extract_audio,
    ffmpeg_exe,
    has_libass,
    mux_subtitles,
    probe,
)

SECONDS = 3.0


def ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args],
                   check=True, capture_output=True)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """A 3 s 160x120 test video with a tone (or espeak-ng speech), one without audio, a WAV."""
    d = tmp_path_factory.mktemp("media")
    voice = d / "voice.wav"
    if shutil.which("espeak-ng"):
        subprocess.run(["espeak-ng", "-w", str(voice), "Hello. This is a test video."], check=True)
        audio_in = ["-i", str(voice)]
    else:
        audio_in = ["-f", "lavfi", "-i", f"sine=frequency=440:duration={SECONDS}:sample_rate=44100"]
    video = d / "clip.mp4"
    ffmpeg("-f", "lavfi", "-i", f"testsrc=size=160x120:rate=15:duration={SECONDS}", *audio_in,
           "-af", "apad", "-t", str(SECONDS), "-c:v", "libx264" if _has_x264() else "mpeg4",
           "-pix_fmt", "yuv420p", "-c:a", "aac", "-ac", "2", str(video))
    silent = d / "silent.mp4"
    ffmpeg("-f", "lavfi", "-i", f"testsrc=size=160x120:rate=15:duration={SECONDS}",
           "-c:v", "libx264" if _has_x264() else "mpeg4", "-pix_fmt", "yuv420p", str(silent))
    tone = d / "tone.wav"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=300:duration=2:sample_rate=44100", str(tone))
    srt = d / "subs.srt"
    srt.write_text("1\n00:00:00,200 --> 00:00:01,400\nHello, [world]: it's 'quoted'\n\n"
                   "2\n00:00:01,500 --> 00:00:02,800\nSecond line\nof the cue\n\n", encoding="utf-8")
    return {"video": video, "silent": silent, "tone": tone, "srt": srt}


def _has_x264() -> bool:
    out = subprocess.run([ffmpeg_exe(), "-hide_banner", "-encoders"], capture_output=True, text=True).stdout
    return " libx264 " in out


def test_probe(media) -> None:
    info = probe(media["video"])
    assert info.has_audio and info.has_video
    assert info.duration == pytest.approx(SECONDS, abs=0.1)
    assert info.audio_codec == "aac" and info.subtitle_tracks == 0
    silent = probe(media["silent"])
    assert silent.has_video and not silent.has_audio
    tone = probe(media["tone"])
    assert tone.has_audio and not tone.has_video and tone.duration == pytest.approx(2.0, abs=0.01)


def test_extract_audio_is_mono_16k_and_same_length(media, tmp_path) -> None:
    out = extract_audio(media["video"], tmp_path / "sub dir" / "audio.wav")
    assert out == (tmp_path / "sub dir" / "audio.wav").resolve()
    with wave.open(str(out)) as w:
        assert w.getnchannels() == 1
        assert w.getframerate() == 16000
        assert w.getsampwidth() == 2
        assert w.getnframes() / 16000 == pytest.approx(SECONDS, abs=0.1)
    assert not list(out.parent.glob(".*partial*"))
    other = extract_audio(media["tone"], tmp_path / "tone8k.wav", sample_rate=8000)
    with wave.open(str(other)) as w:
        assert w.getframerate() == 8000 and w.getnframes() / 8000 == pytest.approx(2.0, abs=0.01)


def test_video_without_audio_is_a_clear_error(media, tmp_path) -> None:
    with pytest.raises(MediaError) as info:
        extract_audio(media["silent"], tmp_path / "a.wav")
    assert "no audio track" in info.value.user_message
    assert "silent.mp4" in info.value.user_message
    assert not (tmp_path / "a.wav").exists()


def test_non_media_file_is_a_clear_error(tmp_path) -> None:
    junk = tmp_path / "notes.mp4"
    junk.write_text("this is not a video\n" * 50)
    with pytest.raises(MediaError, match="not a supported audio or video file"):
        probe(junk)
    with pytest.raises(MediaError, match="notes.mp4"):
        extract_audio(junk, tmp_path / "a.wav")
    with pytest.raises(MediaError, match="not found"):
        probe(tmp_path / "missing.mp4")


def test_ffmpeg_failure_surfaces_stderr(media, tmp_path) -> None:
    # An existing but unreadable subtitle file makes ffmpeg itself fail.
    bad = tmp_path / "bad.srt"
    bad.write_bytes(b"\x00\x01 not subtitles \xff" * 20)
    with pytest.raises(MediaError) as info:
        mux_subtitles(media["video"], bad, tmp_path / "out.mp4")
    assert "ffmpeg" in info.value.user_message and info.value.stderr_tail
    assert info.value.stderr_tail in info.value.user_message
    assert not (tmp_path / "out.mp4").exists()
    assert not list(tmp_path.glob(".*partial*"))


def test_escape_filter_value() -> None:
    assert escape_filter_value("/tmp/plain.srt") == "/tmp/plain.srt"
    # Level 1 escapes ' : \ ; level 2 escapes \ ' [ ] , ; (see ffmpeg-filters "Notes on filtergraph escaping").
    assert escape_filter_value("a:b") == "a\\\\:b"
    assert escape_filter_value("it's") == "it\\\\\\'s"
    assert escape_filter_value("x[1],y;z") == "x\\[1\\]\\,y\\;z"


def test_burn_subtitles_with_awkward_path(media, tmp_path) -> None:
    assert has_libass()
    weird = tmp_path / "we'ird [dir], a:b; c=d"
    weird.mkdir()
    subs = weird / "sub's: [1], x.srt"
    shutil.copy(media["srt"], subs)
    progress: list[float] = []
    out = burn_subtitles(media["video"], subs, weird / "burned out.mp4", progress=lambda fraction, message: progress.append(fraction))
    info = probe(out)
    assert info.has_video and info.has_audio and info.subtitle_tracks == 0
    assert info.duration == pytest.approx(probe(media["video"]).duration, abs=0.1)
    assert progress and progress[-1] == 1.0
    # Text (white, black outline) appears at the bottom of the picture while a cue is shown:
    # big pixel changes there, and only re-encoding noise after the last cue.
    assert _bottom_max_difference(media["video"], out, at=1.0) > 100
    assert _bottom_max_difference(media["video"], out, at=2.9) < 60


def _bottom_max_difference(a: Path, b: Path, at: float) -> float:
    def frame(path: Path):
        with av.open(str(path)) as c:
            for f in c.decode(video=0):
                if f.time is not None and f.time >= at:
                    img = f.to_ndarray(format="gray").astype(float)
                    return img[int(img.shape[0] * 0.6):]
        raise AssertionError(f"no frame at {at} s in {path}")

    return float(abs(frame(a) - frame(b)).max())


def test_burn_vtt_and_mkv(media, tmp_path) -> None:
    vtt = tmp_path / "subs.vtt"
    vtt.write_text("WEBVTT\n\n00:00:00.500 --> 00:00:02.000\nHello\n", encoding="utf-8")
    out = burn_subtitles(media["video"], vtt, tmp_path / "burned.mkv", force_style="FontSize=30")
    assert probe(out).duration == pytest.approx(SECONDS, abs=0.1)


def test_burn_rejects_audio_only_and_bad_extension(media, tmp_path) -> None:
    with pytest.raises(MediaError, match="no video"):
        burn_subtitles(media["tone"], media["srt"], tmp_path / "x.mp4")
    with pytest.raises(ValueError):
        burn_subtitles(media["video"], media["srt"], tmp_path / "x.gif")


def test_mux_adds_soft_subtitle_track(media, tmp_path) -> None:
    out = mux_subtitles(media["video"], media["srt"], tmp_path / "soft.mp4", language="eng")
    with av.open(str(out)) as c:
        subs = list(c.streams.subtitles)
        assert len(subs) == 1
        assert subs[0].codec_context.name == "mov_text"
        assert subs[0].language == "eng"
        assert len(c.streams.video) == 1 and len(c.streams.audio) == 1
    assert probe(out).duration == pytest.approx(SECONDS, abs=0.1)
    mkv = mux_subtitles(media["video"], media["srt"], tmp_path / "soft.mkv")
    with av.open(str(mkv)) as c:
        assert [s.codec_context.name for s in c.streams.subtitles] == ["srt"]


def test_missing_or_empty_subtitle_file(media, tmp_path) -> None:
    with pytest.raises(MediaError, match="subtitle file"):
        mux_subtitles(media["video"], tmp_path / "nope.srt", tmp_path / "x.mp4")
    empty = tmp_path / "empty.srt"
    empty.write_text("")
    for fn in (mux_subtitles, burn_subtitles):
        with pytest.raises(MediaError, match="empty"):
            fn(media["video"], empty, tmp_path / "x.mp4")


def test_falls_back_to_imageio_ffmpeg(monkeypatch) -> None:
    import imageio_ffmpeg

    from pipelines.subtitles import video

    video.ffmpeg_exe.cache_clear()
    monkeypatch.setattr(video.shutil, "which", lambda name: None)
    try:
        assert video.ffmpeg_exe() == imageio_ffmpeg.get_ffmpeg_exe()
    finally:
        video.ffmpeg_exe.cache_clear()
