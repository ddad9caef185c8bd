"""Whole-pipeline parity: sdrt on ONNX Runtime vs diffusers' StableDiffusionPipeline, same tiny model, same seeds."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from tiny_models import diffusers_reference  # noqa: E402

from sdrt.backends import get_backend  # noqa: E402
from sdrt.runtime.pipeline import Pipeline  # noqa: E402
from sdrt.runtime.request import GenerationRequest  # noqa: E402
from sdrt.runtime.samplers import scheduler_for  # noqa: E402

# Max abs difference per pixel between the two pipelines' final 8-bit images (1 = 1/255).
PIXEL_TOL_8BIT = 1
# Max abs difference of the float images in [0, 1] before rounding to 8 bits.
PIXEL_TOL_FLOAT = 1.0 / 255

PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry, low quality"
SEED = 1234
BATCH = 2
WIDTH, HEIGHT = 72, 64
STEPS = 8

# A1111 labels; each is compared with the diffusers scheduler class it reproduces (samplers.scheduler_for).
SAMPLERS = ["PNDM", "DDIM", "Euler", "Euler a", "LMS", "DPM++ 2M", "DPM++ 2M Karras", "Heun", "UniPC", "DPM++ 2M SDE"]


@pytest.fixture(scope="module")
def reference_pipe(tiny_sd1_dir):
    return diffusers_reference(diffusers.StableDiffusionPipeline, tiny_sd1_dir)


def diffusers_images(pipe, sampler: str, guidance: float, config: dict | None = None) -> np.ndarray:
    cls_name, extra = scheduler_for(sampler)
    pipe.scheduler = getattr(diffusers, cls_name).from_config(config or pipe.base_scheduler_config, **extra)
    generators = [torch.Generator("cpu").manual_seed(SEED + i) for i in range(BATCH)]
    out = pipe(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=guidance,
        width=WIDTH, height=HEIGHT, num_images_per_prompt=BATCH, generator=generators, output_type="np",
    )
    return out.images  # [B, H, W, 3] float in [0, 1]


def sdrt_images(pipe: Pipeline, sampler: str, guidance: float) -> np.ndarray:
    req = GenerationRequest(
        PROMPT, negative_prompt=NEGATIVE, steps=STEPS, guidance_scale=guidance, sampler=sampler,
        seed=SEED, batch_size=BATCH, width=WIDTH, height=HEIGHT,
    )
    *_, last = pipe.denoise(req)
    latents = last.vp_latents() / pipe.manifest.model.latent_scale_factor
    image = pipe.session("vae_decoder").run({"latents": latents.astype(np.float32)})["image"]
    return np.clip(image / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_images_match_diffusers(reference_pipe, sdrt_pipe, sampler, record_property):
    ref = diffusers_images(reference_pipe, sampler, guidance=7.5)
    ours = sdrt_images(sdrt_pipe, sampler, guidance=7.5)
    float_err = float(np.abs(ref - ours).max())
    byte_err = int(np.abs((ref * 255).round().astype(int) - (ours * 255).round().astype(int)).max())
    record_property("max_abs_float", float_err)
    record_property("max_abs_8bit", byte_err)
    print(f"{sampler}: max abs {float_err:.2e} (float), {byte_err}/255 (8-bit)")
    assert ours.shape == ref.shape == (BATCH, HEIGHT, WIDTH, 3)
    assert float_err <= PIXEL_TOL_FLOAT
    assert byte_err <= PIXEL_TOL_8BIT
    # The seeds must matter: two images of a batch differ, so equality is not trivial.
    assert np.abs(ours[0] - ours[1]).max() > 0.05


def test_guidance_off_matches_diffusers(reference_pipe, sdrt_pipe):
    """guidance_scale <= 1 runs the conditional batch alone, as diffusers does."""
    ref = diffusers_images(reference_pipe, "Euler", guidance=1.0)
    ours = sdrt_images(sdrt_pipe, "Euler", guidance=1.0)
    assert np.abs(ref - ours).max() <= PIXEL_TOL_FLOAT


def test_batch_image_equals_single_run_with_next_seed(sdrt_pipe):
    batch = sdrt_pipe.generate(PROMPT, seed=SEED, batch_size=2, steps=4, width=WIDTH, height=HEIGHT)
    single = sdrt_pipe.generate(PROMPT, seed=SEED + 1, steps=4, width=WIDTH, height=HEIGHT)
    assert [g.seed for g in batch] == [SEED, SEED + 1]
    np.testing.assert_array_equal(np.asarray(batch[1].image), np.asarray(single[0].image))


def test_denoise_yields_every_step_and_can_stop(sdrt_pipe):
    req = GenerationRequest(PROMPT, steps=6, seed=1, width=WIDTH, height=HEIGHT, sampler="Euler")
    steps = list(sdrt_pipe.denoise(req))
    assert [s.index for s in steps] == list(range(1, 7))
    assert all(s.total == 6 for s in steps)
    assert steps[-1].sigma == 0.0
    assert steps[0].latents.shape == (1, 4, HEIGHT // 8, WIDTH // 8)
    # Cancelling: a consumer may stop after any step; nothing else runs.
    gen = sdrt_pipe.denoise(req)
    first = next(gen)
    gen.close()
    np.testing.assert_array_equal(first.latents, steps[0].latents)


# A scheduler config as PNDMScheduler saves it, with only the training keys: no clip_sample, set_alpha_to_one,
# steps_offset or timestep_spacing (issue 14). Each sampler's class then uses its own defaults: DDIM clips x0.
SILENT_KEYS = ("_class_name", "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")


def silent_scheduler_config(manifest) -> dict:
    return {k: v for k, v in manifest.scheduler.items() if k in SILENT_KEYS}


@pytest.fixture(scope="module")
def silent_pipe(sdrt_pipe):
    """The tiny bundle as if its manifest held the silent scheduler config (same ONNX files)."""
    manifest = dataclasses.replace(sdrt_pipe.manifest, scheduler=silent_scheduler_config(sdrt_pipe.manifest))
    with Pipeline(sdrt_pipe.root, manifest, get_backend("onnxruntime")) as pipe:
        yield pipe


def test_silent_scheduler_config_matches_diffusers(reference_pipe, silent_pipe, sdrt_pipe):
    """diffusers' DDIMScheduler.from_config(silent config) clips x0 (its clip_sample default); so does sdrt. Every
    other sampler's class defaults: test_samplers_clamp.py, step by step."""
    ref = diffusers_images(reference_pipe, "DDIM", 7.5, config=silent_scheduler_config(silent_pipe.manifest))
    ours = sdrt_images(silent_pipe, "DDIM", 7.5)
    assert np.abs(ref - ours).max() <= PIXEL_TOL_FLOAT
    # The defaults matter on this model: the bundle's own config (clip_sample false, steps_offset 1) differs.
    assert np.abs(ours - sdrt_images(sdrt_pipe, "DDIM", 7.5)).max() > 0.05
