"""Writing a file so that its path holds the old file or the whole new one, never a part of either."""
from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

# Flags of the temporary file: created new (never an existing file or a link planted under its name), binary.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)


@contextmanager
def replacing(path: Path | str, *, exclusive: bool = False) -> Iterator[BinaryIO]:
    """A new file in `path`'s folder that becomes `path` when the block completes, after reaching the disk.

    A full disk, an exception or a kill during the block leaves `path` as it was (a kill leaves the hidden
    temporary file too). A symbolic link at `path` is replaced by the file, not written through. `exclusive`:
    FileExistsError instead of replacing a file already at `path`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, _CREATE, 0o666)  # 0o666 less the umask, as a plain open() creates files (mkstemp: 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a crash must not leave an empty file at `path`
        if exclusive:
            os.link(tmp, path)  # atomic, and refuses an existing name
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
