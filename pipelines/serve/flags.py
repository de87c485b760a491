"""The ``--ray*`` flags of ``app.py`` (standard library only: ``app.py --help`` imports no Ray).

    --ray [ADDRESS]          Ray Serve mode: no ADDRESS (or "local") starts a local Ray instance (this machine
                             only, loopback); "auto" or HOST:PORT joins an existing cluster
    --ray-config FILE        a Serve config file (deploy/serve_config.yaml): each application's args and
                             deployment options (replicas, CPUs, ongoing requests, autoscaling, ...)
    --ray-replicas KIND=N    --ray-cpus KIND=X    --ray-max-ongoing KIND=N    --ray-autoscale KIND=MIN:MAX
                             per deployment (whisper, image); they win over the config file
    --ray-deploy auto|always|never
                             auto: deploy the applications unless they already run on the cluster (a local
                             instance always gets them); always: (re)deploy with these settings; never: use
                             what runs (KubeRay's RayService deploys them itself)

Each has a ``VOICE_STUDIO_RAY*`` environment variable (the KIND=VALUE ones take comma-separated pairs:
``VOICE_STUDIO_RAY_REPLICAS=whisper=2,image=1``); flags win.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

KINDS = ("whisper", "image")
DEPLOY_MODES = ("auto", "always", "never")
LOCAL = "local"
#: flag name -> (environment variable, how a value is read, the deployment option it sets)
PAIR_FLAGS: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "replicas": ("VOICE_STUDIO_RAY_REPLICAS", int, "num_replicas"),
    "cpus": ("VOICE_STUDIO_RAY_CPUS", float, "num_cpus"),
    "max_ongoing": ("VOICE_STUDIO_RAY_MAX_ONGOING", int, "max_ongoing_requests"),
    "autoscale": ("VOICE_STUDIO_RAY_AUTOSCALE", str, "autoscaling_config"),
}


class ClusterError(Exception):
    """Ray mode cannot start as asked (no cluster at the address, not enough CPUs, a bad config file,
    the applications missing); the message says what to do."""


@dataclass(frozen=True)
class RayOptions:
    """What the front end was asked for: where the cluster is, the config file, per-deployment options."""

    address: str = LOCAL  # "local", "auto" or HOST:PORT
    config: Optional[Path] = None
    overrides: dict[str, dict] = field(default_factory=dict)  # kind -> Serve deployment options
    deploy: str = "auto"

    @property
    def local(self) -> bool:
        return self.address in ("", LOCAL)


def _pair(flag: str, cast: Callable[[str], Any]) -> Callable[[str], tuple[str, Any]]:
    def convert(text: str) -> tuple[str, Any]:
        kind, sep, value = text.partition("=")
        if not sep or kind.strip() not in KINDS:
            raise argparse.ArgumentTypeError(f"expected KIND=VALUE with KIND one of {', '.join(KINDS)}: {text!r}")
        try:
            parsed = _autoscale(value) if flag == "autoscale" else cast(value)
        except ValueError:
            name = flag.replace("_", "-")
            raise argparse.ArgumentTypeError(f"not a valid value for --ray-{name}: {text!r}") from None
        if flag != "autoscale" and not parsed > 0:
            raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
        return kind.strip(), parsed

    convert.__name__ = f"ray-{flag}"
    return convert


def _autoscale(value: str) -> tuple[int, int]:
    low, _, high = value.partition(":")
    bounds = int(low), int(high or low)
    if bounds[0] < 0 or bounds[1] < max(1, bounds[0]):
        raise ValueError(value)
    return bounds


def add_ray_flags(group: Any, environ: Mapping[str, str]) -> None:
    env = environ.get
    group.add_argument("--ray", nargs="?", const=LOCAL, default=env("VOICE_STUDIO_RAY") or None, metavar="ADDRESS",
                       help="run Whisper and image work in Ray Serve deployments, this app being their front end: "
                            "no ADDRESS (or 'local') starts a local Ray instance, 'auto' or HOST:PORT joins a "
                            "cluster (this machine must be a Ray node) (env VOICE_STUDIO_RAY)")
    group.add_argument("--ray-config", type=Path, default=Path(env("VOICE_STUDIO_RAY_CONFIG")) if env(
                       "VOICE_STUDIO_RAY_CONFIG") else None, metavar="FILE",
                       help="Serve config file (deploy/serve_config.yaml): args and deployment options of the "
                            "whisper and image applications (env VOICE_STUDIO_RAY_CONFIG)")
    helps = {"replicas": "replicas of a deployment, e.g. whisper=2",
             "cpus": "CPUs per replica (fractions allowed; OpenVINO uses that many threads), e.g. whisper=1",
             "max_ongoing": "requests one replica takes at once (its work slots + 1 getting ready), e.g. whisper=2",
             "autoscale": "autoscale between MIN and MAX replicas, e.g. whisper=1:4"}
    for flag, (variable, cast, _option) in PAIR_FLAGS.items():
        group.add_argument(f"--ray-{flag.replace('_', '-')}", type=_pair(flag, cast), action="append", default=[],
                           metavar="KIND=VALUE", help=f"{helps[flag]} (repeatable; env {variable})")
    group.add_argument("--ray-deploy", choices=DEPLOY_MODES, default=env("VOICE_STUDIO_RAY_DEPLOY") or "auto",
                       help="auto: deploy the applications unless they already run; always: deploy with these "
                            "settings; never: use what runs, as under KubeRay (env VOICE_STUDIO_RAY_DEPLOY)")


def ray_options(args: argparse.Namespace, environ: Mapping[str, str], parser: argparse.ArgumentParser
                ) -> Optional[RayOptions]:
    """The parsed ``--ray*`` flags (environment first, flags win), or None without ``--ray``."""
    overrides: dict[str, dict] = {}
    given = []
    for flag, (variable, cast, option) in PAIR_FLAGS.items():
        try:
            from_env = [_pair(flag, cast)(p.strip()) for p in (environ.get(variable) or "").split(",") if p.strip()]
        except argparse.ArgumentTypeError as exc:
            parser.error(f"{variable}: {exc}")
        pairs = from_env + list(getattr(args, f"ray_{flag}") or [])
        given += [f"--ray-{flag.replace('_', '-')}"] if getattr(args, f"ray_{flag}") else []
        for kind, value in pairs:
            _set_option(overrides.setdefault(kind, {}), option, value)
    if args.ray is None:
        if given or args.ray_config:
            parser.error(f"{', '.join(given) or '--ray-config'}: only with --ray")
        return None
    if args.ray.startswith("ray://"):
        parser.error("--ray ray://... (Ray Client) cannot stream progress to the front end; run this app on a "
                     "node of the cluster (`ray start --address=HEAD:6379`) and give --ray auto")
    if args.ray_config is not None and not Path(args.ray_config).is_file():
        parser.error(f"--ray-config: no file {args.ray_config}")
    return RayOptions(address=args.ray, config=args.ray_config, overrides=overrides, deploy=args.ray_deploy)


def _set_option(options: dict, option: str, value: Any) -> None:
    if option == "num_cpus":
        options.setdefault("ray_actor_options", {})["num_cpus"] = value
    elif option == "autoscaling_config":
        options.pop("num_replicas", None)
        options["autoscaling_config"] = {"min_replicas": value[0], "max_replicas": value[1],
                                         "target_ongoing_requests": 1}
    else:
        if option == "num_replicas":
            options.pop("autoscaling_config", None)
        options[option] = value
