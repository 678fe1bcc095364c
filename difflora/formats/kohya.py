"""The kohya dialect: what kohya's sd-scripts write and AUTOMATIC1111 and ComfyUI read.

Keys are ``lora_unet_<path>`` / ``lora_te_<path>`` (``lora_te1_``/``lora_te2_`` for SDXL's two text encoders), the
module path flattened with underscores (read back by :mod:`._kohya_names`), each with ``.lora_down.weight``,
``.lora_up.weight`` and ``.alpha`` (scale = alpha / rank; alpha = rank when absent), on any Linear or Conv2d of the
UNet and text encoders: a Conv2d's factors are 4-D (LoCon: down rank × in × kh × kw, up out × rank × 1 × 1), with
LyCORIS' Tucker core ``.lora_mid.weight`` a 1 × 1 down. SDXL files name UNet blocks in the original (LDM) layout.
Modules of other algorithms (LyCORIS' LoHa, LoKr, DoRA, full and norm diffs) and names of no known layer are
reported in ``skipped``, every key of them.

difflora writes each module's real alpha (an rsLoRA scale as the equivalent alpha) and kohya's ``ss_*`` and the
``modelspec.*`` header keys that A1111 and ComfyUI show.
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Iterable

import torch

from ..adapter import (
    AdapterState,
    FullModuleWeights,
    LoHaModuleWeights,
    LoKrModuleWeights,
    LoRAModuleWeights,
    ModuleWeights,
)
from ..errors import AdapterFileError
from ..keys import join_module_key
from ._common import alpha_value, file_module_path, require_factors
from ._kohya_names import text_layer_path, unet_layer_path

__all__ = ["KOHYA", "claims", "file_contents", "kohya_metadata", "read_state_dict", "to_kohya_state_dict"]

KOHYA = "kohya"

# ----- reading ------------------------------------------------------------------------------------------------------

_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
# kohya names a module by everything before the key's first dot (``lora_unet_<flattened path>``).
_KEY = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te)_([^.]+)\.(.+)$")
# What a module of each algorithm holds (key suffix → field), as kohya's networks/lora.py and LyCORIS' modules
# write them; every kind may also hold an ``alpha`` and a DoRA ``dora_scale``. A module with any other key (norm
# ``w_norm``/``b_norm``, OFT, …) or keys of two algorithms is skipped whole: applying part of it would apply it
# wrongly.
_KINDS = {
    "lora": {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid"},
    "loha": {"hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b", "hada_t1": "t1",
             "hada_t2": "t2"},
    "lokr": {"lokr_w1": "w1", "lokr_w1_a": "w1a", "lokr_w1_b": "w1b", "lokr_w2": "w2", "lokr_w2_a": "w2a",
             "lokr_w2_b": "w2b", "lokr_t2": "t2"},
    "full": {"diff": "diff", "diff_b": "diff_b"},
}
_SHARED = {"alpha": "alpha", "dora_scale": "dora_scale"}
_REQUIRED = {"lora": ("down", "up"), "loha": ("w1a", "w1b", "w2a", "w2b"), "lokr": (), "full": ("diff",)}
_COMPONENT = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}


def claims(keys: Iterable[str]) -> bool:
    """A file is kohya's when any key has kohya's prefix; its other keys are then reported as skipped."""
    return any(key.startswith(_PREFIXES) for key in keys)


def _module_key(prefix: str, name: str) -> str | None:
    """``lora_unet_down_blocks_0_resnets_0_conv1`` → ``unet.down_blocks.0.resnets.0.conv1`` (SDXL's original layout
    too: ``lora_unet_input_blocks_1_0_in_layers_2`` → the same); ``None`` for a name that is no Linear or Conv2d
    layer of the Stable Diffusion UNets and CLIP text encoders (:mod:`._kohya_names`)."""
    component = _COMPONENT[prefix]
    path = unet_layer_path(name) if component == "unet" else text_layer_path(name)
    return join_module_key(component, path) if path is not None else None


def _kind_of(suffixes: list[str]) -> str | None:
    """The algorithm whose keys these are, or ``None`` (unknown keys, two algorithms, or only shared keys)."""
    own = [suffix for suffix in suffixes if suffix not in _SHARED]
    for kind, fields in _KINDS.items():
        if own and all(suffix in fields for suffix in own):
            return kind
    return None


def _modules(tensors: dict[str, torch.Tensor], source: str) -> tuple[dict[str, tuple[str, dict]], list[str]]:
    """Every module difflora applies by module key, as (algorithm, field → tensor), and the keys it cannot apply,
    in file order: keys outside kohya's naming, names of no layer difflora knows, and every key of a module that
    is no algorithm difflora applies (or holds only an alpha).

    Raises:
        AdapterFileError: two names in one file for the same layer, or a module missing a factor its algorithm needs.
    """
    names: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for key in tensors:
        match = _KEY.match(key)
        if match:
            names[match.group(1), match.group(2)].append(key)
    found: dict[str, tuple[str, dict]] = {}
    named_by: dict[str, str] = {}
    applied: set[str] = set()
    for (prefix, name), keys in names.items():
        suffixes = [key.partition(".")[2] for key in keys]
        module_key = _module_key(prefix, name)
        kind = _kind_of(suffixes)
        if module_key is None or kind is None:
            continue
        if module_key in found:
            raise AdapterFileError(
                f"{source}: module {module_key!r} is named twice ({named_by[module_key]} and {prefix}_{name})"
            )
        fields = {**_KINDS[kind], **_SHARED}
        parts = {fields[suffix]: tensors[key] for key, suffix in zip(keys, suffixes)}
        missing = [field for field in _REQUIRED[kind] if field not in parts]
        if missing and kind != "lora":  # a LoRA's missing half is named by require_factors
            raise AdapterFileError(f"{source}: module {module_key!r} ({kind}) has no {missing[0]} factor")
        found[module_key] = (kind, parts)
        named_by[module_key] = f"{prefix}_{name}"
        applied.update(keys)
    return found, [key for key in tensors if key not in applied]


def _wd_on_output(dora_scale: torch.Tensor | None, header: dict[str, str]) -> bool:
    """DoRA's axis, told from the magnitude's shape (out × 1 × … per output row, 1 × in × … per input column, as
    LyCORIS stores it), else from LyCORIS' ``wd_on_output`` network argument (default: per output row)."""
    if dora_scale is not None and dora_scale.ndim >= 2 and (dora_scale.shape[0] == 1) != (dora_scale.shape[1] == 1):
        return dora_scale.shape[1] == 1
    try:
        arguments = json.loads(header.get("ss_network_args") or "{}")
    except json.JSONDecodeError:
        arguments = {}
    value = arguments.get("wd_on_output", True) if isinstance(arguments, dict) else True
    return str(value).strip().lower() not in ("false", "0", "no")


def _module_weights(kind: str, parts: dict, module_key: str, source: str, header: dict[str, str]) -> ModuleWeights:
    alpha = alpha_value(source, module_key, parts.pop("alpha")) if "alpha" in parts else None
    dora = {"dora_scale": parts.get("dora_scale"), "wd_on_output": _wd_on_output(parts.pop("dora_scale", None), header)}
    if kind == "lora":
        down, up, mid = require_factors(source, module_key, parts)
        return LoRAModuleWeights(down=down, up=up, alpha=alpha if alpha is not None else float(down.shape[0]),
                                 mid=mid, **dora)
    if kind == "loha":
        return LoHaModuleWeights(alpha=alpha if alpha is not None else float(parts["w1b"].shape[0]), **parts, **dora)
    if kind == "lokr":
        return LoKrModuleWeights(alpha=alpha, **parts, **dora)
    return FullModuleWeights(**parts, **dora)


def read_state_dict(tensors: dict[str, torch.Tensor], header: dict[str, str], source: str) -> AdapterState:
    """An :class:`AdapterState` from a kohya/A1111/ComfyUI/LyCORIS state dict (LoRA, LoCon, LoHa, LoKr, full diffs,
    each with or without DoRA); every header entry but ``format`` is kept as metadata.

    Raises:
        AdapterFileError: a module without a factor its algorithm needs, LoRA factors whose shapes do not fit (a
            Linear's are matrices, a Conv2d's 4-D with a 1 × 1 up), an alpha that is not one number, one layer
            named twice, or no module difflora can apply.
    """
    found, skipped = _modules(tensors, source)
    modules = {module_key: _module_weights(*found[module_key], module_key, source, header)
               for module_key in sorted(found)}
    if not modules:
        first = skipped[0] if skipped else "none"
        raise AdapterFileError(
            f"{source}: kohya file holds no module difflora can apply "
            f"({len(skipped)} keys skipped, first: {first!r})"
        )
    metadata = {key: value for key, value in header.items() if key != "format"}
    return AdapterState(modules=modules, metadata=metadata, source_format=KOHYA, skipped=skipped)


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
        suffix_of = {field: suffix for suffix, field in _KINDS[weights.kind].items()}
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
