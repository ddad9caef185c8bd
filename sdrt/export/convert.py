"""The torch-free half of every conversion from an ONNX bundle: open and verify the source, copy the tokenizer,
the image gate (the converted bundle must draw the source's image within a PSNR), tool versions, provenance.
Each target's file (openvino.py, ...) converts the components and calls these."""
from __future__ import annotations

import logging
import math
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from sdrt.backends import Backend, get_backend
from sdrt.bundle import MANIFEST, Manifest, read_manifest, sha256_file, verify_files
from sdrt.errors import BackendError, ExportError
from sdrt.runtime.image import max_pixel_difference, psnr
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.request import GenerationRequest

log = logging.getLogger(__name__)

# The fixed image a source and its conversion must agree on: a deterministic sampler, at the model's default size.
GATE_REQUEST = GenerationRequest(
    prompt="a red circle above a blue square", seed=1234, steps=12, guidance_scale=7.5, sampler="DPM++ 2M",
    safety_checker=False, watermark=False,  # the gate measures the conversion, not post-processing
)


def open_onnx_source(src: Path) -> Manifest:
    """The verified manifest of the ONNX bundle at `src`; other formats cannot be converted."""
    manifest = read_manifest(src)
    verify_files(src, manifest)
    for comp in manifest.components.values():
        if comp.format != "onnx":
            raise ExportError(f"{src}: component {comp.name} is stored as {comp.format!r}; conversion reads ONNX")
    return manifest


def copy_tokenizer(src: Path, manifest: Manifest, root: Path) -> None:
    """The tokenizer files travel unchanged."""
    for rel in (manifest.tokenizer.vocab, manifest.tokenizer.merges):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, root / rel)


def reference_backend() -> Backend:
    """The engine a source bundle's gate image is drawn on: ONNX Runtime (the reference engine), else OpenVINO f32."""
    try:
        return get_backend("onnxruntime")
    except BackendError:
        log.info("onnxruntime is not installed: the gate image is drawn from the ONNX graphs on OpenVINO f32")
        return get_backend("openvino", precision="f32", cache=False)


def check_image_psnr(
    src: Path, source: Manifest, root: Path, converted: Manifest, *, reference: Backend, candidate: Backend,
    gate: float, what: str, request: GenerationRequest = GATE_REQUEST,
) -> dict:
    """Generate `request` on the source (on `reference`) and the converted bundle (on `candidate`); raise
    ExportError below `gate` dB naming `what` was refused; returns the validation record for the manifest."""
    with Pipeline(src, source, reference) as pipe:
        expected = pipe.generate(request)[0].image
    with Pipeline(root, converted, candidate) as pipe:
        got = pipe.generate(request)[0].image
    measured = psnr(expected, got)
    log.info("%s: image PSNR %.2f dB against %s (minimum %.1f)", what, measured, reference.label, gate)
    if not measured >= gate:
        raise ExportError(
            f"the {what} image is {measured:.2f} dB PSNR from the source's on {reference.label}, below the minimum "
            f"of {gate:g} dB: refusing to write it"
        )
    return {
        "psnr_db": round(measured, 2) if math.isfinite(measured) else None,  # None: the images are identical
        "max_pixel_difference": max_pixel_difference(expected, got),
        "min_psnr_db": gate,
        "reference": f"source bundle on {reference.label}",
        "candidate": f"this bundle on {candidate.label}",
        "request": {"prompt": request.prompt, "seed": request.seed, "steps": request.steps,
                    "sampler": request.sampler, "guidance_scale": request.guidance_scale,
                    "size": [expected.width, expected.height]},
    }


def provenance(src: Path, source: Manifest, validation: dict) -> dict:
    """The converted bundle's `source` record: the model's identity, the ONNX manifest it came from, the gate."""
    origin = {"format": "onnx", "manifest_sha256": sha256_file(src / MANIFEST)}
    return {**source.source, "converted_from": origin, "validation": validation}


def tool_versions(tools: dict, names: tuple[str, ...]) -> dict:
    """The source's tool versions plus those of the packages that converted it."""
    versions = dict(tools)
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "unknown"
    return versions
