"""Inpainting: parity with diffusers' StableDiffusionInpaintPipeline (9-channel inpainting UNet, and an ordinary UNet
blended after every step), the mask helpers against torch and Pillow, and A1111's "only masked" paste-back."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from tiny_models import diffusers_reference  # noqa: E402

from sdrt.errors import RequestError  # noqa: E402
from sdrt.runtime.masks import (  # noqa: E402
    crop_region, downsample_nearest, expand_crop_region, inpaint_area, mask_array,
)
from sdrt.runtime.pipeline import Pipeline  # noqa: E402
from sdrt.runtime.request import GenerationRequest  # noqa: E402
from sdrt.runtime.samplers import SAMPLERS, make_schedule, sample, scheduler_for  # noqa: E402
from sdrt.runtime.schedules import SchedulerConfig  # noqa: E402
from test_img2img import HEIGHT, NEGATIVE, PROMPT, SEED, STEPS, WIDTH, init_image, sdrt_float_images  # noqa: E402

# Max abs difference of the float images in [0, 1], as tests/test_img2img.py (measured 1e-6..1e-5).
PIXEL_TOL_FLOAT = 1e-4

# Every sampler family, at full strength (pure noise start) and below it (the init image noised).
BLEND_CASES = [("Euler", 1.0), ("Euler a", 0.75), ("DPM++ 2M", 1.0), ("Heun", 0.75), ("PNDM", 0.75), ("DDIM", 1.0),
               ("PNDM", 1.0), ("UniPC", 0.6)]
CONDITIONED_CASES = [("PNDM", 0.75), ("Euler a", 1.0), ("DPM++ 2M", 0.6), ("Heun", 1.0), ("DDIM", 0.75)]


def mask_image(width: int = WIDTH, height: int = HEIGHT, box=(20, 13, 51, 45)) -> Image.Image:
    """White (repaint) rectangle whose edges do not fall on the 8-pixel latent grid."""
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


def reference(folder):
    return diffusers_reference(diffusers.StableDiffusionInpaintPipeline, folder)


@pytest.fixture(scope="module")
def blend_reference(tiny_sd1_dir):
    return reference(tiny_sd1_dir)


@pytest.fixture(scope="module")
def conditioned_reference(tiny_sd1_inpaint_dir):
    return reference(tiny_sd1_inpaint_dir)


@pytest.fixture(scope="module")
def blend_pipe(tiny_sd1_bundle):
    with Pipeline.load(tiny_sd1_bundle, backend="onnxruntime") as pipe:
        yield pipe


@pytest.fixture(scope="module")
def conditioned_pipe(tiny_sd1_inpaint_bundle):
    with Pipeline.load(tiny_sd1_inpaint_bundle, backend="onnxruntime") as pipe:
        yield pipe


def diffusers_images(pipe, sampler: str, strength: float, batch: int = 1) -> np.ndarray:
    cls_name, extra = scheduler_for(sampler)
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.base_scheduler_config, **extra)
    generators = [torch.Generator("cpu").manual_seed(SEED + i) for i in range(batch)]
    # One image per generator: given a single image, diffusers' inpaint pipeline would sample its latents with the
    # first generator only; sdrt samples each image of a batch with its own seed (image i = batch-1 run, seed + i).
    out = pipe(
        [PROMPT] * batch, image=[init_image()] * batch, mask_image=mask_image(), strength=strength,
        negative_prompt=[NEGATIVE] * batch,
        num_inference_steps=STEPS, guidance_scale=7.5, generator=generators, width=WIDTH, height=HEIGHT,
        output_type="np",
    )
    return out.images


def sdrt_images(pipe: Pipeline, sampler: str, strength: float, batch: int = 1) -> np.ndarray:
    req = GenerationRequest(
        PROMPT, negative_prompt=NEGATIVE, steps=STEPS, guidance_scale=7.5, sampler=sampler, seed=SEED,
        batch_size=batch, init_image=init_image(), mask=mask_image(), strength=strength,
    )
    return sdrt_float_images(pipe, req)


@pytest.mark.parametrize("sampler, strength", BLEND_CASES)
def test_ordinary_unet_blend_matches_diffusers(blend_reference, blend_pipe, sampler, strength):
    ref = diffusers_images(blend_reference, sampler, strength)
    ours = sdrt_images(blend_pipe, sampler, strength)
    err = float(np.abs(ref - ours).max())
    print(f"blend {sampler} strength {strength}: max abs {err:.2e}")
    assert err <= PIXEL_TOL_FLOAT


def test_blend_batch_matches_diffusers(blend_reference, blend_pipe):
    ref = diffusers_images(blend_reference, "Euler a", 0.75, batch=2)
    ours = sdrt_images(blend_pipe, "Euler a", 0.75, batch=2)
    assert np.abs(ref - ours).max() <= PIXEL_TOL_FLOAT
    assert np.abs(ours[0] - ours[1]).max() > 0.01


def test_blend_is_not_plain_img2img(blend_pipe):
    """The blend matters: without the mask, the same request gives another image (so parity is not trivial)."""
    with_mask = sdrt_images(blend_pipe, "Euler", 0.75)
    req = GenerationRequest(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, guidance_scale=7.5, sampler="Euler",
                            seed=SEED, init_image=init_image(), strength=0.75)
    assert np.abs(sdrt_float_images(blend_pipe, req) - with_mask).max() > 0.01


@pytest.mark.parametrize("sampler, strength", CONDITIONED_CASES)
def test_inpainting_unet_matches_diffusers(conditioned_reference, conditioned_pipe, sampler, strength):
    ref = diffusers_images(conditioned_reference, sampler, strength)
    ours = sdrt_images(conditioned_pipe, sampler, strength)
    err = float(np.abs(ref - ours).max())
    print(f"9-channel {sampler} strength {strength}: max abs {err:.2e}")
    assert err <= PIXEL_TOL_FLOAT


def test_inpainting_unet_exports_with_nine_channels(conditioned_pipe):
    sample = conditioned_pipe.manifest.components["unet"].contract.inputs[0]
    assert sample.name == "sample" and sample.shape[1] == 9


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_samplers_continue_from_sent_latents(sampler):
    """Every sampler evaluates the model next on the latents sent back (the blend); sending nothing changes nothing."""
    schedule = make_schedule(sampler, SchedulerConfig(), 4)

    def run(replace: bool):
        seen, rng = [], np.random.default_rng(0)

        def model(x, sigma, t):
            seen.append(x.copy())
            return 0.5 * x

        steps = sample(sampler, model, np.ones((1, 4, 2, 2)), schedule, lambda shape: rng.standard_normal(shape))
        x = next(steps)
        sent = np.full_like(x, 7.0) if replace else None
        try:
            while True:
                x = steps.send(sent)
        except StopIteration:
            return seen, x

    plain, replaced = run(False), run(True)
    assert np.all(replaced[0][1] == 7.0)  # the second evaluation saw the sent latents
    assert not np.allclose(plain[0][1], 7.0) and not np.allclose(plain[1], replaced[1])


# ---- the mask helpers ----

def test_mask_binarizes_at_half():
    mask = Image.fromarray(np.array([[0, 127, 128, 255]], np.uint8))
    assert mask_array(mask).tolist() == [[[[0.0, 0.0, 1.0, 1.0]]]]


@pytest.mark.parametrize("size, out", [((64, 72), (8, 9)), ((37, 50), (8, 7)), ((5, 5), (8, 8))])
def test_downsample_matches_torch_nearest(size, out):
    mask = (np.random.default_rng(0).random((1, 1, *size)) > 0.5).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(mask), size=out).numpy()
    np.testing.assert_array_equal(downsample_nearest(mask, *out), ref)


def test_crop_region_pads_and_clips():
    mask = mask_image(100, 80, box=(30, 20, 49, 29))  # pixels 30..49 x 20..29
    assert crop_region(mask, 8) == (22, 12, 58, 38)
    assert crop_region(mask, 40) == (0, 0, 90, 70)
    assert crop_region(Image.new("L", (10, 10)), 4) is None


def test_expand_crop_region_reaches_the_aspect_and_stays_inside():
    # 36 x 26 box to a 64 x 64 request: grow the height by 10 (5 up, 5 down).
    assert expand_crop_region((22, 12, 58, 38), 64, 64, 100, 80) == (22, 7, 58, 43)
    # Near the bottom edge the box slides up instead of leaving the image.
    assert expand_crop_region((22, 60, 58, 78), 64, 64, 100, 80) == (22, 44, 58, 80)
    # Wider request than the box: grow the width.
    assert expand_crop_region((40, 10, 60, 50), 80, 40, 100, 80) == (10, 10, 90, 50)


def test_only_masked_area_crops_resizes_and_pastes_back():
    image = init_image(100, 80)
    mask = mask_image(100, 80, box=(30, 20, 59, 49))
    area = inpaint_area(image, mask, 64, 64, mask_blur=4, only_masked=True, padding=8)
    blurred = mask.filter(ImageFilter.GaussianBlur(4))
    assert area.region == expand_crop_region(crop_region(blurred, 8), 64, 64, 100, 80)
    assert area.image.size == area.mask.size == (64, 64)
    generated = Image.new("RGB", (64, 64), (0, 0, 255))
    out = np.asarray(area.paste(generated), np.int16)
    original, weight = np.asarray(image, np.int16), np.asarray(blurred)
    assert out.shape == original.shape
    np.testing.assert_array_equal(out[weight == 0], original[weight == 0])  # outside the blurred mask: untouched
    inside = out[weight == 255]
    assert len(inside) > 0 and (inside == [0, 0, 255]).all()  # inside: the generation
    soft = (weight > 0) & (weight < 255)
    assert soft.any() and np.abs(out[soft] - original[soft]).max() > 0


def test_without_blur_or_only_masked_the_output_is_the_generation():
    area = inpaint_area(init_image(), mask_image(), WIDTH, HEIGHT)
    generated = Image.new("RGB", (WIDTH, HEIGHT), (1, 2, 3))
    assert area.paste(generated) is generated


def test_only_masked_generation_keeps_the_rest_of_the_image(blend_pipe):
    image, mask = init_image(120, 96), mask_image(120, 96, box=(40, 30, 70, 52))
    [out] = blend_pipe.generate(
        PROMPT, init_image=image, mask=mask, width=64, height=64, strength=0.75, steps=3, seed=5, sampler="Euler",
        mask_blur=2, inpaint_full_res=True, inpaint_full_res_padding=6,
    )
    assert out.image.size == (120, 96)
    weight = np.asarray(mask.filter(ImageFilter.GaussianBlur(2)))
    result, original = np.asarray(out.image, np.int16), np.asarray(image, np.int16)
    np.testing.assert_array_equal(result[weight == 0], original[weight == 0])
    assert np.abs(result[weight == 255] - original[weight == 255]).mean() > 5  # repainted
    assert "Mask blur: 2" in out.parameters and "Inpaint area: Only masked" in out.parameters
    assert "Masked area padding: 6" in out.parameters and "Denoising strength: 0.75" in out.parameters


@pytest.mark.parametrize("fields, message", [
    ({"init_image": None}, "a mask needs an init image"),
    ({"mask": None, "mask_blur": 4}, "mask blur and only-masked inpainting need a mask"),
    ({"mask_blur": -1}, "mask blur must be an integer >= 0, got -1"),
])
def test_request_errors(blend_pipe, fields, message):
    req = GenerationRequest(PROMPT, seed=1, **{"init_image": init_image(), "mask": mask_image(), **fields})
    with pytest.raises(RequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        req.resolve(blend_pipe.manifest)


def test_inpainting_bundle_needs_a_mask(conditioned_pipe):
    with pytest.raises(RequestError, match="inpainting model: give an init image and a mask"):
        GenerationRequest(PROMPT, seed=1).resolve(conditioned_pipe.manifest)
    with pytest.raises(RequestError, match="inpainting model: give a mask"):
        GenerationRequest(PROMPT, seed=1, init_image=init_image()).resolve(conditioned_pipe.manifest)
