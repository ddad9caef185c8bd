"""The weights of a torch.export program file (.pt2), read without torch: names, shapes and float32 values.

A .pt2 is a zip archive; `torch.export.save` writes each weight's raw bytes as one stored (uncompressed) member
`<archive>/data/weights/weight_N` and describes them in `<archive>/data/weights/model_weights_config.json`:
fully qualified name -> {path_name, tensor_meta: {dtype, sizes, strides, storage_offset}} (torch's export schema,
torch/_export/serde/schema.py). Loading the program itself deserializes its graph and symbolic shapes (tens of
seconds for an SD UNet); replacing weights (sdrt.backends.torch) needs only these.
"""
from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdrt.errors import BundleError

CONFIG_SUFFIX = "/data/weights/model_weights_config.json"
FLOAT = 7  # ScalarType.FLOAT in torch's export schema: the only dtype sdrt exports weights in
# transformers 4 nests CLIP's modules under `text_model.`, transformers 5 does not: LoRA files use the first form.
TEXT_MODEL_PREFIX = "text_model."


@dataclass(frozen=True)
class StoredWeight:
    """One float32 weight: its archive member and shape."""

    member: str
    shape: tuple[int, ...]


class ProgramWeights:
    """The float32 weights of the program in one .pt2 file, by fully qualified name."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        try:
            with zipfile.ZipFile(self.path) as archive:
                config_name = next(n for n in archive.namelist() if n.endswith(CONFIG_SUFFIX))
                config = json.loads(archive.read(config_name))["config"]
        except (OSError, zipfile.BadZipFile, StopIteration, ValueError, KeyError) as e:
            raise BundleError(f"{self.path}: not a torch.export program with weights ({e!r})") from None
        folder = config_name[: -len("model_weights_config.json")]
        self.weights = {name: _stored(folder, entry) for name, entry in config.items() if _plain_float(entry)}

    def resolve(self, name: str) -> str:
        """The program's name for a torch parameter `name` of the module its component wraps (`conv_in.weight`
        is the UNet program's `unet.conv_in.weight`), written with or without transformers 4's `text_model.`."""
        bare = name[len(TEXT_MODEL_PREFIX):] if name.startswith(TEXT_MODEL_PREFIX) else name
        for candidate in (name, bare):
            found = [fqn for fqn in self.weights if fqn == candidate or fqn.endswith("." + candidate)]
            if len(found) == 1:
                return found[0]
        raise BundleError(f"{self.path}: no single float32 weight named {name!r}")

    def array(self, fqn: str) -> np.ndarray:
        """A weight's values (float32, in its torch shape)."""
        stored = self.weights[fqn]
        with zipfile.ZipFile(self.path) as archive:
            data = archive.read(stored.member)
        if len(data) != 4 * math.prod(stored.shape):
            raise BundleError(f"{self.path}: weight {fqn} has {len(data)} bytes, expected float32 {list(stored.shape)}")
        return np.frombuffer(data, np.float32).reshape(stored.shape).copy()


def _plain_float(entry: dict) -> bool:
    """A float32 weight stored whole in its own contiguous member (not a view into another's bytes)."""
    meta = entry.get("tensor_meta") or {}
    sizes = [s.get("as_int") for s in meta.get("sizes", [])]
    strides = [s.get("as_int") for s in meta.get("strides", [])]
    contiguous = [math.prod(sizes[i + 1:]) for i in range(len(sizes))]
    offset = (meta.get("storage_offset") or {}).get("as_int")
    return meta.get("dtype") == FLOAT and not entry.get("use_pickle") and strides == contiguous and offset == 0


def _stored(folder: str, entry: dict) -> StoredWeight:
    sizes = tuple(s["as_int"] for s in entry["tensor_meta"]["sizes"])
    return StoredWeight(folder + entry["path_name"], sizes)
