"""The names every room agrees on: pipeline components, attention projections, module keys, file suffixes.

A module key names one adapted layer as ``<component>.<layer path>``: an attention projection
(``unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k``, ``text_encoder.encoder.layers.0.self_attn.q_proj``)
or any other Linear or Conv2d (``unet.down_blocks.0.resnets.0.conv1``, ``text_encoder.encoder.layers.0.mlp.fc1``).
Text-encoder paths drop the ``text_model.`` prefix, which recent transformers removed and older files carry. File
formats translate their own key spellings to and from these; the runtime places adapters by them.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import AdapterFileError

__all__ = [
    "ADAPTER_SUFFIX",
    "CLIP_PROJECTIONS",
    "COMPONENTS",
    "PICKLE_SUFFIXES",
    "TEXT_ENCODERS",
    "UNET_PROJECTIONS",
    "adapter_name_from_path",
    "is_pickle",
    "join_module_key",
    "layer_name",
    "projections_of",
    "split_module_key",
    "split_projection",
]

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

# Projection paths inside an attention block, as they appear in module names and adapter keys.
UNET_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
CLIP_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")

ADAPTER_SUFFIX = ".safetensors"
# Pickle files run code when loaded; difflora refuses every one of them, adapters and models alike.
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def projections_of(component: str) -> tuple[str, ...]:
    """The four attention projections of ``component``'s attention blocks (query, key, value, output)."""
    return UNET_PROJECTIONS if component == "unet" else CLIP_PROJECTIONS


def join_module_key(component: str, path: str, projection: str | None = None) -> str:
    """``("unet", "mid_block.attentions.0.transformer_blocks.0.attn1", "to_q")`` → ``"unet.mid_block….attn1.to_q"``;
    without ``projection``, ``path`` is the layer's own path."""
    return f"{component}.{path}.{projection}" if projection else f"{component}.{path}"


def split_module_key(key: str) -> tuple[str, str]:
    """``unet.down_blocks.0.resnets.0.conv1`` → ``("unet", "down_blocks.0.resnets.0.conv1")``.

    Raises:
        AdapterFileError: the key names no pipeline component and layer.
    """
    component, _, path = key.partition(".")
    if component not in COMPONENTS or not path:
        raise AdapterFileError(f"module {key!r} is not <component>.<layer path> with a component of {COMPONENTS}")
    return component, path


def split_projection(path: str) -> tuple[str, str] | None:
    """``a.b.attn1.to_out.0`` → ``("a.b.attn1", "to_out.0")`` for a layer that is an attention projection by its
    name; ``None`` for any other layer."""
    for projection in UNET_PROJECTIONS + CLIP_PROJECTIONS:
        if path.endswith("." + projection):
            return path[: -len(projection) - 1], projection
    return None


# Containers of diffusers' UNets and transformers' CLIP encoders whose children are numbered blocks.
_NUMBERED_CONTAINERS = ("down_blocks", "up_blocks", "attentions", "resnets", "transformer_blocks", "layers")


def layer_name(path: str) -> str:
    """What a layer is called within its block, for summaries: ``to_q`` (an attention projection), ``conv1``,
    ``ff.net.0.proj``, ``proj_in``, ``mlp.fc1``, ``downsamplers.0.conv``, ``conv_in``."""
    projection = split_projection(path)
    if projection:
        return projection[1]
    parts = path.split(".")
    last_block = max((i + 1 for i in range(len(parts) - 1)
                      if parts[i] in _NUMBERED_CONTAINERS and parts[i + 1].isdigit()), default=-1)
    return ".".join(parts[last_block + 1:]) if last_block >= 0 else path


def is_pickle(path: str | os.PathLike) -> bool:
    """Whether ``path`` has a pickle suffix (``.bin``, ``.ckpt``, ``.pt``, ``.pth``, ``.pkl``)."""
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def adapter_name_from_path(path: str | os.PathLike) -> str:
    """The name an adapter read from ``path`` gets when none is given: the file's stem (a folder's name) with dots
    made ``_`` (runtime names hold no dots), or ``adapter`` when that leaves nothing."""
    path = Path(path)
    stem = path.stem if path.suffix and not path.is_dir() else path.name
    return stem.replace(".", "_") or "adapter"
