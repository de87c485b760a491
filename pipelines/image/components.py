"""The OpenVINO models of one image pipeline, compiled lazily per device and (static) shape.

A pipeline's components (text encoder, ControlNet, UNet, VAE decoder and, when present, the TAESD
decoder) are given as ``ov.Model`` objects or IR paths and compiled on first use, as optimum-intel
does. With static shapes (the default) a model is reshaped to the request's batch/height/width
before compiling: on a CPU that runs a 512x512 step about 1.8x faster than the dynamic-shape IR. A
request of another size recompiles it (seconds) and drops the previous one.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from pipelines.core import cpu_int8

if TYPE_CHECKING:  # pragma: no cover
    import openvino as ov

ModelSource = Union["ov.Model", str, Path]
ShapeKey = Optional[tuple]


class Components:
    """Compiled models by name, for one device; every method holds the pipeline's lock."""

    def __init__(self, sources: dict[str, Optional[ModelSource]], *, device: str, ov_config: Optional[dict],
                 core: Optional["ov.Core"], lock: threading.RLock, int8: bool = False, static_shapes: bool = True):
        self.sources = {name: source for name, source in sources.items() if source is not None}
        self.device = device
        self.ov_config = dict(ov_config or {})
        self.static_shapes = bool(static_shapes)
        self._core = core
        self._lock = lock
        self._int8 = int8
        self._compiled: dict[str, tuple[ShapeKey, Any]] = {}  # name -> (static shape key or None, compiled)
        self._residual_names: Optional[list[str]] = None

    def has(self, name: str) -> bool:
        return name in self.sources

    @property
    def core(self):
        if self._core is None:
            import openvino as ov

            self._core = ov.Core()
        return self._core

    def compiled(self, name: str, shapes: Optional[dict] = None):
        """The compiled model ``name`` on the current device, compiling it on first use.

        ``shapes`` (input name -> static shape) applies when ``static_shapes`` is on: the model is
        reshaped to them and recompiled whenever they change.
        """
        with self._lock:
            key = None
            if shapes and self.static_shapes:
                key = tuple(sorted((k, tuple(int(d) for d in v)) for k, v in shapes.items()))
            entry = self._compiled.get(name)
            if entry is not None and entry[0] == key:
                return entry[1]
            self._compiled.pop(name, None)  # free the old one before compiling its replacement
            compiled = self._compile(name, key)
            self._compiled[name] = (key, compiled)
            return compiled

    def compiled_now(self, name: str):
        """The model ``name`` as compiled now (None when it is not)."""
        entry = self._compiled.get(name)
        return entry[1] if entry is not None else None

    def _compile(self, name: str, key: ShapeKey):
        core, source = self.core, self.sources[name]
        # INT8 matmuls run as 1x1 convolutions on CPUs where that is faster (see cpu_int8)
        as_convolutions = (self._int8 and name in ("controlnet", "unet")
                           and cpu_int8.matmuls_as_convolutions(self.device))
        if key is not None or as_convolutions:
            model = source.clone() if hasattr(source, "clone") else core.read_model(str(source))
            if key is not None:
                model.reshape({k: list(v) for k, v in key})
            if as_convolutions:
                cpu_int8.int8_matmuls_as_convolutions(model)
        else:
            model = str(source) if isinstance(source, Path) else source
        try:
            return core.compile_model(model, self.device, self.ov_config)
        except RuntimeError as error:
            if self.device.split(":")[0].split(".")[0] not in (*core.available_devices, "AUTO", "HETERO", "MULTI"):
                raise ValueError(f"OpenVINO device {self.device!r} is not available here; choose one of: "
                                 f"{', '.join(core.available_devices)}.") from error
            raise

    def unet_residual_names(self) -> list[str]:
        """The UNet's ControlNet residual inputs, in the order of the ControlNet's outputs."""
        if self._residual_names is None:
            source = self.sources["unet"]
            model = source if hasattr(source, "inputs") else self.core.read_model(str(source))
            self._residual_names = [port.get_any_name() for port in model.inputs[3:]]
        return self._residual_names

    def denoisers(self, shapes: dict[str, dict]):
        """Compiled ControlNet and UNet for these shapes (UNet residual shapes = ControlNet outputs)."""
        controlnet = self.compiled("controlnet", shapes["controlnet"])
        unet_shapes = {}
        if not any(port.get_partial_shape().is_dynamic for port in controlnet.outputs):
            unet_shapes = dict(shapes["unet"])
            for name, port in zip(self.unet_residual_names(), controlnet.outputs):
                unet_shapes[name] = list(port.get_partial_shape().to_shape())
        return controlnet, self.compiled("unet", unet_shapes or None)

    @property
    def is_compiled(self) -> bool:
        return bool(self._compiled)

    def to(self, device: str) -> None:
        """Run on ``device`` from now on (compiled models are dropped and rebuilt lazily)."""
        with self._lock:
            if device != self.device:
                self._compiled.clear()
                self.device = device

    def release(self) -> None:
        """Drop the compiled models (frees their memory); the next call compiles again."""
        with self._lock:
            self._compiled.clear()
        import gc

        gc.collect()
