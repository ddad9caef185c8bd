"""Where each torch parameter of a component lives in its engine file: the map export records (weights_map.json).

Exported graphs lose the torch names of many weights: constant folding turns `x @ W.T` into a MatMul on a new
initializer `onnx::MatMul_N` holding W transposed, fp16 storage renames `W` to `W_fp16` behind a Cast, GroupNorm
scales become [C, 1, 1]. Export records, per component, torch name -> engine name and layout (the TensorRT demo's
`export_weights_map`, sdrt.export.weights_map); the backends read it to apply weight changes (LoRA) without
re-export. Bundles exported before the map get one derived from the graph's node names (`derive_onnx_map`): the
TorchScript exporter names each node after the module that ran it (`/unet/down_blocks.0/.../to_q/MatMul`), and
a Linear's or Conv's weight is that node's weight input.

Torch names are those of the diffusers / transformers module the component wraps (`down_blocks.0.resnets.0.
conv1.weight` for the UNet, `encoder.layers.0.self_attn.q_proj.weight` for a transformers 5 CLIP text encoder).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdrt.bundle import Component
from sdrt.errors import BundleError, RequestError

log = logging.getLogger(__name__)

MAP_FILE = "weights_map.json"
# transformers 4 nests CLIP's modules under `text_model.`, transformers 5 does not: LoRA files use the first form,
# bundles have either. Names are looked up in both spellings.
TEXT_MODEL_PREFIX = "text_model."
# Ops whose weight is one input (port) in ONNX: node type -> port. Gather reads an embedding table.
ONNX_WEIGHT_PORTS = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1, "Gather": 0}


@dataclass(frozen=True)
class EngineWeight:
    """One torch parameter in an engine file: the engine's name for it and how its layout differs."""

    name: str  # ONNX: the initializer; OpenVINO: the friendly name of the Constant holding the weight's data
    shape: tuple[int, ...]  # the torch parameter's shape
    transpose: bool = False  # the engine holds the 2-D weight transposed (a folded `x @ W.T`)
    engine_shape: tuple[int, ...] = ()  # as stored, when it differs from the (transposed) torch shape: a reshape

    def to_engine(self, value: np.ndarray) -> np.ndarray:
        """A tensor of the torch parameter's size (in its layout, or flattened as some LoRAs give it), in the
        engine's layout."""
        x = value.reshape(self.shape)
        x = x.T if self.transpose else x
        return x.reshape(self.engine_shape) if self.engine_shape else x

    def to_torch(self, value: np.ndarray) -> np.ndarray:
        """A tensor in the engine's layout, in the torch parameter's."""
        x = value.reshape(self.shape[::-1] if self.transpose else self.shape)
        return x.T if self.transpose else x

    def to_dict(self) -> dict:
        d = {"name": self.name, "shape": list(self.shape)}
        if self.transpose:
            d["transpose"] = True
        return {**d, "engine_shape": list(self.engine_shape)} if self.engine_shape else d

    @classmethod
    def from_dict(cls, d: dict) -> EngineWeight:
        return cls(d["name"], tuple(d["shape"]), bool(d.get("transpose", False)), tuple(d.get("engine_shape", ())))


@dataclass(frozen=True)
class WeightsMap:
    """Torch parameter name -> EngineWeight for one component file of `format` ("onnx", "openvino")."""

    format: str
    weights: dict[str, EngineWeight] = field(default_factory=dict)
    derived: bool = False  # read from node names of a bundle that has no recorded map (not saved)

    def find(self, name: str) -> EngineWeight | None:
        """The entry for `name`, written with or without transformers 4's `text_model.` prefix."""
        alias = name[len(TEXT_MODEL_PREFIX):] if name.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + name
        return self.weights.get(name) or self.weights.get(alias)

    def to_json(self) -> str:
        weights = {k: v.to_dict() for k, v in sorted(self.weights.items())}
        return json.dumps({"format": self.format, "weights": weights}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> WeightsMap:
        d = json.loads(text)
        return cls(d["format"], {k: EngineWeight.from_dict(v) for k, v in d["weights"].items()})


def read_weights_map(bundle: Path, component: Component) -> WeightsMap | None:
    """The component's recorded map, or None when it has none (exported before weights maps)."""
    if not component.weights_map:
        return None
    path = Path(bundle) / component.weights_map
    try:
        return WeightsMap.from_json(path.read_text())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BundleError(f"cannot read {component.name}'s weights map {path}: {e}") from None


def torch_name(scoped: str, component: str) -> str:
    """A wrapper's parameter name (`unet.conv_in.weight`) as the wrapped module's (`conv_in.weight`).

    The export wrappers (sdrt.export.wrappers) hold the model under the component's name; the VAE halves hold
    AutoencoderKL's own submodules (`decoder`, `post_quant_conv`), whose names already are the model's."""
    return scoped[len(component) + 1:] if scoped.startswith(component + ".") else scoped


def module_of(node_name: str, component: str) -> str | None:
    """The torch module a graph node ran in, from the exporter's scope name: `/unet/down_blocks.0/resnets.0/conv1/
    Conv` -> `down_blocks.0.resnets.0.conv1` (OpenVINO appends `/WithoutBiases` to ops it split from their bias)."""
    parts = [p for p in node_name.split("/") if p]
    if parts and parts[-1] == "WithoutBiases":
        parts.pop()
    if len(parts) < 2 or not node_name.startswith("/"):
        return None
    module = torch_name(".".join(parts[:-1]), component)
    # The text encoder's wrapper runs CLIP's encoder layers itself (sdrt.export.wrappers.TextEncoder), so their
    # scopes start at `layers.N`, not at the model's `encoder.layers.N`.
    return f"encoder.{module}" if component == "text_encoder" and module.startswith("layers.") else module


def derive_onnx_map(graph, component: str) -> WeightsMap:
    """The map of a bundle exported before weights maps, from node scopes: the weight input of each MatMul, Gemm,
    Conv and Gather node (through fp16 storage's Cast) is `<module>.weight`. `graph` is an sdrt.backends.
    onnx_file.OnnxFile. Covers the weights LoRA and embeddings change; biases and norms need the export's map."""
    casts = {n.outputs[0]: n.inputs[0] for n in graph.nodes if n.op_type == "Cast" and n.inputs[0] in graph.initializers}
    weights = {}
    for node in graph.nodes:
        port = ONNX_WEIGHT_PORTS.get(node.op_type)
        if port is None or len(node.inputs) <= port:
            continue
        source = casts.get(node.inputs[port], node.inputs[port])
        module = module_of(node.name, component)
        if source not in graph.initializers or module is None:
            continue
        dims = graph.initializers[source].dims
        if node.op_type == "MatMul" and len(dims) != 2:  # a batched product of activations, not a Linear
            continue
        # MatMul computes x @ W: the initializer is torch's W.T. Gemm says so with transB (torch's Linear: 1).
        transpose = node.op_type == "MatMul" or (node.op_type == "Gemm" and not node.ints.get("transB", 0))
        shape = dims[::-1] if transpose else dims
        weights[f"{module}.weight"] = EngineWeight(source, tuple(shape), transpose)
    log.info("%s: weights map derived from node names (%d weights): the bundle predates recorded maps",
             component, len(weights))
    return WeightsMap("onnx", weights, derived=True)


def _fits(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether a change of `shape` applies to a weight of `target`: equal, or the same outputs and size (A1111's
    finalize_updown reshapes such changes, e.g. a LoHa convolution's [out, in * k * k] to [out, in, k, k])."""
    return shape == target or (shape[:1] == target[:1] and np.prod(shape) == np.prod(target))


def plan(weights_map: WeightsMap, deltas, component: str) -> list:
    """[(EngineWeight, delta)] for `deltas` (sdrt.backends.base.WeightDeltas), all checked before any is computed:
    every name is in the map and every delta has its parameter's shape (a wrong shape would crash an engine)."""
    steps, missing, wrong, seen = [], [], [], {}
    for name, delta in deltas.deltas.items():
        entry = weights_map.find(name)
        if entry is not None and seen.setdefault(entry.name, name) != name:
            raise RequestError(f"{component}: {seen[entry.name]} and {name} are one weight; give one change for it")
        if entry is None:
            missing.append(name)
        elif not _fits(tuple(delta.shape), entry.shape):
            wrong.append(f"{name}: expected {list(entry.shape)}, got {list(delta.shape)}")
        else:
            steps.append((entry, delta))
    if missing:
        hint = (" (the bundle predates recorded weights maps and its graph does not name them: export it again "
                "with this sdrt)" if weights_map.derived else "")
        raise RequestError(f"{component} has no weight {', '.join(sorted(missing)[:4])}"
                           f"{f' and {len(missing) - 4} more' if len(missing) > 4 else ''}{hint}")
    if wrong:
        raise RequestError(f"{component}: weight shapes differ: {'; '.join(wrong[:4])}")
    return steps
