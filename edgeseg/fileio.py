"""File helpers (no torch): atomic writes (a temp file in the target folder, then a rename, so a reader never
sees a half-written file and a failed write leaves the earlier file in place) and file hashes."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from edgeseg.errors import EdgesegError


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def default_file_mode() -> int:
    """The permissions a newly created file gets here (0o666 less the umask)."""
    return 0o666 & ~current_umask()


def make_folder(folder: str | os.PathLike, what: str = "the output folder") -> Path:
    """Create ``folder`` and its parents if missing; an OSError (a file on the way, no permission) becomes a
    one-line EdgesegError naming it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise EdgesegError(f"cannot create {what} {folder}: a file of that name is in the way") from None
    except OSError as e:
        raise EdgesegError(f"cannot create {what} {folder}: {e.strerror or e}") from None
    return folder


@contextmanager
def atomic_path(path: str | os.PathLike, mode: int | None = None, overwrite: bool = True) -> Iterator[Path]:
    """A temp path beside ``path`` (same suffix, so writers that go by the extension work) to write into.

    The temp file is created private (mkstemp). On a normal exit it gets ``mode`` (default: the permissions of
    a newly created file) and replaces ``path``; with ``overwrite=False`` it is synced to disk and hard-linked
    into place instead, which never replaces an existing file (an EdgesegError if one is there). On an
    exception it is removed and ``path`` is left as it was. The folder is created if missing. An OSError
    (unwritable folder, full disk, a folder at ``path``) becomes an EdgesegError naming ``path``.
    """
    path = Path(path)
    make_folder(path.parent, f"the folder of {path}")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix or ".tmp")
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, default_file_mode() if mode is None else mode)
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    except FileExistsError:
        raise EdgesegError(f"{path} exists; refusing to overwrite it") from None
    except OSError as e:
        raise EdgesegError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _link_new(tmp: str, path: Path) -> None:
    """Put the synced file ``tmp`` at ``path`` only if nothing is there (a hard link fails if the name exists)."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
    except OSError as e:  # a file system without hard links: a (racy) check, then a rename
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK) or os.path.lexists(path):
            raise
        os.rename(tmp, path)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_atomic(path: str | os.PathLike, data: bytes | str, mode: int | None = None,
                 overwrite: bool = True) -> Path:
    """Write ``data`` (str as UTF-8) to ``path`` atomically (``mode``, ``overwrite``: see :func:`atomic_path`).
    EdgesegError on failure."""
    with atomic_path(path, mode, overwrite) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def check_output(path: str | os.PathLike, kind: str = "file", option: str = "--out", *,
                 what: str | None = None) -> Path:
    """Refuse, before any work is done, an output path that cannot be written; creates nothing.

    ``kind`` is "file" (written atomically beside itself) or "folder" (created with its parents if missing).
    An existing path must be of that kind, and the nearest existing folder on the way must be writable (a
    file in the middle of the path cannot become a folder). Every command that writes calls this first;
    ``option`` and ``what`` ("the artefact folder") name the output in the message.
    """
    if kind not in ("file", "folder"):
        raise ValueError(f"kind must be 'file' or 'folder', got {kind!r}")
    path = Path(path)
    what = what or f"the output {kind}"
    try:
        exists, is_dir = path.exists(), path.is_dir()
        nearest = path if kind == "folder" and is_dir else path.parent
        while not nearest.exists() and nearest != nearest.parent:
            nearest = nearest.parent
    except OSError as e:  # e.g. a folder on the way that may not be listed
        raise EdgesegError(f"cannot write {what} {path} ({option}): {e.strerror or e}") from None
    if kind == "folder" and exists and not is_dir:
        raise EdgesegError(f"{option} {path} is a file, not a folder; give a folder (it is created if missing)")
    if kind == "file" and is_dir:
        raise EdgesegError(f"{option} {path} is a folder; give a file name")
    if not nearest.is_dir():
        raise EdgesegError(f"cannot write {what} {path} ({option}): {nearest} is a file, not a folder")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise EdgesegError(f"cannot write {what} {path} ({option}): no write permission in {nearest}")
    return path
