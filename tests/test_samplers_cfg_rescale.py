"""CFG rescale (Lin et al. 2023 section 3.4) against diffusers' rescale_noise_cfg."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg as diffusers_rescale

from sdrt.runtime.cfg_rescale import rescale_noise_cfg

TOL = 1e-12  # float64 on both sides; only summation order differs


@pytest.mark.parametrize("phi", (0.0, 0.3, 0.7, 1.0))
def test_matches_diffusers(phi):
    rng = np.random.default_rng(0)
    cond = rng.standard_normal((2, 4, 8, 8))
    guided = cond + 7.5 * (cond - rng.standard_normal((2, 4, 8, 8)) * 0.8)
    ref = diffusers_rescale(torch.from_numpy(guided), torch.from_numpy(cond), guidance_rescale=phi).numpy()
    np.testing.assert_allclose(rescale_noise_cfg(guided, cond, phi), ref, rtol=0, atol=TOL)


def test_phi_one_gives_each_image_the_conditional_std():
    rng = np.random.default_rng(1)
    cond, guided = rng.standard_normal((3, 4, 8, 8)), 5 * rng.standard_normal((3, 4, 8, 8))
    out = rescale_noise_cfg(guided, cond, 1.0)
    np.testing.assert_allclose(out.std(axis=(1, 2, 3)), cond.std(axis=(1, 2, 3)), rtol=1e-12)
    assert not np.allclose(out, guided)
