"""Every sampler against its diffusers class on configs that leave the optional keys out (the class defaults apply)
and on configs that set them: clip_sample on and off with ranges, dynamic thresholding; step by step."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_samplers import (
    DIFFUSERS_SAMPLERS, SD15_CONFIG, STEP_TOL, diffusers_class, max_step_errors, run_diffusers, step_tol,
)

from sdrt.runtime.samplers import SAMPLERS
from sdrt.runtime.scheduler_classes import scheduler_class
from sdrt.runtime.x0_clamp import ClipSample, DynamicThreshold

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# Data of std 2 puts most predicted x0 outside [-1, 1], so clipping and thresholding change every step.
WIDE_DATA_STD = 2.0
# Latents of that data are ~4x larger than SD-like ones (test_samplers' STEP_TOL is for std 0.5), same precision.
WIDE_STEP_TOL = 4 * STEP_TOL
# torch.quantile and np.quantile ("linear") interpolate alike; float32 division by s rounds at 1 ulp.
THRESHOLD_RTOL_F32 = 2e-7
STEPS = (4, 10)

# A config written by PNDMScheduler (SD 1.5's training keys only) and one with no keys at all.
PNDM_SAVED = {k: SD15_CONFIG[k] for k in ("_class_name", "beta_start", "beta_end", "beta_schedule",
                                          "num_train_timesteps")}
SILENT_CONFIGS = {"pndm-saved": PNDM_SAVED, "empty": {}}
# An empty config takes diffusers' DDPM betas (linear, 1e-4 to 0.02): sigma_max 157 instead of SD's 14.6, and the
# VE latents, with the float32 rounding of diffusers' ancestral steps (FLOAT32_ANCESTRAL_TOL), grow with it.
LATENT_SCALE = {"pndm-saved": 1, "empty": 11}

CLIPPING = [n for n in DIFFUSERS_SAMPLERS if "clip_sample" in scheduler_class(SAMPLERS[n].scheduler).defaults]
THRESHOLDING = [n for n in DIFFUSERS_SAMPLERS if "thresholding" in scheduler_class(SAMPLERS[n].scheduler).defaults]
SETTINGS = {
    "clip 0.5": {"clip_sample": True, "clip_sample_range": 0.5},
    "clip 1.5": {"clip_sample": True, "clip_sample_range": 1.5},
    "no clip": {"clip_sample": False},
    "threshold 0.9 / 2.5": {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 2.5},
    "threshold": {"thresholding": True},  # ratio 0.995 and max 1.0 by default: plain clipping at 1
}
SETTING_CASES = [(name, setting) for setting, keys in SETTINGS.items()
                 for name in (CLIPPING if "clip_sample" in keys else THRESHOLDING)]


def wide_errors(name: str, cfg: dict, steps: int, eta: float = 0.0) -> np.ndarray:
    return max_step_errors(name, cfg, steps, eta=eta, data_std=WIDE_DATA_STD)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("config", list(SILENT_CONFIGS))
@pytest.mark.parametrize("name", DIFFUSERS_SAMPLERS)
def test_silent_config_matches_diffusers(name, config, steps):
    """Keys the config lacks take the diffusers class's own defaults (DDIM clips x0, steps_offset 0, ...)."""
    errors = wide_errors(name, SILENT_CONFIGS[config], steps)
    tol = step_tol(name) / STEP_TOL * WIDE_STEP_TOL * LATENT_SCALE[config]
    assert errors.max() < tol, f"{name} {config} steps={steps}: per-step errors {errors}"


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name, setting", SETTING_CASES)
def test_clip_and_threshold_settings_match_diffusers(name, setting, steps):
    errors = wide_errors(name, {**SD15_CONFIG, **SETTINGS[setting]}, steps)
    tol = step_tol(name) / STEP_TOL * WIDE_STEP_TOL
    assert errors.max() < tol, f"{name} {SETTINGS[setting]} steps={steps}: {errors}"


@pytest.mark.parametrize("eta", (0.0, 1.0))
def test_ddim_clips_x0_but_keeps_the_models_eps(eta):
    """DDIMScheduler.step clips pred_original_sample only; its eps term is the model's, with or without noise."""
    errors = wide_errors("ddim", PNDM_SAVED, 10, eta=eta)
    assert errors.max() < WIDE_STEP_TOL, f"eta={eta}: {errors}"


@pytest.mark.parametrize("name, setting", [("ddim", {"clip_sample": True}), ("lcm", {"clip_sample": True}),
                                           ("heun", {"clip_sample": True}), ("dpmpp_2m", {"thresholding": True}),
                                           ("unipc", {"thresholding": True}), ("deis", {"thresholding": True})])
def test_the_clamp_changes_the_result(name, setting):
    """Guards the comparisons above: with and without the clamp the runs are far apart."""
    start = np.random.default_rng(0).standard_normal((2, 4, 8, 8))
    on = run_diffusers(name, {**SD15_CONFIG, **setting}, 4, start, 1, 0.0, data_std=WIDE_DATA_STD)[-1]
    off_setting = {key: False for key in setting}
    off = run_diffusers(name, {**SD15_CONFIG, **off_setting}, 4, start, 1, 0.0, data_std=WIDE_DATA_STD)[-1]
    assert np.abs(on - off).max() > 1000 * WIDE_STEP_TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ratio, max_value", [(0.995, 1.0), (0.9, 2.5), (0.5, 10.0)])
def test_dynamic_threshold_is_diffusers_threshold_sample(dtype, ratio, max_value):
    x0 = torch.randn((3, 4, 9, 7), generator=torch.Generator().manual_seed(0), dtype=dtype) * 3
    reference = diffusers_class("DDIMScheduler")(thresholding=True, dynamic_thresholding_ratio=ratio,
                                                 sample_max_value=max_value)._threshold_sample(x0).numpy()
    ours = DynamicThreshold(ratio, max_value)(x0.numpy())
    assert ours.dtype == reference.dtype
    np.testing.assert_allclose(ours, reference, rtol=THRESHOLD_RTOL_F32, atol=0)
    assert np.abs(ours).max() <= 1.0  # divided by s: always within [-1, 1]


def test_clip_sample_is_a_clamp():
    x0 = np.linspace(-3, 3, 13)
    np.testing.assert_array_equal(ClipSample(1.5)(x0), np.clip(x0, -1.5, 1.5))
