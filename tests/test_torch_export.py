"""`sdrt export --target torch`: torch.export programs with the ONNX bundle's contracts and shape ranges, checked
against torch; and the errors a user without torch gets."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import zipfile
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from sdrt.bundle import ShapeRange, read_manifest, verify_files  # noqa: E402
from sdrt.cli import main  # noqa: E402
from sdrt.errors import ExportError  # noqa: E402
from sdrt.export.components import CHECK_SHAPES, component_specs  # noqa: E402
from sdrt.export.source import load_source  # noqa: E402
from sdrt.export.torch_export import export_program  # noqa: E402

RANGE = ShapeRange()  # what ONNX bundles declare: sizes 64..2048 px, 16 images (a guided UNet batch of 32)
LATENT = (RANGE.min_size // 8, RANGE.max_size // 8)
GUIDED_BATCH = (1, 2 * RANGE.max_batch)
UNBOUNDED = (1, None)
# Expected range of each named axis, per component (the text encoder's batch counts prompt chunks: no bound).
AXIS_RANGES = {
    "text_encoder": {"batch": UNBOUNDED},
    "unet": {"batch": GUIDED_BATCH, "latent_height": LATENT, "latent_width": LATENT, "sequence": UNBOUNDED},
    "vae_decoder": {"batch": GUIDED_BATCH, "latent_height": LATENT, "latent_width": LATENT},
    "vae_encoder": {"batch": GUIDED_BATCH, "height": (RANGE.min_size, RANGE.max_size),
                    "width": (RANGE.min_size, RANGE.max_size)},
}


def program_axes(path, inputs: list[str]) -> dict[str, list]:
    """Input name -> per axis: its fixed size, or the (min, max) range of its symbol, read from the program's JSON
    (no torch.export.load: that deserializes the whole graph)."""
    with zipfile.ZipFile(path) as archive:
        program = json.loads(archive.read(next(n for n in archive.namelist() if n.endswith("models/model.json"))))
    ranges = program["range_constraints"]
    tensors = program["graph_module"]["graph"]["tensor_values"]
    return {name: [_axis(size, ranges) for size in tensors[name]["sizes"]] for name in inputs}


def _axis(size: dict, ranges: dict):
    if "as_int" in size:
        return size["as_int"]
    expr = size["as_expr"]["expr_str"]
    symbol = re.search(r"Symbol\('(\w+)'", expr).group(1)
    factor = int(re.match(r"Mul\(Integer\((\d+)\)", expr).group(1)) if expr.startswith("Mul") else 1
    low, high = ranges[symbol]["min_val"], ranges[symbol]["max_val"]
    return (factor * low, None if high is None else factor * high)


def test_programs_carry_the_contracts_and_the_onnx_ranges(tiny_torch_bundle, tiny_sd1_bundle):
    manifest, onnx = read_manifest(tiny_torch_bundle), read_manifest(tiny_sd1_bundle)
    verify_files(tiny_torch_bundle, manifest)
    assert manifest.shapes == onnx.shapes == RANGE
    for name, component in manifest.components.items():
        assert (component.format, component.file) == ("torch", f"{name}/model.pt2")
        assert component.contract == onnx.components[name].contract
        assert component.validation["max_abs_error"] <= component.validation["tolerance"]
        assert len(component.validation["shapes"]) == len(CHECK_SHAPES)
        axes = program_axes(tiny_torch_bundle / component.file, component.contract.input_names)
        for spec in component.contract.inputs:
            expected = [AXIS_RANGES[name][d] if isinstance(d, str) else d for d in spec.shape]
            assert axes[spec.name] == expected, (name, spec.name)


def test_options_of_other_targets_are_refused(tiny_sd1_dir, tmp_path, capsys):
    # (the CLI's success is the `tiny_torch_bundle` fixture: `sdrt export --target torch`)
    assert main(["export", str(tiny_sd1_dir), "-o", str(tmp_path / "c"), "--target", "torch", "--opset", "18"]) == 2
    assert "--opset applies to --target onnx, not torch" in capsys.readouterr().err


def test_a_program_that_differs_from_torch_is_refused(tiny_sd1_dir, tmp_path):
    spec = component_specs(load_source(tiny_sd1_dir))[0]
    strict = replace(spec, tolerance=-1.0)  # nothing can be within it
    with pytest.raises(ExportError, match=r"text_encoder: the exported torch.export program differs from torch by"):
        export_program(strict, tmp_path, vae_scale_factor=8)


# A fresh interpreter where importing torch fails, as on an install without sdrt[torch].
WITHOUT_TORCH = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "torch":
                raise ImportError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, Block())
    from sdrt.cli import main
    sys.exit(main({argv!r}))
    """
)


def without_torch(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_TORCH.format(argv=argv)], capture_output=True, text=True,
                          timeout=120)


def test_clear_errors_without_torch(tiny_torch_bundle, tiny_sd1_bundle, tiny_sd1_dir, tmp_path):
    torch_bundle = without_torch(["generate", "x", "--bundle", str(tiny_torch_bundle), "-o", str(tmp_path / "a.png")])
    assert torch_bundle.returncode == 2
    assert "no inference engine for torch is installed: pip install 'sdrt[torch]'" in torch_bundle.stderr
    chosen = without_torch(["generate", "x", "--bundle", str(tiny_sd1_bundle), "--backend", "torch",
                            "-o", str(tmp_path / "b.png")])
    assert chosen.returncode == 2
    assert "backend 'torch' needs the torch package: pip install 'sdrt[torch]'" in chosen.stderr
    export = without_torch(["export", str(tiny_sd1_dir), "-o", str(tmp_path / "t"), "--target", "torch"])
    assert export.returncode == 2
    assert "--target torch needs torch: pip install 'sdrt[export]'" in export.stderr
