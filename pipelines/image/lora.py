"""Fast mode's UNet: the LCM-LoRA fused into the SD1.5 UNet before export.

The LCM-LoRA for SD1.5 (``latent-consistency/lcm-lora-sdv1-5``, 67.5 M parameters) distils SD1.5 into
a few-step latent consistency model. It is fused with diffusers' own loaders (``lora_state_dict``, which
reads the diffusers/peft and the kohya key formats, then ``load_lora_into_unet`` + ``fuse_lora`` +
``unload_lora``) without building a pipeline, and the UNet that is left, a plain
``UNet2DConditionModel`` whose weights include the LoRA, goes through the same export as SD1.5's
(:func:`pipelines.image.convert.export_unet`): the OpenVINO UNet has no LoRA branch at run time (the
same operations as the plain one, measured).

A LoRA file whose keys the loader only half understands loses layers with no more than a peft
warning (diffusers 0.39 drops every attention layer of a file saved through
``convert_state_dict_to_diffusers``), so the fusion counts the layers applied against the pairs in
the file and refuses a partial one.
"""
from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Optional

from pipelines.core.errors import unavailable
from pipelines.core.progress import ProgressFn, no_progress
from pipelines.image.convert import DEFAULT_LCM_LORA, PIPELINE_JSON, export_unet, load_unet

#: diffusers' LCM-LoRA training script (examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py):
#: LoraConfig(r=64, lora_alpha=64, lora_dropout=0.0) on these UNet modules (278 of them in SD1.5).
LCM_LORA_TARGET_MODULES = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)
LCM_LORA_RANK = 64
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the published file's name
LCM_LORA_ALLOW_PATTERNS = ["*.safetensors"]
DEFAULT_LORA_SCALE = 1.0


def lcm_lora_how(ref: str) -> str:
    return (
        f"Download it where the Hugging Face Hub is reachable (e.g. `huggingface-cli download {ref}` into the "
        f"Hugging Face cache), or start the app with --lcm-lora (env VOICE_STUDIO_LCM_LORA) set to a local folder "
        f"holding {LORA_WEIGHT_NAME} (or to the .safetensors file itself)."
    )


def lora_file(path: Path, ref: str = DEFAULT_LCM_LORA) -> Path:
    """The LoRA weights file of ``path``: the file itself, or in a folder the published file name, else
    its only ``.safetensors`` file."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / LORA_WEIGHT_NAME).is_file():
        return path / LORA_WEIGHT_NAME
    found = sorted(path.glob("*.safetensors"))
    if len(found) != 1:
        detail = "has no .safetensors file" if not found else f"has {len(found)} .safetensors files"
        raise unavailable(ref, "LCM-LoRA", f"Its folder {path} {detail} (expected {LORA_WEIGHT_NAME}). "
                                           f"{lcm_lora_how(ref)}")
    return found[0]


def fuse_lora_into_unet(unet, lora: Path, *, scale: float = DEFAULT_LORA_SCALE, adapter_name: str = "lcm",
                        ref: str = "") -> dict:
    """Fuse the LoRA file ``lora`` into ``unet`` at ``scale`` and remove the LoRA layers: ``unet`` is left a
    plain ``UNet2DConditionModel`` whose weights include the LoRA. Same weights as diffusers'
    ``pipe.load_lora_weights``, ``fuse_lora(lora_scale=scale)``, ``unload_lora_weights()``. Raises
    :class:`~pipelines.core.errors.ModelUnavailable` for a file that is not an SD1.5 UNet LoRA or that
    fits only in part. Returns facts for the cache marker."""
    from diffusers import StableDiffusionPipeline
    from peft.tuners.lora import LoraLayer

    lora, ref = Path(lora), ref or str(lora)
    try:
        state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
            str(lora.parent), weight_name=lora.name, return_lora_metadata=True)
    except Exception as error:  # noqa: BLE001 - unreadable file, unknown key format
        raise unavailable(ref, "LCM-LoRA", f"Its weights could not be read from {lora}. {lcm_lora_how(ref)}",
                          error) from error
    unet_keys = [key for key in state if key.startswith("unet.")]
    if not unet_keys:
        raise unavailable(ref, "LCM-LoRA", f"{lora.name} holds no UNet LoRA weights: it is not an SD1.5 LoRA. "
                                           f"{lcm_lora_how(ref)}")
    StableDiffusionPipeline.load_lora_into_unet(state, network_alphas=alphas, unet=unet, adapter_name=adapter_name,
                                                metadata=metadata)
    applied = sum(1 for module in unet.modules() if isinstance(module, LoraLayer) and adapter_name in module.lora_A)
    expected = sum(1 for key in unet_keys if any(down in key for down in ("lora_A", "lora.down", "lora_down")))
    if applied != expected:
        unet.unload_lora()
        raise unavailable(ref, "LCM-LoRA", f"Only {applied} of its {expected} layers fit this UNet: it was made "
                                           f"for another model or saved in a format the loader half reads. "
                                           f"{lcm_lora_how(ref)}")
    unet.fuse_lora(lora_scale=scale, adapter_names=[adapter_name])
    unet.unload_lora()  # each LoRA layer gives way to its base layer, whose weight now holds the LoRA
    leftover = [name for name, _ in unet.named_modules() if "lora" in name.lower()]
    if leftover:
        raise RuntimeError(f"LoRA layers were left in the UNet after fusing: {leftover[:3]}")
    gc.collect()
    return {"lora_layers": applied, "lora_tensors": len(unet_keys), "ignored_tensors": len(state) - len(unet_keys),
            "scale": scale}


def convert_lcm_unet(sd_checkpoint: Path, lora: Path, out: Path, *, sd_ir: Path, scale: float = DEFAULT_LORA_SCALE,
                     sd_ref: str = "", lora_ref: str = "", progress: ProgressFn = no_progress) -> dict:
    """The SD1.5 UNet of the diffusers folder ``sd_checkpoint`` with the LoRA file ``lora`` fused in at
    ``scale``, exported to ``out/unet.xml`` like the plain one (``sd_ir``: that model's IR folder, which
    says the text length). Writes ``pipeline.json``; returns the facts for the cache marker."""
    progress(0.05, "Fast mode: loading the UNet to fuse the LCM-LoRA into")
    unet = load_unet(sd_checkpoint, sd_ref or str(sd_checkpoint))
    progress(0.3, "Fast mode: fusing the LCM-LoRA into the UNet")
    facts = fuse_lora_into_unet(unet, lora, scale=scale, ref=lora_ref)
    progress(0.5, "Fast mode: converting the UNet with the LCM-LoRA fused in")
    seq_len = json.loads((Path(sd_ir) / PIPELINE_JSON).read_text())["text_max_length"]
    residuals = export_unet(unet, out, seq_len)
    del unet
    gc.collect()
    summary = {"kind": "sd15_lcm", "model": sd_ref, "lora": lora_ref, "lora_file": Path(lora).name,
               "scale": scale, "num_down_residuals": residuals, "sd_folder": Path(sd_ir).name}
    (Path(out) / PIPELINE_JSON).write_text(json.dumps(summary, indent=2))
    progress(1.0, "Fast mode's UNet converted")
    return {**summary, **facts}


def lora_scale_tag(scale: Optional[float]) -> str:
    """The scale as it appears in a folder name: ``scale1``, ``scale0.5``."""
    return f"scale{float(scale if scale is not None else DEFAULT_LORA_SCALE):g}"
