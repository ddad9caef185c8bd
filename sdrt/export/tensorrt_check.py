"""`sdrt convert --target tensorrt --check`: what TensorRT makes of every component of a bundle, without a GPU:
parsed or not, layers, inputs, the static and dynamic profiles accepted, the refit flag, operators it lacks, and
the bundle's weights it can refit by name; then the point where a GPU is needed, reported and not crossed."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from sdrt.backends import cuda
from sdrt.backends.precision import model_file, resolve_precision
from sdrt.backends.tensorrt_build import TensorRt, builder_config, load_tensorrt, parse, unsupported
from sdrt.backends.tensorrt_profiles import Profile, dynamic_profile, static_profile
from sdrt.backends.tensorrt_weights import weight_name_map
from sdrt.bundle import Component, Manifest
from sdrt.errors import BackendError, ExportError
from sdrt.export.fp16_variant import float_initializers

log = logging.getLogger(__name__)


@dataclass
class ComponentReport:
    """What TensorRT made of one component's file."""

    name: str
    file: str
    layers: int
    inputs: dict[str, tuple[str, tuple[int, ...]]]
    profiles: dict[str, Profile]  # kind -> profile, each accepted by the builder config
    refit: bool
    unsupported: list[str]
    weights: int  # float initializers the network holds under their own names (refittable by name)
    initializers: int
    weight_map: dict[str, str] = field(repr=False, default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"{self.name}: parsed {self.file}: {self.layers} layers; unsupported operators: "
               f"{', '.join(self.unsupported) or 'none'}; refit {'on' if self.refit else 'off'}, "
               f"{self.weights} of {self.initializers} weights mapped by name"]
        for name, (dtype, shape) in self.inputs.items():
            ranges = "; ".join(f"{kind} {_range(p.shapes[name])}" for kind, p in self.profiles.items())
            out.append(f"  input {name} {dtype} {list(shape)}: {ranges} (accepted)")
        return out


def _range(shapes) -> str:
    lo, _, hi = shapes
    return str(list(lo)) if lo == hi else f"{list(lo)}..{list(hi)}"


def require_tensorrt() -> TensorRt:
    """The installed TensorRT, or an ExportError naming what to install."""
    try:
        return load_tensorrt()
    except BackendError as e:
        raise ExportError(str(e)) from None


def profiles(component: Component, manifest: Manifest) -> dict[str, Profile]:
    """The static profile of the default request (one guided image at the model's size) and the dynamic one."""
    m = manifest
    dynamic = dynamic_profile(component.contract, m.model, m.shapes, m.tokenizer.max_length)
    size = m.model.default_size // m.model.vae_scale_factor
    dims = {"batch": 2 if component.name in ("unet", "text_encoder") else 1, "sequence": m.tokenizer.max_length,
            "latent_height": size, "latent_width": size, "height": m.model.default_size,
            "width": m.model.default_size}
    static = static_profile(component.contract, {s.name: s.concrete_shape(dims) for s in component.contract.inputs})
    return {"static": static, "dynamic": dynamic}


def check_component(trt: TensorRt, root: Path, manifest: Manifest, component: Component,
                    precision: str = "fp16") -> ComponentReport:
    """Parse the file the tensorrt backend would build `component` from, set each profile and the refit flag on a
    builder config, and map its weights; ExportError on any refusal."""
    file, _ = model_file(component, precision)
    try:
        network = parse(trt, root / file)
        kinds = profiles(component, manifest)
        configs = {kind: builder_config(network, [p], refit=True) for kind, p in kinds.items()}
    except BackendError as e:
        raise ExportError(f"{component.name}: {e}") from None
    graph = onnx.load(str(root / file), load_external_data=False)
    names = float_initializers(root / file)
    mapped = weight_name_map(network, names)
    return ComponentReport(
        component.name, file, network.layers, network.inputs(), kinds,
        all(c.get_flag(trt.module.BuilderFlag.REFIT) for c in configs.values()),
        unsupported(network, {n.op_type for n in graph.graph.node}), len(mapped), len(names), mapped,
    )


def check_bundle(root: Path, manifest: Manifest, shapes: str = "static") -> list[ComponentReport]:
    """Check every component (logged, one block each), then report whether this machine can build engines."""
    trt = require_tensorrt()
    precision = resolve_precision("auto", "tensorrt", gpu=True)
    reports = [check_component(trt, root, manifest, c, precision) for c in manifest.components.values()]
    log.info("TensorRT check with %s (%s profiles are what the backend builds by default):", trt.label, shapes)
    for report in reports:
        for line in report.lines():
            log.info("%s", line)
    try:
        gpu = cuda.probe()
        log.info("engine build: not attempted (--check); this machine can build engines on %s (compute capability "
                 "%s)", gpu.name, gpu.compute_capability)
    except BackendError as e:
        log.info("engine build: stopped here, it needs the GPU: %s", e)
    return reports
