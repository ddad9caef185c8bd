"""What `Pipeline.generate` accepts besides a GenerationRequest: a prompt (or list) with request fields, the
names users know from diffusers where they mean the same, paths for images, and a per-step callback."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from PIL import Image

from sdrt.errors import RequestError
from sdrt.runtime.driver import INTERRUPT, SKIP, Progress, StepHook
from sdrt.runtime.image import load_image
from sdrt.runtime.request import GenerationRequest

# diffusers' StableDiffusion*Pipeline.__call__ argument -> the GenerationRequest field that means the same.
DIFFUSERS_NAMES = {
    "num_inference_steps": "steps",
    "num_images_per_prompt": "batch_size",
    "image": "init_image",
    "mask_image": "mask",
}
# diffusers arguments with no same-meaning field: what to use instead.
REFUSED = {
    "generator": "seed=N (sdrt's seeds reproduce torch.Generator('cpu').manual_seed(N); seed_mode='gpu' A1111's)",
    "latents": "seed=N (the loop draws its own noise, as diffusers does from a generator)",
    "output_type": "the returned GeneratedImage.image (a PIL image)",
    "callback_on_step_end": "callback=fn (called with an sdrt.runtime.driver.Progress; return True to stop)",
    "callback_steps": "callback=fn, counting steps yourself (progress.step)",
    "prompt_embeds": "prompt= (embeddings are computed from the text by the bundle's text encoder)",
    "negative_prompt_embeds": "negative_prompt=",
    "cross_attention_kwargs": "the request fields (LoRA strengths are per request)",
}
IMAGE_FIELDS = {"init_image": "init image", "mask": "mask"}


def request_from_kwargs(request, fields: dict) -> tuple[GenerationRequest, StepHook | None]:
    """(request, step hook) from `Pipeline.generate`'s arguments."""
    fields = dict(fields)
    hook = _hook(fields.pop("callback", None))
    if isinstance(request, GenerationRequest):
        if fields:
            raise RequestError(f"generate() got a GenerationRequest and fields {sorted(fields)}: put them in the "
                               "request (dataclasses.replace(request, ...))")
        return request, hook
    return GenerationRequest(prompt=request, **_request_fields(fields)), hook


def _request_fields(fields: dict) -> dict:
    known = {f.name for f in dataclasses.fields(GenerationRequest)} - {"prompt", "resolved"}
    out = {}
    for name, value in fields.items():
        if name in REFUSED:
            raise RequestError(f"generate() does not take diffusers' {name}: use {REFUSED[name]}")
        field = DIFFUSERS_NAMES.get(name, name)
        if field not in known:
            raise RequestError(f"generate() got an unknown argument {name!r}; request fields are: "
                               f"{', '.join(sorted(known))}")
        if field in out:
            raise RequestError(f"generate() got {field!r} twice (as {name!r} too)")
        out[field] = _image(field, value) if field in IMAGE_FIELDS else value
    return out


def _image(field: str, value) -> Image.Image | None:
    """A path (str or Path) is read as an image; PIL images and None pass through."""
    return load_image(Path(value), IMAGE_FIELDS[field]) if isinstance(value, (str, Path)) else value


def _hook(callback: Callable[[Progress], object] | None) -> StepHook | None:
    """A user callback as a step hook: a true return value stops the run (the current latents are decoded)."""
    if callback is None:
        return None
    if not callable(callback):
        raise RequestError(f"callback must be callable, got {type(callback).__name__}")

    def hook(progress: Progress):
        result = callback(progress)
        return result if result in (INTERRUPT, SKIP) else INTERRUPT if result else None

    return hook
