"""TAESD as the optional taesd_decoder component (against diffusers' AutoencoderTiny), and the preview functions."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from sdrt.runtime.preview import SD1_PROJECTION, LatentProjection, linear_preview, tiny_decoder_preview

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
ort = pytest.importorskip("onnxruntime")

from diffusers import AutoencoderTiny  # noqa: E402

from sdrt.bundle import ModelInfo, read_manifest, verify_files  # noqa: E402
from sdrt.contracts import taesd_decoder_contract  # noqa: E402
from sdrt.errors import ExportError  # noqa: E402
from sdrt.export import export_bundle  # noqa: E402
from sdrt.export.exporter import export_component  # noqa: E402
from sdrt.export.taesd import TAESD_TOLERANCE, add_taesd, find_taesd, load_taesd, taesd_spec  # noqa: E402
from sdrt.errors import RequestError  # noqa: E402
from sdrt.runtime.pipeline import Pipeline  # noqa: E402
from sdrt.runtime.request import GenerationRequest  # noqa: E402

# ONNX Runtime against diffusers' AutoencoderTiny.decode, fp32 CPU: the export's own tolerance.
DECODE_TOL = TAESD_TOLERANCE
FIT_TOL = 1e-4  # least squares recovers an exactly affine decoder to float32 rounding
LATENT_SIZES = [(8, 8), (9, 12), (7, 5)]
INFO = ModelInfo("sd1", "epsilon", 0.18215, latent_channels=4, vae_scale_factor=8)


def tiny_taesd(seed: int = 0, **config) -> AutoencoderTiny:
    """A random AutoencoderTiny with SD's 4 latent channels and 8x upsampling, 16 channels wide."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoencoderTiny(**{
            "encoder_block_out_channels": (16,) * 4, "decoder_block_out_channels": (16,) * 4,
            "num_encoder_blocks": (1, 1, 1, 1), "num_decoder_blocks": (1, 1, 1, 1), **config,
        })
    return model.eval()


def _reference_decode(tiny: AutoencoderTiny, latents: np.ndarray) -> np.ndarray:
    # diffusers pipelines decode `latents / vae.config.scaling_factor`; TAESD's factor is 1.0.
    with torch.no_grad():
        return tiny.decode(torch.from_numpy(latents) / tiny.config.scaling_factor).sample.numpy()


@pytest.fixture(scope="module")
def taesd_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("taesd") / "taesd"
    tiny_taesd().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bundle_with_taesd(tiny_sd1_dir, taesd_folder, tmp_path_factory):
    """The tiny SD1 folder with a `taesd/` subfolder, exported (the subfolder is found without being named)."""
    source = tmp_path_factory.mktemp("models") / "tiny-sd1-taesd"
    shutil.copytree(tiny_sd1_dir, source)
    shutil.copytree(taesd_folder, source / "taesd")
    out = tmp_path_factory.mktemp("bundles") / "tiny-sd1-taesd"
    export_bundle(source, out)
    return out


# --- export ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scaling_factor", [1.0, 2.0])
def test_exported_decoder_matches_diffusers(tmp_path, scaling_factor):
    tiny = tiny_taesd(scaling_factor=scaling_factor)
    component = export_component(taesd_spec(tiny, INFO), tmp_path, 17, INFO.vae_scale_factor)
    assert component.validation["max_abs_error"] <= TAESD_TOLERANCE
    session = ort.InferenceSession(str(tmp_path / component.file), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for h, w in LATENT_SIZES:
        latents = rng.standard_normal((2, 4, h, w)).astype(np.float32)
        (got,) = session.run(["image"], {"latents": latents})
        want = _reference_decode(tiny, latents)
        assert got.shape == (2, 3, 8 * h, 8 * w)
        assert np.abs(got - want).max() <= DECODE_TOL


def test_bundle_carries_the_found_taesd(bundle_with_taesd):
    manifest = read_manifest(bundle_with_taesd)
    verify_files(bundle_with_taesd, manifest)
    component = manifest.components["taesd_decoder"]
    assert component.contract == taesd_decoder_contract(4)
    assert component.file in manifest.files
    assert component.validation["max_abs_error"] <= TAESD_TOLERANCE
    assert set(manifest.components) == {"text_encoder", "unet", "vae_decoder", "vae_encoder", "taesd_decoder"}


def test_bundle_without_taesd_has_no_component(tiny_sd1_bundle):
    assert "taesd_decoder" not in read_manifest(tiny_sd1_bundle).components


def test_add_taesd_to_an_existing_bundle(tiny_sd1_bundle, taesd_folder, tmp_path):
    before = read_manifest(tiny_sd1_bundle)
    manifest = add_taesd(tiny_sd1_bundle, taesd_folder, tmp_path / "with-taesd")
    verify_files(tmp_path / "with-taesd", manifest)
    assert set(manifest.components) == set(before.components) | {"taesd_decoder"}
    assert all(manifest.files[f] == digest for f, digest in before.files.items())  # the rest is copied unchanged
    assert manifest.components["taesd_decoder"].validation["max_abs_error"] <= TAESD_TOLERANCE


def test_find_and_load(tmp_path, taesd_folder):
    assert find_taesd(tmp_path) is None and load_taesd(None, tmp_path) is None
    shutil.copytree(taesd_folder, tmp_path / "vae_tiny")
    assert find_taesd(tmp_path) == tmp_path / "vae_tiny"
    shutil.copytree(taesd_folder, tmp_path / "taesd")
    assert find_taesd(tmp_path) == tmp_path / "taesd"  # `taesd/` first
    assert isinstance(load_taesd(None, tmp_path), AutoencoderTiny)
    with pytest.raises(ExportError, match="has no config.json"):
        load_taesd(tmp_path / "missing", tmp_path)


@pytest.mark.parametrize("config, message", [
    ({"latent_channels": 16}, "16 latent channels, the model 4"),
    ({"num_decoder_blocks": (1, 1, 1), "decoder_block_out_channels": (16, 16, 16)}, "upsamples 4x"),
])
def test_incompatible_taesd_is_refused(config, message):
    with pytest.raises(ExportError, match=message):
        taesd_spec(tiny_taesd(**config), INFO)


# --- previews ------------------------------------------------------------------------------------------------

def test_pipeline_session_previews_like_diffusers(bundle_with_taesd, taesd_folder):
    latents = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    with Pipeline.load(bundle_with_taesd) as pipe:
        images = tiny_decoder_preview(pipe.prepared("taesd_decoder", {"latents": latents}), latents)
    want = _reference_decode(AutoencoderTiny.from_pretrained(taesd_folder).eval(), latents)
    expected = np.clip(want / 2 + 0.5, 0, 1)[0].transpose(1, 2, 0) * 255
    assert images[0].size == (64, 64)
    assert np.abs(np.asarray(images[0], np.float64) - expected).max() <= 0.5 + 255 * DECODE_TOL


def test_linear_preview_numbers():
    latents = np.zeros((2, 4, 3, 5), np.float32)
    latents[1, 3] = 1.0  # L4 alone: RGB = (-0.184, -0.271, -0.473) -> (0.408, 0.3645, 0.2635) * 255
    images = linear_preview(latents)
    assert [im.size for im in images] == [(5, 3), (5, 3)]
    assert np.asarray(images[0]).tolist()[0][0] == [128, 128, 128]
    assert np.asarray(images[1]).tolist()[0][0] == [104, 93, 67]


def test_projection_fit_recovers_an_affine_decoder():
    truth = LatentProjection(np.random.default_rng(2).normal(size=(4, 3)).astype(np.float32),
                             np.array([0.1, -0.2, 0.3], np.float32))

    def decode(latents):  # affine per latent pixel, upsampled 8x as a VAE's output is
        return truth(latents).repeat(8, axis=2).repeat(8, axis=3)

    fitted = LatentProjection.from_decoder(decode, channels=4)
    assert np.abs(fitted.matrix - truth.matrix).max() <= FIT_TOL
    assert np.abs(fitted.bias - truth.bias).max() <= FIT_TOL
    assert not np.allclose(SD1_PROJECTION.matrix, truth.matrix)


# --- through the pipeline: --fast-decode and previews ------------------------------------------------------------

def _final_step(pipe, **fields):
    req = GenerationRequest("a red circle", seed=3, steps=3, **fields).resolve(pipe.manifest)
    last = None
    for last in pipe.denoise(req):
        pass
    return req, last


def test_fast_decode_is_the_tiny_decoder_on_the_final_latents(bundle_with_taesd, taesd_folder):
    with Pipeline.load(bundle_with_taesd) as pipe:
        req, last = _final_step(pipe, fast_decode=True)
        [image] = pipe.generate(req)
    want = _reference_decode(AutoencoderTiny.from_pretrained(taesd_folder).eval(), last.vp_latents())
    expected = np.clip(want / 2 + 0.5, 0, 1)[0].transpose(1, 2, 0) * 255
    assert np.abs(np.asarray(image.image, np.float64) - expected).max() <= 0.5 + 255 * DECODE_TOL
    assert "VAE Decoder: TAESD" in image.parameters


def test_fast_decode_without_a_tiny_decoder_is_refused(tiny_sd1_bundle):
    with Pipeline.load(tiny_sd1_bundle) as pipe, pytest.raises(RequestError, match="tiny decoder"):
        GenerationRequest("x", fast_decode=True).resolve(pipe.manifest)


def test_preview_prefers_the_tiny_decoder(bundle_with_taesd):
    with Pipeline.load(bundle_with_taesd) as pipe:
        _, last = _final_step(pipe)
        [preview] = pipe.preview(last)
        [fast] = pipe.decode(last.vp_latents(), fast=True)
    assert preview.size == (64, 64)
    assert np.array_equal(np.asarray(preview), np.asarray(fast))


def test_preview_of_an_sd_vae_is_the_linear_map(tiny_sd1_bundle):
    with Pipeline.load(tiny_sd1_bundle) as pipe:
        assert pipe.manifest.model.latent_scale_factor == 0.18215
        _, last = _final_step(pipe)
        previews = pipe.preview(last)
    want = linear_preview(last.vp_latents())
    assert [p.size for p in previews] == [(8, 8)]
    assert np.array_equal(np.asarray(previews[0]), np.asarray(want[0]))


def test_preview_of_another_vae_is_that_vae():
    # The shipped model's VAE is its own (scale 0.46): SD's map means nothing there, so the preview is a decode.
    with Pipeline.load() as pipe:
        _, last = _final_step(pipe)
        [preview] = pipe.preview(last)
        [decoded] = pipe.decode(last.vp_latents())
    assert preview.size == (64, 64)
    assert np.array_equal(np.asarray(preview), np.asarray(decoded))


def test_cli_fast_decode_and_previews(bundle_with_taesd, tmp_path):
    from PIL import Image

    from sdrt.cli import main

    out = tmp_path / "o.png"
    args = ["generate", "x", "-b", str(bundle_with_taesd), "-o", str(out), "--seed", "2", "-q"]
    assert main([*args, "--kind", "lcm", "--fast-decode", "--preview-every", "1"]) == 0
    params = Image.open(out).text["parameters"]
    assert "Steps: 4" in params and "Sampler: LCM" in params and "VAE Decoder: TAESD" in params
    preview = Image.open(out.with_suffix(".preview.png"))
    assert preview.size == (64, 64) and len(np.unique(np.asarray(preview))) > 1
