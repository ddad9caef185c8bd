"""Shared fixtures: one tiny random SD1 diffusers folder and its exported bundle, built once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def clip_tokenizer_dir(tmp_path_factory):
    """CLIP ViT-L/14's vocab.json + merges.txt, as an export writes them from the shipped merges.txt."""
    from sdrt.export.clip_vocab import read_tokenizer_files
    from sdrt.export.ldm_config import CLIP_L14_DIR

    out = tmp_path_factory.mktemp("clip-tokenizer")
    read_tokenizer_files(CLIP_L14_DIR, out)
    return out


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory):
    """A tiny SD1 diffusers folder (transformers 5 layout), random weights from seed 0."""
    pytest.importorskip("diffusers")
    from tiny_models import save_tiny_sd1

    return save_tiny_sd1(tmp_path_factory.mktemp("models") / "tiny-sd1")


@pytest.fixture(scope="session")
def tiny_sd1_bundle(tiny_sd1_dir, tmp_path_factory):
    """The bundle exported from `tiny_sd1_dir` (exported once; tests must not modify it)."""
    from sdrt.export import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-sd1"
    export_bundle(tiny_sd1_dir, out)
    return out


def _tiny_sd2_dir(tmp_path_factory, prediction: str):
    pytest.importorskip("diffusers")
    from tiny_models import save_tiny_sd2

    return save_tiny_sd2(tmp_path_factory.mktemp("models") / f"tiny-sd2-{prediction}", prediction)


def _export(source, tmp_path_factory, name: str):
    from sdrt.export import export_bundle

    out = tmp_path_factory.mktemp("bundles") / name
    export_bundle(source, out)
    return out


@pytest.fixture(scope="session")
def tiny_sd2_v_dir(tmp_path_factory):
    """A tiny SD2 diffusers folder, v-prediction (as SD 2.1 768), random weights from seed 0."""
    return _tiny_sd2_dir(tmp_path_factory, "v_prediction")


@pytest.fixture(scope="session")
def tiny_sd2_eps_dir(tmp_path_factory):
    """A tiny SD2 diffusers folder, epsilon (as SD 2.x-base 512), random weights from seed 0."""
    return _tiny_sd2_dir(tmp_path_factory, "epsilon")


@pytest.fixture(scope="session")
def tiny_sd2_v_bundle(tiny_sd2_v_dir, tmp_path_factory):
    """The bundle exported from `tiny_sd2_v_dir` (exported once; tests must not modify it)."""
    return _export(tiny_sd2_v_dir, tmp_path_factory, "tiny-sd2-v")


@pytest.fixture(scope="session")
def tiny_sd2_eps_bundle(tiny_sd2_eps_dir, tmp_path_factory):
    """The bundle exported from `tiny_sd2_eps_dir` (exported once; tests must not modify it)."""
    return _export(tiny_sd2_eps_dir, tmp_path_factory, "tiny-sd2-eps")


@pytest.fixture(scope="session")
def tiny_sd1_safety_dir(tmp_path_factory):
    """The tiny SD1 folder with a tiny random safety checker and its feature extractor (nothing flagged)."""
    pytest.importorskip("diffusers")
    from tiny_models import save_tiny_sd1_with_safety

    return save_tiny_sd1_with_safety(tmp_path_factory.mktemp("models") / "tiny-sd1-safety")


@pytest.fixture(scope="session")
def tiny_sd1_safety_bundle(tiny_sd1_safety_dir, tmp_path_factory):
    """The bundle exported from `tiny_sd1_safety_dir`, safety_checker included (tests must not modify it)."""
    return _export(tiny_sd1_safety_dir, tmp_path_factory, "tiny-sd1-safety")


@pytest.fixture(scope="session")
def tiny_sd1_inpaint_dir(tmp_path_factory):
    """The tiny SD1 folder with a 9-channel inpainting UNet, random weights."""
    pytest.importorskip("diffusers")
    from tiny_models import save_tiny_sd1_inpaint

    return save_tiny_sd1_inpaint(tmp_path_factory.mktemp("models") / "tiny-sd1-inpaint")


@pytest.fixture(scope="session")
def tiny_sd1_inpaint_bundle(tiny_sd1_inpaint_dir, tmp_path_factory):
    """The bundle exported from `tiny_sd1_inpaint_dir` (exported once; tests must not modify it)."""
    return _export(tiny_sd1_inpaint_dir, tmp_path_factory, "tiny-sd1-inpaint")


@pytest.fixture(scope="module")
def sdrt_pipe(tiny_sd1_bundle):
    """The tiny SD1 bundle loaded on ONNX Runtime, shared by a test module's parity tests."""
    from sdrt.runtime.pipeline import Pipeline

    with Pipeline.load(tiny_sd1_bundle, backend="onnxruntime") as pipe:
        yield pipe


@pytest.fixture(scope="session")
def tiny_sd1_openvino_bundle(tiny_sd1_bundle, tmp_path_factory):
    """`tiny_sd1_bundle` converted to OpenVINO IR, fp32 (converted once; tests must not modify it)."""
    pytest.importorskip("openvino")
    from sdrt.export.openvino import convert_bundle

    out = tmp_path_factory.mktemp("ov") / "tiny-ov"
    convert_bundle(tiny_sd1_bundle, out)
    return out


# The shipped model's diffusers folder (the source sdrt/models/sdrt-shapes was exported from).
SHIPPED_SOURCE = Path(__file__).resolve().parent.parent / "models" / "sdrt-shapes"


@pytest.fixture(scope="session")
def coreml_shapes_bundle(tmp_path_factory):
    """The shipped model's source as a Core ML bundle: the defaults (split_einsum attention, the model's own size),
    int8 weights. Enumerated sizes and palettes cost more to convert: tests/test_coreml.py converts single
    components with them."""
    pytest.importorskip("coremltools")
    from sdrt.export.coreml import export_coreml

    out = tmp_path_factory.mktemp("bundles") / "shapes-coreml"
    export_coreml(SHIPPED_SOURCE, out, compression="int8")
    return out


@pytest.fixture(scope="session")
def tiny_loras(tiny_sd1_dir, tmp_path_factory) -> dict:
    """Random LoRAs for the tiny SD1 model, by format: kohya (.safetensors and the same as .pt), kohya changing
    only the text encoder, and diffusers / PEFT with its adapter metadata."""
    pytest.importorskip("peft")
    from diffusers import UNet2DConditionModel
    from tiny_loras import kohya_state_dict, peft_state_dict, save
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd1_dir / "unet")
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd1_dir / "text_encoder")
    out = tmp_path_factory.mktemp("loras")
    kohya = kohya_state_dict(unet, text_encoder)
    text_only = {k: v for k, v in kohya_state_dict(unet, text_encoder, seed=1).items() if k.startswith("lora_te_")}
    peft, metadata = peft_state_dict(unet, text_encoder, seed=2)
    return {
        "kohya": save(kohya, out / "kohya.safetensors"),
        "kohya_pt": save(kohya, out / "pt" / "kohya.pt"),
        "text_only": save(text_only, out / "text-only.safetensors"),
        "peft": save(peft, out / "peft.safetensors", metadata),
    }


# Compiler settings of the torch backend's tests (sdrt.backends.torch: AOTInductor on the CPU). Measured on the shipped
# model's three components from a cold inductor cache, 2-core shared machine: one compile process or inductor's
# default pool, 53-61 s either way (one process starts no workers); `cpp.vec_isa_ok` takes the vector instruction
# set from /proc/cpuinfo instead of compiling a probe program per instruction set (3-15 s once per inductor cache).
# `cpp.simdlen: 0` (scalar kernels) cut the UNet's compile by a fifth to a third, but is not the code users run.
TORCH_TEST_COMPILE = {"compile_threads": 1, "cpp.vec_isa_ok": True}


@pytest.fixture(scope="session")
def torch_options(tmp_path_factory):
    """TorchBackend options every torch test shares: one package cache for the session and TORCH_TEST_COMPILE."""
    pytest.importorskip("torch")
    return {"device": "cpu", "cache_dir": tmp_path_factory.mktemp("torch-packages"),
            "inductor_options": TORCH_TEST_COMPILE}


@pytest.fixture(scope="session")
def tiny_torch_bundle(tiny_sd1_dir, tmp_path_factory):
    """`tiny_sd1_dir` exported by `sdrt export --target torch` (exported once; tests must not modify it)."""
    from sdrt.cli import main

    out = tmp_path_factory.mktemp("bundles") / "tiny-sd1-torch"
    assert main(["export", str(tiny_sd1_dir), "-o", str(out), "--target", "torch"]) == 0
    return out


@pytest.fixture(scope="session")
def coreml_tiny_bundle(tiny_sd1_safety_dir, tmp_path_factory):
    """The tiny SD1 folder with its safety checker as a Core ML bundle: original attention, int8 weights (slow tier:
    the default tier converts its cheap components one by one)."""
    pytest.importorskip("coremltools")
    from sdrt.export.coreml import export_coreml

    out = tmp_path_factory.mktemp("bundles") / "tiny-coreml"
    export_coreml(tiny_sd1_safety_dir, out, attention="original", compression="int8")
    return out
