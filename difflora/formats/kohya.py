"""The kohya dialect: what kohya's sd-scripts write and AUTOMATIC1111 and ComfyUI read.

Keys are ``lora_unet_<path>`` / ``lora_te_<path>`` (``lora_te1_``/``lora_te2_`` for SDXL's two text encoders), the
module path flattened with underscores (read back by :mod:`._kohya_names`), each with ``.lora_down.weight``,
``.lora_up.weight`` and ``.alpha`` (scale = alpha / rank; alpha = rank when absent), on any Linear or Conv2d of the
UNet and text encoders: a Conv2d's factors are 4-D (LoCon: down rank × in × kh × kw, up out × rank × 1 × 1), with
LyCORIS' Tucker core ``.lora_mid.weight`` a 1 × 1 down. SDXL files name UNet blocks in the original (LDM) layout.
LyCORIS' LoHa, LoKr, full diffs and DoRA magnitudes are read under their own keys (:mod:`._algorithms`), and
SimpleTuner's LyCORIS files (``lycoris_<flattened diffusers UNet path>``, what LyCORIS' wrapper writes for the
UNet it wraps) the same way. OneTrainer's kohya and "legacy" outputs are this dialect too. Modules of algorithms
difflora does not apply (norm diffs, OFT, …) and names of no known layer are reported in ``skipped``, every key of
them.

difflora writes each module's real alpha (an rsLoRA scale as the equivalent alpha) and kohya's ``ss_*`` and the
``modelspec.*`` header keys that A1111 and ComfyUI show.
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Iterable

import torch

from ..adapter import AdapterState, ModuleWeights
from ..keys import join_module_key
from ._algorithms import KINDS, kohya_suffix, read_modules
from ._common import file_module_path
from ._kohya_names import diffusers_unet_layer_path, text_layer_path, unet_layer_path

__all__ = ["KOHYA", "claims", "file_contents", "kohya_metadata", "read_state_dict", "to_kohya_state_dict"]

KOHYA = "kohya"

# ----- reading ------------------------------------------------------------------------------------------------------

# kohya names a module by everything before the key's first dot (``lora_unet_<flattened path>``); LyCORIS' wrapper,
# as SimpleTuner uses it on the UNet, by ``lycoris_<flattened path>``.
_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lycoris_")
_KEY = re.compile(r"^((?:lora_unet|lora_te1|lora_te2|lora_te|lycoris)_[^.]+)\.(.+)$")
_NAME = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te|lycoris)_(.+)$")
_COMPONENT = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2",
              "lycoris": "unet"}


def claims(keys: Iterable[str]) -> bool:
    """A file is kohya's when any key has kohya's prefix (or LyCORIS' ``lycoris_``); its other keys are then
    reported as skipped."""
    return any(key.startswith(_PREFIXES) for key in keys)


def _split_key(key: str) -> tuple[str, str] | None:
    """``lora_unet_<name>.lora_A.weight`` → ``("lora_unet_<name>", "lora_down.weight")``; ``None`` outside kohya's
    naming."""
    match = _KEY.match(key)
    return (match.group(1), kohya_suffix(match.group(2))) if match else None


def _module_key(name: str) -> str | None:
    """``lora_unet_down_blocks_0_resnets_0_conv1`` → ``unet.down_blocks.0.resnets.0.conv1`` (SDXL's original layout
    too: ``lora_unet_input_blocks_1_0_in_layers_2`` → the same; ``lycoris_`` names in diffusers' layout only);
    ``None`` for a name that is no Linear or Conv2d layer of the Stable Diffusion UNets and CLIP text encoders
    (:mod:`._kohya_names`)."""
    prefix, flattened = _NAME.match(name).groups()
    component = _COMPONENT[prefix]
    if prefix == "lycoris":
        path = diffusers_unet_layer_path(flattened)
    else:
        path = unet_layer_path(flattened) if component == "unet" else text_layer_path(flattened)
    return join_module_key(component, path) if path is not None else None


def read_state_dict(tensors: dict[str, torch.Tensor], header: dict[str, str], source: str) -> AdapterState:
    """An :class:`AdapterState` from a kohya/A1111/LyCORIS/SimpleTuner state dict (LoRA, LoCon, LoHa, LoKr, full
    diffs, each with or without DoRA); every header entry but ``format`` is kept as metadata.

    Raises:
        AdapterFileError: a module without a factor its algorithm needs, LoRA factors whose shapes do not fit (a
            Linear's are matrices, a Conv2d's 4-D with a 1 × 1 up), an alpha that is not one number, one layer
            named twice, or no module difflora can apply.
    """
    return read_modules(tensors, header, source, format_name=KOHYA, split_key=_split_key, module_key_of=_module_key)


# ----- writing ------------------------------------------------------------------------------------------------------


def _kohya_name(module_key: str) -> str:
    component, _, path = module_key.partition(".")
    prefix = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}[component]
    return f"{prefix}_{file_module_path(component, path).replace('.', '_')}"


def _dora_scale_as_stored(weights: ModuleWeights) -> torch.Tensor:
    """The DoRA magnitude in LyCORIS' layout: out × 1 (× 1 × 1) per output row, 1 × in (× 1 × 1) per input column."""
    ones = [1] * (len(weights.weight_shape) - 2)
    if weights.wd_on_output:
        return weights.dora_scale.reshape(weights.weight_shape[0], 1, *ones)
    return weights.dora_scale.reshape(1, weights.weight_shape[1], *ones)


def _module_tensors(weights: ModuleWeights) -> dict[str, torch.Tensor]:
    """One module's keys (suffix → tensor) as kohya and LyCORIS write them."""
    if weights.kind == "lora":
        tensors = {"lora_down.weight": weights.down, "lora_up.weight": weights.up, "lora_mid.weight": weights.mid,
                   "alpha": torch.tensor(weights.alpha_for(use_rslora=False), dtype=torch.float32)}
    else:
        suffix_of = {field: suffix for suffix, field in KINDS[weights.kind].items()}
        tensors = {suffix_of[field]: tensor for field, tensor in weights.tensors().items()}
        if weights.kind != "full" and weights.alpha is not None:
            tensors["alpha"] = torch.tensor(float(weights.alpha), dtype=torch.float32)
    if weights.dora_scale is not None:
        tensors["dora_scale"] = _dora_scale_as_stored(weights)
    return {suffix: tensor.detach().contiguous() for suffix, tensor in tensors.items() if tensor is not None}


def to_kohya_state_dict(state: AdapterState) -> dict[str, torch.Tensor]:
    """kohya/A1111/ComfyUI tensors: LoRA with each module's real alpha (rsLoRA scales as the equivalent alpha),
    ``lora_down``/``lora_up`` as the module holds them (a Conv2d's 4-D) and a Tucker core as ``lora_mid``; LoHa,
    LoKr, full diffs and DoRA magnitudes under LyCORIS' key names, losslessly."""
    tensors = {}
    has_second_encoder = any(key.startswith("text_encoder_2.") for key in state.modules)
    for module_key, weights in state.modules.items():
        name = _kohya_name(module_key)
        if has_second_encoder and name.startswith("lora_te_"):
            name = "lora_te1_" + name.removeprefix("lora_te_")  # SDXL files name the first encoder te1
        tensors.update({f"{name}.{suffix}": tensor for suffix, tensor in _module_tensors(weights).items()})
    return tensors


def _most_common_rank_and_alpha(modules: list[ModuleWeights]) -> tuple[int, float]:
    ranks = collections.Counter(w.rank for w in modules)
    alphas = collections.Counter(w.alpha_for(use_rslora=False) if w.kind == "lora" else (w.alpha or 1.0)
                                 for w in modules)
    return ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]


def _network_entries(state: AdapterState) -> dict[str, str]:
    """``ss_network_module``/``_dim``/``_alpha`` and ``ss_network_args``, as kohya's trainer and LyCORIS record
    them: dim and alpha of the Linear and 1 × 1 layers, ``conv_dim``/``conv_alpha`` of the k × k convolutions;
    LyCORIS (``lycoris.kohya``) with its ``algo`` for a Tucker core, LoHa, LoKr, full diffs or DoRA."""
    kernels = [w for w in state.modules.values() if w.weight_shape[2:] not in ((), (1, 1))]
    others = [w for w in state.modules.values() if w.weight_shape[2:] in ((), (1, 1))]
    rank, alpha = _most_common_rank_and_alpha(others or kernels)
    entries = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": f"{alpha:g}"}
    arguments = {}
    if kernels:
        conv_rank, conv_alpha = _most_common_rank_and_alpha(kernels)
        arguments = {"conv_dim": str(conv_rank), "conv_alpha": f"{conv_alpha:g}"}
    algorithms = sorted({w.kind for w in state.modules.values()})
    lycoris = (algorithms != ["lora"] or any(getattr(w, "mid", None) is not None for w in kernels)
               or any(w.dora_scale is not None for w in state.modules.values()))
    if lycoris:
        entries["ss_network_module"] = "lycoris.kohya"
        algorithm = "+".join(algorithms).replace("lora", "locon")
        arguments = {"algo": algorithm, **arguments}
        if any(getattr(w, "mid", None) is not None or getattr(w, "t1", None) is not None for w in kernels):
            arguments["use_tucker"] = "True"
        if any(w.dora_scale is not None for w in state.modules.values()):
            arguments["dora_wd"] = "True"
            arguments["wd_on_output"] = str(all(w.wd_on_output for w in state.modules.values()))
    if arguments:
        entries["ss_network_args"] = json.dumps(arguments)
    return entries


def kohya_metadata(state: AdapterState, title: str = "difflora adapter") -> dict[str, str]:
    """kohya's ``ss_*`` keys and the ``modelspec.*`` keys A1111 and ComfyUI show."""
    sdxl = any(key.startswith("text_encoder_2.") for key in state.modules)
    return {
        **_network_entries(state),
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
