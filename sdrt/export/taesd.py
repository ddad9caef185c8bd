"""The optional tiny decoder (TAESD, diffusers AutoencoderTiny): find it beside a model, wrap and describe it.

TAESD (madebyollin/taesd) decodes SD latents with a few 64-channel convolutions: a fraction of the VAE decoder's
cost, at lower fidelity. Bundles carry it as `taesd_decoder` for per-step previews and `--fast-decode`.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import AutoencoderTiny
from torch import nn

from sdrt.bundle import MANIFEST, BundleWriter, Manifest, ModelInfo, read_manifest
from sdrt.contracts import taesd_decoder_contract
from sdrt.errors import ExportError
from sdrt.export.components import ComponentSpec
from sdrt.export.folder import _load_diffusers

log = logging.getLogger(__name__)

# Subfolders of a diffusers folder searched for an AutoencoderTiny (config.json + weights), in this order.
SUBFOLDERS = ("taesd", "vae_tiny")
# ONNX Runtime against torch, fp32: each layer sums 64 channels x 3x3 taps, ~20 layers; summation-order
# differences stay far below 1e-3 (measured 1.2e-7 with random weights, tiny and full-size), and a wrong graph is
# off by 0.1 or more.
TAESD_TOLERANCE = 1e-3


class TaesdDecoder(nn.Module):
    """UNet-scale latents -> image in [-1, 1]: AutoencoderTiny.decode(latents / scaling_factor + shift_factor)."""

    def __init__(self, tiny: nn.Module):
        super().__init__()
        self.decoder = tiny.decoder
        # 1.0 for TAESD (trained on SD's already-scaled latents); shift_factor is 0.0 for SD-family TAESDs.
        self.scaling_factor = float(tiny.config.scaling_factor)
        self.shift_factor = float(tiny.config.shift_factor or 0.0)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents / self.scaling_factor + self.shift_factor)


def find_taesd(source: Path | str) -> Path | None:
    """The first TAESD subfolder of a diffusers folder (`taesd/`, `vae_tiny/`), or None."""
    root = Path(source)
    for name in SUBFOLDERS:
        if (root / name / "config.json").is_file():
            return root / name
    return None


def load_taesd(taesd: Path | str | None, source: Path | str) -> nn.Module | None:
    """The AutoencoderTiny at `taesd`, else the one found beside `source`, else None (the component is optional)."""
    path = Path(taesd) if taesd is not None else find_taesd(source)
    if path is None:
        return None
    if not (path / "config.json").is_file():
        raise ExportError(f"TAESD folder {path} has no config.json (expected a diffusers AutoencoderTiny folder)")
    log.info("taesd_decoder: loading AutoencoderTiny from %s", path)
    return _load_diffusers(AutoencoderTiny, path.parent, path.name)


def taesd_spec(tiny: nn.Module, info: ModelInfo) -> ComponentSpec:
    """The taesd_decoder component, after checking the tiny decoder fits the model's latents."""
    config = tiny.config
    if config.latent_channels != info.latent_channels:
        raise ExportError(f"TAESD has {config.latent_channels} latent channels, the model {info.latent_channels}")
    factor = config.upsampling_scaling_factor ** (len(config.num_decoder_blocks) - 1)
    if factor != info.vae_scale_factor:
        raise ExportError(f"TAESD upsamples {factor}x, the model's VAE {info.vae_scale_factor}x")
    return ComponentSpec(
        "taesd_decoder", TaesdDecoder(tiny).eval(), taesd_decoder_contract(info.latent_channels), TAESD_TOLERANCE,
    )


def add_taesd(bundle: Path | str, taesd: Path | str | nn.Module, out: Path | str, *, opset: int = 17,
              overwrite: bool = False) -> Manifest:
    """A copy of an ONNX `bundle` at `out` with `taesd` (a folder or a loaded AutoencoderTiny) as taesd_decoder."""
    from sdrt.export.exporter import export_component  # the exporter imports this module

    manifest = read_manifest(bundle)
    tiny = taesd if isinstance(taesd, nn.Module) else load_taesd(taesd, bundle)
    with BundleWriter(out, overwrite=overwrite) as writer:
        shutil.copytree(bundle, writer.path, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MANIFEST))
        spec = taesd_spec(tiny, manifest.model)
        component = export_component(spec, writer.path, opset, manifest.model.vae_scale_factor)
        return writer.commit(replace(manifest, components={**manifest.components, spec.name: component}))
