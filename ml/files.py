"""The one atomic file write: a temp file in the target's folder, fsync, then os.replace.

Readers see the old file or the new one, never a torn one; a crash leaves at most a
``.tmp-*`` file, which storage listings skip. ml/ writes checkpoints with it, worker/
its local artifacts and private files.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

TEMP_PREFIX = ".tmp-"


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None], *,
                 mode: int | None = None) -> Path:
    """Write ``data`` (bytes, or a function that writes to the open binary file) to ``path`` atomically.

    ``mode`` sets the permission bits before the file appears (the temp file starts as 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
