"""Clients with the methods the UI calls on the embedded services, over the deployments: the UI
(``ui/``) does not know whether it has :class:`~pipelines.services.Services` or
:class:`~pipelines.serve.frontend.RayServices`.

What is sent is what a replica on another machine can use: samples, pixels, and a file's bytes, never a
front-end path (:mod:`pipelines.serve.protocol`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pipelines.core.progress import ProgressFn, no_progress
from pipelines.core.types import ModelChoice
from pipelines.image.request import CancelCheck, GenerationCancelled, load_pose_image
from pipelines.serve.client import CallCancelled, RemoteCall, ReplicaBook, broadcast
from pipelines.serve.protocol import MAIN, PREVIEW, STEPS, as_sent
from pipelines.speech.types import TranscribeOptions

LOAD_TIMEOUT_S = 3600.0  # loading everywhere may convert (and quantize) the model first


class RemoteWhisper:
    """The WhisperService interface the UI and the subtitles jobs use, over the ``whisper`` deployment."""

    def __init__(self, handle: Any, book: ReplicaBook, **call_options: Any):
        self.handle, self.book = handle, book
        self.call = RemoteCall(handle, "whisper", book, **call_options)

    def transcribe(self, audio: Any, choice: ModelChoice, options: TranscribeOptions = TranscribeOptions(),
                   progress: ProgressFn = no_progress):
        return self.call.run("transcribe", as_sent(audio), choice, options, progress=progress)

    def transcribe_file(self, wav_path: Path, choice: ModelChoice, options: TranscribeOptions = TranscribeOptions(),
                        progress: ProgressFn = no_progress):
        return self.transcribe(Path(wav_path), choice, options, progress)

    def compare(self, audio: Any, choice: ModelChoice, options: TranscribeOptions, progress: ProgressFn = no_progress):
        """FP16 and INT8 as one call on one replica (both runs in one of its work slots)."""
        return self.call.run("compare", as_sent(audio), choice, options, progress=progress)

    def load(self, choice: ModelChoice, progress: ProgressFn = no_progress, words: bool = False) -> list[dict]:
        """Get ``choice`` ready and loaded on every replica (a model is converted once: the others wait
        for that conversion through the shared models folder's lock). Each replica's answer."""
        progress(0.0, f"load {choice.model} on every whisper worker")
        answers = broadcast(self.handle, "load", choice, words, timeout_s=LOAD_TIMEOUT_S)
        for answer in answers:
            self.book.note("whisper", answer["replica"], loaded=answer["loaded"])
        return answers

    def loaded_keys(self) -> list[tuple]:
        """The models loaded on the replicas, as (model, precision, device), each once (as each replica last
        reported them; a replica found dead has none)."""
        return list(dict.fromkeys(tuple(key[:3]) for key in self.book.loaded("whisper")))

    def release(self) -> None:
        for answer in broadcast(self.handle, "release", timeout_s=120.0):
            self.book.note("whisper", answer["replica"], loaded=answer["loaded"])


def _pixels(image: Any) -> Any:
    """An image as pixels (a PIL image or an array), read here when it is a path of this machine."""
    return load_pose_image(image) if isinstance(image, (str, Path)) else image


class RemoteLiveEngine:
    """A live stream's decoder (:class:`~pipelines.speech.live_stream.LiveEngine`'s interface) over the
    ``whisper`` deployment: each step's audio goes to a replica, the stream's state stays here."""

    def __init__(self, whisper: RemoteWhisper, choice: ModelChoice):
        self.whisper, self.choice = whisper, choice

    def ready(self, task: str, language: Optional[str], progress: ProgressFn = no_progress) -> None:
        self.whisper.call.run("live_ready", self.choice, task, language, progress=progress)

    def decode(self, job: Any) -> Any:
        return self.whisper.call.run("live_decode", self.choice, job)

    def transcribe_recording(self, wav: Path, task: str, language: Optional[str], progress: ProgressFn = no_progress):
        """The whole recording as a file, on a replica (as embedded: the plain pipeline)."""
        return self.whisper.transcribe_file(wav, self.choice, TranscribeOptions(task=task, language=language),
                                            progress)


class RemoteImage:
    """The ImageService interface the UI uses, over the ``image`` deployment."""

    def __init__(self, handle: Any, book: ReplicaBook, **call_options: Any):
        self.handle, self.book = handle, book
        self.call = RemoteCall(handle, "image", book, **call_options)

    def _run(self, method: str, *args: Any, progress: Any, cancel: CancelCheck) -> Any:
        try:
            return self.call.run(method, *args, progress=progress, cancel=cancel)
        except CallCancelled:
            raise GenerationCancelled("Image generation was cancelled.") from None

    def generate(self, options, pose_image, *, sd_ref: Optional[str] = None, controlnet_ref: Optional[str] = None,
                 device: Optional[str] = None, progress: ProgressFn = no_progress, cancel: CancelCheck = None,
                 load_progress: ProgressFn = no_progress, precision: str = "fp16", preview: Any = None):
        """``preview`` gets the live previews the replica sends (they cross as events, like progress)."""
        kwargs = dict(sd_ref=sd_ref, controlnet_ref=controlnet_ref, device=device, precision=precision,
                      previews=preview is not None)
        channels = {MAIN: load_progress, STEPS: progress, **({PREVIEW: preview} if preview is not None else {})}
        return self._run("generate", options, _pixels(pose_image), kwargs, progress=channels, cancel=cancel)

    def compare(self, options, pose_image, *, sd_ref: Optional[str] = None, controlnet_ref: Optional[str] = None,
                device: Optional[str] = None, cancel: CancelCheck = None, progress: ProgressFn = no_progress):
        """FP16 and INT8 as one call on one replica (both generations in one of its work slots)."""
        kwargs = dict(sd_ref=sd_ref, controlnet_ref=controlnet_ref, device=device)
        return self._run("compare", options, _pixels(pose_image), kwargs, progress=progress, cancel=cancel)

    def release(self) -> None:
        for answer in broadcast(self.handle, "release", timeout_s=120.0):
            self.book.note("image", answer["replica"], loaded=answer["loaded"])


class RemotePose:
    """The PoseService interface the UI uses; pose runs on the ``image`` deployment."""

    def __init__(self, handle: Any, book: ReplicaBook, **call_options: Any):
        self.call = RemoteCall(handle, "image", book, **call_options)

    def model_folder(self, progress: ProgressFn = no_progress) -> Path:
        """Convert the pose network once (on a replica; the path is that replica's)."""
        return Path(self.call.run("pose_folder", progress=progress))

    def estimate(self, image: Any, device: Optional[str] = None):
        return self.call.run("estimate_pose", _pixels(image), device)
