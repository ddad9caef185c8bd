"""The CUDA runtime through NVIDIA's cuda-python bindings (never torch): the device and its identity, device memory,
a stream and CUDA graphs, each failure a one-line BackendError. Everything past `probe` needs an NVIDIA driver and
GPU and is untested in this project (no GPU on its machines)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np

from sdrt.errors import BackendError

INSTALL = "pip install 'sdrt[tensorrt-rtx]'"
DRIVERS = "https://www.nvidia.com/drivers"
# cudaError_t values that mean the machine, not the call, is the problem (CUDA runtime API, "Error Handling").
INSUFFICIENT_DRIVER, NO_DEVICE, INVALID_DEVICE = 35, 100, 101


def runtime_api():
    """cuda-python's runtime module: `cuda.bindings.runtime` (cuda-python 12.6+), or `cuda.cudart` before it."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise BackendError(f"tensorrt needs NVIDIA's CUDA Python bindings (cuda-python): {INSTALL}")


def call(function, *args):
    """Call a cuda-python function, returning its results after the error code; a failure is a BackendError."""
    error, *results = function(*args)
    if int(error) != 0:
        rt = runtime_api()
        message = rt.cudaGetErrorString(error)[1].decode()
        raise BackendError(f"CUDA {function.__name__} failed: {message} ({int(error)})")
    return results[0] if len(results) == 1 else tuple(results)


def version_text(version: int) -> str:
    """CUDA's integer versions (12080) as text ("12.8"); 0 as "none"."""
    return f"{version // 1000}.{version % 1000 // 10}" if version else "none"


def device_problem(error: int, driver: int, runtime: int, index: int, count: int) -> str:
    """The one-line message for a machine CUDA cannot run on, from cudaGetDeviceCount's error and the versions."""
    if error == INSUFFICIENT_DRIVER or not driver:
        found = f"driver for CUDA {version_text(driver)}" if driver else "no NVIDIA driver"
        return (f"tensorrt needs an NVIDIA GPU driver for CUDA {version_text(runtime)} or newer, found {found}: "
                f"install the NVIDIA driver ({DRIVERS}), or run on the CPU with --backend onnxruntime")
    if error == NO_DEVICE or count == 0:
        return "tensorrt needs an NVIDIA GPU, and CUDA finds none: run on the CPU with --backend onnxruntime"
    return f"tensorrt: GPU {index} not found, CUDA sees {count} (cuda:0 to cuda:{count - 1})"


@dataclass(frozen=True)
class DeviceInfo:
    """The GPU engines are built for: what an engine cache key must hold about it."""

    index: int
    name: str
    compute_capability: str  # "8.9"
    driver: str  # the CUDA version the driver supports ("12.8")
    runtime: str
    memory_bytes: int

    def identity(self) -> dict:
        return {"gpu": self.name, "compute_capability": self.compute_capability, "driver": self.driver,
                "cuda_runtime": self.runtime}


def probe(index: int = 0) -> DeviceInfo:
    """The CUDA device `index`, or the BackendError that says why this machine has none (no driver, no GPU)."""
    rt = runtime_api()
    driver = call(rt.cudaDriverGetVersion)
    runtime = call(rt.cudaRuntimeGetVersion)
    error, count = rt.cudaGetDeviceCount()
    if int(error) != 0 or not 0 <= index < count:
        raise BackendError(device_problem(int(error), driver, runtime, index, count or 0))
    props = call(rt.cudaGetDeviceProperties, index)
    return DeviceInfo(index, props.name.decode(errors="replace").rstrip("\0"), f"{props.major}.{props.minor}",
                      version_text(driver), version_text(runtime), int(props.totalGlobalMem))


def parse_device(device: str) -> int:
    """'cuda' or 'cuda:N' -> N."""
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise BackendError(f"tensorrt: unknown device {device!r}; use cuda or cuda:N")
    return int(index or 0)


class DeviceBuffer:
    """Device memory for one tensor, allocated once per shape and reused for every run."""

    def __init__(self, nbytes: int):
        self.nbytes, self.ptr = nbytes, int(call(runtime_api().cudaMalloc, max(nbytes, 1)))

    def upload(self, array: np.ndarray, stream: Stream) -> None:
        rt = runtime_api()
        data = np.ascontiguousarray(array)
        call(rt.cudaMemcpyAsync, self.ptr, data.ctypes.data, data.nbytes,
             rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.handle)

    def download(self, array: np.ndarray, stream: Stream) -> None:
        rt = runtime_api()
        call(rt.cudaMemcpyAsync, array.ctypes.data, self.ptr, array.nbytes,
             rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.handle)

    def free(self) -> None:
        if self.ptr:
            call(runtime_api().cudaFree, self.ptr)
            self.ptr = 0


class Stream:
    """A CUDA stream the engine runs on; copies are ordered on it and `synchronize` waits for all of them."""

    def __init__(self):
        self.handle = call(runtime_api().cudaStreamCreate)

    @property
    def address(self) -> int:
        return int(self.handle)

    def synchronize(self) -> None:
        call(runtime_api().cudaStreamSynchronize, self.handle)

    def destroy(self) -> None:
        if self.handle is not None:
            call(runtime_api().cudaStreamDestroy, self.handle)
            self.handle = None


class CudaGraph:
    """The kernels one `enqueue()` puts on a stream, captured once and replayed with a single launch (the TensorRT
    demo's Engine.infer(use_cuda_graph=True)): for a static-shape engine whose tensor addresses never change."""

    def __init__(self, stream: Stream, enqueue):
        rt = runtime_api()
        call(rt.cudaStreamBeginCapture, stream.handle, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
        try:
            enqueue()
        finally:
            graph = call(rt.cudaStreamEndCapture, stream.handle)
        self._graph, self._exec = graph, call(rt.cudaGraphInstantiate, graph, 0)

    def launch(self, stream: Stream) -> None:
        call(runtime_api().cudaGraphLaunch, self._exec, stream.handle)

    def destroy(self) -> None:
        rt = runtime_api()
        call(rt.cudaGraphExecDestroy, self._exec)
        call(rt.cudaGraphDestroy, self._graph)


def memory_in_use(index: int = 0) -> int:
    """Bytes of device memory in use on the current device (for benchmarks)."""
    rt = runtime_api()
    call(rt.cudaSetDevice, index)
    free, total = call(rt.cudaMemGetInfo)
    return int(total) - int(free)
