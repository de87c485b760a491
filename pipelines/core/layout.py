"""Where everything lives under the models folder (``models_cache/`` by default): the one map of it.

::

    <root>/
      whisper/<model>/<revision>/fp16-<versions>            Whisper IR (optimum-intel export)
      whisper/<model>/<revision>/int8-<versions>-<method>   its INT8 model, beside it
      sd15/<model>--<revision>--<versions>--fp16            SD1.5 text encoder, UNet, VAE decoder IR
      controlnet/<model>--<revision>--<versions>--fp16      ControlNet IR
      openpose/<model>--<revision>--<versions>--fp16        OpenPose body network IR
      taesd/<model>--<revision>--<versions>--fp16           TAESD decoder IR (live previews, Fast mode)
      sd15_lcm/<sd15 folder>/<lora>--<revision>--scale<s>   Fast mode's UNet: that SD1.5 with the LCM-LoRA fused in
      sd15_int8/<sd15 folder>/<controlnet folder>--<key>    INT8 UNet + ControlNet of that FP16 pair
      sd15_int8/<sd15 folder>/<controlnet folder>--lcm-<key>  the same for Fast mode's pair (its key has the LoRA)
      ov_compile_cache/                                     OpenVINO's compiled-model cache (CACHE_DIR)
      .work-*/                                              scratch of a conversion running now

``<versions>`` is :func:`pipelines.core.cache.versions_key`: folders made by other converter versions
are never picked again. Every folder is built through the one :class:`AtomicFolderCache` of its root
(complete or absent, built once across threads and processes). ``app.py --list-models`` and
``--prune-models`` (:mod:`pipelines.core.housekeeping`) read this same layout.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Mapping, Optional

from pipelines.core.cache import AtomicFolderCache, slug, versions_key

ENV_MODELS_DIR = "VOICE_STUDIO_MODELS_DIR"
DEFAULT_MODELS_DIR = Path("models_cache")
SPACE_DATA_DIR = Path("/data")  # a Hugging Face Space's persistent storage, when it has some

WHISPER = "whisper"
SD15 = "sd15"
CONTROLNET = "controlnet"
OPENPOSE = "openpose"
TAESD = "taesd"
SD15_LCM = "sd15_lcm"
SD15_INT8 = "sd15_int8"
COMPILE_CACHE = "ov_compile_cache"
#: The kinds of converted model that :meth:`ModelsLayout.converted` names (diffusers-style, flat).
CONVERTED_KINDS = (SD15, CONTROLNET, OPENPOSE, TAESD)
CONVERTED_PRECISION = "fp16"


def default_models_dir(environ: Mapping[str, str] = os.environ, data_dir: Path = SPACE_DATA_DIR) -> Path:
    """VOICE_STUDIO_MODELS_DIR, else a Space's persistent /data/models_cache, else models_cache/."""
    if environ.get(ENV_MODELS_DIR):
        return Path(environ[ENV_MODELS_DIR])
    if environ.get("SPACE_ID") and data_dir.is_dir():
        return data_dir / "models_cache"
    return DEFAULT_MODELS_DIR


class ModelsLayout:
    """The paths of one models folder, and its one :class:`AtomicFolderCache`."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.cache = AtomicFolderCache(self.root)

    @staticmethod
    def of(where: "ModelsLayout | Path | str | None") -> "ModelsLayout":
        """``where`` as a layout: a layout as is, a folder's shared layout, None the default folder's."""
        if isinstance(where, ModelsLayout):
            return where
        return _shared(Path(where) if where is not None else default_models_dir())

    def __repr__(self) -> str:
        return f"ModelsLayout({str(self.root)!r})"

    # -- Whisper ----------------------------------------------------------------------------
    def whisper(self, reference: str, revision: str, precision: str = "fp16") -> Path:
        return self.root / WHISPER / slug(reference) / slug(revision) / f"{precision}-{versions_key()}"

    def whisper_int8(self, fp16_folder: Path, method: str, reference: Optional[str] = None,
                     fingerprint: Optional[str] = None) -> Path:
        """The INT8 model made from ``fp16_folder`` by ``method``: beside it, or for a user's own IR
        folder (``reference`` + ``fingerprint``: never written into) under ``whisper/``."""
        parent = (self.root / WHISPER / slug(reference) / fingerprint if fingerprint is not None
                  else Path(fp16_folder).parent)
        return parent / f"int8-{versions_key()}-{method}"

    # -- Stable Diffusion, ControlNet, OpenPose ---------------------------------------------
    def converted(self, kind: str, reference: str, revision: str) -> Path:
        """The IR folder of ``reference`` at ``revision`` for a kind of :data:`CONVERTED_KINDS`."""
        return self.root / kind / self._converted_name(reference, slug(revision)[:40])

    def conversions_of(self, kind: str, reference: str, revision: Optional[str] = None) -> list[Path]:
        """Every folder (complete or not) converted from ``reference`` (at ``revision`` when given) by
        these converter versions."""
        pattern = self._converted_name(reference, slug(revision)[:40] if revision else "*")
        return sorted((self.root / kind).glob(pattern))

    @staticmethod
    def _converted_name(reference: str, revision: str) -> str:
        return f"{slug(reference)}--{revision}--{versions_key()}--{CONVERTED_PRECISION}"

    def sd_lcm(self, sd_folder: Path, lora: str, lora_revision: str, scale_tag: str) -> Path:
        """Fast mode's UNet: the SD1.5 of IR folder ``sd_folder`` (its name carries model, revision and
        converter versions) with LoRA ``lora`` at ``lora_revision`` fused in at a scale."""
        return self.root / SD15_LCM / Path(sd_folder).name / f"{slug(lora)}--{slug(lora_revision)[:40]}--{scale_tag}"

    def lcm_unets_of(self, sd_folder: Path, lora: str, scale_tag: str) -> list[Path]:
        """Every folder (complete or not) of Fast mode's UNet made from ``sd_folder`` and ``lora`` at a scale,
        whatever the LoRA's revision."""
        return sorted((self.root / SD15_LCM / Path(sd_folder).name).glob(f"{slug(lora)}--*--{scale_tag}"))

    def sd_int8(self, sd_folder: Path, controlnet_folder: Path, key: str, lcm_folder: Optional[Path] = None) -> Path:
        """Where the INT8 UNet + ControlNet of an FP16 pair live: keyed by the FP16 folders they came
        from (whose names carry model, revision and converter versions) and by ``key`` (calibration
        data and quantization settings). Fast mode's pair (``lcm_folder``: its fused UNet's folder,
        whose path carries the LoRA, its revision and scale) is another folder."""
        cn = Path(controlnet_folder).name
        if lcm_folder is None:
            digest = hashlib.sha1(f"{cn}|{key}".encode()).hexdigest()[:12]
            return self.root / SD15_INT8 / Path(sd_folder).name / f"{cn[:80]}--{digest}"
        lora = Path(lcm_folder).name
        digest = hashlib.sha1(f"{cn}|{lora}|{key}".encode()).hexdigest()[:12]
        return self.root / SD15_INT8 / Path(sd_folder).name / f"{cn[:80]}--lcm-{digest}"

    # -- run time ---------------------------------------------------------------------------
    @property
    def compile_cache(self) -> Path:
        """OpenVINO's compiled-model cache (``CACHE_DIR``): rebuilt when a model next loads."""
        return self.root / COMPILE_CACHE


@functools.lru_cache(maxsize=None)
def _shared(root: Path) -> ModelsLayout:
    """One layout (and so one AtomicFolderCache, whose per-folder thread locks must be shared) per folder."""
    return ModelsLayout(root)
