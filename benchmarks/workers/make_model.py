"""Write a diffusers folder with the Stable Diffusion 1.5 architecture and random weights (runs in a torch venv).

The configs are SD 1.5's own (runwayml/stable-diffusion-v1-5 as published: UNet 320/640/1280/1280 with 8 heads
and 768-wide cross-attention, CLIP ViT-L/14 text tower, VAE 128/256/512/512, PNDM). Compute cost does not
depend on the weight values, so speed and memory measured on this folder are those of the real model; the images
are noise, which still lets engines be compared with each other for the same seed.

Usage: python make_model.py OUT [--tiny] [--sample-size LATENT]
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from sdrt.export.clip_vocab import read_tokenizer_files
from sdrt.export.ldm_config import CLIP_L14_DIR

SEED = 0

UNET = dict(
    in_channels=4, out_channels=4, sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True,
    freq_shift=0, downsample_padding=1, mid_block_scale_factor=1, norm_eps=1e-5, center_input_sample=False,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, act_fn="silu", scaling_factor=0.18215,
)
# SD 1.5's scheduler/scheduler_config.json as published (clip_sample is a DDIM key PNDM ignores).
SCHEDULER = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}
# --tiny: the same block layout at toy widths, to exercise the harness in a minute (not for measurements).
TINY_UNET = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, cross_attention_dim=32,
                 attention_head_dim=2, sample_size=16)
TINY_VAE = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, sample_size=128)
TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.42.1",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SPECIAL_TOKENS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                  "pad_token": "<|endoftext|>"}


def configs(tiny: bool, sample_size: int | None) -> tuple[dict, dict, dict]:
    """UNet, VAE and CLIP text configs: SD 1.5's, or the tiny variant; `sample_size` sets the default latent size."""
    text = json.loads((CLIP_L14_DIR / "config.json").read_text())
    unet, vae = dict(UNET), dict(VAE)
    if tiny:
        unet.update(TINY_UNET)
        vae.update(TINY_VAE)
        text.update(TINY_TEXT)
    if sample_size:
        unet["sample_size"], vae["sample_size"] = sample_size, sample_size * 8
    return unet, vae, text


def save(out: Path, tiny: bool, sample_size: int | None) -> None:
    unet_config, vae_config, text_config = configs(tiny, sample_size)
    torch.manual_seed(SEED)
    with torch.no_grad():
        UNet2DConditionModel(**unet_config).save_pretrained(out / "unet")
        AutoencoderKL(**vae_config).save_pretrained(out / "vae")
        CLIPTextModel(CLIPTextConfig(**text_config)).save_pretrained(out / "text_encoder")
    _as_published_text_encoder(out / "text_encoder")
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    _save_tokenizer(out / "tokenizer")
    (out / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))


def _as_published_text_encoder(text_dir: Path) -> None:
    """SD 1.5's text encoder was saved by transformers 4.x (keys under text_model.): older tools read only that."""
    weights = text_dir / "model.safetensors"
    state = load_file(weights)
    if not any(k.startswith("text_model.") for k in state):
        save_file({f"text_model.{k}": v for k, v in state.items()}, weights, metadata={"format": "pt"})
    config = json.loads((text_dir / "config.json").read_text())
    config["transformers_version"] = "4.22.0.dev0"
    (text_dir / "config.json").write_text(json.dumps(config, indent=2))


def _save_tokenizer(tokenizer_dir: Path) -> None:
    """The real CLIP BPE files sdrt ships, in the layout SD 1.5 publishes (vocab.json + merges.txt)."""
    read_tokenizer_files(CLIP_L14_DIR, tokenizer_dir)  # vocab.json is rebuilt from the merges.txt sdrt ships
    shutil.copy(CLIP_L14_DIR / "tokenizer_config.json", tokenizer_dir / "tokenizer_config.json")
    (tokenizer_dir / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--sample-size", type=int, help="default latent size (image size / 8)")
    args = parser.parse_args()
    partial = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save(partial, args.tiny, args.sample_size)
    partial.rename(args.out)


if __name__ == "__main__":
    main()
