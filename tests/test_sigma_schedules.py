"""A1111's schedule types for k-diffusion samplers, against A1111's and k-diffusion's own code transcribed in torch.

References: A1111 modules/sd_schedulers.py and modules/sd_samplers_kdiffusion.py (get_sigmas: sigma_min/max from
the model, discard_next_to_last_sigma), k-diffusion k_diffusion/sampling.py (get_sigmas_*, the samplers) and
k_diffusion/external.py (DiscreteSchedule: get_sigmas, sigma_to_t, t_to_sigma; CompVisDenoiser). Sigmas are
computed in float32 torch as A1111 does; the reference integrators run in float64 on those float32 sigmas.
"""
from __future__ import annotations

import math

import diffusers
import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch
from test_samplers import SD15_CONFIG, SHAPE, denoiser_for, fake_eps, noise_source

from sdrt.runtime.beta_distribution import beta_cdf, beta_ppf
from sdrt.runtime.noise_levels import alphas_cumprod, train_sigmas
from sdrt.runtime.samplers import (
    SAMPLERS, SCHEDULE_TYPES, make_schedule, resolve_sampler, sample, sampler_spec, schedule_source, step_count,
)
from sdrt.runtime.scheduler_classes import scheduler_class

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# A1111 computes each sequence in float32 (log-sigma interpolation, powers, tan); sdrt in float64 rounded to float32
# at the end: a few float32 ulps apart (measured 7.8e-7).
A1111_SIGMA_RTOL = 2e-6
BETA_PPF_ATOL = 1e-12  # the continued fraction and 64 bisections vs scipy's boost implementation (~3e-15 measured)
# sdrt's samplers on A1111's sigmas vs the k-diffusion reference: the same float32 sigmas; sdrt's stage levels and
# timesteps in float64 where A1111 has float32 (timesteps ~1e-5 apart feed the model). Measured 1.9e-6.
KDIFFUSION_TOL = 1e-5
STEPS = (1, 3, 10, 11, 25)
A1111_TYPES = [key for key, t in SCHEDULE_TYPES.items() if t.sigmas is not None]
K_SAMPLERS = [n for n, s in SAMPLERS.items() if s.k_diffusion is not None]


class DiscreteSchedule:
    """k-diffusion external.DiscreteSchedule on the model's float32 alphas_cumprod (DiscreteEpsDDPMDenoiser)."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.log()

    def get_sigmas(self, n):
        t = torch.linspace(len(self.sigmas) - 1, 0, n)
        return append_zero(self.t_to_sigma(t))

    def sigma_to_t(self, sigma):
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        return ((1 - w) * low_idx + w * high_idx).view(sigma.shape)

    def t_to_sigma(self, t):
        t = t.float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]).exp()


def append_zero(x):
    return torch.cat([x, x.new_zeros([1])])


def ays_loglinear_interp(t_steps, num_steps):
    xs = np.linspace(0, 1, len(t_steps))
    ys = np.log(t_steps[::-1])
    new_ys = np.interp(np.linspace(0, 1, num_steps), xs, ys)
    return np.exp(new_ys)[::-1].copy()


def reference_sigmas(key: str, n: int, inner: DiscreteSchedule) -> torch.Tensor:
    """A1111's scheduler functions (sd_schedulers.py) with k-diffusion's get_sigmas_*, at A1111's defaults."""
    sigma_min, sigma_max = inner.sigmas[0].item(), inner.sigmas[-1].item()
    if key == "uniform":
        return inner.get_sigmas(n)
    if key == "karras":
        ramp = torch.linspace(0, 1, n)
        min_inv_rho, max_inv_rho = sigma_min ** (1 / 7.0), sigma_max ** (1 / 7.0)
        return append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** 7.0)
    if key == "exponential":
        return append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())
    if key == "polyexponential":
        ramp = torch.linspace(1, 0, n) ** 1.0
        return append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))
    if key in ("sgm_uniform", "normal"):
        start, end = inner.sigma_to_t(torch.tensor(sigma_max)), inner.sigma_to_t(torch.tensor(sigma_min))
        ts = torch.linspace(start, end, n + 1)[:-1] if key == "sgm_uniform" else torch.linspace(start, end, n)
        return torch.FloatTensor([inner.t_to_sigma(t) for t in ts] + [0.0])
    if key == "kl_optimal":
        alpha_min, alpha_max = torch.arctan(torch.tensor(sigma_min)), torch.arctan(torch.tensor(sigma_max))
        step_indices = torch.arange(n + 1)
        return torch.tan(step_indices / n * alpha_min + (1.0 - step_indices / n) * alpha_max)
    if key == "align_your_steps":
        sigmas = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
        sigmas = np.append(ays_loglinear_interp(sigmas, n), [0.0]) if n != len(sigmas) else sigmas + [0.0]
        return torch.FloatTensor(sigmas)
    if key == "simple":
        ss = len(inner.sigmas) / n
        return torch.FloatTensor([float(inner.sigmas[-(1 + int(x * ss))]) for x in range(n)] + [0.0])
    if key == "ddim":
        sigs, ss, x = [], max(len(inner.sigmas) // n, 1), 1
        while x < len(inner.sigmas):
            sigs += [float(inner.sigmas[x])]
            x += ss
        return torch.FloatTensor(sigs[::-1] + [0.0])
    if key == "beta":
        timesteps = [scipy.stats.beta.ppf(x, 0.6, 0.6) for x in 1 - np.linspace(0, 1, n)]
        return torch.FloatTensor([sigma_min + (x * (sigma_max - sigma_min)) for x in timesteps] + [0.0])
    raise KeyError(key)


@pytest.fixture(scope="module")
def inner() -> DiscreteSchedule:
    return DiscreteSchedule(diffusers.DDIMScheduler.from_config(SD15_CONFIG).alphas_cumprod)


def sdrt_train() -> np.ndarray:
    config = scheduler_class("EulerDiscreteScheduler").resolve(SD15_CONFIG)
    return train_sigmas(alphas_cumprod(config)).astype(np.float64)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("key", A1111_TYPES)
def test_sigmas_match_a1111(inner, key, steps):
    ours = SCHEDULE_TYPES[key].sigmas(steps, sdrt_train())
    reference = reference_sigmas(key, steps, inner).double().numpy()
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, rtol=A1111_SIGMA_RTOL, atol=0)


def test_kl_optimal_ends_at_sigma_min_as_a1111(inner):
    assert SCHEDULE_TYPES["kl_optimal"].sigmas(5, sdrt_train())[-1] == pytest.approx(inner.sigmas[0].item())


def test_align_your_steps_is_refused_off_sd1s_noise_schedule():
    with pytest.raises(ValueError, match="Align Your Steps is defined for SD 1.x"):
        make_schedule("Euler Align Your Steps", {}, 10)  # diffusers' DDPM default betas: sigma_max 157


@pytest.mark.parametrize("a, b", [(0.6, 0.6), (0.5, 0.5), (2.0, 5.0), (5.0, 1.5)])
def test_beta_ppf_matches_scipy(a, b):
    q = np.linspace(0, 1, 101)
    np.testing.assert_allclose(beta_ppf(q, a, b), scipy.stats.beta.ppf(q, a, b), rtol=0, atol=BETA_PPF_ATOL)
    np.testing.assert_allclose(beta_cdf(q, a, b), scipy.stats.beta.cdf(q, a, b), rtol=0, atol=BETA_PPF_ATOL)


# ---- the samplers on A1111's sigmas, against k-diffusion's samplers ----


def get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def to_d(x, sigma, denoised):
    return (x - denoised) / sigma


def k_euler(model, x, sigmas, noise):
    for i in range(len(sigmas) - 1):
        x = x + to_d(x, sigmas[i], model(x, sigmas[i])) * (sigmas[i + 1] - sigmas[i])
    return x


def k_euler_ancestral(model, x, sigmas, noise):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1])
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(x.shape) * sigma_up
    return x


def k_heun(model, x, sigmas, noise):
    for i in range(len(sigmas) - 1):
        d = to_d(x, sigmas[i], model(x, sigmas[i]))
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1]))
            x = x + (d + d_2) / 2 * dt
    return x


def k_dpm_2(model, x, sigmas, noise):
    for i in range(len(sigmas) - 1):
        d = to_d(x, sigmas[i], model(x, sigmas[i]))
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            sigma_mid = math.exp((math.log(sigmas[i]) + math.log(sigmas[i + 1])) / 2)
            x_2 = x + d * (sigma_mid - sigmas[i])
            x = x + to_d(x_2, sigma_mid, model(x_2, sigma_mid)) * (sigmas[i + 1] - sigmas[i])
    return x


def k_dpm_2_ancestral(model, x, sigmas, noise):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1])
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = math.exp((math.log(sigmas[i]) + math.log(sigma_down)) / 2)
            x_2 = x + d * (sigma_mid - sigmas[i])
            x = x + to_d(x_2, sigma_mid, model(x_2, sigma_mid)) * (sigma_down - sigmas[i])
            x = x + noise(x.shape) * sigma_up
    return x


def k_dpmpp_2s_ancestral(model, x, sigmas, noise):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1])
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = -math.log(sigmas[i]), -math.log(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2 = (math.exp(-s) / math.exp(-t)) * x - math.expm1(-h / 2) * denoised
            x = (math.exp(-t_next) / math.exp(-t)) * x - math.expm1(-h) * model(x_2, math.exp(-s))
        if sigmas[i + 1] > 0:
            x = x + noise(x.shape) * sigma_up
    return x


def k_lms(model, x, sigmas, noise, order=4):
    def coeff(cur_order, i, j):
        def fn(tau):
            prod = 1.0
            for k in range(cur_order):
                if j != k:
                    prod *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
            return prod
        return scipy.integrate.quad(fn, sigmas[i], sigmas[i + 1], epsrel=1e-4)[0]

    ds = []
    for i in range(len(sigmas) - 1):
        ds = (ds + [to_d(x, sigmas[i], model(x, sigmas[i]))])[-order:]
        cur_order = min(i + 1, order)
        x = x + sum(coeff(cur_order, i, j) * d for j, d in zip(range(cur_order), reversed(ds)))
    return x


def k_dpmpp_2m(model, x, sigmas, noise):
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        t, t_next = -math.log(sigmas[i]), (-math.log(sigmas[i + 1]) if sigmas[i + 1] > 0 else math.inf)
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * denoised
        else:
            r = (t + math.log(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * denoised_d
        old_denoised = denoised
    return x


def k_dpmpp_2m_sde(model, x, sigmas, noise, solver_type="midpoint"):
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x, h = denoised, None
        else:
            h = math.log(sigmas[i]) - math.log(sigmas[i + 1])
            x = sigmas[i + 1] / sigmas[i] * math.exp(-h) * x - math.expm1(-2 * h) * denoised
            if old_denoised is not None:
                r = h_last / h
                weight = (-math.expm1(-2 * h) / (-2 * h) + 1) if solver_type == "heun" else 0.5 * -math.expm1(-2 * h)
                x = x + weight * (1 / r) * (denoised - old_denoised)
            x = x + noise(x.shape) * sigmas[i + 1] * math.sqrt(-math.expm1(-2 * h))
        old_denoised, h_last = denoised, h
    return x


REFERENCE_SAMPLERS = {
    "euler": k_euler, "euler_ancestral": k_euler_ancestral, "heun": k_heun, "dpm_2": k_dpm_2,
    "dpm_2_ancestral": k_dpm_2_ancestral, "dpmpp_2s_ancestral": k_dpmpp_2s_ancestral, "lms": k_lms,
    "dpmpp_2m": k_dpmpp_2m, "dpmpp_2m_sde": k_dpmpp_2m_sde,
    "dpmpp_2m_sde_heun": lambda *args: k_dpmpp_2m_sde(*args, solver_type="heun"),
}
# DPM++ SDE draws a Brownian tree in k-diffusion (torchsde), which sdrt approximates in distribution only
# (samplers_two_stage.BrownianSteps); its stage rule is DPM2's log-midpoint, checked through DPM2 here.
ENDS = ["kl_optimal", "normal"]  # A1111's sequence that stops at sigma_min, and one that ends at 0


def reference_run(name: str, key: str, steps: int, inner: DiscreteSchedule, start: np.ndarray, seed: int):
    """A1111's KDiffusionSampler: get_sigmas (with discard_next_to_last_sigma), x = noise * sigmas[0], the sampler
    with CompVisDenoiser (c_in, t = sigma_to_t(sigma) in float32, denoised = x - sigma * eps)."""
    run = SAMPLERS[name].k_diffusion
    sigmas = reference_sigmas(key, steps + 1 if run.discard_penultimate_sigma else steps, inner)
    if run.discard_penultimate_sigma:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])

    def model(x, sigma):
        t = float(inner.sigma_to_t(torch.tensor(sigma, dtype=torch.float32)))
        return x - sigma * torch.from_numpy(fake_eps((x / math.sqrt(sigma**2 + 1)).numpy(), t))

    draw = noise_source(name, seed)
    sigma_list = sigmas.double().tolist()
    return REFERENCE_SAMPLERS[name](model, torch.from_numpy(start) * sigma_list[0], sigma_list, draw).numpy()


@pytest.mark.parametrize("steps", (4, 7))
@pytest.mark.parametrize("key", ENDS)
@pytest.mark.parametrize("name", list(REFERENCE_SAMPLERS))
def test_samplers_on_a1111_sigmas_match_k_diffusion(inner, name, key, steps):
    full = resolve_sampler(name, key)
    assert schedule_source(full) == "a1111"
    start = np.random.default_rng(0).standard_normal(SHAPE)
    schedule = make_schedule(full, SD15_CONFIG, steps)
    draw = noise_source(name, 1)
    *_, ours = sample(full, denoiser_for(SD15_CONFIG), start * schedule.init_noise_sigma, schedule,
                      lambda shape: draw(shape).numpy())  # VE latents, as k-diffusion returns them
    reference = reference_run(name, key, steps, inner, start, 1)
    assert np.abs(ours - reference).max() < KDIFFUSION_TOL


def test_euler_a_karras_is_a1111s():
    """issue 14's example: Euler a has no Karras sigmas in diffusers, so it runs on k-diffusion's."""
    schedule = make_schedule("Euler a Karras", SD15_CONFIG, 10)
    np.testing.assert_allclose(schedule.sigmas, SCHEDULE_TYPES["karras"].sigmas(10, sdrt_train()))
    assert schedule.init_noise_sigma == schedule.sigmas[0]  # A1111: x = noise * sigmas[0]


@pytest.mark.parametrize("name", ["DPM2", "DPM2 a"])
def test_dpm2_discards_the_penultimate_sigma_as_a1111(name):
    schedule = make_schedule(f"{name} Normal", SD15_CONFIG, 6)
    grid = SCHEDULE_TYPES["normal"].sigmas(7, sdrt_train())
    # [s0, stage0, s1, stage1, ..., s_last, 0]: the last step, to 0, has no stage.
    np.testing.assert_array_equal(np.append(schedule.sigmas[0:-1:2], schedule.sigmas[-1]), np.delete(grid, -2))


@pytest.mark.parametrize("sampler, key", [("Euler a", "kl_optimal"), ("Heun", "normal"), ("DPM2", "kl_optimal"),
                                          ("LMS", "ddim")])
def test_strength_cuts_a1111_schedules_as_get_timesteps(sampler, key):
    """img2img keeps int(steps * strength) steps at the end of the sequence, as for every other schedule (A1111's
    DDIM sequence may hold a step more than asked: the cut counts the sequence's own steps)."""
    name = resolve_sampler(sampler, key)
    full, cut = make_schedule(name, SD15_CONFIG, 10), make_schedule(name, SD15_CONFIG, 10, strength=0.75)
    spec = sampler_spec(name)
    grid = SCHEDULE_TYPES[key].sigmas(11 if spec.k_diffusion.discard_penultimate_sigma else 10, sdrt_train())
    n_steps = len(grid) - 1 - (1 if spec.k_diffusion.discard_penultimate_sigma else 0)
    skipped = n_steps - int(n_steps * 0.75)
    np.testing.assert_array_equal(cut.sigmas, full.sigmas[skipped * (1 if spec.k_diffusion.stage is None else 2):])
    assert cut.init_noise_sigma == full.init_noise_sigma  # img2img noises the image to cut.sigmas[0] instead


@pytest.mark.parametrize("name, steps", [("Heun KL Optimal", 6), ("Heun Normal", 6), ("DPM2 a KL Optimal", 5),
                                         ("PLMS", 6), ("Euler a Karras", 4)])
def test_progress_counts_sampler_steps(name, steps):
    """A two-stage step on A1111's KL Optimal (no last step to 0) calls the model twice every step."""
    evaluations = make_schedule(name, SD15_CONFIG, steps).steps
    total, done = step_count(name, evaluations)
    assert total == steps and done(evaluations) == steps
    assert [done(i) for i in range(evaluations + 1)] == sorted(done(i) for i in range(evaluations + 1))
