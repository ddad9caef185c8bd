"""The one call shape every engine implements: named numpy arrays in, a dict of named numpy arrays out."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Protocol

import numpy as np

from sdrt.bundle import Component
from sdrt.contracts import Contract


class Session(Protocol):
    """One component of a bundle, loaded on one engine: load -> prepare (fix shapes, compile) -> run -> close."""

    contract: Contract

    def prepare(self, dims: Mapping[str, int]) -> None:
        """Fix the dynamic axes to `dims` and compile; engines with dynamic shapes may do nothing."""

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; feeds and outputs are named as in the contract (inputs are checked at the boundary, not here)."""

    def close(self) -> None:
        """Release the engine's resources."""


class Delta(Protocol):
    """A change to one weight, computed when the engine asks for it (a LoRA's `up @ down`, scaled)."""

    shape: tuple[int, ...]  # the torch parameter's shape, known before computing

    def __call__(self) -> np.ndarray:
        """The change, float32, in the torch parameter's layout."""


@dataclass(frozen=True)
class WeightDeltas:
    """Changes to some of a component's weights, keyed by torch parameter name (sdrt.weights_map), and a key that
    identifies them (the adapters' content hashes and strengths) for compiled-model caches."""

    key: str
    deltas: Mapping[str, Delta] = field(default_factory=dict)


class Backend(Protocol):
    """An engine: knows which component formats it runs and opens sessions on them.

    Weight changes (LoRA) are the `deltas` of `load`: the session runs the component with each named weight
    replaced by weight + delta. The engine finds its copy of each weight through the component's weights map
    (sdrt.weights_map.read_weights_map, or one derived from the graph for bundles that predate maps), checks names
    and shapes before touching anything (sdrt.weights_map.plan), and keeps the weight's storage (fp16, int8).
    ONNX Runtime rewrites the initializers before the session is built, OpenVINO replaces Constants before
    compiling; an engine built ahead of time applies them the same way after building: TensorRT refits the
    named weights (the engine must be built refittable), torch's AOTInductor updates the compiled model's
    constants. A compiled-model cache must put `deltas.key` in its key.
    """

    name: str
    formats: tuple[str, ...]
    label: str  # what PNG parameters report: the engine, and the device or precision when they change the numbers

    def load(self, bundle: Path, component: Component, deltas: WeightDeltas | None = None) -> Session:
        """Open `component` (its file relative to `bundle`) as a session, with `deltas` added to its weights."""


def check_names(contract: Contract, inputs: list[str], outputs: list[str], engine: str) -> None:
    """Fail at load time, with both lists, when an engine's graph does not carry the contract's tensor names."""
    from sdrt.errors import BackendError

    if sorted(inputs) != sorted(contract.input_names) or not set(contract.output_names) <= set(outputs):
        raise BackendError(
            f"{contract.component}: the {engine} graph has inputs {sorted(inputs)} and outputs {sorted(outputs)}, "
            f"expected inputs {sorted(contract.input_names)} and outputs {contract.output_names}"
        )


def frozen(array: np.ndarray) -> np.ndarray:
    """`array` made read-only and owning its memory (copied only when it is a view): a promise to engines that it
    will not change, so a GPU engine may keep its device copy while the same object is fed again (`is_frozen`)."""
    out = array if array.base is None else array.copy()
    out.setflags(write=False)
    return out


def is_frozen(array: np.ndarray) -> bool:
    """Whether `array` was made by `frozen` (or is otherwise read-only and owns its memory)."""
    return not array.flags.writeable and array.base is None
