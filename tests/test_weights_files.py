"""Torch-free readers of weights files: torch.save zips through the restricted unpickler, and .safetensors.

References: torch.load (weights_only) and safetensors.torch on the same files. Tolerance: exact (bit-identical
arrays; bfloat16 widened to float32 holds every bfloat16 value exactly).
"""
from __future__ import annotations

import os
import pickle
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from sdrt.errors import WeightsFileError  # noqa: E402
from sdrt.runtime import torch_pickle  # noqa: E402
from sdrt.runtime.safetensors_file import read_safetensors  # noqa: E402


def _equal(ours, theirs) -> None:
    """Same structure; tensors bit-identical (bfloat16 compared in float32)."""
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, np.ndarray)
        want = theirs.float() if theirs.dtype == torch.bfloat16 else theirs
        np.testing.assert_array_equal(ours, want.numpy())
        assert ours.dtype == want.numpy().dtype
    elif isinstance(theirs, dict):
        assert sorted(ours) == sorted(theirs)
        for key in theirs:
            _equal(ours[key], theirs[key])
    else:
        assert ours == theirs


def _a1111_embedding(generator) -> dict:
    """What A1111's Embedding.save writes (modules/textual_inversion/textual_inversion.py)."""
    vec = torch.randn(3, 8, generator=generator)
    return {"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "shapey", "step": 500,
            "sd_checkpoint": "a9263745", "sd_checkpoint_name": "v1-5-pruned"}


@pytest.mark.parametrize("make", [
    _a1111_embedding,
    lambda g: {"w": torch.randn(4, 6, generator=g).half(), "b": torch.randn(5, generator=g).bfloat16()},
    lambda g: {"view": torch.randn(6, 8, generator=g)[1:5, ::2], "t": torch.randn(3, 4, generator=g).t()},
    lambda g: {"ints": torch.arange(10), "mask": torch.tensor([True, False]), "d": torch.randn(2, dtype=torch.float64)},
    lambda g: {"shared": (x := torch.randn(4, generator=g)), "again": x[1:]},  # two tensors, one storage
    lambda g: {"bytes": b"\x00\xff", "set": {1, 2}, "nested": [(1, 2.5), None, "s"]},
], ids=["a1111", "half-bf16", "strided", "dtypes", "shared-storage", "plain-data"])
def test_torch_save_round_trip(tmp_path, make):
    data = make(torch.Generator().manual_seed(0))
    torch.save(data, tmp_path / "w.pt")
    _equal(torch_pickle.load(tmp_path / "w.pt"), torch.load(tmp_path / "w.pt", weights_only=True))


def test_old_parameter_dict_embedding(tmp_path):
    """The original textual-inversion code pickled string_to_param as an nn.ParameterDict (A1111 reads its
    _parameters): its parameters come back, the module's other state does not."""
    vec = torch.randn(2, 8)
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vec)}), "name": "x"},
               tmp_path / "old.pt")
    params = torch_pickle.load(tmp_path / "old.pt")["string_to_param"]
    assert list(params) == ["*"]
    np.testing.assert_array_equal(params["*"], vec.numpy())


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("payload, named", [
    (lambda marker: {"x": _RunsCode(marker)}, "posix.mkdir"),
    (lambda marker: {"layer": torch.nn.Linear(2, 2)}, "torch.nn.modules.linear.Linear"),
    (lambda marker: {"storage_type": torch.FloatStorage}, None),  # a storage type is not data
])
def test_code_and_objects_are_refused_before_running(tmp_path, payload, named):
    marker = tmp_path / "ran"
    torch.save(payload(marker), tmp_path / "evil.pt")
    with pytest.raises(WeightsFileError, match="refusing evil.pt") as error:
        torch_pickle.load(tmp_path / "evil.pt")
    assert not marker.exists()
    if named:
        assert named in str(error.value)


def _rewrite_pickle(src, dst, data: bytes, compress: int = zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=compress) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, data if info.filename.endswith("/data.pkl") else zin.read(info.filename))


def test_tensor_outside_its_storage_is_refused(tmp_path):
    torch.save({"w": torch.randn(4)}, tmp_path / "w.pt")
    with zipfile.ZipFile(tmp_path / "w.pt") as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    # size (4,) -> (400,) with stride 1: 1600 bytes read from a 16-byte storage
    bad = pkl.replace(b"K\x04\x85", b"M\x90\x01\x85", 1)
    assert bad != pkl
    _rewrite_pickle(tmp_path / "w.pt", tmp_path / "bad.pt", bad)
    with pytest.raises(WeightsFileError, match="storage"):
        torch_pickle.load(tmp_path / "bad.pt")


def test_compressed_and_legacy_files_are_refused(tmp_path):
    torch.save({"w": torch.randn(4)}, tmp_path / "w.pt")
    with zipfile.ZipFile(tmp_path / "w.pt") as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    _rewrite_pickle(tmp_path / "w.pt", tmp_path / "zipped.pt", pkl, zipfile.ZIP_DEFLATED)
    with pytest.raises(WeightsFileError, match="compressed"):
        torch_pickle.load(tmp_path / "zipped.pt")
    torch.save({"w": torch.randn(4)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(WeightsFileError, match="legacy"):
        torch_pickle.load(tmp_path / "legacy.pt")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(WeightsFileError, match="not a torch zip"):
        torch_pickle.load(tmp_path / "plain.pkl")


def test_safetensors_match_the_reference(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {"f32": torch.randn(3, 4, generator=g), "f16": torch.randn(5, generator=g).half(),
               "bf16": torch.randn(2, 3, generator=g).bfloat16(), "i64": torch.arange(6).reshape(2, 3),
               "u8": torch.arange(4, dtype=torch.uint8), "empty": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "t.safetensors", metadata={"ss_network_dim": "4"})
    ours, metadata = read_safetensors(tmp_path / "t.safetensors")
    _equal(ours, tensors)
    assert metadata == {"ss_network_dim": "4"}


@pytest.mark.parametrize("corrupt, message", [
    (lambda header: header.replace(b'"data_offsets":[0,48]', b'"data_offsets":[0,4800]'), "byte range"),
    (lambda header: header.replace(b'"F32"', b'"F8_E4M3"'), "unknown dtype"),
    (lambda header: b"{not json" + header[9:], "not JSON"),
])
def test_malformed_safetensors_are_refused(tmp_path, corrupt, message):
    save_file({"w": torch.randn(3, 4)}, tmp_path / "t.safetensors")
    raw = (tmp_path / "t.safetensors").read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = corrupt(raw[8: 8 + size]).ljust(size)[:size]
    (tmp_path / "bad.safetensors").write_bytes(raw[:8] + header + raw[8 + size:])
    with pytest.raises(WeightsFileError, match=message):
        read_safetensors(tmp_path / "bad.safetensors")


def test_truncated_files_are_refused(tmp_path):
    (tmp_path / "short.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(WeightsFileError, match="too short"):
        read_safetensors(tmp_path / "short.safetensors")
