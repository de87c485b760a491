"""PyTorch modules traced by ``openvino.convert_model``, and the tracing itself.

Importing this module imports torch and openvino: the conversion code imports it only when it
converts, so that starting the app never pays for torch.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import openvino as ov
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


class TaesdDecoderWrapper(torch.nn.Module):
    """TAESD's decoder (``AutoencoderTiny.decode``: latents -> [-1, 1]) followed by what diffusers'
    ``VaeImageProcessor.postprocess`` + PIL do to it: ``(x / 2 + 0.5).clamp(0, 1) * 255``, rounded,
    NHWC uint8. A preview is then one ``Image.fromarray`` away (0.4 ms instead of 7-66 ms)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        image = self.vae.decode(latent_sample, return_dict=False)[0]
        image = (image / 2 + 0.5).clamp(0, 1) * 255.0
        return torch.round(image).permute(0, 2, 3, 1).to(torch.uint8)


def to_ir(module, example: tuple, input_names: list[str], output_names: list[str], dynamic: list[list[int]]):
    """Trace ``module`` with ``example`` inputs; name inputs/outputs; make marked dims dynamic.

    ``dynamic[i]`` lists the dimensions of input ``i`` that are dynamic (-1); the others keep the
    example's size (channel counts, hidden sizes).
    """
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


def save_ir(model, path: Path) -> None:
    ov.save_model(model, str(path), compress_to_fp16=True)


def down_residual_shapes(unet, batch: int, height: int, width: int) -> tuple[list[tuple], tuple]:
    """Shapes of the ControlNet residuals the UNet expects, found by running its down path once."""
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
