"""What a CompVis single file is, read from the file itself: its family (SD1 or SD2) and its prediction type."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open

from sdrt.errors import ExportError

log = logging.getLogger(__name__)

# The text encoder names the family: SD1's FrozenCLIPEmbedder wraps a transformers CLIPTextModel (OpenAI CLIP
# ViT-L/14), SD2's FrozenOpenCLIPEmbedder an open_clip model (ViT-H/14). SDXL keeps its two under `conditioner.`.
TEXT_ENCODER_KEYS = {
    "sd1": "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    "sd2": "cond_stage_model.model.token_embedding.weight",
}
SDXL_PREFIX = "conditioner.embedders."
UNET_PREFIX = "model.diffusion_model."
CROSS_ATTENTION_KEY_SUFFIX = ".attn2.to_k.weight"  # [inner dim, context dim] in every LDM SpatialTransformer

# ModelSpec (Stability's safetensors metadata standard, written by kohya sd-scripts and others): "epsilon" or "v".
METADATA_KEY = "modelspec.prediction_type"
METADATA_VALUES = {"epsilon": "epsilon", "eps": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}

# The forward-pass test. At the last training timestep the UNet's input is nearly pure noise:
# x_t = sqrt(abar) x0 + sqrt(1 - abar) eps with sqrt(abar) ~ 0.07 (SD's scaled_linear betas, t = 999). An epsilon
# model returns ~ x_t. A v model returns v = (sqrt(abar) x_t - E[x0 | x_t]) / sqrt(1 - abar), and at that
# signal-to-noise ratio E[x0 | x_t] ~ mean(x0) + sqrt(abar) Cov(x0) x_t, so v ~ -mean(x0) + sqrt(abar) (I - Cov(x0))
# x_t: the data mean, uncorrelated with a random input, plus a part along x_t of slope sqrt(abar) (1 - var(x0)) <= 0.07.
# The least-squares slope of output on input, <out, x> / <x, x>, is therefore ~1 for epsilon and <= ~0.1 for v,
# whatever the training data (tiny UNets trained for 200-600 steps in tests/test_sd2_slow.py: 0.92-1.00 and 0.09-0.24).
# A1111's is_using_v_parameterization_for_sd2 instead feeds a constant 0.5 and calls mean(out - x) < -1 v: that
# threshold depends on the mean of SD2's training latents (the tiny v model scores -0.72 and would read as epsilon).
PROBE_TIMESTEP = 999
PROBE_LATENT = 16  # latent height and width: SD's three downsamplings need a multiple of 8
PROBE_TOKENS = 2
PROBE_SEED = 0
EPSILON_MIN_SLOPE = 0.5


def detect_family(checkpoint: Mapping[str, torch.Tensor]) -> str:
    """"sd1" or "sd2" from the text encoder's keys; its width must be the width the UNet cross-attends to."""
    family = next((f for f, key in TEXT_ENCODER_KEYS.items() if key in checkpoint), None)
    if family is None:
        sdxl = any(k.startswith(SDXL_PREFIX) for k in checkpoint)
        what = "an SDXL-style checkpoint (conditioner.embedders.*)" if sdxl else "no SD1 or SD2 text encoder"
        looked_for = " or ".join(TEXT_ENCODER_KEYS.values())
        raise ExportError(f"cannot export this single file: {what} (looked for {looked_for})")
    width = checkpoint[TEXT_ENCODER_KEYS[family]].shape[1]
    context = unet_context_dim(checkpoint)
    if context is not None and context != width:
        raise ExportError(
            f"the UNet cross-attends to {context}-wide text but the {family} text encoder is {width} wide: "
            "the checkpoint mixes parts of different models"
        )
    return family


def unet_context_dim(checkpoint: Mapping[str, torch.Tensor]) -> int | None:
    """The text width the UNet's cross-attention takes (768 for SD1, 1024 for SD2), or None without cross-attention."""
    key = next((k for k in checkpoint if k.startswith(UNET_PREFIX) and k.endswith(CROSS_ATTENTION_KEY_SUFFIX)), None)
    return None if key is None else int(checkpoint[key].shape[1])


def prediction_from_metadata(path: Path) -> str | None:
    """The prediction type a .safetensors header declares (ModelSpec), or None."""
    if path.suffix.lower() != ".safetensors":
        return None
    try:
        with safe_open(str(path), "pt") as f:
            declared = (f.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError):
        return None
    if declared is not None and declared.lower() not in METADATA_VALUES:
        log.warning("%s: ignoring %s=%r (expected one of %s)", path.name, METADATA_KEY, declared, list(METADATA_VALUES))
    return METADATA_VALUES.get((declared or "").lower())


def prediction_from_forward_pass(unet: torch.nn.Module) -> tuple[str, float]:
    """("epsilon" | "v_prediction", slope): run the UNet once on pure noise at the last timestep (see above)."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    config = unet.config
    noise = torch.randn(1, config.in_channels, PROBE_LATENT, PROBE_LATENT, generator=generator)
    context = torch.zeros(1, PROBE_TOKENS, config.cross_attention_dim)
    with torch.no_grad():
        out = unet(noise, torch.tensor([PROBE_TIMESTEP]), context, return_dict=False)[0]
    slope = float((out * noise).sum() / (noise * noise).sum())
    return ("epsilon" if slope >= EPSILON_MIN_SLOPE else "v_prediction"), slope
