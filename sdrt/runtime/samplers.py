"""Samplers as k-diffusion-style generator functions in VE space, matching diffusers' schedulers step by step.

Every sampler has the shape `sample_x(model, x, schedule, noise=None, **options) -> Iterator[np.ndarray]`:
`model(x, sigma, t) -> denoised` (the caller scales x by 1 / sqrt(sigma^2 + 1) for the UNet, runs guidance and
converts eps / v to denoised), `noise(shape)` draws fresh standard normal noise, and the latents are yielded
after every model evaluation. Update formulas follow crowsonkb/k-diffusion k_diffusion/sampling.py; where a
diffusers scheduler deviates (PNDM's start, DDIM's off-grid prev_timestep, DPM-Solver's lower-order steps,
ancestral noise drawn even at the last step) the diffusers behaviour is reproduced. numpy only.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator

import numpy as np
from numpy.polynomial import Polynomial

from .schedules import Schedule, SchedulerConfig, build_schedule

Denoiser = Callable[[np.ndarray, float, float], np.ndarray]
NoiseFn = Callable[[tuple[int, ...]], np.ndarray]
Steps = Iterator[np.ndarray]  # the latents after every model evaluation

# Adams-Bashforth weights, newest eps first: PNDMScheduler.step_plms (PNDM paper eq. 12).
PLMS_WEIGHTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}
LMS_ORDER = 4  # LMSDiscreteScheduler.step(order=4), k-diffusion sample_lms(order=4)


def to_d(x: np.ndarray, sigma: float, denoised: np.ndarray) -> np.ndarray:
    """Karras ODE derivative dx/dsigma, i.e. the eps the model predicted (k-diffusion to_d)."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step into deterministic sigma_down and fresh-noise sigma_up (k-diffusion get_ancestral_step)."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - sigma_up**2), sigma_up


def relabel(x: np.ndarray, sigma: float, new_sigma: float) -> np.ndarray:
    """Re-read the same VP latents (x / sqrt(1 + sigma^2)) as VE latents at another noise level."""
    if sigma == new_sigma:
        return x
    return x * (math.sqrt(1.0 + new_sigma**2) / math.sqrt(1.0 + sigma**2))


def _need_noise(noise: NoiseFn | None, name: str) -> NoiseFn:
    """Return `noise`, or raise if a stochastic sampler was given none."""
    if noise is None:
        raise ValueError(f"{name} draws fresh noise every step: pass noise(shape)")
    return noise


def _transfer_levels(schedule: Schedule) -> tuple[list[float], list[float]]:
    """Each step's (from, to) levels; the plain grid unless diffusers' prev_timestep leaves it."""
    sigmas = schedule.sigmas
    s_from = sigmas[:-1] if schedule.sigmas_from is None else schedule.sigmas_from
    s_to = sigmas[1:] if schedule.sigmas_to is None else schedule.sigmas_to
    return [float(s) for s in s_from], [float(s) for s in s_to]


def sample_euler(model: Denoiser, x: np.ndarray, schedule: Schedule, noise: NoiseFn | None = None) -> Steps:
    """Euler's method on the probability-flow ODE (EulerDiscreteScheduler with s_churn=0)."""
    sigmas, ts = schedule.sigmas.tolist(), schedule.timesteps.tolist()
    for i, t in enumerate(ts):
        denoised = model(x, sigmas[i], t)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        yield x


def sample_euler_ancestral(
    model: Denoiser, x: np.ndarray, schedule: Schedule, noise: NoiseFn | None = None, eta: float = 1.0
) -> Steps:
    """Ancestral Euler (EulerAncestralDiscreteScheduler); noise is drawn every step, as diffusers does."""
    noise = _need_noise(noise, "sample_euler_ancestral")
    sigmas, ts = schedule.sigmas.tolist(), schedule.timesteps.tolist()
    for i, t in enumerate(ts):
        denoised = model(x, sigmas[i], t)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        # diffusers draws randn even for the last step (sigma_up = 0); k-diffusion skips it.
        x = x + noise(x.shape) * sigma_up
        yield x


def sample_ddim(
    model: Denoiser, x: np.ndarray, schedule: Schedule, noise: NoiseFn | None = None, eta: float = 0.0
) -> Steps:
    """DDIM (Song et al. 2020 eq. 12): in VE space an ancestral Euler step, deterministic at eta = 0."""
    sigmas, ts = schedule.sigmas.tolist(), schedule.timesteps.tolist()
    s_from, s_to = _transfer_levels(schedule)
    if eta > 0:
        noise = _need_noise(noise, "sample_ddim with eta > 0")
    for i, t in enumerate(ts):
        eps = to_d(x, sigmas[i], model(x, sigmas[i], t))
        x = relabel(x, sigmas[i], s_from[i])
        # DDIMScheduler.step: x_prev = sqrt(a') x0 + sqrt(1 - a' - std^2) eps + std z, divided by sqrt(a').
        sigma_down, sigma_up = get_ancestral_step(s_from[i], s_to[i], eta)
        x = x + eps * (sigma_down - s_from[i])
        if eta > 0:
            x = x + noise(x.shape) * sigma_up
        x = relabel(x, s_to[i], sigmas[i + 1])
        yield x


def _plms_eps(history: list[np.ndarray]) -> np.ndarray:
    """Adams-Bashforth combination of up to four eps, oldest first in `history`."""
    weights = PLMS_WEIGHTS[len(history)]
    return sum(w * e for w, e in zip(weights, reversed(history)))


def sample_pndm(model: Denoiser, x: np.ndarray, schedule: Schedule, noise: NoiseFn | None = None) -> Steps:
    """PLMS as PNDMScheduler(skip_prk_steps=True) runs it: each step is a DDIM transfer of a multistep eps.

    Evaluation 1 re-steps the first latents with the mean of the first two eps (a Heun-like start) and
    that eps is not kept; diffusers' `ets` history holds eps 0, 2, 3, ... and keeps the newest four.
    """
    sigmas, ts = schedule.sigmas.tolist(), schedule.timesteps.tolist()
    s_from, s_to = _transfer_levels(schedule)
    history, x_first = [], x
    for i, t in enumerate(ts):
        eps = to_d(x, sigmas[i], model(x, sigmas[i], t))
        if i == 1:
            eps, x, sigma = (eps + history[-1]) / 2, x_first, sigmas[0]
        else:
            history = history[-3:] + [eps]
            eps, sigma = _plms_eps(history), sigmas[i]
        x = relabel(x, sigma, s_from[i])
        # PNDM paper eq. 9 (_get_prev_sample) is the DDIM transfer: in VE space x += (sigma' - sigma) eps.
        x = x + eps * (s_to[i] - s_from[i])
        x = relabel(x, s_to[i], sigmas[i + 1])
        yield x


def _lms_coefficient(sigmas: list[float], i: int, order: int, j: int) -> float:
    """Integral over [sigma_i, sigma_i+1] of the Lagrange basis polynomial j (k-diffusion linear_multistep_coeff)."""
    basis = Polynomial([1.0])
    for k in range(order):
        if k != j:
            basis *= Polynomial([-sigmas[i - k], 1.0]) / (sigmas[i - j] - sigmas[i - k])
    antiderivative = basis.integ()
    return float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i]))


def sample_lms(
    model: Denoiser, x: np.ndarray, schedule: Schedule, noise: NoiseFn | None = None, order: int = LMS_ORDER
) -> Steps:
    """Linear multistep over sigma (LMSDiscreteScheduler); exact polynomial integrals instead of quad."""
    sigmas, ts = schedule.sigmas.tolist(), schedule.timesteps.tolist()
    ds = []
    for i, t in enumerate(ts):
        ds = (ds + [to_d(x, sigmas[i], model(x, sigmas[i], t))])[-order:]
        cur_order = min(i + 1, order)
        coeffs = [_lms_coefficient(sigmas, i, cur_order, j) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        yield x


def sample_dpmpp_2m(model: Denoiser, x: np.ndarray, schedule: Schedule, noise: NoiseFn | None = None) -> Steps:
    """DPM-Solver++(2M) (Lu et al. 2022 alg. 2), orders per step from the schedule (diffusers' lower_order rules)."""
    sigmas, ts = schedule.sigmas.tolist(), schedule.timesteps.tolist()
    orders = schedule.orders or (1,) + (2,) * (len(ts) - 1)
    old_denoised = None
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma, t)
        if orders[i] == 1 or old_denoised is None or sigma_next in (0.0, sigma):
            denoised_d = denoised  # first order; with h = 0 (Karras + sigma_min final) the step is a no-op
        else:
            # r = h_last / h with lambda = -log(sigma); k-diffusion sample_dpmpp_2m.
            r = math.log(sigmas[i - 1] / sigma) / math.log(sigma / sigma_next)
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        # exp(-h) = sigma_next / sigma, so the data-prediction update needs no log (and allows sigma_next = 0).
        ratio = sigma_next / sigma
        x = ratio * x + (1 - ratio) * denoised_d
        old_denoised = denoised
        yield x


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler function, the diffusers scheduler class it reproduces and that class's config overrides."""

    fn: Callable[..., Steps]
    scheduler: str
    options: dict = field(default_factory=dict)
    label: str = ""  # the AUTOMATIC1111 web UI name


SAMPLERS = {
    "pndm": SamplerSpec(sample_pndm, "PNDMScheduler", label="PLMS"),
    "ddim": SamplerSpec(sample_ddim, "DDIMScheduler", label="DDIM"),
    "euler": SamplerSpec(sample_euler, "EulerDiscreteScheduler", label="Euler"),
    "euler_ancestral": SamplerSpec(sample_euler_ancestral, "EulerAncestralDiscreteScheduler", label="Euler a"),
    "lms": SamplerSpec(sample_lms, "LMSDiscreteScheduler", label="LMS"),
    "lms_karras": SamplerSpec(sample_lms, "LMSDiscreteScheduler", {"use_karras_sigmas": True}, "LMS Karras"),
    "dpmpp_2m": SamplerSpec(sample_dpmpp_2m, "DPMSolverMultistepScheduler", label="DPM++ 2M"),
    "dpmpp_2m_karras": SamplerSpec(
        sample_dpmpp_2m, "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM++ 2M Karras"
    ),
}

_ALIASES = {"plms": "pndm", "euler_a": "euler_ancestral", "k_euler": "euler", "k_euler_a": "euler_ancestral"}


def _normalize(name: str) -> str:
    """Lower-case, '+' as 'p', spaces and dashes as '_': 'DPM++ 2M Karras' -> 'dpmpp_2m_karras'."""
    return "_".join(name.strip().lower().replace("+", "p").replace("-", " ").split())


def _alias_table() -> dict[str, str]:
    """Every accepted spelling (normalized) mapped to its canonical name."""
    table = {name: name for name in SAMPLERS}
    table.update(_ALIASES)
    for name, spec in SAMPLERS.items():
        table[_normalize(spec.label)] = name
        if not spec.options:
            table[spec.scheduler.lower()] = name
    return table


def resolve_sampler(name: str) -> str:
    """Canonical sampler name for an A1111 label, diffusers-ish or canonical name, case-insensitively."""
    canonical = _alias_table().get(_normalize(name))
    if canonical is None:
        valid = ", ".join(f"{n!r} ({s.label!r})" for n, s in SAMPLERS.items())
        raise ValueError(f"unknown sampler {name!r}; expected one of {valid}")
    return canonical


def make_schedule(name: str, config: SchedulerConfig, steps: int) -> Schedule:
    """The schedule that `name`'s diffusers scheduler builds in set_timesteps(steps)."""
    spec = SAMPLERS[resolve_sampler(name)]
    return build_schedule(spec.scheduler, config, steps, **spec.options)


def sample(
    name: str, model: Denoiser, x: np.ndarray, schedule: Schedule, noise: NoiseFn, eta: float | None = None
) -> Steps:
    """Run the named sampler; `eta` (None: the sampler's own default) goes to the samplers that take one."""
    fn = SAMPLERS[resolve_sampler(name)].fn
    takes_eta = "eta" in inspect.signature(fn).parameters
    return fn(model, x, schedule, noise, **({"eta": eta} if eta is not None and takes_eta else {}))


def sampler_label(name: str) -> str:
    """The AUTOMATIC1111 label of a sampler (what PNG parameters and progress bars show)."""
    return SAMPLERS[resolve_sampler(name)].label
