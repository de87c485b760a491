"""FP16 against INT8 as one operation: the same work at each precision, one after the other, timed.

Each domain says how to get a precision's model ready on disk (``prepare``: download, convert, and
for INT8 quantize on first use), how to load it (``load``: not part of the time) and what the work
is (``run``: timed). The comparison prepares every precision first, outside the work slots, then
holds one slot over all the runs, so no timing includes waiting for a slot or for a conversion. The
UI only shows the result.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from pipelines.core.progress import ProgressFn, scaled
from pipelines.core.slots import WorkSlots
from pipelines.core.types import PRECISIONS

#: Share of a comparison's progress bar for getting the models ready before the timed runs.
PREPARE_SHARE = 0.2

Step = Callable[[str, ProgressFn], Any]  # step(precision, progress)


@dataclass(frozen=True)
class PrecisionRun:
    """One side of a comparison: what the run produced and how long it took (loading excluded)."""

    precision: str
    value: Any
    seconds: float
    load_seconds: float


def compare_precisions(load: Step, run: Step, report: ProgressFn, precisions: Sequence[str] = PRECISIONS,
                       slots: Optional[WorkSlots] = None, prepare: Optional[Step] = None) -> list[PrecisionRun]:
    """Run the same work at each precision, one after the other, and time each run.

    With ``prepare``, every precision's model is got ready first, before any work slot is taken, in
    the first fifth of the progress bar; the runs fill the rest, so the bar never goes back. For each
    precision ``load`` then loads the model (not part of the time) and ``run`` does the work, timed.
    One precision at a time, so a server that keeps one model loaded still compares fairly. With
    ``slots`` one work slot is held over all the runs.
    """
    if prepare is not None:
        share = PREPARE_SHARE / len(precisions)
        for index, precision in enumerate(precisions):
            prepare(precision, scaled(report, share * index, share * (index + 1)))
        report = scaled(report, PREPARE_SHARE, 1.0)
    runs = []
    with slots.turn(report) if slots is not None else nullcontext():
        for index, precision in enumerate(precisions):
            part = scaled(report, index / len(precisions), (index + 1) / len(precisions), precision.upper())
            started = time.perf_counter()
            load(precision, part)
            loaded = time.perf_counter()
            value = run(precision, part)
            runs.append(PrecisionRun(precision, value, time.perf_counter() - loaded, loaded - started))
    report(1.0, "done")
    return runs
