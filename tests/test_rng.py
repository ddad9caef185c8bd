"""TorchCPUGenerator against torch.randn on a seeded CPU generator: bit-for-bit equality."""

import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from sdrt.runtime.rng import TorchCPUGenerator, _fma32, engine_seed

torch = pytest.importorskip("torch")

TOLERANCE = "bit-exact"  # every comparison is np.array_equal on float32
SEEDS = [0, 1, 42, 2**31 - 1, 2**32 - 1, 2**32 + 5, 18_446_744_073_709_551_557]
SHAPES = [(1, 4, 64, 64), (2, 4, 8, 8), (3, 7), (17,), (16,), (33,), (5,), (2, 3), (1,)]
# A txt2img run: initial latents, then ancestral noise each step, with small draws mixed in to
# exercise the cached second Box-Muller value of normal_distribution<double>.
SEQUENCE = [(1, 4, 64, 64), (3,), (1, 4, 64, 64), (1,), (17,), (5,), (1, 4, 64, 64), (2,), (2, 4, 8, 8)]


def _local_kernel():
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512"):
        return "avx2"
    if capability == "DEFAULT" and platform.libc_ver()[0] == "glibc":
        return "default"
    pytest.skip(f"no numpy twin of torch's {capability} normal kernel on this platform")


def _torch_draws(seed, shapes):
    g = torch.Generator("cpu").manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float32).numpy() for shape in shapes]


def _ours(seed, shapes, kernel):
    g = TorchCPUGenerator(seed, kernel=kernel)
    return [g.randn(shape) for shape in shapes]


def _assert_same(expected, actual):
    for want, got in zip(expected, actual, strict=True):
        assert got.dtype == np.float32 and got.shape == want.shape
        mismatches = int((want != got).sum())
        assert np.array_equal(want, got), f"{mismatches} of {want.size} values differ ({TOLERANCE})"


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_single_draw_matches_torch(seed, shape):
    _assert_same(_torch_draws(seed, [shape]), _ours(seed, [shape], _local_kernel()))


@pytest.mark.parametrize("seed", [0, 1234, 2**63 + 7])
def test_sequential_draws_match_torch(seed):
    _assert_same(_torch_draws(seed, SEQUENCE), _ours(seed, SEQUENCE, _local_kernel()))


def test_empty_draw_consumes_nothing():
    shapes = [(0,), (4,), (0, 3), (20,)]
    _assert_same(_torch_draws(7, shapes), _ours(7, shapes, _local_kernel()))


_SUBPROCESS = """
import json, sys, numpy as np, torch
seeds, shapes, out = json.loads(sys.argv[1])
arrays = {}
for seed in seeds:
    g = torch.Generator("cpu").manual_seed(seed)
    for i, shape in enumerate(shapes):
        arrays[f"{seed}_{i}"] = torch.randn(shape, generator=g).numpy()
np.savez(out, capability=torch.backends.cpu.get_cpu_capability(), **arrays)
"""


@pytest.mark.parametrize("kernel", ["avx2", "default"])
def test_kernel_matches_torch_forced_capability(kernel, tmp_path):
    # torch picks its kernel at import from ATEN_CPU_CAPABILITY, so each build runs in a subprocess.
    if kernel == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU cannot run torch's AVX2 kernel")
    if kernel == "default" and platform.libc_ver()[0] != "glibc":
        pytest.skip("the default kernel is reproduced for glibc's libm only")
    seeds, shapes, out = [3, 2**32 - 1], [list(s) for s in SEQUENCE], str(tmp_path / "ref.npz")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=kernel)
    subprocess.run([sys.executable, "-c", _SUBPROCESS, json.dumps([seeds, shapes, out])], env=env, check=True)
    ref = np.load(out)
    assert str(ref["capability"]) == kernel.upper()
    for seed in seeds:
        expected = [ref[f"{seed}_{i}"] for i in range(len(shapes))]
        _assert_same(expected, _ours(seed, SEQUENCE, kernel))


def test_seed_uses_low_32_bits_like_torch():
    assert engine_seed(2**32 + 5) == 5 and engine_seed(2**64 - 1) == 2**32 - 1
    torch_high, torch_low = _torch_draws(2**32 + 5, [(20,)]) + _torch_draws(5, [(20,)])
    assert np.array_equal(torch_high, torch_low)
    assert np.array_equal(TorchCPUGenerator(2**32 + 5).randn(20), TorchCPUGenerator(5).randn(20))


@pytest.mark.parametrize("seed, error", [(-1, ValueError), (2**64, ValueError), (1.0, TypeError), (True, TypeError)])
def test_bad_seed_raises(seed, error):
    with pytest.raises(error):
        TorchCPUGenerator(seed)


def test_bad_kernel_raises():
    with pytest.raises(ValueError, match="kernel"):
        TorchCPUGenerator(0, kernel="avx512")


def test_fma32_rounds_once_on_double_ties():
    # a*b + c = 1 + 2**-11 + 2**-24 + 2**-80: float64 rounds onto the float32 tie, the fma does not.
    a = np.array([1 + 2**-12], np.float32)
    got = _fma32(a, np.float32(1 + 2**-12), np.float32(2**-80))
    assert got[0] == np.float32(1 + 2**-11 + 2**-23)
