"""OpenVINO engine: reads IR (or ONNX), reshapes to static shapes per request size, compiles with a disk cache."""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import numpy as np
import openvino as ov

from sdrt.backends.base import check_names
from sdrt.bundle import Component
from sdrt.bundle import sha256_file
from sdrt.cache import EngineCache, cache_home
from sdrt.contracts import BATCH
from sdrt.errors import BackendError

log = logging.getLogger(__name__)

# sdrt precision names -> OpenVINO's INFERENCE_PRECISION_HINT; "auto" keeps the device's own default, which on
# CPUs with AMX or AVX512-BF16 is bf16 (OpenVINO docs, "Precision Control") and f32 elsewhere.
PRECISIONS = {"bf16": "bf16", "f16": "f16", "f32": "f32"}
HINTS = {"latency": "LATENCY", "throughput": "THROUGHPUT"}
# Compiled shapes kept per session: alternating between a few sizes must not recompile; more is memory for nothing.
MAX_COMPILED_SHAPES = 4
# Streams under the throughput hint when none are given: the loop runs one batch at a time, so streams only pay
# by splitting that batch; two serve the guidance pair (uncond, cond) of one image, and on a small CPU each
# further stream takes threads from the others. Pass `streams` for larger batches on larger CPUs.
THROUGHPUT_STREAMS = 2
# Disk budget of the compiled-blob cache: about six SD 1.5 UNets at 512x512 compiled for bf16 from an fp32 IR.
DEFAULT_CACHE_GB = 20


def default_cache_dir() -> Path:
    """Where compiled blobs go: sdrt's cache home (sdrt.cache.cache_home) / openvino."""
    return cache_home() / "openvino"


class BlobCache:
    """Compiled models as entries of sdrt's engine cache (sdrt.cache.EngineCache), one blob per (model content,
    static shapes, device, config, OpenVINO version).

    OpenVINO's own CACHE_DIR would do this, but on a hit it hashes the whole model (weights included) to find the
    blob and reads the blob into memory. Here the key holds the model files' sha256 from the bundle's verified
    manifest, and a hit memory-maps the blob: the compiled model's weights stay in the page cache, not copied
    into the process (0.7-1 GB less resident for an int8 SD 1.5 UNet). Blobs are large (0.8-3.4 GB for an SD 1.5
    UNet at one shape): the folder keeps to $SDRT_OPENVINO_CACHE_GB (default DEFAULT_CACHE_GB).
    """

    NAME = "model.blob"

    def __init__(self, root: Path, max_bytes: int | None = None):
        self.entries = EngineCache(root, max_bytes) if max_bytes is not None else \
            EngineCache.for_engine("openvino", root, DEFAULT_CACHE_GB)

    def key(self, core: ov.Core, component: Component, path: Path, shapes: dict, device: str, config: dict) -> str:
        return self.entries.key({
            "engine": "openvino",
            "openvino": ov.get_version(),
            "device": core.get_property(device, "FULL_DEVICE_NAME"),
            "config": {k: str(v) for k, v in config.items()},
            "shapes": shapes,
            "model": component.checksums or _content_of(path),
        })

    def load(self, core: ov.Core, key: str, device: str, config: dict):
        """(compiled model, the mapping it was imported from) on a hit, else None."""
        blob = self.entries.lookup(key)
        if blob is None:
            return None
        try:
            mapped = np.memmap(blob, dtype=np.uint8, mode="c")  # copy-on-write: the file is never written through
            return core.import_model(ov.Tensor(mapped, shared_memory=True), device, config), mapped
        except (RuntimeError, ValueError, OSError) as e:  # intact bytes, yet refused: another OpenVINO build
            log.warning("openvino: cached blob %s cannot be imported (%s); compiling instead", blob, e)
            return None

    def store(self, key: str, compiled: ov.CompiledModel) -> None:
        """Write the blob as a cache entry (atomic; a failure only costs the next start a compile)."""
        try:
            data = compiled.export_model().getbuffer()
        except RuntimeError as e:
            log.warning("openvino: cannot export the compiled model for the cache: %s", e)
            return
        self.entries.store(key, self.NAME, lambda path: path.write_bytes(data))


def _content_of(path: Path) -> dict[str, str]:
    """sha256 of a model's files when no verified manifest lists them (a component built by hand)."""
    files = [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]
    return {f.name: sha256_file(f) for f in files if f.exists()}


def _type_name(value) -> str:
    """OpenVINO reports element types as `Type` objects ('bf16', 'f32'...) or strings depending on the property."""
    return value.get_type_name() if isinstance(value, ov.Type) else str(value).lower()


class OpenVinoSession:
    """One model: `prepare` reshapes it to the contract's static shape for `dims` and compiles (cached per shape).

    With `streams` > 1 the batch is split into that many parts (or the largest divisor of the batch below it),
    each run on its own infer request in parallel; the model is compiled for the part's batch.
    """

    def __init__(
        self, core: ov.Core, path: Path, component: Component, device: str, config: dict, streams: int,
        blobs: BlobCache | None = None,
    ):
        self.contract, self._component = component.contract, component
        contract = component.contract
        self._core, self._path, self._device, self._config, self._streams = core, path, device, config, streams
        self._blobs = blobs
        # The model is read now (its names checked at load) unless compiled blobs may make reading it unnecessary:
        # then it is read, and the names checked, when a shape is first compiled or imported. Dropped once compiled.
        self._model: ov.Model | None = None if blobs else read_model(core, path)
        self._checked = False
        if self._model is not None:
            self._check_ports(self._model)
        self._batched = [spec.name for spec in contract.inputs if spec.shape[:1] == (BATCH,)]
        # Per shape: the infer requests, and the memory-mapped blob a cached compiled model reads its weights from.
        self._compiled: OrderedDict[tuple, tuple[list[ov.InferRequest], object]] = OrderedDict()
        self._requests: list[ov.InferRequest] = []

    def _check_ports(self, model: ov.Model | ov.CompiledModel) -> None:
        if not self._checked:
            inputs = [_port_name(p, self.contract.input_names) for p in model.inputs]
            outputs = [name for p in model.outputs for name in p.get_names()]
            check_names(self.contract, inputs, outputs, "openvino")
            self._checked = True

    @property
    def compiled_shapes(self) -> list[dict[str, int]]:
        """The dims this session holds compiled models for, least recently used first."""
        return [dict(key) for key in self._compiled]

    def prepare(self, dims: Mapping[str, int]) -> None:
        key = tuple(sorted(dims.items()))
        if key not in self._compiled:
            self._compiled[key] = self._compile(dims)
            if len(self._compiled) > MAX_COMPILED_SHAPES:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(key)
        self._requests = self._compiled[key][0]

    def _compile(self, dims: Mapping[str, int]) -> tuple[list[ov.InferRequest], object]:
        parts = _parts(dims.get(BATCH, 1), self._streams)
        dims = {**dims, BATCH: dims[BATCH] // parts} if parts > 1 else dims
        shapes = {spec.name: list(spec.concrete_shape(dims)) for spec in self.contract.inputs}
        start = time.perf_counter()
        key = self._blobs.key(self._core, self._component, self._path, shapes, self._device, self._config) \
            if self._blobs else None
        hit = self._blobs.load(self._core, key, self._device, self._config) if key else None
        compiled, mapped = hit or (self._compile_model(shapes), None)
        self._check_ports(compiled)
        if key and not hit:
            self._blobs.store(key, compiled)
        log.debug(
            "openvino: %s %s for %s x %d in %.2f s (%s, %s streams)", "imported" if hit else "compiled",
            self.contract.component, shapes, parts, time.perf_counter() - start,
            _type_name(compiled.get_property("INFERENCE_PRECISION_HINT")), compiled.get_property("NUM_STREAMS"),
        )
        return [compiled.create_infer_request() for _ in range(parts)], mapped

    def _compile_model(self, shapes: dict[str, list[int]]) -> ov.CompiledModel:
        # The compiled model keeps its own copy of the weights; the ov.Model beside it would keep the IR's (memory-
        # mapped) weights resident for nothing, so it is read again only when a new shape needs compiling.
        model, self._model = self._model or read_model(self._core, self._path), None
        self._check_ports(model)
        ports = {_port_name(p, self.contract.input_names): p for p in model.inputs}
        model.reshape({ports[name]: shape for name, shape in shapes.items()})
        try:
            return self._core.compile_model(model, self._device, self._config)
        except RuntimeError as e:
            raise BackendError(f"openvino cannot compile {self.contract.component} for {shapes}: {e}") from None

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self._requests:
            raise BackendError(f"{self.contract.component}: prepare(dims) must be called before run")
        if len(self._requests) == 1:
            # Inputs are wrapped, not copied (the call is synchronous); outputs are copied out of the request's
            # tensors because callers keep them past the next run (the text encoder's, for all steps).
            result = self._requests[0].infer(dict(feeds), share_inputs=True)
            return {name: result[name] for name in self.contract.output_names}
        return self._run_split(feeds)

    def _run_split(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(self._requests)
        chunks = {name: np.split(feeds[name], n) for name in self._batched}
        for i, request in enumerate(self._requests):
            request.start_async({name: chunks[name][i] if name in chunks else feeds[name] for name in feeds})
        for request in self._requests:
            request.wait()
        # np.concatenate copies, so the outputs outlive the next run's writes into the request tensors.
        return {
            name: np.concatenate([r.get_tensor(name).data for r in self._requests])
            for name in self.contract.output_names
        }

    def profiling_info(self) -> list:
        """OpenVINO's per-node counters of the last run (empty unless compiled with PERF_COUNT in the config)."""
        return [info for request in self._requests for info in request.get_profiling_info()]

    def close(self) -> None:
        self._compiled.clear()
        self._requests, self._model = [], None  # a later prepare() reads the model again


def read_model(core: ov.Core, path: Path) -> ov.Model:
    """Read IR or ONNX; IR weights are memory-mapped (the Core's ENABLE_MMAP default), not copied."""
    log.debug("openvino: reading %s", path)
    try:
        return core.read_model(str(path))
    except RuntimeError as e:
        raise BackendError(f"openvino cannot read {path}: {e}") from None


def _parts(batch: int, streams: int) -> int:
    """The largest number of equal parts, at most `streams`, that `batch` splits into."""
    return max(k for k in range(1, min(batch, streams) + 1) if batch % k == 0)


def _port_name(port, wanted: list[str]) -> str:
    """The port's name from the contract when it carries one (a port may have several names), else any name."""
    names = port.get_names()
    return next((n for n in wanted if n in names), port.get_any_name())


class OpenVinoBackend:
    """Opens bundle components with OpenVINO: IR files, or ONNX files read directly."""

    name = "openvino"
    formats = ("openvino", "onnx")

    def __init__(
        self,
        device: str = "CPU",
        precision: str = "auto",
        hint: str = "latency",
        cache_dir: Path | str | None = None,
        cache: bool = True,
        threads: int = 0,
        streams: int | None = None,
    ):
        self.core = ov.Core()
        self.device = device.upper()
        have = self.core.available_devices  # "CPU", "GPU.0", ...: a bare "GPU" means the first of its kind
        if self.device not in have and self.device not in {d.split(".")[0] for d in have}:
            raise BackendError(f"openvino: device {device!r} not found (have: {', '.join(have)})")
        if precision != "auto" and precision not in PRECISIONS:
            choices = ", ".join(["auto", *PRECISIONS])
            raise BackendError(f"openvino: unknown precision {precision!r}; choose one of: {choices}")
        if hint not in HINTS:
            raise BackendError(f"openvino: unknown hint {hint!r}; choose one of: {', '.join(HINTS)}")
        if hint == "latency" and streams not in (None, 1):
            raise BackendError(f"openvino: streams={streams} needs hint='throughput' (latency runs one stream)")
        self.hint = hint
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir() if cache else None
        self.blobs = BlobCache(self.cache_dir) if self.cache_dir is not None else None  # checks the budget now
        # Latency: one request on one stream using every core (OpenVINO's latency default), the batch unsplit.
        self.streams = 1 if hint == "latency" else streams or THROUGHPUT_STREAMS
        self.config = self._config(precision, hint, threads)
        # The precision the device will run, made visible: "auto" resolves to the device default (bf16 on AMX).
        self.precision = PRECISIONS.get(precision) or _type_name(
            self.core.get_property(self.device, "INFERENCE_PRECISION_HINT")
        )

    def _config(self, precision: str, hint: str, threads: int) -> dict:
        config = {"PERFORMANCE_HINT": HINTS[hint], "NUM_STREAMS": self.streams}
        if precision != "auto":
            config["INFERENCE_PRECISION_HINT"] = PRECISIONS[precision]
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        return config

    @property
    def label(self) -> str:
        """What PNG parameters report as the backend: engine, device and the precision it computes in."""
        return f"openvino {self.device} {self.precision}"

    def load(self, bundle: Path, component: Component) -> OpenVinoSession:
        if component.format not in self.formats:
            raise BackendError(f"openvino cannot run {component.name} stored as {component.format!r}")
        path = Path(bundle) / component.file
        config = {**self.config, "INFERENCE_PRECISION_HINT": "f32"} if component.contract.full_precision else self.config
        return OpenVinoSession(self.core, path, component, self.device, config, self.streams, self.blobs)
