"""Textual-inversion embeddings: read from A1111 and diffusers files, found by name in prompts as A1111 finds them.

Reproduces AUTOMATIC1111/stable-diffusion-webui modules/textual_inversion/textual_inversion.py: an embedding's
name is its file name without the extension; files are read from the embeddings folder and its subfolders; a
prompt uses one by containing the tokens of its name (`EmbeddingDatabase.find_embedding_at_position`, the longest
name first); `create_embedding_from_data` reads A1111's `string_to_param` dict and any file holding one tensor
(diffusers' `{token: tensor}`, `.safetensors` with `emb_params`). Vectors whose width is not the text encoder's are
skipped by A1111; here a prompt that names one is refused with the reason, as are SDXL embeddings.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from sdrt.bundle import sha256_file
from sdrt.errors import RequestError, SdrtError, WeightsFileError
from sdrt.runtime import torch_pickle
from sdrt.runtime.prompts import tokenize_weighted
from sdrt.runtime.safetensors_file import read_safetensors
from sdrt.runtime.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

EXTENSIONS = (".pt", ".bin", ".safetensors")
# diffusers' default file names (loaders/textual_inversion.py TEXT_INVERSION_NAME[_SAFE]) say nothing of the concept:
# such a file is named by the token stored in it, as diffusers' load_textual_inversion names it.
DIFFUSERS_STEM = "learned_embeds"
CHUNK_TOKENS = 75  # an embedding must fit one A1111 prompt chunk (sd_hijack_clip.py chunk_length)
FAMILY_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x"}
SHORTHASH = 12  # A1111 Embedding.set_hash: the first 12 hex digits of the file's sha256


@dataclass(frozen=True)
class Embedding:
    """One embedding: its name in prompts, its vectors (float32 [n, width]) and the file they came from."""

    name: str
    vectors: np.ndarray
    path: Path
    sha256: str

    @property
    def shorthash(self) -> str:
        return self.sha256[:SHORTHASH]


def read_embedding(path: Path | str) -> tuple[np.ndarray, str | None]:
    """(vectors float32 [n, width], the token the file names or None) of an A1111 or diffusers embedding file."""
    path = Path(path)
    data = read_safetensors(path)[0] if path.suffix.lower() == ".safetensors" else torch_pickle.load(path)
    if not isinstance(data, dict) or not data:
        raise WeightsFileError(f"{path.name} holds {type(data).__name__}, not an embedding dict")
    if "string_to_param" in data:  # A1111 (and the original textual-inversion code): one term, "*"
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise WeightsFileError(f"{path.name}: expected one term in string_to_param, got {_count(params)}")
        return _vectors(next(iter(params.values())), path), None
    if "clip_g" in data and "clip_l" in data:
        raise WeightsFileError(f"{path.name} is an SDXL embedding (clip_g, clip_l); sdrt runs SD 1.x and 2.x")
    if len(data) != 1:
        raise WeightsFileError(f"{path.name}: expected string_to_param or a single tensor, got keys {sorted(data)[:5]}")
    token, vectors = next(iter(data.items()))
    return _vectors(vectors, path), str(token)


def _count(params) -> str:
    return str(len(params)) if isinstance(params, dict) else type(params).__name__


def _vectors(value, path: Path) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.ndim not in (1, 2) or value.dtype.kind != "f":
        what = f"{value.dtype} array of shape {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
        raise WeightsFileError(f"{path.name}: expected float vectors [n, width], got a {what}")
    vectors = np.atleast_2d(value).astype(np.float32)
    if not np.isfinite(vectors).all():
        raise WeightsFileError(f"{path.name}: the vectors are not all finite")
    return vectors


def find_files(folder: Path | str) -> dict[str, Path]:
    """Embedding name -> file, for the supported files in `folder` and its subfolders (sorted; a later name wins)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RequestError(f"embeddings folder not found: {folder}")
    files: dict[str, Path] = {}
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file()):
        if path.stat().st_size == 0:  # A1111 skips empty files
            continue
        name = _name(path)
        if not name:
            continue
        if name in files:
            log.warning("embedding %r: %s replaces %s", name, path, files[name])
        files[name] = path
    return files


def _name(path: Path) -> str | None:
    if path.stem != DIFFUSERS_STEM:
        return path.stem
    try:
        return read_embedding(path)[1] or path.stem
    except SdrtError as e:
        log.warning("skipping %s: %s", path, e)
        return None


class EmbeddingLibrary:
    """Embeddings by name for one tokenizer and text-encoder width; each file is read on first use."""

    def __init__(self, files: dict[str, Path], tokenizer: ClipTokenizer, width: int):
        self.files, self.width = dict(files), width
        self._loaded: dict[str, Embedding] = {}
        # first token id -> [(token ids of a name, name)], longest first (A1111 register_embedding_by_name)
        self._lookup: dict[int, list[tuple[list[int], str]]] = {}
        for name in self.files:
            ids = tokenizer.token_ids(name)
            if ids:
                self._lookup.setdefault(ids[0], []).append((ids, name))
        for candidates in self._lookup.values():
            candidates.sort(key=lambda c: len(c[0]), reverse=True)

    @classmethod
    def from_folder(cls, folder: Path | str, tokenizer: ClipTokenizer, width: int) -> EmbeddingLibrary:
        return cls(find_files(folder), tokenizer, width)

    def find(self, tokens: Sequence[int], position: int) -> tuple[Embedding, int] | None:
        """The embedding whose name's tokens start at `position`, and how many tokens the name takes."""
        for ids, name in self._lookup.get(tokens[position], ()):
            if list(tokens[position: position + len(ids)]) == ids:
                return self.get(name), len(ids)
        return None

    def get(self, name: str) -> Embedding:
        """The named embedding, read and checked against the text encoder on first use."""
        if name not in self._loaded:
            self._loaded[name] = self._load(name, self.files[name])
        return self._loaded[name]

    def _load(self, name: str, path: Path) -> Embedding:
        try:
            vectors = read_embedding(path)[0]
        except SdrtError as e:
            raise RequestError(f"embedding {name!r}: {e}") from None
        n, width = vectors.shape
        if width != self.width:
            family = FAMILY_WIDTHS.get(width)
            raise RequestError(f"embedding {name!r} ({path.name}) has {width}-wide vectors"
                               f"{f' ({family})' if family else ''}; this bundle's text encoder takes {self.width}")
        if n > CHUNK_TOKENS:
            raise RequestError(f"embedding {name!r} has {n} vectors; a prompt chunk holds {CHUNK_TOKENS}")
        log.info("embedding %r: %d vector%s from %s", name, n, "" if n == 1 else "s", path)
        return Embedding(name, vectors, path, sha256_file(path))


def used_embeddings(tokenizer: ClipTokenizer, library: EmbeddingLibrary | None, prompts: Sequence[str]) -> list:
    """The embeddings the prompts use, in order of use (repeats included)."""
    if library is None:
        return []
    return [fix.embedding for p in prompts for fix in tokenize_weighted(tokenizer, p, embeddings=library).fixes]


def ti_hashes(used: Sequence[Embedding]) -> str | None:
    """A1111's "TI hashes" infotext value (sd_hijack_clip.py): `name: shorthash` per embedding, in order of use."""
    names = {e.name.replace(":", "").replace(",", ""): e.shorthash for e in used}
    return ", ".join(f"{name}: {short}" for name, short in names.items()) or None
