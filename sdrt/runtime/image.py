"""Images in and out: input files checked before decoding, decoded tensors -> PIL images, A1111's infotext, and
the checks on an output path (sdrt.runtime.outputs writes the files)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from sdrt.errors import RequestError, printable

# Input images (init image, mask) larger than this are refused from their header, before any pixel is decoded:
# 64 Mpixel (8192 x 8192) is far past SD's sizes, and its decoded RGB float copies still fit in memory. Pillow's
# own bomb guard (Image.MAX_IMAGE_PIXELS, 89 Mpixel) only warns below twice that.
MAX_INPUT_PIXELS = 8192 * 8192
# The formats input images may have: the common ones, each decoded by one well-worn Pillow plugin.
INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


def to_pil(decoded: np.ndarray) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> RGB images, rounded as diffusers' numpy_to_pil does."""
    x = np.clip(decoded / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    return [Image.fromarray(a) for a in (x * 255).round().astype(np.uint8)]


def _quote(value: object) -> str:
    # A1111's infotext_utils.quote: a value that would break its "key: value, key: value" line (a comma, colon or
    # newline) is written as a JSON string, which its parse_generation_parameters unquotes with json.loads.
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:\n') else text


def infotext(prompt: str, negative_prompt: str, fields: dict[str, object]) -> str:
    """The A1111 "parameters" text: prompt, optional negative prompt line, then `key: value` pairs."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None and v != ""))
    return "\n".join(lines)


def check_image_size(image: Image.Image, what: str) -> None:
    """Refuse an image over MAX_INPUT_PIXELS (its size is known from the header, before the pixels are decoded)."""
    w, h = image.size
    if w * h > MAX_INPUT_PIXELS:
        raise RequestError(f"the {what} is {w}x{h} pixels; at most {MAX_INPUT_PIXELS // 2**20} Mpixel are accepted")


def load_image(path: Path | str, what: str) -> Image.Image:
    """The image file at `path`, decoded only once its header shows a size within MAX_INPUT_PIXELS; an unreadable
    file, another format than INPUT_FORMATS or a decompression bomb is a one-line RequestError."""
    try:
        with Image.open(path, formats=INPUT_FORMATS) as image:
            check_image_size(image, what)
            image.load()
            return image
    except RequestError:
        raise
    except Image.DecompressionBombError:  # over twice Pillow's limit: refused by Pillow before our check
        raise RequestError(f"the {what} {printable(path)} is over {MAX_INPUT_PIXELS // 2**20} Mpixel") from None
    except UnidentifiedImageError:
        raise RequestError(f"cannot read the {what} {printable(path)}: not a {', '.join(INPUT_FORMATS)} "
                           "image") from None
    except (OSError, SyntaxError, ValueError) as e:  # Pillow reports broken files as any of these
        reason = printable(getattr(e, "strerror", None) or e)
        raise RequestError(f"cannot read the {what} {printable(path)}: {reason}") from None


def check_writable(path: Path) -> None:
    """Fail before any work when `path` cannot be written (missing folder, a directory, no permission)."""
    path = Path(path)
    if path.is_dir():
        raise RequestError(f"output path {path} is a folder; give a file name such as {path / 'out.png'}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise RequestError(f"cannot write {path}: folder {parent} does not exist")
    from sdrt.runtime.outputs import format_of

    format_of(path)
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise RequestError(f"cannot write {path}: permission denied")


def psnr(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    """Peak signal-to-noise ratio of two 8-bit images in dB (inf when identical): 10 log10(255^2 / MSE)."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def max_pixel_difference(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> int:
    """The largest absolute difference of two 8-bit images at any pixel and channel (0: identical)."""
    return int(np.max(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))))
