"""optimum-onnx: ORTStableDiffusionPipeline (diffusers' loop, ONNX Runtime CPU) on `optimum-cli export onnx`."""
from __future__ import annotations

import common  # first: starts the clock before torch is imported
import onnxruntime
import torch
from optimum.onnxruntime import ORTStableDiffusionPipeline


def load(job: common.Job):
    return ORTStableDiffusionPipeline.from_pretrained(job.model, provider="CPUExecutionProvider")


def generate(pipe, job: common.Job, clock: common.Clock):
    def on_step(pipe, i, t, kwargs):
        clock.step()
        return kwargs

    return pipe(
        job.prompt, negative_prompt=job.negative_prompt, height=job.size, width=job.size,
        num_inference_steps=job.steps, guidance_scale=job.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(job.seed), callback_on_step_end=on_step,
    ).images[0]


def describe(pipe, job: common.Job) -> dict:
    # ONNX Runtime's CPU provider computes fp32 graphs in fp32 (no implicit bf16).
    return {"precision": "fp32", "onnxruntime": onnxruntime.__version__, "scheduler": type(pipe.scheduler).__name__}


if __name__ == "__main__":
    common.main(load, generate, describe)
