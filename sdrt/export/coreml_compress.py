"""Core ML weight compression (coremltools.optimize) and what it costs the image, measured without Core ML.

The compression pass runs inside the conversion, after fp16 casting (as Apple's post-conversion palettization sees
the weights). Core ML predicts on macOS only, so the image PSNR is measured on torch: the compressed package is read
back and its weights decompressed (coremltools' own decompression of each constexpr op, the values Core ML computes
with), mapped to the torch parameters they came from, and loaded into the rewritten torch modules; the parameters
rounded to fp16, what an uncompressed package holds, give the reference. Both generate the same request through
sdrt's pipeline in fp32, so the difference is the compression.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sdrt.bundle import Manifest
from sdrt.errors import ExportError
from sdrt.export.convert import GATE_REQUEST, check_image_psnr
from sdrt.export.coreml_validation import signal_psnr
from sdrt.export.torch_backend import TorchBackend
from sdrt.runtime.request import GenerationRequest

log = logging.getLogger(__name__)

PALETTE6, INT8 = "palette6", "int8"
COMPRESSIONS = (PALETTE6, INT8)
# The components compressed, as Apple's torch2coreml --quantize-nbits (text encoder and UNet): the VAE's errors land
# on pixels directly and it is a small part of the weights; the safety checker's scores are thresholded.
COMPRESSED_COMPONENTS = ("text_encoder", "unet")
# Layers whose weights are compressed: convolutions and linear layers. The token embedding table (a gather) stays
# fp16, as Apple keeps it, and so do constants the converter folded (position embeddings, masks).
WEIGHT_OPS = ("conv", "linear")
# Weights of at most this many elements stay fp16 (coremltools' default threshold, stated for the record).
WEIGHT_THRESHOLD = 2048
# Below this image PSNR against the fp16 weights the export refuses to write: the int8 gate of sdrt's OpenVINO
# conversion (sdrt.export.openvino.MIN_PSNR_DB), for the same reason (a visible-but-faithful JPEG's cost).
MIN_PSNR_DB = 30.0
# A decompressed weight must be this close to the parameter its name maps to (6-bit palettes measure ~40 dB, int8
# ~50 dB; another tensor of the same shape ~0 dB): guards the name mapping the image measurement relies on.
WEIGHT_MAP_MIN_DB = 20.0
SUFFIXES = ("_palettized", "_quantized")  # what coremltools' compression passes append to a weight's name
FP16_SUFFIX = "_to_fp16"  # what coremltools appends to the name of a weight it casts to fp16
METHOD = ("torch fp32 with the package's compressed weights, decompressed as coremltools does, against the weights "
          "rounded to fp16 (an uncompressed package's); Core ML itself predicts on macOS only")


def compression_pipeline(mode: str):
    """coremltools' default pass pipeline followed by 6-bit k-means palettization (one 64-entry table per weight,
    Apple's --quantize-nbits 6) or symmetric int8 with a scale per output channel (linear_quantize_weights'
    defaults), on convolution and linear weights."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    if mode == PALETTE6:
        name, op = "palettize_weights", cto.OpPalettizerConfig(mode="kmeans", nbits=6, weight_threshold=WEIGHT_THRESHOLD)
    elif mode == INT8:
        name, op = "linear_quantize_weights", cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", weight_threshold=WEIGHT_THRESHOLD)
    else:
        raise ExportError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {mode!r}")
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.append_pass(f"compression::{name}")
    pipeline.set_options(f"compression::{name}", {"config": cto.OptimizationConfig(
        op_type_configs={op_type: op for op_type in WEIGHT_OPS})})
    return pipeline


def package_bytes(path: Path) -> int:
    """Bytes of every file in a .mlpackage folder."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def compressed_weights(path: Path) -> dict[str, tuple[np.ndarray, int]]:
    """Each compressed weight of a saved package by name: (decompressed fp16 values, bytes stored)."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load
    from coremltools.models.utils import _convert_model_spec_to_pymil_prog

    # No public API reads a package's program without running the converter's pipeline again (decompress_weights
    # does, at the cost of a conversion); this is the reader get_weights_metadata itself uses.
    model = ct.models.MLModel(str(path), skip_model_load=True)
    program = _convert_model_spec_to_pymil_prog(model, model.get_spec().specificationVersion, load)
    out = {}
    for op in program.functions["main"].operations:
        if op.op_type.startswith("constexpr_"):
            stored = sum(v.val.nbytes for v in op.inputs.values() if isinstance(getattr(v, "val", None), np.ndarray))
            out[op.name] = (op.materialized_val_inference(), stored)
    return out


def by_parameter(weights: dict[str, tuple[np.ndarray, int]], module: nn.Module) -> dict[str, np.ndarray]:
    """The decompressed weights keyed by the torch parameter each came from; ExportError when one maps to none or
    to a parameter it is not close to (WEIGHT_MAP_MIN_DB)."""
    parameters = {name.replace(".", "_"): name for name, _ in module.named_parameters()}
    out = {}
    for const, (value, _) in weights.items():
        key = next((const.removesuffix(s) for s in SUFFIXES if const.endswith(s)), const).removesuffix(FP16_SUFFIX)
        if key not in parameters:
            raise ExportError(f"Core ML compression: weight {const} maps to no torch parameter")
        name = parameters[key]
        want = module.get_parameter(name).detach().numpy()
        close = want.shape == value.shape and signal_psnr(want, value) >= WEIGHT_MAP_MIN_DB
        if not close:
            raise ExportError(f"Core ML compression: weight {const} is not a compression of the parameter {name}")
        out[name] = value
    return out


def compression_record(mode: str, path: Path, weights: dict[str, tuple[np.ndarray, int]]) -> dict:
    """Sizes for the manifest: the package, and its compressed weights as stored against their fp16 size."""
    return {
        "mode": mode, "weights": len(weights), "package_bytes": package_bytes(path),
        "weights_stored_bytes": sum(stored for _, stored in weights.values()),
        "weights_fp16_bytes": sum(2 * value.size for value, _ in weights.values()),
    }


def with_weights(module: nn.Module, weights: dict[str, np.ndarray]) -> nn.Module:
    """A copy of `module` with the named parameters replaced (fp32 copies of the given values)."""
    module = copy.deepcopy(module)
    for name, value in weights.items():
        module.get_parameter(name).data = torch.from_numpy(np.asarray(value, np.float32))
    return module


def rounded(module: nn.Module, names) -> dict[str, np.ndarray]:
    """The named parameters rounded to fp16, as an uncompressed package stores them."""
    return {name: module.get_parameter(name).detach().numpy().astype(np.float16) for name in names}


def image_psnr(root: Path, manifest: Manifest, modules: dict[str, nn.Module], weights: dict[str, dict], mode: str,
               request: GenerationRequest = GATE_REQUEST, gate: float = MIN_PSNR_DB) -> dict:
    """Generate `request` on torch with each compressed component's parameters rounded to fp16 and with its
    decompressed weights (`by_parameter` results; see the module docstring); ExportError below `gate` dB, else the
    manifest record."""
    def backend(which: str, label: str) -> TorchBackend:
        return TorchBackend({name: with_weights(module, weights.get(name, {}) if which == "compressed" else
                                                rounded(module, weights.get(name, {})))
                             for name, module in modules.items()}, label)

    record = check_image_psnr(
        root, manifest, root, manifest, reference=backend("reference", "torch fp32, weights rounded to fp16"),
        candidate=backend("compressed", f"torch fp32, {mode} weights decompressed"), gate=gate,
        what=f"{mode}-compressed weights'", request=request,
    )
    return {"mode": mode, **record, "method": METHOD}
