"""The bundle's text encoder as prompts use it: token ids and embedding vectors in, hidden states at a clip skip out.

The graph takes token embeddings (contract `inputs_embeds`), looked up here in the bundle's `token_embedding`
table with textual-inversion vectors put in place, as A1111's EmbeddingsWithFixes does (sd_hijack.py), and gives
every layer's output through the final layer norm, from which clip skip picks (sd_hijack_clip.py
encode_with_transformers). Bundles exported before this take token ids and give the last layer only: they still
run plain prompts, and name the re-export for the rest.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from sdrt.bundle import Component, Manifest
from sdrt.contracts import TEXT_INPUT, TEXT_OUTPUT, TOKEN_TABLE
from sdrt.errors import BundleError, RequestError
from sdrt.runtime.vae_swap import VAE_FAMILY

LEGACY_INPUT, LEGACY_OUTPUT = "input_ids", "last_hidden_state"

RunFn = Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]


def takes_embeddings(component: Component) -> bool:
    """Whether the text encoder's graph takes token embeddings (bundles exported with textual-inversion support)."""
    return TEXT_INPUT in component.contract.input_names


def layer_count(component: Component) -> int:
    """How many layers' hidden states the graph gives (1 for bundles exported before clip skip)."""
    if not takes_embeddings(component):
        return 1
    return int(component.contract.outputs[0].shape[1])


def reexport_hint(manifest: Manifest) -> str:
    """The command that re-exports a bundle with the current text-encoder contract, from the source it records."""
    component = manifest.components["text_encoder"]
    options = "" if component.weights_storage == "fp32" else f" --weights-storage {component.weights_storage}"
    options += "" if component.format == "onnx" else f" --target {component.format}"
    return f"sdrt export {manifest.source.get('path') or 'SOURCE'} -o NEW_BUNDLE{options}"


def check_clip_skip(manifest: Manifest, clip_skip: object) -> None:
    """Refuse a clip skip outside 1..layers of the bundle's text encoder, naming the re-export for old bundles."""
    component = manifest.components["text_encoder"]
    layers = layer_count(component)
    if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or clip_skip < 1:
        raise RequestError(f"clip skip must be an integer >= 1, got {clip_skip!r}")
    if clip_skip > layers and not takes_embeddings(component):
        raise RequestError(f"clip skip {clip_skip} needs the text encoder's hidden states, which this bundle's "
                           f"graph does not give (exported before sdrt had them): re-export it with "
                           f"`{reexport_hint(manifest)}`")
    if clip_skip > layers:
        raise RequestError(f"clip skip must be from 1 to {layers} (the text encoder's layers), got {clip_skip}")


class TextEncoder:
    """Token ids [n, 77] and embedding fixes (row, position, vectors) -> hidden states [n, 77, dim] at a clip skip."""

    def __init__(self, root: Path, manifest: Manifest, run: RunFn):
        self.root, self.manifest, self._run = Path(root), manifest, run
        if "text_encoder" not in manifest.components:
            vae_only = manifest.model.family == VAE_FAMILY
            raise BundleError(f"bundle {root} has no text_encoder component"
                              f"{': it is a VAE bundle, for --vae (Pipeline.load vae=)' if vae_only else ''}")
        self.component = manifest.components["text_encoder"]
        self.table = self._table() if takes_embeddings(self.component) else None

    @property
    def width(self) -> int:
        """The hidden size: the width of token embeddings and of the hidden states."""
        return int(self.component.contract.outputs[0].shape[-1])

    def _table(self) -> np.ndarray:
        rel = self.component.tables.get(TOKEN_TABLE)
        if rel is None:
            raise BundleError(f"{self.root}: the text encoder takes {TEXT_INPUT} but lists no {TOKEN_TABLE} table")
        # Memory-mapped: SD's table is 49408 x 768 (152 MB in fp32); a prompt reads 77 rows of it.
        return np.load(self.root / rel, mmap_mode="r", allow_pickle=False)

    def __call__(self, ids: np.ndarray, fixes: Sequence[tuple[int, int, np.ndarray]] = (),
                 clip_skip: int = 1) -> np.ndarray:
        if self.table is None:
            return self._legacy(ids, fixes, clip_skip)
        return self._run(self.feeds(ids, fixes))[TEXT_OUTPUT][:, -clip_skip]

    def feeds(self, ids: np.ndarray, fixes: Sequence[tuple[int, int, np.ndarray]] = ()) -> dict[str, np.ndarray]:
        """The graph's inputs for token ids: their embeddings with the fixes in place (ids in older bundles)."""
        if self.table is None:
            return {LEGACY_INPUT: ids.astype(np.int32)}
        embeds = np.asarray(self.table[ids], dtype=np.float32)
        for row, position, vectors in fixes:
            # A1111 EmbeddingsWithFixes: as many vectors as fit before the end of the sequence.
            count = min(len(vectors), embeds.shape[1] - position)
            embeds[row, position: position + count] = vectors[:count]
        return {TEXT_INPUT: embeds}

    def _legacy(self, ids: np.ndarray, fixes: Sequence, clip_skip: int) -> np.ndarray:
        if fixes:
            raise BundleError(f"textual-inversion embeddings need a text encoder that takes token embeddings; this "
                              f"bundle's takes token ids (exported before sdrt had them): re-export it with "
                              f"`{reexport_hint(self.manifest)}`")
        if clip_skip != 1:
            check_clip_skip(self.manifest, clip_skip)
        return self._run(self.feeds(ids))[LEGACY_OUTPUT]
