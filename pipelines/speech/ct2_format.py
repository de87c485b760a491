"""Read CTranslate2 (faster-whisper) Whisper checkpoints: the ``model.bin`` format and its tensors,
mapped to ``WhisperForConditionalGeneration`` weights (:mod:`pipelines.speech.ct2_import` writes
the Hugging Face folder around them).

CTranslate2 ``model.bin`` layout (little endian, see ``ctranslate2/specs/model_spec.py``
``ModelSpec._serialize`` and ``src/models/model.cc`` ``Model::load``)::

    uint32 binary_version                      # 6 today; 1..6 are understood here
    string spec_name, uint32 spec_revision     # only when binary_version >= 2
    uint32 variable_count
    variable_count x:
        string name
        uint8 rank, uint32 x rank shape
        uint8 dtype_id, uint32 byte_count      # binary_version >= 4
        (uint8 item_size, uint32 item_count)   # binary_version <= 3
        byte_count raw bytes
    uint32 alias_count, alias_count x (string alias, string target)   # binary_version >= 3

where ``string`` is a uint16 length (including the trailing NUL) followed by that many bytes.
"""
from __future__ import annotations

import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional, Union

import numpy as np

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

# dtype ids of CTranslate2's DataType enum (``_dtype_to_type_id`` in model_spec.py).
_CT2_DTYPES: dict[int, str] = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
# Before binary version 4 only the item size was stored (Model::load's get_dtype_from_item_size).
_LEGACY_ITEM_DTYPES: dict[int, str] = {4: "float32", 2: "int16", 1: "int8"}
MAX_BINARY_VERSION = 6
WHISPER_SPEC = "WhisperSpec"
_HEAD_DIM = 64  # every released Whisper size uses 64-dimensional attention heads
_MMAP_MIN_BYTES = 1 << 20


class CT2FormatError(ValueError):
    """A file is not a (complete, supported) CTranslate2 Whisper checkpoint."""


# --------------------------------------------------------------------------------------------
# Reading model.bin
# --------------------------------------------------------------------------------------------


def _model_bin(path: PathLike) -> Path:
    path = Path(path)
    return path / "model.bin" if path.is_dir() else path


def _read_exact(handle: BinaryIO, size: int, what: str) -> bytes:
    position = handle.tell()
    data = handle.read(size)
    if len(data) != size:
        raise CT2FormatError(f"{handle.name}: truncated while reading {what} ({size} bytes at offset {position})")
    return data


def _read_uint(handle: BinaryIO, fmt: str, what: str) -> int:
    return struct.unpack("<" + fmt, _read_exact(handle, struct.calcsize(fmt), what))[0]


def _read_string(handle: BinaryIO, what: str) -> str:
    length = _read_uint(handle, "H", what)
    return _read_exact(handle, length, what).split(b"\0", 1)[0].decode("utf-8")


def _read_header(handle: BinaryIO) -> dict:
    version = _read_uint(handle, "I", "binary version")
    if not 1 <= version <= MAX_BINARY_VERSION:
        raise CT2FormatError(
            f"{handle.name}: unsupported CTranslate2 binary version {version} (1..{MAX_BINARY_VERSION} understood)"
        )
    spec, revision = "", 1
    if version >= 2:
        spec = _read_string(handle, "spec name")
        revision = _read_uint(handle, "I", "spec revision")
    return {"binary_version": version, "spec": spec, "revision": revision}


def read_ct2_header(path: PathLike) -> dict:
    """Read only the header of a CTranslate2 ``model.bin`` (a file, or a folder holding one).

    Returns ``{"binary_version": int, "spec": str, "revision": int}``.
    """
    with open(_model_bin(path), "rb") as handle:
        return _read_header(handle)


def _read_array(
    handle: BinaryIO, file_size: int, shape: tuple[int, ...], dtype: str, num_bytes: int, name: str
) -> np.ndarray:
    raw = (np.dtype("uint16") if dtype == "bfloat16" else np.dtype(dtype)).newbyteorder("<")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count * raw.itemsize != num_bytes:
        raise CT2FormatError(f"{name}: {num_bytes} bytes do not hold shape {shape} of {dtype}")
    offset = handle.tell()
    if offset + num_bytes > file_size:
        raise CT2FormatError(f"{handle.name}: truncated in variable {name} ({num_bytes} bytes at offset {offset})")
    if num_bytes >= _MMAP_MIN_BYTES and dtype != "bfloat16":
        # Large tensors stay on disk until used: a big checkpoint is not held twice in memory.
        handle.seek(num_bytes, 1)
        return np.memmap(handle.name, dtype=raw, mode="r", offset=offset, shape=shape)
    data = np.frombuffer(_read_exact(handle, num_bytes, f"variable {name}"), dtype=raw)
    if dtype == "bfloat16":  # numpy has no bfloat16: widen to float32 (bf16 is fp32's upper half)
        data = (data.astype(np.uint32) << 16).view(np.float32)
    return data.reshape(shape)


def read_ct2_model(path: PathLike) -> tuple[dict[str, np.ndarray], dict[str, str], dict]:
    """Parse a CTranslate2 ``model.bin`` (a file, or a folder holding one).

    Returns ``(variables, aliases, header)``: tensors by CTranslate2 name (scalars as 0-d arrays,
    bfloat16 widened to float32, everything else in its stored dtype, read-only), alias name ->
    target variable name, and ``{"binary_version", "spec", "revision", "num_variables",
    "num_aliases"}``. Large tensors are read-only memory maps of the file. Raises
    :class:`CT2FormatError` on a truncated or unsupported file.
    """
    model_path = _model_bin(path)
    variables: dict[str, np.ndarray] = {}
    aliases: dict[str, str] = {}
    file_size = model_path.stat().st_size
    with open(model_path, "rb") as handle:
        header = _read_header(handle)
        version = header["binary_version"]
        count = _read_uint(handle, "I", "variable count")
        for _ in range(count):
            name = _read_string(handle, "variable name")
            rank = _read_uint(handle, "B", f"rank of {name}")
            shape = tuple(_read_uint(handle, "I", f"shape of {name}") for _ in range(rank))
            if version >= 4:
                type_id = _read_uint(handle, "B", f"dtype of {name}")
                if type_id not in _CT2_DTYPES:
                    raise CT2FormatError(f"{model_path}: variable {name} has unknown dtype id {type_id}")
                dtype = _CT2_DTYPES[type_id]
                num_bytes = _read_uint(handle, "I", f"size of {name}")
            else:
                item_size = _read_uint(handle, "B", f"item size of {name}")
                if item_size not in _LEGACY_ITEM_DTYPES:
                    raise CT2FormatError(f"{model_path}: variable {name} has unknown item size {item_size}")
                dtype = _LEGACY_ITEM_DTYPES[item_size]
                num_bytes = _read_uint(handle, "I", f"size of {name}") * item_size
            variables[name] = _read_array(handle, file_size, shape, dtype, num_bytes, name)
        if version >= 3:
            for _ in range(_read_uint(handle, "I", "alias count")):
                alias = _read_string(handle, "alias name")
                aliases[alias] = _read_string(handle, "alias target")
        trailing = len(handle.read(1))
    if trailing:
        log.warning("%s: unexpected bytes after the alias table", model_path)
    header.update(num_variables=len(variables), num_aliases=len(aliases))
    return variables, aliases, header


# --------------------------------------------------------------------------------------------
# Checkpoint detection
# --------------------------------------------------------------------------------------------


def is_ct2_checkpoint(folder: PathLike) -> bool:
    """True if ``folder`` holds a convertible CTranslate2 Whisper checkpoint.

    That is: ``model.bin`` whose header names ``WhisperSpec``, plus ``config.json`` and
    ``tokenizer.json`` (conversion needs the tokenizer for special-token ids).
    """
    folder = Path(folder)
    if not all((folder / name).is_file() for name in ("model.bin", "config.json", "tokenizer.json")):
        return False
    try:
        return read_ct2_header(folder)["spec"] == WHISPER_SPEC
    except (OSError, CT2FormatError, UnicodeDecodeError):
        return False


# --------------------------------------------------------------------------------------------
# Weights: CTranslate2 names -> Hugging Face names
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WhisperDims:
    """Architecture sizes read off the CTranslate2 tensors."""

    d_model: int
    num_mel_bins: int
    vocab_size: int
    encoder_layers: int
    decoder_layers: int
    encoder_attention_heads: int
    decoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    max_source_positions: int
    max_target_positions: int


class _WeightSource:
    """Looks tensors up by CTranslate2 name (following aliases), dequantizes, records use."""

    def __init__(self, variables: dict[str, np.ndarray], aliases: dict[str, str]):
        self.variables = variables
        self.aliases = aliases
        self.used: set[str] = set()

    def resolve(self, name: str) -> Optional[str]:
        seen = set()
        while name not in self.variables and name in self.aliases and name not in seen:
            seen.add(name)
            name = self.aliases[name]
        return name if name in self.variables else None

    def has(self, name: str) -> bool:
        return self.resolve(name) is not None

    def get(self, name: str) -> np.ndarray:
        """The float32 value of ``name``; int8/int16 weights are divided by their ``_scale``."""
        real = self.resolve(name)
        if real is None:
            raise CT2FormatError(f"missing variable {name!r}")
        self.used.add(real)
        value = self.variables[real]
        if self.has(name + "_zero"):
            raise CT2FormatError(f"{name}: AWQ-quantized checkpoints (with _zero points) are not supported")
        if np.issubdtype(value.dtype, np.integer):
            scale_name = self.resolve(name + "_scale") or self.resolve(real + "_scale")
            if scale_name is None:
                raise CT2FormatError(f"{name}: integer weights without a {name}_scale variable")
            self.used.add(scale_name)
            scale = self.variables[scale_name].astype(np.float32)
            if scale.ndim == 1:  # per output row (int8)
                scale = scale.reshape((-1,) + (1,) * (value.ndim - 1))
            return np.asarray(value, dtype=np.float32) / scale
        return np.array(value, dtype=np.float32)  # a plain in-memory copy, also of memory maps

    def scalar(self, name: str) -> Optional[int]:
        real = self.resolve(name)
        if real is None:
            return None
        self.used.add(real)
        return int(self.variables[real])

    def unused_tensors(self) -> list[str]:
        return sorted(name for name, value in self.variables.items() if value.ndim > 0 and name not in self.used)


def _layer_count(variables: dict[str, np.ndarray], prefix: str) -> int:
    pattern = re.compile(rf"^{prefix}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in variables if (m := pattern.match(name))}
    if indices != set(range(len(indices))):
        raise CT2FormatError(f"{prefix} layers are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def _linear(src: _WeightSource, ct2: str, hf: str, out: dict[str, np.ndarray]) -> None:
    out[f"{hf}.weight"] = src.get(f"{ct2}/weight")
    if src.has(f"{ct2}/bias"):
        out[f"{hf}.bias"] = src.get(f"{ct2}/bias")


def _layer_norm(src: _WeightSource, ct2: str, hf: str, out: dict[str, np.ndarray]) -> None:
    out[f"{hf}.weight"] = src.get(f"{ct2}/gamma")
    out[f"{hf}.bias"] = src.get(f"{ct2}/beta")


def _drop_k_bias(bias: np.ndarray, where: str) -> None:
    peak = float(np.abs(bias).max()) if bias.size else 0.0
    if peak > 1e-6:
        log.warning("%s: Whisper's k_proj has no bias but the fused bias holds values up to %.3g; dropped", where, peak)


def _split_linear(
    src: _WeightSource, ct2: str, hf_names: list[str], out: dict[str, np.ndarray]
) -> None:
    """Split a fused linear layer into equal parts named ``hf_names``; k_proj loses its bias."""
    weight = src.get(f"{ct2}/weight")
    bias = src.get(f"{ct2}/bias") if src.has(f"{ct2}/bias") else None
    parts = len(hf_names)
    if weight.shape[0] % parts:
        raise CT2FormatError(f"{ct2}/weight rows {weight.shape[0]} do not split in {parts}")
    for index, (w, hf) in enumerate(zip(np.split(weight, parts), hf_names)):
        out[f"{hf}.weight"] = w
        if bias is None:
            continue
        b = np.split(bias, parts)[index]
        if hf.endswith("k_proj"):
            _drop_k_bias(b, ct2)
        else:
            out[f"{hf}.bias"] = b


def _ffn(src: _WeightSource, ct2: str, hf: str, out: dict[str, np.ndarray]) -> None:
    _layer_norm(src, f"{ct2}/layer_norm", f"{hf}.final_layer_norm", out)
    _linear(src, f"{ct2}/linear_0", f"{hf}.fc1", out)
    _linear(src, f"{ct2}/linear_1", f"{hf}.fc2", out)


def _self_attention(src: _WeightSource, ct2: str, hf: str, out: dict[str, np.ndarray]) -> None:
    _layer_norm(src, f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm", out)
    _split_linear(src, f"{ct2}/self_attention/linear_0", [f"{hf}.self_attn.{p}_proj" for p in "qkv"], out)
    _linear(src, f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj", out)


def _cross_attention(src: _WeightSource, ct2: str, hf: str, out: dict[str, np.ndarray]) -> None:
    _layer_norm(src, f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm", out)
    _linear(src, f"{ct2}/attention/linear_0", f"{hf}.encoder_attn.q_proj", out)
    _split_linear(src, f"{ct2}/attention/linear_1", [f"{hf}.encoder_attn.{p}_proj" for p in "kv"], out)
    _linear(src, f"{ct2}/attention/linear_2", f"{hf}.encoder_attn.out_proj", out)


def _stack(src: "_WeightSource", variables: dict[str, np.ndarray], side: str, out: dict[str, np.ndarray]) -> int:
    """The encoder's or decoder's positions, layers (the decoder's with cross-attention) and final
    norm; the number of layers."""
    out[f"model.{side}.embed_positions.weight"] = src.get(f"{side}/position_encodings/encodings")
    _layer_norm(src, f"{side}/layer_norm", f"model.{side}.layer_norm", out)
    layers = _layer_count(variables, side)
    for i in range(layers):
        _self_attention(src, f"{side}/layer_{i}", f"model.{side}.layers.{i}", out)
        if side == "decoder":
            _cross_attention(src, f"{side}/layer_{i}", f"model.{side}.layers.{i}", out)
        _ffn(src, f"{side}/layer_{i}/ffn", f"model.{side}.layers.{i}", out)
    return layers


def ct2_to_hf_state_dict(
    variables: dict[str, np.ndarray], aliases: dict[str, str]
) -> tuple[dict[str, np.ndarray], WhisperDims, bool]:
    """Map WhisperSpec variables to ``WhisperForConditionalGeneration`` float32 weights.

    Returns ``(state_dict, dims, tied)`` where ``tied`` says the output projection is the token
    embedding (then ``proj_out.weight`` is left out, as Hugging Face ties it on load).
    """
    src = _WeightSource(variables, aliases)
    out: dict[str, np.ndarray] = {}

    for conv in ("conv1", "conv2"):
        _linear(src, f"encoder/{conv}", f"model.encoder.{conv}", out)
    out["model.decoder.embed_tokens.weight"] = src.get("decoder/embeddings/weight")
    encoder_layers = _stack(src, variables, "encoder", out)
    decoder_layers = _stack(src, variables, "decoder", out)

    tied = True
    if src.has("decoder/projection/weight"):
        embed_name = src.resolve("decoder/embeddings/weight")
        if src.resolve("decoder/projection/weight") != embed_name:
            projection = src.get("decoder/projection/weight")
            tied = np.array_equal(projection, out["model.decoder.embed_tokens.weight"])
            if not tied:
                out["proj_out.weight"] = projection
    if src.has("decoder/projection/bias"):
        bias = src.get("decoder/projection/bias")
        if np.abs(bias).max() > 0:
            log.warning("decoder/projection/bias is non-zero but Whisper's proj_out has no bias; dropped")

    unused = src.unused_tensors()
    if unused:
        raise CT2FormatError(f"tensors this converter does not understand: {unused[:8]}")

    return out, _dims(src, out, encoder_layers, decoder_layers), tied


def _dims(src: "_WeightSource", out: dict[str, np.ndarray], encoder_layers: int, decoder_layers: int) -> WhisperDims:
    """The model's dimensions, read off its mapped weights (heads from the spec when it stores them)."""
    d_model = out["model.encoder.conv1.weight"].shape[0]

    def heads(name: str) -> int:
        stored = src.scalar(name)
        return stored if stored else max(1, d_model // _HEAD_DIM)

    return WhisperDims(
        d_model=d_model,
        num_mel_bins=out["model.encoder.conv1.weight"].shape[1],
        vocab_size=out["model.decoder.embed_tokens.weight"].shape[0],
        encoder_layers=encoder_layers,
        decoder_layers=decoder_layers,
        encoder_attention_heads=heads("encoder/num_heads"),
        decoder_attention_heads=heads("decoder/num_heads"),
        encoder_ffn_dim=out["model.encoder.layers.0.fc1.weight"].shape[0] if encoder_layers else 4 * d_model,
        decoder_ffn_dim=out["model.decoder.layers.0.fc1.weight"].shape[0] if decoder_layers else 4 * d_model,
        max_source_positions=out["model.encoder.embed_positions.weight"].shape[0],
        max_target_positions=out["model.decoder.embed_positions.weight"].shape[0],
    )
