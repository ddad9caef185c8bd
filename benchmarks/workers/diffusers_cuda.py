"""The GPU reference: diffusers' StableDiffusionPipeline in fp16 on CUDA, eager or with the UNet compiled by
torch.compile(mode="max-autotune"), which captures CUDA graphs (diffusers' "torch.compile" optimization guide)."""
from __future__ import annotations

import common  # first: starts the clock before torch is imported
import torch
from diffusers import StableDiffusionPipeline


def load(job: common.Job):
    pipe = StableDiffusionPipeline.from_pretrained(
        job.model, torch_dtype=torch.float16, safety_checker=None, requires_safety_checker=False
    ).to("cuda")
    if job.options.get("compile"):
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.unet = torch.compile(pipe.unet, mode="max-autotune", fullgraph=True)
    return pipe


def generate(pipe, job: common.Job, clock: common.Clock):
    with torch.inference_mode():
        return common.diffusers_call(pipe, job, clock, sync=torch.cuda.synchronize)


def describe(pipe, job: common.Job) -> dict:
    free, total = torch.cuda.mem_get_info()
    return {"precision": "fp16", "gpu_memory_bytes": total - free, "gpu": torch.cuda.get_device_name(),
            "compiled": bool(job.options.get("compile")), "torch": torch.__version__}


if __name__ == "__main__":
    common.main(load, generate, describe)
