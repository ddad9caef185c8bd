"""Multistep exponential-integrator samplers in VE space: DPM-Solver++(2M), its SDE variant, UniPC, DEIS.

In VE space lambda = -log(sigma) (diffusers' log(alpha_t / sigma_t)), so diffusers' VP updates divided by
alpha_t become k-diffusion's; each step's solver order comes from the schedule (the diffusers class's warm-up
and lower-order-final rules). History lives in local lists, newest last. numpy only.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.polynomial import Polynomial

from .noise_levels import Schedule
from .samplers_basic import Denoiser, NoiseFn, Steps, emit, need_noise, to_d


def _lambda(sigma: float) -> float:
    """Half log-SNR in VE space; +inf at sigma 0."""
    return -math.log(sigma) if sigma > 0 else math.inf


# Weight of (denoised - old_denoised) / r in the SDE 2M step (diffusers multistep_dpm_solver_second_order_update).
SDE_SECOND_ORDER = {
    "midpoint": lambda h, decay: 0.5 * decay,
    "heun": lambda h, decay: decay / (-2 * h) + 1,
}


def _orders(schedule: Schedule) -> tuple[int, ...]:
    return schedule.orders or (1,) + (2,) * (len(schedule.timesteps) - 1)


def sample_dpmpp_2m(model: Denoiser, x: np.ndarray, schedule: Schedule, noise: NoiseFn | None = None) -> Steps:
    """DPM-Solver++(2M) (Lu et al. 2022b alg. 2), as DPMSolverMultistepScheduler (k-diffusion sample_dpmpp_2m)."""
    sigmas, ts, orders = schedule.sigmas.tolist(), schedule.timesteps.tolist(), _orders(schedule)
    old_denoised = None
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma, t)
        if orders[i] == 1 or old_denoised is None or sigma_next in (0.0, sigma):
            denoised_d = denoised  # first order; with h = 0 (Karras + sigma_min final) the step is a no-op
        else:
            # r = h_last / h; k-diffusion sample_dpmpp_2m.
            r = math.log(sigmas[i - 1] / sigma) / math.log(sigma / sigma_next)
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        # exp(-h) = sigma_next / sigma, so the data-prediction update needs no log (and allows sigma_next = 0).
        ratio = sigma_next / sigma
        x = ratio * x + (1 - ratio) * denoised_d
        old_denoised = denoised
        x = yield from emit(x)


def sample_dpmpp_2m_sde(
    model: Denoiser, x: np.ndarray, schedule: Schedule, noise: NoiseFn | None = None, solver_type: str = "midpoint"
) -> Steps:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b appendix; k-diffusion sample_dpmpp_2m_sde, eta 1).

    As DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_type), which draws noise every step.
    """
    if solver_type not in SDE_SECOND_ORDER:
        raise ValueError(f"solver_type must be one of {sorted(SDE_SECOND_ORDER)}, got {solver_type!r}")
    noise = need_noise(noise, "sample_dpmpp_2m_sde")
    sigmas, ts, orders = schedule.sigmas.tolist(), schedule.timesteps.tolist(), _orders(schedule)
    old_denoised = None
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma, t)
        z = noise(x.shape)
        if sigma_next == 0:
            x = denoised  # h = inf: the prediction itself
        elif sigma_next != sigma:  # h = 0 (Karras + sigma_min final): a no-op
            h = math.log(sigma / sigma_next)
            decay = -math.expm1(-2 * h)  # 1 - exp(-2h)
            x = (sigma_next / sigma) ** 2 * x + decay * denoised
            if orders[i] == 2 and old_denoised is not None:
                r = math.log(sigmas[i - 1] / sigma) / h
                x = x + SDE_SECOND_ORDER[solver_type](h, decay) / r * (denoised - old_denoised)
            x = x + z * sigma_next * math.sqrt(decay)
        old_denoised = denoised
        x = yield from emit(x)


# ---- UniPC (Zhao et al. 2023), B(h) = expm1(-h) ("bh2"), data prediction ----


def _unipc_rhs(h: float, order: int) -> tuple[float, float, np.ndarray]:
    """(h_phi_1, B(h), b) of UniPC's linear system (diffusers multistep_uni_p_bh_update, bh2, predict_x0)."""
    hh = -h
    h_phi_1 = math.expm1(hh)  # h * phi_1(h) = e^h - 1
    h_phi_k = h_phi_1 / hh - 1
    b_h = math.expm1(hh)
    b, factorial = [], 1
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, np.array(b)


def _unipc_update(
    x: np.ndarray, sigmas: list[float], history: list[np.ndarray], sigma_to: float, order: int,
    model_t: np.ndarray | None = None,
) -> np.ndarray:
    """One UniPC update from sigmas[-1] (denoised history[-1]) to sigma_to: predictor UniP, or with the
    denoised `model_t` at sigma_to, corrector UniC. sigmas/history: the levels and denoised so far, oldest first."""
    if sigma_to == sigmas[-1]:
        return x  # h = 0 (Karras + sigma_min final): a no-op, as diffusers' update reduces to
    lam0, m0 = _lambda(sigmas[-1]), history[-1]
    h = _lambda(sigma_to) - lam0
    rks = [(_lambda(sigmas[-1 - k]) - lam0) / h for k in range(1, order)] + [1.0]
    d1s = [(history[-1 - k] - m0) / rks[k - 1] for k in range(1, order)]
    h_phi_1, b_h, b = _unipc_rhs(h, order)
    R = np.array([[rk**i for rk in rks] for i in range(order)])
    x_t = (sigma_to / sigmas[-1]) * x - h_phi_1 * m0
    if model_t is None:  # UniP: order 2 fixes rho = 1/2; higher orders solve the reduced system
        rhos = [0.5] if order == 2 else (np.linalg.solve(R[:-1, :-1], b[:-1]) if order > 2 else [])
        return x_t - b_h * sum(r * d for r, d in zip(rhos, d1s))
    rhos = [0.5] if order == 1 else np.linalg.solve(R, b)  # UniC
    return x_t - b_h * (sum(r * d for r, d in zip(rhos[:-1], d1s)) + rhos[-1] * (model_t - m0))


def sample_unipc(model: Denoiser, x: np.ndarray, schedule: Schedule, noise: NoiseFn | None = None) -> Steps:
    """UniPC (Zhao et al. 2023 alg. 2), as UniPCMultistepScheduler(bh2, predict_x0): each model evaluation first
    corrects the latents it was given (UniC, order of the previous predictor), then predicts the next (UniP)."""
    sigmas, ts, orders = schedule.sigmas.tolist(), schedule.timesteps.tolist(), _orders(schedule)
    history, last_x = [], None
    for i, t in enumerate(ts):
        denoised = model(x, sigmas[i], t)
        if i > 0:
            x = _unipc_update(last_x, sigmas[:i], history, sigmas[i], orders[i - 1], model_t=denoised)
        history.append(denoised)
        last_x = x
        x = _unipc_update(x, sigmas[: i + 1], history, sigmas[i + 1], orders[i])
        x = yield from emit(x)


# ---- DEIS (Zhang & Chen 2022), rho-AB with polynomial extrapolation in log rho ----


def _deis_coefficient(log_rhos: list[float], j: int, rho_from: float, rho_to: float) -> float:
    """Integral over rho in [rho_from, rho_to] of the Lagrange basis polynomial j in u = log rho.

    With rho = e^u, the antiderivative of p(u) e^u is e^u * sum_k (-1)^k p^(k)(u) (diffusers' ind_fn, any order).
    """
    basis = Polynomial([1.0])
    for k, u_k in enumerate(log_rhos):
        if k != j:
            basis *= Polynomial([-u_k, 1.0]) / (log_rhos[j] - u_k)

    def antiderivative(rho: float) -> float:
        u = math.log(rho)
        return rho * sum((-1) ** k * basis.deriv(k)(u) for k in range(basis.degree() + 1))

    return antiderivative(rho_to) - antiderivative(rho_from)


def sample_deis(model: Denoiser, x: np.ndarray, schedule: Schedule, noise: NoiseFn | None = None) -> Steps:
    """DEIS-rhoAB (Zhang & Chen 2022 eq. 15), as DEISMultistepScheduler: x integrates eps over rho = sigma, with
    eps extrapolated by the Lagrange polynomial in log rho through the last `order` evaluations."""
    sigmas, ts, orders = schedule.sigmas.tolist(), schedule.timesteps.tolist(), _orders(schedule)
    eps = []
    for i, t in enumerate(ts):
        eps.append(to_d(x, sigmas[i], model(x, sigmas[i], t)))
        order = orders[i]
        log_rhos = [math.log(sigmas[i - k]) for k in range(order)]  # newest first, like eps[-1 - k]
        x = x + sum(
            _deis_coefficient(log_rhos, k, sigmas[i], sigmas[i + 1]) * eps[-1 - k] for k in range(order)
        )
        eps = eps[-3:]
        x = yield from emit(x)
