"""A generation request as one object, validated once against the bundle before any work starts."""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from PIL import Image

from sdrt.bundle import Manifest
from sdrt.errors import RequestError, printable
from sdrt.runtime.image import check_image_size
from sdrt.runtime.img2img import INPAINT_CHANNELS, extra_unet_channels, rgb
from sdrt.runtime.lora import lora_kind, resolve_loras
from sdrt.runtime.noise import SEED_MODES
from sdrt.runtime.presets import preset_for, scheduler_config
from sdrt.runtime.prompts import check_prompt
from sdrt.runtime.resize import resize, resize_mode_name, rounded_size
from sdrt.runtime.samplers import make_schedule, resolve_sampler, sampler_for_config
from sdrt.runtime.text_encoder import check_clip_skip

MAX_STEPS = 1000
MAX_NAME = 64  # sampler, schedule and kind names: sampler labels with a schedule type are under 30 characters
MAX_SEED = 2**64  # torch.Generator.manual_seed accepts 64-bit seeds
RANDOM_SEED = -1  # A1111, its API and most front ends send -1 for "pick one"
MAX_ITERATIONS = 10_000
DEFAULT_STRENGTH = 0.75  # A1111's "Denoising strength" and StableDiffusionImg2ImgPipeline's default


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate; None fields take the bundle's defaults in `resolve`."""

    prompt: str | Sequence[str]  # a list: one batch of len(prompt) x batch_size images, prompt-major (diffusers)
    negative_prompt: str | Sequence[str] = ""  # one for all, or one per prompt
    width: int | None = None
    height: int | None = None
    steps: int | None = None  # None: the model kind's preset (25 standard, 4 LCM, 1 turbo)
    guidance_scale: float | None = None  # None: the preset's (7.5 standard; LCM and turbo: off)
    sampler: str | None = None
    schedule: str | None = None  # A1111's "Schedule type" (Karras, Exponential, KL Optimal...); None: the sampler's
    seed: int | None = None  # None or -1 (A1111's "random"): a random seed, fixed by `resolve`
    seed_mode: str = "cpu"  # "cpu": torch's CPU generator (diffusers); "gpu": torch's CUDA Philox (A1111's default)
    batch_size: int = 1
    n_iter: int = 1  # A1111's batch count: batches run one after another, seeds continuing
    eta: float | None = None  # noise amount for DDIM / ancestral samplers; None: the sampler's default
    guidance_rescale: float = 0.0  # Lin et al. 2023 sec. 3.4 (0.7 there), for zero-terminal-SNR models
    kind: str | None = None  # model kind whose preset fills unset fields; None: the bundle's (presets.detect_kind)
    fast_decode: bool = False  # decode with the bundle's tiny decoder (TAESD) instead of the VAE
    safety_checker: bool = True  # run the bundle's safety checker when it has one (flagged images: black)
    watermark: bool = True  # embed the SD scripts' invisible watermark (images of 256x256 pixels or more)
    # img2img and inpainting (A1111's names). Images are PIL images; `resolve` converts them to RGB and L.
    init_image: Image.Image | None = None  # transparency is flattened onto white, as A1111 does
    strength: float | None = None  # A1111's "Denoising strength", (0, 1]; None: 0.75 with an init image
    mask: Image.Image | None = None  # white = repaint; binarized at 0.5 as diffusers does
    mask_blur: int = 0  # A1111's "Mask blur" in pixels: softens the mask and pastes the result over the original
    inpaint_full_res: bool = False  # A1111's "Inpaint area: Only masked": generate a crop around the mask
    inpaint_full_res_padding: int = 32  # A1111's "Only masked padding, pixels" around the mask's bounding box
    # A1111's "Resize mode" for an init image (and mask) of another size than the request: "just resize",
    # "crop and resize", "resize and fill" (or A1111's index 0-2).
    resize_mode: str | int = "just resize"
    # A1111's "Clip skip": the text encoder's layer -N, then its final layer norm (diffusers' clip_skip is N - 1)
    clip_skip: int = 1
    # LoRAs (sdrt.runtime.lora): paths, (path, strength) pairs or LoraSpecs, plus the prompt's <lora:name:strength>
    # tags, found in `lora_dir`. `resolve` makes them LoraSpecs; an LCM-LoRA makes the default kind "lcm".
    loras: tuple = ()
    lora_dir: str | Path | None = None
    # Set by `resolve`: every field is final (defaults filled, seed fixed, names canonical, images converted).
    resolved: bool = field(default=False, repr=False, compare=False)

    def resolve(self, manifest: Manifest) -> GenerationRequest:
        """Fill defaults from the bundle and check every field, raising RequestError with a one-line reason; a
        resolved request is returned as it is, so the loop, the steps and the metadata see one request."""
        if self.resolved:
            return self
        self._check_fields()
        loras = resolve_loras(self._first_prompt(), self.loras, self.lora_dir)
        try:
            preset = preset_for(manifest, self.kind or lora_kind(loras))
        except ValueError as e:
            raise RequestError(str(e)) from None
        steps, guidance_scale, sampler = preset.fill(self.steps, self.guidance_scale, self.sampler)
        seed = secrets.randbelow(2**32) if self.seed in (None, RANDOM_SEED) else self.seed
        req = replace(
            self, steps=steps, guidance_scale=guidance_scale, sampler=sampler or default_sampler(manifest.scheduler),
            seed=seed, kind=preset.kind, loras=loras, **self._images(manifest), **self._prompts(),
        )
        req._check(manifest)
        try:
            req = replace(req, sampler=resolve_sampler(req.sampler, req.schedule), schedule=None)
            make_schedule(req.sampler, scheduler_settings(manifest, req.kind), req.steps, req.strength or 1.0)
        except ValueError as e:  # unknown name, a schedule type the sampler lacks, LCM's step limit, no step left...
            raise RequestError(str(e)) from None
        return replace(req, resolved=True)

    def _first_prompt(self) -> str:
        """The prompt whose <lora:...> tags apply to the batch (A1111's extra_networks.parse_prompts: the first)."""
        first = self.prompt if isinstance(self.prompt, str) else next(iter(self.prompt), "")
        return first if isinstance(first, str) else ""  # not a string: _check says so

    def _prompts(self) -> dict:
        """A list of prompts (and of negative prompts) as one per image: the batch grows to len(prompts) x
        batch_size, each prompt repeated batch_size times as diffusers' num_images_per_prompt."""
        if isinstance(self.prompt, str) or not isinstance(self.batch_size, int):
            if not isinstance(self.negative_prompt, str) and isinstance(self.prompt, str):
                raise RequestError("a list of negative prompts needs a list of prompts of the same length")
            return {}
        prompts = list(self.prompt)
        negatives = [self.negative_prompt] * len(prompts) if isinstance(self.negative_prompt, str) \
            else list(self.negative_prompt)
        if not prompts or len(negatives) != len(prompts):
            raise RequestError(f"expected one negative prompt or one per prompt ({len(prompts)}), "
                               f"got {len(negatives)}")
        per = self.batch_size

        def expand(texts: list[str]) -> tuple[str, ...]:
            return tuple(text for text in texts for _ in range(per))

        return {"prompt": expand(prompts), "negative_prompt": expand(negatives), "batch_size": len(prompts) * per}

    def prompts(self) -> list[str]:
        """The prompt of each image of the batch."""
        return list(self.prompt) if not isinstance(self.prompt, str) else [self.prompt] * self.batch_size

    def negative_prompts(self) -> list[str]:
        """The negative prompt of each image of the batch."""
        negative = self.negative_prompt
        return list(negative) if not isinstance(negative, str) else [negative] * self.batch_size

    def iterations(self) -> list[GenerationRequest]:
        """The batches of a resolved request, run one after another: batch k starts at seed + k * batch_size."""
        return [replace(self, seed=self.seed + k * self.batch_size, n_iter=1) for k in range(self.n_iter)]

    def _images(self, manifest: Manifest) -> dict:
        """Size (default: the init image's rounded to the bundle's multiple, else the model's), the init image as
        RGB and the mask as L, both resized to the request size as A1111's resize mode says (with "only masked",
        the mask to the init image's size: the crop is generated at the request size), default strength."""
        size = manifest.model.default_size
        if self.init_image is None:
            return {"width": _given(self.width, size), "height": _given(self.height, size)}
        for what, value in (("init image", self.init_image), ("mask", self.mask)):
            if value is not None and not isinstance(value, Image.Image):
                raise RequestError(f"{what} must be a PIL image, got {type(value).__name__}")
            if value is not None:
                check_image_size(value, what)  # before converting: the size is known, the pixels may not be yet
        try:
            mode = resize_mode_name(self.resize_mode)
        except ValueError as e:
            raise RequestError(str(e)) from None
        image = rgb(self.init_image)
        default_w, default_h = rounded_size(image, manifest.shapes.multiple_of)
        width, height = _given(self.width, default_w), _given(self.height, default_h)
        if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
            return {"width": width, "height": height}  # _check names the bad value
        target = image.size if self.inpaint_full_res else (width, height)
        mask = None if self.mask is None else resize(self.mask.convert("L"), mode, *target)
        return {
            "init_image": image if self.inpaint_full_res else resize(image, mode, width, height), "mask": mask,
            "strength": DEFAULT_STRENGTH if self.strength is None else self.strength,
            "width": width, "height": height, "resize_mode": mode,
        }

    def _check_fields(self) -> None:
        """Types and ranges that need no bundle, checked before anything is computed from the request."""
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        negatives = [self.negative_prompt] if isinstance(self.negative_prompt, str) else self.negative_prompt
        for what, texts in (("prompt", prompts), ("negative prompt", negatives)):
            if not isinstance(texts, (list, tuple)):
                raise RequestError(f"{what} must be a string or a list of strings, got {type(texts).__name__}")
            for text in texts:
                check_prompt(what, text)
        for what, value in (("sampler", self.sampler), ("schedule", self.schedule), ("kind", self.kind)):
            if value is not None and (not isinstance(value, str) or len(value) > MAX_NAME):
                raise RequestError(f"{what} must be a name of at most {MAX_NAME} characters, got "
                                   f"{printable(repr(value))[:80]}")
        for what, value in (("fast decode", self.fast_decode), ("safety checker", self.safety_checker),
                            ("watermark", self.watermark), ("inpaint full res", self.inpaint_full_res)):
            if not isinstance(value, bool):
                raise RequestError(f"{what} must be true or false, got {value!r}")
        for what, value in (("width", self.width), ("height", self.height), ("steps", self.steps),
                            ("seed", self.seed), ("batch size", self.batch_size), ("n_iter", self.n_iter),
                            ("mask blur", self.mask_blur), ("padding", self.inpaint_full_res_padding)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise RequestError(f"{what} must be an integer, got {value!r}")
        for what, value in (("guidance scale", self.guidance_scale), ("eta", self.eta),
                            ("guidance rescale", self.guidance_rescale), ("strength", self.strength)):
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                      or not math.isfinite(value)):
                raise RequestError(f"{what} must be a finite number, got {value!r}")

    def _check(self, manifest: Manifest) -> None:
        if not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= manifest.shapes.max_batch:
            raise RequestError(f"batch size must be from 1 to {manifest.shapes.max_batch}, got {self.batch_size!r}")
        if not all(isinstance(text, str) for text in (*self.prompts(), *self.negative_prompts())):
            raise RequestError("prompt and negative prompt must be strings (or lists of strings)")
        if manifest.shapes.sizes:  # built for fixed sizes (Core ML): those name the choices better than a range
            _check_exported_size(manifest, self.width, self.height)
        else:
            _check_size(manifest, "width", self.width)
            _check_size(manifest, "height", self.height)
        if not isinstance(self.steps, int) or not 1 <= self.steps <= MAX_STEPS:
            raise RequestError(f"steps must be an integer from 1 to {MAX_STEPS}, got {self.steps!r}")
        if not isinstance(self.guidance_scale, (int, float)) or not math.isfinite(self.guidance_scale) \
                or self.guidance_scale < 0:
            raise RequestError(f"guidance scale must be a finite number >= 0, got {self.guidance_scale!r}")
        if not isinstance(self.n_iter, int) or not 1 <= self.n_iter <= MAX_ITERATIONS:
            raise RequestError(f"n_iter (batch count) must be an integer from 1 to {MAX_ITERATIONS}, got {self.n_iter!r}")
        images = self.batch_size * self.n_iter
        if not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED - images:
            raise RequestError(f"seed must be -1 (random) or an integer from 0 to 2**64 - batch size x n_iter, "
                               f"got {self.seed!r}")
        if self.seed_mode not in SEED_MODES:
            raise RequestError(f"seed mode must be one of {', '.join(SEED_MODES)}, got {self.seed_mode!r}")
        if self.eta is not None and not 0.0 <= self.eta <= 1.0:
            raise RequestError(f"eta must be within [0, 1], got {self.eta!r}")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise RequestError(f"guidance rescale must be within [0, 1], got {self.guidance_rescale!r}")
        limit = manifest.shapes.max_size  # a blur or padding wider than the largest image means nothing
        for what, value in (("mask blur", self.mask_blur), ("padding", self.inpaint_full_res_padding)):
            if not 0 <= value <= limit:
                raise RequestError(f"{what} must be an integer from 0 to {limit}, got {value!r}")
        if self.fast_decode and "taesd_decoder" not in manifest.components:
            raise RequestError("fast decode needs a bundle with a tiny decoder (sdrt export --taesd FOLDER)")
        self._check_images(manifest)
        check_clip_skip(manifest, self.clip_skip)

    def _check_images(self, manifest: Manifest) -> None:
        extra = extra_unet_channels(manifest)
        if extra not in (0, INPAINT_CHANNELS):
            raise RequestError(f"the bundle's UNet takes {extra} extra input channels: only inpainting UNets "
                               f"({INPAINT_CHANNELS}) are supported")
        if self.init_image is None:
            given = [name for name, v in (("a mask", self.mask), ("a strength", self.strength)) if v is not None]
            if given:
                raise RequestError(f"{' and '.join(given)} need{'s' if len(given) == 1 else ''} an init image")
            if extra:
                raise RequestError("the bundle's UNet is an inpainting model: give an init image and a mask")
            return
        if "vae_encoder" not in manifest.components:
            raise RequestError("img2img needs a bundle with a vae_encoder")
        if not isinstance(self.strength, (int, float)) or not 0.0 < self.strength <= 1.0:
            raise RequestError(f"strength must be within (0, 1], got {self.strength!r}")
        self._check_mask(extra)

    def _check_mask(self, extra: int) -> None:
        if self.mask is None:
            if extra:
                raise RequestError("the bundle's UNet is an inpainting model: give a mask")
            if self.mask_blur or self.inpaint_full_res:
                raise RequestError("mask blur and only-masked inpainting need a mask")


def _given(value: int | None, default: int) -> int:
    """The request's own value when it has one: 0 is refused by the size check, not replaced by the default."""
    return default if value is None else value


def _check_size(manifest: Manifest, what: str, value: object) -> None:
    s = manifest.shapes
    if not isinstance(value, int) or value % s.multiple_of or not s.min_size <= value <= s.max_size:
        raise RequestError(
            f"{what} must be a multiple of {s.multiple_of} from {s.min_size} to {s.max_size}, got {value!r}"
        )


def _check_exported_size(manifest: Manifest, width: int, height: int) -> None:
    """Bundles compiled for fixed sizes (Core ML) run only those."""
    sizes = manifest.shapes.sizes
    if (width, height) not in sizes:
        listed = ", ".join(f"{w}x{h}" for w, h in sizes)
        raise RequestError(f"size: expected one of the sizes this bundle was exported for ({listed}), got "
                           f"{width}x{height}; export others with sdrt export --sizes")


def scheduler_settings(manifest: Manifest, kind: str) -> dict:
    """The bundle's scheduler config with the model kind's overrides (turbo: trailing timesteps)."""
    return scheduler_config(manifest, preset_for(manifest, kind))


def default_sampler(config: dict) -> str:
    """The sampler reproducing the bundle's own scheduler class (PNDM for SD 1.x), as diffusers would use."""
    try:
        return sampler_for_config(config)
    except ValueError:
        return "pndm"
