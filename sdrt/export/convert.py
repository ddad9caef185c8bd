"""The torch-free half of every conversion from an ONNX bundle: open and verify the source, copy the tokenizer,
the image gate (the converted bundle must draw the source's image within a PSNR), tool versions, provenance.
Each target's file (openvino.py, ...) converts the components and calls these."""
from __future__ import annotations

import logging
import math
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

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


def open_onnx_source(src: Path, out: Path | None = None) -> Manifest:
    """The verified manifest of the ONNX bundle at `src`; other formats cannot be converted, nor written over
    their own source `out` (the bundle being read would be replaced under the conversion)."""
    if out is not None and Path(out).resolve() == Path(src).resolve():
        raise ExportError(f"the output {out} is the source bundle: write the conversion elsewhere")
    manifest = read_manifest(src)
    verify_files(src, manifest)
    for comp in manifest.components.values():
        if comp.format != "onnx":
            raise ExportError(f"{src}: component {comp.name} is stored as {comp.format!r}; conversion reads ONNX")
    return manifest


def check_gate(gate: object) -> float:
    """A PSNR gate in dB: a finite number >= 0 (NaN would refuse every image, a negative one accept any)."""
    if isinstance(gate, bool) or not isinstance(gate, (int, float)) or not 0 <= gate < math.inf:
        raise ExportError(f"the PSNR gate must be a finite number of dB >= 0, got {gate!r}")
    return float(gate)


def copy_tokenizer(src: Path, manifest: Manifest, root: Path) -> None:
    """The tokenizer files travel unchanged."""
    for rel in (manifest.tokenizer.vocab, manifest.tokenizer.merges):
        _copy(src, root, rel)


def copy_tables(src: Path, manifest: Manifest, root: Path) -> None:
    """The arrays components build their inputs from (the text encoder's token embedding) travel unchanged."""
    for comp in manifest.components.values():
        for rel in comp.tables.values():
            _copy(src, root, rel)


def _copy(src: Path, root: Path, rel: str) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / rel, root / rel)


def reference_backend() -> Backend:
    """The engine a source bundle's gate image is drawn on: ONNX Runtime (the reference engine), else OpenVINO f32."""
    try:
        return get_backend("onnxruntime")
    except BackendError:
        log.info("onnxruntime is not installed: the gate image is drawn from the ONNX graphs on OpenVINO f32")
        return get_backend("openvino", precision="f32", cache=False)


class _Recorder:
    """A session that keeps a copy of every feed it runs."""

    def __init__(self, session, feeds: list[dict]):
        self.contract, self._session, self._feeds = session.contract, session, feeds

    def prepare(self, dims) -> None:
        self._session.prepare(dims)

    def run(self, feeds):
        self._feeds.append({name: np.array(array) for name, array in feeds.items()})
        return self._session.run(feeds)

    def close(self) -> None:
        self._session.close()


class RecordingBackend:
    """`backend`, recording the feeds of the components named in `names` (the UNet's inputs along a denoising
    trajectory: calibration for quantization, real inputs for validating a conversion) in `feeds[name]`."""

    formats = ("onnx",)

    def __init__(self, backend: Backend, names: tuple[str, ...]):
        self._backend, self.name, self.label = backend, backend.name, backend.label
        self.feeds: dict[str, list[dict]] = {name: [] for name in names}

    def load(self, bundle: Path, component):
        session = self._backend.load(bundle, component)
        return _Recorder(session, self.feeds[component.name]) if component.name in self.feeds else session


def check_image_psnr(
    src: Path, source: Manifest, root: Path, converted: Manifest, *, reference: Backend, candidate: Backend,
    gate: float, what: str, request: GenerationRequest = GATE_REQUEST, expected=None,
) -> dict:
    """Generate `request` on the source (on `reference`; `expected`: that image, when the caller drew it already)
    and the converted bundle (on `candidate`); raise ExportError below `gate` dB naming `what` was refused;
    returns the validation record for the manifest."""
    if expected is None:
        expected = reference_image(src, source, reference, request)
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


def reference_image(src: Path, source: Manifest, reference: Backend, request: GenerationRequest = GATE_REQUEST):
    """The gate request's image from the source bundle on `reference`."""
    with Pipeline(src, source, reference) as pipe:
        return pipe.generate(request)[0].image


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
