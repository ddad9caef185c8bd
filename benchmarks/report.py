"""The machine a result came from, and the result as a Markdown table."""
from __future__ import annotations

import os
import platform
from pathlib import Path

GIB, MB = 2**30, 1e6
# CPU flags that decide which kernels engines pick (bf16 on AMX or AVX512-BF16, else fp32).
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni")
PRECISION_NAMES = {"f32": "fp32", "fp32": "fp32", "bf16": "bf16", "f16": "fp16"}


def machine_info() -> dict:
    """CPU model and flags, cores, memory, OS and Python: what a reader needs to compare with their machine."""
    cpu = _cpuinfo()
    return {
        "cpu": cpu.get("model name", platform.processor() or "unknown"),
        "cpu_flags": [f for f in FLAGS if f in cpu.get("flags", "").split()],
        "cores": os.cpu_count(),
        "memory_gib": round(_meminfo_kib("MemTotal") / 2**20, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "load_average": os.getloadavg()[0],
    }


def _cpuinfo() -> dict:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    first = text.split("\n\n")[0]
    return dict((k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in first.splitlines()))


def _meminfo_kib(key: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def precision(result: dict) -> str:
    """What the UNet really computed in, and the stored weights when they differ (e.g. 'bf16, int8 weights')."""
    computed = PRECISION_NAMES.get(result.get("precision", "?"), result.get("precision", "?"))
    weights = result.get("weights", "fp32")
    return computed if weights == "fp32" else f"{computed}, {weights.replace('int8-weights', 'int8 weights')}"


def achieved(entry: dict, flops: dict) -> tuple[float, float]:
    """GFLOP/s of the guided UNet step, and its percentage of the matmul peak at the precision computed in."""
    result = entry["result"]
    # unet_step_flops counts a guided step (UNet batch 2); an engine running guidance off computes half of it.
    gflops = flops["unet_step_flops"] * result.get("unet_batch", 2) / 2 / result["step_s"] / 1e9
    peak = flops["matmul_peak_flops"]["bf16" if result.get("precision") == "bf16" else "fp32"]
    return gflops, 100 * gflops * 1e9 / peak


COLUMNS = ("engine", "precision", "export s", "import s", "cold start s", "warm start s", "s/step", "VAE decode s",
           "s/image",
           "peak RSS GiB", "install MB", "GFLOP/s", "% of peak", "PSNR dB")


def row(entry: dict, flops: dict, venvs: dict) -> list[str]:
    install = venvs.get(entry["venv"], {}).get("size_bytes")
    export = entry.get("export_s")
    cells = [entry["engine"]]
    if "error" in entry:
        reason = entry["error"].splitlines()[-1][:80].replace("|", "/")
        return cells + [f"failed: {reason}"] + [""] * (len(COLUMNS) - 2)
    r = entry["result"]
    gflops, percent = achieved(entry, flops)
    psnr = entry.get("psnr_vs_reference")
    return cells + [
        precision(r),
        "-" if export is None else f"{export:.0f}" + (" (cached)" if _cached(entry) else ""),
        f"{r['import_s']:.1f}",
        f"{r['cold_start_s']:.1f}",
        _warm(r),
        f"{r['step_s']:.3f}",
        f"{r['vae_decode_s']:.2f}",
        f"{r['image_s']:.1f}",
        f"{r['peak_rss_bytes'] / GIB:.2f}",
        "-" if install is None else f"{install / MB:.0f}",
        f"{gflops:.0f}",
        f"{percent:.0f}",
        "reference" if entry.get("reference") else _psnr(psnr),
    ]


def _warm(result: dict) -> str:
    """Warm-cache start seconds, with that (2-step) run's peak RSS when recorded."""
    if result.get("warm_start_s") is None:
        return "-"
    rss = result.get("warm_peak_rss_bytes")
    return f"{result['warm_start_s']:.1f}" + ("" if rss is None else f" ({rss / GIB:.2f} GiB)")


def _cached(entry: dict) -> bool:
    return any(r.get("cached") for r in entry["exports"].values())


def _psnr(value: dict | None) -> str:
    if value is None:
        return "-"
    return "identical" if value["psnr_db"] is None else f"{value['psnr_db']:.1f}"


def markdown(result: dict) -> str:
    """The table, with the settings and machine it came from above it and what the peak was below."""
    s, m, f = result["settings"], result["machine"], result["flops"]
    peak = f["matmul_peak_flops"]
    lines = [
        f"SD 1.5 architecture ({s['model']}), {s['size']}x{s['size']}, {s['steps']} steps, {s['sampler']}, "
        f"guidance {s['guidance_scale']} (UNet batch {s['unet_batch']}), seed {s['seed']}.",
        f"Machine: {m['cpu']}, {m['cores']} cores ({', '.join(m['cpu_flags'])}), {m['memory_gib']} GiB.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for entry in result["engines"]:
        lines.append("| " + " | ".join(row(entry, f, result.get("venvs", {}))) + " |")
    lines += [
        "",
        f"UNet: {f['unet_step_flops'] / 1e9:.0f} GFLOP per guided step; VAE decode {f['vae_decode_flops'] / 1e9:.0f} "
        f"GFLOP. Matmul peak on {f['matmul']['threads']} threads: fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 "
        f"{peak['bf16'] / 1e9:.0f} GFLOP/s ({f['matmul']['library']}). {result['note']}",
    ]
    return "\n".join(lines)
