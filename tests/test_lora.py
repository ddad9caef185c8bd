"""LoRA parity: sdrt applying a LoRA file at load (ONNX Runtime, OpenVINO f32) against diffusers' load_lora_weights +
fuse_lora(lora_scale=...) on the same tiny model, prompt and seed; several LoRAs, strengths, old bundles, int8."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from tiny_models import diffusers_reference  # noqa: E402

from sdrt.bundle import MANIFEST, read_manifest  # noqa: E402
from sdrt.errors import RequestError  # noqa: E402
from sdrt.runtime.lora import Adapters  # noqa: E402
from sdrt.runtime.pipeline import Pipeline  # noqa: E402
from sdrt.runtime.request import GenerationRequest  # noqa: E402

# Max abs difference per pixel of the decoded images in [0, 1], sdrt vs diffusers (the 1/255).
PIXEL_TOL = 1.0 / 255
# A LoRA must move the image by more than this, or parity would not show that it was applied.
MIN_EFFECT = 0.05
# int8 UNets: the output with a LoRA may be as far from fp32's with that LoRA as the int8 output without it is from
# fp32's, twice over (weights quantized again with the change), plus this (outputs are O(1) noise predictions).
INT8_SLACK = 0.02
PROMPT, SEED, STEPS, SIZE, STRENGTH = "a red circle on a blue background", 3, 6, 64, 0.8
ENGINES = [("onnxruntime", {}), ("openvino", {"precision": "f32"})]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Compiled blobs go to a temporary XDG cache, never the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))


def diffusers_image(folder: Path, loras: list[tuple[Path, float]] = ()) -> np.ndarray:
    """diffusers' image with each LoRA fused in turn at its strength (load, fuse_lora, unload keeps it fused)."""
    pipe = diffusers_reference(diffusers.StableDiffusionPipeline, folder)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.base_scheduler_config)
    for path, strength in loras:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
        pipe.fuse_lora(lora_scale=strength)
        pipe.unload_lora_weights()
    generator = torch.Generator("cpu").manual_seed(SEED)
    out = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, width=SIZE, height=SIZE, generator=generator,
               output_type="np")
    return out.images[0]


def sdrt_image(pipe: Pipeline, **fields) -> np.ndarray:
    """sdrt's image, decoded in float before rounding to 8 bits (as the pipeline parity test compares)."""
    defaults = dict(steps=STEPS, guidance_scale=7.5, sampler="Euler", seed=SEED, width=SIZE, height=SIZE)
    req = GenerationRequest(PROMPT, **{**defaults, **fields})
    *_, last = pipe.denoise(req)
    latents = (last.vp_latents() / pipe.manifest.model.latent_scale_factor).astype(np.float32)
    image = pipe.prepared("vae_decoder", {"latents": latents}).run({"latents": latents})["image"]
    return np.clip(image / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)[0]


@pytest.fixture(scope="module")
def base_image(tiny_sd1_dir) -> np.ndarray:
    return diffusers_image(tiny_sd1_dir)


# Every format on ONNX Runtime; on OpenVINO the kohya file (UNet and text encoder): how a file is read does not
# depend on the engine, how its changes are applied does.
PARITY_CASES = [("kohya", *ENGINES[0]), ("peft", *ENGINES[0]), ("text_only", *ENGINES[0]), ("kohya", *ENGINES[1])]


@pytest.mark.parametrize("fmt,backend,options", PARITY_CASES, ids=[f"{f}-{e}" for f, e, _ in PARITY_CASES])
def test_lora_matches_diffusers(tiny_sd1_dir, tiny_sd1_bundle, tiny_loras, base_image, fmt, backend, options,
                                record_property):
    lora = tiny_loras[fmt]
    expected = diffusers_image(tiny_sd1_dir, [(lora, STRENGTH)])
    with Pipeline.load(tiny_sd1_bundle, backend=backend, **options) as pipe:
        got = sdrt_image(pipe, loras=[(lora, STRENGTH)])
    error, effect = float(np.abs(got - expected).max()), float(np.abs(expected - base_image).max())
    record_property("max_abs", error)
    print(f"{fmt} on {backend}: max abs {error:.2e}, LoRA effect {effect:.2f}")
    assert effect > MIN_EFFECT
    assert error <= PIXEL_TOL


def test_several_loras_and_strengths(tiny_sd1_dir, tiny_sd1_bundle, tiny_loras, record_property):
    """Two LoRAs at once, one negative, and a strength change on the same pipeline (no file read again)."""
    loras = [(tiny_loras["kohya"], 0.5), (tiny_loras["peft"], -0.3)]
    with Pipeline.load(tiny_sd1_bundle, backend="onnxruntime") as pipe:
        first = sdrt_image(pipe, loras=[(tiny_loras["kohya"], 0.2)])
        files = dict(pipe._adapters._files)
        got = sdrt_image(pipe, loras=loras)
        assert pipe._adapters._files.keys() - files.keys() == {next(k for k in pipe._adapters._files
                                                                    if "peft" in k[0])}
        again = sdrt_image(pipe, loras=[(tiny_loras["kohya"], 0.2)])
        base = sdrt_image(pipe)
    expected = diffusers_image(tiny_sd1_dir, loras)
    record_property("max_abs", float(np.abs(got - expected).max()))
    assert np.abs(got - expected).max() <= PIXEL_TOL
    assert np.array_equal(first, again)  # back to the first strength: the same image
    assert np.abs(first - base).max() > MIN_EFFECT / 4  # ... which is not the base image either


def test_pt_file_reads_as_its_safetensors_twin(tiny_sd1_bundle, tiny_loras):
    """A .pt LoRA (through the arrays-only unpickler) gives the image its .safetensors copy gives."""
    with Pipeline.load(tiny_sd1_bundle, backend="onnxruntime") as pipe:
        from_pt = sdrt_image(pipe, loras=[(tiny_loras["kohya_pt"], STRENGTH)])
        from_safetensors = sdrt_image(pipe, loras=[(tiny_loras["kohya"], STRENGTH)])
    assert np.array_equal(from_pt, from_safetensors)


@pytest.fixture(scope="module")
def old_bundle(tiny_sd1_bundle, tmp_path_factory) -> Path:
    """The tiny bundle as exported before weights maps: no map files, no `weights_map` in the manifest."""
    out = tmp_path_factory.mktemp("old") / "tiny-sd1-old"
    shutil.copytree(tiny_sd1_bundle, out)
    manifest = json.loads((out / MANIFEST).read_text())
    for comp in manifest["components"].values():
        rel = comp.pop("weights_map")
        manifest["files"].pop(rel)
        (out / rel).unlink()
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("backend,options", ENGINES, ids=[e for e, _ in ENGINES])
def test_bundle_without_weights_map_derives_it(tiny_sd1_dir, old_bundle, tiny_loras, backend, options):
    assert not read_manifest(old_bundle).components["unet"].weights_map
    expected = diffusers_image(tiny_sd1_dir, [(tiny_loras["kohya"], STRENGTH)])
    with Pipeline.load(old_bundle, backend=backend, **options) as pipe:
        got = sdrt_image(pipe, loras=[(tiny_loras["kohya"], STRENGTH)])
    assert np.abs(got - expected).max() <= PIXEL_TOL


def test_openvino_ir_uses_its_recorded_map(tiny_sd1_openvino_bundle, tiny_sd1_bundle, tiny_loras):
    """The converted IR's own map (OpenVINO Constant names) gives the image the ONNX bundle gives on OpenVINO."""
    component = read_manifest(tiny_sd1_openvino_bundle).components["unet"]
    assert json.loads((tiny_sd1_openvino_bundle / component.weights_map).read_text())["format"] == "openvino"
    images = []
    for bundle in (tiny_sd1_openvino_bundle, tiny_sd1_bundle):
        with Pipeline.load(bundle, backend="openvino", precision="f32") as pipe:
            images.append(sdrt_image(pipe, loras=[(tiny_loras["kohya"], STRENGTH)]))
    assert np.abs(images[0] - images[1]).max() <= 1e-5


def test_strength_is_in_the_compiled_model_cache_key(tiny_sd1_openvino_bundle, tiny_loras, tmp_path):
    """OpenVINO blobs: one per strength; the same strength again is a cache hit, not a new blob."""
    from sdrt.backends.openvino import OpenVinoBackend

    def blobs_after(strength: float) -> int:
        backend = OpenVinoBackend(precision="f32", cache_dir=tmp_path)
        with Pipeline(tiny_sd1_openvino_bundle, read_manifest(tiny_sd1_openvino_bundle), backend) as pipe:
            sdrt_image(pipe, loras=[(tiny_loras["kohya"], strength)], steps=1)
        return len(list(tmp_path.glob("*.entry/model.blob")))  # sdrt.cache.EngineCache entries

    base = blobs_after(0.0)  # strength 0 changes nothing: the plain model's blobs
    first = blobs_after(0.5)
    assert first == base + 2  # a new UNet and a new text encoder
    assert blobs_after(0.5) == first
    assert blobs_after(0.7) == first + 2


def test_lora_for_another_model_is_refused_before_any_engine_runs(tiny_sd1_bundle, tiny_loras, tmp_path):
    from safetensors.numpy import save_file

    wrong = tmp_path / "other.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": np.zeros((4, 5, 3, 3), np.float32),
               "lora_unet_conv_in.lora_up.weight": np.zeros((32, 4, 1, 1), np.float32)}, str(wrong))
    missing = tmp_path / "missing.safetensors"
    save_file({"lora_unet_no_such_layer.lora_down.weight": np.zeros((4, 5), np.float32),
               "lora_unet_no_such_layer.lora_up.weight": np.zeros((6, 4), np.float32)}, str(missing))
    with Pipeline.load(tiny_sd1_bundle, backend="onnxruntime") as pipe:
        with pytest.raises(RequestError, match=r"conv_in.weight: expected \[32, 4, 3, 3\], got \[32, 5, 3, 3\]"):
            sdrt_image(pipe, loras=[wrong])
        with pytest.raises(RequestError, match="unet has no weight no.such.layer.weight"):
            sdrt_image(pipe, loras=[missing])


def _unet_feeds(seed: int) -> dict[str, np.ndarray]:
    """Random inputs of one tiny-UNet call (batch 1, 64x64 pixels, cross-attention width 32)."""
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((1, 4, 8, 8), dtype=np.float32),
            "timestep": np.full(1, rng.uniform(0, 1000), np.float32),
            "encoder_hidden_states": rng.standard_normal((1, 77, 32), dtype=np.float32)}


@pytest.mark.parametrize("quantize", [False, True], ids=["int8-weights", "int8-quantized"])
def test_int8_unets_keep_int8_and_follow_the_lora(tiny_sd1_bundle, tiny_loras, tmp_path, quantize, record_property):
    """int8 IR (weights only, or NNCF-quantized with SmoothQuant on the feed-forward input, as bundles converted
    before SmoothQuant was turned off have it): the change is quantized again per channel as NNCF does; the UNet with
    the LoRA is as close to fp32's with the LoRA as it is without."""
    from sdrt.backends.openvino import OpenVinoBackend
    from sdrt.export.openvino import QUANTIZATION_SCHEMES, convert_component
    from sdrt.runtime.lora import given_lora

    fp32 = read_manifest(tiny_sd1_bundle).components["unet"]
    calibration = [_unet_feeds(seed) for seed in range(8)] if quantize else None
    scheme = replace(QUANTIZATION_SCHEMES[0], smooth_quant=True)
    int8 = convert_component(tiny_sd1_bundle, fp32, tmp_path, "int8", calibration, scheme)
    deltas = Adapters().deltas((given_lora((tiny_loras["kohya"], STRENGTH)),), "unet")
    feeds, out = _unet_feeds(100), {}
    for name, root, component in (("fp32", tiny_sd1_bundle, fp32), ("int8", tmp_path, int8)):
        for suffix, change in (("", None), ("+lora", deltas)):
            session = OpenVinoBackend(precision="f32", cache=False).load(root, component, change)
            session.prepare(component.contract.check_inputs(feeds))
            out[name + suffix] = session.run(feeds)["model_output"]
    base_gap = float(np.abs(out["int8"] - out["fp32"]).max())
    lora_gap = float(np.abs(out["int8+lora"] - out["fp32+lora"]).max())
    record_property("int8_gap", base_gap)
    record_property("int8_lora_gap", lora_gap)
    print(f"{int8.precision}: {base_gap:.3f} without LoRA, {lora_gap:.3f} with")
    assert int8.precision.startswith("int8")
    if quantize:  # the smoothed path is the one exercised
        import openvino as ov

        from sdrt.backends.openvino_weights import SMOOTH_QUANT
        names = [op.get_friendly_name() for op in ov.Core().read_model(str(tmp_path / int8.file)).get_ops()]
        assert any(name.endswith(SMOOTH_QUANT) for name in names)
    assert lora_gap <= 2 * base_gap + INT8_SLACK
    assert np.abs(out["int8+lora"] - out["int8"]).max() > 10 * lora_gap  # the LoRA is applied, not lost


def test_adapters_key_changes_with_strength_not_with_reading(tiny_loras):
    adapters = Adapters()
    spec = GenerationRequest(PROMPT, loras=[(tiny_loras["kohya"], 0.5)]).loras
    from sdrt.runtime.lora import given_lora

    first = adapters.deltas(tuple(map(given_lora, spec)), "unet")
    other = adapters.deltas((given_lora((tiny_loras["kohya"], 0.6)),), "unet")
    same = adapters.deltas((given_lora((tiny_loras["kohya"], 0.5)),), "unet")
    assert first.key == same.key != other.key
    assert len(adapters._files) == 1
    assert adapters.deltas((replace(given_lora(tiny_loras["kohya"]), unet=0.0),), "unet") is None


def test_shipped_fp16_model_takes_loras(tmp_path, record_property):
    """The shipped model stores fp16 (and, until exported again, predates weights maps: its map is then derived from
    node names); changed weights are rounded to fp16. Its image with a LoRA is as close to diffusers' (fp32
    weights) as its image without one, within twice that gap (fp16 rounds weight + change as it rounded the weight)."""
    from tiny_loras import kohya_state_dict, save

    from sdrt.runtime.pipeline import default_bundle

    folder = Path(__file__).resolve().parent.parent / "models" / "sdrt-shapes"
    assert read_manifest(default_bundle()).components["unet"].weights_storage == "fp16"
    reference = diffusers_reference(diffusers.StableDiffusionPipeline, folder)
    lora = [(save(kohya_state_dict(reference.unet, reference.text_encoder), tmp_path / "shapes.safetensors"), 0.3)]
    expected, expected_base = diffusers_image(folder, lora), diffusers_image(folder)
    with Pipeline.load(None, backend="onnxruntime") as pipe:
        got, got_base = sdrt_image(pipe, loras=lora), sdrt_image(pipe)
    gap, base_gap = float(np.abs(got - expected).max()), float(np.abs(got_base - expected_base).max())
    record_property("max_abs", gap)
    print(f"shipped: {gap:.4f} with the LoRA, {base_gap:.4f} without")
    assert np.abs(expected - expected_base).max() > MIN_EFFECT
    assert gap <= max(2 * base_gap, 2 * PIXEL_TOL)
