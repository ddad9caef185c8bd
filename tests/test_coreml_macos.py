"""Core ML on a Mac (`pytest -m macos`, Apple Silicon, macOS 14+): the shipped model's source exported to Core ML
generates the image ONNX Runtime draws from the shipped ONNX bundle, on every compute unit.

Not run by this project (it has no Mac): written for whoever runs the suite on one. The bar is ml-stable-diffusion's
35 dB PSNR (torch2coreml.py ABSOLUTE_MIN_PSNR), here on 8-bit images of the same request and seed; Core ML computes
in fp16 where ONNX Runtime computes in fp32.
"""
from __future__ import annotations

import sys
from dataclasses import replace

import pytest

pytestmark = [pytest.mark.macos,
              pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predicts on macOS only")]

from sdrt.export.convert import GATE_REQUEST  # noqa: E402
from sdrt.runtime.image import psnr  # noqa: E402
from sdrt.runtime.pipeline import Pipeline, default_bundle  # noqa: E402

MIN_PSNR_DB = 35.0
COMPUTE_UNITS = ("cpu_and_ne", "cpu_and_gpu", "all")
WIDE = (96, 64)  # a second, enumerated size


@pytest.fixture(scope="module")
def coreml_bundle(tmp_path_factory):
    """The shipped model's source as a Core ML bundle with the given attention, at its own size and WIDE (each
    exported once)."""
    pytest.importorskip("coremltools")
    pytest.importorskip("torch")
    from conftest import SHIPPED_SOURCE
    from sdrt.export.coreml import export_coreml

    bundles = {}

    def bundle(attention: str = "split_einsum"):
        if attention not in bundles:
            bundles[attention] = tmp_path_factory.mktemp("bundles") / f"coreml-{attention}"
            export_coreml(SHIPPED_SOURCE, bundles[attention], attention=attention, sizes=(WIDE,))
        return bundles[attention]

    return bundle


def _images(bundle, request, backend: str, **options):
    with Pipeline.load(bundle, backend=backend, **options) as pipe:
        return [out.image for out in pipe.generate(request)]


@pytest.fixture(scope="module")
def onnx_images():
    """ONNX Runtime's images of the shipped ONNX bundle, by (width, height, batch)."""
    pytest.importorskip("onnxruntime")
    cache = {}

    def draw(request):
        key = (request.width, request.height, request.batch_size)
        if key not in cache:
            cache[key] = _images(default_bundle(), request, "onnxruntime")
        return cache[key]

    return draw


def test_every_package_predicts_what_torch_computes(coreml_bundle):
    from sdrt.bundle import read_manifest

    for c in read_manifest(coreml_bundle()).components.values():
        prediction = c.validation["prediction"]
        assert prediction["psnr_db"] is None or prediction["psnr_db"] >= MIN_PSNR_DB, c.name


@pytest.mark.parametrize("units", COMPUTE_UNITS)
def test_split_einsum_draws_the_onnx_runtime_image(coreml_bundle, onnx_images, units, tmp_path):
    got = _images(coreml_bundle(), GATE_REQUEST, "coreml", compute_units=units, cache_dir=tmp_path)
    assert psnr(onnx_images(replace(GATE_REQUEST, width=64, height=64))[0], got[0]) >= MIN_PSNR_DB


def test_original_attention_on_the_gpu(coreml_bundle, onnx_images, tmp_path):
    got = _images(coreml_bundle("original"), GATE_REQUEST, "coreml", compute_units="cpu_and_gpu", cache_dir=tmp_path)
    assert psnr(onnx_images(replace(GATE_REQUEST, width=64, height=64))[0], got[0]) >= MIN_PSNR_DB


def test_enumerated_size_and_a_batch_split_into_guidance_pairs(coreml_bundle, onnx_images, tmp_path):
    request = replace(GATE_REQUEST, width=WIDE[0], height=WIDE[1], batch_size=2)
    got = _images(coreml_bundle(), request, "coreml", cache_dir=tmp_path)
    for want, have in zip(onnx_images(request), got, strict=True):
        assert psnr(want, have) >= MIN_PSNR_DB


def test_packages_compile_once(coreml_bundle, tmp_path):
    _images(coreml_bundle(), GATE_REQUEST, "coreml", cache_dir=tmp_path)
    first = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".entry"))
    _images(coreml_bundle(), GATE_REQUEST, "coreml", cache_dir=tmp_path)
    assert first and sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".entry")) == first
