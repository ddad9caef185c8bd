"""Classifier-free guidance rescale (Lin et al. 2023, arXiv:2305.08891 section 3.4, eqs. 15-16) for
zero-terminal-SNR models: pull the guided prediction's per-image standard deviation back to the conditional one's."""
from __future__ import annotations

import numpy as np


def rescale_noise_cfg(guided: np.ndarray, cond: np.ndarray, phi: float) -> np.ndarray:
    """phi * guided * std(cond) / std(guided) + (1 - phi) * guided, std over all but the batch axis.

    As diffusers' rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale), including torch.std's
    Bessel correction (ddof=1); applied to the model output (eps or v) after guidance.combine.
    """
    axes = tuple(range(1, guided.ndim))
    std_cond = cond.std(axis=axes, ddof=1, keepdims=True)
    std_guided = guided.std(axis=axes, ddof=1, keepdims=True)
    return phi * (guided * (std_cond / std_guided)) + (1 - phi) * guided
