"""Writing a diffusers Stable Diffusion pipeline as one original-layout ("single-file") ``.safetensors`` checkpoint.

The original layout is the one CompVis' latent-diffusion code saved and A1111, ComfyUI and diffusers'
``from_single_file`` read: one flat state dict with

* the UNet under ``model.diffusion_model.`` (``input_blocks.N.M``, ``middle_block.N``, ``output_blocks.N.M``),
* the VAE under ``first_stage_model.`` (``encoder.down.N.block.M``, ``decoder.up.N...``, ``mid.attn_1``),
* the text encoder under ``cond_stage_model.``: SD 1.x's OpenAI CLIP as a transformers ``CLIPTextModel`` state dict
  below ``cond_stage_model.transformer.text_model.``; SD 2.x's OpenCLIP in open_clip's own names below
  ``cond_stage_model.model.`` (``transformer.resblocks.N.attn.in_proj_weight``, ``positional_embedding``, ...).

The mapping here is the inverse of diffusers' reader (``diffusers.loaders.single_file_utils``:
``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint`` and
``convert_open_clip_checkpoint``), worked out from the block structure of the models themselves, so it holds for
any number of blocks, ``layers_per_block``, transformer depth and projection type the SD 1.x/2.x UNet allows. Every
weight must find a place: a model with parts the original layout has no names for (SDXL's added embeddings, class
embeddings, ...) is refused rather than written without them.

The scheduler and tokenizer are not in the file (original checkpoints never carried them); whoever loads the file
takes them, and the components' configs, from a diffusers folder of the same architecture (diffusers' ``config=``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ._files import atomic_path
from .errors import InvalidArgumentError

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

__all__ = [
    "CLIP_PREFIX",
    "OPEN_CLIP_PREFIX",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "save_single_file",
    "state_dict_to_original",
]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
"""SD 1.x's text encoder: diffusers recognises it by ``{CLIP_PREFIX}embeddings.position_embedding.weight``."""
OPEN_CLIP_PREFIX = "cond_stage_model.model."
"""SD 2.x's text encoder: diffusers recognises it by ``{OPEN_CLIP_PREFIX}token_embedding.weight``."""

# A prefix map sends every state-dict key that starts with a diffusers module path (ending in ".") to the original
# module path; the rest of the key is kept, after the first matching leaf rename.
_PrefixMap = dict[str, tuple[str, tuple[tuple[str, str], ...]]]

# ResnetBlock2D's parameters under the names of LDM's ResBlock (its in_layers/out_layers Sequentials).
_UNET_RESNET_LEAVES = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
)
_VAE_RESNET_LEAVES = (("conv_shortcut.", "nin_shortcut."),)
# The VAE's mid-block attention: diffusers' Linear projections are 1×1 convolutions in LDM's AttnBlock.
_VAE_ATTENTION_LEAVES = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)
_VAE_CONV_1X1_LEAVES = ("q.weight", "k.weight", "v.weight", "proj_out.weight")
_NO_LEAVES: tuple[tuple[str, str], ...] = ()

_UNET_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UNET_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
_UNET_MID_TYPE = "UNetMidBlock2DCrossAttn"


def _describe(pipe: object) -> str:
    """How error messages name the pipeline being written."""
    return f"cannot write {type(pipe).__name__} as an SD 1.x/2.x single-file checkpoint"


def _apply_prefix_map(
    state: dict[str, torch.Tensor], prefix_map: _PrefixMap, component: str, what: str
) -> dict[str, torch.Tensor]:
    """``state`` with every key moved to its original name by ``prefix_map``.

    Raises:
        InvalidArgumentError: a key no prefix covers (a part the original layout has no name for).
    """
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        parts = key.split(".")
        for length in range(1, len(parts)):
            module_path = ".".join(parts[:length]) + "."
            if module_path in prefix_map:
                original_path, leaves = prefix_map[module_path]
                rest = key[len(module_path) :]
                for diffusers_leaf, original_leaf in leaves:
                    if rest.startswith(diffusers_leaf):
                        rest = original_leaf + rest[len(diffusers_leaf) :]
                        break
                renamed[original_path + rest] = tensor
                break
        else:
            raise InvalidArgumentError(f"{what}: {component} weight {key!r} has no place in the original layout")
    return renamed


# ----- UNet ---------------------------------------------------------------------------------------------------------


def _unet_prefix_map(unet: UNet2DConditionModel, what: str) -> _PrefixMap:
    """Where each of the UNet's modules sits in LDM's ``UNetModel`` (``input_blocks``/``middle_block``/...).

    LDM numbers its blocks flat: ``input_blocks.0`` is ``conv_in``, then each down block takes
    ``layers_per_block + 1`` slots (one per resnet, with its transformer at ``.1``, and one for the downsampler);
    each up block takes ``layers_per_block + 1`` slots whose last also holds the upsampler, at ``.1`` or, after a
    transformer, at ``.2``. diffusers' reader computes the block from the slot number with the config's
    ``layers_per_block``, so the block sizes must agree with it.

    Raises:
        InvalidArgumentError: block types, a mid block or per-block layer counts the original layout cannot hold.
    """
    config = unet.config
    layers = config.layers_per_block
    if not isinstance(layers, int):
        raise InvalidArgumentError(
            f"{what}: the UNet's layers_per_block is {layers!r}; the original layout needs one int"
        )
    for kind, allowed in (("down", _UNET_DOWN_TYPES), ("up", _UNET_UP_TYPES)):
        for block_type in getattr(config, f"{kind}_block_types"):
            if block_type not in allowed:
                raise InvalidArgumentError(
                    f"{what}: UNet {kind} block type {block_type} (expected {' or '.join(allowed)})"
                )
    # Both keep the diffusers names inside the transformer blocks, which LDM's SpatialTransformer does not have.
    if config.dual_cross_attention or config.attention_type != "default":
        raise InvalidArgumentError(
            f"{what}: UNet with dual_cross_attention={config.dual_cross_attention}, "
            f"attention_type={config.attention_type!r} (LDM has neither)"
        )
    if config.mid_block_type != _UNET_MID_TYPE or len(unet.mid_block.resnets) != 2:
        raise InvalidArgumentError(
            f"{what}: UNet mid block {config.mid_block_type} with {len(getattr(unet.mid_block, 'resnets', []))} "
            f"resnets (expected {_UNET_MID_TYPE} with 2)"
        )

    slots_per_block = layers + 1
    prefix_map: _PrefixMap = {
        "conv_in.": ("input_blocks.0.0.", _NO_LEAVES),
        "time_embedding.linear_1.": ("time_embed.0.", _NO_LEAVES),
        "time_embedding.linear_2.": ("time_embed.2.", _NO_LEAVES),
        "conv_norm_out.": ("out.0.", _NO_LEAVES),
        "conv_out.": ("out.2.", _NO_LEAVES),
        "mid_block.resnets.0.": ("middle_block.0.", _UNET_RESNET_LEAVES),
        "mid_block.attentions.0.": ("middle_block.1.", _NO_LEAVES),
        "mid_block.resnets.1.": ("middle_block.2.", _UNET_RESNET_LEAVES),
    }
    for block_index, block in enumerate(unet.down_blocks):
        if len(block.resnets) != layers:
            raise InvalidArgumentError(
                f"{what}: UNet down block {block_index} has {len(block.resnets)} resnets, layers_per_block is {layers}"
            )
        first_slot = 1 + block_index * slots_per_block
        for layer in range(layers):
            slot = first_slot + layer
            prefix_map[f"down_blocks.{block_index}.resnets.{layer}."] = (f"input_blocks.{slot}.0.", _UNET_RESNET_LEAVES)
            prefix_map[f"down_blocks.{block_index}.attentions.{layer}."] = (f"input_blocks.{slot}.1.", _NO_LEAVES)
        prefix_map[f"down_blocks.{block_index}.downsamplers.0.conv."] = (
            f"input_blocks.{first_slot + layers}.0.op.",
            _NO_LEAVES,
        )
    for block_index, block in enumerate(unet.up_blocks):
        if len(block.resnets) != slots_per_block:
            raise InvalidArgumentError(
                f"{what}: UNet up block {block_index} has {len(block.resnets)} resnets, expected {slots_per_block}"
            )
        first_slot = block_index * slots_per_block
        for layer in range(slots_per_block):
            slot = first_slot + layer
            prefix_map[f"up_blocks.{block_index}.resnets.{layer}."] = (f"output_blocks.{slot}.0.", _UNET_RESNET_LEAVES)
            prefix_map[f"up_blocks.{block_index}.attentions.{layer}."] = (f"output_blocks.{slot}.1.", _NO_LEAVES)
        upsampler_index = 2 if getattr(block, "attentions", None) else 1
        prefix_map[f"up_blocks.{block_index}.upsamplers.0.conv."] = (
            f"output_blocks.{first_slot + layers}.{upsampler_index}.conv.",
            _NO_LEAVES,
        )
    return prefix_map


def _unet_to_original(unet: UNet2DConditionModel, what: str) -> dict[str, torch.Tensor]:
    """The UNet's weights under ``model.diffusion_model.``; transformer blocks keep their names, which LDM shares."""
    renamed = _apply_prefix_map(unet.state_dict(), _unet_prefix_map(unet, what), "UNet", what)
    return {UNET_PREFIX + key: tensor for key, tensor in renamed.items()}


# ----- VAE ----------------------------------------------------------------------------------------------------------


def _vae_prefix_map(vae: AutoencoderKL, what: str) -> _PrefixMap:
    """Where each of the VAE's modules sits in LDM's ``AutoencoderKL``.

    The decoder's up blocks are numbered the other way round in LDM (``up.0`` is the block nearest the output), so
    diffusers' ``up_blocks.i`` is ``up.{n-1-i}``.

    Raises:
        InvalidArgumentError: block types or a mid block the original layout cannot hold.
    """
    config = vae.config
    for kind, expected in (("down", "DownEncoderBlock2D"), ("up", "UpDecoderBlock2D")):
        for block_type in getattr(config, f"{kind}_block_types"):
            if block_type != expected:
                raise InvalidArgumentError(f"{what}: VAE {kind} block type {block_type} (expected {expected})")

    prefix_map: _PrefixMap = {
        "quant_conv.": ("quant_conv.", _NO_LEAVES),
        "post_quant_conv.": ("post_quant_conv.", _NO_LEAVES),
    }
    for coder in (vae.encoder, vae.decoder):
        name = "encoder" if coder is vae.encoder else "decoder"
        if len(coder.mid_block.resnets) != 2:
            raise InvalidArgumentError(
                f"{what}: the VAE {name}'s mid block has {len(coder.mid_block.resnets)} resnets (expected 2)"
            )
        prefix_map[f"{name}.conv_in."] = (f"{name}.conv_in.", _NO_LEAVES)
        prefix_map[f"{name}.conv_norm_out."] = (f"{name}.norm_out.", _NO_LEAVES)
        prefix_map[f"{name}.conv_out."] = (f"{name}.conv_out.", _NO_LEAVES)
        prefix_map[f"{name}.mid_block.resnets.0."] = (f"{name}.mid.block_1.", _VAE_RESNET_LEAVES)
        prefix_map[f"{name}.mid_block.resnets.1."] = (f"{name}.mid.block_2.", _VAE_RESNET_LEAVES)
        prefix_map[f"{name}.mid_block.attentions.0."] = (f"{name}.mid.attn_1.", _VAE_ATTENTION_LEAVES)

    for index, block in enumerate(vae.encoder.down_blocks):
        for layer in range(len(block.resnets)):
            prefix_map[f"encoder.down_blocks.{index}.resnets.{layer}."] = (
                f"encoder.down.{index}.block.{layer}.",
                _VAE_RESNET_LEAVES,
            )
        prefix_map[f"encoder.down_blocks.{index}.downsamplers.0.conv."] = (
            f"encoder.down.{index}.downsample.conv.",
            _NO_LEAVES,
        )
    block_count = len(vae.decoder.up_blocks)
    for index, block in enumerate(vae.decoder.up_blocks):
        original_index = block_count - 1 - index
        for layer in range(len(block.resnets)):
            prefix_map[f"decoder.up_blocks.{index}.resnets.{layer}."] = (
                f"decoder.up.{original_index}.block.{layer}.",
                _VAE_RESNET_LEAVES,
            )
        prefix_map[f"decoder.up_blocks.{index}.upsamplers.0.conv."] = (
            f"decoder.up.{original_index}.upsample.conv.",
            _NO_LEAVES,
        )
    return prefix_map


def _vae_to_original(vae: AutoencoderKL, what: str) -> dict[str, torch.Tensor]:
    """The VAE's weights under ``first_stage_model.``, attention projections as ``out × in × 1 × 1`` convolutions.

    LDM's AttnBlock computes q, k, v and the output projection with 1×1 ``Conv2d``s; diffusers' reader drops the
    two trailing unit dimensions (``update_vae_attentions_ldm_to_diffusers``), and A1111/ComfyUI load the 4-d shape.
    """
    renamed = _apply_prefix_map(vae.state_dict(), _vae_prefix_map(vae, what), "VAE", what)
    original: dict[str, torch.Tensor] = {}
    for key, tensor in renamed.items():
        if ".mid.attn_1." in key and key.endswith(_VAE_CONV_1X1_LEAVES) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        original[VAE_PREFIX + key] = tensor
    return original


# ----- text encoder -------------------------------------------------------------------------------------------------


def _is_open_clip(text_encoder: CLIPTextModel) -> bool:
    """Whether the text encoder is SD 2.x's OpenCLIP (GELU) rather than SD 1.x's OpenAI CLIP (quick GELU)."""
    return text_encoder.config.hidden_act == "gelu"


def _text_encoder_state(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """The text encoder's weights named from ``embeddings.``/``encoder.``/``final_layer_norm.`` on.

    transformers 5.6 flattened ``CLIPTextModel`` (no ``text_model.`` level); older releases have it. Dropping it
    here gives one naming whatever transformers is installed.
    """
    return {key.removeprefix("text_model."): tensor for key, tensor in text_encoder.state_dict().items()}


def _clip_to_original(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """SD 1.x: the transformers ``CLIPTextModel`` state dict itself, below ``cond_stage_model.transformer.text_model.``.

    LDM's ``FrozenCLIPEmbedder`` wraps a transformers ``CLIPTextModel`` as ``.transformer``, so its names are the
    transformers names with the (pre-5.6) ``text_model.`` level, which diffusers' reader needs to recognise it.
    """
    return {CLIP_PREFIX + key: tensor for key, tensor in _text_encoder_state(text_encoder).items()}


_OPEN_CLIP_LAYER_LEAVES = (
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("self_attn.out_proj.", "attn.out_proj."),
)
_OPEN_CLIP_TOP_LEVEL = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


def _open_clip_to_original(text_encoder: CLIPTextModel, what: str) -> dict[str, torch.Tensor]:
    """SD 2.x: the text encoder in open_clip's names below ``cond_stage_model.model.``.

    open_clip's attention is ``torch.nn.MultiheadAttention``, whose one ``in_proj_weight`` is q, k and v stacked in
    that order along the output dimension (diffusers' reader splits it into thirds). diffusers' SD 2.x text encoder
    keeps only the layers up to the penultimate one SD 2.x reads, so the file has one resblock fewer than OpenCLIP
    ViT-H; that last block, and the unused ``text_projection``, were never part of the image model's computation.
    """
    state = _text_encoder_state(text_encoder)
    original: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key in _OPEN_CLIP_TOP_LEVEL:
            original[OPEN_CLIP_PREFIX + _OPEN_CLIP_TOP_LEVEL[key]] = tensor
            continue
        parts = key.split(".")
        if key.startswith("encoder.layers.") and len(parts) > 3:
            layer, rest = parts[2], ".".join(parts[3:])
            block = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{layer}."
            if rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
                if rest.startswith("self_attn.q_proj."):
                    kind = parts[-1]  # weight or bias
                    stacked = [state[f"encoder.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
                    original[f"{block}attn.in_proj_{kind}"] = torch.cat(stacked, dim=0)
                continue
            for diffusers_leaf, original_leaf in _OPEN_CLIP_LAYER_LEAVES:
                if rest.startswith(diffusers_leaf):
                    original[block + original_leaf + rest[len(diffusers_leaf) :]] = tensor
                    break
            else:
                raise InvalidArgumentError(f"{what}: text encoder weight {key!r} has no place in open_clip's layout")
            continue
        raise InvalidArgumentError(f"{what}: text encoder weight {key!r} has no place in open_clip's layout")
    return original


# ----- the whole pipeline -------------------------------------------------------------------------------------------


def state_dict_to_original(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder as one state dict in the original (CompVis/LDM) layout.

    Keys are ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE) and ``cond_stage_model.*`` (text
    encoder: ``transformer.text_model.*`` for SD 1.x's CLIP, ``model.*`` in open_clip's names for SD 2.x's, told
    apart by the activation, quick GELU vs GELU). The tensors are the models' own (no copies, same dtype and
    device), except the VAE attention weights, which are views reshaped to 1×1 convolutions, and SD 2.x's stacked
    q/k/v projections. Pure: the pipeline is not changed.

    Raises:
        InvalidArgumentError: the pipeline is not an SD 1.x/2.x layout (SDXL, added or class embeddings, other
            block types, a text encoder that is not ``CLIPTextModel``, ...), naming the part that does not fit.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    what = _describe(pipe)
    parts = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    for name, expected in parts.items():
        component = getattr(pipe, name, None)
        if not isinstance(component, expected):
            raise InvalidArgumentError(
                f"{what}: its {name} is {type(component).__name__}, expected {expected.__name__}"
            )
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise InvalidArgumentError(f"{what}: it has a second text encoder (SDXL-like); only SD 1.x/2.x are written")

    original = _unet_to_original(pipe.unet, what)
    original.update(_vae_to_original(pipe.vae, what))
    if _is_open_clip(pipe.text_encoder):
        original.update(_open_clip_to_original(pipe.text_encoder, what))
    else:
        original.update(_clip_to_original(pipe.text_encoder))
    return original


def save_single_file(
    pipe: StableDiffusionPipeline, path: str | os.PathLike, *, dtype: torch.dtype | None = None
) -> Path:
    """Write ``pipe`` to ``path`` as one original-layout ``.safetensors`` checkpoint; returns the path written.

    ``dtype`` (e.g. ``torch.float16`` to halve the file) casts the floating-point weights; by default they keep
    the pipeline's dtype. The file is written beside ``path`` and renamed into place, so a failure never leaves half
    a checkpoint. Load it with ``difflora.pipelines.load_pipeline(path, model_config=<diffusers folder>)``: the file
    holds weights only, the folder gives the configs, tokenizer and scheduler.

    Raises:
        InvalidArgumentError: ``path`` does not end in ``.safetensors``, ``dtype`` is not a floating dtype, or the
            pipeline cannot be written in the original layout (see ``state_dict_to_original``).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise InvalidArgumentError(f"single-file checkpoint {path}: the name must end in .safetensors")
    if dtype is not None and not dtype.is_floating_point:
        raise InvalidArgumentError(f"single-file checkpoint {path}: dtype {dtype} is not a floating-point dtype")

    tensors = {}
    for key, tensor in state_dict_to_original(pipe).items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[key] = tensor.contiguous()  # safetensors stores dense row-major data only
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata={"format": "pt"})
    return path
