"""`sdrt export` (checkpoint -> bundle) and `sdrt convert` (ONNX bundle -> another engine's bundle)."""
from __future__ import annotations

import argparse
from pathlib import Path

from sdrt.errors import printable
from sdrt.export.targets import TARGETS, all_options, build, convert, get_target
from sdrt.staging import check_destination
from sdrt.errors import ExportError
from sdrt.export.targets import TARGETS, all_options, build, convert, get_target, target_options

EXPORT_EXAMPLES = """examples:
  sdrt export ./stable-diffusion-v1-5 -o sd15                     # a diffusers folder -> ONNX bundle
  sdrt export v1-5-pruned-emaonly.safetensors -o sd15 --weights-storage fp16
  sdrt export ./stable-diffusion-v1-5 -o sd15-ov --target openvino --weights int8
"""
CONVERT_EXAMPLES = """examples:
  sdrt convert sd15 -o sd15-ov --target openvino                  # fp32 IR, gated by image PSNR
  sdrt convert sd15 -o sd15-ov8 --target openvino --weights int8 --quantize-unet
  sdrt convert sd15 -o sd15-trt --target tensorrt --check         # fp16 variants; what TensorRT sees, no GPU needed
"""


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    _add_export(sub, common)
    _add_convert(sub, common)


def _parser(sub, name: str, common, help: str, examples: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, parents=[common], help=help, epilog=examples,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_export(sub, common) -> None:
    p = _parser(sub, "export", common, "export a checkpoint to a validated bundle (needs sdrt[export])",
                EXPORT_EXAMPLES)
    p.add_argument("source", type=Path, help="diffusers folder, or a .safetensors / .ckpt single file")
    p.add_argument("-o", "--output", type=Path, required=True, help="bundle folder to create")
    p.add_argument("--target", choices=list(TARGETS), default="onnx", help="engine format (default onnx): "
                   + "; ".join(f"{t.name}: {t.summary}" for t in TARGETS.values()))
    p.add_argument("--original-config", type=Path, help="LDM yaml for a single file (default: SD v1 inference)")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], help="override the detected one")
    p.add_argument("--taesd", type=Path, help="AutoencoderTiny folder to add as the tiny decoder (default: the "
                   "source's taesd/ subfolder when it has one)")
    p.add_argument("--no-safety-checker", dest="safety_checker", action="store_false", help="leave out the "
                   "source's safety_checker/ (exported by default when a diffusers folder has one)")
    p.add_argument("--vae-only", action="store_true", help="export a VAE alone, for `generate --vae`: an "
                   "AutoencoderKL folder (or a pipeline's vae/), or an A1111 VAE file (.safetensors, .pt, .ckpt)")
    _add_target_options(p)
    p.set_defaults(run=_export)


def _add_convert(sub, common) -> None:
    convertible = [t.name for t in TARGETS.values() if not t.from_checkpoint]
    p = _parser(sub, "convert", common, "convert an ONNX bundle to another engine's format (no torch needed)",
                CONVERT_EXAMPLES)
    p.add_argument("bundle", type=Path, help="ONNX bundle folder")
    p.add_argument("-o", "--output", type=Path, required=True, help="bundle folder to create")
    p.add_argument("--target", choices=convertible, default=convertible[0], help=f"default {convertible[0]}")
    _add_target_options(p)
    p.set_defaults(run=_convert)


def _add_target_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("target options (each applies to the targets that name it)")
    for option in all_options():
        group.add_argument(option.flag, **option.argparse_kwargs())
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --output")


def _given(args) -> dict:
    return {o.dest: getattr(args, o.dest) for o in all_options()}


def _export(args) -> int:
    check_destination(args.output, args.overwrite, "--overwrite")  # before the slow work, naming the flag as typed
    if args.vae_only:
        return _export_vae(args)
    sources = {"original_config": args.original_config, "prediction_type": args.prediction_type,
               "taesd": args.taesd, "safety_checker": args.safety_checker}
    manifest = build(get_target(args.target), args.source, args.output, overwrite=args.overwrite,
                     source_options=sources, options=_given(args))
    print_bundle(args.output, manifest)
    return 0


def _export_vae(args) -> int:
    """--vae-only: an ONNX VAE bundle, which every backend reads (OpenVINO's too)."""
    if args.target != "onnx" or args.taesd or args.prediction_type or not args.safety_checker:
        raise ExportError("--vae-only writes an ONNX VAE bundle: --target, --taesd, --prediction-type and "
                          "--no-safety-checker do not apply")
    try:
        from sdrt.export.vae_only import export_vae_bundle
    except ImportError as e:
        raise ExportError(f"export needs {e.name}: pip install 'sdrt[{TARGETS['onnx'].extra}]'") from None
    options = target_options(TARGETS["onnx"], _given(args))
    print_bundle(args.output, export_vae_bundle(args.source, args.output, original_config=args.original_config,
                                                overwrite=args.overwrite, **options))
    return 0


def _convert(args) -> int:
    check_destination(args.output, args.overwrite, "--overwrite")
    target = get_target(args.target, convertible=True)
    print_bundle(args.output, convert(target, args.bundle, args.output, overwrite=args.overwrite,
                                      options=_given(args)))
    return 0


def print_bundle(output: Path, manifest) -> None:
    from sdrt.cli.info import check_text, psnr_text, storage_text, variant_text

    print(f"{printable(output)}: {len(manifest.components)} components, {len(manifest.files)} files")
    for comp in manifest.components.values():
        print(f"  {comp.name}: {comp.format} {comp.precision}{storage_text(comp)}, {check_text(comp.validation)}")
        for variant in comp.variants.values():
            print(f"    {variant_text(variant)}")
    if "validation" in manifest.source:
        print(f"  image: {psnr_text(manifest.source['validation'])}")
    if "compression" in manifest.source:
        print(f"  compressed weights: {psnr_text(manifest.source['compression'], 'uncompressed weights')}")
