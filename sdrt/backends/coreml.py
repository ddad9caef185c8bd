"""Core ML engine (macOS only; untested in this project, which has no Mac): runs the .mlpackage components of a Core
ML bundle (sdrt export --target coreml) on the chosen compute units.

Each package is compiled once to .mlmodelc and kept in sdrt's engine cache (`CompiledModels`): Core ML prepares a
.mlpackage afresh on every load, which takes minutes for an SD UNet, while a compiled model loads in seconds
(ml-stable-diffusion README, FAQ Q5). Packages are built for static shapes: `prepare` picks the exported shape
matching the request and refuses others, and `run` splits or pads the batch to the one the package was built for.
"""
from __future__ import annotations

import logging
import platform
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from sdrt.bundle import Component, sha256_file
from sdrt.cache import EngineCache
from sdrt.contracts import BATCH, Contract
from sdrt.errors import BackendError

log = logging.getLogger(__name__)

# sdrt names -> coremltools.ComputeUnit members. cpu_and_ne is the default: the bundles' default split_einsum
# attention is built for the Neural Engine, and Apple recommends it for 8 GB Macs (ml-stable-diffusion FAQ Q4).
COMPUTE_UNITS = {"cpu_and_ne": "CPU_AND_NE", "cpu_and_gpu": "CPU_AND_GPU", "all": "ALL", "cpu_only": "CPU_ONLY"}
DEFAULT_COMPUTE_UNITS = "cpu_and_ne"
# Disk budget of compiled models: a compiled SD 1.5 is about its package's size (2.5 GB fp16, 1 GB palettized).
DEFAULT_CACHE_GB = 10


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
    """Compiled packages (.mlmodelc) as entries of sdrt's engine cache (sdrt.cache.EngineCache), one per package
    content (the sha256 of its files in the bundle's verified manifest), coremltools version and macOS version.
    Compiled models are about their package's size (2.5 GB for an fp16 SD 1.5): the folder keeps to
    $SDRT_COREML_CACHE_GB (default DEFAULT_CACHE_GB)."""

    NAME = "model.mlmodelc"

    def __init__(self, root: Path | None = None, max_bytes: int | None = None):
        self.entries = EngineCache(root, max_bytes) if max_bytes is not None else \
            EngineCache.for_engine("coreml", root, DEFAULT_CACHE_GB)

    def key(self, component: Component, package: Path, toolchain: str) -> str:
        content = component.checksums or {p.relative_to(package).as_posix(): sha256_file(p)
                                          for p in sorted(package.rglob("*")) if p.is_file()}
        return self.entries.key({"engine": "coreml", "toolchain": toolchain, "model": content})

    def compiled(self, key: str, package: Path, compile_model) -> Path | None:
        """The compiled model for `key`, compiled from `package` by `compile_model(src, dst)` when missing; None
        when the cache cannot be written (the caller compiles to a temporary folder)."""
        hit = self.entries.lookup(key)
        if hit is not None:
            return hit
        log.info("coreml: compiling %s (once; later loads read the compiled model from the cache)", package)
        return self.entries.store(key, self.NAME, lambda path: compile_model(str(package), str(path)))


class CoreMLSession:
    """One compiled package: `prepare` picks its exported shape, `run` predicts batch chunk by batch chunk."""

    def __init__(self, model, component: Component, scratch: tempfile.TemporaryDirectory | None = None):
        self.contract, self._model, self._shapes = component.contract, model, component.shapes
        self._scratch = scratch  # the compiled model's folder when it is not cached, removed at close
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
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None


class CoreMLBackend:
    """Opens Core ML bundle components with coremltools on macOS, compiled once and cached."""

    name = "coreml"
    formats = ("coreml",)

    def __init__(self, compute_units: str = DEFAULT_COMPUTE_UNITS, cache_dir: Path | str | None = None,
                 cache: bool = True):
        require_macos()
        if compute_units not in COMPUTE_UNITS:
            raise BackendError(f"coreml: unknown compute units {compute_units!r}; choose one of: "
                               f"{', '.join(COMPUTE_UNITS)}")
        import coremltools as ct

        self._ct, self.compute_units = ct, compute_units
        self.cache = CompiledModels(Path(cache_dir) if cache_dir is not None else None) if cache else None
        self.toolchain = f"coremltools {ct.__version__}, macOS {platform.mac_ver()[0]}"

    @property
    def label(self) -> str:
        return f"coreml {self.compute_units}"

    def load(self, bundle: Path, component: Component) -> CoreMLSession:
        if component.format not in self.formats:
            raise BackendError(f"coreml cannot run {component.name} stored as {component.format!r}")
        package, compile_model = Path(bundle) / component.file, self._ct.models.utils.compile_model
        compiled = self.cache.compiled(self.cache.key(component, package, self.toolchain), package, compile_model) \
            if self.cache else None
        scratch = None
        if compiled is None:  # no cache: compiled for this session only
            scratch = tempfile.TemporaryDirectory(prefix="sdrt-coreml-")
            compiled = Path(compile_model(str(package), str(Path(scratch.name) / CompiledModels.NAME)))
        units = getattr(self._ct.ComputeUnit, COMPUTE_UNITS[self.compute_units])
        try:
            model = self._ct.models.CompiledMLModel(str(compiled), compute_units=units)
        except Exception as e:  # Core ML reports load failures as RuntimeError or its own errors
            raise BackendError(f"coreml cannot load {component.file}: {e}") from None
        return CoreMLSession(model, component, scratch)
