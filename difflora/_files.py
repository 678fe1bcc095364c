"""Writing files so that a crash or a bad input never leaves half a file behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_directory"]


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import: os.umask can only be read by setting it, which is not safe once threads run.
_UMASK = _read_umask()
_FILE_MODE = 0o666 & ~_UMASK
_DIRECTORY_MODE = 0o777 & ~_UMASK


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``destination``; on success it is renamed over ``destination`` in one step.

    The temporary file sits in the same folder so the rename stays on one file system (``os.replace`` is atomic
    there). On any exception the temporary file is deleted and ``destination`` is left as it was.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent)
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        # mkstemp creates the file private (0600); give it the mode a plain open() would have.
        os.chmod(temporary_path, _FILE_MODE)
        os.replace(temporary_path, destination)
    finally:
        if temporary_path.exists():
            temporary_path.unlink()


@contextlib.contextmanager
def atomic_directory(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty folder beside ``destination``; on success it is renamed to ``destination`` in one step.

    ``destination`` must not exist or be an empty folder (callers check that first, with a message of their own).
    On any exception the staging folder is removed and ``destination`` is left as it was.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        yield staging
        os.chmod(staging, _DIRECTORY_MODE)  # mkdtemp makes it private (0700); use the mode mkdir would give
        if destination.exists():
            destination.rmdir()  # empty: os.replace cannot replace a folder on every OS
        os.replace(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
