"""Seeded noise for a batch: image i draws from its own torch-compatible generator seeded with seed + i."""
from __future__ import annotations

import numpy as np

from sdrt.runtime.philox import PhiloxGenerator
from sdrt.runtime.rng import TorchCPUGenerator

# Seed mode -> the torch generator a seed reproduces. "cpu": torch.Generator("cpu"), what diffusers uses and
# A1111's "CPU" random number source; "gpu": torch.Generator("cuda"), A1111's default "GPU" source (and its "NV").
GENERATORS = {"cpu": TorchCPUGenerator, "gpu": PhiloxGenerator}
SEED_MODES = tuple(GENERATORS)


class PerImageNoise:
    """Callable noise source; image i of a batch equals a batch-1 run with seed + i (A1111's convention,
    and diffusers' when given a list of CPU generators, whose randn_tensor draws each item separately)."""

    def __init__(self, seed: int, batch_size: int, seed_mode: str = "cpu"):
        if seed_mode not in GENERATORS:
            raise ValueError(f"seed mode must be one of {SEED_MODES}, got {seed_mode!r}")
        self.seeds = [seed + i for i in range(batch_size)]
        self._generators = [GENERATORS[seed_mode](s) for s in self.seeds]

    def __call__(self, shape: tuple[int, ...]) -> np.ndarray:
        if shape[0] != len(self._generators):
            raise ValueError(f"noise for batch {shape[0]} asked of a {len(self._generators)}-image generator")
        return np.concatenate([g.randn((1, *shape[1:])) for g in self._generators])
