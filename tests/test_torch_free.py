"""The runtime never imports torch, diffusers or transformers: generation runs with those imports blocked."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from PIL import Image

BLOCKED = ("torch", "diffusers", "transformers", "optimum", "open_clip")

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
               "--steps", "3", "--seed", "7", "-q", "--sampler", "Euler a"])
    import importlib.util
    if importlib.util.find_spec("fastapi"):  # `sdrt serve` too, where its extra is installed
        import sdrt.server.app, sdrt.server.local  # noqa: E401
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print("LEAKED", leaked)
    sys.exit(rc)
    """
)


def test_generate_runs_with_torch_blocked(tiny_sd1_bundle, tmp_path):
    out = tmp_path / "torch-free.png"
    script = SCRIPT.format(blocked=BLOCKED, bundle=str(tiny_sd1_bundle), out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "LEAKED []" in proc.stdout
    with Image.open(out) as img:
        assert img.format == "PNG"
        assert "Seed: 7" in img.info["parameters"]
