"""Images in and out of the API: base64 strings (A1111's decode_base64_to_image / encode_pil_to_base64 in
modules/api/api.py) checked before they are decoded, and PNG Info read back as A1111's parse_generation_parameters."""
from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image, UnidentifiedImageError

from sdrt.errors import RequestError
from sdrt.runtime.outputs import read_parameters

DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)
# modules/infotext_utils.py: one "key: value" pair of the last line, values optionally quoted.
PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")
MIN_PAIRS = 3  # A1111 reads the last line as parameters only when it holds at least three pairs


def decode_base64(data: str, what: str) -> bytes:
    """The bytes of a base64 string or data URL; A1111 fetches http(s) URLs, sdrt refuses them (no outbound
    requests from a server that strangers can reach)."""
    if not isinstance(data, str) or not data.strip():
        got = "nothing" if not data else type(data).__name__
        raise RequestError(f"{what}: expected a base64-encoded image, got {got}")
    if data.startswith(("http://", "https://")):
        raise RequestError(f"{what}: image URLs are not fetched by sdrt; send the image as base64")
    text = DATA_URL.sub("", data.strip(), count=1)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{what}: not valid base64") from None


def open_image(data: str, what: str, max_pixels: int) -> Image.Image:
    """A base64 image, its size checked from the header before any pixel is decoded (no decompression bombs)."""
    raw = decode_base64(data, what)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = _unreadable_as_request_error(what, lambda: Image.open(io.BytesIO(raw)))
        if image.width * image.height > max_pixels:
            raise RequestError(f"{what}: at most {max_pixels} pixels, got {image.width}x{image.height}")
        _unreadable_as_request_error(what, image.load)
    return image


def _unreadable_as_request_error(what: str, read):
    """read(), with Pillow's complaints about a file (truncated, unknown format, a bomb) as a RequestError."""
    try:
        return read()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise RequestError(f"{what}: not a readable image ({type(e).__name__}: {e})") from None


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def parameters_text(data: str) -> tuple[str, dict]:
    """(the parameters text, the image's other text items) of a base64 PNG, JPEG or WebP."""
    raw = decode_base64(data, "image")

    def read() -> tuple[str, dict]:
        with Image.open(io.BytesIO(raw)) as image:
            items = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
        return read_parameters(io.BytesIO(raw)) or "", items

    text, items = _unreadable_as_request_error("image", read)
    items.pop("parameters", None)
    return text, items


def parse_parameters(text: str) -> dict:
    """A1111's parse_generation_parameters, without the UI's fill-ins: "Prompt", "Negative prompt" and each
    "key: value" of the last line, sizes split into "KEY-1" and "KEY-2"."""
    *lines, last = text.strip().split("\n") if text.strip() else [""]
    if len(PARAM.findall(last)) < MIN_PAIRS:
        lines, last = [*lines, last], ""
    prompt, negative, in_negative = [], [], False
    for line in (line.strip() for line in lines):
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in PARAM.findall(last):
        value = _unquote(value)
        size = IMAGE_SIZE.match(value)
        if size:
            out[f"{key}-1"], out[f"{key}-2"] = size.groups()
        else:
            out[key] = value
    return out


def _unquote(value: str) -> str:
    """A quoted value as sdrt.runtime.image writes it (and A1111's json.dumps quoting)."""
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    return re.sub(r'\\(.)', r"\1", value[1:-1])
