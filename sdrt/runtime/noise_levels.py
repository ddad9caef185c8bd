"""The numbers diffusers' schedulers are built from: training betas, timestep spacings, sigma discretizations.

Every number that diffusers computes in float32 torch is reproduced in float32 numpy (betas, alphas_cumprod,
interpolated sigmas) and then carried as float64, so that the numpy samplers can match diffusers' schedulers
step by step. The types (SchedulerConfig, Schedule) live here too; `schedules.py` builds Schedules from them.
numpy only: this module must not import torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .beta_distribution import beta_ppf

F32 = np.float32

# alphas_cumprod[-1] under rescale_betas_zero_snr: diffusers' Euler/DPM/UniPC set it so that the first sigma
# is finite ("FP16 smallest positive subnormal"); VE-space sampling cannot hold sigma = inf.
ZERO_SNR_LAST_ALPHA_CUMPROD = 2.0**-24


@dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler config keys sdrt reproduces, resolved for one diffusers class (scheduler_classes.resolve):
    the bundle's value where it has the key, else that class's __init__ default, as diffusers' from_config does.

    A field's default here is only the value for a class that has no such key (the key then has no effect).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    steps_offset: int = 0
    timestep_spacing: str = "linspace"
    set_alpha_to_one: bool = False
    prediction_type: str = "epsilon"
    rescale_betas_zero_snr: bool = False  # Lin et al. 2023, arXiv:2305.08891 algorithm 1
    # DPMSolverMultistepScheduler / UniPC / DEIS / EulerDiscreteScheduler.
    solver_order: int = 2
    lower_order_final: bool = True
    euler_at_final: bool = False
    final_sigmas_type: str = "zero"
    # LCMScheduler.
    original_inference_steps: int = 50
    # The sigma discretization (A1111 schedule type), set from the sampler name (scheduler_classes.SAMPLER_CHOSEN).
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    # What the class does to each predicted x0 (x0_clamp.py): DDIM, LCM, Heun clip; DDIM, LCM, DPM-Solver, UniPC
    # and DEIS threshold (Saharia et al. 2022, Imagen sec. 2.3).
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0

    def sigma_kind(self) -> str | None:
        """'karras', 'exponential', 'beta' or None (the spacing's own sigmas)."""
        flags = {"karras": self.use_karras_sigmas, "exponential": self.use_exponential_sigmas,
                 "beta": self.use_beta_sigmas}
        kinds = [kind for kind, on in flags.items() if on]
        if len(kinds) > 1:
            raise ValueError(f"only one of Karras, exponential and beta sigmas can be used, got {kinds}")
        return kinds[0] if kinds else None


@dataclass(frozen=True, eq=False)
class Schedule:
    """Noise levels and UNet timesteps for one sampling run, in VE space (x = x0 + sigma * eps).

    sigmas[i] is the level the latents are at when the model sees them at evaluation i (timesteps[i]);
    sigmas[-1] is the level of the returned latents (0, or the final alpha of DDIM/PNDM), so the
    caller recovers diffusers' latents as x / sqrt(1 + sigmas[-1]**2). Two-stage samplers (Heun, DPM2,
    DPM++ SDE...) evaluate twice per step: their sigmas interleave the step levels with the stage levels.
    sigmas_from / sigmas_to: the interval each DDIM/PNDM step integrates over; they differ from
    sigmas[:-1] / sigmas[1:] where diffusers' prev_timestep = t - T // steps leaves the timestep grid.
    orders: the solver order of each step for multistep samplers (DPM-Solver++, UniPC, DEIS).
    clamp_x0: what the scheduler class does to each predicted x0 (clip or threshold; x0_clamp.py), or None.
    """

    sigmas: np.ndarray
    timesteps: np.ndarray
    init_noise_sigma: float
    sigmas_from: np.ndarray | None = None
    sigmas_to: np.ndarray | None = None
    orders: tuple[int, ...] | None = None
    clamp_x0: Callable[[np.ndarray], np.ndarray] | None = None

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

    def starting_at(self, begin: int) -> Schedule:
        """The schedule from evaluation `begin` on (img2img). Multistep orders warm up again: diffusers' solvers
        count their history (lower_order_nums) from the first step they take, not from the first timestep."""
        if begin == 0:
            return self

        def cut(a):
            return None if a is None else a[begin:]

        orders = None if self.orders is None else tuple(min(o, j + 1) for j, o in enumerate(self.orders[begin:]))
        return Schedule(self.sigmas[begin:], self.timesteps[begin:], self.init_noise_sigma,
                        cut(self.sigmas_from), cut(self.sigmas_to), orders, self.clamp_x0)


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
    """The float32 training betas, as diffusers' scheduler __init__ computes them (before any zero-SNR rescale)."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        return np.asarray(config.trained_betas, dtype=F32)
    if config.beta_schedule == "linear":
        return _torch_linspace_f32(config.beta_start, config.beta_end, n)
    if config.beta_schedule == "scaled_linear":
        return _torch_linspace_f32(config.beta_start**0.5, config.beta_end**0.5, n) ** 2
    if config.beta_schedule == "squaredcos_cap_v2":
        return _cosine_betas(n)
    raise ValueError(f"beta_schedule {config.beta_schedule!r} is not one of 'linear', 'scaled_linear', "
                     "'squaredcos_cap_v2'")


def _cumprod_f32(alphas: np.ndarray) -> np.ndarray:
    """torch.cumprod of float32 on CPU, which accumulates in double."""
    return np.cumprod(alphas.astype(np.float64)).astype(F32)


def rescale_zero_terminal_snr(train_betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023 (arXiv:2305.08891) algorithm 1 in float32, as diffusers' rescale_zero_terminal_snr."""
    sqrt_abar = _cumprod_f32(F32(1) - train_betas) ** F32(0.5)
    first, last = sqrt_abar[0], sqrt_abar[-1]
    # Shift so the last timestep is zero, scale so the first is back to its old value.
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return F32(1) - alphas


def alphas_cumprod(config: SchedulerConfig, zero_snr: bool = False) -> np.ndarray:
    """float32 cumulative product of 1 - beta; `zero_snr`: rescaled, its last value clamped as diffusers' Euler does."""
    train_betas = betas(config)
    if not zero_snr:
        return _cumprod_f32(F32(1) - train_betas)
    ac = _cumprod_f32(F32(1) - rescale_zero_terminal_snr(train_betas))
    ac[-1] = ZERO_SNR_LAST_ALPHA_CUMPROD
    return ac


def train_sigmas(ac: np.ndarray) -> np.ndarray:
    """float32 VE sigma of every training timestep, sqrt((1 - abar) / abar)."""
    return ((F32(1) - ac) / ac) ** F32(0.5)


def vp_to_ve(abar: float) -> float:
    """VE noise level of a VP alpha-bar, computed in float64."""
    abar = float(abar)
    return math.sqrt((1.0 - abar) / abar)


def vp_init_noise_sigma(sigma0: float) -> float:
    """VP schedulers start from randn * 1, which is randn * sqrt(1 + sigma0^2) in VE space."""
    return math.sqrt(1.0 + sigma0**2)


def ve_init_noise_sigma(sigmas: np.ndarray, spacing: str) -> float:
    """Euler-family init_noise_sigma: max sigma, or sqrt(max^2 + 1) for 'leading' spacing (float32)."""
    top = F32(sigmas.max())
    return float(top if spacing in ("linspace", "trailing") else (top**2 + F32(1)) ** F32(0.5))


# ---- timestep spacing (Table 2 of arXiv:2305.08891, as each diffusers class implements it) ----


LINSPACE_ROUNDING = {"round": np.round, "float32": lambda t: t.astype(F32).astype(np.float64), "float64": np.asarray}


def spaced_timesteps(spacing: str, config: SchedulerConfig, steps: int, *, linspace: str) -> np.ndarray:
    """Descending timesteps; `linspace` is how the class keeps linspace's fractions (LINSPACE_ROUNDING):
    rounded (PNDM/DDIM), float32 (the Euler family) or float64 (DPMSolverSDEScheduler)."""
    T = config.num_train_timesteps
    if spacing == "linspace":
        return LINSPACE_ROUNDING[linspace](np.linspace(0, T - 1, steps)[::-1])
    if spacing == "leading":
        return (np.arange(steps) * (T // steps)).round()[::-1] + config.steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / steps)) - 1
    raise ValueError(f"timestep_spacing {spacing!r} is not one of 'linspace', 'leading', 'trailing'")


def multistep_timesteps(spacing: str, config: SchedulerConfig, steps: int) -> np.ndarray:
    """DPM-Solver / UniPC / DEIS spacing: n + 1 points with the last (t = 0) dropped."""
    T = config.num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, steps + 1).round()[::-1][:-1]
    if spacing == "leading":
        return (np.arange(steps + 1) * (T // (steps + 1))).round()[::-1][:-1] + config.steps_offset
    return spaced_timesteps(spacing, config, steps, linspace="round")


# ---- sigma discretizations, between the given ends (diffusers' _convert_to_*, float64) ----


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 eq. 5 (diffusers' _convert_to_karras, same expression order)."""
    ramp = np.linspace(0, 1, steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, steps: int) -> np.ndarray:
    """Evenly spaced in log sigma (k-diffusion get_sigmas_exponential, diffusers' _convert_to_exponential)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), steps))


def beta_sigmas(sigma_min: float, sigma_max: float, steps: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """Lee et al. 2024 (arXiv:2407.12173): sigmas at Beta(0.6, 0.6) quantiles (diffusers' _convert_to_beta,
    A1111's beta_scheduler with its default alpha = beta = 0.6)."""
    return sigma_min + beta_ppf(1 - np.linspace(0, 1, steps), alpha, beta) * (sigma_max - sigma_min)


SIGMA_KINDS = {"karras": karras_sigmas, "exponential": exponential_sigmas, "beta": beta_sigmas}


def convert_sigmas(kind: str, descending: np.ndarray, steps: int) -> np.ndarray:
    """`steps` sigmas of `kind` between the ends of a descending sigma array."""
    return SIGMA_KINDS[kind](float(descending[-1]), float(descending[0]), steps)


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray, dtype=np.float64) -> np.ndarray:
    """diffusers' _sigma_to_t: piecewise-linear inverse of log sigma over the training timesteps.

    dtype float32: as diffusers computes it when handed torch tensors (KDPM2's stage timesteps).
    """
    sigma = np.atleast_1d(sigma).astype(dtype)
    log_sigma = np.log(np.maximum(sigma, dtype(1e-10)))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return (1 - w) * low_idx.astype(dtype) + w * high_idx.astype(dtype)


def log_midpoint_f32(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """exp(lerp(log a, log b, 0.5)) in float32 as torch computes it (lerp at 0.5: b - (b - a) * 0.5)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        log_a, log_b = np.log(a.astype(F32)), np.log(b.astype(F32))
        return np.exp(log_b - (log_b - log_a) * F32(0.5))
