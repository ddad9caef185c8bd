"""Read a `torch.save` file (.pt, .bin, .ckpt) into numpy arrays without torch and without running its code.

Why this is safe: a pickle runs code only by calling objects it names (the GLOBAL / STACK_GLOBAL / EXT opcodes,
all of which go through `Unpickler.find_class`, then REDUCE / NEWOBJ / BUILD on what came back) or through
`persistent_load`. Here `find_class` answers from ALLOWED, a table of our own numpy functions and inert
placeholders (never the torch object a name refers to), and refuses every other name before anything is called;
`persistent_load` returns only the raw bytes of a storage inside the same zip file. The arrays are built by
numpy from those bytes with bounds-checked shapes and strides, and copied out. This is the approach of torch's
own `weights_only=True` (torch/_weights_only_unpickler.py), without importing torch.

Only the zip format torch has written since 1.6 is read; entries must be stored uncompressed, as torch writes
them, so a file cannot expand beyond its own size.
"""
from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from sdrt.errors import WeightsFileError
from sdrt.runtime.safetensors_file import widen_bfloat16



class _Storage:
    """A storage type named in the pickle (torch.FloatStorage ...): the numpy dtype of its bytes."""

    def __init__(self, name: str, dtype: str):
        self.name, self.dtype = name, dtype


# torch's legacy typed-storage names -> numpy dtypes; bfloat16 has no numpy dtype and is widened to float32 on read.
STORAGES = {
    "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16", "DoubleStorage": "float64",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool",
}


class ParameterDict(dict):
    """Stands in for torch.nn.ParameterDict (old textual-inversion files pickle one): keeps its parameters only."""

    def __setstate__(self, state: Any) -> None:
        parameters = state.get("_parameters") if isinstance(state, dict) else None
        if not isinstance(parameters, dict):
            raise WeightsFileError("a pickled ParameterDict without its _parameters")
        self.update(parameters)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2 in numpy: a strided view of the storage's bytes, copied."""
    if not isinstance(storage, np.ndarray):
        raise WeightsFileError(f"a tensor rebuilt from {type(storage).__name__}, not a storage")
    shape, strides = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(shape) != len(strides) or min((*shape, *strides, int(offset)), default=0) < 0:
        raise WeightsFileError(f"tensor shape {shape} and strides {strides} do not fit together")
    if np.prod(shape, dtype=np.float64) > storage.size:  # a zero stride must not turn bytes into gigabytes
        raise WeightsFileError(f"a tensor of shape {shape} from a storage of {storage.size} elements")
    item = storage.itemsize
    try:  # numpy checks that the view stays inside the buffer
        view = np.ndarray(shape, storage.dtype, storage.data, int(offset) * item, tuple(s * item for s in strides))
    except (ValueError, TypeError) as e:
        raise WeightsFileError(f"tensor of shape {shape} does not fit its storage: {e}") from None
    return np.array(view)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None) -> np.ndarray:
    """torch._utils._rebuild_parameter(_with_state): a Parameter is its tensor."""
    if not isinstance(data, np.ndarray):
        raise WeightsFileError(f"a parameter rebuilt from {type(data).__name__}, not a tensor")
    return data


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """_codecs.encode as protocol-2 pickles use it for bytes; only that codec, none that decompresses or runs."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise WeightsFileError(f"_codecs.encode with {encoding!r}: only latin1 is how pickles store bytes")
    return text.encode("latin1")


ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.nn.modules.container", "ParameterDict"): ParameterDict,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,  # protocol 2 writes Python 2 names; a custom find_class sees them unmapped
    ("_codecs", "encode"): _latin1,
    **{("torch", name): _Storage(name, dtype) for name, dtype in STORAGES.items()},
}


class _WeightsUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose every global comes from ALLOWED and whose storages come from `read_storage`."""

    def __init__(self, file, read_storage):
        super().__init__(file, encoding="utf-8")
        self._read_storage = read_storage

    def find_class(self, module: str, name: str) -> Any:
        found = ALLOWED.get((module, name))
        if found is None:
            raise WeightsFileError(f"it names {module}.{name}, which is not a tensor or a plain container")
        return found

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Storage)):
            raise WeightsFileError(f"unexpected persistent id {str(pid)[:80]}")
        _, storage, key, _location, numel = pid
        return self._read_storage(storage, str(key), int(numel))


def load(path: Path | str) -> Any:
    """The object a torch.save zip file holds, with every tensor as a numpy array; refuses anything else."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise WeightsFileError(f"{path.name} is not a torch zip file (the legacy pre-1.6 format is not read)")
    with zipfile.ZipFile(path) as archive:
        prefix = _record_prefix(archive, path)
        big_endian = _read(archive, prefix + "byteorder", required=False) == b"big"
        cache: dict[str, np.ndarray] = {}

        def read_storage(storage: _Storage, key: str, numel: int) -> np.ndarray:
            if key not in cache:
                cache[key] = _storage_array(_read(archive, f"{prefix}data/{key}"), storage, numel, big_endian)
            return cache[key]

        with archive.open(prefix + "data.pkl") as f:
            try:
                return _check_plain(_WeightsUnpickler(f, read_storage).load())
            except WeightsFileError as e:
                raise WeightsFileError(f"refusing {path.name}: {e}") from None
            except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError) as e:
                raise WeightsFileError(f"{path.name} is not a readable torch weights file: {e}") from None


def _record_prefix(archive: zipfile.ZipFile, path: Path) -> str:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise WeightsFileError(f"{path.name}: expected one <name>/data.pkl in the zip, got {len(pickles)}")
    for info in archive.infolist():
        if info.compress_type != zipfile.ZIP_STORED:
            raise WeightsFileError(f"{path.name}: {info.filename} is compressed; torch stores its entries as is")
    return pickles[0][: -len("data.pkl")]


def _read(archive: zipfile.ZipFile, name: str, required: bool = True) -> bytes | None:
    try:
        return archive.read(name)
    except KeyError:
        if required:
            raise WeightsFileError(f"the zip has no {name}") from None
        return None


def _storage_array(raw: bytes, storage: _Storage, numel: int, big_endian: bool) -> np.ndarray:
    """The storage's elements as a flat array (bfloat16 widened to float32, which holds it exactly)."""
    wide = storage.dtype == "bfloat16"
    dtype = np.dtype("uint16" if wide else storage.dtype)
    stored = dtype.newbyteorder(">") if big_endian else dtype
    if numel < 0 or len(raw) < numel * dtype.itemsize:
        raise WeightsFileError(f"a {storage.name} of {numel} elements has {len(raw)} bytes")
    flat = np.frombuffer(raw, stored, count=numel).astype(dtype, copy=False)
    return widen_bfloat16(flat) if wide else flat


_PLAIN = (str, int, float, bool, bytes, type(None))


def _check_plain(obj: Any, depth: int = 0) -> Any:
    """Refuse results holding anything but containers, plain values and numeric arrays (no object arrays)."""
    if depth > 32:
        raise WeightsFileError("containers nested deeper than 32 levels")
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise WeightsFileError("an array of Python objects")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, depth + 1)
            _check_plain(v, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            _check_plain(v, depth + 1)
    elif not isinstance(obj, _PLAIN):
        raise WeightsFileError(f"it holds a {type(obj).__name__}")
    return obj
