"""sdrt: Stable Diffusion exported once, run anywhere without torch."""
from __future__ import annotations

from sdrt.errors import BackendError, BundleError, ConfigError, ContractError, ExportError, RequestError, SdrtError

__version__ = "0.1.0"
__all__ = [
    "Pipeline", "GenerationRequest", "GeneratedImage", "__version__",
    "SdrtError", "BundleError", "ContractError", "RequestError", "ExportError", "BackendError", "ConfigError",
]

# Lazy (PEP 562): `import sdrt` stays cheap, and the export side never drags in the runtime (or vice versa).
_LAZY = {
    "Pipeline": "sdrt.runtime.pipeline",
    "GeneratedImage": "sdrt.runtime.pipeline",
    "GenerationRequest": "sdrt.runtime.request",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sdrt' has no attribute {name!r}")
