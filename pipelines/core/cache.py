"""Atomic, version-keyed folders under the models cache.

Every converted model lives in a folder that is either complete or absent: a builder writes into a
temporary sibling folder, a marker file is written last, everything is flushed to disk (``fsync``),
and the folder is renamed into place. A
crash mid-build leaves only a ``.tmp-*`` folder, which no lookup ever returns and which the next
build of the same key sweeps away. Builds of one key are serialised across threads (a lock per key)
and across processes (an ``fcntl`` lock file), so a model is converted once even when several
requests ask for it together.

Where each kind of model lives under the models folder is :mod:`pipelines.core.layout`'s business;
what can be pruned is :mod:`pipelines.core.housekeeping`'s.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

READY_MARKER = "voice_studio_ready.json"
BUILD_PREFIX = ".tmp-"  # a build's temporary folder: .tmp-<folder name>-<8 hex digits>
log = logging.getLogger(__name__)

# Libraries whose versions change what a conversion produces: part of every cache folder's name.
CONVERTER_PACKAGES = ("openvino", "openvino-tokenizers", "optimum-intel", "transformers", "nncf", "diffusers")


def converter_versions(packages: Iterable[str] = CONVERTER_PACKAGES) -> dict[str, str]:
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "none"
    return versions


def versions_key(packages: Iterable[str] = CONVERTER_PACKAGES) -> str:
    """A short, stable tag for the converter versions (readable prefix + hash of all of them)."""
    versions = converter_versions(packages)
    digest = hashlib.sha1(json.dumps(versions, sort_keys=True).encode()).hexdigest()[:8]
    return f"ov{versions.get('openvino', 'none')}-{digest}"


def slug(text: str) -> str:
    """A file-system-safe, readable name for a model reference or revision."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "--", text.strip()).strip("-.")
    return cleaned[:80] or "model"


def folder_fingerprint(folder: Path) -> str:
    """A cheap content key for a local folder: names, sizes and modification times of its files. This
    app's own bookkeeping files are left out: a cache folder's marker is touched each time it is used
    (:func:`mark_used`), which must not change the key of a model made from that folder."""
    h = hashlib.sha1()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (READY_MARKER, IN_USE_FILE)):
        stat = path.stat()
        h.update(f"{path.relative_to(folder)}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return h.hexdigest()[:12]


def _fsync_path(path: Path | str, folder: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # some file systems (CIFS, 9p, some FUSE mounts) cannot fsync a folder: its entries are then
        # as durable as that file system makes them, and the build goes on
        if not folder or exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder``, and the folders' entries, to the disk."""
    for parent, _, files in os.walk(folder):
        for name in files:
            _fsync_path(os.path.join(parent, name))
        _fsync_path(parent, folder=True)


IN_USE_FILE = ".in-use"


@contextmanager
def folder_held(folder: Path) -> Iterator[Path]:
    """Mark ``folder`` as in use for the length of a ``with`` block: an ``fcntl`` lock on a file in it.

    The kernel drops the lock when the process dies, so a sweep that asks :func:`folder_in_use`
    removes a killed process's leftovers but never the folder of work still running, in this
    process or another.
    """
    lock_path = Path(folder) / IN_USE_FILE
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield Path(folder)
        finally:
            lock_path.unlink(missing_ok=True)


def lock_held(lock_path: Path) -> bool:
    """Whether a living process holds an ``fcntl`` lock on ``lock_path`` (False when there is no such file)."""
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:  # no lock file (never held, or released), or its folder is gone
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def folder_in_use(folder: Path) -> bool:
    """Whether a living process holds ``folder`` with :func:`folder_held`."""
    return lock_held(Path(folder) / IN_USE_FILE)


SCRATCH_PREFIX = ".work-"
_SCRATCH_GRACE_SECONDS = 60.0  # a scratch folder this young may be about to take its lock


@contextmanager
def scratch_folder(root: Path) -> Iterator[Path]:
    """A ``.work-*`` folder under ``root`` (the same disk as the cache) for the length of a ``with``
    block, removed afterwards. It is held (:func:`folder_held`) while in use, so a killed process's
    folder can be told from work still running: :func:`sweep_scratch` and ``--prune-models`` remove
    only the former."""
    path = Path(tempfile.mkdtemp(dir=root, prefix=SCRATCH_PREFIX))
    with folder_held(path):
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)


def sweep_scratch(root: Path) -> list[Path]:
    """Remove the scratch folders under ``root`` that no living process uses; the removed folders."""
    removed = []
    for folder in Path(root).glob(SCRATCH_PREFIX + "*"):
        if scratch_in_use(folder):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
        log.info("removed %s, left by a conversion that did not finish", folder)
    return removed


def mark_used(folder: Path) -> None:
    """Record that ``folder`` was just used (its marker's modification time), for ``--list-models``
    and ``--prune-models --unused-days``. A read-only models folder is left as it is."""
    try:
        os.utime(Path(folder) / READY_MARKER)
    except OSError:
        pass


@contextmanager
def file_lock(path: Path, on_wait: Callable[[], None] = lambda: None) -> Iterator[None]:
    """An exclusive ``fcntl`` lock on ``path`` for the ``with`` block, across threads (each call opens
    its own file) and processes, also on shared storage with working ``flock`` (NFSv4, CephFS, EFS).
    ``on_wait()`` is called once when another holder has it, before waiting. The kernel drops the lock
    of a process that dies, so a killed holder never blocks the others."""
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


COMPILE_LOCK = ".compile.lock"


@contextmanager
def compile_lock(cache_dir: Path) -> Iterator[None]:
    """Hold for a compile that uses OpenVINO's model cache ``cache_dir`` (``CACHE_DIR``): compiles that
    share one cache are taken one at a time, across threads and processes. OpenVINO 2026.4 is not safe
    for two processes writing the same cache blob at once (measured with three processes compiling
    one Whisper into a fresh cache: 1 of 9 failed with "filesystem error: cannot set permissions: No
    such file or directory [.../<hash>.blob]"; none of 12 with this lock). The one that waited then
    reads the blob the first wrote, which is fast."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(cache_dir / COMPILE_LOCK):
        yield


def build_lock(folder: Path) -> Path:
    """The process lock file :class:`AtomicFolderCache` holds while it builds ``folder``."""
    return folder.parent / f".{folder.name}.lock"


def scratch_in_use(folder: Path) -> bool:
    """Whether a living process still works in a ``.tmp-<name>-<id>`` build folder (it holds the
    build lock of <name>) or a ``.work-*`` scratch folder (it holds the folder, or it is too young to
    have taken its lock yet)."""
    folder = Path(folder)
    if folder.name.startswith(BUILD_PREFIX):
        final = folder.name[len(BUILD_PREFIX):].rpartition("-")[0]
        return lock_held(build_lock(folder.parent / final))
    try:
        if time.time() - folder.stat().st_mtime < _SCRATCH_GRACE_SECONDS:
            return True
    except FileNotFoundError:
        return False
    return folder_in_use(folder)


class AtomicFolderCache:
    """Get-or-build for folders under ``root``, complete or absent, built once."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._locks: dict[Path, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def ready(self, folder: Path) -> bool:
        return (folder / READY_MARKER).is_file()

    def use(self, folder: Path) -> bool:
        """Whether ``folder`` is complete, for a caller about to use it: a complete one is marked used
        (:func:`mark_used`, for ``--list-models`` / ``--prune-models --unused-days``)."""
        if not self.ready(folder):
            return False
        mark_used(folder)
        return True

    def _thread_lock(self, folder: Path) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(folder, threading.Lock())

    @contextmanager
    def _process_lock(self, folder: Path, on_wait: Callable[[], None] = lambda: None) -> Iterator[None]:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(build_lock(folder), on_wait):
            yield

    def _sweep_stale(self, folder: Path) -> None:
        for stale in folder.parent.glob(f"{BUILD_PREFIX}{folder.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def get_or_build(
        self,
        folder: Path,
        build: Callable[[Path], Optional[dict]],
        description: dict | None = None,
        on_wait: Callable[[], None] = lambda: None,
    ) -> Path:
        """Return ``folder`` once it is complete, running ``build(tmp_folder)`` if it is not.

        ``build`` fills the temporary folder it is given and may return extra facts to record in
        the marker file (e.g. which quantization method made it). ``on_wait()`` is called once when
        another process (another app, or another replica on shared storage) is building it now and
        this call waits for that build instead of starting its own.
        """
        folder = Path(folder)
        if self.use(folder):
            return folder
        with self._thread_lock(folder), self._process_lock(folder, on_wait):
            if self.use(folder):  # another thread or process finished it while we waited
                return folder
            self._sweep_stale(folder)
            if folder.exists():  # a folder without a marker is not trusted
                shutil.rmtree(folder)
            tmp = folder.parent / f"{BUILD_PREFIX}{folder.name}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            try:
                extra = build(tmp) or {}
                marker = {
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "converters": converter_versions(),
                    **(description or {}),
                    **extra,
                }
                (tmp / READY_MARKER).write_text(json.dumps(marker, indent=2))
                _fsync_tree(tmp)  # on disk before it is named ready: a power cut cannot leave it half-written
                os.rename(tmp, folder)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            _fsync_path(folder.parent, folder=True)  # the new name
        return folder

    def describe(self, folder: Path) -> dict:
        return json.loads((Path(folder) / READY_MARKER).read_text())
