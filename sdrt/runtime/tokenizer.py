"""CLIP text tokenizer on the `tokenizers` library, giving the input_ids transformers' CLIPTokenizer gives."""

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# transformers 5 models/clip/tokenization_clip.py (CLIPConverter in convert_slow_tokenizer.py is the
# same without the special-token alternatives): contractions, letter runs, single digits, and runs of
# other non-space characters; whitespace is dropped.
_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class ClipTokenizer:
    """Turn prompts into [B, max_length] int64 ids: BOS, BPE tokens, EOS, then pad_token's id."""

    def __init__(self, backend: Tokenizer, *, max_length: int = 77, pad_token: str = EOS):
        if max_length < 2:
            raise ValueError(f"max_length must leave room for BOS and EOS, got {max_length}")
        self.backend, self.max_length, self.pad_token = backend, max_length, pad_token
        self.bos_id, self.eos_id, self.pad_id = (self._id(t) for t in (BOS, EOS, pad_token))

    @classmethod
    def from_files(cls, vocab_json, merges_txt, *, max_length: int = 77, pad_token: str = EOS) -> "ClipTokenizer":
        """Build the tokenizer from a CLIP vocab.json and merges.txt."""
        model = BPE.from_file(str(vocab_json), str(merges_txt), continuing_subword_prefix="",
                              end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS, dropout=None)
        missing = [t for t in (BOS, EOS, pad_token) if model.token_to_id(t) is None]
        if missing:
            raise ValueError(f"{vocab_json}: special tokens {missing} are not in the vocabulary")
        backend = Tokenizer(model)
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        # transformers registers bos/eos/unk/pad as special added tokens, matched in the raw text
        # before BPE. So with SD2's pad_token "!" every "!" in a prompt becomes id 0 rather than
        # "!</w>" (256); diffusers parity needs the same.
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS, EOS, pad_token)])
        return cls(backend, max_length=max_length, pad_token=pad_token)

    def token_ids(self, prompt: str) -> list[int]:
        """Return the prompt's BPE ids without BOS/EOS, padding or truncation."""
        return self.backend.encode(prompt, add_special_tokens=False).ids

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """Return int64 ids [len(prompts), max_length], truncated so EOS stays in the last slot at most."""
        if isinstance(prompts, str):
            raise TypeError("expected a list of prompts, got a str")
        ids = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int64)
        for row, encoding in zip(ids, self.backend.encode_batch(list(prompts), add_special_tokens=False)):
            body = encoding.ids[: self.max_length - 2]  # transformers truncation=True keeps BOS + EOS
            row[0], row[1 : len(body) + 1], row[len(body) + 1] = self.bos_id, body, self.eos_id
        return ids

    def _id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return token_id
