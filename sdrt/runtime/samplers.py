"""The sampler registry: A1111 sampler and schedule-type names -> a numpy sampler and the schedule it runs on.

A sampler name is a sampler label, optionally followed by a schedule type: "DPM++ 2M", "DPM++ 2M Karras",
"Euler SGM Uniform" (A1111's pre-1.9 combined labels; "DPM++ 2M|Karras" also reads), or the sampler and
schedule type apart, as A1111 1.9+ writes them: `resolve_sampler("Euler a", schedule="Karras")`.
Canonical names are k-diffusion style, "dpmpp_2m" or "dpmpp_2m_karras". Each sampler reproduces one diffusers
scheduler class (scheduler_classes.py), made to run its algorithm by config overrides (`options`). A schedule
type is that class's own config override where the class has it (diffusers' Karras, exponential, beta sigmas,
trailing spacing); otherwise, for the samplers A1111 runs through k-diffusion, A1111's sigma sequence
(sigma_schedules.py). The samplers themselves are in samplers_basic.py, samplers_two_stage.py and
samplers_multistep.py.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from . import sigma_schedules as a1111
from .noise_levels import Schedule
from .samplers_basic import (
    Denoiser, NoiseFn, Steps, sample_ddim, sample_euler, sample_euler_ancestral, sample_lcm, sample_lms, sample_pndm,
)
from .samplers_multistep import sample_deis, sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_unipc
from .samplers_two_stage import (
    sample_dpm_2, sample_dpm_2_ancestral, sample_dpmpp_2s_ancestral, sample_dpmpp_sde, sample_heun,
)
from .scheduler_classes import same_value, scheduler_class
from .sigma_schedules import KDiffusionRun, SigmaSchedule, k_diffusion_schedule
from .x0_clamp import X0Clamp, x0_clamp

__all__ = [
    "SAMPLERS", "SCHEDULE_TYPES", "SamplerSpec", "ScheduleType", "resolve_sampler", "make_schedule", "sample",
    "sampler_label", "sampler_name", "schedule_label", "scheduler_for", "schedule_types_for", "schedule_source",
    "sampler_for_config", "sampler_spec", "step_count",
]


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler function, the diffusers scheduler class it reproduces and the overrides that make the class run
    this sampler's algorithm (`options`: whatever a bundle's config says, "DPM++ 2M" is second-order DPM-Solver++)."""

    fn: Callable[..., Steps]
    scheduler: str
    options: dict = field(default_factory=dict)
    label: str = ""  # the AUTOMATIC1111 web UI name
    aliases: tuple[str, ...] = ()  # A1111's k-diffusion names, other spellings
    # False where diffusers has no such scheduler and `scheduler` only supplies the schedule (DPM++ 2S a).
    is_diffusers_scheduler: bool = True
    # A bundle saved with `scheduler` runs this sampler by default (when its config agrees with `options`).
    class_default: bool = True
    # How A1111 runs it through k-diffusion on any sigma sequence; None: a diffusers-only sampler.
    k_diffusion: KDiffusionRun | None = None


@dataclass(frozen=True)
class ScheduleType:
    """An A1111 schedule type: the diffusers config override that produces it in a class that has the key, and
    A1111's own sigma sequence for the k-diffusion samplers whose class lacks it."""

    label: str
    diffusers: dict | None = None
    sigmas: SigmaSchedule | None = None
    aliases: tuple[str, ...] = ()


_PLAIN = KDiffusionRun()
_DPM_PP = {"algorithm_type": "dpmsolver++", "solver_type": "midpoint", "solver_order": 2}
SAMPLERS = {
    # PLMS: diffusers' PNDM without its Runge-Kutta warm-up (the SD configs' skip_prk_steps=True).
    "pndm": SamplerSpec(sample_pndm, "PNDMScheduler", {"skip_prk_steps": True}, "PLMS", ("plms",)),
    "ddim": SamplerSpec(sample_ddim, "DDIMScheduler", label="DDIM"),
    "euler": SamplerSpec(sample_euler, "EulerDiscreteScheduler", label="Euler", aliases=("k_euler",),
                         k_diffusion=_PLAIN),
    "euler_ancestral": SamplerSpec(
        sample_euler_ancestral, "EulerAncestralDiscreteScheduler", label="Euler a", aliases=("euler_a", "k_euler_a"),
        k_diffusion=_PLAIN,
    ),
    "lms": SamplerSpec(sample_lms, "LMSDiscreteScheduler", label="LMS", aliases=("k_lms",), k_diffusion=_PLAIN),
    "heun": SamplerSpec(sample_heun, "HeunDiscreteScheduler", label="Heun", aliases=("k_heun",),
                        k_diffusion=KDiffusionRun(a1111.stage_at_next)),
    "dpm_2": SamplerSpec(sample_dpm_2, "KDPM2DiscreteScheduler", label="DPM2", aliases=("k_dpm_2",),
                         k_diffusion=KDiffusionRun(a1111.stage_at_log_midpoint, discard_penultimate_sigma=True)),
    "dpm_2_ancestral": SamplerSpec(
        sample_dpm_2_ancestral, "KDPM2AncestralDiscreteScheduler", label="DPM2 a", aliases=("k_dpm_2_a",),
        k_diffusion=KDiffusionRun(a1111.stage_at_ancestral_midpoint, discard_penultimate_sigma=True),
    ),
    "dpmpp_2s_ancestral": SamplerSpec(
        sample_dpmpp_2s_ancestral, "KDPM2AncestralDiscreteScheduler", label="DPM++ 2S a", aliases=("k_dpmpp_2s_a",),
        is_diffusers_scheduler=False, class_default=False,
        k_diffusion=KDiffusionRun(a1111.stage_at_ancestral_midpoint),
    ),
    "dpmpp_sde": SamplerSpec(sample_dpmpp_sde, "DPMSolverSDEScheduler", label="DPM++ SDE", aliases=("k_dpmpp_sde",),
                             k_diffusion=KDiffusionRun(a1111.stage_at_log_midpoint)),
    "dpmpp_2m": SamplerSpec(sample_dpmpp_2m, "DPMSolverMultistepScheduler", _DPM_PP, "DPM++ 2M", ("k_dpmpp_2m",),
                            k_diffusion=_PLAIN),
    "dpmpp_2m_sde": SamplerSpec(
        sample_dpmpp_2m_sde, "DPMSolverMultistepScheduler", {**_DPM_PP, "algorithm_type": "sde-dpmsolver++"},
        "DPM++ 2M SDE", ("k_dpmpp_2m_sde",), class_default=False, k_diffusion=_PLAIN,
    ),
    "dpmpp_2m_sde_heun": SamplerSpec(
        functools.partial(sample_dpmpp_2m_sde, solver_type="heun"), "DPMSolverMultistepScheduler",
        {**_DPM_PP, "algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}, "DPM++ 2M SDE Heun",
        class_default=False, k_diffusion=_PLAIN,
    ),
    "unipc": SamplerSpec(sample_unipc, "UniPCMultistepScheduler", {"predict_x0": True, "solver_type": "bh2",
                                                                     "disable_corrector": ()}, "UniPC"),
    "deis": SamplerSpec(sample_deis, "DEISMultistepScheduler", {"algorithm_type": "deis", "solver_type": "logrho"},
                        "DEIS"),
    "lcm": SamplerSpec(sample_lcm, "LCMScheduler", label="LCM"),
}

AUTOMATIC = "Automatic"  # A1111's schedule type meaning "the sampler's own": no override
# In A1111's order (modules/sd_schedulers.py).
SCHEDULE_TYPES = {
    "uniform": ScheduleType("Uniform", sigmas=a1111.uniform),
    "karras": ScheduleType("Karras", {"use_karras_sigmas": True}, a1111.karras),
    "exponential": ScheduleType("Exponential", {"use_exponential_sigmas": True}, a1111.exponential),
    "polyexponential": ScheduleType("Polyexponential", sigmas=a1111.polyexponential),
    # A1111's sgm_uniform (generative-models' discretization) is diffusers' trailing spacing (its scheduler docs).
    "sgm_uniform": ScheduleType("SGM Uniform", {"timestep_spacing": "trailing"}, a1111.sgm_uniform, ("SGMUniform",)),
    "kl_optimal": ScheduleType("KL Optimal", sigmas=a1111.kl_optimal),
    "align_your_steps": ScheduleType("Align Your Steps", sigmas=a1111.align_your_steps),
    "simple": ScheduleType("Simple", sigmas=a1111.simple),
    "normal": ScheduleType("Normal", sigmas=a1111.normal),
    "ddim": ScheduleType("DDIM", sigmas=a1111.ddim),
    "beta": ScheduleType("Beta", {"use_beta_sigmas": True}, a1111.beta),
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
        if spec.class_default:
            table[spec.scheduler.lower()] = name
    return table


@functools.cache
def _schedule_aliases() -> dict[str, str]:
    """Every accepted schedule-type spelling (normalized) mapped to its canonical name."""
    return {_normalize(a): key for key, t in SCHEDULE_TYPES.items() for a in (key, t.label, *t.aliases)}


def _schedule_key(schedule: str | None) -> str | None:
    """Canonical schedule type of a label ('Karras', 'sgm_uniform'...); None for Automatic or None."""
    if schedule is None or _normalize(schedule) in ("", _normalize(AUTOMATIC)):
        return None
    key = _schedule_aliases().get(_normalize(schedule))
    if key is None:
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


def _source(sampler: str, schedule: str) -> str | None:
    """'diffusers' where the sampler's class has the schedule type's override, 'a1111' where A1111 runs the
    sampler through k-diffusion on that schedule type's sigmas, None where neither applies."""
    spec, schedule_type = SAMPLERS[sampler], SCHEDULE_TYPES[schedule]
    if schedule_type.diffusers is not None and scheduler_class(spec.scheduler).offers(schedule_type.diffusers):
        return "diffusers"
    if spec.k_diffusion is not None and schedule_type.sigmas is not None:
        return "a1111"
    return None


def schedule_types_for(sampler: str) -> list[str]:
    """The schedule types (canonical) a sampler can run on: its diffusers class's own, and A1111's for the
    k-diffusion samplers."""
    name = _split(sampler)[0]
    return [key for key in SCHEDULE_TYPES if _source(name, key)]


def schedule_source(name: str) -> str:
    """Who defines a resolved sampler name's schedule: 'diffusers' (its scheduler class, options included) or
    'a1111' (A1111's sigma sequence, run as k-diffusion runs it)."""
    sampler, schedule = _split(resolve_sampler(name))
    return "diffusers" if schedule is None else _source(sampler, schedule)


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
        spec = SAMPLERS[sampler]
        offered = ", ".join(SCHEDULE_TYPES[k].label for k in schedule_types_for(sampler)) or "none"
        raise ValueError(
            f"{spec.label} has no {SCHEDULE_TYPES[chosen].label} schedule ({spec.scheduler} has no such option, and "
            f"A1111's schedule types apply to k-diffusion samplers); offered: {offered}"
        )
    return f"{sampler}_{chosen}"


def scheduler_for(name: str) -> tuple[str, dict]:
    """The diffusers scheduler class and from_config overrides a sampler name reproduces (diffusers schedules)."""
    sampler, schedule = _split(resolve_sampler(name))
    spec = SAMPLERS[sampler]
    if schedule is None:
        return spec.scheduler, dict(spec.options)
    if _source(sampler, schedule) != "diffusers":
        raise ValueError(f"{sampler_label(name)} runs A1111's {SCHEDULE_TYPES[schedule].label} schedule, which "
                         f"{spec.scheduler} does not have")
    return spec.scheduler, {**spec.options, **SCHEDULE_TYPES[schedule].diffusers}


def make_schedule(name: str, config: Mapping, steps: int, strength: float = 1.0) -> Schedule:
    """The schedule `name` runs on for a bundle's scheduler config (its scheduler_config.json dict): what its
    diffusers class sets in set_timesteps(steps), or A1111's sigmas for its schedule type; cut by img2img's
    strength."""
    sampler, schedule = _split(resolve_sampler(name))
    spec = SAMPLERS[sampler]
    record = scheduler_class(spec.scheduler)
    if schedule is None or _source(sampler, schedule) == "diffusers":
        return record.schedule(config, steps, strength, scheduler_for(name)[1])
    resolved = record.resolve(config, spec.options)
    a1111_schedule = k_diffusion_schedule(spec.k_diffusion, SCHEDULE_TYPES[schedule].sigmas, resolved, steps, strength)
    return dataclasses.replace(a1111_schedule, clamp_x0=x0_clamp(resolved))


def sample(
    name: str, model: Denoiser, x: np.ndarray, schedule: Schedule, noise: NoiseFn, eta: float | None = None
) -> Steps:
    """Run the named sampler; `eta` (None: the sampler's own default) goes to the samplers that take one. The
    schedule's x0 clamp goes to the samplers that take it (they also need the unclamped x0); the others see a
    model whose denoised output is already clamped, as diffusers' clamp comes before any use of x0 there."""
    fn = sampler_spec(name).fn
    params = inspect.signature(fn).parameters
    options = {"eta": eta} if eta is not None and "eta" in params else {}
    if schedule.clamp_x0 is not None:
        if "clamp_x0" in params:
            options["clamp_x0"] = schedule.clamp_x0
        else:
            model = _clamped(model, schedule.clamp_x0)
    return fn(model, x, schedule, noise, **options)


def _clamped(model: Denoiser, clamp: X0Clamp) -> Denoiser:
    def clamped_model(x: np.ndarray, sigma: float, t: float) -> np.ndarray:
        return clamp(model(x, sigma, t))

    return clamped_model


def sampler_spec(name: str) -> SamplerSpec:
    """The registry entry of a sampler name (its schedule type aside)."""
    return SAMPLERS[_split(resolve_sampler(name))[0]]


def step_count(name: str, evaluations: int) -> tuple[int, Callable[[int], int]]:
    """(sampler steps, steps done after model evaluation i) of a schedule of `evaluations` model calls: progress
    counts steps, not calls. Two-stage samplers (Heun, DPM2...) call the model twice per step but once on the last;
    PNDM calls it once more than it steps (its second timestep is evaluated twice, PNDMScheduler.set_timesteps)."""
    record = scheduler_class(sampler_spec(name).scheduler)
    calls = record.order  # A1111's schedules too: its two-stage samplers are exactly the order-2 classes'
    extra = record.extra_evaluations if evaluations > 1 else 0
    steps = -(-(evaluations - extra) // calls)
    return steps, lambda i: steps if i >= evaluations else max(0, i - extra) // calls


def sampler_label(name: str) -> str:
    """A1111's combined label ('DPM++ 2M Karras'), as progress bars show it."""
    sampler, schedule = _split(resolve_sampler(name))
    return " ".join([SAMPLERS[sampler].label] + ([SCHEDULE_TYPES[schedule].label] if schedule else []))


def sampler_name(name: str) -> str:
    """A1111 1.9+'s 'Sampler' field: the sampler's label without the schedule type ('DPM++ 2M')."""
    return sampler_spec(name).label


def schedule_label(name: str) -> str:
    """A1111 1.9+'s separate 'Schedule type' field: 'Karras', ..., or 'Automatic'."""
    schedule = _split(resolve_sampler(name))[1]
    return SCHEDULE_TYPES[schedule].label if schedule else AUTOMATIC


def sampler_for_config(config: Mapping) -> str:
    """The sampler reproducing a bundle's own scheduler class and config (PNDM for SD 1.x), as diffusers would run
    it: the class's sampler whose options the config agrees with (keys it lacks at the class default), with the
    Karras schedule type if the config asks for Karras sigmas. ValueError for a class sdrt does not reproduce."""
    record = scheduler_class(config.get("_class_name", ""))
    candidates = [n for n, s in SAMPLERS.items() if s.scheduler == record.name and s.is_diffusers_scheduler]
    agreeing = [n for n in candidates if all(
        same_value(config.get(k, record.defaults[k]), v) for k, v in SAMPLERS[n].options.items())]
    chosen = (agreeing or [n for n in candidates if SAMPLERS[n].class_default])[0]
    karras = config.get("use_karras_sigmas") and _source(chosen, "karras") == "diffusers"
    return resolve_sampler(chosen, "Karras" if karras else None)
