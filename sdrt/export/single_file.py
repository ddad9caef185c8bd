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
from diffusers.models.attention_processor import Attention
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from sdrt.bundle import sha256_file
from sdrt.errors import ExportError
from sdrt.export.detect import detect_family, prediction_from_forward_pass, prediction_from_metadata
from sdrt.export.ldm_config import (
    CLIP_L14_DIR,
    OPEN_CLIP_PAD_TOKEN,
    clip_text_config,
    default_image_size,
    read_original_config,
    scheduler_config,
    shipped_config,
    yaml_prediction_type,
)
from sdrt.export.open_clip import cond_stage_layer, open_clip_text_model
from sdrt.export.source import SourceModel

log = logging.getLogger(__name__)

UNET_CONV_IN_KEY = "model.diffusion_model.input_blocks.0.0.weight"


def load_single_file(
    path: Path, original_config: Path | str | None = None, prediction_type: str | None = None
) -> SourceModel:
    """Convert a CompVis checkpoint with diffusers' single-file helpers, offline.

    The family (SD1/SD2) comes from the weights, the yaml from `original_config` or the family's shipped one, the
    prediction type from `prediction_type`, else `original_config`, else the file (see `_prediction_type`).
    """
    log.info("reading single file %s", path)
    checkpoint = read_checkpoint(path)
    family = detect_family(checkpoint)
    config = read_original_config(original_config or shipped_config(family, prediction_type or "epsilon"))
    unet = _unet(checkpoint, config)
    prediction, found_by = _prediction_type(path, family, unet, prediction_type, config if original_config else None)
    _complete_unet_config(unet, family, prediction, config)
    vae_config = create_vae_diffusers_config_from_ldm(config, checkpoint)
    return SourceModel(
        text_encoder=_text_encoder(checkpoint, family, config),
        unet=unet,
        vae=_build(AutoencoderKL(**vae_config), convert_ldm_vae_checkpoint(checkpoint, vae_config), "vae"),
        scheduler=scheduler_config(config, prediction, family),
        tokenizer_dir=CLIP_L14_DIR,
        pad_token=OPEN_CLIP_PAD_TOKEN if family == "sd2" else None,
        source={"path": str(path.absolute()), "kind": "single_file", "sha256": sha256_file(path)},
        name=path.stem,
        prediction_type_from=found_by,
    )


def _unet(checkpoint: dict[str, torch.Tensor], config: dict) -> UNet2DConditionModel:
    unet_config = create_unet_diffusers_config_from_ldm(config, checkpoint)
    _check_unet_width(unet_config, checkpoint)
    return _build(UNet2DConditionModel(**unet_config), convert_ldm_unet_checkpoint(checkpoint, unet_config), "unet")


def _prediction_type(
    path: Path, family: str, unet: UNet2DConditionModel, requested: str | None, user_config: dict | None
) -> tuple[str, str]:
    """(prediction type, what decided it): the request, the user's yaml, the file's metadata, or the family's rule.

    No weight states the parametrization. SD1 models are epsilon (all of CompVis' and RunwayML's); SD2 has both, so
    its UNet is run once (sdrt.export.detect.prediction_from_forward_pass).
    """
    if requested is not None:
        return requested, "request"
    if user_config is not None:  # the yaml CompVis' code would run the model with: its `parameterization` decides
        return yaml_prediction_type(user_config), "original_config"
    declared = prediction_from_metadata(path)
    if declared is not None:
        return declared, "metadata"
    if family == "sd1":
        return "epsilon", "family"
    prediction, slope = prediction_from_forward_pass(unet)
    log.info("%s: %s by the forward-pass test (output/noise slope %.3f)", path.name, prediction, slope)
    return prediction, "forward_pass"


def _complete_unet_config(unet: UNet2DConditionModel, family: str, prediction: str, config: dict) -> None:
    """What the yaml does not say: the trained image size, and attention upcast for SD2's 768-v models.

    Stability's diffusers folders of SD 2.x 768-v set upcast_attention (attention scores overflow fp16 without it);
    fp32 is unaffected. Set here as UNet2DConditionModel(upcast_attention=...) would have, once the prediction is known.
    """
    vae_scale = 2 ** (len(config["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["ch_mult"]) - 1)
    upcast = family == "sd2" and prediction == "v_prediction"
    unet.register_to_config(sample_size=default_image_size(family, prediction) // vae_scale, upcast_attention=upcast)
    for module in unet.modules():
        if isinstance(module, Attention):
            module.upcast_attention = upcast


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


def _text_encoder(checkpoint: dict[str, torch.Tensor], family: str, config: dict) -> CLIPTextModel:
    if family == "sd2":
        model, state = open_clip_text_model(checkpoint, cond_stage_layer(config))
    else:
        model, state = _clip_text_model(checkpoint)
    # Both converters give transformers 4.x keys (`text_model.*`); transformers >= 5.6 flattened that level away.
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    prefix = "text_model." if hasattr(model, "text_model") else ""
    # position_ids was a persistent buffer in older transformers; it is recomputed now.
    state = {prefix + k: v for k, v in state.items() if not k.endswith("position_ids")}
    return _build(model, state, "text_encoder")


def _clip_text_model(checkpoint: dict[str, torch.Tensor]) -> tuple[CLIPTextModel, dict]:
    state = convert_ldm_clip_checkpoint(checkpoint)
    config = clip_text_config({k.removeprefix("text_model."): v for k, v in state.items()})
    return CLIPTextModel(CLIPTextConfig(**config)), state


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
