"""Live updates of a long call: the call runs in a thread and what it reports on the way (live previews)
comes out of a generator, which a Gradio handler turns into output updates as they arrive.

The thread runs in a copy of the handler's context, so Gradio's progress bar (``gr.Progress``, which
finds its request through context variables) keeps working from it. When the handler stops early
(Gradio cancelled the event, the browser left), :meth:`LiveRun.stop` sets the call's cancel flag: it
stops after its current step and frees its work slot.
"""
from __future__ import annotations

import contextvars
import queue
import threading
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


class LiveRun(Generic[T]):
    """``work(report)`` in a thread; iterate to get what it ``report``-s, newest first when several wait;
    then :attr:`result` is its return value (iteration raises what it raised)."""

    def __init__(self, work: Callable[[Callable[[Any], None]], T], cancel: threading.Event):
        self._updates: "queue.Queue[Any]" = queue.Queue()
        self._cancel = cancel
        self._outcome: dict[str, Any] = {}
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run, work), daemon=True,
                                        name="voice-studio-live")
        self._thread.start()

    def _run(self, work: Callable[[Callable[[Any], None]], T]) -> None:
        try:
            self._outcome["result"] = work(self._updates.put)
        except BaseException as error:  # noqa: BLE001 - raised again where the updates are read
            self._outcome["error"] = error
        finally:
            self._updates.put(_DONE)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._updates.get()
            while item is not _DONE and not self._updates.empty():  # skip stale updates: show the newest
                newer = self._updates.get()
                if newer is _DONE:
                    self._updates.put(_DONE)  # still yield the newest update before finishing
                    break
                item = newer
            if item is _DONE:
                break
            yield item
        if "error" in self._outcome:
            raise self._outcome["error"]

    @property
    def result(self) -> T:
        return self._outcome["result"]

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Ask the work to stop (after its current step) when it still runs: nobody reads its updates."""
        if self._thread.is_alive():
            self._cancel.set()
