"""What the dialects share: reading a ``.safetensors`` file with one-line errors, gathering a module's factors, reading
an alpha, folding a Tucker core for dialects that have none, PEFT's DoRA magnitude as files hold it, and the
text-encoder path spelling written files use."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from ..adapter import LoRAModuleWeights, factor_shape_problem
from ..errors import AdapterFileError, first_line
from ..lora import fold_tucker_core

__all__ = [
    "alpha_value",
    "factors_without_core",
    "file_module_path",
    "magnitude_as_read",
    "magnitude_key",
    "peft_magnitude",
    "read_safetensors",
    "require_factors",
]


def _pickle_kind(path: Path) -> str | None:
    """What a checkpoint renamed ``.safetensors`` holds, from its first bytes (it is never unpickled): a zip archive
    (``torch.save`` since PyTorch 1.6) or a bare pickle (protocol 2 or later, older ``.ckpt`` files); else ``None``."""
    try:
        with open(path, "rb") as handle:
            start = handle.read(2)
    except OSError:
        return None
    if start == b"PK":
        return "a zip archive (what torch.save writes)"
    if len(start) == 2 and start[0] == 0x80 and 2 <= start[1] <= 5:
        return "a pickle"
    return None


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the string header of a ``.safetensors`` file.

    Raises:
        AdapterFileError: the file is missing, truncated or not safetensors (a pickle renamed is named as one); one
            line naming the file.
    """
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types and OSError for truncated/corrupt files
        pickled = _pickle_kind(path)
        if pickled:
            raise AdapterFileError(
                f"{path}: holds {pickled}, not safetensors; pickles are refused (loading one can run code)"
            ) from None
        raise AdapterFileError(f"{path}: not a readable safetensors file ({first_line(error)})") from None
    return tensors, header


def require_factors(
    source: str, module_key: str, parts: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(down, up, mid)`` of one module from the tensors a file holds for it (``mid``, a Tucker core, may be absent):
    down and up both present and of fitting shapes (:func:`~difflora.adapter.factor_shape_problem`), so that a
    dialect may read the rank off them. Their values are checked where every dialect's result is
    (:meth:`~difflora.adapter.AdapterState.problem`).

    Raises:
        AdapterFileError: a factor is missing or the shapes do not fit.
    """
    if "down" not in parts or "up" not in parts:
        missing = "up" if "down" in parts else "down"
        raise AdapterFileError(f"{source}: module {module_key!r} has no {missing} factor")
    down, up, mid = parts["down"], parts["up"], parts.get("mid")
    problem = factor_shape_problem(down, up, mid)
    if problem:
        raise AdapterFileError(f"{source}: module {module_key!r} {problem}")
    return down, up, mid


def alpha_value(source: str, module_key: str, tensor: torch.Tensor) -> float:
    """The number an ``.alpha`` key holds (a 0-d or one-element tensor; its range is checked with the factors).

    Raises:
        AdapterFileError: the tensor holds no single real number.
    """
    if tensor.numel() != 1 or tensor.is_complex():
        raise AdapterFileError(
            f"{source}: module {module_key!r} has an alpha of shape {tuple(tensor.shape)} and type {tensor.dtype}, "
            "expected one number"
        )
    return float(tensor.item())


def factors_without_core(weights: LoRAModuleWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down, up)`` of a module for dialects with no Tucker core (diffusers, PEFT): a core ``mid`` is folded into
    down (:func:`~difflora.lora.fold_tucker_core`: the same update at the same rank)."""
    return fold_tucker_core(weights.down, weights.mid), weights.up


def peft_magnitude(weights: LoRAModuleWeights) -> torch.Tensor | None:
    """A module's DoRA magnitude as PEFT's ``lora_magnitude_vector`` holds it, or ``None``: one value per output row,
    ``(out,)`` on a Linear and ``(1, out, 1, 1)`` on a Conv2d (PEFT's ``DoraConv2dLayer`` keeps the norm in the
    layout of a conv output, and loads a parameter only of its own shape). The caller has checked that the magnitude
    is per output row (:meth:`~difflora.adapter.AdapterState.lora_only_problem`)."""
    if weights.dora_scale is None:
        return None
    out_features = weights.weight_shape[0]
    shape = (1, out_features, 1, 1) if len(weights.weight_shape) == 4 else (out_features,)
    return weights.dora_scale.detach().reshape(shape).contiguous()


def magnitude_key(component: str, prefix: str) -> str:
    """The key of a module's DoRA magnitude as difflora writes it (``prefix`` is the module's key prefix): PEFT's own
    spelling ``<prefix>.lora_magnitude_vector`` in a UNet, which every PEFT version reads, and
    ``<prefix>.lora_magnitude_vector.weight`` in a text encoder: transformers' adapter loader (what diffusers'
    ``load_lora_weights`` and ``CLIPTextModel.load_adapter`` use) renames only the ``lora_*`` part of a key, so it
    misses PEFT's spelling and runs the text encoder with magnitudes rebuilt from its base weights (transformers 5.23,
    peft 0.21), while PEFT 0.12 and later read both spellings."""
    return f"{prefix}.lora_magnitude_vector" + (".weight" if component.startswith("text_encoder") else "")


def magnitude_as_read(magnitude: torch.Tensor, out_features: int) -> torch.Tensor:
    """PEFT's ``lora_magnitude_vector`` as one value per output row, ``(out,)``, from any layout of ``out_features``
    values in one axis (``(out,)``, PEFT's conv ``(1, out, 1, 1)``); any other tensor is kept as it is, so that the
    check of every read names its shape (:func:`~difflora.adapter.dora_problem`)."""
    if magnitude.numel() == out_features and max(magnitude.shape, default=1) == out_features:
        return magnitude.flatten()
    return magnitude


def file_module_path(component: str, path: str) -> str:
    """A module path as files spell it: text-encoder layers keep transformers' historical ``text_model.`` prefix,
    which every diffusers version reads (recent ones strip it) while older ones require it; ``text_projection`` sits
    beside ``text_model`` in ``CLIPTextModelWithProjection`` and never had it."""
    if component.startswith("text_encoder") and path != "text_projection":
        return f"text_model.{path}"
    return path
