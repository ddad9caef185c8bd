"""Record where each torch parameter went in an exported ONNX file, by value (the TensorRT demo's
`export_weights_map`): a parameter is the initializer holding its values, as they are or transposed."""
from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
from torch import nn

from sdrt.backends.onnx_file import OnnxFile
from sdrt.weights_map import MAP_FILE, EngineWeight, WeightsMap, torch_name

log = logging.getLogger(__name__)

FLOATS = (np.dtype(np.float32), np.dtype(np.float16))


def _digest(values: np.ndarray) -> str:
    """Identity of a tensor's values in C order as float32 (fp16 storage holds the fp16-rounded torch values, which
    float32 represents exactly; a reshape keeps the order, so [C] and [C, 1, 1] agree)."""
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.float32).tobytes()).hexdigest()


def match_weights(module: nn.Module, graph: OnnxFile, component: str) -> WeightsMap:
    """Torch parameter -> the one initializer whose values are the parameter's or its transpose's.

    Parameters whose values several initializers hold, or that share their values with another parameter (a
    random model's all-ones norm scales), cannot be told apart by value and are left out, logged."""
    by_value = defaultdict(list)
    for name, init in graph.initializers.items():
        if init.dtype in FLOATS:
            by_value[_digest(graph.array(name))].append(name)
    candidates = {}
    for scoped, param in module.named_parameters():
        value = param.detach().cpu().float().numpy()
        found = {init: False for init in by_value.get(_digest(value), ())}
        if value.ndim == 2:  # a symmetric matrix is found as it is first (setdefault keeps that)
            for init in by_value.get(_digest(value.T), ()):
                found.setdefault(init, True)
        candidates[torch_name(scoped, component)] = (tuple(value.shape), list(found.items()))
    claims = defaultdict(int)
    for _, found in candidates.values():
        for init, _ in found:
            claims[init] += 1
    weights = {
        name: _entry(graph, found[0], shape) for name, (shape, found) in candidates.items()
        if len(found) == 1 and claims[found[0][0]] == 1
    }
    left = sorted(set(candidates) - set(weights))
    log.info("%s: weights map holds %d of %d parameters%s", component, len(weights), len(candidates),
             f" (left out, values not unique: {', '.join(left[:3])}{'...' if len(left) > 3 else ''})" if left else "")
    return WeightsMap("onnx", weights)


def _entry(graph: OnnxFile, found: tuple[str, bool], shape: tuple[int, ...]) -> EngineWeight:
    init, transpose = found
    dims = graph.initializers[init].dims
    plain = shape[::-1] if transpose else shape
    return EngineWeight(init, shape, transpose, dims if dims != plain else ())


def write_weights_map(module: nn.Module, root: Path, model_file: str, component: str) -> str:
    """Write the map of `root/model_file` (exported from `module`) beside it; returns its path relative to `root`."""
    graph = OnnxFile(root / model_file)
    try:
        weights = match_weights(module, graph, component)
    finally:
        graph.close()
    rel = (Path(model_file).parent / MAP_FILE).as_posix()
    (root / rel).write_text(weights.to_json())
    return rel
