"""Load a diffusers Stable Diffusion folder (model_index.json), saved by transformers 4.x or 5."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from sdrt.bundle import sha256_file
from sdrt.errors import ExportError
from sdrt.export.source import SourceModel

log = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
# The first that exists is hashed as the model's identity: the folder has no single file to hash.
WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin.index.json",
)


def load_folder(path: Path) -> SourceModel:
    """The text encoder, UNet, VAE, scheduler config and tokenizer of a diffusers folder, in fp32."""
    index = _read_json(path / MODEL_INDEX, "a diffusers folder needs model_index.json")
    if "text_encoder_2" in index:
        raise ExportError(f"{path} is an SDXL-style pipeline ({index.get('_class_name')}): only SD1 and SD2 export")
    for sub in ("text_encoder", "tokenizer", "unet", "vae", "scheduler"):
        if not (path / sub).is_dir():
            raise ExportError(f"{path} has no {sub}/ folder: not a Stable Diffusion pipeline")
    log.info("loading diffusers folder %s", path)
    return SourceModel(
        text_encoder=_load_text_encoder(path / "text_encoder"),
        unet=_load_diffusers(UNet2DConditionModel, path, "unet"),
        vae=_load_diffusers(AutoencoderKL, path, "vae"),
        scheduler=_read_json(path / "scheduler" / "scheduler_config.json", "the scheduler config is missing"),
        tokenizer_dir=path / "tokenizer",
        source={"path": str(path.absolute()), "kind": "diffusers", "sha256": weights_sha256(path / "unet")},
        name=path.absolute().name,
    )


def _read_json(path: Path, why: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path} not found: {why}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"cannot read {path}: {e}") from None


def _load_diffusers(cls, path: Path, sub: str):
    try:
        model, info = cls.from_pretrained(path, subfolder=sub, torch_dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ExportError(f"cannot load {sub} from {path}: {e}") from None
    _check_loading_info(info, path / sub)
    return model.eval()


def _load_text_encoder(path: Path) -> CLIPTextModel:
    # transformers 5 maps the `text_model.`-prefixed keys of folders saved by transformers 4.x onto its flat layout.
    try:
        model, info = CLIPTextModel.from_pretrained(path, torch_dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ExportError(f"cannot load the text encoder from {path}: {e}") from None
    _check_loading_info(info, path)
    return model.eval()


def _check_loading_info(info: dict, path: Path) -> None:
    # from_pretrained randomly initialises weights it did not find: an export of those would be silently wrong.
    missing = list(info.get("missing_keys", []))
    mismatched = list(info.get("mismatched_keys", []))
    if missing or mismatched:
        example = (missing or mismatched)[0]
        raise ExportError(
            f"{path}: {len(missing)} weights missing and {len(mismatched)} of the wrong shape (e.g. {example})"
        )


def weights_sha256(model_dir: Path) -> str:
    """The sha256 of a diffusers model folder's weights file (the first of WEIGHT_FILES it has)."""
    for name in WEIGHT_FILES:
        if (model_dir / name).is_file():
            return sha256_file(model_dir / name)
    raise ExportError(f"{model_dir} has no weights file (looked for {', '.join(WEIGHT_FILES)})")
