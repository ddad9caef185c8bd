"""A1111 schedule types (Karras, exponential, SGM uniform) and zero-terminal-SNR configs vs diffusers, step by step."""
from __future__ import annotations

import diffusers
import numpy as np
import pytest
from test_samplers import (
    FLOAT32_ANCESTRAL_TOL, STEP_TOL, assert_schedule_matches, config_dict, diffusers_class,
    max_step_errors, step_tol,
)

from sdrt.runtime import noise_levels
from sdrt.runtime.samplers import (
    SAMPLERS, make_schedule, resolve_sampler, schedule_source, schedule_types_for, scheduler_for,
)
from sdrt.runtime.scheduler_classes import scheduler_class

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# Every sampler with every schedule type diffusers offers for its class (DPM++ 2S a: test_samplers_reference.py;
# A1111's schedule types: test_sigma_schedules.py).
SCHEDULED = [
    resolve_sampler(name, schedule=schedule)
    for name, spec in SAMPLERS.items() if spec.is_diffusers_scheduler
    for schedule in schedule_types_for(name) if schedule_source(resolve_sampler(name, schedule)) == "diffusers"
]
STEPS = (4, 12)
# Beta sigmas end abruptly (sigma / sigma_next = 139 over the last of 4 steps): KDPM2A's float32
# sigma_down = sqrt(next^2 - up^2) loses eps32 * (sigma / next)^2 / 2 = 6e-4 of itself there, a quarter of that in
# its stage level sqrt(sigma * sigma_down); measured 1.6e-4 (sdrt computes it in float64).
BETA_STAGE_RTOL = 5e-4

# Lin et al. 2023's recipe: zero terminal SNR, trailing spacing, v-prediction (eps is undefined at SNR 0).
ZERO_SNR = config_dict("trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction")
ZERO_SNR_SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "unipc"]
# Classes without the flag ignore it, in diffusers and here alike.
IGNORING_SAMPLERS = ["heun", "lms", "dpm_2"]
# DDIMScheduler keeps alphas_cumprod[-1] = 0, where sdrt's VE space needs the others' 2**-24: its first x0
# differs by sqrt(2**-24) = 2.4e-4 of the latents; measured max 1.2e-3 (eta = 0) over the steps below. (With
# eta = 1 diffusers' own DDIM turns NaN at 3 steps: sqrt(1 - alpha_prev - std^2) goes negative.)
DDIM_ZERO_SNR_TOL = 2e-3
# Euler's VE latents start at sigma 4096 there: diffusers' float32 c_in = 1 / sqrt(sigma^2 + 1) (3e-8 relative)
# meets the first step's 4078-wide dt. Measured max 2.7e-4, i.e. 7e-8 of sigma_max.
ZERO_SNR_VE_TOL = 1e-3
# torch's float32 sqrt is 1 ulp off numpy's for some inputs (SIGMA_RTOL in test_samplers.py); the zero-SNR shift
# sqrt(abar) - sqrt(abar_T) cancels near T, turning that into up to 4e-6 relative.
ZERO_SNR_ABAR_RTOL = 1e-5


def test_every_sampler_offers_the_schedule_types_its_class_has():
    assert len(SCHEDULED) >= 40
    # EulerAncestralDiscreteScheduler has no use_*_sigmas: only its spacing is diffusers'.
    assert [t for t in schedule_types_for("Euler a") if schedule_source(f"euler_a_{t}") == "diffusers"] == [
        "sgm_uniform"]
    assert schedule_types_for("LCM") == []
    assert set(schedule_types_for("UniPC")) == {"karras", "exponential", "sgm_uniform", "beta"}
    assert {t for t in schedule_types_for("DPM++ 2M") if schedule_source(f"dpmpp_2m_{t}") == "diffusers"} == {
        "karras", "exponential", "sgm_uniform", "beta"}


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", SCHEDULED)
def test_schedule_type_matches_diffusers_every_step(name, steps):
    errors = max_step_errors(name, config_dict(None), steps)
    assert errors.max() < step_tol(name), f"{name} steps={steps}: per-step errors {errors}"


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", SCHEDULED)
def test_schedule_type_schedule_matches_diffusers(name, steps):
    rtol = BETA_STAGE_RTOL if name == "dpm_2_ancestral_beta" else None
    assert_schedule_matches(name, config_dict(None), steps, rtol=rtol)


def test_schedule_types_change_the_schedule():
    """Guards the parametrization: each schedule type must actually reach the builder."""
    config = config_dict(None)
    variants = [make_schedule(n, config, 10).sigmas for n in ("DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M Exponential",
                                                              "DPM++ 2M SGM Uniform", "DPM++ 2M Beta")]
    for i in range(len(variants)):
        for j in range(i):
            assert not np.allclose(variants[i], variants[j])


def test_bundle_sigma_flags_do_not_override_the_sampler_name():
    """A bundle saved with use_karras_sigmas=True still runs 'DPM++ 2M' on its own schedule (A1111 semantics)."""
    config = config_dict(None, use_karras_sigmas=True)
    plain = make_schedule("DPM++ 2M", config_dict(None), 10)
    np.testing.assert_array_equal(make_schedule("DPM++ 2M", config, 10).sigmas, plain.sigmas)


def test_zero_snr_alphas_cumprod_match_diffusers():
    ref = diffusers.EulerDiscreteScheduler.from_config(ZERO_SNR).alphas_cumprod.numpy()
    ours = noise_levels.alphas_cumprod(scheduler_class("EulerDiscreteScheduler").resolve(ZERO_SNR), zero_snr=True)
    assert ours[-1] == ref[-1] == 2.0**-24
    np.testing.assert_allclose(ours, ref, rtol=ZERO_SNR_ABAR_RTOL)
    ddim_ref = diffusers.DDIMScheduler.from_config(ZERO_SNR).alphas_cumprod.numpy()
    np.testing.assert_allclose(ours[:-1], ddim_ref[:-1], rtol=ZERO_SNR_ABAR_RTOL)
    assert ddim_ref[-1] == 0.0


@pytest.mark.parametrize("steps", (3, 10, 20))
@pytest.mark.parametrize("name", ZERO_SNR_SAMPLERS + IGNORING_SAMPLERS)
def test_zero_snr_matches_diffusers(name, steps):
    assert_schedule_matches(name, ZERO_SNR, steps, rtol=ZERO_SNR_ABAR_RTOL)
    errors = max_step_errors(name, ZERO_SNR, steps)
    tol = ZERO_SNR_VE_TOL if name in ("euler", "euler_ancestral") else step_tol(name)
    assert errors.max() < tol, f"{name} steps={steps}: per-step errors {errors}"


def test_zero_snr_first_sigma_is_finite_and_large():
    schedule = make_schedule("Euler", ZERO_SNR, 10)
    assert schedule.sigmas[0] == pytest.approx(2.0**12, rel=1e-6)  # sqrt((1 - 2**-24) / 2**-24)


def _clamp_last_alpha(scheduler):
    scheduler.alphas_cumprod[-1] = noise_levels.ZERO_SNR_LAST_ALPHA_CUMPROD


@pytest.mark.parametrize("eta", (0.0, 1.0))
@pytest.mark.parametrize("steps", (3, 10, 20))
def test_zero_snr_ddim_matches_diffusers_with_the_clamp(steps, eta):
    errors = max_step_errors("ddim", ZERO_SNR, steps, eta=eta, prepare=_clamp_last_alpha)
    # eta = 1 at alpha_t = 2**-24: diffusers' float32 sqrt(1 - alpha_prev - std^2) cancels almost entirely.
    tol = STEP_TOL if eta == 0 else FLOAT32_ANCESTRAL_TOL
    assert errors.max() < tol, f"steps={steps} eta={eta}: {errors}"


@pytest.mark.parametrize("steps", (3, 10, 20))
def test_zero_snr_ddim_near_diffusers_without_the_clamp(steps):
    errors = max_step_errors("ddim", ZERO_SNR, steps)
    assert STEP_TOL < errors.max() < DDIM_ZERO_SNR_TOL, f"steps={steps}: {errors}"


@pytest.mark.parametrize("steps", (2, 4, 8))
def test_zero_snr_lcm_near_diffusers(steps):
    """LCMScheduler keeps alphas_cumprod[-1] = 0 like DDIM; sdrt's clamp to 2**-24 moves its first x0 as much."""
    errors = max_step_errors("lcm", ZERO_SNR, steps)
    assert errors.max() < DDIM_ZERO_SNR_TOL, f"steps={steps}: {errors}"


def test_lcm_ignores_timestep_spacing_as_diffusers_does():
    trailing = make_schedule("LCM", config_dict("trailing"), 4)
    np.testing.assert_array_equal(trailing.timesteps, [999, 759, 499, 259])
    np.testing.assert_array_equal(make_schedule("LCM", {}, 4).timesteps, trailing.timesteps)


def test_diffusers_class_of_each_sampler_exists():
    for name in SAMPLERS:
        assert diffusers_class(scheduler_for(name)[0]).__name__ == scheduler_for(name)[0]
