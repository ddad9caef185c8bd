"""Samplers without a diffusers scheduler, against the published algorithm reproduced here in torch.

DPM++ 2S a: k-diffusion's sample_dpmpp_2s_ancestral (Lu et al. 2022b DPM-Solver++(2S), r = 1/2, made ancestral
with k-diffusion's get_ancestral_step), on KDPM2AncestralDiscreteScheduler's schedule, whose stage level is
exactly that algorithm's sigma_fn(t + h / 2) between sigma and sigma_down (test_samplers.py checks that schedule).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_samplers import (
    SHAPE, STEP_TOL, config_dict, denoiser_for, noise_source,
)

from sdrt.runtime.samplers import make_schedule, resolve_sampler, sample, schedule_source, schedule_types_for

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# On the diffusers schedule types of its KDPM2A schedule; A1111's: test_sigma_schedules.py.
NAMES = ["dpmpp_2s_ancestral"] + [
    n for n in (resolve_sampler("DPM++ 2S a", t) for t in schedule_types_for("DPM++ 2S a"))
    if schedule_source(n) == "diffusers"
]


def k_diffusion_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """k-diffusion get_ancestral_step."""
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def expm1(x: float) -> float:
    return torch.expm1(torch.tensor(x, dtype=torch.float64)).item()


def reference_dpmpp_2s_ancestral(model, x, levels, timesteps, draw):
    """k-diffusion sample_dpmpp_2s_ancestral (eta 1, s_noise 1) in float64 torch, yielding after every evaluation.

    levels: [s0, stage0, s1, stage1, ..., s_last, 0]; timesteps: one per evaluation, in order.
    """
    grid, stages, ts = levels[0::2] + levels[-1:], levels[1::2], iter(timesteps)
    sigma_fn, t_fn = (lambda t: math.exp(-t)), (lambda s: -math.log(s))
    for i in range(len(grid) - 1):
        sigma = grid[i]
        denoised = model(x, sigma, next(ts))
        sigma_down, sigma_up = k_diffusion_ancestral_step(sigma, grid[i + 1])
        if sigma_down == 0:
            yield x + (x - denoised) / sigma * (sigma_down - sigma)  # Euler to 0
            return
        t, t_next = t_fn(sigma), t_fn(sigma_down)
        s = t_fn(stages[i])  # t + h * r, h = t_next - t, r = 1/2 (the schedule's float32 value of it)
        x_2 = (sigma_fn(s) / sigma_fn(t)) * x - expm1(-(s - t)) * denoised
        yield x_2
        denoised_2 = model(x_2, sigma_fn(s), next(ts))
        x = (sigma_fn(t_next) / sigma_fn(t)) * x - expm1(-(t_next - t)) * denoised_2
        x = x + draw(x.shape) * sigma_up
        yield x


def torch_model(cfg: dict):
    denoiser = denoiser_for(cfg)
    return lambda x, sigma, t: torch.from_numpy(denoiser(x.numpy(), sigma, t))


@pytest.mark.parametrize("steps", (3, 10, 20))
@pytest.mark.parametrize("name", NAMES)
def test_dpmpp_2s_ancestral_matches_k_diffusion_every_step(name, steps):
    cfg = config_dict(None)
    # The schedule (KDPM2AncestralDiscreteScheduler's, checked against it in test_samplers.py) is shared: this
    # tests the integrator. diffusers' own stage levels differ from it by up to STAGE_RTOL (float32 cancellation).
    schedule = make_schedule(name, cfg, steps)
    start = np.random.default_rng(0).standard_normal(SHAPE)
    x0 = torch.from_numpy(start) * schedule.init_noise_sigma
    ref = [x.numpy() for x in reference_dpmpp_2s_ancestral(
        torch_model(cfg), x0, schedule.sigmas.tolist(), schedule.timesteps.tolist(), noise_source(name, 1)
    )]
    draw = noise_source(name, 1)
    ours = list(sample(name, denoiser_for(cfg), start * schedule.init_noise_sigma, schedule,
                       lambda shape: draw(shape).numpy()))
    assert len(ours) == len(ref) == 2 * steps - 1
    errors = np.array([np.abs(a - b).max() for a, b in zip(ours, ref)])
    assert errors.max() < STEP_TOL, f"{name} steps={steps}: per-step errors {errors}"


def test_dpmpp_2s_ancestral_differs_from_dpm_2_ancestral():
    """Same schedule, different integrator: guards against the registry pointing both at one function."""
    config = config_dict(None)
    schedule = make_schedule("DPM++ 2S a", config, 6)
    start = np.random.default_rng(0).standard_normal(SHAPE) * schedule.init_noise_sigma
    runs = []
    for name in ("DPM++ 2S a", "DPM2 a"):
        draw = noise_source(name, 1)
        runs.append(list(sample(name, denoiser_for(config_dict(None)), start, schedule,
                                lambda shape: draw(shape).numpy()))[-1])
    assert np.abs(runs[0] - runs[1]).max() > 1e-3
