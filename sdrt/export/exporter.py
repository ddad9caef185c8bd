"""export_bundle: load a checkpoint, export and validate each component, and commit the bundle atomically."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import sdrt
from sdrt.bundle import BundleWriter, Component, Manifest, ModelInfo, TokenizerInfo
from sdrt.errors import ExportError
from sdrt.export.clip_vocab import read_tokenizer_files
from sdrt.export.components import CHECK_SHAPES, ComponentSpec, axis_sizes, component_specs, sample_inputs
from sdrt.export.fp16_storage import WEIGHTS_STORAGE, fits_fp16, round_to_fp16
from sdrt.export.onnx_export import export_onnx, parameter_bytes
from sdrt.export.parity import check_parity, max_difference, torch_outputs
from sdrt.export.safety import load_safety_checker, safety_spec
from sdrt.export.source import SourceModel, load_source
from sdrt.export.taesd import load_taesd, taesd_spec
from sdrt.export.weights_map import write_weights_map

log = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction")
TOOLS = ("torch", "diffusers", "transformers", "onnx", "onnxruntime")
# Text-encoder widths of the two supported families: OpenAI CLIP ViT-L/14 (SD1) and OpenCLIP ViT-H/14 (SD2).
SD1_WIDTH, SD2_WIDTH = 768, 1024
TRACE_SEED = 0


def export_bundle(
    source: Path | str,
    out: Path | str,
    *,
    original_config: Path | str | None = None,
    prediction_type: str | None = None,
    opset: int = 17,
    overwrite: bool = False,
    taesd: Path | str | None = None,
    safety_checker: bool = True,
    weights_storage: str = "fp32",
) -> Manifest:
    """Export a diffusers folder or single file to a validated ONNX bundle at `out`; returns its manifest.

    `taesd`: an AutoencoderTiny folder to add as the optional `taesd_decoder`; None looks for a `taesd/` or
    `vae_tiny/` subfolder of a diffusers folder. `safety_checker`: export the folder's `safety_checker/` (with its
    `feature_extractor/` preprocessing) when it has one; False leaves it out. `weights_storage` "fp16" halves the
    files: large weights rounded to and stored as fp16, computed in fp32 (sdrt.export.fp16_storage).
    """
    if weights_storage not in WEIGHTS_STORAGE:
        raise ExportError(f"weights_storage must be one of {WEIGHTS_STORAGE}, got {weights_storage!r}")

    def export(spec: ComponentSpec, root: Path, vae_scale_factor: int) -> Component:
        return export_component(spec, root, opset, vae_scale_factor, weights_storage)

    return build_bundle(source, out, export, original_config=original_config, prediction_type=prediction_type,
                        overwrite=overwrite, taesd=taesd, safety_checker=safety_checker)


def build_bundle(
    source: Path | str,
    out: Path | str,
    export: Callable[[ComponentSpec, Path, int], Component],
    *,
    original_config: Path | str | None = None,
    prediction_type: str | None = None,
    overwrite: bool = False,
    taesd: Path | str | None = None,
    safety_checker: bool = True,
) -> Manifest:
    """Load a checkpoint, `export(spec, bundle folder, vae_scale_factor)` each of its components in the engine
    format of the caller (ONNX, torch.export...), write the tokenizer and commit the bundle at `out`."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ExportError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    with BundleWriter(out, overwrite=overwrite) as writer:  # checks `out` before the slow load
        model = load_source(source, original_config, prediction_type)
        info = model_info(model, prediction_type)
        found_by = "request" if prediction_type else model.prediction_type_from
        log.info("%s: %s, %s (decided by the %s)", info.name, info.family, info.prediction_type, found_by)
        specs = component_specs(model)
        tiny = load_taesd(taesd, source)
        if tiny is not None:
            specs.append(taesd_spec(tiny, info))
        safety = load_safety_checker(source) if safety_checker else None  # (module, preprocessing) or None
        if safety is not None:
            specs.append(safety_spec(*safety))
        components = {spec.name: export(spec, writer.path, info.vae_scale_factor) for spec in specs}
        tokenizer = write_tokenizer(model, writer.path, components["text_encoder"])
        scheduler = {**model.scheduler, "prediction_type": info.prediction_type}
        manifest = Manifest(
            model=info, components=components, scheduler=scheduler, tokenizer=tokenizer,
            source=model.source, tools=tool_versions(),
        )
        return writer.commit(manifest)


def export_component(
    spec: ComponentSpec, root: Path, opset: int, vae_scale_factor: int, weights_storage: str = "fp32",
) -> Component:
    """Export one component to `root/<name>/model.onnx`, check its parity, and describe it for the manifest.

    With fp16 weight storage the torch module's weights are rounded to fp16 first, in place: the graph is traced
    from the rounded module and validated against it, and the rounding's own effect is recorded beside.
    """
    rel = f"{spec.name}/model.onnx"
    log.info("%s: exporting (%.0f MB of weights)", spec.name, parameter_bytes(spec.module) / 1e6)
    start = time.perf_counter()
    fp32_outputs = None
    if weights_storage == "fp16":  # rounded as the file will be, torch then measures the graph alone
        fp32_outputs = torch_outputs(spec, CHECK_SHAPES, vae_scale_factor)
        round_to_fp16(spec.module)
    generator = torch.Generator().manual_seed(TRACE_SEED)
    trace_args = sample_inputs(spec, axis_sizes(CHECK_SHAPES[0], vae_scale_factor), generator)
    export_onnx(spec.module, trace_args, spec.contract, root / rel, opset=opset, weights_storage=weights_storage)
    weights_map = write_weights_map(spec.module, root, rel, spec.name)
    exported = time.perf_counter()
    rounded = torch_outputs(spec, CHECK_SHAPES, vae_scale_factor) if fp32_outputs is not None else None
    validation = check_parity(spec, root / rel, CHECK_SHAPES, vae_scale_factor, expected=rounded)
    log.info(
        "%s: exported in %.1f s, validated in %.1f s: max abs error %.2e (tolerance %g)", spec.name,
        exported - start, time.perf_counter() - exported, validation["max_abs_error"], spec.tolerance,
    )
    if fp32_outputs is not None:
        validation.update(fp16_record(spec, fp32_outputs, rounded))
    return Component(spec.name, rel, spec.contract, validation=validation, preprocess=spec.preprocess,
                     weights_storage=weights_storage, tables=write_tables(spec, root, weights_storage),
                     weights_map=weights_map)


def write_tables(spec: ComponentSpec, root: Path, weights_storage: str) -> dict[str, str]:
    """Save the component's tables as `<name>/<table>.npy` (fp16 under fp16 storage: already rounded by then)."""
    written = {}
    for table, tensor in spec.tables.items():
        values = tensor().detach().cpu().numpy()
        if weights_storage == "fp16" and fits_fp16(values):
            values = values.astype(np.float16)
        written[table] = f"{spec.name}/{table}.npy"
        np.save(root / written[table], values, allow_pickle=False)
    return written


def fp16_record(spec: ComponentSpec, fp32_outputs: list, rounded_outputs: list) -> dict:
    """What fp16 storage adds to a component's validation: the reference it was checked against, and how far
    rounding the weights moved torch's own outputs on the same inputs."""
    rounding = max_difference(fp32_outputs, rounded_outputs)
    log.info("%s: weights stored as fp16; rounding them moves torch's outputs by up to %.2e", spec.name, rounding)
    return {"reference": "torch, weights rounded to fp16", "weights_rounding_max_abs_error": rounding}


def model_info(model: SourceModel, prediction_type: str | None) -> ModelInfo:
    """What the runtime needs to drive the loop; `prediction_type` overrides the scheduler config's."""
    vae, unet = model.vae.config, model.unet.config
    vae_scale_factor = 2 ** (len(vae.block_out_channels) - 1)
    prediction = prediction_type or model.scheduler.get("prediction_type") or "epsilon"
    if prediction not in PREDICTION_TYPES:
        raise ExportError(f"the scheduler's prediction_type {prediction!r} is not one of {PREDICTION_TYPES}")
    return ModelInfo(
        family=model_family(model.text_encoder.config),
        prediction_type=prediction,
        latent_scale_factor=float(vae.scaling_factor),
        latent_channels=int(vae.latent_channels),
        vae_scale_factor=vae_scale_factor,
        default_size=int(unet.sample_size) * vae_scale_factor,
        name=model.name,
    )


def model_family(text_config) -> str:
    """"sd1" for an OpenAI CLIP text encoder, "sd2" for an OpenCLIP one.

    Full-size models are told apart by width (768 vs 1024). Other widths (tiny test models) by activation, the
    one architectural difference of the two towers: OpenAI CLIP uses quick_gelu, OpenCLIP exact gelu.
    """
    if text_config.hidden_size == SD1_WIDTH:
        return "sd1"
    if text_config.hidden_size == SD2_WIDTH:
        return "sd2"
    return "sd1" if text_config.hidden_act == "quick_gelu" else "sd2"


def write_tokenizer(model: SourceModel, root: Path, text_encoder: Component) -> TokenizerInfo:
    """vocab.json + merges.txt under `root/tokenizer`, padded to the text encoder's sequence length."""
    info = TokenizerInfo()
    try:
        pad_token, max_length = read_tokenizer_files(model.tokenizer_dir, root / Path(info.vocab).parent)
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(f"cannot read the tokenizer in {model.tokenizer_dir}: {e}") from None
    sequence = text_encoder.contract.inputs[0].shape[1]
    if max_length is not None and max_length != sequence:
        log.info("tokenizer model_max_length is %s; prompts are padded to the text encoder's %s", max_length, sequence)
    return TokenizerInfo(max_length=sequence, pad_token=model.pad_token or pad_token)


def tool_versions() -> dict[str, str]:
    """Versions of the libraries that produced the bundle."""
    from sdrt.export.convert import tool_versions as with_versions

    return with_versions({"sdrt": sdrt.__version__}, TOOLS)
