"""Tiny random SD1 and SD2 models for tests: diffusers folders and CompVis single files.

One set of sizes (the constants below) feeds both the diffusers configs and the LDM yaml, so a single file written here converts
back to the very modules it came from. Weights are random but seeded: the same seed gives the same files.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
import yaml
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdrt.export.clip_vocab import read_tokenizer_files
from sdrt.export.ldm_config import (
    CLIP_L14_DIR,
    OPEN_CLIP_H14_CONFIG,
    V1_INFERENCE_YAML,
    scheduler_config,
    shipped_config,
)

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


def _tiny_unet(in_channels: int) -> UNet2DConditionModel:
    """The tiny SD1 UNet (random: seed torch first), reading `in_channels` (4, or 9 for inpainting)."""
    return UNet2DConditionModel(
        sample_size=SAMPLE_SIZE, in_channels=in_channels, out_channels=LATENT_CHANNELS,
        block_out_channels=tuple(UNET_CHANNELS * m for m in UNET_MULT), layers_per_block=UNET_LAYERS,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CONTEXT_DIM, attention_head_dim=UNET_HEADS,
    )


def build_tiny_sd1(seed: int = 0) -> tuple[CLIPTextModel, UNet2DConditionModel, AutoencoderKL]:
    """Random tiny text encoder, UNet and VAE (attention in the full-resolution level only, as LDM's [1])."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = json.loads((CLIP_L14_DIR / "config.json").read_text())
        text_encoder = CLIPTextModel(CLIPTextConfig(**{**base, **TEXT_SIZES}))
        unet = _tiny_unet(LATENT_CHANNELS)
        vae = _tiny_vae(SAMPLE_SIZE)
    return text_encoder.eval(), unet.eval(), vae.eval()


def _tiny_vae(sample_size: int) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=tuple(VAE_CHANNELS * m for m in VAE_MULT), layers_per_block=VAE_LAYERS,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_MULT), up_block_types=("UpDecoderBlock2D",) * len(VAE_MULT),
        latent_channels=LATENT_CHANNELS, sample_size=sample_size * 8, scaling_factor=SCALING_FACTOR,
    )


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


def _save_vocab_merges(tokenizer_dir: Path, pad_token: str = "<|endoftext|>") -> None:
    read_tokenizer_files(CLIP_L14_DIR, tokenizer_dir)  # vocab.json rebuilt from the shipped merges.txt
    shutil.copy(CLIP_L14_DIR / "tokenizer_config.json", tokenizer_dir / "tokenizer_config.json")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
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
    state = _ldm_unet_vae(unet, vae)
    state.update({TEXT_PREFIX + k: v for k, v in text_encoder.state_dict().items()})
    # Old transformers saved position_ids as a persistent buffer: real SD1 checkpoints carry it.
    state[TEXT_PREFIX + "embeddings.position_ids"] = torch.arange(text_encoder.config.max_position_embeddings)[None]
    return {k: v.detach().clone() for k, v in state.items()}


def _ldm_unet_vae(unet, vae) -> dict[str, torch.Tensor]:
    state = {UNET_PREFIX + k: v for k, v in _rename(unet.state_dict(), _unet_modules(unet.config), UNET_RESNET).items()}
    state.update({VAE_PREFIX + k: v for k, v in ldm_vae_state_dict(vae).items()})
    return state


def ldm_vae_state_dict(vae) -> dict[str, torch.Tensor]:
    """An AutoencoderKL's weights under CompVis names, as A1111's VAE files hold them (no prefix)."""
    vae_state = _rename(vae.state_dict(), _vae_modules(vae.config), VAE_RESNET, VAE_ATTENTION)
    return {k: _as_conv_1x1(k, v).detach().clone().contiguous() for k, v in vae_state.items()}


def save_tiny_vae(out: Path, seed: int, scaling_factor: float = SCALING_FACTOR) -> Path:
    """A tiny AutoencoderKL folder of the tiny SD1 model's architecture, random weights from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = _tiny_vae(SAMPLE_SIZE)
    vae.register_to_config(scaling_factor=scaling_factor)
    vae.save_pretrained(out)
    return out


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


# --- SD 2.x ------------------------------------------------------------------------------------------------------
# The SD2 architecture at tiny size: an OpenCLIP-style text tower (gelu, conditioning on its penultimate layer),
# linear projections in the transformer blocks, and head counts per level from a fixed head width (LDM's
# num_head_channels), which diffusers stores as a per-block `attention_head_dim` list. Both levels attend (LDM's
# attention_resolutions [1, 2]) so that each level's head count is exercised.
SD2_CONTEXT_DIM = 64
SD2_TEXT_SIZES = dict(hidden_size=SD2_CONTEXT_DIM, intermediate_size=128, num_attention_heads=1)
SD2_TEXT_BLOCKS = 3  # OpenCLIP blocks in the single file; the diffusers folder keeps all but the last
SD2_HEAD_CHANNELS = 16  # heads = channels // 16: [2, 4] for (32, 64)
SD2_HEADS = [UNET_CHANNELS * m // SD2_HEAD_CHANNELS for m in UNET_MULT]
SD2_OPEN_CLIP_PROJECTION = 32  # text_projection's output width (unused by SD2, present in its checkpoints)
# Latent sizes standing for SD2's 768 (v) and 512 (epsilon): 96 and 64 pixels.
SD2_SAMPLE_SIZE = {"v_prediction": 12, "epsilon": 8}
# The scheduler configs as Stability's diffusers folders ship them (written before `timestep_spacing` existed):
# stable-diffusion-2-1 (768, v) and stable-diffusion-2-base (512, epsilon).
_SD2_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "trained_betas": None,
              "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True,
              "steps_offset": 1}
SD2_SCHEDULERS = {
    "v_prediction": {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", **_SD2_BETAS,
                     "prediction_type": "v_prediction"},
    "epsilon": {"_class_name": "PNDMScheduler", "_diffusers_version": "0.10.0.dev0", **_SD2_BETAS,
                "prediction_type": "epsilon"},
}
OPEN_CLIP_PREFIX = "cond_stage_model.model."


def tiny_sd2_ldm_config(prediction: str) -> dict:
    """The shipped SD 2.x inference yaml for `prediction`, with the tiny sizes."""
    config = yaml.safe_load(shipped_config("sd2", prediction).read_text())
    params = config["model"]["params"]
    params["unet_config"]["params"].update(
        model_channels=UNET_CHANNELS, channel_mult=list(UNET_MULT), attention_resolutions=[1, 2],
        num_res_blocks=UNET_LAYERS, num_head_channels=SD2_HEAD_CHANNELS, context_dim=SD2_CONTEXT_DIM,
    )
    params["first_stage_config"]["params"]["ddconfig"].update(
        ch=VAE_CHANNELS, ch_mult=list(VAE_MULT), num_res_blocks=VAE_LAYERS, z_channels=LATENT_CHANNELS,
    )
    return config


def build_tiny_sd2(prediction: str, seed: int = 0) -> tuple[CLIPTextModel, UNet2DConditionModel, AutoencoderKL]:
    """Random tiny OpenCLIP text tower (all SD2_TEXT_BLOCKS layers), SD2-style UNet and VAE."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = json.loads(OPEN_CLIP_H14_CONFIG.read_text())
        text_tower = CLIPTextModel(CLIPTextConfig(**{**base, **SD2_TEXT_SIZES, "num_hidden_layers": SD2_TEXT_BLOCKS}))
        unet = UNet2DConditionModel(
            sample_size=SD2_SAMPLE_SIZE[prediction], in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
            block_out_channels=tuple(UNET_CHANNELS * m for m in UNET_MULT), layers_per_block=UNET_LAYERS,
            down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
            cross_attention_dim=SD2_CONTEXT_DIM, attention_head_dim=SD2_HEADS, use_linear_projection=True,
            upcast_attention=prediction == "v_prediction",  # as stable-diffusion-2-1's unet config
        )
        vae = _tiny_vae(SD2_SAMPLE_SIZE[prediction])
    return text_tower.eval(), unet.eval(), vae.eval()


def penultimate(text_tower: CLIPTextModel) -> CLIPTextModel:
    """The tower without its last layer, as diffusers stores SD2's text encoder (final_layer_norm still applied)."""
    layers = text_tower.config.num_hidden_layers - 1
    config = CLIPTextConfig(**{**text_tower.config.to_dict(), "num_hidden_layers": layers})
    model = CLIPTextModel(config)
    last = f"encoder.layers.{layers}."
    state = {k: v for k, v in text_tower.state_dict().items() if last not in k}
    model.load_state_dict(state, strict=True)
    return model.eval()


def save_tiny_sd2(out: Path, prediction: str, seed: int = 0) -> Path:
    """A diffusers SD2 folder laid out as Stability's on the hub (transformers 4.x text encoder and tokenizer files,
    whose special_tokens_map.json pads with "!" while tokenizer_config.json still says <|endoftext|>)."""
    text_tower, unet, vae = build_tiny_sd2(prediction, seed)
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet")
    vae.save_pretrained(out / "vae")
    penultimate(text_tower).save_pretrained(out / "text_encoder")
    _to_transformers4_text_encoder(out / "text_encoder")
    _save_vocab_merges(out / "tokenizer", pad_token="!")
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD2_SCHEDULERS[prediction], indent=2))
    index = _model_index()
    index["scheduler"] = ["diffusers", SD2_SCHEDULERS[prediction]["_class_name"]]
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def save_tiny_sd2_single_file(path: Path, prediction: str, seed: int = 0, metadata: dict | None = None) -> Path:
    """The tiny SD2 model as a Stability checkpoint (.safetensors with optional header metadata, or .ckpt)."""
    text_tower, unet, vae = build_tiny_sd2(prediction, seed)
    state = {**_ldm_unet_vae(unet, vae), **open_clip_state_dict(text_tower, seed)}
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, path, metadata=metadata)
    else:
        torch.save({"state_dict": state, "global_step": 0}, path)
    return path


def save_tiny_sd2_yaml(path: Path, prediction: str) -> Path:
    path.write_text(yaml.safe_dump(tiny_sd2_ldm_config(prediction), sort_keys=False))
    return path


# transformers CLIP layer -> open_clip ResidualAttentionBlock names (open_clip/transformer.py); q, k and v are one
# packed in_proj in open_clip (nn.MultiheadAttention).
OPEN_CLIP_BLOCK_NAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                         "self_attn.out_proj": "attn.out_proj"}


def open_clip_state_dict(text_tower: CLIPTextModel, seed: int = 0) -> dict[str, torch.Tensor]:
    """A transformers CLIP text tower -> FrozenOpenCLIPEmbedder's keys (cond_stage_model.model.*)."""
    s = {k.removeprefix("text_model."): v for k, v in text_tower.state_dict().items() if not k.endswith("position_ids")}
    hidden = text_tower.config.hidden_size
    projection = torch.randn(hidden, SD2_OPEN_CLIP_PROJECTION, generator=torch.Generator().manual_seed(seed))
    out = {
        "token_embedding.weight": s["embeddings.token_embedding.weight"],
        "positional_embedding": s["embeddings.position_embedding.weight"],
        "ln_final.weight": s["final_layer_norm.weight"], "ln_final.bias": s["final_layer_norm.bias"],
        "text_projection": projection, "logit_scale": torch.tensor(math.log(1 / 0.07)),
    }
    for i in range(text_tower.config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat([s[f"{src}self_attn.{p}_proj.{leaf}"] for p in "qkv"])
            for ours, theirs in OPEN_CLIP_BLOCK_NAMES.items():
                out[f"{dst}{theirs}.{leaf}"] = s[f"{src}{ours}.{leaf}"]
    assert len(out) == len(s) + 2 - 4 * text_tower.config.num_hidden_layers  # every weight mapped once
    return {OPEN_CLIP_PREFIX + k: v for k, v in out.items()}


# --- safety checker ----------------------------------------------------------------------------------------------
# A tiny CLIP vision tower for diffusers' StableDiffusionSafetyChecker: 32-pixel input in 8-pixel patches (16 + CLS
# tokens), and a feature extractor that prepares 32-pixel crops (real SD 1.x: ViT-L/14 at 224).
SAFETY_IMAGE_SIZE = 32
SAFETY_VISION_SIZES = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=SAFETY_IMAGE_SIZE, patch_size=8)
SAFETY_PROJECTION_DIM = 16


def build_tiny_safety_checker(seed: int = 0):
    """A random StableDiffusionSafetyChecker; concept embeddings random too (diffusers initialises them to ones).

    Thresholds stay at diffusers' initial 1.0, above any cosine: nothing is flagged until a test lowers them.
    """
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = CLIPConfig(text_config=TEXT_SIZES, vision_config=SAFETY_VISION_SIZES,
                            projection_dim=SAFETY_PROJECTION_DIM)
        checker = StableDiffusionSafetyChecker(config)
        with torch.no_grad():
            checker.concept_embeds.normal_()
            checker.special_care_embeds.normal_()
    return checker.eval()


def tiny_feature_extractor(size: int = SAFETY_IMAGE_SIZE):
    """CLIPImageProcessor with the OpenAI CLIP defaults, resizing and cropping to `size`."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def save_tiny_sd1_with_safety(out: Path, seed: int = 0, checker=None) -> Path:
    """The tiny SD1 folder plus `safety_checker/` and `feature_extractor/`, as SD 1.x repositories ship them."""
    save_tiny_sd1(out, seed=seed)
    (checker if checker is not None else build_tiny_safety_checker(seed)).save_pretrained(out / "safety_checker")
    tiny_feature_extractor().save_pretrained(out / "feature_extractor")
    index = json.loads((out / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"], requires_safety_checker=True)
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


# --- inpainting --------------------------------------------------------------------------------------------------
INPAINT_IN_CHANNELS = 9  # latents (4) + mask (1) + masked-image latents (4), as SD 1.5 / 2 inpainting UNets


def save_tiny_sd1_inpaint(out: Path, seed: int = 0) -> Path:
    """The tiny SD1 folder with a 9-channel inpainting UNet (random, seeded), as stable-diffusion-inpainting."""
    save_tiny_sd1(out, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        unet = _tiny_unet(INPAINT_IN_CHANNELS)
    shutil.rmtree(out / "unet")
    unet.eval().save_pretrained(out / "unet")
    index = json.loads((out / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionInpaintPipeline"
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def diffusers_reference(pipeline_class, folder: Path):
    """A diffusers pipeline on a tiny folder for parity tests: no safety checker, no progress bar, and its
    scheduler config kept as `base_scheduler_config` (tests swap schedulers from it; from_config would otherwise
    carry overrides such as use_karras_sigmas into the next one)."""
    pipe = pipeline_class.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.base_scheduler_config = pipe.scheduler.config
    return pipe


def onnx_text_encoder(bundle: Path):
    """A bundle's text encoder on ONNX Runtime, fed as the runtime feeds it (sdrt.runtime.text_encoder):
    ids [n, 77] (with embedding fixes and a clip skip) -> hidden states [n, 77, dim]."""
    import onnxruntime as ort

    from sdrt.bundle import read_manifest
    from sdrt.runtime.text_encoder import TextEncoder

    manifest = read_manifest(bundle)
    contract = manifest.components["text_encoder"].contract
    session = ort.InferenceSession(str(bundle / manifest.components["text_encoder"].file),
                                   providers=["CPUExecutionProvider"])
    return TextEncoder(bundle, manifest, lambda feeds: dict(zip(contract.output_names,
                                                                 session.run(contract.output_names, feeds))))
