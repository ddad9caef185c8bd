"""`sdrt serve` under load: requests per minute and p50/p95 latency with 1, 4 and 16 concurrent clients.

Starts the real server (`python -m sdrt serve`, its queue as deep as the most clients, so every request waits
its turn instead of getting a 503), warms it with one request, then for each client count sends a fixed number
of txt2img requests (distinct seeds) from that many threads, each thread sending its next request when the last
one is answered. Latency is what a client sees: queueing included. Every answer's seed is checked.

    python benchmarks/serve_load.py                                    # the shipped model, 64x64, 4 steps
    python benchmarks/serve_load.py --full-size --size 512 --steps 4   # SD 1.5 architecture, random weights

--full-size builds SD 1.5's architecture with random weights (compute does not depend on the weights) and
exports it once under benchmarks/.cache/few-step/ (benchmarks/few_step.py; needs the dev venv's torch).
Writes benchmarks/results/serve-MODEL-SIZEpx-STEPSsteps.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from few_step import full_size_bundle, machine  # the same SD 1.5 export and machine record as the other scripts

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LOGS = HERE / ".cache" / "logs"  # git-ignored
ROOT = HERE.parent
PROMPT = "a red circle on a blue background"
START_TIMEOUT_S = 600  # a full-size bundle is verified (sha256 of 4 GB) and loaded before the port opens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="bundle to serve (default: the shipped model)")
    parser.add_argument("--full-size", action="store_true", help="SD 1.5's architecture, random weights")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sampler", default="Euler")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, help="requests per client count (default: max(8, 2 x clients))")
    parser.add_argument("--backend", help="engine (default: sdrt's choice)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    bundle = full_size_bundle() if args.full_size else args.bundle
    model = "sd15-random" if args.full_size else (bundle.name if bundle else "shipped")
    with Server(bundle, max(args.clients), args.backend) as url:
        send(url, args, seed=0)  # warm-up: first-use allocations, shape preparation
        runs = [measure(url, args, clients) for clients in args.clients]
    record = {"model": model, "size": args.size, "steps": args.steps, "sampler": args.sampler,
              "backend": args.backend or "default", "machine": machine(), "runs": runs}
    out = args.json or RESULTS / f"serve-{model}-{args.size}px-{args.steps}steps.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(table(record))
    print(f"\nwritten {out}")
    return 0


class Server:
    """`python -m sdrt serve` on a free loopback port, stopped on exit; its log: benchmarks/.cache/logs/."""

    def __init__(self, bundle: Path | None, queue: int, backend: str | None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.argv = [sys.executable, "-m", "sdrt", "serve", "--port", str(self.port), "--queue-size", str(queue),
                     *(["-b", str(bundle)] if bundle else []), *(["--backend", backend] if backend else [])]

    def __enter__(self) -> str:
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log = open(LOGS / "serve-load.log", "w")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    return url
            except httpx.TransportError:
                time.sleep(0.2)
        self.__exit__()
        raise SystemExit(f"the server did not start: see {self.log.name}")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def send(url: str, args, seed: int) -> tuple[float, int]:
    """(seconds, HTTP status) of one txt2img request; a 200's seed is checked."""
    body = {"prompt": PROMPT, "seed": seed, "steps": args.steps, "sampler_name": args.sampler, "width": args.size,
            "height": args.size, "cfg_scale": 7}
    start = time.perf_counter()
    response = httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=None)
    seconds = time.perf_counter() - start
    if response.status_code == 200 and json.loads(response.json()["info"])["all_seeds"] != [seed]:
        raise SystemExit(f"request for seed {seed} answered with another image")
    return seconds, response.status_code


def measure(url: str, args, clients: int) -> dict:
    """`clients` threads sharing a fixed list of requests."""
    total = args.requests or max(8, 2 * clients)
    seeds, lock, results = iter(range(1000 * clients, 1000 * clients + total)), threading.Lock(), []

    def client() -> None:
        while True:
            with lock:
                seed = next(seeds, None)
            if seed is None:
                return
            results.append(send(url, args, seed))

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = sorted(s for s, status in results if status == 200)
    return {"clients": clients, "requests": total, "ok": len(ok), "failed": total - len(ok), "wall_s": wall,
            "requests_per_minute": 60 * len(ok) / wall, "p50_s": statistics.median(ok) if ok else None,
            "p95_s": ok[min(len(ok) - 1, round(0.95 * (len(ok) - 1)))] if ok else None}


def table(record: dict) -> str:
    lines = [f"{record['model']}, {record['size']}x{record['size']}, {record['steps']} steps {record['sampler']}, "
             f"load average {record['machine']['load_average_1min']:.1f} on {record['machine']['cores']} cores", "",
             "| clients | requests | failed | requests/min | p50 latency s | p95 latency s |",
             "|---|---|---|---|---|---|"]
    for r in record["runs"]:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['failed']} | {r['requests_per_minute']:.1f} "
                     f"| {r['p50_s']:.2f} | {r['p95_s']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
