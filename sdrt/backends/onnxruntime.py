"""ONNX Runtime engine: CPU here; CUDA and DirectML providers are passed through but untested in this project."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import numpy as np
import onnxruntime as ort

from sdrt.backends.base import WeightDeltas, check_names
from sdrt.backends.onnx_file import OnnxFile
from sdrt.bundle import Component
from sdrt.contracts import Contract
from sdrt.errors import BackendError
from sdrt.weights_map import derive_onnx_map, plan, read_weights_map

log = logging.getLogger(__name__)

# sdrt device names -> ONNX Runtime execution providers (CPU is always appended as the fallback).
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",  # untested: no onnxruntime-gpu on the project's machines
    "dml": "DmlExecutionProvider",  # untested: DirectML needs Windows
}


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

    def load(self, bundle: Path, component: Component, deltas: WeightDeltas | None = None) -> OnnxRuntimeSession:
        if component.format not in self.formats:
            raise BackendError(f"onnxruntime cannot run {component.name} stored as {component.format!r}")
        log.debug("onnxruntime: loading %s", component.file)
        path, options = Path(bundle) / component.file, self._options()
        if not deltas or not deltas.deltas:
            return OnnxRuntimeSession(path, component.contract, options, self.providers)
        model, keep = _changed_model(Path(bundle), component, deltas, options)
        return OnnxRuntimeSession(model or path, component.contract, options, self.providers, keep)


def _changed_model(bundle: Path, component: Component, deltas: WeightDeltas, options: ort.SessionOptions):
    """The component's model with `deltas` added to its weights, before ONNX Runtime sees it: (the model's bytes
    with the changed in-file initializers rewritten, or None; the OrtValues of changed external ones).

    Not SessionOptions.add_initializer: ORT applies those after its graph optimizations, and the optimizations that
    rewrite a weight (folding fp16 storage's Cast, reordering Conv filters for NCHWc) read the file's value, so the
    override is silently lost. External initializers are injected when the graph is built, before optimization.
    Each new weight keeps its stored dtype: fp16 storage rounds weight + delta to fp16, as an fp16-stored export
    of the changed model would."""
    graph = OnnxFile(bundle / component.file)
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
                                         str((bundle / component.file).parent))
    keep = [ort.OrtValue.ortvalue_from_numpy(v) for v in external.values()]
    if keep:
        options.add_external_initializers(list(external), keep)
    return model, keep
