"""What a transcription produces and how it is asked for: values that travel between ui/, the
speech and subtitles domains, tests and API clients."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Optional

Task = Literal["transcribe", "translate"]
TASKS: tuple[str, ...] = ("transcribe", "translate")


@dataclass(frozen=True)
class Word:
    text: str
    start: float
    end: float


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str
    words: tuple[Word, ...] = ()


@dataclass(frozen=True)
class Transcript:
    """What one transcription produced. Times are seconds from the start of the audio."""

    text: str
    language: Optional[str]
    segments: tuple[Segment, ...]
    task: str = "transcribe"
    model: str = ""
    duration: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Transcript":
        segments = tuple(
            Segment(
                start=float(s["start"]),
                end=float(s["end"]),
                text=s["text"],
                words=tuple(Word(**w) for w in s.get("words", ())),
            )
            for s in data.get("segments", ())
        )
        return cls(
            text=data.get("text", ""),
            language=data.get("language"),
            segments=segments,
            task=data.get("task", "transcribe"),
            model=data.get("model", ""),
            duration=float(data.get("duration", 0.0)),
        )


@dataclass(frozen=True)
class TranscribeOptions:
    task: Task = "transcribe"
    language: Optional[str] = None  # ISO code like "de"; None = detect
    timestamps: bool = True
    word_timestamps: bool = False
    vad: bool = True  # transcribe only where voice activity detection finds speech
