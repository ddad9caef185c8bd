"""The ONNX external-data scan (sdrt.onnx_refs) against files written by the `onnx` package itself, and the bundle
rule it serves: a file an engine would open for a component must be listed in the manifest with its sha256."""
from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.external_data_helper import convert_model_to_external_data  # noqa: E402

from sdrt.bundle import MANIFEST, read_manifest, sha256_file  # noqa: E402
from sdrt.cli import main  # noqa: E402
from sdrt.errors import BundleError  # noqa: E402
from sdrt.onnx_refs import CHILDREN, ATTRIBUTE, ENTRY, FUNCTION, GRAPH, MODEL, NODE, SPARSE, TENSOR, TRAINING, \
    external_data_files, scan  # noqa: E402
from sdrt.runtime.pipeline import Pipeline  # noqa: E402

MESSAGES = {
    MODEL: onnx.ModelProto, GRAPH: onnx.GraphProto, NODE: onnx.NodeProto, ATTRIBUTE: onnx.AttributeProto,
    FUNCTION: onnx.FunctionProto, TRAINING: onnx.TrainingInfoProto, SPARSE: onnx.SparseTensorProto,
    TENSOR: onnx.TensorProto, ENTRY: onnx.StringStringEntryProto,
}


def test_field_numbers_are_onnx_protos():
    holders = {MESSAGES[k].DESCRIPTOR.full_name for k in CHILDREN if k != ENTRY}
    for kind, children in CHILDREN.items():
        fields = {f.number: f for f in MESSAGES[kind].DESCRIPTOR.fields}
        for number, child in children.items():
            assert fields[number].message_type.full_name == MESSAGES[child].DESCRIPTOR.full_name, (kind, number)
        # every field that can hold a tensor is walked (a new one in a later onnx.proto fails here)
        holding = {n for n, f in fields.items() if f.message_type and f.message_type.full_name in holders}
        assert holding | ({13} if kind == TENSOR else set()) == set(children), kind


def _tensor(name: str, value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.full((32, 32), value, np.float32), name)


def _model() -> onnx.ModelProto:
    """Initializers, a Constant node's tensor and an If whose branches hold Constant tensors (subgraphs)."""
    def branch(name: str, value: float) -> onnx.GraphProto:
        node = helper.make_node("Constant", [], [name], value=_tensor(f"{name}_value", value))
        return helper.make_graph([node], name, [], [helper.make_tensor_value_info(name, TensorProto.FLOAT, [32, 32])])

    nodes = [
        helper.make_node("Constant", [], ["c"], value=_tensor("c_value", 2.0)),
        helper.make_node("Add", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "c"], ["y"]),
        helper.make_node("If", ["cond"], ["z"], then_branch=branch("then", 3.0), else_branch=branch("else", 4.0)),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [32, 32]),
              helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [32, 32]) for n in ("y", "z")]
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, [_tensor("w", 1.0)]))


@pytest.mark.parametrize("one_file", [True, False])
def test_scan_finds_every_file_onnx_writes(tmp_path, one_file):
    model = _model()
    convert_model_to_external_data(model, all_tensors_to_one_file=one_file, location="weights.bin",
                                   size_threshold=0, convert_attribute=True)
    onnx.save_model(model, str(tmp_path / "model.onnx"))
    written = sorted(p.name for p in tmp_path.iterdir() if p.name != "model.onnx")
    assert len(written) == (1 if one_file else 4)  # w, c_value, then_value, else_value: one file each
    assert sorted(external_data_files(tmp_path / "model.onnx")) == written


def test_a_model_without_external_data_names_no_file(tmp_path, tiny_sd1_bundle):
    assert external_data_files(tiny_sd1_bundle / "unet" / "model.onnx") == []


def test_malformed_files_are_one_bundle_error(tmp_path):
    model = _model()
    convert_model_to_external_data(model, location="weights.bin", size_threshold=0, convert_attribute=True)
    data = model.SerializeToString()
    rng = random.Random(0)
    outcomes = set()
    for _ in range(300):  # truncations and flipped bytes: a list of names or a BundleError, never anything else
        broken = bytearray(data[: rng.randrange(1, len(data))] if rng.random() < 0.5 else data)
        for _ in range(rng.randrange(1, 4)):
            broken[rng.randrange(len(broken))] = rng.randrange(256)
        try:
            scan(bytes(broken))
            outcomes.add("parsed")
        except BundleError:
            outcomes.add("refused")
    assert outcomes == {"parsed", "refused"}
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(BundleError, match="empty"):
        external_data_files(tmp_path / "empty.onnx")
    with pytest.raises(BundleError, match="not a valid ONNX model"):
        scan(b"\x0a\xff\xff\xff\xff\x0f")  # a field claiming 4 GB


# --- the bundle rule -------------------------------------------------------------------------------------------

@pytest.fixture
def external(tiny_sd1_bundle, tmp_path):
    """A copy of the tiny bundle whose text encoder keeps its weights in text_encoder/weights.bin, listed."""
    root = tmp_path / "bundle"
    shutil.copytree(tiny_sd1_bundle, root)
    path = root / "text_encoder" / "model.onnx"
    model = onnx.load(str(path))
    onnx.save_model(model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    document = json.loads((root / MANIFEST).read_text())
    document["files"]["text_encoder/model.onnx"] = sha256_file(path)
    document["files"]["text_encoder/weights.bin"] = sha256_file(path.with_name("weights.bin"))
    del document["components"]["text_encoder"]["files"]  # as bundles written before the record: derived
    (root / MANIFEST).write_text(json.dumps(document))
    return root


def _rewrite(root, edit) -> None:
    document = json.loads((root / MANIFEST).read_text())
    edit(document)
    (root / MANIFEST).write_text(json.dumps(document))


def test_listed_external_data_loads(external):
    assert read_manifest(external).components["text_encoder"].files == ()
    with Pipeline.load(external, backend="onnxruntime") as pipe:
        assert pipe.generate("a red circle", steps=1, seed=1)[0].image.size == (64, 64)


def test_unlisted_external_data_is_refused(external, capsys):
    _rewrite(external, lambda d: d["files"].pop("text_encoder/weights.bin"))
    assert main(["info", str(external)]) == 2
    err = capsys.readouterr().err
    assert "component text_encoder's file text_encoder/weights.bin has no checksum in the manifest" in err


def test_external_data_missing_from_the_component_record_is_refused(external):
    _rewrite(external, lambda d: d["components"]["text_encoder"].update(files=["text_encoder/model.onnx"]))
    with pytest.raises(BundleError, match="component text_encoder would open text_encoder/weights.bin, which its "
                                          "manifest entry does not list"):
        Pipeline.load(external, backend="onnxruntime")


@pytest.mark.parametrize("location", ["../tokenizer/vocab.json", "/etc/hostname", "*/_ORT_MEM_ADDR_/*"])
def test_external_data_outside_the_bundle_is_refused(external, location):
    path = external / "text_encoder" / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(model.SerializeToString())
    _rewrite(external, lambda d: d["files"].update({"text_encoder/model.onnx": sha256_file(path)}))
    with pytest.raises(BundleError, match=f"names external data '{location}'".replace("*", r"\*")):
        read_manifest(external)
