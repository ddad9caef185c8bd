"""The CLI's contract with users: one-line errors with exit code 2, `info` verification, PNG metadata."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdrt.cli import main

# A1111's infotext parser (modules/infotext_utils.py: re_param), used by the usual PNG-info readers.
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """prompt, negative prompt, and the key/value line, as A1111's parse_generation_parameters reads them."""
    *lines, last = text.strip().split("\n")
    prompt, negative = [], []
    for line in lines:
        if line.startswith("Negative prompt:"):
            negative.append(line[len("Negative prompt:"):].strip())
        else:
            (negative if negative else prompt).append(line)
    return "\n".join(prompt), "\n".join(negative), {k: v.strip('"') for k, v in RE_PARAM.findall(last)}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdrt", *args], capture_output=True, text=True, timeout=300)


def test_generate_writes_png_with_a1111_parameters(tiny_sd1_bundle, tmp_path, capsys):
    out = tmp_path / "img.png"
    rc = main(["generate", "a red circle, big", "-b", str(tiny_sd1_bundle), "-o", str(out), "--steps", "3",
               "--seed", "42", "-n", "ugly", "--sampler", "DPM++ 2M Karras", "--cfg-scale", "6.5", "-q",
               "-W", "64", "-H", "72"])
    assert rc == 0
    with Image.open(out) as img:
        assert img.size == (64, 72)
        prompt, negative, params = parse_parameters(img.info["parameters"])
    assert prompt == "a red circle, big"
    assert negative == "ugly"
    assert params["Steps"] == "3"
    assert (params["Sampler"], params["Schedule type"]) == ("DPM++ 2M", "Karras")  # as A1111 1.9+ writes them
    assert params["CFG scale"] == "6.5"
    assert params["Seed"] == "42"
    assert params["Size"] == "64x72"
    assert params["RNG"] == "CPU"  # A1111 reads this back as its CPU random source
    assert re.fullmatch(r"[0-9a-f]{10}", params["Model hash"])
    assert f"{out} (seed 42)" in capsys.readouterr().out


def test_batch_writes_numbered_files_with_their_seeds(tiny_sd1_bundle, tmp_path):
    out = tmp_path / "b.png"
    assert main(["generate", "x", "-b", str(tiny_sd1_bundle), "-o", str(out), "--steps", "2", "--seed", "9",
                 "--batch-size", "2", "-q"]) == 0
    seeds = [parse_parameters(Image.open(tmp_path / f"b-{i}.png").info["parameters"])[2]["Seed"] for i in (0, 1)]
    assert seeds == ["9", "10"]


def test_gpu_seed_mode_changes_the_noise_and_the_metadata(tiny_sd1_bundle, tmp_path):
    common = ["generate", "x", "-b", str(tiny_sd1_bundle), "--steps", "2", "--seed", "3", "-q"]
    assert main([*common, "-o", str(tmp_path / "cpu.png")]) == 0
    assert main([*common, "-o", str(tmp_path / "gpu.png"), "--seed-mode", "gpu"]) == 0
    cpu, gpu = Image.open(tmp_path / "cpu.png"), Image.open(tmp_path / "gpu.png")
    assert "RNG" not in parse_parameters(gpu.info["parameters"])[2]
    assert np.abs(np.asarray(cpu, float) - np.asarray(gpu, float)).max() > 10


def test_info_verifies_checksums(tiny_sd1_bundle, capsys):
    assert main(["info", str(tiny_sd1_bundle)]) == 0
    out = capsys.readouterr().out
    assert "checksums: OK" in out
    assert "unet" in out and "model_output" in out


@pytest.fixture
def tampered_bundle(tiny_sd1_bundle, tmp_path):
    copy = tmp_path / "tampered"
    shutil.copytree(tiny_sd1_bundle, copy)
    with open(copy / "tokenizer" / "merges.txt", "a") as f:
        f.write("x y\n")
    return copy


BAD_INPUTS = {
    "width not a multiple of 8": (["-W", "65"], "width must be a multiple of 8"),
    "height too small": (["-H", "8"], "height must be a multiple of 8"),
    "unknown sampler": (["--sampler", "Nope"], "Euler a"),
    "zero steps": (["--steps", "0"], "steps must be"),
    "negative guidance": (["--cfg-scale", "-1"], "guidance scale"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_request_is_one_line_exit_2(tiny_sd1_bundle, tmp_path, capsys, case):
    args, message = BAD_INPUTS[case]
    rc = main(["generate", "x", "-b", str(tiny_sd1_bundle), "-o", str(tmp_path / "o.png"), "-q", *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("sdrt: error:") and err.count("\n") == 1
    assert message in err
    assert not (tmp_path / "o.png").exists()


def test_tampered_bundle_names_the_file(tampered_bundle, tmp_path):
    proc = run_cli("generate", "x", "-b", str(tampered_bundle), "-o", str(tmp_path / "o.png"))
    assert proc.returncode == 2
    assert "checksum mismatch for tokenizer/merges.txt" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert run_cli("info", str(tampered_bundle)).returncode == 2


def test_missing_bundle_and_unwritable_output(tiny_sd1_bundle, tmp_path):
    proc = run_cli("generate", "x", "-b", str(tmp_path / "nope"), "-o", str(tmp_path / "o.png"))
    assert proc.returncode == 2 and "bundle not found" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("generate", "x", "-b", str(tiny_sd1_bundle), "-o", str(tmp_path / "no" / "dir" / "o.png"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
