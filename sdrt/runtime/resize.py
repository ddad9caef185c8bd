"""Init images and masks of another size than the request, resized as AUTOMATIC1111's img2img does
(modules/images.py `resize_image`, its "Resize mode" without an upscaler: Lanczos)."""
from __future__ import annotations

from PIL import Image

# A1111's resize modes by name, in the order of its img2img radio buttons (the API sends their index).
RESIZE_MODES = ("just resize", "crop and resize", "resize and fill")
RESAMPLE = Image.LANCZOS


def resize_mode_name(mode: str | int) -> str:
    """A1111's mode as a name: its index (0-2) or its label, case-insensitively."""
    if isinstance(mode, int) and not isinstance(mode, bool) and 0 <= mode < len(RESIZE_MODES):
        return RESIZE_MODES[mode]
    if isinstance(mode, str) and mode.strip().lower() in RESIZE_MODES:
        return mode.strip().lower()
    raise ValueError(f"resize mode must be one of {', '.join(repr(m) for m in RESIZE_MODES)} (or 0-2), got {mode!r}")


def resize(image: Image.Image, mode: str, width: int, height: int) -> Image.Image:
    """`image` at width x height: stretched ("just resize"), scaled to cover and centre-cropped ("crop and
    resize"), or scaled to fit, centred, with the borders filled by its stretched edges ("resize and fill")."""
    if image.size == (width, height):
        return image
    if mode == "just resize":
        return image.resize((width, height), RESAMPLE)
    cover = mode == "crop and resize"
    ratio, src_ratio = width / height, image.width / image.height
    fit_width = ratio > src_ratio if cover else ratio < src_ratio  # cover a wider target, or fit a narrower one
    src_w = width if fit_width else image.width * height // image.height
    src_h = image.height * width // image.width if fit_width else height
    scaled = image.resize((src_w, src_h), RESAMPLE)
    out = Image.new(image.mode, (width, height))
    out.paste(scaled, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return out if cover or ratio == src_ratio else _fill_borders(out, scaled, width, height, fit_width)


def _fill_borders(out: Image.Image, scaled: Image.Image, width: int, height: int, rows: bool) -> Image.Image:
    """Stretch the scaled image's outer rows (or columns) over the empty borders, as A1111's mode 2."""
    src_w, src_h = scaled.size
    fill_h, fill_w = height // 2 - src_h // 2, width // 2 - src_w // 2
    if rows and fill_h > 0:
        out.paste(scaled.resize((width, fill_h), box=(0, 0, width, 0)), box=(0, 0))
        out.paste(scaled.resize((width, fill_h), box=(0, src_h, width, src_h)), box=(0, fill_h + src_h))
    elif not rows and fill_w > 0:
        out.paste(scaled.resize((fill_w, height), box=(0, 0, 0, height)), box=(0, 0))
        out.paste(scaled.resize((fill_w, height), box=(src_w, 0, src_w, height)), box=(fill_w + src_w, 0))
    return out


def rounded_size(image: Image.Image, multiple: int) -> tuple[int, int]:
    """The image's size rounded to the nearest multiple (half up): the request size when none is given."""
    return tuple(max(multiple, (side + multiple // 2) // multiple * multiple) for side in image.size)
