"""optimum-intel: OVStableDiffusionPipeline on `optimum-cli export openvino`, reshaped static to the job's size.

Static shapes (batch 1 image, so UNet batch 2 under guidance) are what optimum-intel recommends for CPU speed.
Option precision: "auto" keeps the CPU plugin's default (bf16 where the CPU has AVX512-BF16 or AMX), "f32" forces
fp32. No compile cache: a cold start compiles.
"""
from __future__ import annotations

import common  # first: starts the clock before torch is imported
import openvino
from optimum.intel import OVStableDiffusionPipeline


def load(job: common.Job):
    config = {} if job.options["precision"] == "auto" else {"INFERENCE_PRECISION_HINT": job.options["precision"]}
    pipe = OVStableDiffusionPipeline.from_pretrained(job.model, compile=False, ov_config=config)
    pipe.reshape(batch_size=1, height=job.size, width=job.size, num_images_per_prompt=1)
    pipe.compile()
    return pipe


def describe(pipe, job: common.Job) -> dict:
    compiled = pipe.unet.request  # the UNet's CompiledModel: what the plugin really runs
    value = compiled.get_property("INFERENCE_PRECISION_HINT")
    return {
        "precision": getattr(value, "get_type_name", lambda: str(value))(),
        "openvino": openvino.__version__,
        "performance_hint": str(compiled.get_property("PERFORMANCE_HINT")),
        "scheduler": type(pipe.scheduler).__name__,
    }


if __name__ == "__main__":
    common.main(load, common.diffusers_call, describe)
