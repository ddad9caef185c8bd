"""Torch modules behind the runtime's Backend protocol, for export-time measurements through the real pipeline
(the image PSNR of Core ML weight compression, which cannot be predicted off macOS)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

from sdrt.bundle import Component
from sdrt.contracts import Contract
from sdrt.errors import BackendError


class TorchSession:
    """One wrapper module (its forward is the contract), run in fp32 on the CPU."""

    def __init__(self, module: nn.Module, contract: Contract):
        self.module, self.contract = module.eval(), contract

    def prepare(self, dims: Mapping[str, int]) -> None:
        return None

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = self.module(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.contract.input_names))
        outputs = out if isinstance(out, tuple) else (out,)
        return {name: t.numpy() for name, t in zip(self.contract.output_names, outputs, strict=True)}

    def close(self) -> None:
        return None


class TorchBackend:
    """Serves each component from the given wrapper modules, whatever format the bundle stores it in."""

    name = "torch"
    formats: tuple[str, ...] = ()  # chosen explicitly, never by a bundle's formats

    def __init__(self, modules: Mapping[str, nn.Module], label: str = "torch fp32"):
        self.modules, self.label = dict(modules), label

    def load(self, bundle: Path, component: Component) -> TorchSession:
        if component.name not in self.modules:
            raise BackendError(f"torch reference: no module for {component.name}")
        return TorchSession(self.modules[component.name], component.contract)
