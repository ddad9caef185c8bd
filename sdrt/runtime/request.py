"""A generation request as one object, validated once against the bundle before any work starts."""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, replace

from sdrt.bundle import Manifest
from sdrt.errors import RequestError
from sdrt.runtime.noise import SEED_MODES
from sdrt.runtime.presets import preset_for, scheduler_config
from sdrt.runtime.samplers import make_schedule, resolve_sampler
from sdrt.runtime.schedules import SchedulerConfig

MAX_STEPS = 1000
MAX_SEED = 2**64  # torch.Generator.manual_seed accepts 64-bit seeds


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate; None fields take the bundle's defaults in `resolve`."""

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None  # None: the model kind's preset (25 standard, 4 LCM, 1 turbo)
    guidance_scale: float | None = None  # None: the preset's (7.5 standard; LCM and turbo: off)
    sampler: str | None = None
    schedule: str | None = None  # A1111's "Schedule type" (Karras, Exponential, SGM Uniform); None: the sampler's
    seed: int | None = None
    seed_mode: str = "cpu"  # "cpu": torch's CPU generator (diffusers); "gpu": torch's CUDA Philox (A1111's default)
    batch_size: int = 1
    eta: float | None = None  # noise amount for DDIM / ancestral samplers; None: the sampler's default
    guidance_rescale: float = 0.0  # Lin et al. 2023 sec. 3.4 (0.7 there), for zero-terminal-SNR models
    kind: str | None = None  # model kind whose preset fills unset fields; None: the bundle's (presets.detect_kind)
    fast_decode: bool = False  # decode with the bundle's tiny decoder (TAESD) instead of the VAE

    def resolve(self, manifest: Manifest) -> GenerationRequest:
        """Fill defaults from the bundle and check every field, raising RequestError with a one-line reason."""
        try:
            preset = preset_for(manifest, self.kind)
        except ValueError as e:
            raise RequestError(str(e)) from None
        steps, guidance_scale, sampler = preset.fill(self.steps, self.guidance_scale, self.sampler)
        size = manifest.model.default_size
        seed = secrets.randbelow(2**32) if self.seed is None else self.seed
        req = replace(
            self, width=self.width or size, height=self.height or size, steps=steps, guidance_scale=guidance_scale,
            sampler=sampler or default_sampler(manifest.scheduler), seed=seed, kind=preset.kind,
        )
        req._check(manifest)
        try:
            req = replace(req, sampler=resolve_sampler(req.sampler, req.schedule), schedule=None)
            make_schedule(req.sampler, scheduler_settings(manifest, req.kind), req.steps)
        except ValueError as e:  # unknown name, a schedule type the sampler lacks, LCM's step limit...
            raise RequestError(str(e)) from None
        return req

    def _check(self, manifest: Manifest) -> None:
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise RequestError("prompt and negative prompt must be strings")
        _check_size(manifest, "width", self.width)
        _check_size(manifest, "height", self.height)
        if not isinstance(self.steps, int) or not 1 <= self.steps <= MAX_STEPS:
            raise RequestError(f"steps must be an integer from 1 to {MAX_STEPS}, got {self.steps!r}")
        if not isinstance(self.guidance_scale, (int, float)) or not math.isfinite(self.guidance_scale) \
                or self.guidance_scale < 0:
            raise RequestError(f"guidance scale must be a finite number >= 0, got {self.guidance_scale!r}")
        if not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= manifest.shapes.max_batch:
            raise RequestError(f"batch size must be from 1 to {manifest.shapes.max_batch}, got {self.batch_size!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < MAX_SEED - self.batch_size:
            raise RequestError(f"seed must be an integer from 0 to 2**64 - 1 - batch size, got {self.seed!r}")
        if self.seed_mode not in SEED_MODES:
            raise RequestError(f"seed mode must be one of {', '.join(SEED_MODES)}, got {self.seed_mode!r}")
        if self.eta is not None and not 0.0 <= self.eta <= 1.0:
            raise RequestError(f"eta must be within [0, 1], got {self.eta!r}")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise RequestError(f"guidance rescale must be within [0, 1], got {self.guidance_rescale!r}")
        if self.fast_decode and "taesd_decoder" not in manifest.components:
            raise RequestError("fast decode needs a bundle with a tiny decoder (sdrt export --taesd FOLDER)")


def _check_size(manifest: Manifest, what: str, value: object) -> None:
    s = manifest.shapes
    if not isinstance(value, int) or value % s.multiple_of or not s.min_size <= value <= s.max_size:
        raise RequestError(
            f"{what} must be a multiple of {s.multiple_of} from {s.min_size} to {s.max_size}, got {value!r}"
        )


def scheduler_settings(manifest: Manifest, kind: str) -> SchedulerConfig:
    """The bundle's scheduler config with the model kind's overrides (turbo: trailing timesteps)."""
    return SchedulerConfig.from_dict(scheduler_config(manifest, preset_for(manifest, kind)))


def default_sampler(config: dict) -> str:
    """The sampler reproducing the bundle's own scheduler class (PNDM for SD 1.x), as diffusers would use."""
    schedule = "Karras" if config.get("use_karras_sigmas") else None
    try:
        return resolve_sampler(config.get("_class_name", ""), schedule)
    except ValueError:
        return "pndm"
