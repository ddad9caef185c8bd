"""A1111 prompts: attention syntax, 75-token chunks with BREAK, and weighted chunk embeddings.

Reproduces AUTOMATIC1111/stable-diffusion-webui: modules/prompt_parser.py (`parse_prompt_attention`),
modules/sd_hijack_clip.py (`tokenize_line`, `process_tokens`), modules/sd_emphasis.py ("Original"
emphasis) and modules/sd_samplers_cfg_denoiser.py (`pad_cond_uncond`). Textual-inversion embeddings are
placed as A1111's `PromptChunkFix`es. Engine-free: the text encoder comes in as a function from ids [n, 77] and
the fixes (row, position, vectors) to hidden states [n, 77, dim].
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, NamedTuple, Protocol, Sequence

import numpy as np

from sdrt.errors import RequestError, printable
from sdrt.runtime.tokenizer import ClipTokenizer



class Fix(NamedTuple):
    """Embedding vectors placed over a chunk's tokens from `position` on (BOS is position 0)."""

    chunk: int
    position: int
    embedding: object  # an sdrt.runtime.embeddings.Embedding: `.name`, `.vectors` [n, dim]


class EmbeddingLookup(Protocol):
    def find(self, tokens: Sequence[int], position: int) -> tuple[object, int] | None:
        """The embedding whose name's tokens start at `position`, and how many tokens the name takes."""


# ids [n, 77] and the fixes as (row, position, vectors) -> hidden states [n, 77, dim]
EncodeFn = Callable[[np.ndarray, Sequence[tuple[int, int, np.ndarray]]], np.ndarray]

# Bounds on one prompt, so that its cost stays in proportion to its tokens. A1111 sets none; these are far above
# what its users write (a long A1111 prompt is 3-6 chunks). Characters are checked before parsing: the attention
# parser is quadratic in bracket depth, as A1111's is, and at 20,000 characters its worst case takes 0.5 s.
# Chunks bound the text-encoder batch and the UNet's cross-attention length (77 per chunk).
MAX_PROMPT_CHARS = 20_000
MAX_CHUNKS = 32  # 2,400 tokens

ROUND_MULTIPLIER = 1.1  # "(word)"; A1111 round_bracket_multiplier
SQUARE_MULTIPLIER = 1 / 1.1  # "[word]"; A1111 square_bracket_multiplier
COMMA_BACKTRACK = 20  # A1111 opts.comma_padding_backtrack default
COMMA = ",</w>"
BREAK = ("BREAK", -1.0)  # the parser's marker for "start a new chunk here"
PLACEHOLDER = 0  # the token id A1111 puts where an embedding's vectors go (tokenize_line)

# One token of the attention syntax, in A1111's re_attention order: a backslash escape (a lone "\" is
# dropped), ":weight)", a bracket, a run of plain text, or a stray ":".
_ATTENTION = re.compile(r"\\[()\[\]\\]?|:\s*([+-]?[.\d]+)\s*\)|[()\[\]]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs as A1111's parse_prompt_attention does, BREAK as `BREAK`."""
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for item in res[start:]:
            item[1] *= multiplier

    for m in _ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token in ("(", "["):
            (round_open if token == "(" else square_open).append(len(res))
        elif weight is not None and round_open:
            multiply_from(round_open.pop(), _weight(weight, text))
        elif token == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    res.append(list(BREAK))
                res.append([part, 1.0])
    # Unclosed brackets apply to the end of the prompt.
    for start in round_open:
        multiply_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply_from(start, SQUARE_MULTIPLIER)
    return _merge_equal_weights(res or [["", 1.0]])


def _weight(number: str, prompt: str) -> float:
    try:
        return float(number)
    except ValueError:
        raise RequestError(f"attention weight {number!r} in prompt {printable(repr(prompt[:80]))} is not a number") \
            from None


def check_prompt(what: str, text: object) -> None:
    """Refuse a prompt that is not a string, longer than MAX_PROMPT_CHARS, or not Unicode text (the undecodable
    bytes of a command line that was not UTF-8)."""
    if not isinstance(text, str):
        raise RequestError(f"{what} must be a string, got {type(text).__name__}")
    if len(text) > MAX_PROMPT_CHARS:
        raise RequestError(f"{what} is {len(text)} characters long; at most {MAX_PROMPT_CHARS} are accepted")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{what} is not valid UTF-8 text: {printable(text[e.start])} at character {e.start}") \
            from None


def _merge_equal_weights(res: list[list]) -> list[tuple[str, float]]:
    # A1111 merges neighbours whose weights compare equal, BREAK markers included ("(a BREAK b)"
    # scales the marker to -1.1, after which it is the plain word BREAK: kept, as A1111 does).
    merged = [res[0]]
    for text, weight in res[1:]:
        if merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged]


@dataclass(frozen=True)
class PromptChunks:
    """One prompt as n chunks of BOS + 75 tokens + EOS: ids int64 [n, 77], multipliers float32 [n, 77], and the
    embeddings placed over them."""

    ids: np.ndarray
    multipliers: np.ndarray
    fixes: tuple[Fix, ...] = ()

    def __len__(self) -> int:
        return len(self.ids)

    def padded(self, n: int, empty: PromptChunks) -> PromptChunks:
        """These chunks followed by copies of the single `empty` chunk, n chunks in all."""
        extra = n - len(self)
        return PromptChunks(np.concatenate([self.ids, np.repeat(empty.ids, extra, axis=0)]),
                            np.concatenate([self.multipliers, np.repeat(empty.multipliers, extra, axis=0)]),
                            self.fixes)


def tokenize_weighted(tokenizer: ClipTokenizer, text: str, *, comma_backtrack: int = COMMA_BACKTRACK,
                      emphasis: bool = True, embeddings: EmbeddingLookup | None = None) -> PromptChunks:
    """Tokenize a prompt into chunks as A1111's tokenize_line does; emphasis=False reads brackets literally; the
    names of `embeddings` become their vectors."""
    parsed = parse_attention(text) if emphasis else [(text, 1.0)]
    builder = _ChunkBuilder(tokenizer, comma_backtrack)
    for part, weight in parsed:
        if (part, weight) == BREAK:
            builder.next_chunk()
            continue
        tokens, position = tokenizer.token_ids(part), 0
        while position < len(tokens):
            found = embeddings.find(tokens, position) if embeddings is not None else None
            if found is None:
                builder.add(tokens[position], weight)
                position += 1
            else:
                builder.add_embedding(tokens[position], found[0], weight)
                position += found[1]
    return builder.finish()


class _ChunkBuilder:
    """A1111's tokenize_line loop: fill 75-token chunks, moving a comma-ended tail to the next chunk."""

    def __init__(self, tokenizer: ClipTokenizer, comma_backtrack: int):
        self.tokenizer, self.comma_backtrack = tokenizer, comma_backtrack
        self.size = tokenizer.max_length - 2
        self.comma = tokenizer.backend.token_to_id(COMMA)
        self.chunks: list[tuple[list[int], list[float]]] = []
        self.fixes: list[Fix] = []
        self.tokens: list[int] = []
        self.multipliers: list[float] = []
        self.placed: list[tuple[int, object]] = []  # (index in self.tokens, embedding) of this chunk
        self.last_comma = -1

    def add(self, token: int, weight: float) -> None:
        self._make_room(token)
        self.tokens.append(token)
        self.multipliers.append(weight)

    def add_embedding(self, token: int, embedding, weight: float) -> None:
        """An embedding whose name starts with `token`: its vectors go whole into one chunk, as in A1111."""
        self._make_room(token)
        n = len(embedding.vectors)
        if len(self.tokens) + n > self.size:
            self.next_chunk()
        self.placed.append((len(self.tokens), embedding))
        self.tokens += [PLACEHOLDER] * n
        self.multipliers += [weight] * n

    def _make_room(self, token: int) -> None:
        if token == self.comma:
            self.last_comma = len(self.tokens)
        elif self._backtrack():
            # The chunk is full and a comma is near its end: the words after the comma move on, embeddings
            # included (A1111 moves the tokens but leaves their PromptChunkFix behind, losing the embedding).
            cut = self.last_comma + 1
            tail = self.tokens[cut:], self.multipliers[cut:], [(i - cut, e) for i, e in self.placed if i >= cut]
            self.tokens, self.multipliers = self.tokens[:cut], self.multipliers[:cut]
            self.placed = [(i, e) for i, e in self.placed if i < cut]
            self.next_chunk()
            self.tokens, self.multipliers, self.placed = tail
        if len(self.tokens) == self.size:
            self.next_chunk()

    def _backtrack(self) -> bool:
        return (self.comma_backtrack != 0 and len(self.tokens) == self.size and self.last_comma != -1
                and len(self.tokens) - self.last_comma <= self.comma_backtrack)

    def next_chunk(self) -> None:
        if len(self.chunks) == MAX_CHUNKS:
            raise RequestError(f"prompt is over {MAX_CHUNKS} chunks of {self.size} tokens "
                               f"({MAX_CHUNKS * self.size} tokens); shorten it")
        padding = [1.0] * (self.size + 1 - len(self.tokens))
        self.fixes += [Fix(len(self.chunks), i + 1, e) for i, e in self.placed]  # + 1: after BOS
        self.chunks.append((self._ids(self.tokens), [1.0] + self.multipliers + padding))
        self.tokens, self.multipliers, self.placed, self.last_comma = [], [], [], -1

    def _ids(self, tokens: list[int]) -> list[int]:
        t = self.tokenizer
        ids = [t.bos_id] + tokens + [t.eos_id] * (self.size + 1 - len(tokens))
        if t.pad_id == t.eos_id:
            return ids
        # A1111 process_tokens, for SD2 (id_pad != id_end): everything after the first EOS becomes id_pad.
        first_eos = ids.index(t.eos_id)
        return ids[: first_eos + 1] + [t.pad_id] * (len(ids) - first_eos - 1)

    def finish(self) -> PromptChunks:
        if self.tokens or not self.chunks:
            self.next_chunk()
        ids, multipliers = zip(*self.chunks)
        return PromptChunks(np.array(ids, dtype=np.int64), np.array(multipliers, dtype=np.float32), tuple(self.fixes))


def pad_chunks(prompts: Sequence[PromptChunks], empty: PromptChunks) -> list[PromptChunks]:
    """Give every prompt the most chunks of any, appending empty-prompt chunks (A1111 pad_cond_uncond)."""
    n = max(len(p) for p in prompts)
    return [p.padded(n, empty) for p in prompts]


def emphasize(z: np.ndarray, multipliers: np.ndarray) -> np.ndarray:
    """Scale hidden states [n, 77, dim] by per-token multipliers [n, 77], then restore each chunk's mean."""
    if np.all(multipliers == 1.0):
        return z  # A1111 computes it anyway; the result would be z to the bit
    # sd_emphasis.EmphasisOriginal: the mean over one process_tokens call, i.e. one chunk of one prompt.
    original = z.mean(axis=(1, 2), dtype=np.float64)
    weighted = z * multipliers[:, :, None].astype(z.dtype)
    scale = original / weighted.mean(axis=(1, 2), dtype=np.float64)
    return weighted * scale.astype(z.dtype)[:, None, None]


def encode_weighted(encode_fn: EncodeFn, prompts: Sequence[PromptChunks]) -> np.ndarray:
    """Encode equal-length prompts in one call: [len(prompts), 77 * chunks, dim], chunks joined in order."""
    counts = sorted({len(p) for p in prompts})
    if len(counts) != 1:
        raise ValueError(f"expected prompts with equal chunk counts (use pad_chunks), got counts {counts}")
    z = encode_fn(np.concatenate([p.ids for p in prompts]), batch_fixes(prompts))
    z = emphasize(z, np.concatenate([p.multipliers for p in prompts]))
    return z.reshape(len(prompts), counts[0] * z.shape[1], z.shape[2])


def batch_fixes(prompts: Sequence[PromptChunks]) -> list[tuple[int, int, np.ndarray]]:
    """The prompts' fixes as (row, position, vectors), rows counted over the prompts' chunks stacked in order."""
    starts = np.cumsum([0] + [len(p) for p in prompts])
    return [(int(start) + f.chunk, f.position, f.embedding.vectors) for p, start in zip(prompts, starts) for f in p.fixes]


def prompt_embeddings(tokenizer: ClipTokenizer, encode_fn: EncodeFn, prompts: Sequence[str], *,
                      comma_backtrack: int = COMMA_BACKTRACK, emphasis: bool = True,
                      embeddings: EmbeddingLookup | None = None) -> np.ndarray:
    """A1111 prompts -> text-encoder hidden states [len(prompts), 77 * chunks, dim], padded to equal length."""
    if isinstance(prompts, str):
        raise TypeError("expected a list of prompts, got a str")
    chunks = [tokenize_weighted(tokenizer, p, comma_backtrack=comma_backtrack, emphasis=emphasis,
                                embeddings=embeddings) for p in prompts]
    return encode_weighted(encode_fn, pad_chunks(chunks, tokenize_weighted(tokenizer, "")))
