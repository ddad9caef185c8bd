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
def coreml_tiny_bundle(tiny_sd1_safety_dir, tmp_path_factory):
    """The tiny SD1 folder with its safety checker as a Core ML bundle: original attention, int8 weights (slow tier:
    the default tier converts its cheap components one by one)."""
    pytest.importorskip("coremltools")
    from sdrt.export.coreml import export_coreml

    out = tmp_path_factory.mktemp("bundles") / "tiny-coreml"
    export_coreml(tiny_sd1_safety_dir, out, attention="original", compression="int8")
    return out
