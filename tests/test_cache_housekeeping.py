"""Models folder housekeeping: what --list-models reports and --prune-models removes."""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.core import cache, layout
from pipelines.core.cache import READY_MARKER, AtomicFolderCache, folder_held
from pipelines.core.housekeeping import (COMPILED, CURRENT, OTHER_VERSIONS, UNFINISHED, UNUSED, prune_models,
                                         scan_models)

ROOT = Path(__file__).resolve().parent.parent
OLD_VERSIONS = {"openvino": "2026.3.0", "nncf": "3.3.0"}


def _build(root: Path, relative: str, size: int = 64 * 1024) -> Path:
    def fill(tmp: Path) -> None:
        (tmp / "model.bin").write_bytes(os.urandom(size))

    return AtomicFolderCache(root).get_or_build(root / relative, fill)


def _aged(path: Path, hours: float) -> Path:
    then = time.time() - hours * 3600
    os.utime(path, (then, then))
    return path


@pytest.fixture
def models_folder(tmp_path, monkeypatch):
    """A models folder as an upgrade leaves it: folders of the old and the new converter versions, a
    killed build's and a killed conversion's leftovers, work still running, and a compile cache."""
    root = tmp_path / "models_cache"
    now = cache.converter_versions()
    with monkeypatch.context() as old:
        old.setattr(cache, "converter_versions", lambda packages=None: dict(now, **OLD_VERSIONS))
        stale = _build(root, "whisper/base/1.0/fp16-ov2026.3.0-aaaa")
        stale_sd = _build(root, "sd15/old-model--ov2026.3.0--fp16", size=256 * 1024)
    current = _build(root, "whisper/base/1.0/fp16-ov2026.4.1-bbbb")
    killed_build = root / "whisper/base/1.0/.tmp-int8-ov2026.4.1-bbbb-w8dec-0123abcd"
    killed_build.mkdir()
    (killed_build / "openvino_decoder_model.bin").write_bytes(b"0" * 4096)
    killed_scratch = root / ".work-dead"
    killed_scratch.mkdir()
    (killed_scratch / "hf.safetensors").write_bytes(b"0" * 4096)
    _aged(killed_scratch, 1)  # past the grace a new scratch folder gets to take its lock
    compiled = layout.ModelsLayout(root).compile_cache
    compiled.mkdir()
    (compiled / "123456.blob").write_bytes(b"0" * 8192)
    return {"root": root, "stale": stale, "stale_sd": stale_sd, "current": current, "killed_build": killed_build,
            "killed_scratch": killed_scratch, "compiled": compiled}


def _states(entries) -> dict[Path, str]:
    return {e.path: e.state for e in entries}


def test_scan_says_what_this_install_can_still_use(models_folder):
    f = models_folder
    entries = scan_models(f["root"])
    assert _states(entries) == {f["stale"]: OTHER_VERSIONS, f["stale_sd"]: OTHER_VERSIONS, f["current"]: CURRENT,
                                f["killed_build"]: UNFINISHED, f["killed_scratch"]: UNFINISHED,
                                f["compiled"]: COMPILED}
    stale = next(e for e in entries if e.path == f["stale"])
    assert "openvino 2026.3.0" in stale.note and "nncf 3.3.0" in stale.note
    assert stale.size >= 64 * 1024  # the weights, on disk
    sd = next(e for e in entries if e.path == f["stale_sd"])
    assert sd.size >= 256 * 1024 > stale.size


def test_prune_removes_only_what_cannot_be_used_and_keeps_work_in_progress(models_folder):
    f = models_folder
    root = f["root"]
    # a build of this install still running (it holds its build lock) and a conversion still working
    running_build = root / "whisper/base/1.0/.tmp-int8-ov2026.4.1-bbbb-ptq-89abcdef"
    running_build.mkdir()
    (root / ".work-busy").mkdir()
    with open(root / "whisper/base/1.0/.int8-ov2026.4.1-bbbb-ptq.lock", "w") as lock, \
            folder_held(root / ".work-busy") as busy:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _aged(busy, 1)
        removed = prune_models(root)
        assert running_build.is_dir() and busy.is_dir()
    assert {e.path for e in removed} == {f["stale"], f["stale_sd"], f["killed_build"], f["killed_scratch"],
                                         f["compiled"]}
    for entry in removed:
        assert not entry.path.exists()
    assert json.loads((f["current"] / READY_MARKER).read_text())["converters"] == cache.converter_versions()
    assert (f["current"] / "model.bin").is_file()
    assert not (root / "sd15").exists()  # emptied by the prune: gone too
    assert not (root / "whisper/base/1.0/.fp16-ov2026.3.0-aaaa.lock").exists()
    assert (root / "whisper/base/1.0").is_dir()  # still holds the current model
    # the folder this install uses is found again as it was, without converting anything
    assert _build(root, "whisper/base/1.0/fp16-ov2026.4.1-bbbb") == f["current"]


def test_unused_days_counts_folders_nobody_loaded_for_that_long(tmp_path):
    root = tmp_path / "models_cache"
    folder = _build(root, "controlnet/openpose--ov2026.4.1--fp16")
    _aged(folder / READY_MARKER, 24 * 10)
    assert _states(scan_models(root, unused_days=30)) == {folder: CURRENT}
    assert _states(scan_models(root, unused_days=5)) == {folder: UNUSED}
    AtomicFolderCache(root).get_or_build(folder, lambda tmp: pytest.fail("a complete folder is not built again"))
    assert _states(scan_models(root, unused_days=5)) == {folder: CURRENT}  # using it counts
    _aged(folder / READY_MARKER, 24 * 10)
    assert [e.path for e in prune_models(root, unused_days=5)] == [folder]
    assert not folder.exists()
    # its build lock stays (this install may build that key again at any moment): an empty file
    assert [(p.name, p.stat().st_size) for p in (root / "controlnet").iterdir()] == [(".openpose--ov2026.4.1--fp16.lock", 0)]


def _app(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "app.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_list_and_prune_from_the_command_line(models_folder):
    f = models_folder
    root = str(f["root"])
    listed = _app("--list-models", "--models-dir", root)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert any("other versions" in line and "fp16-ov2026.3.0-aaaa" in line and "openvino 2026.3.0" in line
               for line in lines), listed.stdout
    assert any(line.split()[0] == "current" and "fp16-ov2026.4.1-bbbb" in line for line in lines), listed.stdout
    assert "--prune-models would free" in listed.stdout
    assert f["stale"].is_dir()  # listing removes nothing

    pruned = _app("--prune-models", "--models-dir", root)
    assert pruned.returncode == 0, pruned.stderr
    assert "freed" in pruned.stdout and "fp16-ov2026.3.0-aaaa" in pruned.stdout
    assert "fp16-ov2026.4.1-bbbb" not in pruned.stdout
    assert not f["stale"].exists() and f["current"].is_dir()
    again = _app("--list-models", "--models-dir", root)
    assert "nothing to prune" in again.stdout

    missing = _app("--list-models", "--models-dir", str(f["root"] / "nowhere"))
    assert missing.returncode == 0 and "no models folder yet" in missing.stdout
    alone = _app("--unused-days", "3")
    assert alone.returncode == 2 and "--unused-days goes with --list-models or --prune-models" in alone.stderr


def test_using_a_folder_does_not_change_the_key_of_what_is_made_from_it(tmp_path):
    """A local model folder may be a cache folder (a converted IR used in place); its fingerprint keys the
    INT8 model made from it, so touching its marker on use must not change it, while new weights must."""
    from pipelines.core.cache import folder_fingerprint

    folder = _build(tmp_path / "models_cache", "whisper/base/1.0/fp16-ov2026.4.1-bbbb")
    key = folder_fingerprint(folder)
    _aged(folder / READY_MARKER, 48)
    assert folder_fingerprint(folder) == key
    with open(folder / "model.bin", "ab") as weights:
        weights.write(b"retrained")
    assert folder_fingerprint(folder) != key
