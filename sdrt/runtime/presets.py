"""Model kinds and their generation defaults: on an LCM bundle `--steps 4` means LCM sampling with guidance off."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from sdrt.bundle import Manifest
from sdrt.runtime.scheduler_classes import SCHEDULER_CLASSES


@dataclass(frozen=True)
class Preset:
    """What a request leaves unset takes these values; `sampler` None means the bundle's own scheduler."""

    kind: str
    steps: int
    guidance_scale: float
    sampler: str | None = None
    # Scheduler config keys the kind needs whatever the bundle saved (applied over manifest.scheduler).
    scheduler_overrides: dict = field(default_factory=dict)
    note: str = ""

    def fill(self, steps: int | None, guidance_scale: float | None, sampler: str | None):
        """(steps, guidance scale, sampler) with the request's own values kept and the gaps filled from the preset."""
        return (
            self.steps if steps is None else steps,
            self.guidance_scale if guidance_scale is None else guidance_scale,
            sampler or self.sampler,
        )


PRESETS = {
    # diffusers' StableDiffusionPipeline defaults are 50 steps at 7.5; 25 with a multistep sampler is A1111-like.
    "standard": Preset("standard", steps=25, guidance_scale=7.5),
    # Luo et al. 2023 (LCM) and LCM-LoRA: 2-8 steps of LCMScheduler, guidance 1-2. At 1.0 classifier-free guidance
    # is off, so the unconditional half of the UNet batch is skipped (ClassifierFreeGuidance.enabled). Guidance
    # is distilled into UNets with time_cond_proj_dim (LCM-Dreamshaper): they take w as an embedding instead,
    # which the UNet contract does not carry yet, and run at this preset's guidance-off batch.
    # LCMScheduler takes its timesteps from the distillation grid and ignores timestep_spacing, so the spacing an
    # SD1.5 config carries ("leading", kept by LCMScheduler.from_config in diffusers' LCM-LoRA recipe) is dropped.
    "lcm": Preset(
        "lcm", steps=4, guidance_scale=1.0, sampler="LCM", scheduler_overrides={"timestep_spacing": None},
        note="LCMScheduler, guidance off",
    ),
    # SD-Turbo / SDXL-Turbo model cards (adversarial diffusion distillation, Sauer et al. 2023): 1-4 steps,
    # guidance_scale 0.0, Euler ancestral on "trailing" timesteps so the first step starts at t = 999.
    "turbo": Preset(
        "turbo", steps=1, guidance_scale=0.0, sampler="Euler a",
        scheduler_overrides={"timestep_spacing": "trailing"}, note="Euler a, trailing timesteps, guidance off",
    ),
}
KINDS = tuple(PRESETS)

# Whole words in a model name (as diffusers repos are named: "lcm-lora-sdv1-5", "sd-turbo", "LCM_Dreamshaper_v7").
_KIND_OF_NAME_WORD = {"lcm": "lcm", "turbo": "turbo"}


def detect_kind(manifest: Manifest) -> str:
    """The bundle's model kind: its explicit `model.kind`, else its scheduler class, else a word of its name."""
    explicit = manifest.model.kind
    if explicit:
        if explicit not in PRESETS:
            raise ValueError(f"bundle declares model kind {explicit!r}; known kinds: {', '.join(KINDS)}")
        return explicit
    # Scheduler classes that only a distilled model is saved with (their records' kind).
    record = SCHEDULER_CLASSES.get(manifest.scheduler.get("_class_name", ""))
    if record is not None and record.kind != "standard":
        return record.kind
    return kind_in_name(manifest.model.name) or "standard"


def kind_in_name(name: str) -> str | None:
    """The kind a whole word of `name` says (lcm, turbo), or None."""
    words = re.split(r"[^a-z0-9]+", name.lower())
    return next((_KIND_OF_NAME_WORD[w] for w in words if w in _KIND_OF_NAME_WORD), None)


def preset_for(manifest: Manifest, kind: str | None = None) -> Preset:
    """The preset of `kind` (a user's override), or of the bundle's detected kind."""
    kind = kind or detect_kind(manifest)
    if kind not in PRESETS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {', '.join(KINDS)}")
    return PRESETS[kind]


def scheduler_config(manifest: Manifest, preset: Preset) -> dict:
    """The bundle's scheduler config with the preset's overrides applied (an override of None removes the key, so
    the scheduler class's own default applies)."""
    merged = {**manifest.scheduler, **preset.scheduler_overrides}
    return {k: v for k, v in merged.items() if not (v is None and k in preset.scheduler_overrides)}
