"""What a CompVis single file lacks: the LDM yaml, the CLIP text config and the scheduler, shipped or inferred."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import yaml

from sdrt.errors import ExportError

CONFIGS = Path(__file__).parent / "configs"
V1_INFERENCE_YAML = CONFIGS / "v1-inference.yaml"
# OpenAI CLIP ViT-L/14, the SD1 text encoder: its config.json, tokenizer_config.json, vocab.json and merges.txt.
CLIP_L14_DIR = CONFIGS / "clip-vit-large-patch14"

# Every CLIP text tower (OpenAI L/14, OpenCLIP H/14 and bigG/14) uses 64-wide attention heads.
CLIP_HEAD_DIM = 64
_TEXT_PREFIX = "encoder.layers."


def read_original_config(path: Path | str | None) -> dict:
    """The LDM yaml of a single file: the given one, or the shipped SD v1 inference config."""
    path = Path(path) if path is not None else V1_INFERENCE_YAML
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ExportError(f"cannot read the original config {path}: {e}") from None
    params = (config or {}).get("model", {}).get("params", {}) if isinstance(config, dict) else {}
    for key in ("unet_config", "first_stage_config"):
        if key not in params:
            raise ExportError(f"{path} is not an LDM inference config: model.params.{key} is missing")
    return config


def scheduler_config(original_config: Mapping) -> dict:
    """The scheduler SD v1.5 ships (PNDM, skip_prk_steps), with the beta schedule of the LDM yaml."""
    params = original_config["model"]["params"]
    # CompVis' `parameterization: "v"` (SD2 768-v yamls) is diffusers' v_prediction; the default is eps.
    prediction = "v_prediction" if params.get("parameterization") == "v" else "epsilon"
    return {
        "_class_name": "PNDMScheduler",
        "num_train_timesteps": int(params.get("timesteps", 1000)),
        "beta_start": float(params.get("linear_start", 0.00085)),
        "beta_end": float(params.get("linear_end", 0.012)),
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "skip_prk_steps": True,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "clip_sample": False,
        "prediction_type": prediction,
        "timestep_spacing": "leading",
    }


def clip_text_config(state: Mapping[str, object]) -> dict:
    """CLIPTextConfig kwargs for a CLIP text state dict (unprefixed keys): ViT-L/14 defaults, sizes from the shapes."""
    base = json.loads((CLIP_L14_DIR / "config.json").read_text())
    try:
        tokens = state["embeddings.token_embedding.weight"]
        positions = state["embeddings.position_embedding.weight"]
        fc1 = state[f"{_TEXT_PREFIX}0.mlp.fc1.weight"]
    except KeyError as e:
        raise ExportError(f"the CLIP text encoder weights are incomplete: {e.args[0]} is missing") from None
    layers = {k[len(_TEXT_PREFIX):].split(".", 1)[0] for k in state if k.startswith(_TEXT_PREFIX)}
    vocab, hidden = tokens.shape
    return {
        **base,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "max_position_embeddings": positions.shape[0],
        "num_hidden_layers": len(layers),
        "intermediate_size": fc1.shape[0],
        "num_attention_heads": max(1, hidden // CLIP_HEAD_DIM),
    }
