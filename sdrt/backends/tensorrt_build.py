"""From a bundle's ONNX file to a TensorRT engine: the TensorRT module (TensorRT for RTX, or TensorRT 10/11 where a
user has it), its ONNX parser, the optimization profile and refit settings, and the build.

Everything up to the build runs without a GPU (the builder, parser and profiles are host code), which is how
`sdrt convert --target tensorrt --check` and the CPU tests exercise it; `build_serialized` needs the NVIDIA driver.
Networks are strongly typed: TensorRT for RTX has no other mode, and TensorRT 10/11 is asked for it, so precision
comes from the graph (the bundle's fp16 variants), never from builder flags. Engines are built refittable: weights
can be replaced later (LoRA) without a rebuild (sdrt.backends.tensorrt_weights).
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np

from sdrt.backends.tensorrt_profiles import Profile
from sdrt.errors import BackendError

log = logging.getLogger(__name__)

# (import name, what sdrt calls it) in order of preference under `flavour="auto"`.
FLAVOURS = {"tensorrt-rtx": "tensorrt_rtx", "tensorrt": "tensorrt"}
INSTALL = "pip install 'sdrt[tensorrt-rtx]' (TensorRT for RTX), or 'sdrt[tensorrt]' for TensorRT 10/11"
# TensorRT's default builder optimization level: higher levels search more tactics for minutes more per engine.
OPTIMIZATION_LEVEL = 3
# Messages TensorRT logs at error level that only say there is no GPU: the caller reports that once, clearly.
_NO_GPU_NOISE = ("catchCudaError", "CUDA driver version is insufficient")


@dataclass(frozen=True)
class TensorRt:
    """The imported TensorRT module and which flavour it is."""

    module: ModuleType
    flavour: str

    @property
    def version(self) -> str:
        return self.module.__version__

    @property
    def label(self) -> str:
        return f"{self.flavour} {self.version}"

    @property
    def timing_cache(self) -> bool:
        """Whether builds use a timing cache: TensorRT 10/11 times tactics on the GPU at build time; TensorRT for RTX
        compiles kernels when an engine is loaded instead (its timing cache calls are no-ops since 1.2), and keeps
        them in a runtime cache (sdrt.backends.tensorrt.LoadedEngine)."""
        return self.flavour == "tensorrt"


def load_tensorrt(flavour: str = "auto") -> TensorRt:
    """TensorRT for RTX, else TensorRT 10/11 (`auto`), or the one named; a BackendError naming what to install."""
    if flavour != "auto" and flavour not in FLAVOURS:
        raise BackendError(f"tensorrt: unknown flavour {flavour!r}; choose auto, {', '.join(FLAVOURS)}")
    for name, module in FLAVOURS.items():
        if flavour in ("auto", name):
            try:
                return TensorRt(importlib.import_module(module), name)
            except ImportError:
                continue
    wanted = "TensorRT for RTX or TensorRT" if flavour == "auto" else flavour
    raise BackendError(f"the tensorrt backend needs {wanted}, which is not installed: {INSTALL}")


def make_logger(trt: TensorRt):
    """A TensorRT ILogger that forwards to Python logging and keeps the last errors for exception messages."""
    base = trt.module.ILogger
    severity = base.Severity

    class Logger(base):
        def __init__(self):
            base.__init__(self)
            self.errors: list[str] = []

        def log(self, level, message):
            if level in (severity.INTERNAL_ERROR, severity.ERROR) and not any(n in message for n in _NO_GPU_NOISE):
                self.errors = [*self.errors[-4:], message]
                log.debug("TensorRT: %s", message)
            elif level == severity.WARNING:
                log.debug("TensorRT warning: %s", message)

        def last_error(self) -> str:
            return self.errors[-1] if self.errors else "no message"

    return Logger()


@dataclass
class Network:
    """An ONNX file parsed into a TensorRT network, with the builder and parser it belongs to."""

    trt: TensorRt
    path: Path
    builder: object
    network: object
    parser: object
    logger: object = field(repr=False)

    @property
    def layers(self) -> int:
        return self.network.num_layers

    def inputs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Input name -> (dtype, shape with -1 on dynamic axes), as TensorRT parsed them."""
        tensors = (self.network.get_input(i) for i in range(self.network.num_inputs))
        return {t.name: (_dtype_name(self.trt, t.dtype), tuple(t.shape)) for t in tensors}

    def outputs(self) -> dict[str, str]:
        tensors = (self.network.get_output(i) for i in range(self.network.num_outputs))
        return {t.name: _dtype_name(self.trt, t.dtype) for t in tensors}


def _dtype_name(trt: TensorRt, dtype) -> str:
    """TensorRT's DataType as numpy names it (float32, float16, int32...)."""
    return np.dtype(trt.module.nptype(dtype)).name


def parse(trt: TensorRt, path: Path) -> Network:
    """Parse `path` (external weights beside it are found) into a strongly typed network; BackendError listing
    the parser's errors (node, operator, reason) when it fails."""
    t = trt.module
    logger = make_logger(trt)
    builder = t.Builder(logger)
    # TensorRT 10 needs the flag; TensorRT for RTX (and 11) are strongly typed whatever it says, and may drop it.
    strongly_typed = getattr(t.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = t.OnnxParser(network, logger)
    if hasattr(t.OnnxParserFlag, "NATIVE_INSTANCENORM"):  # GroupNorm exports as InstanceNormalization (TRT demo)
        parser.set_flag(t.OnnxParserFlag.NATIVE_INSTANCENORM)
    if not parser.parse_from_file(str(path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        described = "; ".join(f"{e.node_name() or '?'} ({e.node_operator() or '?'}): {e.desc()}" for e in errors[:3])
        raise BackendError(f"{trt.flavour} cannot parse {path}: {described or logger.last_error()}")
    return Network(trt, path, builder, network, parser, logger)


def unsupported(network: Network, op_types: set[str]) -> list[str]:
    """The operators of `op_types` this TensorRT's ONNX parser does not support."""
    return sorted(op for op in op_types if not network.parser.supports_operator(op))


def builder_config(network: Network, profiles: list[Profile], *, refit: bool, timing_cache: bytes | None = None):
    """A builder config with `profiles` (each checked by TensorRT: min <= opt <= max, inside the network's
    shapes), the refit flag and the timing cache; BackendError naming the profile TensorRT refuses."""
    t = network.trt.module
    config = network.builder.create_builder_config()
    for profile in profiles:
        trt_profile = network.builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.shapes.items():
            trt_profile.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(trt_profile) < 0:
            raise BackendError(f"{network.path}: TensorRT refuses the {profile.kind} profile {profile.identity()}: "
                               f"{network.logger.last_error()}")
    if refit:
        config.set_flag(t.BuilderFlag.REFIT)
    config.builder_optimization_level = OPTIMIZATION_LEVEL
    if network.trt.timing_cache:
        cache = config.create_timing_cache(timing_cache or b"")
        config.set_timing_cache(cache, ignore_mismatch=True)  # a cache from another build is dropped, not fatal
    return config


def build_serialized(network: Network, config) -> bytes:
    """The engine (needs the NVIDIA driver and a GPU); BackendError with TensorRT's last error on failure."""
    plan = network.builder.build_serialized_network(network.network, config)
    if plan is None:
        raise BackendError(f"{network.trt.flavour} could not build an engine from {network.path}: "
                           f"{network.logger.last_error()}")
    return bytes(memoryview(plan))


def serialized_timing_cache(network: Network, config) -> bytes | None:
    """The builder config's timing cache, grown by the builds it served (None where builds use none)."""
    return bytes(memoryview(config.get_timing_cache().serialize())) if network.trt.timing_cache else None
