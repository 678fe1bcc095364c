"""Loading the model a user names: ``--model`` as the embedded tiny model, a diffusers folder, a single-file
``.safetensors`` checkpoint or a hub id, on the device and in the dtype asked for.

Every way loading can fail becomes one ``ModelLoadError`` line naming the model; pickle checkpoints are refused.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._libraries import progress_bars_disabled
from .errors import InvalidArgumentError, ModelLoadError, first_line
from .keys import PICKLE_SUFFIXES, is_pickle
from .tiny_model import DEFAULT_MODEL, default_model_dir, ensure_default_model, is_embedded

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

__all__ = ["load_pipeline", "resolve_device", "resolve_dtype"]

# ----- devices and dtypes -------------------------------------------------------------------------------------------


def _mps_available() -> bool:
    """Whether Apple's MPS backend is usable (torch builds without it lack ``torch.backends.mps`` entirely)."""
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The torch device ``name`` stands for: ``auto`` → CUDA if available, else MPS if available, else CPU.

    Other names are read by torch (``cpu``, ``cuda``, ``cuda:1``, ``mps``); CUDA and MPS are checked here so that a
    machine without them fails now with one line, not later inside diffusers.

    Raises:
        InvalidArgumentError: the name is not a device, or names a backend this machine does not have.
    """
    if isinstance(name, torch.device):
        return name
    text = name.strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise InvalidArgumentError(
            f"device {name!r} is not a device (auto, cpu, cuda, cuda:N, mps)", "device"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"device {name!r}: CUDA is not available on this machine (try auto or cpu)",
                                   "device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InvalidArgumentError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                                   "device")
    if device.type == "mps" and not _mps_available():
        raise InvalidArgumentError(f"device {name!r}: MPS is not available on this machine (try auto or cpu)",
                                   "device")
    return device


_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(name: str | torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """The torch dtype ``name`` stands for: ``auto`` → float16 on CUDA, float32 elsewhere.

    Also ``fp32``/``float32``, ``fp16``/``float16``, ``bf16``/``bfloat16``. ``auto`` keeps float32 off CUDA because
    half precision is slow or unsupported for these models on CPU.

    Raises:
        InvalidArgumentError: any other name; the message lists the choices.
    """
    if isinstance(name, torch.dtype):
        return name
    text = name.strip().lower()
    if text == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if text not in _DTYPES:
        raise InvalidArgumentError(f"dtype {name!r} is not one of auto, {', '.join(_DTYPES)}", "dtype")
    return _DTYPES[text]


# ----- loading ------------------------------------------------------------------------------------------------------


def _dtype_keyword(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype argument under the name the installed diffusers wants.

    diffusers 0.42 renamed ``torch_dtype`` to ``dtype`` and warns (FutureWarning) on the old name; the older
    releases difflora supports know only ``torch_dtype``.
    """
    import diffusers
    from packaging.version import Version

    name = "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"
    return {name: dtype}


# Hub ids are "owner/name" (or a bare legacy "name"): letters, digits and - _ . only.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".yaml", ".yml", ".onnx", ".gguf", *PICKLE_SUFFIXES)


def _looks_like_path(model: str) -> bool:
    """Whether a name that exists nowhere on disk was meant as a path (so it is a typo, not a hub id)."""
    return (
        model.startswith((".", "~", "/"))
        or "\\" in model
        or os.path.isabs(model)
        or model.lower().endswith(_MODEL_FILE_SUFFIXES)
        or not _HUB_ID.fullmatch(model)
    )


def _load(
    label: str, load: Callable[..., StableDiffusionPipeline], *args: Any, hint: str = "", **kwargs: Any
) -> StableDiffusionPipeline:
    """Call a diffusers loader; any failure becomes one ``ModelLoadError`` line naming the model (plus ``hint``)."""
    try:
        return load(*args, **kwargs)
    except Exception as error:  # diffusers, transformers, the hub and safetensors raise many kinds
        reason = first_line(error)
        if "meta tensor" in reason:
            # diffusers leaves weights a checkpoint lacks as empty placeholders and then fails on them.
            reason = "the checkpoint lacks weights this architecture needs: a wrong model_config or a damaged file"
        raise ModelLoadError(f"model {label}: could not load ({reason}){hint}", "model") from error


def load_pipeline(
    model: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    model_config: str | os.PathLike | None = None,
    quiet: bool = False,
) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` for ``model``, on ``device``, in ``dtype``, without a safety checker.

    ``model`` is one of:

    - ``None``, ``""`` or ``"embedded"``: the embedded tiny model, built into the cache on first use;
    - a diffusers folder (it must hold ``model_index.json``);
    - a single-file ``.safetensors`` checkpoint; ``model_config`` (a diffusers folder or hub id) gives its
      architecture, without which diffusers may need the hub to guess it;
    - a hub id such as ``owner/name``: the only case that may download.

    Pickle checkpoints (``.ckpt``, ``.bin``, ``.pt``, ``.pth``) are refused, since loading one runs arbitrary code.
    ``quiet`` turns off the loading and denoising progress bars (they are on by default, as in diffusers).

    Raises:
        ModelLoadError: one line naming the model and what went wrong; the library's exception is chained.
    """
    from diffusers import StableDiffusionPipeline

    device = resolve_device(device)
    progress_bars_off = progress_bars_disabled() if quiet else contextlib.nullcontext()
    pipeline_options = {**_dtype_keyword(dtype), "safety_checker": None, "requires_safety_checker": False}

    with progress_bars_off:
        if is_embedded(model):
            label = DEFAULT_MODEL
            try:
                model_dir = ensure_default_model()
            except (OSError, InvalidArgumentError) as error:
                where = default_model_dir()
                raise ModelLoadError(
                    f"model {label}: could not build the embedded model in {where} ({first_line(error)})", "model"
                ) from error
            pipe = _load(label, StableDiffusionPipeline.from_pretrained, model_dir, **pipeline_options)
        else:
            label = os.fspath(model)
            path = Path(label).expanduser()
            if path.is_dir():
                if not (path / "model_index.json").is_file():
                    raise ModelLoadError(
                        f"model {label}: folder has no model_index.json, so it is not a diffusers pipeline folder",
                        "model",
                    )
                pipe = _load(label, StableDiffusionPipeline.from_pretrained, path, **pipeline_options)
            elif path.is_file():
                if is_pickle(path):
                    raise ModelLoadError(
                        f"model {label}: pickle checkpoints are refused (loading one can run code); "
                        "convert it to .safetensors",
                        "model",
                    )
                if path.suffix.lower() != ".safetensors":
                    raise ModelLoadError(
                        f"model {label}: not a diffusers folder or a .safetensors checkpoint", "model"
                    )
                single_file_options = dict(pipeline_options)
                hint = "; model_config naming a diffusers folder of its architecture avoids the hub"
                if model_config is not None:
                    single_file_options["config"] = os.fspath(model_config)
                    hint = ""
                pipe = _load(
                    label, StableDiffusionPipeline.from_single_file, str(path), hint=hint, **single_file_options
                )
            elif _looks_like_path(label):
                raise ModelLoadError(f"model {label}: no such file or folder", "model")
            else:
                pipe = _load(label, StableDiffusionPipeline.from_pretrained, label, **pipeline_options)

    try:
        pipe = pipe.to(device)
    except Exception as error:  # out of memory, a dtype the device lacks, ...
        raise ModelLoadError(
            f"model {label}: could not move it to {device} ({first_line(error)})", "model"
        ) from error
    if quiet:
        pipe.set_progress_bar_config(disable=True)
    return pipe
