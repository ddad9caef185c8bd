"""OpenVINO GenAI (a file not named openvino_genai.py, which would shadow the package): Text2ImagePipeline (C++, no torch) on optimum-intel's export with its converted tokenizer,
reshaped static to the job's size as its samples recommend for CPU, compiled without a cache (a cold start compiles).
"""
from __future__ import annotations

import common  # first: starts the clock before the engine is imported
import openvino_genai
from PIL import Image

DEVICE = "CPU"


def load(job: common.Job):
    pipe = openvino_genai.Text2ImagePipeline(job.model)
    pipe.reshape(1, job.size, job.size, job.guidance_scale)  # images per prompt, height, width, guidance
    pipe.compile(DEVICE)
    return pipe


def generate(pipe, job: common.Job, clock: common.Clock):
    def on_step(step, num_steps, latent) -> bool:
        clock.step()
        return False  # False: go on

    image = pipe.generate(job.prompt, negative_prompt=job.negative_prompt, width=job.size, height=job.size,
                          num_inference_steps=job.steps, guidance_scale=job.guidance_scale, rng_seed=job.seed,
                          callback=on_step)
    return Image.fromarray(image.data[0])


def describe(pipe, job: common.Job) -> dict:
    return {"precision": "auto", "openvino_genai": openvino_genai.__version__}


if __name__ == "__main__":
    common.main(load, generate, describe)
