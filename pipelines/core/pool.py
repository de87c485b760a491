"""The model pool: every model this process has loaded, for every domain.

- **Load once per key**: a key is a tuple whose first item is the kind of work (``"whisper"``,
  ``"image"``, ``"pose"``); two requests asking for the same key at the same time wait for one load,
  and a load of one key never holds up requests for others.
- **Bounded**: at most ``limits[kind]`` models of a kind stay loaded (``--max-loaded-models`` for
  Whisper); loading one more evicts the least recently used of its kind.
- **Keep-alive**: an evicted model a request still runs on is not freed under it: the pool keeps a
  weak reference, a new request for its key takes it back instead of loading it a second time, and
  it is freed when its last user lets go. A kind may also ask for an ``on_evict`` call (the image
  pipelines drop their compiled models at once: they are gigabytes).
- **Work slots**: how many requests of a kind run their model at once (:class:`WorkSlots`).

The Ray Serve backend puts one pool inside each replica; the embedded app has one per process.
"""
from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from typing import Any, Callable, Hashable, Mapping, Optional, TypeVar

from pipelines.core.slots import WorkSlots

log = logging.getLogger(__name__)
T = TypeVar("T")
PoolKey = tuple  # (kind, ...)


class ModelPool:
    """Loaded models by key, bounded per kind, loaded once, kept alive while in use (see module doc)."""

    def __init__(self, limits: Mapping[str, int], slots: Optional[Mapping[str, int]] = None,
                 slot_names: Optional[Mapping[str, str]] = None):
        self.limits = {kind: max(1, int(n)) for kind, n in limits.items()}
        names = dict(slot_names or {})
        self._slots = {kind: WorkSlots(n, names.get(kind, kind)) for kind, n in (slots or {}).items()}
        self._loaded: "OrderedDict[PoolKey, Any]" = OrderedDict()
        self._on_evict: dict[PoolKey, Callable[[Any], None]] = {}
        self._retired: "weakref.WeakValueDictionary[PoolKey, Any]" = weakref.WeakValueDictionary()
        self._guard = threading.Lock()
        self._key_locks: dict[PoolKey, threading.Lock] = {}

    def slots(self, kind: str) -> WorkSlots:
        """The work slots of ``kind`` (one slot when none were configured)."""
        with self._guard:
            return self._slots.setdefault(kind, WorkSlots(1, kind))

    # -- looking ------------------------------------------------------------------------------
    def keys(self, kind: Optional[str] = None) -> list[PoolKey]:
        """The loaded keys (of ``kind``), least recently used first."""
        with self._guard:
            return [key for key in self._loaded if kind is None or key[0] == kind]

    def __contains__(self, key: Hashable) -> bool:
        """Whether ``key`` is loaded (an evicted model still in use does not count)."""
        with self._guard:
            return key in self._loaded

    def alive(self, key: PoolKey) -> bool:
        """Whether ``key`` is loaded, or evicted but still used by a running request."""
        with self._guard:
            return key in self._loaded or key in self._retired

    # -- loading ------------------------------------------------------------------------------
    def get(self, key: PoolKey, load: Callable[[], T], on_evict: Optional[Callable[[T], None]] = None) -> T:
        """The model of ``key``: loaded, taken back from keep-alive, or ``load()``-ed once (other
        requests for the same key wait for that load; ``load`` runs without the pool's lock)."""
        found = self._take(key)
        if found is not None:
            return found[1]
        with self._key_lock(key):
            found = self._take(key)
            if found is not None:
                return found[1]
            value = load()
            with self._guard:
                self._loaded[key] = value
                if on_evict is not None:
                    self._on_evict[key] = on_evict
                evicted = self._evict_over(key[0], self.limits.get(key[0], 1))
        self._finish_evictions(evicted)
        return value

    def _take(self, key: PoolKey) -> Optional[tuple[PoolKey, Any]]:
        """(key, model) when ``key`` is alive, as :meth:`_reuse`; a model taken back from keep-alive may
        push the oldest of its kind out, so the limit still holds."""
        with self._guard:
            found = self._reuse(key)
            evicted = self._evict_over(key[0], self.limits.get(key[0], 1)) if found else []
        self._finish_evictions(evicted)
        return found

    def _key_lock(self, key: PoolKey) -> threading.Lock:
        with self._guard:
            return self._key_locks.setdefault(key, threading.Lock())

    def _reuse(self, key: PoolKey) -> Optional[tuple[PoolKey, Any]]:
        """(key, model) when ``key`` is alive, marked most recently used (call with the lock held). A model
        taken back from keep-alive counts as loaded again."""
        value = self._loaded.get(key)
        if value is None:
            value = self._retired.pop(key, None)
            if value is None:
                return None
            log.info("took back %s, unloaded while a request still ran on it", key)
            self._loaded[key] = value
        self._loaded.move_to_end(key)
        return key, value

    # -- unloading ----------------------------------------------------------------------------
    def release(self, kind: Optional[str] = None, keep: int = 0) -> None:
        """Unload the least recently used models (of ``kind``, or of every kind) until at most ``keep``
        of each stay loaded. A model a request still runs on is freed when that request ends."""
        with self._guard:
            kinds = {key[0] for key in self._loaded} if kind is None else {kind}
            evicted = [item for k in kinds for item in self._evict_over(k, max(0, keep))]
        self._finish_evictions(evicted)

    def _evict_over(self, kind: str, limit: int) -> list[tuple[PoolKey, Any, Optional[Callable]]]:
        """Evict the oldest of ``kind`` until at most ``limit`` stay (call with the lock held)."""
        evicted = []
        of_kind = [key for key in self._loaded if key[0] == kind]
        for key in of_kind[:max(0, len(of_kind) - limit)]:
            value = self._loaded.pop(key)
            try:
                self._retired[key] = value
            except TypeError:  # not weak-referenceable: nothing can take it back
                pass
            evicted.append((key, value, self._on_evict.get(key)))
            log.info("unloaded %s (at most %d %s models stay loaded)", key, limit, kind)
        return evicted

    @staticmethod
    def _finish_evictions(evicted: list[tuple[PoolKey, Any, Optional[Callable]]]) -> None:
        for _key, value, on_evict in evicted:
            if on_evict is not None:
                on_evict(value)  # outside the lock: it may wait for a request running on the model
