"""The torch backend on CUDA against diffusers on the same GPU in the same run: full-size SD 1.5 (random weights),
milliseconds per guided 512x512 step, compile time first and from the cache, start-up from the cache, GPU memory.

    python benchmarks/torch_gpu.py                  # all engines, 512x512 (needs torch's CUDA build and a GPU)
    python benchmarks/torch_gpu.py --engines sdrt-torch diffusers-compiled --iterations 200

Engines (each in its own process, one at a time, so peak memory and compile caches are its own):
- `diffusers-eager`: UNet2DConditionModel fp16, eager.
- `diffusers-compiled`: the same under torch.compile with CUDA graphs as diffusers' speed-up guide has it (fp16,
  channels_last, fused QKV projections, mode "max-autotune" (which captures CUDA graphs), its inductor flags):
  issue 16's target, 6.6 ms per step on an H100.
- `sdrt-torch`: sdrt's torch backend (sdrt export --target torch; AOTInductor, fp16, a CUDA graph around the UNet),
  run first with an empty package cache (the compile), then again in a new process from the cache.

ms/step is one guided UNet call (batch 2, 64x64 latents, 77 tokens), timed with CUDA events over --iterations after
warm-up, the median of --repeats runs. For sdrt also the whole sampler step as the runtime loop makes it (UNet,
guidance and Euler update in numpy, the latents to and from the device): `loop ms/step`. Start-up from cache: a new
process, from Pipeline.load to the first step done (target < 10 s). Writes benchmarks/results/torch-gpu-SIZE.json
and prints a Markdown table. Written without a GPU at hand: not yet run.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE / "workers"))

CACHE = HERE / ".cache" / "torch-gpu"
RESULTS = HERE / "results"
ENGINES = ("diffusers-eager", "diffusers-compiled", "sdrt-torch", "sdrt-torch-cached")
BATCH, SEQUENCE, CONTEXT = 2, 77, 768  # a guided step: the unconditional and conditional halves together
# diffusers' "Speed up inference" guide (docs/source/en/optimization/fp16.md, torch.compile section).
DIFFUSERS_INDUCTOR = {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True, "epilogue_fusion": False,
                      "coordinate_descent_check_all_directions": True}


def unet_inputs(torch, latent: int, dtype):
    generator = torch.Generator("cuda").manual_seed(0)
    sample = torch.randn(BATCH, 4, latent, latent, generator=generator, device="cuda", dtype=dtype)
    context = torch.randn(BATCH, SEQUENCE, CONTEXT, generator=generator, device="cuda", dtype=dtype)
    return sample, torch.full((BATCH,), 500.0, device="cuda", dtype=dtype), context


def cuda_ms(torch, call, iterations: int, repeats: int) -> float:
    """Median over `repeats` of the mean CUDA-event time of `iterations` calls, in ms."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iterations):
            call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iterations)
    return statistics.median(times)


def run_diffusers(args, compiled: bool) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(args.model / "unet", torch_dtype=torch.float16).to("cuda").eval()
    inputs = unet_inputs(torch, args.size // 8, torch.float16)
    first = None
    if compiled:
        for name, value in DIFFUSERS_INDUCTOR.items():
            setattr(torch._inductor.config, name, value)
        unet.fuse_qkv_projections()
        unet.to(memory_format=torch.channels_last)
        unet = torch.compile(unet, mode="max-autotune", fullgraph=True)
    with torch.inference_mode():
        start = time.perf_counter()
        unet(*inputs, return_dict=False)
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        for _ in range(3):
            unet(*inputs, return_dict=False)
        ms = cuda_ms(torch, lambda: unet(*inputs, return_dict=False), args.iterations, args.repeats)
    return {"ms_per_step": ms, "first_call_s": first, "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def run_sdrt(args, cached: bool) -> dict:
    import numpy as np
    import torch

    from sdrt.runtime.pipeline import Pipeline
    from sdrt.runtime.request import GenerationRequest

    options = {"device": "cuda", "precision": "f16", "cache_dir": CACHE / "packages"}
    if cached:
        options["compile"] = False  # a miss would be a failed measurement, not a compile
    start = time.perf_counter()
    request = GenerationRequest("a photograph of an astronaut riding a horse", width=args.size, height=args.size,
                                steps=args.loop_steps, seed=0, sampler="Euler", safety_checker=False, watermark=False)
    with Pipeline.load(args.bundle, backend="torch", **options) as pipe:
        steps = pipe.denoise(request)
        next(steps)
        first_step = time.perf_counter() - start
        marks = [time.perf_counter()]
        for _ in steps:
            marks.append(time.perf_counter())
        unet = pipe.session("unet")
        feeds = {"sample": np.random.default_rng(0).standard_normal((BATCH, 4, args.size // 8, args.size // 8),
                                                                    dtype=np.float32),
                 "timestep": np.full(BATCH, 500.0, np.float32),
                 "encoder_hidden_states": np.zeros((BATCH, SEQUENCE, CONTEXT), np.float32)}
        feeds["encoder_hidden_states"].flags.writeable = False  # kept on the device, as the pipeline's context
        unet.prepare(unet.contract.check_inputs(feeds))
        ms = cuda_ms(torch, lambda: unet.run(feeds), args.iterations, args.repeats)
    loop = statistics.median(np.diff(marks)) * 1000
    return {"ms_per_step": ms, "loop_ms_per_step": loop, "first_step_s": first_step,
            "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def prepare(args) -> None:
    """The random SD 1.5 folder and its torch bundle, made once under benchmarks/.cache/torch-gpu/."""
    from make_model import save

    from sdrt.export.torch_export import export_torch_bundle

    if not args.model.exists():
        save(args.model, tiny=False, sample_size=None)
    if not args.bundle.exists():
        start = time.perf_counter()
        export_torch_bundle(args.model, args.bundle)
        (CACHE / "export_s.txt").write_text(f"{time.perf_counter() - start:.1f}")


def worker(args) -> None:
    runs = {"diffusers-eager": lambda: run_diffusers(args, False), "diffusers-compiled": lambda: run_diffusers(args, True),
            "sdrt-torch": lambda: run_sdrt(args, False), "sdrt-torch-cached": lambda: run_sdrt(args, True)}
    print("RESULT " + json.dumps(runs[args.worker]()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop-steps", type=int, default=20)
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model, args.bundle = CACHE / "sd15", CACHE / "sd15-torch"
    if args.worker:
        return worker(args)
    CACHE.mkdir(parents=True, exist_ok=True)
    prepare(args)
    if "sdrt-torch" in args.engines:
        shutil.rmtree(CACHE / "packages", ignore_errors=True)  # the first run compiles
    results = {engine: measure(engine, args) for engine in args.engines}
    report(args, results)


def measure(engine: str, args) -> dict:
    command = [sys.executable, __file__, "--worker", engine, "--size", str(args.size), "--iterations",
               str(args.iterations), "--repeats", str(args.repeats), "--loop-steps", str(args.loop_steps)]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    (CACHE / f"{engine}.log").write_text(proc.stdout + proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"failed": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return {**json.loads(lines[-1][len("RESULT "):]), "process_s": time.perf_counter() - start}


def report(args, results: dict) -> None:
    import torch

    RESULTS.mkdir(exist_ok=True)
    record = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "size": args.size,
              "iterations": args.iterations, "repeats": args.repeats, "results": results}
    (RESULTS / f"torch-gpu-{args.size}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"{record['gpu']}, torch {record['torch']}, {args.size}x{args.size}, guided batch {BATCH}\n")
    print("| engine | ms/step | loop ms/step | first call / first step s | GPU peak GiB |")
    print("|---|---|---|---|---|")
    for engine, r in results.items():
        if "failed" in r:
            print(f"| {engine} | failed: {r['failed']} | | | |")
            continue
        first = r.get("first_step_s", r.get("first_call_s"))
        loop = f"{r['loop_ms_per_step']:.2f}" if "loop_ms_per_step" in r else "-"
        print(f"| {engine} | {r['ms_per_step']:.2f} | {loop} | {first:.1f} | {r['gpu_peak_gib']:.2f} |")


if __name__ == "__main__":
    main()
