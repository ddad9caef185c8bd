"""Weights inside an OpenVINO model: find them by name, read them as float32, and replace them before compiling.

A weight is a Constant (named as in the bundle's weights map) feeding its layer directly or through the
decompression OpenVINO and NNCF insert: fp16 storage (f16 -> Convert), int8 weight compression (u8 -> Convert ->
Subtract zero point -> Multiply scale, per output channel, asymmetric: nncf INT8_ASYM) and quantized layers (i8 ->
Convert -> Multiply scale, per output channel, symmetric over [-127, 127]: NNCF's weight quantizer). A changed
weight is stored the way the original was: rounded to fp16, or quantized again with new per-channel scales (and
zero points) computed as NNCF computes them, so an int8 bundle stays int8 and runs the same kernels. Quantized
layers keep their activation ranges, which were calibrated on the unchanged model. A MatMul whose input NNCF's
SmoothQuant scales (x * s -> FakeQuantize -> MatMul with W / s) holds W / s: it is read and written through s.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import openvino as ov
from openvino import op

from sdrt.backends.base import WeightDeltas
from sdrt.errors import BackendError
from sdrt.weights_map import EngineWeight, WeightsMap, module_of, plan

# Layers whose weight is one input (port) -> port; Gather reads an embedding table.
WEIGHT_PORTS = {"MatMul": 1, "Convolution": 1, "GroupConvolution": 1, "Gather": 0}
UINT8_LEVELS = (0, 255)
INT8_LEVELS = (-127, 127)  # narrow range: NNCF's symmetric weight quantizer never uses -128
SMOOTH_QUANT = "nncf_smooth_quant"  # the name NNCF gives the Multiply that scales a smoothed layer's input


@dataclass
class StoredWeight:
    """A weight's data Constant and the decompression after it: zero point and scale Constants, if quantized."""

    data: ov.Node
    zero_point: ov.Node | None = None
    scale: ov.Node | None = None
    smoothing: np.ndarray | None = None  # SmoothQuant's input scale, shaped to multiply the stored weight

    def value(self) -> np.ndarray:
        """The weight as the model computes with it, float32, in the engine's layout."""
        w = self.data.get_data().astype(np.float32)
        if self.zero_point is not None:
            w = w - self.zero_point.get_data().astype(np.float32)
        w = w * self.scale.get_data().astype(np.float32) if self.scale is not None else w
        return w * self.smoothing if self.smoothing is not None else w

    def replace(self, value: np.ndarray) -> None:
        """Store `value` (float32, engine layout) as the original was stored."""
        value = value / self.smoothing if self.smoothing is not None else value
        kind = self.data.get_data().dtype
        if self.scale is None:
            _swap(self.data, value.astype(kind))
        elif self.zero_point is None:
            q, scale = _symmetric(value, self.scale.get_data())
            _swap(self.data, q.astype(kind))
            _swap(self.scale, scale)
        else:
            q, scale, zero_point = _asymmetric(value, self.scale.get_data())
            _swap(self.data, q.astype(kind))
            _swap(self.scale, scale)
            _swap(self.zero_point, zero_point.astype(self.zero_point.get_data().dtype))


def _swap(node: ov.Node, values: np.ndarray) -> None:
    new = op.Constant(np.ascontiguousarray(values))
    new.set_friendly_name(node.get_friendly_name())
    node.output(0).replace(new.output(0))


def _reduction_axes(scale: np.ndarray) -> tuple[int, ...]:
    """Axes a per-channel scale is shared over (where its shape is 1)."""
    return tuple(i for i, n in enumerate(scale.shape) if n == 1)


def _symmetric(w: np.ndarray, old_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NNCF's symmetric int8 weights: scale = max|w| / 127 per channel, q = round(w / scale)."""
    low, high = INT8_LEVELS
    amax = np.abs(w).max(axis=_reduction_axes(old_scale), keepdims=True)
    scale = np.maximum(amax / high, np.finfo(np.float32).eps).astype(old_scale.dtype)
    return np.clip(np.round(w / scale.astype(np.float32)), low, high), scale


def _asymmetric(w: np.ndarray, old_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """nncf INT8_ASYM (calculate_integer_quantization_params): the range [min, max] widened to hold 0, scale =
    (max - min) / 255, zero point = -round(min / scale); q = round(w / scale) + zero point, clipped to u8."""
    low, high = UINT8_LEVELS
    axes = _reduction_axes(old_scale)
    lo = np.minimum(w.min(axis=axes, keepdims=True), 0.0)
    hi = np.maximum(w.max(axis=axes, keepdims=True), 0.0)
    scale = np.maximum((hi - lo) / (high - low), np.finfo(old_scale.dtype).eps).astype(old_scale.dtype)
    scale32 = scale.astype(np.float32)
    zero_point = np.clip(low - np.round(lo / scale32), low, high)
    return np.clip(np.round(w / scale32) + zero_point, low, high), scale, zero_point


def stored_weight(data: ov.Node) -> StoredWeight:
    """The Constant `data` with the decompression that follows it (walked down its single chain of consumers)."""
    node, stored = data, StoredWeight(data)
    while True:
        users = [t.get_node() for t in node.output(0).get_target_inputs()]
        if len(users) == 1 and users[0].get_type_name() == "MatMul":
            stored.smoothing = _smoothing(users[0])
        if len(users) != 1 or users[0].get_type_name() not in ("Convert", "Subtract", "Multiply"):
            return stored
        node = users[0]
        other = _other_constant(node, stored)
        if node.get_type_name() == "Subtract":
            stored.zero_point = other
        elif node.get_type_name() == "Multiply":
            if other is None:
                return stored
            stored.scale = other


def _other_constant(node: ov.Node, stored: StoredWeight) -> ov.Node | None:
    """The Constant on a binary op's second input (through a Convert), None when that input is not one."""
    if node.get_input_size() < 2:
        return None
    source = node.input_value(1).get_node()
    if source.get_type_name() == "Convert":
        source = source.input_value(0).get_node()
    return source if source.get_type_name() == "Constant" and source is not stored.data else None


def _smoothing(matmul: ov.Node) -> np.ndarray | None:
    """The per-input-channel scale NNCF's SmoothQuant multiplies a MatMul's input by, shaped for its weight."""
    source = matmul.input_value(0).get_node()
    if source.get_type_name() == "FakeQuantize":
        source = source.input_value(0).get_node()
    if source.get_type_name() != "Multiply" or not source.get_friendly_name().endswith(SMOOTH_QUANT):
        return None
    scale = next((i.get_source_output().get_node() for i in source.inputs()
                  if i.get_source_output().get_node().get_type_name() == "Constant"), None)
    if scale is None:
        return None
    s = scale.get_data().astype(np.float32).reshape(-1)
    # transpose_b: the weight is [out, in] and the input channels are its columns; else [in, out], its rows.
    return s[None, :] if matmul.get_attributes().get("transpose_b", False) else s[:, None]


def data_constant(layer: ov.Node, port: int) -> ov.Node | None:
    """The Constant holding a layer's weight values: up its weight input through Convert, Subtract and Multiply."""
    node = layer.input_value(port).get_node()
    while node.get_type_name() in ("Convert", "Subtract", "Multiply"):
        node = node.input_value(0).get_node()
    return node if node.get_type_name() == "Constant" else None


def derive_openvino_map(model: ov.Model, component: str) -> WeightsMap:
    """The weights map of an OpenVINO model, from its layers' scope names (sdrt.weights_map.module_of)."""
    weights = {}
    for layer in model.get_ordered_ops():
        port = WEIGHT_PORTS.get(layer.get_type_name())
        module = module_of(layer.get_friendly_name(), component)
        data = data_constant(layer, port) if port is not None and module else None
        if data is None:
            continue
        dims = tuple(data.get_output_shape(0))
        # A MatMul without transpose_b computes x @ W: it holds torch's W.T (OpenVINO folds ONNX's transposes back).
        transpose = layer.get_type_name() == "MatMul" and not layer.get_attributes().get("transpose_b", False)
        weights[f"{module}.weight"] = EngineWeight(data.get_friendly_name(), dims[::-1] if transpose else dims,
                                                   transpose)
    return WeightsMap("openvino", weights, derived=True)


def constants(model: ov.Model) -> dict[str, ov.Node]:
    """The model's Constants by friendly name."""
    return {node.get_friendly_name(): node for node in model.get_ops() if node.get_type_name() == "Constant"}


def apply_deltas(model: ov.Model, weights_map: WeightsMap, deltas: WeightDeltas, component: str) -> None:
    """Add `deltas` to the model's weights in place, each stored as its original was (fp16, int8 or float32)."""
    by_name = constants(model)
    for entry, delta in plan(weights_map, deltas, component):
        node = by_name.get(entry.name)
        if node is None:
            raise BackendError(f"{component}: the weights map names a Constant {entry.name!r} the model lacks")
        stored = stored_weight(node)
        stored.replace(stored.value() + entry.to_engine(delta()).astype(np.float32))
