"""Clip skip: A1111's CLIP_stop_at_last_layers on the tiny SD1 model, against diffusers' `clip_skip` (one less).

A1111 (modules/sd_hijack_clip.py encode_with_transformers) takes hidden_states[-N] through the final layer norm, for
the prompt and the negative prompt alike. diffusers' encode_prompt takes hidden_states[-(clip_skip + 1)] the same
way (A1111's N is diffusers' N - 1) but for the prompt only, and with transformers 5 fails on
`text_encoder.text_model`; so the reference is diffusers' own formula, applied to both prompts as A1111 does, fed to
its pipeline as prompt_embeds / negative_prompt_embeds.
Tolerance: images within 1/255 per pixel (8-bit), as test_pipeline_parity.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from tiny_models import diffusers_reference  # noqa: E402

from sdrt.errors import RequestError  # noqa: E402
from sdrt.runtime.request import GenerationRequest  # noqa: E402

PIXEL_TOL_8BIT = 1
LAYERS = 2  # tests/tiny_models.py TEXT_SIZES
SKIP_VISIBLE = 8  # clip skip 2 must move pixels by more than this, or parity would prove nothing
PROMPT, NEGATIVE, SEED, STEPS = "a red circle on a blue background", "blurry", 77, 6


def _sdrt(pipe, clip_skip: int) -> tuple[np.ndarray, str]:
    req = GenerationRequest(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, sampler="Euler", seed=SEED,
                            clip_skip=clip_skip)
    out = pipe.generate(req)[0]
    return np.asarray(out.image).astype(int), out.parameters


def _embeds(pipe, text: str, clip_skip: int) -> torch.Tensor:
    """diffusers' encode_prompt with `clip_skip` (pipeline_stable_diffusion.py): hidden_states[-(clip_skip + 1)],
    then the final layer norm."""
    ids = pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
        return pipe.text_encoder.final_layer_norm(hidden)


def _diffusers(pipe, clip_skip: int) -> np.ndarray:
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.base_scheduler_config)
    out = pipe(prompt_embeds=_embeds(pipe, PROMPT, clip_skip), negative_prompt_embeds=_embeds(pipe, NEGATIVE, clip_skip),
               num_inference_steps=STEPS, output_type="np", generator=torch.Generator("cpu").manual_seed(SEED))
    return (out.images[0] * 255).round().astype(int)


def test_clip_skip_matches_diffusers(tiny_sd1_dir, sdrt_pipe):
    reference = diffusers_reference(diffusers.StableDiffusionPipeline, tiny_sd1_dir)
    skipped, parameters = _sdrt(sdrt_pipe, 2)
    assert np.abs(skipped - _diffusers(reference, 1)).max() <= PIXEL_TOL_8BIT
    last, plain_parameters = _sdrt(sdrt_pipe, 1)
    assert np.abs(last - _diffusers(reference, 0)).max() <= PIXEL_TOL_8BIT
    assert np.abs(skipped - last).max() > SKIP_VISIBLE
    assert "Clip skip: 2," in parameters and "Clip skip" not in plain_parameters  # A1111 writes it above 1


@pytest.mark.parametrize("clip_skip, message", [(0, "integer >= 1"), (LAYERS + 1, "from 1 to 2"), ("2", "integer")])
def test_clip_skip_outside_the_layers_is_refused(sdrt_pipe, clip_skip, message):
    with pytest.raises(RequestError, match=f"clip skip must be .*{message}"):
        GenerationRequest(PROMPT, clip_skip=clip_skip).resolve(sdrt_pipe.manifest)
