"""Noise schedules replicating each diffusers scheduler class's `set_timesteps`, expressed as VE (k-diffusion) sigmas.

One builder per diffusers class, `builder(config, steps) -> Schedule`, from a config already resolved for that
class (scheduler_classes.py, where each class's record names its builder); the numbers they start from
(training betas, spacings, Karras/exponential/beta sigmas) are in `noise_levels.py`. numpy only: this module
must not import torch.
"""

from __future__ import annotations

import numpy as np

from .noise_levels import (
    F32,
    Schedule,
    SchedulerConfig,
    alphas_cumprod,
    convert_sigmas,
    log_midpoint_f32,
    multistep_timesteps,
    sigma_to_t,
    spaced_timesteps,
    train_sigmas,
    ve_init_noise_sigma,
    vp_init_noise_sigma,
    vp_to_ve,
)

__all__ = ["Schedule", "SchedulerConfig", "skipped_steps", "alphas_cumprod"]


def _abar(config: SchedulerConfig) -> np.ndarray:
    """alphas_cumprod as the class's __init__ computes it from this (resolved) config."""
    return alphas_cumprod(config, zero_snr=config.rescale_betas_zero_snr)


# ---- DDIM / PNDM: integer timesteps, VP final alpha, off-grid step targets ----


def ddim_schedule(config: SchedulerConfig, steps: int) -> Schedule:
    """DDIMScheduler.set_timesteps; each step goes to prev_timestep = t - T // steps."""
    return _ddpm_family(config, steps, repeat_second=False)


def pndm_schedule(config: SchedulerConfig, steps: int, begin: int = 0) -> Schedule:
    """PNDMScheduler(skip_prk_steps=True).set_timesteps: the second timestep is evaluated twice.

    begin: the first evaluation kept (img2img). PNDM's special second step goes by its step counter, not by
    timestep, so a truncated schedule re-applies it to whatever timestep comes second, as diffusers does.
    """
    return _ddpm_family(config, steps, repeat_second=True, begin=begin)


def _ddpm_family(config: SchedulerConfig, steps: int, *, repeat_second: bool, begin: int = 0) -> Schedule:
    """Shared DDIM/PNDM schedule."""
    if steps > config.num_train_timesteps:
        raise ValueError(f"steps must be <= num_train_timesteps={config.num_train_timesteps}, got {steps}")
    ac = _abar(config)
    final = 1.0 if config.set_alpha_to_one else float(ac[0])
    ratio = config.num_train_timesteps // steps

    def sigma_at(t: int) -> float:
        return vp_to_ve(ac[t] if t >= 0 else final)

    grid = spaced_timesteps(config.timestep_spacing, config, steps, linspace="round").astype(np.int64)
    ts = list(grid)
    if repeat_second and steps > 1:
        ts.insert(1, grid[1])  # PNDMScheduler.set_timesteps repeats the second timestep
    ts = ts[begin:]
    prev = [t - ratio for t in ts]
    start = list(ts)
    if repeat_second and len(ts) > 1:
        # PNDM step_plms, counter == 1: re-step the first sample from t1 + ratio to t1 with the averaged eps.
        prev[1], start[1] = ts[1], ts[1] + ratio
    sigmas_to = np.array([sigma_at(t) for t in prev])
    sigmas = np.array([sigma_at(t) for t in ts] + [sigmas_to[-1]])
    sigmas_from = np.array([sigma_at(t) for t in start])
    return Schedule(sigmas, np.array(ts, dtype=np.float64), vp_init_noise_sigma(sigmas[0]), sigmas_from, sigmas_to)


# ---- the Euler family: sigmas interpolated at float timesteps ----


def _final_sigma(config: SchedulerConfig, ac: np.ndarray) -> F32:
    """The appended last sigma: 0, or diffusers' final_sigmas_type='sigma_min' (float32)."""
    if config.final_sigmas_type == "zero":
        return F32(0)
    if config.final_sigmas_type == "sigma_min":
        return ((F32(1) - ac[0]) / ac[0]) ** F32(0.5)
    raise ValueError(f"final_sigmas_type {config.final_sigmas_type!r} is not 'zero' or 'sigma_min'")


def _interp_grid(config: SchedulerConfig, steps: int, *, round_t: bool = False, linspace="float32"):
    """(sigmas without the final one, float64; timesteps; training sigmas) of the Euler family's set_timesteps.

    round_t: the class rounds timesteps inverted from Karras sigmas (KDPM2, KDPM2A).
    """
    train = train_sigmas(_abar(config))
    timesteps = spaced_timesteps(config.timestep_spacing, config, steps, linspace=linspace)
    sigmas = np.interp(timesteps, np.arange(len(train)), train)
    kind = config.sigma_kind()
    if kind:
        sigmas = convert_sigmas(kind, sigmas, steps)
        timesteps = sigma_to_t(sigmas, np.log(train))
        if round_t and kind == "karras":
            timesteps = timesteps.round()
    return sigmas, timesteps, train


def euler_schedule(config: SchedulerConfig, steps: int) -> Schedule:
    """EulerDiscreteScheduler / EulerAncestralDiscreteScheduler / LMSDiscreteScheduler.set_timesteps."""
    sigmas, timesteps, _ = _interp_grid(config, steps)
    # Only EulerDiscreteScheduler has final_sigmas_type; the others resolve to its "zero" and append 0.
    sigmas = np.concatenate([sigmas, [_final_sigma(config, _abar(config))]]).astype(F32)
    timesteps = timesteps.astype(F32).astype(np.float64)
    return Schedule(sigmas.astype(np.float64), timesteps, ve_init_noise_sigma(sigmas, config.timestep_spacing))


# ---- two-stage samplers: every step but the last (to sigma 0) evaluates at a second level ----


def _interleave(steps: np.ndarray, stages: np.ndarray, final: float | None = None) -> np.ndarray:
    """[steps[0], stages[0], steps[1], stages[1], ..., steps[-1]] (+ final): one entry per evaluation."""
    out = np.empty(2 * len(steps) - 1)
    out[0::2], out[1::2] = steps, stages
    return out if final is None else np.append(out, final)


def heun_schedule(config: SchedulerConfig, steps: int) -> Schedule:
    """HeunDiscreteScheduler.set_timesteps: the second stage re-evaluates at the next step's level."""
    sigmas, timesteps, _ = _interp_grid(config, steps)
    sigmas = sigmas.astype(F32).astype(np.float64)
    timesteps = timesteps.astype(F32).astype(np.float64)
    init = ve_init_noise_sigma(sigmas, config.timestep_spacing)
    return Schedule(_interleave(sigmas, sigmas[1:], 0.0), _interleave(timesteps, timesteps[1:]), init)


def kdpm2_schedule(config: SchedulerConfig, steps: int) -> Schedule:
    """KDPM2DiscreteScheduler.set_timesteps: the second stage at the log-midpoint of the step."""
    sigmas, timesteps, train = _interp_grid(config, steps, round_t=True)
    sigmas = sigmas.astype(F32)
    mids = log_midpoint_f32(sigmas[1:], sigmas[:-1])
    return _staged(config, sigmas, timesteps, mids, train)


def kdpm2_ancestral_schedule(config: SchedulerConfig, steps: int) -> Schedule:
    """KDPM2AncestralDiscreteScheduler.set_timesteps: the second stage between sigma and sigma_down.

    Also the schedule of DPM++ 2S a, whose k-diffusion midpoint is the same (r = 1/2, eta = 1).
    """
    sigmas, timesteps, train = _interp_grid(config, steps, round_t=True)
    sigmas = sigmas.astype(F32)
    # sigma_down = sqrt(next^2 - up^2) cancels: diffusers' float32 loses ~6 bits at 3 steps and ~1% at 2, so it
    # is computed in float64 (k-diffusion get_ancestral_step, eta 1) and only the stage level kept in float32.
    s64 = sigmas.astype(np.float64)
    nexts = np.append(s64[1:], 0.0)
    ups = np.sqrt(nexts**2 * (s64**2 - nexts**2) / s64**2)
    downs = np.sqrt(nexts**2 - ups**2)
    mids = np.sqrt(s64[:-1] * downs[:-1]).astype(F32)  # exp(lerp(log sigma, log sigma_down, 1/2))
    return _staged(config, sigmas, timesteps, mids, train)


def dpm_sde_schedule(config: SchedulerConfig, steps: int) -> Schedule:
    """DPMSolverSDEScheduler.set_timesteps: the second stage at the log-midpoint (timesteps kept float64)."""
    sigmas, timesteps, train = _interp_grid(config, steps, linspace="float64")
    # Its stage timesteps come from the float64 sigmas; the stage level itself from float32 sigmas in step().
    t = -np.log(sigmas)
    stage_t = sigma_to_t(np.exp(-(t[:-1] + np.diff(t) * 0.5)), np.log(train))
    s32 = sigmas.astype(F32)
    t32 = -np.log(s32)
    mids = np.exp(-(t32[:-1] + (t32[1:] - t32[:-1]) * F32(0.5)))
    init = ve_init_noise_sigma(s32, config.timestep_spacing)
    levels = _interleave(s32.astype(np.float64), mids.astype(np.float64), 0.0)
    return Schedule(levels, _interleave(timesteps, stage_t), init)


def _staged(config, sigmas, timesteps, mids, train) -> Schedule:
    """KDPM2 / KDPM2A: interleave the float32 stage levels and their (float32-sigma) timesteps."""
    stage_t = sigma_to_t(mids, np.log(train), dtype=F32)
    if config.sigma_kind() is None:  # float32 linspace timesteps; Karras/exponential ones stay float64
        timesteps, stage_t = timesteps.astype(F32), stage_t.astype(F32)
    levels = _interleave(sigmas.astype(np.float64), mids.astype(np.float64), 0.0)
    init = ve_init_noise_sigma(sigmas, config.timestep_spacing)
    return Schedule(levels, _interleave(timesteps, stage_t).astype(np.float64), init)


# ---- multistep solvers: integer timesteps, VP latents ----


def _multistep_grid(config: SchedulerConfig, steps: int, *, round_karras: bool):
    """(sigmas without the final one, float64; integer timesteps; alphas_cumprod) of DPM-Solver/UniPC/DEIS."""
    ac = _abar(config)
    train = train_sigmas(ac)
    timesteps = multistep_timesteps(config.timestep_spacing, config, steps)
    kind = config.sigma_kind()
    if kind:
        sigmas = convert_sigmas(kind, train[::-1], steps)
        timesteps = sigma_to_t(sigmas, np.log(train))
        if kind == "karras" and round_karras:
            timesteps = timesteps.round()
    else:
        sigmas = np.interp(timesteps, np.arange(len(train)), train)
    # torch's .to(int64) truncates the float timesteps.
    return sigmas, timesteps.astype(np.int64).astype(np.float64), ac


def _vp_schedule(sigmas: np.ndarray, last: float, timesteps: np.ndarray, orders: list[int]) -> Schedule:
    sigmas = np.append(sigmas, last).astype(F32).astype(np.float64)
    return Schedule(sigmas, timesteps, vp_init_noise_sigma(sigmas[0]), orders=tuple(orders))


def dpm_multistep_schedule(config: SchedulerConfig, steps: int) -> Schedule:
    """DPMSolverMultistepScheduler(order 2).set_timesteps, with step()'s lower-order rules."""
    round_karras = config.beta_schedule != "squaredcos_cap_v2"
    sigmas, timesteps, ac = _multistep_grid(config, steps, round_karras=round_karras)
    n = len(timesteps)
    # step(): first order at the first step and, under these conditions, at the last.
    final_first_order = (
        config.euler_at_final or (config.lower_order_final and n < 15) or config.final_sigmas_type == "zero"
    )
    orders = [1] + [2] * (n - 1)
    if final_first_order:
        orders[-1] = 1
    return _vp_schedule(sigmas, _final_sigma(config, ac), timesteps, orders)


def unipc_schedule(config: SchedulerConfig, steps: int) -> Schedule:
    """UniPCMultistepScheduler.set_timesteps; orders are the predictor's (the corrector reuses the previous one)."""
    sigmas, timesteps, ac = _multistep_grid(config, steps, round_karras=True)
    n, solver_order = len(timesteps), config.solver_order
    # step(): warm-up min(order, k + 1); lower_order_final: min(order, steps left).
    orders = [min(solver_order, k + 1, n - k if config.lower_order_final else solver_order) for k in range(n)]
    last = _final_sigma(config, ac)
    if config.final_sigmas_type == "sigma_min" and config.sigma_kind():
        last = sigmas[-1]
    return _vp_schedule(sigmas, last, timesteps, orders)


def deis_schedule(config: SchedulerConfig, steps: int) -> Schedule:
    """DEISMultistepScheduler.set_timesteps: ends at sigma_min, or repeats the last Karras/exponential/beta sigma."""
    sigmas, timesteps, ac = _multistep_grid(config, steps, round_karras=True)
    n, solver_order = len(timesteps), config.solver_order
    low = config.lower_order_final and n < 15  # step(): drop to first/second order over the last two steps
    orders = [min(solver_order, k + 1) for k in range(n)]
    if low:
        orders[-1] = 1
        if n > 1:
            orders[-2] = min(orders[-2], 2)
    last = sigmas[-1] if config.sigma_kind() else ((F32(1) - ac[0]) / ac[0]) ** F32(0.5)
    return _vp_schedule(sigmas, last, timesteps, orders)


def lcm_schedule(config: SchedulerConfig, steps: int) -> Schedule:
    """LCMScheduler.set_timesteps: `steps` of the distillation's original_inference_steps grid, ending at sigma 0."""
    T, original = config.num_train_timesteps, config.original_inference_steps
    if not steps <= original <= T:
        raise ValueError(f"LCM needs steps <= original_inference_steps={original} <= {T}, got {steps} steps")
    origin = (np.arange(1, original + 1) * (T // original) - 1)[::-1]
    timesteps = origin[np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)]
    ac = _abar(config)
    sigmas = np.array([vp_to_ve(ac[t]) for t in timesteps] + [0.0])
    return Schedule(sigmas, timesteps.astype(np.float64), vp_init_noise_sigma(sigmas[0]))


def skipped_steps(steps: int, strength: float) -> int:
    """Steps img2img leaves out at the noisy end: t_start of diffusers' StableDiffusionImg2ImgPipeline.get_timesteps."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be within (0, 1], got {strength!r}")
    kept = min(int(steps * strength), steps)
    if kept < 1:
        raise ValueError(f"strength {strength:g} of {steps} steps leaves no step to run (int(steps * strength) = 0)")
    return steps - kept
