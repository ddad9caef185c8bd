"""What an export starts from: the three torch modules, the scheduler config and the tokenizer folder of one model."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from sdrt.errors import ExportError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


@dataclass
class SourceModel:
    """A loaded Stable Diffusion model in fp32 eval mode, whatever layout it came from."""

    text_encoder: nn.Module  # transformers CLIPTextModel
    unet: nn.Module  # diffusers UNet2DConditionModel
    vae: nn.Module  # diffusers AutoencoderKL
    scheduler: dict  # a diffusers scheduler config
    tokenizer_dir: Path  # CLIP tokenizer files in either layout (vocab.json + merges.txt, or tokenizer.json)
    source: dict  # {"path", "kind", "sha256"} for the manifest
    name: str
    pad_token: str | None = None  # overrides the tokenizer folder's (SD2 single files: OpenCLIP pads with "!")
    # What set scheduler["prediction_type"]: "scheduler_config" (a folder's), or for a single file "request",
    # "original_config", "metadata", "family" (SD1: epsilon) or "forward_pass" (sdrt.export.detect).
    prediction_type_from: str = "scheduler_config"


def load_source(
    source: Path | str, original_config: Path | str | None = None, prediction_type: str | None = None
) -> SourceModel:
    """Load a diffusers folder (with model_index.json) or a CompVis single file.

    A single file's prediction type is detected unless `prediction_type` is given; a folder's scheduler states it.
    """
    path = Path(source)
    if path.is_dir():
        if original_config is not None:
            raise ExportError("--original-config applies to single files only, not to a diffusers folder")
        from sdrt.export.folder import load_folder

        return load_folder(path)
    if path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        from sdrt.export.single_file import load_single_file

        return load_single_file(path, original_config, prediction_type)
    if not path.exists():
        raise ExportError(f"source not found: {path}")
    raise ExportError(f"{path} is neither a diffusers folder nor a single file ({', '.join(SINGLE_FILE_SUFFIXES)})")
