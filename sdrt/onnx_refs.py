"""The files an ONNX model makes an engine open: its tensors' external-data locations, read without `onnx`.

ONNX Runtime and OpenVINO load a tensor whose data lives outside the model from the file named by its
`external_data` entry "location", relative to the model's folder. To know those files before an engine opens
them, this walks the protobuf wire format (protobuf.dev/programming-guides/encoding) of the ModelProto down to
every TensorProto, skipping everything else by its length: weights stored inside the file are never read.
Field numbers are onnx/onnx.proto's (tests compare them with the `onnx` package's descriptors).
"""
from __future__ import annotations

import mmap
from pathlib import Path

from sdrt.errors import BundleError

# For each message type, the fields holding messages that can (transitively) hold a TensorProto.
MODEL, GRAPH, NODE, ATTRIBUTE, FUNCTION, TRAINING, SPARSE, TENSOR, ENTRY = range(9)
CHILDREN: dict[int, dict[int, int]] = {
    MODEL: {7: GRAPH, 20: TRAINING, 25: FUNCTION},  # graph, training_info, functions
    GRAPH: {1: NODE, 5: TENSOR, 15: SPARSE},  # node, initializer, sparse_initializer
    NODE: {5: ATTRIBUTE},  # attribute
    ATTRIBUTE: {5: TENSOR, 6: GRAPH, 10: TENSOR, 11: GRAPH, 22: SPARSE, 23: SPARSE},  # t, g, tensors, graphs, sparse
    FUNCTION: {7: NODE, 11: ATTRIBUTE},  # node, attribute_proto (default attribute values)
    TRAINING: {1: GRAPH, 2: GRAPH},  # initialization, algorithm
    SPARSE: {1: TENSOR, 2: TENSOR},  # values, indices
    TENSOR: {13: ENTRY},  # external_data: StringStringEntryProto
    ENTRY: {},
}
ENTRY_KEY, ENTRY_VALUE = 1, 2
MAX_DEPTH = 64  # nested subgraphs (If / Loop bodies); protobuf's own parsers stop at 100
VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5


class _Reader:
    """Fields of protobuf messages in one buffer (bytes or an mmap); any malformation raises BundleError naming
    the file."""

    def __init__(self, data, name: str):
        self.data, self.name = data, name

    def bad(self, why: str) -> BundleError:
        return BundleError(f"{self.name} is not a valid ONNX model ({why})")

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        value = shift = 0
        while pos < end and shift < 64:
            byte = self.data[pos]
            value |= (byte & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
            if byte < 0x80:
                return value, pos
        raise self.bad("truncated varint")

    def fields(self, start: int, end: int):
        """(field number, wire type, payload start, payload end) for each field of the message at [start, end)."""
        pos = start
        while pos < end:
            tag, pos = self.varint(pos, end)
            number, wire = tag >> 3, tag & 7
            if wire == VARINT:
                _, after = self.varint(pos, end)
            elif wire == LENGTH:
                length, pos = self.varint(pos, end)
                after = pos + length
            elif wire in (FIXED64, FIXED32):
                after = pos + (8 if wire == FIXED64 else 4)
            else:
                raise self.bad(f"wire type {wire}")
            if after > end:
                raise self.bad("a field runs past its message")
            yield number, wire, pos, after
            pos = after

    def text(self, start: int, end: int) -> str:
        try:
            return bytes(self.data[start:end]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.bad("an external-data entry is not UTF-8") from None


def _entry(reader: _Reader, start: int, end: int) -> tuple[str, str]:
    key = value = ""
    for number, wire, a, b in reader.fields(start, end):
        if wire == LENGTH and number == ENTRY_KEY:
            key = reader.text(a, b)
        elif wire == LENGTH and number == ENTRY_VALUE:
            value = reader.text(a, b)
    return key, value


def scan(data, name: str = "model") -> list[str]:
    """The distinct external-data locations of every tensor in a serialized ModelProto, in order of appearance."""
    reader, found = _Reader(data, name), {}
    stack = [(MODEL, 0, len(data), 0)]
    while stack:
        kind, start, end, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise reader.bad(f"messages nested over {MAX_DEPTH} deep")
        children = []
        for number, wire, a, b in reader.fields(start, end):
            child = CHILDREN[kind].get(number)
            if kind == ENTRY or wire != LENGTH or child is None:
                continue
            if child == ENTRY:
                key, value = _entry(reader, a, b)
                if key == "location":
                    found.setdefault(value, None)
            else:
                children.append((child, a, b, depth + 1))
        stack.extend(reversed(children))
    return list(found)


def external_data_files(path: Path) -> list[str]:
    """The external-data locations an ONNX file names (relative to its folder, as written); [] when it has none."""
    try:
        with open(path, "rb") as f:
            if f.seek(0, 2) == 0:
                raise BundleError(f"{path} is empty: not an ONNX model")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return scan(data, str(path))
    except OSError as e:
        raise BundleError(f"cannot read {path}: {e.strerror or e}") from None
