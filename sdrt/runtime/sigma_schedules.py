"""A1111's schedule types as sigma sequences, and the schedule a k-diffusion sampler runs on one of them.

A1111 1.9+ (modules/sd_schedulers.py) lets any k-diffusion sampler run on any of these sequences; each function
here is `schedule(n, train) -> sigmas`, where `train` holds the model's training sigmas in ascending order
(k-diffusion's DiscreteSchedule.sigmas: sigma_min = train[0], sigma_max = train[-1]) and the result has one level
per step plus the last (0, except KL Optimal, which A1111 ends at sigma_min). A1111 returns float32 tensors: so
do these, carried as float64. numpy only.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .noise_levels import (
    F32, Schedule, SchedulerConfig, alphas_cumprod, beta_sigmas, exponential_sigmas, karras_sigmas, sigma_to_t,
    train_sigmas,
)
from .schedules import skipped_steps

SigmaSchedule = Callable[[int, np.ndarray], np.ndarray]
StageRule = Callable[[float, float], float]

POLYEXPONENTIAL_RHO = 1.0  # A1111's default_rho for Polyexponential (k-diffusion get_sigmas_polyexponential)
# Align Your Steps (Sabour et al. 2024), NVIDIA's 10-step SD 1.5 schedule as A1111 ships it; other step counts
# interpolate it log-linearly. It is tied to SD 1.x's noise schedule, whose ends it repeats to 3 decimals.
AYS_SD1 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)


def _zero_terminated(sigmas: np.ndarray) -> np.ndarray:
    """k-diffusion's append_zero, as float32 (A1111's FloatTensor) carried in float64."""
    return np.append(sigmas, 0.0).astype(F32).astype(np.float64)


def t_to_sigma(t: np.ndarray, train: np.ndarray) -> np.ndarray:
    """k-diffusion DiscreteSchedule.t_to_sigma: log-linear interpolation of the training sigmas at float t."""
    t = np.asarray(t, np.float64)
    low, high, w = np.floor(t).astype(int), np.ceil(t).astype(int), t - np.floor(t)
    log_sigmas = np.log(train)
    return np.exp((1 - w) * log_sigmas[low] + w * log_sigmas[high])


def uniform(n: int, train: np.ndarray) -> np.ndarray:
    """DiscreteSchedule.get_sigmas(n): n timesteps evenly spaced from the last training step to 0."""
    return _zero_terminated(t_to_sigma(np.linspace(len(train) - 1, 0, n), train))


def karras(n: int, train: np.ndarray) -> np.ndarray:
    """k-diffusion get_sigmas_karras, rho 7."""
    return _zero_terminated(karras_sigmas(train[0], train[-1], n))


def exponential(n: int, train: np.ndarray) -> np.ndarray:
    """k-diffusion get_sigmas_exponential."""
    return _zero_terminated(exponential_sigmas(train[0], train[-1], n))


def polyexponential(n: int, train: np.ndarray) -> np.ndarray:
    """k-diffusion get_sigmas_polyexponential: a polynomial ramp in log sigma."""
    ramp = np.linspace(1, 0, n) ** POLYEXPONENTIAL_RHO
    log_min, log_max = math.log(train[0]), math.log(train[-1])
    return _zero_terminated(np.exp(ramp * (log_max - log_min) + log_min))


def sgm_uniform(n: int, train: np.ndarray) -> np.ndarray:
    """A1111's sgm_uniform: n + 1 timesteps evenly spaced between sigma_max's and sigma_min's, the last dropped."""
    start, end = sigma_to_t(np.array([train[-1], train[0]]), np.log(train))
    return _zero_terminated(t_to_sigma(np.linspace(start, end, n + 1)[:-1], train))


def kl_optimal(n: int, train: np.ndarray) -> np.ndarray:
    """A1111's kl_optimal (Sabour et al. 2024, eq. 11): evenly spaced in arctan(sigma); ends at sigma_min, not 0."""
    alpha_min, alpha_max = math.atan(train[0]), math.atan(train[-1])
    step = np.arange(n + 1) / n
    return np.tan(step * alpha_min + (1.0 - step) * alpha_max).astype(F32).astype(np.float64)


def align_your_steps(n: int, train: np.ndarray) -> np.ndarray:
    """A1111's get_align_your_steps_sigmas for SD 1.x: the 10-step list, log-linearly interpolated to n levels."""
    if (round(float(train[-1]), 3), round(float(train[0]), 3)) != (AYS_SD1[0], AYS_SD1[-1]):
        raise ValueError(f"Align Your Steps is defined for SD 1.x's noise schedule (sigmas {AYS_SD1[-1]} to "
                         f"{AYS_SD1[0]}), got {train[0]:.4g} to {train[-1]:.4g}")
    if n == len(AYS_SD1):  # A1111 uses the list as is when n equals its length (11 levels, 11 steps)
        return _zero_terminated(np.array(AYS_SD1))
    log_ascending = np.log(np.array(AYS_SD1[::-1]))
    interpolated = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(AYS_SD1)), log_ascending)
    return _zero_terminated(np.exp(interpolated)[::-1])


def simple(n: int, train: np.ndarray) -> np.ndarray:
    """A1111's simple_scheduler: every (T / n)-th training sigma from the top."""
    stride = len(train) / n
    return _zero_terminated(np.array([train[-(1 + int(x * stride))] for x in range(n)]))


def normal(n: int, train: np.ndarray) -> np.ndarray:
    """A1111's normal_scheduler: n timesteps evenly spaced between sigma_max's and sigma_min's."""
    start, end = sigma_to_t(np.array([train[-1], train[0]]), np.log(train))
    return _zero_terminated(t_to_sigma(np.linspace(start, end, n), train))


def ddim(n: int, train: np.ndarray) -> np.ndarray:
    """A1111's ddim_scheduler: training sigmas 1, 1 + T // n, ... (may give a step more than n), descending."""
    stride = max(len(train) // n, 1)
    return _zero_terminated(train[1::stride][::-1])


def beta(n: int, train: np.ndarray) -> np.ndarray:
    """A1111's beta_scheduler at its default alpha = beta = 0.6 (Lee et al. 2024)."""
    return _zero_terminated(beta_sigmas(float(train[0]), float(train[-1]), n))


# ---- the second evaluation of two-stage k-diffusion samplers, from (sigma, sigma_next) ----


def stage_at_next(sigma: float, sigma_next: float) -> float:
    """Heun: the second evaluation is at the next level."""
    return sigma_next


def stage_at_log_midpoint(sigma: float, sigma_next: float) -> float:
    """DPM2, DPM++ SDE (r = 1/2): exp(lerp(log sigma, log sigma_next, 1/2))."""
    return math.sqrt(sigma * sigma_next)


def stage_at_ancestral_midpoint(sigma: float, sigma_next: float) -> float:
    """DPM2 a, DPM++ 2S a: the log-midpoint of sigma and sigma_down (k-diffusion get_ancestral_step, eta 1)."""
    sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    return math.sqrt(sigma * math.sqrt(sigma_next**2 - sigma_up**2))


@dataclass(frozen=True)
class KDiffusionRun:
    """How A1111 runs a k-diffusion sampler on a sigma sequence (modules/sd_samplers_kdiffusion.py)."""

    stage: StageRule | None = None  # two-stage samplers: where each step's second evaluation is
    discard_penultimate_sigma: bool = False  # A1111's discard_next_to_last_sigma (DPM2, DPM2 a)


def k_diffusion_schedule(run: KDiffusionRun, sigmas_of: SigmaSchedule, config: SchedulerConfig, steps: int,
                         strength: float = 1.0) -> Schedule:
    """The schedule A1111 gives a k-diffusion sampler: the sigma sequence, each two-stage step's second level
    interleaved (not for a step to 0, which k-diffusion takes as one Euler step), continuous timesteps from
    CompVisDenoiser.sigma_to_t, and noise at sigmas[0]. img2img keeps the end, as diffusers' get_timesteps."""
    train = train_sigmas(alphas_cumprod(config, zero_snr=config.rescale_betas_zero_snr)).astype(np.float64)
    sigmas = sigmas_of(steps + 1 if run.discard_penultimate_sigma else steps, train)
    if run.discard_penultimate_sigma:
        sigmas = np.delete(sigmas, -2)
    levels = []
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        levels += [sigma] if run.stage is None or sigma_next == 0 else [sigma, run.stage(sigma, sigma_next)]
    levels = np.array(levels + [sigmas[-1]])
    schedule = Schedule(levels, sigma_to_t(levels[:-1], np.log(train)), float(sigmas[0]))
    begin = skipped_steps(len(sigmas) - 1, strength) * (1 if run.stage is None else 2)
    return schedule.starting_at(begin)
