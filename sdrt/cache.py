"""sdrt's on-disk caches: where they live, and the record of bundle files already checked against their sha256.

Hashing a bundle costs about a second per GB, on every start. Like git's index, `VerifiedFiles` remembers each
file that matched its checksum together with its stat signature (size, mtime, ctime, inode, device); while the
signature is unchanged the file is not read again. Any write to the file changes its ctime (which, unlike mtime,
cannot be set back from user space), so a modified file is hashed again. A file changed within the timestamp
granularity of its last check could keep its signature (git's "racily clean" case), so a file whose ctime is
younger than `SETTLE_S` is never recorded, only hashed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import platformdirs

from sdrt.errors import ConfigError

log = logging.getLogger(__name__)

SETTLE_S = 2.0  # a file is recorded only once its last change (ctime) is this much older than the check
VERIFIED = "verified-files.json"


def cache_home() -> Path:
    """$SDRT_CACHE_DIR, else the OS's per-user cache folder (platformdirs: $XDG_CACHE_HOME/sdrt or ~/.cache/sdrt
    on Linux, ~/Library/Caches/sdrt on macOS, %LOCALAPPDATA%\\sdrt\\Cache on Windows)."""
    if os.environ.get("SDRT_CACHE_DIR"):
        return Path(os.environ["SDRT_CACHE_DIR"])
    return Path(platformdirs.user_cache_dir("sdrt", appauthor=False))


def write_atomically(path: Path, data) -> bool:
    """Write `data` (bytes or a buffer) to `path` through a temporary sibling renamed into place, so readers see the
    old file or the whole new one; False (logged, nothing left behind) when it cannot be written."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return True
    except OSError as e:
        log.warning("cannot write %s: %s", path, e)
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        return False


def _signature(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class VerifiedFiles:
    """Files known to have had a given sha256, keyed by absolute path; saved atomically by `save`."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_home() / VERIFIED
        try:
            self._entries: dict[str, list] = json.loads(self.path.read_text())
        except (OSError, ValueError):  # none yet, or unreadable: everything is hashed (and recorded anew)
            self._entries = {}
        self._changed = False

    def known(self, path: Path, sha256: str) -> bool:
        """Whether `path` was recorded with `sha256` and has not changed since."""
        entry = self._entries.get(str(path.absolute()))
        try:
            return entry is not None and entry[-1] == sha256 and entry[:-1] == _signature(path.stat())
        except OSError:
            return False

    def record(self, path: Path, sha256: str) -> None:
        """Remember that `path` (just hashed) has `sha256`, unless it changed too recently to tell a later edit apart."""
        st = path.stat()
        if time.time_ns() - st.st_ctime_ns >= SETTLE_S * 1e9:
            self._entries[str(path.absolute())] = [*_signature(st), sha256]
            self._changed = True

    def save(self) -> None:
        """Write the record (dropping files that are gone); a failure only costs the next start a rehash."""
        if not self._changed:
            return
        entries = {p: e for p, e in self._entries.items() if os.path.exists(p)}
        self._changed = False
        write_atomically(self.path, json.dumps(entries).encode())


# ---- compiled engines ----

ENTRY_SUFFIX = ".entry"
RECORD = "record.json"
RECORD_FORMAT = 1
_ENTRY_NAME = re.compile(r"[0-9a-f]{40}\.entry")
_STAGING = re.compile(r"\.[0-9a-f]{40}\.staging-.*")
STALE_STAGING_S = 24 * 3600  # a staging folder this old was left by a killed process: removed on the next store


def cache_budget(variable: str, default_gb: float) -> int:
    """Bytes from $variable (in GB: a finite number >= 0), else `default_gb`; anything else is a ConfigError."""
    text = os.environ.get(variable)
    if text is None or text.strip() == "":
        return int(default_gb * 2**30)
    try:
        gb = float(text)
    except ValueError:
        gb = math.nan
    if not math.isfinite(gb) or gb < 0:
        raise ConfigError(f"{variable} must be a size in GB (a number >= 0), got {text!r}")
    return int(gb * 2**30)


def _payload_files(payload: Path) -> list[tuple[str, Path]] | None:
    """(relative name, path) of every file of a payload (a file, or a folder walked in order); None when the
    payload is missing or holds anything but plain files and folders (a link is never followed)."""
    if payload.is_symlink() or not payload.exists():
        return None
    if payload.is_file():
        return [(payload.name, payload)]
    files = []
    for folder, dirs, names in os.walk(payload):
        dirs.sort()
        for name in sorted(dirs + names):
            path = Path(folder) / name
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                return None
            if path.is_file():
                files.append((path.relative_to(payload).as_posix(), path))
    return files


def _tree_signature(files: list[tuple[str, Path]]) -> list:
    return [[name, *_signature(path.lstat())] for name, path in files]


def _tree_sha256(payload: Path, files: list[tuple[str, Path]]) -> str:
    """sha256 of a file; of a folder, sha256 over its files' names and sha256s in order."""
    from sdrt.bundle import sha256_file

    if payload.is_file():
        return sha256_file(payload)
    listing = "".join(f"{name}\0{sha256_file(path)}\n" for name, path in files)
    return hashlib.sha256(listing.encode()).hexdigest()


class EngineCache:
    """Compiled engines on disk (OpenVINO blobs, TensorRT plans, AOTInductor packages, Core ML .mlmodelc), one
    immutable entry per key, shared by every engine backend.

    - The key is derived from content: callers hash an identity holding the sha256 of the model files (as the
      bundle's verified manifest records them), the shapes, the engine's configuration and version and the
      device, so a model replaced with preserved times (`cp -a`, `rsync -t`) never reuses an old entry.
    - An entry is a folder `<key>.entry/` holding the payload (a file or a folder) and `record.json` with the
      payload's sha256 and stat signature. It is staged in a private folder and renamed into place whole, so
      readers and concurrent writers never see half of one.
    - A payload whose signature changed since it was recorded is hashed again, and removed if its bytes differ
      (like VerifiedFiles, an unchanged signature costs no read on a warm start).
    - The folder is bounded: after each store the least recently used entries (a hit touches its record) go
      until the total is under `max_bytes`. Only entries sdrt wrote (named `<40 hex>.entry`, with a record) are
      ever deleted; links are never followed; other files in the folder are left alone.
    - A folder that cannot be written (read-only, full) costs a warning and a compile per run, never a failure.
    """

    def __init__(self, root: Path, max_bytes: int):
        self.root, self.max_bytes = Path(root), max_bytes

    @classmethod
    def for_engine(cls, engine: str, root: Path | None = None, default_gb: float = 20.0) -> EngineCache:
        """The cache of one engine: `root` or <cache home>/<engine>, bounded by $SDRT_<ENGINE>_CACHE_GB."""
        budget = cache_budget(f"SDRT_{engine.upper().replace('-', '_')}_CACHE_GB", default_gb)
        return cls(Path(root) if root is not None else cache_home() / engine, budget)

    @staticmethod
    def key(identity: dict) -> str:
        """40 hex digits of the sha256 of `identity` (JSON-able: model checksums, shapes, config, versions)."""
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:40]

    def lookup(self, key: str) -> Path | None:
        """The payload of the intact entry under `key` (marked as just used), else None; a damaged entry is
        removed (or, in a folder that cannot be written, only skipped)."""
        entry = self.root / f"{key}{ENTRY_SUFFIX}"
        record = _read_record(entry)
        if record is None:
            return None
        payload = entry / record["payload"]
        if not self._intact(entry, payload, record):
            log.warning("engine cache: entry %s does not match its recorded checksum; rebuilding it", entry.name)
            self._remove(entry)
            return None
        _touch(entry / RECORD)
        return payload

    def store(self, key: str, name: str, produce: Callable[[Path], None]) -> Path | None:
        """Have `produce(path)` write the payload (a file or folder called `name`) into a private staging folder,
        record its checksum and rename the entry into place; returns the payload's final path, or None (with a
        warning) when the cache cannot be written. Errors of `produce` itself propagate, leaving nothing behind."""
        staging = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{key}.staging-", dir=self.root))
            produce(staging / name)
            files = _payload_files(staging / name)
            if not files:
                raise OSError(f"the engine wrote no {name}")
            record = {"format": RECORD_FORMAT, "payload": name, "sha256": _tree_sha256(staging / name, files),
                      "bytes": sum(p.stat().st_size for _, p in files), "signature": _tree_signature(files)}
            (staging / RECORD).write_text(json.dumps(record))
            staging = self._publish(staging, self.root / f"{key}{ENTRY_SUFFIX}")
        except OSError as e:
            log.warning("engine cache: cannot store an entry in %s (%s); the next run compiles again", self.root, e)
            return None
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        self.evict(keep=key)
        return self.lookup(key)

    @staticmethod
    def _publish(staging: Path, entry: Path) -> Path | None:
        """Rename the staged entry into place (None: nothing left to clean); if another process published the
        same key first, keep theirs and return the staging folder for removal."""
        try:
            os.rename(staging, entry)
            return None
        except OSError as e:
            if entry.is_dir() and not entry.is_symlink():
                log.debug("engine cache: %s was stored meanwhile by another process (%s)", entry.name, e)
                return staging
            raise

    def _intact(self, entry: Path, payload: Path, record: dict) -> bool:
        files = _payload_files(payload)
        if not files:
            return False
        signature = _tree_signature(files)
        if signature == record["signature"]:
            return True
        if _tree_sha256(payload, files) != record["sha256"]:
            return False
        # Same bytes, new signature (copied, restored from a backup): remember it, once it has settled.
        if all(time.time_ns() - s[3] >= SETTLE_S * 1e9 for s in signature):
            write_atomically(entry / RECORD, json.dumps({**record, "signature": signature}).encode())
        return True

    def entries(self) -> list[tuple[int, int, Path]]:
        """(last use in ns, bytes, folder) of every entry sdrt wrote here; links and foreign files are skipped."""
        found = []
        for path in self.root.glob(f"*{ENTRY_SUFFIX}"):
            if not _ENTRY_NAME.fullmatch(path.name) or path.is_symlink() or not path.is_dir():
                continue
            record = _read_record(path)
            try:
                used = (path / RECORD).stat().st_mtime_ns
            except OSError:
                continue
            if record is not None:
                found.append((used, int(record["bytes"]), path))
        return found

    def evict(self, keep: str = "") -> None:
        """Delete least recently used entries (never `keep`) until the folder is within max_bytes, and staging
        folders left by killed processes."""
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if path.name != f"{keep}{ENTRY_SUFFIX}":
                log.info("engine cache: over %.1f GB, deleting %s", self.max_bytes / 2**30, path.name)
                self._remove(path)
                total -= size
        self._remove_stale_staging()

    def _remove_stale_staging(self) -> None:
        for path in self.root.glob(".*.staging-*"):
            try:
                old = time.time() - path.lstat().st_mtime > STALE_STAGING_S
            except OSError:
                continue
            if old and _STAGING.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
                self._remove(path)

    @staticmethod
    def _remove(path: Path) -> None:
        try:
            shutil.rmtree(path)  # removes links inside, never what they point to
        except OSError as e:
            log.warning("engine cache: cannot remove %s: %s", path, e)


def _read_record(entry: Path) -> dict | None:
    """An entry's record, or None when there is none, it is unreadable or malformed, or the entry is a link."""
    if entry.is_symlink() or not entry.is_dir():
        return None
    try:
        record = json.loads((entry / RECORD).read_text())
    except (OSError, ValueError):
        return None
    keys = {"format": int, "payload": str, "sha256": str, "bytes": int, "signature": list}
    if not isinstance(record, dict) or any(not isinstance(record.get(k), t) for k, t in keys.items()):
        return None
    if record["format"] != RECORD_FORMAT or "/" in record["payload"] or record["payload"] in ("", ".", ".."):
        return None
    return record


def _touch(path: Path) -> None:
    try:
        os.utime(path)  # recently used: evicted last
    except OSError:
        pass
