"""How much memory this process can still have (Linux), and a check before work that needs a lot.

    available = min(MemAvailable of /proc/meminfo,
                    for this process's cgroup and each of its parents with a limit:
                    limit - usage + the reclaimable page cache (inactive_file))

cgroup v2 reads ``memory.max`` / ``memory.current`` / ``memory.stat`` (``inactive_file``); v1 reads
``memory.limit_in_bytes`` / ``memory.usage_in_bytes`` / ``memory.stat`` (``total_inactive_file``), where a
limit of about 2**63 means none. A container (Docker, a Hugging Face Space) is limited by its
cgroup, not by the host's free memory, which /proc/meminfo shows. ``VOICE_STUDIO_AVAILABLE_MEMORY_GB``
overrides the reading (for a host that reports it wrong, and for tests).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from pipelines.core.errors import Refused

GB = 1024 ** 3
ENV_AVAILABLE = "VOICE_STUDIO_AVAILABLE_MEMORY_GB"
_UNLIMITED = 1 << 60


def _meminfo_available(meminfo: Path = Path("/proc/meminfo")) -> Optional[int]:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_bytes(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
        return _UNLIMITED if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_headroom(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> Optional[dict]:
    """The tightest memory limit over this process's cgroup and its parents: ``{"cgroup", "limit", "usage",
    "reclaimable", "headroom"}`` in bytes, or None when no cgroup limits memory."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        _, controllers, relative = line.split(":", 2)
        if controllers == "":  # v2, unified
            base, names = root, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            base, names = root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        folder = base / relative.lstrip("/")
        while True:  # a parent's limit binds too
            limit, usage = _read_bytes(folder / names[0]), _read_bytes(folder / names[1])
            if limit is not None and usage is not None and limit < _UNLIMITED:
                reclaimable = _stat_value(folder / "memory.stat", names[2])
                room = limit - usage + reclaimable
                if best is None or room < best["headroom"]:
                    best = {"cgroup": str(folder), "limit": limit, "usage": usage, "reclaimable": reclaimable,
                            "headroom": room}
            if folder == base or folder.parent == folder:
                break
            folder = folder.parent
    return best


def available_memory() -> dict:
    """``{"available": bytes or None, "meminfo": bytes or None, "cgroup": cgroup_headroom() or None,
    "source": what decided}``."""
    override = os.environ.get(ENV_AVAILABLE, "").strip()
    if override:
        try:
            value = int(float(override) * GB)
        except ValueError:
            raise ValueError(f"{ENV_AVAILABLE} is {override!r}; set it to a number of gigabytes such as 16.") from None
        return {"available": value, "meminfo": None, "cgroup": None, "source": ENV_AVAILABLE}
    meminfo, cgroup = _meminfo_available(), cgroup_headroom()
    candidates = [(v, source) for v, source in ((meminfo, "free memory"), (cgroup and cgroup["headroom"], "cgroup"))
                  if v is not None]
    value, source = min(candidates) if candidates else (None, "unknown")
    return {"available": value, "meminfo": meminfo, "cgroup": cgroup, "source": source}


class NotEnoughMemory(Refused):
    """Work refused before it starts, because it would need more memory than this process can have."""

    def __init__(self, message: str, needed: int, available: int):
        super().__init__(message)
        self.needed, self.available = needed, available


def check_memory(needed: int, what: str, instead: str) -> dict:
    """Refuse (:class:`NotEnoughMemory`) work that needs about ``needed`` bytes when less is available;
    ``what`` names the work ("making the INT8 image models"), ``instead`` says what works without it.
    Returns the reading when there is enough (or when it cannot be read: nothing is refused then)."""
    info = available_memory()
    have = info["available"]
    if have is None or have >= needed:
        return info
    limit = info["cgroup"]["limit"] if info["source"] == "cgroup" else None
    where = f" (this container is limited to {limit / GB:.1f} GB)" if limit else ""
    raise NotEnoughMemory(
        f"Not enough free memory for {what}: it needs about {needed / GB:.1f} GB and {have / GB:.1f} GB is "
        f"available{where}. {instead} Or free memory (close other programs, or unload models with "
        "'Free memory') and try again.", needed, have)
