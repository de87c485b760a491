"""The two Serve deployments, each the app's own services inside a replica (:mod:`pipelines.serve.replica`),
and the application builders a Serve config file names (``import_path``)::

    import_path: pipelines.serve.deployments:whisper_app     args: {models_dir: /data/models_cache, slots: 1}
    import_path: pipelines.serve.deployments:image_app

The options below are defaults; a Serve config file's ``deployments:`` entries and the front end's
``--ray-*`` flags override them (:mod:`pipelines.serve.cluster`). ``max_ongoing_requests`` is the
replica's work slots plus one request getting its model ready beside them.

Imported only in Ray mode (by the front end that deploys, and by the replicas).
"""
from __future__ import annotations

from typing import Any, AsyncIterator, Callable

from ray import serve

from pipelines.serve.protocol import STEPS, as_received
from pipelines.serve.replica import StreamingReplica

WHISPER, IMAGE = "whisper", "image"  # application and deployment names


@serve.deployment(name=WHISPER, max_ongoing_requests=2, max_queued_requests=64, ray_actor_options={"num_cpus": 1},
                  health_check_period_s=2, graceful_shutdown_timeout_s=30)
class WhisperDeployment(StreamingReplica):
    """Transcription, comparison and model loading on one replica's WhisperService."""

    deployment = WHISPER

    def __init__(self, args: dict):
        services = self._init_replica(args)
        self.whisper, self.live = services.whisper, services.live

    def _loaded(self) -> list:
        return [list(key) for key in self.whisper.loaded_keys()]

    def _on_audio(self, audio: Any, run: Callable[[Any, Callable], Any]) -> AsyncIterator[dict]:
        """Stream ``run(samples or path, progress)`` over the audio as sent (a file arrives as its bytes)."""
        def work(progress, cancel):
            with as_received(audio) as received:
                return run(received, progress)

        return self._stream(work)

    async def transcribe(self, audio, choice, options):
        async for event in self._on_audio(audio, lambda a, p: self.whisper.transcribe(a, choice, options, p)):
            yield event

    async def compare(self, audio, choice, options):
        """FP16 and INT8 on this one replica, in one work slot (as embedded): fair timings."""
        async for event in self._on_audio(audio, lambda a, p: self.whisper.compare(a, choice, options, p)):
            yield event

    async def live_ready(self, choice, task, language):
        """Get a live stream's model ready and loaded here (refusing what it cannot do)."""
        async for event in self._stream(lambda progress, cancel: self.live.engine(choice).ready(task, language,
                                                                                                 progress)):
            yield event

    async def live_decode(self, choice, job):
        """One live caption step (a DecodeJob: the unconfirmed audio and its prompt) in this replica's live slot."""
        async for event in self._stream(lambda progress, cancel: self.live.engine(choice).decode(job)):
            yield event

    async def load(self, choice, words: bool = False) -> dict:
        """Get ``choice`` ready and loaded here (the front end broadcasts it to every replica); the progress
        messages seen, so a caller can tell who converted the model and who waited for it."""
        messages: list[str] = []
        await self._call(lambda: self.whisper.load(choice, lambda f, m: messages.append(m), words=words))
        return {"replica": self.replica_id, "messages": messages, "loaded": self._loaded()}

    async def release(self) -> dict:
        await self._call(self.whisper.release)
        return {"replica": self.replica_id, "loaded": self._loaded()}


@serve.deployment(name=IMAGE, max_ongoing_requests=2, max_queued_requests=16, ray_actor_options={"num_cpus": 1},
                  health_check_period_s=2, graceful_shutdown_timeout_s=30)
class ImageDeployment(StreamingReplica):
    """Image generation and pose extraction on one replica's ImageService and PoseService."""

    deployment = IMAGE

    def __init__(self, args: dict):
        services = self._init_replica(args)
        self.image, self.pose = services.image, services.pose

    def _loaded(self) -> list:
        return [list(key) for key in self.image.loaded()]

    async def generate(self, options, pose_image, kwargs: dict):
        previews = kwargs.pop("previews", False)  # the caller wants live previews sent as they come

        def work(progress, cancel):
            return self.image.generate(options, pose_image, progress=progress.to(STEPS), cancel=cancel,
                                       load_progress=progress, preview=progress.preview if previews else None,
                                       **kwargs)

        async for event in self._stream(work):
            yield event

    async def compare(self, options, pose_image, kwargs: dict):
        async for event in self._stream(lambda progress, cancel: self.image.compare(
                options, pose_image, cancel=cancel, progress=progress, **kwargs)):
            yield event

    async def pose_folder(self):
        async for event in self._stream(lambda progress, cancel: str(self.pose.model_folder(progress))):
            yield event

    async def estimate_pose(self, photo, device=None):
        async for event in self._stream(lambda progress, cancel: self.pose.estimate(photo, device=device)):
            yield event

    async def release(self) -> dict:
        await self._call(lambda: (self.image.release(), self.pose.release()))
        return {"replica": self.replica_id, "loaded": self._loaded()}


DEPLOYMENTS = {WHISPER: WhisperDeployment, IMAGE: ImageDeployment}


def build(app: str, args: dict, options: dict | None = None):
    """Application ``app`` (``"whisper"`` or ``"image"``) for ``args``, with Serve deployment ``options``."""
    deployment = DEPLOYMENTS[app]
    return (deployment.options(**options) if options else deployment).bind(dict(args))


def whisper_app(args: dict):
    """``import_path`` of the whisper application in a Serve config file (KubeRay's ``serveConfigV2``)."""
    return build(WHISPER, args)


def image_app(args: dict):
    """``import_path`` of the image application in a Serve config file."""
    return build(IMAGE, args)
