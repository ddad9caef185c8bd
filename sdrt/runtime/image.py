"""Decoded tensors -> PIL images, and PNG files carrying A1111's "parameters" text chunk."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from sdrt.errors import RequestError


def to_pil(decoded: np.ndarray) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> RGB images, rounded as diffusers' numpy_to_pil does."""
    x = np.clip(decoded / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    return [Image.fromarray(a) for a in (x * 255).round().astype(np.uint8)]


def _quote(value: object) -> str:
    # A1111 quotes values that would break its "key: value, key: value" line (modules/infotext_utils.py).
    text = str(value)
    return '"' + text.replace('"', '\\"') + '"' if any(c in text for c in ',:"\n') else text


def infotext(prompt: str, negative_prompt: str, fields: dict[str, object]) -> str:
    """The A1111 "parameters" text: prompt, optional negative prompt line, then `key: value` pairs."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None and v != ""))
    return "\n".join(lines)


def load_image(path: Path, what: str) -> Image.Image:
    """The image at `path`, fully read; unreadable files are one-line RequestErrors naming `what`."""
    from PIL import UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, UnidentifiedImageError) as e:
        raise RequestError(f"cannot read the {what} {path}: {getattr(e, 'strerror', None) or e}") from None


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


def save_png(image: Image.Image, path: Path, parameters: str) -> Path:
    """Write a PNG with the A1111 "parameters" chunk (tEXt, or iTXt when the text is not Latin-1)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    try:
        image.save(path, pnginfo=info)
    except OSError as e:
        raise RequestError(f"cannot write {path}: {e.strerror or e}") from None
    return Path(path)


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
