"""Atomic file writes (no torch): a temp file in the target folder, then a rename, so a reader never sees a
half-written file and a failed write leaves the earlier file in place."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from edgeseg.errors import EdgesegError


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (str as UTF-8) to ``path`` atomically; the folder must exist. EdgesegError on failure."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.replace(tmp, path)
    except OSError as e:
        raise EdgesegError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path
