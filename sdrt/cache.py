"""sdrt's on-disk caches: where they live, and the record of bundle files already checked against their sha256.

Hashing a bundle costs about a second per GB, on every start. Like git's index, `VerifiedFiles` remembers each
file that matched its checksum together with its stat signature (size, mtime, ctime, inode, device); while the
signature is unchanged the file is not read again. Any write to the file changes its ctime (which, unlike mtime,
cannot be set back from user space), so a modified file is hashed again. A file changed within the timestamp
granularity of its last check could keep its signature (git's "racily clean" case), so a file whose ctime is
younger than `SETTLE_S` is never recorded, only hashed.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

SETTLE_S = 2.0  # a file is recorded only once its last change (ctime) is this much older than the check
VERIFIED = "verified-files.json"


def cache_home() -> Path:
    """$SDRT_CACHE_DIR, else $XDG_CACHE_HOME/sdrt, else ~/.cache/sdrt."""
    if os.environ.get("SDRT_CACHE_DIR"):
        return Path(os.environ["SDRT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdrt"


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
