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

from ..adapter import AdapterState, LoRAModuleWeights
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
# What a LoRA/LoCon module holds. Any other key of a module (LoHa ``hada_*``, LoKr ``lokr_*``, DoRA ``dora_scale``,
# full ``diff``/``diff_b``, norm ``w_norm``/``b_norm``) marks another algorithm: the whole module is then skipped.
_FACTOR = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha"}
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


def _lora_modules(
    tensors: dict[str, torch.Tensor], source: str
) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """The factors of every LoRA/LoCon module by module key, and the keys difflora cannot apply, in file order:
    keys outside kohya's naming, names of no layer difflora knows, and every key of a module that holds more than
    LoRA factors and alpha (another algorithm: applying its LoRA part alone would apply it wrongly) or only an alpha.

    Raises:
        AdapterFileError: two names in one file for the same layer.
    """
    names: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for key in tensors:
        match = _KEY.match(key)
        if match:
            names[match.group(1), match.group(2)].append(key)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    named_by: dict[str, str] = {}
    applied: set[str] = set()
    for (prefix, name), keys in names.items():
        suffixes = [key.partition(".")[2] for key in keys]
        module_key = _module_key(prefix, name)
        is_lora = all(suffix in _FACTOR for suffix in suffixes) and any(suffix != "alpha" for suffix in suffixes)
        if module_key is None or not is_lora:
            continue
        if module_key in factors:
            raise AdapterFileError(
                f"{source}: module {module_key!r} is named twice ({named_by[module_key]} and {prefix}_{name})"
            )
        factors[module_key] = {_FACTOR[suffix]: tensors[key] for key, suffix in zip(keys, suffixes)}
        named_by[module_key] = f"{prefix}_{name}"
        applied.update(keys)
    return factors, [key for key in tensors if key not in applied]


def read_state_dict(tensors: dict[str, torch.Tensor], header: dict[str, str], source: str) -> AdapterState:
    """An :class:`AdapterState` from a kohya/A1111/ComfyUI/LyCORIS LoRA or LoCon state dict; every header entry but
    ``format`` is kept as metadata.

    Raises:
        AdapterFileError: a module without its up or down factor, factors whose shapes do not fit (a Linear's are
            matrices, a Conv2d's 4-D with a 1 × 1 up), an alpha that is not one number, one layer named twice, or no
            LoRA module difflora can apply.
    """
    factors, skipped = _lora_modules(tensors, source)
    modules = {}
    for module_key in sorted(factors):
        parts = factors[module_key]
        down, up, mid = require_factors(source, module_key, parts)
        alpha = alpha_value(source, module_key, parts["alpha"]) if "alpha" in parts else float(down.shape[0])
        modules[module_key] = LoRAModuleWeights(down=down, up=up, alpha=alpha, mid=mid)
    if not modules:
        first = skipped[0] if skipped else "none"
        raise AdapterFileError(
            f"{source}: kohya file holds no LoRA module difflora can apply "
            f"({len(skipped)} keys skipped, first: {first!r})"
        )
    metadata = {key: value for key, value in header.items() if key != "format"}
    return AdapterState(modules=modules, metadata=metadata, source_format=KOHYA, skipped=skipped)


# ----- writing ------------------------------------------------------------------------------------------------------


def _kohya_name(module_key: str) -> str:
    component, _, path = module_key.partition(".")
    prefix = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}[component]
    return f"{prefix}_{file_module_path(component, path).replace('.', '_')}"


def to_kohya_state_dict(state: AdapterState) -> dict[str, torch.Tensor]:
    """kohya/A1111/ComfyUI tensors with each module's real alpha (rsLoRA scales are written as the equivalent alpha):
    ``lora_down.weight`` and ``lora_up.weight`` as the module holds them (a Conv2d's 4-D, as kohya's and LyCORIS'
    conv modules store their weights) and a Tucker core as LyCORIS' ``lora_mid.weight``."""
    tensors = {}
    has_second_encoder = any(key.startswith("text_encoder_2.") for key in state.modules)
    for module_key, weights in state.modules.items():
        name = _kohya_name(module_key)
        if has_second_encoder and name.startswith("lora_te_"):
            name = "lora_te1_" + name.removeprefix("lora_te_")  # SDXL files name the first encoder te1
        tensors[f"{name}.lora_down.weight"] = weights.down.detach().contiguous()
        tensors[f"{name}.lora_up.weight"] = weights.up.detach().contiguous()
        if weights.mid is not None:
            tensors[f"{name}.lora_mid.weight"] = weights.mid.detach().contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(weights.alpha_for(use_rslora=False), dtype=torch.float32)
    return tensors


def _most_common_rank_and_alpha(modules: list[LoRAModuleWeights]) -> tuple[int, float]:
    ranks = collections.Counter(w.rank for w in modules)
    alphas = collections.Counter(w.alpha_for(use_rslora=False) for w in modules)
    return ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]


def _network_entries(state: AdapterState) -> dict[str, str]:
    """``ss_network_module``/``_dim``/``_alpha`` and, for a LoCon, ``ss_network_args``, as kohya's trainer records
    them: dim and alpha of the Linear and 1 × 1 layers, ``conv_dim``/``conv_alpha`` of the k × k convolutions;
    a Tucker core is LyCORIS' (``use_tucker``)."""
    kernels = [w for w in state.modules.values() if w.weight_shape[2:] not in ((), (1, 1))]
    others = [w for w in state.modules.values() if w.weight_shape[2:] in ((), (1, 1))]
    rank, alpha = _most_common_rank_and_alpha(others or kernels)
    entries = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": f"{alpha:g}"}
    if kernels:
        conv_rank, conv_alpha = _most_common_rank_and_alpha(kernels)
        arguments = {"conv_dim": str(conv_rank), "conv_alpha": f"{conv_alpha:g}"}
        if any(w.mid is not None for w in kernels):
            entries["ss_network_module"] = "lycoris.kohya"
            arguments = {"algo": "locon", **arguments, "use_tucker": "True"}
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
