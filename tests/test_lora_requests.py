"""LoRAs in requests: A1111's <lora:name:te:unet> prompt tags found in a LoRA folder, --lora FILE[:STRENGTH],
the PNG infotext (Lora hashes as A1111 writes them), and the LCM kind an LCM-LoRA brings."""
from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
from PIL import Image

from sdrt.bundle import read_manifest
from sdrt.cli import main
from sdrt.errors import RequestError
from sdrt.runtime.lora import find_lora, parse_lora_argument, prompt_loras, strip_tags
from sdrt.runtime.request import GenerationRequest

PROMPT = "a red circle <lora:kohya:0.7> on a blue background"


@pytest.fixture(scope="module")
def lora_dir(tiny_loras, tmp_path_factory):
    """A LoRA folder as A1111 keeps one: files by name, in subfolders too."""
    root = tmp_path_factory.mktemp("lora-dir")
    shutil.copy(tiny_loras["kohya"], root / "kohya.safetensors")
    (root / "styles").mkdir()
    shutil.copy(tiny_loras["peft"], root / "styles" / "peft.safetensors")
    return root


def test_prompt_tags_as_a1111_reads_them(lora_dir):
    """networks.py: positional te then unet multipliers (unet defaults to te), te= / unet= by name, <lyco:...> too."""
    specs = prompt_loras("x <lora:kohya> <lora:peft:0.5> <lyco:kohya:0.2:0.9> <lora:styles/peft:te=0.1:unet=2>",
                         lora_dir)
    assert [(s.name, s.text_encoder, s.unet) for s in specs] == [
        ("kohya", 1.0, 1.0), ("peft", 0.5, 0.5), ("kohya", 0.2, 0.9), ("styles/peft", 0.1, 2.0)]
    assert specs[1].path == lora_dir / "styles" / "peft.safetensors" == specs[3].path
    assert strip_tags("a <lora:kohya:1> b") == "a  b"


@pytest.mark.parametrize("prompt,folder,message", [
    ("<lora:kohya>", None, "--lora-dir"), ("<lora:nope>", "dir", "found none"),
    ("<hypernet:x:1>", "dir", "not <hypernet"), ("<lora:kohya:strong>", "dir", "must be numbers"),
])
def test_prompt_tag_errors(lora_dir, prompt, folder, message):
    with pytest.raises(RequestError, match=message):
        prompt_loras(prompt, lora_dir if folder else None)


def test_lora_argument_parsing():
    assert parse_lora_argument("a/b.safetensors:0.5") == (parse_lora_argument("a/b.safetensors")[0], 0.5)
    assert parse_lora_argument("a/b.safetensors") == (parse_lora_argument("a/b.safetensors")[0], 1.0)
    assert parse_lora_argument("C:/loras/x.safetensors")[1] == 1.0  # a drive letter is not a strength
    assert parse_lora_argument("x.pt:-0.25")[1] == -0.25


def test_resolving_twice_changes_nothing(tiny_sd1_bundle, lora_dir, tiny_loras):
    manifest = read_manifest(tiny_sd1_bundle)
    req = GenerationRequest(PROMPT, loras=[(tiny_loras["peft"], 0.4)], lora_dir=lora_dir).resolve(manifest)
    assert [(s.name, s.unet, s.in_prompt) for s in req.loras] == [("peft", 0.4, False), ("kohya", 0.7, True)]
    assert req.resolve(manifest).loras == req.loras
    with pytest.raises(RequestError, match="does not exist"):
        GenerationRequest("x", loras=["missing.safetensors"]).resolve(manifest)


@pytest.mark.parametrize("place", ["file name", "folder of diffusers' file", "metadata"])
def test_an_lcm_lora_makes_the_request_lcm(tiny_sd1_bundle, tiny_loras, tmp_path, place):
    """With an LCM-LoRA (named as latent-consistency/lcm-lora-sdv1-5 is), unset fields take the LCM preset: 4 LCM
    steps, guidance off; the user's kind still wins."""
    from safetensors.numpy import save_file

    from sdrt.runtime.tensor_files import read_safetensors

    if place == "file name":
        lora = shutil.copy(tiny_loras["kohya"], tmp_path / "LCM_LoRA_tiny.safetensors")
    elif place == "metadata":
        tensors, _ = read_safetensors(tiny_loras["kohya"])
        lora = tmp_path / "distilled.safetensors"
        save_file({k: np.array(v) for k, v in tensors.items()}, str(lora), metadata={"ss_output_name": "lcm-sd15"})
    else:
        (tmp_path / "lcm-lora-sdv1-5").mkdir()
        lora = shutil.copy(tiny_loras["kohya"], tmp_path / "lcm-lora-sdv1-5" / "pytorch_lora_weights.safetensors")
    manifest = read_manifest(tiny_sd1_bundle)
    req = GenerationRequest("x", loras=[lora]).resolve(manifest)
    assert (req.kind, req.steps, req.guidance_scale, req.sampler) == ("lcm", 4, 1.0, "lcm")
    assert GenerationRequest("x", loras=[lora], kind="standard").resolve(manifest).kind == "standard"
    assert GenerationRequest("x", loras=[tiny_loras["kohya"]]).resolve(manifest).kind == "standard"


def _addnet_hash(path) -> str:
    """kohya's / A1111's LoRA hash, computed independently: sha256 of everything after the safetensors header."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


def test_cli_prompt_tags_and_lora_flag_write_a1111_infotext(tiny_sd1_bundle, lora_dir, tiny_loras, tmp_path, capsys):
    out = tmp_path / "out.png"
    args = ["generate", PROMPT, "--bundle", str(tiny_sd1_bundle), "--lora-dir", str(lora_dir), "--lora",
            f"{tiny_loras['peft']}:0.4", "--steps", "3", "--seed", "5", "-q", "-o", str(out)]
    assert main(args) == 0
    text = Image.open(out).text["parameters"]
    prompt_line, fields = text.split("\n")[0], text.split("\n")[-1]
    assert prompt_line == f"{PROMPT} <lora:peft:0.4>"  # the flag's LoRA as a tag: A1111 reading it applies both
    assert f'Lora hashes: "peft: {_addnet_hash(tiny_loras["peft"])}, kohya: {_addnet_hash(lora_dir / "kohya.safetensors")}"' \
        in fields
    again = tmp_path / "again.png"
    assert main([*args[:2], "--bundle", str(tiny_sd1_bundle), "--lora-dir", str(lora_dir), "--steps", "3", "--seed",
                 "5", "-q", "-o", str(again)]) == 0
    plain = tmp_path / "plain.png"
    assert main(["generate", strip_tags(PROMPT), "--bundle", str(tiny_sd1_bundle), "--steps", "3", "--seed", "5",
                 "-q", "-o", str(plain)]) == 0
    assert np.abs(np.asarray(Image.open(again), int) - np.asarray(Image.open(out), int)).max() > 0  # peft mattered
    assert np.abs(np.asarray(Image.open(plain), int) - np.asarray(Image.open(again), int)).max() > 10
    assert main(["generate", "<lora:kohya>", "--bundle", str(tiny_sd1_bundle), "-q", "-o", str(plain)]) == 2
    assert "--lora-dir" in capsys.readouterr().err


def test_find_lora_refuses_ambiguous_names(lora_dir, tmp_path):
    shutil.copytree(lora_dir, tmp_path / "d")
    shutil.copy(lora_dir / "kohya.safetensors", tmp_path / "d" / "styles" / "kohya.safetensors")
    with pytest.raises(RequestError, match="expected one file"):
        find_lora("kohya", tmp_path / "d")
    assert find_lora("styles/kohya", tmp_path / "d") == tmp_path / "d" / "styles" / "kohya.safetensors"
