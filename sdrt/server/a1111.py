"""A1111 API requests -> sdrt generation requests, and sdrt results -> A1111 responses.

Every A1111 field is honoured, ignored as A1111 itself ignores it, or refused with a 422 naming it when ignoring
it would change the image (REFUSED: the value at which A1111 leaves the image alone is accepted). Ignored, as in
A1111: `styles` (A1111 skips style names it does not know, and sdrt knows none), the hires-fix fields while
`enable_hr` is off, `denoising_strength` in txt2img, `s_tmin`/`s_tmax` (only used with `s_churn`), `subseed`
at strength 0, mask fields without a mask, `image_cfg_scale` (instruct-pix2pix models only), `save_images` and
`do_not_save_*` (the server writes no files), `script_args` without a script, `comments`, `force_task_id`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable

from PIL import Image, ImageOps

from sdrt import __version__
from sdrt.errors import RequestError
from sdrt.runtime.request import GenerationRequest
from sdrt.runtime.samplers import SAMPLERS, resolve_sampler, sampler_label, schedule_label, schedule_types_for
from sdrt.server.catalog import BundleInfo
from sdrt.server.codec import open_image, to_base64
from sdrt.server.jobs import Output
from sdrt.server.models import GenerationFields, Img2ImgRequest, Txt2ImgRequest
from sdrt.server.options import Settings

ORIGINAL = 1  # A1111's inpainting_fill "original": the masked area starts from the image, as sdrt's does
LATENT_UPSCALE = 3  # A1111's resize_mode "Just resize (latent upscale)"
# The maxima of A1111's img2img sliders (modules/ui.py): larger values only cost time (a blur's cost grows with
# its radius), so they are refused rather than run.
MAX_MASK_BLUR, MAX_PADDING = 64, 256


def _off(value) -> bool:
    return not value


def _one(value) -> bool:
    return value is None or value == 1


def _not_positive(value) -> bool:
    return value is None or value <= 0


# field -> (is the value one at which A1111 leaves the image alone?, what to send instead)
REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "subseed_strength": (_off, "0 (variation seeds are not implemented)"),
    "seed_resize_from_h": (_not_positive, "-1 or 0"),
    "seed_resize_from_w": (_not_positive, "-1 or 0"),
    "restore_faces": (_off, "false (no face restoration models)"),
    "tiling": (_off, "false"),
    "s_churn": (_off, "0"),
    "s_noise": (_one, "1"),
    "s_min_uncond": (_off, "0"),
    "refiner_checkpoint": (lambda v: v in (None, "", "None"), "none (no refiner)"),
    "firstpass_image": (_off, "none"),
    "script_name": (_off, "none (sdrt has no scripts: GET /sdapi/v1/scripts)"),
    "alwayson_scripts": (_off, "{} (sdrt has no scripts: GET /sdapi/v1/scripts)"),
    "infotext": (_off, "the fields themselves"),
    "enable_hr": (_off, "false (no hires fix)"),
    "firstphase_width": (_off, "0"),
    "firstphase_height": (_off, "0"),
    "initial_noise_multiplier": (_one, "1"),
    "latent_mask": (_off, "none"),
    "mask_round": (lambda v: v is None or v, "true (sdrt rounds the mask at 0.5)"),
}


@dataclass(frozen=True)
class Work:
    """An API request as the server runs it: the settings it runs with and the sdrt request."""

    settings: Settings
    request: GenerationRequest
    label: str  # "txt2img" or "img2img"


def _refuse_unsupported(body: GenerationFields) -> None:
    given = body.model_dump()
    for name, (neutral, instead) in REFUSED.items():
        if name in given and not neutral(given[name]):
            raise RequestError(f"{name}: not supported by sdrt, got {given[name]!r}; send {instead}")


def _fields(body: GenerationFields, settings: Settings) -> dict:
    """The GenerationRequest fields txt2img and img2img share."""
    _refuse_unsupported(body)
    return dict(
        prompt=body.prompt or "", negative_prompt=body.negative_prompt or "", width=body.width,
        height=body.height, steps=body.steps, guidance_scale=body.cfg_scale,
        sampler=body.sampler_name or body.sampler_index, schedule=body.scheduler,
        seed=-1 if body.seed is None else body.seed, seed_mode=settings.seed_mode,
        batch_size=1 if body.batch_size is None else body.batch_size,
        n_iter=1 if body.n_iter is None else body.n_iter, eta=body.eta,
    )


def txt2img(body: Txt2ImgRequest, settings: Settings) -> Work:
    return Work(settings, GenerationRequest(**_fields(body, settings)), "txt2img")


def img2img(body: Img2ImgRequest, settings: Settings, max_input_pixels: int) -> Work:
    """The init image (one; the batch repeats it), mask, strength and A1111's inpainting options."""
    fields = _fields(body, settings)
    if not body.init_images:
        raise RequestError("init_images: expected one base64 image, got none")
    if len(body.init_images) > 1:
        raise RequestError(f"init_images: sdrt takes one init image (the batch repeats it), got "
                           f"{len(body.init_images)}")
    if body.resize_mode == LATENT_UPSCALE:
        raise RequestError("resize_mode: 3 (latent upscale) is not supported by sdrt; send 0, 1 or 2")
    init = open_image(body.init_images[0], "init_images[0]", max_input_pixels)
    strength = 0.75 if body.denoising_strength is None else body.denoising_strength
    fields.update(init_image=init, strength=strength, resize_mode=body.resize_mode or 0)
    if body.mask:
        fields.update(_mask_fields(body, open_image(body.mask, "mask", max_input_pixels)))
    return Work(settings, GenerationRequest(**fields), "img2img")


def _mask_fields(body: Img2ImgRequest, mask: Image.Image) -> dict:
    if (body.inpainting_fill or 0) != ORIGINAL:
        raise RequestError(f"inpainting_fill: sdrt starts the masked area from the image ({ORIGINAL}, "
                           f"'original'), got {body.inpainting_fill!r}; send {ORIGINAL}")
    blur = body.mask_blur
    if blur is None:
        if body.mask_blur_x != body.mask_blur_y:
            raise RequestError(f"mask_blur_x, mask_blur_y: sdrt blurs masks evenly, got {body.mask_blur_x} and "
                               f"{body.mask_blur_y}")
        blur = body.mask_blur_x
    padding = body.inpaint_full_res_padding or 0
    for name, value, most in (("mask_blur", blur, MAX_MASK_BLUR), ("inpaint_full_res_padding", padding, MAX_PADDING)):
        if value is not None and value > most:
            raise RequestError(f"{name}: at most {most} (A1111's slider), got {value}")
    mask = binary_mask(mask)
    return dict(
        mask=ImageOps.invert(mask) if body.inpainting_mask_invert else mask, mask_blur=blur or 0,
        inpaint_full_res=bool(body.inpaint_full_res), inpaint_full_res_padding=padding,
    )


def binary_mask(mask: Image.Image) -> Image.Image:
    """A1111's create_binary_mask (modules/processing.py): an RGBA mask with transparency is its alpha channel
    thresholded at 128 (what UIs paint), any other mask its grey levels."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        return mask.getchannel("A").point(lambda a: 255 if a > 128 else 0)
    return mask.convert("L")


def echo(body: GenerationFields) -> dict:
    """The request as A1111 echoes it in `parameters` (init images and mask only if include_init_images)."""
    given = body.model_dump()
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        given.update(init_images=None, mask=None)
    return given


def info(work: Work, req: GenerationRequest, outputs: list[Output], bundle: BundleInfo, started: float) -> str:
    """Processed.js() (modules/processing.py) for a resolved request and the images it produced."""
    images = req.batch_size * req.n_iter
    seeds = [req.seed + i for i in range(images)]
    prompts, negatives = req.prompts() * req.n_iter, req.negative_prompts() * req.n_iter
    return json.dumps({
        "prompt": prompts[0], "all_prompts": prompts, "negative_prompt": negatives[0],
        "all_negative_prompts": negatives, "seed": req.seed, "all_seeds": seeds, "subseed": -1,
        "all_subseeds": [-1] * images, "subseed_strength": 0, "width": req.width, "height": req.height,
        "sampler_name": sampler_label(req.sampler), "cfg_scale": req.guidance_scale, "steps": req.steps,
        "batch_size": req.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": bundle.name, "sd_model_hash": bundle.hash, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": req.strength if req.init_image is not None else None,
        "extra_generation_params": {"Schedule type": schedule_label(req.sampler)}, "index_of_first_image": 0,
        "infotexts": [out.parameters for out in outputs], "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(started)), "clip_skip": 1,
        "is_using_inpainting_conditioning": req.mask is not None and work.label == "img2img",
        "version": f"sdrt {__version__}",
    })


def progress(status: dict | None, skip_image: bool) -> dict:
    """GET /sdapi/v1/progress from a running job's status (None: idle), as A1111's progressapi computes it."""
    if not status or status.get("started") is None:
        return {"progress": 0, "eta_relative": 0, "state": _state(status or {}), "current_image": None,
                "textinfo": None}
    done = 0.01 + status["fraction"]  # A1111 starts at 0.01 so that the ETA never divides by zero
    elapsed = time.time() - status["started"]
    return {
        "progress": min(done, 1.0), "eta_relative": elapsed / done - elapsed, "state": _state(status),
        "current_image": None if skip_image or not status.get("preview") else to_base64(status["preview"]),
        "textinfo": None,
    }


def _state(status: dict) -> dict:
    """shared.state.dict() of A1111 (modules/shared_state.py)."""
    running = status.get("started") is not None
    return {
        "skipped": bool(status.get("skipped")), "interrupted": bool(status.get("interrupted")),
        "stopping_generation": False, "job": status.get("label", "") if running else "",
        "job_count": status.get("iterations", 0) if running else 0,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(status.get("created", time.time()))),
        "job_no": status.get("iteration", 0), "sampling_step": status.get("step", 0),
        "sampling_steps": status.get("steps", 0),
    }


def samplers() -> list[dict]:
    """GET /sdapi/v1/samplers: A1111 labels, with k-diffusion and sdrt names as aliases."""
    return [{"name": spec.label, "aliases": [name, *spec.aliases], "options": {}} for name, spec in SAMPLERS.items()]


def schedulers() -> list[dict]:
    """GET /sdapi/v1/schedulers: Automatic and every schedule type some sampler offers (A1111's names)."""
    items = {"automatic": "Automatic"}
    for sampler in SAMPLERS:
        for key in schedule_types_for(sampler):
            items.setdefault(key, schedule_label(resolve_sampler(sampler, key)))
    return [{"name": name, "label": label, "aliases": None, "default_rho": None, "need_inner_model": None}
            for name, label in items.items()]
