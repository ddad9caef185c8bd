"""Export to a bundle: manifest content, every component against diffusers at several sizes, external data, failures."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
ort = pytest.importorskip("onnxruntime")

from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from tiny_models import onnx_text_encoder, save_tiny_single_file, save_tiny_yaml  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402

from sdrt.bundle import read_manifest, sha256_file, verify_files  # noqa: E402
from sdrt.contracts import (  # noqa: E402
    text_encoder_contract,
    unet_contract,
    vae_decoder_contract,
    vae_encoder_contract,
)
from sdrt.errors import BundleError, ExportError  # noqa: E402
from sdrt.export import components, export_bundle, onnx_export  # noqa: E402
from sdrt.export.components import CHECK_SHAPES, component_specs  # noqa: E402
from sdrt.export.onnx_export import export_onnx, parameter_bytes  # noqa: E402
from sdrt.export.parity import check_parity  # noqa: E402

# ONNX Runtime against diffusers' own modules and API (not our wrappers), fp32 on CPU, tiny random model.
# Measured ~2e-6 (text encoder, UNet) and ~1e-5 (VAE decoder); the export's own tolerances apply here too.
TEXT_TOL = components.TEXT_ENCODER_TOLERANCE
UNET_TOL = components.UNET_TOLERANCE
VAE_TOL = components.VAE_TOLERANCE
# Latent sizes run in ORT: a multiple of 8, the trace size, and sizes that are odd / not multiples of 4.
LATENT_SIZES = [(8, 8), (9, 12), (16, 10), (6, 8), (7, 5)]
HIDDEN, CONTEXT, VOCAB, LAYERS = 32, 32, 49408, 2  # tests/tiny_models.py


@pytest.fixture(scope="module")
def manifest(tiny_sd1_bundle):
    return read_manifest(tiny_sd1_bundle)


@pytest.fixture(scope="module")
def reference(tiny_sd1_dir):
    """The tiny model as diffusers and transformers load it: the reference for the exported graphs."""
    return {
        "text_encoder": CLIPTextModel.from_pretrained(tiny_sd1_dir / "text_encoder").eval(),
        "unet": UNet2DConditionModel.from_pretrained(tiny_sd1_dir, subfolder="unet").eval(),
        "vae": AutoencoderKL.from_pretrained(tiny_sd1_dir, subfolder="vae").eval(),
    }


@pytest.fixture(scope="module")
def sessions(tiny_sd1_bundle):
    names = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
    return {n: ort.InferenceSession(str(tiny_sd1_bundle / n / "model.onnx"), providers=["CPUExecutionProvider"])
            for n in names}


def _max_abs(onnx_out: np.ndarray, torch_out: torch.Tensor) -> float:
    assert onnx_out.shape == tuple(torch_out.shape)
    return float(np.abs(onnx_out - torch_out.numpy()).max())


# --- manifest -------------------------------------------------------------------------------------------------

def test_manifest_files_and_checksums(tiny_sd1_bundle, manifest):
    verify_files(tiny_sd1_bundle, manifest)
    names = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
    expected, maps = {f"{c}/model.onnx" for c in names}, {f"{c}/weights_map.json" for c in names}
    tables = {"text_encoder/token_embedding.npy"}
    assert set(manifest.files) == expected | maps | tables | {"tokenizer/vocab.json", "tokenizer/merges.txt"}
    assert {c.file for c in manifest.components.values()} == expected
    assert {c.weights_map for c in manifest.components.values()} == maps
    assert not list(tiny_sd1_bundle.parent.glob(".tiny-sd1.partial-*"))


def test_manifest_contracts(manifest):
    contracts = {name: c.contract for name, c in manifest.components.items()}
    assert contracts == {
        "text_encoder": text_encoder_contract(HIDDEN, 77, layers=LAYERS),
        "unet": unet_contract(4, 4, CONTEXT),
        "vae_decoder": vae_decoder_contract(4),
        "vae_encoder": vae_encoder_contract(4),
    }


def test_manifest_validation_records(manifest):
    tolerances = {"text_encoder": TEXT_TOL, "unet": UNET_TOL, "vae_decoder": VAE_TOL, "vae_encoder": VAE_TOL}
    for name, comp in manifest.components.items():
        v = comp.validation
        assert v["tolerance"] == tolerances[name]
        assert 0.0 <= v["max_abs_error"] <= v["tolerance"] / 10, name  # measured, and well inside
        assert len(v["shapes"]) == len(CHECK_SHAPES)
    unet_shapes = manifest.components["unet"].validation["shapes"]
    assert unet_shapes[0] == {"sample": [2, 4, 9, 12], "timestep": [2], "encoder_hidden_states": [2, 77, CONTEXT]}
    assert unet_shapes[2] == {"sample": [3, 4, 16, 10], "timestep": [3], "encoder_hidden_states": [3, 154, CONTEXT]}
    assert manifest.components["vae_encoder"].validation["shapes"][1] == {"image": [1, 3, 64, 64]}


def test_manifest_model_scheduler_source_tools(tiny_sd1_dir, manifest):
    m = manifest.model
    assert (m.family, m.prediction_type, m.latent_scale_factor, m.latent_channels) == ("sd1", "epsilon", 0.18215, 4)
    assert (m.vae_scale_factor, m.default_size, m.name) == (8, 64, "tiny-sd1")
    expected_scheduler = json.loads((tiny_sd1_dir / "scheduler" / "scheduler_config.json").read_text())
    assert manifest.scheduler == expected_scheduler
    unet_weights = tiny_sd1_dir / "unet" / "diffusion_pytorch_model.safetensors"
    assert manifest.source == {"path": str(tiny_sd1_dir), "kind": "diffusers", "sha256": sha256_file(unet_weights)}
    assert set(manifest.tools) == {"sdrt", "torch", "diffusers", "transformers", "onnx", "onnxruntime"}
    assert "unknown" not in manifest.tools.values()
    assert (manifest.tokenizer.pad_token, manifest.tokenizer.max_length) == ("<|endoftext|>", 77)


def test_tokenizer_files_are_the_clip_vocab(tiny_sd1_bundle, clip_tokenizer_dir):
    vocab = json.loads((tiny_sd1_bundle / "tokenizer" / "vocab.json").read_text())
    assert vocab == json.loads((clip_tokenizer_dir / "vocab.json").read_text())
    assert (vocab["<|startoftext|>"], vocab["<|endoftext|>"], len(vocab)) == (49406, 49407, VOCAB)


def test_export_refuses_existing_output(tiny_sd1_dir, tiny_sd1_bundle):
    with pytest.raises(BundleError, match="already exists"):
        export_bundle(tiny_sd1_dir, tiny_sd1_bundle)


# --- the exported graphs against diffusers, at several sizes ---------------------------------------------------

@pytest.mark.parametrize("latent_size", LATENT_SIZES)
def test_unet_matches_diffusers(sessions, reference, latent_size):
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, *latent_size, generator=g)
    timestep = torch.tensor([999.0, 20.5])  # a fractional timestep, as k-diffusion samplers use
    context = torch.randn(2, 77, CONTEXT, generator=g)
    with torch.no_grad():
        expected = reference["unet"](sample, timestep, context).sample
    got = sessions["unet"].run(None, {
        "sample": sample.numpy(), "timestep": timestep.numpy(), "encoder_hidden_states": context.numpy()})[0]
    assert _max_abs(got, expected) <= UNET_TOL
    assert float(expected.abs().max()) > 0.1


@pytest.mark.parametrize("latent_size", LATENT_SIZES)
def test_vae_matches_diffusers(sessions, reference, latent_size):
    vae, g = reference["vae"], torch.Generator().manual_seed(2)
    latents = torch.randn(1, 4, *latent_size, generator=g)
    image = torch.rand(2, 3, latent_size[0] * 8, latent_size[1] * 8, generator=g) * 2 - 1
    with torch.no_grad():
        decoded = vae.decode(latents).sample
        dist = vae.encode(image).latent_dist
    got_image = sessions["vae_decoder"].run(None, {"latents": latents.numpy()})[0]
    mean, std = sessions["vae_encoder"].run(None, {"image": image.numpy()})
    assert _max_abs(got_image, decoded) <= VAE_TOL
    assert _max_abs(mean, dist.mean) <= VAE_TOL
    assert _max_abs(std, dist.std) <= VAE_TOL


def test_text_encoder_matches_transformers(tiny_sd1_bundle, reference):
    """Token ids looked up in the bundle's table, then the graph: transformers' last_hidden_state at clip skip 1,
    and each hidden state through the final layer norm (A1111's and diffusers' clip skip) at the others."""
    ids = torch.randint(0, VOCAB, (3, 77), generator=torch.Generator().manual_seed(3))
    model = reference["text_encoder"]
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        layers = [model.final_layer_norm(h) for h in out.hidden_states[1:]]
    encode = onnx_text_encoder(tiny_sd1_bundle)
    assert _max_abs(encode(ids.numpy()), out.last_hidden_state) <= TEXT_TOL
    for skip in range(1, LAYERS + 1):
        assert _max_abs(encode(ids.numpy(), clip_skip=skip), layers[-skip]) <= TEXT_TOL
    assert np.abs(encode(ids.numpy(), clip_skip=2) - encode(ids.numpy())).max() > 0.1  # the layers differ


def test_unet_traced_at_a_multiple_of_8_breaks_other_sizes(tmp_path, reference):
    """Why components.CHECK_SHAPES traces at 9x12: the plain 2x-upsample path cannot serve 9x12 latents."""
    spec = next(s for s in component_specs(_as_source(reference)) if s.name == "unet")
    args = (torch.randn(2, 4, 8, 8), torch.rand(2) * 1000, torch.randn(2, 77, CONTEXT))
    export_onnx(spec.module, args, spec.contract, tmp_path / "unet.onnx")
    with pytest.raises(ExportError, match="unet"):
        check_parity(spec, tmp_path / "unet.onnx", [(2, 9, 12, 77)], vae_scale_factor=8)


def _as_source(reference):
    """A SourceModel-like holder of the reference modules (only what component_specs reads)."""
    from types import SimpleNamespace

    return SimpleNamespace(text_encoder=reference["text_encoder"], unet=reference["unet"], vae=reference["vae"])


# --- external data ---------------------------------------------------------------------------------------------

def test_external_data_single_file(tmp_path, reference):
    spec = next(s for s in component_specs(_as_source(reference)) if s.name == "vae_decoder")
    args = (torch.randn(2, 4, 9, 12),)
    files = export_onnx(spec.module, args, spec.contract, tmp_path / "model.onnx", external_data=True)
    assert [f.name for f in files] == ["model.onnx", "model.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]  # no per-tensor files
    weights = parameter_bytes(spec.module)
    graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph
    inline = [t.name for t in graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL
              and len(t.raw_data) >= 1024]  # onnx_export._save: size_threshold=1024
    assert inline == []  # the graph only
    assert (tmp_path / "model.onnx.data").stat().st_size >= weights * 0.9
    record = check_parity(spec, tmp_path / "model.onnx", CHECK_SHAPES, vae_scale_factor=8)
    assert record["max_abs_error"] <= VAE_TOL


def test_bundle_from_single_file_with_forced_external_data(tmp_path, monkeypatch, clip_tokenizer_dir):
    """A .safetensors single file to a bundle, every component forced to external data (as the SD UNet is)."""
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    path = save_tiny_single_file(tmp_path / "tiny.safetensors")
    out = tmp_path / "bundle"
    manifest = export_bundle(path, out, original_config=save_tiny_yaml(tmp_path / "tiny.yaml"),
                             prediction_type="v_prediction")
    verify_files(out, manifest)
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        assert f"{name}/model.onnx.data" in manifest.files
        assert manifest.components[name].files == (f"{name}/model.onnx", f"{name}/model.onnx.data")
        validation = manifest.components[name].validation
        assert validation["max_abs_error"] <= validation["tolerance"]
    assert manifest.source == {"path": str(path), "kind": "single_file", "sha256": sha256_file(path)}
    for name in ("vocab.json", "merges.txt"):  # the single file's tokenizer: CLIP's, vocab rebuilt from the merges
        assert manifest.files[f"tokenizer/{name}"] == sha256_file(clip_tokenizer_dir / name)
    model = manifest.model
    assert (model.family, model.prediction_type, model.name) == ("sd1", "v_prediction", "tiny")
    assert manifest.scheduler["prediction_type"] == "v_prediction"
    assert (manifest.scheduler["_class_name"], manifest.scheduler["steps_offset"]) == ("PNDMScheduler", 1)
    assert read_manifest(out) == manifest


# --- failures leave nothing ------------------------------------------------------------------------------------

def test_failed_validation_leaves_nothing(tiny_sd1_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(components, "TEXT_ENCODER_TOLERANCE", 0.0)
    out = tmp_path / "bundle"
    with pytest.raises(ExportError, match=r"text_encoder: .* by [0-9.e-]+ \(max abs error\), above the tolerance 0"):
        export_bundle(tiny_sd1_dir, out)
    assert list(tmp_path.iterdir()) == []


def test_bad_prediction_type_is_refused_before_any_work(tiny_sd1_dir, tmp_path):
    with pytest.raises(ExportError, match="prediction_type must be one of"):
        export_bundle(tiny_sd1_dir, tmp_path / "bundle", prediction_type="sample")
    assert list(tmp_path.iterdir()) == []
