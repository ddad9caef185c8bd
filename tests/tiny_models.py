"""Tiny random SD1 models for tests: diffusers folders in both transformers layouts, and CompVis single files.

One set of sizes (the constants below) feeds both the diffusers configs and the LDM yaml, so a single file written here converts
back to the very modules it came from. Weights are random but seeded: the same seed gives the same files.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdrt.export.ldm_config import CLIP_L14_DIR, V1_INFERENCE_YAML, scheduler_config

# Sizes shared by the diffusers configs and the LDM yaml. GroupNorm in LDM is always 32 groups: channels are
# multiples of 32. The VAE keeps SD's 4 levels (8 pixels per latent) so image sizes behave as in SD.
UNET_CHANNELS, UNET_MULT, UNET_LAYERS, UNET_HEADS, CONTEXT_DIM = 32, (1, 2), 2, 8, 32
VAE_CHANNELS, VAE_MULT, VAE_LAYERS, LATENT_CHANNELS = 32, (1, 1, 1, 1), 1, 4
# The real CLIP vocabulary (49408) so the real tokenizer files work. One head: what a single file's text config
# infers for this width (heads = max(1, hidden // 64), sdrt.export.ldm_config).
TEXT_SIZES = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=1)
SAMPLE_SIZE = 8  # latent size: default image size 64
SCALING_FACTOR = 0.18215

TEXT_PREFIX = "cond_stage_model.transformer.text_model."
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


def tiny_ldm_config() -> dict:
    """The SD v1 inference yaml with the tiny sizes."""
    config = yaml.safe_load(V1_INFERENCE_YAML.read_text())
    params = config["model"]["params"]
    params["unet_config"]["params"].update(
        model_channels=UNET_CHANNELS, channel_mult=list(UNET_MULT), attention_resolutions=[1],
        num_res_blocks=UNET_LAYERS, num_heads=UNET_HEADS, context_dim=CONTEXT_DIM,
    )
    params["first_stage_config"]["params"]["ddconfig"].update(
        ch=VAE_CHANNELS, ch_mult=list(VAE_MULT), num_res_blocks=VAE_LAYERS, z_channels=LATENT_CHANNELS,
    )
    return config


def build_tiny_sd1(seed: int = 0) -> tuple[CLIPTextModel, UNet2DConditionModel, AutoencoderKL]:
    """Random tiny text encoder, UNet and VAE (attention in the full-resolution level only, as LDM's [1])."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = json.loads((CLIP_L14_DIR / "config.json").read_text())
        text_encoder = CLIPTextModel(CLIPTextConfig(**{**base, **TEXT_SIZES}))
        unet = UNet2DConditionModel(
            sample_size=SAMPLE_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
            block_out_channels=tuple(UNET_CHANNELS * m for m in UNET_MULT), layers_per_block=UNET_LAYERS,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=CONTEXT_DIM, attention_head_dim=UNET_HEADS,
        )
        vae = AutoencoderKL(
            block_out_channels=tuple(VAE_CHANNELS * m for m in VAE_MULT), layers_per_block=VAE_LAYERS,
            down_block_types=("DownEncoderBlock2D",) * len(VAE_MULT),
            up_block_types=("UpDecoderBlock2D",) * len(VAE_MULT),
            latent_channels=LATENT_CHANNELS, sample_size=SAMPLE_SIZE * 8, scaling_factor=SCALING_FACTOR,
        )
    return text_encoder.eval(), unet.eval(), vae.eval()


# --- diffusers folders -------------------------------------------------------------------------------------------

def save_tiny_sd1(out: Path, layout: str = "transformers5", seed: int = 0) -> Path:
    """A diffusers folder as saved by transformers 5 (flat keys, tokenizer.json) or 4.x (text_model.*, vocab+merges)."""
    text_encoder, unet, vae = build_tiny_sd1(seed)
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet")
    vae.save_pretrained(out / "vae")
    text_encoder.save_pretrained(out / "text_encoder")
    config = {k: v for k, v in scheduler_config(tiny_ldm_config()).items() if not k.startswith("_")}
    PNDMScheduler.from_config(config).save_pretrained(out / "scheduler")
    if layout == "transformers5":
        _save_tokenizer_json(out / "tokenizer")
    elif layout == "transformers4":
        _save_vocab_merges(out / "tokenizer")
        _to_transformers4_text_encoder(out / "text_encoder")
    else:
        raise ValueError(f"unknown layout {layout!r}")
    (out / "model_index.json").write_text(json.dumps(_model_index(), indent=2))
    return out


def _model_index() -> dict:
    return {
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


def _save_vocab_merges(tokenizer_dir: Path) -> None:
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(CLIP_L14_DIR / name, tokenizer_dir / name)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (tokenizer_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def _save_tokenizer_json(tokenizer_dir: Path) -> None:
    _save_vocab_merges(tokenizer_dir)
    CLIPTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tokenizer_dir)
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):  # transformers 5 writes tokenizer.json only
        (tokenizer_dir / name).unlink(missing_ok=True)
    assert (tokenizer_dir / "tokenizer.json").is_file()


def _to_transformers4_text_encoder(text_dir: Path) -> None:
    weights = text_dir / "model.safetensors"
    state = load_file(weights)
    save_file({f"text_model.{k}": v for k, v in state.items()}, weights, metadata={"format": "pt"})
    config = json.loads((text_dir / "config.json").read_text())
    config["transformers_version"] = "4.44.2"
    (text_dir / "config.json").write_text(json.dumps(config, indent=2))


# --- CompVis single files ----------------------------------------------------------------------------------------

def save_tiny_single_file(path: Path, seed: int = 0, wrap_state_dict: bool = True) -> Path:
    """The tiny model as a CompVis checkpoint: .safetensors (flat) or .ckpt (torch.save, optionally {"state_dict"})."""
    text_encoder, unet, vae = build_tiny_sd1(seed)
    state = ldm_state_dict(text_encoder, unet, vae)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save({"state_dict": state, "global_step": 0} if wrap_state_dict else state, path)
    return path


def save_tiny_yaml(path: Path) -> Path:
    """The LDM yaml matching the tiny single file."""
    path.write_text(yaml.safe_dump(tiny_ldm_config(), sort_keys=False))
    return path


def ldm_state_dict(text_encoder, unet, vae) -> dict[str, torch.Tensor]:
    """diffusers/transformers modules -> one CompVis LatentDiffusion state dict (inverse of diffusers' converter)."""
    state = {UNET_PREFIX + k: v for k, v in _rename(unet.state_dict(), _unet_modules(unet.config), UNET_RESNET).items()}
    vae_state = _rename(vae.state_dict(), _vae_modules(vae.config), VAE_RESNET, VAE_ATTENTION)
    state.update({VAE_PREFIX + k: _as_conv_1x1(k, v) for k, v in vae_state.items()})
    state.update({TEXT_PREFIX + k: v for k, v in text_encoder.state_dict().items()})
    # Old transformers saved position_ids as a persistent buffer: real SD1 checkpoints carry it.
    state[TEXT_PREFIX + "embeddings.position_ids"] = torch.arange(text_encoder.config.max_position_embeddings)[None]
    return {k: v.detach().clone() for k, v in state.items()}


UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_modules(config) -> dict[str, str]:
    """diffusers module path -> LDM UNetModel module path (input_blocks / middle_block / output_blocks)."""
    names = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
             "mid_block.resnets.1": "middle_block.2"}
    levels, layers, i = len(config.block_out_channels), config.layers_per_block, 1
    for b in range(levels):
        for j in range(layers):
            names[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{i}.0"
            names[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{i}.1"
            i += 1
        if b < levels - 1:
            names[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{i}.0.op"
            i += 1
    i = 0
    for b, kind in enumerate(config.up_block_types):
        for j in range(layers + 1):
            names[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{i}.0"
            names[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{i}.1"
            i += 1
        if b < levels - 1:  # the upsampler follows the block's last layer, after its attention if any
            names[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{i - 1}.{2 if 'CrossAttn' in kind else 1}.conv"
    return names


def _vae_modules(config) -> dict[str, str]:
    """diffusers module path -> LDM AutoencoderKL module path (decoder levels are numbered in reverse)."""
    names = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for part in ("encoder", "decoder"):
        names.update({f"{part}.conv_in": f"{part}.conv_in", f"{part}.conv_out": f"{part}.conv_out",
                      f"{part}.conv_norm_out": f"{part}.norm_out", f"{part}.mid_block.resnets.0": f"{part}.mid.block_1",
                      f"{part}.mid_block.resnets.1": f"{part}.mid.block_2",
                      f"{part}.mid_block.attentions.0": f"{part}.mid.attn_1"})
    levels, layers = len(config.block_out_channels), config.layers_per_block
    for b in range(levels):
        for j in range(layers):
            names[f"encoder.down_blocks.{b}.resnets.{j}"] = f"encoder.down.{b}.block.{j}"
        if b < levels - 1:
            names[f"encoder.down_blocks.{b}.downsamplers.0.conv"] = f"encoder.down.{b}.downsample.conv"
        up = levels - 1 - b
        for j in range(layers + 1):
            names[f"decoder.up_blocks.{b}.resnets.{j}"] = f"decoder.up.{up}.block.{j}"
        if b < levels - 1:
            names[f"decoder.up_blocks.{b}.upsamplers.0.conv"] = f"decoder.up.{up}.upsample.conv"
    return names


def _rename(state: dict, modules: dict[str, str], *leaf_tables: dict[str, str]) -> dict:
    """Rename each key by its longest module prefix in `modules`, then its leaf module by the tables."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        cut = next(n for n in range(len(parts) - 1, 0, -1) if ".".join(parts[:n]) in modules)
        leaf = ".".join(parts[cut:-1])
        for table in leaf_tables:
            leaf = table.get(leaf, leaf)
        out[".".join(filter(None, [modules[".".join(parts[:cut])], leaf, parts[-1]]))] = value
    return out


def _as_conv_1x1(key: str, value: torch.Tensor) -> torch.Tensor:
    # LDM's VAE attention projects with 1x1 convolutions where diffusers uses linear layers.
    is_projection = ".attn_1." in key and key.endswith(".weight") and not key.endswith("norm.weight")
    return value[:, :, None, None] if is_projection and value.ndim == 2 else value
