"""ONNX Runtime engine: CPU here; CUDA and DirectML providers are passed through but untested in this project."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import numpy as np
import onnxruntime as ort

from sdrt.backends.base import check_names
from sdrt.bundle import Component
from sdrt.contracts import Contract
from sdrt.errors import BackendError

log = logging.getLogger(__name__)

# sdrt device names -> ONNX Runtime execution providers (CPU is always appended as the fallback).
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",  # untested: no onnxruntime-gpu on the project's machines
    "dml": "DmlExecutionProvider",  # untested: DirectML needs Windows
}


class OnnxRuntimeSession:
    """One ONNX file in an InferenceSession; shapes stay dynamic, so `prepare` has nothing to do."""

    def __init__(self, path: Path, contract: Contract, options: ort.SessionOptions, providers: list[str]):
        self.contract = contract
        try:
            self._session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, NoSuchFile...)
            raise BackendError(f"onnxruntime cannot load {path}: {e}") from None
        inputs = [i.name for i in self._session.get_inputs()]
        outputs = [o.name for o in self._session.get_outputs()]
        check_names(contract, inputs, outputs, "onnxruntime")
        self._outputs = contract.output_names

    def prepare(self, dims: Mapping[str, int]) -> None:
        return None

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self._session.run(self._outputs, dict(feeds))
        return dict(zip(self._outputs, values))

    def close(self) -> None:
        self._session = None


class OnnxRuntimeBackend:
    """Opens bundle components with ONNX Runtime on the chosen device."""

    name = "onnxruntime"
    formats = ("onnx",)

    def __init__(self, device: str = "cpu", threads: int = 0, cache: bool = True):
        # `cache`: accepted so `--no-cache` applies to every backend; ONNX Runtime keeps no compiled models.
        if device not in PROVIDERS:
            raise BackendError(f"onnxruntime: unknown device {device!r}; choose one of: {', '.join(PROVIDERS)}")
        provider = PROVIDERS[device]
        if provider not in ort.get_available_providers():
            raise BackendError(
                f"onnxruntime: {provider} is not available in this install (have: {ort.get_available_providers()})"
            )
        self.providers = [provider] if device == "cpu" else [provider, PROVIDERS["cpu"]]
        self.threads = threads
        self.label = self.name if device == "cpu" else f"{self.name} {device}"

    def _options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads  # 0: one per physical core
        options.log_severity_level = 3  # warnings about unused initializers are noise to users
        return options

    def load(self, bundle: Path, component: Component) -> OnnxRuntimeSession:
        if component.format not in self.formats:
            raise BackendError(f"onnxruntime cannot run {component.name} stored as {component.format!r}")
        log.debug("onnxruntime: loading %s", component.file)
        return OnnxRuntimeSession(Path(bundle) / component.file, component.contract, self._options(), self.providers)
