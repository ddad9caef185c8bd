"""The beta distribution's quantile function in numpy, for "Beta" sigmas (Lee et al. 2024, arXiv:2407.12173).

diffusers (`_convert_to_beta`) and A1111 (`sd_schedulers.beta_scheduler`) call scipy.stats.beta.ppf; the runtime
does not ship scipy, so the regularized incomplete beta function is evaluated by its continued fraction
(Numerical Recipes 3rd ed. sec. 6.4, modified Lentz) and inverted by bisection, which is monotone and exact to
float64 after 64 halvings. numpy only.
"""
from __future__ import annotations

import math

import numpy as np

_TINY = 1e-300  # Lentz's guard against a zero denominator
_CF_TOLERANCE = 1e-15
_CF_MAX_TERMS = 300  # a, b ~ 0.6 converge in a few dozen; the bound only stops a runaway
_BISECTIONS = 64  # halves [0, 1] below float64 resolution


def _continued_fraction(a: float, b: float, x: np.ndarray) -> np.ndarray:
    """The continued fraction of I_x(a, b) (Numerical Recipes `betacf`), for x < (a + 1) / (a + b + 2)."""
    c = np.ones_like(x)
    d = 1 - (a + b) * x / (a + 1)
    d = 1 / np.where(np.abs(d) < _TINY, _TINY, d)
    h = d.copy()
    for m in range(1, _CF_MAX_TERMS + 1):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / np.where(np.abs(d) < _TINY, _TINY, d)
            c = 1 + numerator / c
            c = np.where(np.abs(c) < _TINY, _TINY, c)
            h = h * d * c
        if np.all(np.abs(d * c - 1) < _CF_TOLERANCE):
            break
    return h


def beta_cdf(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """The regularized incomplete beta function I_x(a, b), elementwise for x in [0, 1]."""
    x = np.clip(np.asarray(x, np.float64), 0.0, 1.0)
    inner = np.clip(x, _TINY, 1 - 1e-16)
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * np.log(inner) + b * np.log1p(-inner))
    front = np.exp(log_front)
    # The fraction converges on the side of the mean; the other side uses I_x(a, b) = 1 - I_(1-x)(b, a).
    low = inner < (a + 1) / (a + b + 2)
    out = np.empty_like(inner)
    out[low] = front[low] * _continued_fraction(a, b, inner[low]) / a
    out[~low] = 1 - front[~low] * _continued_fraction(b, a, 1 - inner[~low]) / b
    return np.where(x <= 0, 0.0, np.where(x >= 1, 1.0, out))


def beta_ppf(q: np.ndarray, a: float, b: float) -> np.ndarray:
    """The quantile function (inverse CDF) of Beta(a, b), elementwise for q in [0, 1] (scipy.stats.beta.ppf)."""
    q = np.asarray(q, np.float64)
    lo, hi = np.zeros_like(q), np.ones_like(q)
    for _ in range(_BISECTIONS):
        mid = (lo + hi) / 2
        below = beta_cdf(mid, a, b) < q
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return np.where(q <= 0, 0.0, np.where(q >= 1, 1.0, (lo + hi) / 2))
