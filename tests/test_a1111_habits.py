"""What users coming from the AUTOMATIC1111 web UI type: seed -1, init images of any size (its resize modes),
batch count, prompts files, numbered output folders, JPEG/WebP with their parameters, options anywhere, and a
progress line a log file can hold."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdrt.cli import build_parser, main
from sdrt.runtime.outputs import OutputFolder, read_parameters, write_image
from sdrt.runtime.resize import RESIZE_MODES, resize

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--steps", "2", "--sampler", "Euler", "-q"]


def a1111_resize_image(resize_mode: int, im: Image.Image, width: int, height: int) -> Image.Image:
    """AUTOMATIC1111 modules/images.py resize_image (no upscaler: Lanczos), transcribed as the reference."""
    def resize_(im, w, h):
        return im.resize((w, h), resample=Image.LANCZOS)

    if resize_mode == 0:
        return resize_(im, width, height)
    ratio, src_ratio = width / height, im.width / im.height
    if resize_mode == 1:
        src_w = width if ratio > src_ratio else im.width * height // im.height
        src_h = height if ratio <= src_ratio else im.height * width // im.width
        resized = resize_(im, src_w, src_h)
        res = Image.new("RGB", (width, height))
        res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        return res
    src_w = width if ratio < src_ratio else im.width * height // im.height
    src_h = height if ratio >= src_ratio else im.height * width // im.width
    resized = resize_(im, src_w, src_h)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill_height = height // 2 - src_h // 2
        if fill_height > 0:
            res.paste(resized.resize((width, fill_height), box=(0, 0, width, 0)), box=(0, 0))
            res.paste(resized.resize((width, fill_height), box=(0, resized.height, width, resized.height)),
                      box=(0, fill_height + src_h))
    elif ratio > src_ratio:
        fill_width = width // 2 - src_w // 2
        if fill_width > 0:
            res.paste(resized.resize((fill_width, height), box=(0, 0, 0, height)), box=(0, 0))
            res.paste(resized.resize((fill_width, height), box=(resized.width, 0, resized.width, height)),
                      box=(fill_width + src_w, 0))
    return res


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("mode", range(3))
@pytest.mark.parametrize("size", [(100, 80), (64, 120), (96, 96), (61, 47)])
@pytest.mark.parametrize("target", [(64, 64), (128, 72), (72, 128)])
def test_resize_modes_match_a1111(mode, size, target):
    image = photo(*size)
    expected = a1111_resize_image(mode, image, *target)
    np.testing.assert_array_equal(np.asarray(resize(image, RESIZE_MODES[mode], *target)), np.asarray(expected))


def test_an_init_image_of_any_size(tiny_sd1_bundle, tmp_path):
    photo(100, 80).save(tmp_path / "init.png")
    Image.new("L", (50, 40), 255).save(tmp_path / "mask.png")  # another size again: resized too
    common = ["generate", "x", "-b", str(tiny_sd1_bundle), "--init-image", str(tmp_path / "init.png"), *FAST]
    assert main([*common, "-o", str(tmp_path / "a.png")]) == 0
    assert Image.open(tmp_path / "a.png").size == (104, 80)  # the image's size, rounded to a multiple of 8
    assert main([*common, "-o", str(tmp_path / "b.png"), "-W", "64", "-H", "64", "--resize-mode",
                 "crop and resize", "--mask", str(tmp_path / "mask.png")]) == 0
    assert Image.open(tmp_path / "b.png").size == (64, 64)


def test_seed_minus_one_is_random(tiny_sd1_bundle, tmp_path):
    for name in "ab":
        assert main(["generate", "x", "-b", str(tiny_sd1_bundle), "-o", str(tmp_path / f"{name}.png"), "--seed",
                     "-1", *FAST]) == 0
    seeds = [read_parameters(tmp_path / f"{n}.png").split("Seed: ")[1].split(",")[0] for n in "ab"]
    assert seeds[0] != seeds[1] and all(int(s) >= 0 for s in seeds)


def test_batch_count_continues_the_seeds(tiny_sd1_bundle, tmp_path):
    assert main(["generate", "x", "-b", str(tiny_sd1_bundle), "-o", str(tmp_path / "n.png"), "--seed", "7",
                 "--batch-size", "2", "--n-iter", "2", *FAST]) == 0
    seeds = [read_parameters(tmp_path / f"n-{i}.png").split("Seed: ")[1].split(",")[0] for i in range(4)]
    assert seeds == ["7", "8", "9", "10"]


def test_prompts_file_and_numbered_output_folder(tiny_sd1_bundle, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square, big\n", encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    (out / "00007-1.png").write_bytes(b"an earlier image")
    args = ["generate", "--from-file", str(prompts), "-b", str(tiny_sd1_bundle), "--outdir", str(out), "--seed", "3"]
    assert main([*args, *FAST]) == 0
    assert main([*args, "--format", "webp", *FAST]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00007-1.png", "00008-3.png", "00009-3.png", "00010-3.webp", "00011-3.webp"]
    assert (out / "00007-1.png").read_bytes() == b"an earlier image"  # never overwritten
    assert read_parameters(out / "00009-3.png").startswith("a blue square, big\n")
    assert read_parameters(out / "00011-3.webp").startswith("a blue square, big\n")


def test_a_taken_number_moves_on(tmp_path):
    folder = OutputFolder(tmp_path)
    first = folder.save(Image.new("RGB", (8, 8)), 5, "x")
    assert first.name == "00000-5.png"
    (tmp_path / "00001-9.png").write_bytes(b"someone else's")
    assert folder.save(Image.new("RGB", (8, 8)), 5, "x").name == "00002-5.png"


@pytest.mark.parametrize("suffix", [".jpg", ".webp", ".png"])
def test_parameters_are_where_a1111_reads_them(tmp_path, suffix):
    piexif = pytest.importorskip("piexif")
    import piexif.helper

    text = 'a cat, "in a hat"\nNegative prompt: blürry\nSteps: 3, Sampler: Euler a, Schedule type: Karras'
    path = write_image(photo(16, 16), tmp_path / f"img{suffix}", text)
    with Image.open(path) as image:
        if suffix == ".png":
            stored = image.info["parameters"]  # A1111: items["parameters"] of a PNG
        else:  # A1111 read_info_from_image: piexif.load(exif), UserComment.load(...)
            exif = piexif.load(image.info["exif"])
            stored = piexif.helper.UserComment.load(exif["Exif"][piexif.ExifIFD.UserComment])
    assert stored == text == read_parameters(path)


def test_writing_replaces_a_link_instead_of_following_it(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    link = tmp_path / "out.png"
    link.symlink_to(target)
    write_image(photo(8, 8), link, "x")
    assert target.read_text() == "keep me" and not link.is_symlink()


def test_options_anywhere_and_threads(tiny_sd1_bundle, tmp_path):
    out = tmp_path / "v.png"
    assert main(["generate", "x", "-b", str(tiny_sd1_bundle), "-o", str(out), *FAST, "--threads", "1", "-v"]) == 0
    assert out.exists()


def test_progress_is_plain_lines_when_not_a_terminal(tiny_sd1_bundle, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sdrt", "generate", "x", "-b", str(tiny_sd1_bundle), "-o",
                           str(tmp_path / "p.png"), "--steps", "3", "--sampler", "Heun"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("sdrt: ")]
    assert lines[-1] == "sdrt: 100% (batch 1/1, step 3/3)"  # Heun: 5 model calls, counted as 3 steps


@pytest.mark.parametrize("command", ["generate", "export", "convert", "info"])
def test_help_ends_with_examples(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = capsys.readouterr().out.rstrip()
    examples = text[text.rindex("examples:"):].splitlines()
    assert 3 <= len(examples) <= 4 and all(line.startswith("  sdrt ") for line in examples[1:])


def test_info_does_not_show_where_the_bundle_was_built(tiny_sd1_bundle, tiny_sd1_dir, capsys):
    assert main(["info", str(tiny_sd1_bundle), "--no-verify"]) == 0
    out = capsys.readouterr().out
    assert str(tiny_sd1_dir.parent) not in out and tiny_sd1_dir.name in out


def test_packaging_metadata():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert "Typing :: Typed" in project["classifiers"] and project["license-files"] == ["LICENSE", "NOTICE"]
    assert "#" not in project["description"] and "clone" not in project["description"]
    export = project["optional-dependencies"]["export"]
    assert not any(dep.startswith("torch==") for dep in export)  # the dev setup pins; users keep their torch
    assert not any(dep.startswith("onnxruntime") for dep in export)  # would replace an onnxruntime-gpu install
    assert (ROOT / "sdrt" / "py.typed").exists()
