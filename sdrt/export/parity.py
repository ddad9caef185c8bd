"""Parity of an exported component: the exported form (an ONNX file on ONNX Runtime CPU, a torch.export program)
against the torch wrapper on the same random inputs."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, InvalidGraph, RuntimeException

from sdrt.errors import ExportError
from sdrt.export.components import ComponentSpec, axis_sizes, sample_inputs

log = logging.getLogger(__name__)

PARITY_SEED = 0
# ONNX Runtime's exceptions (not subclasses of RuntimeError): a graph that cannot load or run at a contract shape.
ORT_ERRORS = (Fail, InvalidArgument, InvalidGraph, RuntimeException)

# Runs the exported form on the torch inputs of one check shape: its outputs in contract order, as numpy.
Runner = Callable[[tuple[torch.Tensor, ...]], list[np.ndarray]]


def check_parity(spec: ComponentSpec, path: Path, shapes, vae_scale_factor: int, expected=None) -> dict:
    """Max abs error of the ONNX file at `path` on ONNX Runtime over `shapes` (see `compare`)."""
    options = ort.SessionOptions()
    # Torch and ONNX Runtime take turns on the same cores: ORT's idle threads must not spin through torch's turn.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except ORT_ERRORS as e:
        raise ExportError(f"{spec.name}: ONNX Runtime cannot load the exported model: {e}") from None

    def run(args: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
        feeds = {name: a.numpy() for name, a in zip(spec.contract.input_names, args)}
        try:
            return session.run(spec.contract.output_names, feeds)
        except ORT_ERRORS as e:
            shapes = {name: list(a.shape) for name, a in feeds.items()}
            raise ExportError(f"{spec.name}: the exported ONNX model fails at {shapes}: {e}") from None

    return compare(spec, run, shapes, vae_scale_factor, expected, "ONNX model")


def compare(spec: ComponentSpec, run: Runner, shapes, vae_scale_factor: int, expected=None,
            what: str = "model") -> dict:
    """Max abs error of `run` against the torch wrapper over `shapes`; raises ExportError above `spec.tolerance`,
    else returns the manifest record.

    `expected`: the module's `torch_outputs` at `shapes` when the caller has them already (else computed here).
    """
    expected = expected if expected is not None else torch_outputs(spec, shapes, vae_scale_factor)
    generator = torch.Generator().manual_seed(PARITY_SEED)  # the inputs torch_outputs drew, drawn again
    errors, checked = [], []
    for shape, want in zip(shapes, expected, strict=True):
        args = sample_inputs(spec, axis_sizes(shape, vae_scale_factor), generator)
        errors.append(_max_abs_error(spec, run(args), want, what))
        checked.append({name: list(a.shape) for name, a in zip(spec.contract.input_names, args)})
        log.debug("%s: max abs error %.3g at %s", spec.name, errors[-1], checked[-1])
    worst = float(np.max(errors))  # np.max propagates NaN, Python's max would drop it
    if not worst <= spec.tolerance:  # NaN fails too
        raise ExportError(
            f"{spec.name}: the exported {what} differs from torch by {worst:.3g} (max abs error), "
            f"above the tolerance {spec.tolerance:g}"
        )
    return {"max_abs_error": worst, "tolerance": spec.tolerance, "shapes": checked}


def torch_outputs(spec: ComponentSpec, shapes, vae_scale_factor: int) -> list[tuple[np.ndarray, ...]]:
    """The torch module's outputs at each of `shapes`, on the very inputs `compare` draws."""
    generator = torch.Generator().manual_seed(PARITY_SEED)
    return [tuple(t.numpy() for t in _torch_call(spec, sample_inputs(spec, axis_sizes(s, vae_scale_factor), generator)))
            for s in shapes]


def max_difference(a: list[tuple[np.ndarray, ...]], b: list[tuple[np.ndarray, ...]]) -> float:
    """Max abs difference of two `torch_outputs` results (bool outputs count a flip as 1)."""
    pairs = [(x, y) for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True)]
    return float(np.max([np.max(np.abs(x.astype(np.float32) - y.astype(np.float32))) for x, y in pairs]))


def _torch_call(spec: ComponentSpec, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = spec.module(*args)
    return out if isinstance(out, tuple) else (out,)


def _max_abs_error(spec: ComponentSpec, got: list[np.ndarray], expected: tuple[np.ndarray, ...], what: str) -> float:
    errors = []
    for name, want, have in zip(spec.contract.output_names, expected, got, strict=True):
        if have.shape != tuple(want.shape):
            raise ExportError(f"{spec.name}.{name}: the {what} gives shape {have.shape}, torch {tuple(want.shape)}")
        if have.dtype == np.bool_:  # a decision (the safety checker's flags): a flipped one is an error of 1
            have, want = have.astype(np.float32), want.astype(np.float32)
        errors.append(np.max(np.abs(have - want)))
    return float(np.max(errors))
