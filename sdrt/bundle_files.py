"""Which files a bundle's engines open, and the rules every file of a bundle obeys before any is opened.

A bundle is a folder of regular files: no symbolic links anywhere (a link could make an engine, or a checksum,
read a file outside the folder), every path relative and inside it (sdrt.manifest_schema.PATH), and every file
an engine or the tokenizer opens listed in the manifest with its sha256. What an engine opens besides a
component's own file is read from the files themselves (an ONNX model's external data, an OpenVINO IR's .bin),
never taken on the manifest's word.
"""
from __future__ import annotations

import os
import posixpath
import stat
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

from sdrt.errors import BundleError, printable
from sdrt.manifest_schema import MAX_FILES, is_bundle_path
from sdrt.onnx_refs import external_data_files


def entries(root: Path) -> Iterator[tuple[str, str]]:
    """Every path under `root` (relative, '/'-separated) and its kind: file, folder, symbolic link or special file.
    Links are reported, never followed."""
    folders = [Path(root)]
    while folders:
        folder = folders.pop()
        with os.scandir(folder) as it:
            found = list(it)
        for entry in found:
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISDIR(mode):
                folders.append(Path(entry.path))
            kind = ("folder" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode)
                    else "symbolic link" if stat.S_ISLNK(mode) else "special file")
            yield Path(entry.path).relative_to(root).as_posix(), kind


def check_tree(root: Path) -> None:
    """Refuse a bundle folder holding a symbolic link or anything else that is not a regular file or folder."""
    for seen, (rel, kind) in enumerate(entries(root), start=1):
        if seen > 4 * MAX_FILES:
            raise BundleError(f"{printable(root)} holds over {4 * MAX_FILES} entries: not a bundle")
        if kind not in ("file", "folder"):
            raise BundleError(f"bundle {printable(root)} holds a {kind}, {printable(rel)}: a bundle may hold only "
                              "regular files and folders")


def _ir_weights(root: Path, rel: str) -> list[str]:
    """OpenVINO's read_model opens the .bin named as the .xml when it exists."""
    weights = posixpath.splitext(rel)[0] + ".bin"
    return [weights] if (root / weights).is_file() else []


def _onnx_external_data(root: Path, rel: str) -> list[str]:
    """ONNX Runtime and OpenVINO open each external-data location relative to the model's folder."""
    files = []
    for location in external_data_files(root / rel):
        if not is_bundle_path(location):
            raise BundleError(f"{printable(rel)} names external data {printable(repr(location))[:80]}: expected a "
                              "relative path inside the bundle without '..' (sdrt.manifest_schema.PATH)")
        files.append(posixpath.join(posixpath.dirname(rel), location))
    return files


# Per component format: the file name ending its engines expect, and the other files they open.
SUFFIXES = {"onnx": ".onnx", "openvino": ".xml", "coreml": ".mlpackage"}
# Formats whose `file` is a folder the engine reads whole (a Core ML .mlpackage): it opens every file inside.
FOLDER_FORMATS = frozenset({"coreml"})
COMPANIONS: dict[str, Callable[[Path, str], list[str]]] = {"onnx": _onnx_external_data, "openvino": _ir_weights}


def opened_files(root: Path, component) -> list[str]:
    """Every file an engine opens for `component`: its `file`, then what that file makes the engine read."""
    rel = component.file
    suffix = SUFFIXES.get(component.format)
    if suffix and not rel.endswith(suffix):
        raise BundleError(f"component {component.name}: a {component.format} file must end in {suffix}, got "
                          f"{printable(rel)}")
    if component.format in FOLDER_FORMATS:
        return _folder_files(Path(root), rel)
    if not (Path(root) / rel).is_file():
        raise BundleError(f"bundle {printable(root)} is missing {printable(rel)}")
    companions = COMPANIONS.get(component.format)
    return [rel, *(companions(Path(root), rel) if companions else [])]


def _folder_files(root: Path, rel: str) -> list[str]:
    """Every file in the folder `rel` (the bundle's tree check has already refused links and special files)."""
    folder = root / rel
    if not folder.is_dir():
        raise BundleError(f"bundle {printable(root)} is missing the folder {printable(rel)}")
    files = sorted(p.relative_to(root).as_posix() for p in folder.rglob("*") if p.is_file())
    if not files:
        raise BundleError(f"bundle {printable(root)}: {printable(rel)} is an empty folder")
    return files


def check_opened(root: Path, manifest) -> None:
    """Refuse a bundle whose engines, tokenizer or tables would open a file its manifest does not list with a
    sha256 (a VAE-only bundle has no tokenizer)."""
    tokenizer = (manifest.tokenizer.vocab, manifest.tokenizer.merges) if "text_encoder" in manifest.components else ()
    for rel in tokenizer:
        if rel not in manifest.files:
            raise BundleError(f"the tokenizer's {printable(rel)} has no checksum in the manifest")
    for comp in manifest.components.values():
        for name, rel in comp.tables.items():
            if rel not in manifest.files:
                raise BundleError(f"component {comp.name}'s table {printable(name)} ({printable(rel)}) has no "
                                  "checksum in the manifest")
        opened = opened_files(root, comp)
        declared = comp.files or tuple(opened)
        unlisted = [rel for rel in opened if rel not in declared]
        if unlisted:
            raise BundleError(f"component {comp.name} would open {printable(unlisted[0])}, which its manifest "
                              "entry does not list")
        variants = [rel for v in comp.variants.values() for rel in opened_files(root, replace(comp, file=v.file))]
        for rel in (*declared, *variants):
            if rel not in manifest.files:
                raise BundleError(f"component {comp.name}'s file {printable(rel)} has no checksum in the manifest")


def inside(root: Path, rel: str) -> Path:
    """`root / rel`, refusing a path that resolves outside `root` (a last guard: the rules above exclude it)."""
    base = Path(root).resolve()
    path = (base / rel).resolve()
    if base not in path.parents:
        raise BundleError(f"{printable(rel)} resolves outside the bundle {printable(root)}")
    return path
