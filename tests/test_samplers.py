"""Each numpy sampler against the diffusers scheduler it reproduces, step by step, with the same model and noise."""
from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

import diffusers
from diffusers.schedulers import scheduling_lms_discrete
from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler
from sdrt.runtime import schedules
from sdrt.runtime.samplers import SAMPLERS, make_schedule, resolve_sampler
from sdrt.runtime.schedules import SchedulerConfig

# diffusers' schedulers call np.array(torch_tensor), which numpy 2 flags on every set_timesteps.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

STEP_TOL = 1e-5  # max abs difference of the latents after every step (VP space where diffusers keeps VP)
# torch's float32 sqrt is not correctly rounded on every CPU (1 ulp off for ~18% of inputs on AVX512 here),
# so float32 sigmas match diffusers' to float32 rounding, not bitwise.
SIGMA_RTOL = 3e-7

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
VP_SCHEDULERS = {"PNDMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler"}
SHAPE = (2, 4, 8, 8)
STEPS = (3, 10, 20)
SPACINGS = (None, "leading", "trailing", "linspace")


_ABAR = diffusers.DDIMScheduler.from_config(SD15_CONFIG).alphas_cumprod.numpy().astype(np.float64)
DATA_STD = 0.5  # of the Gaussian "data" the fake model denoises


def fake_eps(x_in: np.ndarray, t: float) -> np.ndarray:
    """A deterministic stand-in for the UNet: the ideal eps for Gaussian data, plus nonlinear and spatial terms.

    It sees the scaled (VP) input and the timestep, as the UNet does; being close to a real denoiser keeps
    the latents at SD-like magnitudes instead of blowing up.
    """
    abar = np.interp(t, np.arange(len(_ABAR)), _ABAR)
    ideal = math.sqrt(1 - abar) * x_in / (abar * DATA_STD**2 + 1 - abar)
    return ideal + 0.05 * np.tanh(x_in) + 0.02 * np.roll(x_in, 1, axis=-1) + 0.01 * t / 1000


def denoiser(x: np.ndarray, sigma: float, t: float) -> np.ndarray:
    """The caller's wrapper: scale the VE input to the UNet's VP input, convert eps to denoised."""
    return x - sigma * fake_eps(x / math.sqrt(sigma**2 + 1), t)


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
    """A diffusers scheduler class; LMS from its module, since diffusers exports a scipy-requiring dummy."""
    return LMSDiscreteScheduler if scheduler == "LMSDiscreteScheduler" else getattr(diffusers, scheduler)


def diffusers_scheduler(name: str, cfg: dict, steps: int):
    """The diffusers scheduler `name` reproduces, built the way a pipeline swaps schedulers (from_config)."""
    spec = SAMPLERS[name]
    scheduler = diffusers_class(spec.scheduler).from_config(cfg, **spec.options)
    scheduler.set_timesteps(steps)
    return scheduler


def run_diffusers(name: str, cfg: dict, steps: int, start: np.ndarray, seed: int, eta: float) -> list[np.ndarray]:
    """StableDiffusionPipeline's denoising loop around the diffusers scheduler, float64 latents."""
    scheduler = diffusers_scheduler(name, cfg, steps)
    params = inspect.signature(scheduler.step).parameters
    kwargs = {"generator": torch.Generator().manual_seed(seed)} if "generator" in params else {}
    if "eta" in params:
        kwargs["eta"] = eta
    latents = torch.from_numpy(start) * scheduler.init_noise_sigma
    out = []
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(latents, t)
        eps = torch.from_numpy(fake_eps(x_in.numpy(), float(t)))
        latents = scheduler.step(eps, t, latents, **kwargs).prev_sample
        out.append(latents.numpy().copy())
    return out


def run_sdrt(name: str, cfg: dict, steps: int, start: np.ndarray, seed: int, eta: float) -> list[np.ndarray]:
    """The numpy sampler, its VE latents converted to diffusers' space (VP for DDIM/PNDM/DPM)."""
    spec = SAMPLERS[name]
    schedule = make_schedule(name, SchedulerConfig.from_dict(cfg), steps)
    generator = torch.Generator().manual_seed(seed)

    def noise(shape):
        return torch.randn(shape, generator=generator, dtype=torch.float64).numpy()

    options = {"eta": eta} if name == "ddim" else {}
    xs = spec.fn(denoiser, start * schedule.init_noise_sigma, schedule, noise, **options)
    vp = spec.scheduler in VP_SCHEDULERS
    return [x / math.sqrt(1 + s**2) if vp else x for x, s in zip(xs, schedule.sigmas[1:])]


def max_step_errors(name, cfg, steps, eta=0.0, seed=0) -> np.ndarray:
    """Max abs latent difference after every step, asserting both sides took the same number of steps."""
    start = np.random.default_rng(seed).standard_normal(SHAPE)
    ref = run_diffusers(name, cfg, steps, start, seed + 1, eta)
    ours = run_sdrt(name, cfg, steps, start, seed + 1, eta)
    assert len(ours) == len(ref)
    return np.array([np.abs(a - b).max() for a, b in zip(ours, ref)])


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_matches_diffusers_every_step(name, steps, spacing):
    errors = max_step_errors(name, config_dict(spacing), steps)
    assert errors.max() < STEP_TOL, f"{name} steps={steps} spacing={spacing}: per-step errors {errors}"


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEPS)
def test_ddim_with_eta_matches_diffusers(steps, spacing):
    errors = max_step_errors("ddim", config_dict(spacing), steps, eta=1.0)
    assert errors.max() < STEP_TOL, f"ddim eta=1 steps={steps} spacing={spacing}: {errors}"


@pytest.mark.parametrize("steps", (10, 20))
@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_karras", "euler"])
def test_sigma_min_final_matches_diffusers(name, steps):
    """final_sigmas_type='sigma_min': DPM++ keeps a second-order last step at >= 15 steps, Euler stops above 0."""
    errors = max_step_errors(name, config_dict(None, final_sigmas_type="sigma_min"), steps)
    assert errors.max() < STEP_TOL, f"{name} steps={steps}: {errors}"


def test_ancestral_noise_changes_result():
    """Guards the comparison itself: a different noise stream must be detected as a mismatch."""
    start = np.random.default_rng(0).standard_normal(SHAPE)
    ref = run_diffusers("euler_ancestral", config_dict(None), 10, start, 1, 0.0)
    ours = run_sdrt("euler_ancestral", config_dict(None), 10, start, 2, 0.0)
    assert np.abs(ours[-1] - ref[-1]).max() > 100 * STEP_TOL


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_schedule_matches_diffusers(name, steps, spacing):
    cfg = config_dict(spacing)
    ref = diffusers_scheduler(name, cfg, steps)
    schedule = make_schedule(name, SchedulerConfig.from_dict(cfg), steps)
    # Karras timesteps are inverted from float32 sigmas, so they inherit the sqrt rounding noted above.
    np.testing.assert_allclose(schedule.timesteps, ref.timesteps.numpy().astype(np.float64), rtol=SIGMA_RTOL)
    if SAMPLERS[name].scheduler in ("PNDMScheduler", "DDIMScheduler"):
        abar = ref.alphas_cumprod.numpy().astype(np.float64)[ref.timesteps.numpy()]
        np.testing.assert_allclose(schedule.sigmas[:-1], np.sqrt((1 - abar) / abar), rtol=SIGMA_RTOL)
        assert float(ref.init_noise_sigma) == 1.0
    else:
        np.testing.assert_allclose(schedule.sigmas, ref.sigmas.numpy().astype(np.float64), rtol=SIGMA_RTOL)
    if SAMPLERS[name].scheduler not in VP_SCHEDULERS:
        assert schedule.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=SIGMA_RTOL)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_bitwise(beta_schedule):
    cfg = config_dict(None, beta_schedule=beta_schedule)
    ref = diffusers.DDIMScheduler.from_config(cfg).alphas_cumprod.numpy()
    np.testing.assert_array_equal(schedules.alphas_cumprod(SchedulerConfig.from_dict(cfg)), ref)


def test_default_spacing_follows_each_diffusers_class():
    for name, spec in SAMPLERS.items():
        expected = diffusers_class(spec.scheduler).from_config(SD15_CONFIG).config.timestep_spacing
        assert SchedulerConfig.from_dict(SD15_CONFIG).spacing(spec.scheduler) == expected, name


def test_config_from_dict_ignores_unknown_keys():
    assert SchedulerConfig.from_dict(dict(SD15_CONFIG, some_future_key=3)) == SchedulerConfig()


def test_unsupported_flags_refused_only_where_diffusers_honours_them():
    clipped = SchedulerConfig.from_dict(dict(SD15_CONFIG, clip_sample=True))
    with pytest.raises(NotImplementedError, match="clip_sample"):
        make_schedule("ddim", clipped, 10)
    assert make_schedule("euler", clipped, 10).steps == 10  # EulerDiscreteScheduler has no clip_sample


@pytest.mark.parametrize(
    "label, canonical",
    [
        ("PNDM", "pndm"), ("pndm", "pndm"), ("PLMS", "pndm"), ("DDIM", "ddim"), ("ddim", "ddim"),
        ("Euler", "euler"), ("euler", "euler"), ("Euler a", "euler_ancestral"), ("euler_a", "euler_ancestral"),
        ("euler_ancestral", "euler_ancestral"), ("LMS", "lms"), ("lms", "lms"), ("LMS Karras", "lms_karras"),
        ("DPM++ 2M", "dpmpp_2m"), ("dpmpp_2m", "dpmpp_2m"), ("DPM++ 2M Karras", "dpmpp_2m_karras"),
        ("dpmpp_2m_karras", "dpmpp_2m_karras"), ("EulerDiscreteScheduler", "euler"),
    ],
)
def test_resolve_sampler_aliases(label, canonical):
    assert resolve_sampler(label) == canonical


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(ValueError) as info:
        resolve_sampler("DPM++ 3M SDE")
    for name, spec in SAMPLERS.items():
        assert repr(name) in str(info.value) and repr(spec.label) in str(info.value)
