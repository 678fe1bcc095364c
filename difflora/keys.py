"""The names every room agrees on: pipeline components, attention projections, module keys, file suffixes.

A module key names one adapted projection as ``<component>.<block path>.<projection>``, e.g.
``unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k`` or ``text_encoder.encoder.layers.0.self_attn.q_proj``
(text-encoder paths drop the ``text_model.`` prefix, which recent transformers removed and older files carry). File
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
    "projections_of",
    "split_module_key",
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


def join_module_key(component: str, path: str, projection: str) -> str:
    """``("unet", "mid_block.attentions.0.transformer_blocks.0.attn1", "to_q")`` → ``"unet.mid_block….attn1.to_q"``."""
    return f"{component}.{path}.{projection}"


def split_module_key(key: str) -> tuple[str, str, str]:
    """``unet.a.b.attn1.to_out.0`` → ``("unet", "a.b.attn1", "to_out.0")``.

    Raises:
        AdapterFileError: the key does not end in one of the attention projections.
    """
    component, _, rest = key.partition(".")
    for projection in UNET_PROJECTIONS + CLIP_PROJECTIONS:
        if rest.endswith("." + projection):
            return component, rest[: -len(projection) - 1], projection
    raise AdapterFileError(f"module {key!r} is not a q/k/v/out attention projection")


def is_pickle(path: str | os.PathLike) -> bool:
    """Whether ``path`` has a pickle suffix (``.bin``, ``.ckpt``, ``.pt``, ``.pth``, ``.pkl``)."""
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def adapter_name_from_path(path: str | os.PathLike) -> str:
    """The name an adapter read from ``path`` gets when none is given: the file's stem (a folder's name) with dots
    made ``_`` (runtime names hold no dots), or ``adapter`` when that leaves nothing."""
    path = Path(path)
    stem = path.stem if path.suffix and not path.is_dir() else path.name
    return stem.replace(".", "_") or "adapter"
