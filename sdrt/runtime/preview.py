"""Previews of latents mid-loop: the bundle's tiny decoder (TAESD) when it has one, else a linear latent -> RGB map."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from sdrt.backends import Session
from sdrt.runtime.image import to_pil

# SD 1.x/2.x VAE latents (on the UNet's scale) -> RGB in [-1, 1], rows L1..L4, columns R, G, B: Keturn's least-squares
# fit ("Decoding latents to RGB without upscaling", discuss.huggingface.co/t/23204), A1111's "Approx cheap" preview.
SD1_LATENT_RGB = np.array([
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
], np.float32)
FIT_SIZE = 16  # latent side of the random samples a projection is fitted on (128 px for an f=8 VAE)
FIT_SAMPLES = 4


@dataclass(frozen=True)
class LatentProjection:
    """A per-pixel affine map latents [B, C, h, w] -> RGB [B, 3, h, w] in [-1, 1], at latent resolution."""

    matrix: np.ndarray  # [C, 3]
    bias: np.ndarray  # [3]

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        rgb = np.einsum("bchw,cr->brhw", latents.astype(np.float32), self.matrix)
        return rgb + self.bias[None, :, None, None]

    @classmethod
    def fit(cls, latents: np.ndarray, images: np.ndarray) -> LatentProjection:
        """Least squares from latents [B, C, h, w] to the images they decode to [B, 3, f*h, f*w], pooled f x f."""
        b, c, h, w = latents.shape
        f = images.shape[2] // h
        pooled = images.reshape(b, 3, h, f, w, f).mean(axis=(3, 5))
        x = np.concatenate([latents.transpose(0, 2, 3, 1).reshape(-1, c), np.ones((b * h * w, 1))], axis=1)
        y = pooled.transpose(0, 2, 3, 1).reshape(-1, 3)
        solution, *_ = np.linalg.lstsq(x.astype(np.float64), y.astype(np.float64), rcond=None)
        return cls(solution[:c].astype(np.float32), solution[c].astype(np.float32))

    @classmethod
    def from_decoder(cls, decode: Callable[[np.ndarray], np.ndarray], channels: int, seed: int = 0) -> LatentProjection:
        """Fit on standard-normal UNet-scale latents and what `decode` (latents -> image in [-1, 1]) makes of them.

        For a VAE other than SD's (the shipped model's), where SD1_LATENT_RGB means nothing; one small decode.
        """
        latents = np.random.default_rng(seed).standard_normal((FIT_SAMPLES, channels, FIT_SIZE, FIT_SIZE))
        latents = latents.astype(np.float32)
        return cls.fit(latents, decode(latents))


SD1_PROJECTION = LatentProjection(SD1_LATENT_RGB, np.zeros(3, np.float32))


def linear_preview(latents: np.ndarray, projection: LatentProjection = SD1_PROJECTION) -> list[Image.Image]:
    """UNet-scale latents -> small RGB images (latent resolution), with no network at all."""
    return to_pil(projection(latents))


def tiny_decoder_preview(session: Session, latents: np.ndarray) -> list[Image.Image]:
    """UNet-scale latents -> full-size images through a prepared `taesd_decoder` session."""
    return to_pil(session.run({"latents": latents.astype(np.float32)})["image"])
