"""What the UNet predicts -> the denoised estimate, in k-diffusion's VE form (Karras et al. 2022, table 1)."""
from __future__ import annotations

from typing import Callable

import numpy as np

Parametrization = Callable[[np.ndarray, np.ndarray, float], np.ndarray]


def c_in(sigma: float) -> float:
    """Input scaling: the UNet was trained on VP samples x / sqrt(sigma^2 + 1)."""
    return 1.0 / np.sqrt(sigma**2 + 1.0)


def denoised_from_eps(x: np.ndarray, eps: np.ndarray, sigma: float) -> np.ndarray:
    """epsilon prediction: x0 = x - sigma * eps."""
    return x - sigma * eps


def denoised_from_v(x: np.ndarray, v: np.ndarray, sigma: float) -> np.ndarray:
    """v prediction (Salimans & Ho 2022): x0 = x / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1)."""
    return x / (sigma**2 + 1.0) - v * (sigma / np.sqrt(sigma**2 + 1.0))


PARAMETRIZATIONS: dict[str, Parametrization] = {
    "epsilon": denoised_from_eps,
    "v_prediction": denoised_from_v,
}


def parametrization(prediction_type: str) -> Parametrization:
    """The converter for a bundle's prediction type."""
    try:
        return PARAMETRIZATIONS[prediction_type]
    except KeyError:
        raise ValueError(f"unknown prediction type {prediction_type!r}; known: {', '.join(PARAMETRIZATIONS)}") from None
