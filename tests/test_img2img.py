"""img2img parity: sdrt on ONNX Runtime vs diffusers' StableDiffusionImg2ImgPipeline, same tiny model, same seeds."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from tiny_models import diffusers_reference  # noqa: E402

from sdrt.errors import RequestError  # noqa: E402
from sdrt.runtime.noise_levels import Schedule  # noqa: E402
from sdrt.runtime.pipeline import Pipeline  # noqa: E402
from sdrt.runtime.request import GenerationRequest  # noqa: E402
from sdrt.runtime.samplers import make_schedule, scheduler_for  # noqa: E402
from sdrt.runtime.schedules import SchedulerConfig  # noqa: E402

# Max abs difference of the float images in [0, 1] (before 8 bits). txt2img reaches ~3e-6 with the same model;
# img2img adds a VAE encode (ONNX vs torch, ~1e-6) whose latents start the loop, so allow 30x that.
PIXEL_TOL_FLOAT = 1e-4

PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry"
SEED = 4321
WIDTH, HEIGHT = 72, 64
STEPS = 8

CASES = [  # (A1111 sampler label, strength): every sampler family, strengths that cut at different steps
    ("PNDM", 0.3), ("PNDM", 0.75), ("PNDM", 1.0), ("DDIM", 0.75), ("Euler", 0.5), ("Euler a", 0.3),
    ("Euler a", 0.75), ("DPM++ 2M", 0.75), ("DPM++ 2M", 1.0), ("DPM++ 2M Karras", 0.6), ("Heun", 0.3),
    ("Heun", 0.75), ("UniPC", 0.6),
]
# Not LMS: after the cut, diffusers' LMSDiscreteScheduler takes its order from the absolute step index
# (min(step_index + 1, 4)) with coefficients through the skipped steps' sigmas, though it holds no derivatives for
# them; sdrt's LMS restarts at first order as k-diffusion (A1111) does. Measured: 4.5e-2 apart at strength 0.75.


def init_image(width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    """A real picture: a gradient with a disc and a bar, so encoding and denoising see structure."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 96)], axis=-1).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 8, 42, 40), fill=(230, 40, 30))
    draw.rectangle((48, 30, 66, 58), fill=(20, 200, 60))
    return image


@pytest.fixture(scope="module")
def reference_pipe(tiny_sd1_dir):
    return diffusers_reference(diffusers.StableDiffusionImg2ImgPipeline, tiny_sd1_dir)


def diffusers_images(pipe, sampler: str, strength: float, batch: int) -> np.ndarray:
    cls_name, extra = scheduler_for(sampler)
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.base_scheduler_config, **extra)
    generators = [torch.Generator("cpu").manual_seed(SEED + i) for i in range(batch)]
    out = pipe(
        PROMPT, image=init_image(), strength=strength, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
        guidance_scale=7.5, num_images_per_prompt=batch, generator=generators, output_type="np",
    )
    return out.images


def sdrt_float_images(pipe: Pipeline, req: GenerationRequest) -> np.ndarray:
    """The last step decoded to float [B, H, W, 3] in [0, 1], before 8-bit rounding."""
    *_, last = pipe.denoise(req)
    latents = last.vp_latents() / pipe.manifest.model.latent_scale_factor
    image = pipe.session("vae_decoder").run({"latents": latents.astype(np.float32)})["image"]
    return np.clip(image / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)


def sdrt_images(pipe: Pipeline, sampler: str, strength: float, batch: int) -> np.ndarray:
    req = GenerationRequest(
        PROMPT, negative_prompt=NEGATIVE, steps=STEPS, guidance_scale=7.5, sampler=sampler, seed=SEED,
        batch_size=batch, init_image=init_image(), strength=strength,
    )
    return sdrt_float_images(pipe, req)


@pytest.mark.parametrize("sampler, strength", CASES)
def test_img2img_matches_diffusers(reference_pipe, sdrt_pipe, sampler, strength):
    ref = diffusers_images(reference_pipe, sampler, strength, batch=1)
    ours = sdrt_images(sdrt_pipe, sampler, strength, batch=1)
    err = float(np.abs(ref - ours).max())
    print(f"{sampler} strength {strength}: max abs {err:.2e}")
    assert ours.shape == ref.shape == (1, HEIGHT, WIDTH, 3)
    assert err <= PIXEL_TOL_FLOAT


def test_img2img_batch_matches_diffusers(reference_pipe, sdrt_pipe):
    """Batch 2 with one generator per image: diffusers repeats the image and samples each latent with its own."""
    ref = diffusers_images(reference_pipe, "Euler a", 0.6, batch=2)
    ours = sdrt_images(sdrt_pipe, "Euler a", 0.6, batch=2)
    assert np.abs(ref - ours).max() <= PIXEL_TOL_FLOAT
    assert np.abs(ours[0] - ours[1]).max() > 0.01  # the seeds matter


def test_low_strength_stays_near_the_init_image(sdrt_pipe):
    """Strength is how far the latents may move: at 0.3 they end far closer to the init image's than at 1.0.
    (Compared as latents: the tiny VAE is random, so its decoder does not reproduce the init image.)"""
    image = np.asarray(init_image(), np.float32).transpose(2, 0, 1)[None] / 127.5 - 1
    mean = sdrt_pipe.session("vae_encoder").run({"image": image})["latent_mean"]
    target = mean * sdrt_pipe.manifest.model.latent_scale_factor

    def final_latents(strength: float) -> np.ndarray:
        req = GenerationRequest(PROMPT, steps=STEPS, sampler="Euler", seed=SEED, init_image=init_image(),
                                strength=strength)
        return list(sdrt_pipe.denoise(req))[-1].vp_latents()

    near, far = (np.abs(final_latents(s) - target).mean() for s in (0.3, 1.0))
    assert near < 0.5 * far


@pytest.mark.parametrize("sampler, order", [("Euler", 1), ("Heun", 2), ("DPM2", 2), ("DPM++ 2M", 1)])
def test_strength_cuts_the_schedule_as_get_timesteps(sampler, order):
    """diffusers: init_timestep = int(steps * strength); the first (steps - init_timestep) * order evaluations go."""
    sd15 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
    config = SchedulerConfig.from_dict(sd15)
    full = make_schedule(sampler, config, 10)
    cut = make_schedule(sampler, config, 10, strength=0.75)  # int(7.5) = 7 steps kept, 3 skipped
    assert isinstance(cut, Schedule)
    np.testing.assert_array_equal(cut.timesteps, full.timesteps[3 * order:])
    np.testing.assert_array_equal(cut.sigmas, full.sigmas[3 * order:])
    cls_name, extra = scheduler_for(sampler)
    scheduler = getattr(diffusers, cls_name).from_config({**sd15, **extra})
    scheduler.set_timesteps(10)
    np.testing.assert_allclose(cut.timesteps, scheduler.timesteps[3 * scheduler.order:].numpy(), rtol=1e-6)


def test_pndm_truncation_repeats_the_second_timestep_by_position():
    """PNDM's re-step of the first sample happens at the second evaluation, whatever timestep comes second."""
    cut = make_schedule("PNDM", SchedulerConfig(), 10, strength=0.75)
    # Full: [901, 801, 801, 701, ...]; diffusers keeps timesteps[3:] = [701, 601, 501, ...].
    assert cut.timesteps.tolist()[:3] == [701, 601, 501]
    full = make_schedule("DDIM", SchedulerConfig(), 10)
    level = dict(zip(full.timesteps.tolist(), full.sigmas.tolist()))
    assert cut.sigmas_from[1] == level[701] and cut.sigmas_to[1] == level[601]  # re-step 701 -> 601
    assert cut.sigmas_from[2] == level[501] and cut.sigmas_to[2] == level[401]


def test_size_defaults_to_the_init_image(sdrt_pipe):
    req = GenerationRequest(PROMPT, init_image=init_image(), seed=1).resolve(sdrt_pipe.manifest)
    assert (req.width, req.height, req.strength) == (WIDTH, HEIGHT, 0.75)
    assert req.init_image.mode == "RGB"


def test_rgba_and_grey_init_images_are_converted(sdrt_pipe):
    rgba = Image.new("RGBA", (WIDTH, HEIGHT), (255, 0, 0, 0))  # fully transparent red: flattened onto white
    req = GenerationRequest(PROMPT, init_image=rgba, seed=1).resolve(sdrt_pipe.manifest)
    assert req.init_image.mode == "RGB" and req.init_image.getpixel((0, 0)) == (255, 255, 255)
    grey = Image.new("L", (WIDTH, HEIGHT), 77)
    req = GenerationRequest(PROMPT, init_image=grey, seed=1).resolve(sdrt_pipe.manifest)
    assert req.init_image.getpixel((5, 5)) == (77, 77, 77)


@pytest.mark.parametrize("fields, message", [
    ({"resize_mode": "stretch"}, "resize mode must be one of 'just resize', 'crop and resize', 'resize and fill'"),
    ({"strength": 0.0}, "strength must be within (0, 1], got 0.0"),
    ({"strength": 1.5}, "strength must be within (0, 1], got 1.5"),
    ({"strength": 0.1, "steps": 5}, "leaves no step to run"),
    ({"init_image": None, "strength": 0.5}, "a strength needs an init image"),
    ({"init_image": "photo.png"}, "init image must be a PIL image, got str"),
])
def test_request_errors(sdrt_pipe, fields, message):
    req = GenerationRequest(PROMPT, seed=1, **{"init_image": init_image(), **fields})
    with pytest.raises(RequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        req.resolve(sdrt_pipe.manifest)


def test_parameters_name_the_strength(sdrt_pipe):
    [out] = sdrt_pipe.generate(PROMPT, init_image=init_image(), strength=0.5, steps=2, seed=3, sampler="Euler")
    assert "Denoising strength: 0.5" in out.parameters
    assert out.image.size == (WIDTH, HEIGHT)
