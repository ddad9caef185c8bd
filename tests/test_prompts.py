"""A1111 prompts against AUTOMATIC1111/stable-diffusion-webui (prompt_parser.py, sd_hijack_clip.py)."""

import numpy as np
import pytest

from sdrt.runtime.prompts import (BREAK, PromptChunks, emphasize, encode_weighted, pad_chunks, parse_attention,
                                  prompt_embeddings, tokenize_weighted)
from sdrt.runtime.tokenizer import ClipTokenizer

PARSE_TOLERANCE = "exact"  # parsed weights are compared with ==, as A1111's doctest does
EMBEDDING_RTOL = 1e-6  # float32 products and float64 means in the emphasis arithmetic
BOS, EOS, COMMA, CAT, DOG = 49406, 49407, 267, 2368, 1929
SD2_PAD = 0  # "!" in the CLIP vocab; SD2's OpenCLIP pads with id 0
DIM = 8


@pytest.fixture(scope="module")
def sd1(clip_tokenizer_dir):
    return ClipTokenizer.from_files(clip_tokenizer_dir / "vocab.json", clip_tokenizer_dir / "merges.txt")


@pytest.fixture(scope="module")
def sd2(clip_tokenizer_dir):
    return ClipTokenizer.from_files(clip_tokenizer_dir / "vocab.json", clip_tokenizer_dir / "merges.txt", pad_token="!")


def fake_encoder(ids: np.ndarray, fixes=()) -> np.ndarray:
    """A stand-in text encoder: a fixed random embedding per id (or a fix's vectors), mixed with its position;
    [n, 77] -> [n, 77, DIM]."""
    embeds = np.random.default_rng(0).standard_normal((49408, DIM)).astype(np.float32)[ids]
    for row, position, vectors in fixes:
        embeds[row, position: position + len(vectors)] = vectors
    return embeds + np.linspace(-1, 1, ids.shape[1], dtype=np.float32)[None, :, None]


# The examples of A1111's parse_prompt_attention docstring, plus the cases the issue lists.
PARSE_TABLE = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("(unimportant)", [("unimportant", 1.1)]),
    ("[unimportant]", [("unimportant", 1 / 1.1)]),
    ("(abc:1.5)", [("abc", 1.5)]),
    ("(word: 1.3 )", [("word", 1.3)]),
    ("(abc:-0.5) x", [("abc", -0.5), (" x", 1.0)]),
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize("text, expected", PARSE_TABLE)
def test_parse_table(text, expected):
    assert parse_attention(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("\\(literal\\)", [("(literal)", 1.0)]),
    ("\\[x\\]", [("[x]", 1.0)]),
    ("a \\\\ b", [("a \\ b", 1.0)]),
    ("a\\b", [("ab", 1.0)]),  # a lone backslash is dropped
    ("\\((word)\\)", [("(", 1.0), ("word", 1.1), (")", 1.0)]),
])
def test_escaped_brackets(text, expected):
    assert parse_attention(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("a ]b) c", [("a ]b) c", 1.0)]),  # closers without an opener are text
    ("((a)", [("a", 1.1 * 1.1)]),
    ("[a", [("a", 1 / 1.1)]),
    ("(a [b)", [("a ", 1.1), ("b", 1.1 / 1.1)]),  # "(" closes; "[" stays open to the end
    ("a:b (c:d)", [("a:b ", 1.0), ("c:d", 1.1)]),  # ":" without a number is text
])
def test_unbalanced_brackets(text, expected):
    assert parse_attention(text) == expected


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
def test_nested_weights_multiply(n):
    assert parse_attention("(" * n + "w" + ")" * n)[0][1] == pytest.approx(1.1**n, rel=1e-12)
    assert parse_attention("[" * n + "w" + "]" * n)[0][1] == pytest.approx(1.1**-n, rel=1e-12)
    assert parse_attention("(" * n + "(w:2)" + ")" * n)[0][1] == pytest.approx(2 * 1.1**n, rel=1e-12)


def test_equal_weight_runs_merge():
    assert parse_attention("([word])") == [("word", 1.0)]  # 1/1.1*1.1 is exactly 1.0
    assert parse_attention("a (b) (c) d") == [("a ", 1.0), ("b", 1.1), (" ", 1.0), ("c", 1.1), (" d", 1.0)]


def test_bad_weight_raises():
    with pytest.raises(ValueError, match="1.2.3"):
        parse_attention("(a:1.2.3)")


def test_break_parsing():
    assert parse_attention("a BREAK b") == [("a", 1.0), BREAK, ("b", 1.0)]
    assert parse_attention("aBREAKb BREAKING") == [("aBREAKb BREAKING", 1.0)]
    assert parse_attention("a BREAK") == [("a", 1.0), BREAK, ("", 1.0)]
    # A1111 quirk kept: inside brackets the marker is weighted too, and then it is the word "BREAK".
    assert parse_attention("(a BREAK b)") == [("a", 1.1), ("BREAK", -1.0 * 1.1), ("b", 1.1)]


def test_break_starts_a_chunk(sd1):
    chunks = tokenize_weighted(sd1, "cat BREAK dog")
    assert chunks.ids.shape == (2, 77)
    assert chunks.ids[0, :4].tolist() == [BOS, CAT, EOS, EOS] and chunks.ids[1, :4].tolist() == [BOS, DOG, EOS, EOS]
    assert len(tokenize_weighted(sd1, "cat BREAK")) == 1  # a trailing empty chunk is not kept
    assert tokenize_weighted(sd1, "BREAK cat").ids[:, 1].tolist() == [EOS, CAT]  # a leading one is


@pytest.mark.parametrize("tok, pad", [("sd1", EOS), ("sd2", SD2_PAD)])
def test_plain_prompt_ids_equal_tokenizer(request, tok, pad):
    tokenizer = request.getfixturevalue(tok)
    for prompt in ["a photo of a cat", "", " ".join(["cat"] * 75), "wow, great!"]:
        chunks = tokenize_weighted(tokenizer, prompt)
        np.testing.assert_array_equal(chunks.ids, tokenizer([prompt]))
        assert chunks.ids.dtype == np.int64 and np.all(chunks.multipliers == 1.0)
    assert tokenize_weighted(tokenizer, "cat").ids[0, 2:].tolist() == [EOS] + [pad] * 74


def test_empty_prompt_is_one_chunk(sd1, sd2):
    assert tokenize_weighted(sd1, "").ids.tolist() == [[BOS] + [EOS] * 76]
    assert tokenize_weighted(sd2, "").ids.tolist() == [[BOS, EOS] + [SD2_PAD] * 75]


def test_200_token_prompt_chunks(sd1, sd2):
    chunks = tokenize_weighted(sd1, "cat " * 200)
    assert chunks.ids.shape == (3, 77) and chunks.multipliers.shape == (3, 77)
    assert chunks.ids[:2].tolist() == [[BOS] + [CAT] * 75 + [EOS]] * 2
    assert chunks.ids[2].tolist() == [BOS] + [CAT] * 50 + [EOS] * 26
    assert tokenize_weighted(sd2, "cat " * 200).ids[2].tolist() == [BOS] + [CAT] * 50 + [EOS] + [SD2_PAD] * 25


def test_comma_backtrack(sd1):
    near = "cat " * 60 + ", " + "dog " * 30  # comma at index 60: 15 tokens from the chunk's end
    chunks = tokenize_weighted(sd1, near)
    assert chunks.ids[0].tolist() == [BOS] + [CAT] * 60 + [COMMA] + [EOS] * 15
    assert chunks.ids[1].tolist() == [BOS] + [DOG] * 30 + [EOS] * 46
    far = "cat " * 50 + ", " + "dog " * 40  # comma at index 50: 25 tokens away, beyond the default 20
    assert tokenize_weighted(sd1, far).ids[0].tolist() == [BOS] + [CAT] * 50 + [COMMA] + [DOG] * 24 + [EOS]
    assert tokenize_weighted(sd1, far, comma_backtrack=25).ids[0, 52].item() == EOS
    assert tokenize_weighted(sd1, near, comma_backtrack=0).ids[0].tolist() == (
        [BOS] + [CAT] * 60 + [COMMA] + [DOG] * 14 + [EOS])


def test_backtracked_tail_keeps_its_weights(sd1):
    chunks = tokenize_weighted(sd1, "cat " * 60 + ", (" + "dog " * 20 + ":1.5)")
    assert chunks.ids[0, 60:63].tolist() == [CAT, COMMA, EOS] and np.all(chunks.multipliers[0] == 1.0)
    assert chunks.ids[1, :22].tolist() == [BOS] + [DOG] * 20 + [EOS]
    np.testing.assert_array_equal(chunks.multipliers[1, 1:21], np.float32(1.5))
    assert np.all(chunks.multipliers[1, 21:] == 1.0)


def test_multipliers_align_to_multi_token_words(sd1):
    chunks = tokenize_weighted(sd1, "a (photorealistic:1.3) [cat], dog")
    assert chunks.ids[0, :8].tolist() == [BOS, 320, 1153, 16157, CAT, COMMA, DOG, EOS]
    expected = np.ones(77, np.float32)
    expected[2:4], expected[4] = 1.3, 1 / 1.1
    np.testing.assert_array_equal(chunks.multipliers[0], expected)


def test_emphasis_off_reads_brackets_literally(sd1):
    chunks = tokenize_weighted(sd1, "(cat) [dog]", emphasis=False)
    np.testing.assert_array_equal(chunks.ids, sd1(["(cat) [dog]"]))
    assert np.all(chunks.multipliers == 1.0)


def test_emphasize_restores_the_mean():
    z = np.array([[[1, 1], [2, 2], [3, 3], [4, 4]]], np.float32)  # mean 2.5
    out = emphasize(z, np.array([[1, 2, 1, 1]], np.float32))  # weighted mean 3.0, so scale 2.5 / 3
    expected = np.array([[[1, 1], [4, 4], [3, 3], [4, 4]]], np.float32) * (2.5 / 3)
    np.testing.assert_allclose(out, expected, rtol=EMBEDDING_RTOL)
    assert out.dtype == np.float32 and out.mean() == pytest.approx(2.5, rel=EMBEDDING_RTOL)


def test_emphasize_is_a_bit_exact_no_op_at_weight_one():
    z = np.random.default_rng(1).standard_normal((2, 77, DIM)).astype(np.float32)
    assert emphasize(z, np.ones((2, 77), np.float32)) is z
    multipliers = np.ones((2, 77), np.float32)
    multipliers[1, 5] = 1.2
    out = emphasize(z, multipliers)
    np.testing.assert_array_equal(out[0], z[0])  # the restore runs on chunk 0 too, exactly as a no-op
    assert not np.array_equal(out[1], z[1])
    assert out[1].mean(dtype=np.float64) == pytest.approx(z[1].mean(dtype=np.float64), rel=EMBEDDING_RTOL)


def test_mean_is_restored_per_chunk(sd1):
    chunks = tokenize_weighted(sd1, "(cat:2) BREAK [dog]")
    z = encode_weighted(fake_encoder, [chunks])
    raw = fake_encoder(chunks.ids)
    assert z.shape == (1, 154, DIM)
    for i in range(2):
        part = z[0, 77 * i : 77 * (i + 1)]
        assert part.mean(dtype=np.float64) == pytest.approx(raw[i].mean(dtype=np.float64), rel=EMBEDDING_RTOL)
        ratio = part / raw[i]  # every token scaled by multiplier * the chunk's restore factor
        np.testing.assert_allclose(ratio / chunks.multipliers[i][:, None], ratio[0, 0], rtol=1e-5)


def test_plain_prompts_keep_todays_embeddings(sd1):
    prompts = ["", "a photo of a cat", "a photo of a cat", "wow, great!"]
    np.testing.assert_array_equal(prompt_embeddings(sd1, fake_encoder, prompts), fake_encoder(sd1(prompts)))


def test_chunks_concatenate_in_order(sd1):
    prompt = "cat " * 100 + "(dog)"
    z = prompt_embeddings(sd1, fake_encoder, [prompt])
    chunks = tokenize_weighted(sd1, prompt)
    expected = emphasize(fake_encoder(chunks.ids), chunks.multipliers)
    np.testing.assert_array_equal(z, np.concatenate(list(expected))[None])


def test_cond_uncond_padded_with_empty_chunks(sd1):
    long, short = "cat " * 160, "dog"
    z = prompt_embeddings(sd1, fake_encoder, [short, long])
    assert z.shape == (2, 3 * 77, DIM)
    empty = fake_encoder(tokenize_weighted(sd1, "").ids)[0]
    np.testing.assert_array_equal(z[0, :77], fake_encoder(sd1([short]))[0])
    np.testing.assert_array_equal(z[0, 77:], np.concatenate([empty, empty]))  # A1111 pad_cond: empty.repeat
    np.testing.assert_array_equal(z[1], prompt_embeddings(sd1, fake_encoder, [long])[0])


def test_pad_chunks_and_mismatch(sd1):
    empty = tokenize_weighted(sd1, "")
    padded = pad_chunks([tokenize_weighted(sd1, "cat"), tokenize_weighted(sd1, "a BREAK b BREAK c")], empty)
    assert [len(p) for p in padded] == [3, 3]
    np.testing.assert_array_equal(padded[0].ids[1:], np.repeat(empty.ids, 2, axis=0))
    assert isinstance(padded[0], PromptChunks) and np.all(padded[0].multipliers[1:] == 1.0)
    with pytest.raises(ValueError, match=r"equal chunk counts .*\[1, 3\]"):
        encode_weighted(fake_encoder, [tokenize_weighted(sd1, "cat"), padded[1]])
