"""A VAE from another bundle (`sdrt export VAE --vae-only`, or any bundle's) in place of the model's own.

As A1111's VAE setting (modules/sd_vae.py): the swap replaces the encoder and decoder, the model's latent scale
stays, and images record `VAE` (the VAE file's name) and `VAE hash` (the first 10 hex digits of its sha256). The
swap is refused unless the VAE speaks the UNet's latents: the same channels, pixels per latent and scale factor.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdrt.bundle import Component, Manifest, read_manifest, verify_files
from sdrt.errors import BundleError
from sdrt.manifest_schema import VAE_FAMILY  # ModelInfo.family of a VAE-only bundle

VAE_COMPONENTS = ("vae_decoder", "vae_encoder")
VAE_HASH_DIGITS = 10  # A1111 sd_vae.get_loaded_vae_hash


@dataclass(frozen=True)
class SwappedVae:
    """A verified VAE bundle whose encoder and decoder stand in for a model's."""

    root: Path
    manifest: Manifest

    @property
    def name(self) -> str:
        """The VAE's file name as A1111 writes it (the exported source's base name, else the bundle's)."""
        return Path(self.manifest.source.get("path") or self.root).name

    @property
    def short_hash(self) -> str | None:
        return self.manifest.source.get("sha256", "")[:VAE_HASH_DIGITS] or None

    def formats(self) -> set[str]:
        return {self.manifest.components[name].format for name in VAE_COMPONENTS}

    def components(self) -> dict[str, tuple[Path, Component]]:
        """The components it replaces, each with the folder its file is relative to."""
        return {name: (self.root, self.manifest.components[name]) for name in VAE_COMPONENTS}


def load_vae(path: Path | str, model: Manifest, verify: bool = True) -> SwappedVae:
    """Read and verify the VAE bundle at `path` and check that it fits `model`'s latents."""
    root = Path(path)
    manifest = read_manifest(root)
    if verify:
        verify_files(root, manifest)
    missing = [name for name in VAE_COMPONENTS if name not in manifest.components]
    if missing:
        raise BundleError(f"VAE bundle {root} has no {' or '.join(missing)}; export one with "
                          f"`sdrt export VAE_SOURCE -o OUT --vae-only`")
    _check_fits(root, manifest, model)
    return SwappedVae(root, manifest)


def _check_fits(root: Path, vae: Manifest, model: Manifest) -> None:
    for what, field in (("latent channels", "latent_channels"), ("pixels per latent", "vae_scale_factor"),
                        ("latent scale factor", "latent_scale_factor")):
        want, got = getattr(model.model, field), getattr(vae.model, field)
        if want != got:
            raise BundleError(f"the VAE in {root} does not fit this model: {what} expected {want} (the model's), "
                              f"got {got}")
