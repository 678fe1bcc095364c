"""The adapter folder (``--lora-dir``): the only place the web UI reads adapters from and writes files to.

Every name a user gives goes through :func:`resolve_inside`, which refuses anything leading outside the folder
(``../x``, absolute paths, symlinks pointing out); the Train tab's dataset folders go through it too, inside their
own root (``--data-root``). :class:`AdapterLibrary` lists the folder's top-level ``*.safetensors`` files and keeps a
summary of each per :class:`FileKey`, so listing again reads only new or changed files. :func:`format_summary`,
:func:`kinds_text` and :meth:`AdapterLibrary.table` are what the page shows of them (Markdown).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterFileError, DiffloraError, InvalidArgumentError
from ..formats import read_adapter
from ..keys import ADAPTER_SUFFIX, is_pickle
from ..reports import describe_adapter, summary_rows

__all__ = [
    "OUTPUTS_FOLDER",
    "TRAINING_FOLDER",
    "AdapterLibrary",
    "FileKey",
    "adapter_file_name",
    "existing_folder",
    "format_summary",
    "kinds_text",
    "markdown_cell",
    "resolve_inside",
]

OUTPUTS_FOLDER = "outputs"  # generated PNGs, inside the adapter folder
TRAINING_FOLDER = "training"  # one folder per training run, inside the adapter folder


def resolve_inside(root: Path, name: str, what: str = "file", *, place: str = "the adapter folder",
                   absolute: bool = False) -> Path:
    """The real path of ``name`` (relative to ``root``), refusing anything that would lead outside ``root``.

    ``root`` must already be resolved; ``place`` is how messages call it. Refused: empty names, ``..`` parts, names
    whose real path (symlinks followed) is not inside ``root``, and absolute paths unless ``absolute`` (then they
    are accepted when they lie inside ``root``). The check is on the resolved path, so a symlink inside the folder
    pointing elsewhere is refused too.
    """
    if not isinstance(name, str) or not name.strip():
        raise InvalidArgumentError(f"{what}: no name given")
    if "\x00" in name:
        raise InvalidArgumentError(f"{what} {name!r}: refused, names cannot hold NUL characters")
    candidate = Path(name).expanduser() if absolute else Path(name)
    if (candidate.is_absolute() or candidate.drive) and not absolute:
        raise InvalidArgumentError(f"{what} {name!r}: refused, only names inside {place} {root} are allowed")
    if ".." in candidate.parts:
        raise InvalidArgumentError(f"{what} {name!r}: refused, '..' would lead outside {place} {root}")
    resolved = (root / candidate).resolve()  # an absolute candidate replaces root
    if not resolved.is_relative_to(root):
        if candidate.is_absolute() and not candidate.is_relative_to(root):
            raise InvalidArgumentError(f"{what} {name!r}: refused, it is not inside {place} {root}")
        raise InvalidArgumentError(f"{what} {name!r}: refused, it leads outside {place} {root} (symlink?)")
    return resolved


def existing_folder(path: str | os.PathLike, parameter: str) -> Path:
    """``path`` resolved, or an error naming ``parameter`` when it is not a folder (checked before the model loads)."""
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise InvalidArgumentError(f"{parameter} {path}: no such folder (create it first)", parameter=parameter)
    return folder


def adapter_file_name(name: str, what: str) -> str:
    """A plain ``NAME.safetensors`` from what the user typed (the suffix is added when missing)."""
    name = (name or "").strip()
    if not name:
        raise InvalidArgumentError(f"{what}: type a file name")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise InvalidArgumentError(
            f"{what} {name!r}: refused, give a plain file name (no folders) inside the adapter folder"
        )
    if not name.lower().endswith(ADAPTER_SUFFIX):
        if is_pickle(name):
            raise InvalidArgumentError(f"{what} {name!r}: adapters are written as .safetensors only")
        name += ADAPTER_SUFFIX
    return name


@dataclass(frozen=True)
class FileKey:
    """Identifies one version of a file without reading it: a changed file gets a new key and is read again."""

    path: str
    mtime_ns: int
    size: int

    @classmethod
    def of(cls, path: Path) -> FileKey:
        stat = path.stat()
        return cls(str(path), stat.st_mtime_ns, stat.st_size)


class AdapterLibrary:
    """The adapter files of the adapter folder (top level ``*.safetensors``), with a summary of each.

    Summaries (format, ranks, trigger words) are kept per :class:`FileKey`, so listing the folder again reads only
    files that are new or changed.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = existing_folder(root, "lora_dir")
        self._summaries: dict[FileKey, dict] = {}

    def path_of(self, name: str, what: str = "adapter") -> Path:
        """The real path of an existing adapter file ``name`` inside the folder."""
        path = resolve_inside(self.root, name, what)
        if not path.is_file():
            raise AdapterFileError(f"{what} {name!r}: no such file in the adapter folder {self.root}")
        return path

    def names(self) -> list[str]:
        """File names of the adapters, sorted; files (or symlinks) whose real path leaves the folder are not listed."""
        found = []
        for entry in self.root.iterdir():
            if entry.suffix.lower() != ADAPTER_SUFFIX or entry.name.startswith("."):
                continue
            try:
                if resolve_inside(self.root, entry.name).is_file():
                    found.append(entry.name)
            except InvalidArgumentError:
                continue
        return sorted(found, key=str.lower)

    def summary(self, name: str) -> dict:
        """``describe_adapter`` of the file plus its trigger words; an unreadable file gets ``{"error": message}``."""
        path = self.path_of(name)
        key = FileKey.of(path)
        if key not in self._summaries:
            try:
                summary = describe_adapter(read_adapter(path))
            except DiffloraError as error:
                summary = {"error": str(error)}
            self._summaries[key] = summary
        return self._summaries[key]

    def table(self) -> str:
        """The adapter list as a Markdown table: file, format, rank(s), trigger words."""
        names = self.names()
        if not names:
            return f"No adapters in `{self.root}` yet: add `.safetensors` files there, train one, or save a blend."
        rows = ["| file | format | algorithms and layers | rank(s) | trigger words |",
                "| --- | --- | --- | --- | --- |"]
        for name in names:
            summary = self.summary(name)
            if "error" in summary:
                rows.append(f"| {markdown_cell(name)} | unreadable | | | {markdown_cell(summary['error'])} |")
            else:
                ranks = ", ".join(map(str, summary["ranks"]))
                words = markdown_cell(", ".join(summary["trigger_words"]))
                kinds = markdown_cell(kinds_text(summary))
                rows.append(f"| {markdown_cell(name)} | {summary['format']} | {kinds} | {ranks} | {words} |")
        return "\n".join(rows)


def markdown_cell(text: str) -> str:
    """Text made safe for one Markdown table cell (or list item)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def kinds_text(summary: dict) -> str:
    """What an adapter is made of, in a line: its algorithms, then per component the kinds of layer it adapts
    (``loha, lora+dora · unet: conv 3x3 4, linear 12 · text_encoder: linear 6``), from ``describe_adapter``."""
    if "error" in summary:
        return f"unreadable: {summary['error']}"
    algorithms = ", ".join(summary.get("algorithms") or ["lora"])
    layers = [f"{component}: " + ", ".join(f"{kind} {count}" for kind, count in kinds.items())
              for component, kinds in summary.get("layer_kinds", {}).items()]
    return " · ".join([algorithms, *layers])


def format_summary(summary: dict, title: str) -> str:
    """A ``describe_adapter`` summary as Markdown: the rows ``difflora inspect`` prints."""
    rows = (f"- **{label}**: {markdown_cell(value)}" for label, value in summary_rows(summary))
    return "\n".join([f"### {title}", *rows])
