"""What the dialects share: reading a ``.safetensors`` file with one-line errors, checking a module's factors, and the
text-encoder path spelling written files use."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import AdapterFileError, first_line

__all__ = ["file_module_path", "read_safetensors", "require_factors"]


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the string header of a ``.safetensors`` file.

    Raises:
        AdapterFileError: the file is missing, truncated or not safetensors; one line naming the file.
    """
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types and OSError for truncated/corrupt files
        raise AdapterFileError(f"{path}: not a readable safetensors file ({first_line(error)})") from None
    return tensors, header


def require_factors(source: str, module_key: str, parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down, up)`` of one module from the tensors a file holds for it, checked: down is rank × in, up is
    out × rank, and rank > 0.

    Raises:
        AdapterFileError: a factor is missing or the shapes do not fit.
    """
    if "down" not in parts or "up" not in parts:
        missing = "up" if "down" in parts else "down"
        raise AdapterFileError(f"{source}: module {module_key!r} has no {missing} factor")
    down, up = parts["down"], parts["up"]
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0] or down.shape[0] == 0:
        raise AdapterFileError(
            f"{source}: module {module_key!r} has factors of shapes {tuple(down.shape)} and {tuple(up.shape)}, "
            "expected down (rank × in) and up (out × rank)"
        )
    return down, up


def file_module_path(component: str, path: str) -> str:
    """A module path as files spell it: text encoders keep transformers' historical ``text_model.`` prefix, which
    every diffusers version reads (recent ones strip it) while older ones require it."""
    return f"text_model.{path}" if component.startswith("text_encoder") else path
