"""Inpainting masks: diffusers' mask preprocessing, the 4-channel blend, and A1111's mask blur and "only masked" area.

White (255) marks what to repaint. The pixel mask is binarized at 0.5 and downsampled to the latents as diffusers'
StableDiffusionInpaintPipeline does; mask blur and the "only masked" crop and paste-back follow AUTOMATIC1111's
modules/processing.py and modules/masking.py. numpy + Pillow only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

BINARIZE_AT = 0.5  # VaeImageProcessor(do_binarize=True): values >= 0.5 become 1, the rest 0
RESAMPLE = Image.LANCZOS  # A1111's resize_image without an upscaler


def mask_array(mask: Image.Image) -> np.ndarray:
    """An L image -> [1, 1, H, W] float32 of 0 and 1 (VaeImageProcessor.preprocess for masks: /255, binarize)."""
    m = np.asarray(mask.convert("L"), dtype=np.float32) / np.float32(255)
    return (m >= BINARIZE_AT).astype(np.float32)[None, None]


def downsample_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """torch.nn.functional.interpolate(mask, size=(height, width)) in its default 'nearest' mode.

    torch picks source index floor(i * in / out), the scale in float32, clamped to the last row or column.
    """
    def index(n_in: int, n_out: int) -> np.ndarray:
        scale = np.float32(n_in) / np.float32(n_out)
        return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)

    return mask[:, :, index(mask.shape[2], height)][:, :, :, index(mask.shape[3], width)]


def blur(mask: Image.Image, radius: int) -> Image.Image:
    """A1111's "Mask blur": a Gaussian blur of `radius` pixels (0: the mask itself)."""
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius else mask


@dataclass(frozen=True)
class MaskedBlend:
    """Inpainting with an ordinary 4-channel UNet: after every step, the latents outside the mask are replaced by
    the init image's latents noised to the current level (diffusers' StableDiffusionInpaintPipeline,
    `latents = (1 - init_mask) * add_noise(image_latents, noise, t_next) + init_mask * latents`).

    In VE space add_noise is init + sigma * noise for every scheduler. After the last step diffusers blends the
    un-noised image latents; on sdrt's scale at the final level (0, or DDIM/PNDM's final alpha) that is
    init * sqrt(1 + sigma^2), which Step.vp_latents turns back into init.
    """

    init: np.ndarray  # [B, C, h, w] scaled image latents
    noise: np.ndarray  # [B, C, h, w] the noise the starting latents were made with
    mask: np.ndarray  # [1, 1, h, w] 1 = repaint

    def __call__(self, x: np.ndarray, sigma: float, last: bool) -> np.ndarray:
        known = self.init * math.sqrt(1.0 + sigma**2) if last else self.init + sigma * self.noise
        return (1 - self.mask) * known + self.mask * x


def unchanged(x: np.ndarray, sigma: float, last: bool) -> np.ndarray:
    """The blend of everything but 4-channel inpainting: the sampler's latents as they are."""
    return x


# ---- A1111's "Inpaint area: Only masked" ----

Box = tuple[int, int, int, int]  # left, top, right, bottom (exclusive), as PIL's crop takes it


def crop_region(mask: Image.Image, padding: int) -> Box | None:
    """The bounding box of the mask's non-zero pixels grown by `padding` and clipped to the image
    (A1111 masking.get_crop_region); None for an empty mask."""
    box = mask.convert("L").getbbox()
    if box is None:
        return None
    left, top, right, bottom = box
    return max(left - padding, 0), max(top - padding, 0), min(right + padding, mask.width), \
        min(bottom + padding, mask.height)


def expand_crop_region(box: Box, width: int, height: int, image_width: int, image_height: int) -> Box:
    """Grow `box` to the aspect ratio width:height, shifting it back inside the image (A1111 expand_crop_region)."""
    x1, y1, x2, y2 = box
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / (width / height) - (y2 - y1)), image_height)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * (width / height) - (x2 - x1)), image_width)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, extra: int, limit: int) -> tuple[int, int]:
    """Widen [lo, hi) by `extra`, half on each side, then slide it inside [0, limit)."""
    lo, hi = lo - extra // 2, hi + extra - extra // 2
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


@dataclass(frozen=True)
class InpaintArea:
    """Where an img2img / inpaint request generates: the images it feeds the loop (request size) and how the
    result goes back into the original. region None: the whole image; else A1111's "only masked" crop."""

    image: Image.Image  # the init image at the request size
    mask: Image.Image | None  # the mask at the request size (blurred when mask_blur > 0)
    original: Image.Image
    overlay: Image.Image | None  # the blurred mask at the original size; None: the output is used as generated
    region: Box | None = None

    def paste(self, generated: Image.Image) -> Image.Image:
        """The output image: the generation, resized into its region, seen through the blurred mask over the
        original (A1111's apply_overlay); the generation itself where there is no overlay."""
        if self.overlay is None:
            return generated
        canvas = self.original.copy()
        x1, y1, x2, y2 = self.region or (0, 0, *self.original.size)
        canvas.paste(generated.resize((x2 - x1, y2 - y1), RESAMPLE), (x1, y1))
        return Image.composite(canvas, self.original, self.overlay)


def inpaint_area(
    image: Image.Image, mask: Image.Image | None, width: int, height: int, mask_blur: int = 0,
    only_masked: bool = False, padding: int = 0,
) -> InpaintArea:
    """The area of a resolved request. The original shows through (the overlay) where a blurred mask or the
    "only masked" crop is used; with neither, the output is diffusers' (the VAE's reconstruction everywhere)."""
    if mask is None:
        return InpaintArea(image, None, image, None)
    blurred = blur(mask, mask_blur)
    overlay = blurred if mask_blur or only_masked else None
    if not only_masked:
        return InpaintArea(image, blurred, image, overlay)
    region = crop_region(blurred, padding) or (0, 0, *image.size)  # nothing to repaint: the whole image
    region = expand_crop_region(region, width, height, image.width, image.height)
    crop = image.crop(region).resize((width, height), RESAMPLE)
    return InpaintArea(crop, blurred.crop(region).resize((width, height), RESAMPLE), image, overlay, region)
