"""The optional safety checker (diffusers StableDiffusionSafetyChecker): find it in a diffusers folder, wrap, describe.

SD 1.x repositories ship `safety_checker/` (a CLIP ViT-L/14 vision tower, a projection and 17 + 3 concept embeddings
with thresholds) and `feature_extractor/` (the CLIPImageProcessor that prepares its input). Bundles carry it as
`safety_checker`, with the processor's parameters in the manifest so the torch-free runtime (sdrt.runtime.safety)
prepares images as transformers does.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker, cosine_distance
from torch import nn
from transformers import CLIPImageProcessor

from sdrt.contracts import safety_checker_contract
from sdrt.errors import BundleError, ExportError
from sdrt.export.components import ComponentSpec
from sdrt.export.folder import _load_diffusers
from sdrt.runtime.safety import ClipPreprocess

log = logging.getLogger(__name__)

SUBFOLDER, FEATURE_EXTRACTOR = "safety_checker", "feature_extractor"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
# diffusers' forward raises every concept's score by this much once a special-care concept scored (safety_checker.py).
SPECIAL_CARE_ADJUSTMENT = 0.01
# diffusers' forward rounds each score to 3 decimals before testing `> 0`: round(x, 3) > 0 <=> rint(1000 x) > 0.
ROUNDING = 1000.0
# ONNX Runtime against torch, fp32, on the scores (cosine similarity minus a threshold, so in [-2, 2] whatever the
# activations): the CLIP tower's summation-order differences reach the cosines through a layer norm, a projection
# and a normalization (measured 1.2e-7 on the tiny tower, 5.2e-8 on a random full-size ViT-L/14). 1e-4 is a tenth
# of the 1e-3 step the decision rounds to, and a wrong graph is off by 0.1 or more. The flags count too: one flipped
# flag is an error of 1 (parity.py compares bool outputs as 0/1).
SAFETY_TOLERANCE = 1e-4


class SafetyChecker(nn.Module):
    """clip_input -> (concept_scores, special_scores, has_nsfw_concept): diffusers' decision, vectorized.

    The vectorized form is diffusers' `forward_onnx`, plus the rounding to 3 decimals that `forward` (what
    StableDiffusionPipeline runs) applies and `forward_onnx` leaves commented out: the two disagree only for scores in
    (0, 5e-4], and sdrt follows the torch pipeline. `forward` adds the adjustment to the special scores after the
    first special-care hit; that changes no decision, so special_scores here are the plain cosine minus threshold.
    """

    def __init__(self, checker: nn.Module):
        super().__init__()
        self.checker = checker

    def forward(self, clip_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.checker
        image_embeds = c.visual_projection(c.vision_model(clip_input).pooler_output)
        special_scores = cosine_distance(image_embeds, c.special_care_embeds) - c.special_care_embeds_weights
        special_care = _positive(special_scores).any(dim=1, keepdim=True)
        adjustment = special_care.to(special_scores.dtype) * SPECIAL_CARE_ADJUSTMENT
        concept_scores = (cosine_distance(image_embeds, c.concept_embeds) - c.concept_embeds_weights) + adjustment
        return concept_scores, special_scores, _positive(concept_scores).any(dim=1)


def _positive(scores: torch.Tensor) -> torch.Tensor:
    # torch.round and ONNX Round both round half to even, as numpy's round does in diffusers' forward.
    return torch.round(scores * ROUNDING) > 0


def find_safety_checker(source: Path | str) -> Path | None:
    """The `safety_checker/` subfolder of a diffusers folder, or None (single files carry none)."""
    folder = Path(source) / SUBFOLDER
    return folder if (folder / "config.json").is_file() else None


def load_safety_checker(source: Path | str) -> tuple[nn.Module, ClipPreprocess] | None:
    """The folder's safety checker and its feature extractor's preprocessing, or None when it has none."""
    folder = find_safety_checker(source)
    if folder is None:
        return None
    extractor = Path(source) / FEATURE_EXTRACTOR
    if not (extractor / PREPROCESSOR_CONFIG).is_file():
        raise ExportError(
            f"{source} has a safety_checker/ but no {FEATURE_EXTRACTOR}/{PREPROCESSOR_CONFIG} to prepare its input "
            "(diffusers refuses this too); export with safety_checker=False (--no-safety-checker) to leave it out"
        )
    log.info("safety_checker: loading StableDiffusionSafetyChecker from %s", folder)
    return _load_diffusers(StableDiffusionSafetyChecker, Path(source), SUBFOLDER), read_preprocess(extractor)


def read_preprocess(folder: Path) -> ClipPreprocess:
    """A feature_extractor folder's parameters as transformers reads them (old int sizes become dicts)."""
    try:
        config = CLIPImageProcessor.from_pretrained(folder).to_dict()
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read the feature extractor in {folder}: {e}") from None
    sizes = {k: {n: int(v) for n, v in config[k].items() if v is not None} for k in ("size", "crop_size")}
    known = {k: config[k] for k in ClipPreprocess.__dataclass_fields__ if k in config}
    try:
        return ClipPreprocess.from_dict({**known, **sizes, "resample": int(config["resample"])})
    except BundleError as e:
        raise ExportError(f"{folder}: unsupported CLIPImageProcessor parameters: {e}") from None


def safety_spec(checker: nn.Module, preprocess: ClipPreprocess) -> ComponentSpec:
    """The safety_checker component, after checking the preprocessing yields the vision tower's input size."""
    size = int(checker.config.vision_config.image_size)
    crop = preprocess.crop_size if preprocess.do_center_crop else preprocess.size
    if (crop.get("height"), crop.get("width")) != (size, size):
        raise ExportError(f"the feature extractor makes {crop} images, the safety checker's CLIP tower takes {size}")
    return ComponentSpec(
        SUBFOLDER, SafetyChecker(checker).eval(),
        safety_checker_contract(size, len(checker.concept_embeds), len(checker.special_care_embeds)), SAFETY_TOLERANCE,
        preprocess=preprocess.to_dict(),
    )
