"""The `sdrt` command: export, convert, generate, info. The only module that prints, configures logging or exits."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sdrt import __version__
from sdrt.errors import SdrtError

EXIT_USAGE = 2  # bad input: argparse's own convention, reused for every SdrtError


def _add_generate(sub) -> None:
    from sdrt.runtime.presets import KINDS
    from sdrt.runtime.samplers import SAMPLERS

    p = sub.add_parser("generate", help="generate images from a prompt (no torch needed)")
    p.add_argument("prompt")
    p.add_argument("-b", "--bundle", type=Path, help="bundle folder (default: the model shipped with sdrt)")
    p.add_argument("-o", "--output", type=Path, default=Path("out.png"), help="PNG; a batch writes NAME-0.png...")
    p.add_argument("-n", "--negative-prompt", default="")
    p.add_argument("--steps", type=int, help="default: the model kind's (25; LCM 4, turbo 1)")
    p.add_argument("--cfg-scale", "--guidance-scale", dest="guidance_scale", type=float,
                   help="default: the model kind's (7.5; LCM and turbo: off, which halves the UNet batch)")
    p.add_argument("--kind", choices=list(KINDS), help="model kind whose defaults apply (default: the bundle's)")
    p.add_argument(
        "--sampler",
        help=f"one of: {', '.join(s.label for s in SAMPLERS.values())} (default: the bundle's scheduler)",
    )
    p.add_argument("--schedule", help="A1111 schedule type: Karras, Exponential, SGM Uniform (default: the sampler's)")
    p.add_argument("--cfg-rescale", dest="guidance_rescale", type=float, default=0.0,
                   help="guidance rescale phi for zero-terminal-SNR models (0.7 in the paper; default 0: off)")
    p.add_argument("--seed-mode", choices=["cpu", "gpu"], default="cpu",
                   help="cpu: torch's CPU generator, as diffusers (default); gpu: A1111's GPU seeds (CUDA Philox)")
    p.add_argument("--seed", type=int, help="default: random; image i of a batch uses seed + i")
    p.add_argument("-W", "--width", type=int, help="multiple of 8 (default: the model's size)")
    p.add_argument("-H", "--height", type=int, help="multiple of 8 (default: the model's size)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--eta", type=float, help="noise of DDIM (default 0) and ancestral samplers (default 1)")
    p.add_argument("--backend", help="engine (default: the first installed)")
    p.add_argument("--device", help="engine device, e.g. cpu (default) or cuda")
    p.add_argument("--precision", choices=["auto", "bf16", "f32"], help="openvino: compute precision (default auto: "
                   "the device's own, bf16 on CPUs with AVX512-BF16 or AMX)")
    p.add_argument("--hint", choices=["latency", "throughput"], help="openvino: performance hint (default latency)")
    p.add_argument("--compute-units", choices=["cpu_and_ne", "cpu_and_gpu", "all", "cpu_only"], help="coreml: where "
                   "Core ML runs the models (default cpu_and_ne: the Neural Engine; cpu_and_gpu for original-attention "
                   "bundles on Max and Ultra Macs)")
    p.add_argument("--fast-decode", action="store_true", help="decode with the bundle's tiny decoder (TAESD)")
    p.add_argument("--preview-every", type=int, metavar="N", help="write OUTPUT.preview.png every N steps (TAESD "
                   "when the bundle has it, else a latent-to-RGB map at 1/8 size)")
    p.add_argument("--no-safety-checker", dest="safety_checker", action="store_false",
                   help="do not run the bundle's safety checker (it runs by default when the bundle has one)")
    p.add_argument("--no-watermark", dest="watermark", action="store_false",
                   help="do not embed the SD scripts' invisible watermark (on by default, images >= 256x256)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_img2img_options(p)
    p.set_defaults(run=_generate)


def _add_img2img_options(p) -> None:
    g = p.add_argument_group("img2img and inpainting")
    g.add_argument("--init-image", type=Path, metavar="IMG", help="start from this image (img2img); the size "
                   "defaults to the image's")
    g.add_argument("--strength", type=float, help="denoising strength in (0, 1] (default 0.75): how far the "
                   "image may move from the init image")
    g.add_argument("--mask", type=Path, metavar="MASK", help="inpaint: white repaints, black keeps (same size as "
                   "the init image)")
    g.add_argument("--mask-blur", type=int, default=0, metavar="N", help="blur the mask by N pixels and paste the "
                   "result over the original through it (A1111's Mask blur)")
    g.add_argument("--inpaint-only-masked", action="store_true", help="generate a crop around the mask at the "
                   "request size and paste it back (A1111's Inpaint area: Only masked)")
    g.add_argument("--padding", type=int, default=32, metavar="N", help="pixels around the mask for "
                   "--inpaint-only-masked (default 32)")


def _open_image(path: Path | None, what: str):
    """The image at `path` (None: none), fully read; unreadable files are one-line errors."""
    from PIL import Image, UnidentifiedImageError

    if path is None:
        return None
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, UnidentifiedImageError) as e:
        raise SdrtError(f"cannot read the {what} {path}: {getattr(e, 'strerror', None) or e}") from None


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to a validated bundle (needs sdrt[export])")
    p.add_argument("source", type=Path, help="diffusers folder, or a .safetensors / .ckpt single file")
    p.add_argument("-o", "--output", type=Path, required=True, help="bundle folder to create")
    p.add_argument("--original-config", type=Path, help="LDM yaml for a single file (default: SD v1 inference)")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], help="override the detected one")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--target", choices=["onnx", "openvino", "coreml"], default="onnx",
                   help="component format (default onnx); coreml converts from torch for Apple Silicon Macs")
    p.add_argument("--taesd", type=Path, help="AutoencoderTiny folder to add as the tiny decoder (default: the "
                   "source's taesd/ subfolder when it has one)")
    p.add_argument("--no-safety-checker", action="store_true", help="leave out the source's safety_checker/ "
                   "(exported by default when a diffusers folder has one)")
    p.add_argument("--weights-storage", choices=["fp32", "fp16"], default="fp32", help="how the ONNX files store "
                   "weights: fp16 halves them (large weights rounded to fp16, each cast back to fp32 in the graph: "
                   "compute, inputs and outputs stay fp32; validated against torch with the same rounding). "
                   "Default fp32")
    _add_conversion_options(p)
    _add_coreml_options(p)
    p.set_defaults(run=_export)


def _add_coreml_options(p) -> None:
    # Names as sdrt.export.coreml defines them, spelled out here so parsing a command imports no torch.
    g = p.add_argument_group("Core ML (--target coreml)")
    g.add_argument("--attention", choices=["split_einsum", "original"], help="split_einsum (default): the Neural "
                   "Engine's form, runs on every compute unit; original: fastest on the GPUs of Max and Ultra Macs")
    g.add_argument("--sizes", type=_sizes, default=(), metavar="WxH,...", help="image sizes to build besides the "
                   "model's own, e.g. 512x768,768x512 (N for NxN); a Core ML bundle runs only the sizes it was built for")
    g.add_argument("--compress", choices=["palette6", "int8"], help="compress the text encoder's and UNet's weights: "
                   "palette6 (6-bit k-means palettes, needs scikit-learn) or int8 (linear); refused below 30 dB image "
                   "PSNR against fp16 weights")


def _sizes(text: str) -> tuple[tuple[int, int], ...]:
    """"512x768,640" -> ((512, 768), (640, 640))."""
    try:
        pairs = [item.lower().split("x") for item in text.split(",") if item.strip()]
        return tuple((int(p[0]), int(p[-1])) for p in pairs if len(p) in (1, 2))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes such as 512x768,640, got {text!r}") from None


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert an ONNX bundle to another engine's format (no torch needed)")
    p.add_argument("bundle", type=Path, help="ONNX bundle folder")
    p.add_argument("-o", "--output", type=Path, required=True, help="bundle folder to create")
    p.add_argument("--target", choices=["openvino"], default="openvino")
    _add_conversion_options(p)
    p.set_defaults(run=_convert)


def _add_conversion_options(p) -> None:
    p.add_argument("--weights", choices=["fp32", "int8"], default="fp32", help="openvino: int8 compresses the "
                   "UNet and text encoder weights (NNCF), gated by image PSNR against fp32")
    p.add_argument("--quantize-unet", action="store_true", help="openvino, with --weights int8: int8 activations "
                   "too in the UNet's SiLU->conv layers (int8 kernels), calibrated on the model's own denoising")
    p.add_argument("--psnr-gate", type=float, help="openvino: minimum image PSNR in dB (default 35 fp32, 30 int8)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --output")


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="describe a bundle and verify its checksums")
    p.add_argument("bundle", type=Path, nargs="?", help="bundle folder (default: the shipped model)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check")
    p.set_defaults(run=_info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdrt", description="Stable Diffusion, exported and run anywhere.")
    parser.add_argument("--version", action="version", version=f"sdrt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_export(sub)
    _add_convert(sub)
    _add_info(sub)
    return parser


def _output_paths(output: Path, n: int) -> list[Path]:
    return [output] if n == 1 else [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(n)]


def _generate(args) -> int:
    from tqdm import tqdm

    from sdrt.runtime.image import check_writable, save_png
    from sdrt.runtime.pipeline import Pipeline
    from sdrt.runtime.request import GenerationRequest
    from sdrt.runtime.samplers import sampler_label

    paths = _output_paths(args.output, max(args.batch_size, 1))
    for path in paths:
        check_writable(path)
    init_image, mask = _open_image(args.init_image, "init image"), _open_image(args.mask, "mask")
    given = {"device": args.device, "precision": args.precision, "hint": args.hint, "compute_units": args.compute_units}
    options = {k: v for k, v in given.items() if v is not None}
    with Pipeline.load(args.bundle, backend=args.backend, **options) as pipe:
        req = GenerationRequest(
            prompt=args.prompt, negative_prompt=args.negative_prompt, width=args.width, height=args.height,
            steps=args.steps, guidance_scale=args.guidance_scale, sampler=args.sampler, schedule=args.schedule,
            seed=args.seed, seed_mode=args.seed_mode,
            batch_size=args.batch_size, eta=args.eta, guidance_rescale=args.guidance_rescale, kind=args.kind,
            fast_decode=args.fast_decode, safety_checker=args.safety_checker, watermark=args.watermark,
            init_image=init_image, strength=args.strength, mask=mask,
            mask_blur=args.mask_blur,
            inpaint_full_res=args.inpaint_only_masked, inpaint_full_res_padding=args.padding,
        ).resolve(pipe.manifest)
        last = None
        total = pipe.schedule(req).steps  # model evaluations: 2n - 1 for two-stage samplers such as Heun
        steps = tqdm(pipe.denoise(req), total=total, unit="step", disable=args.quiet, desc=sampler_label(req.sampler))
        for last in steps:
            if args.preview_every and last.index % args.preview_every == 0 and last.index < last.total:
                pipe.preview(last)[0].save(args.output.with_suffix(".preview.png"))
        for out, path in zip(pipe.finish(req, pipe.decode(last.vp_latents(), fast=req.fast_decode)), paths):
            save_png(out.image, path, out.parameters)
            flagged = ": flagged by the safety checker, blacked out" if out.nsfw else ""
            print(f"{path} (seed {out.seed}){flagged}")
    return 0


def _export(args) -> int:
    try:
        from sdrt.export import export_bundle
    except ImportError as e:
        raise SdrtError(f"export needs the export extra ({e.name} is missing): pip install 'sdrt[export]'") from None
    if args.target != "openvino" and (args.weights != "fp32" or args.quantize_unet or args.psnr_gate is not None):
        raise SdrtError("--weights, --quantize-unet and --psnr-gate apply to --target openvino")
    if args.target != "coreml" and (args.attention or args.sizes or args.compress):
        raise SdrtError("--attention, --sizes and --compress apply to --target coreml")
    if args.target == "coreml":
        _print_bundle(args.output, _export_coreml(args))
        return 0
    options = dict(original_config=args.original_config, prediction_type=args.prediction_type, opset=args.opset,
                   taesd=args.taesd, safety_checker=not args.no_safety_checker, weights_storage=args.weights_storage)
    if args.target == "onnx":
        manifest = export_bundle(args.source, args.output, overwrite=args.overwrite, **options)
    else:
        manifest = _export_via_onnx(args, options)
    _print_bundle(args.output, manifest)
    return 0


def _export_coreml(args):
    try:
        from sdrt.export.coreml import DEFAULT_ATTENTION, export_coreml
    except ImportError as e:
        raise SdrtError(f"Core ML export needs {e.name}: pip install 'sdrt[export,coreml-export]'") from None
    return export_coreml(
        args.source, args.output, attention=args.attention or DEFAULT_ATTENTION, sizes=args.sizes,
        compression=args.compress, overwrite=args.overwrite, safety_checker=not args.no_safety_checker,
        original_config=args.original_config, prediction_type=args.prediction_type,
    )


def _export_via_onnx(args, options: dict):
    """Export ONNX into a hidden folder beside the output (same disk, no /tmp size surprises), then convert it."""
    import tempfile

    from sdrt.export import export_bundle

    if args.output.exists() and not args.overwrite:  # fail before the slow export, not after it
        raise SdrtError(f"{args.output} already exists (pass --overwrite to replace it)")
    parent = args.output.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{args.output.name}.onnx-", dir=parent) as tmp:
        export_bundle(args.source, Path(tmp) / "onnx", **options)
        return _convert_bundle(Path(tmp) / "onnx", args)


def _convert(args) -> int:
    _print_bundle(args.output, _convert_bundle(args.bundle, args))
    return 0


def _convert_bundle(src: Path, args):
    try:
        from sdrt.export.openvino import convert_bundle

        return convert_bundle(
            src, args.output, weights=args.weights, quantize_unet=args.quantize_unet, overwrite=args.overwrite,
            psnr_gate=args.psnr_gate,
        )
    except ImportError as e:  # openvino, and nncf for int8, are imported on use
        extra = "openvino-int8" if e.name == "nncf" else "openvino"
        raise SdrtError(f"conversion to openvino needs {e.name}: pip install 'sdrt[{extra}]'") from None


def _print_bundle(output: Path, manifest) -> None:
    print(f"{output}: {len(manifest.components)} components, {len(manifest.files)} files")
    for comp in manifest.components.values():
        print(f"  {comp.name}: {comp.format} {comp.precision}{_storage_text(comp)}, {_check_text(comp.validation)}")
    if "validation" in manifest.source:
        print(f"  image: {_psnr_text(manifest.source['validation'])}")
    if "compression" in manifest.source:
        print(f"  compressed weights: {_psnr_text(manifest.source['compression'], 'uncompressed weights')}")


def _check_text(v: dict) -> str:
    """How an export was checked: ONNX's max abs error against torch, or Core ML's PSNR checks."""
    if v.get("max_abs_error") is not None:
        return f"max abs error {v['max_abs_error']:.2e} <= {v.get('tolerance')}"
    if "form_psnr_db" in v:
        form = "identical" if v["form_psnr_db"] is None else f"PSNR {v['form_psnr_db']:.1f} dB"
        predicted = v.get("prediction")
        predicted = predicted if isinstance(predicted, str) else f"PSNR {predicted.get('psnr_db')} dB"
        return f"torch form {form} (minimum {v.get('min_psnr_db')}); Core ML prediction: {predicted}"
    return "not validated"


def _psnr_text(v: dict, reference: str | None = None) -> str:
    measured = "identical" if v.get("psnr_db") is None else f"PSNR {v['psnr_db']:.2f} dB"
    return f"{measured} against the {reference or v.get('reference', '?')} (minimum {v.get('min_psnr_db')} dB)"


def _storage_text(component) -> str:
    """", fp16 weights" for a component whose file stores its weights as fp16; "" for fp32 storage."""
    return "" if component.weights_storage == "fp32" else f", {component.weights_storage} weights"


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


def _sizes_text(s) -> str:
    if s.sizes:
        return f"exactly {', '.join(f'{w}x{h}' for w, h in s.sizes)} (built for these only)"
    return f"multiples of {s.multiple_of} from {s.min_size} to {s.max_size}"


def describe(root: Path, manifest) -> str:
    """The manifest in human form."""
    m, s = manifest.model, manifest.shapes
    size = sum((Path(root) / f).stat().st_size for f in manifest.files if (Path(root) / f).is_file())
    lines = [
        f"bundle     {root} (format {manifest.format_version}, {size / 2**20:.1f} MiB)",
        f"model      {m.name or '?'}: family {m.family}, prediction {m.prediction_type}, "
        f"latent scale {m.latent_scale_factor}, default {m.default_size}x{m.default_size}",
        f"sizes      {_sizes_text(s)}, batch up to {s.max_batch}",
        f"scheduler  {manifest.scheduler.get('_class_name', '?')}",
        f"tokenizer  max {manifest.tokenizer.max_length} tokens, pad {manifest.tokenizer.pad_token!r}",
        f"source     {manifest.source.get('kind', '?')} {manifest.source.get('path', '')} "
        f"sha256 {manifest.source.get('sha256', '?')[:10]}",
        "tools      " + ", ".join(f"{k} {v}" for k, v in manifest.tools.items()),
        "components",
    ]
    if "converted_from" in manifest.source:
        origin, check = manifest.source["converted_from"], manifest.source.get("validation", {})
        lines.insert(-2, f"converted  from {origin.get('format')} bundle {origin.get('manifest_sha256', '?')[:10]}: "
                         f"{_psnr_text(check)}")
    if "compression" in manifest.source:
        lines.insert(-1, f"compressed {manifest.source['compression'].get('mode')} weights: "
                         f"{_psnr_text(manifest.source['compression'], 'uncompressed weights')}")
    for c in manifest.components.values():
        lines.append(f"  {c.name:<13} {c.file} ({c.format}, {c.precision}{_storage_text(c)}; "
                     f"{_check_text(c.validation)})")
        for kind, specs in (("in ", c.contract.inputs), ("out", c.contract.outputs)):
            for t in specs:
                lines.append(f"      {kind} {t.name}: {t.dtype} {list(t.shape)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO if args.command == "export" else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("coremltools").setLevel(logging.WARNING)  # it logs every converted op at INFO
    try:
        return args.run(args)
    except SdrtError as e:
        print(f"sdrt: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `sdrt info | head`: the reader left; nothing more to say
        sys.stdout = None
        return 0
    except KeyboardInterrupt:
        print("sdrt: interrupted", file=sys.stderr)
        return 130
