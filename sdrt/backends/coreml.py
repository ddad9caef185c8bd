"""Core ML engine (macOS only; untested in this project, which has no Mac): runs the .mlpackage components of a Core
ML bundle (sdrt export --target coreml) on the chosen compute units.

Each package is compiled once to .mlmodelc and kept in sdrt's cache (`CompiledModels`): Core ML prepares a
.mlpackage afresh on every load, which takes minutes for an SD UNet, while a compiled model loads in seconds
(ml-stable-diffusion README, FAQ Q5). Packages are built for static shapes: `prepare` picks the exported shape
matching the request and refuses others, and `run` splits or pads the batch to the one the package was built for.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from sdrt.bundle import Component, read_manifest
from sdrt.cache import cache_home
from sdrt.contracts import BATCH, Contract
from sdrt.errors import BackendError

log = logging.getLogger(__name__)

# sdrt names -> coremltools.ComputeUnit members. cpu_and_ne is the default: the bundles' default split_einsum
# attention is built for the Neural Engine, and Apple recommends it for 8 GB Macs (ml-stable-diffusion FAQ Q4).
COMPUTE_UNITS = {"cpu_and_ne": "CPU_AND_NE", "cpu_and_gpu": "CPU_AND_GPU", "all": "ALL", "cpu_only": "CPU_ONLY"}
DEFAULT_COMPUTE_UNITS = "cpu_and_ne"
# Disk budget of compiled models: a compiled SD 1.5 is about its package's size (2.5 GB fp16, 1 GB palettized).
DEFAULT_CACHE_GB = 10
RECORD = "sdrt-compiled.json"  # beside each compiled model: its files and sizes, written last


def require_macos() -> None:
    """Core ML exists on macOS only: one clear line anywhere else."""
    if sys.platform != "darwin":
        raise BackendError(f"coreml: Core ML runs on macOS only, this is {platform.system()}; run an ONNX bundle "
                           "with the onnxruntime or openvino backend here")


def pick_shape(contract: Contract, shapes: tuple[dict[str, int], ...], dims: Mapping[str, int]) -> dict[str, int]:
    """The exported shape whose axes other than the batch equal `dims`' (any batch runs, split or padded)."""
    for shape in shapes:
        if all(dims.get(axis) == size for axis, size in shape.items() if axis != BATCH):
            return shape
    listed = "; ".join(_axes_text(s) for s in shapes)
    raise BackendError(f"{contract.component}: expected one of the shapes the package was built for ({listed}), got "
                       f"{_axes_text(dims)}: export the size with sdrt export --target coreml --sizes")


def _axes_text(dims: Mapping[str, int]) -> str:
    return ", ".join(f"{axis} {size}" for axis, size in dims.items() if axis != BATCH)


def batch_chunks(feeds: Mapping[str, np.ndarray], batched: list[str], size: int) -> Iterator[dict[str, np.ndarray]]:
    """Feeds cut along the batch axis into chunks of `size`, the last padded by repeating its final item."""
    total = len(feeds[batched[0]]) if batched else size
    for start in range(0, total, size):
        chunk = {}
        for name, array in feeds.items():
            if name in batched:
                part = array[start:start + size]
                pad = size - len(part)
                array = np.concatenate([part, np.repeat(part[-1:], pad, axis=0)]) if pad else part
            chunk[name] = np.ascontiguousarray(array)
        yield chunk


class CompiledModels:
    """Compiled models (.mlmodelc) on disk, one per package content and Core ML toolchain.

    The key is built from the package files' sha256 as the bundle's manifest lists them (verified at load), the
    coremltools version and the macOS version. A model is compiled into a temporary sibling and renamed into place
    with its record of files and sizes, checked on every use; past `max_bytes` ($SDRT_COREML_CACHE_GB) the least
    recently used entries this cache made are deleted.
    """

    def __init__(self, root: Path | None = None, max_bytes: int | None = None):
        self.root = root or cache_home() / "coreml"
        self.max_bytes = max_bytes if max_bytes is not None else int(
            float(os.environ.get("SDRT_COREML_CACHE_GB", DEFAULT_CACHE_GB)) * 2**30
        )

    def key(self, files: Mapping[str, str], component: Component, toolchain: str) -> str:
        listed = {rel: digest for rel, digest in files.items() if rel.startswith(f"{component.file}/")}
        ident = json.dumps({"files": sorted(listed.values()), "toolchain": toolchain}, sort_keys=True)
        return hashlib.sha256(ident.encode()).hexdigest()[:40]

    def compiled(self, key: str, package: Path, compile_model) -> Path:
        """The compiled model for `key`, compiled from `package` by `compile_model(src, dst)` when missing."""
        entry = self.root / key
        if self._complete(entry):
            os.utime(entry)  # recently used: evicted last
            return entry / "model.mlmodelc"
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=self.root))
        try:
            compile_model(str(package), str(tmp / "model.mlmodelc"))
            files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in tmp.rglob("*") if p.is_file()}
            (tmp / RECORD).write_text(json.dumps(files))
            shutil.rmtree(entry, ignore_errors=True)  # an incomplete entry left by a crash
            os.replace(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.evict(keep=key)
        return entry / "model.mlmodelc"

    def _complete(self, entry: Path) -> bool:
        try:
            files = json.loads((entry / RECORD).read_text())
            return all((entry / rel).stat().st_size == size for rel, size in files.items())
        except (OSError, ValueError):
            return False

    def evict(self, keep: str = "") -> None:
        """Delete least recently used entries (never `keep`, never folders without a record) beyond max_bytes."""
        entries = []
        for entry in self.root.iterdir() if self.root.is_dir() else ():
            try:
                files = json.loads((entry / RECORD).read_text())
                entries.append((entry.stat().st_mtime_ns, sum(files.values()), entry))
            except (OSError, ValueError):
                continue
        total = sum(size for _, size, _ in entries)
        for _, size, entry in sorted(entries):
            if total <= self.max_bytes:
                break
            if entry.name != keep:
                log.info("coreml: cache over %.1f GB, deleting %s", self.max_bytes / 2**30, entry.name)
                shutil.rmtree(entry, ignore_errors=True)
                total -= size


class CoreMLSession:
    """One compiled package: `prepare` picks its exported shape, `run` predicts batch chunk by batch chunk."""

    def __init__(self, model, component: Component):
        self.contract, self._model, self._shapes = component.contract, model, component.shapes
        self._batched = [t.name for t in self.contract.inputs if t.shape[:1] == (BATCH,)]
        self._shape: dict[str, int] | None = None

    def prepare(self, dims: Mapping[str, int]) -> None:
        self._shape = pick_shape(self.contract, self._shapes, dims)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._shape is None:
            raise BackendError(f"{self.contract.component}: prepare(dims) must be called before run")
        total = len(feeds[self._batched[0]]) if self._batched else 1
        parts = [self._model.predict(chunk) for chunk in batch_chunks(feeds, self._batched, self._shape.get(BATCH, 1))]
        return {t.name: np.concatenate([p[t.name] for p in parts])[:total].astype(t.dtype)
                for t in self.contract.outputs}

    def close(self) -> None:
        self._model = None


class CoreMLBackend:
    """Opens Core ML bundle components with coremltools on macOS, compiled once and cached."""

    name = "coreml"
    formats = ("coreml",)

    def __init__(self, compute_units: str = DEFAULT_COMPUTE_UNITS, cache_dir: Path | str | None = None):
        require_macos()
        if compute_units not in COMPUTE_UNITS:
            raise BackendError(f"coreml: unknown compute units {compute_units!r}; choose one of: "
                               f"{', '.join(COMPUTE_UNITS)}")
        import coremltools as ct

        self._ct, self.compute_units = ct, compute_units
        self.cache = CompiledModels(Path(cache_dir) if cache_dir is not None else None)
        self.toolchain = f"coremltools {ct.__version__}, macOS {platform.mac_ver()[0]}"

    @property
    def label(self) -> str:
        return f"coreml {self.compute_units}"

    def load(self, bundle: Path, component: Component) -> CoreMLSession:
        if component.format not in self.formats:
            raise BackendError(f"coreml cannot run {component.name} stored as {component.format!r}")
        files = read_manifest(bundle).files
        key = self.cache.key(files, component, self.toolchain)
        compiled = self.cache.compiled(key, Path(bundle) / component.file, self._ct.models.utils.compile_model)
        units = getattr(self._ct.ComputeUnit, COMPUTE_UNITS[self.compute_units])
        try:
            model = self._ct.models.CompiledMLModel(str(compiled), compute_units=units)
        except Exception as e:  # Core ML reports load failures as RuntimeError or its own errors
            raise BackendError(f"coreml cannot load {component.file}: {e}") from None
        return CoreMLSession(model, component)
