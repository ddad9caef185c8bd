"""Noise schedules replicating diffusers' `set_timesteps`, expressed as VE (k-diffusion) sigmas.

Every number that diffusers computes in float32 torch is reproduced bit for bit in float32 numpy
(betas, alphas_cumprod, interpolated sigmas), then carried as float64, so that the numpy samplers
can match diffusers' schedulers step by step. numpy only: this module must not import torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

F32 = np.float32

# Each diffusers scheduler class's own `timestep_spacing` default, used when the config has no such key
# (SD1.5's scheduler_config.json has none).
DEFAULT_SPACING = {
    "PNDMScheduler": "leading",
    "DDIMScheduler": "leading",
    "EulerDiscreteScheduler": "linspace",
    "EulerAncestralDiscreteScheduler": "linspace",
    "LMSDiscreteScheduler": "linspace",
    "DPMSolverMultistepScheduler": "linspace",
}

# Config flags each diffusers class honours that this module does not reproduce (only False is supported).
UNSUPPORTED_FLAGS = {
    "DDIMScheduler": ("clip_sample", "thresholding", "rescale_betas_zero_snr"),
    "DPMSolverMultistepScheduler": ("thresholding", "rescale_betas_zero_snr"),
    "EulerDiscreteScheduler": ("rescale_betas_zero_snr",),
    "EulerAncestralDiscreteScheduler": ("rescale_betas_zero_snr",),
}


@dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler_config.json fields that shape the schedule; defaults (and missing keys) are SD1.5's values."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    steps_offset: int = 1
    timestep_spacing: str | None = None
    set_alpha_to_one: bool = False
    prediction_type: str = "epsilon"
    # DPMSolverMultistepScheduler / EulerDiscreteScheduler (their class defaults).
    lower_order_final: bool = True
    euler_at_final: bool = False
    final_sigmas_type: str = "zero"
    # Read only to refuse them: see UNSUPPORTED_FLAGS.
    clip_sample: bool = False
    thresholding: bool = False
    rescale_betas_zero_snr: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> SchedulerConfig:
        """Build from a diffusers scheduler_config.json dict, ignoring unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("trained_betas") is not None:
            kwargs["trained_betas"] = tuple(kwargs["trained_betas"])
        return cls(**kwargs)

    def spacing(self, scheduler: str) -> str:
        """The timestep spacing diffusers' `scheduler` class uses with this config."""
        return self.timestep_spacing or DEFAULT_SPACING[scheduler]


@dataclass(frozen=True, eq=False)
class Schedule:
    """Noise levels and UNet timesteps for one sampling run, in VE space (x = x0 + sigma * eps).

    sigmas[i] is the level the latents are at when the model sees them at evaluation i (timesteps[i]);
    sigmas[-1] is the level of the returned latents (0, or the final alpha of DDIM/PNDM), so the
    caller recovers diffusers' latents as x / sqrt(1 + sigmas[-1]**2).
    sigmas_from / sigmas_to: the interval each DDIM/PNDM step integrates over; they differ from
    sigmas[:-1] / sigmas[1:] where diffusers' prev_timestep = t - T // steps leaves the timestep grid.
    orders: the solver order of each step for multistep samplers (DPM-Solver++).
    """

    sigmas: np.ndarray
    timesteps: np.ndarray
    init_noise_sigma: float
    sigmas_from: np.ndarray | None = None
    sigmas_to: np.ndarray | None = None
    orders: tuple[int, ...] | None = None

    def __post_init__(self):
        n = len(self.timesteps)
        if len(self.sigmas) != n + 1:
            raise ValueError(f"expected {n + 1} sigmas for {n} timesteps, got {len(self.sigmas)}")
        for name in ("sigmas_from", "sigmas_to", "orders"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"expected {n} {name}, got {len(value)}")

    @property
    def steps(self) -> int:
        """Number of model evaluations."""
        return len(self.timesteps)


# ---- training noise schedule (diffusers' __init__) ----


def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32) bit for bit: fused start + step*i, symmetric halves."""
    start32, end32 = F32(start), F32(end)
    step = np.float64((end32 - start32) / F32(n - 1))
    i = np.arange(n)
    low = (np.float64(start32) + step * i).astype(F32)
    high = (np.float64(end32) - step * (n - 1 - i)).astype(F32)
    return np.where(i < n // 2, low, high)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' betas_for_alpha_bar (squaredcos_cap_v2), Nichol & Dhariwal 2021 eq. 17."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, dtype=F32)


def betas(config: SchedulerConfig) -> np.ndarray:
    """The float32 training betas, as diffusers' scheduler __init__ computes them."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        return np.asarray(config.trained_betas, dtype=F32)
    if config.beta_schedule == "linear":
        return _torch_linspace_f32(config.beta_start, config.beta_end, n)
    if config.beta_schedule == "scaled_linear":
        return _torch_linspace_f32(config.beta_start**0.5, config.beta_end**0.5, n) ** 2
    if config.beta_schedule == "squaredcos_cap_v2":
        return _cosine_betas(n)
    raise NotImplementedError(f"beta_schedule {config.beta_schedule!r} is not supported")


def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """float32 cumulative product of 1 - beta; torch.cumprod accumulates float32 in double on CPU."""
    alphas = F32(1.0) - betas(config)
    return np.cumprod(alphas.astype(np.float64)).astype(F32)


def _train_sigmas(ac: np.ndarray) -> np.ndarray:
    """float32 VE sigma of every training timestep, sqrt((1 - abar) / abar)."""
    return ((F32(1) - ac) / ac) ** F32(0.5)


def _vp_to_ve(abar: float) -> float:
    """VE noise level of a VP alpha-bar, computed in float64."""
    abar = float(abar)
    return math.sqrt((1.0 - abar) / abar)


# ---- timestep spacing (Table 2 of arXiv:2305.08891, as each diffusers class implements it) ----


def _spaced_timesteps(spacing: str, config: SchedulerConfig, steps: int, *, round_linspace: bool) -> np.ndarray:
    """Descending timesteps for PNDM/DDIM (rounded linspace) and Euler/LMS (float32 linspace)."""
    T = config.num_train_timesteps
    if spacing == "linspace":
        t = np.linspace(0, T - 1, steps)[::-1]
        return t.round() if round_linspace else t.astype(F32).astype(np.float64)
    if spacing == "leading":
        return (np.arange(steps) * (T // steps)).round()[::-1] + config.steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / steps)) - 1
    raise ValueError(f"timestep_spacing {spacing!r} is not one of 'linspace', 'leading', 'trailing'")


def _dpm_timesteps(spacing: str, config: SchedulerConfig, steps: int) -> np.ndarray:
    """DPMSolverMultistepScheduler's spacing: n + 1 points with the last (t = 0) dropped."""
    T = config.num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, steps + 1).round()[::-1][:-1]
    if spacing == "leading":
        return (np.arange(steps + 1) * (T // (steps + 1))).round()[::-1][:-1] + config.steps_offset
    return _spaced_timesteps(spacing, config, steps, round_linspace=True)


# ---- Karras sigmas (Karras et al. 2022 eq. 5, rho = 7) ----


def _karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """diffusers' _convert_to_karras (same expression order, float64)."""
    ramp = np.linspace(0, 1, steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """diffusers' _sigma_to_t: piecewise-linear inverse of log sigma over the training timesteps."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return (1 - w) * low_idx + w * high_idx


# ---- schedule builders, one per diffusers class ----


def _vp_init_noise_sigma(sigma0: float) -> float:
    """VP schedulers start from randn * 1, which is randn * sqrt(1 + sigma0^2) in VE space."""
    return math.sqrt(1.0 + sigma0**2)


def ddim_schedule(config: SchedulerConfig, steps: int) -> Schedule:
    """DDIMScheduler.set_timesteps; each step goes to prev_timestep = t - T // steps."""
    return _ddpm_family(config, steps, "DDIMScheduler", repeat_second=False)


def pndm_schedule(config: SchedulerConfig, steps: int) -> Schedule:
    """PNDMScheduler(skip_prk_steps=True).set_timesteps: the second timestep is evaluated twice."""
    return _ddpm_family(config, steps, "PNDMScheduler", repeat_second=True)


def _ddpm_family(config: SchedulerConfig, steps: int, scheduler: str, *, repeat_second: bool) -> Schedule:
    """Shared DDIM/PNDM schedule: integer timesteps, VP final alpha, off-grid step targets."""
    if steps > config.num_train_timesteps:
        raise ValueError(f"steps must be <= num_train_timesteps={config.num_train_timesteps}, got {steps}")
    ac = alphas_cumprod(config)
    final = 1.0 if config.set_alpha_to_one else float(ac[0])
    ratio = config.num_train_timesteps // steps

    def sigma_at(t: int) -> float:
        return _vp_to_ve(ac[t] if t >= 0 else final)

    grid = _spaced_timesteps(config.spacing(scheduler), config, steps, round_linspace=True).astype(np.int64)
    ts = list(grid)
    prev = [t - ratio for t in ts]
    start = list(ts)
    if repeat_second and steps > 1:
        # PNDM step_plms, counter == 1: re-step the first sample from t1 + ratio to t1 with the averaged eps.
        ts.insert(1, grid[1])
        prev.insert(1, grid[1])
        start.insert(1, grid[1] + ratio)
    sigmas_to = np.array([sigma_at(t) for t in prev])
    sigmas = np.array([sigma_at(t) for t in ts] + [sigmas_to[-1]])
    sigmas_from = np.array([sigma_at(t) for t in start])
    return Schedule(
        sigmas, np.array(ts, dtype=np.float64), _vp_init_noise_sigma(sigmas[0]), sigmas_from, sigmas_to
    )


def _final_sigma(config: SchedulerConfig, ac: np.ndarray) -> F32:
    """The appended last sigma: 0, or diffusers' final_sigmas_type='sigma_min' (float32)."""
    if config.final_sigmas_type == "zero":
        return F32(0)
    if config.final_sigmas_type == "sigma_min":
        return ((F32(1) - ac[0]) / ac[0]) ** F32(0.5)
    raise ValueError(f"final_sigmas_type {config.final_sigmas_type!r} is not 'zero' or 'sigma_min'")


def _ve_init_noise_sigma(sigmas: np.ndarray, spacing: str) -> float:
    """Euler/LMS init_noise_sigma: max sigma, or sqrt(max^2 + 1) for 'leading' spacing (float32)."""
    top = sigmas.max()
    return float(top if spacing in ("linspace", "trailing") else (top**2 + F32(1)) ** F32(0.5))


def euler_schedule(config: SchedulerConfig, steps: int, scheduler: str = "EulerDiscreteScheduler") -> Schedule:
    """EulerDiscreteScheduler / EulerAncestralDiscreteScheduler.set_timesteps (linear interpolation)."""
    return _interp_schedule(config, steps, scheduler, karras=False)


def lms_schedule(config: SchedulerConfig, steps: int, use_karras_sigmas: bool = False) -> Schedule:
    """LMSDiscreteScheduler.set_timesteps, with or without Karras sigmas."""
    return _interp_schedule(config, steps, "LMSDiscreteScheduler", karras=use_karras_sigmas)


def _interp_schedule(config: SchedulerConfig, steps: int, scheduler: str, *, karras: bool) -> Schedule:
    """Euler/LMS family: sigmas interpolated at float timesteps; Karras ramp between the picked ends."""
    spacing = config.spacing(scheduler)
    ac = alphas_cumprod(config)
    train = _train_sigmas(ac)
    timesteps = _spaced_timesteps(spacing, config, steps, round_linspace=False)
    sigmas = np.interp(timesteps, np.arange(len(train)), train)
    if karras:
        sigmas = _karras_sigmas(float(sigmas[-1]), float(sigmas[0]), steps)
        timesteps = _sigma_to_t(sigmas, np.log(train)).astype(F32).astype(np.float64)
    # Only EulerDiscreteScheduler honours final_sigmas_type; the others always append 0.
    last = _final_sigma(config, ac) if scheduler == "EulerDiscreteScheduler" else F32(0)
    sigmas = np.concatenate([sigmas, [last]]).astype(F32)
    return Schedule(sigmas.astype(np.float64), timesteps, _ve_init_noise_sigma(sigmas, spacing))


def dpm_multistep_schedule(config: SchedulerConfig, steps: int, use_karras_sigmas: bool = False) -> Schedule:
    """DPMSolverMultistepScheduler(dpmsolver++, order 2).set_timesteps, with its lower-order rules."""
    ac = alphas_cumprod(config)
    train = _train_sigmas(ac)
    timesteps = _dpm_timesteps(config.spacing("DPMSolverMultistepScheduler"), config, steps)
    if use_karras_sigmas:
        sigmas = _karras_sigmas(float(train[0]), float(train[-1]), steps)
        timesteps = _sigma_to_t(sigmas, np.log(train))
        if config.beta_schedule != "squaredcos_cap_v2":
            timesteps = timesteps.round()  # diffusers rounds Karras timesteps to integers
    else:
        sigmas = np.interp(timesteps, np.arange(len(train)), train)
    sigmas = np.concatenate([sigmas, [_final_sigma(config, ac)]]).astype(F32).astype(np.float64)
    # step(): first order at the first step and, under lower_order_final, at the last.
    n = len(timesteps)
    final_first_order = (
        config.euler_at_final or (config.lower_order_final and n < 15) or config.final_sigmas_type == "zero"
    )
    orders = [1] + [2] * (n - 1)
    if final_first_order:
        orders[-1] = 1
    timesteps = timesteps.astype(np.int64).astype(np.float64)
    return Schedule(sigmas, timesteps, _vp_init_noise_sigma(sigmas[0]), orders=tuple(orders))


def build_schedule(scheduler: str, config: SchedulerConfig, steps: int, **options) -> Schedule:
    """The schedule diffusers' `scheduler` class (with config overrides `options`) sets for `steps`."""
    for flag in UNSUPPORTED_FLAGS.get(scheduler, ()):
        if getattr(config, flag):
            raise NotImplementedError(f"{scheduler} with {flag}=True is not supported")
    return BUILDERS[scheduler](config, steps, **options)


BUILDERS = {
    "PNDMScheduler": pndm_schedule,
    "DDIMScheduler": ddim_schedule,
    "EulerDiscreteScheduler": euler_schedule,
    "EulerAncestralDiscreteScheduler": lambda config, steps: euler_schedule(
        config, steps, "EulerAncestralDiscreteScheduler"
    ),
    "LMSDiscreteScheduler": lms_schedule,
    "DPMSolverMultistepScheduler": dpm_multistep_schedule,
}
