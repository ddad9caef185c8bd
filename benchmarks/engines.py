"""The engines compared, and the export steps each needs, as data.

An export step turns the random SD 1.5 diffusers folder (or another step's output) into the engine's format with
the tool's own command line; an engine runs one worker script in one venv on the last step's output.
"""
from __future__ import annotations

from dataclasses import dataclass, field

SOURCE = "source"  # the diffusers folder itself: engines that load it need no export
LORA_FILE = "pytorch_lora_weights.safetensors"  # in an Export folder an Engine names as its `lora`


@dataclass(frozen=True)
class Export:
    """A command run in `venv`; "{out}" is the folder it creates, "{source}" / "{<export name>}" its inputs."""

    name: str
    venv: str
    command: tuple[str, ...]
    needs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Engine:
    """One column of the comparison: a worker in a venv, on a model, with engine options."""

    name: str
    venv: str
    worker: str
    model: str  # SOURCE or an Export name
    options: dict = field(default_factory=dict)
    reference: bool = False  # the fp32 reference images are compared against
    lora: str = ""  # an Export whose folder holds LORA_FILE, applied by the worker (its kind sets steps, guidance)


EXPORTS = {
    e.name: e
    for e in (
        Export("optimum-onnx", "optimum-onnx",
               ("optimum-cli", "export", "onnx", "--model", "{source}", "--task", "text-to-image", "{out}")),
        # fp32 weights, as the other exports; which precision OpenVINO then computes in is the device's choice.
        Export("optimum-openvino", "optimum-intel",
               ("optimum-cli", "export", "openvino", "--model", "{source}", "--task", "text-to-image",
                "--weight-format", "fp32", "{out}")),
        # optimum-intel's export with its tokenizer converted to OpenVINO models, as OpenVINO GenAI reads it.
        Export("genai-openvino", "openvino-genai", ("python", "benchmarks/workers/genai_export.py",
                                                    "{optimum-openvino}", "{out}"), needs=("optimum-openvino",)),
        # A random LoRA with LCM-LoRA's layout (rank 64 over its target modules), in lcm-lora-sdv1-5's file name.
        Export("lcm-lora", "dev", ("python", "benchmarks/workers/make_lcm_lora.py", "{source}", "{out}")),
        Export("sdrt-onnx", "dev", ("python", "-m", "sdrt", "export", "{source}", "-o", "{out}")),
        Export("sdrt-openvino-fp32", "sdrt-openvino", ("sdrt", "convert", "{sdrt-onnx}", "-o", "{out}"),
               needs=("sdrt-onnx",)),
        Export("sdrt-openvino-int8", "sdrt-openvino",
               ("sdrt", "convert", "{sdrt-onnx}", "-o", "{out}", "--weights", "int8"), needs=("sdrt-onnx",)),
        Export("sdrt-openvino-int8q", "sdrt-openvino",
               ("sdrt", "convert", "{sdrt-onnx}", "-o", "{out}", "--weights", "int8", "--quantize-unet"),
               needs=("sdrt-onnx",)),
    )
}

ENGINES = {
    e.name: e
    for e in (
        Engine("diffusers-torch", "diffusers-torch", "diffusers_torch.py", SOURCE, reference=True),
        Engine("optimum-onnxruntime", "optimum-onnx", "optimum_onnx.py", "optimum-onnx"),
        Engine("optimum-openvino", "optimum-intel", "optimum_openvino.py", "optimum-openvino", {"precision": "auto"}),
        Engine("optimum-openvino-f32", "optimum-intel", "optimum_openvino.py", "optimum-openvino",
               {"precision": "f32"}),
        Engine("openvino-genai", "openvino-genai", "genai_text2image.py", "genai-openvino"),
        Engine("sdrt-onnxruntime", "sdrt-onnxruntime", "sdrt_engine.py", "sdrt-onnx", {"backend": "onnxruntime"}),
        Engine("sdrt-openvino", "sdrt-openvino", "sdrt_engine.py", "sdrt-openvino-fp32",
               {"backend": "openvino", "precision": "auto"}),
        Engine("sdrt-openvino-f32", "sdrt-openvino", "sdrt_engine.py", "sdrt-openvino-fp32",
               {"backend": "openvino", "precision": "f32"}),
        Engine("sdrt-openvino-int8", "sdrt-openvino", "sdrt_engine.py", "sdrt-openvino-int8",
               {"backend": "openvino", "precision": "auto"}),
        # int8 activations too, on the UNet's SiLU -> convolution layers (`sdrt convert --quantize-unet`).
        Engine("sdrt-openvino-int8q", "sdrt-openvino", "sdrt_engine.py", "sdrt-openvino-int8q",
               {"backend": "openvino", "precision": "auto"}),
        # LCM-LoRA applied at load: the request becomes LCM (4 steps, guidance off, so UNet batch 1).
        Engine("sdrt-openvino-lcm-lora", "sdrt-openvino", "sdrt_engine.py", "sdrt-openvino-fp32",
               {"backend": "openvino", "precision": "auto"}, lora="lcm-lora"),
        Engine("sdrt-openvino-int8q-lcm-lora", "sdrt-openvino", "sdrt_engine.py", "sdrt-openvino-int8q",
               {"backend": "openvino", "precision": "auto"}, lora="lcm-lora"),
    )
}


def export_chain(model: str) -> list[str]:
    """The exports that produce `model`, inputs first."""
    if model == SOURCE:
        return []
    chain = [name for need in EXPORTS[model].needs for name in export_chain(need)]
    return [*dict.fromkeys(chain), model]
