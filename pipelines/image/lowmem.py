"""Making the SD INT8 models in bounded memory: what keeps the peak under 12 GB on the full SD1.5.

Measured on the full SD1.5 + ControlNet OpenPose (random weights, 512x512; the prototype of issue #20),
making the INT8 pair in one process peaked at 16.2 GB: NNCF collects the UNet's statistics with one
model that has a reducer branch and an output for every statistic point, compiled in f32 (3.4 GB of
weights beside the 1.7 GB FP16 IR) and run on each sample; and what the earlier phases freed was still
held by the process (glibc keeps freed memory). Four changes, each keeping NNCF's result the same:

1. each phase (gathering the calibration inputs with the FP16 pipeline, quantizing the ControlNet,
   quantizing the UNet) runs in its own spawned child process (:func:`run_in_child`), whose memory is
   the system's again when it ends; the app's process never holds the FP16 pipeline nor NNCF;
2. the calibration inputs go to disk as they are recorded (:class:`DiskRecorder`, ``.npy``) and NNCF
   reads them one at a time (:class:`LazySamples`), so their number does not count;
3. a model is reshaped to the calibration's static shape before ``nncf.quantize`` (and back after);
4. NNCF's statistics are collected in chunks of statistic points (:func:`chunked_statistics`), one
   smaller model at a time: the same tensor collectors see the same inputs, so the statistics are
   the same (a test checks the quantized ranges), for one compilation and pass over the samples per
   chunk. The UNet's peak at batch 1 went from 14.7 GB (one chunk) to 10.1 GB (four).

A classifier-free-guidance call (Quality mode: batch 2) stays one sample: given to NNCF as two batch-1
samples, its activation ranges come out different (NNCF averages per-sample minima and maxima; measured:
126 of the ControlNet's 131 ranges moved), so such a model gets twice the chunks instead.

Whole path on the Fast pair (batch 1): gather 6.3 GB, ControlNet 4.8 GB, UNet 10.1 GB: the peak is the
largest child's, 10.1 GB.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import multiprocessing
import queue as queues
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from pipelines.core.progress import ProgressFn, no_progress

log = logging.getLogger(__name__)

#: Inputs that stay the same over an image's steps: written once per image.
SHARED_INPUTS = ("encoder_hidden_states", "controlnet_cond")
INDEX = "index.json"


class DiskRecorder:
    """An observer for ``OVControlNetPipeline.observe_inputs``: each ControlNet / UNet input of every
    denoising step is written to ``folder`` as ``.npy`` (large float32 arrays as float16, cast back
    when read), arrays that stay the same over an image (text embeddings, control image) once.
    :meth:`save_index` keeps an evenly spread subset of the calls in ``index.json``."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.calls: dict[str, list[dict]] = {"controlnet": [], "unet": []}
        self._shared: dict[int, tuple[Any, str]] = {}
        self._count = 0

    def __call__(self, name: str, inputs: dict) -> None:
        files = {}
        for key, value in inputs.items():
            if key in SHARED_INPUTS:
                held = self._shared.get(id(value))
                if held is None or held[0] is not value:
                    held = (value, self._write(np.asarray(value)))
                    self._shared[id(value)] = held
                files[key] = held[1]
            else:
                array = np.asarray(value)
                files[key] = self._write(array.astype(np.float16) if array.dtype == np.float32 and array.size > 65536
                                         else array)
        self.calls[name].append(files)

    def _write(self, array: np.ndarray) -> str:
        self._count += 1
        name = f"{self._count:06d}.npy"
        np.save(self.folder / name, np.array(array, copy=True))  # np.array keeps a 0-d timestep 0-d
        return name

    def save_index(self, subset_size: int) -> dict[str, int]:
        """Keep ``subset_size`` calls per model, evenly spread over the run; how many were kept."""
        kept = {}
        for name, calls in self.calls.items():
            keep = np.linspace(0, len(calls) - 1, num=min(subset_size, len(calls))).round().astype(int)
            self.calls[name] = [calls[i] for i in sorted(set(keep.tolist()))]
            kept[name] = len(self.calls[name])
        (self.folder / INDEX).write_text(json.dumps(self.calls))
        return kept


class LazySamples:
    """The recorded calls of one model, read from disk one at a time (what ``nncf.Dataset`` iterates)."""

    def __init__(self, folder: Path, name: str):
        self.folder = Path(folder)
        self.items: list[dict] = json.loads((self.folder / INDEX).read_text())[name]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator:
        return iter(self.items)

    def to_model_input(self, files: dict) -> dict:
        inputs = {}
        for key, name in files.items():
            array = np.load(self.folder / name, mmap_mode="r")
            inputs[key] = array.astype(np.float32) if array.dtype == np.float16 else np.array(array)
        return inputs

    def shapes(self) -> dict[str, list[int]]:
        """Each input's shape (the static shape NNCF's model is given)."""
        return {key: list(value.shape) for key, value in self.to_model_input(self.items[0]).items()}

    @property
    def batch(self) -> int:
        return int(self.shapes()["sample"][0])


# ------------------------------------------------------------------------------------------------
# NNCF statistics in chunks (NNCF 3.4 internals: nncf is pinned, and a test compares the results)
# ------------------------------------------------------------------------------------------------


def _collect_in_chunks(aggregator, model, graph, chunks: int) -> None:
    """``StatisticsAggregator.collect_statistics`` of NNCF 3.4, with the merged statistic points split
    into ``chunks`` groups, each collected by its own model with outputs (built, run over the samples and
    freed before the next)."""
    from nncf.common import factory
    from nncf.common.tensor_statistics.statistic_point import StatisticPointsContainer

    if not aggregator.statistic_points:
        return
    merged = aggregator._get_merged_statistic_points(aggregator.statistic_points, model, graph)
    names = list(merged.data)
    size = -(-len(names) // chunks)
    iterations = aggregator._get_iterations_number()
    for start in range(0, len(names), size):
        part = StatisticPointsContainer()
        for name in names[start:start + size]:
            for point in merged.data[name]:
                part.add_statistic_point(point)
        layout = aggregator._get_transformation_layout_extra_outputs(part)
        engine = factory.EngineFactory.create(factory.ModelTransformerFactory.create(model).transform(layout))
        processed = 0
        for input_data in islice(aggregator.dataset.get_inference_data(), iterations):
            outputs = aggregator._process_outputs(engine.infer(input_data))
            aggregator._register_statistics(outputs, part)
            del outputs
            processed += 1
        del engine
        gc.collect()
        if processed == 0:
            import nncf

            raise nncf.ValidationError("The calibration dataset is empty.")


@contextlib.contextmanager
def chunked_statistics(chunks: int) -> Iterator[None]:
    """While inside, NNCF collects statistics in ``chunks`` groups of statistic points (1: as it does)."""
    from nncf.common.tensor_statistics.aggregator import StatisticsAggregator

    needed = ("_get_merged_statistic_points", "_get_transformation_layout_extra_outputs", "_register_statistics",
              "_process_outputs", "_get_iterations_number")
    if chunks <= 1 or not all(hasattr(StatisticsAggregator, name) for name in needed):
        if chunks > 1:
            log.warning("this NNCF has no %s: statistics are collected in one piece (more memory)", needed)
        yield
        return
    original = StatisticsAggregator.collect_statistics
    StatisticsAggregator.collect_statistics = lambda self, model, graph: _collect_in_chunks(self, model, graph, chunks)
    try:
        yield
    finally:
        StatisticsAggregator.collect_statistics = original


# ------------------------------------------------------------------------------------------------
# Child processes
# ------------------------------------------------------------------------------------------------


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(target: Callable[..., dict], kwargs: dict, messages) -> None:
    def progress(fraction: float, message: str) -> None:
        messages.put(("progress", (float(fraction), str(message))))

    try:
        result = dict(target(**kwargs, progress=progress) or {})
        result["peak_rss_mb"] = round(_peak_rss_mb())
        messages.put(("ok", result))
    except BaseException as error:  # noqa: BLE001 - handed to the parent, which raises it
        import traceback

        messages.put(("error", (error if _picklable(error) else None, f"{type(error).__name__}: {error}",
                                traceback.format_exc())))


def _picklable(error: BaseException) -> bool:
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return True
    except Exception:  # noqa: BLE001 - any pickling problem
        return False


def run_in_child(target: Callable[..., dict], progress: ProgressFn = no_progress, **kwargs) -> dict:
    """``target(**kwargs, progress=...)`` in a fresh (spawned) process: its memory is the system's again
    when it returns. Its progress reaches ``progress``; its result dict comes back with its
    ``peak_rss_mb``; an error it raises is raised here (a ValueError stays a ValueError)."""
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    process = context.Process(target=_child, args=(target, kwargs, messages), daemon=True)
    process.start()
    try:
        while True:
            try:
                kind, value = messages.get(timeout=1.0)
            except queues.Empty:
                if not process.is_alive():
                    raise RuntimeError(f"{target.__name__} died in its child process (exit code {process.exitcode}"
                                       f"{': out of memory?' if process.exitcode == -9 else ''}).") from None
                continue
            if kind == "progress":
                progress(*value)
            elif kind == "ok":
                return value
            else:
                error, text, trace = value
                if error is not None:
                    raise error
                raise RuntimeError(f"{target.__name__} failed in its child process: {text}\n{trace}")
    finally:
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
        messages.close()


def in_process(target: Callable[..., dict], progress: ProgressFn = no_progress, **kwargs) -> dict:
    """``target`` run here instead (same interface as :func:`run_in_child`)."""
    result = dict(target(**kwargs, progress=progress) or {})
    result["peak_rss_mb"] = round(_peak_rss_mb())
    return result


def folder_size_mb(folder: Optional[Path]) -> float:
    return round(sum(p.stat().st_size for p in Path(folder).iterdir()) / 2**20, 1) if folder else 0.0
