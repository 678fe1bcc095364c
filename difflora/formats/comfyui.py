"""The ComfyUI dialect: the "generic" names ComfyUI's loader reads (``comfy/lora.py``: ``model_lora_keys_unet``,
``model_lora_keys_clip``) and what writes them: ComfyUI's own trainer and LoRA extraction, and OneTrainer's ComfyUI
output.

A module is named by its path in ComfyUI's models: the UNet's under ``diffusion_model.`` in the original (LDM)
layout for every Stable Diffusion version (``diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q``),
a text encoder's under ``text_encoders.<clip_l|clip_h|clip_g>.transformer.`` with transformers' names
(``text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1``): ``clip_l`` is SD 1.x's and SDXL's first
encoder, ``clip_h`` SD 2.x's, ``clip_g`` SDXL's second. After the name come the keys of any algorithm
(:mod:`._algorithms`): a LoRA's factors as ``lora_up``/``lora_down`` or ``lora_B``/``lora_A`` (OneTrainer), with
``.alpha`` (scale alpha / rank, 1 without one, as ComfyUI reads it), LoHa, LoKr, full diffs, DoRA magnitudes.
ComfyUI's trainer also writes a ``diff_b`` for every bias and a ``diff`` for every norm; those are listed as
skipped (the bias diffs unless they are all zeros).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from ..adapter import AdapterState
from ..keys import join_module_key
from ._algorithms import dotted_split, read_modules
from ._kohya_names import dotted_ldm_unet_path, dotted_text_path

__all__ = ["COMFYUI", "claims", "read_state_dict"]

COMFYUI = "comfyui"

_UNET_PREFIX = "diffusion_model."
_TEXT_ENCODER = re.compile(r"^text_encoders\.(clip_l|clip_h|clip_g)\.transformer\.(.+)$")
# ComfyUI names each CLIP by its model; diffusers' pipelines by its place (SDXL: clip_l first, clip_g second).
_COMPONENT = {"clip_l": "text_encoder", "clip_h": "text_encoder", "clip_g": "text_encoder_2"}


def claims(keys: Iterable[str]) -> bool:
    """A file is ComfyUI's when any key is under ``diffusion_model.`` or ``text_encoders.``."""
    return any(key.startswith((_UNET_PREFIX, "text_encoders.")) for key in keys)


def _module_key(name: str) -> str | None:
    """``diffusion_model.input_blocks.1.1.proj_in`` → ``unet.down_blocks.0.attentions.0.proj_in``,
    ``text_encoders.clip_g.transformer.text_model.encoder.layers.0.mlp.fc1`` →
    ``text_encoder_2.encoder.layers.0.mlp.fc1``; ``None`` for a name that is no Linear or Conv2d of these models."""
    if name.startswith(_UNET_PREFIX):
        path = dotted_ldm_unet_path(name.removeprefix(_UNET_PREFIX))
        return join_module_key("unet", path) if path is not None else None
    match = _TEXT_ENCODER.match(name)
    path = dotted_text_path(match.group(2)) if match else None
    return join_module_key(_COMPONENT[match.group(1)], path) if path is not None else None


def read_state_dict(tensors: dict[str, torch.Tensor], header: dict[str, str], source: str) -> AdapterState:
    """An :class:`AdapterState` from a ComfyUI-named state dict; every header entry but ``format`` is kept.

    Raises:
        AdapterFileError: as :func:`~._algorithms.read_modules` (a missing factor, misshapen LoRA factors, one layer
            named twice, no module difflora can apply), one line naming ``source``.
    """
    return read_modules(tensors, header, source, format_name=COMFYUI, split_key=dotted_split,
                        module_key_of=_module_key)
