"""The `torch` target: each component as a torch.export program (`<name>/model.pt2`), device- and precision-free,
with the ONNX bundle's contracts and shape ranges as `torch.export.Dim`s, checked against the eager module like the
ONNX export. The torch backend (sdrt.backends.torch) compiles them with AOTInductor on the user's device."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from sdrt.backends.torch import MIN_TORCH
from sdrt.bundle import Component, Manifest, ShapeRange
from sdrt.contracts import BATCH, HEIGHT, LATENT_HEIGHT, LATENT_WIDTH, SEQUENCE, WIDTH
from sdrt.errors import ExportError
from sdrt.export.components import CHECK_SHAPES, ComponentSpec, axis_sizes, sample_inputs
from sdrt.export.exporter import TRACE_SEED, build_bundle, write_tables
from sdrt.export.onnx_export import parameter_bytes
from sdrt.export.parity import compare

log = logging.getLogger(__name__)

FORMAT = "torch"
PROGRAM = "model.pt2"
# The text encoder's batch counts prompt chunks (sdrt.runtime.prompts.encode_weighted: every 75-token chunk of
# every prompt in one call), so it has no bound; the image components see at most the guided batch.
UNBOUNDED_BATCH = frozenset({"text_encoder"})


def export_torch_bundle(source: Path | str, out: Path | str, **options) -> Manifest:
    """Export a diffusers folder or single file to a bundle of validated torch.export programs at `out`; `options`
    are build_bundle's (overwrite, and how the source is read: original_config, prediction_type, taesd,
    safety_checker)."""
    if torch.__version__ < MIN_TORCH:  # a TorchVersion: compares as a version, not as text
        raise ExportError(f"--target torch needs torch >= {MIN_TORCH} (as the torch backend), got {torch.__version__}")
    return build_bundle(source, out, export_program, **options)


def export_program(spec: ComponentSpec, root: Path, vae_scale_factor: int) -> Component:
    """Export one component to `root/<name>/model.pt2` with dynamic axes, check it at every CHECK_SHAPES shape
    (guards off, see `_check`), and describe it for the manifest."""
    rel = f"{spec.name}/{PROGRAM}"
    log.info("%s: exporting a torch.export program (%.0f MB of weights)", spec.name, parameter_bytes(spec.module) / 1e6)
    start = time.perf_counter()
    follow_sizes(spec.module, ShapeRange().max_size // vae_scale_factor)
    args = sample_inputs(spec, axis_sizes(CHECK_SHAPES[0], vae_scale_factor), torch.Generator().manual_seed(TRACE_SEED))
    try:
        with torch.no_grad():
            program = torch.export.export(spec.module, args, dynamic_shapes=dynamic_shapes(spec, vae_scale_factor))
    except (RuntimeError, TypeError, ValueError) as e:  # constraint violations are RuntimeErrors (UserError)
        raise ExportError(f"{spec.name}: torch.export failed: {e}") from e
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, root / rel)
    exported = time.perf_counter()
    validation = compare(spec, _runner(program), CHECK_SHAPES, vae_scale_factor, what="torch.export program")
    log.info("%s: exported in %.1f s, validated in %.1f s: max abs error %.2e (tolerance %g)", spec.name,
             exported - start, time.perf_counter() - exported, validation["max_abs_error"], spec.tolerance)
    return Component(spec.name, rel, spec.contract, format=FORMAT, validation=validation, preprocess=spec.preprocess,
                     tables=write_tables(spec, root, "fp32"))


def dynamic_shapes(spec: ComponentSpec, vae_scale_factor: int, shapes: ShapeRange = ShapeRange()) -> tuple:
    """The contract's named axes as `torch.export.Dim`s over the range ONNX bundles declare (ShapeRange): latents
    from min_size to max_size pixels, images the VAE factor times their latents, batches up to the guided batch
    (two per image), sequences of any length."""
    latent = {axis: Dim(axis, min=shapes.min_size // vae_scale_factor, max=shapes.max_size // vae_scale_factor)
              for axis in (LATENT_HEIGHT, LATENT_WIDTH)}
    batch_max = None if spec.name in UNBOUNDED_BATCH else 2 * shapes.max_batch
    dims = {
        BATCH: Dim(BATCH, min=1, max=batch_max),
        SEQUENCE: Dim(SEQUENCE, min=1),
        HEIGHT: vae_scale_factor * latent[LATENT_HEIGHT],
        WIDTH: vae_scale_factor * latent[LATENT_WIDTH],
        **latent,
    }
    return tuple({i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str)} for t in spec.contract.inputs)


def follow_sizes(module: nn.Module, max_latent: int) -> None:
    """Make diffusers' UNet pass every upsampler its output size, as it does for latents that are not a multiple
    of its overall upsampling factor (unet_2d_condition.py: `forward_upsample_size`).

    That test (`size % 2**num_upsamplers != 0`) is a branch on a dynamic size, which torch.export refuses over a
    range holding both answers. Both paths give the same values where both apply; the size-following one applies at
    every size (the ONNX export takes it by tracing at 9x12 latents, components.CHECK_SHAPES). With the factor above
    the largest latent the test is true over the whole range, so the export takes that path without a guard.
    """
    for m in module.modules():
        if hasattr(m, "num_upsamplers"):  # diffusers UNet2DConditionModel: read only by that test
            m.num_upsamplers = max_latent.bit_length()


def _runner(program: torch.export.ExportedProgram):
    """Runs the program as the torch backend compiles it: guards off. torch.export records Python branches on
    sizes taken while tracing as guards (diffusers' Upsample2D takes max() of two size ratios to decide a
    `.contiguous()`, which guards on the trace's aspect ratio); like the ONNX trace, the program is instead held to
    torch at several shapes and aspect ratios. Range checks on the inputs stay on."""
    module = program.module(check_guards=False)

    def run(args: tuple[torch.Tensor, ...]) -> list:
        with torch.no_grad():
            out = module(*args)
        return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]

    return run
