"""Two-stage samplers in VE space: Heun, DPM2, DPM2 a, DPM++ 2S a, DPM++ SDE (k-diffusion k_diffusion/sampling.py).

Each step but the last evaluates the model twice; the schedule interleaves the step levels with the second-stage
levels (`stages`), and the latents are yielded after every evaluation, so the intermediate latents sit at the stage
level, as diffusers' two-call `step()` leaves them. The last step, to sigma 0, is a single Euler step. numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .noise_levels import Schedule
from .samplers_basic import Denoiser, NoiseFn, Steps, emit, get_ancestral_step, need_noise, to_d


@dataclass(frozen=True)
class TwoStageStep:
    """One step of a two-stage sampler: from `sigma` to `sigma_next`, the second evaluation at `sigma_stage`."""

    sigma: float
    t: float
    sigma_next: float
    sigma_stage: float | None  # None: the last step, a single Euler evaluation
    t_stage: float | None


def two_stage_steps(schedule: Schedule) -> list[TwoStageStep]:
    """Undo the schedule's interleaving: [s0, stage0, s1, stage1, ..., s_last, 0]."""
    sigmas, ts = schedule.sigmas.tolist(), schedule.timesteps.tolist()
    steps = []
    for i in range(0, len(ts), 2):
        staged = i + 1 < len(ts)
        sigma_next = sigmas[i + 2] if staged else sigmas[i + 1]
        steps.append(TwoStageStep(sigmas[i], ts[i], sigma_next, sigmas[i + 1] if staged else None,
                                  ts[i + 1] if staged else None))
    return steps


def _euler(x: np.ndarray, step: TwoStageStep, denoised: np.ndarray, sigma_to: float) -> np.ndarray:
    return x + to_d(x, step.sigma, denoised) * (sigma_to - step.sigma)


def sample_heun(model: Denoiser, x: np.ndarray, schedule: Schedule, noise: NoiseFn | None = None) -> Steps:
    """Heun's method (Karras et al. 2022 alg. 1 with churn 0), as HeunDiscreteScheduler."""
    for step in two_stage_steps(schedule):
        d = to_d(x, step.sigma, model(x, step.sigma, step.t))
        dt = step.sigma_next - step.sigma
        x_2 = x + d * dt
        x_2 = yield from emit(x_2)
        if step.sigma_stage is None:
            x = x_2
            continue
        d_2 = to_d(x_2, step.sigma_next, model(x_2, step.sigma_next, step.t_stage))
        x = x + (d + d_2) / 2 * dt  # the trapezoid rule: average the slopes at both ends
        x = yield from emit(x)


def sample_dpm_2(model: Denoiser, x: np.ndarray, schedule: Schedule, noise: NoiseFn | None = None) -> Steps:
    """DPM-Solver-2 (Lu et al. 2022 alg. 1) in Karras's sigma form: the slope at the log-midpoint, as KDPM2."""
    for step in two_stage_steps(schedule):
        denoised = model(x, step.sigma, step.t)
        if step.sigma_stage is None:
            x = _euler(x, step, denoised, step.sigma_next)
            x = yield from emit(x)
            continue
        x_2 = _euler(x, step, denoised, step.sigma_stage)
        x_2 = yield from emit(x_2)
        d_2 = to_d(x_2, step.sigma_stage, model(x_2, step.sigma_stage, step.t_stage))
        x = x + d_2 * (step.sigma_next - step.sigma)
        x = yield from emit(x)


def sample_dpm_2_ancestral(
    model: Denoiser, x: np.ndarray, schedule: Schedule, noise: NoiseFn | None = None
) -> Steps:
    """Ancestral DPM-Solver-2 (k-diffusion sample_dpm_2_ancestral, eta 1): DPM2 to sigma_down, then fresh noise."""
    noise = need_noise(noise, "sample_dpm_2_ancestral")
    for step in two_stage_steps(schedule):
        denoised = model(x, step.sigma, step.t)
        sigma_down, sigma_up = get_ancestral_step(step.sigma, step.sigma_next)
        if step.sigma_stage is None:
            x = _euler(x, step, denoised, sigma_down)
            x = yield from emit(x)
            continue
        x_2 = _euler(x, step, denoised, step.sigma_stage)
        x_2 = yield from emit(x_2)
        d_2 = to_d(x_2, step.sigma_stage, model(x_2, step.sigma_stage, step.t_stage))
        x = x + d_2 * (sigma_down - step.sigma) + noise(x.shape) * sigma_up
        x = yield from emit(x)


def _dpmpp_1s(x: np.ndarray, sigma: float, sigma_to: float, denoised: np.ndarray) -> np.ndarray:
    """First-order DPM-Solver++ (Lu et al. 2022b eq. 9) in VE space: exp(-h) = sigma_to / sigma."""
    ratio = sigma_to / sigma
    return ratio * x + (1 - ratio) * denoised


def sample_dpmpp_2s_ancestral(
    model: Denoiser, x: np.ndarray, schedule: Schedule, noise: NoiseFn | None = None
) -> Steps:
    """Ancestral DPM-Solver++(2S) (k-diffusion sample_dpmpp_2s_ancestral, eta 1, r = 1/2).

    No diffusers scheduler implements it; its stage level, the log-midpoint of sigma and sigma_down, is
    KDPM2AncestralDiscreteScheduler's, whose schedule it uses.
    """
    noise = need_noise(noise, "sample_dpmpp_2s_ancestral")
    for step in two_stage_steps(schedule):
        denoised = model(x, step.sigma, step.t)
        sigma_down, sigma_up = get_ancestral_step(step.sigma, step.sigma_next)
        if step.sigma_stage is None:
            x = _euler(x, step, denoised, sigma_down)
            x = yield from emit(x)
            continue
        x_2 = _dpmpp_1s(x, step.sigma, step.sigma_stage, denoised)
        x_2 = yield from emit(x_2)
        denoised_2 = model(x_2, step.sigma_stage, step.t_stage)
        x = _dpmpp_1s(x, step.sigma, sigma_down, denoised_2) + noise(x.shape) * sigma_up
        x = yield from emit(x)


class BrownianSteps:
    """Brownian motion W(sigma) sampled downwards through one step's three levels, from `noise`.

    k-diffusion's DPM++ SDE draws W(stage) - W(sigma) and then W(next) - W(sigma) over overlapping intervals
    (torchsde's BrownianTree); building both from two independent normals keeps their correlation, so the
    noise is distributed as A1111's, though not the same numbers.
    """

    def __init__(self, noise: NoiseFn, shape: tuple[int, ...], sigma: float, sigma_stage: float, sigma_next: float):
        self.noise, self.shape = noise, shape
        self.spans = (sigma - sigma_stage, sigma_stage - sigma_next)
        self.z1 = None

    def to_stage(self) -> np.ndarray:
        """(W(stage) - W(sigma)) / sqrt(sigma - stage), a standard normal."""
        self.z1 = self.noise(self.shape)
        return self.z1

    def to_next(self) -> np.ndarray:
        """(W(next) - W(sigma)) / sqrt(sigma - next), sharing the first span's increment."""
        a, b = self.spans
        return (math.sqrt(a) * self.z1 + math.sqrt(b) * self.noise(self.shape)) / math.sqrt(a + b)


def sample_dpmpp_sde(model: Denoiser, x: np.ndarray, schedule: Schedule, noise: NoiseFn | None = None) -> Steps:
    """DPM-Solver++ SDE (k-diffusion sample_dpmpp_sde, eta 1, r = 1/2), as DPMSolverSDEScheduler.

    Both stages are ancestral first-order DPM-Solver++ steps from sigma; with r = 1/2 the second uses only
    the stage's denoised (fac = 1 / (2r) = 1). Noise: see BrownianSteps.
    """
    noise = need_noise(noise, "sample_dpmpp_sde")
    for step in two_stage_steps(schedule):
        denoised = model(x, step.sigma, step.t)
        if step.sigma_stage is None:
            x = _euler(x, step, denoised, step.sigma_next)
            x = yield from emit(x)
            continue
        brownian = BrownianSteps(noise, x.shape, step.sigma, step.sigma_stage, step.sigma_next)
        sigma_down, sigma_up = get_ancestral_step(step.sigma, step.sigma_stage)
        x_2 = _dpmpp_1s(x, step.sigma, sigma_down, denoised) + brownian.to_stage() * sigma_up
        x_2 = yield from emit(x_2)
        denoised_2 = model(x_2, step.sigma_stage, step.t_stage)
        sigma_down, sigma_up = get_ancestral_step(step.sigma, step.sigma_next)
        x = _dpmpp_1s(x, step.sigma, sigma_down, denoised_2) + brownian.to_next() * sigma_up
        x = yield from emit(x)
