"""What some diffusers schedulers do to each predicted x0 before using it: clip it, or threshold it dynamically.

In k-diffusion's VE form the predicted x0 is the sampler's `denoised`. diffusers applies the clamp in step()
(DDIMScheduler, LCMScheduler, HeunDiscreteScheduler) or in convert_model_output() (DPMSolverMultistepScheduler,
UniPCMultistepScheduler, DEISMultistepScheduler); where in the update the clamped x0 goes is the sampler's
business (samplers.sample). numpy only.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .noise_levels import SchedulerConfig

X0Clamp = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ClipSample:
    """clip_sample: x0 clamped to [-limit, limit] (clip_sample_range)."""

    limit: float

    def __call__(self, x0: np.ndarray) -> np.ndarray:
        return np.clip(x0, -self.limit, self.limit)


@dataclass(frozen=True)
class DynamicThreshold:
    """Dynamic thresholding (Saharia et al. 2022, Imagen sec. 2.3), as diffusers' `_threshold_sample`.

    Per image, s is the `ratio` quantile of |x0|, kept within [1, max_value]; x0 is clamped to [-s, s] and
    divided by s, so saturated pixels are pushed inwards instead of clipped flat.
    """

    ratio: float
    max_value: float

    def __call__(self, x0: np.ndarray) -> np.ndarray:
        flat = x0.reshape(len(x0), -1)
        # torch.quantile's default interpolation is numpy's "linear".
        s = np.clip(np.quantile(np.abs(flat), self.ratio, axis=1), 1.0, self.max_value)[:, None]
        return (np.clip(flat, -s, s) / s).reshape(x0.shape).astype(x0.dtype, copy=False)


def x0_clamp(config: SchedulerConfig) -> X0Clamp | None:
    """The clamp a resolved config asks for; thresholding wins over clip_sample, as in diffusers' step()."""
    if config.thresholding:
        return DynamicThreshold(config.dynamic_thresholding_ratio, config.sample_max_value)
    if config.clip_sample:
        return ClipSample(config.clip_sample_range)
    return None
