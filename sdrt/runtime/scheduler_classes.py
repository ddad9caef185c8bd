"""One record per diffusers scheduler class that sdrt reproduces: its facts in one place.

A record holds the class's `__init__` defaults (diffusers 0.42.1; tests/test_scheduler_classes.py checks them
against `inspect.signature` of the installed classes, key for key), the builder of its `set_timesteps`
(schedules.py), its order and the model kind a bundle saved with it is. Everything else is derived from the
defaults: a class honours a config key (zero-SNR, Karras / exponential / beta sigmas, clip_sample, thresholding,
timestep spacing) exactly when its `__init__` takes that key.

`resolve` turns a bundle's scheduler config into the values that class would run with, as diffusers'
`from_config(config, **overrides)` does: a key the config lacks takes the class's default (so DDIM clips x0 on a
config saved by PNDMScheduler, which has no clip_sample). A key sdrt does not reproduce is accepted at its
default and refused by name otherwise. numpy only.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from .noise_levels import Schedule, SchedulerConfig
from .schedules import (
    ddim_schedule, deis_schedule, dpm_multistep_schedule, dpm_sde_schedule, euler_schedule, heun_schedule,
    kdpm2_ancestral_schedule, kdpm2_schedule, lcm_schedule, pndm_schedule, skipped_steps, unipc_schedule,
)
from .x0_clamp import x0_clamp

Builder = Callable[[SchedulerConfig, int], Schedule]

# Keys sdrt reads from a config: SchedulerConfig's fields. Any other key of a class must stay at its default.
REPRODUCED = frozenset(f.name for f in dataclasses.fields(SchedulerConfig))
# Chosen by the sampler name (an A1111 schedule type), never read from a bundle's scheduler_config.json:
# "DPM++ 2M" must mean the same schedule whatever scheduler class the checkpoint was saved with.
SAMPLER_CHOSEN = frozenset({"use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"})

# __init__ defaults shared by many classes (the ones ported from k-diffusion default to SD's beta range).
_DDPM_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
               "trained_betas": None, "prediction_type": "epsilon", "steps_offset": 0}
_SD_BETAS = {**_DDPM_BETAS, "beta_start": 0.00085, "beta_end": 0.012}
_SIGMA_KINDS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_CLIP = {"clip_sample": False, "clip_sample_range": 1.0}
_THRESHOLD = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
_FLOW = {"use_flow_sigmas": False, "flow_shift": 1.0, "use_dynamic_shifting": False, "time_shift_type": "exponential"}
_MULTISTEP = {**_DDPM_BETAS, **_THRESHOLD, **_SIGMA_KINDS, **_FLOW, "solver_order": 2, "lower_order_final": True,
              "timestep_spacing": "linspace"}


@dataclass(frozen=True)
class SchedulerClass:
    """What sdrt knows of one diffusers scheduler class."""

    name: str
    defaults: Mapping[str, object]  # every __init__ parameter and its default (lists as tuples)
    build: Builder  # its set_timesteps, from a config resolved for it
    order: int = 1  # scheduler.order: model evaluations per step (img2img skips order * t_start of them)
    kind: str = "standard"  # the model kind (presets.py) of a bundle saved with this class
    follows_spacing: bool = True  # False: timesteps from the class's own grid whatever timestep_spacing says
    extra_evaluations: int = 0  # model evaluations beyond order * steps (progress counts steps, not calls)
    # img2img: a builder that starts at evaluation `begin` where cutting the full schedule would be wrong.
    rebuild_from: Callable[[SchedulerConfig, int, int], Schedule] | None = None
    # Keys the class takes that do not apply to sdrt and are accepted at any value.
    ignored: frozenset[str] = frozenset()

    def offers(self, overrides: Mapping) -> bool:
        """Whether from_config overrides (a schedule type's) change this class: it has every key."""
        if "timestep_spacing" in overrides and not self.follows_spacing:
            return False
        return all(key in self.defaults for key in overrides)

    def resolve(self, config: Mapping, overrides: Mapping = MappingProxyType({})) -> SchedulerConfig:
        """The values this class runs with, from_config(config, **overrides) style; refuses what sdrt lacks."""
        missing = sorted(set(overrides) - set(self.defaults))
        if missing:
            raise ValueError(f"{self.name} has no {', '.join(missing)}")
        # diffusers drops keys a live config only holds by default (_use_default_values) and sdrt never reads
        # the sigma kind from a config (SAMPLER_CHOSEN).
        skip = set(config.get("_use_default_values", ())) | SAMPLER_CHOSEN
        given = {k: v for k, v in config.items() if k in self.defaults and k not in skip}
        values = {**self.defaults, **given, **overrides}
        self._refuse_unreproduced(values, set(overrides))
        fields = {k: v for k, v in values.items() if k in REPRODUCED}
        if fields.get("trained_betas") is not None:
            fields["trained_betas"] = tuple(fields["trained_betas"])
        return SchedulerConfig(**fields)

    def _refuse_unreproduced(self, values: dict, pinned: set[str]) -> None:
        """A key sdrt does not reproduce must hold its default, unless the sampler itself sets it (pinned)."""
        for key in sorted(set(self.defaults) - REPRODUCED - pinned - self.ignored):
            value, default = values[key], self.defaults[key]
            if not same_value(value, default):
                raise ValueError(f"{self.name} with {key}={value!r} is not supported by sdrt (the class default is "
                                 f"{default!r})")

    def schedule(self, config: Mapping, steps: int, strength: float = 1.0, overrides: Mapping = MappingProxyType({})
                 ) -> Schedule:
        """What set_timesteps(steps) sets on from_config(config, **overrides), cut by img2img's strength as
        diffusers' get_timesteps does, with the class's x0 clamp."""
        resolved = self.resolve(config, overrides)
        begin = skipped_steps(steps, strength) * self.order
        if begin and self.rebuild_from is not None:
            schedule = self.rebuild_from(resolved, steps, begin)
        else:
            schedule = self.build(resolved, steps).starting_at(begin)
        return dataclasses.replace(schedule, clamp_x0=x0_clamp(resolved))


def same_value(value: object, expected: object) -> bool:
    """Config values compared as diffusers would use them; lists (JSON) and tuples (the records) alike."""
    def as_tuple(v):
        return tuple(v) if isinstance(v, (list, tuple)) else v

    return as_tuple(value) == as_tuple(expected)


def _record(name: str, defaults: dict, build: Builder, **facts) -> SchedulerClass:
    return SchedulerClass(name, MappingProxyType(defaults), build, **facts)


SCHEDULER_CLASSES = {r.name: r for r in (
    _record("PNDMScheduler", {**_DDPM_BETAS, "skip_prk_steps": False, "set_alpha_to_one": False,
                              "timestep_spacing": "leading"},
            pndm_schedule, rebuild_from=pndm_schedule, extra_evaluations=1),  # its second timestep twice
    _record("DDIMScheduler", {**_DDPM_BETAS, **_THRESHOLD, **_CLIP, "clip_sample": True,
                              "set_alpha_to_one": True, "timestep_spacing": "leading", "rescale_betas_zero_snr": False},
            ddim_schedule),
    _record("EulerDiscreteScheduler", {**_DDPM_BETAS, **_SIGMA_KINDS, "interpolation_type": "linear", "sigma_min": None,
                                       "sigma_max": None, "timestep_spacing": "linspace", "timestep_type": "discrete",
                                       "rescale_betas_zero_snr": False, "final_sigmas_type": "zero"},
            euler_schedule),
    _record("EulerAncestralDiscreteScheduler", {**_DDPM_BETAS, "timestep_spacing": "linspace",
                                                "rescale_betas_zero_snr": False},
            euler_schedule),
    _record("LMSDiscreteScheduler", {**_DDPM_BETAS, **_SIGMA_KINDS, "timestep_spacing": "linspace"}, euler_schedule),
    _record("HeunDiscreteScheduler", {**_SD_BETAS, **_SIGMA_KINDS, **_CLIP, "timestep_spacing": "linspace"},
            heun_schedule, order=2),
    _record("KDPM2DiscreteScheduler", {**_SD_BETAS, **_SIGMA_KINDS, "timestep_spacing": "linspace"},
            kdpm2_schedule, order=2),
    _record("KDPM2AncestralDiscreteScheduler", {**_SD_BETAS, **_SIGMA_KINDS, "timestep_spacing": "linspace"},
            kdpm2_ancestral_schedule, order=2),
    # noise_sampler_seed seeds diffusers' own Brownian tree; sdrt's noise comes from the request's seed.
    _record("DPMSolverSDEScheduler", {**_SD_BETAS, **_SIGMA_KINDS, "noise_sampler_seed": None,
                                      "timestep_spacing": "linspace"},
            dpm_sde_schedule, order=2, ignored=frozenset({"noise_sampler_seed"})),
    _record("DPMSolverMultistepScheduler", {**_MULTISTEP, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
                                            "euler_at_final": False, "use_lu_lambdas": False,
                                            "final_sigmas_type": "zero", "lambda_min_clipped": -math.inf,
                                            "variance_type": None, "rescale_betas_zero_snr": False},
            dpm_multistep_schedule),
    _record("UniPCMultistepScheduler", {**_MULTISTEP, "predict_x0": True, "solver_type": "bh2", "disable_corrector": (),
                                        "solver_p": None, "final_sigmas_type": "zero", "rescale_betas_zero_snr": False,
                                        "sigma_min": None, "sigma_max": None, "shift_terminal": None},
            unipc_schedule),
    _record("DEISMultistepScheduler", {**_MULTISTEP, "algorithm_type": "deis", "solver_type": "logrho"}, deis_schedule),
    # LCM picks `steps` of its distillation grid (original_inference_steps) whatever timestep_spacing says.
    _record("LCMScheduler", {**_SD_BETAS, **_THRESHOLD, **_CLIP, "beta_schedule": "scaled_linear",
                             "original_inference_steps": 50, "set_alpha_to_one": True, "timestep_spacing": "leading",
                             "timestep_scaling": 10.0, "rescale_betas_zero_snr": False},
            lcm_schedule, kind="lcm", follows_spacing=False),
)}


def scheduler_class(name: str) -> SchedulerClass:
    """The record of a diffusers scheduler class sdrt reproduces."""
    try:
        return SCHEDULER_CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown scheduler class {name!r}; known: {', '.join(SCHEDULER_CLASSES)}") from None
