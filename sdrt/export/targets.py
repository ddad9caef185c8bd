"""The build targets: one table of every engine format a bundle can be built for, read by `sdrt export --target`
and `sdrt convert --target`.

A target is built either from the checkpoint's torch modules (ONNX itself, and engines whose converters read
torch: Core ML, torch.export) or by converting the ONNX bundle (OpenVINO, TensorRT). `sdrt export --target X`
for a converted target exports ONNX into a hidden folder beside the output first. Engine-specific options are
declared in the target's entry (argparse arguments, shared between targets by reusing one `Option`), so adding
an engine adds one entry here and one builder, and no flag or `if target == ...` anywhere else.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

from sdrt.bundle import Manifest
from sdrt.errors import ExportError
from sdrt.staging import check_destination, staging_folder


@dataclass(frozen=True)
class Option:
    """One engine option: its command-line flag, the builder keyword it fills, and argparse's settings."""

    flag: str
    dest: str
    help: str
    default: object = None
    choices: tuple | None = None
    type: type | None = None
    action: str | None = None

    def argparse_kwargs(self) -> dict:
        given = {"choices": self.choices, "type": self.type, "action": self.action}
        return {"dest": self.dest, "help": self.help, "default": self.default,
                **{k: v for k, v in given.items() if v is not None}}


@dataclass(frozen=True)
class Target:
    """An engine format: the builder that makes a bundle of it (`module:function`, imported on use), the extra
    whose packages the builder needs, and its options."""

    name: str
    summary: str
    builder: str
    extra: str
    from_checkpoint: bool  # True: built from the torch modules; False: converted from an ONNX bundle
    options: tuple[Option, ...] = field(default=())

    def load_builder(self):
        module, function = self.builder.split(":")
        try:
            return getattr(importlib.import_module(module), function)
        except ImportError as e:
            install = PROVIDED_BY.get(e.name, f"pip install 'sdrt[{self.extra}]'")
            raise ExportError(f"--target {self.name} needs {e.name}: {install}") from None


# Modules an export needs that no target's extra names, because users choose which build to install.
PROVIDED_BY = {"onnxruntime": "pip install 'sdrt[onnxruntime]' (or 'sdrt[onnxruntime-gpu]' on an NVIDIA GPU)"}

# Options more than one target reads are defined once and listed by each.
PSNR_GATE = Option("--psnr-gate", "psnr_gate", "minimum image PSNR in dB against the source bundle (default: the "
                   "target's: 35 for fp32, 30 for int8 and fp16)", type=float)
WEIGHTS_STORAGE = Option(
    "--weights-storage", "weights_storage", "how the ONNX files store weights: fp16 halves them (large weights "
    "rounded to fp16, each cast back to fp32 in the graph: compute, inputs and outputs stay fp32; validated "
    "against torch with the same rounding). Default fp32", default="fp32", choices=("fp32", "fp16"),
)
OPSET = Option("--opset", "opset", "ONNX opset (default 17)", default=17, type=int)


def image_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """"512x768,640" -> ((512, 768), (640, 640)): WIDTHxHEIGHT pairs, or N for NxN."""
    pairs = [item.strip().lower().split("x") for item in text.split(",") if item.strip()]
    if not pairs or any(len(p) > 2 for p in pairs):
        raise ValueError(f"expected sizes such as 512x768,640, got {text!r}")
    return tuple((int(p[0]), int(p[-1])) for p in pairs)

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("onnx", "ONNX graphs, validated against torch: the reference bundle every ONNX engine runs",
               "sdrt.export.exporter:export_bundle", "export", from_checkpoint=True, options=(OPSET, WEIGHTS_STORAGE)),
        Target(
            "openvino", "OpenVINO IR, fp32 or int8, gated by image PSNR against the ONNX bundle",
            "sdrt.export.openvino:convert_bundle", "openvino", from_checkpoint=False,
            options=(
                Option("--weights", "weights", "openvino: int8 compresses the UNet and text encoder weights (NNCF; "
                       "needs sdrt[openvino-int8]), gated by image PSNR against fp32", "fp32", ("fp32", "int8")),
                Option("--quantize-unet", "quantize_unet", "openvino, with --weights int8: int8 activations too in "
                       "the UNet's SiLU->conv layers (int8 kernels), calibrated on the model's own denoising",
                       False, action="store_true"),
                PSNR_GATE,
            ),
        ),
        Target(
            "tensorrt", "the ONNX bundle plus fp16 text encoder and UNet variants for NVIDIA GPUs (TensorRT, "
            "onnxruntime cuda), validated on the CPU; engines built here when a GPU is present",
            "sdrt.export.tensorrt:convert_bundle", "tensorrt-rtx", from_checkpoint=False,
            options=(
                Option("--check", "check", "tensorrt: parse every component with TensorRT and print what it sees "
                       "(layers, inputs, profiles, refit, unsupported operators), then stop before building "
                       "engines (that step needs a GPU)", False, action="store_true"),
                Option("--shapes", "shapes", "tensorrt: engines for the request's exact shapes (static, fastest) or "
                       "one for 256-1024 px, 1-8 images, prompts up to 4 chunks (dynamic). Default static",
                       "static", ("static", "dynamic")),
                PSNR_GATE,
            ),
        ),
        Target("torch", "torch.export programs (.pt2), validated against torch: compiled with AOTInductor on the "
               "user's device by the torch backend", "sdrt.export.torch_export:export_torch_bundle", "export",
               from_checkpoint=True),
        Target(
            "coreml", "Core ML ML Programs for Apple Silicon Macs (macOS 14+), converted from torch: they run on macOS "
            "only (sdrt[coreml])", "sdrt.export.coreml:export_coreml", "export,coreml-export", from_checkpoint=True,
            # Names as sdrt.export.coreml_rewrites and coreml_compress define them: this table imports no torch.
            options=(
                Option("--attention", "attention", "coreml: split_einsum (default) is the Neural Engine's form and runs "
                       "on every compute unit; original is fastest on the GPUs of Max and Ultra Macs",
                       choices=("split_einsum", "original")),
                Option("--sizes", "sizes", "coreml: image sizes to build besides the model's own, e.g. 512x768,768x512 "
                       "(N for NxN); a Core ML bundle runs only the sizes it was built for", (), type=image_sizes),
                Option("--compress", "compression", "coreml: compress the text encoder's and UNet's weights: palette6 "
                       "(6-bit palettes) or int8; refused below 30 dB image PSNR against fp16 weights",
                       choices=("palette6", "int8")),
            ),
        ),
    )
}


def all_options() -> list[Option]:
    """Every target's options once each (a flag shared by targets is one Option)."""
    seen: dict[str, Option] = {}
    for target in TARGETS.values():
        for option in target.options:
            if seen.setdefault(option.flag, option) != option:
                raise ValueError(f"targets declare {option.flag} twice with different settings")
    return list(seen.values())


def get_target(name: str, *, convertible: bool = False) -> Target:
    """The target called `name`; `convertible` asks for one an ONNX bundle converts to."""
    choices = [t for t in TARGETS.values() if not convertible or not t.from_checkpoint]
    if name not in {t.name for t in choices}:
        raise ExportError(f"unknown target {name!r}; choose one of: {', '.join(t.name for t in choices)}")
    return TARGETS[name]


def target_options(target: Target, given: dict, *, via: Target | None = None) -> dict:
    """The builder keywords of `target` from `given` (every option's value); an option set away from its default
    that neither the target nor the bundle it is built `via` reads is an error naming the flag."""
    readable = {o.dest for o in (*target.options, *(via.options if via else ()))}
    for option in all_options():
        if option.dest not in readable and given.get(option.dest, option.default) != option.default:
            readers = [t.name for t in TARGETS.values() if option in t.options]
            raise ExportError(f"{option.flag} applies to --target {' or '.join(readers)}, not {target.name}")
    return {o.dest: given.get(o.dest, o.default) for o in target.options}


def build(target: Target, source: Path, out: Path, *, overwrite: bool = False, source_options: dict | None = None,
          options: dict | None = None) -> Manifest:
    """Build `target` at `out` from a checkpoint `source` (loaded with `source_options`: original_config,
    prediction_type, taesd, safety_checker) with `options` (flag values by dest); a converted target goes through
    a hidden ONNX bundle beside `out`, exported with the ONNX target's options."""
    given, source_options = options or {}, source_options or {}
    if target.from_checkpoint:
        return target.load_builder()(source, out, overwrite=overwrite, **source_options,
                                     **target_options(target, given))
    onnx = TARGETS["onnx"]
    mine = target_options(target, given, via=onnx)
    convert = target.load_builder()  # a missing engine fails before the slow export, not after it
    check_destination(Path(out), overwrite)
    Path(out).absolute().parent.mkdir(parents=True, exist_ok=True)
    # A staging folder (sdrt.staging) rather than a plain temporary one: a later export to `out` removes it when a
    # hard kill left it behind.
    with staging_folder(Path(out), "onnx-") as tmp:
        onnx.load_builder()(source, tmp / "onnx", **source_options, **target_options(onnx, given, via=target))
        return convert(tmp / "onnx", out, overwrite=overwrite, **mine)


def convert(target: Target, bundle: Path, out: Path, *, overwrite: bool = False, options: dict | None = None) -> Manifest:
    """Convert the ONNX bundle at `bundle` to `target` at `out` with `options` (flag values by dest)."""
    if target.from_checkpoint:
        raise ExportError(f"--target {target.name} is built from the checkpoint: sdrt export SOURCE --target "
                          f"{target.name} (an ONNX bundle cannot be converted to it)")
    return target.load_builder()(bundle, out, overwrite=overwrite, **target_options(target, options or {}))
