"""Export to Core ML: each component converted from its torch module to an ML Program (.mlpackage), as Apple's
ml-stable-diffusion (torch2coreml.py) does, since current coremltools has no ONNX front end.

Packages compute in fp16 (the safety checker in fp32, its scores are thresholded) with fp32 inputs and outputs, for
macOS 14 and later, at static shapes: the model's size, plus any sizes asked for as enumerated shapes of one model.
Every conversion is checked before it is written (sdrt.export.coreml_validation, coreml_package): the rewritten
modules against diffusers', the traced graph at every exported shape, the package's signature against the
contract, and on macOS the package's predictions against torch.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from sdrt.bundle import BundleWriter, Component, Manifest, ShapeRange
from sdrt.errors import ExportError
from sdrt.export import wrappers
from sdrt.export.components import ComponentSpec, axis_sizes, component_specs, sample_inputs
from sdrt.export.coreml_compress import COMPRESSED_COMPONENTS, COMPRESSIONS, by_parameter, compressed_weights, \
    compression_pipeline, compression_record, image_psnr, with_weights
from sdrt.export.coreml_package import check_package, check_prediction, compute_precision, coreml_inputs, \
    coreml_outputs
from sdrt.export.coreml_rewrites import ATTENTIONS, SPLIT_EINSUM, rewrite_unet, rewrite_vae
from sdrt.export.coreml_validation import MIN_PSNR_DB, VALIDATION_SEED, check_outputs, check_rewrites, torch_outputs
from sdrt.export.convert import tool_versions as converted_with
from sdrt.export.exporter import model_info, tool_versions, write_tables, write_tokenizer
from sdrt.export.safety import load_safety_checker, safety_spec
from sdrt.export.source import SourceModel, load_source

log = logging.getLogger(__name__)

TARGET = "coreml"
PACKAGE = "model.mlpackage"
# macOS 14 (iOS 17) runs palettized weights decompressed just in time rather than at load (ml-stable-diffusion
# README, "Weight Compression"): the memory saving that lets SD 1.5 fit beside the OS on an 8 GB Mac.
MINIMUM_TARGET = "macOS14"
# The Neural Engine's attention is the default: it runs on every compute unit (the GPU, marginally slower than
# `original` there, per Apple's attention.py), and `cpu_and_ne`, the compute units Apple recommends for 8 GB Macs
# (README FAQ Q4), needs it. `original` is Apple's pick for the GPUs of M-series Max and Ultra Macs (README
# benchmarks: CPU_AND_GPU with ORIGINAL).
DEFAULT_ATTENTION = SPLIT_EINSUM
# Batch each component is built for; the backend splits or pads larger and smaller batches. The UNet takes the
# guidance pair (unconditional, conditional) in one call, as Apple's (torch2coreml.py: batch 2 for CFG).
EXPORT_BATCH = {"unet": 2}
# Components converted when the source has them; TAESD is not (an ONNX-bundle feature, not asked of Core ML yet).
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder", "safety_checker")


@dataclass(frozen=True)
class Conversion:
    """One component to convert: the original's spec (contract, inputs), its Core ML form, the shapes to build."""

    spec: ComponentSpec
    module: nn.Module
    dims: tuple[dict[str, int], ...]
    # The diffusers model the rewrite replaced parts of, and its rewritten copy (None: converted unchanged).
    rewrite: tuple[nn.Module, nn.Module] | None = None

    @property
    def name(self) -> str:
        return self.spec.name


def export_coreml(
    source: Path | str,
    out: Path | str,
    *,
    attention: str | None = None,
    sizes: tuple[tuple[int, int], ...] = (),
    compression: str | None = None,
    overwrite: bool = False,
    safety_checker: bool = True,
    original_config: Path | str | None = None,
    prediction_type: str | None = None,
    taesd: Path | str | None = None,
) -> Manifest:
    """Export a diffusers folder or single file to a Core ML bundle at `out`; returns its manifest.

    `attention`: "split_einsum" (None: DEFAULT_ATTENTION) or "original". `sizes`: extra (width, height) pairs to
    build besides the model's own size. `compression`: "palette6" or "int8" for the text encoder's and UNet's
    weights, refused below an image PSNR of 30 dB against fp16 weights. A TAESD is not converted (yet).
    """
    attention = attention or DEFAULT_ATTENTION
    _check_options(attention, compression, taesd)
    with BundleWriter(out, overwrite=overwrite) as writer:
        model = load_source(source, original_config, prediction_type)
        info = model_info(model, prediction_type)
        exported = exported_sizes(model, info.default_size, info.vae_scale_factor, sizes)
        conversions = plan(model, source, attention, exported, info.vae_scale_factor, safety_checker)
        components, weights = {}, {}
        for job in conversions:
            mode = compression if job.name in COMPRESSED_COMPONENTS else None
            components[job.name], weights[job.name] = convert_component(job, writer.path, attention, mode)
        tokenizer = write_tokenizer(model, writer.path, components["text_encoder"])
        manifest = Manifest(
            model=info, components=components, scheduler={**model.scheduler, "prediction_type": info.prediction_type},
            tokenizer=tokenizer, shapes=shape_range(exported, _size_multiple(model, info.vae_scale_factor)),
            source=model.source, tools=_tools(compression),
        )
        if compression:
            record = image_psnr(writer.path, manifest, {j.name: j.module for j in conversions}, weights, compression)
            manifest = replace(manifest, source={**manifest.source, "compression": record})
        return writer.commit(manifest)


def _check_options(attention: str, compression: str | None, taesd) -> None:
    if taesd is not None:
        raise ExportError("--taesd: the tiny decoder is not converted to Core ML yet; export without it")
    if attention not in ATTENTIONS:
        raise ExportError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    if compression is not None and compression not in COMPRESSIONS:
        raise ExportError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")


def _size_multiple(model: SourceModel, vae_scale_factor: int) -> int:
    """Pixels an image side must be a multiple of: the UNet halves the latents once per level after the first."""
    return vae_scale_factor * 2 ** (len(model.unet.config.block_out_channels) - 1)


def exported_sizes(model: SourceModel, default: int, vae_scale_factor: int, sizes) -> tuple[tuple[int, int], ...]:
    """The model's own size first, then the asked-for (width, height) pairs, each checked, without repeats."""
    multiple, halvings = _size_multiple(model, vae_scale_factor), len(model.unet.config.block_out_channels) - 1
    out = [(default, default)]
    for width, height in sizes:
        if width <= 0 or height <= 0 or width % multiple or height % multiple:
            raise ExportError(f"Core ML sizes must be positive multiples of {multiple} pixels for this model (its UNet "
                              f"halves the latents {halvings} times), got {width}x{height}")
        if (width, height) not in out:
            out.append((width, height))
    return tuple(out)


def shape_range(sizes: tuple[tuple[int, int], ...], multiple: int) -> ShapeRange:
    """The manifest's sizes: exactly the exported ones."""
    sides = [side for size in sizes for side in size]
    return ShapeRange(min_size=min(sides), max_size=max(sides), multiple_of=multiple, sizes=sizes)


def plan(model: SourceModel, source, attention: str, sizes, vae_scale_factor: int, safety: bool) -> list[Conversion]:
    """Each component's original spec, its Core ML form (rewritten UNet and VAE) and the shapes to build."""
    specs = {s.name: s for s in component_specs(model)}
    checker = load_safety_checker(source) if safety else None
    if checker is not None:
        specs["safety_checker"] = safety_spec(*checker)
    unet, vae = rewrite_unet(model.unet, attention), rewrite_vae(model.vae, attention)
    forms = {
        "unet": (wrappers.UNet(unet), (model.unet, unet)),
        "vae_decoder": (wrappers.VaeDecoder(vae), (model.vae.decoder, vae.decoder)),
        "vae_encoder": (wrappers.VaeEncoder(vae), (model.vae.encoder, vae.encoder)),
    }
    sequence = specs["text_encoder"].contract.inputs[0].shape[1]
    jobs = []
    for name in (n for n in COMPONENTS if n in specs):
        module, rewrite = forms.get(name, (specs[name].module, None))
        jobs.append(Conversion(specs[name], module.eval(), static_dims(specs[name], sizes, vae_scale_factor, sequence),
                               rewrite))
    return jobs


def static_dims(spec: ComponentSpec, sizes, vae_scale_factor: int, sequence: int) -> tuple[dict[str, int], ...]:
    """The contract's named axes fixed for each size (repeats dropped: the text encoder has one shape)."""
    named = {d for t in (*spec.contract.inputs, *spec.contract.outputs) for d in t.shape if isinstance(d, str)}
    batch = EXPORT_BATCH.get(spec.name, 1)
    out = []
    for width, height in sizes:
        dims = axis_sizes((batch, height // vae_scale_factor, width // vae_scale_factor, sequence), vae_scale_factor)
        dims = {axis: size for axis, size in dims.items() if axis in named}
        if dims not in out:
            out.append(dims)
    return tuple(out)


def convert_component(job: Conversion, root: Path, attention: str, mode: str | None) -> tuple[Component, dict]:
    """Validate the Core ML form in torch, convert (compressing by `mode`), check and save
    `root/<name>/model.mlpackage`; returns the manifest entry and the decompressed weights by torch parameter name
    (for the image measurement)."""
    start = time.perf_counter()
    inputs = [sample_inputs(job.spec, dims, torch.Generator().manual_seed(VALIDATION_SEED)) for dims in job.dims]
    expected = torch_outputs(job.spec.module, inputs)
    traced, validation = validate_in_torch(job, inputs, expected, attention)
    rel = f"{job.name}/{PACKAGE}"
    (root / job.name).mkdir(parents=True, exist_ok=True)
    convert(job, traced, mode).save(str(root / rel))
    validation["package"] = check_package(root / rel, job.spec.contract, job.dims)
    weights = {}
    if mode:
        stored = compressed_weights(root / rel)
        weights = by_parameter(stored, job.module)
        validation["compression"] = compression_record(mode, root / rel, stored)
    # On macOS the package runs against torch with the very weights it holds (compression is measured on the image).
    reference = (lambda: torch_outputs(with_weights(job.module, weights), inputs)) if weights else (lambda: expected)
    validation["prediction"] = check_prediction(root / rel, job.spec.contract, inputs, reference, job.name)
    log.info("%s: converted to Core ML in %.1f s (%s)", job.name, time.perf_counter() - start,
             ", ".join(f"{k} {v}" for k, v in validation["rewrite"].items()) or "no rewritten modules")
    component = Component(
        job.name, rel, job.spec.contract, format=TARGET, precision=_precision(job), preprocess=job.spec.preprocess,
        validation={k: v for k, v in validation.items() if k != "attention" or v}, weights_storage=mode or "fp16",
        shapes=job.dims, tables=write_tables(job.spec, root, "fp16"),  # the token table: Core ML computes in fp16
    )
    return component, weights


def validate_in_torch(job: Conversion, inputs: list, expected: list, attention: str
                      ) -> tuple[torch.jit.ScriptModule, dict]:
    """The rewritten modules one by one, then the traced Core ML form at every shape, against diffusers'."""
    rewrites = check_rewrites(*job.rewrite, lambda: job.spec.module(*inputs[0])) if job.rewrite else {}
    traced, form_psnr = trace(job, inputs, expected)
    return traced, {
        "reference": "torch (diffusers' modules), fp32", "attention": attention if job.rewrite else None,
        "rewrite": rewrites, "form_psnr_db": form_psnr, "min_psnr_db": MIN_PSNR_DB,
        "shapes_checked": [{n: list(a.shape) for n, a in zip(job.spec.contract.input_names, args)} for args in inputs],
    }


def trace(job: Conversion, inputs: list, expected: list) -> tuple[torch.jit.ScriptModule, float | None]:
    """TorchScript of the Core ML form, traced at the first shape; run at every exported shape against the original
    module, it checks the rewrite and the trace's shape generality at once. Returns it with the lowest PSNR.

    Peephole optimization removes the Int(NumToTensor(size)) pairs tracing leaves around each shape read:
    coremltools 9 folds those to one-element arrays and int() of one is an error in NumPy 2.
    """
    with torch.no_grad():
        traced = torch.jit.trace(job.module, inputs[0], check_trace=False)
    torch._C._jit_pass_inline(traced.graph)
    torch._C._jit_pass_peephole(traced.graph, True)
    try:
        with torch.jit.optimized_execution(False):  # run once per shape: profiling and fusing would be wasted
            got = torch_outputs(traced, inputs)
    except RuntimeError as e:
        raise ExportError(f"{job.name}: the traced graph fails at another exported shape: {e}") from None
    return traced, check_outputs(job.name, "the traced Core ML form", expected, got)


def convert(job: Conversion, traced: torch.jit.ScriptModule, mode: str | None):
    """The ML Program, compressed by `mode`, built and described but not loaded (Core ML loads on macOS only)."""
    import coremltools as ct

    try:
        return ct.convert(
            traced, convert_to="mlprogram", minimum_deployment_target=getattr(ct.target, MINIMUM_TARGET),
            inputs=coreml_inputs(job.spec.contract, job.dims), outputs=coreml_outputs(job.spec.contract),
            compute_precision=compute_precision(job.spec.contract), skip_model_load=True,
            pass_pipeline=compression_pipeline(mode) if mode else None,
        )
    except (ValueError, TypeError, RuntimeError, NotImplementedError) as e:
        raise ExportError(f"{job.name}: coremltools cannot convert it: {e}") from None


def _precision(job: Conversion) -> str:
    return "fp32" if job.spec.contract.full_precision else "fp16"


def _tools(compression: str | None) -> dict:
    versions = {k: v for k, v in tool_versions().items() if k not in ("onnx", "onnxruntime")}
    return converted_with(versions, ("coremltools", *(("scikit-learn",) if compression == "palette6" else ())))
