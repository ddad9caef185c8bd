"""`sdrt info`: a bundle's manifest in human form, and its checksums verified."""
from __future__ import annotations

import argparse
from pathlib import Path

from sdrt.errors import printable

EXAMPLES = """examples:
  sdrt info                     # the model shipped with sdrt
  sdrt info sd15-ov             # any bundle: contracts, precision, validation, checksums
  sdrt info sd15 --no-verify    # skip hashing the files
"""


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("info", parents=[common], help="describe a bundle and verify its checksums", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path, nargs="?", help="bundle folder (default: the shipped model)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check")
    p.set_defaults(run=_info)


def _info(args) -> int:
    from sdrt.bundle import read_manifest, verify_files
    from sdrt.runtime.pipeline import default_bundle

    root = args.bundle or default_bundle()
    manifest = read_manifest(root)
    print(describe(root, manifest))
    if args.no_verify:
        print("checksums: not verified (--no-verify)")
        return 0
    verify_files(root, manifest)
    print(f"checksums: OK ({len(manifest.files)} files)")
    return 0


def describe(root: Path, manifest) -> str:
    """The manifest in human form, every line terminal-safe (a bundle's strings may hold escape sequences)."""
    m, s = manifest.model, manifest.shapes
    size = sum((Path(root) / f).stat().st_size for f in manifest.files if (Path(root) / f).is_file())
    lines = [
        f"bundle     {root} (format {manifest.format_version}, {size / 2**20:.1f} MiB)",
        f"model      {m.name or '?'}: family {m.family}, prediction {m.prediction_type}, "
        f"latent scale {m.latent_scale_factor}, default {m.default_size}x{m.default_size}",
        f"sizes      {sizes_text(s)}, batch up to {s.max_batch}",
        f"scheduler  {manifest.scheduler.get('_class_name', '?')}",
        f"tokenizer  max {manifest.tokenizer.max_length} tokens, pad {manifest.tokenizer.pad_token!r}",
        f"source     {manifest.source.get('kind', '?')} {Path(manifest.source.get('path', '')).name} "
        f"sha256 {manifest.source.get('sha256', '?')[:10]}",
        "tools      " + ", ".join(f"{k} {v}" for k, v in manifest.tools.items()),
        "components",
    ]
    if "converted_from" in manifest.source:
        origin, check = manifest.source["converted_from"], manifest.source.get("validation", {})
        lines.insert(-2, f"converted  from {origin.get('format')} bundle {origin.get('manifest_sha256', '?')[:10]}: "
                         f"{psnr_text(check)}")
    if "compression" in manifest.source:
        lines.insert(-1, f"compressed {manifest.source['compression'].get('mode')} weights: "
                         f"{psnr_text(manifest.source['compression'], 'uncompressed weights')}")
    for c in manifest.components.values():
        lines.append(f"  {c.name:<13} {c.file} ({c.format}, {c.precision}{storage_text(c)}; "
                     f"{check_text(c.validation)})")
        lines.extend(f"      {variant_text(v)}" for v in c.variants.values())
        for kind, specs in (("in ", c.contract.inputs), ("out", c.contract.outputs)):
            for t in specs:
                lines.append(f"      {kind} {t.name}: {t.dtype} {list(t.shape)}")
        lines += [f"      table {name}: {rel}" for name, rel in c.tables.items()]
    return "\n".join(printable(line) for line in lines)


def psnr_text(v: dict, reference: str | None = None) -> str:
    measured = "identical" if v.get("psnr_db") is None else f"PSNR {v['psnr_db']:.2f} dB"
    return f"{measured} against the {reference or v.get('reference', '?')} (minimum {v.get('min_psnr_db')} dB)"


def check_text(v: dict) -> str:
    """How an export was checked: ONNX's max abs error against torch, or Core ML's PSNR checks."""
    if v.get("max_abs_error") is not None:
        return f"max abs error {v['max_abs_error']:.2e} <= {v.get('tolerance')}"
    if "form_psnr_db" in v:
        form = "identical" if v["form_psnr_db"] is None else f"PSNR {v['form_psnr_db']:.1f} dB"
        predicted = v.get("prediction")
        predicted = predicted if isinstance(predicted, str) else f"PSNR {predicted.get('psnr_db')} dB"
        return f"torch form {form} (minimum {v.get('min_psnr_db')}); Core ML prediction: {predicted}"
    return "not validated"


def sizes_text(s) -> str:
    """The image sizes a bundle runs: a range, or exactly the sizes a static-shape engine was built for."""
    if s.sizes:
        return f"exactly {', '.join(f'{w}x{h}' for w, h in s.sizes)} (built for these only)"
    return f"multiples of {s.multiple_of} from {s.min_size} to {s.max_size}"


def storage_text(component) -> str:
    """", fp16 weights" for a component whose file stores its weights as fp16; "" for fp32 storage."""
    return "" if component.weights_storage == "fp32" else f", {component.weights_storage} weights"


def variant_text(variant) -> str:
    """One line on a precision variant: its file and its measured error against the component's own file."""
    v = variant.validation
    check = f"{v['relative_error']:.1e} of the output's range <= {v.get('tolerance')}" if "relative_error" in v \
        else "not validated"
    return f"{variant.precision} variant {variant.file} ({check})"
