"""Work slots: how many heavy runs (transcriptions, image generations) go on at once.

Gradio's queue admits a few more requests of a kind than there are slots. The extra ones download,
convert or quantize their models, fetch videos and extract audio meanwhile, and take a slot only to
compile and run. So a visitor who picks a model nobody has used yet does not hold up everyone
whose model is ready.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from pipelines.core.progress import ProgressFn, no_progress


class WorkSlots:
    """At most ``count`` holders at a time; re-entrant per thread (a compare holds one slot over both
    of its runs, and the runs inside it do not wait for a second)."""

    def __init__(self, count: int, what: str):
        self.count = max(1, int(count))
        self.what = what
        self._free = threading.BoundedSemaphore(self.count)
        self._held = threading.local()
        self._waiting = 0
        self._waiting_lock = threading.Lock()

    @property
    def waiting(self) -> int:
        """How many requests wait for a slot now (each found every slot busy and has not got one yet)."""
        with self._waiting_lock:
            return self._waiting

    def _count_waiting(self, change: int) -> None:
        with self._waiting_lock:
            self._waiting += change

    @contextmanager
    def turn(self, progress: ProgressFn = no_progress, fraction: float = 0.0,
             while_waiting: Callable[[], None] = lambda: None) -> Iterator[None]:
        """Hold a slot for the ``with`` block; while waiting for one, ``progress`` says so and
        ``while_waiting()`` is called about every 0.2 s (it may raise to give up, e.g. on cancel)."""
        depth = getattr(self._held, "depth", 0)
        if depth == 0 and not self._free.acquire(blocking=False):
            slots = f"the {self.what} slot" if self.count == 1 else f"one of the {self.count} {self.what} slots"
            progress(fraction, f"waiting for {slots} of this server")
            self._count_waiting(+1)
            try:
                while not self._free.acquire(timeout=0.2):
                    while_waiting()
            finally:
                self._count_waiting(-1)
        self._held.depth = depth + 1
        try:
            yield
        finally:
            self._held.depth = depth
            if depth == 0:
                self._free.release()
