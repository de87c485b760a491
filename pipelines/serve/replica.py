"""The replica side: each replica builds the app's own :class:`~pipelines.services.Services` (one model
pool per replica) and runs every call in a worker thread, streaming its progress to the caller and
turning the caller's cancel into a flag the service's loop sees.

Why async generator methods: Serve runs a sync method (or sync generator) in its thread pool and, on
cancel, only stops forwarding its results; the thread is never told and runs to the end. An async
method is cancelled for real (``CancelledError`` / ``GeneratorExit`` at its ``await``), and sets the
:class:`threading.Event` of the call: the progress callback the service reports through then raises
:class:`~pipelines.serve.protocol.Cancelled` (Whisper stops at its next window), and the image service
gets the Event as its ``cancel`` (it stops after the current step).

Threads: Ray's ``num_cpus`` is a scheduling figure only; without a limit every replica's OpenVINO
takes every core of the node. ``threads: auto`` (the default) gives each replica as many inference
threads as CPUs it was given, with OpenVINO's CPU pinning off (it pins each process's threads from core 0,
so two 1-thread replicas would share one core).
"""
from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from pipelines.serve.protocol import ALIVE, HEARTBEAT_S, MAIN, PREVIEW, PROGRESS, RESULT, STARTED, Cancelled
from pipelines.services import DEFAULT_CONCURRENCY, Services, Settings

#: Settings a front end hands its replicas (and a Serve config file's ``args`` may set); plus ``slots``
#: (runs at once per replica), ``threads`` and ``ov_config``.
SETTINGS_ARGS = ("models_dir", "default_model", "default_device", "max_loaded_whisper", "whisper_int8",
                 "sd_model", "controlnet_model", "pose_model", "max_audio_seconds", "lcm_lora", "taesd",
                 "fast_decoder")
REPLICA_ARGS = ("slots", "threads", "ov_config")
WORKER_THREADS = 8  # calls of one replica running at once (its max_ongoing_requests is lower)


def settings_args(settings: Settings) -> dict:
    """The front end's settings that its replicas share (plain values, for a Serve config's ``args``)."""
    values = {name: getattr(settings, name) for name in SETTINGS_ARGS}
    values["models_dir"] = str(Path(settings.models_dir).resolve())
    return values


def with_args(settings: Settings, args: dict) -> Settings:
    """``settings`` with the values a Serve config file's ``args`` give (the front end and its replicas
    then agree on models folder and models)."""
    known = {name: args[name] for name in SETTINGS_ARGS if args.get(name) is not None}
    if "models_dir" in known:
        known["models_dir"] = Path(known["models_dir"])
    return replace(settings, **known)


def thread_config(threads: Any, cpus: float) -> dict:
    """OpenVINO properties for a replica's thread count: ``"auto"`` as many as its CPUs (rounded up), a
    number that many, ``None`` / ``0`` / ``"default"`` OpenVINO's own choice (every core, pinned)."""
    if threads in (None, 0, "0", "default", ""):
        return {}
    count = max(1, math.ceil(cpus)) if threads == "auto" else int(threads)
    return {"INFERENCE_NUM_THREADS": max(1, count), "ENABLE_CPU_PINNING": False}


def assigned_cpus() -> float:
    """The CPUs Ray gave this replica."""
    import ray

    return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))


def replica_settings(args: dict, cpus: float) -> Settings:
    """The settings of one replica, from its deployment's ``args``."""
    unknown = sorted(set(args) - set(SETTINGS_ARGS) - set(REPLICA_ARGS))
    if unknown:
        raise ValueError(f"Unknown Voice Studio replica argument(s) {', '.join(unknown)}; known: "
                         f"{', '.join(SETTINGS_ARGS + REPLICA_ARGS)}.")
    if not args.get("models_dir"):
        raise ValueError("The replica arguments need models_dir (the shared models folder).")
    slots = max(1, int(args.get("slots") or 1))
    ov_config = {**thread_config(args.get("threads", "auto"), cpus), **dict(args.get("ov_config") or {})}
    return with_args(Settings(models_dir=Path(args["models_dir"]), ov_config=ov_config,
                              concurrency={**DEFAULT_CONCURRENCY, "whisper": slots, "image": slots}), args)


class Relay:
    """Progress from the worker thread to the caller: ``relay(fraction, message)`` on the main channel,
    ``relay.to(channel)`` a callback for another one. Raises :class:`Cancelled` once the caller cancelled."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, cancel: threading.Event):
        self.loop, self.queue, self.cancel = loop, queue, cancel

    def to(self, channel: str) -> Callable[[float, str], None]:
        def report(fraction: float, message: str) -> None:
            self._send({"kind": PROGRESS, "channel": channel, "fraction": float(fraction), "message": str(message)})

        return report

    def preview(self, preview: Any) -> None:
        """A live preview of an image generation, to the caller."""
        self._send({"kind": PREVIEW, "value": preview})

    def _send(self, event: dict) -> None:
        if self.cancel.is_set():
            raise Cancelled("cancelled by the caller")
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the replica is shutting down: nobody listens any more
            pass

    def __call__(self, fraction: float, message: str) -> None:
        self.to(MAIN)(fraction, message)


Work = Callable[[Relay, threading.Event], Any]


class StreamingReplica:
    """Base of the deployments: ``_stream(work)`` runs ``work(relay, cancel)`` in a worker thread and
    yields the protocol's events (:mod:`pipelines.serve.protocol`)."""

    deployment = ""

    def _init_replica(self, args: dict) -> Services:
        from ray import serve

        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.pid = os.getpid()
        self.cpus = assigned_cpus()
        self.counts = {"ongoing": 0, "served": 0, "failed": 0, "cancelled": 0}
        self.started = time.time()
        self._workers = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix=f"vs-{self.deployment}")
        self.settings = replica_settings(dict(args), self.cpus)
        return Services(self.settings)

    def _loaded(self) -> list:
        """The models this replica has loaded (each result carries them, for the front end's /status)."""
        return []

    async def _stream(self, work: Work) -> AsyncIterator[dict]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        self.counts["ongoing"] += 1
        started = time.perf_counter()
        future = None
        try:
            yield {"kind": STARTED, "replica": self.replica_id, "pid": self.pid}
            future = loop.run_in_executor(self._workers, work, Relay(loop, queue, cancel), cancel)
            async for event in _events(queue, future):
                yield event
            value = future.result()  # the service's own exception reaches the caller as it is
            self.counts["served"] += 1
            yield {"kind": RESULT, "value": value, "replica": self.replica_id, "loaded": self._loaded(),
                   "seconds": round(time.perf_counter() - started, 4)}
        except (asyncio.CancelledError, GeneratorExit):
            cancel.set()  # the worker stops at the service's next progress report or cancel check
            self.counts["cancelled"] += 1
            if future is not None:
                future.add_done_callback(_consume)
            raise
        except Exception:
            self.counts["failed"] += 1
            raise
        finally:
            self.counts["ongoing"] -= 1

    async def _call(self, fn: Callable[[], Any]) -> Any:
        """A short call without progress, in the worker threads."""
        return await asyncio.get_running_loop().run_in_executor(self._workers, fn)

    async def stats(self) -> dict:
        """Who this replica is and what it did (for tests and operators: ``handle.broadcast("stats")``)."""
        return {"deployment": self.deployment, "replica": self.replica_id, "pid": self.pid, **self.counts,
                "cpus": self.cpus, "ov_config": self.settings.ov_config, "loaded": self._loaded(),
                "up_seconds": round(time.time() - self.started, 1)}


async def _events(queue: asyncio.Queue, future: "asyncio.Future") -> AsyncIterator[dict]:
    """Progress events as they come, a heartbeat when there were none for a while, until ``future`` is done."""
    while True:
        getter = asyncio.ensure_future(queue.get())
        done, _ = await asyncio.wait({getter, future}, timeout=HEARTBEAT_S, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            yield getter.result()
            continue
        getter.cancel()
        if not done:
            yield {"kind": ALIVE}
            continue
        while not queue.empty():
            yield queue.get_nowait()
        return


def _consume(future: "asyncio.Future") -> None:
    """Retrieve the result of a cancelled call's worker (its Cancelled, or what it returned), unlogged."""
    if not future.cancelled():
        future.exception()

