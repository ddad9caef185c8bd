"""ONNX Runtime engine: CPU (tested), and on NVIDIA GPUs the CUDA and TensorRT-RTX providers with the bundle's fp16
variants (written against onnxruntime-gpu's documented API, untested: no GPU on the project's machines)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import numpy as np
import onnxruntime as ort

from sdrt.backends.base import check_names, is_frozen
from sdrt.backends.precision import FULL, guarded, model_file, resolve_precision
from sdrt.bundle import Component
from sdrt.contracts import Contract
from sdrt.errors import BackendError

log = logging.getLogger(__name__)

# sdrt device names -> ONNX Runtime execution providers (CPU is always appended as the fallback).
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",  # untested: no onnxruntime-gpu on the project's machines
    "tensorrt-rtx": "NvTensorRTRTXExecutionProvider",  # untested: ORT builds with NVIDIA's TensorRT for RTX provider
    "dml": "DmlExecutionProvider",  # untested: DirectML needs Windows
}
# Devices whose sessions bind inputs and outputs on the GPU (ORT's OrtValue device name, device id).
CUDA_DEVICES = {"cuda": ("cuda", 0), "tensorrt-rtx": ("cuda", 0)}
GPU_DEVICES = {"cuda", "tensorrt-rtx", "dml"}


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


class OnnxRuntimeGpuSession(OnnxRuntimeSession):
    """On an NVIDIA GPU, through I/O binding: outputs are written to device memory and copied out once, and an
    input the pipeline froze (the loop's text embeddings, sdrt.backends.base.frozen) is uploaded once and stays on
    the device for every step. The latents themselves cross to the host each step: the samplers are numpy.
    Untested (no GPU here)."""

    def __init__(self, path: Path, contract: Contract, options: ort.SessionOptions, providers: list[str], device):
        super().__init__(path, contract, options, providers)
        self._device = device
        self._binding = self._session.io_binding()
        self._resident: dict[str, tuple[np.ndarray, ort.OrtValue]] = {}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, array in feeds.items():
            self._bind_input(name, array)
        for name in self._outputs:
            self._binding.bind_output(name, *self._device)
        self._session.run_with_iobinding(self._binding)
        return dict(zip(self._outputs, self._binding.copy_outputs_to_cpu()))

    def _bind_input(self, name: str, array: np.ndarray) -> None:
        if not is_frozen(array):
            self._binding.bind_cpu_input(name, array)
            return
        kept = self._resident.get(name)
        if kept is None or kept[0] is not array:
            kept = (array, ort.OrtValue.ortvalue_from_numpy(array, *self._device))
            self._resident[name] = kept
        self._binding.bind_ortvalue_input(name, kept[1])

    def close(self) -> None:
        self._resident.clear()
        self._binding = None
        super().close()


class OnnxRuntimeBackend:
    """Opens bundle components with ONNX Runtime on the chosen device and precision."""

    name = "onnxruntime"
    formats = ("onnx",)

    def __init__(self, device: str = "cpu", threads: int = 0, cache: bool = True, precision: str = "auto"):
        # `cache`: accepted so `--no-cache` applies to every backend; ONNX Runtime keeps no compiled models.
        # `precision`: auto runs the bundle's fp16 variants on GPUs and fp32 on the CPU; f16 and f32 force one.
        if device not in PROVIDERS:
            raise BackendError(f"onnxruntime: unknown device {device!r}; choose one of: {', '.join(PROVIDERS)}")
        provider = PROVIDERS[device]
        if provider not in ort.get_available_providers():
            raise BackendError(
                f"onnxruntime: {provider} is not available in this install (have: {ort.get_available_providers()})"
                + ("; pip install 'sdrt[onnxruntime-gpu]' in place of sdrt[onnxruntime]" if device == "cuda" else "")
            )
        self.device, self.providers = device, [provider] if device == "cpu" else [provider, PROVIDERS["cpu"]]
        self.threads = threads
        self.precision = resolve_precision(precision, self.name, gpu=device in GPU_DEVICES)
        suffix = "" if self.precision == FULL else f" {self.precision}"
        self.label = (self.name if device == "cpu" else f"{self.name} {device}") + suffix

    def _options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads  # 0: one per physical core
        options.log_severity_level = 3  # warnings about unused initializers are noise to users
        return options

    def load(self, bundle: Path, component: Component):
        if component.format not in self.formats:
            raise BackendError(f"onnxruntime cannot run {component.name} stored as {component.format!r}")
        file, precision = model_file(component, self.precision)
        return guarded(self._open(Path(bundle) / file, component), precision,
                       lambda: self._open(Path(bundle) / component.file, component))

    def _open(self, path: Path, component: Component) -> OnnxRuntimeSession:
        log.debug("onnxruntime: loading %s", path)
        if self.device in CUDA_DEVICES:
            return OnnxRuntimeGpuSession(path, component.contract, self._options(), self.providers,
                                         CUDA_DEVICES[self.device])
        return OnnxRuntimeSession(path, component.contract, self._options(), self.providers)
