"""The torch side: export a Stable Diffusion checkpoint to a validated ONNX bundle (needs sdrt[export]).

Imports are lazy so the torch-free parts (`sdrt.export.openvino`, `sdrt.export.clip_vocab`) load without torch.
"""
from __future__ import annotations

import importlib

# public name -> the submodule defining it, imported on first access (PEP 562).
_LAZY = {
    "export_bundle": "sdrt.export.exporter",
    "convert_bundle": "sdrt.export.openvino",
    "export_coreml": "sdrt.export.coreml",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
