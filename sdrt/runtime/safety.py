"""The safety checker at run time: CLIP preprocessing in numpy + Pillow, the exported classifier, black images.

Reproduces diffusers' `StableDiffusionPipeline.run_safety_checker`: transformers' CLIPImageProcessor (its PIL
backend, `image_processing_backends.PilBackend`) turns the decoded PIL images into `clip_input`, the exported
StableDiffusionSafetyChecker flags them (sdrt.export.safety), and flagged images are replaced by black ones.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from sdrt.backends.base import Session
from sdrt.bundle import Component
from sdrt.errors import BundleError

log = logging.getLogger(__name__)

# CLIPImageProcessor's defaults (transformers image_utils.OPENAI_CLIP_MEAN / OPENAI_CLIP_STD, bicubic resampling).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = int(Image.Resampling.BICUBIC)
CLIP_SIZE = 224
WHITE = (255, 255, 255, 255)  # transformers' convert_to_rgb composites transparency onto white


def _shortest_edge(size: int = CLIP_SIZE) -> dict[str, int]:
    return {"shortest_edge": size}


def _square(size: int = CLIP_SIZE) -> dict[str, int]:
    return {"height": size, "width": size}


@dataclass(frozen=True)
class ClipPreprocess:
    """CLIPImageProcessor's parameters as a bundle records them (its defaults here); called on PIL images.

    `size` is {"shortest_edge": n} (resize keeping the aspect ratio) or {"height", "width"}; `crop_size` is
    {"height", "width"}. Images -> float32 NCHW, exactly as transformers computes it (same PIL resize, same dtypes).
    """

    size: dict = field(default_factory=_shortest_edge)
    crop_size: dict = field(default_factory=_square)
    resample: int = BICUBIC
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_convert_rgb: bool = True
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    def __post_init__(self):
        if self.do_resize and set(self.size) not in ({"shortest_edge"}, {"height", "width"}):
            raise BundleError(f"preprocess size: expected shortest_edge or height and width, got {self.size}")
        if self.do_center_crop and set(self.crop_size) != {"height", "width"}:
            raise BundleError(f"preprocess crop_size: expected height and width, got {self.crop_size}")

    @classmethod
    def for_size(cls, size: int) -> ClipPreprocess:
        """CLIPImageProcessor's defaults at another input size (bundles written before the record existed)."""
        return cls(size=_shortest_edge(size), crop_size=_square(size))

    @classmethod
    def from_dict(cls, d: Mapping) -> ClipPreprocess:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise BundleError(f"preprocess: unknown parameters {sorted(unknown)}")
        tuples = {k: tuple(float(x) for x in d[k]) for k in ("image_mean", "image_std") if k in d}
        return cls(**{**d, **tuples})

    def to_dict(self) -> dict:
        return {**asdict(self), "image_mean": list(self.image_mean), "image_std": list(self.image_std)}

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        """PIL images -> pixel values [n, 3, H, W] float32 (CLIPImageProcessor's `pixel_values`)."""
        return np.stack([self._one(image) for image in images])

    def _one(self, image: Image.Image) -> np.ndarray:
        if self.do_convert_rgb:
            image = to_rgb(image)
        if self.do_resize:
            height, width = self.resize_shape(image.height, image.width)
            image = image.resize((width, height), resample=self.resample)
        pixels = np.asarray(image)
        pixels = pixels[..., None] if pixels.ndim == 2 else pixels  # HWC, as transformers' channel-first view
        if self.do_center_crop:
            pixels = center_crop(pixels, self.crop_size["height"], self.crop_size["width"])
        if self.do_rescale:  # transformers' rescale: float64 product, then float32
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:  # transformers' normalize: float32 mean and std, per channel
            pixels = pixels.astype(np.float32, copy=False)
            mean, std = np.array(self.image_mean, np.float32), np.array(self.image_std, np.float32)
            pixels = (pixels - mean) / std
        return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)

    def resize_shape(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize: transformers' get_resize_output_image_size, default_to_square=False."""
        if "shortest_edge" not in self.size:
            return self.size["height"], self.size["width"]
        short, long = min(height, width), max(height, width)
        new_short, new_long = self.size["shortest_edge"], int(self.size["shortest_edge"] * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (transformers' image_transforms.convert_to_rgb)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        background = Image.new("RGBA", image.size, WHITE)
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centred (height, width) window of HWC pixels; a smaller image is first zero-padded, centred with the
    extra pixel at the top/left as transformers' image_transforms.center_crop does (ceil of half the padding)."""
    h, w = pixels.shape[:2]
    padded_h, padded_w = max(height, h), max(width, w)
    if (padded_h, padded_w) != (h, w):
        padded = np.zeros((padded_h, padded_w, pixels.shape[2]), pixels.dtype)
        top, left = -(-(padded_h - h) // 2), -(-(padded_w - w) // 2)
        padded[top:top + h, left:left + w] = pixels
        pixels = padded
    top, left = (padded_h - height) // 2, (padded_w - width) // 2
    return pixels[top:top + height, left:left + width]


class SafetyChecker:
    """The bundle's `safety_checker` on one session: PIL images -> one NSFW flag per image."""

    def __init__(self, session: Session, preprocess: ClipPreprocess):
        self.session, self.preprocess = session, preprocess

    @classmethod
    def from_pipeline_session(cls, session: Session, component: Component) -> SafetyChecker:
        """From `Pipeline.session("safety_checker")` and its manifest entry; a bundle without the preprocessing
        record gets CLIPImageProcessor's defaults at the contract's input size (as SD's feature_extractor)."""
        if component.preprocess:
            return cls(session, ClipPreprocess.from_dict(component.preprocess))
        return cls(session, ClipPreprocess.for_size(int(component.contract.inputs[0].shape[-1])))

    def scores(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        """All outputs: concept_scores and special_scores (cosine minus threshold) and has_nsfw_concept per image."""
        feeds = {"clip_input": self.preprocess(images)}
        self.session.prepare(self.session.contract.check_inputs(feeds))
        return self.session.run(feeds)

    def check(self, images: Sequence[Image.Image]) -> list[bool]:
        """True for each image diffusers' safety checker would flag (and black out)."""
        flags = [bool(f) for f in self.scores(images)["has_nsfw_concept"]]
        if any(flags):
            log.info("safety checker: %d of %d images flagged", sum(flags), len(flags))
        return flags


def blacken(images: Sequence[Image.Image], flags: Sequence[bool]) -> list[Image.Image]:
    """Flagged images replaced by black images of the same size and mode (diffusers' safety checker zeroes them)."""
    if len(images) != len(flags):
        raise ValueError(f"blacken: expected one flag per image ({len(images)}), got {len(flags)}")
    return [Image.new(image.mode, image.size) if flag else image for image, flag in zip(images, flags)]
