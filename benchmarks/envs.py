"""The virtual environments the benchmark runs each tool in: what goes into each, how it is built, how big it is.

The comparison tools conflict with each other and with sdrt's own pins (optimum-onnx needs transformers<4.58,
optimum-intel pulls a torchvision that cannot load beside the CPU torch), so each gets its own venv under
benchmarks/.venvs/, never sdrt's dependencies. A venv is rebuilt when its spec changes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the sdrt checkout
VENVS = Path(__file__).resolve().parent / ".venvs"
SPEC_FILE = "benchmark-venv.json"
CONSTRAINTS = "constraints.txt"
# The only torch these machines can install without pulling a multi-GB CUDA build: installed first, then pinned
# by a constraint so no later package can replace it.
TORCH = "torch==2.13.0"


@dataclass(frozen=True)
class VenvSpec:
    """One environment: pip requirements installed after torch (if `torch`), and packages removed afterwards."""

    name: str
    requirements: tuple[str, ...]
    torch: bool = False
    remove: tuple[str, ...] = ()  # pulled in by a dependency but unusable here
    editable_sdrt: str = ""  # extras of the checkout installed in editable mode, e.g. "onnxruntime"
    path: Path | None = None  # None: benchmarks/.venvs/<name>; else an existing venv used as it is
    checkout_on_path: bool = False  # import sdrt from the checkout (PYTHONPATH) instead of an install

    @property
    def dir(self) -> Path:
        return self.path or VENVS / self.name

    @property
    def python(self) -> Path:
        return self.dir / "bin" / "python"


# Top-level pins are what pip resolved on 2026-11 with torch 2.13.0 held fixed; their dependencies are recorded
# per run (pip freeze), not pinned.
SPECS = {
    spec.name: spec
    for spec in (
        VenvSpec(
            "diffusers-torch", torch=True,
            requirements=("diffusers==0.42.1", "transformers==5.24.0", "accelerate==1.15.0", "safetensors==0.8.0"),
        ),
        VenvSpec(
            "optimum-onnx", torch=True,
            requirements=("optimum-onnx[onnxruntime]==0.1.0", "optimum==2.1.0", "onnxruntime==1.32.0",
                          "transformers==4.57.6", "diffusers==0.39.0"),
        ),
        VenvSpec(
            "optimum-intel", torch=True,
            requirements=("optimum-intel[openvino,diffusers]==2.2.0", "openvino==2026.4.1", "nncf==3.4.0",
                          "transformers==5.5.4", "diffusers==0.39.0"),
            # optimum-intel 2.2 requires torchvision; PyPI's build for torch 2.13 fails to import beside the CPU
            # torch ('operator torchvision::nms does not exist'), and diffusion pipelines never use it.
            remove=("torchvision",),
        ),
        # OpenVINO GenAI, the torch-free peer: its C++ Text2ImagePipeline on optimum-intel's export, whose tokenizer
        # openvino-tokenizers converts (its `transformers` extra reads the Hugging Face tokenizer files).
        VenvSpec(
            "openvino-genai",
            requirements=("openvino-genai==2026.4.1.0", "openvino-tokenizers[transformers]==2026.4.1.0",
                          "openvino==2026.4.1", "Pillow"),
        ),
        VenvSpec("sdrt-onnxruntime", requirements=("onnxruntime==1.32.0",), editable_sdrt="onnxruntime"),
        VenvSpec(
            "sdrt-openvino", requirements=("openvino==2026.4.1", "nncf==3.4.0"), editable_sdrt="openvino",
        ),
        # The development venv tools/setup-dev.sh builds: sdrt's export side (torch, diffusers, onnx), and the
        # harness's own helpers (the random model, FLOP counts, PSNR).
        VenvSpec("dev", requirements=(), path=ROOT / ".venv", checkout_on_path=True),
    )
}


def ensure(spec: VenvSpec, log) -> Path:
    """The venv's python, building the venv first if it is missing or was built from other requirements."""
    if spec.path is not None:
        if not spec.python.exists():
            log(f"{spec.name}: building the development venv with tools/setup-dev.sh")
            subprocess.run(["bash", str(ROOT / "tools" / "setup-dev.sh")], check=True)
        return spec.python
    wanted = _install_record(spec)
    marker = spec.dir / SPEC_FILE
    if marker.exists() and spec.python.exists():
        built = json.loads(marker.read_text())
        if all(built.get(k) == v for k, v in wanted.items()):
            return spec.python
    log(f"{spec.name}: building {spec.dir} (pip, a few minutes; log in {spec.dir}.log)")
    _build(spec)
    marker.write_text(json.dumps(wanted, indent=2))
    return spec.python


def _install_record(spec: VenvSpec) -> dict:
    """What decides a venv's contents (a change rebuilds it)."""
    record = {"requirements": list(spec.requirements), "torch": spec.torch, "remove": list(spec.remove),
              "editable_sdrt": spec.editable_sdrt}
    if spec.editable_sdrt:  # sdrt's own dependencies come from pyproject.toml: a change there (a new one) rebuilds
        record["pyproject_sha256"] = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    return record


def _build(spec: VenvSpec) -> None:
    if spec.dir.exists():
        shutil.rmtree(spec.dir)
    spec.dir.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(spec.dir)], check=True)
    constraints = spec.dir / CONSTRAINTS
    constraints.write_text(TORCH + "\n" if spec.torch else "")
    editable = ["-e", f"{ROOT}[{spec.editable_sdrt}]"] if spec.editable_sdrt else []
    with open(f"{spec.dir}.log", "w") as log:
        def pip(*args: str) -> None:
            cmd = [str(spec.python), "-m", "pip", *args, "--disable-pip-version-check"]
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=clean_env(spec)).returncode:
                raise RuntimeError(f"pip {args[0]} failed: {_pip_error(Path(f'{spec.dir}.log'))}")

        if spec.torch:
            pip("install", TORCH)
        pip("install", "-c", str(constraints), *spec.requirements, *editable)
        if spec.remove:
            pip("uninstall", "-y", *spec.remove)


def _pip_error(log: Path) -> str:
    """pip's own ERROR line from its log (the reason), else the log's last line."""
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    return (errors or lines or ["no output"])[0 if errors else -1] + f" (log: {log})"


def clean_env(spec: VenvSpec, **extra: str) -> dict[str, str]:
    """The environment a tool runs in: its venv first on PATH, nothing leaking in from the caller's venv, offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{spec.dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(spec.dir)
    if spec.checkout_on_path:
        env["PYTHONPATH"] = str(ROOT)
    # Everything is local: no hub downloads, no telemetry (this machine has no network beyond package registries).
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1",
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def installed(spec: VenvSpec) -> dict[str, str]:
    """Every distribution in the venv with its version (pip's view)."""
    out = subprocess.run([str(spec.python), "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=True, env=clean_env(spec))
    return {p["name"].lower(): p["version"] for p in json.loads(out.stdout)}


def size_bytes(spec: VenvSpec) -> int:
    """Disk use of the venv (interpreter links, site-packages, scripts) but for this harness's own records in it;
    plus the sdrt sources an editable install points at, which a regular install would copy in."""
    total = _du(spec.dir) - sum(file_bytes(spec.dir / name) for name in (SPEC_FILE, CONSTRAINTS))
    if spec.editable_sdrt:
        total += _du(ROOT / "sdrt")
    return total


def file_bytes(path: Path) -> int:
    """Disk use of one file, as du counts it (allocated blocks); 0 when it is not there."""
    return os.lstat(path).st_blocks * 512 if os.path.lexists(path) else 0


def _du(path: Path) -> int:
    seen, total = set(), 0
    for dirpath, _, files in os.walk(path):
        if "__pycache__" in dirpath and "site-packages" not in dirpath:
            continue  # sdrt's own bytecode caches: not part of what an install would ship
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total
