"""The sampler registry: A1111 sampler and schedule-type names -> a numpy sampler and the schedule it runs on.

A sampler name is a sampler label, optionally followed by a schedule type: "DPM++ 2M", "DPM++ 2M Karras",
"Euler SGM Uniform" (A1111's pre-1.9 combined labels; "DPM++ 2M|Karras" also reads), or the sampler and
schedule type apart, as A1111 1.9+ writes them: `resolve_sampler("DPM++ 2M", schedule="Karras")`.
Canonical names are k-diffusion style, "dpmpp_2m" or "dpmpp_2m_karras". Each sampler reproduces one diffusers
scheduler class (with config overrides); each schedule type is a diffusers config override of that class,
offered only where diffusers has it.
The samplers themselves are in samplers_basic.py, samplers_two_stage.py and samplers_multistep.py.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .noise_levels import Schedule, SchedulerConfig
from .samplers_basic import (
    Denoiser, NoiseFn, Steps, sample_ddim, sample_euler, sample_euler_ancestral, sample_lcm, sample_lms, sample_pndm,
)
from .samplers_multistep import sample_deis, sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_unipc
from .samplers_two_stage import (
    sample_dpm_2, sample_dpm_2_ancestral, sample_dpmpp_2s_ancestral, sample_dpmpp_sde, sample_heun,
)
from .schedules import SCHEDULER_ORDER, build_schedule, honours

__all__ = [
    "SAMPLERS", "SCHEDULE_TYPES", "SamplerSpec", "ScheduleType", "resolve_sampler", "make_schedule", "sample",
    "sampler_label", "schedule_label", "scheduler_for", "schedule_types_for", "step_count",
]


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler function, the diffusers scheduler class it reproduces and that class's config overrides."""

    fn: Callable[..., Steps]
    scheduler: str
    options: dict = field(default_factory=dict)
    label: str = ""  # the AUTOMATIC1111 web UI name
    aliases: tuple[str, ...] = ()  # A1111's k-diffusion names, other spellings
    # False where diffusers has no such scheduler and `scheduler` only supplies the schedule (DPM++ 2S a).
    is_diffusers_scheduler: bool = True


@dataclass(frozen=True)
class ScheduleType:
    """An A1111 schedule type as the diffusers config override that produces it."""

    label: str
    options: dict


SAMPLERS = {
    "pndm": SamplerSpec(sample_pndm, "PNDMScheduler", label="PLMS", aliases=("plms",)),
    "ddim": SamplerSpec(sample_ddim, "DDIMScheduler", label="DDIM"),
    "euler": SamplerSpec(sample_euler, "EulerDiscreteScheduler", label="Euler", aliases=("k_euler",)),
    "euler_ancestral": SamplerSpec(
        sample_euler_ancestral, "EulerAncestralDiscreteScheduler", label="Euler a", aliases=("euler_a", "k_euler_a")
    ),
    "lms": SamplerSpec(sample_lms, "LMSDiscreteScheduler", label="LMS", aliases=("k_lms",)),
    "heun": SamplerSpec(sample_heun, "HeunDiscreteScheduler", label="Heun", aliases=("k_heun",)),
    "dpm_2": SamplerSpec(sample_dpm_2, "KDPM2DiscreteScheduler", label="DPM2", aliases=("k_dpm_2",)),
    "dpm_2_ancestral": SamplerSpec(
        sample_dpm_2_ancestral, "KDPM2AncestralDiscreteScheduler", label="DPM2 a", aliases=("k_dpm_2_a",)
    ),
    "dpmpp_2s_ancestral": SamplerSpec(
        sample_dpmpp_2s_ancestral, "KDPM2AncestralDiscreteScheduler", label="DPM++ 2S a",
        aliases=("k_dpmpp_2s_a",), is_diffusers_scheduler=False,
    ),
    "dpmpp_sde": SamplerSpec(sample_dpmpp_sde, "DPMSolverSDEScheduler", label="DPM++ SDE", aliases=("k_dpmpp_sde",)),
    "dpmpp_2m": SamplerSpec(sample_dpmpp_2m, "DPMSolverMultistepScheduler", label="DPM++ 2M", aliases=("k_dpmpp_2m",)),
    "dpmpp_2m_sde": SamplerSpec(
        sample_dpmpp_2m_sde, "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"},
        "DPM++ 2M SDE", aliases=("k_dpmpp_2m_sde",),
    ),
    "dpmpp_2m_sde_heun": SamplerSpec(
        functools.partial(sample_dpmpp_2m_sde, solver_type="heun"), "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}, "DPM++ 2M SDE Heun",
    ),
    "unipc": SamplerSpec(sample_unipc, "UniPCMultistepScheduler", label="UniPC"),
    "deis": SamplerSpec(sample_deis, "DEISMultistepScheduler", label="DEIS"),
    "lcm": SamplerSpec(sample_lcm, "LCMScheduler", label="LCM"),
}

AUTOMATIC = "Automatic"  # A1111's schedule type meaning "the sampler's own": no override
SCHEDULE_TYPES = {
    "karras": ScheduleType("Karras", {"use_karras_sigmas": True}),
    "exponential": ScheduleType("Exponential", {"use_exponential_sigmas": True}),
    # A1111's sgm_uniform (generative-models' discretization) is diffusers' trailing spacing (its scheduler docs).
    "sgm_uniform": ScheduleType("SGM Uniform", {"timestep_spacing": "trailing"}),
}


def _normalize(name: str) -> str:
    """Lower-case, '+' as 'p', spaces and dashes as '_': 'DPM++ 2M Karras' -> 'dpmpp_2m_karras'."""
    return "_".join(name.strip().lower().replace("+", "p").replace("-", " ").replace("|", " ").split())


@functools.cache
def _sampler_aliases() -> dict[str, str]:
    """Every accepted sampler spelling (normalized) mapped to its canonical name."""
    table = {}
    for name, spec in SAMPLERS.items():
        table.update({_normalize(a): name for a in (name, spec.label, *spec.aliases)})
        if spec.is_diffusers_scheduler and not spec.options:
            table[spec.scheduler.lower()] = name
    return table


def _schedule_key(schedule: str | None) -> str | None:
    """Canonical schedule type of a label ('Karras', 'sgm_uniform'...); None for Automatic or None."""
    if schedule is None or _normalize(schedule) in ("", _normalize(AUTOMATIC)):
        return None
    key = _normalize(schedule)
    if key not in SCHEDULE_TYPES:
        valid = ", ".join(repr(t.label) for t in SCHEDULE_TYPES.values())
        raise ValueError(f"unknown schedule type {schedule!r}; expected {AUTOMATIC!r} or one of {valid}")
    return key


def _split(name: str) -> tuple[str, str | None]:
    """(canonical sampler, schedule type or None) of a sampler name that may end with a schedule type."""
    key, aliases = _normalize(name), _sampler_aliases()
    if key in aliases:
        return aliases[key], None
    for schedule in SCHEDULE_TYPES:
        prefix = key.removesuffix("_" + schedule)
        if prefix != key and prefix in aliases:
            return aliases[prefix], schedule
    valid = ", ".join(f"{n!r} ({s.label!r})" for n, s in SAMPLERS.items())
    raise ValueError(f"unknown sampler {name!r}; expected one of {valid}, optionally followed by a schedule type")


def schedule_types_for(sampler: str) -> list[str]:
    """The schedule types (canonical) diffusers offers for a sampler's scheduler class."""
    scheduler = SAMPLERS[_split(sampler)[0]].scheduler
    return [key for key, schedule_type in SCHEDULE_TYPES.items() if honours(scheduler, schedule_type.options)]


def resolve_sampler(name: str, schedule: str | None = None) -> str:
    """Canonical name ('dpmpp_2m_karras') of an A1111 / k-diffusion / diffusers sampler name, case-insensitively,
    with the schedule type inside the name or given apart (None or 'Automatic': the sampler's own)."""
    sampler, embedded = _split(name)
    given = _schedule_key(schedule)
    if embedded and given and embedded != given:
        raise ValueError(f"sampler {name!r} already names schedule type {embedded!r}, got schedule {schedule!r}")
    chosen = embedded or given
    if chosen is None:
        return sampler
    if chosen not in schedule_types_for(sampler):
        offered = ", ".join(SCHEDULE_TYPES[k].label for k in schedule_types_for(sampler)) or "none"
        raise ValueError(
            f"{SAMPLERS[sampler].label} has no {SCHEDULE_TYPES[chosen].label} schedule in diffusers "
            f"({SAMPLERS[sampler].scheduler}); offered: {offered}"
        )
    return f"{sampler}_{chosen}"


def scheduler_for(name: str) -> tuple[str, dict]:
    """The diffusers scheduler class and from_config overrides a sampler name reproduces."""
    sampler, schedule = _split(resolve_sampler(name))
    spec = SAMPLERS[sampler]
    return spec.scheduler, {**spec.options, **(SCHEDULE_TYPES[schedule].options if schedule else {})}


def make_schedule(name: str, config: SchedulerConfig, steps: int, strength: float = 1.0) -> Schedule:
    """The schedule that `name`'s diffusers scheduler builds in set_timesteps(steps), cut by img2img's strength."""
    scheduler, overrides = scheduler_for(name)
    return build_schedule(scheduler, config, steps, strength, **overrides)


def sample(
    name: str, model: Denoiser, x: np.ndarray, schedule: Schedule, noise: NoiseFn, eta: float | None = None
) -> Steps:
    """Run the named sampler; `eta` (None: the sampler's own default) goes to the samplers that take one."""
    fn = SAMPLERS[_split(resolve_sampler(name))[0]].fn
    takes_eta = "eta" in inspect.signature(fn).parameters
    return fn(model, x, schedule, noise, **({"eta": eta} if eta is not None and takes_eta else {}))


def step_count(name: str, evaluations: int) -> tuple[int, Callable[[int], int]]:
    """(sampler steps, steps done after model evaluation i) of a schedule of `evaluations` model calls: progress
    counts steps, not calls. Two-stage samplers (Heun, DPM2...) call the model twice per step but once on the last;
    PNDM calls it once more than it steps (its second timestep is evaluated twice, PNDMScheduler.set_timesteps)."""
    scheduler = scheduler_for(name)[0]
    calls = SCHEDULER_ORDER.get(scheduler, 1)
    extra = 1 if scheduler == "PNDMScheduler" and evaluations > 1 else 0
    steps = -(-(evaluations - extra) // calls)
    return steps, lambda i: steps if i >= evaluations else max(0, i - extra) // calls


def sampler_label(name: str) -> str:
    """A1111's combined label ('DPM++ 2M Karras'): what PNG parameters and progress bars show."""
    sampler, schedule = _split(resolve_sampler(name))
    return " ".join([SAMPLERS[sampler].label] + ([SCHEDULE_TYPES[schedule].label] if schedule else []))


def schedule_label(name: str) -> str:
    """A1111 1.9+'s separate 'Schedule type' field: 'Karras', ..., or 'Automatic'."""
    schedule = _split(resolve_sampler(name))[1]
    return SCHEDULE_TYPES[schedule].label if schedule else AUTOMATIC
