"""The front-end side of one call to a deployment: :class:`RemoteCall`.

One call is one streaming handle call (``handle.options(stream=True).method.remote(...)``):

- progress events go to the caller's callbacks (``gr.Progress`` through the UI), by channel;
- cancel: the caller's cancel (a :class:`threading.Event` or a callable) is watched by a small thread
  that cancels the response; the replica then stops its work (:mod:`pipelines.serve.replica`);
- faults: a replica that dies (killed, out of memory) or becomes unreachable ends the call at once
  with Ray's ``ActorDiedError`` / ``ActorUnavailableError``; a replica that sends nothing, not even its
  heartbeat, for ``idle_timeout_s`` is given up. Either way the call is tried once more (every call
  is idempotent: a transcription or an image of a given seed; models are converted atomically), on
  another replica, within ``deadline_s``; then it ends with :class:`WorkerLost`, a clear message.
  Serve itself only re-routes requests not yet assigned to a replica, and replaces dead replicas;
- errors the service raises (``TranscriptionRefused``, ``ModelUnavailable``, ``NoPersonFound``, ...)
  reach the caller as their own type and message: Ray raises ``RayTaskError(X)``, whose ``cause`` is
  the service's exception, re-raised here;
- a full queue (``max_queued_requests``) is :class:`WorkersBusy`.

:class:`ReplicaBook` keeps what this front end saw of each replica (running, served, failed, loaded
models) and how many of its requests wait for one: ``/status`` shows it beside Serve's own state.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Mapping, Optional, Union

from pipelines.core.errors import ServiceUnavailable
from pipelines.core.progress import ProgressFn, no_progress
from pipelines.image.request import CancelCheck, is_cancelled
from pipelines.serve.protocol import MAIN, PREVIEW, PROGRESS, RESULT, STARTED

Progress = Union[ProgressFn, Mapping[str, ProgressFn]]
DEADLINE_S = 3600.0  # one call, all its tries, at most (a first INT8 image quantization takes ~15 minutes)
IDLE_TIMEOUT_S = 60.0  # no event at all (replicas send a heartbeat every 5 s) for this long: the replica is lost


class WorkerLost(ServiceUnavailable):
    """The replica running a request stopped (twice), or went silent."""


class WorkersBusy(ServiceUnavailable):
    """Every replica is busy and the queue in front of them is full."""


class CallCancelled(Exception):
    """The caller's cancel fired."""


class _Lost(Exception):
    """One try lost its replica (internal: the call tries again or gives up)."""


def _retryable() -> tuple[type, ...]:
    import ray.exceptions as rex

    return rex.ActorDiedError, rex.ActorUnavailableError, rex.RayActorError, rex.OutOfMemoryError


class ReplicaBook:
    """What this front end saw of each replica, by deployment (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, int] = {}
        self._replicas: dict[tuple[str, str], dict] = {}

    def _entry(self, deployment: str, replica: str) -> dict:
        return self._replicas.setdefault((deployment, replica), {"running": 0, "served": 0, "failed": 0, "lost": 0,
                                                                 "loaded": [], "last_seen": 0.0})

    def waiting(self, deployment: str, change: int = 0) -> int:
        with self._lock:
            self._waiting[deployment] = self._waiting.get(deployment, 0) + change
            return self._waiting[deployment]

    def note(self, deployment: str, replica: str, **changes: Any) -> None:
        """Add the numeric ``changes`` to the replica's counters; ``loaded=`` replaces its loaded models."""
        with self._lock:
            entry = self._entry(deployment, replica)
            for name, value in changes.items():
                entry[name] = value if name == "loaded" else entry[name] + value
            entry["last_seen"] = round(time.time(), 1)

    def replica(self, deployment: str, replica: str) -> dict:
        with self._lock:
            return dict(self._entry(deployment, replica))

    def totals(self, deployment: str) -> dict[str, int]:
        """Requests of this front end the deployment's replicas served, failed and lost, over every replica
        it has seen (replaced ones too)."""
        with self._lock:
            entries = [entry for (dep, _), entry in self._replicas.items() if dep == deployment]
            return {name: sum(entry[name] for entry in entries) for name in ("served", "failed", "lost")}

    def loaded(self, deployment: str) -> list[tuple]:
        """The models loaded on the deployment's replicas, each once."""
        with self._lock:
            keys = [tuple(key) for (dep, _), entry in self._replicas.items() if dep == deployment
                    for key in entry["loaded"]]
        return list(dict.fromkeys(keys))


class _Watch:
    """Cancels a response when the caller cancels, when the replica goes silent, or past the deadline."""

    def __init__(self, response: Any, cancel: CancelCheck, idle_s: float, deadline: float):
        self.response, self.cancel, self.idle_s, self.deadline = response, cancel, idle_s, deadline
        self.why: Optional[str] = None
        self.last_event = time.monotonic()
        self._done = threading.Event()
        threading.Thread(target=self._run, name="vs-ray-watch", daemon=True).start()

    def _run(self) -> None:
        while not self._done.wait(0.05):
            now = time.monotonic()
            if is_cancelled(self.cancel):
                self.why = "cancel"
            elif now - self.last_event > self.idle_s:
                self.why = "silent"
            elif now > self.deadline:
                self.why = "deadline"
            else:
                continue
            self.response.cancel()
            return

    def saw_event(self) -> None:
        self.last_event = time.monotonic()

    def stop(self) -> None:
        self._done.set()


class RemoteCall:
    """Calls of one deployment's methods, with progress, cancel, one retry and a deadline (module doc)."""

    def __init__(self, handle: Any, deployment: str, book: Optional[ReplicaBook] = None, retries: int = 1,
                 deadline_s: float = DEADLINE_S, idle_timeout_s: float = IDLE_TIMEOUT_S):
        self.handle, self.deployment = handle, deployment
        self.book = book or ReplicaBook()
        self.retries, self.deadline_s, self.idle_timeout_s = retries, deadline_s, idle_timeout_s
        self.last = threading.local()  # .info: this thread's last result: replica, seconds inside it, tries

    def run(self, method: str, *args: Any, progress: Progress = no_progress, cancel: CancelCheck = None) -> Any:
        """``method(*args)`` on a replica; its result, or the service's own exception."""
        channels = dict(progress) if isinstance(progress, Mapping) else {MAIN: progress}
        deadline = time.monotonic() + self.deadline_s
        why, tries = "no try was made", 0
        for attempt in range(1 + self.retries):
            if is_cancelled(cancel):
                raise CallCancelled("cancelled")
            self.last.info = {"tries": attempt + 1}
            tries = attempt + 1
            try:
                return self._try(method, args, channels, cancel, deadline)
            except _Lost as lost:
                why = str(lost)
                if lost.args[0] == "deadline" or attempt == self.retries:
                    break
                channels.get(MAIN, no_progress)(0.0, f"the {self.deployment} worker stopped ({why}); "
                                                     "trying again on another one")
        again = ", and a second worker did not finish it either" if tries > 1 else ""
        raise WorkerLost(f"The {self.deployment} worker running this request stopped ({why}){again}. "
                         "Please try again in a minute.")

    def _try(self, method: str, args: tuple, channels: dict[str, ProgressFn], cancel: CancelCheck,
             deadline: float) -> Any:
        from ray.exceptions import RayTaskError
        from ray.serve.exceptions import BackPressureError, RequestCancelledError

        response = getattr(self.handle.options(stream=True), method).remote(*args)
        watch = _Watch(response, cancel, self.idle_timeout_s, deadline)
        seen: dict[str, Optional[str]] = {"replica": None}
        self.book.waiting(self.deployment, +1)
        try:
            return self._consume(response, watch, channels, seen)
        except RequestCancelledError:
            if watch.why == "cancel":
                raise CallCancelled("cancelled") from None
            raise _Lost(watch.why or "cancelled") from None
        except _retryable() as exc:
            self._count(seen, lost=1, loaded=[])  # its models went with it
            raise _Lost(type(exc).__name__) from None
        except BackPressureError:
            raise WorkersBusy(f"All {self.deployment} workers are busy and enough requests already wait for them. "
                              "Please try again in a minute.") from None
        except RayTaskError as exc:
            self._count(seen, failed=1)
            cause = getattr(exc, "cause", None)
            if isinstance(cause, BaseException):
                raise cause from None  # the service's own exception and message
            raise
        finally:
            watch.stop()
            if seen["replica"] is None:
                self.book.waiting(self.deployment, -1)
            else:
                self.book.note(self.deployment, seen["replica"], running=-1)
            response.cancel()  # nothing when finished; frees the replica when this call gives up early

    def _consume(self, response: Any, watch: _Watch, channels: dict[str, ProgressFn],
                 seen: dict[str, Optional[str]]) -> Any:
        for event in response:
            watch.saw_event()
            kind = event.get("kind")
            if kind == STARTED:
                seen["replica"] = event["replica"]
                self.book.waiting(self.deployment, -1)
                self.book.note(self.deployment, event["replica"], running=1)
            elif kind == PROGRESS:
                channels.get(event.get("channel", MAIN), channels.get(MAIN, no_progress))(
                    event["fraction"], event["message"])
            elif kind == PREVIEW and PREVIEW in channels:
                channels[PREVIEW](event["value"])
            elif kind == RESULT:
                self.book.note(self.deployment, event["replica"], served=1, loaded=event.get("loaded", []))
                self.last.info.update(replica=event["replica"], replica_seconds=event.get("seconds"))
                return event["value"]
        raise _Lost("the answer ended without a result")

    def _count(self, seen: dict[str, Optional[str]], **changes: Any) -> None:
        if seen["replica"] is not None:
            self.book.note(self.deployment, seen["replica"], **changes)


def broadcast(handle: Any, method: str, *args: Any, timeout_s: float = 60.0) -> list:
    """``method(*args)`` on every replica of a deployment (e.g. load a model everywhere); their answers."""
    return list(handle.broadcast(method, *args).results(timeout_s=timeout_s))

