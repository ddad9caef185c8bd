"""The A1111 settings a server honours: GET/POST /sdapi/v1/options and a request's `override_settings`.

A1111 keeps hundreds of settings (modules/shared_options.py). sdrt honours the few that pick what to run or how
to send it, holds the ones that would change the image at the value it reproduces (A1111's default) and refuses
any other value by name, and ignores the rest, as they concern A1111's UI, files or extensions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sdrt.errors import RequestError
from sdrt.server.catalog import BundleInfo, Catalog

# A1111's "Random number generator source" -> sdrt's seed mode. A1111 defaults to GPU; sdrt to CPU (diffusers'
# torch.Generator("cpu")), so that the API and `sdrt generate` agree unless a client asks for A1111's seeds.
RANDN_SOURCES = {"CPU": "cpu", "GPU": "gpu"}
SAMPLE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
# Settings that change the image, with the values at which sdrt's image is A1111's.
FIXED: dict[str, tuple] = {
    "CLIP_stop_at_last_layers": (1,),  # clip skip
    "eta_noise_seed_delta": (0,),  # ENSD
    "sd_vae": ("Automatic", "None"),  # the bundle's own VAE
    "eta_ddim": (0, 0.0),  # the samplers' own eta when a request gives none
    "eta_ancestral": (1, 1.0),
    "s_churn": (0, 0.0),
    "s_noise": (1, 1.0),
    "s_min_uncond": (0, 0.0),
    "jpeg_quality": (80,),  # sdrt.runtime.outputs.QUALITY
    "initial_noise_multiplier": (1, 1.0),
    "img2img_background_color": ("#ffffff",),  # transparency flattened onto white (sdrt.runtime.img2img.rgb)
}
DEFAULT_PREVIEW_EVERY = 10  # A1111's show_progress_every_n_steps


@dataclass(frozen=True)
class Settings:
    """What one request runs with, after its override_settings."""

    bundle: BundleInfo
    seed_mode: str
    image_format: str  # a Pillow format name
    preview_every: int


class Options:
    """The server's current settings; changed only by POST /sdapi/v1/options (one event loop: no lock)."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self.values: dict[str, Any] = {
            "sd_model_checkpoint": catalog.default.title,
            "sd_checkpoint_hash": catalog.default.sha256,
            "randn_source": "CPU",
            "samples_format": "png",
            "show_progress_every_n_steps": DEFAULT_PREVIEW_EVERY,
            **{key: values[0] for key, values in FIXED.items()},
        }

    def get(self) -> dict[str, Any]:
        return dict(self.values)

    def update(self, changes: dict[str, Any]) -> None:
        """Apply settings, all or none: every value is checked first."""
        merged = self._merged(changes)
        self.settings(merged)
        bundle = self.catalog.find(merged["sd_model_checkpoint"])
        merged.update(sd_model_checkpoint=bundle.title, sd_checkpoint_hash=bundle.sha256)
        self.values = merged

    def settings(self, overrides: dict[str, Any] | None = None) -> Settings:
        """The settings a request runs with: the current ones, overridden by its `override_settings`."""
        values = self._merged(overrides or {})
        return Settings(
            bundle=self.catalog.find(str(values["sd_model_checkpoint"])),
            seed_mode=_choice("randn_source", values["randn_source"], RANDN_SOURCES),
            image_format=_choice("samples_format", str(values["samples_format"]).lower(), SAMPLE_FORMATS),
            preview_every=_int("show_progress_every_n_steps", values["show_progress_every_n_steps"]),
        )

    def _merged(self, changes: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(changes, dict):
            raise RequestError(f"options: expected a JSON object, got {type(changes).__name__}")
        for key, value in changes.items():
            if key in FIXED and value not in FIXED[key]:
                allowed = " or ".join(repr(v) for v in dict.fromkeys(FIXED[key]))
                raise RequestError(f"{key}: sdrt reproduces A1111's images only at {allowed}, got {value!r}")
        known = {k: v for k, v in changes.items() if k in self.values and k != "sd_checkpoint_hash"}
        return {**self.values, **known}


def _choice(key: str, value: Any, table: dict[str, str]) -> str:
    if value not in table:
        raise RequestError(f"{key}: expected one of {', '.join(map(repr, table))}, got {value!r}")
    return table[value]


def _int(key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(f"{key}: expected an integer, got {value!r}")
    return value
