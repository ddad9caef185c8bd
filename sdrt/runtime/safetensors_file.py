"""Read a .safetensors file into numpy arrays, bfloat16 included, with no dependency beyond numpy.

The format (huggingface/safetensors, README "Format"): an 8-byte little-endian header length N, N bytes of JSON
mapping each tensor name to its dtype, shape and [begin, end) byte offsets into the data that follows, and an
optional "__metadata__" of strings. Nothing in it is executable; offsets and sizes are checked against the file.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sdrt.errors import WeightsFileError

# safetensors dtype names -> numpy; BF16 is read as uint16 and widened to float32, which holds it exactly.
DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
          "I8": "i1", "U8": "u1", "BOOL": "?"}
MAX_HEADER = 100 << 20  # the reference implementation's own limit on the JSON header



def widen_bfloat16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) as float32: the same sign, exponent and top mantissa bits, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path: Path | str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file; every tensor is copied into its own array."""
    path = Path(path)
    data = path.read_bytes()
    header, start = _header(data, path.name)
    metadata = header.pop("__metadata__", None) or {}
    tensors = {name: _tensor(data, start, name, entry, path.name) for name, entry in header.items()}
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _header(data: bytes, name: str) -> tuple[dict, int]:
    if len(data) < 8:
        raise WeightsFileError(f"{name} is too short to be a .safetensors file")
    size = int.from_bytes(data[:8], "little")
    if size > min(MAX_HEADER, len(data) - 8):
        raise WeightsFileError(f"{name}: header of {size} bytes in a file of {len(data)}")
    try:
        header = json.loads(data[8: 8 + size])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsFileError(f"{name}: the header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise WeightsFileError(f"{name}: the header is not a JSON object")
    return header, 8 + size


def _tensor(data: bytes, start: int, key: str, entry: dict, name: str) -> np.ndarray:
    try:
        dtype, shape, (begin, end) = np.dtype(DTYPES[entry["dtype"]]), tuple(entry["shape"]), entry["data_offsets"]
        count = int(np.prod(shape, dtype=np.int64))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise WeightsFileError(f"{name}: tensor {key!r} has an unknown dtype or a malformed entry (dtypes read: "
                               f"{', '.join(DTYPES)})") from None
    if not 0 <= begin <= end <= len(data) - start or end - begin != count * dtype.itemsize:
        raise WeightsFileError(f"{name}: tensor {key!r} of shape {list(shape)} has byte range [{begin}, {end}), "
                               f"outside the file or of the wrong size")
    array = np.frombuffer(data, dtype, count, start + begin).reshape(shape)
    if entry["dtype"] == "BF16":
        return widen_bfloat16(array)
    return array.astype(dtype.newbyteorder("="))
