"""Load a CompVis-layout single file (.safetensors, or .ckpt read without running pickled code) as diffusers modules."""
from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from sdrt.bundle import sha256_file
from sdrt.errors import ExportError
from sdrt.export.ldm_config import CLIP_L14_DIR, clip_text_config, read_original_config, scheduler_config
from sdrt.export.source import SourceModel

log = logging.getLogger(__name__)

# The SD1 text encoder inside a CompVis checkpoint (FrozenCLIPEmbedder wraps a transformers CLIPTextModel).
CLIP_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
OPEN_CLIP_KEY = "cond_stage_model.model.token_embedding.weight"
UNET_CONV_IN_KEY = "model.diffusion_model.input_blocks.0.0.weight"


def load_single_file(path: Path, original_config: Path | str | None = None) -> SourceModel:
    """Convert a CompVis checkpoint with diffusers' single-file helpers, offline, using `original_config` or SD v1's."""
    log.info("reading single file %s", path)
    checkpoint = read_checkpoint(path)
    config = read_original_config(original_config)
    unet_config = create_unet_diffusers_config_from_ldm(config, checkpoint)
    _check_unet_width(unet_config, checkpoint)
    vae_config = create_vae_diffusers_config_from_ldm(config, checkpoint)
    return SourceModel(
        text_encoder=_text_encoder(checkpoint),
        unet=_build(UNet2DConditionModel(**unet_config), convert_ldm_unet_checkpoint(checkpoint, unet_config), "unet"),
        vae=_build(AutoencoderKL(**vae_config), convert_ldm_vae_checkpoint(checkpoint, vae_config), "vae"),
        scheduler=scheduler_config(config),
        tokenizer_dir=CLIP_L14_DIR,
        source={"path": str(path.absolute()), "kind": "single_file", "sha256": sha256_file(path)},
        name=path.stem,
    )


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The flat state dict of a .safetensors or .ckpt file (with or without a top-level "state_dict")."""
    if path.suffix.lower() == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as e:
            raise ExportError(f"cannot read {path} as safetensors: {e}") from None
    state = _read_pickle(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ExportError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _read_pickle(path: Path):
    # weights_only=True unpickles tensors and plain containers only; any other global (the way a pickle runs code)
    # is rejected before it is called. Never fall back to a full unpickle.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ExportError(
            f"refusing to load {path}: it is a pickle with objects other than tensors, which could run code "
            f"when loaded ({reason}); convert it to .safetensors with a tool you trust"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise ExportError(f"cannot read {path} as a torch checkpoint: {e}") from None


def _check_unet_width(unet_config: dict, checkpoint: dict[str, torch.Tensor]) -> None:
    # Fail before building a UNet of the yaml's size (seconds and gigabytes at SD scale) that cannot take the weights.
    if UNET_CONV_IN_KEY not in checkpoint:
        raise ExportError(f"no UNet found in the checkpoint (no {UNET_CONV_IN_KEY}): not a Stable Diffusion file")
    width, config_width = checkpoint[UNET_CONV_IN_KEY].shape[0], unet_config["block_out_channels"][0]
    if width != config_width:
        raise ExportError(
            f"the checkpoint's UNet is {width} channels wide, the config says {config_width}: "
            "pass --original-config with the yaml this model was trained with"
        )


def _text_encoder(checkpoint: dict[str, torch.Tensor]) -> CLIPTextModel:
    if CLIP_KEY not in checkpoint:
        sd2 = OPEN_CLIP_KEY in checkpoint
        hint = " (an SD2 OpenCLIP text encoder: export its diffusers folder instead)" if sd2 else ""
        raise ExportError(f"no CLIP text encoder found in the checkpoint (no {CLIP_KEY}){hint}")
    # The LDM keys are transformers 4.x's (`text_model.*`); transformers >= 5.6 flattened that level away.
    state = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(checkpoint).items()}
    model = CLIPTextModel(CLIPTextConfig(**clip_text_config(state)))
    prefix = "text_model." if hasattr(model, "text_model") else ""
    # position_ids was a persistent buffer in older transformers; it is recomputed now.
    state = {prefix + k: v for k, v in state.items() if not k.endswith("position_ids")}
    return _build(model, state, "text_encoder")


def _build(model: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> torch.nn.Module:
    """Load `state` into `model` strictly: a single file that does not match its config is an error, not noise."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1:2] or [str(e)]
        raise ExportError(
            f"{name}: the checkpoint does not match the model config ({first[0].strip()}); "
            "pass --original-config with the yaml this model was trained with"
        ) from None
    return model.eval()  # built in fp32: load_state_dict casts fp16/bf16 weights on copy
