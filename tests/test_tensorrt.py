"""The NVIDIA GPU path as far as a CPU goes: fp16 variants against fp32 (components and whole images, on ONNX
Runtime's CPU provider), TensorRT for RTX's parser, profiles and refit flags on every shipped component, the
`--check` report, profile arithmetic, engine cache keys, the weight-name map, and the one-line errors when TensorRT,
its CUDA bindings, the driver or a GPU is missing. Engines themselves need a GPU: tests/test_tensorrt_gpu.py."""
from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

from sdrt.backends import available_backends, get_backend
from sdrt.backends.cuda import INSUFFICIENT_DRIVER, NO_DEVICE, DeviceInfo, device_problem, version_text
from sdrt.backends.precision import PrecisionFallback
from sdrt.backends.tensorrt_profiles import (
    DYNAMIC, STATIC, dynamic_profile, input_shapes, static_profile,
)
from sdrt.bundle import ModelInfo, ShapeRange, read_manifest, verify_files
from sdrt.cache import EngineCache
from sdrt.errors import BackendError
from sdrt.runtime.image import psnr
from sdrt.runtime.pipeline import Pipeline, default_bundle
from sdrt.runtime.request import GenerationRequest

trt_module = pytest.importorskip("tensorrt_rtx")
from sdrt.backends.tensorrt import engine_identity  # noqa: E402
from sdrt.backends.tensorrt_build import builder_config, load_tensorrt, parse  # noqa: E402
from sdrt.backends.tensorrt_weights import changed_weights, weight_name_map  # noqa: E402
from sdrt.export.fp16_variant import float_initializers  # noqa: E402
from sdrt.export.tensorrt_check import check_component  # noqa: E402

# max |fp16 - fp32| / max |fp32| of a component's output (the shipped model measures 8e-4 text encoder, 7e-4 UNet).
FP16_RELATIVE_TOL = 1e-2
# sin/cos of the timestep embedding in the fp16 UNet: its arguments stay fp32, so only the fp16 rounding of the
# result (<= 2^-11 for |x| <= 1) remains. Computed in fp16, t = 987.3 would round to 987.5 and sin(t) move by 0.2.
SINUSOID_TOL = 1e-3
# Whole images, fp16 text encoder and UNet against fp32 on ONNX Runtime CPU: Apple's bound for two runtimes' images
# of one prompt and seed (ml-stable-diffusion ABSOLUTE_MIN_PSNR). The shipped model measures 39.9-56.5 dB here.
IMAGE_MIN_PSNR_DB = 35.0
SHIPPED_GATE_MIN_DB = 45.0  # the conversion's own gate image on the shipped model (measured 57.1 dB)


# A fresh interpreter in which importing a `blocked` package fails as if it were not installed, running the CLI.
BLOCKING = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {blocked!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
    sys.meta_path.insert(0, Block())
    from sdrt.cli import main
    sys.exit(main({argv!r}))
""")


def run_blocked(blocked: set[str], argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKING.format(blocked=blocked, argv=argv)], capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The shipped bundle through `sdrt convert --target tensorrt --check` with torch, diffusers and transformers
    unimportable (the conversion needs none of them): (bundle, the CLI's stderr)."""
    out = tmp_path_factory.mktemp("tensorrt") / "sdrt-shapes-trt"
    proc = run_blocked({"torch", "diffusers", "transformers"},
                       ["convert", str(default_bundle()), "-o", str(out), "--target", "tensorrt", "--check"])
    assert proc.returncode == 0, proc.stderr
    return out, proc.stderr


@pytest.fixture(scope="module")
def trt():
    return load_tensorrt()


def test_check_report_names_every_component_and_stops_before_the_gpu(converted):
    out, stderr = converted
    manifest = read_manifest(out)
    verify_files(out, manifest, remembered=False)
    for name in manifest.components:
        line = next(line for line in stderr.splitlines() if f"tensorrt_check: {name}: parsed" in line)
        assert "unsupported operators: none" in line and "refit on" in line
    assert stderr.count("(accepted)") == sum(len(c.contract.inputs) for c in manifest.components.values())
    assert "parsed unet/model.fp16.onnx" in stderr and "parsed vae_decoder/model.onnx" in stderr
    assert "engine build: stopped here, it needs the GPU: tensorrt needs an NVIDIA GPU driver" in stderr
    assert "Traceback" not in stderr


def test_fp16_variants_recorded_within_tolerance(converted):
    manifest = read_manifest(converted[0])
    assert {n for n, c in manifest.components.items() if c.variants} == {"text_encoder", "unet"}
    for name in ("text_encoder", "unet"):
        record = manifest.components[name].variants["fp16"].validation
        assert record["relative_error"] <= FP16_RELATIVE_TOL
        assert record["tolerance"] == FP16_RELATIVE_TOL
        assert record["inputs"]["random"] == 2 and record["inputs"]["real"] >= 1
    gate = manifest.source["validation"]
    assert gate["psnr_db"] >= SHIPPED_GATE_MIN_DB and gate["min_psnr_db"] == 30.0


def _io_types(path: Path) -> set[int]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return {t.type.tensor_type.elem_type for t in (*graph.input, *graph.output)}


def test_fp16_variant_graph_keeps_io_and_sensitive_ops_fp32(converted):
    out = converted[0]
    for name in ("text_encoder", "unet"):
        path = out / name / "model.fp16.onnx"
        assert _io_types(path) == _io_types(out / name / "model.onnx")  # int32 ids, fp32 tensors: the contract's
        model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
        types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input)}
        norms = [n for n in model.graph.node if n.op_type in ("LayerNormalization", "InstanceNormalization")]
        assert norms and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in norms)
        weights = float_initializers(path)
        assert sum(d == "float16" for d in weights.values()) > len(weights) / 2
        reference = float_initializers(out / name / "model.onnx")
        assert set(reference) <= set(weights)  # every weight keeps its name: TensorRT refits by name


def _with_sin_output(path: Path) -> tuple[bytes, str]:
    """The model with its Sin node's output (the timestep embedding's sines) as an extra graph output."""
    model = onnx.load(str(path))
    sin = next(n.output[0] for n in model.graph.node if n.op_type == "Sin")
    model.graph.output.append(onnx.helper.make_tensor_value_info(sin, onnx.TensorProto.FLOAT, None))
    return model.SerializeToString(), sin


def test_timestep_sinusoids_computed_in_fp32(converted):
    import onnxruntime as ort

    feeds = {"sample": np.zeros((2, 4, 8, 8), np.float32), "timestep": np.array([987.3, 411.7], np.float32),
             "encoder_hidden_states": np.zeros((2, 77, 32), np.float32)}
    values = []
    for file in ("model.onnx", "model.fp16.onnx"):
        model, sin = _with_sin_output(converted[0] / "unet" / file)
        values.append(ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run([sin], feeds)[0])
    assert values[1].dtype == np.float32  # Sin itself runs in fp32 in the variant
    assert np.abs(values[0] - values[1]).max() <= SINUSOID_TOL


def _relative(expected: np.ndarray, got: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def test_fp16_components_against_fp32_on_fresh_inputs(converted):
    """Inputs the conversion never saw: a real prompt's ids and embeddings, the UNet at another size and batch."""
    out = converted[0]
    f32, f16 = (get_backend("onnxruntime", precision=p) for p in ("f32", "f16"))
    manifest = read_manifest(out)
    with Pipeline(out, manifest, f32) as ref, Pipeline(out, manifest, f16) as cand:
        prompts = ["a photograph of an orange cat on a red sofa, detailed", ""]
        a, b = ref.encode_prompts(prompts), cand.encode_prompts(prompts)
        assert _relative(a, b) <= FP16_RELATIVE_TOL
        rng = np.random.default_rng(5)
        feeds = {"sample": rng.standard_normal((2, 4, 12, 10)).astype(np.float32),
                 "timestep": np.array([873.25, 873.25], np.float32), "encoder_hidden_states": a}
        results = [p.prepared("unet", feeds).run(feeds)["model_output"] for p in (ref, cand)]
    assert _relative(*results) <= FP16_RELATIVE_TOL


@pytest.mark.parametrize("fields", [
    {"sampler": "Euler a", "steps": 20, "seed": 7},
    {"sampler": "DPM++ 2M", "steps": 20, "seed": 3, "width": 128, "height": 96},
])
def test_fp16_image_within_psnr_of_fp32(converted, fields):
    request = GenerationRequest(prompt="a blue triangle left of a yellow circle", watermark=False, **fields)
    images = []
    for precision in ("f32", "f16"):
        with Pipeline.load(converted[0], backend="onnxruntime", precision=precision) as pipe:
            images.append(pipe.generate(request)[0])
    assert psnr(images[0].image, images[1].image) >= IMAGE_MIN_PSNR_DB
    assert "Backend: onnxruntime fp16" in images[1].parameters and "Precision fallback" not in images[1].parameters


def test_nonfinite_fp16_output_reruns_in_fp32_and_says_so(converted, caplog):
    """Latents beyond fp16's range overflow the fp16 UNet (inf), not the fp32 one: that call is run again in fp32,
    every later call too, with a warning and a note in the image's parameters."""
    rng = np.random.default_rng(0)
    feeds = {"sample": (rng.standard_normal((2, 4, 8, 8)) * 3e4).astype(np.float32),
             "timestep": np.array([500.0, 500.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32)}
    with Pipeline.load(converted[0], backend="onnxruntime", precision="f16") as pipe:
        unet = pipe.session("unet")
        assert isinstance(unet, PrecisionFallback) and unet.note is None
        with caplog.at_level(logging.WARNING, logger="sdrt.backends.precision"):
            out = pipe.prepared("unet", feeds).run(feeds)["model_output"]
        assert np.isfinite(out).all()
        assert "fp16 outputs hold NaN or inf" in caplog.text
        with Pipeline.load(converted[0], backend="onnxruntime", precision="f32") as ref:
            expected = ref.prepared("unet", feeds).run(feeds)["model_output"]
        np.testing.assert_array_equal(out, expected)  # the fp32 graph, same engine: identical
        image = pipe.generate("a red circle", steps=3, seed=1)[0]
        assert "Precision fallback: unet fp32 (fp16 gave NaN/inf)" in image.parameters
        with pytest.raises(BackendError, match="not finite in fp32 either"):
            pipe.prepared("unet", feeds).run({**feeds, "sample": np.full_like(feeds["sample"], np.nan)})


@pytest.mark.parametrize("component", ["text_encoder", "unet", "vae_decoder", "vae_encoder"])
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_tensorrt_parses_profiles_and_refit_flags(trt, converted, component, precision):
    """Every component file TensorRT would build (fp16 variants and fp32 graphs): parsed, both profiles accepted,
    refit flag set, no unsupported operator, every float weight known to the network by its ONNX name."""
    out = converted[0]
    manifest = read_manifest(out)
    comp = manifest.components[component]
    report = check_component(trt, out, manifest, comp, precision)
    assert report.file == (comp.variants["fp16"].file if precision == "fp16" and comp.variants else comp.file)
    assert report.layers > 50 and report.refit and report.unsupported == []
    assert {n: d for n, (d, _) in report.inputs.items()} == {s.name: s.dtype for s in comp.contract.inputs}
    assert set(report.profiles) == {STATIC, DYNAMIC}
    assert report.weights == report.initializers > 10


def test_profiles_outside_the_network_are_refused(trt):
    comp = read_manifest(default_bundle()).components["text_encoder"]
    network = parse(trt, default_bundle() / comp.file)
    good = static_profile(comp.contract, {"inputs_embeds": (2, 77, 32)})
    assert builder_config(network, [good], refit=True).get_flag(trt.module.BuilderFlag.REFIT)
    inverted = dataclasses.replace(good, shapes={"inputs_embeds": ((4, 77, 32), (2, 77, 32), (1, 77, 32))})
    with pytest.raises(BackendError, match="refuses the static profile"):
        builder_config(network, [inverted], refit=True)


def test_weight_name_map_and_refit_values(trt):
    """Bundle weight names map to themselves in the engine; unknown names are left out; new values keep dtype."""
    comp = read_manifest(default_bundle()).components["unet"]
    path = default_bundle() / comp.file
    names = float_initializers(path)
    network = parse(trt, path)
    mapped = weight_name_map(network, [*names, "unet.no_such.weight"])
    assert mapped == {n: n for n in names}

    @dataclasses.dataclass(frozen=True)
    class Entry:  # the fields sdrt.weights_map.EngineWeight gives a refit step
        name: str
        transpose: bool

        def to_engine(self, value):
            return value.T if self.transpose else value

    base = {"w": np.arange(6, dtype=np.float16).reshape(2, 3)}
    delta = np.full((3, 2), 0.25, np.float32)
    steps = [(Entry("w", True), lambda: delta), (Entry("w", True), lambda: delta)]
    values = changed_weights(steps, base.__getitem__)
    assert values["w"].dtype == np.float16
    np.testing.assert_array_equal(values["w"], base["w"] + np.float16(0.5))


def _model() -> ModelInfo:
    return ModelInfo("sd1", "epsilon", 0.18215, default_size=512)


def test_dynamic_profile_arithmetic():
    manifest = read_manifest(default_bundle())
    comps, bounds = manifest.components, ShapeRange()
    unet = dynamic_profile(comps["unet"].contract, _model(), bounds, 77).shapes
    assert unet["sample"] == ((1, 4, 32, 32), (2, 4, 64, 64), (16, 4, 128, 128))  # 256-1024 px, 1-8 images x 2
    assert unet["timestep"] == ((1,), (2,), (16,))
    assert unet["encoder_hidden_states"] == ((1, 77, 32), (2, 77, 32), (16, 308, 32))  # 4 chunks of 77
    text = dynamic_profile(comps["text_encoder"].contract, _model(), bounds, 77).shapes
    assert text["inputs_embeds"] == ((1, 77, 32), (2, 77, 32), (64, 77, 32))  # 16 prompts x 4 chunks in one call
    vae = dynamic_profile(comps["vae_decoder"].contract, _model(), bounds, 77).shapes
    assert vae["latents"] == ((1, 4, 32, 32), (1, 4, 64, 64), (1, 4, 128, 128))  # one image per call
    encoder = dynamic_profile(comps["vae_encoder"].contract, _model(), bounds, 77).shapes
    assert encoder["image"] == ((1, 3, 256, 256), (1, 3, 512, 512), (1, 3, 1024, 1024))
    narrow = dynamic_profile(comps["unet"].contract, _model(), ShapeRange(min_size=384, max_size=768), 77)
    assert narrow.shapes["sample"][0][2:] == (48, 48) and narrow.shapes["sample"][2][2:] == (96, 96)


def test_profile_coverage_and_static_shapes():
    contract = read_manifest(default_bundle()).components["unet"].contract
    profile = dynamic_profile(contract, _model(), ShapeRange(), 77)
    inside = input_shapes(contract, {"batch": 4, "latent_height": 96, "latent_width": 40, "sequence": 154})
    assert profile.covers(inside)
    assert not profile.covers(input_shapes(contract, {"batch": 4, "latent_height": 136, "latent_width": 64,
                                                      "sequence": 77}))  # 1088 px: over the range
    assert not profile.covers(input_shapes(contract, {"batch": 18, "latent_height": 64, "latent_width": 64,
                                                      "sequence": 77}))  # 9 guided images
    static = static_profile(contract, inside)
    assert static.kind == STATIC and static.covers(inside) and static.shapes["sample"] == ((4, 4, 96, 40),) * 3
    assert static.identity() != profile.identity()


GPU = DeviceInfo(0, "NVIDIA GeForce RTX 4090", "8.9", "12.8", "12.8", 24 << 30)


def test_engine_cache_key_holds_everything_an_engine_depends_on(trt):
    manifest = read_manifest(default_bundle())
    comp = manifest.components["unet"]
    contract = comp.contract
    shapes = input_shapes(contract, {"batch": 2, "latent_height": 8, "latent_width": 8, "sequence": 77})
    profile = static_profile(contract, shapes)
    args = dict(trt=trt, gpu=GPU, component=comp, file=comp.file, precision="fp16", profile=profile, refit=True,
                bundle=default_bundle())
    base = EngineCache.key(engine_identity(**args))
    assert EngineCache.key(engine_identity(**args)) == base
    changed = {
        "weights": {"component": dataclasses.replace(comp, checksums={comp.file: "0" * 64})},
        "file": {"file": "unet/model.fp16.onnx"},
        "precision": {"precision": "fp32"},
        "profile": {"profile": dynamic_profile(contract, _model(), ShapeRange(), 77)},
        "refit": {"refit": False},
        "gpu": {"gpu": dataclasses.replace(GPU, name="NVIDIA GeForce RTX 3060")},
        "compute capability": {"gpu": dataclasses.replace(GPU, compute_capability="8.6")},
        "driver": {"gpu": dataclasses.replace(GPU, driver="13.0")},
        "tensorrt": {"trt": dataclasses.replace(trt, flavour="tensorrt")},
    }
    keys = {what: EngineCache.key(engine_identity(**{**args, **change})) for what, change in changed.items()}
    assert base not in keys.values() and len(set(keys.values())) == len(keys)
    assert comp.checksums["unet/model.onnx"] in str(engine_identity(**args))  # the manifest's verified sha256


def test_growing_cache_entries_are_replaced(tmp_path):
    """Engines are immutable entries; the timing cache is replaced as it grows (EngineCache.store(replace=True))."""
    cache = EngineCache(tmp_path, 1 << 30)
    key = EngineCache.key({"timing-cache": "test"})
    cache.store(key, "timing.cache", lambda p: p.write_bytes(b"first"))
    cache.store(key, "timing.cache", lambda p: p.write_bytes(b"second"))
    assert cache.lookup(key).read_bytes() == b"first"
    cache.store(key, "timing.cache", lambda p: p.write_bytes(b"third"), replace=True)
    assert cache.lookup(key).read_bytes() == b"third"
    assert [p.name for p in tmp_path.iterdir()] == [f"{key}.entry"]  # nothing set aside is left behind


def test_device_messages_name_the_fix():
    no_driver = device_problem(INSUFFICIENT_DRIVER, driver=0, runtime=13040, index=0, count=0)
    assert "no NVIDIA driver" in no_driver and "CUDA 13.4" in no_driver and "install the NVIDIA driver" in no_driver
    old_driver = device_problem(INSUFFICIENT_DRIVER, driver=12020, runtime=13040, index=0, count=0)
    assert "found driver for CUDA 12.2" in old_driver
    no_gpu = device_problem(NO_DEVICE, driver=12080, runtime=12080, index=0, count=0)
    assert "needs an NVIDIA GPU, and CUDA finds none" in no_gpu and "--backend onnxruntime" in no_gpu
    assert "GPU 2 not found, CUDA sees 1" in device_problem(0, 12080, 12080, index=2, count=1)
    assert (version_text(12080), version_text(0)) == ("12.8", "none")
    assert all("\n" not in m for m in (no_driver, old_driver, no_gpu))


def test_tensorrt_backend_without_a_driver_is_one_line_exit_2(tmp_path):
    """This machine has TensorRT for RTX and cuda-python but no NVIDIA driver: the real message, from the CLI."""
    assert "tensorrt" in available_backends(["onnx"])
    with pytest.raises(BackendError, match="NVIDIA GPU driver"):
        get_backend("tensorrt")
    proc = subprocess.run([sys.executable, "-m", "sdrt", "generate", "a red circle", "--backend", "tensorrt",
                           "-o", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("sdrt: error: tensorrt needs an NVIDIA GPU driver") and "install" in proc.stderr


@pytest.mark.parametrize("blocked,argv,expected", [
    (("tensorrt_rtx", "tensorrt"), ["generate", "a red circle", "--backend", "tensorrt"],
     "sdrt: error: backend 'tensorrt' needs the tensorrt-rtx package: pip install 'sdrt[tensorrt-rtx]'"),
    (("cuda",), ["generate", "a red circle", "--backend", "tensorrt"],
     "sdrt: error: tensorrt needs NVIDIA's CUDA Python bindings (cuda-python): pip install 'sdrt[tensorrt-rtx]'"),
    (("tensorrt_rtx", "tensorrt"), ["convert", str(default_bundle()), "-o", "OUT", "--target", "tensorrt", "--check"],
     "sdrt: error: the tensorrt backend needs TensorRT for RTX or TensorRT, which is not installed: "
     "pip install 'sdrt[tensorrt-rtx]'"),
])
def test_missing_packages_are_one_line_exit_2(tmp_path, blocked, argv, expected):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    if argv[0] == "generate":
        argv += ["-o", str(tmp_path / "x.png")]
    proc = run_blocked(set(blocked), argv)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(expected) and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "out").exists()


def test_external_data_models_convert_and_parse(trt, tmp_path, monkeypatch):
    """Full-size UNets keep their weights in `model.onnx.data` (over protobuf's 2 GiB): the fp16 variant of such a
    file is made from the graph's types plus the data file, written with its own data file, and TensorRT parses it
    from the path (forced here on the shipped UNet: the same code a 3.4 GB UNet takes)."""
    from sdrt.export import fp16_variant
    from sdrt.export.onnx_files import save_onnx

    source = tmp_path / "unet" / "model.onnx"
    source.parent.mkdir()
    save_onnx(onnx.load(str(default_bundle() / "unet" / "model.onnx")), source, external_data=True)
    monkeypatch.setattr(fp16_variant, "EXTERNAL_DATA_THRESHOLD", 0)
    written = fp16_variant.write_fp16_variant(source, tmp_path / "unet" / "model.fp16.onnx")
    assert [p.name for p in written] == ["model.fp16.onnx", "model.fp16.onnx.data"]
    assert written[0].stat().st_size < written[1].stat().st_size  # the graph here, the weights there
    network = parse(trt, written[0])
    names = float_initializers(written[0])
    assert weight_name_map(network, names) == {n: n for n in names}
    assert float_initializers(source).keys() <= names.keys()


def test_relative_error_fails_overflowed_outputs():
    from sdrt.export.fp16_variant import relative_error

    expected = np.array([1.0, -4.0, 2.0], np.float32)
    assert relative_error(expected, expected + np.float32(0.01)) == pytest.approx((0.01, 0.0025), rel=1e-4)
    for bad in (np.nan, np.inf):
        assert relative_error(expected, np.array([1.0, bad, 2.0], np.float32)) == (float("inf"), float("inf"))


def test_export_target_tensorrt_from_a_checkpoint(tiny_sd1_dir, tmp_path, capsys):
    """`sdrt export SRC --target tensorrt`: ONNX export, then the conversion, one bundle left (a random model too)."""
    from sdrt.cli import main

    out = tmp_path / "tiny-trt"
    assert main(["export", str(tiny_sd1_dir), "-o", str(out), "--target", "tensorrt"]) == 0
    printed = capsys.readouterr().out
    assert "fp16 variant unet/model.fp16.onnx" in printed and "image: PSNR" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-trt"]
    manifest = read_manifest(out)
    for name in ("text_encoder", "unet"):
        assert manifest.components[name].variants["fp16"].validation["relative_error"] <= FP16_RELATIVE_TOL


def test_lora_changes_reach_the_fp16_variant_by_the_same_names(tiny_sd1_bundle, tiny_loras, tmp_path):
    """Refit reads a LoRA's changes from the file the engine was built from: the fp16 variant keeps the fp32
    graph's initializer names, so the weights map finds them there, stored fp16 and within fp16's rounding."""
    from sdrt.backends.tensorrt import read_weight_changes
    from sdrt.export.tensorrt import convert_bundle
    from sdrt.runtime.lora import Adapters, LoraSpec

    out = tmp_path / "tiny-trt"
    convert_bundle(tiny_sd1_bundle, out)
    for component, strength in (("unet", 0.7), ("text_encoder", 0.5)):
        comp = read_manifest(out).components[component]
        deltas = Adapters().deltas((LoraSpec(tiny_loras["kohya"], "kohya", strength, strength),), component)
        fp32 = read_weight_changes(out, comp, comp.file, deltas)
        fp16 = read_weight_changes(out, comp, comp.variants["fp16"].file, deltas)
        assert fp32.keys() == fp16.keys() and len(fp32) == len(deltas.deltas) >= 4
        for name, value in fp32.items():
            assert fp16[name].dtype == np.float16
            np.testing.assert_allclose(fp16[name], value, rtol=2e-3, atol=2e-3)  # fp16 rounding of weight + change
