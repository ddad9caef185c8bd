"""Engines behind one Protocol, found by name through a registry that imports each lazily."""
from __future__ import annotations

import importlib
import importlib.util

from sdrt.backends.base import Backend, Session
from sdrt.errors import BackendError

# name -> (module, class, the pip distribution that provides the engine). The import happens on request.
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "onnxruntime": ("sdrt.backends.onnxruntime", "OnnxRuntimeBackend", "onnxruntime"),
}

__all__ = ["Backend", "Session", "available_backends", "get_backend", "backend_names"]


def backend_names() -> list[str]:
    """Every backend sdrt knows, installed or not."""
    return list(_REGISTRY)


def _engine_installed(name: str) -> bool:
    module = _REGISTRY[name][2]
    return importlib.util.find_spec(module) is not None


def available_backends() -> list[str]:
    """The backends whose engine is installed, in order of preference."""
    return [name for name in _REGISTRY if _engine_installed(name)]


def get_backend(name: str | None = None, **options) -> Backend:
    """Instantiate a backend by name (None: the first installed one); options go to its constructor."""
    if name is None:
        names = available_backends()
        if not names:
            raise BackendError("no inference engine is installed: pip install 'sdrt[onnxruntime]'")
        name = names[0]
    if name not in _REGISTRY:
        raise BackendError(f"unknown backend {name!r}; choose one of: {', '.join(_REGISTRY)}")
    module, cls, dist = _REGISTRY[name]
    if not _engine_installed(name):
        raise BackendError(f"backend {name!r} needs the {dist} package: pip install 'sdrt[{dist}]'")
    return getattr(importlib.import_module(module), cls)(**options)
