"""What a CompVis single file lacks: the LDM yaml, the text encoder config and the scheduler, shipped or inferred."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import yaml

from sdrt.errors import ExportError

CONFIGS = Path(__file__).parent / "configs"
V1_INFERENCE_YAML = CONFIGS / "v1-inference.yaml"
# Stability-AI/stablediffusion's SD 2.x yamls: epsilon (2.x-base, 512) and v-prediction (2.0/2.1, 768). They differ
# in `parameterization` only, so both build the same modules.
V2_INFERENCE_YAML = CONFIGS / "v2-inference.yaml"
V2_INFERENCE_V_YAML = CONFIGS / "v2-inference-v.yaml"
# OpenAI CLIP ViT-L/14, the SD1 text encoder: its config.json, tokenizer_config.json and merges.txt. Its vocab.json
# (0.96 MB) is not shipped: the export rebuilds it from the merges (sdrt.export.clip_vocab.read_tokenizer_files).
CLIP_L14_DIR = CONFIGS / "clip-vit-large-patch14"
# OpenCLIP ViT-H/14, the SD2 text encoder, as diffusers stores it: 23 of its 24 layers (SD2 conditions on the
# penultimate layer), gelu. Its tokenizer is CLIP's BPE (the files in CLIP_L14_DIR) padded with "!" (id 0).
OPEN_CLIP_H14_CONFIG = CONFIGS / "open-clip-vit-h-14" / "config.json"
OPEN_CLIP_PAD_TOKEN = "!"

# The resolution each family and prediction type was trained at; the yamls' image_size is a training crop's latent
# size and says nothing about it. Stability's SD 2.x v-prediction models are 768, the epsilon ones 2.x-base 512.
DEFAULT_IMAGE_SIZE = {("sd2", "v_prediction"): 768}
FALLBACK_IMAGE_SIZE = 512
# The scheduler class of Stability's diffusers folders: DDIM for SD 2.0/2.1 768-v, PNDM for SD 1.x and 2.x-base.
SCHEDULER_CLASS = {("sd2", "v_prediction"): "DDIMScheduler"}
FALLBACK_SCHEDULER_CLASS = "PNDMScheduler"

# Every CLIP text tower (OpenAI L/14, OpenCLIP H/14 and bigG/14) uses 64-wide attention heads.
CLIP_HEAD_DIM = 64
_TEXT_PREFIX = "encoder.layers."


def shipped_config(family: str, prediction_type: str) -> Path:
    """The shipped LDM yaml for a family ("sd1" | "sd2") and prediction type."""
    if family == "sd2":
        return V2_INFERENCE_V_YAML if prediction_type == "v_prediction" else V2_INFERENCE_YAML
    return V1_INFERENCE_YAML


def default_image_size(family: str, prediction_type: str) -> int:
    """The image size a family was trained at, in pixels."""
    return DEFAULT_IMAGE_SIZE.get((family, prediction_type), FALLBACK_IMAGE_SIZE)


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


def yaml_prediction_type(original_config: Mapping) -> str:
    """CompVis' `parameterization: "v"` (SD2 768-v yamls) is diffusers' v_prediction; the default is eps."""
    return "v_prediction" if original_config["model"]["params"].get("parameterization") == "v" else "epsilon"


def scheduler_config(original_config: Mapping, prediction_type: str | None = None, family: str = "sd1") -> dict:
    """The scheduler Stability's diffusers folders ship, with the LDM yaml's beta schedule.

    PNDM and DDIM take the same keys (PNDM's skip_prk_steps included). `prediction_type` None takes the yaml's.
    """
    params = original_config["model"]["params"]
    prediction = prediction_type or yaml_prediction_type(original_config)
    return {
        "_class_name": SCHEDULER_CLASS.get((family, prediction), FALLBACK_SCHEDULER_CLASS),
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
