"""Core ML bundles, as far as Linux can check them: the shipped model's source exported to Core ML (sdrt.export.coreml)
and single components converted with the costlier options (enumerated sizes, palettes; a tiny model's safety checker),
each package's signature read back against its contract, compressed weight sizes, the manifest and `sdrt info`,
sizes the runtime refuses, and the backend's macOS-only refusal and its torch-free parts. The whole tiny model
(original attention, int8, safety checker) is exported in the slow tier.

Core ML prediction needs macOS: tests/test_coreml_macos.py (-m macos) generates there against ONNX Runtime.
"""
from __future__ import annotations

import math
import sys
from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("coremltools")
pytest.importorskip("torch")

from sdrt.backends import get_backend  # noqa: E402
from sdrt.backends.coreml import CompiledModels, batch_chunks, pick_shape  # noqa: E402
from sdrt.bundle import read_manifest, verify_files  # noqa: E402
from sdrt.cli import main  # noqa: E402
from sdrt.errors import BackendError, BundleError, ExportError, RequestError  # noqa: E402
from sdrt.export.coreml_package import check_package  # noqa: E402
from sdrt.runtime.request import GenerationRequest  # noqa: E402

MIN_PSNR_DB = 35.0  # ml-stable-diffusion's bar for every conversion step (torch2coreml.py ABSOLUTE_MIN_PSNR)
COMPRESSED_MIN_PSNR_DB = 30.0  # the export's gate for compressed weights' image against fp16 weights
PALETTE_ENTRIES = 64  # 6-bit palettes
WIDE = (96, 64)  # a second size, built as an enumerated shape


def _ops(package, op_type: str) -> list:
    import coremltools as ct

    spec = ct.utils.load_spec(str(package))
    block = next(iter(spec.mlProgram.functions["main"].block_specializations.values()))
    return [op for op in block.operations if op.type == op_type]


def _output_types(package) -> set[str]:
    import coremltools as ct
    from coremltools.proto import MIL_pb2

    spec = ct.utils.load_spec(str(package))
    block = next(iter(spec.mlProgram.functions["main"].block_specializations.values()))
    return {MIL_pb2.DataType.Name(out.type.tensorType.dataType) for op in block.operations for out in op.outputs}


def _dims(value) -> list[int]:
    return [d.constant.size for d in value.type.tensorType.dimensions]


def _package_bytes(package) -> int:
    return sum(p.stat().st_size for p in package.rglob("*") if p.is_file())


def test_shipped_source_exports_every_component(coreml_shapes_bundle):
    m = read_manifest(coreml_shapes_bundle)
    assert list(m.components) == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    assert {c.format for c in m.components.values()} == {"coreml"}
    assert {c.precision for c in m.components.values()} == {"fp16"}
    assert m.shapes.sizes == ((64, 64),)
    unet = m.components["unet"]
    assert [dict(s) for s in unet.shapes] == [  # the guidance pair in one call
        {"batch": 2, "sequence": 77, "latent_height": 8, "latent_width": 8},
    ]
    assert [dict(s) for s in m.components["text_encoder"].shapes] == [{"batch": 1}]
    assert m.tools["coremltools"] and "onnx" not in m.tools


def test_every_file_inside_the_packages_is_checksummed(coreml_shapes_bundle):
    m = read_manifest(coreml_shapes_bundle)
    for c in m.components.values():
        inside = {p.relative_to(coreml_shapes_bundle).as_posix() for p in (coreml_shapes_bundle / c.file).rglob("*")
                  if p.is_file()}
        assert inside and inside <= set(m.files), c.name
    verify_files(coreml_shapes_bundle, m, remembered=False)


def test_a_file_slipped_into_a_package_is_refused(coreml_shapes_bundle, tmp_path):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(coreml_shapes_bundle, copy)
    (copy / "unet" / "model.mlpackage" / "Data" / "extra.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match="component unet would open unet/model.mlpackage/Data/extra.bin, which its "
                       "manifest entry does not list"):
        verify_files(copy, read_manifest(copy), remembered=False)


def test_rewrites_and_traces_are_validated_at_every_size(coreml_shapes_bundle):
    for c in read_manifest(coreml_shapes_bundle).components.values():
        v = c.validation
        assert v["form_psnr_db"] is None or v["form_psnr_db"] >= MIN_PSNR_DB, c.name  # None: identical
        assert len(v["shapes_checked"]) == len(c.shapes), c.name
        assert v["package"] == {"specification_version": 8, "signature": "matches the contract"}
        if sys.platform != "darwin":
            assert v["prediction"] == "not run: Core ML predicts on macOS only"
    unet = read_manifest(coreml_shapes_bundle).components["unet"].validation
    assert unet["attention"] == "split_einsum"
    assert set(unet["rewrite"]) == {"spatial transformer", "attention", "linear as 1x1 conv", "layer norm",
                                    "feed-forward"}
    for entry in unet["rewrite"].values():
        for key in ("min_psnr_db_real", "min_psnr_db_random"):
            assert entry[key] is None or entry[key] >= MIN_PSNR_DB


def test_package_signatures_match_the_contracts(coreml_shapes_bundle):
    import coremltools as ct

    root = coreml_shapes_bundle
    spec = ct.utils.load_spec(str(root / "unet" / "model.mlpackage"))
    sample = next(f for f in spec.description.input if f.name == "sample").type.multiArrayType
    assert tuple(sample.shape) == (2, 4, 8, 8) and not sample.enumeratedShapes.shapes
    types = {f.name: ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(f.type.multiArrayType.dataType)
             for f in (*spec.description.input, *spec.description.output)}
    assert types == {"sample": "FLOAT32", "timestep": "FLOAT32", "encoder_hidden_states": "FLOAT32",
                     "model_output": "FLOAT32"}
    text = ct.utils.load_spec(str(root / "text_encoder" / "model.mlpackage")).description
    assert [(f.name, tuple(f.type.multiArrayType.shape)) for f in text.input] == [("inputs_embeds", (1, 77, 32))]


def test_a_package_unlike_its_contract_is_refused(coreml_shapes_bundle):
    component = read_manifest(coreml_shapes_bundle).components["vae_decoder"]
    renamed = replace(component.contract, inputs=(replace(component.contract.inputs[0], name="z"),))
    with pytest.raises(ExportError, match=r"inputs \['latents'\] and outputs \['image'\], expected \['z'\]"):
        check_package(coreml_shapes_bundle / component.file, renamed, component.shapes)
    wider = [{**dims, "latent_width": dims["latent_width"] + 1} for dims in component.shapes]
    with pytest.raises(ExportError, match=r"vae_decoder.latents: expected shape \(1, 4, 8, 9\), got \(1, 4, 8, 8\)"):
        check_package(coreml_shapes_bundle / component.file, component.contract, wider)


def test_timestep_embedding_stays_fp32_and_the_rest_computes_fp16(coreml_shapes_bundle):
    from coremltools.proto import MIL_pb2

    package = coreml_shapes_bundle / "unet" / "model.mlpackage"
    for op_type, dtype in (("sin", "FLOAT32"), ("cos", "FLOAT32"), ("conv", "FLOAT16"), ("softmax", "FLOAT16")):
        ops = _ops(package, op_type)
        assert ops, op_type
        assert {MIL_pb2.DataType.Name(op.outputs[0].type.tensorType.dataType) for op in ops} == {dtype}, op_type


def test_int8_weights_are_per_channel_int8(coreml_shapes_bundle):
    from coremltools.proto import MIL_pb2

    m = read_manifest(coreml_shapes_bundle)
    for name in ("text_encoder", "unet"):
        c = m.components[name]
        ops = _ops(coreml_shapes_bundle / c.file, "constexpr_affine_dequantize")
        record = c.validation["compression"]
        assert c.weights_storage == "int8" and len(ops) == record["weights"] > 0, name
        for op in ops:
            data, scale = op.attributes["quantized_data"], op.attributes["scale"]
            assert MIL_pb2.DataType.Name(data.type.tensorType.dataType) == "INT8"
            assert _dims(scale) == _dims(data)[:1]  # one scale per output channel
        assert record["package_bytes"] == _package_bytes(coreml_shapes_bundle / c.file)
        assert record["weights_stored_bytes"] < 0.6 * record["weights_fp16_bytes"], name  # 8 of 16 bits, + scales
    assert m.components["vae_decoder"].weights_storage == "fp16"
    assert not _ops(coreml_shapes_bundle / "vae_decoder" / "model.mlpackage", "constexpr_affine_dequantize")


def test_compression_image_psnr_is_measured_and_recorded(coreml_shapes_bundle):
    record = read_manifest(coreml_shapes_bundle).source["compression"]
    assert record["mode"] == "int8"
    assert record["psnr_db"] >= COMPRESSED_MIN_PSNR_DB and record["min_psnr_db"] == COMPRESSED_MIN_PSNR_DB
    assert record["max_pixel_difference"] > 0  # int8 changes the image: the measurement is not vacuous
    assert "decompressed as coremltools does" in record["method"] and record["request"]["size"] == [64, 64]


def _convert(source, name: str, root, attention: str = "split_einsum", mode: str | None = None, sizes=()):
    """One component of `source` converted as export_coreml converts it."""
    from sdrt.export.coreml import convert_component, exported_sizes, model_info, plan
    from sdrt.export.source import load_source

    model = load_source(source)
    info = model_info(model, None)
    exported = exported_sizes(model, info.default_size, info.vae_scale_factor, sizes)
    job = next(j for j in plan(model, source, attention, exported, info.vae_scale_factor, True) if j.name == name)
    return convert_component(job, root, attention, mode)


def test_palettized_weights_are_6_bit(tmp_path):
    from conftest import SHIPPED_SOURCE

    component, weights = _convert(SHIPPED_SOURCE, "text_encoder", tmp_path, mode="palette6")
    ops = _ops(tmp_path / component.file, "constexpr_lut_to_dense")
    record = component.validation["compression"]
    assert component.weights_storage == "palette6" and len(ops) == record["weights"] == len(weights) > 0
    for op in ops:
        shape = np.frombuffer(op.attributes["shape"].immediateValue.tensor.bytes.values, np.uint32)
        assert _dims(op.attributes["lut"]) == [PALETTE_ENTRIES]
        assert _dims(op.attributes["indices"]) == [math.ceil(math.prod(shape) * 6 / 8)]  # 6 bits each, packed
    assert record["weights_stored_bytes"] < 0.45 * record["weights_fp16_bytes"]  # 6 of 16 bits, + 64-entry tables


def test_enumerated_sizes_with_original_attention(tmp_path):
    import coremltools as ct

    from conftest import SHIPPED_SOURCE

    component, _ = _convert(SHIPPED_SOURCE, "vae_encoder", tmp_path, attention="original", sizes=(WIDE,))
    assert [(s["width"], s["height"]) for s in component.shapes] == [(64, 64), WIDE]
    assert len(component.validation["shapes_checked"]) == 2  # the trace is checked at every size
    assert component.validation["attention"] == "original"
    assert component.validation["rewrite"]["VAE attention"]["min_psnr_db_real"] >= MIN_PSNR_DB
    image = ct.utils.load_spec(str(tmp_path / component.file)).description.input[0].type.multiArrayType
    assert [tuple(s.shape) for s in image.enumeratedShapes.shapes] == [(1, 3, 64, 64), (1, 3, 64, 96)]
    assert _ops(tmp_path / component.file, "softmax")  # the attention survived conversion
    with pytest.raises(BackendError, match=r"built for \(latent_height 8, latent_width 8, height 64, width 64; "
                                           r"latent_height 8, latent_width 12, height 64, width 96\), got height 96"):
        pick_shape(component.contract, component.shapes, {"batch": 1, "height": 96, "width": 64})


def test_safety_checker_converts_in_fp32(tiny_sd1_safety_dir, tmp_path):
    component, _ = _convert(tiny_sd1_safety_dir, "safety_checker", tmp_path)
    assert component.precision == "fp32" and component.contract.full_precision  # its scores are thresholded
    assert component.validation["package"]["signature"] == "matches the contract"  # has_nsfw_concept as 0/1 fp32
    assert "FLOAT16" not in _output_types(tmp_path / component.file)  # no op computes in fp16


@pytest.mark.slow
def test_tiny_model_exports_with_original_attention_int8_and_safety_checker(coreml_tiny_bundle):
    m = read_manifest(coreml_tiny_bundle)
    assert list(m.components) == ["text_encoder", "unet", "vae_decoder", "vae_encoder", "safety_checker"]
    assert m.components["unet"].validation["attention"] == "original"
    assert m.components["unet"].weights_storage == "int8" and m.components["safety_checker"].precision == "fp32"
    record = m.source["compression"]
    assert record["mode"] == "int8" and (record["psnr_db"] is None or record["psnr_db"] >= COMPRESSED_MIN_PSNR_DB)
    verify_files(coreml_tiny_bundle, m, remembered=False)


def test_info_describes_a_coreml_bundle(coreml_shapes_bundle, capsys):
    assert main(["info", str(coreml_shapes_bundle)]) == 0
    out = capsys.readouterr().out
    assert "sizes      exactly 64x64 (built for these only)" in out
    assert "unet/model.mlpackage (coreml, fp16, int8 weights; torch form" in out
    assert "Core ML prediction: not run" in out or sys.platform == "darwin"
    assert "compressed int8 weights: PSNR" in out
    assert "checksums: OK" in out


def test_runtime_refuses_sizes_that_were_not_exported(coreml_shapes_bundle):
    m = read_manifest(coreml_shapes_bundle)
    resolved = GenerationRequest("x").resolve(m)
    assert (resolved.width, resolved.height) == (64, 64)
    with pytest.raises(RequestError, match=r"one of the sizes this bundle was exported for \(64x64\), got 96x64"):
        GenerationRequest("x", width=96, height=64).resolve(m)
    wider = replace(m, shapes=replace(m.shapes, sizes=((64, 64), WIDE)))
    GenerationRequest("x", width=96, height=64).resolve(wider)


@pytest.mark.skipif(sys.platform == "darwin", reason="the refusal is for every OS but macOS")
def test_coreml_backend_is_one_line_exit_2_off_macos(coreml_shapes_bundle, tmp_path, capsys):
    with pytest.raises(BackendError, match="^coreml: Core ML runs on macOS only, this is Linux"):
        get_backend("coreml")
    rc = main(["generate", "x", "-b", str(coreml_shapes_bundle), "-o", str(tmp_path / "o.png"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Core ML runs on macOS only" in err


@pytest.mark.skipif(sys.platform == "darwin", reason="the refusal is for every OS but macOS")
def test_the_coreml_backend_imports_no_torch(coreml_shapes_bundle, tmp_path):
    import subprocess

    from test_torch_free import BLOCKED, SCRIPT

    script = SCRIPT.format(blocked=BLOCKED, bundle=str(coreml_shapes_bundle), out=str(tmp_path / "o.png"), extra=[])
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Core ML runs on macOS only" in proc.stderr
    assert "LEAKED []" in proc.stdout


def test_export_options_are_checked(tmp_path, capsys):
    from conftest import SHIPPED_SOURCE

    assert main(["export", str(SHIPPED_SOURCE), "-o", str(tmp_path / "b"), "--attention", "original"]) == 2
    assert "--attention applies to --target coreml, not onnx" in capsys.readouterr().err
    assert main(["export", str(SHIPPED_SOURCE), "-o", str(tmp_path / "b"), "--target", "coreml",
                 "--weights-storage", "fp16"]) == 2
    assert "--weights-storage applies to --target onnx, not coreml" in capsys.readouterr().err
    assert main(["export", str(SHIPPED_SOURCE), "-o", str(tmp_path / "b"), "--target", "coreml",
                 "--sizes", "100x64"]) == 2
    assert "multiples of 32 pixels for this model (its UNet halves the latents 2 times), got 100x64" in \
        capsys.readouterr().err
    assert not (tmp_path / "b").exists()


# --- the backend's torch-free parts: shape choice, batch splitting, the compiled-model cache ---------------------

def test_pick_shape_names_the_exported_shapes(coreml_shapes_bundle):
    unet = read_manifest(coreml_shapes_bundle).components["unet"]
    dims = {"batch": 4, "sequence": 77, "latent_height": 8, "latent_width": 8}
    assert pick_shape(unet.contract, unet.shapes, dims)["batch"] == 2  # any batch runs, split into pairs
    with pytest.raises(BackendError, match=r"unet: expected one of the shapes the package was built for \(sequence "
                                           r"77, latent_height 8, latent_width 8\), got sequence 154"):
        pick_shape(unet.contract, unet.shapes, {**dims, "sequence": 154})  # a prompt over 75 tokens


def test_batch_chunks_split_and_pad_to_the_built_batch():
    feeds = {"sample": np.arange(5 * 3, dtype=np.float32).reshape(5, 3), "timestep": np.arange(5.0)}
    chunks = list(batch_chunks(feeds, ["sample", "timestep"], 2))
    assert [len(c["sample"]) for c in chunks] == [2, 2, 2]
    np.testing.assert_array_equal(chunks[-1]["timestep"], [4.0, 4.0])  # the last item repeated
    joined = np.concatenate([c["sample"] for c in chunks])[:5]
    np.testing.assert_array_equal(joined, feeds["sample"])


def test_compiled_models_compile_once_per_package_and_toolchain(coreml_shapes_bundle, tmp_path):
    import shutil

    m = read_manifest(coreml_shapes_bundle)
    compiled = []

    def compile_by_copy(src, dst):  # stands in for coremltools' compile_model (macOS only): the cache's job is the rest
        compiled.append(src)
        shutil.copytree(src, dst)

    cache = CompiledModels(tmp_path / "cache", max_bytes=10**9)
    unet, package = m.components["unet"], coreml_shapes_bundle / m.components["unet"].file
    key = cache.key(unet, package, "toolchain A")
    first = cache.compiled(key, package, compile_by_copy)
    assert cache.compiled(key, package, compile_by_copy) == first and len(compiled) == 1  # the second load hit
    assert (first / "Manifest.json").is_file()
    assert key != cache.key(unet, package, "toolchain B")  # a macOS or coremltools update compiles again
    assert key != cache.key(m.components["vae_decoder"], package, "toolchain A")  # keyed on content, not path
    (first / "Manifest.json").write_text("{}")  # a damaged entry is compiled again
    cache.compiled(key, package, compile_by_copy)
    assert len(compiled) == 2
