"""Where the image models come from, and their converted IR folders, made once.

A reference is a local folder (or, for the pose network, a ``.pth`` file or a folder holding it) or
a Hugging Face hub id, resolved to a local snapshot (``local_files_only`` honoured) and converted by
:mod:`pipelines.image.convert` into a cached folder of the models layout
(:mod:`pipelines.core.layout`): ``sd15/``, ``controlnet/``, ``openpose/``, ``taesd/``, keyed by model,
revision (hub commit or local-folder fingerprint), converter versions and precision, built once
through the layout's :class:`~pipelines.core.cache.AtomicFolderCache`. Fast mode's UNet (the LCM-LoRA
fused into the SD1.5 UNet, :func:`ensure_lcm_unet`) lives in ``sd15_lcm/<SD1.5 folder>/``, keyed by
the LoRA, its revision and scale.

:func:`ensure_all` gets every model one request needs and, when some are missing, raises one error
naming each of them and how to provide it.

A hub model converted earlier is not downloaded again while the hub is at the converted commit,
cannot be reached, or the download fails (see :func:`_convert_once`). A model that cannot be found
raises :class:`~pipelines.core.errors.ModelUnavailable` with what to do about it; a full disk is
reported as such.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from pipelines.core.cache import READY_MARKER, folder_fingerprint, mark_used
from pipelines.core.errors import DiskFull, ModelUnavailable, unavailable
from pipelines.core.layout import CONTROLNET, OPENPOSE, SD15, TAESD, ModelsLayout
from pipelines.core.progress import ProgressFn, no_progress
from pipelines.core.types import ResolvedModel
from pipelines.image.convert import (CONTROLNET_ALLOW_PATTERNS, DEFAULT_CONTROLNET, DEFAULT_LCM_LORA,
                                     DEFAULT_POSE_MODEL, DEFAULT_SD_MODEL, DEFAULT_TAESD, POSE_FILENAME, PRECISION,
                                     SD_ALLOW_PATTERNS, TAESD_ALLOW_PATTERNS, check_sd_folder, controlnet_how,
                                     convert_body_pose, convert_controlnet, convert_sd15, convert_taesd, pose_how,
                                     sd_how, taesd_how)
from pipelines.image.lora import (DEFAULT_LORA_SCALE, LCM_LORA_ALLOW_PATTERNS, convert_lcm_unet, lcm_lora_how,
                                  lora_file, lora_scale_tag)

log = logging.getLogger(__name__)
Models = "ModelsLayout | Path | str"


def _is_local(ref: str) -> bool:
    return Path(ref).expanduser().exists()


def _looks_like_hub_id(ref: str) -> bool:
    parts = ref.strip().split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "/", "~"))


def _file_fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha1(f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]


def resolve_snapshot(ref: str, *, what: str, how: str, allow_patterns: list[str], revision: Optional[str] = None,
                     local_files_only: bool = False) -> ResolvedModel:
    """Pin a folder reference: a local folder as is, a hub id to its (downloaded) snapshot folder."""
    if _is_local(ref):
        path = Path(ref).expanduser().resolve()
        if not path.is_dir():
            raise unavailable(ref, what, f"It is a file, not a folder. {how}")
        return ResolvedModel(ref, path, "local", f"local-{folder_fingerprint(path)}")
    if not _looks_like_hub_id(ref):
        raise unavailable(ref, what, f"No such folder, and it is not a Hugging Face id like 'owner/name'. {how}")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(ref, revision=revision, allow_patterns=allow_patterns,
                                   local_files_only=local_files_only)
    except Exception as error:  # offline and not cached, no such repo, gated, network down...
        raise unavailable(ref, what, how, error) from error
    path = Path(folder)
    return ResolvedModel(ref, path, "hub", path.name)


def resolve_pose_file(ref: str = DEFAULT_POSE_MODEL, *, filename: str = POSE_FILENAME, revision: Optional[str] = None,
                      local_files_only: bool = False) -> ResolvedModel:
    """Pin the OpenPose body weights: a local .pth, a folder containing it, or a hub repository."""
    how = pose_how(ref)
    if _is_local(ref):
        path = Path(ref).expanduser().resolve()
        if path.is_dir():
            path = path / filename
            if not path.is_file():
                raise unavailable(ref, "OpenPose body model", f"The folder has no '{filename}'. {how}")
        return ResolvedModel(ref, path, "local", f"local-{_file_fingerprint(path)}")
    if not _looks_like_hub_id(ref):
        raise unavailable(ref, "OpenPose body model", f"No such file or folder. {how}")
    try:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(ref, filename, revision=revision, local_files_only=local_files_only))
    except Exception as error:
        raise unavailable(ref, "OpenPose body model", how, error) from error
    return ResolvedModel(ref, path, "hub", path.parent.name)


def _resolve_sd15(ref: str, revision: Optional[str], local_files_only: bool) -> ResolvedModel:
    resolved = resolve_snapshot(ref, what="Stable Diffusion model", how=sd_how(ref), allow_patterns=SD_ALLOW_PATTERNS,
                                revision=revision, local_files_only=local_files_only)
    check_sd_folder(resolved.path, ref)
    return resolved


def _resolve_controlnet(ref: str, revision: Optional[str], local_files_only: bool) -> ResolvedModel:
    resolved = resolve_snapshot(ref, what="ControlNet", how=controlnet_how(ref),
                                allow_patterns=CONTROLNET_ALLOW_PATTERNS, revision=revision,
                                local_files_only=local_files_only)
    if not (resolved.path / "config.json").is_file():
        raise unavailable(ref, "ControlNet", f"Its folder {resolved.path} has no config.json. {controlnet_how(ref)}")
    return resolved


def _resolve_pose(ref: str, revision: Optional[str], local_files_only: bool) -> ResolvedModel:
    return resolve_pose_file(ref, revision=revision, local_files_only=local_files_only)


def _resolve_taesd(ref: str, revision: Optional[str], local_files_only: bool) -> ResolvedModel:
    resolved = resolve_snapshot(ref, what="TAESD decoder", how=taesd_how(ref), allow_patterns=TAESD_ALLOW_PATTERNS,
                                revision=revision, local_files_only=local_files_only)
    if not (resolved.path / "config.json").is_file():
        raise unavailable(ref, "TAESD decoder", f"Its folder {resolved.path} has no config.json. {taesd_how(ref)}")
    return resolved


def resolve_lcm_lora(ref: str = DEFAULT_LCM_LORA, *, revision: Optional[str] = None,
                     local_files_only: bool = False) -> ResolvedModel:
    """Pin the LCM-LoRA: a local ``.safetensors`` file or a folder holding it, or a hub repository;
    ``path`` is the weights file."""
    if _is_local(ref):
        path = lora_file(Path(ref).expanduser().resolve(), ref)
        return ResolvedModel(ref, path, "local", f"local-{_file_fingerprint(path)}")
    resolved = resolve_snapshot(ref, what="LCM-LoRA", how=lcm_lora_how(ref), allow_patterns=LCM_LORA_ALLOW_PATTERNS,
                                revision=revision, local_files_only=local_files_only)
    return ResolvedModel(ref, lora_file(resolved.path, ref), "hub", resolved.revision)


@dataclass(frozen=True)
class _Kind:
    """A kind of converted model: its folder in the layout, the name its marker records, how a
    reference is pinned to files and how those are converted."""

    folder: str
    name: str
    resolve: Callable[[str, Optional[str], bool], ResolvedModel]
    convert: Callable[..., dict]


_KINDS = {
    SD15: _Kind(SD15, "sd15", _resolve_sd15, convert_sd15),
    CONTROLNET: _Kind(CONTROLNET, "controlnet", _resolve_controlnet, convert_controlnet),
    OPENPOSE: _Kind(OPENPOSE, "openpose-body", _resolve_pose, convert_body_pose),
    TAESD: _Kind(TAESD, "taesd", _resolve_taesd, convert_taesd),
}


def ensure_sd15(models: Models, ref: str = DEFAULT_SD_MODEL, *, revision: Optional[str] = None,
                local_files_only: bool = False, progress: ProgressFn = no_progress) -> Path:
    """The IR folder of SD1.5 checkpoint ``ref`` (a diffusers folder or hub id), converted once."""
    return _convert_once(ModelsLayout.of(models), _KINDS[SD15], ref, revision, local_files_only, progress)


def ensure_controlnet(models: Models, ref: str = DEFAULT_CONTROLNET, *, revision: Optional[str] = None,
                      local_files_only: bool = False, progress: ProgressFn = no_progress) -> Path:
    """The IR folder of ControlNet ``ref`` (a folder or hub id), converted once."""
    return _convert_once(ModelsLayout.of(models), _KINDS[CONTROLNET], ref, revision, local_files_only, progress)


def ensure_body_pose(models: Models, ref: str = DEFAULT_POSE_MODEL, *, revision: Optional[str] = None,
                     local_files_only: bool = False, progress: ProgressFn = no_progress) -> Path:
    """The IR folder of the OpenPose body network (``body_pose_model.pth``), converted once."""
    return _convert_once(ModelsLayout.of(models), _KINDS[OPENPOSE], ref, revision, local_files_only, progress)


def ensure_taesd(models: Models, ref: str = DEFAULT_TAESD, *, revision: Optional[str] = None,
                 local_files_only: bool = False, progress: ProgressFn = no_progress) -> Path:
    """The IR folder of the TAESD decoder ``ref`` (an ``AutoencoderTiny`` folder or hub id), converted once."""
    return _convert_once(ModelsLayout.of(models), _KINDS[TAESD], ref, revision, local_files_only, progress)


def ensure_lcm_unet(models: Models, sd_ref: str, sd_ir: Path, lora_ref: str = DEFAULT_LCM_LORA, *,
                    scale: float = DEFAULT_LORA_SCALE, local_files_only: bool = False,
                    progress: ProgressFn = no_progress) -> Path:
    """Fast mode's UNet folder: SD1.5 ``sd_ref`` (converted to IR folder ``sd_ir``) with the LCM-LoRA
    ``lora_ref`` fused in at ``scale``, made once. Making it reads the SD1.5 checkpoint again (at the
    revision ``sd_ir`` was made from); a folder made earlier serves when the LoRA cannot be had now."""
    layout, tag = ModelsLayout.of(models), lora_scale_tag(scale)
    try:
        lora = resolve_lcm_lora(lora_ref, local_files_only=local_files_only)
    except (ModelUnavailable, DiskFull):
        earlier = sorted((f for f in layout.lcm_unets_of(sd_ir, lora_ref, tag) if _made_from(f, lora_ref)),
                         key=_created)
        if not earlier:
            raise
        mark_used(earlier[-1])
        log.info("%s cannot be had now; using Fast mode's UNet made earlier, %s", lora_ref, earlier[-1])
        return earlier[-1]
    folder = layout.sd_lcm(sd_ir, lora_ref, lora.revision, tag)
    if layout.cache.use(folder):
        return folder

    def build(tmp: Path) -> dict:
        sd = _sd_checkpoint(sd_ref, Path(sd_ir), local_files_only)
        return convert_lcm_unet(sd.path, lora.path, tmp, sd_ir=sd_ir, scale=scale, sd_ref=sd_ref, lora_ref=lora_ref,
                                progress=progress)

    return layout.cache.get_or_build(folder, build, description={
        "kind": "sd15_lcm", "model": sd_ref, "lora": lora_ref, "lora_revision": lora.revision, "scale": scale,
        "precision": PRECISION})


def _marker(folder: Path) -> dict:
    try:
        return json.loads((folder / READY_MARKER).read_text())
    except (OSError, ValueError):  # not complete
        return {}


def _created(folder: Path) -> str:
    return _marker(folder).get("created", "")


def _made_from(folder: Path, lora_ref: str) -> bool:
    return _marker(folder).get("lora") == lora_ref  # complete, and not another LoRA whose name slugs the same


def _sd_checkpoint(sd_ref: str, sd_ir: Path, local_files_only: bool) -> ResolvedModel:
    """The SD1.5 checkpoint IR folder ``sd_ir`` was converted from (its hub commit), to fuse a LoRA into."""
    marker = json.loads((sd_ir / READY_MARKER).read_text())
    revision = marker.get("revision") if not _is_local(sd_ref) else None
    try:
        return _resolve_sd15(sd_ref, revision, local_files_only)
    except ModelUnavailable as error:
        raise ModelUnavailable(f"{error} Fast mode reads its weights once more, to fuse the LCM-LoRA into its "
                               "UNet.") from error


@dataclass(frozen=True)
class Needed:
    """One model a request needs: what it is called in messages, and how to get its folder."""

    name: str
    get: Callable[[dict], Path]  # get(the folders found so far, by name; None for missing ones)
    optional: bool = False  # a missing optional model is left out (None), not an error


class ModelsUnavailable(ModelUnavailable):
    """Several models a request needs are missing; the message names each and how to provide it."""

    def __init__(self, what: str, missing: Sequence[ModelUnavailable]):
        self.missing = list(missing)
        if len(self.missing) == 1:
            message = str(self.missing[0])
        else:
            lines = "\n".join(f"{i}. {error}" for i, error in enumerate(self.missing, start=1))
            message = f"{what} needs {len(self.missing)} models that are not available here:\n{lines}"
        super().__init__(message)


def ensure_all(needed: Sequence[Needed], what: str = "This request") -> dict[str, Optional[Path]]:
    """Every needed model's folder (``None`` for a missing optional one); when some required ones are
    missing, one :class:`ModelsUnavailable` naming each (a full disk is raised at once)."""
    found: dict[str, Optional[Path]] = {}
    missing: list[ModelUnavailable] = []
    for item in needed:
        try:
            found[item.name] = item.get(found)
        except ModelUnavailable as error:
            found[item.name] = None
            if not item.optional:
                missing.extend(getattr(error, "missing", [error]))
    if missing:
        raise ModelsUnavailable(what, missing)
    return found


def _converted_earlier(layout: ModelsLayout, kind: _Kind, ref: str, revision: Optional[str]) -> Optional[Path]:
    """The newest complete IR folder converted from hub model ``ref`` (at ``revision`` when given) by these
    converter versions, or None: what ``_convert_once`` uses instead of downloading the model again."""
    if _is_local(ref) or not _looks_like_hub_id(ref):
        return None
    found = []
    for folder in layout.conversions_of(kind.folder, ref, revision):
        try:
            marker = json.loads((folder / READY_MARKER).read_text())
        except (OSError, ValueError):  # not complete
            continue
        if marker.get("model") == ref:  # not another model whose name starts the same
            found.append((marker.get("created", ""), folder))
    return max(found)[1] if found else None


def _hub_commit(ref: str, revision: Optional[str]) -> Optional[str]:
    """The commit hub model ``ref`` is at now (one API call, no download); None when the hub cannot say."""
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(ref, revision=revision).sha
    except Exception:  # noqa: BLE001 - offline, unreachable, gated, no such repo: the caller decides
        return None


def _convert_once(layout: ModelsLayout, kind: _Kind, ref: str, revision: Optional[str], local_files_only: bool,
                  progress: ProgressFn) -> Path:
    """The cached IR folder of the model ``kind.resolve`` pins, made by ``kind.convert``, built once
    (atomically, in a temporary folder renamed into place) with a marker describing it.

    A hub model converted earlier is not downloaded again (its Hugging Face cache may have been cleaned
    to save space): when the hub says it is still at the converted commit, or cannot be asked
    (offline), or the download fails, the earlier conversion is used."""
    earlier = _converted_earlier(layout, kind, ref, revision)
    if earlier is not None and not local_files_only:
        commit = _hub_commit(ref, revision)
        current = earlier if commit is None else layout.converted(kind.folder, ref, commit)
        if layout.cache.use(current):
            return current
    try:
        resolved = kind.resolve(ref, revision, local_files_only)
    except (ModelUnavailable, DiskFull):
        if earlier is None:
            raise
        log.info("%s cannot be had from the hub now; using its earlier conversion %s", ref, earlier)
        mark_used(earlier)
        return earlier
    return layout.cache.get_or_build(
        layout.converted(kind.folder, ref, resolved.revision),
        lambda tmp: kind.convert(resolved.path, tmp, ref=ref, progress=progress),
        description={"model": ref, "revision": resolved.revision, "precision": PRECISION, "kind": kind.name},
    )
