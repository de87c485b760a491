"""INT8 with NNCF: calibration audio, and post-training quantization of Whisper IR.

Whisper INT8 is a hybrid chosen by measurement on this CPU (see README, "INT8"):
- the **encoder** gets full post-training quantization (weights and activations, SmoothQuant),
  calibrated on the encoder inputs seen while transcribing real speech;
- the **decoder** gets INT8 weight-only compression. NNCF's statistics collection fails on the
  stateful decoder with this OpenVINO CPU plugin ("Memory descriptor may not be modified in
  StaticMemory object" in ReadValueWithSubgraph), and the decoder is memory-bound, so its INT8
  weights already give the speed-up.
Both run through optimum-intel's ``OVQuantizer``: it wraps the infer requests, runs generation
on the calibration audio and collects each component's real inputs, as the Whisper notebooks do.

Calibration audio must exist offline: the user's own folder of recordings
(``VOICE_STUDIO_CALIBRATION_AUDIO``), else clips spoken by espeak-ng from sentences shipped with
the app in several languages. With neither, the model store falls back to weight-only INT8 and
records that in the cached folder.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .audio import AudioError, load_audio

log = logging.getLogger(__name__)

ENV_CALIBRATION_AUDIO = "VOICE_STUDIO_CALIBRATION_AUDIO"
SENTENCES = Path(__file__).parent / "data" / "calibration_sentences.json"
AUDIO_SUFFIXES = {".wav", ".mp3", ".flac", ".ogg", ".m4a", ".opus", ".webm", ".mp4"}
ENCODER_SMOOTH_QUANT_ALPHA = 0.8
CALIBRATION_MAX_NEW_TOKENS = 64


class CalibrationUnavailable(RuntimeError):
    """No calibration audio could be found or made."""


def calibration_audio(folder: Optional[Path] = None, limit: int = 32) -> tuple[list[np.ndarray], str]:
    """Calibration clips (16 kHz mono float32) and a description of where they came from."""
    folder = folder or (Path(os.environ[ENV_CALIBRATION_AUDIO]) if os.environ.get(ENV_CALIBRATION_AUDIO) else None)
    if folder is not None:
        clips = []
        for path in sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)[:limit]:
            try:
                clips.append(load_audio(path))
            except AudioError as exc:
                log.warning("calibration: skipping %s (%s)", path, exc)
        if not clips:
            raise CalibrationUnavailable(f"No readable audio files in {folder}.")
        return clips, f"{len(clips)} recordings from {folder}"
    return spoken_sentences(limit), "espeak-ng clips of the shipped calibration sentences"


def spoken_sentences(limit: int = 32) -> list[np.ndarray]:
    """The shipped calibration sentences, spoken by espeak-ng (several languages)."""
    if shutil.which("espeak-ng") is None:
        raise CalibrationUnavailable("espeak-ng is not installed, and no calibration audio folder was given "
                                     f"({ENV_CALIBRATION_AUDIO}).")
    sentences = json.loads(SENTENCES.read_text(encoding="utf-8"))[:limit]
    clips = []
    with tempfile.TemporaryDirectory(prefix="voice-studio-calibration-") as tmp:
        for index, item in enumerate(sentences):
            wav = Path(tmp) / f"{index}.wav"
            subprocess.run(["espeak-ng", "-v", item["voice"], "-s", "150", "-w", str(wav), item["text"]],
                           check=True, capture_output=True)
            clips.append(load_audio(wav))
    return clips


class _AudioDataset:
    """The little of ``datasets.Dataset`` that optimum-intel's speech calibration uses: ``take``."""

    def __init__(self, clips: Sequence[np.ndarray]):
        self._items = [{"audio": {"array": clip, "sampling_rate": 16000}} for clip in clips]

    def take(self, count: int) -> list[dict]:
        return self._items[:count]


def quantize_whisper(fp16_dir: Path, out_dir: Path, clips: Sequence[np.ndarray]) -> dict:
    """Write the hybrid INT8 Whisper (PTQ encoder, INT8-weight decoder) of ``fp16_dir`` into ``out_dir``."""
    from optimum.intel import (OVConfig, OVModelForSpeechSeq2Seq, OVPipelineQuantizationConfig,
                               OVQuantizationConfig, OVQuantizer, OVWeightQuantizationConfig)

    config = OVPipelineQuantizationConfig(
        {"encoder": OVQuantizationConfig(smooth_quant_alpha=ENCODER_SMOOTH_QUANT_ALPHA),
         "decoder": OVWeightQuantizationConfig(bits=8, sym=False)},
        num_samples=len(clips), processor=str(fp16_dir))
    model = OVModelForSpeechSeq2Seq.from_pretrained(fp16_dir, compile=False)
    # Calibration needs representative decoder steps, not runaway generations to the 448-token limit.
    model.generation_config.max_new_tokens = CALIBRATION_MAX_NEW_TOKENS
    quantizer = OVQuantizer(model)
    calibration = quantizer.dataset_builder.build_from_dataset(config, _AudioDataset(clips))
    quantizer.quantize(ov_config=OVConfig(quantization_config=config), calibration_dataset=calibration,
                       save_directory=out_dir)
    for tokenizer_file in Path(fp16_dir).glob("openvino_*tokenizer.*"):
        shutil.copy2(tokenizer_file, Path(out_dir) / tokenizer_file.name)
    return {"encoder": f"INT8 post-training quantization (SmoothQuant alpha {ENCODER_SMOOTH_QUANT_ALPHA})",
            "decoder": "INT8 weight-only (asymmetric, per channel)", "calibration_clips": len(clips)}


def count_int8(xml_path: Path) -> dict[str, int]:
    """How much of an IR is INT8: FakeQuantize nodes and u8/i8 weight constants."""
    import openvino as ov

    model = ov.Core().read_model(xml_path)
    counts = {"fake_quantize": 0, "int8_constants": 0}
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind == "FakeQuantize":
            counts["fake_quantize"] += 1
        elif kind == "Constant" and op.get_output_element_type(0).get_type_name() in ("u8", "i8"):
            counts["int8_constants"] += 1
    return counts
