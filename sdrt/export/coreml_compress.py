"""Core ML weight compression (coremltools.optimize.coreml) and what it costs the image, measured without Core ML.

Core ML predicts on macOS only, so the image PSNR of a compressed bundle is measured on torch: the compressed
package's weights are read back and decompressed (coremltools' `decompress_weights`, the values Core ML computes
with), mapped to the torch parameters they came from (each checked equal to the uncompressed package's weight), and
loaded into the rewritten torch modules; the uncompressed package's fp16 weights, loaded the same way, give the
reference. Both generate the same request through sdrt's pipeline in fp32, so the difference is the compression.
"""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sdrt.bundle import Manifest
from sdrt.errors import ExportError
from sdrt.export.torch_backend import TorchBackend
from sdrt.runtime.image import max_pixel_difference, psnr
from sdrt.runtime.pipeline import Pipeline
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
# Weights of at most this many elements stay fp16 (coremltools' default threshold, stated so the read-back below
# lists exactly the weights compression may touch).
WEIGHT_THRESHOLD = 2048
# Below this image PSNR against the uncompressed bundle the export refuses to write: the int8 gate of sdrt's
# OpenVINO conversion (sdrt.export.openvino.MIN_PSNR_DB), for the same reason (a visible-but-faithful JPEG's cost).
MIN_PSNR_DB = 30.0
FP16_SUFFIX = "_to_fp16"  # what coremltools appends to the name of a weight it casts to fp16
METHOD = ("torch fp32 with the compressed package's weights, decompressed (coremltools decompress_weights), against "
          "the uncompressed package's fp16 weights; Core ML itself predicts on macOS only")


def compression_config(mode: str):
    """6-bit k-means palettization (one 64-entry table per weight, Apple's --quantize-nbits 6) or symmetric int8
    with a scale per output channel (coremltools' defaults for linear_quantize_weights)."""
    import coremltools.optimize.coreml as cto

    if mode == PALETTE6:
        op = cto.OpPalettizerConfig(mode="kmeans", nbits=6, weight_threshold=WEIGHT_THRESHOLD)
    elif mode == INT8:
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", weight_threshold=WEIGHT_THRESHOLD)
    else:
        raise ExportError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {mode!r}")
    return cto.OptimizationConfig(op_type_configs={name: op for name in WEIGHT_OPS})


def compress(mlmodel, mode: str):
    """The model with its convolution and linear weights compressed by `mode`."""
    import coremltools.optimize.coreml as cto

    config = compression_config(mode)
    if mode == PALETTE6:
        return cto.palettize_weights(mlmodel, config)
    return cto.linear_quantize_weights(mlmodel, config)


def package_bytes(path: Path) -> int:
    """Bytes of every file in a .mlpackage folder."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def compressed_weights(uncompressed, compressed, module: nn.Module) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Torch parameter name -> (uncompressed package value, decompressed compressed value) for every weight the
    compression changed; ExportError when one cannot be traced back to a parameter it equals."""
    import coremltools.optimize.coreml as cto

    dense = _weights(uncompressed)
    restored = _weights(cto.decompress_weights(compressed))
    parameters = {name.replace(".", "_"): p for name, p in module.named_parameters()}
    out = {}
    for name in sorted(set(restored) - set(dense)):  # compressed weights are renamed (..._palettized, ..._quantized)
        base = max((d for d in dense if name.startswith(d)), key=len, default=None)
        key = base.removesuffix(FP16_SUFFIX) if base else None
        if key not in parameters:
            raise ExportError(f"Core ML compression: weight {name} maps to no torch parameter")
        want = parameters[key].detach().numpy().astype(np.float16)
        if want.shape != dense[base].shape or not np.array_equal(want, dense[base]):
            raise ExportError(f"Core ML compression: weight {base} differs from the torch parameter {key}")
        out[_torch_name(key, module)] = (dense[base], restored[name])
    return out


def _weights(mlmodel) -> dict[str, np.ndarray]:
    import coremltools.optimize.coreml as cto

    return {name: meta.val for name, meta in cto.get_weights_metadata(mlmodel, weight_threshold=WEIGHT_THRESHOLD).items()}


def _torch_name(key: str, module: nn.Module) -> str:
    return next(name for name, _ in module.named_parameters() if name.replace(".", "_") == key)


def with_weights(module: nn.Module, weights: dict[str, np.ndarray]) -> nn.Module:
    """A copy of `module` with the named parameters replaced (fp32 copies of the given values)."""
    module = copy.deepcopy(module)
    for name, value in weights.items():
        module.get_parameter(name).data = torch.from_numpy(np.asarray(value, np.float32))
    return module


def image_psnr(root: Path, manifest: Manifest, modules: dict[str, nn.Module], weights: dict[str, dict],
               request: GenerationRequest, gate: float = MIN_PSNR_DB) -> dict:
    """Generate `request` on torch with each compressed component's uncompressed and decompressed weights (see the
    module docstring); ExportError below `gate` dB, else the manifest record."""
    images = {}
    for which, column in (("reference", 0), ("compressed", 1)):
        chosen = {name: with_weights(module, {p: pair[column] for p, pair in weights.get(name, {}).items()})
                  for name, module in modules.items()}
        with Pipeline(root, manifest, TorchBackend(chosen)) as pipe:
            images[which] = pipe.generate(request)[0].image
    measured = psnr(images["reference"], images["compressed"])
    log.info("compressed weights: image PSNR %.2f dB against the uncompressed weights (minimum %g)", measured, gate)
    if not measured >= gate:
        raise ExportError(f"the compressed weights' image is {measured:.2f} dB PSNR from the uncompressed one's, below "
                          f"the minimum of {gate:g} dB: refusing to write compressed weights")
    return {
        "psnr_db": round(measured, 2) if math.isfinite(measured) else None,
        "max_pixel_difference": max_pixel_difference(images["reference"], images["compressed"]),
        "min_psnr_db": gate, "method": METHOD,
        "request": {"prompt": request.prompt, "seed": request.seed, "steps": request.steps,
                    "sampler": request.sampler, "guidance_scale": request.guidance_scale,
                    "size": list(images["reference"].size)},
    }
