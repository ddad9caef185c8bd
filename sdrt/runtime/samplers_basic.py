"""First-order and linear-multistep samplers in VE space: Euler, Euler a, DDIM, PLMS (PNDM), LMS, LCM.

Every sampler has the shape `sample_x(model, x, schedule, noise=None, **options) -> Steps`:
`model(x, sigma, t) -> denoised` (the caller scales x by 1 / sqrt(sigma^2 + 1) for the UNet, runs guidance and
converts eps / v to denoised), `noise(shape)` draws fresh standard normal noise, and the latents are yielded
after every model evaluation; a consumer may `send` replacement latents for the ones just yielded (`emit`).
Update formulas follow crowsonkb/k-diffusion k_diffusion/sampling.py; where a
diffusers scheduler deviates (PNDM's start, DDIM's off-grid prev_timestep, ancestral noise drawn even at the
last step) the diffusers behaviour is reproduced. numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator

import numpy as np
from numpy.polynomial import Polynomial

from .noise_levels import Schedule

Denoiser = Callable[[np.ndarray, float, float], np.ndarray]
NoiseFn = Callable[[tuple[int, ...]], np.ndarray]
# The latents after every model evaluation; `send(latents)` replaces the ones just yielded (see `emit`).
Steps = Generator[np.ndarray, "np.ndarray | None", None]

# Adams-Bashforth weights, newest eps first: PNDMScheduler.step_plms (PNDM paper eq. 12).
PLMS_WEIGHTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}
LMS_ORDER = 4  # LMSDiscreteScheduler.step(order=4), k-diffusion sample_lms(order=4)
# LCMScheduler's boundary condition (Song et al. 2023 consistency models, eq. 8 with LCM's scaled timestep).
LCM_SIGMA_DATA = 0.5
LCM_TIMESTEP_SCALING = 10.0  # LCMScheduler's default; other values are refused (scheduler_classes.py)


def emit(x: np.ndarray) -> Generator[np.ndarray, "np.ndarray | None", np.ndarray]:
    """Yield the latents and return what the consumer sent back in their place (the same latents when it sent none).

    Inpainting with an ordinary UNet replaces the unmasked latents after every scheduler step (diffusers'
    StableDiffusionInpaintPipeline: `latents = (1 - mask) * noised_image + mask * latents`), and the next step must
    start from the blend. An explicit send is used rather than letting consumers write the yielded array in place:
    the sampler owns its arrays (some keep earlier latents as history), and `x = yield from emit(x)` shows at each
    yield which variable a consumer may replace. Plain iteration (`next`) sends None and changes nothing.
    """
    sent = yield x
    return x if sent is None else sent


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


def need_noise(noise: NoiseFn | None, name: str) -> NoiseFn:
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
        x = yield from emit(x)


def sample_euler_ancestral(
    model: Denoiser, x: np.ndarray, schedule: Schedule, noise: NoiseFn | None = None, eta: float = 1.0
) -> Steps:
    """Ancestral Euler (EulerAncestralDiscreteScheduler); noise is drawn every step, as diffusers does."""
    noise = need_noise(noise, "sample_euler_ancestral")
    sigmas, ts = schedule.sigmas.tolist(), schedule.timesteps.tolist()
    for i, t in enumerate(ts):
        denoised = model(x, sigmas[i], t)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        # diffusers draws randn even for the last step (sigma_up = 0); k-diffusion skips it.
        x = x + noise(x.shape) * sigma_up
        x = yield from emit(x)


def sample_ddim(
    model: Denoiser, x: np.ndarray, schedule: Schedule, noise: NoiseFn | None = None, eta: float = 0.0,
    clamp_x0: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Steps:
    """DDIM (Song et al. 2020 eq. 12): in VE space an ancestral Euler step, deterministic at eta = 0.

    clamp_x0: DDIMScheduler's clip_sample / thresholding, applied to the predicted x0 only: the step keeps the
    model's own eps (step(): pred_epsilon is not recomputed from the clipped x0).
    """
    sigmas, ts = schedule.sigmas.tolist(), schedule.timesteps.tolist()
    s_from, s_to = _transfer_levels(schedule)
    if eta > 0:
        noise = need_noise(noise, "sample_ddim with eta > 0")
    for i, t in enumerate(ts):
        denoised = model(x, sigmas[i], t)
        eps = to_d(x, sigmas[i], denoised)
        x0 = denoised if clamp_x0 is None else clamp_x0(denoised)
        # DDIMScheduler.step: x_prev = sqrt(a') x0 + sqrt(1 - a' - std^2) eps + std z, divided by sqrt(a').
        sigma_down, sigma_up = get_ancestral_step(s_from[i], s_to[i], eta)
        x = x0 + eps * sigma_down
        if eta > 0:
            x = x + noise(x.shape) * sigma_up
        x = relabel(x, s_to[i], sigmas[i + 1])
        x = yield from emit(x)


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
        x = yield from emit(x)


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
        x = yield from emit(x)


def lcm_boundary(t: float, timestep_scaling: float = LCM_TIMESTEP_SCALING) -> tuple[float, float]:
    """(c_skip, c_out) of LCMScheduler.get_scalings_for_boundary_condition_discrete."""
    scaled = t * timestep_scaling
    c_skip = LCM_SIGMA_DATA**2 / (scaled**2 + LCM_SIGMA_DATA**2)
    return c_skip, scaled / math.sqrt(scaled**2 + LCM_SIGMA_DATA**2)


def sample_lcm(model: Denoiser, x: np.ndarray, schedule: Schedule, noise: NoiseFn | None = None) -> Steps:
    """Latent Consistency Model multistep sampling (Luo et al. 2023 alg. 1), as LCMScheduler.step.

    Each step predicts x0 with the boundary condition, then re-noises it to the next level with fresh noise;
    the last step returns the prediction itself.
    """
    noise = need_noise(noise, "sample_lcm")
    sigmas, ts = schedule.sigmas.tolist(), schedule.timesteps.tolist()
    for i, t in enumerate(ts):
        c_skip, c_out = lcm_boundary(t)
        # diffusers applies c_skip to the VP sample x / sqrt(1 + sigma^2).
        denoised = c_out * model(x, sigmas[i], t) + c_skip * x / math.sqrt(1.0 + sigmas[i] ** 2)
        x = denoised if i == len(ts) - 1 else denoised + noise(x.shape) * sigmas[i + 1]
        x = yield from emit(x)
