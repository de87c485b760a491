"""What travels between the front end and a replica (plain data, pickled by Ray).

A streaming call yields events (dicts):

- ``{"kind": "started", "replica": id, "pid": pid}``: first, always (the front end learns who runs it);
- ``{"kind": "progress", "channel": name, "fraction": f, "message": m}``: any number; ``channel`` is
  ``"main"`` or, for an image, ``"steps"`` (denoising steps; getting the models ready is ``"main"``);
- ``{"kind": "preview", "value": preview}``: an image generation's live previews
  (:class:`pipelines.image.denoise.Preview`, its PIL image pickled), when the caller asked for them;
- ``{"kind": "alive"}``: every :data:`HEARTBEAT_S` seconds while nothing else was sent;
- ``{"kind": "result", "value": v, "replica": id, "seconds": s, "loaded": [...]}``: last, or the call
  raises the service's own exception.

Audio in a file crosses as its bytes (:class:`WavFile`: the 16 kHz 16-bit WAV the subtitles job
extracts, about 115 MB an hour): a replica may run on another machine, where the front end's paths
mean nothing. The replica writes it to its own temp folder and reads it a window at a time, as the
embedded service does.
"""
from __future__ import annotations

import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

HEARTBEAT_S = 5.0
STARTED, PROGRESS, PREVIEW, ALIVE, RESULT = "started", "progress", "preview", "alive", "result"
MAIN, STEPS = "main", "steps"


class Cancelled(Exception):
    """The caller cancelled: raised in the replica's worker thread at the service's next progress report."""


@dataclass(frozen=True)
class WavFile:
    """A WAV file's name and bytes, for a replica that cannot read the front end's disk."""

    name: str
    data: bytes

    @classmethod
    def read(cls, path: Path) -> "WavFile":
        return cls(Path(path).name, Path(path).read_bytes())

    @contextmanager
    def on_disk(self) -> Iterator[Path]:
        """The file written to a temp folder of this machine for the ``with`` block, then deleted."""
        folder = Path(tempfile.mkdtemp(prefix="voice-studio-replica-"))
        try:
            path = folder / (re.sub(r"[^\w.-]+", "_", self.name).strip("._") or "audio.wav")
            path.write_bytes(self.data)
            yield path
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def as_sent(audio: Any) -> Any:
    """What a front end sends for ``audio``: samples as they are, a file as its bytes."""
    return WavFile.read(audio) if isinstance(audio, (str, Path)) else audio


@contextmanager
def as_received(audio: Any) -> Iterator[Any]:
    """What a replica's service takes for what was sent: samples as they are, a :class:`WavFile` as a
    path on this machine (for the ``with`` block)."""
    if isinstance(audio, WavFile):
        with audio.on_disk() as path:
            yield path
    else:
        yield audio
