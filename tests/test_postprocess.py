"""What happens to decoded images before they are returned: the safety checker and the invisible watermark,
through Pipeline.generate and the CLI (the components themselves: tests/test_safety.py, tests/test_watermark.py)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdrt.bundle import ModelInfo
from sdrt.cli import main
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.watermark import DEFAULT_PAYLOAD, SD2_PAYLOAD, embed_watermark, watermark_payload

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

ALWAYS = -2.0  # a concept threshold below any cosine similarity (>= -1): every image is flagged
SMALL = dict(seed=1, steps=2, width=64, height=64)
WATERMARKED = dict(seed=1, steps=2, width=256, height=256)  # the encoder needs 256x256 pixels


@pytest.fixture(scope="module")
def flag_all_bundle(tmp_path_factory):
    from tiny_models import build_tiny_safety_checker, save_tiny_sd1_with_safety

    from sdrt.export import export_bundle

    checker = build_tiny_safety_checker()
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(ALWAYS)
    source = save_tiny_sd1_with_safety(tmp_path_factory.mktemp("models") / "flag-all", checker=checker)
    out = tmp_path_factory.mktemp("bundles") / "flag-all"
    export_bundle(source, out)
    return out


def test_flagged_images_are_black_and_say_so(flag_all_bundle):
    with Pipeline.load(flag_all_bundle) as pipe:
        [flagged] = pipe.generate("x", **SMALL)
        [unchecked] = pipe.generate("x", safety_checker=False, **SMALL)
    assert flagged.nsfw and not np.asarray(flagged.image).any()
    assert "Safety checker: flagged" in flagged.parameters
    assert not unchecked.nsfw and np.asarray(unchecked.image).std() > 0
    assert "Safety checker: off" in unchecked.parameters


def test_passed_images_are_untouched(tiny_sd1_safety_bundle, tiny_sd1_bundle):
    with Pipeline.load(tiny_sd1_safety_bundle) as pipe:
        [checked] = pipe.generate("x", **SMALL)
    with Pipeline.load(tiny_sd1_bundle) as pipe:  # the same weights without the checker
        [plain] = pipe.generate("x", **SMALL)
    assert not checked.nsfw and "Safety checker: passed" in checked.parameters
    assert np.array_equal(np.asarray(checked.image), np.asarray(plain.image))
    assert "Safety checker" not in plain.parameters


def test_watermark_is_the_reference_encoding_of_the_image(tiny_sd1_bundle):
    with Pipeline.load(tiny_sd1_bundle) as pipe:
        [marked] = pipe.generate("x", **WATERMARKED)
        [clean] = pipe.generate("x", watermark=False, **WATERMARKED)
        [small] = pipe.generate("x", **SMALL)
    assert marked.watermark == "StableDiffusionV1" and "Watermark: StableDiffusionV1" in marked.parameters
    assert np.array_equal(np.asarray(marked.image), np.asarray(embed_watermark(clean.image, DEFAULT_PAYLOAD)))
    assert not np.array_equal(np.asarray(marked.image), np.asarray(clean.image))
    assert clean.watermark is None and "Watermark: off" in clean.parameters
    assert small.watermark is None and "Watermark: none (image under 256x256)" in small.parameters


def test_payload_follows_the_model_family():
    class Manifest:
        def __init__(self, family):
            self.model = ModelInfo(family, "epsilon", 0.18215)

    assert watermark_payload(Manifest("sd1")) == DEFAULT_PAYLOAD
    assert watermark_payload(Manifest("sd2")) == SD2_PAYLOAD


def test_cli_opt_outs_are_recorded(flag_all_bundle, tmp_path, capsys):
    out = tmp_path / "o.png"
    common = ["generate", "x", "-b", str(flag_all_bundle), "-o", str(out), "--seed", "1", "--steps", "2", "-q"]
    assert main(common) == 0
    assert "flagged by the safety checker" in capsys.readouterr().out
    assert not np.asarray(Image.open(out)).any()
    assert main([*common, "--no-safety-checker", "--no-watermark"]) == 0
    params = Image.open(out).text["parameters"]
    assert "Safety checker: off" in params and "Watermark: off" in params
    assert np.asarray(Image.open(out)).std() > 0
