"""Where a bundle is written: what `overwrite` may replace, and the hidden staging folder beside the output.

A staging folder is named `.NAME.partial-*` beside the output NAME and held locked (flock on the folder) by its
writer. A writer that stops on an exception, SIGINT or (through the CLI's handler) SIGTERM removes its folder;
one killed outright cannot, so every new writer for the same output first removes the `.NAME.partial-*` folders
no live process holds. A new folder is locked before it gets that name, so no writer can remove another's.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sdrt.bundle_files import entries
from sdrt.errors import BundleError, printable
from sdrt.manifest_schema import FORMAT, load_document

try:
    import fcntl
except ImportError:  # Windows: no flock; leftovers of killed writers stay until removed by hand
    fcntl = None

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LIBRARY_FLAG = "overwrite=True"  # how Python callers ask to replace; the CLI passes "--overwrite"


def check_destination(out: Path, overwrite: bool, flag: str = LIBRARY_FLAG) -> None:
    """Refuse to write a bundle at `out` unless nothing is there, or `overwrite` and `out` is an sdrt bundle or an
    empty folder (anything else is the user's, left untouched); `flag` is the option as the caller spells it."""
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise BundleError(f"{printable(out)} already exists (pass {flag} to replace it)")
    reason = _not_replaceable(Path(out))
    if reason:
        raise BundleError(f"{flag} replaces only an sdrt bundle or an empty folder, and {printable(out)} {reason}: "
                          "left untouched")


def _not_replaceable(out: Path) -> str | None:
    """Why `out` is not a folder sdrt may delete (None: it may). Stops at the first reason: a home folder given by
    mistake is refused at its top level, not walked."""
    if out.is_symlink() or not out.is_dir():
        return "is a symbolic link" if out.is_symlink() else "is not a folder"
    if not any(out.iterdir()):
        return None
    manifest = out / MANIFEST
    if manifest.is_symlink() or not manifest.is_file():
        return f"holds files but no {MANIFEST}"
    try:
        document = load_document(manifest)
    except BundleError:
        document = None
    if not isinstance(document, dict) or document.get("format") != FORMAT or not isinstance(document.get("files"),
                                                                                           dict):
        return f"has a {MANIFEST} sdrt did not write"
    for rel, kind in entries(out):
        if kind != "folder" and rel != MANIFEST and rel not in document["files"]:
            return f"holds {printable(rel)} ({kind}), which its manifest does not list"
    return None


def _try_lock(path: Path) -> int | None:
    """An open descriptor of folder `path` holding its exclusive lock (-1 without flock), or None when another
    process holds it."""
    if fcntl is None:
        return -1
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
        return None


def _release(fd: int) -> None:
    if fd >= 0:
        os.close(fd)  # closing the descriptor drops the lock


def remove_stale(out: Path) -> None:
    """Remove staging folders of `out` left by writers that were killed (those whose lock no process holds)."""
    if fcntl is None or not out.parent.is_dir():
        return
    prefixes = (f".{out.name}.partial-", f".{out.name}.old-")
    with os.scandir(out.parent) as it:
        stale = [Path(e.path) for e in it if e.name.startswith(prefixes) and e.is_dir(follow_symlinks=False)]
    for path in stale:
        fd = _try_lock(path)
        if fd is not None:
            log.info("removing %s, left by an export that was killed", printable(path))
            shutil.rmtree(path, ignore_errors=True)
            _release(fd)


@contextmanager
def staging_folder(out: Path, tag: str = "") -> Iterator[Path]:
    """A new hidden folder beside `out`, locked while in use and removed on exit unless it was moved away."""
    out = Path(out).absolute()
    remove_stale(out)
    fresh = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    fd = _try_lock(fresh)  # locked under a name no cleanup looks at, then renamed: never removed while in use
    path = fresh.with_name(f".{out.name}.partial-{tag}{fresh.name.rsplit('-', 1)[-1]}")
    fresh.rename(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)  # a committed folder was renamed away: nothing is there
        _release(fd)


def swap_into_place(staging: Path, out: Path) -> None:
    """Move the finished `staging` folder to `out`, replacing what `out` holds (checked by check_destination)."""
    if not out.exists():
        staging.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
