"""Convert Stable Diffusion 1.5, an SD1.5 ControlNet and the OpenPose body network to OpenVINO IR.

Three kinds of cached folders, each built once through :class:`~pipelines.cache.AtomicFolderCache`
and keyed by model reference, revision (hub commit or local-folder fingerprint), converter
versions and precision:

* ``sd15/<ref>--<rev>--<versions>--fp16``: ``text_encoder.xml``, ``unet.xml`` (taking the 12
  ControlNet down residuals and the mid residual as inputs), ``vae_decoder.xml``, plus
  ``tokenizer/``, ``scheduler/scheduler_config.json`` and the component configs needed at run time,
  summarised in ``pipeline.json``.
* ``controlnet/<ref>--<rev>--<versions>--fp16``: ``controlnet.xml`` (sample, timestep,
  encoder_hidden_states, controlnet_cond, conditioning_scale -> 12 down residuals + mid) and
  ``config.json``.
* ``openpose/<ref>--<rev>--<versions>--fp16``: ``body_pose.xml`` (the OpenPose body network).
* ``sd15_int8/<sd15 folder>/<controlnet folder>--<hash of calibration>``: INT8 ``unet.xml`` and
  ``controlnet.xml`` made from that FP16 pair by NNCF post-training quantization
  (:func:`ensure_sd_int8`); the text encoder and VAE decoder are the FP16 folder's.

All shapes but the channel counts are dynamic (batch, height, width; the text length too). Weights
are read from safetensors only (``use_safetensors=True``); the OpenPose ``.pth`` is read with
``torch.load(weights_only=True)``. Hub references are resolved to a local snapshot
(``local_files_only`` honoured), except that a hub model converted earlier is not downloaded again
while the hub is at the converted commit, cannot be reached, or the download fails (see
``_convert_once``). A model that cannot be found raises :class:`ModelUnavailable` with what to do
about it; a full disk is reported as such. Nothing heavy is imported at module import time.
"""
from __future__ import annotations

import errno
import gc
import hashlib
import json
import logging
import shutil
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Optional

from .cache import (READY_MARKER, AtomicFolderCache, DiskFull, ProgressFn, folder_fingerprint, mark_used, no_progress,
                    slug, versions_key)

log = logging.getLogger(__name__)

DEFAULT_SD_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_CONTROLNET = "lllyasviel/control_v11p_sd15_openpose"
DEFAULT_POSE_MODEL = "lllyasviel/Annotators"
POSE_FILENAME = "body_pose_model.pth"
PRECISION = "fp16"

# IR file names inside the cache folders (the pipeline reads these).
TEXT_ENCODER_IR = "text_encoder.xml"
UNET_IR = "unet.xml"
VAE_DECODER_IR = "vae_decoder.xml"
CONTROLNET_IR = "controlnet.xml"
BODY_POSE_IR = "body_pose.xml"
PIPELINE_JSON = "pipeline.json"

# Only what the pipeline needs from a hub repository (SD1.5 repos also hold multi-GB single files).
SD_ALLOW_PATTERNS = [
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/*",
    "scheduler/*",
]
CONTROLNET_ALLOW_PATTERNS = ["config.json", "diffusion_pytorch_model.safetensors"]
SD_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class ModelUnavailable(RuntimeError):
    """A model could not be found locally (and could not be downloaded), or is not usable."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference pinned to local files: ``path`` is a folder (or a file for the pose net)."""

    ref: str
    path: Path
    revision: str  # hub commit hash, or "local-<fingerprint>" for a local folder/file
    source: str  # "local" or "hub"


# --------------------------------------------------------------------------------------------
# Resolving references
# --------------------------------------------------------------------------------------------


def _is_local(ref: str) -> bool:
    return Path(ref).expanduser().exists()


def _looks_like_hub_id(ref: str) -> bool:
    parts = ref.strip().split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "/", "~"))


def _file_fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha1(f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]


def _disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` says the disk is full: an errno, or only the message (hf_xet's Rust errors)."""
    if error is None:
        return False
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error).lower()
    return "no space left on device" in text or "os error 28" in text or "disk quota exceeded" in text


def _unavailable(ref: str, what: str, how: str, error: BaseException | None = None) -> ModelUnavailable:
    """The error to raise for a model that cannot be had; a full disk is raised as :class:`DiskFull` instead."""
    if _disk_full(error):
        # not a missing model: say so, instead of advice about downloading it
        raise DiskFull(errno.ENOSPC, f"The disk is full: {what} '{ref}' could not be downloaded ({error}). Free "
                       "some space in the Hugging Face cache (HF_HOME) or the models folder and try again.") from error
    detail = f" ({type(error).__name__}: {error})" if error is not None else ""
    return ModelUnavailable(f"{what} '{ref}' is not available{detail}. {how}")


def _sd_how(ref: str) -> str:
    return (
        f"Download it where the Hugging Face Hub is reachable (e.g. `huggingface-cli download {ref}` into the "
        "Hugging Face cache), or pass the path of a local diffusers folder with "
        "unet/, vae/, text_encoder/, tokenizer/, scheduler/ with .safetensors weights."
    )


def _controlnet_how(ref: str) -> str:
    return (
        f"Download it where the Hugging Face Hub is reachable (e.g. `huggingface-cli download {ref}`), or pass the "
        "path of a local ControlNet folder holding config.json and diffusion_pytorch_model.safetensors."
    )


def _pose_how(ref: str) -> str:
    return (
        f"Download '{POSE_FILENAME}' from the Hugging Face repository '{DEFAULT_POSE_MODEL}' where the Hub is "
        f"reachable (e.g. `huggingface-cli download {DEFAULT_POSE_MODEL} {POSE_FILENAME}`), or pass the path of the "
        f"local '{POSE_FILENAME}' file (or of a folder containing it)."
    )


def resolve_snapshot(
    ref: str,
    *,
    what: str,
    how: str,
    allow_patterns: list[str],
    revision: Optional[str] = None,
    local_files_only: bool = False,
) -> ResolvedModel:
    """Pin a folder reference: a local folder as is, a hub id to its (downloaded) snapshot folder."""
    if _is_local(ref):
        path = Path(ref).expanduser().resolve()
        if not path.is_dir():
            raise _unavailable(ref, what, f"It is a file, not a folder. {how}")
        return ResolvedModel(ref, path, f"local-{folder_fingerprint(path)}", "local")
    if not _looks_like_hub_id(ref):
        raise _unavailable(ref, what, f"No such folder, and it is not a Hugging Face id like 'owner/name'. {how}")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            ref, revision=revision, allow_patterns=allow_patterns, local_files_only=local_files_only
        )
    except Exception as error:  # offline and not cached, no such repo, gated, network down...
        raise _unavailable(ref, what, how, error) from error
    path = Path(folder)
    return ResolvedModel(ref, path, path.name, "hub")


def resolve_pose_file(
    ref: str = DEFAULT_POSE_MODEL,
    *,
    filename: str = POSE_FILENAME,
    revision: Optional[str] = None,
    local_files_only: bool = False,
) -> ResolvedModel:
    """Pin the OpenPose body weights: a local .pth, a folder containing it, or a hub repository."""
    how = _pose_how(ref)
    if _is_local(ref):
        path = Path(ref).expanduser().resolve()
        if path.is_dir():
            path = path / filename
            if not path.is_file():
                raise _unavailable(ref, "OpenPose body model", f"The folder has no '{filename}'. {how}")
        return ResolvedModel(ref, path, f"local-{_file_fingerprint(path)}", "local")
    if not _looks_like_hub_id(ref):
        raise _unavailable(ref, "OpenPose body model", f"No such file or folder. {how}")
    try:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(ref, filename, revision=revision, local_files_only=local_files_only))
    except Exception as error:
        raise _unavailable(ref, "OpenPose body model", how, error) from error
    return ResolvedModel(ref, path, path.parent.name, "hub")


def _cache_folder(cache_root: Path, kind: str, resolved: ResolvedModel) -> Path:
    name = f"{slug(resolved.ref)}--{slug(resolved.revision)[:40]}--{versions_key()}--{PRECISION}"
    return Path(cache_root) / kind / name


# --------------------------------------------------------------------------------------------
# Torch wrappers traced by openvino.convert_model
# --------------------------------------------------------------------------------------------


def _torch_modules():
    """Wrapper classes, defined lazily so that importing this module does not import torch."""
    import torch

    class TextEncoderWrapper(torch.nn.Module):
        """CLIP text encoder -> last_hidden_state, with a ready-made causal mask.

        Tracing ``CLIPTextModel`` itself fails in transformers 5.x inside its causal-mask helper; the
        mask is a constant (sliced to the sequence length) here, which traces cleanly.
        """

        def __init__(self, text_model):
            super().__init__()
            self.text_model = text_model
            n = text_model.config.max_position_embeddings
            mask = torch.full((n, n), torch.finfo(torch.float32).min).triu(1)
            self.register_buffer("causal_mask", mask[None, None], persistent=False)

        def forward(self, input_ids):
            hidden = self.text_model.embeddings(input_ids=input_ids)
            length = input_ids.shape[1]
            mask = self.causal_mask[:, :, :length, :length]
            out = self.text_model.encoder(inputs_embeds=hidden, attention_mask=mask)
            return self.text_model.final_layer_norm(out.last_hidden_state)

    class UNetWithResiduals(torch.nn.Module):
        """UNet2DConditionModel with the ControlNet residuals as plain positional inputs."""

        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states, *residuals):
            return self.unet(
                sample,
                timestep,
                encoder_hidden_states,
                down_block_additional_residuals=list(residuals[:-1]),
                mid_block_additional_residual=residuals[-1],
                return_dict=False,
            )[0]

    class ControlNetWrapper(torch.nn.Module):
        def __init__(self, controlnet):
            super().__init__()
            self.controlnet = controlnet

        def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale):
            down, mid = self.controlnet(
                sample,
                timestep,
                encoder_hidden_states=encoder_hidden_states,
                controlnet_cond=controlnet_cond,
                conditioning_scale=conditioning_scale,
                guess_mode=False,
                return_dict=False,
            )
            return (*down, mid)

    class VaeDecoderWrapper(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, latent_sample):
            return self.vae.decode(latent_sample, return_dict=False)[0]

    return TextEncoderWrapper, UNetWithResiduals, ControlNetWrapper, VaeDecoderWrapper


def _convert(module, example: tuple, input_names: list[str], output_names: list[str], dynamic: list[list[int]]):
    """Trace ``module`` with ``example`` inputs; name inputs/outputs; make marked dims dynamic.

    ``dynamic[i]`` lists the dimensions of input ``i`` that are dynamic (-1); the others keep the
    example's size (channel counts, hidden sizes).
    """
    import openvino as ov
    import torch

    shapes = []
    for tensor, dyn in zip(example, dynamic):
        dims = [(-1 if i in dyn else int(s)) for i, s in enumerate(tensor.shape)]
        element = {torch.float32: ov.Type.f32, torch.int64: ov.Type.i64, torch.int32: ov.Type.i32}[tensor.dtype]
        shapes.append((ov.PartialShape(dims), element))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ov.convert_model(module, example_input=example, input=shapes)
    for port, name in zip(model.inputs, input_names):
        port.get_tensor().set_names({name})
    for port, name in zip(model.outputs, output_names):
        port.get_tensor().set_names({name})
    return model


def _save(model, path: Path) -> None:
    import openvino as ov

    ov.save_model(model, str(path), compress_to_fp16=True)


# --------------------------------------------------------------------------------------------
# Stable Diffusion 1.5
# --------------------------------------------------------------------------------------------


def down_residual_shapes(unet, batch: int, height: int, width: int) -> tuple[list[tuple], tuple]:
    """Shapes of the ControlNet residuals the UNet expects, found by running its down path once."""
    import torch

    shapes: list[tuple] = []
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))]

    def record(module, inputs, output):
        shapes.extend(tuple(t.shape) for t in output[1])

    hooks += [block.register_forward_hook(record) for block in unet.down_blocks]
    mid_shape: list[tuple] = []
    hooks.append(unet.mid_block.register_forward_hook(lambda m, i, o: mid_shape.append(tuple(o.shape))))
    try:
        with torch.no_grad():
            unet(
                torch.zeros(batch, unet.config.in_channels, height, width),
                torch.tensor(999.0),
                torch.zeros(batch, 77, unet.config.cross_attention_dim),
                return_dict=False,
            )
    finally:
        for hook in hooks:
            hook.remove()
    return shapes, mid_shape[0]


def _example_latent_size() -> tuple[int, int]:
    # Not a multiple of 8: traces the UNet's "forward the upsample size" path, whose output sizes follow
    # the skip connections, so any latent size (image multiple of 8) works with the dynamic IR.
    return 9, 11


def _check_sd_folder(folder: Path, ref: str) -> None:
    missing = [name for name in SD_SUBFOLDERS if not (folder / name).is_dir()]
    if missing:
        raise _unavailable(ref, "Stable Diffusion model", f"Its folder {folder} lacks {', '.join(missing)}/. {_sd_how(ref)}")


def _load(loader, ref: str, what: str, how: str, *args, **kwargs):
    try:
        return loader(*args, **kwargs)
    except (OSError, ValueError) as error:  # missing files, no .safetensors weights, bad config
        raise _unavailable(ref, what, how, error) from error


def convert_sd15(folder: Path, out: Path, ref: str = "", progress: ProgressFn = no_progress) -> dict:
    """Convert a local SD1.5 diffusers folder into ``out`` (text encoder, UNet+residuals, VAE decoder)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder, out = Path(folder), Path(out)
    ref = ref or str(folder)
    _check_sd_folder(folder, ref)
    how = _sd_how(ref)
    TextEncoderWrapper, UNetWithResiduals, _, VaeDecoderWrapper = _torch_modules()
    h, w = _example_latent_size()

    progress(0.02, "Converting the text encoder")
    text_encoder = _load(
        CLIPTextModel.from_pretrained, ref, "Stable Diffusion text encoder", how,
        folder / "text_encoder", use_safetensors=True, attn_implementation="eager", dtype=torch.float32,
    ).eval()
    seq_len = text_encoder.config.max_position_embeddings
    text_cfg = text_encoder.config.to_dict()
    model = _convert(
        TextEncoderWrapper(text_encoder.text_model).eval(),
        (torch.ones(1, seq_len, dtype=torch.int64),),
        ["input_ids"], ["last_hidden_state"], [[0, 1]],
    )
    _save(model, out / TEXT_ENCODER_IR)
    del model, text_encoder
    gc.collect()

    progress(0.15, "Converting the UNet")
    unet = _load(
        UNet2DConditionModel.from_pretrained, ref, "Stable Diffusion UNet", how,
        folder / "unet", use_safetensors=True, torch_dtype=torch.float32,
    ).eval()
    unet_cfg = dict(unet.config)
    cross_dim = unet.config.cross_attention_dim
    down_shapes, mid_shape = down_residual_shapes(unet, 2, h, w)
    example = (
        torch.randn(2, unet.config.in_channels, h, w),
        torch.tensor(999.0),
        torch.randn(2, seq_len, cross_dim),
        *[torch.randn(*s) for s in down_shapes],
        torch.randn(*mid_shape),
    )
    names = (
        ["sample", "timestep", "encoder_hidden_states"]
        + [f"down_block_additional_residual_{i}" for i in range(len(down_shapes))]
        + ["mid_block_additional_residual"]
    )
    dynamic = [[0, 2, 3], [], [0, 1]] + [[0, 2, 3]] * (len(down_shapes) + 1)
    model = _convert(UNetWithResiduals(unet).eval(), example, names, ["out_sample"], dynamic)
    _save(model, out / UNET_IR)
    del model, unet, example
    gc.collect()

    progress(0.75, "Converting the VAE decoder")
    vae = _load(
        AutoencoderKL.from_pretrained, ref, "Stable Diffusion VAE", how,
        folder / "vae", use_safetensors=True, torch_dtype=torch.float32,
    ).eval()
    vae_cfg = dict(vae.config)
    model = _convert(
        VaeDecoderWrapper(vae).eval(),
        (torch.randn(1, vae.config.latent_channels, h, w),),
        ["latent_sample"], ["sample"], [[0, 2, 3]],
    )
    _save(model, out / VAE_DECODER_IR)
    del model, vae
    gc.collect()

    progress(0.95, "Copying tokenizer and scheduler")
    shutil.copytree(folder / "tokenizer", out / "tokenizer")
    shutil.copytree(folder / "scheduler", out / "scheduler")
    for name, cfg in (("unet", unet_cfg), ("vae", vae_cfg), ("text_encoder", text_cfg)):
        (out / f"{name}_config.json").write_text(json.dumps(cfg, indent=2, default=str))
    summary = {
        "kind": "sd15",
        "model": ref,
        "unet_in_channels": unet_cfg["in_channels"],
        "cross_attention_dim": cross_dim,
        "num_down_residuals": len(down_shapes),
        "vae_scale_factor": 2 ** (len(vae_cfg["block_out_channels"]) - 1),
        "vae_scaling_factor": float(vae_cfg.get("scaling_factor", 0.18215)),
        "text_max_length": seq_len,
    }
    (out / PIPELINE_JSON).write_text(json.dumps(summary, indent=2))
    progress(1.0, "Stable Diffusion converted")
    return summary


def convert_controlnet(folder: Path, out: Path, ref: str = "", progress: ProgressFn = no_progress) -> dict:
    """Convert a local SD1.5 ControlNet folder into ``out/controlnet.xml`` (+ ``config.json``)."""
    import torch
    from diffusers import ControlNetModel

    folder, out = Path(folder), Path(out)
    ref = ref or str(folder)
    _, _, ControlNetWrapper, _ = _torch_modules()
    progress(0.05, "Converting the ControlNet")
    controlnet = _load(
        ControlNetModel.from_pretrained, ref, "ControlNet", _controlnet_how(ref),
        folder, use_safetensors=True, torch_dtype=torch.float32,
    ).eval()
    cfg = dict(controlnet.config)
    h, w = _example_latent_size()
    embed_factor = 2 ** (len(cfg["conditioning_embedding_out_channels"]) - 1)
    example = (
        torch.randn(2, cfg["in_channels"], h, w),
        torch.tensor(999.0),
        torch.randn(2, 77, cfg["cross_attention_dim"]),
        torch.rand(2, cfg.get("conditioning_channels", 3), h * embed_factor, w * embed_factor),
        torch.tensor(1.0),
    )
    n_down = len(controlnet.controlnet_down_blocks)
    model = _convert(
        ControlNetWrapper(controlnet).eval(),
        example,
        ["sample", "timestep", "encoder_hidden_states", "controlnet_cond", "conditioning_scale"],
        [f"down_block_res_sample_{i}" for i in range(n_down)] + ["mid_block_res_sample"],
        [[0, 2, 3], [], [0, 1], [0, 2, 3], []],
    )
    _save(model, out / CONTROLNET_IR)
    del model, controlnet
    gc.collect()
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    summary = {"kind": "controlnet", "model": ref, "num_down_residuals": n_down, "conditioning_factor": embed_factor}
    (out / PIPELINE_JSON).write_text(json.dumps(summary, indent=2))
    progress(1.0, "ControlNet converted")
    return summary


def convert_body_pose(pth: Path, out: Path, ref: str = "", progress: ProgressFn = no_progress) -> dict:
    """Convert controlnet-aux's OpenPose ``bodypose_model`` with weights from ``pth``."""
    import torch
    from controlnet_aux.open_pose import util as pose_util
    from controlnet_aux.open_pose.model import bodypose_model

    ref = ref or str(pth)
    progress(0.05, "Converting the OpenPose body network")
    model = bodypose_model()
    try:
        state = torch.load(str(pth), map_location="cpu", weights_only=True)
        model.load_state_dict(pose_util.transfer(model, state))
    except Exception as error:
        raise _unavailable(ref, "OpenPose body model", f"Its weights could not be read from {pth}. {_pose_how(ref)}", error) from error
    model.eval()
    ov_model = _convert(
        model, (torch.rand(1, 3, 184, 200) - 0.5,), ["image"], ["paf", "heatmap"], [[0, 2, 3]]
    )
    _save(ov_model, Path(out) / BODY_POSE_IR)
    del ov_model, model, state
    gc.collect()
    progress(1.0, "OpenPose converted")
    return {"kind": "openpose-body", "model": ref}


# --------------------------------------------------------------------------------------------
# Cached entry points
# --------------------------------------------------------------------------------------------


def _converted_earlier(cache_root: Path, folder_kind: str, ref: str, revision: Optional[str]) -> Optional[Path]:
    """The newest complete IR folder converted from hub model ``ref`` (at ``revision`` when given) by these
    converter versions, or None: what ``_convert_once`` uses instead of downloading the model again."""
    if _is_local(ref) or not _looks_like_hub_id(ref):
        return None
    rev = slug(revision)[:40] if revision else "*"
    found = []
    for folder in (Path(cache_root) / folder_kind).glob(f"{slug(ref)}--{rev}--{versions_key()}--{PRECISION}"):
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


def _convert_once(cache_root: Path, cache: Optional[AtomicFolderCache], folder_kind: str, kind: str,
                  ref: str, revision: Optional[str], local_files_only: bool, resolve, convert,
                  progress: ProgressFn) -> Path:
    """The cached IR folder of the model ``resolve()`` pins, made by ``convert(source, tmp, ref=, progress=)``,
    built once (atomically, in a temporary folder renamed into place) with a marker describing it.

    A hub model converted earlier is not downloaded again (its Hugging Face cache may have been cleaned
    to save space): when the hub says it is still at the converted commit, or cannot be asked
    (offline), or the download fails, the earlier conversion is used."""
    cache = cache or AtomicFolderCache(Path(cache_root))
    earlier = _converted_earlier(cache_root, folder_kind, ref, revision)
    if earlier is not None and not local_files_only:
        commit = _hub_commit(ref, revision)
        current = earlier if commit is None else _cache_folder(
            cache_root, folder_kind, ResolvedModel(ref, Path(), commit, "hub"))
        if cache.use(current):
            return current
    try:
        resolved = resolve()
    except (ModelUnavailable, DiskFull):
        if earlier is None:
            raise
        log.info("%s cannot be had from the hub now; using its earlier conversion %s", ref, earlier)
        mark_used(earlier)
        return earlier
    return cache.get_or_build(
        _cache_folder(cache_root, folder_kind, resolved),
        lambda tmp: convert(resolved.path, tmp, ref=ref, progress=progress),
        description={"model": ref, "revision": resolved.revision, "precision": PRECISION, "kind": kind},
    )


def ensure_sd15(
    cache_root: Path,
    ref: str = DEFAULT_SD_MODEL,
    *,
    revision: Optional[str] = None,
    local_files_only: bool = False,
    progress: ProgressFn = no_progress,
    cache: Optional[AtomicFolderCache] = None,
) -> Path:
    """Return the IR folder for SD1.5 checkpoint ``ref`` (a diffusers folder or hub id), converting once."""
    def resolve() -> ResolvedModel:
        resolved = resolve_snapshot(
            ref, what="Stable Diffusion model", how=_sd_how(ref), allow_patterns=SD_ALLOW_PATTERNS,
            revision=revision, local_files_only=local_files_only,
        )
        _check_sd_folder(resolved.path, ref)
        return resolved

    return _convert_once(cache_root, cache, "sd15", "sd15", ref, revision, local_files_only, resolve, convert_sd15,
                         progress)


def ensure_controlnet(
    cache_root: Path,
    ref: str = DEFAULT_CONTROLNET,
    *,
    revision: Optional[str] = None,
    local_files_only: bool = False,
    progress: ProgressFn = no_progress,
    cache: Optional[AtomicFolderCache] = None,
) -> Path:
    """Return the IR folder for ControlNet ``ref`` (a folder or hub id), converting once."""
    def resolve() -> ResolvedModel:
        resolved = resolve_snapshot(
            ref, what="ControlNet", how=_controlnet_how(ref), allow_patterns=CONTROLNET_ALLOW_PATTERNS,
            revision=revision, local_files_only=local_files_only,
        )
        if not (resolved.path / "config.json").is_file():
            raise _unavailable(ref, "ControlNet", f"Its folder {resolved.path} has no config.json. {_controlnet_how(ref)}")
        return resolved

    return _convert_once(cache_root, cache, "controlnet", "controlnet", ref, revision, local_files_only, resolve,
                         convert_controlnet, progress)


def ensure_body_pose(
    cache_root: Path,
    ref: str = DEFAULT_POSE_MODEL,
    *,
    revision: Optional[str] = None,
    local_files_only: bool = False,
    progress: ProgressFn = no_progress,
    cache: Optional[AtomicFolderCache] = None,
) -> Path:
    """Return the IR folder for the OpenPose body network (``body_pose_model.pth``), converting once."""
    return _convert_once(cache_root, cache, "openpose", "openpose-body", ref, revision, local_files_only,
                         lambda: resolve_pose_file(ref, revision=revision, local_files_only=local_files_only),
                         convert_body_pose, progress)


def int8_folder(cache_root: Path, sd_folder: Path, controlnet_folder: Path, calibration_key: str) -> Path:
    """Where the INT8 UNet + ControlNet of an FP16 pair live: keyed by the FP16 folders they came from
    (whose names carry model, revision and converter versions) and by the calibration data."""
    digest = hashlib.sha1(f"{Path(controlnet_folder).name}|{calibration_key}".encode()).hexdigest()[:12]
    return Path(cache_root) / "sd15_int8" / Path(sd_folder).name / f"{Path(controlnet_folder).name[:80]}--{digest}"


def ensure_sd_int8(
    cache_root: Path,
    sd_folder: Path,
    controlnet_folder: Path,
    *,
    calibration=None,
    ov_config: Optional[dict] = None,
    progress: ProgressFn = no_progress,
    cache: Optional[AtomicFolderCache] = None,
    quantizing: Callable[[], ContextManager] = nullcontext,
) -> Path:
    """Return the folder with the INT8 ``unet.xml`` and ``controlnet.xml`` for FP16 IR folders
    ``sd_folder`` + ``controlnet_folder`` (made by :func:`ensure_sd15` / :func:`ensure_controlnet`),
    quantizing once (see :func:`pipelines.quantize.quantize_sd_int8`).

    The UNet and the ControlNet are quantized as a pair because the calibration runs them together
    (the UNet's inputs include the ControlNet's residuals). ``calibration`` is a
    :class:`pipelines.quantize.SDCalibration` (default: from the environment). The marker file
    records the method, the number of calibration samples and where the prompts and poses came from.
    ``quantizing()`` is a context the quantization runs in, entered only when it has to run (e.g. to
    free memory for it and keep other work from taking that memory back meanwhile).
    """
    from . import quantize

    settings = calibration or quantize.SDCalibration.from_env()
    data = settings.load()  # cheap (prompts + a few skeleton images); user-data errors surface here
    sd_folder, controlnet_folder = Path(sd_folder), Path(controlnet_folder)
    sd_summary = json.loads((sd_folder / PIPELINE_JSON).read_text())
    cn_summary = json.loads((controlnet_folder / PIPELINE_JSON).read_text())
    cache = cache or AtomicFolderCache(Path(cache_root))
    folder = int8_folder(cache_root, sd_folder, controlnet_folder, data.key)

    def build(tmp: Path) -> dict:
        with quantizing():
            facts = quantize.quantize_sd_int8(sd_folder, controlnet_folder, tmp, settings, data=data,
                                              ov_config=ov_config, progress=progress)
        (tmp / PIPELINE_JSON).write_text(json.dumps({
            "kind": "sd15_int8", "unet": UNET_IR, "controlnet": CONTROLNET_IR,
            "sd_folder": sd_folder.name, "controlnet_folder": controlnet_folder.name,
        }, indent=2))
        return facts

    return cache.get_or_build(
        folder, build,
        description={"kind": "sd15_int8", "precision": "int8", "model": sd_summary.get("model"),
                     "controlnet": cn_summary.get("model")},
    )
