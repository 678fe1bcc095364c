"""Layer names as files spell them read back into module paths, by the grammar of the models' own module names:
kohya's flattened names, and the dotted names of ComfyUI, OneTrainer and LyCORIS' wrapper.

kohya's sd-scripts (and LyCORIS, A1111, ComfyUI after them) name a module ``lora_unet_<path>`` with every dot of
its path turned into an underscore, so ``down_blocks_0_resnets_0_conv_shortcut`` could split in many ways. The
grammar below says which layer paths exist (diffusers' ``UNet2DConditionModel``, transformers' CLIP text encoders and
the original LDM/SGM layout kohya uses for SDXL), written with dots; :func:`_unflatten` matches a flattened name
against the same grammar with each dot standing for an underscore, and the underscores the match used as
separators become dots again. Numbers are their own segments; a name outside the grammar is ``None`` (the caller
reports its keys as skipped) rather than a guess.

The original layout (``input_blocks_4_1_…``) is read for models with two layers per block, as SD 1.x/2.x and SDXL
are (diffusers reads it the same way: ``lora_conversion_utils._maybe_map_sgm_blocks_to_diffusers`` and
``single_file_utils.convert_ldm_unet_checkpoint``): input block ``I`` ≥ 1 is slot ``(I-1) % 3`` of down block
``(I-1) // 3`` (slot 2 holds the downsampler), output block ``J`` is layer ``J % 3`` of up block ``J // 3`` (the
upsampler beside the last layer), and the middle block is resnet 0, attention 0, resnet 1. ComfyUI names every UNet
this way, dotted (``diffusion_model.input_blocks.1.1.proj_in``); OneTrainer's "original" output too, without the
prefix.
"""

from __future__ import annotations

import re

__all__ = [
    "diffusers_unet_layer_path",
    "dotted_diffusers_unet_path",
    "dotted_ldm_unet_path",
    "dotted_text_path",
    "text_layer_path",
    "unet_layer_path",
]

# ----- the grammar, written with dots -------------------------------------------------------------------------------

# Inside a Transformer2DModel (both layouts): the projections around it, attention and feed-forward of its blocks.
_TRANSFORMER = (
    r"(?:proj_in|proj_out"
    r"|transformer_blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))"
)
_RESNET = r"(?:conv1|conv2|conv_shortcut|time_emb_proj)"
_BLOCK = r"(?:down_blocks\.\d+|up_blocks\.\d+|mid_block)"
_DIFFUSERS_UNET = (
    rf"(?:{_BLOCK}\.attentions\.\d+\.{_TRANSFORMER}|{_BLOCK}\.resnets\.\d+\.{_RESNET}"
    r"|down_blocks\.\d+\.downsamplers\.0\.conv|up_blocks\.\d+\.upsamplers\.0\.conv"
    r"|conv_in|conv_out|time_embedding\.linear_[12]|add_embedding\.linear_[12])"
)
# The original layout's ResnetBlock: in_layers (norm, act, conv1), emb_layers (act, time_emb_proj),
# out_layers (norm, act, dropout, conv2), skip_connection (conv_shortcut).
_LDM_RESNET = r"(?:in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection)"
_LDM_UNET = (
    rf"(?:input_blocks\.0\.0|input_blocks\.\d+\.0\.(?:{_LDM_RESNET}|op)|input_blocks\.\d+\.1\.{_TRANSFORMER}"
    rf"|middle_block\.[02]\.{_LDM_RESNET}|middle_block\.1\.{_TRANSFORMER}"
    rf"|output_blocks\.\d+\.0\.{_LDM_RESNET}|output_blocks\.\d+\.1\.{_TRANSFORMER}|output_blocks\.\d+\.[12]\.conv"
    r"|time_embed\.[02]|label_emb\.0\.[02]|out\.2)"
)
# CLIPTextModel(WithProjection); files written with transformers 4 carry the ``text_model.`` prefix.
_TEXT = (
    r"(?:(?:text_model\.)?encoder\.layers\.\d+\.(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.fc[12])"
    r"|text_projection)"
)


def _flattened(dotted: str) -> re.Pattern[str]:
    """The grammar ``dotted`` over flattened names: every dot becomes a captured underscore (the grammar itself
    captures nothing), so a match tells which underscores were dots."""
    return re.compile(dotted.replace(r"\.", "(_)"))


_FLAT_DIFFUSERS_UNET = _flattened(_DIFFUSERS_UNET)
_FLAT_LDM_UNET = _flattened(_LDM_UNET)
_FLAT_TEXT = _flattened(_TEXT)
_DOTTED_DIFFUSERS_UNET = re.compile(_DIFFUSERS_UNET)
_DOTTED_LDM_UNET = re.compile(_LDM_UNET)
_DOTTED_TEXT = re.compile(_TEXT)


def _unflatten(pattern: re.Pattern[str], name: str) -> str | None:
    """``down_blocks_0_resnets_0_conv_shortcut`` → ``down_blocks.0.resnets.0.conv_shortcut``, or ``None`` when the
    name is not in the grammar."""
    match = pattern.fullmatch(name)
    if match is None:
        return None
    characters = list(name)
    for group in range(1, pattern.groups + 1):
        if match.start(group) >= 0:
            characters[match.start(group)] = "."
    return "".join(characters)


# ----- the original layout in diffusers' names ----------------------------------------------------------------------

_LDM_TOP = {
    "input_blocks.0.0": "conv_in",
    "out.2": "conv_out",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
}
_LDM_RESNET_LAYER = {
    "in_layers.2": "conv1",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_SLOTS_PER_BLOCK = 3  # two layers per block, then the sampler (down) or a third layer (up)
_MIDDLE = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}


def _slot_layer(slot: str, position: int, layer: str) -> str:
    """Slot 0 of an LDM block holds a resnet, slot 1 a transformer; ``layer`` is the path inside it."""
    if slot == "0":
        return f"resnets.{position}.{_LDM_RESNET_LAYER[layer]}"
    return f"attentions.{position}.{layer}"


def _diffusers_path(ldm: str) -> str | None:
    """An original-layout path (in the grammar) in diffusers' names: ``input_blocks.4.1.proj_in`` →
    ``down_blocks.1.attentions.0.proj_in``; ``None`` for a slot that holds no such layer (a downsampler outside the
    sampler slot, a resnet in it, an upsampler beside any but a block's last layer)."""
    if ldm in _LDM_TOP:
        return _LDM_TOP[ldm]
    if ldm.startswith("middle_block."):
        _, slot, layer = ldm.split(".", 2)
        inner = _LDM_RESNET_LAYER[layer] if slot != "1" else layer
        return f"mid_block.{_MIDDLE[slot]}.{inner}"
    kind, index, slot, layer = ldm.split(".", 3)
    if kind == "input_blocks":
        block, position = divmod(int(index) - 1, _SLOTS_PER_BLOCK)
        if block < 0 or (layer == "op") != (position == _SLOTS_PER_BLOCK - 1):
            return None  # input block 0 is conv_in alone; the sampler slot holds the downsampler and nothing else
        if layer == "op":
            return f"down_blocks.{block}.downsamplers.0.conv"
        return f"down_blocks.{block}.{_slot_layer(slot, position, layer)}"
    block, position = divmod(int(index), _SLOTS_PER_BLOCK)
    if layer == "conv":
        return f"up_blocks.{block}.upsamplers.0.conv" if position == _SLOTS_PER_BLOCK - 1 else None
    return f"up_blocks.{block}.{_slot_layer(slot, position, layer)}"


# ----- what the kohya dialect asks ----------------------------------------------------------------------------------


def unet_layer_path(name: str) -> str | None:
    """The diffusers UNet path of a flattened kohya name, diffusers-style (SD 1.x/2.x:
    ``down_blocks_0_resnets_0_conv1``) or original layout (SDXL: ``input_blocks_1_0_in_layers_2``); ``None`` for a
    name that names no such layer."""
    path = _unflatten(_FLAT_DIFFUSERS_UNET, name)
    if path is not None:
        return path
    ldm = _unflatten(_FLAT_LDM_UNET, name)
    return _diffusers_path(ldm) if ldm is not None else None


def text_layer_path(name: str) -> str | None:
    """The CLIP text-encoder path of a flattened kohya name without transformers' ``text_model.`` prefix:
    ``text_model_encoder_layers_0_mlp_fc1`` → ``encoder.layers.0.mlp.fc1``; ``None`` outside the grammar."""
    path = _unflatten(_FLAT_TEXT, name)
    return path.removeprefix("text_model.") if path is not None else None


def diffusers_unet_layer_path(name: str) -> str | None:
    """The UNet path of a flattened name in diffusers' layout only (LyCORIS' wrapper names the modules of the model
    it wraps, and SimpleTuner wraps diffusers' ``UNet2DConditionModel``); ``None`` outside the grammar."""
    return _unflatten(_FLAT_DIFFUSERS_UNET, name)


def dotted_diffusers_unet_path(path: str) -> str | None:
    """``path`` when it is a Linear or Conv2d of diffusers' UNet (``down_blocks.0.resnets.0.conv1``), else ``None``."""
    return path if _DOTTED_DIFFUSERS_UNET.fullmatch(path) else None


def dotted_ldm_unet_path(path: str) -> str | None:
    """The diffusers UNet path of an original-layout path: ``input_blocks.1.1.transformer_blocks.0.attn1.to_q`` →
    ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``; ``None`` for a path that names no such layer."""
    return _diffusers_path(path) if _DOTTED_LDM_UNET.fullmatch(path) else None


def dotted_text_path(path: str) -> str | None:
    """The CLIP text-encoder path of a dotted path, without transformers' ``text_model.`` prefix:
    ``text_model.encoder.layers.0.mlp.fc1`` → ``encoder.layers.0.mlp.fc1``; ``None`` outside the grammar."""
    return path.removeprefix("text_model.") if _DOTTED_TEXT.fullmatch(path) else None
