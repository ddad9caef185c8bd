"""PSNR (dB) and largest pixel difference of images against a reference image.

Usage: python psnr.py REFERENCE IMAGE... -> one JSON line {image: {"psnr_db": x, "max_pixel_difference": n}}
(psnr_db null: identical images).
"""
from __future__ import annotations

import json
import math
import sys

from PIL import Image

from sdrt.runtime.image import max_pixel_difference, psnr


def main() -> None:
    reference = Image.open(sys.argv[1]).convert("RGB")
    result = {}
    for path in sys.argv[2:]:
        image = Image.open(path).convert("RGB")
        value = psnr(reference, image)
        result[path] = {"psnr_db": value if math.isfinite(value) else None,
                        "max_pixel_difference": max_pixel_difference(reference, image)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
