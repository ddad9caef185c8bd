"""Classifier-free guidance (Ho & Salimans 2022): prepare the doubled batch, combine the two predictions."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClassifierFreeGuidance:
    """Holds the conditional and unconditional embeddings; `scale` <= 1 skips the unconditional half."""

    cond: np.ndarray  # [B, sequence, dim]
    uncond: np.ndarray  # [B, sequence, dim]
    scale: float

    @property
    def enabled(self) -> bool:
        # diffusers: do_classifier_free_guidance = guidance_scale > 1
        return self.scale > 1.0

    def context(self) -> np.ndarray:
        """Text embeddings for the UNet batch: [uncond, cond] in diffusers' order, or cond alone."""
        return np.concatenate([self.uncond, self.cond]) if self.enabled else self.cond

    def batch(self, x: np.ndarray) -> np.ndarray:
        """The latents for the UNet batch, repeated when guidance is on."""
        return np.concatenate([x, x]) if self.enabled else x

    def combine(self, output: np.ndarray) -> np.ndarray:
        """uncond + scale * (cond - uncond)."""
        if not self.enabled:
            return output
        uncond, cond = np.split(output, 2)
        return uncond + self.scale * (cond - uncond)
