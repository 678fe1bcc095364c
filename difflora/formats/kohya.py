"""The kohya dialect: what kohya's sd-scripts write and AUTOMATIC1111 and ComfyUI read.

Keys are ``lora_unet_<path>`` / ``lora_te_<path>`` (``lora_te1_``/``lora_te2_`` for SDXL's two text encoders), the
module path flattened with underscores, each with ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``
(scale = alpha / rank; alpha = rank when absent). SDXL files name UNet blocks in the original (LDM) layout. Modules
difflora does not adapt (convolutions, feed-forward layers, LyCORIS keys) are reported in ``skipped``.

difflora writes each module's real alpha (an rsLoRA scale as the equivalent alpha) and kohya's ``ss_*`` and the
``modelspec.*`` header keys that A1111 and ComfyUI show.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterable

import torch

from ..adapter import AdapterState, LoRAModuleWeights
from ..errors import AdapterFileError
from ._common import alpha_value, file_module_path, require_factors

__all__ = ["KOHYA", "claims", "file_contents", "kohya_metadata", "read_state_dict", "to_kohya_state_dict"]

KOHYA = "kohya"

# ----- reading ------------------------------------------------------------------------------------------------------

_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_KEY = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_FACTOR = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
# kohya flattens module paths with underscores; these patterns put the dots back for the modules difflora adapts.
_UNET_MODULE = re.compile(
    r"^(?:(down_blocks|up_blocks)_(\d+)_|(mid_block)_)attentions_(\d+)_transformer_blocks_(\d+)_(attn1|attn2)_"
    r"(to_q|to_k|to_v|to_out_0)$"
)
# SDXL files name UNet blocks in the original layout: input_blocks_I_1 / middle_block_1 / output_blocks_J_1 hold the
# attention of down block (I-1)//3 (layer (I-1)%3), the mid block, and up block J//3 (attention J%3): SDXL has
# two layers per down block plus a downsampler (three slots) and three per up block.
_SDXL_UNET_MODULE = re.compile(
    r"^(?:(input_blocks|output_blocks)_(\d+)_1|(middle_block)_1)_transformer_blocks_(\d+)_(attn1|attn2)_"
    r"(to_q|to_k|to_v|to_out_0)$"
)
_SDXL_SLOTS_PER_BLOCK = 3
_TEXT_MODULE = re.compile(r"^(?:text_model_)?encoder_layers_(\d+)_self_attn_(q_proj|k_proj|v_proj|out_proj)$")
_COMPONENT = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}


def claims(keys: Iterable[str]) -> bool:
    """A file is kohya's when any key has kohya's prefix; its other keys are then reported as skipped."""
    return any(key.startswith(_PREFIXES) for key in keys)


def _module_key(prefix: str, name: str) -> str | None:
    """``lora_unet_down_blocks_0_…_attn1_to_q`` → ``unet.down_blocks.0.….attn1.to_q``; ``None`` for other modules."""
    component = _COMPONENT[prefix]
    if component == "unet":
        match = _UNET_MODULE.match(name)
        if not match:
            return _sdxl_module_key(name)
        kind, index, mid, attention, block, attn, projection = match.groups()
        where = f"{kind}.{index}" if kind else mid
        projection = "to_out.0" if projection == "to_out_0" else projection
        return f"unet.{where}.attentions.{attention}.transformer_blocks.{block}.{attn}.{projection}"
    match = _TEXT_MODULE.match(name)
    if not match:
        return None
    layer, projection = match.groups()
    return f"{component}.encoder.layers.{layer}.self_attn.{projection}"


def _sdxl_module_key(name: str) -> str | None:
    """``input_blocks_4_1_transformer_blocks_0_attn1_to_q`` → ``unet.down_blocks.1.attentions.0.…``; else ``None``."""
    match = _SDXL_UNET_MODULE.match(name)
    if not match:
        return None
    kind, index, middle, block, attn, projection = match.groups()
    if middle:
        where = "mid_block.attentions.0"
    elif kind == "input_blocks":
        slot = int(index) - 1  # input_blocks_0 is conv_in
        where = f"down_blocks.{slot // _SDXL_SLOTS_PER_BLOCK}.attentions.{slot % _SDXL_SLOTS_PER_BLOCK}"
    else:
        slot = int(index)
        where = f"up_blocks.{slot // _SDXL_SLOTS_PER_BLOCK}.attentions.{slot % _SDXL_SLOTS_PER_BLOCK}"
    projection = "to_out.0" if projection == "to_out_0" else projection
    return f"unet.{where}.transformer_blocks.{block}.{attn}.{projection}"


def read_state_dict(tensors: dict[str, torch.Tensor], header: dict[str, str], source: str) -> AdapterState:
    """An :class:`AdapterState` from a kohya/A1111/ComfyUI LoRA state dict; every header entry but ``format`` is kept
    as metadata.

    Raises:
        AdapterFileError: a module without its up or down factor, factors whose shapes do not fit (an attention
            projection is a linear map: its factors are matrices), an alpha that is not one number, or no attention
            module difflora can apply.
    """
    factors: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    skipped = []
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        module_key = _module_key(match.group(1), match.group(2)) if match else None
        if module_key is None:
            skipped.append(key)  # conv LoRA, LoHa/LoKr, feed-forward and projection modules
            continue
        factors[module_key][_FACTOR[match.group(3)]] = tensor
    modules = {}
    for module_key in sorted(factors):
        parts = factors[module_key]
        down, up = require_factors(source, module_key, parts)
        alpha = alpha_value(source, module_key, parts["alpha"]) if "alpha" in parts else float(down.shape[0])
        modules[module_key] = LoRAModuleWeights(down=down, up=up, alpha=alpha)
    if not modules:
        raise AdapterFileError(
            f"{source}: kohya file holds no attention LoRA difflora can apply ({len(skipped)} keys skipped)"
        )
    metadata = {key: value for key, value in header.items() if key != "format"}
    return AdapterState(modules=modules, metadata=metadata, source_format=KOHYA, skipped=skipped)


# ----- writing ------------------------------------------------------------------------------------------------------


def _kohya_name(module_key: str) -> str:
    component, _, path = module_key.partition(".")
    prefix = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}[component]
    return f"{prefix}_{file_module_path(component, path).replace('.', '_')}"


def to_kohya_state_dict(state: AdapterState) -> dict[str, torch.Tensor]:
    """kohya/A1111/ComfyUI tensors with each module's real alpha (rsLoRA scales are written as the equivalent alpha)."""
    tensors = {}
    has_second_encoder = any(key.startswith("text_encoder_2.") for key in state.modules)
    for module_key, weights in state.modules.items():
        name = _kohya_name(module_key)
        if has_second_encoder and name.startswith("lora_te_"):
            name = "lora_te1_" + name.removeprefix("lora_te_")  # SDXL files name the first encoder te1
        tensors[f"{name}.lora_down.weight"] = weights.down.detach().contiguous()
        tensors[f"{name}.lora_up.weight"] = weights.up.detach().contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(weights.alpha_for(use_rslora=False), dtype=torch.float32)
    return tensors


def kohya_metadata(state: AdapterState, title: str = "difflora adapter") -> dict[str, str]:
    """kohya's ``ss_*`` keys and the ``modelspec.*`` keys A1111 and ComfyUI show."""
    ranks = collections.Counter(w.rank for w in state.modules.values())
    alphas = collections.Counter(w.alpha_for(use_rslora=False) for w in state.modules.values())
    rank, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    sdxl = any(key.startswith("text_encoder_2.") for key in state.modules)
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v1",
        "ss_training_comment": "written by difflora",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ("stable-diffusion-xl-v1-base" if sdxl else "stable-diffusion-v1") + "/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
    }


def file_contents(state: AdapterState, title: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a kohya-layout file and its header entries (``title`` becomes ``modelspec.title``)."""
    return to_kohya_state_dict(state), kohya_metadata(state, title=title)
