"""TensorRT engine (TensorRT for RTX, or TensorRT 10/11 where installed): engines built from the bundle's ONNX files
on first use and kept in sdrt's engine cache, run through cuda-python (device buffers, a stream, CUDA graphs).

Written against the documented APIs and untested in this project: its machines have no GPU. What runs without one
is tested (parsing, profiles, refit flags, cache keys, the messages when TensorRT, the driver or a GPU is missing).

Per component: `prepare(dims)` picks the profile (`shapes="static"`: an engine for exactly these shapes, fastest,
and a CUDA graph replays the run from its third call; `"dynamic"`: one engine for the ranges of
sdrt.backends.tensorrt_profiles, a static one for shapes outside them), finds the engine in the cache or builds it
(minutes for an SD 1.5 UNet), and binds device buffers for the shapes. `run` copies the inputs in, runs, copies the
outputs out; the loop's text embeddings (frozen by the pipeline) are uploaded once, the latents each step (the
samplers are numpy on the host: 2 x 64 KB each way for one guided 512 px image).
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import numpy as np

from sdrt.backends import cuda
from sdrt.backends.base import check_names, is_frozen
from sdrt.backends.precision import FULL, guarded, model_file, resolve_precision
from sdrt.backends.tensorrt_build import (
    OPTIMIZATION_LEVEL, TensorRt, build_serialized, builder_config, load_tensorrt, make_logger, parse,
    serialized_timing_cache,
)
from sdrt.backends.tensorrt_profiles import (
    DYNAMIC, STATIC, Profile, check_shapes_option, dynamic_profile, input_shapes, static_profile,
)
from sdrt.backends.tensorrt_weights import changed_weights, refit
from sdrt.bundle import Component, Manifest, read_manifest, sha256_file
from sdrt.cache import EngineCache
from sdrt.errors import BackendError

log = logging.getLogger(__name__)

# Disk budget of the engine cache ($SDRT_TENSORRT_CACHE_GB): an SD 1.5 fp16 UNet engine is about 1.7 GB.
DEFAULT_CACHE_GB = 20
PLAN, TIMING, RUNTIME_CACHE = "engine.plan", "timing.cache", "runtime.cache"
MAX_ENGINES = 2  # engines a session keeps loaded (each holds the component's weights on the GPU)
GRAPH_AFTER = 2  # runs at one shape before a CUDA graph is captured (the first run may allocate; the graph replays)


def engine_identity(trt: TensorRt, gpu: cuda.DeviceInfo, component: Component, file: str, precision: str,
                    profile: Profile, refit: bool, bundle: Path) -> dict:
    """What an engine depends on: the ONNX file's verified sha256 (from the manifest), precision, profile, refit,
    the GPU (name, compute capability), driver, CUDA runtime and TensorRT."""
    model = component.checksums or {p.name: sha256_file(p) for p in _model_files(bundle / file)}
    return {"engine": trt.flavour, "version": trt.version, **gpu.identity(), "model": model, "file": file,
            "precision": precision, "profile": profile.identity(), "refit": refit,
            "optimization_level": OPTIMIZATION_LEVEL}


def _model_files(path: Path) -> list[Path]:
    """An ONNX file and its external weights (`<model>.onnx.data`) when it has them."""
    return [p for p in (path, path.with_name(path.name + ".data")) if p.exists()]


class EngineStore:
    """Engines as entries of sdrt's engine cache, keyed by `engine_identity`; the timing cache (tactic timings
    shared by every build on this GPU and TensorRT) is an entry of its own, replaced as it grows."""

    def __init__(self, trt: TensorRt, gpu: cuda.DeviceInfo, cache: EngineCache | None):
        self.trt, self.gpu, self.cache = trt, gpu, cache

    def timing_key(self) -> str:
        return EngineCache.key({"timing-cache": self.trt.flavour, "version": self.trt.version, **self.gpu.identity()})

    def plan(self, identity: dict, path: Path, profile: Profile, refit_weights: bool,
             rebuild: bool = False) -> tuple[str, bytes, bool]:
        """(cache key, serialized engine, whether it came from the cache): from the cache, else (or with `rebuild`)
        built and stored."""
        key = EngineCache.key(identity)
        hit = None if rebuild else self.read(key)
        if hit is not None:
            return key, hit, True
        plan = self._build(path, profile, refit_weights)
        if self.cache:
            self.cache.store(key, PLAN, lambda out: out.write_bytes(plan), replace=rebuild)
        return key, plan, False

    def read(self, key: str) -> bytes | None:
        """The payload of an intact entry, or None."""
        hit = self.cache.lookup(key) if self.cache else None
        return hit.read_bytes() if hit is not None else None

    def keep(self, key: str, name: str, data: bytes) -> None:
        """Replace a growing entry (timing cache, runtime cache) with `data`."""
        if self.cache:
            self.cache.store(key, name, lambda out: out.write_bytes(data), replace=True)

    def _build(self, path: Path, profile: Profile, refit_weights: bool) -> bytes:
        timings = self.read(self.timing_key()) if self.trt.timing_cache else None
        start = time.perf_counter()
        network = parse(self.trt, path)
        config = builder_config(network, [profile], refit=refit_weights, timing_cache=timings)
        plan = build_serialized(network, config)
        log.info("tensorrt: built %s (%s profile) in %.1f s", path.name, profile.kind, time.perf_counter() - start)
        grown = serialized_timing_cache(network, config)
        if grown is not None and grown != timings:
            self.keep(self.timing_key(), TIMING, grown)
        return plan


class LoadedEngine:
    """A deserialized engine and its execution context. TensorRT for RTX compiles kernels for the GPU when the
    context is created (JIT): its runtime config keeps them in a runtime cache (an entry beside the engine's, saved
    on close) and captures CUDA graphs itself for static engines; TensorRT 10/11 gets neither (Binding captures)."""

    def __init__(self, store: EngineStore, key: str, plan: bytes, profile: Profile, cuda_graphs: bool, changes=None):
        trt, logger = store.trt, make_logger(store.trt)
        self.trt, self.profile, self.logger = trt, profile, logger
        self._runtime = trt.module.Runtime(logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BackendError(f"{trt.label} cannot load a cached engine: {logger.last_error()}")
        if changes:
            refit(trt, self.engine, changes, logger)
        self.native_graphs = hasattr(self.engine, "create_runtime_config") and hasattr(trt.module, "CudaGraphStrategy")
        self._store, self._cache_key, self._jit, self._jit_loaded = store, EngineCache.key({"runtime-cache": key}), None, None
        self.context = self._rtx_context(cuda_graphs) if self.native_graphs else self.engine.create_execution_context()
        self.current = None  # the Binding whose shapes and addresses the context holds

    def _rtx_context(self, cuda_graphs: bool):
        t = self.trt.module
        config = self.engine.create_runtime_config()
        if cuda_graphs and self.profile.kind == STATIC:
            config.cuda_graph_strategy = t.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        self._jit, self._jit_loaded = config.create_runtime_cache(), self._store.read(self._cache_key)
        if self._jit_loaded:
            self._jit.deserialize(self._jit_loaded)
        config.set_runtime_cache(self._jit)
        return self.engine.create_execution_context(config)

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self.trt.module.nptype(self.engine.get_tensor_dtype(name)))

    def is_input(self, name: str) -> bool:
        return self.engine.get_tensor_mode(name) == self.trt.module.TensorIOMode.INPUT

    def tensor_names(self) -> list[str]:
        return [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    def close(self) -> None:
        if self._jit is not None:
            data = bytes(memoryview(self._jit.serialize()))
            if data != self._jit_loaded:
                self._store.keep(self._cache_key, RUNTIME_CACHE, data)
        self.context = self.engine = self._runtime = self._jit = None


class Binding:
    """Device buffers for one set of input shapes on a loaded engine: fixed addresses, so a CUDA graph can replay
    the run; the context is pointed at them whenever another binding used it last."""

    def __init__(self, loaded: LoadedEngine, contract, shapes: Mapping[str, tuple], stream: cuda.Stream, graphs: bool):
        self.loaded, self.stream, self.contract, self.shapes = loaded, stream, contract, dict(shapes)
        names = loaded.tensor_names()
        check_names(contract, [n for n in names if loaded.is_input(n)], [n for n in names if not loaded.is_input(n)],
                    loaded.trt.flavour)
        for spec in (*contract.inputs, *contract.outputs):
            if loaded.dtype(spec.name) != np.dtype(spec.dtype):
                raise BackendError(f"{contract.component}.{spec.name}: the engine takes {loaded.dtype(spec.name)}, "
                                   f"expected {spec.dtype}")
        self._apply_shapes()
        context = loaded.context
        self.out_shapes = {n: tuple(context.get_tensor_shape(n)) for n in contract.output_names}
        loaded.current = None  # the shapes are this binding's, the addresses not yet: whoever runs next sets both
        self.buffers = {n: cuda.DeviceBuffer(int(np.prod(s)) * loaded.dtype(n).itemsize)
                        for n, s in {**self.shapes, **self.out_shapes}.items()}
        self._uploaded: dict[str, np.ndarray] = {}
        self._graph, self._runs = None, 0
        self._graphs = graphs and loaded.profile.kind == STATIC and not loaded.native_graphs

    def _apply_shapes(self) -> None:
        context = self.loaded.context
        for name, shape in self.shapes.items():
            if not context.set_input_shape(name, shape):
                raise BackendError(f"{self.contract.component}.{name}: the engine refuses shape {list(shape)}")

    def _activate(self) -> None:
        if self.loaded.current is not self:
            self._apply_shapes()
            for name, buffer in self.buffers.items():
                self.loaded.context.set_tensor_address(name, buffer.ptr)
            self.loaded.current = self

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._activate()
        for name, array in feeds.items():
            if not (is_frozen(array) and self._uploaded.get(name) is array):
                self.buffers[name].upload(array, self.stream)
                self._uploaded[name] = array
        self._execute()
        outputs = {n: np.empty(s, self.loaded.dtype(n)) for n, s in self.out_shapes.items()}
        for name, array in outputs.items():
            self.buffers[name].download(array, self.stream)
        self.stream.synchronize()
        return outputs

    def _execute(self) -> None:
        self._runs += 1
        if self._graph is not None:
            self._graph.launch(self.stream)
        elif self._graphs and self._runs > GRAPH_AFTER:
            self._graph = cuda.CudaGraph(self.stream, self._enqueue)
            self._graph.launch(self.stream)
        else:
            self._enqueue()

    def _enqueue(self) -> None:
        if not self.loaded.context.execute_async_v3(self.stream.address):
            raise BackendError(f"{self.contract.component}: TensorRT failed to run: {self.loaded.logger.last_error()}")

    def close(self) -> None:
        if self._graph is not None:
            self._graph.destroy()
        for buffer in self.buffers.values():
            buffer.free()
        self.buffers.clear()


class TensorRtSession:
    """One component on TensorRT: engines per profile (at most MAX_ENGINES loaded), bindings per shape."""

    def __init__(self, backend: TensorRtBackend, bundle: Path, manifest: Manifest, component: Component, file: str,
                 precision: str, deltas=None):
        self.contract, self._backend, self._bundle = component.contract, backend, Path(bundle)
        self._component, self._file, self._precision, self._deltas = component, file, precision, deltas
        m = manifest
        self._dynamic = dynamic_profile(component.contract, m.model, m.shapes, m.tokenizer.max_length) \
            if backend.shapes == DYNAMIC else None
        self._stream = cuda.Stream()
        self._engines: OrderedDict[str, tuple[LoadedEngine, dict]] = OrderedDict()
        self._binding: Binding | None = None
        self._changes = None

    def prepare(self, dims: Mapping[str, int]) -> None:
        shapes = input_shapes(self.contract, dims)
        profile = self._profile(shapes)
        loaded, bindings = self._engine(profile)
        key = tuple(sorted(shapes.items()))
        if key not in bindings:
            bindings[key] = Binding(loaded, self.contract, shapes, self._stream, self._backend.cuda_graphs)
        self._binding = bindings[key]

    def _profile(self, shapes: Mapping[str, tuple]) -> Profile:
        """The dynamic profile when the backend uses it and it covers `shapes`, else a static one for them."""
        if self._dynamic is not None and self._dynamic.covers(shapes):
            return self._dynamic
        if self._dynamic is not None:
            log.info("tensorrt: %s shapes %s lie outside the dynamic profile: building a static engine",
                     self.contract.component, dict(shapes))
        return static_profile(self.contract, shapes)

    def _engine(self, profile: Profile) -> tuple[LoadedEngine, dict]:
        ident = profile.identity()
        if ident not in self._engines:
            backend = self._backend
            identity = engine_identity(backend.trt, backend.gpu, self._component, self._file, self._precision,
                                       profile, backend.refit, self._bundle)
            self._engines[ident] = (self._load(identity, profile), {})
            if len(self._engines) > MAX_ENGINES:
                self._drop(*self._engines.popitem(last=False)[1])
        self._engines.move_to_end(ident)
        return self._engines[ident]

    def _load(self, identity: dict, profile: Profile) -> LoadedEngine:
        """The engine from the cache (or built), deserialized; a cached plan this TensorRT refuses is built again."""
        backend, path = self._backend, self._bundle / self._file
        key, plan, cached = backend.engines.plan(identity, path, profile, backend.refit)
        try:
            return LoadedEngine(backend.engines, key, plan, profile, backend.cuda_graphs, self._weight_changes())
        except BackendError as e:
            if not cached:
                raise
            log.warning("tensorrt: %s (%s); building it again", e, self.contract.component)
            key, plan, _ = backend.engines.plan(identity, path, profile, backend.refit, rebuild=True)
            return LoadedEngine(backend.engines, key, plan, profile, backend.cuda_graphs, self._weight_changes())

    def _weight_changes(self):
        """New values of the weights `deltas` change, computed once (the engines of every profile take them)."""
        if not self._deltas or not self._deltas.deltas:
            return None
        if self._changes is None:
            if not self._backend.refit:
                raise BackendError("tensorrt: weight changes (LoRA) need refittable engines (refit=True)")
            self._changes = read_weight_changes(self._bundle, self._component, self._file, self._deltas)
        return self._changes

    def _drop(self, loaded: LoadedEngine, bindings: dict) -> None:
        for binding in bindings.values():
            if binding is self._binding:
                self._binding = None
            binding.close()
        loaded.close()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._binding is None:
            raise BackendError(f"{self.contract.component}: prepare(dims) must be called before run")
        return self._binding.run(feeds)

    def close(self) -> None:
        while self._engines:
            self._drop(*self._engines.popitem()[1])
        self._stream.destroy()


def read_weight_changes(bundle: Path, component: Component, file: str, deltas) -> dict[str, np.ndarray]:
    """Engine weight -> new value for `deltas` (sdrt.backends.base.WeightDeltas): the component's weights map
    names each changed parameter's initializer, whose value is read from the file the engine was built from."""
    try:
        from sdrt.backends.onnx_file import OnnxFile
        from sdrt.weights_map import derive_onnx_map, plan, read_weights_map
    except ImportError as e:  # the weights-map seam lands with LoRA support
        raise BackendError(f"tensorrt: weight changes need sdrt's weights maps ({e.name})") from None
    reference, engine_file = OnnxFile(bundle / component.file), OnnxFile(bundle / file)
    try:
        weights_map = read_weights_map(bundle, component) or derive_onnx_map(reference, component.name)
        return changed_weights(plan(weights_map, deltas, component.name), lambda n: np.array(engine_file.array(n)))
    finally:
        reference.close()
        engine_file.close()


class TensorRtBackend:
    """Opens bundle components on TensorRT (for RTX by default) on one NVIDIA GPU."""

    name = "tensorrt"
    formats = ("onnx",)

    def __init__(self, device: str = "cuda", precision: str = "auto", shapes: str = STATIC, cache: bool = True,
                 cache_dir: Path | str | None = None, refit: bool = True, flavour: str = "auto",
                 cuda_graphs: bool = True):
        self.shapes = check_shapes_option(shapes)
        self.precision = resolve_precision(precision, self.name, gpu=True)  # auto: the bundle's fp16 variants
        self.trt = load_tensorrt(flavour)
        self.gpu = cuda.probe(cuda.parse_device(device))
        cuda.call(cuda.runtime_api().cudaSetDevice, self.gpu.index)
        self.refit, self.cuda_graphs = refit, cuda_graphs
        store = EngineCache.for_engine(self.name, cache_dir, DEFAULT_CACHE_GB) if cache or cache_dir else None
        self.engines = EngineStore(self.trt, self.gpu, store)
        self.label = f"{self.trt.flavour} {self.precision}"

    def load(self, bundle: Path, component: Component, deltas=None):
        """Open `component`; `deltas` (sdrt.backends.base.WeightDeltas, LoRA) are refitted into its engines."""
        if component.format not in self.formats:
            raise BackendError(f"tensorrt cannot run {component.name} stored as {component.format!r}")
        manifest = read_manifest(bundle)  # the model's sizes and prompt length, for the dynamic profile
        file, precision = model_file(component, self.precision)
        return guarded(TensorRtSession(self, bundle, manifest, component, file, precision, deltas), precision,
                       lambda: TensorRtSession(self, bundle, manifest, component, component.file, FULL, deltas))
