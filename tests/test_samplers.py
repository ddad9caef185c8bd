"""Each numpy sampler against the diffusers scheduler it reproduces, step by step, with the same model and noise."""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
import types

import numpy as np
import pytest
import torch

import diffusers
from diffusers.schedulers import scheduling_lms_discrete
from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler
from sdrt.runtime import schedules
from sdrt.runtime.parametrization import parametrization
from sdrt.runtime.samplers import SAMPLERS, make_schedule, sample, sampler_spec, scheduler_for
from sdrt.runtime.scheduler_classes import scheduler_class

# diffusers' schedulers call np.array(torch_tensor), which numpy 2 flags on every set_timesteps.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

STEP_TOL = 1e-5  # max abs difference of the latents after every step (VP space where diffusers keeps VP)
# diffusers computes these samplers' sigma_up / sigma_down in float32 torch, where sigma_down =
# sqrt(sigma_to^2 - sigma_up^2) cancels ~6 bits (3.9e-6 relative at 3 steps); sdrt computes them in float64.
# On VE latents of magnitude ~15 (sigma_max 14.6) that is up to 6e-5 absolute.
FLOAT32_ANCESTRAL_TOL = 1e-4
STEP_TOLS = {"dpm_2_ancestral": FLOAT32_ANCESTRAL_TOL, "dpmpp_sde": FLOAT32_ANCESTRAL_TOL}
# torch's float32 sqrt is not correctly rounded on every CPU (1 ulp off for ~18% of inputs on AVX512 here),
# so float32 sigmas match diffusers' to float32 rounding, not bitwise.
SIGMA_RTOL = 3e-7
# KDPM2AncestralDiscreteScheduler's float32 stage level sqrt(sigma * sigma_down) inherits the cancellation in
# sigma_down = sqrt(sigma_next^2 - sigma_up^2): up to 4.6e-5 off the exact level at 3 steps (sdrt computes it in
# float64); the stage timesteps, inverted from those levels, inherit it too.
STAGE_RTOL = 1e-4
TIMESTEP_ATOL = 1e-4  # ...and near t = 0, where a relative tolerance is meaningless (1e-4 of a training step)

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json: note there is no timestep_spacing key.
SD15_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
VP_SCHEDULERS = {
    "PNDMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
    "DEISMultistepScheduler", "LCMScheduler",
}
# DPM++ 2S a has no diffusers scheduler: test_samplers_reference.py checks it against k-diffusion's algorithm.
DIFFUSERS_SAMPLERS = sorted(n for n, s in SAMPLERS.items() if s.is_diffusers_scheduler)
SHAPE = (2, 4, 8, 8)
STEPS = (3, 10, 20)
SPACINGS = (None, "leading", "trailing", "linspace")
# (LCMScheduler picks its timesteps from original_inference_steps whatever timestep_spacing says; so does sdrt.)
SAMPLER_SPACINGS = [(n, s) for n in DIFFUSERS_SAMPLERS for s in SPACINGS]


_ABAR = diffusers.DDIMScheduler.from_config(SD15_CONFIG).alphas_cumprod.numpy().astype(np.float64)
DATA_STD = 0.5  # of the Gaussian "data" the fake model denoises


def fake_eps(x_in: np.ndarray, t: float, data_std: float = DATA_STD) -> np.ndarray:
    """A deterministic stand-in for the UNet: the ideal eps for Gaussian data, plus nonlinear and spatial terms.

    It sees the scaled (VP) input and the timestep, as the UNet does; being close to a real denoiser keeps
    the latents at SD-like magnitudes instead of blowing up.
    """
    abar = np.interp(t, np.arange(len(_ABAR)), _ABAR)
    ideal = math.sqrt(1 - abar) * x_in / (abar * data_std**2 + 1 - abar)
    return ideal + 0.05 * np.tanh(x_in) + 0.02 * np.roll(x_in, 1, axis=-1) + 0.01 * t / 1000


def denoiser_for(cfg: dict, data_std: float = DATA_STD):
    """The caller's wrapper: scale the VE input to the UNet's VP input, convert its output (eps or v) to denoised."""
    denoised_from = parametrization(cfg.get("prediction_type", "epsilon"))

    def denoiser(x: np.ndarray, sigma: float, t: float) -> np.ndarray:
        return denoised_from(x, fake_eps(x / math.sqrt(sigma**2 + 1), t, data_std), sigma)

    return denoiser


class _GaussLegendre:
    """Stand-in for scipy.integrate when scipy is absent: 8-point Gauss-Legendre is exact for LMS's cubics."""

    @staticmethod
    def quad(f, a, b, epsrel=None):
        nodes, weights = np.polynomial.legendre.leggauss(8)
        a, b = float(a), float(b)
        mid, half = (a + b) / 2, (b - a) / 2
        return half * sum(w * float(f(mid + half * x)) for x, w in zip(nodes, weights)), 0.0


@pytest.fixture(autouse=True)
def _lms_quadrature(monkeypatch):
    if not hasattr(scheduling_lms_discrete, "integrate"):
        monkeypatch.setattr(scheduling_lms_discrete, "integrate", _GaussLegendre, raising=False)


def config_dict(spacing: str | None, **extra) -> dict:
    """SD1.5's scheduler config, optionally with an explicit timestep_spacing and other overrides."""
    d = dict(SD15_CONFIG, **extra)
    if spacing is not None:
        d["timestep_spacing"] = spacing
    return d


def diffusers_class(scheduler: str):
    """A diffusers scheduler class, imported from its module: LMS because diffusers exports a scipy-requiring dummy
    without scipy, DPMSolverSDE because its module imports torchsde (stubbed: the tests replace its noise sampler)."""
    if scheduler == "LMSDiscreteScheduler":
        return LMSDiscreteScheduler
    if scheduler == "DPMSolverSDEScheduler":
        return _import_without_torchsde("diffusers.schedulers.scheduling_dpmsolver_sde").DPMSolverSDEScheduler
    return getattr(diffusers, scheduler)


def _import_without_torchsde(module: str):
    """Import `module`, lending it an empty torchsde while it imports if torchsde is not installed."""
    if module in sys.modules or importlib.util.find_spec("torchsde") is not None:
        return importlib.import_module(module)
    sys.modules["torchsde"] = types.ModuleType("torchsde")
    try:
        return importlib.import_module(module)
    finally:
        del sys.modules["torchsde"]


def diffusers_scheduler(name: str, cfg: dict, steps: int):
    """The diffusers scheduler `name` reproduces, built the way a pipeline swaps schedulers (from_config)."""
    scheduler_class, overrides = scheduler_for(name)
    scheduler = diffusers_class(scheduler_class).from_config(cfg, **overrides)
    scheduler.set_timesteps(steps)
    return scheduler


class BrownianPath:
    """Reference for DPMSolverSDEScheduler's noise_sampler(sigma, sigma_next) = (W(next) - W(sigma)) / sqrt|span|:
    one Brownian path W, started at 0 and extended downwards in sigma with a fresh normal per new point."""

    def __init__(self, draw, shape):
        self.draw, self.shape, self.points = draw, shape, []

    def _at(self, sigma: float) -> torch.Tensor:
        for known, w in self.points:
            if math.isclose(known, sigma, rel_tol=1e-5):
                return w
        if not self.points:
            w = torch.zeros(self.shape, dtype=torch.float64)
        else:
            known, w_known = self.points[-1]
            assert sigma < known, "the path is only extended downwards"
            w = w_known + math.sqrt(known - sigma) * self.draw(self.shape)
        self.points.append((sigma, w))
        return w

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        sigma, sigma_next = float(sigma), float(sigma_next)
        w_from, w_to = self._at(sigma), self._at(sigma_next)
        return (w_to - w_from) / math.sqrt(abs(sigma - sigma_next))


def noise_source(name: str, seed: int):
    """draw(shape) -> float64 tensor: the stream diffusers' scheduler draws from the same seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    # DPMSolverMultistepScheduler draws its SDE noise in float32 whatever the latents' dtype.
    dtype = torch.float32 if sampler_spec(name).scheduler == "DPMSolverMultistepScheduler" else torch.float64
    return lambda shape: torch.randn(shape, generator=generator, dtype=dtype).double()


def run_diffusers(
    name: str, cfg: dict, steps: int, start: np.ndarray, seed: int, eta: float, prepare=None, data_std=DATA_STD
) -> list[np.ndarray]:
    """StableDiffusionPipeline's denoising loop around the diffusers scheduler, float64 latents.

    prepare(scheduler): a change to the reference made after set_timesteps (see the zero-SNR DDIM test).
    """
    scheduler = diffusers_scheduler(name, cfg, steps)
    if prepare is not None:
        prepare(scheduler)
    params = inspect.signature(scheduler.step).parameters
    kwargs = {"generator": torch.Generator().manual_seed(seed)} if "generator" in params else {}
    if "eta" in params:
        kwargs["eta"] = eta
    if hasattr(scheduler, "noise_sampler"):
        scheduler.noise_sampler = BrownianPath(noise_source(name, seed), start.shape)
    latents = torch.from_numpy(start) * scheduler.init_noise_sigma
    out = []
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(latents, t)
        eps = torch.from_numpy(fake_eps(x_in.numpy(), float(t), data_std))
        latents = scheduler.step(eps, t, latents, **kwargs).prev_sample
        out.append(latents.numpy().copy())
    return out


def run_sdrt(
    name: str, cfg: dict, steps: int, start: np.ndarray, seed: int, eta: float, data_std: float = DATA_STD
) -> list[np.ndarray]:
    """The numpy sampler, its VE latents converted to diffusers' space (VP for the VP schedulers)."""
    schedule = make_schedule(name, cfg, steps)
    draw = noise_source(name, seed)

    def noise(shape):
        return draw(shape).numpy()

    eta = eta if name == "ddim" else None  # the harness's eta is DDIM's; the others keep their default
    xs = sample(name, denoiser_for(cfg, data_std), start * schedule.init_noise_sigma, schedule, noise, eta=eta)
    vp = sampler_spec(name).scheduler in VP_SCHEDULERS
    return [x / math.sqrt(1 + s**2) if vp else x for x, s in zip(xs, schedule.sigmas[1:])]


def max_step_errors(name, cfg, steps, eta=0.0, seed=0, prepare=None, data_std=DATA_STD) -> np.ndarray:
    """Max abs latent difference after every model evaluation, asserting both sides took the same number."""
    start = np.random.default_rng(seed).standard_normal(SHAPE)
    ref = run_diffusers(name, cfg, steps, start, seed + 1, eta, prepare, data_std)
    ours = run_sdrt(name, cfg, steps, start, seed + 1, eta, data_std)
    assert len(ours) == len(ref)
    return np.array([np.abs(a - b).max() for a, b in zip(ours, ref)])


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name, spacing", SAMPLER_SPACINGS)
def test_sampler_matches_diffusers_every_step(name, steps, spacing):
    errors = max_step_errors(name, config_dict(spacing), steps)
    assert errors.max() < step_tol(name), f"{name} steps={steps} spacing={spacing}: per-step errors {errors}"


def step_tol(name: str) -> float:
    """STEP_TOL, or the named looser tolerance of a sampler (with or without a schedule type)."""
    return next((tol for prefix, tol in STEP_TOLS.items() if name.startswith(prefix)), STEP_TOL)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEPS)
def test_ddim_with_eta_matches_diffusers(steps, spacing):
    errors = max_step_errors("ddim", config_dict(spacing), steps, eta=1.0)
    assert errors.max() < STEP_TOL, f"ddim eta=1 steps={steps} spacing={spacing}: {errors}"


@pytest.mark.parametrize("steps", (10, 20))
@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_karras", "dpmpp_2m_sde", "euler", "unipc", "unipc_karras"])
def test_sigma_min_final_matches_diffusers(name, steps):
    """final_sigmas_type='sigma_min': DPM++ keeps a second-order last step at >= 15 steps, Euler stops above 0."""
    errors = max_step_errors(name, config_dict(None, final_sigmas_type="sigma_min"), steps)
    assert errors.max() < step_tol(name), f"{name} steps={steps}: {errors}"


@pytest.mark.parametrize("name", ["euler_ancestral", "dpm_2_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "lcm"])
def test_stochastic_sampler_noise_changes_result(name):
    """Guards the comparison itself: a different noise stream must be detected as a mismatch."""
    start = np.random.default_rng(0).standard_normal(SHAPE)
    ref = run_diffusers(name, config_dict(None), 4, start, 1, 0.0)
    ours = run_sdrt(name, config_dict(None), 4, start, 2, 0.0)
    assert np.abs(ours[-2] - ref[-2]).max() > 100 * STEP_TOL


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name, spacing", SAMPLER_SPACINGS)
def test_schedule_matches_diffusers(name, steps, spacing):
    assert_schedule_matches(name, config_dict(spacing), steps)


def assert_schedule_matches(name: str, cfg: dict, steps: int, rtol: float | None = None) -> None:
    """Timesteps, sigmas and init_noise_sigma of sdrt's schedule equal diffusers' (see SIGMA_RTOL)."""
    ref = diffusers_scheduler(name, cfg, steps)
    scheduler_class = scheduler_for(name)[0]
    schedule = make_schedule(name, cfg, steps)
    if rtol is None:
        rtol = STAGE_RTOL if scheduler_class == "KDPM2AncestralDiscreteScheduler" else SIGMA_RTOL
    ref_timesteps = ref.timesteps.numpy().astype(np.float64)
    np.testing.assert_allclose(schedule.timesteps, ref_timesteps, rtol=rtol, atol=TIMESTEP_ATOL)
    if scheduler_class in ("PNDMScheduler", "DDIMScheduler", "LCMScheduler"):
        abar = ref.alphas_cumprod.numpy().astype(np.float64)[ref.timesteps.numpy()]
        np.testing.assert_allclose(schedule.sigmas[:-1], np.sqrt((1 - abar) / abar), rtol=SIGMA_RTOL)
        assert float(ref.init_noise_sigma) == 1.0
    else:
        np.testing.assert_allclose(schedule.sigmas, diffusers_levels(ref), rtol=rtol)
    if scheduler_class not in VP_SCHEDULERS:
        assert schedule.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=SIGMA_RTOL)


def diffusers_levels(ref) -> np.ndarray:
    """The level of every evaluation (and the end) in diffusers' own arrays: two-stage classes keep their
    stage levels in sigmas_interpol / step(), the others in sigmas."""
    name = type(ref).__name__
    sigmas = ref.sigmas.numpy().astype(np.float64)
    if name == "KDPM2DiscreteScheduler":  # [s0, m1, s1, m2, s2, ..., s_last, 0]
        stages = ref.sigmas_interpol.numpy().astype(np.float64)[1:-2:2]
        return interleave(sigmas[0:-2:2], stages[:-1], 0.0)
    if name == "KDPM2AncestralDiscreteScheduler":
        stages = ref.sigmas_interpol.numpy().astype(np.float64)[0:-3:2]
        return interleave(sigmas[0:-2:2], stages[:-1], 0.0)
    if name == "DPMSolverSDEScheduler":  # stage: step()'s float32 log-midpoint
        grid = ref.sigmas[0::2].float()
        t = -grid.log()
        stages = (-(t[:-1] + (t[1:] - t[:-1]) * 0.5)).exp().double().numpy()
        return interleave(grid.double().numpy(), stages, 0.0)
    return sigmas


def interleave(steps, stages, final) -> np.ndarray:
    out = np.empty(2 * len(steps) - 1)
    out[0::2], out[1::2] = steps, stages
    return np.append(out, final)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_bitwise(beta_schedule):
    cfg = config_dict(None, beta_schedule=beta_schedule)
    ref = diffusers.DDIMScheduler.from_config(cfg).alphas_cumprod.numpy()
    np.testing.assert_array_equal(schedules.alphas_cumprod(scheduler_class("DDIMScheduler").resolve(cfg)), ref)


def test_default_spacing_follows_each_diffusers_class():
    for name, spec in SAMPLERS.items():
        expected = diffusers_class(spec.scheduler).from_config(SD15_CONFIG).config.timestep_spacing
        assert scheduler_class(spec.scheduler).resolve(SD15_CONFIG, spec.options).timestep_spacing == expected, name


def test_resolve_ignores_unknown_keys():
    record = scheduler_class("EulerDiscreteScheduler")
    assert record.resolve(dict(SD15_CONFIG, some_future_key=3)) == record.resolve(SD15_CONFIG)
