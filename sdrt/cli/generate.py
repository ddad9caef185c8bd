"""`sdrt generate`: prompt -> images on any installed backend (no torch), through the generation driver."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdrt.runtime.resize import RESIZE_MODES

EXAMPLES = """examples:
  sdrt generate "a red circle on a blue background" -o out.png        # the model shipped with sdrt
  sdrt generate "a stone castle" -b sd15 --init-image photo.png --sampler "Euler a" --schedule Karras --seed -1 --n-iter 4
  sdrt generate "a lighthouse at dusk" -b sd15-trt --backend tensorrt -o lighthouse.png   # NVIDIA GPU
"""


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    from sdrt.runtime.presets import KINDS
    from sdrt.runtime.samplers import SAMPLERS, SCHEDULE_TYPES

    p = sub.add_parser("generate", parents=[common], help="generate images from a prompt (no torch needed)",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", help="the prompt (A1111 syntax: (word:1.2), [word], BREAK)")
    p.add_argument("--from-file", type=Path, metavar="FILE", help="one prompt per line (blank lines skipped), "
                   "all with the same options; the model is loaded once")
    p.add_argument("-b", "--bundle", type=Path, help="bundle folder (default: the model shipped with sdrt)")
    p.add_argument("-o", "--output", type=Path, help=".png, .jpg or .webp (parameters stored where A1111 stores "
                   "them); several images write NAME-0, NAME-1... Default: numbered files in --outdir")
    p.add_argument("--outdir", type=Path, help="folder for auto-numbered images NNNNN-SEED.png that never "
                   "overwrite an earlier one (default: outputs/txt2img-images or outputs/img2img-images)")
    p.add_argument("--format", choices=["png", "jpg", "webp"], default="png", help="file type in --outdir")
    p.add_argument("-n", "--negative-prompt", default="")
    p.add_argument("--steps", type=int, help="default: the model kind's (25; LCM 4, turbo 1)")
    p.add_argument("--cfg-scale", "--guidance-scale", dest="guidance_scale", type=float,
                   help="default: the model kind's (7.5; LCM and turbo: off, which halves the UNet batch)")
    p.add_argument("--kind", choices=list(KINDS), help="model kind whose defaults apply (default: the bundle's)")
    p.add_argument("--sampler", help=f"one of: {', '.join(s.label for s in SAMPLERS.values())} (default: the "
                   "bundle's scheduler)")
    p.add_argument("--schedule", help="A1111 schedule type: " + ", ".join(t.label for t in SCHEDULE_TYPES.values())
                   + " (A1111's for k-diffusion samplers; default: Automatic, the sampler's own)")
    p.add_argument("--cfg-rescale", dest="guidance_rescale", type=float, default=0.0,
                   help="guidance rescale phi for zero-terminal-SNR models (0.7 in the paper; default 0: off)")
    p.add_argument("--seed-mode", choices=["cpu", "gpu"], default="cpu",
                   help="cpu: torch's CPU generator, as diffusers (default); gpu: A1111's GPU seeds (CUDA Philox)")
    p.add_argument("--seed", type=int, help="-1 or none: random; image i uses seed + i")
    p.add_argument("-W", "--width", type=int, help="multiple of 8 (default: the model's size)")
    p.add_argument("-H", "--height", type=int, help="multiple of 8 (default: the model's size)")
    p.add_argument("--batch-size", type=int, default=1, help="images per UNet batch")
    p.add_argument("--n-iter", type=int, default=1, help="batches run one after another, seeds continuing "
                   "(A1111's batch count)")
    p.add_argument("--eta", type=float, help="noise of DDIM (default 0) and ancestral samplers (default 1)")
    p.add_argument("--fast-decode", action="store_true", help="decode with the bundle's tiny decoder (TAESD)")
    p.add_argument("--preview-every", type=_positive, metavar="N", help="write OUTPUT.preview.png every N steps "
                   "(TAESD when the bundle has it, else a latent-to-RGB map at 1/8 size)")
    p.add_argument("--no-safety-checker", dest="safety_checker", action="store_false",
                   help="do not run the bundle's safety checker (it runs by default when the bundle has one)")
    p.add_argument("--no-watermark", dest="watermark", action="store_false",
                   help="do not embed the SD scripts' invisible watermark (on by default, images >= 256x256)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress")
    add_engine_options(p)
    _add_img2img_options(p)
    _add_prompt_options(p)
    _add_lora_options(p)
    p.set_defaults(run=_generate)


def _positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def add_engine_options(p) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--backend", help="engine (default: the first installed that runs the bundle)")
    g.add_argument("--device", help="engine device, e.g. cpu (default) or cuda (torch: cuda when it sees a GPU)")
    g.add_argument("--precision", choices=["auto", "bf16", "f16", "f32"], help="compute precision. openvino: "
                   "default auto, the device's own (bf16 on CPUs with AVX512-BF16 or AMX); torch: f16 on CUDA, f32 on "
                   "CPU; tensorrt, onnxruntime: f16 runs the bundle's fp16 variants (auto: on GPUs), f32 its fp32 graphs")
    g.add_argument("--shapes", choices=["static", "dynamic"], help="tensorrt: engines for each request's exact "
                   "shapes (default, fastest) or one engine for 256-1024 px, 1-8 images, prompts up to 4 chunks")
    g.add_argument("--hint", choices=["latency", "throughput"], help="openvino: performance hint (default latency)")
    g.add_argument("--compute-units", choices=["cpu_and_ne", "cpu_and_gpu", "all", "cpu_only"], help="coreml: where "
                   "Core ML runs the models (default cpu_and_ne: the Neural Engine; cpu_and_gpu for original-attention "
                   "bundles on Max and Ultra Macs)")
    g.add_argument("--threads", type=int, metavar="N", help="CPU threads for the engine (default: one per core)")
    g.add_argument("--no-cache", dest="cache", action="store_false", default=None,
                   help="neither use nor fill the compiled-model cache for this run")


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
    g.add_argument("--resize-mode", default="just resize", choices=RESIZE_MODES, help="an init image (and mask) "
                   "of another size than -W/-H, as A1111 (default: just resize)")


def _add_prompt_options(p) -> None:
    g = p.add_argument_group("A1111 prompt options")
    g.add_argument("--embeddings-dir", type=Path, metavar="DIR", help="textual-inversion embeddings (.pt, .bin, "
                   ".safetensors; subfolders too), used by file name in the prompts as in A1111")
    g.add_argument("--clip-skip", type=int, default=1, metavar="N", help="condition on the text encoder's layer -N "
                   "(A1111's Clip skip; default 1: the last)")
    g.add_argument("--vae", type=Path, metavar="BUNDLE", help="decode and encode with this VAE bundle instead of the "
                   "model's (sdrt export VAE_SOURCE -o BUNDLE --vae-only)")


def _add_lora_options(p) -> None:
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]", help="apply a LoRA (.safetensors "
                   "or .pt; kohya/A1111 or diffusers) at STRENGTH (default 1); repeatable. An LCM-LoRA makes the "
                   "default kind lcm")
    g.add_argument("--lora-dir", type=Path, metavar="DIR", help="folder the prompt's <lora:NAME:STRENGTH> tags are "
                   "found in (A1111's syntax; subfolders too)")


def _prompts(args) -> list[str]:
    """The prompt, or the lines of --from-file."""
    from sdrt.errors import SdrtError

    if (args.prompt is None) == (args.from_file is None):
        raise SdrtError("give a prompt or --from-file FILE (one of the two)")
    if args.prompt is not None:
        return [args.prompt]
    try:
        lines = args.from_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SdrtError(f"cannot read the prompts file {args.from_file}: {getattr(e, 'strerror', None) or e}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise SdrtError(f"the prompts file {args.from_file} has no prompt")
    return prompts


def _request(args, prompt: str):
    from sdrt.runtime.image import load_image
    from sdrt.runtime.lora import parse_lora_argument
    from sdrt.runtime.request import GenerationRequest

    return GenerationRequest(
        prompt=prompt, negative_prompt=args.negative_prompt, width=args.width, height=args.height,
        steps=args.steps, guidance_scale=args.guidance_scale, sampler=args.sampler, schedule=args.schedule,
        seed=args.seed, seed_mode=args.seed_mode, batch_size=args.batch_size, n_iter=args.n_iter, eta=args.eta,
        guidance_rescale=args.guidance_rescale, kind=args.kind, fast_decode=args.fast_decode,
        safety_checker=args.safety_checker, watermark=args.watermark,
        init_image=None if args.init_image is None else load_image(args.init_image, "init image"),
        strength=args.strength, mask=None if args.mask is None else load_image(args.mask, "mask"),
        mask_blur=args.mask_blur, inpaint_full_res=args.inpaint_only_masked, inpaint_full_res_padding=args.padding,
        resize_mode=args.resize_mode, clip_skip=args.clip_skip, loras=tuple(map(parse_lora_argument, args.lora)),
        lora_dir=args.lora_dir,
    )


def engine_options(args) -> dict:
    given = {"device": args.device, "precision": args.precision, "hint": args.hint, "cache": args.cache,
             "threads": args.threads, "shapes": args.shapes, "compute_units": args.compute_units}
    return {k: v for k, v in given.items() if v is not None}


class Outputs:
    """Where each image goes: -o's file (numbered NAME-i when there are several), else the next free number in
    the output folder."""

    def __init__(self, args, images: int):
        from sdrt.runtime.image import check_writable
        from sdrt.runtime.outputs import OutputFolder

        self.files, self.folder = None, None
        if args.output is not None:
            out = args.output
            self.files = iter([out] if images == 1 else
                              [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(images)])
            check_writable(out)
            self.preview = out.with_suffix(".preview.png")
        else:
            kind = "img2img" if args.init_image is not None else "txt2img"
            self.folder = OutputFolder(args.outdir or Path("outputs") / f"{kind}-images", f".{args.format}")
            self.preview = self.folder.folder / "preview.png"

    def save(self, out) -> Path:
        from sdrt.runtime.outputs import write_image

        if self.folder is not None:
            return self.folder.save(out.image, out.seed, out.parameters)
        return write_image(out.image, next(self.files), out.parameters)


def _generate(args) -> int:
    from sdrt.errors import printable
    from sdrt.runtime.driver import run
    from sdrt.runtime.pipeline import Pipeline

    prompts = _prompts(args)
    requests = [_request(args, prompt) for prompt in prompts]
    outputs = Outputs(args, len(prompts) * max(args.batch_size, 1) * max(args.n_iter, 1))
    with Pipeline.load(args.bundle, backend=args.backend, embeddings_dir=args.embeddings_dir, vae=args.vae,
                       **engine_options(args)) as pipe:
        for request in requests:
            req = request.resolve(pipe.manifest)
            progress = StepProgress(pipe, req, args, outputs.preview)
            try:
                for out in run(pipe, req, progress):
                    path = outputs.save(out)
                    flagged = ": flagged by the safety checker, blacked out" if out.nsfw else ""
                    progress.write(f"{printable(path)} (seed {out.seed}){flagged}")
            finally:
                progress.close()
    return 0


class StepProgress:
    """The CLI's step hook: a progress bar on a terminal, a plain line per tenth otherwise, and previews."""

    def __init__(self, pipe, req, args, preview: Path):
        from tqdm import tqdm

        from sdrt.runtime.samplers import sampler_label

        self.pipe, self.preview_every, self.preview = pipe, args.preview_every, preview
        self.quiet, self.tty = args.quiet, sys.stderr.isatty()
        self.bar = tqdm(total=None, unit="step", desc=sampler_label(req.sampler), disable=args.quiet or not self.tty)
        self.last_line = -1

    def __call__(self, progress) -> None:
        if self.bar.total != progress.steps:
            self.bar.reset(total=progress.steps)
        self.bar.n = progress.step
        self.bar.set_postfix_str(f"batch {progress.iteration + 1}/{progress.iterations}", refresh=False)
        self.bar.refresh()
        tenth = int(10 * progress.fraction)
        if not self.quiet and not self.tty and tenth > self.last_line:
            self.last_line = tenth
            print(f"sdrt: {progress.fraction:.0%} (batch {progress.iteration + 1}/{progress.iterations}, step "
                  f"{progress.step}/{progress.steps})", file=sys.stderr, flush=True)
        state = progress.state
        if self.preview_every and state.index % self.preview_every == 0 and state.index < state.total:
            from sdrt.runtime.outputs import write_image

            write_image(self.pipe.preview(state)[0], self.preview, "")  # atomic: a viewer never sees half of it

    def write(self, line: str) -> None:
        self.bar.write(line, file=sys.stdout)

    def close(self) -> None:
        self.bar.close()
