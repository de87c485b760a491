"""Batch subtitle jobs (issue 22), embedded: what a batch is made of (uploads, links, playlists), how
the job reports each item and never redoes a finished one, and the ``/subtitles_batch`` endpoint with
the real bundled Whisper base (``slow``). The same job over Ray replicas, with one killed, is in
tests/test_ray_serving.py.

YouTube is faked as in tests/test_subtitles_tab.py (streams that "download" by copying real files);
a playlist is faked with an object that has pytubefix.Playlist's ``video_urls``.
"""
from __future__ import annotations

import json
import threading
import time
import zipfile
from pathlib import Path

import pytest

from conftest import word_error_rate
from pipelines.subtitles import youtube
from pipelines.subtitles.batch import (BatchInputError, BatchItem, BatchJob, collect_items, split_links)
from test_subtitles_tab import SENTENCE, media, youtube_of  # noqa: F401  (media is a fixture)

BASE = "bundled/whisper-base"
VIDEO_IDS = ["aaaaaaaaaaa", "bbbbbbbbbbb", "ccccccccccc"]
PLAYLIST = "https://www.youtube.com/playlist?list=PLxyz0123456789"


class FakePlaylist:
    """pytubefix.Playlist's ``video_urls`` for a playlist of ``VIDEO_IDS`` (records the URL it was given)."""

    made: list[str] = []

    def __init__(self, url: str):
        FakePlaylist.made.append(url)
        self.video_urls = [f"https://www.youtube.com/watch?v={vid}" for vid in VIDEO_IDS]


class PrivatePlaylist:
    def __init__(self, url: str):
        from pytubefix import exceptions as px

        raise px.VideoPrivate("PLxyz0123456789")


# --------------------------------------------------------------------------- what a batch holds
@pytest.mark.parametrize("url, expected", [
    (PLAYLIST, "PLxyz0123456789"),
    ("youtube.com/playlist?list=PLxyz0123456789&si=abc", "PLxyz0123456789"),
    ("https://www.youtube.com/watch?v=aaaaaaaaaaa&list=PLxyz0123456789", None),  # one video of a playlist
    ("https://evil.example/playlist?list=PLxyz0123456789", None),
    ("https://www.youtube.com/playlist?list=x", None),
    ("not a link", None),
])
def test_playlist_links_are_told_from_video_links(url, expected):
    assert youtube.playlist_id(url) == expected


def test_uploads_and_links_become_items_in_order_a_playlist_its_videos(tmp_path):
    FakePlaylist.made.clear()
    upload = tmp_path / "talk.mp4"
    items = collect_items([str(upload)], f"https://youtu.be/{VIDEO_IDS[2]}\n{PLAYLIST}, https://vimeo.com/1",
                          playlist_factory=FakePlaylist)
    assert [(i.number, i.source, i.url, i.path) for i in items] == [
        (1, "talk.mp4", None, upload),
        (2, f"https://youtu.be/{VIDEO_IDS[2]}", f"https://youtu.be/{VIDEO_IDS[2]}", None),
        *[(3 + n, f"https://www.youtube.com/watch?v={vid} (playlist {n + 1} of 3)",
           f"https://www.youtube.com/watch?v={vid}", None) for n, vid in enumerate(VIDEO_IDS)],
        (6, "https://vimeo.com/1", "https://vimeo.com/1", None),  # refused when it runs, with the others going on
    ]
    assert FakePlaylist.made == [PLAYLIST]
    unreadable = collect_items([], PLAYLIST, playlist_factory=PrivatePlaylist)
    assert len(unreadable) == 1 and "private" in unreadable[0].error


def test_an_empty_or_oversized_batch_is_refused():
    with pytest.raises(BatchInputError, match="Upload one or more videos"):
        collect_items([], " \n ")
    with pytest.raises(BatchInputError, match="at most 2 are taken at once"):
        collect_items([], PLAYLIST, playlist_factory=FakePlaylist, max_items=2)
    assert split_links(" a\n\nb, c ") == ["a", "b", "c"]


def test_each_item_is_reported_and_a_finished_item_is_never_redone(tmp_path):
    """The job's contract, with a runner that writes a file or fails: one failure stops nothing, the
    width holds, done items are skipped on a second run, cancel stops the items not started."""
    calls: list[int] = []
    running = {"now": 0, "most": 0}
    lock = threading.Lock()

    def runner(item: BatchItem, folder: Path, progress) -> dict:
        with lock:
            calls.append(item.number)
            running["now"] += 1
            running["most"] = max(running["most"], running["now"])
        try:
            progress(0.5, "half way")
            time.sleep(0.1)  # long enough for the items to overlap
            if item.number == 2:
                raise ValueError("This file has no audio track.")
            if item.number == 3:
                raise KeyError("a bug")
            folder.mkdir(parents=True, exist_ok=True)
            srt = folder / f"{item.number:02d}.srt"
            srt.write_text("1\n00:00:00,000 --> 00:00:01,000\nhello\n")
            return {"title": f"item {item.number}", "language": "en", "files": {"srt": str(srt)}}
        finally:
            with lock:
                running["now"] -= 1

    items = [BatchItem(n, f"source {n}") for n in range(1, 6)]
    job = BatchJob(items, runner, tmp_path / "job", width=2)
    job.run()
    states = [(s.state, s.message) for s in job.snapshot()]
    assert states == [("done", "done"), ("failed", "This file has no audio track."), ("failed", "KeyError: 'a bug'"),
                      ("done", "done"), ("done", "done")]
    assert running["most"] == 2 and sorted(calls) == [1, 2, 3, 4, 5]
    assert job.summary() == "5 items: 3 done, 2 failed." and job.fraction() == 1.0
    assert sorted(zipfile.ZipFile(job.zip()).namelist()) == ["01.srt", "04.srt", "05.srt"]
    assert json.loads((tmp_path / "job" / "01" / "done.json").read_text())["title"] == "item 1"
    calls.clear()
    again = BatchJob(items, runner, tmp_path / "job", width=2)
    again.run()
    assert sorted(calls) == [2, 3]  # only the failed ones run again
    assert [s.message for s in again.snapshot()][0] == "already done"
    cancelled = BatchJob(items, runner, tmp_path / "other", width=1)
    cancelled.cancel.set()
    cancelled.run()
    assert {s.state for s in cancelled.snapshot()} == {"cancelled"} and cancelled.zip() is None


# --------------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def batch_server(services):
    from servers import launched

    with launched(services) as url:
        yield url


@pytest.mark.slow
def test_client_batch_of_good_and_bad_items_reports_each_and_zips_the_good_ones(batch_server, media, english_clip):
    from gradio_client import Client, handle_file

    job = Client(batch_server, verbose=False).submit(
        files=[handle_file(str(media["video"])), handle_file(str(english_clip)), handle_file(str(media["no_audio"])),
               handle_file(str(media["text_as_mp4"]))],
        links="https://vimeo.com/76979871", model=BASE, api_name="/subtitles_batch")
    table, archive, summary = job.result(timeout=600)
    rows = {row[1]: row for row in table["data"]}
    assert [rows[name][2] for name in ("clip.mp4", "english.wav")] == ["done", "done"], rows
    assert rows["no-audio.mp4"][2] == "failed" and "has no audio track" in rows["no-audio.mp4"][4]
    assert rows["notes.mp4"][2] == "failed" and "not a supported audio or video file" in rows["notes.mp4"][4]
    assert rows["https://vimeo.com/76979871"][2] == "failed" and "not a YouTube link" in rows[
        "https://vimeo.com/76979871"][4]
    assert summary == "5 items: 2 done, 3 failed."
    with zipfile.ZipFile(archive) as zipped:
        assert sorted(zipped.namelist()) == ["01-clip.srt", "01-clip.vtt", "02-english.srt", "02-english.vtt"]
        for name in ("01-clip.srt", "02-english.srt"):
            srt = zipped.read(name).decode()
            text = " ".join(line for line in srt.splitlines() if line and not line[0].isdigit())
            assert word_error_rate(SENTENCE, text) < 0.35, srt
        assert zipped.read("01-clip.vtt").decode().startswith("WEBVTT")
    # the table filled in while the items ran: each item's own progress, before the end
    states = [{row[2] for row in output[0]["data"]} for output in job.outputs()[:-1]]
    assert any("running" in s for s in states) and any(("done" in s and "running" in s) or "queued" in s
                                                        for s in states), states


@pytest.mark.slow
def test_playlist_videos_are_fetched_and_subtitled_one_by_one(services, media, tmp_path, monkeypatch):
    import ui.subtitles_batch as batch_ui
    from ui.common import working_dir
    from ui.subtitles_batch import make_batch_handler

    monkeypatch.setattr(batch_ui, "working_dir", lambda prefix: working_dir(prefix, root=tmp_path))
    youtube_factory = youtube_of(media)
    outputs = list(make_batch_handler(services, yt_factory=youtube_factory, playlist_factory=FakePlaylist)(
        files=None, links=PLAYLIST, model=BASE, progress=lambda *a, **k: None))
    table, archive, summary = outputs[-1]
    assert [row[2] for row in table] == ["done"] * 3 and summary == "3 items: 3 done."
    # audio only: a batch downloads no preview video, and keeps no download once transcribed
    assert sorted(p.name for p in youtube_factory.downloads()) == [f"{vid}-audio.m4a" for vid in VIDEO_IDS]
    assert not any(p.exists() for p in youtube_factory.downloads())
    assert len(zipfile.ZipFile(archive).namelist()) == 6


@pytest.mark.slow
def test_the_api_client_example_runs_a_batch(batch_server, english_clip, tmp_path, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    try:
        import api_client
    finally:
        sys.path.pop(0)

    code = api_client.main(["--server", batch_server, "subtitles-batch", str(english_clip), "--url",
                            "https://vimeo.com/1", "--model", BASE, "--json", "--out", str(tmp_path / "subs")])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["summary"] == "2 items: 1 done, 1 failed."
    assert [(item["source"], item["status"]) for item in result["items"]] == [
        ("english.wav", "done"), ("https://vimeo.com/1", "failed")]
    assert [Path(f).name for f in result["files"]] == ["subtitles.zip"]
    assert (tmp_path / "subs" / "subtitles.zip").is_file()
