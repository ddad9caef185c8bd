"""Score a diffusers folder on the shapes task: sample every caption x seed, read the images back with `classify`.

    python -m training.evaluate models/sdrt-shapes --json out/eval-shapes.json --grid /tmp/shapes-grid.png

The same figures for a random-weight model of the same architecture are printed as the floor.
"""

from __future__ import annotations

import os

# On a shared, oversubscribed CPU, OpenMP's default spin-waiting made 2 torch threads ~10x slower here
# (10 s vs 0.8 s per VAE step); passive waiting has to be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # ruff: noqa: E402 (imports below must follow it)

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextModel

from training.shapes import Label, all_labels, classify

SAMPLERS = {
    "euler": EulerDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,  # diffusers' default: algorithm_type dpmsolver++, order 2
    "pndm": PNDMScheduler,
}
METRICS = ("colour", "shape", "background", "all")


@dataclass(frozen=True)
class Sampling:
    """How each image is drawn."""

    sampler: str
    steps: int = 20
    guidance: float = 6.0


def generate(pipe: StableDiffusionPipeline, sampling: Sampling, labels: list[Label], seed: int) -> np.ndarray:
    """One image per label, each from its own generator seeded with `seed`; uint8 NHWC."""
    pipe.scheduler = SAMPLERS[sampling.sampler].from_config(pipe.scheduler.config)
    generators = [torch.Generator().manual_seed(seed) for _ in labels]
    images = pipe(
        [label.caption for label in labels],
        num_inference_steps=sampling.steps,
        guidance_scale=sampling.guidance,
        generator=generators,
        output_type="np",
    ).images
    return (images * 255).round().astype(np.uint8)


def accuracy(images: np.ndarray, labels: list[Label]) -> dict[str, float]:
    """Fraction of images whose colour / shape / background / all three `classify` reads as asked."""
    found = [classify(image) for image in images]
    hits = {
        "colour": [f.colour == l.colour for f, l in zip(found, labels)],
        "shape": [f.shape == l.shape for f, l in zip(found, labels)],
        "background": [f.background == l.background for f, l in zip(found, labels)],
        "all": [f == l for f, l in zip(found, labels)],
    }
    return {name: float(np.mean(values)) for name, values in hits.items()}


def random_weights_like(pipe: StableDiffusionPipeline, seed: int) -> StableDiffusionPipeline:
    """The same architecture, tokenizer, scheduler and latent scale with freshly initialised weights."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(pipe.unet.config)
        vae = AutoencoderKL.from_config(pipe.vae.config)
        text = CLIPTextModel(pipe.text_encoder.config)
    return StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text.eval(), tokenizer=pipe.tokenizer, unet=unet.eval(),
        scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def evaluate(pipe: StableDiffusionPipeline, sampling: Sampling, labels: list[Label], seeds: list[int]):
    """Accuracy over labels x seeds for one sampler, and the images (seed-major)."""
    images = np.concatenate([generate(pipe, sampling, labels, seed) for seed in seeds])
    return accuracy(images, labels * len(seeds)), images


def save_grid(images: np.ndarray, columns: int, path: Path, scale: int = 2) -> None:
    """Tile images row by row into one PNG."""
    rows = -(-len(images) // columns)
    padded = np.concatenate([images, np.zeros((rows * columns - len(images), *images.shape[1:]), np.uint8)])
    tiles = padded.reshape(rows, columns, *images.shape[1:]).transpose(0, 2, 1, 3, 4)
    grid = tiles.reshape(rows * images.shape[1], columns * images.shape[2], 3)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def print_table(results: dict) -> None:
    print(f"{'model':<8} {'sampler':<9} " + " ".join(f"{m:>10}" for m in METRICS))
    for model, by_sampler in results.items():
        for sampler, scores in by_sampler.items():
            print(f"{model:<8} {sampler:<9} " + " ".join(f"{scores[m]:>10.3f}" for m in METRICS))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="diffusers folder")
    parser.add_argument("--samplers", nargs="+", default=["euler", "dpmpp_2m"], choices=sorted(SAMPLERS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=6.0)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--grid", type=Path, help="write the trained model's first-sampler images here")
    parser.add_argument("--no-floor", action="store_true", help="skip the random-weight model")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    labels = all_labels()
    trained = StableDiffusionPipeline.from_pretrained(args.model)
    models = {"trained": trained} if args.no_floor else {"trained": trained, "random": random_weights_like(trained, 0)}
    results: dict = {}
    for name, pipe in models.items():
        pipe.set_progress_bar_config(disable=True)
        results[name] = {}
        for sampler in args.samplers:
            sampling = Sampling(sampler, args.steps, args.guidance)
            results[name][sampler], images = evaluate(pipe, sampling, labels, args.seeds)
            if args.grid and name == "trained" and sampler == args.samplers[0]:
                save_grid(images, columns=15, path=args.grid)
    print_table(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {"prompts": len(labels), "seeds": args.seeds, "steps": args.steps, "guidance": args.guidance}
        args.json.write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
