"""Trace a wrapper to ONNX with its contract's names and dynamic axes; large models keep weights in one .data file
(sdrt.export.onnx_files)."""
from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from sdrt.contracts import Contract
from sdrt.errors import ExportError
from sdrt.export.fp16_storage import store_fp16
from sdrt.export.onnx_files import EXTERNAL_DATA_THRESHOLD, save_onnx

log = logging.getLogger(__name__)

# Exporter noise that says nothing about this export: the legacy exporter's deprecation notices, and a constant
# folding pass that skips strided slices (the VAE encoder's chunk), which ONNX Runtime folds on load instead.
_EXPECTED_WARNINGS = (
    (DeprecationWarning, "You are using the legacy TorchScript-based ONNX export"),
    (DeprecationWarning, "The feature will be removed"),
    (UserWarning, "Constant folding - Only steps=1"),
)


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters and buffers as they will be stored."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def export_onnx(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    contract: Contract,
    path: Path,
    *,
    opset: int = 17,
    external_data: bool | None = None,
    weights_storage: str = "fp32",
) -> list[Path]:
    """Write `module` traced on `args` to `path`; returns the files written (the model, and its .data if external).

    `external_data` None decides by EXTERNAL_DATA_THRESHOLD. `weights_storage` "fp16" stores the large weights as
    fp16, cast to fp32 in the graph (sdrt.export.fp16_storage).
    """
    if external_data is None:
        external_data = parameter_bytes(module) > EXTERNAL_DATA_THRESHOLD
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".trace-", dir=path.parent) as scratch:
        traced = Path(scratch) / "model.onnx"
        _trace(module, args, contract, traced, opset)
        # The exporter may scatter weights over one file per tensor; loading gathers them for a single-file save.
        model = onnx.load(str(traced))
    if weights_storage == "fp16":
        store_fp16(model)
    return save_onnx(model, path, external_data)


def _trace(module: nn.Module, args: tuple, contract: Contract, path: Path, opset: int) -> None:
    # The TorchScript exporter records the shape arithmetic of diffusers' and transformers' Python code as graph
    # ops, so the dynamic axes follow. The dynamo exporter (torch 2.13, tiny SD UNet) took 59 s instead of 0.5 s,
    # hit a batch guard from Upsample2D's `shape[0] >= 64` branch, and wrote an opset-17 graph ONNX Runtime refuses
    # (Split with `num_outputs`, an opset-18 attribute). Tracer warnings about Python branches are expected: the
    # trace shape makes the taken branch the general one (components.CHECK_SHAPES), and parity checks the rest.
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            for category, message in _EXPECTED_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            torch.onnx.export(
                module, args, str(path), dynamo=False, opset_version=opset,
                input_names=contract.input_names, output_names=contract.output_names,
                dynamic_axes=contract.dynamic_axes(), do_constant_folding=True,
            )
    except (RuntimeError, TypeError, ValueError, torch.onnx.errors.OnnxExporterError) as e:
        raise ExportError(f"{contract.component}: ONNX export failed: {e}") from e
