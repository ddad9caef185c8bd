"""sdrt on an NVIDIA GPU against diffusers fp16 (eager, and torch.compile with CUDA graphs) on the same GPU, full-size
SD 1.5 (random weights) at 512x512: ms per guided step, image time, engine build time (first, and from the cache),
GPU memory. Issue 15's target: a guided 512x512 step below diffusers compiled with CUDA graphs (6.6 ms on an H100;
aim at 5 ms).

Written, not yet run: the project's machines have no GPU. On one:

    python benchmarks/gpu.py --bundle SD15_ONNX_BUNDLE --model SD15_DIFFUSERS_FOLDER --torch-python TORCH_VENV/bin/python

- this interpreter runs sdrt (`pip install -e '.[tensorrt-rtx,onnxruntime-gpu]'`; ONNX Runtime's CUDA engine is
  skipped when onnxruntime-gpu is absent); `--torch-python` runs diffusers (a venv with CUDA torch and diffusers);
- SD15_DIFFUSERS_FOLDER: `python benchmarks/workers/make_model.py DIR` (random weights, SD 1.5's configs), or a real
  SD 1.5; SD15_ONNX_BUNDLE: `sdrt export DIR -o BUNDLE`. The bundle is converted here once (`sdrt convert --target
  tensorrt`, fp16 variants validated on the CPU: minutes) into BUNDLE-tensorrt.

Each engine runs in its own process and generates the same image twice (cold, then warm; the worker protocol of
workers/common.py): sdrt-tensorrt builds its engines into an empty cache (its cold start is the first build),
sdrt-tensorrt-cached starts again on that cache. Writes benchmarks/results/gpu-<GPU>-<size>px-<steps>steps.json and
prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT_PREFIX = "BENCHMARK-RESULT "  # workers/common.py prints it before its JSON
PROMPT, SEED, GUIDANCE_SCALE = "a photograph of an astronaut riding a horse", 0, 7.5  # as run.py: UNet batch 2

# name -> (worker, interpreter: "sdrt" or "torch", options). The cache folders are filled in by main().
ENGINES = {
    "sdrt-tensorrt": ("sdrt_engine.py", "sdrt", {"backend": "tensorrt", "shapes": "static", "cache_dir": "FRESH"}),
    "sdrt-tensorrt-cached": ("sdrt_engine.py", "sdrt", {"backend": "tensorrt", "shapes": "static",
                                                       "cache_dir": "FRESH"}),
    "sdrt-tensorrt-dynamic": ("sdrt_engine.py", "sdrt", {"backend": "tensorrt", "shapes": "dynamic",
                                                        "cache_dir": "DYNAMIC"}),
    "sdrt-onnxruntime-cuda": ("sdrt_engine.py", "sdrt", {"backend": "onnxruntime", "device": "cuda"}),
    "diffusers-fp16": ("diffusers_cuda.py", "torch", {}),
    "diffusers-fp16-compiled": ("diffusers_cuda.py", "torch", {"compile": True}),
}
COLUMNS = ("engine", "precision", "ms/step", "image s", "first image s", "load s", "GPU memory GB")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="sdrt TensorRT / ONNX Runtime CUDA vs diffusers fp16 on one GPU")
    parser.add_argument("--bundle", type=Path, required=True, help="sdrt ONNX bundle of SD 1.5 (sdrt export)")
    parser.add_argument("--model", type=Path, help="the diffusers folder it came from (diffusers engines)")
    parser.add_argument("--torch-python", type=Path, help="python with CUDA torch and diffusers (default: skip them)")
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds any one engine may take")
    parser.add_argument("--out", type=Path)
    return parser.parse_args(argv)


def run_worker(python: str, worker: str, job: dict, log: Path, timeout: float) -> dict:
    """Run one worker; its RESULT JSON, or {"error": ...} with the log's last line."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PYTHONPATH=f"{HERE / 'workers'}{os.pathsep}{HERE.parent}", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    with log.open("w") as out:
        try:
            code = subprocess.run([python, str(HERE / "workers" / worker), json.dumps(job)], stdout=out,
                                  stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    lines = log.read_text(errors="replace").splitlines()
    results = [ln[len(RESULT_PREFIX):] for ln in lines if ln.startswith(RESULT_PREFIX)]
    if code == 0 and results:
        return json.loads(results[-1])
    return {"error": f"exit {code}: {(lines or ['no output'])[-1]} (log: {log})"}


def convert(bundle: Path, logs: Path, timeout: float) -> tuple[Path, float]:
    """BUNDLE-tensorrt (fp16 variants), converted once; (its path, seconds the conversion took, 0 when cached)."""
    out = bundle.with_name(bundle.name + "-tensorrt")
    if out.exists():
        return out, 0.0
    start = time.perf_counter()
    with (logs / "convert.log").open("w") as log:
        subprocess.run([sys.executable, "-m", "sdrt", "convert", str(bundle), "-o", str(out), "--target", "tensorrt",
                        "--check"], stdout=log, stderr=subprocess.STDOUT, check=True, timeout=timeout)
    return out, time.perf_counter() - start


def row(name: str, result: dict) -> list[str]:
    if "error" in result:
        return [name, "failed: " + result["error"]] + [""] * (len(COLUMNS) - 2)
    memory = result.get("gpu_memory_bytes")
    return [name, result.get("precision", "?"), f"{result['step_s'] * 1e3:.2f}", f"{result['image_s']:.2f}",
            f"{result['first_image_s']:.1f}", f"{result['load_s']:.1f}", f"{memory / 2**30:.1f}" if memory else "?"]


def markdown(results: dict[str, dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(row(name, r)) + " |" for name, r in results.items()])


def gpu_name() -> str:
    try:
        from sdrt.backends.cuda import probe

        return probe().name
    except Exception as e:  # no GPU, driver or cuda-python: the record says so
        return f"unknown ({e})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="sdrt-gpu-bench-"))
    logs = work / "logs"
    logs.mkdir()
    bundle, convert_s = convert(args.bundle.resolve(), logs, args.timeout)
    folders = {"FRESH": str(work / "engines-static"), "DYNAMIC": str(work / "engines-dynamic")}
    pythons = {"sdrt": sys.executable, "torch": str(args.torch_python) if args.torch_python else None}
    results = {}
    for name in args.engines:
        worker, interpreter, options = ENGINES[name]
        model = str(args.model) if interpreter == "torch" else str(bundle)
        if pythons[interpreter] is None or (interpreter == "torch" and args.model is None):
            results[name] = {"error": "skipped: needs --torch-python and --model"}
            continue
        options = {k: folders.get(v, v) for k, v in options.items()}
        job = {"model": model, "size": args.size, "steps": args.steps, "seed": SEED, "prompt": PROMPT,
               "negative_prompt": "", "guidance_scale": GUIDANCE_SCALE, "image": str(work / "images" / f"{name}.png"),
               "options": options}
        print(f"{name} ...", file=sys.stderr, flush=True)
        results[name] = run_worker(pythons[interpreter], worker, job, logs / f"{name}.log", args.timeout)
    gpu = gpu_name()
    record = {"gpu": gpu, "size": args.size, "steps": args.steps, "bundle": str(args.bundle), "convert_s": convert_s,
              "note": "full-size SD 1.5 architecture; ms/step is the median guided step (UNet batch 2) of the cold "
                      "and warm images; first image s includes engine builds (sdrt-tensorrt: an empty cache)",
              "engines": results}
    out = args.out or HERE / "results" / f"gpu-{re.sub(r'[^A-Za-z0-9]+', '-', gpu)}-{args.size}px-{args.steps}steps.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(markdown(results))
    print(f"wrote {out}; logs in {logs}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
