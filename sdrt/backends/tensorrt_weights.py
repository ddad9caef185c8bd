"""Refitting a TensorRT engine: the map from a bundle's weight names to the engine's, and new weight values.

Weights keep their names from the ONNX file through the engine: TensorRT's ONNX parser names each weight after the
initializer holding it (the TensorRT demo's refit path relies on the same: demo/Diffusion engine.py `refit` looks
initializers up by name in `Refitter.get_all_weights()`), and the fp16 variants keep every initializer's name
(sdrt.export.fp16_variant). So a bundle weight (an initializer of the component's reference ONNX file, as the
component's weights map names it) is the engine weight of the same name, held in the dtype of the file the engine
was built from: fp16 for a variant. `weight_name_map` checks that on a parsed network, without a GPU; `refit`
checks it again on the engine (`get_all_weights`, `get_weights_prototype`) before changing anything.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Mapping

import numpy as np

from sdrt.backends.tensorrt_build import Network, TensorRt
from sdrt.errors import BackendError

log = logging.getLogger(__name__)


def weight_name_map(network: Network, names: Iterable[str]) -> dict[str, str]:
    """Bundle weight name -> engine weight name, for each of `names` the parsed network holds as a weight (marking a
    weight refittable fails for a name the network does not know; with BuilderFlag.REFIT all weights are
    refittable anyway, so the marks change nothing)."""
    return {name: name for name in names if network.network.mark_weights_refittable(name)}


def changed_weights(steps, base: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    """New engine weights for `steps` [(engine weight, delta)] (sdrt.weights_map.plan's result): the engine's value
    (`base(name)`, read from the ONNX file the engine was built from) plus the delta in the engine's layout, summed
    in fp32 and stored back in the base's dtype (an fp16 variant's weight stays fp16)."""
    values: dict[str, np.ndarray] = {}
    for entry, delta in steps:
        current = values.get(entry.name)
        current = base(entry.name) if current is None else current
        change = np.asarray(entry.to_engine(delta()), np.float32).reshape(current.shape)
        values[entry.name] = (current.astype(np.float32) + change).astype(current.dtype)
    return values


def refit(trt: TensorRt, engine, values: Mapping[str, np.ndarray], logger) -> None:
    """Replace the named weights of a refittable `engine` in place (needs the GPU the engine lives on)."""
    t = trt.module
    refitter = t.Refitter(engine, logger)
    known = set(refitter.get_all_weights())
    missing = sorted(set(values) - known)
    if missing:
        raise BackendError(f"the engine has no refittable weight {', '.join(missing[:3])} (built without refit, or "
                           f"by a TensorRT that names weights differently)")
    for name, value in values.items():
        prototype = refitter.get_weights_prototype(name)
        want = np.dtype(t.nptype(prototype.dtype))
        if value.dtype != want or value.size != prototype.size:
            raise BackendError(f"engine weight {name}: expected {want} x {prototype.size}, got {value.dtype} x "
                               f"{value.size}")
        refitter.set_named_weights(name, t.Weights(np.ascontiguousarray(value)))
    if not refitter.refit_cuda_engine():
        raise BackendError(f"TensorRT could not refit {len(values)} weights: {logger.last_error()}")
    log.info("tensorrt: refitted %d weights", len(values))
