"""Weights maps: what export records points at the torch values; the map derived for old bundles agrees with it;
the torch-free ONNX reader agrees with onnx; changed weights reach ONNX Runtime (in-file and external) and
OpenVINO's int8 storage keeps them within one quantization step."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import numpy_helper  # noqa: E402

from sdrt.backends import get_backend  # noqa: E402
from sdrt.backends.base import WeightDeltas  # noqa: E402
from sdrt.backends.onnx_file import OnnxFile  # noqa: E402
from sdrt.bundle import MANIFEST, read_manifest, sha256_file  # noqa: E402
from sdrt.errors import BundleError, RequestError  # noqa: E402
from sdrt.weights_map import derive_onnx_map, read_weights_map  # noqa: E402

COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
RUN_TOL = 1e-5  # one UNet call, same weights reached two ways (float32 summation order only)


def torch_modules(folder) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    vae = AutoencoderKL.from_pretrained(folder / "vae")
    return {"text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder"),
            "unet": UNet2DConditionModel.from_pretrained(folder / "unet"), "vae_decoder": vae, "vae_encoder": vae}


def test_recorded_map_points_at_the_torch_values(tiny_sd1_dir, tiny_sd1_bundle):
    manifest, modules = read_manifest(tiny_sd1_bundle), torch_modules(tiny_sd1_dir)
    for name in COMPONENTS:
        component = manifest.components[name]
        assert component.weights_map in manifest.files  # checksummed like every bundle file
        weights_map, graph = read_weights_map(tiny_sd1_bundle, component), OnnxFile(tiny_sd1_bundle / component.file)
        params = dict(modules[name].named_parameters())
        for torch_name, entry in weights_map.weights.items():
            stored = graph.array(entry.name)
            assert np.array_equal(entry.to_torch(stored), params[torch_name].detach().numpy()), torch_name
        if name in ("text_encoder", "unet"):  # every weight a LoRA changes is there, folded MatMuls included
            layers = [n for n, m in modules[name].named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
            assert {f"{n}.weight" for n in layers} <= set(weights_map.weights)
            assert any(e.transpose for e in weights_map.weights.values())


def test_old_bundles_derive_the_same_map(tiny_sd1_bundle):
    """The map read from node names (bundles exported before maps) is the recorded one where both speak."""
    manifest = read_manifest(tiny_sd1_bundle)
    for name in COMPONENTS:
        component = manifest.components[name]
        recorded = read_weights_map(tiny_sd1_bundle, component)
        derived = derive_onnx_map(OnnxFile(tiny_sd1_bundle / component.file), name)
        assert derived.derived and len(derived.weights) >= 13  # the token table lives beside the text encoder graph
        assert {k: recorded.weights.get(k) for k in derived.weights} == derived.weights


def test_reader_agrees_with_onnx(tiny_sd1_bundle, tmp_path):
    path = tiny_sd1_bundle / "unet" / "model.onnx"
    model = onnx.load(str(path))
    onnx.save_model(model, str(tmp_path / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=1024)
    for file, external in ((path, False), (tmp_path / "model.onnx", True)):
        graph, reference = OnnxFile(file), onnx.load(str(file))  # onnx.load reads external data too
        assert [(n.name, n.op_type, n.inputs, n.outputs) for n in graph.nodes] == \
            [(n.name, n.op_type, tuple(n.input), tuple(n.output)) for n in reference.graph.node]
        for init in reference.graph.initializer:
            assert np.array_equal(graph.array(init.name), numpy_helper.to_array(init)), init.name
        assert any(i.external for i in graph.initializers.values()) == external


def test_reader_refuses_external_data_outside_its_folder(tiny_sd1_bundle, tmp_path):
    model = onnx.load(str(tiny_sd1_bundle / "unet" / "model.onnx"))
    onnx.save_model(model, str(tmp_path / "model.onnx"), save_as_external_data=True, location="w.data",
                    size_threshold=1024)
    data = (tmp_path / "model.onnx").read_bytes().replace(b"w.data", b"../etc")
    (tmp_path / "model.onnx").write_bytes(data)
    with pytest.raises(BundleError, match="not a file beside the model"):
        OnnxFile(tmp_path / "model.onnx")


class _Change:
    """A seeded random change of one weight (a Delta)."""

    def __init__(self, shape, value):
        self.shape, self.value = tuple(shape), value

    def __call__(self):  # random: a constant change of to_q cancels against LayerNorm's zero-mean output
        return np.random.default_rng(0).standard_normal(self.shape).astype(np.float32) * self.value


def _unet_output(bundle, deltas=None) -> np.ndarray:
    component = read_manifest(bundle).components["unet"]
    session = get_backend("onnxruntime").load(bundle, component, deltas)
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((1, 4, 8, 8), dtype=np.float32), "timestep": np.array([500.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((1, 77, 32), dtype=np.float32)}
    return session.run(feeds)["model_output"]


def test_changes_reach_onnxruntime_in_file_and_external(tiny_sd1_bundle, tmp_path):
    """A Conv weight (which ORT's NCHWc pass reorders) and a folded MatMul weight: SessionOptions.add_initializer
    would lose both silently; rewritten in the file's bytes or injected as external data, both count."""
    deltas = WeightDeltas("test", {"conv_in.weight": _Change((32, 4, 3, 3), 0.05),
                                   "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight":
                                   _Change((32, 32), 0.1)})
    external = tmp_path / "external"
    shutil.copytree(tiny_sd1_bundle, external)
    model = onnx.load(str(external / "unet" / "model.onnx"))
    onnx.save_model(model, str(external / "unet" / "model.onnx"), save_as_external_data=True,
                    location="model.onnx.data", size_threshold=1024)
    _relist(external, "unet", ["unet/model.onnx", "unet/model.onnx.data"])
    base, changed = _unet_output(tiny_sd1_bundle), _unet_output(tiny_sd1_bundle, deltas)
    assert np.abs(changed - base).max() > 0.1
    assert np.abs(_unet_output(external, deltas) - changed).max() <= RUN_TOL
    with pytest.raises(RequestError, match=r"conv_in.weight: expected \[32, 4, 3, 3\], got \[32, 4, 1, 1\]"):
        _unet_output(tiny_sd1_bundle, WeightDeltas("bad", {"conv_in.weight": _Change((32, 4, 1, 1), 0.1)}))


def _relist(bundle, component: str, files: list[str]) -> None:
    """Record `files` (rewritten in the test) in the manifest as an export would: checksums and the component's
    list of files its engine opens."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"].update({rel: sha256_file(bundle / rel) for rel in files})
    manifest["components"][component]["files"] = files
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def _compressed_matmul(w: np.ndarray, quantized: bool):
    """An OpenVINO model x @ W.T whose W is stored as NNCF stores it: u8 + zero point + f16 scale (weight
    compression), or i8 + f32 scale (quantized layers); the scales computed by sdrt's own requantization."""
    import openvino as ov
    from openvino import opset13 as ops

    from sdrt.backends.openvino_weights import _asymmetric, _symmetric

    x = ops.parameter([1, w.shape[1]], np.float32)
    if quantized:
        q, scale = _symmetric(w, np.ones((w.shape[0], 1), np.float32))
        weight = ops.multiply(ops.convert(ops.constant(q.astype(np.int8), name="W"), np.float32), ops.constant(scale))
    else:
        q, scale, zero_point = _asymmetric(w, np.ones((w.shape[0], 1), np.float16))
        centered = ops.subtract(ops.convert(ops.constant(q.astype(np.uint8), name="W"), np.float16),
                                ops.convert(ops.constant(zero_point.astype(np.uint8)), np.float16))
        weight = ops.convert(ops.multiply(centered, ops.constant(scale)), np.float32)
    return ov.Model([ops.matmul(x, weight, False, True)], [x])


@pytest.mark.parametrize("quantized", [False, True], ids=["asymmetric-u8", "symmetric-i8"])
def test_openvino_int8_weights_are_requantized_per_channel(quantized):
    """weight + change, stored again as the weight was (u8 with zero points, or i8), reads back within half a
    quantization step of the new per-channel scale, and the model still computes with it."""
    pytest.importorskip("openvino")
    from sdrt.backends.openvino_weights import constants, stored_weight

    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 10)).astype(np.float32) * np.linspace(0.1, 2, 6, dtype=np.float32)[:, None]
    model = _compressed_matmul(w, quantized)
    stored = stored_weight(constants(model)["W"])
    assert stored.scale is not None and (stored.zero_point is None) == quantized
    step = np.abs(stored.scale.get_data().astype(np.float32))
    assert np.all(np.abs(stored.value() - w) <= step * 0.51)
    changed = w + rng.standard_normal(w.shape).astype(np.float32)
    stored.replace(changed)
    again = stored_weight(constants(model)["W"])
    new_step = np.abs(again.scale.get_data().astype(np.float32))
    assert again.data.get_data().dtype == (np.int8 if quantized else np.uint8)
    assert np.all(np.abs(again.value() - changed) <= new_step * 0.51)
    assert not np.allclose(new_step, step)  # the scales were computed again for the new values
