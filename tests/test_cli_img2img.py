"""`sdrt generate` with --init-image / --mask: real PNG files in and out, one-line errors with exit code 2."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdrt.cli import main
from sdrt.runtime.pipeline import Pipeline
from test_cli import parse_parameters
from test_img2img import init_image
from test_inpaint import mask_image


@pytest.fixture
def pngs(tmp_path):
    """An init image (120 x 96) and its mask (white box) written as PNG files."""
    image, mask = init_image(120, 96), mask_image(120, 96, box=(40, 30, 75, 60))
    image.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    return tmp_path / "init.png", tmp_path / "mask.png"


def test_img2img_png_equals_the_library_result(tiny_sd1_bundle, tmp_path, pngs):
    out = tmp_path / "out.png"
    rc = main(["generate", "a castle", "-b", str(tiny_sd1_bundle), "-o", str(out), "--init-image", str(pngs[0]),
               "--strength", "0.5", "--steps", "4", "--seed", "7", "--sampler", "Euler", "-q"])
    assert rc == 0
    with Pipeline.load(tiny_sd1_bundle, backend="onnxruntime") as pipe:
        [ref] = pipe.generate("a castle", init_image=Image.open(pngs[0]), strength=0.5, steps=4, seed=7,
                              sampler="Euler")
    with Image.open(out) as img:
        assert img.size == (120, 96)  # the init image's size
        np.testing.assert_array_equal(np.asarray(img), np.asarray(ref.image))
        params = parse_parameters(img.info["parameters"])[2]
    assert params["Denoising strength"] == "0.5"
    assert params["Size"] == "120x96"


def test_inpaint_only_masked_keeps_the_rest(tiny_sd1_bundle, tmp_path, pngs):
    out = tmp_path / "out.png"
    rc = main(["generate", "a castle", "-b", str(tiny_sd1_bundle), "-o", str(out), "--init-image", str(pngs[0]),
               "--mask", str(pngs[1]), "--mask-blur", "3", "--inpaint-only-masked", "--padding", "4",
               "-W", "64", "-H", "64", "--steps", "3", "--seed", "1", "-q"])
    assert rc == 0
    original = np.asarray(Image.open(pngs[0]), np.int16)
    weight = np.asarray(Image.open(pngs[1]).filter(ImageFilter.GaussianBlur(3)))
    with Image.open(out) as img:
        result = np.asarray(img, np.int16)
        params = parse_parameters(img.info["parameters"])[2]
    assert result.shape == original.shape
    np.testing.assert_array_equal(result[weight == 0], original[weight == 0])
    assert np.abs(result[weight == 255] - original[weight == 255]).mean() > 5
    assert (params["Mask blur"], params["Inpaint area"], params["Masked area padding"]) == ("3", "Only masked", "4")


@pytest.mark.parametrize("args, message", [
    (["--mask", "{mask}"], "a mask needs an init image"),
    (["--init-image", "{missing}"], "cannot read the init image"),
    (["--init-image", "{init}", "--strength", "0"], "strength must be within (0, 1], got 0.0"),
    (["--init-image", "{init}", "-W", "65"], "width must be a multiple of 8 from 64 to"),
])
def test_errors_are_one_line_exit_2(tiny_sd1_bundle, tmp_path, pngs, capsys, args, message):
    Image.new("L", (64, 64)).save(tmp_path / "small.png")
    paths = {"init": pngs[0], "mask": pngs[1], "small": tmp_path / "small.png", "missing": tmp_path / "nope.png"}
    argv = [a.format(**paths) for a in args]
    rc = main(["generate", "x", "-b", str(tiny_sd1_bundle), "-o", str(tmp_path / "o.png"), "-q", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and message in err
