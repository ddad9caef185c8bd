"""Tensor files users download (LoRAs, embeddings) read into numpy without torch: .safetensors, and torch's .pt
through an unpickler that builds nothing but arrays, dicts and lists.

safetensors: an 8-byte little-endian header length, a JSON header (dtype, shape and byte range of each tensor,
optional `__metadata__` strings), then the bytes (huggingface/safetensors, "Format"). Read here rather than with
the safetensors package's numpy API because that refuses bfloat16, which numpy lacks and many LoRAs are saved in
(here: widened to float32), and because sdrt's runtime then needs no extra dependency.

.pt: torch.save's zip archive (`<name>/data.pkl` + one file per storage). A pickle runs whatever callables its
stream names; this unpickler's `find_class` resolves only the handful torch.save emits for tensors (rebuild a
tensor from a storage, a Parameter, an OrderedDict, the storage dtypes) to functions of its own that build numpy
arrays, and refuses every other name, so no code from the file can run (torch's `weights_only=True` loader works
the same way). Storages are bounds-checked against their files before any view is made.
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

from sdrt.errors import RequestError

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
MAX_HEADER = 100 * 2**20  # the safetensors package's own limit on the JSON header
# torch's storage classes (the GLOBALs torch.save writes) -> element dtype; BFloat16 is read as uint16 bits.
TORCH_STORAGES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": np.uint16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: widen by shifting its 16 bits up."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _header(data: memoryview | bytes, path: Path) -> tuple[dict, int]:
    if len(data) < 8:
        raise RequestError(f"{path} is not a safetensors file (too short)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(MAX_HEADER, len(data) - 8):
        raise RequestError(f"{path} is not a safetensors file (header of {size} bytes)")
    try:
        header = json.loads(bytes(data[8:8 + size]))
    except (UnicodeDecodeError, ValueError) as e:
        raise RequestError(f"{path}: safetensors header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise RequestError(f"{path}: safetensors header is not a JSON object")
    return header, 8 + size


def read_safetensors(path: Path | str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(name -> array, metadata) of a .safetensors file; arrays are read-only memory maps, bf16 widened to f32."""
    path = Path(path)
    try:
        data = np.memmap(path, np.uint8, "r")
    except (OSError, ValueError) as e:
        raise RequestError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    header, start = _header(memoryview(data), path)
    metadata = header.pop("__metadata__", None) or {}
    tensors = {name: _tensor(data, start, name, spec, path) for name, spec in header.items()}
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _tensor(data: np.ndarray, start: int, name: str, spec, path: Path) -> np.ndarray:
    try:
        dtype, shape, (begin, end) = SAFETENSORS_DTYPES[spec["dtype"]], tuple(spec["shape"]), spec["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise RequestError(f"{path}: tensor {name!r} has a malformed or unsupported entry {spec!r}") from None
    count = int(np.prod(shape, dtype=np.int64))
    if not 0 <= begin <= end <= len(data) - start or end - begin != count * np.dtype(dtype).itemsize:
        raise RequestError(f"{path}: tensor {name!r} ({spec['dtype']} {list(shape)}) has bytes [{begin}, {end})")
    values = data[start + begin:start + end].view(dtype).reshape(shape)
    return _bf16_to_f32(values) if spec["dtype"] == "BF16" else values


def addnet_hash(path: Path | str) -> str:
    """sha256 of a safetensors file's tensor bytes (after the header): kohya's and A1111's LoRA hash
    (modules/hashes.py addnet_hash_safetensors), so editing the metadata keeps it."""
    path = Path(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + size)
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class _Storage:
    """A storage dtype named by the pickle (torch.FloatStorage...)."""

    def __init__(self, dtype, bf16: bool = False):
        self.dtype, self.bf16 = np.dtype(dtype), bf16


def _rebuild_tensor(storage, offset, size, stride, *_):
    """torch._utils._rebuild_tensor_v2 in numpy: a strided view of the storage, bounds-checked, then copied."""
    if not (isinstance(storage, np.ndarray) and all(isinstance(v, int) and v >= 0 for v in (offset, *size, *stride))
            and len(size) == len(stride)):
        raise RequestError("torch file: malformed tensor record")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
    if last >= storage.size:
        raise RequestError("torch file: a tensor reaches past its storage")
    items = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], tuple(size), tuple(s * items for s in stride))
    return np.array(view)


def _rebuild_parameter(data, *_):
    return data


class _ArraysOnly(pickle.Unpickler):
    """Resolves only the names torch.save writes for tensors, to numpy builders; anything else is refused."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._archive, self._prefix = archive, prefix

    def find_class(self, module: str, name: str):
        allowed = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        }
        if (module, name) in allowed:
            return allowed[module, name]
        if module == "torch" and name in TORCH_STORAGES:
            return _Storage(TORCH_STORAGES[name], bf16=name == "BFloat16Storage")
        raise RequestError(f"torch file: refusing to load {module}.{name} (only tensors, dicts and lists are read)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Storage)):
            raise RequestError("torch file: malformed storage record")
        _, storage, key, _, numel = pid
        try:
            info = self._archive.getinfo(f"{self._prefix}data/{key}")
        except KeyError:
            raise RequestError(f"torch file: storage {key!r} is missing") from None
        if not isinstance(numel, int) or info.file_size != numel * storage.dtype.itemsize:
            raise RequestError(f"torch file: storage {key!r} holds {info.file_size} bytes, not {numel} elements")
        values = np.frombuffer(self._archive.read(info), storage.dtype)
        return _bf16_to_f32(values) if storage.bf16 else values


def read_torch_file(path: Path | str) -> object:
    """The object a torch .pt zip archive holds, with tensors as numpy arrays (bf16 widened to f32)."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise RequestError(f"{path}: not a torch zip archive (files from torch < 1.6 are not read: re-save them "
                           "with a current torch, or convert them to .safetensors)") from None
    except OSError as e:
        raise RequestError(f"cannot read {path}: {e.strerror or e}") from None
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise RequestError(f"{path}: expected one <name>/data.pkl in the archive, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        try:
            obj = _ArraysOnly(io.BytesIO(archive.read(pickles[0])), archive, prefix).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
            raise RequestError(f"{path}: malformed torch pickle: {e}") from None
    return obj
