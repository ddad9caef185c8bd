"""The invisible watermark of the Stable Diffusion reference scripts, in numpy (no OpenCV, PyWavelets or torch).

The reference is invisible-watermark 0.2.0 (`imwatermark/watermark.py`, `imwatermark/maxDct.py`), called by
CompVis/stable-diffusion and Stability-AI/stablediffusion `scripts/txt2img.py` as
`WatermarkEncoder().set_watermark('bytes', payload)` then `encode(bgr, 'dwtDct')`. Its 'dwtDct' method
(class EmbedMaxDct) does, and this file reproduces step by step:
  - BGR -> YUV with OpenCV's 8-bit fixed-point conversion (cv2.COLOR_BGR2YUV);
  - for channel in range(2) with scales [0, 36, 36]: Y has scale 0 and is skipped, V (index 2) is never
    reached, so only U carries the mark;
  - one-level Haar DWT (pywt.dwt2) of U cropped to a multiple of 4; in every 4x4 block of the approximation
    band, despite the name no DCT is taken: the largest-magnitude coefficient other than the block's first is
    quantised to the middle of the lower (bit 0) or upper (bit 1) half of its 36-wide bin, keeping its sign;
  - pywt.idwt2 with the horizontal and vertical detail bands swapped (the package passes (v1, h1, d1)):
    this transposes every 2x2 pixel block of U;
  - the float result is assigned into the uint8 YUV array: truncation toward zero (wrapping modulo 256 out of
    range, which cannot happen: 8-bit U spans 17..239 and a pixel moves by at most 0.75 * 36 / 2 = 13.5);
  - YUV -> BGR with OpenCV's fixed-point conversion (cv2.COLOR_YUV2BGR), saturating.
The arithmetic follows the same operations in the same order, so images come out identical to the package's.
"""

import logging

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_PAYLOAD = b"StableDiffusionV1"  # CompVis/stable-diffusion scripts/txt2img.py (SD 1.x)
SD2_PAYLOAD = b"SDV2"  # Stability-AI/stablediffusion scripts/txt2img.py (SD 2.x)
# WatermarkEncoder.encode raises RuntimeError when rows * cols < 256 * 256 (an area, not a side).
MIN_PIXELS = 256 * 256

SCALE = 36.0  # EmbedMaxDct(scales=[0, 36, 36]): the U channel's quantisation step
BLOCK = 4  # EmbedMaxDct(block=4)
U = 1  # the only channel index the package's `for channel in range(2)` embeds into

# OpenCV color_yuv.simd.hpp, 8-bit RGB2YCrCb_i / YCrCb2RGB_i in YUV order: 14-bit fixed point, BT.601.
YUV_SHIFT = 14
R2Y, G2Y, B2Y = 4899, 9617, 1868
B2U, R2V = 8061, 14369
U2B, U2G, V2G, V2R = 33292, -6472, -9519, 18678
HALF = 128

HAAR = 0.7071067811865476  # pywt.Wavelet('haar').dec_lo[0]


def watermark_payload(manifest) -> bytes:
    """The payload the model family's reference scripts embed: "SDV2" for SD 2.x, "StableDiffusionV1" otherwise."""
    return SD2_PAYLOAD if manifest.model.family == "sd2" else DEFAULT_PAYLOAD


def fits_watermark(size: tuple[int, int]) -> bool:
    """Whether an image of (width, height) is large enough for the package's encoder."""
    return size[0] * size[1] >= MIN_PIXELS


def embed_watermark(image: Image.Image, payload: bytes = DEFAULT_PAYLOAD) -> Image.Image:
    """Return `image` with `payload` embedded as invisible-watermark 'dwtDct' does, or `image` itself if too small."""
    if not payload:
        raise ValueError("expected a non-empty watermark payload, got b''")
    rgb = _rgb_array(image)
    if not fits_watermark(image.size):
        # The reference scripts would crash here (the package raises); a generator should not.
        logger.warning("image %dx%d is under %d pixels: not watermarked", *image.size, MIN_PIXELS)
        return image
    yuv = _rgb_to_yuv(rgb)
    rows, cols = _crop(yuv.shape)
    channel = yuv[:rows, :cols, U]
    ll, da, ad, dd = _dwt2(channel)
    _embed_bits(ll, np.unpackbits(np.frombuffer(payload, dtype=np.uint8)))
    # idwt2((ca1, (v1, h1, d1))): the package hands the bands back with h and v swapped.
    yuv[:rows, :cols, U] = _assign_uint8(_idwt2(ll, ad, da, dd))
    return Image.fromarray(_yuv_to_rgb(yuv))


def read_watermark(image: Image.Image, length_bits: int = len(DEFAULT_PAYLOAD) * 8) -> bytes:
    """Decode a `length_bits`-long 'dwtDct' watermark as WatermarkDecoder('bytes', length_bits) does."""
    if length_bits <= 0 or length_bits % 8:
        raise ValueError(f"expected a positive multiple of 8 bits, got {length_bits}")
    rgb = _rgb_array(image)
    if not fits_watermark(image.size):
        raise ValueError(f"expected an image of at least {MIN_PIXELS} pixels, got {image.size[0]}x{image.size[1]}")
    yuv = _rgb_to_yuv(rgb)
    rows, cols = _crop(yuv.shape)
    ll, _, _, _ = _dwt2(yuv[:rows, :cols, U])
    return np.packbits(_vote(_block_scores(ll), length_bits)).tobytes()


def _rgb_array(image: Image.Image) -> np.ndarray:
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode!r}")
    return np.asarray(image, dtype=np.uint8)


def _crop(shape: tuple[int, ...]) -> tuple[int, int]:
    # yuv[:row//4*4, :col//4*4]: the DWT and the 4x4 blocks need a multiple of 4; the rest of U is left as is.
    return shape[0] // 4 * 4, shape[1] // 4 * 4


def _descale(x: np.ndarray) -> np.ndarray:
    # CV_DESCALE(x, n) = (x + (1 << (n-1))) >> n, an arithmetic (floor) shift.
    return (x + (1 << (YUV_SHIFT - 1))) >> YUV_SHIFT


def _rgb_to_yuv(rgb: np.ndarray) -> np.ndarray:
    """cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV) for uint8, taking RGB (the scripts' RGB2BGR is a pure reorder)."""
    r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
    y = _descale(b * B2Y + g * G2Y + r * R2Y)
    u = _descale((b - y) * B2U + (HALF << YUV_SHIFT))
    v = _descale((r - y) * R2V + (HALF << YUV_SHIFT))
    return np.clip(np.stack([y, u, v], axis=-1), 0, 255).astype(np.uint8)


def _yuv_to_rgb(yuv: np.ndarray) -> np.ndarray:
    """cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR) for uint8, returning RGB."""
    y, u, v = (yuv[..., i].astype(np.int32) for i in range(3))
    b = y + _descale((u - HALF) * U2B)
    g = y + _descale((u - HALF) * U2G + (v - HALF) * V2G)
    r = y + _descale((v - HALF) * V2R)
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)


def _assign_uint8(x: np.ndarray) -> np.ndarray:
    """What `uint8_array[...] = float_array` stores: the C cast, truncation toward zero wrapped modulo 256."""
    return (np.trunc(x).astype(np.int64) & 0xFF).astype(np.uint8)


def _dwt_axis(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    # pywt's downsampling convolution for 'haar' on an even length: a = s*x0 + s*x1, d = s*x0 - s*x1.
    even = np.take(x, np.arange(0, x.shape[axis], 2), axis=axis) * HAAR
    odd = np.take(x, np.arange(1, x.shape[axis], 2), axis=axis) * HAAR
    return odd + even, even - odd


def _idwt_axis(a: np.ndarray, d: np.ndarray, axis: int) -> np.ndarray:
    # pywt's upsampling convolution for 'haar': x0 = s*a + s*d, x1 = s*a - s*d, interleaved along `axis`.
    sa, sd = a * HAAR, d * HAAR
    out = np.stack([sa + sd, sa - sd], axis=axis + 1)
    shape = list(a.shape)
    shape[axis] *= 2
    return out.reshape(shape)


def _dwt2(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """pywt.dwt2(x, 'haar') as (cA, cH, cV, cD): pywt.dwtn transforms axis 0, then axis 1."""
    lo, hi = _dwt_axis(x.astype(np.float64), 0)
    aa, ad = _dwt_axis(lo, 1)
    da, dd = _dwt_axis(hi, 1)
    return aa, da, ad, dd


def _idwt2(aa: np.ndarray, da: np.ndarray, ad: np.ndarray, dd: np.ndarray) -> np.ndarray:
    """pywt.idwt2((cA, (cH, cV, cD)), 'haar'): pywt.idwtn undoes axis 1 first, then axis 0."""
    return _idwt_axis(_idwt_axis(aa, ad, 1), _idwt_axis(da, dd, 1), 0)


def _blocks(ll: np.ndarray) -> np.ndarray:
    """The whole 4x4 blocks of `ll` in the package's raster order, as a (count, 16) copy."""
    nr, nc = ll.shape[0] // BLOCK, ll.shape[1] // BLOCK
    tiles = ll[: nr * BLOCK, : nc * BLOCK].reshape(nr, BLOCK, nc, BLOCK).swapaxes(1, 2)
    return tiles.reshape(nr * nc, BLOCK * BLOCK)


def _unblock(ll: np.ndarray, flat: np.ndarray) -> None:
    nr, nc = ll.shape[0] // BLOCK, ll.shape[1] // BLOCK
    tiles = flat.reshape(nr, nc, BLOCK, BLOCK).swapaxes(1, 2)
    ll[: nr * BLOCK, : nc * BLOCK] = tiles.reshape(nr * BLOCK, nc * BLOCK)


def _peak(flat: np.ndarray) -> np.ndarray:
    # maxDct.py: pos = np.argmax(abs(block.flatten()[1:])) + 1, the first maximum on ties.
    return np.argmax(np.abs(flat[:, 1:]), axis=1) + 1


def _embed_bits(ll: np.ndarray, bits: np.ndarray) -> None:
    """EmbedMaxDct.encode_frame / diffuse_dct_matrix, on all blocks at once; block k carries bit k % len."""
    flat = _blocks(ll)
    rows = np.arange(len(flat))
    pos = _peak(flat)
    val = flat[rows, pos]
    bit = bits[rows % len(bits)].astype(np.float64)
    level = (np.floor_divide(np.abs(val), SCALE) + 0.25 + 0.5 * bit) * SCALE
    flat[rows, pos] = np.where(val >= 0.0, level, -1.0 * level)
    _unblock(ll, flat)


def _block_scores(ll: np.ndarray) -> np.ndarray:
    """EmbedMaxDct.infer_dct_matrix per block: 1 where |peak| sits in the upper half of its bin."""
    flat = _blocks(ll)
    val = np.abs(flat[np.arange(len(flat)), _peak(flat)])
    return (np.remainder(val, SCALE) > 0.5 * SCALE).astype(np.int64)


def _vote(scores: np.ndarray, length_bits: int) -> np.ndarray:
    """EmbedMaxDct.decode: mean score per bit index, then `mean * 255 > 127`; a bit no block carries reads 0."""
    index = np.arange(len(scores)) % length_bits
    ones = np.bincount(index, weights=scores, minlength=length_bits)
    count = np.bincount(index, minlength=length_bits)
    with np.errstate(invalid="ignore"):
        mean = ones / count
    return (mean * 255 > 127).astype(np.uint8)
