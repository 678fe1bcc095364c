"""Writing files so that a crash or a bad input never leaves half a file behind, and checking an output path before
any work is done for it.

Every command that writes calls :func:`check_output` first (before it reads its inputs or loads a model), so an
output that cannot be written fails in a second with one line. What still fails at write time (a disk that fills up,
permissions that change) comes out of :func:`atomic_path` and :func:`atomic_directory` as one
:class:`~difflora.errors.DiffloraError` line naming the output.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path

from .errors import DiffloraError, InvalidArgumentError

__all__ = ["FILE_SUFFIXES", "atomic_path", "atomic_directory", "check_output"]


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import: os.umask can only be read by setting it, which is not safe once threads run.
_UMASK = _read_umask()
_FILE_MODE = 0o666 & ~_UMASK
_DIRECTORY_MODE = 0o777 & ~_UMASK


# ----- before any work ----------------------------------------------------------------------------------------------

# Suffixes of files difflora or image tools write: a folder output named with one (convert --to peft --out
# x.safetensors, merge --out m.png) is a mistake that would leave a folder where a tool expects a file.
FILE_SUFFIXES = (
    ".safetensors", ".gguf", ".onnx", ".json", ".yaml", ".yml", ".txt", ".png", ".jpg", ".jpeg", ".webp", ".gif",
    ".bmp", ".tif", ".tiff", ".avif",
)


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (the folder where writing it would start creating things)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path.cwd()


def _writable_folder_error(folder: Path) -> str | None:
    """Why nothing can be created in ``folder`` (an OS reason), or ``None`` when a file can be.

    Tried for real, with a temporary file that is removed at once: permission bits say nothing for root, and
    nothing for read-only or virtual file systems (``/proc`` refuses every new file with "No such file").
    """
    try:
        handle, probe = tempfile.mkstemp(prefix=".difflora-probe-", dir=folder)
    except OSError as error:
        return error.strerror or type(error).__name__
    os.close(handle)
    os.unlink(probe)
    return None


def check_output(
    path: str | os.PathLike,
    kind: str = "file",
    *,
    suffixes: Collection[str] = (),
    pickle_suffixes: Collection[str] = (),
    new: bool = False,
    parameter: str = "out",
) -> Path:
    """``path`` as a :class:`~pathlib.Path` if an output of ``kind`` (``"file"`` or ``"folder"``) can be written
    there; else :class:`InvalidArgumentError` naming ``parameter`` and what is wrong, in one line.

    Refused: a name ending in one of ``pickle_suffixes`` (formats that run code when loaded; callers pass
    ``keys.PICKLE_SUFFIXES``), a file whose name does not end in one of ``suffixes`` (when given), a folder whose name
    ends in one of :data:`FILE_SUFFIXES`, a folder where a file is meant and a file where a folder is meant, an
    existing output when ``new`` (a folder: unless it is empty), a path below a file, a name the OS refuses (too
    long), and a place where nothing can be created. Nothing is written: the writability probe is removed at once
    and no folder is created.
    """
    if kind not in ("file", "folder"):
        raise InvalidArgumentError(f"kind must be 'file' or 'folder', got {kind!r}", "kind")
    path = Path(path)
    where = f"{parameter} {path}"
    suffix = path.suffix.lower()
    wanted = f"a path ending in {' or '.join(suffixes)}" if suffixes else f"a {kind} name without it"
    if suffix in pickle_suffixes:
        raise InvalidArgumentError(f"{where}: {suffix} is a pickle suffix and difflora writes no pickles; give "
                                   f"{wanted}", parameter)
    if kind == "folder" and suffix in FILE_SUFFIXES:
        raise InvalidArgumentError(f"{where}: {suffix} names a file, and this output is a folder; give a folder name "
                                   "without it", parameter)
    if kind == "file" and suffixes and suffix not in suffixes:
        raise InvalidArgumentError(f"{where}: give {wanted}", parameter)
    try:
        _check_place(path, kind, new, where, parameter)
    except OSError as error:  # a name the OS refuses outright (over 255 bytes, a loop of links)
        raise InvalidArgumentError(f"{where}: {error.strerror or error}", parameter) from None
    return path


def _check_place(path: Path, kind: str, new: bool, where: str, parameter: str) -> None:
    """The checks of :func:`check_output` that look at the file system (``where`` begins each message)."""
    if kind == "file":
        if path.is_dir():
            raise InvalidArgumentError(f"{where}: is a folder; give a file path", parameter)
        if new and path.exists():
            raise InvalidArgumentError(f"{where}: exists; give a new path", parameter)
    else:
        if path.exists() and not path.is_dir():
            raise InvalidArgumentError(f"{where}: is a file; give a folder", parameter)
        if new and path.is_dir() and any(path.iterdir()):
            raise InvalidArgumentError(f"{where}: exists and is not empty; give a new folder", parameter)
    start = _nearest_existing(path.parent)
    if not start.is_dir():
        raise InvalidArgumentError(f"{where}: {start} is a file, not a folder", parameter)
    reason = _writable_folder_error(start)
    if reason is not None:
        raise InvalidArgumentError(f"{where}: cannot create a file in {start} ({reason})", parameter)


# ----- writing ------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _write_errors_named(destination: Path) -> Iterator[None]:
    """An OS error while writing ``destination`` (a full disk, a permission that changed) as one line naming it."""
    try:
        yield
    except OSError as error:
        reason = error.strerror or str(error).strip() or type(error).__name__
        raise DiffloraError(f"{destination}: could not be written ({reason}); nothing was written") from None


def _publish_modes(folder: Path) -> None:
    """Give everything under ``folder`` the mode ``open()`` and ``mkdir`` would (writers such as safetensors'
    ``save_file`` create their files private, 0600)."""
    for root, directories, files in os.walk(folder):
        for name in directories:
            os.chmod(os.path.join(root, name), _DIRECTORY_MODE)
        for name in files:
            os.chmod(os.path.join(root, name), _FILE_MODE)


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``destination``; on success it is renamed over ``destination`` in one step.

    The temporary file sits in the same folder so the rename stays on one file system (``os.replace`` is atomic
    there). On any exception the temporary file is deleted and ``destination`` is left as it was; an OS error
    (raised here or by the caller's writing) becomes a one-line :class:`DiffloraError` naming ``destination``.
    """
    destination = Path(destination)
    with _write_errors_named(destination):
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

    ``destination`` must not exist or be an empty folder (callers check that first, with :func:`check_output`).
    What is published has the modes ``open()`` and ``mkdir`` would give. On any exception the staging folder is
    removed and ``destination`` is left as it was; an OS error becomes a one-line :class:`DiffloraError` naming
    ``destination``.
    """
    destination = Path(destination)
    with _write_errors_named(destination):
        destination.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
        try:
            yield staging
            _publish_modes(staging)
            os.chmod(staging, _DIRECTORY_MODE)  # mkdtemp makes it private (0700); use the mode mkdir would give
            if destination.exists():
                destination.rmdir()  # empty: os.replace cannot replace a folder on every OS
            os.replace(staging, destination)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
