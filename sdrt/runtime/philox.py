"""numpy twin of torch.randn on a CUDA generator: curand's Philox4x32-10 plus Box-Muller (A1111's "GPU" seeds)."""
from __future__ import annotations

import math
import numbers

import numpy as np

# References: Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3" (Philox4x32-10, Random123's
# philox.h); curand_kernel.h / curand_normal.h (curand_init, curand4, _curand_box_muller); torch 2.x
# ATen/native/cuda/DistributionTemplates.h (calc_execution_policy, distribution_elementwise_grid_stride_kernel);
# the idea of a CPU imitation is AUTOMATIC1111's modules/rng_philox.py (its "NV" random number source).

PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers (Random123 PHILOX_M4x32_0/1)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # key bumps: golden ratio and sqrt(3) - 1, as 32-bit fractions
ROUNDS = 10
# curand_normal.h: float constants of _curand_box_muller (u in (0, 1), angle in (0, 2 pi)).
POW32_INV = np.float32(2.3283064e-10)
POW32_INV_2PI = np.float32(2.3283064e-10 * 6.2831855)
# distribution_nullary_kernel: curand_normal4 gives 4 floats per thread and per counter step (unroll factor),
# and torch advances the generator's Philox offset by 4 (uint32 outputs) per float4 a thread draws.
UNROLL = 4
BLOCK_SIZE = 256
_U32 = 0xFFFF_FFFF


def philox4x32(counter: np.ndarray, key: tuple[int, int], rounds: int = ROUNDS) -> np.ndarray:
    """Philox4x32 block function: counters [4, n] uint32 -> random words [4, n] uint32 (Random123)."""
    c = [w.astype(np.uint64) for w in counter]
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + PHILOX_W[0]) & _U32, (k1 + PHILOX_W[1]) & _U32
        p0, p1 = c[0] * PHILOX_M[0], c[2] * PHILOX_M[1]  # 32 x 32 -> 64 bits, exact in uint64
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & _U32, (p0 >> 32) ^ c[3] ^ k1, p0 & _U32]
    return np.stack(c).astype(np.uint32)


def box_muller(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """curand's _curand_box_muller on two uint32 words: (s sin v, s cos v) as float32.

    Evaluated in float64 from the exact words and rounded once, as A1111's rng_philox does. The device works in
    float32 with its own logf and __sincosf (a hardware approximation), so no CPU code is bit-exact with it:
    values agree with CUDA's to within 5e-7 (measured 3e-7 against GPU output printed in full float32).
    """
    u = x * np.float64(POW32_INV) + np.float64(POW32_INV) / 2  # never 0: log(u) is finite
    v = y * np.float64(POW32_INV_2PI) + np.float64(POW32_INV_2PI) / 2
    s = np.sqrt(-2.0 * np.log(u))
    return (s * np.sin(v)).astype(np.float32), (s * np.cos(v)).astype(np.float32)


def check_seed(seed: int) -> int:
    """A CUDA generator's seed: an int in [0, 2**64); all 64 bits key Philox (curand_init)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return int(seed)


class PhiloxGenerator:
    """numpy stand-in for torch.Generator("cuda").manual_seed(seed) feeding float32 torch.randn.

    `threads` is the CUDA grid the kernel is launched with (multiProcessorCount * maxThreadsPerMultiProcessor).
    torch gives every element its own Philox subsequence while the tensor has no more elements than that (16384
    for SD's 512x512 latents, far below any GPU's limit): then the noise is the same on every GPU, and None (no
    limit, A1111's assumption) reproduces it. Larger tensors wrap around the grid and depend on the GPU model.
    """

    def __init__(self, seed: int, *, threads: int | None = None):
        self.seed = check_seed(seed)
        if threads is not None and (threads < BLOCK_SIZE or threads % BLOCK_SIZE):
            raise ValueError(f"threads must be a positive multiple of {BLOCK_SIZE}, got {threads}")
        self.threads = threads
        self.offset = 0  # torch's philox_offset_per_thread, in uint32 outputs (a multiple of 4)

    def randn(self, shape) -> np.ndarray:
        """Return the float32 array torch.randn(shape, generator=g, device="cuda") would, advancing the offset."""
        shape = (shape,) if isinstance(shape, numbers.Integral) else tuple(shape)
        n = math.prod(shape)
        grid = n if self.threads is None else min(self.threads, _round_up(n, BLOCK_SIZE))
        calls = max(1, -(-n // (grid * UNROLL)))  # float4 draws per thread (calc_execution_policy's counter_offset)
        index = np.arange(n, dtype=np.int64)
        thread, lane = index % grid, index // grid  # element li = thread + grid * (UNROLL * call + slot)
        words = self._words(thread, lane // UNROLL)
        out = self._normals(words, lane % UNROLL)
        self.offset += calls * UNROLL
        return out.reshape(shape)

    def _words(self, thread: np.ndarray, call: np.ndarray) -> np.ndarray:
        """curand4 for each element's thread (the subsequence) at its call: counter = (offset/4 + call, thread)."""
        step = self.offset // UNROLL + call.astype(np.uint64)  # curand skipahead(offset): a 128-bit counter add
        counter = np.stack([step & _U32, step >> 32, thread.astype(np.uint64) & _U32, thread.astype(np.uint64) >> 32])
        return philox4x32(counter.astype(np.uint32), (self.seed & _U32, self.seed >> 32))

    @staticmethod
    def _normals(words: np.ndarray, slot: np.ndarray) -> np.ndarray:
        """curand_normal4 = (sin, cos) of words (0, 1), then of words (2, 3); pick each element's slot."""
        first = box_muller(words[0], words[1])
        if not slot.any():  # every element is its thread's first float: skip the second pair
            return first[0]
        second = box_muller(words[2], words[3])
        return np.choose(slot, [first[0], first[1], second[0], second[1]])


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
