"""Install size of sdrt's runtime against the bare floor of its engine, both measured in one run (issue #8).

    python benchmarks/install_size.py                      # the openvino and onnxruntime paths
    python benchmarks/install_size.py --paths openvino

Per path, two fresh venvs under benchmarks/.venvs/: `pip install '<checkout>[EXTRA]'`, a regular (not editable)
install from a clean copy of the checkout's files, so the shipped demo model counts as it does for users; and the
floor, the engine with numpy, Pillow and tokenizers at the versions sdrt's install resolved. Both include pip.
Prints a Markdown table and what sdrt adds over the floor; writes benchmarks/results/install-size.json.
Standard library only.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from email.parser import HeaderParser
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import envs  # noqa: E402
import report  # noqa: E402

RESULT = Path(__file__).resolve().parent / "results" / "install-size.json"
TARGET_PCT = 5.0  # issue #8: the runtime install within 5 % of the bare floor
# Extra of sdrt -> the floor's packages (the engine, and the runtime dependencies every sdrt install needs).
FLOORS = {
    "openvino": ("openvino", "numpy", "Pillow", "tokenizers"),
    "onnxruntime": ("onnxruntime", "numpy", "Pillow", "tokenizers"),
}
MODELS = "sdrt/models/"  # the demo model inside the sdrt package


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def clean_copy(dest: Path) -> Path:
    """The checkout's tracked and unignored files copied to `dest`: what a clone holds, without build/ or venvs."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=envs.ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, listed):
        src = envs.ROOT / rel
        if src.is_file():  # a tracked file deleted in the work tree is listed too
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def fresh(spec: envs.VenvSpec) -> envs.VenvSpec:
    """Build `spec`'s venv from nothing, whatever was there."""
    shutil.rmtree(spec.dir, ignore_errors=True)
    envs.ensure(spec, log)
    return spec


def distributions(spec: envs.VenvSpec) -> dict[str, dict]:
    """Each installed distribution's version and disk use (the files its RECORD lists, bytecode included)."""
    found = {}
    for record in spec.dir.glob("lib/python*/site-packages/*.dist-info/RECORD"):
        meta = HeaderParser().parsestr((record.parent / "METADATA").read_text(errors="replace"))
        site = record.parent.parent
        rows = [row[0] for row in csv.reader(record.read_text().splitlines()) if row]
        sizes = {rel: envs.file_bytes((site / rel).resolve()) for rel in rows}
        found[normalize(meta["Name"])] = {
            "version": meta["Version"], "bytes": sum(sizes.values()),
            "model_bytes": sum(b for rel, b in sizes.items() if rel.startswith(MODELS)),
        }
    return found


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them (huggingface_hub and huggingface-hub are one)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def measure_path(extra: str, checkout: Path) -> dict:
    """The sdrt[extra] venv and its floor, built fresh; their sizes, and what sdrt adds package by package."""
    sdrt = fresh(envs.VenvSpec(f"install-sdrt-{extra}", requirements=(f"{checkout}[{extra}]",)))
    resolved = distributions(sdrt)
    pins = tuple(f"{name}=={resolved[normalize(name)]['version']}" for name in FLOORS[extra])
    floor = fresh(envs.VenvSpec(f"install-floor-{extra}", requirements=pins))
    floor_dists = distributions(floor)
    added = {name: d for name, d in resolved.items() if floor_dists.get(name, {}).get("version") != d["version"]}
    missing = sorted(set(floor_dists) - set(resolved))  # in the floor but not in sdrt's venv: should be none
    sizes = {"floor": envs.size_bytes(floor), "sdrt": envs.size_bytes(sdrt)}
    over = sizes["sdrt"] - sizes["floor"]
    return {
        "floor": {"pip install": list(pins), "size_bytes": sizes["floor"], "packages": floor_dists},
        "sdrt": {"pip install": f"<checkout>[{extra}]", "size_bytes": sizes["sdrt"], "packages": resolved},
        "added": added, "only_in_floor": missing,
        "over_floor_bytes": over, "over_floor_pct": 100 * over / sizes["floor"],
        "target_pct": TARGET_PCT, "met": 100 * over / sizes["floor"] <= TARGET_PCT,
    }


def markdown(paths: dict[str, dict]) -> str:
    """The table of sizes against the target, then each path's additions over its floor."""
    mb = report.MB
    lines = ["| install | floor MB | sdrt MB | sdrt over floor | target |", "|---|---|---|---|---|"]
    for extra, p in paths.items():
        verdict = "met" if p["met"] else "missed"
        lines.append(f"| `sdrt[{extra}]` vs {' '.join(FLOORS[extra])} | {p['floor']['size_bytes'] / mb:.1f} | "
                     f"{p['sdrt']['size_bytes'] / mb:.1f} | +{p['over_floor_bytes'] / mb:.1f} MB, "
                     f"+{p['over_floor_pct']:.2f} % | <= {p['target_pct']:g} %: {verdict} |")
    for extra, p in paths.items():
        parts = []
        for name, d in sorted(p["added"].items(), key=lambda kv: -kv[1]["bytes"]):
            split = (f" (code {(d['bytes'] - d['model_bytes']) / mb:.2f}, demo model {d['model_bytes'] / mb:.2f})"
                     if d["model_bytes"] else "")
            parts.append(f"{name} {d['version']} {d['bytes'] / mb:.2f} MB{split}")
        rest = p["over_floor_bytes"] - sum(d["bytes"] for d in p["added"].values())
        lines.append(f"\n`sdrt[{extra}]` adds: {'; '.join(parts)}; elsewhere in the venv: {rest / mb:+.2f} MB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="sdrt's runtime install size against its engine's bare floor")
    parser.add_argument("--paths", nargs="+", choices=list(FLOORS), default=list(FLOORS), metavar="EXTRA",
                        help=f"sdrt extras to measure (default all: {' '.join(FLOORS)})")
    parser.add_argument("--out", type=Path, default=RESULT, help=f"JSON result (default {RESULT})")
    args = parser.parse_args(argv)
    result = {"machine": report.machine_info(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "units": "bytes on disk (allocated blocks, as du counts), pip included", "paths": {}}
    with tempfile.TemporaryDirectory(prefix="sdrt-checkout-") as tmp:
        checkout = clean_copy(Path(tmp))
        for extra in args.paths:
            log(f"{extra}: building sdrt[{extra}] and its floor (pip, a few minutes)")
            result["paths"][extra] = measure_path(extra, checkout)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(markdown(result["paths"]))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
