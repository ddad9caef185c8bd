"""Read an ONNX file's graph and weights without the onnx package: a small protobuf wire-format reader over mmap.

The runtime needs two things from an ONNX file that no engine API gives: where each initializer's bytes are (to
read a base weight and write a changed one, `patched_source`), and the graph's node names (to find weights in
bundles exported before weights maps, `sdrt.weights_map.derive_onnx_map`). Field numbers are those of onnx.proto3
(ModelProto.graph = 7, GraphProto.node = 1 / initializer = 5, TensorProto.dims = 1 / data_type = 2 / name = 8 /
raw_data = 9 / external_data = 13 / data_location = 14). Only what these two uses need is decoded; the rest is
skipped by length, so a 3 GB file costs a walk over its field headers, not a read of its weights. Every length is
bounds-checked: a truncated or hostile file raises BundleError, never reads outside the mapping.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from sdrt.errors import BundleError

# TensorProto.DataType -> numpy dtype, for the types weights come in (bfloat16 is read as its raw uint16 bits).
DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 6: np.int32, 7: np.int64, 9: np.bool_, 10: np.float16,
          11: np.float64, 16: np.uint16}
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5
_MODEL_GRAPH, _GRAPH_NODE, _GRAPH_INITIALIZER = 7, 1, 5
_NODE_INPUT, _NODE_OUTPUT, _NODE_NAME, _NODE_OP, _NODE_ATTRIBUTE = 1, 2, 3, 4, 5
_ATTR_NAME, _ATTR_INT = 1, 3
_T_DIMS, _T_TYPE, _T_FLOATS, _T_NAME, _T_RAW, _T_EXTERNAL, _T_LOCATION = 1, 2, 4, 8, 9, 13, 14
_EXTERNAL_LOCATION = 1  # TensorProto.DataLocation.EXTERNAL


@dataclass(frozen=True)
class Initializer:
    """Where one initializer's values are: `nbytes` at `offset` in the model file, or in `external` beside it."""

    name: str
    dtype: np.dtype
    dims: tuple[int, ...]
    offset: int
    nbytes: int
    external: str | None = None  # file name relative to the model's folder (ONNX external data)


@dataclass(frozen=True)
class Node:
    """A graph node's name, type, tensor names and integer attributes (Gemm's transB, Gather's axis...)."""

    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    ints: dict[str, int] = field(default_factory=dict)


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise BundleError("ONNX file is truncated or malformed (bad varint)")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value or payload start, payload end) for each field of one message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value, pos
            continue
        size = {_FIXED64: 8, _FIXED32: 4}.get(wire)
        if size is None and wire == _BYTES:
            size, pos = _varint(buf, pos, end)
        if size is None or pos + size > end:
            raise BundleError(f"ONNX file is truncated or malformed (field {number}, wire type {wire})")
        yield number, wire, pos, pos + size
        pos += size


def _text(buf, start: int, end: int) -> str:
    return bytes(buf[start:end]).decode("utf-8", errors="replace")


def _ints(buf, wire: int, a: int, b: int) -> list[int]:
    """A repeated int64 field's values: one varint, or a packed run of them."""
    if wire == _VARINT:
        return [a]
    values, pos = [], a
    while pos < b:
        value, pos = _varint(buf, pos, b)
        values.append(value)
    return values


class OnnxFile:
    """An ONNX model's initializers and nodes, with the file memory-mapped for reading weights."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise BundleError(f"cannot read {self.path}: {e}") from None
        buf = memoryview(self._map)
        self.initializers: dict[str, Initializer] = {}
        self.nodes: list[Node] = []
        for number, wire, a, b in _fields(buf, 0, len(buf)):
            if number == _MODEL_GRAPH and wire == _BYTES:
                self._read_graph(buf, a, b)

    def _read_graph(self, buf, start: int, end: int) -> None:
        for number, wire, a, b in _fields(buf, start, end):
            if wire != _BYTES:
                continue
            if number == _GRAPH_NODE:
                self.nodes.append(_node(buf, a, b))
            elif number == _GRAPH_INITIALIZER:
                init = _initializer(buf, a, b)
                if init is not None:
                    self.initializers[init.name] = init

    def array(self, name: str) -> np.ndarray:
        """An initializer's values (read-only, memory-mapped where the bytes are raw)."""
        init = self.initializers[name]
        if init.external is None:
            data = np.frombuffer(self._map, np.uint8, init.nbytes, init.offset)
        else:
            data = np.memmap(self.path.parent / init.external, np.uint8, "r", init.offset, (init.nbytes,))
        return data.view(init.dtype).reshape(init.dims)

    def patched_source(self, values: Mapping[str, np.ndarray]) -> tuple[bytes | None, dict[str, np.ndarray]]:
        """The model with some initializers' values replaced: (the file's bytes with the in-file ones rewritten,
        or None when none is in the file) and the external ones, for ONNX Runtime's add_external_initializers.

        Each value must have its initializer's dtype and dims: bytes are replaced in place, so the layout of the
        file never changes (checked here, as a wrong size would corrupt the protobuf)."""
        inline, external = {}, {}
        for name, value in values.items():
            init = self.initializers.get(name)
            if init is None:
                raise BundleError(f"{self.path}: no initializer named {name!r}")
            if value.dtype != init.dtype or tuple(value.shape) != init.dims:
                raise BundleError(f"{self.path}: initializer {name}: expected {init.dtype} {list(init.dims)}, "
                                  f"got {value.dtype} {list(value.shape)}")
            (inline if init.external is None else external)[name] = np.ascontiguousarray(value)
        if not inline:
            return None, external
        data = bytearray(self._map)
        for name, value in inline.items():
            init = self.initializers[name]
            data[init.offset:init.offset + init.nbytes] = value.tobytes()
        return bytes(data), external

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:  # arrays still view the mapping: it closes when the last of them goes
            pass


def _node(buf, start: int, end: int) -> Node:
    inputs, outputs, ints, name, op = [], [], {}, "", ""
    for number, wire, a, b in _fields(buf, start, end):
        if wire != _BYTES:
            continue
        if number == _NODE_INPUT:
            inputs.append(_text(buf, a, b))
        elif number == _NODE_OUTPUT:
            outputs.append(_text(buf, a, b))
        elif number == _NODE_NAME:
            name = _text(buf, a, b)
        elif number == _NODE_OP:
            op = _text(buf, a, b)
        elif number == _NODE_ATTRIBUTE:
            ints.update(_int_attribute(buf, a, b))
    return Node(name, op, tuple(inputs), tuple(outputs), ints)


def _int_attribute(buf, start: int, end: int) -> dict[str, int]:
    name, value = None, None
    for number, wire, a, b in _fields(buf, start, end):
        if number == _ATTR_NAME and wire == _BYTES:
            name = _text(buf, a, b)
        elif number == _ATTR_INT and wire == _VARINT:
            value = a - (1 << 64) if a >= 1 << 63 else a  # int64, two's complement
    return {name: value} if name is not None and value is not None else {}


def _initializer(buf, start: int, end: int) -> Initializer | None:
    """The initializer, or None for those weights never are (strings, typed int64_data lists...)."""
    dims, dtype, name, data, external, location = [], None, "", None, {}, 0
    for number, wire, a, b in _fields(buf, start, end):
        if number == _T_DIMS:
            dims.extend(_ints(buf, wire, a, b))
        elif number == _T_TYPE and wire == _VARINT:
            dtype = a
        elif number == _T_NAME and wire == _BYTES:
            name = _text(buf, a, b)
        elif number in (_T_RAW, _T_FLOATS) and wire == _BYTES:  # packed float_data has raw_data's layout
            data = (a, b - a)
        elif number == _T_EXTERNAL and wire == _BYTES:
            external.update(_entry(buf, a, b))
        elif number == _T_LOCATION and wire == _VARINT:
            location = a
    if dtype not in DTYPES:
        return None
    np_dtype = np.dtype(DTYPES[dtype])
    expected = int(np.prod(dims, dtype=np.int64)) * np_dtype.itemsize
    if location == _EXTERNAL_LOCATION:
        return _external(name, np_dtype, tuple(dims), external, expected)
    if data is None:
        return None
    offset, nbytes = data
    if nbytes != expected:
        raise BundleError(f"initializer {name!r}: {nbytes} bytes do not hold {np_dtype} {dims}")
    return Initializer(name, np_dtype, tuple(dims), offset, nbytes)


def _external(name: str, dtype: np.dtype, dims: tuple, entries: dict, expected: int) -> Initializer:
    """An externally stored initializer; its file must sit beside the model (no path: a bundle reads only itself)."""
    location = entries.get("location", "")
    if not location or Path(location).name != location or location in (".", ".."):
        raise BundleError(f"initializer {name!r}: external data location {location!r} is not a file beside the model")
    try:
        offset, nbytes = int(entries.get("offset", 0)), int(entries.get("length", expected))
    except ValueError:
        raise BundleError(f"initializer {name!r}: malformed external data offset or length") from None
    if nbytes != expected or offset < 0:
        raise BundleError(f"initializer {name!r}: {nbytes} external bytes do not hold {dtype} {list(dims)}")
    return Initializer(name, dtype, dims, offset, nbytes, location)


def _entry(buf, start: int, end: int) -> dict[str, str]:
    key, value = "", ""
    for number, wire, a, b in _fields(buf, start, end):
        if wire == _BYTES and number in (1, 2):
            key, value = (_text(buf, a, b), value) if number == 1 else (key, _text(buf, a, b))
    return {key: value}
