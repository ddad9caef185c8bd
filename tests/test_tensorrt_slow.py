"""Slow tier: full-size SD 1.5 components (random weights, SD 1.5's configs) exported to ONNX, made into fp16
variants, and parsed by TensorRT for RTX with both profiles and the refit flag, no unsupported operator and every
weight mapped by name. No GPU needed; the cost is the export: the UNet takes minutes and ~16 GB of memory
(tests/test_export_slow.py), which is why this is not in the default tier.

    pytest -m slow tests/test_tensorrt_slow.py -k "text_encoder or vae"     # the parts that fit a small machine
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("tensorrt_rtx")

from test_export_slow import VAE_SCALE_FACTOR, full_size_sd1  # noqa: E402

from sdrt.backends.tensorrt_build import load_tensorrt  # noqa: E402
from sdrt.bundle import Component, Manifest, ModelInfo, ShapeRange, Variant  # noqa: E402
from sdrt.export.components import CHECK_SHAPES, axis_sizes, component_specs, sample_inputs  # noqa: E402
from sdrt.export.fp16_variant import variant_path, write_fp16_variant  # noqa: E402
from sdrt.export.onnx_export import export_onnx  # noqa: E402
from sdrt.export.tensorrt_check import check_component  # noqa: E402

pytestmark = pytest.mark.slow

SD15 = ModelInfo("sd1", "epsilon", 0.18215, default_size=512, name="sd15-random")


def _manifest(component: Component) -> Manifest:
    return Manifest(SD15, {component.name: component}, scheduler={}, shapes=ShapeRange())


@pytest.mark.parametrize("name", ["text_encoder", "vae_decoder", "vae_encoder", "unet"])
def test_full_size_component_parses_with_profiles_and_refit(tmp_path, name):
    model = full_size_sd1("vae" if name.startswith("vae") else name)
    spec = next(s for s in component_specs(model) if s.name == name)
    args = sample_inputs(spec, axis_sizes(CHECK_SHAPES[0], VAE_SCALE_FACTOR), torch.Generator().manual_seed(0))
    rel = f"{name}/model.onnx"
    export_onnx(spec.module, args, spec.contract, tmp_path / rel)
    del model, spec
    variants = {}
    if name in ("text_encoder", "unet"):
        write_fp16_variant(tmp_path / rel, tmp_path / variant_path(rel))
        variants = {"fp16": Variant(variant_path(rel), "fp16")}
    contract = next(s.contract for s in component_specs(full_size_sd1("none")) if s.name == name)
    component = Component(name, rel, contract, variants=variants)
    trt = load_tensorrt()
    for precision in ("fp16", "fp32") if variants else ("fp32",):
        report = check_component(trt, tmp_path, _manifest(component), component, precision)
        assert report.unsupported == [] and report.refit and report.layers > 100
        assert report.weights == report.initializers > 50  # full-size CLIP-L has 77 float initializers
        assert set(report.profiles) == {"static", "dynamic"}
