"""PhiloxGenerator (A1111's "GPU" seeds) against published reference values: no GPU is needed to run these."""

import numpy as np
import pytest

from sdrt.runtime.noise import PerImageNoise
from sdrt.runtime.philox import PhiloxGenerator, philox4x32

# Values printed by torch on a GPU carry 8 significant digits (or 4 decimals); ours are float64 Box-Muller rounded
# to float32 while the device uses float32 logf and the __sincosf approximation: measured difference 3e-7.
FULL_PRECISION_TOL = 5e-7
FOUR_DECIMALS_TOL = 5e-5 + FULL_PRECISION_TOL  # half a unit in the 4th decimal

# Random123 (DEShawResearch/random123) tests/kat_vectors, philox4x32 10 rounds: counter, key -> output.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

# AUTOMATIC1111/stable-diffusion-webui modules/rng_philox.py docstring: Generator(seed=0).randn((3, 4)), the
# values A1111 documents for its CPU imitation of torch.randn(device="cuda") (its "NV" source).
A1111_SEED0_3X4 = [
    [-0.92466259, -0.42534415, -2.6438457, 0.14518388],
    [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
    [-1.07454231, -0.36314407, -1.67105067, 2.26550497],
]
# bokutotu/zenu zenu-matrix/src/nn/batch_norm.rs (test data `y_grad`, shape [2, 2, 2, 2]): torch.randn on CUDA
# after manual_seed(0), printed in full float32 precision (its `x` beside it is the CPU generator's seed-0 output).
CUDA_SEED0_16 = [
    -0.9246624, -0.42534423, -2.6438458, 0.14518386, -0.1208664, -0.57972574, -0.622851, -0.3283869,
    -1.0745419, -0.36314395, -1.6710504, 2.2655048, 0.3116848, -0.1841891, 1.2866427, 1.1819527,
]
# kapilsh/cuda-mode-lecture (lecture notebook, output of its libtorch CUDA test): after seeding 0, three draws in a
# row: x = randn({8, 10}), bias = randn({10}), y = randn({8, 10}), printed to 4 decimals. Each draw moves the
# Philox offset on, so this checks the offset arithmetic against a real GPU. First rows of x and y, all of bias.
CUDA_SEED0_X_ROWS = [
    [-0.9247, -0.4253, -2.6438, 0.1452, -0.1209, -0.5797, -0.6229, -0.3284, -1.0745, -0.3631],
    [-1.6711, 2.2655, 0.3117, -0.1842, 1.2866, 1.1820, -0.1271, 1.2169, 1.4353, 1.0605],
]
CUDA_SEED0_BIAS = [0.1808, -0.5523, 0.9238, -0.7350, 1.3800, 0.8676, 0.1297, -0.9406, 0.8109, 0.8821]
CUDA_SEED0_Y_ROWS = [
    [2.5441, -0.7163, -0.4934, 0.1267, 0.1014, -0.4035, 0.9023, 0.8099, -0.6884, 0.1372],
    [1.0377, 0.0925, -0.3752, -0.0908, 2.0639, -1.8164, -0.2719, 0.2811, -1.0399, 0.7765],
]


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_philox_block_matches_random123_known_answers(counter, key, expected):
    out = philox4x32(np.array(counter, np.uint32)[:, None], key)
    assert [int(w) for w in out[:, 0]] == list(expected)


def test_seed0_matches_a1111_documented_output():
    got = PhiloxGenerator(0).randn((3, 4))
    assert got.dtype == np.float32 and got.shape == (3, 4)
    np.testing.assert_allclose(got, A1111_SEED0_3X4, rtol=0, atol=FULL_PRECISION_TOL)


def test_seed0_matches_cuda_output_in_full_precision():
    got = PhiloxGenerator(0).randn((2, 2, 2, 2))
    np.testing.assert_allclose(got.ravel(), CUDA_SEED0_16, rtol=0, atol=FULL_PRECISION_TOL)


def test_successive_draws_match_cuda_offsets():
    g = PhiloxGenerator(0)
    x, bias, y = g.randn((8, 10)), g.randn(10), g.randn((8, 10))
    np.testing.assert_allclose(x[:2], CUDA_SEED0_X_ROWS, rtol=0, atol=FOUR_DECIMALS_TOL)
    np.testing.assert_allclose(bias, CUDA_SEED0_BIAS, rtol=0, atol=FOUR_DECIMALS_TOL)
    np.testing.assert_allclose(y[:2], CUDA_SEED0_Y_ROWS, rtol=0, atol=FOUR_DECIMALS_TOL)
    assert g.offset == 3 * 4  # one float4 per thread per draw


def test_element_i_is_subsequence_i():
    # Each element has its own Philox subsequence, so a longer draw extends a shorter one (unlike torch's CPU
    # generator, whose normal_fill pairs values 8 apart).
    long, short = PhiloxGenerator(7).randn((1, 4, 16, 16)).ravel(), PhiloxGenerator(7).randn(12)
    np.testing.assert_array_equal(long[:12], short)


def test_all_64_seed_bits_key_the_generator():
    # curand_init keys Philox with the whole 64-bit seed: 5 and 2**32 + 5 differ (the CPU generator keeps 32 bits).
    low, high = PhiloxGenerator(5).randn(16), PhiloxGenerator(2**32 + 5).randn(16)
    assert np.abs(low - high).max() > 0.1


def test_grid_wraparound_layout():
    # With fewer threads T than elements, element li = thread + T * (4 * call + slot) takes slot `slot` of the
    # thread's curand_normal4 at call `call`: (sin, cos) of words (0, 1), then (sin, cos) of words (2, 3).
    threads, n = 256, 256 * 4 + 256 + 3  # one full float4 round plus a second call
    wrapped = PhiloxGenerator(3, threads=threads).randn(n)
    own = PhiloxGenerator(3).randn(threads)  # every thread's slot 0 at call 0
    np.testing.assert_array_equal(wrapped[:threads], own)
    assert not np.array_equal(wrapped[threads:2 * threads], own)
    g = PhiloxGenerator(3, threads=threads)
    g.randn(n)
    assert g.offset == 2 * 4  # two float4 calls per thread


def test_threads_at_or_above_size_changes_nothing():
    np.testing.assert_array_equal(PhiloxGenerator(11, threads=4096).randn((1, 4, 8, 8)),
                                  PhiloxGenerator(11).randn((1, 4, 8, 8)))


def test_sd_latents_are_standard_normal():
    x = PhiloxGenerator(1234).randn((1, 4, 64, 64))
    assert abs(float(x.mean())) < 0.03 and abs(float(x.std()) - 1) < 0.02
    assert np.isfinite(x).all()


@pytest.mark.parametrize("seed, error", [(-1, ValueError), (2**64, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_seeds(seed, error):
    with pytest.raises(error):
        PhiloxGenerator(seed)


def test_bad_threads():
    with pytest.raises(ValueError, match="multiple of 256"):
        PhiloxGenerator(0, threads=1000)


def test_per_image_noise_gpu_mode():
    noise = PerImageNoise(41, 2, seed_mode="gpu")
    first, second = noise((2, 4, 8, 8)), noise((2, 4, 8, 8))
    np.testing.assert_array_equal(first[1:], PhiloxGenerator(42).randn((1, 4, 8, 8)))
    g = PhiloxGenerator(41)  # A1111's ImageRNG.next: the same per-image generator draws again
    g.randn((1, 4, 8, 8))
    np.testing.assert_array_equal(second[:1], g.randn((1, 4, 8, 8)))
    with pytest.raises(ValueError, match="seed mode"):
        PerImageNoise(0, 1, seed_mode="cuda")
