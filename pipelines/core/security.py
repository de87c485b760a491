"""Serving rules that do not depend on Gradio: when the app counts as shared, which model
references a user may give, and logins read from files or the environment.

- *Shared*: the app listens beyond loopback, has a public share link, or runs on a Hugging Face
  Space (``SPACE_ID`` set). Then user-given model references may only be bundled models or Hugging
  Face hub ids, unless the operator allows local folders (``--allow-local-models``): a path typed
  into the model field would otherwise let a visitor probe or load anything on the server's disk.
  The models the operator configured (``--model`` and the like) are always accepted.
- *Logins*: ``user:password`` pairs from ``--auth``, a file (``--auth-file``, one pair a line, ``#``
  comments) or the ``VOICE_STUDIO_AUTH`` environment variable (a Space secret). No password lives in
  code, and no message ever repeats one.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import re
import stat
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

log = logging.getLogger(__name__)

#: A Hugging Face hub id: ``owner/name`` (the same rule the model store uses).
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
BUNDLED_PREFIX = "bundled/"
LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost", "ip6-loopback"})


class ModelReferenceRefused(ValueError):
    """A model reference this server does not accept from users (the message says what to give)."""


class AuthConfigError(ValueError):
    """The login configuration cannot be used (the message never contains a password)."""


# --------------------------------------------------------------------------- shared mode
def is_loopback_host(host: Optional[str]) -> bool:
    """True when ``host`` only listens on this machine (127.0.0.0/8, ::1, localhost)."""
    if not host:
        return True  # Gradio's own default is 127.0.0.1
    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def on_hugging_face_space(environ: Mapping[str, str] = os.environ) -> bool:
    return bool(environ.get("SPACE_ID"))


def is_shared(host: Optional[str], share: bool, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether people other than the operator can reach the app."""
    return bool(share) or not is_loopback_host(host) or on_hugging_face_space(environ)


# --------------------------------------------------------------------------- model references
def looks_like_local_path(reference: str) -> bool:
    """A reference that names (or tries to name) something on this machine's disk."""
    ref = reference.strip()
    if not ref:
        return False
    if ref.startswith(BUNDLED_PREFIX) and "/" not in ref[len(BUNDLED_PREFIX):] and ".." not in ref:
        return False
    if not HUB_ID.match(ref) or ".." in ref:
        return True  # absolute, ~, ./, \, several parts, drive letters...
    return Path(ref).expanduser().exists()  # 'owner/name' that is a folder here is loaded from disk


def check_model_reference(reference: str, *, allow_local: bool, trusted: Iterable[Optional[str]] = (),
                          kind: str = "model", example: Optional[str] = None) -> str:
    """The stripped reference, or :class:`ModelReferenceRefused` when a user may not give it.

    ``trusted`` holds the references the operator configured: they pass whatever they are. ``kind``
    names the kind of model in the refusal, ``example`` is a Hugging Face id of that kind it suggests.
    """
    ref = (reference or "").strip()
    if allow_local or not ref or ref in {t.strip() for t in trusted if t}:
        return ref
    if looks_like_local_path(ref):
        hub_id = f"such as '{example}'" if example else "('owner/name')"
        raise ModelReferenceRefused(
            f"This server is shared, so a {kind} cannot be loaded from a local path. Choose a listed {kind} "
            f"or give a Hugging Face model id {hub_id}. (Whoever runs the server can allow local folders with "
            "--allow-local-models.)")
    return ref


# --------------------------------------------------------------------------- logins
def parse_auth_lines(lines: Iterable[str], source: str) -> list[tuple[str, str]]:
    """``user:password`` pairs; blank lines and ``#`` comments are skipped."""
    pairs: list[tuple[str, str]] = []
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        user = user.strip()
        if not sep or not user or not password:
            raise AuthConfigError(f"{source}, line {number}: expected 'user:password' (the password may not be "
                                  "empty).")
        pairs.append((user, password))
    return pairs


def read_auth_file(path: Path) -> list[tuple[str, str]]:
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AuthConfigError(f"Cannot read the auth file {path}: {exc.strerror or exc}.") from exc
    try:
        if path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
            log.warning("the auth file %s is readable by other users; `chmod 600 %s` keeps the passwords private",
                        path, path)
    except OSError:
        pass
    pairs = parse_auth_lines(text.splitlines(), str(path))
    if not pairs:
        raise AuthConfigError(f"The auth file {path} holds no 'user:password' line.")
    return pairs


def load_auth(cli_pairs: Sequence[str] = (), auth_file: Optional[Path] = None,
              environ: Mapping[str, str] = os.environ) -> Optional[list[tuple[str, str]]]:
    """Every login from ``--auth``, ``--auth-file`` and ``VOICE_STUDIO_AUTH``; None when none is set."""
    pairs = parse_auth_lines(cli_pairs, "--auth")
    if auth_file:
        pairs += read_auth_file(Path(auth_file))
    env_value = environ.get("VOICE_STUDIO_AUTH")
    if env_value:
        pairs += parse_auth_lines(env_value.splitlines(), "VOICE_STUDIO_AUTH")
    users = [u for u, _ in pairs]
    duplicates = sorted({u for u in users if users.count(u) > 1})
    if duplicates:
        raise AuthConfigError(f"User(s) {', '.join(duplicates)} appear more than once in the logins.")
    return pairs or None
