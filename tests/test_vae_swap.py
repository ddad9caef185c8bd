"""VAE swap: a VAE exported alone (diffusers folder, A1111 single file) replaces the model's, as diffusers'
`StableDiffusionPipeline(vae=...)` and A1111's VAE setting do; misfits are refused.

Tolerances: images within 1/255 per pixel of diffusers' (8-bit); a single file and the folder it was written from
export to graphs whose outputs agree within the export's VAE tolerance.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
ort = pytest.importorskip("onnxruntime")
from safetensors.torch import save_file  # noqa: E402
from tiny_models import diffusers_reference, ldm_vae_state_dict, save_tiny_vae, save_tiny_yaml  # noqa: E402

from sdrt.bundle import MANIFEST, read_manifest, sha256_file  # noqa: E402
from sdrt.cli import main  # noqa: E402
from sdrt.errors import BundleError  # noqa: E402
from sdrt.export import components  # noqa: E402
from sdrt.export.vae_only import export_vae_bundle  # noqa: E402
from sdrt.runtime.pipeline import Pipeline  # noqa: E402
from sdrt.runtime.request import GenerationRequest  # noqa: E402

PIXEL_TOL_8BIT = 1
VAE_TOL = components.VAE_TOLERANCE
SWAP_VISIBLE = 8  # the other VAE must move pixels by more than this, or parity would prove nothing
PROMPT, SEED, STEPS = "a red circle on a blue background", 5, 4


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "other-vae", seed=7)


@pytest.fixture(scope="module")
def vae_bundle(vae_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "other-vae"
    export_vae_bundle(vae_dir, out)
    return out


@pytest.fixture(scope="module")
def vae_file_bundle(vae_dir, tmp_path_factory):
    """The same VAE as an A1111 file (CompVis keys), exported by the CLI with the tiny model's yaml."""
    tmp = tmp_path_factory.mktemp("vae-file")
    vae = diffusers.AutoencoderKL.from_pretrained(vae_dir)
    save_file(ldm_vae_state_dict(vae), tmp / "tiny-vae.safetensors")
    out = tmp / "bundle"
    rc = main(["export", str(tmp / "tiny-vae.safetensors"), "-o", str(out), "--vae-only",
               "--original-config", str(save_tiny_yaml(tmp / "tiny.yaml"))])
    assert rc == 0
    return out


def test_vae_bundle_manifest(vae_bundle, vae_dir):
    manifest = read_manifest(vae_bundle)
    assert sorted(manifest.components) == ["vae_decoder", "vae_encoder"]
    model = manifest.model
    assert (model.family, model.latent_channels, model.vae_scale_factor, model.latent_scale_factor) == \
        ("vae", 4, 8, 0.18215)
    assert manifest.source["sha256"] == sha256_file(vae_dir / "diffusion_pytorch_model.safetensors")


def test_single_file_exports_the_same_vae(vae_bundle, vae_file_bundle):
    latents = np.random.default_rng(0).standard_normal((1, 4, 6, 5)).astype(np.float32)
    outputs = []
    for bundle in (vae_bundle, vae_file_bundle):
        session = ort.InferenceSession(str(bundle / "vae_decoder" / "model.onnx"), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {"latents": latents})[0])
    assert np.abs(outputs[0] - outputs[1]).max() <= VAE_TOL
    assert read_manifest(vae_file_bundle).source["kind"] == "single_file"


def _sdrt(pipe) -> tuple[np.ndarray, str]:
    out = pipe.generate(GenerationRequest(PROMPT, steps=STEPS, sampler="Euler", seed=SEED))[0]
    return np.asarray(out.image).astype(int), out.parameters


def test_swapped_vae_matches_diffusers(tiny_sd1_dir, tiny_sd1_bundle, vae_bundle, vae_dir, sdrt_pipe):
    reference = diffusers_reference(diffusers.StableDiffusionPipeline, tiny_sd1_dir)
    reference.vae = diffusers.AutoencoderKL.from_pretrained(vae_dir)
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.base_scheduler_config)
    want = reference(PROMPT, num_inference_steps=STEPS, output_type="np",
                     generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    with Pipeline.load(tiny_sd1_bundle, backend="onnxruntime", vae=vae_bundle) as pipe:
        ours, parameters = _sdrt(pipe)
        assert pipe.component("vae_encoder")[0] == vae_bundle  # img2img encodes with the swapped VAE too
    assert np.abs(ours - (want * 255).round()).max() <= PIXEL_TOL_8BIT
    assert np.abs(ours - _sdrt(sdrt_pipe)[0]).max() > SWAP_VISIBLE
    digest = sha256_file(vae_dir / "diffusion_pytorch_model.safetensors")
    assert f"VAE hash: {digest[:10]}, VAE: other-vae," in parameters


def test_cli_generate_with_vae(tiny_sd1_bundle, vae_file_bundle, tmp_path):
    out = tmp_path / "img.png"
    rc = main(["generate", PROMPT, "-b", str(tiny_sd1_bundle), "--vae", str(vae_file_bundle), "-o", str(out),
               "--steps", "2", "--seed", "1", "-q"])
    assert rc == 0
    with Image.open(out) as img:
        assert "VAE: tiny-vae.safetensors," in img.info["parameters"]


@pytest.mark.parametrize("field, value, what", [("latent_scale_factor", 0.13025, "latent scale factor"),
                                                ("latent_channels", 16, "latent channels")])
def test_misfit_vae_is_refused(tiny_sd1_bundle, vae_bundle, tmp_path, field, value, what):
    misfit = tmp_path / "misfit"
    shutil.copytree(vae_bundle, misfit)
    manifest = json.loads((misfit / MANIFEST).read_text())
    manifest["model"][field] = value
    (misfit / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=f"does not fit this model: {what} expected .*, got {value}"):
        Pipeline.load(tiny_sd1_bundle, backend="onnxruntime", vae=misfit)


def test_vae_bundle_alone_is_not_a_model(vae_bundle, tiny_sd1_bundle):
    with pytest.raises(BundleError, match="it is a VAE bundle, for --vae"):
        Pipeline.load(vae_bundle, backend="onnxruntime")
    with pytest.raises(BundleError, match="a model bundle needs text_encoder, unet, vae_decoder"):
        Pipeline.load(tiny_sd1_bundle, backend="onnxruntime", vae=_without_vae(tiny_sd1_bundle, vae_bundle))


def _without_vae(model_bundle, vae_bundle):
    """A bundle folder with no VAE components: the model's manifest minus its VAE."""
    out = vae_bundle.parent / "no-vae"
    if not out.exists():
        shutil.copytree(model_bundle, out)
        manifest = json.loads((out / MANIFEST).read_text())
        for name in ("vae_decoder", "vae_encoder"):
            del manifest["components"][name]
            del manifest["files"][f"{name}/model.onnx"]
        (out / MANIFEST).write_text(json.dumps(manifest))
    return out
