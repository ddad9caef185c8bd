"""img2img and inpainting set-up: what the denoising loop starts from when there is an init image.

The loop itself does not know about init images or masks: it gets a `Start` (starting latents, extra UNet input
channels, a blend after every step) and runs the same sampler either way. The random draws follow diffusers'
StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline in order: the VAE's latent sample first
(latent_dist.sample(generator)), then the noise added to it, then (inpainting) the masked image's latent sample.
numpy + Pillow only.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from sdrt.bundle import Manifest
from sdrt.runtime.masks import MaskedBlend, downsample_nearest, unchanged
from sdrt.runtime.noise_levels import Schedule

NoiseFn = Callable[[tuple[int, ...]], np.ndarray]
# image [1, 3, H, W] in [-1, 1] -> scaled latents [B, C, h, w], sampled with one draw of `noise` per image.
Encoder = Callable[[np.ndarray], np.ndarray]
Blend = Callable[[np.ndarray, float, bool], np.ndarray]

# Input channels an inpainting UNet takes beyond the latents: the mask (1) and the masked image's latents (4), as
# SD 1.5 / 2 inpainting checkpoints (in_channels 9).
INPAINT_CHANNELS = 5
BACKGROUND = "white"  # A1111's img2img_background_color: transparent pixels of an init image become this


@dataclass(frozen=True)
class Start:
    """What the loop starts from besides the prompt.

    channels: conditioning concatenated after the c_in-scaled latents on the UNet's channel axis (inpainting
    UNets: mask and masked-image latents; depth2img would put its depth map here). feeds: further per-image UNet
    inputs (an upscaler's noise level as class_labels). blend(x, sigma, last): applied to the latents after each
    step; the sampler continues from its result.
    """

    latents: np.ndarray
    channels: np.ndarray | None = None
    feeds: dict[str, np.ndarray] = field(default_factory=dict)
    blend: Blend = unchanged

    def unet_channels(self) -> np.ndarray:
        """The extra channels, or an empty channel axis, so the UNet input is always one concatenation."""
        if self.channels is not None:
            return self.channels
        b, _, h, w = self.latents.shape
        return np.zeros((b, 0, h, w), np.float32)


def extra_unet_channels(manifest: Manifest) -> int:
    """UNet input channels beyond the latents (0 for an ordinary UNet, 5 for an inpainting one), from its contract."""
    sample = next(t for t in manifest.components["unet"].contract.inputs if t.name == "sample")
    return int(sample.shape[1]) - manifest.model.latent_channels


def rgb(image: Image.Image) -> Image.Image:
    """An init image as RGB: transparency flattened onto white (A1111's images.flatten), grey expanded."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND), rgba).convert("RGB")
    return image.convert("RGB")


def image_array(image: Image.Image) -> np.ndarray:
    """RGB image -> [1, 3, H, W] float32 in [-1, 1] (diffusers' VaeImageProcessor.preprocess: /255, 2x - 1)."""
    x = np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255)
    return (x * 2 - 1).transpose(2, 0, 1)[None]


def txt2img_start(noise: NoiseFn, shape: tuple[int, ...], schedule: Schedule) -> Start:
    """Pure noise at the schedule's first level (diffusers: randn * init_noise_sigma)."""
    return Start(noise(shape) * schedule.init_noise_sigma)


def img2img_start(encode: Encoder, image: np.ndarray, noise: NoiseFn, shape: tuple[int, ...],
                  schedule: Schedule) -> Start:
    """The init image's latents noised to the (strength-truncated) schedule's first level.

    diffusers' add_noise at timesteps[0] is, in VE space, init + sigma * noise for DDPM-style and k-diffusion-style
    schedulers alike.
    """
    init = encode(image)  # draws first: diffusers samples the latent distribution before drawing the noise
    return Start(init + schedule.sigmas[0] * noise(shape))


def inpaint_start(encode: Encoder, image: np.ndarray, mask: np.ndarray, noise: NoiseFn, shape: tuple[int, ...],
                  schedule: Schedule, full_strength: bool, conditioned: bool) -> Start:
    """StableDiffusionInpaintPipeline's start. conditioned: a 9-channel inpainting UNet, which takes the mask and
    the masked image's latents as input channels; otherwise an ordinary UNet, blended after every step.

    full_strength (strength 1): diffusers starts from pure noise and, for a 9-channel UNet, skips encoding the
    init image (so its generator draws one sample less).
    """
    batch, _, h, w = shape
    init = None if conditioned and full_strength else encode(image)
    n = noise(shape)
    x = n * schedule.init_noise_sigma if full_strength else init + schedule.sigmas[0] * n
    latent_mask = downsample_nearest(mask, h, w)
    if not conditioned:
        noise(shape)  # diffusers encodes the masked image even for a 4-channel UNet: its sample draws noise
        return Start(x, blend=MaskedBlend(init, n, latent_mask))
    masked = encode(image * (mask < 0.5))  # diffusers' masked_image = init_image * (mask_condition < 0.5)
    return Start(x, channels=np.concatenate([np.repeat(latent_mask, batch, axis=0), masked], axis=1))
