"""Synthetic captioned shapes (one coloured shape on a plain background) and a pixel-statistics classifier."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # draw at 4x and box-downsample: anti-aliased edges like a real photo's

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 215, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")

COLOUR_JITTER = 12  # per-channel +-jitter on each drawn colour, so colours are not a single RGB value
SIZE_RANGE = (0.30, 0.55)  # shape side / diameter as a fraction of the image side
# Classifier: a pixel belongs to the shape when its RGB distance from the background colour exceeds this.
# The closest palette pair (red/black, green/black, ...) is ~170 apart, so 80 sits far from both.
MASK_DISTANCE = 80.0
MIN_SHAPE_PIXELS = 20  # fewer mask pixels than this: no shape found


@dataclass(frozen=True)
class Label:
    """What one image shows."""

    colour: str
    shape: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def all_labels() -> list[Label]:
    """Every (colour, shape, background) combination with distinct colours, in a fixed order."""
    return [
        Label(c, s, b) for s in SHAPES for c in COLOURS for b in COLOURS if b != c
    ]


def _jittered(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, ...]:
    noise = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    return tuple(int(v) for v in np.clip(np.array(rgb) + noise, 0, 255))


def _shape_polygon(shape: str, box: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    if shape == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if shape == "triangle":  # apex up, base at the bottom: fills half its box
        return [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)]
    raise ValueError(f"expected square or triangle, got {shape!r}")


def render(label: Label, rng: np.random.Generator) -> np.ndarray:
    """Draw one HxWx3 uint8 image of `label` with jittered size, position and colours."""
    big = IMAGE_SIZE * SUPERSAMPLE
    side = rng.uniform(*SIZE_RANGE) * big
    x0, y0 = rng.uniform(0, big - side, size=2)
    box = (x0, y0, x0 + side, y0 + side)
    image = Image.new("RGB", (big, big), _jittered(PALETTE[label.background], rng))
    draw = ImageDraw.Draw(image)
    fill = _jittered(PALETTE[label.colour], rng)
    if label.shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon(_shape_polygon(label.shape, box), fill=fill)
    small = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8)


def make_dataset(n: int, seed: int) -> tuple[np.ndarray, list[Label]]:
    """`n` images (n x 64 x 64 x 3 uint8) and their labels; the same seed gives the same data."""
    rng = np.random.default_rng(seed)
    choices = all_labels()
    labels = [choices[i] for i in rng.integers(0, len(choices), size=n)]
    images = np.stack([render(label, rng) for label in labels])
    return images, labels


def _nearest_colour(rgb: np.ndarray) -> str:
    names = list(PALETTE)
    distances = [np.linalg.norm(rgb - np.array(PALETTE[name])) for name in names]
    return names[int(np.argmin(distances))]


def _template_masks(box: tuple[int, int, int, int], height: int, width: int) -> dict[str, np.ndarray]:
    """Ideal circle / square / triangle masks filling `box`, for template matching."""
    x0, y0, x1, y1 = box
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    inside = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    circle = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0
    half_width = rx * (ys - y0) / max(y1 - y0, 1)  # triangle apex up: width grows linearly downwards
    triangle = inside & (np.abs(xs - cx) <= half_width)
    return {"circle": circle, "square": inside, "triangle": triangle}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Box around the mask, ignoring the outermost 1% of its pixels on each side (stray specks)."""
    ys, xs = np.nonzero(mask)
    x0, x1 = np.percentile(xs, [1, 99])
    y0, y1 = np.percentile(ys, [1, 99])
    return int(x0), int(y0), int(x1) + 1, int(y1) + 1


def classify(image: np.ndarray) -> Label:
    """Read (shape colour, shape kind, background colour) from an HxWx3 uint8 image's pixels.

    Background: the median of the border pixels, snapped to the nearest palette colour.
    Shape mask: pixels farther than MASK_DISTANCE (RGB) from that median. Shape colour: the median
    of the mask's pixels, snapped to the palette. Kind: the ideal circle / square / apex-up triangle
    inscribed in the mask's bounding box with the highest IoU against the mask.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected HxWx3 uint8, got {image.shape} {image.dtype}")
    pixels = image.astype(np.float64)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    mask = np.linalg.norm(pixels - background, axis=2) > MASK_DISTANCE
    if mask.sum() < MIN_SHAPE_PIXELS:
        return Label("none", "none", _nearest_colour(background))
    colour = _nearest_colour(np.median(pixels[mask], axis=0))
    templates = _template_masks(_bounding_box(mask), *mask.shape)
    shape = max(SHAPES, key=lambda name: _iou(mask, templates[name]))
    return Label(colour, shape, _nearest_colour(background))
