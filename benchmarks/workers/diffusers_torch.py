"""The reference: diffusers' StableDiffusionPipeline on torch, fp32, CPU."""
from __future__ import annotations

import common  # first: starts the clock before torch is imported
import torch
from diffusers import StableDiffusionPipeline


def load(job: common.Job):
    return StableDiffusionPipeline.from_pretrained(
        job.model, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )


def generate(pipe, job: common.Job, clock: common.Clock):
    with torch.inference_mode():
        return common.diffusers_call(pipe, job, clock)


def describe(pipe, job: common.Job) -> dict:
    return {"precision": "fp32", "threads": torch.get_num_threads(), "scheduler": type(pipe.scheduler).__name__}


if __name__ == "__main__":
    common.main(load, generate, describe)
