"""Bit-exact numpy twin of torch.randn drawn from a seeded CPU torch.Generator (torch 2.13)."""

import math
import numbers

import numpy as np

# References (torch 2.13): ATen/core/MT19937RNGEngine.h (engine), ATen/core/TransformationHelper.h
# (uniform_real), ATen/core/DistributionsHelper.h (normal_distribution<double>), and
# ATen/native/cpu/DistributionTemplates.h (normal_kernel, normal_fill, NormalFill16).

f32, f64 = np.float32, np.float64
_BLOCK = 16  # normal_fill transforms uniforms 16 at a time: slots [0, 8) pair with [8, 16)
KERNELS = ("avx2", "default")


def engine_seed(seed: int) -> int:
    """Check a seed is an int in [0, 2**64) and return the 32 bits torch's mt19937 is keyed with."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    # torch keeps all 64 bits as initial_seed(), but mt19937_engine::init_with_uint32 uses only
    # seed & 0xffffffff: torch gives identical noise for seeds 5 and 2**32 + 5.
    return int(seed) & 0xFFFF_FFFF


def _fma32(a, b, c):
    """Return float32 a*b + c rounded once, like the vfmadd GCC emits for torch's AVX2 kernel."""
    p = a.astype(f64) * b  # exact: two 24-bit significands fit in 53 bits
    c = np.asarray(c, f64)
    s = p + c
    t = s - p
    err = (p - (s - t)) + (c - t)  # TwoSum: s + err == a*b + c exactly
    r = s.astype(f32)  # double rounding errs only when s sits on a float32 tie and err != 0
    toward = np.nextafter(r, np.where(err > 0, np.inf, -np.inf).astype(f32))
    tie = (err != 0) & (s == (r.astype(f64) + toward) / 2)
    return np.where(tie, toward, r)


# --- "avx2": NormalFill16<float, true> (CPU_CAPABILITY_AVX2, also used by torch's AVX512 build) ----
# It calls log256_ps and sincos256_ps from ATen/native/cpu/avx_mathfun.h (Cephes float32
# polynomials). GCC (-mfma, -ffp-contract=fast) contracts each mul feeding an add into one fma;
# the _fma32 calls below mirror that (measured: plain mul+add mismatches ~1% of values).
_LOG_P = [7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
          -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1]
_DP = [-0.78515625, -2.4187564849853515625e-4, -3.77489497744594108e-8]  # -pi/4 in three parts


def _log256_ps(x):
    """Port of avx_mathfun log256_ps for positive normal float32 x."""
    bits = x.view(np.int32)
    e = ((bits >> 23) - 127).astype(f32) + f32(1)
    x = ((bits & ~0x7F800000) | f32(0.5).view(np.int32)).view(f32)  # mantissa in [0.5, 1)
    below = x < f32(0.707106781186547524)  # cephes_SQRTHF
    x = (x - f32(1)) + np.where(below, x, f32(0))
    e = e - np.where(below, f32(1), f32(0))
    z = x * x
    y = np.full_like(x, f32(_LOG_P[0]))
    for p in _LOG_P[1:]:
        y = _fma32(y, x, f32(p))
    y = _fma32(y * x, z, e * f32(-2.12194440e-4))  # cephes_log_q1
    y = y - z * f32(0.5)
    return (x + y) + e * f32(0.693359375)  # cephes_log_q2; e*q2 is exact


def _sincos256_ps(x):
    """Port of avx_mathfun sincos256_ps for non-negative float32 x; returns (sin, cos)."""
    j = (x * f32(1.27323954473516)).astype(np.int32)  # cephes_FOPI = 4/pi, truncated
    j = (j + 1) & ~1
    y = j.astype(f32)
    for dp in _DP:  # extended-precision reduction x - j*pi/4
        x = _fma32(y, f32(dp), x)
    z = x * x
    c = _fma32(_fma32(z, f32(2.443315711809948e-5), f32(-1.388731625493765e-3)), z,
               f32(4.166664568298827e-2))
    c = _fma32(c * z, z, -(z * f32(0.5))) + f32(1)
    s = _fma32(_fma32(z, f32(-1.9515295891e-4), f32(8.3321608736e-3)), z, f32(-1.6666654611e-1))
    s = _fma32(s * z, x, x)
    swap = (j & 2) != 0  # octants where sin uses the cosine polynomial
    sin, cos = np.where(swap, c, s), np.where(swap, s, c)
    sin = np.where((j & 4) != 0, -sin, sin)
    cos = np.where((~(j - 2) & 4) != 0, -cos, cos)
    return sin, cos


def _box_muller_avx2(u1, u2):
    """NormalFill16 AVX2: float32 radius and angle through the avx_mathfun approximations."""
    radius = np.sqrt(f32(-2) * _log256_ps(u1))
    sin, cos = _sincos256_ps(f32(2 * math.pi) * u2)
    return radius * cos, radius * sin


# --- "default": scalar NormalFill16 with std::log/cos/sin from glibc 2.28+ libm -----------------
# Used by torch's DEFAULT capability (ATEN_CPU_CAPABILITY=default, non-AVX2 x86, aarch64 Linux).
# Ports of glibc sysdeps/ieee754/flt-32/e_logf.c and s_sinf.c/s_cosf.c (ARM optimized-routines):
# they are not correctly rounded, so float64-then-round mismatches ~1.5% of values. glibc's FMA
# variants differ from these plain-double ports only below float32 resolution.
_LOGF_TAB = np.array([[float.fromhex(a), float.fromhex(b)] for a, b in [
    ("0x1.661ec79f8f3bep+0", "-0x1.57bf7808caadep-2"), ("0x1.571ed4aaf883dp+0", "-0x1.2bef0a7c06ddbp-2"),
    ("0x1.49539f0f010bp+0", "-0x1.01eae7f513a67p-2"), ("0x1.3c995b0b80385p+0", "-0x1.b31d8a68224e9p-3"),
    ("0x1.30d190c8864a5p+0", "-0x1.6574f0ac07758p-3"), ("0x1.25e227b0b8eap+0", "-0x1.1aa2bc79c81p-3"),
    ("0x1.1bb4a4a1a343fp+0", "-0x1.a4e76ce8c0e5ep-4"), ("0x1.12358f08ae5bap+0", "-0x1.1973c5a611cccp-4"),
    ("0x1.0953f419900a7p+0", "-0x1.252f438e10c1ep-5"), ("0x1p+0", "0x0p+0"),
    ("0x1.e608cfd9a47acp-1", "0x1.aa5aa5df25984p-5"), ("0x1.ca4b31f026aap-1", "0x1.c5e53aa362eb4p-4"),
    ("0x1.b2036576afce6p-1", "0x1.526e57720db08p-3"), ("0x1.9c2d163a1aa2dp-1", "0x1.bc2860d22477p-3"),
    ("0x1.886e6037841edp-1", "0x1.1058bc8a07ee1p-2"), ("0x1.767dcf5534862p-1", "0x1.4043057b6ee09p-2")]])
_LOGF_A = [float.fromhex(h) for h in ("-0x1.00ea348b88334p-2", "0x1.5575b0be00b6ap-2", "-0x1.ffffef20a4123p-2")]
_LN2 = float.fromhex("0x1.62e42fefa39efp-1")
_SINF_S = [float.fromhex(h) for h in ("-0x1.555545995a603p-3", "0x1.1107605230bc4p-7", "-0x1.994eb3774cf24p-13")]
_COSF_C = [float.fromhex(h) for h in ("0x1p0", "-0x1.ffffffd0c621cp-2", "0x1.55553e1068f19p-5",
                                      "-0x1.6c087e89a359dp-10", "0x1.99343027bf8c3p-16")]


def _glibc_logf(x):
    """Port of glibc logf for positive normal float32 x."""
    ix = x.view(np.uint32)
    tmp = ix - np.uint32(0x3F330000)
    i = (tmp >> 19) % 16
    k = tmp.view(np.int32) >> 23
    z = (ix - (tmp & np.uint32(0xFF800000))).view(f32).astype(f64)
    r = z * _LOGF_TAB[i, 0] - 1
    y0 = _LOGF_TAB[i, 1] + k * _LN2
    r2 = r * r
    y = _LOGF_A[0] * r2 + (_LOGF_A[1] * r + _LOGF_A[2])
    return (y * r2 + (y0 + r)).astype(f32)


def _glibc_sincosf(y):
    """Port of glibc sinf/cosf for float32 0 <= y < 120; returns (sin, cos)."""
    top12 = (y.view(np.uint32) >> 20) & 0x7FF
    x = y.astype(f64)
    n = ((x * float.fromhex("0x1.45F306DC9C883p+23")).astype(np.int32) + 0x800000) >> 24  # reduce_fast
    n = np.where(top12 < 0x3F4, 0, n)  # below abstop12(pi/4) no reduction
    x = x - n * float.fromhex("0x1.921FB54442D18p0")
    x2 = x * x
    xs = np.where((n & 3) % 3 == 0, x, -x)  # sign[n & 3] = {1, -1, -1, 1}
    x3 = xs * x2
    sin_poly = (xs + x3 * _SINF_S[0]) + (x3 * x2) * (_SINF_S[1] + x2 * _SINF_S[2])
    c0, c1, c2, c3, c4 = _COSF_C
    x4 = x2 * x2
    cos_poly = ((c0 + x2 * c1) + x4 * c2) + (x4 * x2) * (c3 + x2 * c4)
    cos_poly = np.where(n & 2, -cos_poly, cos_poly)  # the 2nd table negates the cosine polynomial
    odd = (n & 1) == 1
    sin = np.where(odd, cos_poly, sin_poly).astype(f32)
    cos = np.where(odd, sin_poly, cos_poly).astype(f32)
    tiny = top12 < 0x398  # |y| < 2**-12: sinf returns y, cosf returns 1
    return np.where(tiny, y, sin), np.where(tiny, f32(1), cos)


def _box_muller_default(u1, u2):
    """Scalar NormalFill16: float32 libm log/sin/cos, angle formed in double then stored as float."""
    radius = np.sqrt(f32(-2) * _glibc_logf(u1))
    sin, cos = _glibc_sincosf((2.0 * math.pi * u2.astype(f64)).astype(f32))
    return radius * cos, radius * sin


_BOX_MULLER = {"avx2": _box_muller_avx2, "default": _box_muller_default}


class TorchCPUGenerator:
    """numpy stand-in for torch.Generator("cpu").manual_seed(seed) feeding float32 torch.randn."""

    def __init__(self, seed: int, *, kernel: str = "avx2"):
        # kernel names torch's normal_fill build that the reference ran: "avx2" on x86-64 with
        # AVX2 or AVX512 (torch's usual dispatch), "default" for its scalar build on glibc.
        if kernel not in _BOX_MULLER:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.seed, self.kernel = seed, kernel
        # RandomState(key) runs init_genrand(key), the same as torch's init_with_uint32(seed).
        _, key, pos, *_ = np.random.RandomState(engine_seed(seed)).get_state()
        self._mt = np.random.MT19937()
        self._mt.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": pos}}
        self._next_normal = None  # CPUGeneratorImpl::next_double_normal_sample_, reset by manual_seed

    def randn(self, shape) -> np.ndarray:
        """Return the float32 array torch.randn(shape, generator=g) would, advancing the state."""
        shape = (shape,) if isinstance(shape, numbers.Integral) else tuple(shape)
        n = math.prod(shape)
        if n >= _BLOCK:  # normal_kernel takes normal_fill for contiguous tensors of >= 16 values
            out = self._normal_fill(n)
        else:  # otherwise one normal_distribution<double> per value, cast to float
            out = np.array([self._normal_double() for _ in range(n)], f64).astype(f32)
        return out.reshape(shape)

    def _uniform_f32(self, n):
        # uniform_real<float>: (random() & (2**24 - 1)) * 2**-24, exact in float32
        return (self._mt.random_raw(n) & 0xFFFFFF).astype(f32) * f32(2.0**-24)

    def _uniform_f64(self):
        # uniform_real<double> on random64() = first draw << 32 | second draw, 53 low bits kept
        hi, lo = (int(v) for v in self._mt.random_raw(2))
        return ((hi << 32 | lo) & (2**53 - 1)) * 2.0**-53

    def _normal_fill(self, n):
        u = self._uniform_f32(n)
        if n % _BLOCK:  # the last 16 slots are redrawn and transformed again (normal_fill)
            u = np.concatenate([u[: n - n % _BLOCK], self._uniform_f32(_BLOCK)])
        blocks = u.reshape(-1, _BLOCK)
        half = _BLOCK // 2
        cos, sin = _BOX_MULLER[self.kernel](f32(1) - blocks[:, :half], blocks[:, half:])
        out = np.concatenate([cos, sin], axis=1).reshape(-1)  # u1 = 1 - u maps [0, 1) to (0, 1]
        if n % _BLOCK:
            return np.concatenate([out[: n - _BLOCK], out[-_BLOCK:]])
        return out

    def _normal_double(self):
        # normal_distribution<double>: Box-Muller pair, the sine half cached for the next call
        if self._next_normal is not None:
            value, self._next_normal = self._next_normal, None
            return value
        u1, u2 = self._uniform_f64(), self._uniform_f64()
        radius = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._next_normal = radius * math.sin(theta)
        return radius * math.cos(theta)
