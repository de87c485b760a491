"""Ray and Serve for the front end: start a local Ray instance or join a cluster, deploy the whisper
and image applications, wait for them, and read their state (``/status``).

Deployment options come, in rising priority, from the deployments' defaults
(:mod:`pipelines.serve.deployments`), a Serve config file (``--ray-config``; Serve's own schema, the
one ``serve build`` writes and KubeRay's ``serveConfigV2`` holds) and the ``--ray-*`` flags. Each
application's ``args`` are the front end's settings (models folder and models) and the file's.

A **local instance** (``--ray`` without an address) is this machine only: every Ray process listens on
127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, Ray's switch for a one-machine cluster), it has a
token of its own in the environment (Ray 2.60 turns token auth on and would otherwise write
``~/.ray/auth_token``), no dashboard, Serve without its HTTP proxy (the front end uses handles), and
workers at nice 0 (Ray starts them at 15, which costs a replica ~30% on a busy machine). Joining a
cluster (``--ray auto`` or HOST:PORT) needs this machine to be a Ray node, and the cluster's token in
``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH``.
"""
from __future__ import annotations

import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Optional

from pipelines.serve.flags import ClusterError, RayOptions

APPS = ("whisper", "image")
ROOT = Path(__file__).resolve().parents[2]  # the app's folder: importable by every local replica
START_TIMEOUT_S = 600.0


# --------------------------------------------------------------------------- connecting
def _local_environment() -> None:
    """What a local instance's processes inherit (set before Ray is imported: it reads them once)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # listen and talk on 127.0.0.1 only
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not os.environ.get("RAY_AUTH_TOKEN") and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # this instance's, nothing under $HOME
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(ROOT) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *paths])


def _reread_environment() -> None:
    """Make an already imported Ray see the environment :func:`_local_environment` set: Ray reads its
    auth mode, token and one-machine switch once, at import (anything may have imported it first, e.g.
    a Serve config check); a stale 'auth disabled' would make this process fail to talk to its own GCS.
    Ray refreshes them the same way when it turns token auth on itself (private API, Ray 2.60)."""
    from ray._private import ray_constants
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"].lower() in ("1", "true")


def connect(options: RayOptions) -> str:
    """Start the local instance or join the cluster (a process already connected stays so); its address."""
    imported = "ray" in sys.modules
    if options.local:
        _local_environment()
    import logging

    import ray

    if options.local and imported and not ray.is_initialized():
        _reread_environment()

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # no INFO lines per handle on the front end's console
    if not ray.is_initialized():
        try:
            if options.local:
                ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="warning",
                         _system_config={"worker_niceness": 0})
            else:
                ray.init(address=options.address, log_to_driver=False, logging_level="warning")
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = "start a local Ray instance" if options.local else f"join the Ray cluster at {options.address}"
            raise ClusterError(f"Could not {where}: {exc}. For a cluster, run this app on one of its nodes "
                               "(`ray start --address=HEAD:6379`) with the cluster's token in RAY_AUTH_TOKEN.") from exc
    return ray.get_runtime_context().gcs_address


# --------------------------------------------------------------------------- the config file
def load_config(path: Optional[Path]) -> Any:
    """A Serve config file, checked by Serve's own schema (``ServeDeploySchema``), or None."""
    if path is None:
        return None
    import yaml
    from ray.serve.schema import ServeDeploySchema

    try:
        return ServeDeploySchema.model_validate(yaml.safe_load(Path(path).read_text()))
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ClusterError(f"--ray-config {path} is not a Serve config file Voice Studio can use: {exc}") from exc


def app_args(config: Any, app: str) -> dict:
    """The ``args`` the config file gives application ``app``."""
    for spec in getattr(config, "applications", None) or []:
        if spec.name == app:
            return dict(spec.args or {})
    return {}


def deployment_options(config: Any, app: str, overrides: dict) -> dict:
    """Serve deployment options of ``app``: the config file's entry, then the flags' ``overrides``."""
    options: dict = {}
    for spec in getattr(config, "applications", None) or []:
        for entry in (spec.deployments or []) if spec.name == app else []:
            if entry.name == app:
                options.update(entry.model_dump(exclude_unset=True, exclude={"name"}))
    for key, value in overrides.items():
        if key == "ray_actor_options":
            options["ray_actor_options"] = {**options.get("ray_actor_options", {}), **value}
        else:
            options[key] = value
    if "autoscaling_config" in options and "num_replicas" in overrides:
        options.pop("autoscaling_config")  # the flag asked for a fixed count
    elif "autoscaling_config" in options:
        options.pop("num_replicas", None)
    return options


# --------------------------------------------------------------------------- deploying
def running_apps() -> dict[str, str]:
    """The Voice Studio applications on the cluster and their status (RUNNING, DEPLOYING, ...)."""
    from ray import serve

    try:
        applications = serve.status().applications
    except Exception:  # noqa: BLE001 - Serve not started on this cluster yet
        return {}
    return {name: _value(app.status) for name, app in applications.items() if name in APPS}


def deploy(args: dict[str, dict], options: dict[str, dict], local: bool) -> None:
    """Deploy both applications (``args`` and Serve ``options`` per app) and wait until they run."""
    from ray import serve
    from ray.serve.api import RunTarget

    from pipelines.serve.deployments import build

    if local:
        _check_local_cpus(options)
    serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING"})
    serve.run_many([RunTarget(build(app, args[app], options[app]), name=app, route_prefix=None) for app in APPS],
                   wait_for_applications_running=False)
    wait_running(APPS)


def _check_local_cpus(options: dict[str, dict]) -> None:
    """Refuse, with the numbers, replicas that cannot all be placed on this machine."""
    import ray

    from pipelines.serve.deployments import DEPLOYMENTS

    needed = 0.0
    for app in APPS:
        defaults = DEPLOYMENTS[app]
        count = options[app].get("autoscaling_config", {}).get("min_replicas", options[app].get(
            "num_replicas", defaults.num_replicas))
        cpus = options[app].get("ray_actor_options", {}).get("num_cpus", defaults.ray_actor_options.get("num_cpus", 1))
        needed += float(count if isinstance(count, (int, float)) else 1) * float(cpus)
    have = float(ray.cluster_resources().get("CPU", 0))
    if needed > have + 1e-9:
        raise ClusterError(f"The replicas asked for need {needed:g} CPUs and this machine's Ray instance has {have:g}. "
                           "Give fewer replicas or fewer CPUs each (e.g. --ray-cpus whisper=0.5), or join a cluster.")


def wait_running(apps: tuple[str, ...], timeout_s: float = START_TIMEOUT_S) -> None:
    """Wait until ``apps`` run; a failed deployment, or none running in time, is a :class:`ClusterError`."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            status = serve.status().applications
        except Exception:  # noqa: BLE001 - Serve not started on the cluster yet (KubeRay still setting up)
            status = {}
        states = {app: _value(status[app].status) if app in status else "NOT_DEPLOYED" for app in apps}
        if all(state == "RUNNING" for state in states.values()):
            return
        failed = [app for app, state in states.items() if state in ("DEPLOY_FAILED", "UNHEALTHY")]
        if failed or time.monotonic() > deadline:
            details = "; ".join(f"{app}: {states[app]} {status[app].message if app in status else ''}".strip()
                                for app in (failed or apps))
            raise ClusterError(f"The Voice Studio applications did not start ({details}).")
        time.sleep(0.5)


def _value(status: Any) -> str:
    return str(getattr(status, "value", status))


# --------------------------------------------------------------------------- what runs
def serve_details() -> dict:
    """Serve's controller view (what the dashboard shows): replicas with state, pid and node (private API)."""
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()


def capacity(details: dict, app: str) -> dict[str, int]:
    """How much work ``app`` takes at once over its replicas (at most ``max_replicas`` of them): ``slots``
    (running) and ``ongoing`` (slots plus those getting ready: what Serve lets in)."""
    found = details.get("applications", {}).get(app, {})
    config = found.get("deployments", {}).get(app, {}).get("deployment_config", {})
    autoscaling = config.get("autoscaling_config") or {}
    replicas = int(autoscaling.get("max_replicas") or config.get("num_replicas") or 1)
    args = (found.get("deployed_app_config") or {}).get("args") or {}
    slots = max(1, int(args.get("slots") or 1))
    ongoing = int(config.get("max_ongoing_requests") or slots + 1)
    return {"max_replicas": replicas, "slots": replicas * slots, "ongoing": replicas * max(ongoing, slots)}


def replicas_of(details: dict, app: str) -> list[dict]:
    deployment = details.get("applications", {}).get(app, {}).get("deployments", {}).get(app, {})
    return [{"id": r.get("replica_id"), "state": _value(r.get("state")), "pid": r.get("pid"),
             "node": r.get("node_ip")} for r in deployment.get("replicas", [])]


def cluster_status(book: Any, address: str) -> dict:
    """``/status`` in Ray mode: each application's and deployment's state, its replicas (id, state, pid,
    node, and what this front end saw each do: running, served, failed, lost) and the requests of this
    front end waiting for a replica."""
    from ray import serve

    details = serve_details()
    statuses = serve.status().applications
    out = {"address": address, "applications": {}}
    for app in APPS:
        if app not in statuses:
            out["applications"][app] = {"status": "NOT_DEPLOYED"}
            continue
        deployment = statuses[app].deployments.get(app)
        found = details.get("applications", {}).get(app, {}).get("deployments", {}).get(app, {})
        replicas = [{**r, **{k: v for k, v in book.replica(app, r["id"]).items() if k != "loaded"}}
                    for r in replicas_of(details, app)]
        out["applications"][app] = {
            "status": _value(statuses[app].status),
            "deployment_status": _value(deployment.status) if deployment else None,
            "message": deployment.message if deployment else "", "target_replicas": found.get("target_num_replicas"),
            "replicas": replicas, "waiting_for_a_replica": book.waiting(app), "front_end": book.totals(app),
            **capacity(details, app)}
    return out
