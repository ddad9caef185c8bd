"""ONNX Runtime engine: CPU (tested), and on NVIDIA GPUs the CUDA and TensorRT-RTX providers with the bundle's fp16
variants (written against onnxruntime-gpu's documented API, untested: no GPU on the project's machines)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import numpy as np
import onnxruntime as ort

from sdrt.backends.base import WeightDeltas, check_names, is_frozen
from sdrt.backends.onnx_file import OnnxFile
from sdrt.backends.precision import FULL, guarded, model_file, resolve_precision
from sdrt.bundle import Component
from sdrt.contracts import Contract
from sdrt.errors import BackendError
from sdrt.weights_map import derive_onnx_map, plan, read_weights_map

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

    def __init__(
        self, model: Path | bytes, contract: Contract, options: ort.SessionOptions, providers: list[str], keep=(),
    ):
        self.contract = contract
        self._keep = keep  # buffers ORT reads from for the session's lifetime (add_external_initializers)
        try:
            self._session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                                 providers=providers)
        except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, NoSuchFile...)
            raise BackendError(f"onnxruntime cannot load {contract.component}: {e}") from None
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

    def __init__(self, model: Path | bytes, contract: Contract, options: ort.SessionOptions, providers: list[str],
                 device, keep=()):
        super().__init__(model, contract, options, providers, keep)
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

    def load(self, bundle: Path, component: Component, deltas: WeightDeltas | None = None):
        if component.format not in self.formats:
            raise BackendError(f"onnxruntime cannot run {component.name} stored as {component.format!r}")
        file, precision = model_file(component, self.precision)
        return guarded(self._open(Path(bundle), file, component, deltas), precision,
                       lambda: self._open(Path(bundle), component.file, component, deltas))

    def _open(self, bundle: Path, file: str, component: Component, deltas: WeightDeltas | None) -> OnnxRuntimeSession:
        log.debug("onnxruntime: loading %s", file)
        model, keep, options = None, [], self._options()
        if deltas and deltas.deltas:
            model, keep = _changed_model(bundle, file, component, deltas, options)
        source = model or bundle / file
        if self.device in CUDA_DEVICES:
            return OnnxRuntimeGpuSession(source, component.contract, options, self.providers, CUDA_DEVICES[self.device],
                                         keep)
        return OnnxRuntimeSession(source, component.contract, options, self.providers, keep)


def _changed_model(bundle: Path, file: str, component: Component, deltas: WeightDeltas, options: ort.SessionOptions):
    """The component's model `file` (its own, or a precision variant, whose initializers keep their names) with `deltas` added to its weights, before ONNX Runtime sees it: (the model's bytes
    with the changed in-file initializers rewritten, or None; the OrtValues of changed external ones).

    Not SessionOptions.add_initializer: ORT applies those after its graph optimizations, and the optimizations that
    rewrite a weight (folding fp16 storage's Cast, reordering Conv filters for NCHWc) read the file's value, so the
    override is silently lost. External initializers are injected when the graph is built, before optimization.
    Each new weight keeps its stored dtype: fp16 storage rounds weight + delta to fp16, as an fp16-stored export
    of the changed model would."""
    graph = OnnxFile(bundle / file)
    try:
        weights_map = read_weights_map(bundle, component) or derive_onnx_map(graph, component.name)
        if weights_map.format != "onnx":
            raise BackendError(f"{component.name}: its weights map is for {weights_map.format}, not onnx")
        values = {}
        for entry, delta in plan(weights_map, deltas, component.name):
            base = graph.array(entry.name)
            values[entry.name] = (base.astype(np.float32) + entry.to_engine(delta())).astype(base.dtype)
        model, external = graph.patched_source(values)
    finally:
        graph.close()
    if model is not None:  # read from memory: say where its external data (if any) is
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str((bundle / file).parent))
    keep = [ort.OrtValue.ortvalue_from_numpy(v) for v in external.values()]
    if keep:
        options.add_external_initializers(list(external), keep)
    return model, keep
