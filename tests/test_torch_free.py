"""The runtime never imports torch, diffusers, transformers or onnx: generation runs with those imports blocked."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from PIL import Image

# onnx too: the runtime finds an ONNX file's external data with its own reader (sdrt.onnx_refs).
BLOCKED = ("torch", "diffusers", "transformers", "optimum", "open_clip", "onnx")

# Runs in a fresh interpreter: an import hook makes every blocked import fail, then the CLI generates.
SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = {blocked!r}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    from sdrt.cli import main
    rc = main(["generate", "a red circle", "--bundle", {bundle!r}, "-o", {out!r},
               "--steps", "3", "--seed", "7", "-q", "--sampler", "Euler a", *{extra!r}])
    import importlib.util
    if importlib.util.find_spec("fastapi"):  # `sdrt serve` too, where its extra is installed
        import sdrt.server.app, sdrt.server.local  # noqa: E401
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print("LEAKED", leaked)
    sys.exit(rc)
    """
)


def test_generate_runs_with_torch_blocked(tiny_sd1_bundle, tmp_path):
    _generate_torch_free(tiny_sd1_bundle, tmp_path, [])


def test_loras_apply_with_torch_blocked(tiny_sd1_bundle, tiny_loras, tmp_path):
    """LoRA files, .pt ones included (read by sdrt's own unpickler), need no torch either."""
    extra = ["--lora", f"{tiny_loras['kohya']}:0.5", "--lora", f"{tiny_loras['kohya_pt']}:0.2"]
    with Image.open(_generate_torch_free(tiny_sd1_bundle, tmp_path, extra)) as img:
        assert "Lora hashes" in img.info["parameters"]


def _generate_torch_free(bundle, tmp_path, extra: list[str]):
    out = tmp_path / "torch-free.png"
    script = SCRIPT.format(blocked=BLOCKED, bundle=str(bundle), out=str(out), extra=extra)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "LEAKED []" in proc.stdout
    with Image.open(out) as img:
        assert img.format == "PNG"
        assert "Seed: 7" in img.info["parameters"]
    return out
