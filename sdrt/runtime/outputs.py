"""Image files as A1111 writes them: PNG, JPEG or WebP by extension with the generation parameters where A1111
stores them, written atomically, and auto-numbered names in an output folder that never overwrite an image.

A1111 (modules/images.py `save_image_with_geninfo`) puts the parameters in a PNG text chunk called "parameters",
and for JPEG and WebP in the EXIF UserComment tag, UTF-16 with the "UNICODE" prefix, as piexif's
`UserComment.dump(text, encoding="unicode")` writes it; A1111's PNG Info reads it back with piexif.
"""
from __future__ import annotations

import io
import os
import re
import struct
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin

from sdrt.errors import RequestError

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
QUALITY = 80  # A1111's default "Quality for saved jpeg and webp images" (opts.jpeg_quality)
USER_COMMENT, EXIF_IFD, UNDEFINED, LONG = 0x9286, 0x8769, 7, 4
UNICODE_PREFIX = b"UNICODE\0"  # EXIF 2.3 character code of a UserComment in UTF-16 (piexif writes it big-endian)
_NUMBERED = re.compile(r"(\d{5})-")


def format_of(path: Path) -> str:
    """The Pillow format an output path's extension asks for."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise RequestError(f"output must be a .png, .jpg or .webp file, got {Path(path).name}")
    return fmt


def user_comment_exif(text: str) -> bytes:
    """A minimal big-endian EXIF block (what Pillow's `exif=` takes) holding `text` as the UserComment tag."""
    comment = UNICODE_PREFIX + text.encode("utf-16-be")
    # TIFF header, IFD0 with one entry (pointer to the Exif IFD), the Exif IFD with one entry (UserComment).
    ifd0_at, exif_ifd_at = 8, 8 + 2 + 12 + 4
    data_at = exif_ifd_at + 2 + 12 + 4
    header = b"MM" + struct.pack(">HI", 42, ifd0_at)
    ifd0 = struct.pack(">HHHII", 1, EXIF_IFD, LONG, 1, exif_ifd_at) + struct.pack(">I", 0)
    exif_ifd = struct.pack(">HHHII", 1, USER_COMMENT, UNDEFINED, len(comment), data_at) + struct.pack(">I", 0)
    return b"Exif\0\0" + header + ifd0 + exif_ifd + comment


def encode(image: Image.Image, fmt: str, parameters: str) -> bytes:
    """The file's bytes with the parameters where A1111 keeps them."""
    buffer = io.BytesIO()
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)  # tEXt, or iTXt when the text is not Latin-1
        image.save(buffer, "PNG", pnginfo=info)
    else:
        image.convert("RGB").save(buffer, fmt, quality=QUALITY, exif=user_comment_exif(parameters))
    return buffer.getvalue()


def read_parameters(path: Path) -> str | None:
    """The parameters text of an image sdrt (or A1111) wrote: the PNG chunk, or the EXIF UserComment."""
    with Image.open(path) as image:
        if "parameters" in image.info:
            return image.info["parameters"]
        comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if isinstance(comment, bytes) and comment.startswith(UNICODE_PREFIX):
        return comment[len(UNICODE_PREFIX):].decode("utf-16-be")
    return None


def write_image(image: Image.Image, path: Path, parameters: str, *, exclusive: bool = False) -> Path:
    """Write atomically: a temporary file in the same folder renamed over `path`, so a full disk, a kill or an
    error leaves the previous file (if any) whole and no truncated image; a link at `path` is replaced, not
    written through. `exclusive`: fail with FileExistsError instead of replacing an existing file."""
    path = Path(path)
    data = encode(image, format_of(path), parameters)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)  # atomic, and refuses an existing name
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, FileExistsError):
            raise
        raise RequestError(f"cannot write {path}: {e.strerror or e}") from None
    return path


class OutputFolder:
    """A1111-style names in a folder, "NNNNN-SEED.png", numbered on from the highest number already there."""

    def __init__(self, folder: Path, extension: str = ".png"):
        self.folder, self.extension = Path(folder), extension
        format_of(Path("x" + extension))

    def _next_number(self) -> int:
        numbers = [int(m.group(1)) for p in self.folder.iterdir() if (m := _NUMBERED.match(p.name))]
        return max(numbers, default=-1) + 1

    def save(self, image: Image.Image, seed: int, parameters: str) -> Path:
        """Write under the next free number; a name taken meanwhile (another process) moves on to the next."""
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            path = self.folder / f"{self._next_number():05d}-{seed}{self.extension}"
            try:
                return write_image(image, path, parameters, exclusive=True)
            except FileExistsError:
                continue
