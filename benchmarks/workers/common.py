"""What every engine worker shares: the request it runs, the clock around the denoising loop, and its result line.

A worker is one process in its engine's venv: it loads the engine, generates the same image twice (the first run
is the cold start, the second the warm one) and prints one RESULT line of JSON. Imports stay standard-library:
each venv has its own numpy, torch or neither.
"""
from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

PROCESS_START = time.perf_counter()  # before the worker imports its engine
RESULT_PREFIX = "BENCHMARK-RESULT "


@dataclass(frozen=True)
class Job:
    """What run.py asks a worker to do (passed as one JSON argument)."""

    model: str  # the engine's model: a diffusers folder, an exported folder or an sdrt bundle
    size: int
    steps: int
    seed: int
    prompt: str
    negative_prompt: str
    guidance_scale: float
    image: str  # where to save the warm run's image (PNG), compared across engines by PSNR
    options: dict

    @classmethod
    def from_argv(cls) -> Job:
        return cls(**json.loads(sys.argv[1]))


class Clock:
    """Timestamps of one generation: its start, the end of every denoising step, and the decoded image."""

    def __init__(self):
        self.start = time.perf_counter()
        self.steps: list[float] = []
        self.end = float("nan")

    def step(self) -> None:
        self.steps.append(time.perf_counter())

    def done(self) -> None:
        self.end = time.perf_counter()

    @property
    def intervals(self) -> list[float]:
        """Seconds of each step after the first (the first also encodes the prompt and, cold, compiles)."""
        return [b - a for a, b in zip(self.steps, self.steps[1:])]


# generate(pipe, clock) -> the image as a PIL image; it calls clock.step() after each denoising step.
Generate = Callable[[object, Clock], object]


def diffusers_call(pipe, job: Job, clock: Clock, sync: Callable[[], None] | None = None):
    """One image from a diffusers-style pipeline (diffusers, optimum): the job's request, a seeded CPU generator
    as diffusers uses, and the clock ticked after every step (after `sync()`: a GPU pipeline queues work ahead of
    the host). torch is imported here: those venvs all have it."""
    import torch

    def on_step(pipe, i, t, kwargs):
        if sync is not None:
            sync()
        clock.step()
        return kwargs

    return pipe(
        job.prompt, negative_prompt=job.negative_prompt, height=job.size, width=job.size,
        num_inference_steps=job.steps, guidance_scale=job.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(job.seed), callback_on_step_end=on_step,
    ).images[0]


def measure(load: Callable[[], object], generate: Generate, describe: Callable[[object], dict], job: Job) -> dict:
    """Load, generate twice (cold, then warm), save the warm image; the timings and what the engine reports."""
    imported = time.perf_counter()
    cold = Clock()
    pipe = load()
    loaded = time.perf_counter()
    first = generate(pipe, cold)
    cold.done()
    warm = Clock()
    image = generate(pipe, warm)
    warm.done()
    image.save(job.image)
    steps = cold.intervals + warm.intervals
    return {
        "import_s": imported - PROCESS_START,
        "load_s": loaded - cold.start,
        "cold_start_s": cold.steps[0] - cold.start,  # load call -> first denoising step done
        "first_image_s": cold.end - cold.start,
        "step_s": statistics.median(steps),
        "step_s_all": steps,
        "unet_evaluations": len(warm.steps),
        "vae_decode_s": warm.end - warm.steps[-1],  # last step -> image: VAE decode and conversion to 8 bits
        "image_s": warm.end - warm.start,  # prompt -> image, warm
        "deterministic": list(first.getdata()) == list(image.getdata()),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux reports KiB
        **describe(pipe),
    }


def main(load: Callable[[Job], object], generate: Callable[[object, Job, Clock], object],
         describe: Callable[[object, Job], dict]) -> None:
    """Run a worker: parse the job, measure, print the RESULT line."""
    job = Job.from_argv()
    Path(job.image).parent.mkdir(parents=True, exist_ok=True)
    result = measure(lambda: load(job), lambda pipe, clock: generate(pipe, job, clock),
                     lambda pipe: describe(pipe, job), job)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
