"""Export wrappers: each `forward` is exactly one component's contract (sdrt.contracts), in the same order."""
from __future__ import annotations

import torch
from torch import nn

# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range before exp (autoencoders/vae.py).
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class TextEncoder(nn.Module):
    """input_ids (int32 [batch, 77]) -> last_hidden_state [batch, 77, hidden]."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids.long(), return_dict=True).last_hidden_state


class UNet(nn.Module):
    """(sample, float32 timestep [batch], encoder_hidden_states) -> model_output, one denoiser evaluation."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeDecoder(nn.Module):
    """Latents already divided by the scale factor -> image in [-1, 1] (AutoencoderKL._decode without tiling)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv if vae.post_quant_conv is not None else nn.Identity()
        self.decoder = vae.decoder

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(latents))


class VaeEncoder(nn.Module):
    """Image in [-1, 1] -> mean and std of the latent Gaussian, as diffusers' DiagonalGaussianDistribution."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv if vae.quant_conv is not None else nn.Identity()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.quant_conv(self.encoder(image)).chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(LOGVAR_MIN, LOGVAR_MAX))
        return mean, std
