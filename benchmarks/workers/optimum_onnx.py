"""optimum-onnx: ORTStableDiffusionPipeline (diffusers' loop, ONNX Runtime CPU) on `optimum-cli export onnx`."""
from __future__ import annotations

import common  # first: starts the clock before torch is imported
import onnxruntime
from optimum.onnxruntime import ORTStableDiffusionPipeline


def load(job: common.Job):
    return ORTStableDiffusionPipeline.from_pretrained(job.model, provider="CPUExecutionProvider")


def describe(pipe, job: common.Job) -> dict:
    # ONNX Runtime's CPU provider computes fp32 graphs in fp32 (no implicit bf16).
    return {"precision": "fp32", "onnxruntime": onnxruntime.__version__, "scheduler": type(pipe.scheduler).__name__}


if __name__ == "__main__":
    common.main(load, common.diffusers_call, describe)
