"""sdrt's runtime on one backend (no torch in this venv): options pick the backend and, for OpenVINO, the precision."""
from __future__ import annotations

import common  # first: starts the clock before the engine is imported

from sdrt import GenerationRequest, Pipeline


ENGINE_OPTIONS = ("device", "precision", "shapes", "cache_dir")  # passed through to the backend when given


def load(job: common.Job):
    options = {k: job.options[k] for k in ENGINE_OPTIONS if k in job.options}
    if job.options["backend"] in ("openvino", "tensorrt") and "cache_dir" not in options:
        options["cache"] = False  # cold start compiles, unless the harness measures a warm cache
    return Pipeline.load(job.model, backend=job.options["backend"], **options)


def request(job: common.Job) -> GenerationRequest:
    """The job as a request; with a LoRA (an LCM-LoRA), steps and guidance are left to the kind it brings."""
    lora = job.options.get("lora")
    fields = {"loras": [lora]} if lora else {"steps": job.steps, "guidance_scale": job.guidance_scale}
    return GenerationRequest(prompt=job.prompt, negative_prompt=job.negative_prompt, width=job.size, height=job.size,
                             seed=job.seed, **fields)


def generate(pipe, job: common.Job, clock: common.Clock):
    last = None
    for last in pipe.denoise(request(job)):
        clock.step()
    return pipe.decode(last.vp_latents())[0]


def describe(pipe, job: common.Job) -> dict:
    unet, resolved = pipe.manifest.components["unet"], request(job).resolve(pipe.manifest)
    described = {
        "precision": compute_precision(pipe),
        "weights": unet.precision,
        "backend_label": pipe.backend.label,
        "sampler": resolved.sampler,
        "kind": resolved.kind,
        "unet_batch": 2 if resolved.guidance_scale > 1 else 1,  # guidance off (LCM) skips the unconditional half
    }
    if job.options.get("device", "cpu") != "cpu" or job.options["backend"] == "tensorrt":
        from sdrt.backends.cuda import memory_in_use

        described["gpu_memory_bytes"] = memory_in_use()  # the whole device's use, as diffusers_cuda.py reports
    return described


def compute_precision(pipe) -> str:
    """What the engine computes the UNet in: OpenVINO's compiled INFERENCE_PRECISION_HINT; TensorRT and ONNX Runtime:
    the precision of the graphs they run (fp16 variants on GPUs by default)."""
    if pipe.backend.name != "openvino":
        return getattr(pipe.backend, "precision", "fp32")
    requests = getattr(pipe.session("unet"), "_requests", None)  # the compiled model behind the session, if exposed
    if requests:
        value = requests[0].get_compiled_model().get_property("INFERENCE_PRECISION_HINT")
        return getattr(value, "get_type_name", lambda: str(value))()
    return pipe.backend.precision


if __name__ == "__main__":
    common.main(load, generate, describe)
