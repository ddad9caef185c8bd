"""Benchmark sdrt against the tools users would pick instead, on the full-size SD 1.5 architecture with random weights.

    python benchmarks/run.py                    # 512x512, 20 steps: the full comparison (hours on 2 cores)
    python benchmarks/run.py --quick            # 256x256, 4 steps (about 20 minutes on 2 cores once exported)
    python benchmarks/run.py --engines diffusers-torch sdrt-openvino --size 512 --steps 20
    python benchmarks/run.py --cpu-targets      # issue 8: optimum-intel vs sdrt on OpenVINO at 512x512, 20 steps,
                                                # plus install sizes, int8 quality and a per-op profile, judged
    python benchmarks/run.py --lcm-lora         # issue 19: sdrt + LCM-LoRA, 4 steps (bf16, int8) vs optimum-intel
                                                # and OpenVINO GenAI, 20 steps, at 512x512; judged

Each tool runs in its own venv (benchmarks/.venvs/, built on first use) and each engine in its own process, one
at a time, so peak memory is that engine's alone. The model and its exports are cached under benchmarks/.cache/sd15/
(one set for every size). Writes a JSON result and prints a Markdown table. Only the standard library here: numpy,
torch and the engines live in the venvs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import envs  # noqa: E402
import report  # noqa: E402
import targets  # noqa: E402
from engines import ENGINES, EXPORTS, LORA_FILE, SOURCE, Engine, export_chain  # noqa: E402

HERE = Path(__file__).resolve().parent
WORKERS = HERE / "workers"
CACHE = HERE / ".cache"
RESULTS = HERE / "results"
RESULT_PREFIX = "BENCHMARK-RESULT "  # workers/common.py prints it before its JSON

PROMPT = "a photograph of an astronaut riding a horse"
SEED = 0
GUIDANCE_SCALE = 7.5  # > 1: classifier-free guidance, so every UNet call runs batch 2
QUICK = {"size": 256, "steps": 4}
FULL = {"size": 512, "steps": 20}
TINY = {"size": 128, "steps": 3}  # --tiny: a toy model that exercises the harness, not a measurement
CPU_TARGET_ENGINES = (targets.PEER, "sdrt-openvino", targets.INT8)
LCM_LORA_ENGINES = (targets.PEER, "openvino-genai", *targets.LCM_LORA)
# Engines that run with a LoRA use its kind's steps: not in the default comparison, where every engine runs the same.
DEFAULT_ENGINES = tuple(name for name, engine in ENGINES.items() if not engine.lora)
RANDOM_WEIGHTS = (
    "Weights are random: compute cost does not depend on weight values (same architecture, shapes and ops), so "
    "time and memory are those of the real SD 1.5. Images are noise; PSNR only tells how closely engines agree."
)


@dataclass(frozen=True)
class Process:
    """A finished child process: exit code, wall time, its own peak resident memory, and its log."""

    returncode: int
    seconds: float
    peak_rss_bytes: int
    log: Path

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def last_json(self) -> dict:
        """The last line of the log that is a JSON object (what helpers print; warnings may surround it)."""
        return json.loads(next(ln for ln in reversed(self.log.read_text().splitlines()) if ln.startswith("{")))


def run_process(cmd: list[str], venv: str, log: Path, timeout: float) -> Process:
    """Run `cmd` in a venv's environment, output to `log`; peak RSS from wait4 (that child, not this process)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=envs.clean_env(envs.SPECS[venv]),
                                cwd=envs.ROOT, start_new_session=True)
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        while not pid:
            if time.perf_counter() - start > timeout:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: the tool's children go too
                out.write(f"\nbenchmark: killed after {timeout:.0f} s\n")
            time.sleep(0.1)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    return Process(proc.returncode, time.perf_counter() - start, usage.ru_maxrss * 1024, log)


def worker_result(p: Process) -> dict | None:
    """The JSON a worker printed after RESULT_PREFIX; None when it failed or printed none."""
    lines = [ln for ln in p.log.read_text(errors="replace").splitlines() if ln.startswith(RESULT_PREFIX)]
    return None if p.returncode or not lines else json.loads(lines[-1][len(RESULT_PREFIX):])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="sdrt vs diffusers / optimum on SD 1.5 (random weights)")
    parser.add_argument("--size", type=int, choices=[256, 512], help="image size (default 512; --quick 256)")
    parser.add_argument("--steps", type=int, help="denoising steps per image (default 20; --quick 4)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK['size']}x{QUICK['size']}, {QUICK['steps']} steps")
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), metavar="ENGINE",
                        help=f"default all: {' '.join(ENGINES)}")
    parser.add_argument("--cpu-targets", action="store_true",
                        help=f"issue 8: engines {' '.join(CPU_TARGET_ENGINES)} (unless --engines), then the runtime "
                             "install sizes, the int8 image quality on the shipped model and a per-op profile of "
                             "the int8 UNet; prints the targets table")
    parser.add_argument("--lcm-lora", action="store_true",
                        help=f"issue 19: engines {' '.join(LCM_LORA_ENGINES)} (unless --engines): sdrt with a random "
                             "LoRA of LCM-LoRA's layout runs LCM's 4 steps, the peers --steps; prints the target")
    parser.add_argument("--out", type=Path, help="JSON result (default benchmarks/results/sd15-SIZEpx-STEPSsteps.json)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds any one export or engine may take")
    parser.add_argument("--export-only", action="store_true", help="build the venvs and exports, measure nothing")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # harness smoke test
    args = parser.parse_args(argv)
    defaults = TINY if args.tiny else QUICK if args.quick else FULL
    args.engines = args.engines or list(CPU_TARGET_ENGINES if args.cpu_targets else LCM_LORA_ENGINES
                                        if args.lcm_lora else DEFAULT_ENGINES)
    args.size = args.size or defaults["size"]
    args.steps = args.steps or defaults["steps"]
    args.model_key = "tiny" if args.tiny else "sd15"  # exports do not depend on the size: one cache for all
    name = f"{'tiny' if args.tiny else 'sd15'}-{args.size}px-{args.steps}steps{'-lcm-lora' if args.lcm_lora else ''}.json"
    args.out = args.out or (CACHE if args.tiny else RESULTS) / name
    return args


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Bench:
    """One run: the model folder, its cached exports, and the engines measured on them."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.cache = CACHE / args.model_key
        self.logs = self.cache / "logs"
        self.venvs: dict[str, str | None] = {}  # venv name -> None when ready, else why it could not be built
        self.exports: dict[str, dict] = {}  # this run's export records, by name

    def venv(self, name: str) -> str | None:
        """Build the venv if needed (once per run); None when ready, else the reason it is not."""
        if name not in self.venvs:
            try:
                envs.ensure(envs.SPECS[name], log)
                self.venvs[name] = None
            except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
                log(f"{name}: venv FAILED: {e}")
                self.venvs[name] = str(e)
        return self.venvs[name]

    def helper(self, script: str, *cli: str) -> Process:
        """Run a helper script (model, FLOPs, PSNR) in the development venv."""
        if self.venv("dev"):
            raise SystemExit(f"benchmark: the development venv is needed: {self.venvs['dev']}")
        p = run_process(["python", str(WORKERS / script), *cli], "dev", self.logs / f"{script}.log", self.args.timeout)
        if p.returncode:
            raise SystemExit(f"benchmark: {script} failed (exit {p.returncode}):\n{p.tail()}")
        return p

    def source(self) -> Path:
        """The random SD 1.5 diffusers folder (written once)."""
        folder = self.cache / SOURCE
        if not folder.exists():
            log(f"writing the random {'tiny' if self.args.tiny else 'SD 1.5'} model to {folder}")
            self.helper("make_model.py", str(folder), *(["--tiny"] if self.args.tiny else []))
        return folder

    def flops(self) -> dict:
        log("counting FLOPs and measuring the matmul peak")
        return self.helper("flops.py", str(self.source()), str(self.args.size)).last_json()

    def export(self, name: str) -> dict:
        """The export's record; its folder is self.cache / name. Done once, then reused from disk by later runs."""
        if name not in self.exports:
            self.exports[name] = self._export(name)
        return self.exports[name]

    def _export(self, name: str) -> dict:
        record_path, out = self.cache / f"{name}.json", self.cache / name
        if out.exists() and record_path.exists():
            return {**json.loads(record_path.read_text()), "cached": True}
        spec = EXPORTS[name]
        if self.venv(spec.venv):
            return {"error": f"venv {spec.venv} could not be built: {self.venvs[spec.venv]}"}
        partial = self.cache / f"{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        places = {"out": str(partial), SOURCE: str(self.source()), **{n: str(self.cache / n) for n in spec.needs}}
        cmd = [places[arg[1:-1]] if arg.startswith("{") else arg for arg in spec.command]
        log(f"export {name}: {' '.join(cmd)}")
        p = run_process(cmd, spec.venv, self.logs / f"export-{name}.log", self.args.timeout)
        shown = [str(out) if arg == str(partial) else arg for arg in cmd]  # it is renamed to `out` on success
        record = {"seconds": p.seconds, "peak_rss_bytes": p.peak_rss_bytes, "command": shown, "venv": spec.venv,
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        if p.returncode:
            shutil.rmtree(partial, ignore_errors=True)
            return {**record, "error": f"exit {p.returncode}: {p.tail()}".strip()}
        partial.rename(out)
        record_path.write_text(json.dumps(record, indent=2))
        return {**record, "cached": False}

    def prepare(self, name: str) -> dict:
        """The engine's entry with the exports it needs done (or the first failure recorded)."""
        engine = ENGINES[name]
        entry = {"engine": name, "venv": engine.venv, "options": engine.options, "reference": engine.reference,
                 "exports": {}}
        for export in [*export_chain(engine.model), *([engine.lora] if engine.lora else [])]:
            entry["exports"][export] = record = self.export(export)
            if "error" in record:
                return {**entry, "error": f"export {export} failed: {record['error']}"}
        entry["export_s"] = sum(r["seconds"] for r in entry["exports"].values()) if entry["exports"] else None
        if self.venv(engine.venv):
            return {**entry, "error": f"venv {engine.venv} could not be built: {self.venvs[engine.venv]}"}
        return entry

    def measure(self, entry: dict) -> dict:
        """Run the engine's worker once; its failure is recorded, not raised."""
        engine = ENGINES[entry["engine"]]
        image = self.cache / "images" / f"{engine.name}-{self.args.size}px-{self.args.steps}steps.png"
        image.unlink(missing_ok=True)
        job = {"model": str(self.source() if engine.model == SOURCE else self.cache / engine.model),
               "size": self.args.size, "steps": self.args.steps, "seed": SEED, "prompt": PROMPT,
               "negative_prompt": "", "guidance_scale": GUIDANCE_SCALE, "image": str(image),
               "options": {**engine.options, **({"lora": str(self.cache / engine.lora / LORA_FILE)} if engine.lora
                                                else {})}}
        entry["load_average_before"] = os.getloadavg()[0]
        log(f"engine {engine.name}: measuring ({self.args.size}x{self.args.size}, {self.args.steps} steps; "
            f"load average {entry['load_average_before']:.1f})")
        p = run_process(["python", str(WORKERS / engine.worker), json.dumps(job)], engine.venv,
                        self.logs / f"engine-{engine.name}.log", self.args.timeout)
        entry["process"] = {"seconds": p.seconds, "peak_rss_bytes": p.peak_rss_bytes, "returncode": p.returncode}
        result = worker_result(p)
        if result is None:
            log(f"engine {engine.name}: FAILED (exit {p.returncode}, log {p.log})")
            return {**entry, "error": f"exit {p.returncode}: {p.tail()}".strip()}
        log(f"engine {engine.name}: {result['step_s']:.3f} s/step, {result['image_s']:.1f} s/image")
        if engine.options.get("backend") == "openvino":
            result.update(self.warm_start(engine, job))
        return {**entry, "result": result, "image": str(image)}

    def warm_start(self, engine: Engine, job: dict) -> dict:
        """Process start -> first step done with sdrt's compiled-model cache warm, and that process's peak RSS:
        one run fills a fresh cache, a second is timed (two steps each: the worker times steps after the first)."""
        cache = self.cache / "ov-cache" / engine.name
        shutil.rmtree(cache, ignore_errors=True)
        job = {**job, "steps": 2, "image": str(cache / "image.png"), "options": {**engine.options,
                                                                                 "cache_dir": str(cache)}}
        for attempt in ("fill", "warm"):
            p = run_process(["python", str(WORKERS / engine.worker), json.dumps(job)], engine.venv,
                            self.logs / f"engine-{engine.name}-cache-{attempt}.log", self.args.timeout)
            result = worker_result(p)
            if result is None:
                log(f"engine {engine.name}: warm-cache start FAILED (log {p.log})")
                return {}
        seconds = result["import_s"] + result["cold_start_s"]
        log(f"engine {engine.name}: {seconds:.1f} s to the first step, warm cache")
        return {"warm_start_s": seconds, "warm_peak_rss_bytes": p.peak_rss_bytes}

    def psnr(self, entries: list[dict]) -> None:
        """PSNR of each engine's image against the reference engine's (same prompt, seed, steps, sampler)."""
        reference = next((e for e in entries if ENGINES[e["engine"]].reference and "image" in e), None)
        others = [e for e in entries if "image" in e and e is not reference]
        if reference is None or not others:
            return
        values = self.helper("psnr.py", reference["image"], *(e["image"] for e in others)).last_json()
        for e in others:
            e["psnr_vs_reference"] = {**values[e["image"]], "reference": reference["engine"]}

    def cpu_target_extras(self, result: dict) -> None:
        """What issue 8 judges besides the engines' table: install sizes, int8 quality on the shipped (trained)
        model, the int8 UNet's per-op profile at this size; then the targets, judged."""
        out = self.cache / "cpu-targets"
        shutil.rmtree(out, ignore_errors=True)  # nothing from an earlier run may be taken for this one's
        parts = {
            "install": ("install_size.py", "dev", "--paths", "openvino", "--out", str(out / "install-size.json")),
            "quant_quality": ("quant_quality.py", "sdrt-openvino", "--out", str(out / "quant-quality.json")),
            "profile": ("profile_openvino.py", "sdrt-openvino", str(self.cache / targets.INT8), "--size",
                        str(self.args.size), "--steps", "3", "--out", str(out / "profile")),
        }
        for key, (script, venv, *cli) in parts.items():
            log(f"{key}: {script} {' '.join(cli)}")
            if self.venv(venv):
                continue
            p = run_process(["python", str(HERE / script), *cli], venv, self.logs / f"{script}.log", self.args.timeout)
            written = sorted(Path(cli[-1]).glob("*.json")) if key == "profile" else [Path(cli[-1])]
            if p.returncode or not written:
                log(f"{key}: FAILED (exit {p.returncode}, log {p.log})")
                continue
            result[key] = json.loads(written[-1].read_text())
        result["targets"] = targets.evaluate(result)

    def venvs_record(self) -> dict:
        """Size and package versions of each venv used; the error of each that could not be built."""
        return {name: {"error": error} if error else
                {"size_bytes": envs.size_bytes(envs.SPECS[name]), "packages": envs.installed(envs.SPECS[name])}
                for name, error in sorted(self.venvs.items())}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    bench = Bench(args)
    result = {"note": RANDOM_WEIGHTS, "machine": report.machine_info(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "settings": {"model": args.model_key, "size": args.size, "steps": args.steps, "seed": SEED,
                           "prompt": PROMPT, "guidance_scale": GUIDANCE_SCALE, "unet_batch": 2,
                           "sampler": "PNDM (SD 1.5's scheduler config)"}}
    for name in args.engines:  # build every venv first: a pip failure should not come after an hour of measuring
        for export in [*export_chain(ENGINES[name].model), *([ENGINES[name].lora] if ENGINES[name].lora else [])]:
            bench.venv(EXPORTS[export].venv)
        bench.venv(ENGINES[name].venv)
    # Exports first, then the measurements back to back, so the engines compared run under similar conditions.
    entries = [bench.prepare(name) for name in args.engines]
    if args.export_only:
        for entry in entries:
            log(f"{entry['engine']}: " + (f"FAILED: {entry['error']}" if "error" in entry else "ready"))
        return 0
    result["flops"] = bench.flops()
    result["engines"] = [entry if "error" in entry else bench.measure(entry) for entry in entries]
    bench.psnr(result["engines"])
    if args.cpu_targets:
        bench.cpu_target_extras(result)
    if args.lcm_lora:
        result["lcm_lora_targets"] = targets.lcm_lora(result)
    result["venvs"] = bench.venvs_record()
    result["wall_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(report.markdown(result))
    if args.cpu_targets:
        print("\n" + targets.markdown(result["targets"]))
    if args.lcm_lora:
        print("\n" + targets.markdown(result["lcm_lora_targets"], "#19 target"))
    log(f"wrote {args.out} ({result['wall_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
