"""Loading what users export: diffusers folders of both transformers layouts, and CompVis single files."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from diffusers.loaders.single_file_utils import (  # noqa: E402
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from tiny_models import save_tiny_sd1, save_tiny_single_file, save_tiny_yaml  # noqa: E402
from transformers import CLIPTextConfig  # noqa: E402

from sdrt.errors import ExportError  # noqa: E402
from sdrt.export.clip_vocab import read_tokenizer_files  # noqa: E402
from sdrt.export.exporter import model_family, model_info  # noqa: E402
from sdrt.export.ldm_config import CLIP_L14_DIR, clip_text_config, read_original_config, scheduler_config  # noqa: E402
from sdrt.export.single_file import read_checkpoint  # noqa: E402
from sdrt.export.source import load_source  # noqa: E402

# A single file converts back to the very weights it was written from, and both run the same kernels: bit-identical.
SINGLE_FILE_TOLERANCE = 0.0
LAYOUT_TOLERANCE = 0.0  # transformers 4.x and 5 folders hold the same weights under different key names
SEED = 0


def _unet_output(model):
    g = torch.Generator().manual_seed(SEED)
    sample, t = torch.randn(2, 4, 9, 12, generator=g), torch.rand(2, generator=g) * 1000
    context = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return model.unet(sample, t, context).sample


def _text_output(model):
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        return model.text_encoder(ids).last_hidden_state


def _decoded(model):
    z = torch.randn(1, 4, 8, 6, generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        return model.vae.decode(z).sample


def _max_abs(a, b) -> float:
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def folder_model(tiny_sd1_dir):
    return load_source(tiny_sd1_dir)


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory):
    return save_tiny_yaml(tmp_path_factory.mktemp("yaml") / "tiny-v1.yaml")


def test_transformers4_folder_loads_the_same_model(tmp_path, folder_model):
    old = save_tiny_sd1(tmp_path / "tiny-t4", layout="transformers4", seed=SEED)
    keys = _safetensors_keys(old / "text_encoder" / "model.safetensors")
    assert "text_model.embeddings.token_embedding.weight" in keys
    assert not (old / "tokenizer" / "tokenizer.json").exists()
    model = load_source(old)
    assert _max_abs(_text_output(model), _text_output(folder_model)) <= LAYOUT_TOLERANCE
    assert _max_abs(_unet_output(model), _unet_output(folder_model)) <= LAYOUT_TOLERANCE


def test_both_tokenizer_layouts_give_the_shipped_clip_files(tmp_path, tiny_sd1_dir, clip_tokenizer_dir):
    old = save_tiny_sd1(tmp_path / "tiny-t4", layout="transformers4", seed=SEED)
    for name, folder in (("t5", tiny_sd1_dir), ("t4", old)):
        pad, max_length = read_tokenizer_files(folder / "tokenizer", tmp_path / name)
        assert (pad, max_length) == ("<|endoftext|>", 77)
        assert _vocab(tmp_path / name) == _vocab(clip_tokenizer_dir)
        assert _merges(tmp_path / name / "merges.txt") == _merges(CLIP_L14_DIR / "merges.txt")


def test_folder_model_info(folder_model):
    info = model_info(folder_model, None)
    assert (info.family, info.prediction_type, info.latent_scale_factor) == ("sd1", "epsilon", 0.18215)
    assert (info.latent_channels, info.vae_scale_factor, info.default_size) == (4, 8, 64)
    assert model_info(folder_model, "v_prediction").prediction_type == "v_prediction"


@pytest.mark.parametrize("name, wrap", [("tiny.safetensors", True), ("tiny.ckpt", True), ("tiny-flat.ckpt", False)])
def test_single_file_matches_its_folder(tmp_path, tiny_yaml, folder_model, name, wrap):
    path = save_tiny_single_file(tmp_path / name, seed=SEED, wrap_state_dict=wrap)
    model = load_source(path, tiny_yaml)
    assert _max_abs(_unet_output(model), _unet_output(folder_model)) <= SINGLE_FILE_TOLERANCE
    assert _max_abs(_text_output(model), _text_output(folder_model)) <= SINGLE_FILE_TOLERANCE
    assert _max_abs(_decoded(model), _decoded(folder_model)) <= SINGLE_FILE_TOLERANCE
    assert float(_unet_output(model).abs().max()) > 0.1  # the outputs compared are not trivially zero
    for key in ("beta_start", "beta_end", "beta_schedule", "steps_offset", "skip_prk_steps", "prediction_type"):
        assert model.scheduler[key] == folder_model.scheduler[key]
    assert model.source["kind"] == "single_file" and model.tokenizer_dir == CLIP_L14_DIR


def test_single_file_with_the_wrong_config_fails_fast(tmp_path):
    path = save_tiny_single_file(tmp_path / "tiny.safetensors", seed=SEED)
    with pytest.raises(ExportError, match="32 channels wide, the config says 320.*--original-config"):
        load_source(path)  # the shipped SD v1 yaml


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:  # unpickling calls open(marker, "w"): the file appears iff the pickle's code ran
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": Payload()}}, path)
    with pytest.raises(ExportError, match="refusing to load .*evil.ckpt.*could run code"):
        read_checkpoint(path)
    assert not marker.exists()
    # The payload is live: an unrestricted unpickle does run it, so the assertion above can fail.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_ckpt_without_tensors_is_refused(tmp_path):
    path = tmp_path / "list.ckpt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ExportError, match="not a state dict"):
        read_checkpoint(path)


def test_shipped_v1_yaml_gives_sd15_configs():
    config = read_original_config(None)
    unet = create_unet_diffusers_config_from_ldm(config, {})
    vae = create_vae_diffusers_config_from_ldm(config, {})
    assert unet["block_out_channels"] == [320, 640, 1280, 1280]
    assert unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert unet["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert (unet["attention_head_dim"], unet["cross_attention_dim"], unet["layers_per_block"]) == (8, 768, 2)
    assert (unet["sample_size"], unet["use_linear_projection"]) == (64, False)
    assert vae["block_out_channels"] == [128, 256, 512, 512]
    assert (vae["latent_channels"], vae["layers_per_block"], vae["scaling_factor"]) == (4, 2, 0.18215)
    sched = scheduler_config(config)
    assert (sched["beta_start"], sched["beta_end"], sched["num_train_timesteps"]) == (0.00085, 0.012, 1000)
    assert (sched["steps_offset"], sched["skip_prk_steps"], sched["prediction_type"]) == (1, True, "epsilon")


def test_text_config_inferred_from_full_size_clip_shapes():
    shapes = {
        "embeddings.token_embedding.weight": (49408, 768), "embeddings.position_embedding.weight": (77, 768),
        **{f"encoder.layers.{i}.mlp.fc1.weight": (3072, 768) for i in range(12)},
    }
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    shipped = json.loads((CLIP_L14_DIR / "config.json").read_text())
    assert clip_text_config(state) == shipped


@pytest.mark.parametrize("hidden, act, family", [(768, "quick_gelu", "sd1"), (1024, "gelu", "sd2"),
                                                 (32, "quick_gelu", "sd1"), (32, "gelu", "sd2")])
def test_model_family_rule(hidden, act, family):
    assert model_family(CLIPTextConfig(hidden_size=hidden, hidden_act=act)) == family


def _safetensors_keys(path) -> set[str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return set(f.keys())


def _vocab(folder) -> dict[str, int]:
    return json.loads((folder / "vocab.json").read_text())


def _merges(path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line and not line.startswith("#version")]

