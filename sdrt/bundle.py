"""The bundle: one folder with manifest.json and the files it lists, written atomically and verified by sha256."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

from sdrt.contracts import Contract
from sdrt.errors import BundleError

log = logging.getLogger(__name__)

FORMAT = "sdrt-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
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
    # The axis sizes a static-shape file was built for (one dict of contract axis -> size per shape), for engines
    # that cannot reshape it (Core ML); empty: any size the contract allows. Written only when not empty.
    shapes: tuple[dict[str, int], ...] = ()
    # The sha256 of every bundle file the component's engine opens (its folder), from the manifest, which
    # verify_files checks: the content identity engine caches key on. Filled by Manifest.from_dict, not written.
    checksums: dict[str, str] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        storage = {"weights_storage": self.weights_storage} if self.weights_storage != "fp32" else {}
        shapes = {"shapes": [dict(s) for s in self.shapes]} if self.shapes else {}
        d = {
            "file": self.file,
            "format": self.format,
            "precision": self.precision,
            **storage,
            "contract": self.contract.to_dict(),
            **shapes,
            "validation": self.validation,
        }
        return {**d, "preprocess": self.preprocess} if self.preprocess else d

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
            tuple(d.get("shapes", ())),
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
    def from_dict(cls, d: dict) -> Manifest:
        if d.get("format") != FORMAT:
            raise BundleError(f"not an sdrt bundle manifest (format={d.get('format')!r})")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(f"bundle format version {version} is not supported (this sdrt reads {FORMAT_VERSION})")
        try:
            files = d.get("files", {})
            return cls(
                model=ModelInfo(**d["model"]),
                components={k: _with_checksums(Component.from_dict(k, c), files) for k, c in d["components"].items()},
                scheduler=d["scheduler"],
                tokenizer=TokenizerInfo(**d.get("tokenizer", {})),
                shapes=ShapeRange(**d.get("shapes", {})),
                source=d.get("source", {}),
                tools=d.get("tools", {}),
                files=d.get("files", {}),
                format_version=version,
            )
        except (KeyError, TypeError) as e:
            raise BundleError(f"manifest.json is malformed: {e}") from None


def _with_checksums(component: Component, files: dict[str, str]) -> Component:
    """The component with the checksums of its files: everything in its file's folder, or the file alone when it
    sits at the bundle's root."""
    folder = Path(component.file).parent.as_posix()
    mine = {rel: digest for rel, digest in files.items()
            if rel == component.file or (folder != "." and rel.startswith(folder + "/"))}
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
    """Parse a bundle's manifest.json, with a clear error when it is missing or malformed."""
    path = Path(bundle) / MANIFEST
    if not Path(bundle).is_dir():
        raise BundleError(f"bundle not found: {bundle} is not a folder")
    if not path.is_file():
        raise BundleError(f"{bundle} has no {MANIFEST}: not an sdrt bundle, or an interrupted export")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON: {e}") from None
    return Manifest.from_dict(data)


def verify_files(bundle: Path | str, manifest: Manifest, *, remembered: bool = True) -> None:
    """Check that every listed file exists with its recorded sha256, and that no listed component is unlisted.

    With `remembered`, files already hashed and unchanged since (sdrt.cache.VerifiedFiles) are not read again.
    """
    from sdrt.cache import VerifiedFiles

    root = Path(bundle)
    for comp in manifest.components.values():
        _check_listed(root, comp, manifest.files)
    verified = VerifiedFiles() if remembered else None
    for rel, digest in manifest.files.items():
        path = root / rel
        if not path.is_file():
            raise BundleError(f"bundle {root} is missing {rel}")
        if verified and verified.known(path, digest):
            continue
        if sha256_file(path) != digest:
            raise BundleError(f"checksum mismatch for {rel} in {root}: the file was modified or corrupted")
        if verified:
            verified.record(path, digest)
    if verified:
        verified.save()


def _check_listed(root: Path, comp: Component, files: dict[str, str]) -> None:
    """A component's file has a checksum; a component stored as a folder (a Core ML .mlpackage) has one for every
    file inside and no file besides them, since the engine reads whatever the folder holds."""
    folder = root / comp.file
    if comp.file in files and not folder.is_dir():
        return
    listed = {rel for rel in files if rel.startswith(f"{comp.file}/")}
    if not listed:
        raise BundleError(f"component {comp.name}'s file {comp.file} has no checksum in the manifest")
    present = {p.relative_to(root).as_posix() for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else set()
    extra = sorted(present - listed)
    if extra:
        raise BundleError(f"component {comp.name}'s folder {comp.file} holds files the manifest does not list: "
                          f"{', '.join(extra[:3])}")


def check_destination(out: Path, overwrite: bool) -> None:
    """Fail before any work when a bundle may not be written at `out`."""
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists (pass --overwrite to replace it)")


class BundleWriter:
    """Stage a bundle in a hidden sibling folder; `commit` hashes, writes the manifest and renames into place."""

    def __init__(self, out: Path | str, overwrite: bool = False):
        self.out = Path(out).absolute()
        check_destination(self.out, overwrite)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.path.exists():  # not committed: leave nothing that looks like a bundle
            shutil.rmtree(self.path, ignore_errors=True)

    def commit(self, manifest: Manifest) -> Manifest:
        """Record the sha256 of every staged file, write manifest.json, and move the folder into place."""
        files = {p.relative_to(self.path).as_posix(): sha256_file(p) for p in _bundle_files(self.path)}
        final = Manifest(**{**manifest.__dict__, "files": files})
        (self.path / MANIFEST).write_text(json.dumps(final.to_dict(), indent=2) + "\n")
        os.chmod(self.path, 0o755)  # mkdtemp creates 0700
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            self.out.rename(old)
            self.path.rename(self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.path.rename(self.out)
        log.info("bundle written to %s (%d files)", self.out, len(files))
        return final
