"""Speech with known word times: libespeak-ng (ctypes) speaks a text and says where each word starts.

espeak's WORD events give the sample where each word starts; a word ends where the audio before the
next word's start falls silent (espeak writes near-zero samples at pauses), or at the next word's start
when there is no pause. The samples are the same as ``espeak-ng -v VOICE -s SPEED -w`` writes,
resampled to 16 kHz by the app's own loader. Used by the live-caption tests (a decoder that knows the
words) and benchmarks/live_bench.py (the delay of each word from its end in the audio).
"""
from __future__ import annotations

import ctypes
import re
import tempfile
import threading
from pathlib import Path

import numpy as np

LIBRARY = "libespeak-ng.so.1"
WORD_EVENT = 1
_lock = threading.Lock()
_library: list = []


class _Event(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


def _espeak():
    """libespeak-ng, initialised once per process (a second initialisation after a terminate hangs)."""
    if not _library:
        lib = ctypes.CDLL(LIBRARY)
        rate = lib.espeak_Initialize(2, 0, None, 0)  # AUDIO_OUTPUT_SYNCHRONOUS, default buffer
        _library.append((lib, rate))
    return _library[0]


def synthesize(text: str, voice: str = "en-us", speed: int = 150) -> tuple[np.ndarray, int, dict[int, float]]:
    """(int16 samples at espeak's rate, the rate, {character offset of a word: its start in seconds})."""
    chunks: list[np.ndarray] = []
    starts: dict[int, float] = {}

    def callback(wav, count, events):
        if count > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        k = 0
        while events[k].type != 0:
            if events[k].type == WORD_EVENT:
                starts[events[k].text_position - 1] = events[k].audio_position / 1000
            k += 1
        return 0

    encoded = text.encode("utf-8")
    with _lock:
        lib, rate = _espeak()
        keep = _CALLBACK(callback)
        lib.espeak_SetSynthCallback(keep)
        lib.espeak_SetVoiceByName(voice.encode())
        lib.espeak_SetParameter(1, int(speed), 0)  # espeakRATE
        lib.espeak_Synth(ctypes.c_char_p(encoded), ctypes.c_size_t(len(encoded) + 1), 0, 1, 0, 0, None, None)
        lib.espeak_Synchronize()
    return (np.concatenate(chunks) if chunks else np.zeros(0, np.int16)), rate, starts


def word_times(text: str, voice: str = "en-us", speed: int = 150, silence: float = 0.01,
               min_pause: float = 0.04) -> tuple[np.ndarray, list[dict]]:
    """16 kHz float32 speech of ``text`` and each word's {"word", "start", "end"} in seconds."""
    import soundfile as sf

    from pipelines.speech.audio import load_audio

    raw, rate, by_char = synthesize(text, voice, speed)
    with tempfile.TemporaryDirectory() as tmp:
        sf.write(str(Path(tmp) / "s.wav"), raw, rate, subtype="PCM_16")
        audio = load_audio(Path(tmp) / "s.wav")
    tokens = [(m.start(), m.group()) for m in re.finditer(r"\S+", text)]
    starts = _fill_starts([by_char.get(char) for char, _ in tokens], [t for _, t in tokens], audio.size / 16000)
    hop = 160  # a 10 ms envelope
    loud = np.abs(audio[: audio.size // hop * hop].reshape(-1, hop)).max(axis=1) > silence
    words = []
    for k, (_, token) in enumerate(tokens):
        following = starts[k + 1] if k + 1 < len(tokens) else audio.size / 16000
        first, last = int(starts[k] * 100), max(int(starts[k] * 100) + 1, int(following * 100))
        end = following
        if loud[first:last].any():
            last_loud = first + int(np.nonzero(loud[first:last])[0][-1]) + 1
            if (last - last_loud) / 100 >= min_pause:  # a real pause before the next word
                end = last_loud / 100
        words.append({"word": token, "start": round(starts[k], 3), "end": round(end, 3)})
    return audio, words


def _fill_starts(starts: list, tokens: list[str], total: float) -> list[float]:
    """espeak speaks some pairs ("of the") as one word and gives the second no event: such words share
    the span up to the next known start, by letters."""
    known = [k for k, s in enumerate(starts) if s is not None]
    filled = list(starts)
    for k, start in enumerate(starts):
        if start is not None:
            continue
        before = max((j for j in known if j < k), default=None)
        after = min((j for j in known if j > k), default=None)
        t0 = starts[before] if before is not None else 0.0
        t1 = starts[after] if after is not None else total
        group = range(before if before is not None else 0, after if after is not None else len(tokens))
        letters = [len(tokens[j]) for j in group]
        done = sum(letters[:k - group.start])
        filled[k] = t0 + (t1 - t0) * done / max(sum(letters), 1)
    return filled
