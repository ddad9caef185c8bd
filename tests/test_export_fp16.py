"""fp16 weight storage: files about half the size, fp32 compute, the same contract, parity with fp16-rounded torch."""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
ort = pytest.importorskip("onnxruntime")

from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402

from sdrt.bundle import MANIFEST, read_manifest, verify_files  # noqa: E402
from sdrt.cli import build_parser, describe  # noqa: E402
from sdrt.errors import ExportError  # noqa: E402
from sdrt.export import components, export_bundle, wrappers  # noqa: E402
from sdrt.export.components import CHECK_SHAPES, component_specs  # noqa: E402
from sdrt.export.fp16_storage import MIN_ELEMENTS, round_to_fp16, store_fp16  # noqa: E402
from sdrt.export.onnx_export import export_onnx, parameter_bytes  # noqa: E402
from sdrt.export.parity import check_parity  # noqa: E402

# ONNX Runtime on the fp16-stored graph against torch with its weights rounded to fp16: the export's own
# tolerances, and "well inside" them as in test_export.py (measured ~1e-6 .. 1.3e-5 on the tiny model, as with fp32
# storage: the casts add nothing). Rounding the weights itself moves the tiny model's outputs by 8e-4 .. 5e-3.
TOLERANCE = {"text_encoder": components.TEXT_ENCODER_TOLERANCE, "unet": components.UNET_TOLERANCE,
             "vae_decoder": components.VAE_TOLERANCE, "vae_encoder": components.VAE_TOLERANCE}
WELL_INSIDE = 10
# fp16 file size / fp32 file size: the weights halve; the graph, biases and norm scales stay (tiny model: 0.50 .. 0.57).
SIZE_RATIO = (0.45, 0.60)
# The fp16 file must really hold rounded weights: its outputs differ from the fp32 file's by more than fp32 noise.
ROUNDING_VISIBLE = 1e-4
NAMES = tuple(TOLERANCE)
CONTEXT = 32  # tests/tiny_models.py


@pytest.fixture(scope="module")
def fp16_bundle(tiny_sd1_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "tiny-sd1-fp16"
    export_bundle(tiny_sd1_dir, out, weights_storage="fp16")
    return out


@pytest.fixture(scope="module")
def rounded(tiny_sd1_dir):
    """The tiny model as diffusers loads it, weights rounded to fp16 by the export's rule."""
    modules = {
        "text_encoder": CLIPTextModel.from_pretrained(tiny_sd1_dir / "text_encoder").eval(),
        "unet": UNet2DConditionModel.from_pretrained(tiny_sd1_dir, subfolder="unet").eval(),
        "vae": AutoencoderKL.from_pretrained(tiny_sd1_dir, subfolder="vae").eval(),
    }
    for module in modules.values():
        assert round_to_fp16(module) > 0
    return modules


def _session(bundle, name):
    return ort.InferenceSession(str(bundle / name / "model.onnx"), providers=["CPUExecutionProvider"])


def _io(session) -> list[tuple]:
    return [(t.name, t.type, t.shape) for t in (*session.get_inputs(), *session.get_outputs())]


def _inputs(seed: int = 7) -> dict[str, dict[str, np.ndarray]]:
    g = torch.Generator().manual_seed(seed)
    return {
        "text_encoder": {"inputs_embeds": torch.randn(2, 77, CONTEXT, generator=g).numpy()},
        "unet": {"sample": torch.randn(2, 4, 9, 12, generator=g).numpy(),
                 "timestep": np.array([999.0, 20.5], dtype=np.float32),
                 "encoder_hidden_states": torch.randn(2, 77, CONTEXT, generator=g).numpy()},
        "vae_decoder": {"latents": torch.randn(1, 4, 7, 5, generator=g).numpy()},
        "vae_encoder": {"image": (torch.rand(2, 3, 48, 64, generator=g) * 2 - 1).numpy()},
    }


def _torch(modules, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        if name == "text_encoder":
            return [wrappers.TextEncoder(modules["text_encoder"])(t["inputs_embeds"]).numpy()]
        if name == "unet":
            return [modules["unet"](t["sample"], t["timestep"], t["encoder_hidden_states"]).sample.numpy()]
        if name == "vae_decoder":
            return [modules["vae"].decode(t["latents"]).sample.numpy()]
        dist = modules["vae"].encode(t["image"]).latent_dist
        return [dist.mean.numpy(), dist.std.numpy()]


def _component_bytes(bundle, name: str) -> int:
    """The graph and the tables beside it (the text encoder's token embedding)."""
    comp = read_manifest(bundle).components[name]
    return sum((bundle / rel).stat().st_size for rel in (comp.file, *comp.tables.values()))


def _max_abs(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


# --- the files -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_files_are_about_half_the_size(tiny_sd1_bundle, fp16_bundle, name):
    fp32, fp16 = _component_bytes(tiny_sd1_bundle, name), _component_bytes(fp16_bundle, name)
    assert SIZE_RATIO[0] <= fp16 / fp32 <= SIZE_RATIO[1], (name, fp16, fp32)


@pytest.mark.parametrize("name", NAMES)
def test_large_weights_are_fp16_and_only_cast(fp16_bundle, name):
    graph = onnx.load(str(fp16_bundle / name / "model.onnx")).graph
    stored = {t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT16}
    large_fp32 = [t.name for t in graph.initializer
                  if t.data_type == TensorProto.FLOAT and np.prod(t.dims) >= MIN_ELEMENTS]
    assert stored and not large_fp32
    readers = [n for n in graph.node if stored & set(n.input)]
    assert len(readers) == len(stored)
    assert all(n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT for n in readers)


@pytest.mark.parametrize("name", NAMES)
def test_io_contract_is_unchanged(tiny_sd1_bundle, fp16_bundle, name):
    assert _io(_session(fp16_bundle, name)) == _io(_session(tiny_sd1_bundle, name))
    fp32, fp16 = read_manifest(tiny_sd1_bundle).components[name], read_manifest(fp16_bundle).components[name]
    assert (fp16.contract, fp16.precision, fp16.file) == (fp32.contract, "fp32", fp32.file)


def test_manifest_records_the_storage_and_the_rounding(fp16_bundle, tiny_sd1_bundle):
    manifest = read_manifest(fp16_bundle)
    verify_files(fp16_bundle, manifest)
    for name, comp in manifest.components.items():
        v = comp.validation
        assert (comp.weights_storage, comp.precision) == ("fp16", "fp32")
        assert v["reference"] == "torch, weights rounded to fp16"
        assert "weights_storage" not in v
        assert v["max_abs_error"] <= v["tolerance"] / WELL_INSIDE, name
        assert v["weights_rounding_max_abs_error"] > v["max_abs_error"], name  # rounding is measured, and real
    assert "(onnx, fp32, fp16 weights; max abs error" in describe(fp16_bundle, manifest)
    written = json.loads((fp16_bundle / MANIFEST).read_text())["components"]
    assert {c["weights_storage"] for c in written.values()} == {"fp16"}


def test_fp32_storage_leaves_the_manifest_as_before(tiny_sd1_bundle):
    """fp32 storage is the default and is not written: fp32 manifests read and write as they did before the field."""
    written = json.loads((tiny_sd1_bundle / MANIFEST).read_text())["components"]
    assert all("weights_storage" not in c and "weights_storage" not in c["validation"] for c in written.values())
    manifest = read_manifest(tiny_sd1_bundle)
    for name, comp in manifest.components.items():
        assert comp.weights_storage == "fp32"
        assert json.loads(json.dumps(comp.to_dict())) == written[name]
    assert "fp16 weights" not in describe(tiny_sd1_bundle, manifest)


def test_openvino_conversion_stores_fp32(fp16_bundle, tmp_path):
    """convert_model folds the fp16 weights' casts: the IR holds fp32 constants, and the manifest must say so."""
    ov = pytest.importorskip("openvino")
    from sdrt.export.openvino import MIN_PSNR_DB, convert_bundle

    manifest = convert_bundle(fp16_bundle, tmp_path / "ov")
    check = manifest.source["validation"]
    assert check["psnr_db"] is None or check["psnr_db"] >= check["min_psnr_db"] == MIN_PSNR_DB["fp32"]
    assert read_manifest(tmp_path / "ov") == manifest
    for name, comp in manifest.components.items():
        assert (comp.format, comp.precision, comp.weights_storage) == ("openvino", "fp32", "fp32"), name
        model = ov.Core().read_model(str(tmp_path / "ov" / comp.file))
        types = {op.get_element_type().get_type_name() for op in model.get_ops() if op.get_type_name() == "Constant"}
        assert "f32" in types and "f16" not in types, name
    written = json.loads((tmp_path / "ov" / MANIFEST).read_text())["components"]
    assert all("weights_storage" not in c for c in written.values())


# --- the numbers -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_outputs_match_torch_with_rounded_weights(fp16_bundle, tiny_sd1_bundle, rounded, name):
    feeds = _inputs()[name]
    got = _session(fp16_bundle, name).run(None, feeds)
    assert _max_abs(got, _torch(rounded, name, feeds)) <= TOLERANCE[name] / WELL_INSIDE
    fp32_storage = _session(tiny_sd1_bundle, name).run(None, feeds)
    assert _max_abs(got, fp32_storage) > ROUNDING_VISIBLE  # the file holds the rounded weights, not the originals


def test_store_fp16_converts_only_large_value_weights(caplog):
    """A hand-made graph: a large MatMul weight is stored fp16; a small bias, a weight that becomes integers and
    one beyond fp16's range stay fp32; the result computes what numpy computes with the rounded weight."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 32)).astype(np.float32)
    bias = rng.standard_normal(32).astype(np.float32)
    to_int = (rng.random(MIN_ELEMENTS) * 1000).astype(np.float32)
    huge = np.full((64, 32), 1e5, dtype=np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "weight"], ["xw"]), helper.make_node("Add", ["xw", "bias"], ["y"]),
        helper.make_node("MatMul", ["x", "huge"], ["z"]),
        helper.make_node("Cast", ["to_int"], ["ints"], to=TensorProto.INT64),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in ((weight, "weight"), (bias, "bias"), (to_int, "to_int"),
                                                        (huge, "huge"))]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info(n, t, shape) for n, t, shape in
         (("y", TensorProto.FLOAT, ["n", 32]), ("z", TensorProto.FLOAT, ["n", 32]),
          ("ints", TensorProto.INT64, [MIN_ELEMENTS]))],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with caplog.at_level(logging.WARNING):
        before, after = store_fp16(model)
    assert (before, after) == (weight.nbytes, weight.nbytes // 2)
    assert "huge: kept fp32" in caplog.text
    onnx.checker.check_model(model)
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert types == {"weight_fp16": TensorProto.FLOAT16, "bias": TensorProto.FLOAT, "to_int": TensorProto.FLOAT,
                     "huge": TensorProto.FLOAT}
    x = rng.standard_normal((3, 64)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y, z, ints = session.run(None, {"x": x})
    np.testing.assert_allclose(y, x @ weight.astype(np.float16).astype(np.float32) + bias, rtol=1e-5, atol=1e-5)
    assert np.abs(y - (x @ weight + bias)).max() > 1e-4  # the rounding is visible, so the line above can fail
    np.testing.assert_array_equal(ints, to_int.astype(np.int64))
    np.testing.assert_allclose(z, x @ huge, rtol=1e-5)


def test_external_data_holds_fp16_weights(rounded, tmp_path):
    """As the full-size UNet is written: graph and weights apart, the weights file half the fp32 bytes."""
    source = SimpleNamespace(**rounded)  # what component_specs reads of a SourceModel
    spec = next(s for s in component_specs(source) if s.name == "unet")
    args = (torch.randn(2, 4, 9, 12), torch.rand(2) * 1000, torch.randn(2, 77, CONTEXT))
    files = export_onnx(spec.module, args, spec.contract, tmp_path / "model.onnx", external_data=True,
                        weights_storage="fp16")
    assert [f.name for f in files] == ["model.onnx", "model.onnx.data"]
    ratio = (tmp_path / "model.onnx.data").stat().st_size / parameter_bytes(spec.module)
    assert SIZE_RATIO[0] <= ratio <= SIZE_RATIO[1]
    record = check_parity(spec, tmp_path / "model.onnx", CHECK_SHAPES, vae_scale_factor=8)
    assert record["max_abs_error"] <= TOLERANCE["unet"] / WELL_INSIDE


# --- the options -----------------------------------------------------------------------------------------------

def test_cli_flag_and_its_default():
    parser = build_parser()
    assert parser.parse_args(["export", "src", "-o", "out"]).weights_storage == "fp32"
    assert parser.parse_args(["export", "src", "-o", "out", "--weights-storage", "fp16"]).weights_storage == "fp16"
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "src", "-o", "out", "--weights-storage", "int8"])


def test_unknown_storage_is_refused_before_any_work(tiny_sd1_dir, tmp_path):
    with pytest.raises(ExportError, match="weights_storage must be one of"):
        export_bundle(tiny_sd1_dir, tmp_path / "bundle", weights_storage="bf16")
    assert list(tmp_path.iterdir()) == []


def test_weights_map_points_at_the_fp16_values(fp16_bundle, rounded):
    """fp16 storage renames weights (`W_fp16` behind a Cast): the map finds them, holding torch's rounded values."""
    from sdrt.backends.onnx_file import OnnxFile
    from sdrt.weights_map import read_weights_map

    for name in ("text_encoder", "unet"):
        component = read_manifest(fp16_bundle).components[name]
        weights_map, graph = read_weights_map(fp16_bundle, component), OnnxFile(fp16_bundle / component.file)
        params = dict(rounded[name].named_parameters())
        fp16 = [k for k, e in weights_map.weights.items() if graph.initializers[e.name].dtype == np.float16]
        assert len(fp16) > 10
        for torch_name, entry in weights_map.weights.items():
            assert np.array_equal(entry.to_torch(graph.array(entry.name)).astype(np.float32),
                                  params[torch_name].detach().numpy()), torch_name


def test_changed_weights_stay_fp16_stored(fp16_bundle, tiny_sd1_bundle):
    """A weight change on an fp16-stored bundle is rounded to fp16 with the weight (as an fp16 export of the changed
    model would store it): the output moves as the fp32 bundle's does, within the storage's own rounding."""
    from sdrt.backends import get_backend
    from sdrt.backends.base import WeightDeltas

    class Change:
        shape = (32, 32)

        def __call__(self):  # random: a constant change cancels against LayerNorm's zero-mean output
            return np.random.default_rng(1).standard_normal(self.shape).astype(np.float32) * 0.3

    deltas = WeightDeltas("t", {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": Change()})
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((1, 4, 8, 8), dtype=np.float32), "timestep": np.array([500.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((1, 77, 32), dtype=np.float32)}
    out = {}
    for bundle in (tiny_sd1_bundle, fp16_bundle):
        component = read_manifest(bundle).components["unet"]
        for d in (None, deltas):
            out[bundle, d is None] = get_backend("onnxruntime").load(bundle, component, d).run(feeds)["model_output"]
    moved = np.abs(out[tiny_sd1_bundle, False] - out[tiny_sd1_bundle, True]).max()
    rounding = np.abs(out[fp16_bundle, True] - out[tiny_sd1_bundle, True]).max()
    assert moved > 0.01
    assert np.abs(out[fp16_bundle, False] - out[tiny_sd1_bundle, False]).max() <= 2 * rounding + 1e-4
