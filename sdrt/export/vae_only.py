"""Export a VAE on its own (an A1111 VAE file, a diffusers AutoencoderKL folder) to a bundle for `--vae`.

A1111 reads VAE files in the CompVis layout (`encoder.*`, `decoder.*`, `quant_conv`, `post_quant_conv`, sometimes
under `first_stage_model.`) and diffusers saves `AutoencoderKL` folders; both become a bundle holding `vae_decoder`
and `vae_encoder`, whose manifest records the latent layout the swap checks (sdrt.runtime.vae_swap).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

from sdrt.bundle import BundleWriter, Manifest, ModelInfo, sha256_file
from sdrt.errors import ExportError
from sdrt.export.components import vae_specs
from sdrt.export.exporter import export_component, tool_versions
from sdrt.export.folder import MODEL_INDEX, _load_diffusers, weights_sha256
from sdrt.export.ldm_config import read_original_config
from sdrt.export.single_file import _build, read_checkpoint
from sdrt.export.source import SINGLE_FILE_SUFFIXES
from sdrt.runtime.vae_swap import VAE_FAMILY

log = logging.getLogger(__name__)

DIFFUSERS_KEY = "decoder.up_blocks."  # a diffusers-layout state dict; CompVis names the same blocks decoder.up.N


def export_vae_bundle(
    source: Path | str, out: Path | str, *, original_config: Path | str | None = None, opset: int = 17,
    overwrite: bool = False, weights_storage: str = "fp32",
) -> Manifest:
    """Export the VAE at `source` (folder or single file) to a validated VAE bundle at `out`; returns its manifest.

    A single file's architecture and latent scale factor come from `original_config` (default: SD v1's yaml, whose
    VAE SD 1.x and 2.x share)."""
    with BundleWriter(out, overwrite=overwrite) as writer:
        vae, record = load_vae_source(Path(source), original_config)
        info = vae_info(vae, Path(source))
        components = {spec.name: export_component(spec, writer.path, opset, info.vae_scale_factor, weights_storage)
                      for spec in vae_specs(vae)}
        manifest = Manifest(model=info, components=components, scheduler={}, source=record, tools=tool_versions())
        return writer.commit(manifest)


def vae_info(vae: AutoencoderKL, source: Path) -> ModelInfo:
    """The latent layout the swap must match; a VAE bundle has no prediction type."""
    config = vae.config
    return ModelInfo(
        family=VAE_FAMILY, prediction_type="", latent_scale_factor=float(config.scaling_factor),
        latent_channels=int(config.latent_channels), vae_scale_factor=2 ** (len(config.block_out_channels) - 1),
        default_size=int(config.sample_size), name=source.absolute().name,
    )


def load_vae_source(path: Path, original_config: Path | str | None) -> tuple[AutoencoderKL, dict]:
    """The VAE in fp32 eval mode, and the manifest's source record (path, kind, sha256 of the weights)."""
    if path.is_dir():
        if original_config is not None:
            raise ExportError("--original-config applies to single files only, not to a diffusers folder")
        folder = path / "vae" if (path / MODEL_INDEX).is_file() else path  # a whole pipeline: its vae/
        vae = _load_diffusers(AutoencoderKL, folder.parent, folder.name)
        return vae, {"path": str(path.absolute()), "kind": "diffusers", "sha256": weights_sha256(folder)}
    if path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        vae = _single_file_vae(read_checkpoint(path), read_original_config(original_config))
        return vae, {"path": str(path.absolute()), "kind": "single_file", "sha256": sha256_file(path)}
    if not path.exists():
        raise ExportError(f"VAE source not found: {path}")
    raise ExportError(f"{path} is neither an AutoencoderKL folder nor a single file ({', '.join(SINGLE_FILE_SUFFIXES)})")


def _single_file_vae(checkpoint: dict[str, torch.Tensor], original_config: dict) -> AutoencoderKL:
    """A CompVis-layout VAE (bare, or inside a whole checkpoint) or a diffusers-layout state dict."""
    config = create_vae_diffusers_config_from_ldm(original_config, checkpoint)
    if any(key.startswith(DIFFUSERS_KEY) for key in checkpoint):
        state = checkpoint
    else:
        state = convert_ldm_vae_checkpoint(checkpoint, config)
    if not state:
        raise ExportError("no VAE weights in the file (expected encoder.* and decoder.* keys)")
    return _build(AutoencoderKL(**config), state, "vae")
