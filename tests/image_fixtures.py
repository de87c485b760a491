"""Tiny random-weight Stable Diffusion 1.5 + ControlNet + OpenPose models, built offline.

The Hugging Face Hub is out of reach, so the image tests build miniature models with the same
architecture *shape* as the real ones (4 UNet levels -> 12 ControlNet down residuals + 1 mid, a
4-level VAE -> latent = image / 8, a CLIP text encoder on the real 49,408-token CLIP vocabulary) and
save them as ordinary diffusers folders (safetensors), which then go through the same conversion
code as real checkpoints.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

# Real SD1.5 scheduler/scheduler_config.json (PNDM), the config every SD1.5 repository ships.
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


#: Attention heads of the tiny UNet and ControlNet (see :func:`tiny_unet_config`): one, so each head is
#: as wide as its block (8 and 16 channels). OpenVINO's fused attention kernel is slow on narrow heads:
#: with 2 heads (4 and 8 wide) attention took about half of a UNet call and a denoising step at
#: 256x256 was 1.32-1.35x slower; the image test files ran 236-247 s instead of 208-216 s (issue #23,
#: benchmarks/tiny_attention.py and benchmarks/README.md).
ATTENTION_HEADS = 1


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode table (same as open_clip's tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_clip_tokenizer(folder: Path) -> Path:
    """Write a CLIPTokenizer folder built from the real CLIP BPE shipped inside open-clip-torch.

    Ids match openai/clip-vit-large-patch14 (the SD1.5 tokenizer): <|startoftext|> = 49406,
    <|endoftext|> = 49407, vocabulary size 49,408.
    """
    import open_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    encoder = {token: i for i, token in enumerate(vocab)}
    (folder / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special})
    )
    return folder


def _randomize_zeros(module, generator, std: float = 0.05) -> None:
    """Give every all-zero parameter (zero convs, norm biases) seeded random values."""
    import torch

    with torch.no_grad():
        for param in module.parameters():
            if torch.count_nonzero(param) == 0:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def build_tiny_sd15(folder: Path, seed: int = 0, heads: int = ATTENTION_HEADS) -> Path:
    """A miniature SD1.5 diffusers folder: unet/, vae/, text_encoder/, tokenizer/, scheduler/."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(heads))
    _randomize_zeros(unet, generator)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[8, 8, 8, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        sample_size=64,
    )
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=3,
            max_position_embeddings=77,
            vocab_size=49408,
            hidden_act="quick_gelu",
        )
    )
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    write_clip_tokenizer(folder / "tokenizer")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER_CONFIG, indent=2))
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": "0.39.0",
                "scheduler": ["diffusers", "PNDMScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "safety_checker": [None, None],
                "feature_extractor": [None, None],
            },
            indent=2,
        )
    )
    return folder


def tiny_unet_config(heads: int = ATTENTION_HEADS) -> dict:
    """SD1.5's UNet layout (3 cross-attention levels + 1 plain, 2 layers each) with tiny widths.

    ``heads``: attention heads per transformer block (diffusers' ``attention_head_dim`` is really the
    number of heads), so each head is channels / heads wide."""
    return dict(
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=heads,
        norm_num_groups=4,
    )


def build_tiny_controlnet(folder: Path, seed: int = 1, heads: int = ATTENTION_HEADS) -> Path:
    """A miniature OpenPose-style ControlNet matching :func:`tiny_unet_config`.

    ``ControlNetModel`` starts its zero convolutions at exactly zero (as ``from_unet`` does), which
    would make the ControlNet a no-op; here every all-zero parameter gets seeded random values so
    the control image really steers the result.
    """
    import torch
    from diffusers import ControlNetModel

    folder = Path(folder)
    torch.manual_seed(seed)
    cfg = tiny_unet_config(heads)
    controlnet = ControlNetModel(
        block_out_channels=cfg["block_out_channels"],
        layers_per_block=cfg["layers_per_block"],
        in_channels=4,
        down_block_types=cfg["down_block_types"],
        cross_attention_dim=cfg["cross_attention_dim"],
        attention_head_dim=cfg["attention_head_dim"],
        norm_num_groups=cfg["norm_num_groups"],
        conditioning_embedding_out_channels=(4, 8, 8, 16),
    )
    _randomize_zeros(controlnet, torch.Generator().manual_seed(seed), std=0.3)
    controlnet.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_body_pose(path: Path, seed: int = 2) -> Path:
    """A random-weight OpenPose body network saved like ``body_pose_model.pth`` (lllyasviel/Annotators).

    The real file's keys lack the block prefix (``conv1_1.weight``, not ``model0.conv1_1.weight``);
    controlnet-aux's ``util.transfer`` adds it back on load. Same (real-size) architecture.
    """
    import torch
    from controlnet_aux.open_pose.model import bodypose_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = bodypose_model()
    state = {".".join(k.split(".")[1:]): v for k, v in model.state_dict().items()}
    torch.save(state, path)
    return path


# One standing person on a 256 x 256 canvas, OpenPose/COCO body order: nose, neck, right shoulder,
# elbow, wrist, left shoulder, elbow, wrist, right hip, knee, ankle, left hip, knee, ankle, right
# eye, left eye, right ear, left ear. Pixel coordinates (x, y).
PERSON_KEYPOINTS = [
    (128, 40), (128, 70), (100, 72), (85, 110), (80, 145), (156, 72), (171, 110), (176, 145),
    (110, 140), (108, 190), (106, 235), (146, 140), (148, 190), (150, 235),
    (122, 35), (134, 35), (114, 38), (142, 38),
]


def known_detection(scale: float = 1.0):
    """``(candidate, subset)`` as controlnet-aux's ``Body.__call__`` returns them, for one person."""
    import numpy as np

    candidate = np.array([[x * scale, y * scale, 0.9, i] for i, (x, y) in enumerate(PERSON_KEYPOINTS)], dtype=float)
    subset = np.array([list(range(18)) + [0.9 * 18, 18]], dtype=float)
    return candidate, subset


# --------------------------------------------------------------------------------------------
# Fast mode: a random LCM-LoRA and a tiny TAESD
# --------------------------------------------------------------------------------------------

# A TAESD (diffusers AutoencoderTiny) with 8 channels and one block per level: the real one's layout
# (4 levels, latent / 8) at a fraction of its 1.2 M decoder parameters.
TINY_TAESD = dict(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                  num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1))


def build_tiny_taesd(folder: Path, seed: int = 3, **config) -> Path:
    """A random-weight ``AutoencoderTiny`` saved like ``madebyollin/taesd`` (config.json + safetensors);
    ``config`` overrides the tiny layout (``{}`` with ``TINY_TAESD`` cleared gives the real size)."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    AutoencoderTiny(**{**TINY_TAESD, **config}).save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def build_random_lora(unet_folder: Path, out_dir: Path, *, rank: int = 4, alpha: int = 8, seed: int = 0,
                      std: float = 0.3, target_modules=None) -> Path:
    """A random LoRA with the LCM-LoRA's structure (peft ``LoraConfig`` on the UNet's 14 module kinds of
    diffusers' LCM training script) for the UNet of ``unet_folder``, saved in the diffusers LoRA format
    (``pytorch_lora_weights.safetensors``, peft keys + adapter metadata with the alpha) as diffusers'
    ``save_lora_weights`` writes it. Only the architecture matters: the UNet is built on the ``meta``
    device. ``lora_B`` gets random values too (peft starts it at zero: fusing would change nothing).

    The peft state dict is saved as it is: renamed by ``convert_state_dict_to_diffusers`` first, its
    attention keys are silently dropped by diffusers 0.39's loader (its own pipeline's too)."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from pipelines.image.lora import LCM_LORA_TARGET_MODULES

    targets = sorted(target_modules or LCM_LORA_TARGET_MODULES)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((Path(unet_folder) / "config.json").read_text()))
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
    unet.add_adapter(config)
    generator = torch.Generator().manual_seed(seed)
    state = {key: torch.randn(value.shape, generator=generator) * std
             for key, value in get_peft_model_state_dict(unet).items()}
    kept = ("r", "lora_alpha", "target_modules", "lora_dropout", "use_dora", "rank_pattern", "alpha_pattern")
    metadata = {key: value for key, value in config.to_dict().items() if key in kept}
    metadata["target_modules"] = targets
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=state, safe_serialization=True,
                                              unet_lora_adapter_metadata=metadata)
    return Path(out_dir)
