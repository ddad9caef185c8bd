"""Export wrappers: each `forward` is exactly one component's contract (sdrt.contracts), in the same order."""
from __future__ import annotations

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range before exp (autoencoders/vae.py).
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class TextEncoder(nn.Module):
    """inputs_embeds [batch, 77, hidden] -> hidden_states [batch, layers, 77, hidden]: each layer's output through the
    final layer norm (A1111 sd_hijack_clip.py encode_with_transformers, diffusers encode_prompt's clip_skip).

    transformers' CLIPTextModel.forward takes token ids only, so its steps are spelled out here (transformers 5,
    models/clip/modeling_clip.py): position embeddings added, the causal mask, the layers, the final layer norm.
    """

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        model = self.text_encoder
        hidden = model.embeddings(inputs_embeds=inputs_embeds)
        mask = create_causal_mask(config=model.config, inputs_embeds=hidden, attention_mask=None, cache=None)
        states = []
        for layer in model.encoder.layers:
            hidden = layer(hidden, mask, is_causal=True)
            states.append(model.final_layer_norm(hidden))
        return torch.stack(states, dim=1)

    def token_embedding(self) -> torch.Tensor:
        """The [vocab, hidden] table the runtime looks token ids up in."""
        return self.text_encoder.embeddings.token_embedding.weight


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
