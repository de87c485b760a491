"""The models folder's housekeeping (``app.py --list-models`` / ``--prune-models``).

:func:`scan_models` finds every complete folder of the layout (:mod:`pipelines.core.layout`) and
says whether this install can still use it (its marker records the converter versions that made it,
and every folder's name carries them, so a folder made by other versions is never picked again after
an upgrade), when it was last used, and the leftovers of builds that did not finish;
:func:`prune_models` removes what can no longer be used.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipelines.core.cache import (BUILD_PREFIX, READY_MARKER, SCRATCH_PREFIX, build_lock, converter_versions,
                                  lock_held, scratch_in_use)
from pipelines.core.layout import ModelsLayout

CURRENT = "current"
OTHER_VERSIONS = "other versions"
UNUSED = "unused"
UNFINISHED = "unfinished"
COMPILED = "compile cache"
#: what :func:`prune_models` removes
PRUNED_STATES = (OTHER_VERSIONS, UNUSED, UNFINISHED, COMPILED)
_SCRATCH_PREFIXES = (BUILD_PREFIX, SCRATCH_PREFIX)  # a build's temporary folder, a conversion's scratch folder


@dataclass(frozen=True)
class CachedFolder:
    """One entry of the models folder, as :func:`scan_models` found it."""

    path: Path
    state: str  # CURRENT, OTHER_VERSIONS, UNUSED, UNFINISHED or COMPILED
    size: int  # bytes on disk
    last_used: float  # seconds since the epoch (the marker's modification time; the folder's for the rest)
    note: str = ""


def disk_usage(path: Path) -> int:
    """Bytes ``path`` takes on disk (allocated blocks, not apparent sizes; links are not followed)."""
    total = 0
    for parent, _, files in os.walk(path):
        for name in [parent] + [os.path.join(parent, f) for f in files]:
            try:
                total += os.lstat(name).st_blocks * 512
            except OSError:  # removed meanwhile
                pass
    return total


def _changed_versions(made_by: dict, now: dict) -> str:
    changed = [f"{name} {made_by.get(name, 'none')}" for name in sorted(set(made_by) | set(now))
               if made_by.get(name, "none") != now.get(name, "none")]
    return "made with " + ", ".join(changed)


def _describe_folder(folder: Path, current: dict, unused_after: Optional[float]) -> CachedFolder:
    marker = folder / READY_MARKER
    last_used = marker.stat().st_mtime
    try:
        made_by = json.loads(marker.read_text()).get("converters")
    except (OSError, ValueError, AttributeError):
        made_by = None
    size = disk_usage(folder)
    if not isinstance(made_by, dict):
        return CachedFolder(folder, OTHER_VERSIONS, size, last_used, "its marker does not say which versions made it")
    if made_by != current:
        return CachedFolder(folder, OTHER_VERSIONS, size, last_used, _changed_versions(made_by, current))
    if unused_after is not None and last_used < unused_after:
        return CachedFolder(folder, UNUSED, size, last_used)
    return CachedFolder(folder, CURRENT, size, last_used)


def scan_models(root: Path, unused_days: Optional[float] = None, now: Optional[float] = None) -> list[CachedFolder]:
    """Every complete model folder under ``root``, OpenVINO's compile cache and the leftovers of
    builds that did not finish (never those of a build still running), with their state:

    - ``current``: made by the converter versions installed now, so this install may use it;
    - ``other versions``: made by other versions (before an upgrade): never picked again;
    - ``unused``: current, but not used for ``unused_days`` (only when ``unused_days`` is given);
    - ``unfinished``: a ``.tmp-*`` or ``.work-*`` folder no living process works in;
    - ``compile cache``: OpenVINO's compiled models, rebuilt when a model next loads.
    """
    root = Path(root)
    found: list[CachedFolder] = []
    if not root.is_dir():
        return found
    current = converter_versions()
    compile_cache = ModelsLayout(root).compile_cache
    unused_after = None if unused_days is None else (time.time() if now is None else now) - unused_days * 86400.0
    for parent, dirs, _ in os.walk(root):
        here = Path(parent)
        descend = []
        for name in sorted(dirs):
            path = here / name
            if path == compile_cache:
                found.append(CachedFolder(path, COMPILED, disk_usage(path), path.stat().st_mtime,
                                          "rebuilt when a model next loads"))
            elif name.startswith(_SCRATCH_PREFIXES):
                if not scratch_in_use(path):
                    found.append(CachedFolder(path, UNFINISHED, disk_usage(path), path.stat().st_mtime,
                                              "left by a conversion that did not finish"))
            elif (path / READY_MARKER).is_file():
                found.append(_describe_folder(path, current, unused_after))
            else:
                descend.append(name)  # a folder that groups cache folders (model, revision, ...)
        dirs[:] = descend
    return found


def prune_models(root: Path, unused_days: Optional[float] = None, now: Optional[float] = None) -> list[CachedFolder]:
    """Remove what :func:`scan_models` finds in a state of ``PRUNED_STATES`` (and the grouping folders
    this empties); returns what was removed. Folders this install uses are kept, unless
    ``unused_days`` is given and they were not used for that long."""
    root = Path(root)
    removed = []
    for entry in scan_models(root, unused_days, now):
        if entry.state not in PRUNED_STATES:
            continue
        if entry.state == UNFINISHED and scratch_in_use(entry.path):  # a build started meanwhile
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        if entry.path.exists():
            continue
        removed.append(entry)
        if entry.state == OTHER_VERSIONS:  # no build of this install ever takes its lock again
            lock = build_lock(entry.path)
            if lock.is_file() and not lock_held(lock):
                lock.unlink(missing_ok=True)
        parent = entry.path.parent
        while parent != root and root in parent.parents:
            try:
                parent.rmdir()  # only when empty
            except OSError:
                break
            parent = parent.parent
    return removed
