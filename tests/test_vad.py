"""Voice activity detection with Silero (pipelines.speech.vad) and window planning for long audio."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from pipelines.speech.vad import (
    SAMPLE_RATE,
    VadError,
    VadOptions,
    Window,
    iter_window_audio,
    plan_windows,
    speech_probabilities,
    speech_regions,
    speech_regions_from_file,
)

PAD = 2.0


@pytest.fixture(scope="module")
def spoken(tmp_path_factory) -> tuple[np.ndarray, float]:
    """An espeak-ng sentence at 16 kHz with 2 s of silence before and after; (audio, speech_len)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    wav = tmp_path_factory.mktemp("vad") / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(wav),
                    "Hello there. This is a short test of the voice activity detector."], check=True)
    data, rate = sf.read(str(wav), dtype="float32")
    n = int(len(data) * SAMPLE_RATE / rate)
    speech = np.interp(np.arange(n) * rate / SAMPLE_RATE, np.arange(len(data)), data).astype(np.float32)
    silence = np.zeros(int(PAD * SAMPLE_RATE), dtype=np.float32)
    return np.concatenate([silence, speech, silence]), n / SAMPLE_RATE


def test_silence_has_no_speech() -> None:
    assert speech_regions(np.zeros(3 * SAMPLE_RATE, dtype=np.float32)) == []
    noise = np.random.default_rng(0).normal(0, 0.001, 3 * SAMPLE_RATE).astype(np.float32)
    assert speech_regions(noise) == []
    assert speech_regions(np.zeros(0, dtype=np.float32)) == []
    assert speech_regions(np.zeros(100, dtype=np.float32)) == []  # shorter than one frame


def test_speech_found_inside_the_padding(spoken) -> None:
    audio, speech_len = spoken
    regions = speech_regions(audio)
    assert regions, "no speech found"
    tolerance = 0.1  # Silero pads regions by 30 ms; espeak starts/ends with a little silence
    assert regions[0][0] >= PAD - tolerance
    assert regions[-1][1] <= PAD + speech_len + tolerance
    assert all(0 <= s < e for s, e in regions)
    assert all(a[1] <= b[0] for a, b in zip(regions, regions[1:]))
    assert sum(e - s for s, e in regions) >= 0.6 * speech_len
    # Other input types give the same answer.
    as_int16 = (audio * 32767).astype(np.int16)
    from_int16 = speech_regions(as_int16)
    assert len(from_int16) == len(regions)
    np.testing.assert_allclose(np.array(from_int16), np.array(regions), atol=0.05)
    stereo = np.stack([audio, audio], axis=1)
    assert speech_regions(stereo) == regions


def test_matches_silero_reference_and_file_streaming(spoken, tmp_path) -> None:
    from silero_vad import get_speech_timestamps_sequence

    from pipelines.speech.vad import load_vad_model

    audio, _ = spoken
    model = load_vad_model()
    np.testing.assert_allclose(speech_probabilities(audio), model.audio_forward(audio), atol=1e-6)
    reference = [(round(d["start"] / SAMPLE_RATE, 3), round(d["end"] / SAMPLE_RATE, 3))
                 for d in get_speech_timestamps_sequence(audio, model)]
    assert speech_regions(audio) == reference
    path = tmp_path / "speech16k.wav"
    sf.write(str(path), audio, SAMPLE_RATE, subtype="FLOAT")
    # Blocks that are not a whole number of frames exercise the carry-over between reads.
    assert speech_regions_from_file(path, block_seconds=0.7) == reference


def test_options_change_the_regions(spoken) -> None:
    audio, _ = spoken
    strict = speech_regions(audio, VadOptions(threshold=0.99))
    default = speech_regions(audio)
    assert sum(e - s for s, e in strict) < sum(e - s for s, e in default)
    padded = speech_regions(audio, VadOptions(speech_pad=0.5))
    assert padded[0][0] < default[0][0]


def test_importing_silero_keeps_torch_threads() -> None:
    import torch

    from pipelines.speech import vad

    before = torch.get_num_threads()
    vad._import_silero.cache_clear()
    torch.set_num_threads(2)
    try:
        vad._silero()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_two_first_requests_at_once_load_the_model_once(monkeypatch) -> None:
    import threading

    from pipelines.speech import vad

    calls = []
    real = vad._import_silero.__wrapped__

    def slow_import():
        calls.append(threading.get_ident())
        __import__("time").sleep(0.3)  # a slow first load: without the lock the other threads would load too
        return real()

    monkeypatch.setattr(vad, "_import_silero", __import__("functools").lru_cache(maxsize=1)(slow_import))
    vad._load_vad_model.cache_clear()
    models = []
    threads = [threading.Thread(target=lambda: models.append(vad.load_vad_model())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(calls) == 1 and len(models) == 4 and all(m is models[0] for m in models)


def test_file_must_be_16k(tmp_path) -> None:
    path = tmp_path / "a44.wav"
    sf.write(str(path), np.zeros(44100, dtype=np.float32), 44100)
    with pytest.raises(VadError, match="16 kHz"):
        speech_regions_from_file(path)
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    with pytest.raises(VadError, match="bad.wav"):
        speech_regions_from_file(bad)


# --------------------------------------------------------------------------- windows


def check_plan(windows: list[Window], regions: list[tuple[float, float]], total: float,
               max_window: float) -> None:
    assert all(0 <= w.start < w.end <= total for w in windows)
    assert all(w.duration <= max_window + 1e-6 for w in windows)
    assert all(a.end <= b.start for a, b in zip(windows, windows[1:]))
    for w in windows:
        assert all(w.start <= s < e <= w.end for s, e in w.speech)
    # All speech is covered, once.
    covered = sum(e - s for w in windows for s, e in w.speech)
    assert covered == pytest.approx(sum(e - s for s, e in regions), abs=1e-3 * len(regions) + 1e-6)


def test_plan_nothing() -> None:
    assert plan_windows([], 100.0) == []


def test_plan_close_regions_share_a_window() -> None:
    regions = [(1.0, 3.0), (3.5, 6.0), (7.0, 9.0)]
    windows = plan_windows(regions, 20.0, max_window=30.0, pad=0.2)
    assert windows == [Window(0.8, 9.2, ((1.0, 3.0), (3.5, 6.0), (7.0, 9.0)))]


def test_plan_long_silence_starts_new_window() -> None:
    regions = [(1.0, 3.0), (10.0, 12.0)]
    windows = plan_windows(regions, 20.0, max_gap=3.0)
    assert [(w.start, w.end) for w in windows] == [(0.8, 3.2), (9.8, 12.2)]


def test_plan_many_regions_bounded_windows() -> None:
    rng = np.random.default_rng(1)
    t, regions = 0.5, []
    while t < 600:
        length = float(rng.uniform(0.3, 12.0))
        regions.append((round(t, 3), round(t + length, 3)))
        t += length + float(rng.choice([0.1, 0.5, 1.0, 5.0]))
    total = t + 1.0
    windows = plan_windows(regions, total, max_window=30.0)
    check_plan(windows, regions, total, 30.0)
    assert len(windows) < len(regions)  # grouped
    assert sum(w.duration for w in windows) < total  # long silences skipped


def test_plan_splits_speech_longer_than_a_window() -> None:
    windows = plan_windows([(5.0, 75.0)], 80.0, max_window=30.0, pad=0.2)
    check_plan(windows, [(5.0, 75.0)], 80.0, 30.0)
    assert len(windows) == 3
    assert windows[0].end == windows[1].start  # contiguous speech: cut exactly, no overlap


def test_plan_full_window_ends_at_the_longest_pause_not_the_last_one() -> None:
    # a sentence pause (0.36 s) at 25 s, then "Today," and a comma pause (0.2 s) before the rest:
    # packing to the last pause that fits would end the window between "Today," and its sentence
    regions = [(0.0, 10.0), (10.3, 25.0), (25.36, 25.9), (26.1, 32.0), (32.1, 40.0)]
    windows = plan_windows(regions, 41.0, max_window=30.0, pad=0.2)
    check_plan(windows, regions, 41.0, 30.0)
    assert [w.speech[-1][1] for w in windows] == [25.0, 40.0]
    assert windows[1].speech[0] == (25.36, 25.9)
    # a window is never cut shorter than min_fill of max_window for a longer pause early on
    early = [(0.0, 3.0), (5.0, 20.0), (20.1, 29.0), (29.1, 35.0)]
    assert plan_windows(early, 36.0, max_window=30.0)[0].speech[-1] == (20.1, 29.0)


def test_plan_clips_to_the_audio_and_merges_overlaps() -> None:
    windows = plan_windows([(-1.0, 2.0), (1.5, 4.0), (9.5, 12.0), (13.0, 14.0)], 10.0, pad=0.5)
    assert windows == [Window(0.0, 4.5, ((0.0, 4.0),)), Window(9.0, 10.0, ((9.5, 10.0),))]


def test_plan_neighbouring_paddings_do_not_overlap() -> None:
    windows = plan_windows([(0.0, 29.0), (29.2, 31.0)], 40.0, max_window=30.0, pad=0.5)
    assert len(windows) == 2
    assert windows[0].end == windows[1].start == pytest.approx(29.0)  # the silence went to the next window


@pytest.mark.parametrize("gap, start", [(5.0, 19.2), (0.3, 14.5), (0.1, 14.4)])
def test_each_window_starts_a_lead_before_its_speech_the_silence_going_to_it_first(gap, start) -> None:
    """Issue #21: a window's first phoneme is inside it. The lead (0.2 s) comes out of the silence before
    the speech; where two windows meet it goes to the later window first, never into the earlier one's
    speech, and the earlier window keeps what is left of its 0.2 s trail."""
    first = [(0.1, 8.0), (8.4, 14.4)]
    second = [(round(14.4 + gap, 3), round(34.4 + gap, 3))]  # 20 s: does not fit beside the first 14 s, starts a window
    windows = plan_windows(first + second, 60.0)
    assert [w.speech for w in windows] == [tuple(first), tuple(second)]
    assert windows[0].start == 0.0  # the audio's start is closer than the lead
    assert windows[1].start == pytest.approx(start)
    assert windows[0].end == pytest.approx(min(14.6, start))
    assert windows[1].start <= second[0][0] - min(0.2, gap) + 1e-9  # the whole lead, or all the silence


def test_plan_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        plan_windows([(0.0, 1.0)], 2.0, max_window=1.0, pad=0.5)


def test_iter_window_audio(tmp_path) -> None:
    audio = np.arange(10 * SAMPLE_RATE, dtype=np.float32) / (10 * SAMPLE_RATE)
    path = tmp_path / "ramp.wav"
    sf.write(str(path), audio, SAMPLE_RATE, subtype="FLOAT")
    windows = [Window(1.0, 2.5, ((1.0, 2.5),)), Window(9.0, 10.0, ((9.0, 10.0),))]
    got = list(iter_window_audio(path, windows))
    assert [w for w, _ in got] == windows
    np.testing.assert_array_equal(got[0][1], audio[SAMPLE_RATE: int(2.5 * SAMPLE_RATE)])
    assert len(got[1][1]) == SAMPLE_RATE
