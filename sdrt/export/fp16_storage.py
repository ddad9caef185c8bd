"""fp16 weight storage: large float32 weights kept as float16 in the file, each cast back to float32 by the graph.

Only storage changes: the graph still computes in fp32 and its inputs and outputs are those of its contract. ONNX
Runtime folds the casts into fp32 weights when it creates a session; OpenVINO reads an fp16 constant followed by a
Convert to f32 as its compressed-weights pattern. The torch reference is rounded by the same rule
(`round_to_fp16`), so the export's parity check measures the graph, not the rounding.
"""
from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

log = logging.getLogger(__name__)

WEIGHTS_STORAGE = ("fp32", "fp16")
# Smaller tensors (biases, norm scales, scalars) stay fp32: in the shipped model they are 0.5 % of the weight bytes,
# and scalars are where graphs keep shape arithmetic constants.
MIN_ELEMENTS = 1024
FP16_MAX = float(np.finfo(np.float16).max)  # 65504: larger magnitudes would become inf
# Ops that use a float weight only as values. A weight read by anything else (Cast to an integer, Resize scales,
# Range, Pow exponents...) might decide a shape or an integer, and stays fp32.
VALUE_OPS = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Gather", "Add", "Sub", "Mul", "Div", "Concat", "Transpose",
    "LayerNormalization", "GroupNormalization", "InstanceNormalization", "BatchNormalization",
})
STORED_SUFFIX = "_fp16"


def fits_fp16(values: np.ndarray) -> bool:
    """All finite and inside fp16's range."""
    return bool(np.isfinite(values).all()) and float(np.abs(values).max(initial=0.0)) <= FP16_MAX


def round_to_fp16(module: nn.Module) -> int:
    """Round, in place, the float32 parameters and buffers of a size `store_fp16` stores as fp16; returns how many.

    The rule is the same but for the consumer check, which needs the graph: a weight the graph then keeps fp32
    still holds these rounded values, so torch and the graph agree either way."""
    rounded = 0
    with torch.no_grad():
        for t in (*module.parameters(), *module.buffers()):
            if t.dtype == torch.float32 and t.numel() >= MIN_ELEMENTS and fits_fp16(t.detach().cpu().numpy()):
                t.copy_(t.half().float())
                rounded += 1
    return rounded


def store_fp16(model: onnx.ModelProto) -> tuple[int, int]:
    """Store `model`'s eligible float32 initializers as fp16 behind a Cast, in place; returns (bytes before, after)."""
    graph = model.graph
    consumers, inputs = _consumer_ops(graph), {i.name for i in graph.input}
    casts, before, after = [], 0, 0
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or init.name in inputs or not consumers[init.name] <= VALUE_OPS:
            continue
        values = numpy_helper.to_array(init)
        if values.size < MIN_ELEMENTS:
            continue
        if not fits_fp16(values):
            log.warning("%s: kept fp32, its values exceed fp16's range (max |x| %.3g)", init.name, np.abs(values).max())
            continue
        name, stored = init.name, numpy_helper.from_array(values.astype(np.float16), init.name + STORED_SUFFIX)
        init.CopyFrom(stored)
        casts.append(helper.make_node("Cast", [stored.name], [name], name=f"{name}_to_fp32", to=onnx.TensorProto.FLOAT))
        before, after = before + values.nbytes, after + values.nbytes // 2
    nodes = [*casts, *graph.node]  # the casts first: nodes must stay topologically sorted
    del graph.node[:]
    graph.node.extend(nodes)
    log.debug("fp16 storage: %d weights, %.1f MB -> %.1f MB", len(casts), before / 1e6, after / 1e6)
    return before, after


def _consumer_ops(graph: onnx.GraphProto, found: dict | None = None) -> dict[str, set[str]]:
    """Tensor name -> the op types that read it, subgraphs (If, Loop bodies) included."""
    found = defaultdict(set) if found is None else found
    for node in graph.node:
        for name in node.input:
            found[name].add(node.op_type)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else attr.graphs):
                _consumer_ops(sub, found)
    return found
