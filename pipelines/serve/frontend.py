"""What the UI gets in Ray mode: :class:`RayServices`, with the attributes of
:class:`~pipelines.services.Services` (``settings``, ``whisper``, ``image``, ``pose``, ``live``,
``release_all``, ``batch_width``) whose services call the replicas, and a ``status()`` for ``/status``.

:func:`start_ray_services` connects (local instance or cluster), deploys the applications as asked
(:mod:`pipelines.serve.cluster`) and sizes the front end to them: Gradio lets in as many requests of
a kind as the replicas have work slots (plus those getting ready, as embedded); the rest wait in
Gradio's queue, where ``--queue-size`` bounds them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from pipelines.serve import cluster
from pipelines.serve.client import ReplicaBook
from pipelines.serve.flags import RayOptions
from pipelines.serve.remote import RemoteImage, RemoteLiveEngine, RemotePose, RemoteWhisper
from pipelines.serve.replica import settings_args, with_args
from pipelines.services import DEFAULT_CONCURRENCY, Settings
from pipelines.speech.live_stream import LiveService

log = logging.getLogger(__name__)


@dataclass
class RayServices:
    settings: Settings
    address: str
    local: bool
    whisper: RemoteWhisper
    image: RemoteImage
    pose: RemotePose
    book: ReplicaBook
    live: LiveService
    batch_width: int = 1
    handles: dict = field(default_factory=dict)

    def release_all(self) -> None:
        """Unload every model on every replica (they load again on next use)."""
        self.whisper.release()
        self.image.release()

    def status(self) -> dict:
        """What ``/status`` adds in Ray mode (see :func:`pipelines.serve.cluster.cluster_status`)."""
        try:
            return {"mode": "ray", "ray": cluster.cluster_status(self.book, self.address)}
        except Exception as exc:  # noqa: BLE001 - /status must answer even when the controller does not
            return {"mode": "ray", "ray": {"address": self.address, "error": f"{type(exc).__name__}: {exc}"}}

    def close(self) -> None:
        """Stop the local Ray instance (its replicas with it); a joined cluster keeps running."""
        if self.local:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()


def start_ray_services(settings: Settings, options: RayOptions) -> RayServices:
    """Connect, deploy as ``options`` ask, and return the front end's services."""
    address = cluster.connect(options)
    config = cluster.load_config(options.config)
    for app in cluster.APPS:  # the front end agrees with its replicas on models folder and models
        settings = with_args(settings, cluster.app_args(config, app))
    missing = set(cluster.APPS) - set(cluster.running_apps())
    if options.deploy == "always" or (options.deploy == "auto" and (options.local or missing)):
        shared = settings_args(settings)
        args = {app: {**shared, **cluster.app_args(config, app)} for app in cluster.APPS}
        opts = {app: cluster.deployment_options(config, app, options.overrides.get(app, {})) for app in cluster.APPS}
        log.info("deploying the whisper and image applications on Ray at %s", address)
        cluster.deploy(args, opts, options.local)
    else:
        cluster.wait_running(cluster.APPS)
    from ray import serve

    handles = {app: serve.get_deployment_handle(app, app_name=app) for app in cluster.APPS}
    details = cluster.serve_details()
    whisper, image = cluster.capacity(details, "whisper"), cluster.capacity(details, "image")
    settings = replace(settings, concurrency={**settings.concurrency, "whisper": whisper["slots"],
                                              "image": image["slots"]})
    book = ReplicaBook()
    log.info("Ray Serve at %s: whisper %s, image %s", address, whisper, image)
    remote_whisper = RemoteWhisper(handles["whisper"], book)
    live = LiveService(remote_whisper, max_streams=settings.concurrency.get("live", DEFAULT_CONCURRENCY["live"]),
                       max_seconds=settings.max_audio_seconds,
                       engines=lambda choice: RemoteLiveEngine(remote_whisper, choice))  # steps decode on replicas
    return RayServices(settings=settings, address=address, local=options.local, whisper=remote_whisper,
                       image=RemoteImage(handles["image"], book), pose=RemotePose(handles["image"], book), book=book,
                       live=live, batch_width=whisper["ongoing"], handles=handles)

