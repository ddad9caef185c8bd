"""SD2's text encoder in a CompVis single file (OpenCLIP ViT-H/14, `cond_stage_model.model.*`) as a CLIPTextModel."""
from __future__ import annotations

import json
import re
from typing import Mapping

import torch
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel

from sdrt.errors import ExportError
from sdrt.export.ldm_config import CLIP_HEAD_DIM, OPEN_CLIP_H14_CONFIG

PREFIX = "cond_stage_model.model."
_BLOCK = re.compile(re.escape(PREFIX) + r"transformer\.resblocks\.(\d+)\.")
# FrozenOpenCLIPEmbedder's `layer` (Stability-AI/stablediffusion ldm/modules/encoders/modules.py): how many of the
# last residual blocks it skips. ln_final still follows the last block run, which is exactly a CLIPTextModel with
# that many fewer layers (how diffusers stores SD2: 23 layers of ViT-H's 24).
SKIPPED_BLOCKS = {"last": 0, "penultimate": 1}
DEFAULT_LAYER = "penultimate"  # every SD 2.x yaml says so


def cond_stage_layer(original_config: Mapping) -> str:
    """The yaml's FrozenOpenCLIPEmbedder `layer`, or SD2's "penultimate" where it names none."""
    cond = original_config["model"]["params"].get("cond_stage_config") or {}
    layer = (cond.get("params") or {}).get("layer", DEFAULT_LAYER)
    if layer not in SKIPPED_BLOCKS:
        raise ExportError(f"cond_stage_config layer {layer!r} is not supported; expected one of {list(SKIPPED_BLOCKS)}")
    return layer


def open_clip_text_model(checkpoint: Mapping[str, torch.Tensor], layer: str) -> tuple[CLIPTextModel, dict]:
    """An untrained CLIPTextModel sized from the checkpoint, and its converted state dict (keys as diffusers gives)."""
    blocks = {int(m.group(1)) for k in checkpoint if (m := _BLOCK.match(k))}
    if not blocks:
        raise ExportError(f"no OpenCLIP text blocks in the checkpoint ({PREFIX}transformer.resblocks.*)")
    used = len(blocks) - SKIPPED_BLOCKS[layer]
    if used < 1:
        raise ExportError(f"the OpenCLIP text encoder has {len(blocks)} blocks, too few for the {layer!r} layer")
    model = CLIPTextModel(CLIPTextConfig(**open_clip_text_config(checkpoint, used)))
    # diffusers skips the unused 24th block of full-size ViT-H only; drop whichever blocks this layer does not run.
    kept = {k: v for k, v in checkpoint.items() if not ((m := _BLOCK.match(k)) and int(m.group(1)) >= used)}
    return model, convert_open_clip_checkpoint(model, kept, prefix=PREFIX)


def open_clip_text_config(checkpoint: Mapping[str, torch.Tensor], layers: int) -> dict:
    """CLIPTextConfig kwargs: ViT-H/14's (gelu) with the sizes read from the weights' shapes."""
    base = json.loads(OPEN_CLIP_H14_CONFIG.read_text())
    try:
        tokens = checkpoint[PREFIX + "token_embedding.weight"]
        positions = checkpoint[PREFIX + "positional_embedding"]
        fc = checkpoint[PREFIX + "transformer.resblocks.0.mlp.c_fc.weight"]
    except KeyError as e:
        raise ExportError(f"the OpenCLIP text encoder weights are incomplete: {e.args[0]} is missing") from None
    vocab, hidden = tokens.shape
    return {
        **base,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "max_position_embeddings": positions.shape[0],
        "num_hidden_layers": layers,
        "intermediate_size": fc.shape[0],
        "num_attention_heads": max(1, hidden // CLIP_HEAD_DIM),
    }
