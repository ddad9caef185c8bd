"""ClipTokenizer and the CLIP vocab export against transformers' CLIPTokenizer: ids must be equal."""

import functools
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sdrt.bundle import sha256_file
from sdrt.export.clip_vocab import N_MERGES, read_tokenizer_files, write_clip_vocab_from_bpe
from sdrt.export.ldm_config import CLIP_L14_DIR
from sdrt.runtime.tokenizer import ClipTokenizer

transformers = pytest.importorskip("transformers")

TOLERANCE = "exact"  # token ids are integers: every comparison is array equality
MAX_LENGTH = 77
LONG = " ".join(f"word{i} and, more" for i in range(60))  # well over 77 tokens
PROMPTS = [
    "a photo of a cat",
    "a, b. c!? (d)[e]",
    "café naïve résumé Ångström",
    "cafe\u0301 decomposed (NFC) vs café",
    "東京の夜景 한국어 中文",
    "emoji 🐱🚀 and ❤️ flags 🇯🇵",
    "MiXeD CaSe PROMPT",
    "1990s 3.5 1,000,000 4k 8K",
    "don't you'll it's they're I've we'd I'm",
    "multiple   spaces\n\nnewlines\ttabs \r\n end  ",
    "<b>bold</b> &amp; <a href='x'>link</a>",
    "wow!!! great! !",
    "inline <|endoftext|> and <|startoftext|> specials",
    "masterpiece, (best quality:1.2), [worst quality], {{detailed}}",
    LONG,
    "",
    " \t\n ",
]
# Published ids in openai/clip-vit-large-patch14's vocab.json, independent of transformers.
KNOWN_IDS = {"!": 0, "!</w>": 256, "'s</w>": 568, "about</w>": 781, "!!": 1443, "aaaah</w>": 49151,
             "<|startoftext|>": 49406, "<|endoftext|>": 49407}
# sha256 of the vocab.json sdrt shipped in CLIP_L14_DIR until it was rebuilt from merges.txt at export time (the
# shipped demo bundle's tokenizer/vocab.json is the same bytes), and of the merges.txt still shipped there.
SHIPPED_VOCAB_SHA256 = "3f0c4f7d2086b61b38487075278ea9ed04edb53a03cbb045b86c27190fa8fb69"
SHIPPED_MERGES_SHA256 = "f1cd414c2d113a28b296afc0fd66ae854c0e0c34d5de373a2f5b7f62e0c02344"


@pytest.fixture(scope="session")
def clip_files(tmp_path_factory):
    spec = importlib.util.find_spec("open_clip")  # only its data file is used: open_clip is not imported
    if spec is None:
        pytest.skip("open_clip (for bpe_simple_vocab_16e6.txt.gz) is not installed")
    bpe = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    return write_clip_vocab_from_bpe(bpe, tmp_path_factory.mktemp("clip"))


@functools.lru_cache(maxsize=None)
def _reference(folder, pad_token):
    return transformers.CLIPTokenizer.from_pretrained(str(folder), pad_token=pad_token)


def _reference_ids(reference, prompts):
    batch = reference(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True)
    return np.array(batch["input_ids"], dtype=np.int64)


def test_vocab_matches_published_clip_files(clip_files):
    vocab_path, merges_path = clip_files
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    assert {t: vocab[t] for t in KNOWN_IDS} == KNOWN_IDS
    lines = merges_path.read_text(encoding="utf-8").split("\n")
    assert lines[0] == "#version: 0.2" and len(lines) == 1 + N_MERGES
    assert lines[1] == "i n" and lines[-1] == "jeky ll</w>" and vocab["jekyll</w>"] == 49405


@pytest.mark.parametrize("pad_token, pad_id", [("<|endoftext|>", 49407), ("!", 0)])
def test_batch_ids_equal_transformers(clip_files, pad_token, pad_id):
    ours = ClipTokenizer.from_files(*clip_files, max_length=MAX_LENGTH, pad_token=pad_token)
    ids = ours(PROMPTS)
    assert ids.dtype == np.int64 and ids.shape == (len(PROMPTS), MAX_LENGTH)
    np.testing.assert_array_equal(ids, _reference_ids(_reference(clip_files[0].parent, pad_token), PROMPTS))
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407] and ids[0, 7] == pad_id


def test_long_prompt_truncated_with_eos_last(clip_files):
    ids = ClipTokenizer.from_files(*clip_files)([LONG])[0]
    body = ClipTokenizer.from_files(*clip_files).token_ids(LONG)
    assert len(body) > MAX_LENGTH
    assert ids[0] == 49406 and ids[-1] == 49407 and ids[1:-1].tolist() == body[: MAX_LENGTH - 2]


def test_empty_prompt_is_bos_eos_then_padding(clip_files):
    ids = ClipTokenizer.from_files(*clip_files, pad_token="!")([""])[0]
    assert ids[:2].tolist() == [49406, 49407] and not ids[2:].any()


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_token_ids_equal_transformers_without_specials(clip_files, pad_token):
    ours = ClipTokenizer.from_files(*clip_files, pad_token=pad_token)
    reference = _reference(clip_files[0].parent, pad_token)
    for prompt in PROMPTS:
        assert ours.token_ids(prompt) == reference(prompt, add_special_tokens=False)["input_ids"], prompt


def test_bad_inputs_raise(clip_files):
    with pytest.raises(TypeError, match="list of prompts"):
        ClipTokenizer.from_files(*clip_files)("a single string")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        ClipTokenizer.from_files(*clip_files, pad_token="<pad>")


def _assert_same_files(out, clip_files):
    vocab_path, merges_path = clip_files
    assert json.loads((out / "vocab.json").read_text("utf-8")) == json.loads(vocab_path.read_text("utf-8"))
    assert (out / "merges.txt").read_text("utf-8").split("\n") == merges_path.read_text("utf-8").split("\n")


@pytest.mark.parametrize("merges_as", ["pairs", "strings"])
def test_read_tokenizer_files_transformers5_layout(clip_files, tmp_path, merges_as):
    saved = tmp_path / "saved"
    _reference(clip_files[0].parent, "!").save_pretrained(str(saved))
    assert (saved / "tokenizer.json").is_file() and not (saved / "vocab.json").exists()
    data = json.loads((saved / "tokenizer.json").read_text("utf-8"))
    assert isinstance(data["model"]["merges"][0], list)  # what tokenizers 0.23 writes
    if merges_as == "strings":  # what tokenizers < 0.20 wrote
        data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
        (saved / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), "utf-8")
    pad_token, max_length = read_tokenizer_files(saved, tmp_path / "out")
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert pad_token == "!" and max_length == config["model_max_length"]
    _assert_same_files(tmp_path / "out", clip_files)
    ours = ClipTokenizer.from_files(tmp_path / "out/vocab.json", tmp_path / "out/merges.txt", pad_token=pad_token)
    np.testing.assert_array_equal(ours(PROMPTS), _reference_ids(_reference(clip_files[0].parent, "!"), PROMPTS))


def test_read_tokenizer_files_transformers4_layout(clip_files, tmp_path):
    saved = tmp_path / "saved"  # as in the SD2 hub repos' tokenizer/ folders
    saved.mkdir()
    for path in clip_files:
        shutil.copyfile(path, saved / path.name)
    pad = {"__type": "AddedToken", "content": "!", "lstrip": False, "normalized": True, "rstrip": False,
           "single_word": False}
    config = {"model_max_length": 77, "pad_token": pad, "tokenizer_class": "CLIPTokenizer"}
    (saved / "tokenizer_config.json").write_text(json.dumps(config))
    (saved / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!", "eos_token": "<|endoftext|>"}))
    assert read_tokenizer_files(saved, tmp_path / "out") == ("!", 77)
    _assert_same_files(tmp_path / "out", clip_files)
    (saved / "special_tokens_map.json").unlink()
    config.pop("pad_token")
    (saved / "tokenizer_config.json").write_text(json.dumps(config))
    assert read_tokenizer_files(saved, saved) == ("<|endoftext|>", 77)  # SD1: default pad, in place


def test_shipped_merges_rebuild_the_removed_vocab(clip_tokenizer_dir):
    assert not (CLIP_L14_DIR / "vocab.json").exists()  # the package ships the merges only
    assert sha256_file(CLIP_L14_DIR / "merges.txt") == SHIPPED_MERGES_SHA256
    assert sha256_file(clip_tokenizer_dir / "vocab.json") == SHIPPED_VOCAB_SHA256  # byte for byte the removed file
    assert sha256_file(clip_tokenizer_dir / "merges.txt") == SHIPPED_MERGES_SHA256
    vocab = json.loads((clip_tokenizer_dir / "vocab.json").read_text("utf-8"))
    assert len(vocab) == 49408 and {t: vocab[t] for t in KNOWN_IDS} == KNOWN_IDS


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_rebuilt_vocab_ids_equal_transformers_on_open_clips_bpe(clip_tokenizer_dir, clip_files, pad_token):
    """The rebuilt files against transformers' CLIPTokenizer on files built from open_clip's own BPE file."""
    _assert_same_files(clip_tokenizer_dir, clip_files)
    ours = ClipTokenizer.from_files(clip_tokenizer_dir / "vocab.json", clip_tokenizer_dir / "merges.txt",
                                    pad_token=pad_token)
    np.testing.assert_array_equal(ours(PROMPTS), _reference_ids(_reference(clip_files[0].parent, pad_token), PROMPTS))


def test_merges_of_another_bpe_need_their_vocab(tmp_path):
    (tmp_path / "merges.txt").write_text("#version: 0.2\ni n\nt h\n", encoding="utf-8")
    with pytest.raises(ValueError, match="2 merges where CLIP has 48894; its vocab.json is needed"):
        read_tokenizer_files(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_read_tokenizer_files_rejects_unknown_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        read_tokenizer_files(tmp_path, tmp_path / "out")
