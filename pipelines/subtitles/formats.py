"""Subtitle and transcript files: SRT and WebVTT (written by **pysubs2**), plain text and JSON.

:func:`write_outputs` writes the downloads the UI offers for one transcript, side by side.
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


def write_subtitles(cues: Iterable[Cue], path: PathLike, fmt: str) -> Path:
    """Write cues as a subtitle file with pysubs2.

    Args:
        cues: Cues from :func:`make_cues`.
        path: Where to write (parent folders are created).
        fmt: ``"srt"`` or ``"vtt"`` (WebVTT; pysubs2 writes the ``WEBVTT`` header).

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
        text = _escape_vtt(cue.text) if fmt == "vtt" else cue.text
        event = pysubs2.SSAEvent(start=int(round(cue.start * 1000)), end=int(round(cue.end * 1000)))
        event.plaintext = text  # "\n" -> "\N"; written back as real line breaks
        subs.append(event)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # keep_ssa_tags: text like "{laughs}" is not a style override and must not be dropped.
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
) -> dict[str, Path]:
    """Write the downloads for one transcript: SRT, VTT, TXT and JSON.

    The JSON is ``transcript.to_dict()`` with an extra ``"cues"`` list, so
    ``Transcript.from_dict`` reads it back.

    Args:
        transcript: What to write.
        out_dir: Folder for the files (created if missing).
        stem: File name without extension (unsafe characters are replaced).
        rules: Cue rules for the subtitle files.

    Returns:
        ``{"srt": path, "vtt": path, "txt": path, "json": path}``.
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    name = _safe_stem(stem)
    cues = make_cues(transcript, rules)
    paths = {fmt: write_subtitles(cues, folder / f"{name}.{fmt}", fmt) for fmt in SUBTITLE_FORMATS}
    txt = folder / f"{name}.txt"
    txt.write_text(transcript_plain_text(transcript), encoding="utf-8")
    paths["txt"] = txt
    data = transcript.to_dict()
    data["cues"] = [c.to_dict() for c in cues]
    js = folder / f"{name}.json"
    js.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    paths["json"] = js
    return paths
