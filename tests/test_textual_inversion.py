"""Textual inversion: A1111 and diffusers embedding files, A1111's placement in prompts, parity with diffusers'
load_textual_inversion on the tiny models, and bundles exported before the text encoder took token embeddings.

Tolerances: images within 1/255 per pixel of diffusers' (8-bit, as test_pipeline_parity); vectors read from files
exact; placement exact (A1111's tokenize_line, modules/sd_hijack_clip.py).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from safetensors.torch import save_file  # noqa: E402
from tiny_models import SD2_CONTEXT_DIM, diffusers_reference  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402

from sdrt.bundle import MANIFEST, read_manifest  # noqa: E402
from sdrt.contracts import Contract  # noqa: E402
from sdrt.errors import BundleError, RequestError  # noqa: E402
from sdrt.export.onnx_export import export_onnx  # noqa: E402
from sdrt.runtime.embeddings import EmbeddingLibrary, find_files, read_embedding  # noqa: E402
from sdrt.runtime.pipeline import Pipeline  # noqa: E402
from sdrt.runtime.prompts import PLACEHOLDER, tokenize_weighted  # noqa: E402
from sdrt.runtime.request import GenerationRequest  # noqa: E402
from sdrt.runtime.tokenizer import ClipTokenizer  # noqa: E402

PIXEL_TOL_8BIT = 1
WIDTH = 32  # the tiny SD1 text encoder's (tests/tiny_models.py TEXT_SIZES)
SEED, STEPS = 1234, 6
# The embeddings must matter: the same request without them moves pixels by more than this.
EMBEDDINGS_VISIBLE = 8
PROMPT = "a red shapey circle on a <cat-toy> background"
NEGATIVE = "dotty, blurry"


def _vectors(n: int, width: int, seed: int) -> torch.Tensor:
    # Token embeddings of CLIP are small (std ~0.02 in SD 1.5); these are larger so that they visibly move the image.
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.5


def write_embeddings(folder, width: int) -> dict[str, torch.Tensor]:
    """One file per format A1111 and diffusers read; returns name -> vectors."""
    vectors = {"shapey": _vectors(3, width, 1), "dotty": _vectors(1, width, 2), "<cat-toy>": _vectors(2, width, 3),
               "old-style": _vectors(2, width, 4)}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors["shapey"]}, "name": "other",
                "step": 100}, folder / "shapey.pt")  # A1111's Embedding.save; the file name wins over "name"
    save_file({"emb_params": vectors["dotty"]}, folder / "dotty.safetensors")
    (folder / "cat-toy").mkdir(exist_ok=True)
    save_file({"<cat-toy>": vectors["<cat-toy>"]}, folder / "cat-toy" / "learned_embeds.safetensors")  # diffusers
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors["old-style"])})},
               folder / "old-style.pt")
    torch.save({"string_to_param": {"*": _vectors(1, width + 16, 5)}}, folder / "too-wide.pt")
    save_file({"clip_g": _vectors(1, 1280, 6), "clip_l": _vectors(1, 768, 7)}, folder / "xl-style.safetensors")
    (folder / "empty.pt").write_bytes(b"")
    return vectors


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embeddings")
    return folder, write_embeddings(folder, WIDTH)


@pytest.fixture(scope="module")
def tokenizer(clip_tokenizer_dir):
    return ClipTokenizer.from_files(clip_tokenizer_dir / "vocab.json", clip_tokenizer_dir / "merges.txt")


@pytest.fixture(scope="module")
def library(embeddings, tokenizer):
    return EmbeddingLibrary.from_folder(embeddings[0], tokenizer, WIDTH)


# --- files ---------------------------------------------------------------------------------------------------

def test_every_format_reads_the_same_vectors(embeddings):
    folder, vectors = embeddings
    files = find_files(folder)
    assert set(files) == {"shapey", "dotty", "<cat-toy>", "old-style", "too-wide", "xl-style"}  # not the empty one
    for name, want in vectors.items():
        np.testing.assert_array_equal(read_embedding(files[name])[0], want.numpy())
    assert read_embedding(files["<cat-toy>"])[1] == "<cat-toy>"


# --- placement, as A1111's tokenize_line ---------------------------------------------------------------------

def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.token_ids(text)


def test_name_becomes_its_vectors(tokenizer, library):
    chunks = tokenize_weighted(tokenizer, "a photo of shapey, (dotty:1.3)", embeddings=library)
    a_photo_of, comma = _ids(tokenizer, "a photo of"), _ids(tokenizer, ",")
    want = [tokenizer.bos_id, *a_photo_of, *[PLACEHOLDER] * 3, *comma, PLACEHOLDER, tokenizer.eos_id]
    assert chunks.ids[0, : len(want)].tolist() == want
    assert [(f.chunk, f.position, f.embedding.name) for f in chunks.fixes] == [(0, 4, "shapey"), (0, 8, "dotty")]
    np.testing.assert_array_equal(chunks.multipliers[0, 4:9], [1.0, 1.0, 1.0, 1.0, np.float32(1.3)])


def test_longest_name_wins(tokenizer, embeddings, tmp_path):
    folder = tmp_path / "emb"
    shutil.copytree(embeddings[0], folder)
    shutil.copy(folder / "dotty.safetensors", folder / "shapey-dotty.safetensors")
    library = EmbeddingLibrary.from_folder(folder, tokenizer, WIDTH)
    names = [f.embedding.name for f in tokenize_weighted(tokenizer, "shapey-dotty shapey", embeddings=library).fixes]
    assert names == ["shapey-dotty", "shapey"]


def test_vectors_that_do_not_fit_start_the_next_chunk(tokenizer, library):
    chunks = tokenize_weighted(tokenizer, "cat " * 74 + "shapey", embeddings=library)
    assert len(chunks) == 2
    assert [(f.chunk, f.position) for f in chunks.fixes] == [(1, 1)]
    assert chunks.ids[0, 75:].tolist() == [tokenizer.eos_id] * 2


def test_comma_backtrack_moves_the_embedding_with_its_words(tokenizer, library):
    """A1111 moves the words after the comma to the next chunk but leaves their PromptChunkFix behind; here the
    vectors move with their place."""
    chunks = tokenize_weighted(tokenizer, "cat " * 68 + ", shapey cat cat cat cat", embeddings=library)
    assert [(f.chunk, f.position) for f in chunks.fixes] == [(1, 1)]
    assert chunks.ids[1, 1:8].tolist() == [PLACEHOLDER] * 3 + _ids(tokenizer, "cat cat cat cat")
    assert chunks.ids[0, 70:].tolist() == [tokenizer.eos_id] * 7


@pytest.mark.parametrize("name, reason", [("too-wide", "48-wide vectors.*takes 32"), ("xl-style", "SDXL")])
def test_unusable_embeddings_are_refused_when_named(tokenizer, library, name, reason):
    assert tokenize_weighted(tokenizer, "a plain prompt", embeddings=library).fixes == ()
    with pytest.raises(RequestError, match=f"embedding '{name}'.*{reason}"):
        tokenize_weighted(tokenizer, f"a {name} prompt", embeddings=library)


def test_family_named_in_width_refusal(embeddings, tokenizer, tmp_path):
    torch.save({"string_to_param": {"*": _vectors(1, 768, 8)}}, tmp_path / "sd1-style.pt")
    library = EmbeddingLibrary.from_folder(tmp_path, tokenizer, 1024)
    with pytest.raises(RequestError, match=r"768-wide vectors \(SD 1.x\); this bundle's text encoder takes 1024"):
        tokenize_weighted(tokenizer, "sd1-style", embeddings=library)


# --- whole pipeline against diffusers ------------------------------------------------------------------------

def diffusers_image(folder, embeddings_dir, vectors, prompt=PROMPT, negative=NEGATIVE) -> np.ndarray:
    """diffusers with every embedding loaded by load_textual_inversion under its A1111 name."""
    pipe = diffusers_reference(diffusers.StableDiffusionPipeline, folder)
    files = find_files(embeddings_dir)
    for name in vectors:
        pipe.load_textual_inversion(str(files[name]), token=name)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.base_scheduler_config)
    out = pipe(prompt, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=7.5, output_type="np",
               generator=torch.Generator("cpu").manual_seed(SEED))
    return (out.images[0] * 255).round().astype(int)


def sdrt_image(pipe: Pipeline, prompt=PROMPT, negative=NEGATIVE) -> np.ndarray:
    req = GenerationRequest(prompt, negative_prompt=negative, steps=STEPS, sampler="Euler", seed=SEED,
                            guidance_scale=7.5, watermark=False)
    return np.asarray(pipe.generate(req)[0].image).astype(int)


@pytest.fixture(scope="module")
def ti_pipe(tiny_sd1_bundle, embeddings):
    with Pipeline.load(tiny_sd1_bundle, backend="onnxruntime", embeddings_dir=embeddings[0]) as pipe:
        yield pipe


def test_images_match_diffusers_load_textual_inversion(tiny_sd1_dir, tiny_sd1_bundle, embeddings, ti_pipe):
    folder, vectors = embeddings
    ours = sdrt_image(ti_pipe)
    ref = diffusers_image(tiny_sd1_dir, folder, {k: v for k, v in vectors.items() if k != "old-style"})
    assert np.abs(ours - ref).max() <= PIXEL_TOL_8BIT
    with Pipeline.load(tiny_sd1_bundle, backend="onnxruntime") as plain:  # the names read as words
        assert np.abs(sdrt_image(plain) - ours).max() > EMBEDDINGS_VISIBLE


def test_parameters_record_ti_hashes(ti_pipe, embeddings):
    files = find_files(embeddings[0])
    out = ti_pipe.generate(GenerationRequest(PROMPT, negative_prompt=NEGATIVE, steps=1, seed=1))[0]
    hashes = {name: ti_pipe.embeddings.get(name).sha256[:12] for name in ("shapey", "<cat-toy>", "dotty")}
    assert f'TI hashes: "shapey: {hashes["shapey"]}, <cat-toy>: {hashes["<cat-toy>"]}, dotty: {hashes["dotty"]}"' \
        in out.parameters
    assert len(hashes["shapey"]) == 12 and files["shapey"].name == "shapey.pt"


def test_sd2_images_match_diffusers(tiny_sd2_eps_dir, tiny_sd2_eps_bundle, tmp_path):
    vectors = write_embeddings(tmp_path / "emb", SD2_CONTEXT_DIM)
    used = {k: v for k, v in vectors.items() if k in ("shapey", "dotty", "<cat-toy>")}
    with Pipeline.load(tiny_sd2_eps_bundle, backend="onnxruntime", embeddings_dir=tmp_path / "emb") as pipe:
        ours = sdrt_image(pipe)
    assert np.abs(ours - diffusers_image(tiny_sd2_eps_dir, tmp_path / "emb", used)).max() <= PIXEL_TOL_8BIT


def test_openvino_matches_onnxruntime(tiny_sd1_bundle, embeddings, ti_pipe):
    pytest.importorskip("openvino")
    with Pipeline.load(tiny_sd1_bundle, backend="openvino", precision="f32", cache=False,
                       embeddings_dir=embeddings[0]) as pipe:
        assert np.abs(sdrt_image(pipe) - sdrt_image(ti_pipe)).max() <= PIXEL_TOL_8BIT


# --- bundles exported before the text encoder took token embeddings ------------------------------------------

LEGACY_CONTRACT = {
    "inputs": [{"name": "input_ids", "dtype": "int32", "shape": ["batch", 77]}],
    "outputs": [{"name": "last_hidden_state", "dtype": "float32", "shape": ["batch", 77, WIDTH]}],
}


class _IdsTextEncoder(torch.nn.Module):
    """The text encoder as sdrt exported it before: int32 ids -> last_hidden_state."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids.long()).last_hidden_state


@pytest.fixture(scope="module")
def legacy_bundle(tiny_sd1_dir, tiny_sd1_bundle, tmp_path_factory):
    """The tiny bundle with its text encoder as sdrt exported it before (ids in, last layer out, no table)."""
    out = tmp_path_factory.mktemp("bundles") / "legacy"
    shutil.copytree(tiny_sd1_bundle, out)
    model = CLIPTextModel.from_pretrained(tiny_sd1_dir / "text_encoder").eval()
    export_onnx(_IdsTextEncoder(model), (torch.zeros(2, 77, dtype=torch.int32),),
                Contract.from_dict("text_encoder", LEGACY_CONTRACT), out / "text_encoder" / "model.onnx")
    (out / "text_encoder" / "token_embedding.npy").unlink()
    manifest = json.loads((out / MANIFEST).read_text())
    text = manifest["components"]["text_encoder"]
    text["contract"].update(LEGACY_CONTRACT)
    del text["tables"]
    del manifest["files"]["text_encoder/token_embedding.npy"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def test_old_bundles_run_plain_prompts_and_name_the_reexport(legacy_bundle, tiny_sd1_bundle, embeddings, ti_pipe):
    with Pipeline.load(legacy_bundle, backend="onnxruntime", verify=False, embeddings_dir=embeddings[0]) as old:
        plain = "a red circle, blurry"
        assert np.abs(sdrt_image(old, plain, "") - sdrt_image(ti_pipe, plain, "")).max() <= PIXEL_TOL_8BIT
        with pytest.raises(BundleError, match=r"embeddings need .* re-export it with `sdrt export .* -o NEW_BUNDLE`"):
            sdrt_image(old)
        with pytest.raises(RequestError, match="clip skip 2 needs .* re-export it with `sdrt export"):
            old.generate(GenerationRequest(plain, steps=1, clip_skip=2))
    assert read_manifest(legacy_bundle).components["text_encoder"].tables == {}
