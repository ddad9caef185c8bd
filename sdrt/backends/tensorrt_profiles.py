"""TensorRT optimization profiles for a component, from its contract: static (one shape: the fastest engine, and
the one CUDA graphs can capture) or dynamic (the ranges below, one engine for every request inside them).

A profile gives each input a (min, opt, max) shape; TensorRT tunes kernels for `opt` and sizes device memory for
`max`. The ranges follow the TensorRT demo's Stable Diffusion profiles (demo/Diffusion: 256-1024 px, batch doubled
for classifier-free guidance) with sdrt's own call shapes: the text encoder takes every prompt's 77-token chunks in
one call, the VAE and the tiny decoder one image per call (sdrt.runtime.pipeline.Pipeline.decode), so their batch
stays 1 and their `max` memory is that of one 1024 px image.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping

from sdrt.bundle import ModelInfo, ShapeRange
from sdrt.contracts import BATCH, HEIGHT, LATENT_HEIGHT, LATENT_WIDTH, SEQUENCE, WIDTH, Contract
from sdrt.errors import BackendError

STATIC, DYNAMIC = "static", "dynamic"
SHAPES = (STATIC, DYNAMIC)
MAX_IMAGES = 8  # images per batch in the dynamic profile
GUIDED = 2  # classifier-free guidance runs the unconditional and conditional halves in one UNet batch
PIXELS = (256, 1024)  # image side in the dynamic profile; requests use multiples of 64 here, any multiple of 8 runs
PROMPT_CHUNKS = 4  # 77-token chunks a prompt may span in the dynamic profile (A1111's counter: 75, 150, 225, 300)
# Batch (min, opt, max) of each component's calls in the dynamic profile; others take MAX_IMAGES images.
BATCHES = {
    "unet": (1, GUIDED, GUIDED * MAX_IMAGES),
    "text_encoder": (1, GUIDED, GUIDED * MAX_IMAGES * PROMPT_CHUNKS),  # negative + positive prompts x chunks
    "vae_decoder": (1, 1, 1),
    "vae_encoder": (1, 1, 1),
    "taesd_decoder": (1, 1, 1),
}

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    """Per input, the (min, opt, max) shapes an engine accepts; `kind` is static or dynamic."""

    kind: str
    shapes: Mapping[str, tuple[Shape, Shape, Shape]]

    def covers(self, shapes: Mapping[str, Shape]) -> bool:
        """Whether every input shape lies within [min, max] on every axis."""
        return set(shapes) == set(self.shapes) and all(
            len(shape) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shape, hi))
            for name, shape in shapes.items() for lo, _, hi in [self.shapes[name]]
        )

    def identity(self) -> str:
        """A stable text of the profile, for engine cache keys."""
        return json.dumps({"kind": self.kind, "shapes": {k: [list(s) for s in v] for k, v in sorted(self.shapes.items())}})


def static_profile(contract: Contract, shapes: Mapping[str, Shape]) -> Profile:
    """min = opt = max = the given input shapes."""
    return Profile(STATIC, {spec.name: (tuple(shapes[spec.name]),) * 3 for spec in contract.inputs})


def axis_ranges(component: str, model: ModelInfo, bounds: ShapeRange, max_length: int) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every named axis for `component` in the dynamic profile: PIXELS within the bundle's own
    size range, `opt` at the model's default size (clipped into the range), latents 1/vae_scale_factor of pixels."""
    lo, hi = max(PIXELS[0], bounds.min_size), min(PIXELS[1], bounds.max_size)
    if lo > hi:
        raise BackendError(f"{component}: the dynamic profile's sizes {PIXELS} miss the bundle's range "
                           f"{bounds.min_size}-{bounds.max_size}")
    opt = min(max(model.default_size, lo), hi)
    f = model.vae_scale_factor
    pixels, latents = (lo, opt, hi), (lo // f, opt // f, hi // f)
    return {
        BATCH: BATCHES.get(component, (1, 1, MAX_IMAGES)),
        HEIGHT: pixels, WIDTH: pixels, LATENT_HEIGHT: latents, LATENT_WIDTH: latents,
        SEQUENCE: (max_length, max_length, max_length * PROMPT_CHUNKS),
    }


def dynamic_profile(contract: Contract, model: ModelInfo, bounds: ShapeRange, max_length: int) -> Profile:
    """The contract's inputs with each named axis over its range (axis_ranges) and fixed axes as they are."""
    ranges = axis_ranges(contract.component, model, bounds, max_length)

    def shape(spec, which: int) -> Shape:
        return tuple(d if isinstance(d, int) else ranges[d][which] for d in spec.shape)

    return Profile(DYNAMIC, {spec.name: (shape(spec, 0), shape(spec, 1), shape(spec, 2)) for spec in contract.inputs})


def input_shapes(contract: Contract, dims: Mapping[str, int]) -> dict[str, Shape]:
    """The concrete shape of every input for bound axes `dims` (what Contract.check_inputs returned)."""
    return {spec.name: spec.concrete_shape(dims) for spec in contract.inputs}


def check_shapes_option(shapes: str) -> str:
    """`shapes` if it names a profile kind, else a BackendError listing them."""
    if shapes not in SHAPES:
        raise BackendError(f"tensorrt: unknown shapes {shapes!r}; choose one of: {', '.join(SHAPES)}")
    return shapes
