"""Turn a :class:`~pipelines.speech.types.Transcript` into readable subtitle cues.

Pipeline: ``Transcript`` -> :func:`make_cues` -> ``list[Cue]`` -> the files of
:mod:`pipelines.subtitles.formats` (SRT / WebVTT through **pysubs2**, TXT, JSON).

How cues are made (see :class:`CueRules` for the limits):

1. Each segment is cut into *tokens* (words). With word timestamps (``Segment.words``) every
   token keeps its own time; without them the segment's time is shared out by character count.
   Punctuation-only tokens are glued to their neighbour, and tokens too long for one line
   (e.g. unspaced CJK text) are cut into line-sized pieces.
2. Tokens are grouped into cues with a small dynamic programme per segment that keeps every
   cue within ``max_lines`` x ``max_line_chars`` and ``max_duration``, uses as few cues as it
   can, prefers to end a cue after punctuation and keeps the cues of a segment balanced.
3. Each cue is wrapped into at most ``max_lines`` lines, breaking at word boundaries, preferring
   breaks after punctuation and lines of similar length (one line when the text fits on one).
4. Times are fixed across all cues (in whole milliseconds): empty / punctuation-only cues are
   dropped, cues are kept in order with at least ``min_gap`` between them (a cue's end is
   clipped to the next start minus ``min_gap``), short cues are extended towards
   ``min_duration`` where there is room, and nothing is negative or beyond
   ``transcript.duration`` (when that is > 0).
"""
from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from pipelines.speech.types import Segment, Transcript, Word

__all__ = [
    "CueRules",
    "Cue",
    "make_cues",
    "wrap_text",
]

PathLike = Union[str, Path]

# Shortest time a cue is ever shown for when cues have to be pushed apart (ms).
_MIN_VISIBLE_MS = 100

_SENTENCE_END = frozenset(".!?…。！？")
_CLAUSE_END = frozenset(",;:、，；：—–")
_CLOSERS = "\"'”’»)]}」』"


@dataclass(frozen=True)
class CueRules:
    """Limits that make subtitles readable.

    Attributes:
        max_line_chars: Most characters on one line.
        max_lines: Most lines in one cue.
        max_duration: Longest time (s) one cue stays on screen.
        min_duration: Shortest time (s) a cue should stay on screen; short cues are extended
            up to this where the next cue leaves room.
        min_gap: Smallest gap (s) between the end of one cue and the start of the next.
    """

    max_line_chars: int = 42
    max_lines: int = 2
    max_duration: float = 6.0
    min_duration: float = 0.7
    min_gap: float = 0.05

    def __post_init__(self) -> None:
        if self.max_line_chars < 1:
            raise ValueError("max_line_chars must be at least 1")
        if self.max_lines < 1:
            raise ValueError("max_lines must be at least 1")
        if not self.max_duration > 0:
            raise ValueError("max_duration must be positive")
        if self.min_duration < 0 or self.min_gap < 0:
            raise ValueError("min_duration and min_gap must not be negative")
        if self.min_duration > self.max_duration:
            raise ValueError("min_duration must not exceed max_duration")


@dataclass(frozen=True)
class Cue:
    """One subtitle on screen: times in seconds (millisecond precision), lines joined by "\\n".

    ``words``: when the transcript had word timestamps, the cue's words (as they stand in ``text``,
    punctuation glued on) with their times, for word-timed WebVTT; not part of equality or JSON.
    """

    start: float
    end: float
    text: str
    words: tuple[Word, ...] = field(default=(), compare=False, repr=False)

    @property
    def lines(self) -> list[str]:
        """The cue's lines."""
        return self.text.split("\n")

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        return {"start": self.start, "end": self.end, "text": self.text}


@dataclass(frozen=True)
class _Token:
    text: str  # no surrounding whitespace
    sep: str  # what joins it to the previous token: " " or "" (unspaced scripts, cut pieces)
    start: float
    end: float


# --------------------------------------------------------------------------- tokens


def _is_wordless(text: str) -> bool:
    """True when ``text`` has no letter or digit (only punctuation, symbols or spaces)."""
    return not any(ch.isalnum() for ch in text)


def _width(text: str) -> int:
    """Display width: East Asian wide/full-width characters count 2, combining marks 0."""
    total = 0
    for ch in text:
        if unicodedata.combining(ch):
            continue
        total += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return total


def _join(tokens: Sequence[_Token]) -> str:
    if not tokens:
        return ""
    return tokens[0].text + "".join(t.sep + t.text for t in tokens[1:])


def _break_bonus(text: str) -> float:
    """How good a place the end of ``text`` is for a break: 1 sentence end, 0.6 clause, 0 none."""
    stripped = text.rstrip(_CLOSERS)
    if not stripped:
        return 0.0
    if stripped[-1] in _SENTENCE_END:
        return 1.0
    if stripped[-1] in _CLAUSE_END:
        return 0.6
    return 0.0


def _split_long_text(text: str, limit: int) -> list[str]:
    """Cut ``text`` into pieces at most ``limit`` wide, preferring cuts after punctuation."""
    pieces: list[str] = []
    while _width(text) > limit:
        fit = 1  # most leading characters that fit (at least one, so this always advances)
        while fit < len(text) and _width(text[: fit + 1]) <= limit:
            fit += 1
        cut = fit
        for i in range(fit, max(fit // 2, 1) - 1, -1):
            if _break_bonus(text[:i]) > 0:
                cut = i
                break
        pieces.append(text[:cut])
        text = text[cut:]
    if text:
        pieces.append(text)
    return pieces


def _share_time(items: Sequence[tuple[str, str]], start: float, end: float) -> list[_Token]:
    """Give (sep, text) items consecutive times in [start, end] in proportion to their length."""
    weights = [len(text) + (len(sep) if i else 0) for i, (sep, text) in enumerate(items)]
    total = sum(weights) or 1
    span = max(0.0, end - start)
    tokens: list[_Token] = []
    acc = 0
    for (sep, text), weight in zip(items, weights):
        t0 = start + span * acc / total
        acc += weight
        tokens.append(_Token(text, sep, t0, start + span * acc / total))
    return tokens


def _segment_tokens(segment: Segment, max_line_chars: int) -> list[_Token]:
    """Tokens of one segment, timed by its words when it has them, else by character share; tokens
    longer than a line cut into pieces, punctuation-only tokens glued to a neighbour."""
    seg_start = max(0.0, float(segment.start))
    seg_end = max(seg_start, float(segment.end))
    words = [w for w in segment.words if w.text and w.text.strip()]
    if words:
        raw = _word_tokens(segment, words, seg_start, seg_end)
    else:
        parts = segment.text.split()
        if not parts:
            return []
        raw = _share_time([(" ", p) for p in parts], seg_start, seg_end)
    return _glue_punctuation(_cut_long(raw, max_line_chars), max_line_chars)


def _word_tokens(segment: Segment, words: list, seg_start: float, seg_end: float) -> list[_Token]:
    """One token per timed word, kept in order and inside its segment."""
    # Whisper-style words carry their leading space (" Hello"); some producers drop it, and
    # unspaced scripts (Chinese, Japanese, Thai) have none between words at all.
    keep_spacing = any(w.text[:1].isspace() for w in words)
    spaced_text = bool(re.search(r"\s", segment.text.strip())) or not segment.text.strip()
    tokens = []
    last = seg_start
    for w in words:
        w_start = max(float(w.start), last)
        w_end = max(float(w.end), w_start)
        if seg_end > seg_start:  # keep words inside their segment
            w_start, w_end = min(w_start, seg_end), min(w_end, seg_end)
        last = w_start
        if keep_spacing:
            sep = " " if w.text[:1].isspace() else ""
        else:
            sep = " " if spaced_text else ""
        tokens.append(_Token(w.text.strip(), sep, w_start, w_end))
    return tokens


def _cut_long(tokens: list[_Token], max_line_chars: int) -> list[_Token]:
    """Cut tokens longer than a line (unspaced scripts, URLs) into timed pieces."""
    sized: list[_Token] = []
    for tok in tokens:
        if _width(tok.text) <= max_line_chars:
            sized.append(tok)
            continue
        pieces = _split_long_text(tok.text, max_line_chars)
        sized.extend(_share_time([(tok.sep if i == 0 else "", p) for i, p in enumerate(pieces)], tok.start, tok.end))
    return sized


def _glue_punctuation(tokens: list[_Token], max_line_chars: int) -> list[_Token]:
    """Glue punctuation-only tokens ("-", "…", "?") to the previous token (or the next one)."""
    merged: list[_Token] = []
    pending: Optional[_Token] = None
    for tok in tokens:
        if _is_wordless(tok.text):
            if merged and _width(merged[-1].text + tok.sep + tok.text) <= max_line_chars:
                prev = merged[-1]
                merged[-1] = _Token(prev.text + tok.sep + tok.text, prev.sep, prev.start, max(prev.end, tok.end))
                continue
            if not merged:
                pending = tok if pending is None else _Token(
                    pending.text + tok.sep + tok.text, pending.sep, pending.start, tok.end)
                continue
        if pending is not None and _width(pending.text + tok.sep + tok.text) <= max_line_chars:
            tok = _Token(pending.text + tok.sep + tok.text, pending.sep, pending.start, tok.end)
            pending = None
        elif pending is not None:
            merged.append(pending)
            pending = None
        merged.append(tok)
    if pending is not None:
        merged.append(pending)
    return merged


# --------------------------------------------------------------------------- wrapping


def _wrap_tokens(tokens: Sequence[_Token], max_chars: int, max_lines: int) -> Optional[list[str]]:
    """Best wrapping of ``tokens`` into at most ``max_lines`` lines, or None if impossible.

    Uses the fewest lines possible; among those, prefers breaks after punctuation and lines of
    similar length. Tokens themselves are never split.
    """
    n = len(tokens)
    if n == 0:
        return []
    whole = _join(tokens)
    if _width(whole) <= max_chars:
        return [whole]
    if max_lines < 2:
        return None
    inf = math.inf
    # best[k][j] = (cost, i): cheapest way to set tokens[:j] on exactly k lines, the last
    # line being tokens[i:j].
    best: list[list[tuple[float, int]]] = [[(inf, -1)] * (n + 1) for _ in range(max_lines + 1)]
    best[0][0] = (0.0, -1)
    for k in range(1, max_lines + 1):
        for j in range(1, n + 1):
            line_len = 0
            for i in range(j - 1, -1, -1):  # last line = tokens[i:j], growing to the left
                line_len += _width(tokens[i].text) + (len(tokens[i + 1].sep) if i < j - 1 else 0)
                if line_len > max_chars:
                    break
                prev_cost = best[k - 1][i][0]
                if prev_cost == inf:
                    continue
                slack = (max_chars - line_len) / max_chars
                cost = prev_cost + slack * slack
                if j < n:  # a line break after tokens[j-1]
                    cost += 0.5 * (1.0 - _break_bonus(tokens[j - 1].text))
                if cost < best[k][j][0]:
                    best[k][j] = (cost, i)
        if best[k][n][0] < inf:
            lines: list[str] = []
            j, kk = n, k
            while kk > 0:
                i = best[kk][j][1]
                lines.append(_join(tokens[i:j]))
                j, kk = i, kk - 1
            return lines[::-1]
    return None


def wrap_text(text: str, max_line_chars: int = 42, max_lines: int = 2) -> Optional[list[str]]:
    """Wrap plain ``text`` into at most ``max_lines`` lines of ``max_line_chars`` characters.

    Breaks only at spaces, prefers breaks after punctuation and balanced lines. Returns None when
    the text does not fit.
    """
    tokens = [_Token(p, " ", 0.0, 0.0) for p in text.split()]
    return _wrap_tokens(tokens, max_line_chars, max_lines)


# --------------------------------------------------------------------------- grouping


def _group_segment(tokens: Sequence[_Token], rules: CueRules) -> list[tuple[float, float, str, Sequence[_Token]]]:
    """Split one segment's tokens into cues: (start, end, text, tokens) with text already wrapped."""
    n = len(tokens)
    if n == 0:
        return []
    capacity = rules.max_line_chars * rules.max_lines
    inf = math.inf
    best: list[tuple[float, int]] = [(inf, -1)] * (n + 1)
    best[0] = (0.0, -1)
    wraps: dict[tuple[int, int], list[str]] = {}
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):
            chars = _width(_join(tokens[i:j]))
            duration = tokens[j - 1].end - tokens[i].start
            single = j - i == 1
            if not single and (chars > capacity or duration > rules.max_duration):
                break
            lines = _wrap_tokens(tokens[i:j], rules.max_line_chars, rules.max_lines)
            if lines is None:
                if single:
                    lines = [_join(tokens[i:j])]
                else:
                    continue
            if best[i][0] == inf:
                continue
            fill = min(1.0, chars / capacity)
            cost = best[i][0] + 2.0 + 3.0 * (1.0 - fill) ** 2
            if j < n:
                cost += 1.5 * (1.0 - _break_bonus(tokens[j - 1].text))
            if cost < best[j][0]:
                best[j] = (cost, i)
                wraps[(i, j)] = lines
    cues: list[tuple[float, float, str, Sequence[_Token]]] = []
    j = n
    while j > 0:
        i = best[j][1]
        cues.append((tokens[i].start, tokens[j - 1].end, "\n".join(wraps[(i, j)]), tokens[i:j]))
        j = i
    return cues[::-1]


# --------------------------------------------------------------------------- timing


def _fix_times(raw: list[tuple[int, int, str, tuple]], rules: CueRules, limit_ms: Optional[int]) -> list[Cue]:
    """Order, separate, extend and clamp cues (all times in whole ms; the 4th item: the cue's words)."""
    gap = int(round(rules.min_gap * 1000))
    min_dur = int(round(rules.min_duration * 1000))
    step = gap + _MIN_VISIBLE_MS
    cues = [[max(0, s), max(0, e), t, words] for s, e, t, words in raw]
    if limit_ms is not None:
        for c in cues:
            c[0], c[1] = min(c[0], limit_ms), min(c[1], limit_ms)
    cues.sort(key=lambda c: (c[0], c[1]))
    # Starts strictly increasing with room for a visible cue and a gap between them.
    for k in range(1, len(cues)):
        cues[k][0] = max(cues[k][0], cues[k - 1][0] + step)
    if limit_ms is not None:
        # Pushed past the end: pull back from the right.
        for k in range(len(cues) - 1, -1, -1):
            top = limit_ms - _MIN_VISIBLE_MS if k == len(cues) - 1 else cues[k + 1][0] - step
            cues[k][0] = max(0, min(cues[k][0], top))
    for k, c in enumerate(cues):
        nxt = cues[k + 1][0] - gap if k + 1 < len(cues) else None
        end = max(c[1], c[0] + _MIN_VISIBLE_MS)
        if end - c[0] < min_dur:
            end = c[0] + min_dur
        if nxt is not None:
            end = min(end, nxt)
        if limit_ms is not None:
            end = min(end, limit_ms)
        if end - c[0] < min_dur:
            # Still short: start earlier, into the gap after the previous cue.
            floor = cues[k - 1][1] + gap if k > 0 else 0
            c[0] = max(floor, min(c[0], end - min_dur))
        c[1] = end
    return [Cue(s / 1000.0, e / 1000.0, t, words) for s, e, t, words in cues if e > s]


def make_cues(transcript: Transcript, rules: CueRules = CueRules()) -> list[Cue]:
    """Split a transcript into readable subtitle cues (see the module docstring for the rules).

    Args:
        transcript: What the transcription produced.
        rules: Line, duration and gap limits.

    Returns:
        Cues in time order, never overlapping, each with at most ``rules.max_lines`` lines
        (a single word longer than a line is cut into pieces).
    """
    raw: list[tuple[int, int, str, tuple]] = []
    for segment in transcript.segments:
        tokens = _segment_tokens(segment, rules.max_line_chars)
        timed = any(w.text.strip() for w in segment.words)  # real word times, not shares of the segment's
        for start, end, text, group in _group_segment(tokens, rules):
            if not text.strip() or _is_wordless(text):
                continue
            words = tuple(Word(t.text, t.start, t.end) for t in group) if timed else ()
            raw.append((int(round(start * 1000)), int(round(end * 1000)), text, words))
    limit = int(math.floor(transcript.duration * 1000 + 1e-6)) if transcript.duration > 0 else None
    return _fix_times(raw, rules, limit)
