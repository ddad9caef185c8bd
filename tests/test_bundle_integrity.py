"""A bundle from a stranger: garbage manifests, paths leaving the folder, symbolic links, files an engine would open
that the manifest does not list, and terminal escapes in its strings. Each is one line and exit code 2, and nothing
outside the bundle is opened."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from sdrt.bundle import MANIFEST, read_manifest, sha256_file, verify_files
from sdrt.cli import main
from sdrt.errors import BundleError
from sdrt.runtime.pipeline import Pipeline


@pytest.fixture
def bundle(tiny_sd1_bundle, tmp_path):
    """A private copy of the tiny bundle, to be made hostile."""
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_sd1_bundle, copy)
    return copy


def load(root):
    return json.loads((root / MANIFEST).read_text())


def save(root, document) -> None:
    (root / MANIFEST).write_text(json.dumps(document))


def one_line_error(capsys, *argv) -> str:
    """Run the CLI in-process (an uncaught exception fails the test) and return its one-line error."""
    rc = main(list(argv))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("sdrt: error:") and err.count("\n") == 1, err
    assert "\x1b" not in err
    return err


# --- garbage manifests -----------------------------------------------------------------------------------------

GARBAGE = {  # where in the document (keys and list indices; () for all of it), the value, a piece of the message
    "a list": ((), [], "not an sdrt bundle manifest"),
    "null": ((), None, "not an sdrt bundle manifest"),
    "model null": (("model",), None, "model: expected an object, got null"),
    "NaN scale": (("model", "latent_scale_factor"), math.nan, "model.latent_scale_factor: expected a finite number"),
    "zero scale": (("model", "latent_scale_factor"), 0, "latent_scale_factor"),
    "scale as text": (("model", "latent_scale_factor"), "0.18", "latent_scale_factor"),
    "unknown family": (("model", "family"), "sdxl", "model.family: expected one of 'sd1', 'sd2'"),
    "huge default size": (("model", "default_size"), 10**9, "model.default_size: expected an integer in [8, 8192]"),
    "huge train timesteps": (("scheduler", "num_train_timesteps"), 10**12, "num_train_timesteps"),
    "400-digit scale": (("model", "latent_scale_factor"), 10**400, "latent_scale_factor"),
    "one train timestep": (("scheduler", "num_train_timesteps"), 1, "num_train_timesteps"),
    "boolean timesteps": (("scheduler", "num_train_timesteps"), True, "num_train_timesteps"),
    "beta of zero": (("scheduler", "beta_start"), 0.0, "beta_start: expected a finite number in (0, 1)"),
    "beta above one": (("scheduler", "beta_end"), 1.5, "beta_end"),
    "short trained betas": (("scheduler", "trained_betas"), [0.1, 0.2], "trained_betas to hold num_train_timesteps"),
    "unknown beta schedule": (("scheduler", "beta_schedule"), "cosine", "beta_schedule"),
    "huge max size": (("shapes", "max_size"), 10**9, "shapes.max_size"),
    "huge batch": (("shapes", "max_batch"), 10**6, "shapes.max_batch"),
    "default size off the grid": (("model", "default_size"), 68, "default size a multiple of multiple_of"),
    "components a list": (("components",), [], "components: expected an object"),
    "no unet": (("components", "unet"), None, "components.unet: expected an object, got null"),
    "unknown dtype": (("components", "unet", "contract", "inputs", 0, "dtype"), "float128", "dtype"),
    "huge contract dim": (("components", "unet", "contract", "inputs", 0, "shape", 1), 10**9, "shape[1]"),
    "contract without sample": (("components", "unet", "contract", "inputs", 0, "name"), "x",
        "a contract lacks a tensor"),
    "huge tokenizer length": (("tokenizer", "max_length"), 10**9, "tokenizer.max_length"),
    "tokenizer length off the encoder": (("tokenizer", "max_length"), 78, "the text encoder's token length"),
    "checksum not hex": (("files", "unet/model.onnx"), "x" * 64, "a sha256 in lowercase hex"),
    "validation text": (("components", "unet", "validation", "max_abs_error"), "small", "max_abs_error"),
    "preprocess huge": (("components", "unet", "preprocess"), {"size": {"shortest_edge": 10**9}}, "shortest_edge"),
}


def replaced(document, where: tuple, value):
    """`document` with the value at `where` (dict keys and list indices) replaced by `value`."""
    if not where:
        return value
    node = document
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    return document


@pytest.mark.parametrize("case", list(GARBAGE))
def test_garbage_manifest_is_one_line_and_exit_2(bundle, capsys, case):
    where, value, message = GARBAGE[case]
    save(bundle, replaced(load(bundle), where, value))
    assert message in one_line_error(capsys, "info", str(bundle))
    with pytest.raises(BundleError, match="manifest"):
        Pipeline.load(bundle, backend="onnxruntime")


@pytest.mark.parametrize("text, message", [
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),  # nesting deeper than the parser's recursion
    (b'{"format": "sdrt-bundle", "format_version": ' + b"9" * 5000 + b"}", "not valid JSON"),  # 5000 digits
    (b'{"format": "sdrt-\xff"}', "not valid JSON"),  # not UTF-8
    (b" " * (17 << 20), "over 16 MiB"),
])
def test_unparseable_manifest_is_one_line(bundle, capsys, text, message):
    (bundle / MANIFEST).write_bytes(text)
    assert message in one_line_error(capsys, "info", str(bundle))


def test_unknown_keys_are_tolerated_with_a_warning(bundle, caplog):
    document = load(bundle)
    document["written_by_a_newer_sdrt"] = {"anything": 1}
    document["model"]["future_key"] = 2
    document["scheduler"]["diffusers_key_sdrt_never_reads"] = 3  # diffusers configs are open: no warning
    save(bundle, document)
    manifest = read_manifest(bundle)
    assert manifest.model.family == "sd1"
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "written_by_a_newer_sdrt" in warned and "future_key" in warned
    assert "diffusers_key_sdrt_never_reads" not in warned


def test_newer_format_version_is_refused_by_name(bundle, capsys):
    save(bundle, replaced(load(bundle), ("format_version",), 2))
    err = one_line_error(capsys, "info", str(bundle))
    assert "bundle format version 2 is newer than this sdrt reads (1)" in err


# --- paths and links -------------------------------------------------------------------------------------------

@pytest.fixture
def outside(tmp_path, bundle):
    """A file outside the bundle with the content of the bundle's merges.txt (so its checksum matches)."""
    secret = tmp_path / "elsewhere" / "merges.txt"
    secret.parent.mkdir()
    shutil.copy(bundle / "tokenizer" / "merges.txt", secret)
    return secret


@pytest.mark.parametrize("path", ["../elsewhere/merges.txt", "/abs/merges.txt", "tokenizer/./merges.txt",
                                  "tokenizer//merges.txt", "tokenizer\\merges.txt", "*/_ORT_MEM_ADDR_/*", ""])
def test_manifest_paths_must_stay_inside(bundle, outside, capsys, path):
    document = load(bundle)
    document["files"][path] = sha256_file(outside)
    document["tokenizer"]["merges"] = path
    save(bundle, document)
    assert "expected a relative path inside the bundle" in one_line_error(capsys, "info", str(bundle))


def test_component_file_outside_is_refused(bundle, capsys):
    save(bundle, replaced(load(bundle), ("components", "unet", "file"), "../../unet/model.onnx"))
    assert "components.unet.file: expected a relative path" in one_line_error(capsys, "info", str(bundle))


@pytest.mark.parametrize("link", ["file", "folder", "unlisted", "manifest"])
def test_symbolic_links_anywhere_are_refused(bundle, outside, capsys, link):
    if link == "file":  # the same bytes as the listed file: only the link gives it away
        (bundle / "tokenizer" / "merges.txt").unlink()
        (bundle / "tokenizer" / "merges.txt").symlink_to(outside)
    elif link == "folder":
        shutil.move(bundle / "unet", outside.parent / "unet")
        (bundle / "unet").symlink_to(outside.parent / "unet", target_is_directory=True)
    elif link == "unlisted":
        (bundle / "notes.txt").symlink_to("/etc/hostname")
    else:
        shutil.move(bundle / MANIFEST, outside.parent / MANIFEST)
        (bundle / MANIFEST).symlink_to(outside.parent / MANIFEST)
    err = one_line_error(capsys, "info", str(bundle))
    assert "holds a symbolic link" in err
    with pytest.raises(BundleError, match="symbolic link"):
        Pipeline.load(bundle, backend="onnxruntime")


# Runs `sdrt info` with an audit hook recording every file Python opens (open, os.open, mmap go through it).
AUDIT = textwrap.dedent("""
    import os, sys
    opened = []
    sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" and args[0] else None)
    from sdrt.cli import main
    rc = main(["info", sys.argv[1]])
    outside = [p for p in opened if os.path.realpath(p).startswith(os.path.realpath(sys.argv[2]))]
    print("OUTSIDE", outside)
    sys.exit(rc)
""")


@pytest.mark.parametrize("how", ["symbolic link", "path with .."])
def test_info_never_opens_a_file_outside_the_bundle(bundle, outside, how):
    if how == "symbolic link":
        (bundle / "tokenizer" / "merges.txt").unlink()
        (bundle / "tokenizer" / "merges.txt").symlink_to(outside)
    else:
        document = load(bundle)
        document["files"]["../elsewhere/merges.txt"] = sha256_file(outside)
        save(bundle, document)
    proc = subprocess.run([sys.executable, "-c", AUDIT, str(bundle), str(outside.parent)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "OUTSIDE []" in proc.stdout
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_special_files_are_refused(bundle, capsys):
    os.mkfifo(bundle / "tokenizer" / "pipe")  # an engine opening it would wait forever
    assert "holds a special file, tokenizer/pipe" in one_line_error(capsys, "info", str(bundle))


def test_unlisted_tokenizer_file_is_refused(bundle, capsys):
    document = load(bundle)
    del document["files"]["tokenizer/vocab.json"]
    save(bundle, document)
    assert "the tokenizer's tokenizer/vocab.json has no checksum" in one_line_error(capsys, "info", str(bundle))


# --- strings from the bundle on the terminal -------------------------------------------------------------------

ESCAPES = "\x1b]0;owned\x07\x1b[2J\r\u202e"  # set the window title, clear the screen, return, reverse the text


def test_info_escapes_control_characters(bundle, capsys):
    document = load(bundle)
    document["model"]["name"] = f"evil{ESCAPES}"
    document["source"]["path"] = f"/x{ESCAPES}"
    document["tools"][f"tool{ESCAPES}"] = f"1.0{ESCAPES}"
    save(bundle, document)
    assert main(["info", str(bundle), "--no-verify"]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07\r\u202e")
    assert "evil\\x1b]0;owned\\x07\\x1b[2J\\x0d\\u202e" in out


def test_errors_escape_bundle_strings(bundle, capsys):
    save(bundle, replaced(load(bundle), ("components", "unet", "format"), f"onnx{ESCAPES}"))
    err = one_line_error(capsys, "info", str(bundle))
    assert not any(c in err for c in "\x07\r\u202e") and "owned" in err


def test_verified_bundle_still_loads(bundle):
    manifest = read_manifest(bundle)
    verify_files(bundle, manifest, remembered=False)
    assert manifest.components["unet"].files == ("unet/model.onnx",)  # recorded by the exporter's commit


# --- an OpenVINO IR's weights ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ir_decoder(tiny_sd1_bundle, tmp_path_factory):
    """The tiny bundle's VAE decoder converted to OpenVINO IR (openvino_model.xml + .bin), once."""
    ov = pytest.importorskip("openvino")
    xml = tmp_path_factory.mktemp("ir") / "openvino_model.xml"
    ov.save_model(ov.convert_model(str(tiny_sd1_bundle / "vae_decoder" / "model.onnx")), str(xml),
                  compress_to_fp16=False)
    return xml


@pytest.fixture
def ir_bundle(bundle, ir_decoder):
    """The copy with its VAE decoder as OpenVINO IR (vae_decoder/openvino_model.xml + .bin), both listed."""
    (bundle / "vae_decoder" / "model.onnx").unlink()
    document = load(bundle)
    document["components"]["vae_decoder"].update(file="vae_decoder/openvino_model.xml", format="openvino")
    del document["components"]["vae_decoder"]["files"]
    del document["files"]["vae_decoder/model.onnx"]
    for source in (ir_decoder, ir_decoder.with_suffix(".bin")):
        shutil.copy(source, bundle / "vae_decoder" / source.name)
        document["files"][f"vae_decoder/{source.name}"] = sha256_file(source)
    save(bundle, document)
    return bundle


def test_listed_ir_weights_load(ir_bundle):
    with Pipeline.load(ir_bundle, backend="openvino", cache=False) as pipe:
        assert pipe.generate("a red circle", steps=1, seed=1)[0].image.size == (64, 64)


@pytest.mark.parametrize("how", ["unlisted", "symbolic link"])
def test_ir_weights_must_be_a_listed_regular_file(ir_bundle, outside, how):
    weights = ir_bundle / "vae_decoder" / "openvino_model.bin"
    if how == "unlisted":
        save(ir_bundle, replaced(load(ir_bundle), ("files",), {
            k: v for k, v in load(ir_bundle)["files"].items() if not k.endswith(".bin")}))
        message = "component vae_decoder's file vae_decoder/openvino_model.bin has no checksum"
    else:  # the same bytes, elsewhere: the checksum alone would pass
        shutil.move(weights, outside.parent / weights.name)
        weights.symlink_to(outside.parent / weights.name)
        message = "holds a symbolic link, vae_decoder/openvino_model.bin"
    with pytest.raises(BundleError, match=message):
        Pipeline.load(ir_bundle, backend="openvino", cache=False)
