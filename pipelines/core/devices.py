"""OpenVINO devices this machine offers, plus AUTO."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def available_devices() -> tuple[str, ...]:
    """Devices openvino.Core finds (e.g. CPU, GPU.0, NPU), followed by AUTO. Computed on first call."""
    import openvino as ov

    found = tuple(ov.Core().available_devices)
    return found + ("AUTO",) if found else ("CPU", "AUTO")


def default_device() -> str:
    return "CPU" if "CPU" in available_devices() else available_devices()[0]


def validate_device(device: str) -> str:
    """Return ``device`` if this machine offers it; raise ValueError with the choices if not."""
    device = (device or "").strip().upper()  # OpenVINO's names are upper case: "gpu.0" means GPU.0
    if device in available_devices():
        return device
    raise ValueError(
        f"Device '{device}' is not available here. Choose one of: {', '.join(available_devices())}."
    )
