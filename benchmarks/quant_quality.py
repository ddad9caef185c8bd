"""What int8 costs in image quality, measured where weights are trained: the shipped model (sdrt/models/sdrt-shapes).

Converts it to OpenVINO twice, fp32 and `--weights int8 --quantize-unet` (the conversion's own one-image gate
applies), then generates a fixed prompt set, none of which is among the calibration prompts, on both and reports
each image's PSNR against the fp32 bundle's:

- int8 vs fp32, both computed in f32: what quantization alone costs;
- int8 computed in the CPU's default precision (bf16 where it has it) vs fp32 in f32: what a user gets;
- for scale, fp32 computed in the CPU's default precision vs f32: what every engine's default already costs.

The shipped model is small and chaotic: a perturbation as small as bf16's flips the shape drawn for some seeds
(single images at 10-15 dB), so the mean and median over the set say more than any one image.

    python benchmarks/quant_quality.py [--out benchmarks/results/quant-quality.json]

Runs in a venv with sdrt, openvino and nncf (benchmarks/.venvs/sdrt-openvino, or the dev venv); minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from sdrt.backends.openvino import OpenVinoBackend  # noqa: E402
from sdrt.bundle import MANIFEST, read_manifest, sha256_file  # noqa: E402
from sdrt.export.openvino import CALIBRATION_PROMPTS, GATE_REQUEST, INT8_MIN_PSNR_DB, convert_bundle  # noqa: E402
from sdrt.runtime.image import psnr  # noqa: E402
from sdrt.runtime.pipeline import Pipeline, default_bundle  # noqa: E402

# Captions of the form the shipped model was trained on ("a {colour} {shape} on a {background} background",
# training/shapes.py), none of them among the calibration prompts.
PROMPTS = (
    "a red circle on a blue background", "a yellow square on a green background",
    "a white triangle on a black background", "a green circle on a white background",
    "a blue square on a white background", "a green triangle on a red background",
    "a black circle on a yellow background", "a yellow triangle on a blue background",
)
SEEDS = (0, 1)


def convert(out: Path, **options) -> Path:
    """The shipped model converted with `options`, reused while the shipped model is the same (its manifest)."""
    out = out.with_name(f"{out.name}-{sha256_file(default_bundle() / MANIFEST)[:12]}")
    if not (out / MANIFEST).is_file():
        convert_bundle(default_bundle(), out, overwrite=True, **options)
    return out


def images(bundle: Path, precision: str) -> list:
    backend = OpenVinoBackend(precision=precision, cache=False)
    with Pipeline(bundle, read_manifest(bundle), backend) as pipe:
        return [pipe.generate(replace(GATE_REQUEST, prompt=p, seed=s))[0].image for p in PROMPTS for s in SEEDS]


def summary(reference: list, candidate: list) -> dict:
    """Mean, median and minimum of the images' PSNRs, and each one (inf: identical images)."""
    values = [psnr(a, b) for a, b in zip(reference, candidate)]
    finite = [v for v in values if math.isfinite(v)]
    return {"mean_db": round(statistics.fmean(finite), 2) if finite else None,
            "median_db": round(statistics.median(values), 2), "min_db": round(min(values), 2),
            "per_image_db": [round(v, 2) for v in values]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=HERE / ".cache" / "shipped", help="converted bundles go here")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "quant-quality.json")
    args = parser.parse_args(argv)
    assert not set(PROMPTS) & set(CALIBRATION_PROMPTS)
    started = time.perf_counter()
    fp32 = convert(args.work / "openvino-fp32")
    int8 = convert(args.work / "openvino-int8q", weights="int8", quantize_unet=True)
    reference, reference_default = images(fp32, "f32"), images(fp32, "auto")
    quantized_f32, quantized_default = images(int8, "f32"), images(int8, "auto")
    default = OpenVinoBackend(cache=False).precision
    gate = read_manifest(int8).source["validation"]
    result = {
        "model": "sdrt-shapes (shipped, trained)",
        "request": {"steps": GATE_REQUEST.steps, "sampler": GATE_REQUEST.sampler,
                    "guidance_scale": GATE_REQUEST.guidance_scale, "seeds": list(SEEDS), "prompts": list(PROMPTS)},
        "int8_activations": gate.get("int8_activations"),
        "conversion_gate_db": gate["psnr_db"],
        "min_psnr_db": INT8_MIN_PSNR_DB,
        "default_precision": default,
        "int8_f32_vs_fp32_f32": summary(reference, quantized_f32),
        "int8_default_vs_fp32_f32": summary(reference, quantized_default),
        "fp32_default_vs_fp32_f32": summary(reference, reference_default),
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "request"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
