"""Seeded noise for a batch: image i draws from its own torch-compatible generator seeded with seed + i."""
from __future__ import annotations

import numpy as np

from sdrt.runtime.rng import TorchCPUGenerator


class PerImageNoise:
    """Callable noise source; image i of a batch equals a batch-1 run with seed + i (A1111's convention,
    and diffusers' when given a list of CPU generators, whose randn_tensor draws each item separately)."""

    def __init__(self, seed: int, batch_size: int):
        self.seeds = [seed + i for i in range(batch_size)]
        self._generators = [TorchCPUGenerator(s) for s in self.seeds]

    def __call__(self, shape: tuple[int, ...]) -> np.ndarray:
        if shape[0] != len(self._generators):
            raise ValueError(f"noise for batch {shape[0]} asked of a {len(self._generators)}-image generator")
        return np.concatenate([g.randn((1, *shape[1:])) for g in self._generators])
