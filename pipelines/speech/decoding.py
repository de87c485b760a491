"""One window of at most 30 s through Whisper, guarded against its known failure modes.

Whisper loops ("a coffee, a coffee, ...") and hallucinates on silence. Each window is decoded greedily
first, conditioned on the text before it; a result that compresses too well or repeats an n-gram is
decoded again with sampling at rising temperatures (Whisper's reference decoder's fallback) and the
least repetitive result is kept with its loop cut; text without letters or digits is dropped.
"""
from __future__ import annotations

import logging
import re
import zlib
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import numpy as np

from pipelines.core.errors import Refused
from pipelines.speech.audio import SAMPLE_RATE
from pipelines.speech.catalogue import LANGUAGES
from pipelines.speech.types import Segment, TranscribeOptions, Word

log = logging.getLogger(__name__)


class TranscriptionRefused(Refused):
    """The request cannot be served as asked (e.g. translate on an English-only model)."""


@dataclass(frozen=True)
class DecodeGuards:
    """Limits that keep greedy decoding from looping (values from Whisper's reference decoder)."""

    compression_ratio_threshold: float = 2.4
    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8)
    base_tokens: int = 24  # token budget per window: base + per second of audio
    tokens_per_second: float = 7.0
    seed: int = 1234
    # Each window is conditioned on the end of the text before it (Whisper's
    # condition_on_previous_text): at most this many tokens (223 = half the decoder's 448
    # positions, as in the reference decoder; 0: no prompt). A window that needed sampling above
    # prompt_reset_temperature is not used as context, so a loop cannot carry over.
    prompt_tokens: int = 223
    prompt_reset_temperature: float = 0.5


@dataclass(frozen=True)
class Prompt:
    """Text the next window is conditioned on, and its length in tokens."""

    text: str
    tokens: int


#: A segment whose times are relative to its window (:mod:`pipelines.speech.service` puts it on the
#: recording's time line).
Chunk = Segment


@dataclass(frozen=True)
class Decoded:
    """One window's decoding: text, timed chunks relative to the window, detected language."""

    text: str
    chunks: tuple[Chunk, ...]
    language: Optional[str]
    temperature: float = 0.0  # the temperature that produced it

    @classmethod
    def from_result(cls, result: Any, seconds: float, temperature: float = 0.0) -> "Decoded":
        if not result.chunks and result.words:  # word mode: segments are made from the timed words
            chunks = [c for c in chunks_from_words(result.words, seconds) if not is_empty_text(c.text)]
            text = " ".join(c.text for c in chunks)
            language = (getattr(result, "language", "") or "").strip("<|>") or None
            return cls(text=text, chunks=tuple(chunks), language=language, temperature=temperature)
        chunks = []
        for chunk in result.chunks or []:
            text = chunk.text.strip()
            if is_empty_text(text):
                continue  # "", ".", "..." and the like are silence, not speech
            start = max(0.0, float(chunk.start_ts))
            end = float(chunk.end_ts) if chunk.end_ts >= 0 else seconds
            chunks.append(Chunk(start, max(start, end), text))
        chunks = _attach_words(chunks, result.words or [])
        text = " ".join(c.text for c in chunks) if result.chunks else result.texts[0].strip()
        if is_empty_text(text):
            text = ""
        language = (getattr(result, "language", "") or "").strip("<|>") or None
        return cls(text=text, chunks=tuple(chunks), language=language, temperature=temperature)

    def without_repeats(self, previous: Optional[str] = None) -> "Decoded":
        """Cut a phrase loop that survived every fallback down to its first occurrences (a first
        segment saying ``previous`` again, the window before's last segment, is dropped too)."""
        kept: list[Chunk] = []
        for chunk in self.chunks:
            tokens = chunk.text.split()
            indices = kept_after_collapse(tokens)
            cleaned = " ".join(tokens[i] for i in indices)
            last = kept[-1].text if kept else previous
            if last is not None and same_words(cleaned, last, min_words=4 if not kept else 1):
                continue
            if len(chunk.words) == len(tokens):  # word mode: a word per token; keep the words of the tokens kept
                words = tuple(chunk.words[i] for i in indices)
            else:
                words = chunk.words if cleaned == chunk.text else ()
            kept.append(Chunk(chunk.start, chunk.end, cleaned, words))
        text = " ".join(c.text for c in kept) if kept else collapse_repeats(self.text)
        return Decoded(text=text, chunks=tuple(kept), language=self.language, temperature=self.temperature)


SENTENCE_END = (".", "!", "?", "\u3002", "\uff01", "\uff1f")


def chunks_from_words(words: Iterable[Any], seconds: float, pause: float = 1.0, max_seconds: float = 12.0
                      ) -> list[Chunk]:
    """Group GenAI's timed words (relative to the window) into sentence-like segments: a segment ends
    after sentence punctuation, before a pause longer than ``pause`` s, or when it would pass ``max_seconds``."""
    chunks: list[Chunk] = []
    current: list[Word] = []
    last_start = last_end = 0.0  # word times never go back

    def close() -> None:
        if current:
            text = " ".join(w.text for w in current)
            chunks.append(Chunk(current[0].start, max(w.end for w in current), text, tuple(current)))
            current.clear()

    for w in words:
        text = w.word.strip()
        if is_empty_text(text):  # a lone "..." or "-" is not speech
            continue
        start = min(max(last_start, float(w.start_ts)), seconds)
        end = min(max(start, last_end, float(w.end_ts)), seconds)
        last_start, last_end = start, end
        if current and (start - current[-1].end > pause or end - current[0].start > max_seconds):
            close()
        current.append(Word(text, start, end))
        if text.endswith(SENTENCE_END):
            close()
    close()
    return chunks


def _attach_words(chunks: list[Chunk], words: Iterable[Any]) -> list[Chunk]:
    """Give each chunk the words whose middle falls inside it (GenAI returns words separately)."""
    buckets: list[list[Word]] = [[] for _ in chunks]
    for w in words:
        text = w.word.strip()
        if not text or not chunks:
            continue
        middle = (float(w.start_ts) + float(w.end_ts)) / 2
        index = next((i for i, c in enumerate(chunks) if c.start <= middle <= c.end),
                     min(range(len(chunks)), key=lambda i: abs((chunks[i].start + chunks[i].end) / 2 - middle)))
        buckets[index].append(Word(text, max(0.0, float(w.start_ts)), max(0.0, float(w.end_ts))))
    return [Chunk(c.start, c.end, c.text, tuple(b)) for c, b in zip(chunks, buckets)]


_WORDS = re.compile(r"\w+", re.UNICODE)


def is_empty_text(text: str) -> bool:
    """True for text with no letters or digits (silence hallucinations such as "." or "...")."""
    return not _WORDS.search(text or "")


def compression_ratio(text: str) -> float:
    """How well the text compresses: loops ("a coffee, a coffee, ...") compress far better than speech."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def _most_copies(words: list[str], lengths: Iterable[int]) -> int:
    """The most consecutive copies of any run of ``n`` words, ``n`` in ``lengths``."""
    best = 1
    for n in lengths:
        i = 0
        while i + 2 * n <= len(words):
            run = 1
            while words[i + run * n:i + (run + 1) * n] == words[i:i + n]:
                run += 1
            best = max(best, run)
            i += (run - 1) * n if run > 1 else 1
    return best


def longest_repeat_run(text: str, max_ngram: int = 6) -> int:
    """The most consecutive repetitions of any word n-gram (n <= max_ngram) in ``text``."""
    return _most_copies([w.lower() for w in _WORDS.findall(text)], range(1, max_ngram + 1))


def looks_degenerate(text: str, threshold: float = 2.4, max_run: int = 4) -> bool:
    return compression_ratio(text) > threshold or longest_repeat_run(text) > max_run


def same_words(a: str, b: str, min_words: int = 1) -> bool:
    """Whether two texts say the same words (case and punctuation aside), at least ``min_words`` of them."""
    words = [w.lower() for w in _WORDS.findall(a or "")]
    return len(words) >= min_words and words == [w.lower() for w in _WORDS.findall(b or "")]


def longest_phrase_run(words: list[str], min_words: int = 3, max_words: int = 20) -> int:
    """The most consecutive copies of any phrase of min_words..max_words words (longer phrases than
    longest_repeat_run's 6-word n-grams: a 7-word sentence said three times is a loop too)."""
    return _most_copies(words, range(min_words, min(max_words, len(words) // 2) + 1))


def segment_loop(segments: list[str], previous: Optional[str] = None, min_words: int = 4, copies: int = 3) -> bool:
    """A loop across segments: two consecutive segments (``previous``, the window before's last, counts
    as the one before the first) saying the same words, at least ``min_words`` of them; or a phrase of
    3-20 words ``copies`` times back to back anywhere in the window's text."""
    texts = ([previous] if previous else []) + [s for s in segments if s and s.strip()]
    if any(same_words(a, b, min_words) for a, b in zip(texts, texts[1:])):
        return True
    words = [w.lower() for t in segments for w in _WORDS.findall(t or "")]
    return longest_phrase_run(words) >= copies


def loops(decoded: "Decoded", previous: Optional[str] = None, threshold: float = 2.4) -> bool:
    """The loop test of the fallback: one window's text, its segments, and the window before's last segment."""
    return (looks_degenerate(decoded.text, threshold)
            or segment_loop([c.text for c in decoded.chunks] or [decoded.text], previous))


def collapse_repeats(text: str, max_ngram: int = 6, keep: int = 2) -> str:
    """Keep at most ``keep`` consecutive copies of any repeated word n-gram (punctuation kept)."""
    tokens = text.split()
    return " ".join(tokens[i] for i in kept_after_collapse(tokens, max_ngram, keep))


def kept_after_collapse(tokens: list[str], max_ngram: int = 6, keep: int = 2) -> list[int]:
    """The indices of the ``tokens`` :func:`collapse_repeats` keeps (so their timed words can be kept too)."""
    keys = [" ".join(_WORDS.findall(t.lower())) for t in tokens]
    kept = list(range(len(tokens)))
    for n in range(max_ngram, 0, -1):
        current = [keys[k] for k in kept]
        i, out = 0, []
        while i < len(kept):
            run = 1
            while current[i + run * n:i + (run + 1) * n] == current[i:i + n] and i + (run + 1) * n <= len(kept):
                run += 1
            out += kept[i:i + (min(run, keep) * n if run > 1 else 1)]
            i += run * n if run > 1 else 1
        kept = out
    return kept


def make_prompt(loaded: Any, context: list[str], limit: int) -> Optional["Prompt"]:
    """The end of the text so far, whole words, at most ``limit`` tokens, as Whisper's reference
    decoder conditions each 30 s window on the text before it (``loaded``: a loaded Whisper pipeline)."""
    if not context or limit <= 0 or loaded.tokenizer is None:
        return None
    words = " ".join(context)[-limit * 8:].split()  # a token is rarely longer than 8 characters

    def tokens(first: int) -> int:
        ids = loaded.tokenizer.encode(" " + " ".join(words[first:]), add_special_tokens=False).input_ids
        return int(ids.get_shape()[-1])

    low, high = 0, len(words)  # the fewest words to drop so that the rest fits
    while low < high:
        middle = (low + high) // 2
        if tokens(middle) <= limit:
            high = middle
        else:
            low = middle + 1
    if low >= len(words):
        return None
    return Prompt(" ".join(words[low:]), tokens(low))

def decode_window(loaded: Any, samples: np.ndarray, options: TranscribeOptions, language: Optional[str],
                  prompt: Optional["Prompt"] = None, guards: "DecodeGuards" = None,
                  previous: Optional[str] = None) -> "Decoded":
    """One window (<= 30 s): greedy first, conditioned on the text before it; on a
    repetition loop, retry unconditioned with sampling at rising temperatures (as Whisper's
    reference decoder does) and keep the least repetitive result. A phrase said again as its own
    segment, or a window starting with ``previous`` (the last segment before it), is a loop too."""
    guards = guards or DecodeGuards()
    seconds = samples.size / SAMPLE_RATE
    candidates: list[Decoded] = []
    budget = int(guards.base_tokens + guards.tokens_per_second * seconds)
    for temperature in guards.temperatures:
        config = loaded.pipeline.get_generation_config()  # a copy: this request's settings only
        config.task = options.task if loaded.multilingual else None
        config.language = language
        with_words = bool(options.word_timestamps and loaded.word_timestamps)
        config.word_timestamps = with_words
        # GenAI 2026.4 can crash the process (SIGSEGV in add_word_level_timestamps) when the decoded
        # tokens carry timestamp tokens as well (seen on degenerate output). Word mode therefore
        # decodes without timestamp tokens and takes segment times from the words: on real speech
        # the word times are the same either way.
        config.return_timestamps = not with_words
        config.max_new_tokens = budget
        if prompt and temperature == 0:
            config.initial_prompt = prompt.text
            # <|startofprev|> prompt <|startoftranscript|> <|lang|> <|task|> <|0.00|>, then new tokens
            config.max_new_tokens = max(1, min(budget, loaded.max_length - prompt.tokens - 5))
        if temperature > 0:
            config.do_sample = True
            config.temperature = temperature
            config.rng_seed = guards.seed
        with loaded.run_lock:
            result = loaded.pipeline.generate(np.ascontiguousarray(samples, dtype=np.float32),
                                              generation_config=config)
        decoded = Decoded.from_result(result, seconds, temperature)
        candidates.append(decoded)
        if not loops(decoded, previous, guards.compression_ratio_threshold):
            return decoded
        log.info("window of %.1f s looks degenerate at temperature %.1f: %r", seconds, temperature,
                 decoded.text[:80])
    best = min(candidates, key=lambda d: (loops(d, previous, guards.compression_ratio_threshold),
                                          compression_ratio(d.text)))
    return best.without_repeats(previous)

def language_token(loaded: Any, language: Optional[str]) -> Optional[str]:
    """The decoder's language token for a code or name (None: detect), refused when the model cannot take it."""
    if not language or language == "auto":
        return None
    code = language.strip().lower()
    if code in LANGUAGES.values():  # a name like "german"
        code = next(k for k, v in LANGUAGES.items() if v == code)
    token = f"<|{code.strip('<|>')}|>"
    if not loaded.multilingual:
        if token != "<|en|>":
            raise TranscriptionRefused(
                f"{loaded.resolved.reference} is English-only; it cannot transcribe '{language}'. "
                "Choose a multilingual model or leave the language on auto.")
        return None
    if token not in loaded.lang_to_id:
        raise TranscriptionRefused(f"Language '{language}' is not one Whisper knows. Use a code such as "
                                   "'en', 'de' or 'es', or leave it on auto-detect.")
    return token
