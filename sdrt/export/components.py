"""The four exported components: wrapper module, contract, parity tolerance, and the inputs they are checked on."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sdrt.contracts import (
    BATCH,
    HEIGHT,
    LATENT_HEIGHT,
    LATENT_WIDTH,
    SEQUENCE,
    TOKEN_TABLE,
    WIDTH,
    Contract,
    text_encoder_contract,
    unet_contract,
    vae_decoder_contract,
    vae_encoder_contract,
)
from sdrt.export import wrappers
from sdrt.export.source import SourceModel

# Parity tolerances: max abs error of ONNX Runtime (CPU, fp32) against torch (fp32) on the same inputs.
# Both run fp32 kernels that differ in summation order only (~1e-7 relative per op); through 12 CLIP layers or the
# ~70 layers of the SD UNet, with activations of order 1, that grows to 1e-5..1e-4 at full size (measured on
# random full-size SD1 weights: see the slow test). 1e-3 keeps a 10x margin yet catches any real graph error (a
# wrong branch, a dropped op, a frozen shape), which is off by 0.1 or more. The VAE reduces over far larger
# feature maps (GroupNorm over 512 channels at up to 512x512 pixels): 2e-3.
TEXT_ENCODER_TOLERANCE = 1e-3
UNET_TOLERANCE = 1e-3
VAE_TOLERANCE = 2e-3

# Shapes checked after export as (batch, latent height, latent width, sequence); the first is also the trace shape.
# Batch 2 so no dynamic axis is 1 while tracing (size-1 axes invite broadcast shortcuts). Latent 9x12 is not a
# multiple of 8, so diffusers' UNet takes its size-following upsample path (`forward_upsample_size`), which is
# exact at every size; tracing at a multiple of 8 would freeze the plain 2x path, wrong for sizes like 9x12.
# 154 tokens: the UNet's sequence axis is dynamic for prompts longer than 77 tokens.
CHECK_SHAPES = ((2, 9, 12, 77), (1, 8, 8, 77), (3, 16, 10, 154))

TIMESTEP_RANGE = (0.0, 1000.0)
IMAGE_RANGE = (-1.0, 1.0)


@dataclass(frozen=True)
class ComponentSpec:
    """One component to export: the wrapper whose forward is the contract, and how parity is judged."""

    name: str
    module: nn.Module
    contract: Contract
    tolerance: float
    # Uniform ranges for inputs that need one (token ids, timesteps, images); the others are standard normal.
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    # Recorded in the manifest for components the runtime feeds from images (Component.preprocess).
    preprocess: dict = field(default_factory=dict)
    # Arrays written beside the graph for the runtime to build inputs from (Component.tables), read after any
    # weight rounding: name -> a function returning the tensor.
    tables: dict = field(default_factory=dict)


def component_specs(model: SourceModel) -> list[ComponentSpec]:
    """The text encoder, UNet, VAE decoder and VAE encoder of `model`, in export order."""
    text, unet = model.text_encoder.config, model.unet.config
    text_encoder = wrappers.TextEncoder(model.text_encoder)
    return [
        ComponentSpec(
            "text_encoder", text_encoder,
            text_encoder_contract(text.hidden_size, text.max_position_embeddings, layers=text.num_hidden_layers),
            TEXT_ENCODER_TOLERANCE, tables={TOKEN_TABLE: text_encoder.token_embedding},
        ),
        ComponentSpec(
            "unet", wrappers.UNet(model.unet),
            unet_contract(unet.in_channels, unet.out_channels, unet.cross_attention_dim),
            UNET_TOLERANCE, {"timestep": TIMESTEP_RANGE},
        ),
        *vae_specs(model.vae),
    ]


def vae_specs(vae: nn.Module) -> list[ComponentSpec]:
    """The VAE decoder and encoder of an AutoencoderKL."""
    channels = vae.config.latent_channels
    return [
        ComponentSpec("vae_decoder", wrappers.VaeDecoder(vae), vae_decoder_contract(channels), VAE_TOLERANCE),
        ComponentSpec("vae_encoder", wrappers.VaeEncoder(vae), vae_encoder_contract(channels), VAE_TOLERANCE,
                      {"image": IMAGE_RANGE}),
    ]


def axis_sizes(shape: tuple[int, int, int, int], vae_scale_factor: int) -> dict[str, int]:
    """Sizes of every named axis for one (batch, latent height, latent width, sequence) check shape."""
    batch, latent_h, latent_w, sequence = shape
    return {
        BATCH: batch, SEQUENCE: sequence, LATENT_HEIGHT: latent_h, LATENT_WIDTH: latent_w,
        HEIGHT: latent_h * vae_scale_factor, WIDTH: latent_w * vae_scale_factor,
    }


def sample_inputs(spec: ComponentSpec, dims: dict[str, int], generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random inputs in the contract's dtypes and shapes, drawn from `generator`."""
    return tuple(_sample(t.dtype, t.concrete_shape(dims), spec.ranges.get(t.name), generator)
                 for t in spec.contract.inputs)


def _sample(dtype: str, shape: tuple[int, ...], value_range, generator: torch.Generator) -> torch.Tensor:
    if dtype.startswith("int"):
        low, high = value_range
        return torch.randint(int(low), int(high), shape, generator=generator, dtype=getattr(torch, dtype))
    if value_range is None:
        return torch.randn(shape, generator=generator, dtype=getattr(torch, dtype))
    low, high = value_range
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=getattr(torch, dtype))
