"""The scaled-down SD architecture of sdrt-shapes (CLIP text encoder, UNet2DConditionModel, AutoencoderKL f=8) and its diffusers folder."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdrt.export.clip_vocab import write_clip_vocab_from_bpe

LATENT_SIZE = 8  # 64 px images / f=8
TOKENIZER_MAX_LENGTH = 77  # CLIP's context length, as SD 1.x


@dataclass(frozen=True)
class SmallSD:
    """Widths and depths of the three models; everything else is SD 1.x's."""

    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 128
    vae_channels: tuple[int, ...] = (16, 32, 64, 64)  # 4 blocks = 3 downsamples = f8
    vae_norm_groups: int = 16
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_head_dim: int = 8
    unet_norm_groups: int = 32


# SD 1.5's scheduler_config.json (runwayml/stable-diffusion-v1-5), minus keys PNDM does not take.
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)


def text_encoder(arch: SmallSD) -> CLIPTextModel:
    """A small CLIP text transformer over the full CLIP vocabulary (49408 tokens), so the real tokenizer works."""
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=arch.text_hidden,
        intermediate_size=arch.text_intermediate,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


def vae(arch: SmallSD) -> AutoencoderKL:
    """A small AutoencoderKL with SD's f=8 and 4 latent channels."""
    blocks = len(arch.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=arch.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=arch.vae_norm_groups,
        sample_size=LATENT_SIZE * 2 ** (blocks - 1),
    )


def unet(arch: SmallSD) -> UNet2DConditionModel:
    """A small UNet2DConditionModel: cross-attention at every level but the lowest."""
    levels = len(arch.unet_channels)
    down = ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=arch.unet_channels,
        layers_per_block=1,
        cross_attention_dim=arch.text_hidden,
        attention_head_dim=arch.unet_head_dim,
        norm_num_groups=arch.unet_norm_groups,
    )


def scheduler() -> DPMSolverMultistepScheduler:
    """SD 1.5's DDPM training schedule (scaled_linear 0.00085..0.012, 1000 steps) with the sampler this model
    is shipped for: DPM++ 2M gives it clean shapes at 25 steps where PNDM leaves it noisy (see README)."""
    return DPMSolverMultistepScheduler.from_config(PNDMScheduler(**SD15_SCHEDULER).config)


def open_clip_bpe_path() -> Path:
    """OpenAI's CLIP BPE file, shipped inside the open_clip package (found without importing it: it needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("open_clip is not installed: it carries bpe_simple_vocab_16e6.txt.gz")
    return Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"


def write_tokenizer(out_dir: Path) -> None:
    """The real CLIP tokenizer as vocab.json + merges.txt + tokenizer_config.json (SD 1.x's settings)."""
    write_clip_vocab_from_bpe(open_clip_bpe_path(), out_dir)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": TOKENIZER_MAX_LENGTH,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_tokenizer(tokenizer_dir: Path) -> CLIPTokenizer:
    """The tokenizer written by `write_tokenizer`."""
    return CLIPTokenizer.from_pretrained(tokenizer_dir)


def save_pipeline(
    out: Path, text: CLIPTextModel, autoencoder: AutoencoderKL, denoiser: UNet2DConditionModel
) -> None:
    """Write a diffusers folder that `StableDiffusionPipeline.from_pretrained(out)` loads."""
    out = Path(out)
    write_tokenizer(out / "tokenizer")
    pipe = StableDiffusionPipeline(
        vae=autoencoder,
        text_encoder=text,
        tokenizer=load_tokenizer(out / "tokenizer"),
        unet=denoiser,
        scheduler=scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # save_pretrained re-serialises the tokenizer as tokenizer.json (2 MB); vocab.json + merges.txt,
    # the files of the SD 1.x repositories, already describe it.
    write_tokenizer(out / "tokenizer")
    (out / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
