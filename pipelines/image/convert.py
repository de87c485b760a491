"""Stable Diffusion 1.5, an SD1.5 ControlNet and the OpenPose body network to OpenVINO IR.

Each ``convert_*`` reads a local checkpoint (a diffusers folder, or the OpenPose ``.pth``) and writes
IR into the folder it is given (:mod:`pipelines.image.sources` finds the checkpoint and gives it the
cache folder to fill):

* SD1.5: ``text_encoder.xml``, ``unet.xml`` (taking the 12 ControlNet down residuals and the mid
  residual as inputs), ``vae_decoder.xml``, plus ``tokenizer/``, ``scheduler/scheduler_config.json``
  and the component configs needed at run time, summarised in ``pipeline.json``.
* ControlNet: ``controlnet.xml`` (sample, timestep, encoder_hidden_states, controlnet_cond,
  conditioning_scale -> 12 down residuals + mid) and ``config.json``.
* OpenPose: ``body_pose.xml`` (the OpenPose body network).
* TAESD (``AutoencoderTiny``, the tiny autoencoder of live previews and Fast mode):
  ``taesd_decoder.xml``, latents -> the picture's 0-255 pixels (NHWC, uint8: diffusers' postprocessing
  folded in, so a preview is one ``Image.fromarray`` away), and its scaling factor in ``pipeline.json``.
* The SD1.5 UNet with a LoRA fused in (Fast mode's LCM-LoRA): :mod:`pipelines.image.lora`, through
  :func:`export_unet` here.

All shapes but the channel counts are dynamic (batch, height, width; the text length too). Weights
are read from safetensors only (``use_safetensors=True``); the OpenPose ``.pth`` is read with
``torch.load(weights_only=True)``. Nothing heavy is imported at module import time.
"""
from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

from pipelines.core.errors import unavailable
from pipelines.core.progress import ProgressFn, no_progress

DEFAULT_SD_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_CONTROLNET = "lllyasviel/control_v11p_sd15_openpose"
DEFAULT_POSE_MODEL = "lllyasviel/Annotators"
DEFAULT_LCM_LORA = "latent-consistency/lcm-lora-sdv1-5"
DEFAULT_TAESD = "madebyollin/taesd"
POSE_FILENAME = "body_pose_model.pth"
PRECISION = "fp16"  # what the converted folders hold (their names end in it)

# IR file names inside the cache folders (the pipeline reads these).
TEXT_ENCODER_IR = "text_encoder.xml"
UNET_IR = "unet.xml"
VAE_DECODER_IR = "vae_decoder.xml"
CONTROLNET_IR = "controlnet.xml"
BODY_POSE_IR = "body_pose.xml"
TAESD_DECODER_IR = "taesd_decoder.xml"
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
TAESD_ALLOW_PATTERNS = ["config.json", "diffusion_pytorch_model.safetensors"]
SD_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def sd_how(ref: str) -> str:
    return (
        f"Download it where the Hugging Face Hub is reachable (e.g. `huggingface-cli download {ref}` into the "
        "Hugging Face cache), or give the path of a local diffusers folder with "
        "unet/, vae/, text_encoder/, tokenizer/, scheduler/ with .safetensors weights (the Image tab's "
        "'Stable Diffusion 1.5 model' box, the sd_model parameter)."
    )


def controlnet_how(ref: str) -> str:
    return (
        f"Download it where the Hugging Face Hub is reachable (e.g. `huggingface-cli download {ref}`), or give the "
        "path of a local ControlNet folder holding config.json and diffusion_pytorch_model.safetensors (the "
        "Image tab's 'ControlNet OpenPose model' box, the controlnet_model parameter)."
    )


def pose_how(ref: str) -> str:
    return (
        f"Download '{POSE_FILENAME}' from the Hugging Face repository '{DEFAULT_POSE_MODEL}' where the Hub is "
        f"reachable (e.g. `huggingface-cli download {DEFAULT_POSE_MODEL} {POSE_FILENAME}`), or pass the path of the "
        f"local '{POSE_FILENAME}' file (or of a folder containing it)."
    )


def taesd_how(ref: str) -> str:
    return (
        f"Download it where the Hugging Face Hub is reachable (e.g. `huggingface-cli download {ref}` into the "
        "Hugging Face cache), or start the app with --taesd (env VOICE_STUDIO_TAESD) set to a local folder holding "
        "the AutoencoderTiny's config.json and diffusion_pytorch_model.safetensors."
    )


def check_sd_folder(folder: Path, ref: str) -> None:
    missing = [name for name in SD_SUBFOLDERS if not (folder / name).is_dir()]
    if missing:
        raise unavailable(ref, "Stable Diffusion model", f"Its folder {folder} lacks {', '.join(missing)}/. {sd_how(ref)}")


def load_checkpoint(loader, ref: str, what: str, how: str, *args, **kwargs):
    try:
        return loader(*args, **kwargs)
    except (OSError, ValueError) as error:  # missing files, no .safetensors weights, bad config
        raise unavailable(ref, what, how, error) from error


# Not a multiple of 8: traces the UNet's "forward the upsample size" path, whose output sizes follow
# the skip connections, so any latent size (image multiple of 8) works with the dynamic IR.
EXAMPLE_LATENT_SIZE = (9, 11)


def convert_sd15(folder: Path, out: Path, ref: str = "", progress: ProgressFn = no_progress) -> dict:
    """Convert a local SD1.5 diffusers folder into ``out`` (text encoder, UNet+residuals, VAE decoder)."""
    folder, out = Path(folder), Path(out)
    ref = ref or str(folder)
    check_sd_folder(folder, ref)
    progress(0.02, "Converting the text encoder")
    text_cfg = _convert_text_encoder(folder, out, ref)
    progress(0.15, "Converting the UNet")
    unet_cfg, num_down_residuals = _convert_unet(folder, out, ref, text_cfg["max_position_embeddings"])
    progress(0.75, "Converting the VAE decoder")
    vae_cfg = _convert_vae_decoder(folder, out, ref)
    progress(0.95, "Copying tokenizer and scheduler")
    shutil.copytree(folder / "tokenizer", out / "tokenizer")
    shutil.copytree(folder / "scheduler", out / "scheduler")
    for name, cfg in (("unet", unet_cfg), ("vae", vae_cfg), ("text_encoder", text_cfg)):
        (out / f"{name}_config.json").write_text(json.dumps(cfg, indent=2, default=str))
    summary = {
        "kind": "sd15",
        "model": ref,
        "unet_in_channels": unet_cfg["in_channels"],
        "cross_attention_dim": unet_cfg["cross_attention_dim"],
        "num_down_residuals": num_down_residuals,
        "vae_scale_factor": 2 ** (len(vae_cfg["block_out_channels"]) - 1),
        "vae_scaling_factor": float(vae_cfg.get("scaling_factor", 0.18215)),
        "text_max_length": text_cfg["max_position_embeddings"],
    }
    (out / PIPELINE_JSON).write_text(json.dumps(summary, indent=2))
    progress(1.0, "Stable Diffusion converted")
    return summary


def _convert_text_encoder(folder: Path, out: Path, ref: str) -> dict:
    """CLIP text encoder -> ``text_encoder.xml``; its config."""
    import torch
    from transformers import CLIPTextModel

    from pipelines.image import tracing

    text_encoder = load_checkpoint(
        CLIPTextModel.from_pretrained, ref, "Stable Diffusion text encoder", sd_how(ref),
        folder / "text_encoder", use_safetensors=True, attn_implementation="eager", dtype=torch.float32,
    ).eval()
    seq_len = text_encoder.config.max_position_embeddings
    model = tracing.to_ir(tracing.TextEncoderWrapper(text_encoder.text_model).eval(),
                          (torch.ones(1, seq_len, dtype=torch.int64),), ["input_ids"], ["last_hidden_state"], [[0, 1]])
    tracing.save_ir(model, out / TEXT_ENCODER_IR)
    config = text_encoder.config.to_dict()
    del model, text_encoder
    gc.collect()
    return config


def _convert_unet(folder: Path, out: Path, ref: str, seq_len: int) -> tuple[dict, int]:
    """UNet taking the ControlNet residuals as inputs -> ``unet.xml``; its config and residual count."""
    unet = load_unet(folder, ref)
    config = dict(unet.config)
    residuals = export_unet(unet, out, seq_len)
    del unet
    gc.collect()
    return config, residuals


def load_unet(folder: Path, ref: str):
    """The float32 UNet of the SD1.5 diffusers folder ``folder`` (safetensors only)."""
    import torch
    from diffusers import UNet2DConditionModel

    return load_checkpoint(UNet2DConditionModel.from_pretrained, ref, "Stable Diffusion UNet", sd_how(ref),
                           Path(folder) / "unet", use_safetensors=True, torch_dtype=torch.float32).eval()


def export_unet(unet, out: Path, seq_len: int) -> int:
    """``unet`` (a ``UNet2DConditionModel``) taking the ControlNet residuals as inputs -> ``out/unet.xml``,
    dynamic batch and size; returns how many down residuals it takes."""
    import torch

    from pipelines.image import tracing

    h, w = EXAMPLE_LATENT_SIZE
    down_shapes, mid_shape = tracing.down_residual_shapes(unet, 2, h, w)
    example = (
        torch.randn(2, unet.config.in_channels, h, w),
        torch.tensor(999.0),
        torch.randn(2, seq_len, unet.config.cross_attention_dim),
        *[torch.randn(*s) for s in down_shapes],
        torch.randn(*mid_shape),
    )
    names = (
        ["sample", "timestep", "encoder_hidden_states"]
        + [f"down_block_additional_residual_{i}" for i in range(len(down_shapes))]
        + ["mid_block_additional_residual"]
    )
    dynamic = [[0, 2, 3], [], [0, 1]] + [[0, 2, 3]] * (len(down_shapes) + 1)
    model = tracing.to_ir(tracing.UNetWithResiduals(unet).eval(), example, names, ["out_sample"], dynamic)
    tracing.save_ir(model, Path(out) / UNET_IR)
    del model, example
    gc.collect()
    return len(down_shapes)


def _convert_vae_decoder(folder: Path, out: Path, ref: str) -> dict:
    """VAE decoder -> ``vae_decoder.xml``; the VAE's config."""
    import torch
    from diffusers import AutoencoderKL

    from pipelines.image import tracing

    vae = load_checkpoint(AutoencoderKL.from_pretrained, ref, "Stable Diffusion VAE", sd_how(ref),
                          folder / "vae", use_safetensors=True, torch_dtype=torch.float32).eval()
    h, w = EXAMPLE_LATENT_SIZE
    model = tracing.to_ir(tracing.VaeDecoderWrapper(vae).eval(), (torch.randn(1, vae.config.latent_channels, h, w),),
                          ["latent_sample"], ["sample"], [[0, 2, 3]])
    tracing.save_ir(model, out / VAE_DECODER_IR)
    config = dict(vae.config)
    del model, vae
    gc.collect()
    return config


def convert_controlnet(folder: Path, out: Path, ref: str = "", progress: ProgressFn = no_progress) -> dict:
    """Convert a local SD1.5 ControlNet folder into ``out/controlnet.xml`` (+ ``config.json``)."""
    import torch
    from diffusers import ControlNetModel

    from pipelines.image import tracing

    folder, out = Path(folder), Path(out)
    ref = ref or str(folder)
    progress(0.05, "Converting the ControlNet")
    controlnet = load_checkpoint(ControlNetModel.from_pretrained, ref, "ControlNet", controlnet_how(ref),
                                 folder, use_safetensors=True, torch_dtype=torch.float32).eval()
    cfg = dict(controlnet.config)
    h, w = EXAMPLE_LATENT_SIZE
    embed_factor = 2 ** (len(cfg["conditioning_embedding_out_channels"]) - 1)
    example = (
        torch.randn(2, cfg["in_channels"], h, w),
        torch.tensor(999.0),
        torch.randn(2, 77, cfg["cross_attention_dim"]),
        torch.rand(2, cfg.get("conditioning_channels", 3), h * embed_factor, w * embed_factor),
        torch.tensor(1.0),
    )
    n_down = len(controlnet.controlnet_down_blocks)
    model = tracing.to_ir(
        tracing.ControlNetWrapper(controlnet).eval(),
        example,
        ["sample", "timestep", "encoder_hidden_states", "controlnet_cond", "conditioning_scale"],
        [f"down_block_res_sample_{i}" for i in range(n_down)] + ["mid_block_res_sample"],
        [[0, 2, 3], [], [0, 1], [0, 2, 3], []],
    )
    tracing.save_ir(model, out / CONTROLNET_IR)
    del model, controlnet
    gc.collect()
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    summary = {"kind": "controlnet", "model": ref, "num_down_residuals": n_down, "conditioning_factor": embed_factor}
    (out / PIPELINE_JSON).write_text(json.dumps(summary, indent=2))
    progress(1.0, "ControlNet converted")
    return summary


def convert_taesd(folder: Path, out: Path, ref: str = "", progress: ProgressFn = no_progress) -> dict:
    """Convert a local TAESD (``AutoencoderTiny``) folder's decoder into ``out/taesd_decoder.xml``:
    latents in (dynamic batch and size), the picture's 0-255 pixels out (NHWC, uint8)."""
    import torch
    from diffusers import AutoencoderTiny

    from pipelines.image import tracing

    folder, out = Path(folder), Path(out)
    ref = ref or str(folder)
    progress(0.05, "Converting the TAESD decoder")
    vae = load_checkpoint(AutoencoderTiny.from_pretrained, ref, "TAESD decoder", taesd_how(ref), folder,
                          use_safetensors=True, torch_dtype=torch.float32).eval()
    h, w = EXAMPLE_LATENT_SIZE
    model = tracing.to_ir(tracing.TaesdDecoderWrapper(vae).eval(), (torch.randn(1, vae.config.latent_channels, h, w),),
                          ["latent_sample"], ["image"], [[0, 2, 3]])
    tracing.save_ir(model, out / TAESD_DECODER_IR)
    summary = {"kind": "taesd", "model": ref, "scaling_factor": float(vae.config.scaling_factor),
               "latent_channels": int(vae.config.latent_channels), "output": "uint8 NHWC (0-255 pixels)"}
    del model, vae
    gc.collect()
    (out / PIPELINE_JSON).write_text(json.dumps(summary, indent=2))
    progress(1.0, "TAESD converted")
    return summary


def convert_body_pose(pth: Path, out: Path, ref: str = "", progress: ProgressFn = no_progress) -> dict:
    """Convert controlnet-aux's OpenPose ``bodypose_model`` with weights from ``pth``."""
    import torch
    from controlnet_aux.open_pose import util as pose_util
    from controlnet_aux.open_pose.model import bodypose_model

    from pipelines.image import tracing

    ref = ref or str(pth)
    progress(0.05, "Converting the OpenPose body network")
    model = bodypose_model()
    try:
        state = torch.load(str(pth), map_location="cpu", weights_only=True)
        model.load_state_dict(pose_util.transfer(model, state))
    except Exception as error:
        raise unavailable(ref, "OpenPose body model", f"Its weights could not be read from {pth}. {pose_how(ref)}",
                          error) from error
    model.eval()
    ov_model = tracing.to_ir(model, (torch.rand(1, 3, 184, 200) - 0.5,), ["image"], ["paf", "heatmap"], [[0, 2, 3]])
    tracing.save_ir(ov_model, Path(out) / BODY_POSE_IR)
    del ov_model, model, state
    gc.collect()
    progress(1.0, "OpenPose converted")
    return {"kind": "openpose-body", "model": ref}
