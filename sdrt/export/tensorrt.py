"""Convert an ONNX bundle for NVIDIA GPUs: fp16 variants of the text encoder and UNet beside the fp32 graphs,
validated against them on the CPU, then (optionally) TensorRT's view of every component, and engines built ahead of
time where a GPU is present. Needs no torch.

The converted bundle is still an ONNX bundle: every component keeps its fp32 file (the reference, and what an engine
falls back to when fp16 overflows, sdrt.backends.precision) and the text encoder and UNet gain an fp16 `variant`
that the tensorrt backend, and onnxruntime on a GPU, run. The VAE stays fp32: its decoder's activations exceed
fp16's range on SD 1.x (A1111's --no-half-vae exists for it), and it runs once per image, not once per step.

Each variant is compared with its fp32 graph on ONNX Runtime's CPU provider, on random inputs and on the real
inputs of the gate image's denoising, within VARIANT_TOLERANCE; then the whole image with both variants must stay
within MIN_PSNR_DB of the fp32 image (sdrt.export.convert). Both measurements go into the manifest.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from sdrt.backends import get_backend
from sdrt.bundle import BundleWriter, Component, Manifest, Variant
from sdrt.errors import BackendError, ExportError
from sdrt.export import fp16_variant
from sdrt.export.onnx_files import DATA_SUFFIX
from sdrt.export.convert import (
    GATE_REQUEST, RecordingBackend, check_gate, check_image_psnr, copy_tables, copy_tokenizer, open_onnx_source,
    provenance, reference_backend, reference_image, tool_versions,
)
from sdrt.runtime.request import GenerationRequest
from sdrt.runtime.text_encoder import TextEncoder
from sdrt.runtime.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

FP16_COMPONENTS = ("text_encoder", "unet")
# max |fp16 - fp32| / max |fp32| over a component's output, on every checked input. fp16 keeps 11 significant
# bits (relative rounding 4.9e-4 per value); through the whole graph the shipped model measures 8.1e-4 (text
# encoder) and 7.4e-4 (UNet), the tiny random test model 1.0e-3 and 2.0e-3. 1e-2 leaves 5x headroom for deeper
# models. An overflow (inf, NaN) fails it whatever its size; subtler damage can stay under it on small models (the
# timestep embedding rounded to fp16 did, on the shipped UNet), so that has a test of its own (tests/test_tensorrt.py).
VARIANT_TOLERANCE = {"text_encoder": 1e-2, "unet": 1e-2}
# The gate image (fp16 text encoder and UNet against fp32, both on ONNX Runtime's CPU provider). 30 dB is the low
# end of what 8-bit lossy image compression is considered acceptable at, the bar int8 OpenVINO bundles meet; fp16
# stays far above it on the shipped model (sdrt.export.openvino.MIN_PSNR_DB for the reasoning).
MIN_PSNR_DB = 30.0
RANDOM_SEED = 0
REAL_STEPS = 3  # UNet inputs compared per real trajectory: its first, middle and last step


def convert_bundle(
    src: Path | str, out: Path | str, *, check: bool = False, shapes: str = "static", overwrite: bool = False,
    psnr_gate: float | None = None, request: GenerationRequest = GATE_REQUEST,
) -> Manifest:
    """Convert the ONNX bundle `src` at `out` (see the module docstring). Then either `check`: parse every component
    with TensorRT and report, stopping before the engine build (sdrt.export.tensorrt_check; needs TensorRT); or build
    the engines for `shapes` into the engine cache where this machine has a GPU (logged and skipped where not)."""
    if check:
        from sdrt.export.tensorrt_check import require_tensorrt

        require_tensorrt()  # before the slow part: a missing TensorRT is a one-line error naming the install
    src, gate = Path(src), check_gate(MIN_PSNR_DB if psnr_gate is None else psnr_gate)
    source = open_onnx_source(src)
    with BundleWriter(out, overwrite=overwrite) as writer:
        components = {name: _copy_component(src, comp, writer.path) for name, comp in source.components.items()}
        copy_tokenizer(src, source, writer.path)
        copy_tables(src, source, writer.path)
        draft = replace(source, components=components, files={},
                        tools=tool_versions(source.tools, ("onnx", "onnxruntime")))
        recorder = RecordingBackend(reference_backend(), FP16_COMPONENTS)
        expected = reference_image(src, source, recorder, request)
        checked = {name: _validated(writer.path, draft, comp, recorder.feeds.get(name, []))
                   for name, comp in draft.components.items()}
        draft = replace(draft, components=checked)
        validation = check_image_psnr(src, source, writer.path, draft, reference=recorder,
                                      candidate=get_backend("onnxruntime", precision="f16"), gate=gate,
                                      what="fp16 bundle's", request=request, expected=expected)
        manifest = writer.commit(replace(draft, source=provenance(src, source, validation)))
    if check:
        from sdrt.export.tensorrt_check import check_bundle

        check_bundle(Path(out), manifest, shapes)
    else:
        _prebuild(Path(out), manifest, shapes)
    return manifest


def _copy_component(src: Path, comp: Component, root: Path) -> Component:
    """The component's fp32 files (and weights map) copied, and an fp16 variant written beside them for
    FP16_COMPONENTS."""
    for rel in dict.fromkeys([*(comp.files or _model_files(src, comp.file)), *filter(None, [comp.weights_map])]):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, root / rel)
    if comp.name not in FP16_COMPONENTS or comp.contract.full_precision:
        return replace(comp, variants={})
    file = fp16_variant.variant_path(comp.file)
    fp16_variant.write_fp16_variant(src / comp.file, root / file)
    return replace(comp, variants={"fp16": Variant(file, "fp16")})


def _model_files(root: Path, file: str) -> list[str]:
    data = f"{file}{DATA_SUFFIX}"
    return [file, data] if (root / data).exists() else [file]


def _validated(root: Path, manifest: Manifest, comp: Component, real: list[dict]) -> Component:
    """The component with its fp16 variant's measured error recorded; ExportError above VARIANT_TOLERANCE."""
    variant = comp.variants.get("fp16")
    if variant is None:
        return comp
    feeds = {"random": random_feeds(root, manifest, comp), "real": _spread(real)}
    reference, candidate = _session(root / comp.file, comp), _session(root / variant.file, comp)
    errors = {kind: [_error(comp, reference, candidate, f) for f in batch] for kind, batch in feeds.items()}
    worst = max((e for batch in errors.values() for e in batch), key=lambda e: e[1])
    tolerance = VARIANT_TOLERANCE[comp.name]
    log.info("%s: fp16 variant max error %.3g (%.2e of the output's range; tolerance %.0e)", comp.name, *worst,
             tolerance)
    if not worst[1] <= tolerance:
        raise ExportError(f"{comp.name}: the fp16 variant differs from fp32 by {worst[1]:.3g} of the output's range "
                          f"(max abs {worst[0]:.3g}), above the tolerance {tolerance:g}: refusing to write it")
    record = {
        "max_abs_error": worst[0], "relative_error": worst[1], "tolerance": tolerance,
        "metric": "max |fp16 - fp32| / max |fp32| over the outputs",
        "inputs": {kind: len(batch) for kind, batch in feeds.items()},
        "reference": "the component's fp32 graph on onnxruntime CPU",
        "fp32_ops": [*fp16_variant.FP32_OPS, "inputs of Sin/Cos"],
    }
    return replace(comp, variants={"fp16": replace(variant, validation=record)})


def _spread(feeds: list[dict]) -> list[dict]:
    """Up to REAL_STEPS feeds spread over a trajectory (first, middle, last)."""
    if len(feeds) <= REAL_STEPS:
        return feeds
    picks = np.linspace(0, len(feeds) - 1, REAL_STEPS).round().astype(int)
    return [feeds[i] for i in sorted(set(picks))]


def _error(comp: Component, reference, candidate, feeds: dict) -> tuple[float, float]:
    """(max abs error, relative error) of the variant's session against the fp32 one on `feeds`, worst output."""
    names = comp.contract.output_names
    try:
        expected, got = (dict(zip(names, s.run(names, feeds))) for s in (reference, candidate))
    except Exception as e:  # ORT's own exception types
        raise ExportError(f"{comp.name}: onnxruntime cannot run the fp32 graph or its fp16 variant: {e}") from None
    return max((fp16_variant.relative_error(expected[n], got[n]) for n in names), key=lambda e: e[1])


def _session(path: Path, comp: Component):
    """An ONNX Runtime CPU session on `path` (the validation reference: no engine options)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT's own exception types
        raise ExportError(f"{comp.name}: onnxruntime cannot load {path.name}: {e}") from None


def random_feeds(root: Path, manifest: Manifest, comp: Component) -> list[dict]:
    """Two random inputs at the model's default size: the token embeddings of random words, or standard normal
    latents and embeddings with fractional timesteps over [0, 1000) (the samplers' range)."""
    rng = np.random.default_rng(RANDOM_SEED)
    if comp.name == "text_encoder":
        tok = manifest.tokenizer
        tokenizer = ClipTokenizer.from_files(root / tok.vocab, root / tok.merges, max_length=tok.max_length,
                                             pad_token=tok.pad_token)
        encoder = TextEncoder(root, manifest, run=None)  # only its graph inputs: embeddings (ids in older bundles)
        return [encoder.feeds(tokenizer([_random_words(rng) for _ in range(2)])) for _ in range(2)]
    m = manifest.model
    latent = m.default_size // m.vae_scale_factor
    feeds = []
    for batch, sequence in ((2, manifest.tokenizer.max_length), (1, 2 * manifest.tokenizer.max_length)):
        dims = {"batch": batch, "latent_height": latent, "latent_width": latent, "sequence": sequence}
        feeds.append({spec.name: _random(rng, spec, dims) for spec in comp.contract.inputs})
    return feeds


def _random(rng: np.random.Generator, spec, dims: dict) -> np.ndarray:
    shape = spec.concrete_shape(dims)
    if spec.name == "timestep":
        return rng.uniform(0.0, 1000.0, shape).astype(spec.dtype)
    return rng.standard_normal(shape).astype(spec.dtype)


def _random_words(rng: np.random.Generator) -> str:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return " ".join("".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(rng.integers(3, 30)))


def _prebuild(out: Path, manifest: Manifest, shapes: str) -> None:
    """Build the engines for the default request size on this machine's GPU, where it has one (first use on the
    GPU machine builds them otherwise)."""
    try:
        backend = get_backend("tensorrt", shapes=shapes)
    except BackendError as e:
        log.info("engines not built ahead of time (%s); the tensorrt backend builds them on first use", e)
        return
    from sdrt.runtime.pipeline import Pipeline

    with Pipeline(out, manifest, backend) as pipe:
        pipe.generate(replace(GATE_REQUEST, steps=1))
    log.info("engines built for %s shapes at %d px, cached in %s", shapes, manifest.model.default_size,
             backend.engines.cache.root if backend.engines.cache else "memory")
