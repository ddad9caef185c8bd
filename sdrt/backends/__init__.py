"""Engines behind one Protocol, found by name through a registry that imports each lazily."""
from __future__ import annotations

import importlib
import importlib.util
import inspect
from typing import Iterable, NamedTuple

from sdrt.backends.base import Backend, Session, WeightDeltas
from sdrt.errors import BackendError


class Entry(NamedTuple):
    """Where a backend lives, the module that provides its engine, and the component formats it runs."""

    module: str
    cls: str
    dist: str  # the pip distribution that provides the engine (by default also sdrt's extra for it)
    formats: tuple[str, ...]  # as the class's `formats`, stated here so choosing one imports no engine
    modules: tuple[str, ...] = ()  # import names any of which provides the engine (default: `dist`)
    extra: str = ""  # sdrt's pip extra that installs it, when not named as `dist`

    @property
    def install(self) -> str:
        return f"pip install 'sdrt[{self.extra or self.dist}]'"


# In order of preference: the first installed backend that runs a bundle's formats is the default.
_REGISTRY: dict[str, Entry] = {
    "onnxruntime": Entry("sdrt.backends.onnxruntime", "OnnxRuntimeBackend", "onnxruntime", ("onnx",)),
    "openvino": Entry("sdrt.backends.openvino", "OpenVinoBackend", "openvino", ("openvino", "onnx")),
    # TensorRT for RTX, or TensorRT 10/11 where a user has it (sdrt.backends.tensorrt_build.load_tensorrt).
    "tensorrt": Entry("sdrt.backends.tensorrt", "TensorRtBackend", "tensorrt-rtx", ("onnx",),
                      ("tensorrt_rtx", "tensorrt")),
    "torch": Entry("sdrt.backends.torch", "TorchBackend", "torch", ("torch",)),
    "coreml": Entry("sdrt.backends.coreml", "CoreMLBackend", "coremltools", ("coreml",), extra="coreml"),
}

__all__ = ["Backend", "Session", "WeightDeltas", "available_backends", "get_backend", "backend_names"]


def backend_names() -> list[str]:
    """Every backend sdrt knows, installed or not."""
    return list(_REGISTRY)


def _engine_installed(name: str) -> bool:
    entry = _REGISTRY[name]
    return any(_findable(module) for module in entry.modules or (entry.dist,))


def _findable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or half-removed package counts as not installed
        return False


def available_backends(formats: Iterable[str] = ()) -> list[str]:
    """The installed backends that run every one of `formats`, in order of preference."""
    needed = set(formats)
    return [name for name, e in _REGISTRY.items() if needed <= set(e.formats) and _engine_installed(name)]


def get_backend(name: str | None = None, formats: Iterable[str] = (), **options) -> Backend:
    """Instantiate a backend by name (None: the first installed one that runs `formats`); options go to it."""
    chosen = name is None
    if chosen:
        name = _default_backend(set(formats))
    if name not in _REGISTRY:
        raise BackendError(f"unknown backend {name!r}; choose one of: {', '.join(_REGISTRY)}")
    entry = _REGISTRY[name]
    if not _engine_installed(name):
        raise BackendError(f"backend {name!r} needs the {entry.dist} package: {entry.install}")
    cls = getattr(importlib.import_module(entry.module), entry.cls)
    _check_options(name, cls, options, chosen)
    return cls(**options)


def _default_backend(formats: set[str]) -> str:
    names = available_backends(formats)
    if names:
        return names[0]
    engines = [e.install for e in _REGISTRY.values() if formats <= set(e.formats)]
    if not engines:
        raise BackendError(f"no sdrt backend runs components stored as {', '.join(sorted(formats))}")
    raise BackendError(
        f"no inference engine for {', '.join(sorted(formats)) or 'bundles'} is installed: " + " or ".join(engines)
    )


def _check_options(name: str, cls: type, options: dict, chosen: bool) -> None:
    """Reject options the backend does not take with the list it does, rather than a TypeError from __init__."""
    accepted = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        hint = " (it was the default for this bundle: name the backend the option is meant for)" if chosen else ""
        raise BackendError(
            f"backend {name!r} has no option {', '.join(unknown)}; its options are: {', '.join(accepted) or 'none'}"
            + hint
        )
