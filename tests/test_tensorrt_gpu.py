"""GPU tier: TensorRT (for RTX, or 10/11) and ONNX Runtime's CUDA provider on a real NVIDIA GPU, each component and
whole images against ONNX Runtime's CPU provider in fp32, the engine cache, both profiles, CUDA graph replays and the
fp32 fallback. Written without a GPU to run it on (the project's machines have none): untested.

    pytest -m gpu tests/test_tensorrt_gpu.py
    SDRT_SD15_TENSORRT_BUNDLE=DIR pytest -m gpu tests/test_tensorrt_gpu.py   # also a full-size SD 1.5 at 512x512
      (DIR: `sdrt convert SD15_BUNDLE -o DIR --target tensorrt`; random weights are fine)
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from sdrt.backends import get_backend
from sdrt.bundle import read_manifest
from sdrt.errors import BackendError
from sdrt.runtime.image import psnr
from sdrt.runtime.pipeline import Pipeline, default_bundle
from sdrt.runtime.request import GenerationRequest

pytest.importorskip("tensorrt_rtx", reason="needs TensorRT for RTX (sdrt[tensorrt-rtx])")


def _gpu_problem() -> str | None:
    try:
        from sdrt.backends.cuda import probe

        probe()
        return None
    except BackendError as e:
        return str(e)


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_gpu_problem() is not None, reason=_gpu_problem() or "")]

# max |engine - reference| / max |reference|, the reference being the component's fp32 graph on ONNX Runtime CPU.
# fp16 variants: the CPU tests' 1e-2 (tests/test_tensorrt.py), doubled for GPU kernels that accumulate in another
# order. fp32 graphs: TensorRT may run fp32 matrix products in TF32 (10-bit mantissa, as fp16's), so 1e-2 too.
FP16_RELATIVE_TOL = 2e-2
FP32_RELATIVE_TOL = 1e-2
IMAGE_MIN_PSNR_DB = 35.0  # whole images against ONNX Runtime CPU fp32, as the CPU tests' fp16 bound
# Full-size SD 1.5: the conversion's own gate (sdrt.export.tensorrt.MIN_PSNR_DB), which the bundle passed on the CPU.
FULL_SIZE_MIN_PSNR_DB = 30.0
REQUEST = GenerationRequest(prompt="a red circle above a blue square", seed=3, steps=12, sampler="DPM++ 2M",
                            watermark=False)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from sdrt.export.tensorrt import convert_bundle

    out = tmp_path_factory.mktemp("gpu") / "shapes-trt"
    convert_bundle(default_bundle(), out)
    return out


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "engines"


def _relative(expected: np.ndarray, got: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - expected).max() / np.abs(expected).max())


def _feeds(name: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if name == "text_encoder":
        return {"inputs_embeds": rng.standard_normal((2, 77, 32)).astype(np.float32)}  # token embeddings
    if name == "unet":
        return {"sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
                "timestep": np.array([981.5, 981.5], np.float32),
                "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32)}
    if name == "vae_decoder":
        return {"latents": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)}
    return {"image": rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)}


@pytest.mark.parametrize("name", ["text_encoder", "unet", "vae_decoder", "vae_encoder"])
def test_each_component_against_onnxruntime_cpu(bundle, cache_dir, name):
    manifest = read_manifest(bundle)
    feeds = _feeds(name, np.random.default_rng(0))
    with Pipeline(bundle, manifest, get_backend("onnxruntime", precision="f32")) as ref, \
            Pipeline(bundle, manifest, get_backend("tensorrt", cache_dir=cache_dir)) as gpu:
        expected = ref.prepared(name, feeds).run(feeds)
        got = gpu.prepared(name, feeds).run(feeds)
    tolerance = FP16_RELATIVE_TOL if manifest.components[name].variants else FP32_RELATIVE_TOL
    for output, value in expected.items():
        assert got[output].dtype == value.dtype and got[output].shape == value.shape
        assert _relative(value, got[output]) <= tolerance


@pytest.mark.parametrize("shapes", ["static", "dynamic"])
def test_images_against_onnxruntime_cpu(bundle, cache_dir, shapes):
    request = REQUEST if shapes == "static" else replace(REQUEST, width=256, height=320)
    with Pipeline.load(bundle, backend="onnxruntime", precision="f32") as ref:
        expected = ref.generate(request)[0].image
    with Pipeline.load(bundle, backend="tensorrt", shapes=shapes, cache_dir=cache_dir) as gpu:
        out = gpu.generate(request)[0]
    assert psnr(expected, out.image) >= IMAGE_MIN_PSNR_DB
    assert "Backend: tensorrt" in out.parameters and "Precision fallback" not in out.parameters


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.entry/engine.plan"))


def test_engines_are_built_once_and_a_damaged_one_is_rebuilt(bundle, cache_dir, caplog):
    start = time.perf_counter()
    with Pipeline.load(bundle, backend="tensorrt", cache_dir=cache_dir) as pipe:
        first = pipe.generate(REQUEST)[0].image
    built_s, plans = time.perf_counter() - start, _entries(cache_dir)
    assert len(plans) == 3  # text encoder, UNet, VAE decoder at one shape each
    start = time.perf_counter()
    with Pipeline.load(bundle, backend="tensorrt", cache_dir=cache_dir) as pipe:
        again = pipe.generate(REQUEST)[0].image
    assert _entries(cache_dir) == plans and time.perf_counter() - start < built_s
    assert psnr(first, again) == float("inf")  # the same engines: the same image
    damaged = plans[0]
    damaged.write_bytes(damaged.read_bytes()[:-4096])
    with caplog.at_level(logging.WARNING, logger="sdrt.cache"), \
            Pipeline.load(bundle, backend="tensorrt", cache_dir=cache_dir) as pipe:
        pipe.generate(REQUEST)
    assert "does not match its recorded checksum" in caplog.text and len(_entries(cache_dir)) == 3


def test_dynamic_engine_serves_sizes_in_its_range(bundle, cache_dir):
    with Pipeline.load(bundle, backend="tensorrt", shapes="dynamic", cache_dir=cache_dir) as pipe:
        for size in (256, 320, 384):
            pipe.generate(replace(REQUEST, width=size, height=size, steps=2))
    assert len(_entries(cache_dir)) == 3  # one engine per component for all three sizes


def test_cuda_graph_replays_give_the_first_run(bundle, cache_dir):
    feeds = _feeds("unet", np.random.default_rng(1))
    with Pipeline.load(bundle, backend="tensorrt", cache_dir=cache_dir) as pipe:
        unet = pipe.prepared("unet", feeds)
        runs = [unet.run(feeds)["model_output"] for _ in range(5)]  # from the third run, a graph replays
        other = unet.run({**feeds, "sample": feeds["sample"] * 0.5})["model_output"]
    for out in runs[1:]:
        np.testing.assert_array_equal(out, runs[0])
    assert not np.array_equal(other, runs[0])  # replays read the new input, not a captured copy


def test_fp16_overflow_falls_back_to_the_fp32_engine(bundle, cache_dir):
    feeds = _feeds("unet", np.random.default_rng(0))
    feeds["sample"] = feeds["sample"] * 3e4  # beyond fp16's range: the fp16 engine returns inf
    with Pipeline.load(bundle, backend="tensorrt", cache_dir=cache_dir) as pipe:
        out = pipe.prepared("unet", feeds).run(feeds)["model_output"]
        assert np.isfinite(out).all() and pipe.session("unet").note == "unet fp32 (fp16 gave NaN/inf)"
    with Pipeline.load(bundle, backend="onnxruntime", precision="f32") as ref:
        expected = ref.prepared("unet", feeds).run(feeds)["model_output"]
    assert _relative(expected, out) <= FP32_RELATIVE_TOL


def test_onnxruntime_cuda_with_fp16_variants(bundle):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu")
    with Pipeline.load(bundle, backend="onnxruntime", precision="f32") as ref:
        expected = ref.generate(REQUEST)[0].image
    with Pipeline.load(bundle, backend="onnxruntime", device="cuda") as gpu:
        out = gpu.generate(REQUEST)[0]
    assert "Backend: onnxruntime cuda fp16" in out.parameters
    assert psnr(expected, out.image) >= IMAGE_MIN_PSNR_DB


@pytest.mark.skipif(not os.environ.get("SDRT_SD15_TENSORRT_BUNDLE"), reason="set SDRT_SD15_TENSORRT_BUNDLE")
def test_full_size_sd15_at_512(cache_dir):
    sd15 = Path(os.environ["SDRT_SD15_TENSORRT_BUNDLE"])
    request = GenerationRequest(prompt="an astronaut riding a horse", seed=0, steps=4, width=512, height=512,
                                watermark=False)
    with Pipeline.load(sd15, backend="onnxruntime", precision="f32") as ref:
        expected = ref.generate(request)[0].image
    with Pipeline.load(sd15, backend="tensorrt", cache_dir=cache_dir) as gpu:
        got = gpu.generate(request)[0].image
    assert psnr(expected, got) >= FULL_SIZE_MIN_PSNR_DB
