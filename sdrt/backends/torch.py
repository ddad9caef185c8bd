"""PyTorch engine (sdrt[torch]), the one runtime module that imports torch: each component's torch.export program
compiled ahead of time by AOTInductor for this device, precision and input shape, the compiled package cached.

- `prepare(dims)` specializes the bundle's dynamic program to static shapes (re-exported from it), compiles it into
  a package (a shared library and the weights), and stores it in sdrt's engine cache (sdrt.cache.EngineCache,
  keyed by the program's sha256, the device and its compute capability, the torch version, shapes, precision and
  compiler options). Later runs load the package: no Python model code, no compiling.
- Precision: fp32 on CPU; on CUDA fp16 by default (bf16 on request) as A1111 runs SD: weights in half precision,
  computed under torch.autocast (matmuls and convolutions in half, normalizations and softmax in fp32). Outputs are
  fp32, as the contracts say. A reduced-precision output holding NaN or inf is computed again in fp32
  (sdrt.backends.fallback), never passed on as a black image.
- CUDA: the components named in `cuda_graphs` (the UNet: one call per step, at one shape) run as a captured CUDA
  graph. Inputs the caller marks read-only (the pipeline's text embeddings, the same array every step) are copied
  to the device once, not every step.
- Weights are replaceable after compiling (`update_weights`: AOTInductor's constant update), with no recompile.
"""
from __future__ import annotations

import logging
import platform
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn
from torch.export.graph_signature import InputKind
from torch.export.passes import move_to_device_pass

from sdrt.backends.base import check_names
from sdrt.backends.fallback import Fp32Fallback
from sdrt.backends.pt2_weights import ProgramWeights
from sdrt.bundle import Component, sha256_file
from sdrt.cache import EngineCache, cache_home
from sdrt.contracts import Contract
from sdrt.errors import BackendError

log = logging.getLogger(__name__)

# The torch the backend is tested with: ExportedProgram.module(check_guards=...), AOTInductor's package API and
# constant update as 2.13 has them (pyproject's `torch` extra).
MIN_TORCH = "2.13"
PRECISIONS = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# What "auto" computes in: fp16 on CUDA (what SD is run in there), fp32 on CPUs (fp16 kernels are slow there).
AUTO_PRECISION = {"cuda": "f16", "cpu": "f32"}
DEVICE_TYPES = ("cpu", "cuda")
PACKAGE = "model.pt2"
# Bumped when the way a program becomes a package changes, so older packages are not reused.
PACKAGE_FORMAT = 1
# A compiled SD 1.5 package holds its weights: 1.7 GB for an fp16 UNet, 3.4 GB fp32; about a dozen of them.
DEFAULT_CACHE_GB = 20
MAX_COMPILED_SHAPES = 4  # as OpenVINO's: alternating between a few sizes must not reload packages


class Specialized(nn.Module):
    """The bundle's program with its weights in `dtype`, computed under torch.autocast when that is not fp32, with
    floating-point outputs in the contracts' fp32."""

    def __init__(self, program: nn.Module, dtype: torch.dtype, device_type: str):
        super().__init__()
        self.program, self.dtype, self.device_type = program.to(dtype), dtype, device_type

    def forward(self, *args):
        if self.dtype == torch.float32:
            return self.program(*args)
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.program(*args)
        return tuple(_float32(t) for t in out) if isinstance(out, tuple) else _float32(out)


def _float32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t


def compile_package(program: torch.export.ExportedProgram, contract: Contract, shapes: dict[str, tuple[int, ...]],
                    device: torch.device, precision: str, options: dict, path: Path) -> None:
    """Specialize `program` to the static `shapes` on `device` in `precision` and compile it with AOTInductor into
    the package at `path`. Guards are off as in the export's own check (sdrt.export.torch_export._runner)."""
    if device.type != "cpu":  # the program was traced on the CPU: its device arguments (arange...) move too
        program = move_to_device_pass(program, device)
    module = Specialized(program.module(check_guards=False), PRECISIONS[precision], device.type)
    example = tuple(torch.zeros(shapes[t.name], dtype=getattr(torch, t.dtype), device=device) for t in contract.inputs)
    with torch.no_grad():
        static = torch.export.export(module, example)
    torch._inductor.aoti_compile_and_package(static, package_path=str(path), inductor_configs=dict(options))


def device_identity(device: torch.device) -> dict:
    """What compiled code depends on: the GPU and its compute capability, or the CPU's instruction set."""
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device),
                "capability": list(torch.cuda.get_device_capability(device)), "cuda": torch.version.cuda}
    return {"type": device.type, "machine": platform.machine(), "capability": torch.backends.cpu.get_cpu_capability()}


class Packages:
    """Compiled packages as entries of sdrt's engine cache (or, with `root` None, compiled for this run only)."""

    def __init__(self, root: Path | None, allow_compile: bool, options: Mapping):
        self.cache = EngineCache.for_engine("torch", root, DEFAULT_CACHE_GB) if root is not None else None
        self.allow_compile, self.options = allow_compile, dict(options)

    def identity(self, component: Component, path: Path, device: torch.device, precision: str, shapes: dict,
                 torch_version: str = torch.__version__) -> dict:
        return {"engine": "torch-aotinductor", "format": PACKAGE_FORMAT, "torch": torch_version,
                "device": device_identity(device), "program": component.checksums or {path.name: sha256_file(path)},
                "shapes": {k: list(v) for k, v in shapes.items()}, "precision": precision, "inductor": self.options}

    def load(self, key: str, device: torch.device, single_threaded: bool, compile_to) -> tuple:
        """(the compiled model, whether it came from the cache); `compile_to(path)` writes the package on a miss."""
        hit = self.cache.lookup(key) if self.cache else None
        model = _load_package(hit, device, single_threaded) if hit else None
        if model is not None:
            return model, True
        if not self.allow_compile:
            raise BackendError(f"torch: no compiled package {key} in {self.cache.root if self.cache else 'the cache'}"
                               " and compiling is off (compile=False)")
        stored = self.cache.store(key, PACKAGE, compile_to) if self.cache else None
        if stored is not None:
            return _load_package(stored, device, single_threaded, strict=True), False
        with tempfile.TemporaryDirectory(prefix="sdrt-aoti-") as tmp:  # the loader extracts what it needs
            compile_to(Path(tmp) / PACKAGE)
            return _load_package(Path(tmp) / PACKAGE, device, single_threaded, strict=True), False


def _load_package(path: Path, device: torch.device, single_threaded: bool, strict: bool = False):
    """The package's model, or None (with a warning) when this torch cannot load it; `strict` raises instead."""
    try:
        return torch._inductor.aoti_load_package(str(path), run_single_threaded=single_threaded,
                                                 device_index=-1 if device.index is None else device.index)
    except RuntimeError as e:
        if strict:
            raise BackendError(f"torch: cannot load the package just compiled at {path}: {e}") from None
        log.warning("torch: cached package %s cannot be loaded (%s); compiling instead", path, e)
        return None


class DeviceInputs:
    """Input tensors on the device. A read-only array passed again (the same object) is not copied again: read-only
    numpy arrays cannot change in place, so its device copy is still right."""

    def __init__(self, device: torch.device):
        self.device = device
        self._kept: dict[str, tuple[np.ndarray, torch.Tensor]] = {}

    def tensor(self, name: str, array: np.ndarray, into: torch.Tensor | None = None) -> torch.Tensor:
        """`array` on the device (copied into `into`, a CUDA graph's input buffer, when given)."""
        kept = self._kept.get(name)
        if kept is not None and kept[0] is array and (into is None or kept[1] is into):
            return kept[1]
        # torch tensors cannot be read-only: such an array is copied (once, as it is then kept)
        host = torch.from_numpy(np.ascontiguousarray(array) if array.flags.writeable else np.array(array, order="C"))
        tensor = into.copy_(host) if into is not None else host.to(self.device)
        if array.flags.writeable:
            self._kept.pop(name, None)
        else:
            self._kept[name] = (array, tensor)
        return tensor

    def clear(self) -> None:
        self._kept.clear()


class CudaGraph:
    """One captured call of a compiled model at fixed input buffers; replaying writes the same output tensors."""

    def __init__(self, model, inputs: list[torch.Tensor]):
        self.inputs = [t.clone() for t in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # a warm-up call outside capture: first-call allocations and kernel loading
            model(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = _outputs(model(*self.inputs))

    def __call__(self) -> tuple[torch.Tensor, ...]:
        self.graph.replay()
        return self.outputs


def _outputs(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class TorchSession:
    """One component on one device in one precision: per prepared shape, a compiled package loaded or compiled."""

    def __init__(self, bundle: Path, component: Component, backend: TorchBackend, precision: str, graphed: bool):
        self.contract, self._component, self._path = component.contract, component, Path(bundle) / component.file
        self._backend, self._precision, self._graphed = backend, precision, graphed
        self._program = None  # the bundle's program, loaded only to compile a shape (and dropped after)
        self._weights: dict[str, np.ndarray] = {}  # replaced weights by torch name: applied to every shape
        self._stored: ProgramWeights | None = None
        self._models: OrderedDict[tuple, object] = OrderedDict()
        self._current: tuple | None = None
        self._graphs: dict[tuple, CudaGraph] = {}
        self._inputs = DeviceInputs(backend.device)

    def prepare(self, dims: Mapping[str, int]) -> None:
        shapes = {t.name: t.concrete_shape(dims) for t in self.contract.inputs}
        key = tuple(sorted(shapes.items()))
        if key not in self._models:
            self._models[key] = self._load(shapes)
            if len(self._models) > MAX_COMPILED_SHAPES:
                self._graphs.pop(self._models.popitem(last=False)[0], None)
        self._models.move_to_end(key)
        self._current = key

    def _load(self, shapes: dict[str, tuple[int, ...]]):
        packages, device = self._backend.packages, self._backend.device
        key = EngineCache.key(packages.identity(self._component, self._path, device, self._precision, shapes))
        start = time.perf_counter()
        model, cached = packages.load(key, device, self._graphed, lambda path: self._compile(shapes, path))
        log.info("torch: %s %s for %s on %s (%s) in %.1f s", "loaded" if cached else "compiled",
                 self.contract.component, shapes, device, self._precision, time.perf_counter() - start)
        if self._weights:
            self._set_constants(model, self._weights)
        return model

    def _compile(self, shapes: dict[str, tuple[int, ...]], path: Path) -> None:
        if self._program is None:
            try:
                self._program = torch.export.load(self._path)
            except (RuntimeError, ValueError, KeyError, OSError) as e:
                raise BackendError(f"torch {torch.__version__} cannot load the program {self._path}: {e}") from None
            inputs = [s.arg.name for s in self._program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
            check_names(self.contract, inputs, self.contract.output_names, "torch.export")
        try:
            compile_package(self._program, self.contract, shapes, self._backend.device, self._precision,
                            self._backend.packages.options, path)
        finally:
            self._program = None  # its fp32 weights (3.4 GB for an SD UNet) are not kept beside the package's

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._current is None:
            raise BackendError(f"{self.contract.component}: prepare(dims) must be called before run")
        with torch.no_grad():
            outputs = self._graph_run(feeds) if self._graphed else self._plain_run(feeds)
        return {name: t.cpu().numpy() for name, t in zip(self.contract.output_names, outputs)}

    def _plain_run(self, feeds: Mapping[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        inputs = [self._inputs.tensor(name, feeds[name]) for name in self.contract.input_names]
        return _outputs(self._models[self._current](*inputs))

    def _graph_run(self, feeds: Mapping[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        graph = self._graphs.get(self._current)
        if graph is None:  # captured on first use of a shape (whatever its inputs: they are copied in each call)
            inputs = [self._inputs.tensor(name, feeds[name]) for name in self.contract.input_names]
            try:
                graph = self._graphs[self._current] = CudaGraph(self._models[self._current], inputs)
            except RuntimeError as e:  # a kernel that cannot be captured: slower, not wrong
                log.warning("torch: %s cannot run as a CUDA graph (%s); running it call by call",
                            self.contract.component, e)
                self._graphed = False
                return self._plain_run(feeds)
            self._inputs.clear()  # what was kept lives outside the graph's buffers
        for name, buffer in zip(self.contract.input_names, graph.inputs):
            self._inputs.tensor(name, feeds[name], into=buffer)
        return graph()

    def update_weights(self, values: Mapping[str, np.ndarray]) -> None:
        """Replace weights, by the torch parameter names of the module the component wraps (`conv_in.weight`), in
        every compiled shape and those compiled later, without recompiling (AOTInductor's constant update)."""
        self._weights.update(values)
        for model in self._models.values():
            self._set_constants(model, values)
        self._graphs.clear()  # captured graphs read the old weight buffers' addresses: captured again on next use

    def _set_constants(self, model, values: Mapping[str, np.ndarray]) -> None:
        stored = self._stored = self._stored or ProgramWeights(self._path)
        names = set(model.get_constant_fqns())
        dtype, device = PRECISIONS[self._precision], self._backend.device
        constants = {}
        for name, value in values.items():
            fqn = stored.resolve(name)
            if tuple(np.shape(value)) != stored.weights[fqn].shape:
                raise BackendError(f"{self.contract.component}.{name}: expected shape "
                                   f"{list(stored.weights[fqn].shape)}, got {list(np.shape(value))}")
            constant = f"program.{fqn}"  # Specialized holds the program as `program`
            if constant not in names:
                raise BackendError(f"{self.contract.component}: the compiled package has no weight {constant}")
            constants[constant] = torch.as_tensor(np.asarray(value, np.float32)).to(device, dtype)
        model.load_constants(constants, check_full_update=False)

    def close(self) -> None:
        self._graphs.clear()
        self._models.clear()
        self._inputs.clear()
        self._current = None


class TorchBackend:
    """Opens torch bundles (torch.export programs), compiled with AOTInductor for `device`.

    `precision`: "auto" (fp16 on CUDA, fp32 on CPU), "f32", "f16" or "bf16"; components whose contract asks for
    full precision (the safety checker) run in fp32. `cuda_graphs`: components run as CUDA graphs on CUDA.
    `cache`/`cache_dir`: the package cache (default <cache home>/torch, bounded by $SDRT_TORCH_CACHE_GB).
    `compile` False refuses to compile (a package must be in the cache). `inductor_options`: torch._inductor.config
    settings for compiling (part of the cache key). `threads`: torch's CPU threads (process-wide), 0 keeps them.
    """

    name = "torch"
    formats = ("torch",)

    def __init__(self, device: str | None = None, precision: str = "auto", cuda_graphs: tuple[str, ...] = ("unet",),
                 cache: bool = True, cache_dir: Path | str | None = None, compile: bool = True,
                 inductor_options: Mapping | None = None, threads: int = 0):
        if torch.__version__ < MIN_TORCH:  # a TorchVersion: compares as a version, not as text
            raise BackendError(f"the torch backend needs torch >= {MIN_TORCH}, got {torch.__version__}")
        self.device = _device(device)
        if precision != "auto" and precision not in PRECISIONS:
            raise BackendError(f"torch: unknown precision {precision!r}; choose one of: auto, {', '.join(PRECISIONS)}")
        self.precision = AUTO_PRECISION[self.device.type] if precision == "auto" else precision
        self.cuda_graphs = tuple(cuda_graphs) if self.device.type == "cuda" else ()
        root = (Path(cache_dir) if cache_dir is not None else cache_home() / "torch") if cache else None
        self.packages = Packages(root, compile, inductor_options or {})
        if threads:
            torch.set_num_threads(threads)

    @property
    def label(self) -> str:
        """What PNG parameters report: engine, device and the precision it computes in."""
        return f"torch {self.device.type} {self.precision}"

    def load(self, bundle: Path, component: Component, deltas=None) -> Fp32Fallback:
        """Open `component`; `deltas` (LoRA: a WeightDeltas of torch name -> change) are added to its weights by
        constant update once a shape is compiled or loaded."""
        if component.format not in self.formats:
            raise BackendError(f"torch cannot run {component.name} stored as {component.format!r}")
        precision = "f32" if component.contract.full_precision else self.precision
        graphed = component.name in self.cuda_graphs

        def open_as(p: str) -> TorchSession:
            return TorchSession(bundle, component, self, p, graphed)

        session = Fp32Fallback(open_as(precision), None if precision == "f32" else lambda: open_as("f32"), precision)
        if deltas is not None and deltas.deltas:
            session.update_weights(added(Path(bundle) / component.file, deltas.deltas))
        return session


def added(program: Path, deltas: Mapping) -> dict[str, np.ndarray]:
    """Each weight of the program file plus its delta (torch name -> a callable giving the change in the
    weight's layout, as sdrt.backends.base.Delta), by torch name."""
    stored = ProgramWeights(program)
    values = {}
    for name, delta in deltas.items():
        base = stored.array(stored.resolve(name))
        values[name] = base + np.asarray(delta(), np.float32).reshape(base.shape)
    return values


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BackendError(f"torch: unknown device {name!r}; choose one of: {', '.join(DEVICE_TYPES)}") from None
    if device.type not in DEVICE_TYPES:
        raise BackendError(f"torch: unknown device {name!r}; choose one of: {', '.join(DEVICE_TYPES)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"torch: device {name!r} asked for, but this torch {torch.__version__} sees no CUDA GPU")
    return device
