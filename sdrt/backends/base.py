"""The one call shape every engine implements: named numpy arrays in, a dict of named numpy arrays out."""
from __future__ import annotations

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


class Backend(Protocol):
    """An engine: knows which component formats it runs and opens sessions on them."""

    name: str
    formats: tuple[str, ...]
    label: str  # what PNG parameters report: the engine, and the device or precision when they change the numbers

    def load(self, bundle: Path, component: Component) -> Session:
        """Open `component` (its file relative to `bundle`) as a session."""


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
