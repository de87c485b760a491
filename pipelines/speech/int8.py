"""Whisper INT8 with NNCF: calibration audio and post-training quantization of Whisper IR.

Whisper INT8 by default compresses only the decoder's weights (``WhisperModelStore._int8_from``).
The calibrated hybrid below (PTQ encoder with SmoothQuant + INT8-weight decoder, through
optimum-intel's ``OVQuantizer``) is the ``VOICE_STUDIO_WHISPER_INT8=calibrated`` choice: on this CPU
its encoder was no faster than the FP16 encoder (bf16 on AMX), and at SmoothQuant 0.8 it cost 1-5 WER
points ("bicycle" -> "MySQL"); at 0.5 it kept the words (27 errors over four voices against FP16's
25; benchmarks/README.md, "Whisper"), so 0.5 is used. On an AVX2-only CPU (no VNNI) the PTQ encoder
was slower than FP16 (0.96 vs 0.85 s per 30 s window), so the default stays weight-only there too.

Calibration audio must exist offline: the user's own folder of recordings
(``VOICE_STUDIO_CALIBRATION_AUDIO``), else clips spoken by espeak-ng from sentences shipped with
the app in several languages. NNCF's statistics collection fails on the stateful decoder with this
OpenVINO CPU plugin ("Memory descriptor may not be modified in StaticMemory object" in
ReadValueWithSubgraph), so the hybrid's decoder is weight-only.
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

from pipelines.core import cpu_int8
from pipelines.speech.audio import AudioError, load_audio

log = logging.getLogger(__name__)

ENV_CALIBRATION_AUDIO = "VOICE_STUDIO_CALIBRATION_AUDIO"
SENTENCES = Path(__file__).parent / "data" / "calibration_sentences.json"
AUDIO_SUFFIXES = {".wav", ".mp3", ".flac", ".ogg", ".m4a", ".opus", ".webm", ".mp4"}
ENCODER_SMOOTH_QUANT_ALPHA = 0.5
CALIBRATION_MAX_NEW_TOKENS = 64


class CalibrationUnavailable(RuntimeError):
    """No calibration audio could be found or made."""


def calibration_audio(folder: Optional[Path] = None, limit: int = 32) -> tuple[list[np.ndarray], str]:
    """Calibration clips (16 kHz mono float32) and a description of where they came from."""
    folder = calibration_folder(folder)
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


def calibration_folder(folder: Optional[Path] = None) -> Optional[Path]:
    """The folder of calibration recordings: the one given, else ``VOICE_STUDIO_CALIBRATION_AUDIO``, else None."""
    if folder is not None:
        return Path(folder)
    return Path(os.environ[ENV_CALIBRATION_AUDIO]) if os.environ.get(ENV_CALIBRATION_AUDIO) else None


def spoken_sentences(limit: int = 32) -> list[np.ndarray]:
    """The shipped calibration sentences, spoken by espeak-ng (several languages)."""
    if shutil.which("espeak-ng") is None:
        raise CalibrationUnavailable("espeak-ng is not installed, and no calibration audio folder was given "
                                     f"({ENV_CALIBRATION_AUDIO}).")
    sentences = json.loads(SENTENCES.read_text(encoding="utf-8"))[:limit]
    clips = []
    with tempfile.TemporaryDirectory(prefix="whisper-calibration-") as tmp:
        for index, item in enumerate(sentences):
            wav = Path(tmp) / f"{index}.wav"
            try:
                subprocess.run(["espeak-ng", "-v", item["voice"], "-s", "150", "-w", str(wav), item["text"]],
                               check=True, capture_output=True, timeout=60)
                clips.append(load_audio(wav))
            except (OSError, subprocess.SubprocessError, AudioError) as exc:
                detail = getattr(exc, "stderr", b"") or b""
                raise CalibrationUnavailable(
                    f"espeak-ng could not speak calibration sentence {index} (voice {item['voice']}): "
                    f"{exc} {detail.decode(errors='replace').strip()}".strip()) from exc
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

    overflow_fix = encoder_overflow_fix()
    config = OVPipelineQuantizationConfig(
        {"encoder": OVQuantizationConfig(smooth_quant_alpha=ENCODER_SMOOTH_QUANT_ALPHA, overflow_fix=overflow_fix),
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
    return {"encoder": f"INT8 post-training quantization (SmoothQuant alpha {ENCODER_SMOOTH_QUANT_ALPHA}, "
                       f"overflow fix {overflow_fix})",
            "decoder": "INT8 weight-only (asymmetric, per channel)", "calibration_clips": len(clips)}


def encoder_overflow_fix() -> str:
    """NNCF's overflow fix for the calibrated Whisper encoder made on this CPU: ``enable`` where INT8
    kernels saturate (:mod:`pipelines.core.cpu_int8`), else optimum-intel's default ``disable``."""
    return cpu_int8.overflow_fix("disable")
