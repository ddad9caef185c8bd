"""Writing ONNX models (torch-free): one file, or the graph with its weights in one `.data` file beside it."""
from __future__ import annotations

import logging
from pathlib import Path

import onnx

log = logging.getLogger(__name__)

# Weight bytes above which weights go to `<model>.onnx.data`. A protobuf file cannot exceed 2 GiB; the graph,
# folded constants and proto overhead come on top of the weights, so switch well before (SD1's fp32 UNet, 3.4 GB,
# is over it; its text encoder, 0.5 GB, and VAE halves, < 0.2 GB, stay single files).
EXTERNAL_DATA_THRESHOLD = 1 << 30
DATA_SUFFIX = ".data"


def save_onnx(model: onnx.ModelProto, path: Path, external_data: bool) -> list[Path]:
    """Write `model` to `path` (weights in `<path>.data` when `external_data`) and check it; returns the files."""
    if not external_data:
        onnx.save_model(model, str(path))
        onnx.checker.check_model(str(path))
        log.debug("wrote %s", path)
        return [path]
    data = path.with_name(path.name + DATA_SUFFIX)
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
        location=data.name, size_threshold=1024,
    )
    onnx.checker.check_model(str(path))  # by path: the checker then follows the external data
    log.debug("wrote %s with its weights in %s", path, data.name)
    return [path, data]
