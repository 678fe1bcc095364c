"""The OneTrainer dialect: the LoRA outputs of OneTrainer's ``LoRASaverMixin`` that no other dialect reads.

OneTrainer holds an adapter as ``<component>.<module path>.<key>`` with diffusers' names and kohya's keys
(``unet.down_blocks.0.attentions.0.proj_in.lora_down.weight``, ``text_encoder.text_model.encoder.layers.0.mlp.fc1
.hada_w1_a``, ``.alpha``, ``.dora_scale``) and writes that dict as it is in its "internal" backups
(``lora/lora.safetensors``). Its "original" output names the UNet in the original (LDM) layout with no prefix and
diffusers' factor names (``input_blocks.1.1.proj_in.lora_A.weight``, with kohya's ``.alpha``). Its other outputs
are other dialects: kohya and "legacy" (``lora_unet_…``) are :mod:`.kohya`, ComfyUI (``diffusion_model.…``) is
:mod:`.comfyui`, diffusers (``unet.….lora_A.weight``, alpha folded into ``lora_B``) is :mod:`.diffusers`.

Every algorithm OneTrainer trains is read by the keys LyCORIS gives it (:mod:`._algorithms`): LoRA, DoRA (its
magnitude per input column by default, told from its shape), LoHa (a Conv2d's factors as conv kernels) and LoKr;
its OFT (``oft_R``) and bundled embeddings (``bundle_emb.…``) are listed as skipped.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..adapter import AdapterState
from ..keys import TEXT_ENCODERS, join_module_key
from ._algorithms import KINDS, dotted_split, read_modules
from ._kohya_names import dotted_diffusers_unet_path, dotted_ldm_unet_path, dotted_text_path

__all__ = ["ONETRAINER", "claims", "read_state_dict"]

ONETRAINER = "onetrainer"

# The first segment of an original-layout UNet path.
_LDM_TOPS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")
# Keys only kohya's and LyCORIS' family writes after a dotted diffusers name: they tell OneTrainer's internal dict
# from a diffusers file, whose factors are lora_A/lora_B (and lora.down/lora.up in its oldest spelling).
_OWN_ENDINGS = tuple(f".{suffix}" for suffix in (*KINDS["lora"], *KINDS["loha"], *KINDS["lokr"], *KINDS["full"],
                                                   "dora_scale", "oft_R.weight"))


def _is_internal(key: str) -> bool:
    return key.partition(".")[0] in ("unet", *TEXT_ENCODERS) and key.endswith(_OWN_ENDINGS)


def claims(keys: Iterable[str]) -> bool:
    """A file is OneTrainer's when a key starts with an original-layout UNet block, or is a component's dotted
    module path followed by kohya's or LyCORIS' keys."""
    return any(key.partition(".")[0] in _LDM_TOPS or _is_internal(key) for key in keys)


def _module_key(name: str) -> str | None:
    """``input_blocks.1.1.proj_in`` → ``unet.down_blocks.0.attentions.0.proj_in``, ``unet.mid_block.resnets.0.conv1``
    as it is, ``text_encoder.text_model.encoder.layers.0.mlp.fc1`` → ``text_encoder.encoder.layers.0.mlp.fc1``;
    ``None`` for a name that is no Linear or Conv2d of these models."""
    component, _, path = name.partition(".")
    if component in _LDM_TOPS:
        component, path = "unet", dotted_ldm_unet_path(name)
    elif component == "unet":
        path = dotted_diffusers_unet_path(path)
    elif component in TEXT_ENCODERS:
        path = dotted_text_path(path)
    else:
        return None
    return join_module_key(component, path) if path is not None else None


def read_state_dict(tensors: dict[str, torch.Tensor], header: dict[str, str], source: str) -> AdapterState:
    """An :class:`AdapterState` from OneTrainer's internal or original-layout state dict; every header entry but
    ``format`` is kept.

    Raises:
        AdapterFileError: as :func:`~._algorithms.read_modules` (a missing factor, misshapen LoRA factors, one layer
            named twice, no module difflora can apply), one line naming ``source``.
    """
    return read_modules(tensors, header, source, format_name=ONETRAINER, split_key=dotted_split,
                        module_key_of=_module_key)
