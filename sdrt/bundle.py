"""The bundle: one folder with manifest.json and the files it lists, written atomically and verified by sha256."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

from sdrt.bundle_files import check_opened, check_tree, inside, opened_files
from sdrt.contracts import Contract
from sdrt.errors import BundleError, printable
from sdrt.manifest_schema import FORMAT, FORMAT_VERSION, check_manifest, load_document, validate
from sdrt.staging import MANIFEST, check_destination, staging_folder, swap_into_place

log = logging.getLogger(__name__)

_HASH_CHUNK = 1 << 22


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime must know about the model family to drive the loop."""

    family: str  # "sd1" | "sd2"
    prediction_type: str  # "epsilon" | "v_prediction"
    latent_scale_factor: float  # latents fed to the UNet = VAE latents * this
    latent_channels: int = 4
    vae_scale_factor: int = 8  # pixels per latent
    default_size: int = 512
    name: str = ""
    kind: str = ""  # "standard" | "lcm" | "turbo" (runtime/presets.py); "": detected from scheduler and name


@dataclass(frozen=True)
class ShapeRange:
    """Image sizes the exported graphs accept: multiples of `multiple_of` in [min_size, max_size], and when `sizes`
    lists (width, height) pairs, only those (engines that compile static shapes, such as Core ML)."""

    min_size: int = 64
    max_size: int = 2048
    multiple_of: int = 8
    max_batch: int = 16
    sizes: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):  # JSON brings the pairs back as lists
        object.__setattr__(self, "sizes", tuple((int(w), int(h)) for w, h in self.sizes))


@dataclass(frozen=True)
class TokenizerInfo:
    """The CLIP tokenizer files (vocab.json + merges.txt) and how prompts are padded."""

    vocab: str = "tokenizer/vocab.json"
    merges: str = "tokenizer/merges.txt"
    max_length: int = 77
    pad_token: str = "<|endoftext|>"


@dataclass(frozen=True)
class Variant:
    """The component's graph in another precision (an fp16 graph for GPU engines), validated against its file: the
    same contract, inputs and outputs in the contract's dtypes."""

    file: str
    precision: str
    validation: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"file": self.file, "precision": self.precision, "validation": self.validation}

    @classmethod
    def from_dict(cls, d: dict) -> Variant:
        return cls(d["file"], d["precision"], d.get("validation", {}))


@dataclass(frozen=True)
class Component:
    """One exported graph: its file, engine format, precision, weight storage, contract and measured parity."""

    name: str
    file: str
    contract: Contract
    format: str = "onnx"
    precision: str = "fp32"
    validation: dict = field(default_factory=dict)
    # How the runtime turns images into the inputs (the safety checker's CLIPImageProcessor parameters,
    # sdrt.runtime.safety.ClipPreprocess); empty for components fed tensors, and in bundles written before it.
    preprocess: dict = field(default_factory=dict)
    # How the file stores its large weights: "fp32", or "fp16" cast back to fp32 by the graph (sdrt.export.
    # fp16_storage). `precision` is what the graph computes in; written only when not "fp32", as old bundles lack it.
    weights_storage: str = "fp32"
    # Every file an engine opens for this component, `file` first (an IR's .bin, ONNX external data); recorded by
    # BundleWriter.commit. Empty in bundles written before it: then derived from the files (sdrt.bundle_files).
    files: tuple[str, ...] = ()
    # Arrays beside the graph that the runtime builds inputs from: name -> .npy file (the text encoder's
    # token_embedding, looked up by token id). Written only when present.
    tables: dict = field(default_factory=dict)
    # Where each torch parameter is in `file` (sdrt.weights_map; a file listed in `files`); "" in bundles exported
    # before weights maps.
    weights_map: str = ""
    # The axis sizes a static-shape file was built for (one dict of contract axis -> size per shape), for engines
    # that cannot reshape it (Core ML); empty: any size the contract allows. Written only when not empty.
    shapes: tuple[dict[str, int], ...] = ()
    # The sha256 of every bundle file the component's engine opens, from the manifest, which verify_files checks:
    # the content identity engine caches key on. Filled by Manifest.from_dict, not written.
    checksums: dict[str, str] = field(default_factory=dict, compare=False)
    # The same graph in other precisions, by precision ("fp16"): engines that compute in it run that file, and
    # fall back to `file` when its outputs are not finite (sdrt.backends.precision). Written only when present.
    variants: dict[str, Variant] = field(default_factory=dict)

    @property
    def model_files(self) -> list[str]:
        """The component's model files: its own and its variants'."""
        return [self.file, *(v.file for v in self.variants.values())]

    def to_dict(self) -> dict:
        storage = {"weights_storage": self.weights_storage} if self.weights_storage != "fp32" else {}
        if self.weights_map:
            storage["weights_map"] = self.weights_map
        shapes = {"shapes": [dict(s) for s in self.shapes]} if self.shapes else {}
        d = {
            "file": self.file,
            **({"files": list(self.files)} if self.files else {}),
            "format": self.format,
            "precision": self.precision,
            **storage,
            "contract": self.contract.to_dict(),
            **shapes,
            "validation": self.validation,
        }
        if self.variants:
            d["variants"] = {k: v.to_dict() for k, v in self.variants.items()}
        extra = {"preprocess": self.preprocess} if self.preprocess else {}
        return {**d, **extra, **({"tables": self.tables} if self.tables else {})}

    @classmethod
    def from_dict(cls, name: str, d: dict) -> Component:
        return cls(
            name,
            d["file"],
            Contract.from_dict(name, d["contract"]),
            d.get("format", "onnx"),
            d.get("precision", "fp32"),
            d.get("validation", {}),
            d.get("preprocess", {}),
            d.get("weights_storage", "fp32"),
            tuple(d.get("files", ())),
            d.get("tables", {}),
            d.get("weights_map", ""),
            tuple(d.get("shapes", ())),
            variants={k: Variant.from_dict(v) for k, v in d.get("variants", {}).items()},
        )


@dataclass(frozen=True)
class Manifest:
    """Everything a runtime needs to know about a bundle, serialised as manifest.json."""

    model: ModelInfo
    components: dict[str, Component]
    scheduler: dict
    tokenizer: TokenizerInfo = TokenizerInfo()
    shapes: ShapeRange = ShapeRange()
    source: dict = field(default_factory=dict)
    tools: dict = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "model": asdict(self.model),
            "components": {k: c.to_dict() for k, c in self.components.items()},
            "scheduler": self.scheduler,
            "tokenizer": asdict(self.tokenizer),
            "shapes": asdict(self.shapes),
            "source": self.source,
            "tools": self.tools,
            "files": self.files,
        }

    @classmethod
    def from_dict(cls, d: object) -> Manifest:
        """Build from a manifest.json document after checking it (sdrt.manifest_schema): garbage is one BundleError."""
        d = validate(d)
        files = d["files"]
        manifest = cls(
            model=ModelInfo(**d["model"]),
            components={k: _with_checksums(Component.from_dict(k, c), files) for k, c in d["components"].items()},
            scheduler=d["scheduler"],
            tokenizer=TokenizerInfo(**d.get("tokenizer", {})),
            shapes=ShapeRange(**d.get("shapes", {})),
            source=d.get("source", {}),
            tools=d.get("tools", {}),
            files=files,
            format_version=d["format_version"],
        )
        check_manifest(manifest)
        return manifest


def _with_checksums(component: Component, files: dict[str, str]) -> Component:
    """The component with the checksums of the files it opens: its record of them, its model files (its own and
    its variants') and, as in older bundles, everything in those files' folders."""
    own = set(component.files) | set(component.model_files)
    folders = {Path(f).parent.as_posix() for f in component.model_files} - {"."}
    mine = {rel: digest for rel, digest in files.items()
            if rel in own or any(rel.startswith(folder + "/") for folder in folders)}
    return replace(component, checksums=mine)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _bundle_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            yield path


def read_manifest(bundle: Path | str) -> Manifest:
    """Parse and check a bundle's manifest.json and the folder's layout (sdrt.bundle_files), with one-line errors.

    Nothing outside the folder is read, and no file a component's engine would open is left out of the manifest;
    the files' checksums are checked by `verify_files`.
    """
    root = Path(bundle)
    if not root.is_dir():
        raise BundleError(f"bundle not found: {printable(bundle)} is not a folder")
    if not os.path.lexists(root / MANIFEST):
        raise BundleError(f"{printable(bundle)} has no {MANIFEST}: not an sdrt bundle, or an interrupted export")
    check_tree(root)  # refuses a manifest.json that is a link too
    manifest = Manifest.from_dict(load_document(root / MANIFEST))
    check_opened(root, manifest)
    return manifest


def verify_files(bundle: Path | str, manifest: Manifest, *, remembered: bool = True) -> None:
    """Check that every listed file exists with its recorded sha256, and that no listed component is unlisted.

    With `remembered`, files already hashed and unchanged since (sdrt.cache.VerifiedFiles) are not read again.
    """
    from sdrt.cache import VerifiedFiles

    root = Path(bundle)
    for comp in manifest.components.values():
        for rel in filter(None, (*(v.file for v in comp.variants.values()), comp.weights_map)):
            if rel not in manifest.files:
                raise BundleError(f"component {comp.name}'s file {printable(rel)} has no checksum in the manifest")
    verified = VerifiedFiles() if remembered else None
    for rel, digest in manifest.files.items():
        path = inside(root, rel)
        if not path.is_file():
            raise BundleError(f"bundle {printable(root)} is missing {printable(rel)}")
        if verified and verified.known(path, digest):
            continue
        if sha256_file(path) != digest:
            raise BundleError(f"checksum mismatch for {printable(rel)} in {printable(root)}: the file was modified "
                              "or corrupted")
        if verified:
            verified.record(path, digest)
    if verified:
        verified.save()


class BundleWriter:
    """Stage a bundle in a hidden sibling folder (sdrt.staging); `commit` hashes, writes the manifest and moves it
    into place. `overwrite` replaces only an sdrt bundle or an empty folder (sdrt.staging.check_destination)."""

    def __init__(self, out: Path | str, overwrite: bool = False):
        self.out, self.overwrite = Path(out).absolute(), overwrite
        check_destination(self.out, overwrite)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._staging = ExitStack()
        self.path = self._staging.enter_context(staging_folder(self.out))

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._staging.close()  # not committed: the staging folder goes, leaving nothing that looks like a bundle

    def commit(self, manifest: Manifest) -> Manifest:
        """Record what each component opens and the sha256 of every staged file, write manifest.json, and move the
        folder into place (checking the destination again: a long export gives a user time to put files there)."""
        components = {k: replace(c, files=tuple(opened_files(self.path, c))) for k, c in manifest.components.items()}
        files = {p.relative_to(self.path).as_posix(): sha256_file(p) for p in _bundle_files(self.path)}
        final = replace(manifest, components=components, files=files)
        (self.path / MANIFEST).write_text(json.dumps(final.to_dict(), indent=2) + "\n")
        os.chmod(self.path, 0o755)  # mkdtemp creates 0700
        check_destination(self.out, self.overwrite)
        swap_into_place(self.path, self.out)
        log.info("bundle written to %s (%d files)", self.out, len(files))
        return final
