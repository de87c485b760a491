"""Where the image models come from, and their converted IR folders, made once.

A reference is a local folder (or, for the pose network, a ``.pth`` file or a folder holding it) or
a Hugging Face hub id, resolved to a local snapshot (``local_files_only`` honoured) and converted by
:mod:`pipelines.image.convert` into a cached folder of the models layout
(:mod:`pipelines.core.layout`): ``sd15/``, ``controlnet/``, ``openpose/``, keyed by model, revision
(hub commit or local-folder fingerprint), converter versions and precision, built once through the
layout's :class:`~pipelines.core.cache.AtomicFolderCache`.

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
from typing import Callable, Optional

from pipelines.core.cache import READY_MARKER, folder_fingerprint, mark_used
from pipelines.core.errors import DiskFull, ModelUnavailable, unavailable
from pipelines.core.layout import CONTROLNET, OPENPOSE, SD15, ModelsLayout
from pipelines.core.progress import ProgressFn, no_progress
from pipelines.core.types import ResolvedModel
from pipelines.image.convert import (CONTROLNET_ALLOW_PATTERNS, DEFAULT_CONTROLNET, DEFAULT_POSE_MODEL,
                                     DEFAULT_SD_MODEL, POSE_FILENAME, PRECISION, SD_ALLOW_PATTERNS, check_sd_folder,
                                     controlnet_how, convert_body_pose, convert_controlnet, convert_sd15, pose_how,
                                     sd_how)

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
