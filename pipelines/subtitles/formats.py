"""Subtitle and transcript files: SRT and WebVTT (written by **pysubs2**), plain text and JSON.

:func:`write_outputs` writes the downloads the UI offers for one transcript, side by side. With word
timestamps, the WebVTT file can carry each word's start as a karaoke-style cue timestamp
(``Hello <00:00:01.500>world``, WebVTT's "cue timestamp" tag), which players use to highlight the
word being said.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Union

import pysubs2

from pipelines.speech.types import Transcript
from pipelines.subtitles.cues import Cue, CueRules, make_cues

PathLike = Union[str, Path]

#: Formats :func:`write_subtitles` writes (pysubs2 format identifiers).
SUBTITLE_FORMATS: tuple[str, ...] = ("srt", "vtt")


def _escape_vtt(text: str) -> str:
    """Escape the characters WebVTT cue text reserves (&, <, >)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def vtt_timestamp(ms: int) -> str:
    """A WebVTT cue timestamp tag: ``<hh:mm:ss.ttt>``."""
    hours, rest = divmod(max(0, int(ms)), 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    return f"<{hours:02d}:{minutes:02d}:{rest // 1000:02d}.{rest % 1000:03d}>"


def word_timed_vtt_text(cue: Cue) -> str:
    """The cue's escaped text with a cue timestamp before each of its words after the first.

    WebVTT wants each timestamp strictly after the cue's start and the timestamp before it, and before
    the cue's end; a word whose start is not (the first word, a word moved by the cue timing rules) is
    left untagged. A cue whose words cannot be found in its text gets no tags rather than wrong ones.
    """
    text, pieces, position = cue.text, [], 0
    last, end = int(round(cue.start * 1000)), int(round(cue.end * 1000))
    for word in cue.words:
        found = text.find(word.text, position)
        if found < 0:
            return _escape_vtt(text)
        pieces.append(_escape_vtt(text[position:found]))
        start = int(round(word.start * 1000))
        if last < start < end:
            pieces.append(vtt_timestamp(start))
            last = start
        pieces.append(_escape_vtt(word.text))
        position = found + len(word.text)
    pieces.append(_escape_vtt(text[position:]))
    return "".join(pieces)


def write_subtitles(cues: Iterable[Cue], path: PathLike, fmt: str, word_timing: bool = False) -> Path:
    """Write cues as a subtitle file with pysubs2.

    Args:
        cues: Cues from :func:`make_cues`.
        path: Where to write (parent folders are created).
        fmt: ``"srt"`` or ``"vtt"`` (WebVTT; pysubs2 writes the ``WEBVTT`` header).
        word_timing: For WebVTT, tag each word with its start time (cues made from word timestamps;
            see :func:`word_timed_vtt_text`). SRT has no such tags and ignores it.

    Returns:
        The written path.

    Raises:
        ValueError: For an unknown format.
    """
    fmt = fmt.lower().lstrip(".")
    if fmt not in SUBTITLE_FORMATS:
        raise ValueError(f"Unknown subtitle format {fmt!r}; choose one of {', '.join(SUBTITLE_FORMATS)}.")
    subs = pysubs2.SSAFile()
    for cue in cues:
        if fmt == "vtt":
            text = word_timed_vtt_text(cue) if word_timing else _escape_vtt(cue.text)
        else:
            text = cue.text
        event = pysubs2.SSAEvent(start=int(round(cue.start * 1000)), end=int(round(cue.end * 1000)))
        event.plaintext = text  # "\n" -> "\N"; written back as real line breaks
        subs.append(event)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # keep_ssa_tags: text like "{laughs}" is not a style override and must not be dropped; the
    # text is written as given, so the escapes and cue timestamps above reach the file unchanged.
    subs.save(str(out), encoding="utf-8", format_=fmt, keep_ssa_tags=True)
    return out


def _safe_stem(stem: str) -> str:
    cleaned = re.sub(r"[^\w.-]+", "_", stem, flags=re.UNICODE).strip("._")
    return cleaned[:100] or "transcript"


def transcript_plain_text(transcript: Transcript) -> str:
    """Plain text: one segment per line (the transcript's text when it has no segments)."""
    lines = [" ".join(s.text.split()) for s in transcript.segments]
    lines = [line for line in lines if line]
    if not lines and transcript.text.strip():
        lines = [transcript.text.strip()]
    return "\n".join(lines) + ("\n" if lines else "")


def write_outputs(
    transcript: Transcript,
    out_dir: PathLike,
    stem: str,
    rules: CueRules = CueRules(),
    vtt_word_timing: bool = False,
) -> dict[str, Path]:
    """Write the downloads for one transcript: SRT, VTT, TXT and JSON.

    The JSON is ``transcript.to_dict()`` (each segment with its ``words``: text, start, end, when
    the transcript has word timestamps) with an extra ``"cues"`` list, so ``Transcript.from_dict``
    reads it back.

    Args:
        transcript: What to write.
        out_dir: Folder for the files (created if missing).
        stem: File name without extension (unsafe characters are replaced).
        rules: Cue rules for the subtitle files.
        vtt_word_timing: Tag the words of the WebVTT cues with their start times (needs word timestamps).

    Returns:
        ``{"srt": path, "vtt": path, "txt": path, "json": path}``.
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    name = _safe_stem(stem)
    cues = make_cues(transcript, rules)
    paths = {fmt: write_subtitles(cues, folder / f"{name}.{fmt}", fmt, word_timing=vtt_word_timing)
             for fmt in SUBTITLE_FORMATS}
    txt = folder / f"{name}.txt"
    txt.write_text(transcript_plain_text(transcript), encoding="utf-8")
    paths["txt"] = txt
    data = transcript.to_dict()
    data["cues"] = [c.to_dict() for c in cues]
    js = folder / f"{name}.json"
    js.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    paths["json"] = js
    return paths
