"""SD 2.x: diffusers folders (v and epsilon) export and generate as diffusers does; single files convert back."""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
ort = pytest.importorskip("onnxruntime")

from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tiny_models import (  # noqa: E402
    SD2_CONTEXT_DIM,
    onnx_text_encoder,
    SD2_SCHEDULERS,
    save_tiny_sd2_single_file,
    save_tiny_sd2_yaml,
    save_tiny_single_file,
)
from transformers import CLIPTextModel  # noqa: E402

import sdrt.export.single_file as single_file  # noqa: E402
from sdrt.bundle import read_manifest  # noqa: E402
from sdrt.errors import ExportError  # noqa: E402
from sdrt.export.detect import detect_family, prediction_from_forward_pass  # noqa: E402
from sdrt.export.exporter import model_info  # noqa: E402
from sdrt.export.ldm_config import (  # noqa: E402
    read_original_config,
    scheduler_config,
    shipped_config,
    yaml_prediction_type,
)
from sdrt.export.open_clip import PREFIX, cond_stage_layer, open_clip_text_config  # noqa: E402
from sdrt.export.source import load_source  # noqa: E402
from sdrt.runtime.pipeline import Pipeline  # noqa: E402
from sdrt.runtime.request import GenerationRequest  # noqa: E402

# Whole pipeline, sdrt on ONNX Runtime vs diffusers' StableDiffusionPipeline: max abs difference of the float
# images in [0, 1], and of the 8-bit images (1 = 1/255). As for SD1 (test_pipeline_parity).
PIXEL_TOL_FLOAT = 1.0 / 255
PIXEL_TOL_8BIT = 1
# A wrong parametrization must be visible: running the v model as epsilon moves pixels by far more than this.
WRONG_PREDICTION_MIN_ERR = 0.05
# The text encoder's ONNX graph against the folder's CLIPTextModel (fp32 CPU kernels; the export's own tolerance).
TEXT_TOL = 1e-3
# A single file holds the folder's very weights and converts back to the same modules: bit-identical outputs.
SINGLE_FILE_TOL = 0.0

PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry, low quality"
SEED, BATCH, STEPS = 1234, 2, 8
WIDTH, HEIGHT = 72, 64

# sdrt sampler name -> diffusers scheduler class and extra config. v: the folder's own DDIM plus two k-samplers;
# epsilon: the folder's own PNDM plus an ancestral one.
DIFFUSERS_SCHEDULERS = {
    "DDIM": ("DDIMScheduler", {}),
    "PNDM": ("PNDMScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
}
VARIANTS = {"v": "v_prediction", "eps": "epsilon"}
PARITY_CASES = [("v", "DDIM"), ("v", "Euler"), ("v", "DPM++ 2M Karras"), ("eps", "PNDM"), ("eps", "Euler a")]


@pytest.fixture(scope="module")
def folders(request):
    return {v: request.getfixturevalue(f"tiny_sd2_{v}_dir") for v in VARIANTS}


@pytest.fixture(scope="module")
def bundles(request):
    return {v: request.getfixturevalue(f"tiny_sd2_{v}_bundle") for v in VARIANTS}


@pytest.fixture(scope="module")
def reference_pipes(folders):
    pipes = {}
    for variant, folder in folders.items():
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        pipe.base_scheduler_config = pipe.scheduler.config  # each test's scheduler starts from the folder's own
        pipes[variant] = pipe
    return pipes


@pytest.fixture(scope="module")
def sdrt_pipes(bundles):
    with contextlib.ExitStack() as stack:
        yield {v: stack.enter_context(Pipeline.load(b, backend="onnxruntime")) for v, b in bundles.items()}


def diffusers_images(pipe, sampler: str, **config) -> np.ndarray:
    cls_name, extra = DIFFUSERS_SCHEDULERS[sampler]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.base_scheduler_config, **{**extra, **config})
    generators = [torch.Generator("cpu").manual_seed(SEED + i) for i in range(BATCH)]
    out = pipe(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5, width=WIDTH, height=HEIGHT,
        num_images_per_prompt=BATCH, generator=generators, output_type="np",
    )
    return out.images  # [B, H, W, 3] float in [0, 1]


def sdrt_images(pipe: Pipeline, sampler: str) -> np.ndarray:
    req = GenerationRequest(
        PROMPT, negative_prompt=NEGATIVE, steps=STEPS, guidance_scale=7.5, sampler=sampler, seed=SEED,
        batch_size=BATCH, width=WIDTH, height=HEIGHT,
    )
    *_, last = pipe.denoise(req)
    latents = last.vp_latents() / pipe.manifest.model.latent_scale_factor
    image = pipe.session("vae_decoder").run({"latents": latents.astype(np.float32)})["image"]
    return np.clip(image / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)


# --- diffusers folders -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant, default_size, scheduler", [("v", 96, "DDIMScheduler"), ("eps", 64, "PNDMScheduler")])
def test_folder_manifest(bundles, variant, default_size, scheduler):
    manifest = read_manifest(bundles[variant])
    model = manifest.model
    assert (model.family, model.prediction_type, model.default_size) == ("sd2", VARIANTS[variant], default_size)
    assert manifest.tokenizer.pad_token == "!"
    assert manifest.scheduler["_class_name"] == scheduler
    assert "timestep_spacing" not in manifest.scheduler  # Stability's configs predate it; diffusers' default applies
    assert manifest.components["text_encoder"].contract.outputs[0].shape[-1] == SD2_CONTEXT_DIM


def test_tokenizer_pads_like_diffusers(sdrt_pipes, reference_pipes):
    """SD2's tokenizer pads with "!" (id 0), not <|endoftext|>: the ids must equal transformers'."""
    ref = reference_pipes["v"].tokenizer
    for prompt in (PROMPT, ""):
        want = ref(prompt, padding="max_length", max_length=ref.model_max_length, truncation=True).input_ids
        got = sdrt_pipes["v"].tokenizer([prompt])[0].tolist()
        assert got == want
        assert got[-1] == 0


def test_text_encoder_is_the_penultimate_layer_model(bundles, folders):
    """The exported graph is the folder's CLIPTextModel (one layer short of the tower, final norm applied)."""
    reference = CLIPTextModel.from_pretrained(folders["v"] / "text_encoder").eval()
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(SEED), dtype=torch.int32)
    with torch.no_grad():
        want = reference(ids.long()).last_hidden_state.numpy()
    got = onnx_text_encoder(bundles["v"])(ids.numpy())
    assert np.abs(got - want).max() <= TEXT_TOL
    assert np.abs(want).max() > 0.1


@pytest.mark.parametrize("variant, sampler", PARITY_CASES)
def test_images_match_diffusers(reference_pipes, sdrt_pipes, variant, sampler, record_property):
    ref = diffusers_images(reference_pipes[variant], sampler)
    ours = sdrt_images(sdrt_pipes[variant], sampler)
    float_err = float(np.abs(ref - ours).max())
    byte_err = int(np.abs((ref * 255).round().astype(int) - (ours * 255).round().astype(int)).max())
    record_property("max_abs_float", float_err)
    record_property("max_abs_8bit", byte_err)
    print(f"sd2 {variant} {sampler}: max abs {float_err:.2e} (float), {byte_err}/255 (8-bit)")
    assert ours.shape == ref.shape == (BATCH, HEIGHT, WIDTH, 3)
    assert float_err <= PIXEL_TOL_FLOAT
    assert byte_err <= PIXEL_TOL_8BIT
    assert np.abs(ours[0] - ours[1]).max() > 0.05  # the seeds matter: equality is not trivial


def test_prediction_type_matters(reference_pipes, sdrt_pipes):
    """diffusers running the v folder as epsilon lands far from sdrt's v images: parity above is not automatic."""
    wrong = diffusers_images(reference_pipes["v"], "Euler", prediction_type="epsilon")
    ours = sdrt_images(sdrt_pipes["v"], "Euler")
    assert np.abs(wrong - ours).max() > WRONG_PREDICTION_MIN_ERR


# --- single files --------------------------------------------------------------------------------------------------

def _unet_output(model):
    g = torch.Generator().manual_seed(SEED)
    sample, t = torch.randn(2, 4, 9, 12, generator=g), torch.rand(2, generator=g) * 1000
    context = torch.randn(2, 77, SD2_CONTEXT_DIM, generator=g)
    with torch.no_grad():
        return model.unet(sample, t, context).sample


def _text_output(model):
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        return model.text_encoder(ids).last_hidden_state


def _max_abs(a, b) -> float:
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def folder_models(folders):
    return {v: load_source(folder) for v, folder in folders.items()}


@pytest.mark.parametrize("variant, name", [("v", "tiny-sd2-v.safetensors"), ("eps", "tiny-sd2.ckpt")])
def test_single_file_matches_its_folder(tmp_path, folder_models, variant, name):
    prediction = VARIANTS[variant]
    path = save_tiny_sd2_single_file(tmp_path / name, prediction)
    model = load_source(path, save_tiny_sd2_yaml(tmp_path / "tiny.yaml", prediction))
    folder = folder_models[variant]
    assert _max_abs(_unet_output(model), _unet_output(folder)) <= SINGLE_FILE_TOL
    assert _max_abs(_text_output(model), _text_output(folder)) <= SINGLE_FILE_TOL
    assert float(_unet_output(model).abs().max()) > 0.1
    assert model.text_encoder.config.num_hidden_layers == folder.text_encoder.config.num_hidden_layers
    for key in ("attention_head_dim", "use_linear_projection", "upcast_attention", "cross_attention_dim"):
        assert model.unet.config[key] == folder.unet.config[key], key
    for key in ("beta_start", "beta_end", "beta_schedule", "steps_offset", "prediction_type", "_class_name"):
        assert model.scheduler[key] == SD2_SCHEDULERS[prediction][key], key
    assert (model.pad_token, model.prediction_type_from) == ("!", "original_config")
    # A single file's default size is the family's training size: 768 for SD2 v, 512 for epsilon.
    assert model_info(model, None).default_size == {"v": 768, "eps": 512}[variant]


# --- detection: family from the weights, prediction type from request, yaml, metadata or a forward pass --------------

@pytest.fixture(scope="module")
def sd2_file(tmp_path_factory):
    return save_tiny_sd2_single_file(tmp_path_factory.mktemp("sd2") / "tiny-sd2.safetensors", "v_prediction")


def _with(path, out, *, metadata=None, edit=None):
    """A copy of a single file with other header metadata, and/or its state dict edited."""
    state = load_file(path)
    if edit is not None:
        edit(state)
    save_file(state, out, metadata=metadata)
    return out


def _silence_unet(state):
    # conv_out all zeros: the UNet outputs 0 whatever its input, as no epsilon model would (slope 0 < 0.5).
    for leaf in ("weight", "bias"):
        state[f"model.diffusion_model.out.2.{leaf}"].zero_()


def test_yaml_layer_last_keeps_every_text_block(tmp_path, sd2_file):
    """FrozenOpenCLIPEmbedder(layer="last") runs all blocks; SD2's "penultimate" drops one (the folder's layout)."""
    config = yaml.safe_load(save_tiny_sd2_yaml(tmp_path / "t.yaml", "v_prediction").read_text())
    config["model"]["params"]["cond_stage_config"]["params"]["layer"] = "last"
    (tmp_path / "last.yaml").write_text(yaml.safe_dump(config))
    last = load_source(sd2_file, tmp_path / "last.yaml")
    penultimate = load_source(sd2_file, tmp_path / "t.yaml")
    assert last.text_encoder.config.num_hidden_layers == penultimate.text_encoder.config.num_hidden_layers + 1
    assert _max_abs(_text_output(last), _text_output(penultimate)) > 0.1


def test_family_from_the_weights(tmp_path, sd2_file):
    sd1 = single_file.read_checkpoint(save_tiny_single_file(tmp_path / "sd1.safetensors"))
    assert detect_family(sd1) == "sd1"
    assert detect_family(single_file.read_checkpoint(sd2_file)) == "sd2"


def test_family_errors(tmp_path, sd2_file):
    state = single_file.read_checkpoint(sd2_file)
    unet_only = {k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}
    with pytest.raises(ExportError, match="no SD1 or SD2 text encoder"):
        detect_family(unet_only)
    with pytest.raises(ExportError, match="SDXL-style"):
        detect_family({**unet_only, "conditioner.embedders.1.model.token_embedding.weight": torch.zeros(8, 4)})
    sd1_text = single_file.read_checkpoint(save_tiny_single_file(tmp_path / "sd1.safetensors"))
    mixed = {**unet_only, **{k: v for k, v in sd1_text.items() if k.startswith("cond_stage_model.")}}
    with pytest.raises(ExportError, match="cross-attends to 64-wide text but the sd1 text encoder is 32 wide"):
        detect_family(mixed)


def test_prediction_type_precedence(tmp_path, sd2_file):
    """request > the user's yaml > ModelSpec metadata > the forward-pass test."""
    v_yaml = save_tiny_sd2_yaml(tmp_path / "v.yaml", "v_prediction")
    eps_yaml = save_tiny_sd2_yaml(tmp_path / "eps.yaml", "epsilon")
    silent = _with(sd2_file, tmp_path / "silent.safetensors", edit=_silence_unet)
    declared_eps = _with(silent, tmp_path / "eps.safetensors", metadata={"modelspec.prediction_type": "epsilon"})
    cases = [
        (silent, eps_yaml, None, "v_prediction", "forward_pass"),
        (declared_eps, eps_yaml, None, "epsilon", "metadata"),
        (declared_eps, v_yaml, None, "v_prediction", "original_config"),
        (declared_eps, v_yaml, "epsilon", "epsilon", "request"),
    ]
    for path, yaml_path, requested, prediction, found_by in cases:
        model = _load_with_tiny_yaml(path, yaml_path, requested, use_yaml=found_by in ("original_config", "request"))
        assert (model.scheduler["prediction_type"], model.prediction_type_from) == (prediction, found_by)
        assert model.unet.config.upcast_attention == (prediction == "v_prediction")


def _load_with_tiny_yaml(path, yaml_path, requested, use_yaml):
    """load_source, with the tiny yaml standing in for the shipped full-size one when the user gave none."""
    if use_yaml:
        return load_source(path, yaml_path, requested)
    with pytest.MonkeyPatch.context() as mp:  # the shipped yamls are full size; these weights are tiny
        mp.setattr(single_file, "shipped_config", lambda family, prediction: yaml_path)
        return load_source(path, None, requested)


def test_forward_pass_rule():
    """An epsilon model returns about its noise input at t=999 (slope ~1), a v model about the data mean (~0)."""
    class Stub(torch.nn.Module):
        config = SimpleNamespace(in_channels=4, cross_attention_dim=8)

        def __init__(self, respond):
            super().__init__()
            self.respond = respond

        def forward(self, x, t, context, return_dict=False):
            assert (t.tolist(), context.shape) == ([999], (1, 2, 8))
            return (self.respond(x),)

    mean = torch.linspace(-1, 1, 16)[None, None, :, None].expand(1, 4, 16, 16)
    assert prediction_from_forward_pass(Stub(lambda x: 0.98 * x)) == ("epsilon", pytest.approx(0.98))
    assert prediction_from_forward_pass(Stub(lambda x: 0.07 * x - mean))[0] == "v_prediction"


def test_request_overrides_a_folder(folder_models):
    model = folder_models["v"]
    assert model_info(model, "epsilon").prediction_type == "epsilon"
    assert (model_info(model, None).prediction_type, model.prediction_type_from) == ("v_prediction", "scheduler_config")


# --- shipped configs -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon"])
def test_shipped_v2_yamls_give_sd2_configs(prediction):
    config = read_original_config(shipped_config("sd2", prediction))
    unet = create_unet_diffusers_config_from_ldm(config, {})
    assert unet["block_out_channels"] == [320, 640, 1280, 1280]
    assert (unet["attention_head_dim"], unet["cross_attention_dim"]) == ([5, 10, 20, 20], 1024)
    assert (unet["use_linear_projection"], unet["layers_per_block"]) == (True, 2)
    assert yaml_prediction_type(config) == prediction
    assert cond_stage_layer(config) == "penultimate"
    sched = scheduler_config(config, family="sd2")
    assert (sched["prediction_type"], sched["beta_start"], sched["beta_end"]) == (prediction, 0.00085, 0.012)
    assert sched["_class_name"] == {"v_prediction": "DDIMScheduler", "epsilon": "PNDMScheduler"}[prediction]


def test_open_clip_h14_text_config_from_full_size_shapes():
    """ViT-H/14's 24 blocks, conditioned on the penultimate: diffusers' 23-layer CLIPTextModel of SD 2.x."""
    shapes = {"token_embedding.weight": (49408, 1024), "positional_embedding": (77, 1024),
              "transformer.resblocks.0.mlp.c_fc.weight": (4096, 1024)}
    state = {PREFIX + k: torch.empty(s, device="meta") for k, s in shapes.items()}
    config = open_clip_text_config(state, layers=23)
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (1024, 23, 16)
    assert (config["intermediate_size"], config["hidden_act"], config["vocab_size"]) == (4096, "gelu", 49408)
    assert config["max_position_embeddings"] == 77
