"""Where a guided UNet step goes on OpenVINO: per-operation time from the CPU plugin's performance counters.

Compiles each bundle's UNet as sdrt's backend does (static shape for one image under guidance: batch 2), runs
`--steps` calls with PERF_COUNT on, and reports time per operation type and per kernel (exec type), the share in
convolutions / linear layers / attention / elementwise / norms, and how much of the convolution and matmul time
runs int8 kernels. With several bundles their calls alternate in one process (A, B, A, B, ...) and the ratios of
medians are printed: on a shared host only such ratios mean anything.

    python benchmarks/profile_openvino.py benchmarks/.cache/sd15/sdrt-openvino-fp32 --size 256
    python benchmarks/profile_openvino.py benchmarks/.cache/sd15/sdrt-openvino-fp32 \\
        benchmarks/.cache/sd15/sdrt-openvino-int8q --size 256 --steps 8
    python benchmarks/profile_openvino.py B B@DYNAMIC_QUANTIZATION_GROUP_SIZE=32   # one bundle, two configs

Writes benchmarks/results/profile-openvino-<bundle>-<size>px-<precision>.json per bundle (--out elsewhere).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from sdrt.backends.openvino import OpenVinoBackend  # noqa: E402
from sdrt.bundle import read_manifest  # noqa: E402

GUIDED_BATCH, SEQUENCE = 2, 77  # one image under classifier-free guidance; one 77-token prompt chunk
# CPU plugin node types (after its graph transformations, as PERF_COUNT names them) -> the summary's categories.
CATEGORIES = {
    "convolution": ("Convolution", "GroupConvolution", "Deconvolution"),
    "linear": ("FullyConnected",),
    "attention": ("ScaledDotProductAttention", "MatMul", "Softmax"),
    "norms": ("MVN", "GroupNormalization", "NormalizeL2", "RMS", "LayerNorm"),
    "elementwise": ("Eltwise", "Subgraph", "Math", "FakeQuantize", "Convert", "Add", "Multiply", "Subtract",
                    "Divide", "Swish", "Gelu", "Sin", "Cos", "Exp", "Power", "Sqrt"),
    "data movement": ("Reorder", "Concat", "Transpose", "Reshape", "Interpolate", "Gather", "Split", "VariadicSplit",
                      "StridedSlice", "Broadcast", "Pad"),
}
ATTENTION_SUBGRAPH = re.compile(r"/attn\d*/(MatMul|Softmax|ScaledDotProduct)")
# Kernels computing in int8: oneDNN's names end in _I8 / _U8 or carry u8s8 (VNNI/AMX int8 dot products).
INT8_MARKS = ("_I8", "_U8", "u8s8", "s8s8", "int8")


def category(node_type: str, node_name: str = "") -> str:
    """By prefix: the plugin adds suffixes such as FullyConnectedCompressed (int8 weights, float compute). The
    plugin fuses MatMul-Softmax-MatMul into a Subgraph named after the last MatMul (.../attn1/MatMul_1)."""
    if node_type == "Subgraph" and ATTENTION_SUBGRAPH.search(node_name):
        return "attention"
    return next((name for name, types in CATEGORIES.items() if node_type.startswith(types)), "other")


def is_int8(exec_type: str) -> bool:
    return any(mark.lower() in exec_type.lower() for mark in INT8_MARKS)


def unet_feeds(contract, size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random inputs of a guided call at `size` pixels (the UNet's cost does not depend on the values)."""
    dims = {"batch": GUIDED_BATCH, "latent_height": size // 8, "latent_width": size // 8, "sequence": SEQUENCE}
    feeds = {spec.name: rng.standard_normal(spec.concrete_shape(dims)).astype(spec.dtype) for spec in contract.inputs}
    feeds["timestep"] = np.full(GUIDED_BATCH, 500.0, np.float32)
    return feeds


def parse_model(arg: str) -> tuple[Path, dict]:
    """BUNDLE or BUNDLE@KEY=VALUE,KEY=VALUE: a bundle and extra CPU plugin properties for it."""
    path, _, extra = arg.partition("@")
    return Path(path), dict(item.split("=", 1) for item in extra.split(",") if item)


def load_unet(arg: str, precision: str, size: int, rng):
    """The bundle's UNet session, compiled for a guided call at `size` with performance counters, and its feeds."""
    bundle, extra = parse_model(arg)
    backend = OpenVinoBackend(precision=precision, cache=False)
    backend.config.update(PERF_COUNT=True, **extra)
    comp = read_manifest(bundle).components["unet"]
    session = backend.load(bundle, comp)
    feeds = unet_feeds(comp.contract, size, rng)
    start = time.perf_counter()
    session.prepare(comp.contract.check_inputs(feeds))
    return session, feeds, {"compile_s": time.perf_counter() - start, "weights": comp.precision,
                            "precision": backend.precision}


def label(arg: str) -> str:
    """The bundle folder's name, with its extra properties."""
    bundle, extra = parse_model(arg)
    return bundle.name + "".join(f"@{k}={v}" for k, v in extra.items())


def summarize(profiles: list[list], top: int) -> dict:
    """Mean ms per call by node type, exec type and category (executed nodes only), and the int8 share."""
    by_type, by_exec, by_cat = defaultdict(float), defaultdict(float), defaultdict(float)
    int8 = defaultdict(float)
    for infos in profiles:
        for info in infos:
            if str(info.status).endswith("NOT_RUN"):
                continue
            ms = info.real_time.total_seconds() * 1e3 / len(profiles)
            by_type[info.node_type] += ms
            by_exec[f"{info.node_type}: {info.exec_type}"] += ms
            kind = category(info.node_type, info.node_name)
            by_cat[kind] += ms
            if kind in ("convolution", "linear", "attention") and is_int8(info.exec_type):
                int8[kind] += ms
    total = sum(by_type.values())
    ranked = lambda d: {k: round(v, 2) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]}  # noqa: E731
    return {
        "total_ms": round(total, 1),
        "share": {k: round(v / total, 3) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "int8_share_of": {k: round(int8[k] / by_cat[k], 3) for k in ("convolution", "linear", "attention")
                          if by_cat[k]},
        "by_node_type_ms": ranked(by_type),
        "by_exec_type_ms": ranked(by_exec),
    }


def measure(sessions: dict, steps: int) -> tuple[dict, dict]:
    """Alternate the sessions' calls for `steps` rounds after one warm-up each: call times and counters."""
    times, profiles = defaultdict(list), defaultdict(list)
    for _ in range(steps + 1):
        for name, (session, feeds, _) in sessions.items():
            start = time.perf_counter()
            session.run(feeds)
            times[name].append(time.perf_counter() - start)
            profiles[name].append(session.profiling_info())
    return {k: v[1:] for k, v in times.items()}, {k: v[1:] for k, v in profiles.items()}


def report(name: str, info: dict, summary: dict, top: int) -> None:
    print(f"\n## {name}: {info['weights']} weights, {info['precision']} compute, median {info['median_s']:.3f} s "
          f"per call, counters total {summary['total_ms']:.0f} ms")
    print("share: " + ", ".join(f"{k} {v:.0%}" for k, v in summary["share"].items()))
    print("int8 kernels: " + (", ".join(f"{v:.0%} of {k}" for k, v in summary["int8_share_of"].items()) or "none"))
    for title, key in (("node type", "by_node_type_ms"), ("exec type", "by_exec_type_ms")):
        print(f"top {top} by {title} (ms per call):")
        for label, ms in summary[key].items():
            print(f"  {ms:9.1f}  {label}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="+", metavar="BUNDLE[@KEY=VALUE,...]",
                        help="OpenVINO bundles (several: alternated A/B), each with optional CPU plugin properties")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--precision", default="auto", help="auto (the CPU's default: bf16 here), bf16 or f32")
    parser.add_argument("--steps", type=int, default=5, help="measured calls per bundle after one warm-up")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    sessions = {label(b): load_unet(b, args.precision, args.size, rng) for b in args.bundles}
    times, profiles = measure(sessions, args.steps)
    base = next(iter(times))
    for name, (session, _, info) in sessions.items():
        info.update(median_s=statistics.median(times[name]), times_s=times[name], size=args.size)
        info["ratio_to_" + base] = info["median_s"] / statistics.median(times[base])
        summary = summarize(profiles[name], args.top)
        report(name, info, summary, args.top)
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"profile-openvino-{name}-{args.size}px-{info['precision']}.json"
        path.write_text(json.dumps({**info, **summary}, indent=1) + "\n")
        session.close()
    if len(times) > 1:
        print("\nmedian call time relative to " + base + ": " + ", ".join(
            f"{n} {sessions[n][2]['ratio_to_' + base]:.3f}" for n in times))
    return 0


if __name__ == "__main__":
    sys.exit(main())
