"""Few-step generation and the tiny decoder, measured with the sdrt runtime (ONNX Runtime, CPU).

Seconds per image for 20-step DPM++ 2M at guidance 7.5 (batch 2 per UNet call) against 4-step LCM with guidance
off (batch 1), and TAESD against the full VAE decoder, on the shipped model and on the full-size SD 1.5
architecture with random weights (compute does not depend on weight values; the images are noise).

    python benchmarks/few_step.py                          # the shipped model (a minute)
    python benchmarks/few_step.py --full-size --size 256   # + SD 1.5 at 256x256 (exports ~5 GB once, then minutes)
    python benchmarks/few_step.py --full-size --size 512 --repeats 1

Runs in the dev venv (torch builds the full-size model, its exports, and random TAESD weights where a bundle has
none; TAESD's cost does not depend on its weights either). Exports are cached under benchmarks/.cache/few-step/.
Writes JSON (--json) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE / "workers"))

from sdrt.bundle import read_manifest  # noqa: E402
from sdrt.runtime.pipeline import Pipeline, default_bundle  # noqa: E402
from sdrt.runtime.image import psnr  # noqa: E402
from sdrt.runtime.preview import SD1_PROJECTION, LatentProjection, linear_preview, tiny_decoder_preview  # noqa: E402
from sdrt.runtime.request import GenerationRequest  # noqa: E402

CACHE = HERE / ".cache" / "few-step"
RESULTS = HERE / "results"
PROMPT = "a photograph of an astronaut riding a horse"
SEED = 0
TAESD_SEED = 0
# (label, sampler, steps, guidance scale, preset whose scheduler overrides apply)
RUNS = (
    ("DPM++ 2M, 20 steps, CFG 7.5", "DPM++ 2M", 20, 7.5, "standard"),
    ("LCM, 4 steps, guidance off", "LCM", 4, 1.0, "lcm"),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="the small model's bundle (default: the shipped one)")
    parser.add_argument("--full-size", action="store_true", help="also the full-size SD 1.5 architecture")
    parser.add_argument("--size", type=int, default=256, help="full-size image side (default 256; SD's own is 512)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per measurement; the median is kept")
    parser.add_argument("--json", type=Path, default=RESULTS / "few_step.json")
    args = parser.parse_args()

    results = []
    shipped = args.bundle or default_bundle()
    if (shipped / "manifest.json").is_file():
        bundle, random_weights = with_taesd(shipped)
        results.append(measure("shipped", bundle, read_manifest(shipped).model.default_size, args.repeats,
                               random_weights))
    else:
        print(f"no bundle at {shipped}: skipping the shipped model", file=sys.stderr)
    if args.full_size:
        results.append(measure("SD 1.5 architecture", full_size_bundle(), args.size, args.repeats, True))
    record = {"machine": machine(), "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(table(results))
    print(f"\nwritten {args.json}")
    return 0


# --- bundles -------------------------------------------------------------------------------------------------

def random_taesd():
    """TAESD's published architecture (diffusers AutoencoderTiny defaults) with seeded random weights."""
    import torch
    from diffusers import AutoencoderTiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TAESD_SEED)
        return AutoencoderTiny().eval()


def with_taesd(bundle: Path) -> tuple[Path, bool]:
    """(`bundle`, False) if it has a taesd_decoder, else (a cached copy with a random-weight one, True)."""
    if "taesd_decoder" in read_manifest(bundle).components:
        return bundle, False
    from sdrt.export.taesd import add_taesd

    out = CACHE / f"{bundle.name}-taesd"
    if not (out / "manifest.json").is_file():
        add_taesd(bundle, random_taesd(), out, overwrite=True)
    return out, True


def full_size_bundle() -> Path:
    """SD 1.5's architecture with random weights and a random TAESD, exported once by sdrt."""
    import make_model

    from sdrt.export import export_bundle

    source, out = CACHE / "sd15-source", CACHE / "sd15-bundle"
    if not (out / "manifest.json").is_file():
        if not (source / "model_index.json").is_file():
            make_model.save(source, tiny=False, sample_size=None)
            random_taesd().save_pretrained(source / "taesd")
        export_bundle(source, out, overwrite=True)
    return out


# --- measurement ---------------------------------------------------------------------------------------------

def measure(model: str, bundle: Path, size: int, repeats: int, random_taesd_weights: bool) -> dict:
    """Loop and decode times of each run in RUNS, and TAESD's decode time, on one bundle at `size`."""
    print(f"{model}: {bundle} at {size}x{size}", file=sys.stderr)
    with Pipeline.load(bundle) as pipe:
        runs = [measure_run(pipe, size, repeats, *run) for run in RUNS]
        latents = runs[0].pop("latents")
        tiny = pipe.prepared("taesd_decoder", {"latents": latents})
        vae_s, reference = timed(lambda: pipe.decode(latents), repeats, warm=True)
        taesd_s, fast = timed(lambda: tiny_decoder_preview(tiny, latents), repeats, warm=True)
        decoders = {"vae_s": vae_s, "taesd_s": taesd_s, "psnr_db": preview_psnr(pipe, latents, reference[0], fast[0])}
    for run in runs:
        run.pop("latents", None)
        run["per_image_vae_s"] = run["loop_s"] + decoders["vae_s"]
        run["per_image_taesd_s"] = run["loop_s"] + decoders["taesd_s"]
    return {"model": model, "bundle": str(bundle), "size": size, "repeats": repeats, "runs": runs, **decoders,
            "taesd_weights": "random" if random_taesd_weights else "trained"}


def measure_run(pipe: Pipeline, size: int, repeats: int, label: str, sampler: str, steps: int, guidance: float,
                kind: str) -> dict:
    """Median seconds of prompt encoding + the denoising loop for one sampler setting (the final latents kept)."""
    req = GenerationRequest(PROMPT, width=size, height=size, steps=steps, guidance_scale=guidance, sampler=sampler,
                            seed=SEED, kind=kind)  # the kind's scheduler overrides apply (LCM ignores the spacing)
    run_loop(pipe, replace(req, steps=1))  # warm-up: first runs allocate; the shapes are those of the real run
    loop_s, latents = timed(lambda: run_loop(pipe, req), repeats)
    return {"run": label, "sampler": sampler, "steps": steps, "guidance_scale": guidance,
            "unet_batch": 2 if guidance > 1 else 1, "loop_s": loop_s, "latents": latents}


def preview_psnr(pipe: Pipeline, latents: np.ndarray, reference: Image.Image, fast: Image.Image) -> dict:
    """PSNR against the VAE's image: TAESD at full size, linear maps at latent size (the VAE image box-reduced)."""
    f = pipe.manifest.model.vae_scale_factor
    small = reference.reduce(f)
    model = pipe.manifest.model

    def vae_decode(z: np.ndarray) -> np.ndarray:
        feeds = {"latents": (z / model.latent_scale_factor).astype(np.float32)}
        return pipe.prepared("vae_decoder", feeds).run(feeds)["image"]

    fitted = LatentProjection.from_decoder(vae_decode, model.latent_channels)
    return {"taesd": psnr(fast, reference), "linear_fitted": psnr(linear_preview(latents, fitted)[0], small),
            "linear_sd1": psnr(linear_preview(latents, SD1_PROJECTION)[0], small)}


def run_loop(pipe: Pipeline, req: GenerationRequest):
    """Prompt encoding and the whole denoising loop; returns the final VP-scale latents."""
    last = None
    for last in pipe.denoise(req):
        pass
    return last.vp_latents().astype("float32")  # vp_latents() promotes to float64 (np.sqrt of a Python float)


def timed(fn, repeats: int, warm: bool = False):
    """(median seconds over `repeats` calls, the last result); `warm` makes one untimed call first."""
    if warm:
        fn()
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0], "python": platform.python_version()}


def table(results: list[dict]) -> str:
    lines = ["| model | size | run | UNet batch | loop s | s/image, VAE decode | s/image, TAESD decode |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        for run in r["runs"]:
            lines.append(f"| {r['model']} | {r['size']} | {run['run']} | {run['unet_batch']} | {run['loop_s']:.2f} "
                         f"| {run['per_image_vae_s']:.2f} | {run['per_image_taesd_s']:.2f} |")
    lines += ["", "| model | size | VAE decode s | TAESD decode s | TAESD speed-up | PSNR vs VAE: TAESD "
              "| linear, fitted | linear, SD1 matrix |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        q = r["psnr_db"]
        lines.append(f"| {r['model']} | {r['size']} | {r['vae_s']:.3f} | {r['taesd_s']:.3f} "
                     f"| {r['vae_s'] / r['taesd_s']:.1f}x | {q['taesd']:.1f} dB ({r['taesd_weights']} weights) "
                     f"| {q['linear_fitted']:.1f} dB | {q['linear_sd1']:.1f} dB |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
