"""fp16 variants of ONNX graphs, for engines that take precision from the graph (TensorRT for RTX and TensorRT
10/11 build strongly typed networks; ONNX Runtime's CUDA provider runs what the graph says): weights and
activations fp16, inputs and outputs fp32 as the contract states, numerically sensitive operations fp32.

The converter is ONNX Runtime's `onnxruntime.transformers.float16` (its fork of onnxconverter-common's, the one ORT's
own Stable Diffusion fp16 pipeline uses: models/stable_diffusion/optimize_pipeline.py). Chosen over
onnxconverter-common 1.16's original because (1) it clamps weights to fp16's range (+-65504), where the original
clamps to +-1e4 and lifts magnitudes below 1e-7 by default; (2) an initializer read by both an fp32 (blocked) node
and fp16 nodes is kept in both precisions instead of rounded for both; (3) it ships inside onnxruntime, which the
conversion needs anyway for validation. A hand-written pass with onnx.helper would have to redo what it handles:
value_info types, Cast targets, Resize's float-only scales, subgraphs.

Kept fp32, and why:
- LayerNormalization, InstanceNormalization (how GroupNorm exports), GroupNormalization: mean and variance over up
  to 81920 values per group (SD 1.5 at 512 px: 20 channels x 64 x 64); torch autocast keeps layer_norm and
  group_norm in fp32 for this reason ("CUDA ops that can autocast to float32"), and TensorRT warns that fp16
  LayerNorm can overflow.
- every node computing the inputs of Sin and Cos (the UNet's timestep embedding): timesteps near 1000 are spaced
  0.5 apart in fp16 and the samplers evaluate fractional timesteps, so sin(t f) at f near 1 would be off by up to
  0.25; diffusers computes this embedding in fp32 in fp16 pipelines too (embeddings.get_timestep_embedding, then
  UNet2DConditionModel.get_time_embed casts the result).
- ONNX Runtime's default block list (Range, Min, Max, CumSum, TopK, ...: ops that compute indices or lack fp16
  kernels).
Softmax stays fp16: TensorRT fuses fp16 attention (MatMul, Softmax, MatMul) into one kernel that accumulates in fp32;
an fp32 Softmax between fp16 MatMuls would break that fusion and double the memory of the [heads, HW, HW] scores.
Initializers keep their names (TensorRT refits weights by name, sdrt.backends.tensorrt_weights).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import load_external_data_for_model

from sdrt.export.onnx_files import EXTERNAL_DATA_THRESHOLD, save_onnx

log = logging.getLogger(__name__)

FP32_OPS = ("LayerNormalization", "InstanceNormalization", "GroupNormalization")
SINUSOIDS = ("Sin", "Cos")
SUFFIX = ".fp16.onnx"


def variant_path(file: str) -> str:
    """Where a component file's fp16 variant goes: beside it (`unet/model.onnx` -> `unet/model.fp16.onnx`)."""
    return str(Path(file).with_suffix("")) + SUFFIX


def sinusoid_inputs(graph: onnx.GraphProto) -> set[str]:
    """Names of the nodes that compute the inputs of Sin and Cos (and those nodes), back to the graph's inputs."""
    producer = {out: node for node in graph.node for out in node.output}
    found: set[str] = set()
    stack = [node for node in graph.node if node.op_type in SINUSOIDS]
    while stack:
        node = stack.pop()
        if node.name not in found:
            found.add(node.name)
            stack.extend(producer[name] for name in node.input if name in producer)
    return found


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Give unnamed nodes a unique name (the converter blocks nodes by name)."""
    taken = {node.name for node in graph.node}
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = next(f"{node.op_type}_{i}_{k}" for k in range(len(taken) + 1)
                             if f"{node.op_type}_{i}_{k}" not in taken)
            taken.add(node.name)


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """Order the nodes so each follows the producers of its inputs, otherwise keeping their order (the converter
    appends the Casts it inserts at the end; ONNX requires topological order)."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    order, placed = [], set()
    for root in range(len(graph.node)):
        stack = [root]
        while stack:
            i = stack[-1]
            if i in placed:
                stack.pop()
                continue
            waiting = [producer[n] for n in graph.node[i].input if n in producer and producer[n] not in placed]
            if waiting:
                stack.extend(waiting)
                continue
            placed.add(i)
            order.append(graph.node[i])
            stack.pop()
    nodes = [onnx.NodeProto() for _ in order]
    for new, old in zip(nodes, order):
        new.CopyFrom(old)
    del graph.node[:]
    graph.node.extend(nodes)


def _skip_round_trips(graph: onnx.GraphProto, fp32_nodes: set[str]) -> int:
    """Remove fp32 -> fp16 -> fp32 cast pairs, so fp32 nodes read fp32 values unrounded. The converter treats each
    blocked node alone: it casts every fp32 graph input to fp16 at the start, casts a blocked node's outputs to
    fp16 and its inputs back to fp32, so a chain of fp32 nodes (the timestep embedding) still rounds between them
    (the timestep 987.3 became 987.5). A Cast to fp32 of a Cast to fp16 of a value known to be fp32 (an fp32 graph
    input, or an output of a node in `fp32_nodes`) is made to read that value (an fp32 -> fp32 Cast, which engines
    drop); Casts nobody reads any more go. Returns how many round trips were cut."""
    fp32 = {i.name for i in graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    fp32 |= {out for node in graph.node if node.name in fp32_nodes for out in node.output}
    producer = {out: node for node in graph.node for out in node.output}
    cut = 0
    for node in graph.node:
        source = producer.get(node.input[0]) if node.input else None
        if _cast_to(node) == onnx.TensorProto.FLOAT and source is not None and \
                _cast_to(source) == onnx.TensorProto.FLOAT16 and source.input[0] in fp32:
            node.input[0] = source.input[0]
            cut += 1
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [n for n in graph.node if n.op_type != "Cast" or n.output[0] in read]
    del graph.node[:]
    graph.node.extend(kept)
    return cut


def _cast_to(node: onnx.NodeProto) -> int | None:
    """A Cast node's target type, None for other nodes."""
    return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The fp16 variant of a shape-inferred model (see the module docstring for what stays fp32)."""
    from onnxruntime.transformers import float16

    _name_nodes(model.graph)
    blocked = sinusoid_inputs(model.graph)
    converted = float16.convert_float_to_float16(
        model, keep_io_types=True, disable_shape_infer=True, op_block_list=[*float16.DEFAULT_OP_BLOCK_LIST, *FP32_OPS],
        node_block_list=sorted(blocked),
    )
    fp32_nodes = blocked | {n.name for n in converted.graph.node if n.op_type in FP32_OPS}
    log.debug("fp16 variant: %d fp32 -> fp16 -> fp32 round trips removed", _skip_round_trips(converted.graph, fp32_nodes))
    _sort_nodes(converted.graph)
    return converted


def load_for_conversion(path: Path) -> onnx.ModelProto:
    """`path` with types inferred on the graph alone (so models over protobuf's 2 GiB work), then its weights."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    load_external_data_for_model(model, str(path.parent))
    return model


def weight_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def write_fp16_variant(src: Path, dst: Path) -> list[Path]:
    """Convert the ONNX file `src` to its fp16 variant at `dst` (weights in `dst`.data when large); returns the
    files written."""
    model = to_fp16(load_for_conversion(src))
    halves = sum(1 for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
    log.info("%s: fp16 variant with %d fp16 weights", dst.parent.name, halves)
    dst.parent.mkdir(parents=True, exist_ok=True)
    return save_onnx(model, dst, weight_bytes(model) > EXTERNAL_DATA_THRESHOLD)


def float_initializers(path: Path) -> dict[str, str]:
    """Initializer name -> dtype name of every float weight in `path` (values not read)."""
    model = onnx.load(str(path), load_external_data=False)
    floats = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}
    return {t.name: floats[t.data_type] for t in model.graph.initializer if t.data_type in floats}


def relative_error(expected: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(max abs error, that error relative to the largest magnitude of `expected`): scale-free across models; both
    infinite when `got` holds a NaN or inf (an overflowed variant must fail any tolerance, and NaN compares false)."""
    if not np.isfinite(got).all():
        return float("inf"), float("inf")
    error = float(np.max(np.abs(got.astype(np.float64) - expected)))
    return error, error / max(float(np.max(np.abs(expected))), 1e-12)
