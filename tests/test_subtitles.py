"""Transcript -> cues -> SRT/VTT/TXT/JSON (pipelines.subtitles.cues, pipelines.subtitles.formats)."""
from __future__ import annotations

import json

import pysubs2
import pytest

from pipelines.subtitles.cues import (
    Cue,
    CueRules,
    make_cues,
    wrap_text,
)
from pipelines.subtitles.formats import write_outputs, write_subtitles
from pipelines.speech.types import Segment, Transcript, Word

LONG = (
    "This is a rather long segment of speech, which has to be split into several "
    "readable cues because it is far too long for one. And then it simply goes on and on "
    "for a while, until the speaker finally stops talking."
)


def transcript(*segments: Segment, duration: float = 0.0) -> Transcript:
    return Transcript(text=" ".join(s.text.strip() for s in segments), language="en",
                      segments=tuple(segments), duration=duration)


def words_segment(start: float, pairs: list[tuple[str, float, float]]) -> Segment:
    words = tuple(Word(f" {w}", s, e) for w, s, e in pairs)
    return Segment(start, words[-1].end, "".join(w.text for w in words), words)


def assert_well_formed(cues: list[Cue], rules: CueRules, duration: float = 0.0) -> None:
    for cue in cues:
        assert 0 <= cue.start < cue.end
        if duration > 0:
            assert cue.end <= duration + 1e-9
        lines = cue.text.split("\n")
        assert 1 <= len(lines) <= rules.max_lines
        assert all(0 < len(line) <= rules.max_line_chars for line in lines), lines
        assert all(line == line.strip() for line in lines)
        assert round(cue.start * 1000) == pytest.approx(cue.start * 1000, abs=1e-6)
    for a, b in zip(cues, cues[1:]):
        assert a.start < b.start
        assert b.start - a.end >= rules.min_gap - 1e-9


# --------------------------------------------------------------------------- rules


def test_rules_validate() -> None:
    with pytest.raises(ValueError):
        CueRules(max_line_chars=0)
    with pytest.raises(ValueError):
        CueRules(min_duration=7.0, max_duration=6.0)


def test_short_segment_is_one_single_line_cue() -> None:
    cues = make_cues(transcript(Segment(1.0, 2.5, " Hello there. ")))
    assert cues == [Cue(1.0, 2.5, "Hello there.")]


def test_long_segment_splits_within_line_and_duration_limits() -> None:
    rules = CueRules()
    cues = make_cues(transcript(Segment(0.0, 14.0, LONG)), rules)
    assert len(cues) >= 3
    assert_well_formed(cues, rules)
    assert all(c.end - c.start <= rules.max_duration + 1e-9 for c in cues)
    # Nothing lost, nothing reordered.
    assert " ".join(c.text.replace("\n", " ") for c in cues) == LONG
    assert cues[0].start == 0.0 and cues[-1].end == pytest.approx(14.0)


def test_max_chars_and_line_count_respected_for_other_rules() -> None:
    rules = CueRules(max_line_chars=20, max_lines=1, max_duration=10.0)
    cues = make_cues(transcript(Segment(0.0, 30.0, LONG)), rules)
    assert_well_formed(cues, rules)
    assert all("\n" not in c.text for c in cues)
    rules3 = CueRules(max_line_chars=30, max_lines=3, max_duration=20.0)
    cues3 = make_cues(transcript(Segment(0.0, 30.0, LONG)), rules3)
    assert_well_formed(cues3, rules3)
    assert max(len(c.text.split("\n")) for c in cues3) == 3


def test_two_lines_at_most_and_balanced_wrap() -> None:
    lines = wrap_text("one two three four five six seven eight nine ten eleven twelve", 42, 2)
    assert lines is not None and len(lines) == 2
    assert abs(len(lines[0]) - len(lines[1])) <= 8
    assert wrap_text("short line", 42, 2) == ["short line"]
    assert wrap_text("word " * 40, 42, 2) is None


def test_wrap_prefers_break_after_punctuation() -> None:
    lines = wrap_text("I went to the market yesterday, and bought some fresh apples", 42, 2)
    assert lines == ["I went to the market yesterday,", "and bought some fresh apples"]


def test_split_prefers_sentence_end() -> None:
    text = ("The first sentence is here and it is short. The second sentence is much longer "
            "and keeps going for quite some time indeed.")
    cues = make_cues(transcript(Segment(0.0, 8.0, text)))
    assert len(cues) == 2
    assert cues[0].text.replace("\n", " ") == "The first sentence is here and it is short."


def test_word_timestamps_time_the_pieces() -> None:
    pairs = [(w, 1.0 + i * 0.5, 1.0 + i * 0.5 + 0.3) for i, w in enumerate(
        "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
        "rho sigma tau upsilon phi chi psi omega".split())]
    seg = words_segment(1.0, pairs)
    rules = CueRules(max_line_chars=20, max_lines=1)
    cues = make_cues(transcript(seg), rules)
    assert len(cues) > 3
    assert_well_formed(cues, rules)
    times = {w: (s, e) for w, s, e in pairs}
    for cue in cues:
        first, last = cue.text.split()[0], cue.text.split()[-1]
        assert cue.start == pytest.approx(times[first][0])
        assert cue.end == pytest.approx(times[last][1])


def test_without_words_time_is_shared_by_characters() -> None:
    text = "aaaa " * 15 + "bbbbbbbbbb " * 10
    cues = make_cues(transcript(Segment(0.0, 20.0, text.strip())), CueRules(max_line_chars=40))
    assert len(cues) >= 2
    # Time is proportional to characters: the split point's time equals its character share.
    first_chars = len(cues[0].text.replace("\n", " ")) + 1
    assert cues[0].end == pytest.approx(20.0 * (first_chars - 1) / len(text.strip()), abs=0.06)


def test_unspaced_text_is_cut_into_lines() -> None:
    text = "这是一个很长的中文句子，没有空格，所以需要在字符之间断开。这是第二个句子，也很长很长很长很长很长。"
    cues = make_cues(transcript(Segment(0.0, 8.0, text)))
    assert "".join(c.text.replace("\n", "") for c in cues) == text
    assert all(len(line) <= 21 for c in cues for line in c.text.split("\n"))  # wide chars count 2


def test_no_overlaps_even_when_segments_overlap() -> None:
    rules = CueRules()
    cues = make_cues(transcript(
        Segment(0.0, 3.0, "First segment."),
        Segment(2.0, 4.0, "Second starts early."),
        Segment(2.0, 2.0, "Same start, no time."),
        Segment(3.5, 6.0, "Fourth."),
    ), rules)
    assert len(cues) == 4
    assert_well_formed(cues, rules)
    assert cues[0].end == pytest.approx(2.0 - rules.min_gap)


def test_empty_and_punctuation_only_cues_removed() -> None:
    cues = make_cues(transcript(
        Segment(0.0, 1.0, "   "),
        Segment(1.0, 2.0, "..."),
        Segment(2.0, 3.0, " - ? "),
        Segment(3.0, 4.0, "Real words."),
        Segment(4.0, 5.0, ""),
    ))
    assert [c.text for c in cues] == ["Real words."]


def test_punctuation_tokens_stick_to_words() -> None:
    seg = Segment(0.0, 2.0, "Wait , what ?", (Word(" Wait", 0.0, 0.5), Word(" ,", 0.5, 0.6),
                                               Word(" what", 0.7, 1.2), Word(" ?", 1.2, 1.3)))
    assert make_cues(transcript(seg))[0].text == "Wait , what ?"


def test_short_cues_extended_to_min_duration_when_room() -> None:
    rules = CueRules(min_duration=0.7, min_gap=0.05)
    cues = make_cues(transcript(
        Segment(1.0, 1.2, "Hi."),    # no room after: ends before "Yes.", starts a bit earlier
        Segment(1.5, 1.6, "Yes."),   # room after: extended
        Segment(5.0, 5.1, "Okay."),
        Segment(5.8, 5.85, "No."),   # hardly any room: kept visible by nudging its neighbours
        Segment(5.9, 6.9, "Last one."),
    ), rules)
    assert [(c.start, c.end) for c in cues] == [
        (0.75, 1.45), (1.5, 2.2), (5.0, 5.7), (5.75, 5.9), (5.95, 6.9)]


def test_times_clamped_to_duration_and_zero() -> None:
    cues = make_cues(transcript(
        Segment(-0.5, 1.0, "Before zero."),
        Segment(9.5, 12.0, "Runs past the end."),
        duration=10.0,
    ))
    assert cues[0].start == 0.0
    assert cues[-1].end == 10.0
    assert_well_formed(cues, CueRules(), duration=10.0)


def test_short_cue_at_end_fits_inside_duration() -> None:
    cues = make_cues(transcript(Segment(9.9, 10.0, "End."), duration=10.0))
    assert len(cues) == 1 and cues[0].end == 10.0 and 0 <= cues[0].start < 10.0
    assert cues[0].end - cues[0].start == pytest.approx(0.7)


def test_empty_transcript_gives_no_cues() -> None:
    assert make_cues(transcript()) == []


# --------------------------------------------------------------------------- files


@pytest.fixture
def sample() -> Transcript:
    return transcript(
        Segment(0.0, 14.0, LONG),
        Segment(14.5, 15.0, "Short & <sharp>, {laughs}."),
        words_segment(16.0, [("timed", 16.0, 16.4), ("by", 16.5, 16.6), ("words", 16.7, 17.25)]),
        duration=18.0,
    )


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_files_parse_back_with_same_cues(tmp_path, sample, fmt) -> None:
    cues = make_cues(sample)
    path = write_subtitles(cues, tmp_path / f"out.{fmt}", fmt)
    raw = path.read_text(encoding="utf-8")
    if fmt == "vtt":
        assert raw.startswith("WEBVTT")
        assert "00:00:00.000 --> " in raw
        assert "&amp;" in raw and "&lt;sharp&gt;" in raw
    else:
        assert "00:00:00,000 --> " in raw
    subs = pysubs2.load(str(path), encoding="utf-8")
    assert subs.format == fmt
    events = [e for e in subs if not e.is_comment]
    assert len(events) == len(cues)
    for event, cue in zip(events, cues):
        assert event.start == round(cue.start * 1000)
        assert event.end == round(cue.end * 1000)
    if fmt == "srt":
        # SRT keeps the text as written: braces are not taken as style overrides.
        assert "Short & <sharp>, {laughs}." in raw
        assert [e.plaintext for e in events if "Short" not in e.plaintext] == [
            c.text for c in cues if "Short" not in c.text]


def test_unknown_format_rejected(tmp_path) -> None:
    with pytest.raises(ValueError, match="srt"):
        write_subtitles([], tmp_path / "x.ass", "ass")


def test_write_outputs(tmp_path, sample) -> None:
    paths = write_outputs(sample, tmp_path / "out", "my video: take 1?")
    assert set(paths) == {"srt", "vtt", "txt", "json"}
    for key, path in paths.items():
        assert path.exists() and path.suffix == f".{key}"
        assert "/" not in path.stem and ":" not in path.stem and "?" not in path.stem
    assert paths["txt"].read_text(encoding="utf-8").splitlines() == [
        LONG, "Short & <sharp>, {laughs}.", "timed by words"]
    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert Transcript.from_dict(data) == sample
    assert data["cues"] == [c.to_dict() for c in make_cues(sample)]
    assert len(pysubs2.load(str(paths["srt"]))) == len(data["cues"])
    assert paths["vtt"].read_text(encoding="utf-8").startswith("WEBVTT")


def test_random_transcripts_always_well_formed() -> None:
    import random

    rng = random.Random(1234)
    vocab = ["a", "word", "longer", "punctuated,", "ends.", "why?", "-", "...", "supercalifragilistic",
             "x" * 50, "中文字", "okay!"]
    for _ in range(200):
        rules = CueRules(max_line_chars=rng.choice([12, 20, 42]), max_lines=rng.choice([1, 2, 3]),
                         max_duration=rng.choice([2.0, 6.0]), min_duration=rng.choice([0.0, 0.7, 1.5]))
        t, segments = 0.0, []
        for _ in range(rng.randint(0, 8)):
            start = max(0.0, t + rng.uniform(-1.0, 2.0))
            texts = [rng.choice(vocab) for _ in range(rng.randint(0, 25))]
            end = start + rng.uniform(0.0, 12.0)
            if rng.random() < 0.5 and texts:
                step = (end - start) / len(texts)
                words = tuple(Word(" " + w, start + i * step, start + (i + 1) * step * rng.uniform(0.5, 1.5))
                              for i, w in enumerate(texts))
                segments.append(Segment(start, end, " ".join(texts), words))
            else:
                segments.append(Segment(start, end, " ".join(texts)))
            t = end
        duration = rng.choice([0.0, t, max(0.5, t - 3.0)])
        cues = make_cues(transcript(*segments, duration=duration), rules)
        assert_well_formed(cues, rules, duration)
        assert all(any(ch.isalnum() for ch in c.text) for c in cues)
