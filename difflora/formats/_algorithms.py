"""What the dialects of kohya's and LyCORIS' family share (kohya, SimpleTuner's LyCORIS files, ComfyUI, OneTrainer):
the keys each algorithm writes after a module's name, a module's algorithm told from its keys, and its weights.

A dialect says how its keys split into a module name and a suffix (``split_key``) and which layer a module name is
(``module_key_of``); :func:`read_modules` does the rest. Suffixes are read in every spelling these tools write for a
LoRA (``lora_down.weight``/``lora_up.weight``, ``lora_A``/``lora_B``, ``lora.down``/``lora.up``,
``lora_linear_layer``), and a module whose keys difflora cannot apply is skipped whole, every key of it listed.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable

import torch

from ..adapter import AdapterState, FullModuleWeights, LoHaModuleWeights, LoKrModuleWeights, LoRAModuleWeights
from ..adapter import ModuleWeights
from ..errors import AdapterFileError
from ._common import alpha_value, require_factors

__all__ = ["KINDS", "dotted_split", "kohya_suffix", "read_modules"]

# What a module of each algorithm holds (key suffix → field), as kohya's networks/lora.py and LyCORIS' modules write
# them; every kind may also hold an ``alpha`` and a DoRA ``dora_scale``. A module with any other key (norm
# ``w_norm``/``b_norm``, OFT, …) or keys of two algorithms is skipped whole: applying part of it would apply it
# wrongly. The one exception is a bias diff beside another algorithm (ComfyUI's trainer writes one for every layer
# with a bias): it adds to the bias alone, so the weight's update is applied and the bias diff listed as skipped.
KINDS = {
    "lora": {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid"},
    "loha": {"hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b", "hada_t1": "t1",
             "hada_t2": "t2"},
    "lokr": {"lokr_w1": "w1", "lokr_w1_a": "w1a", "lokr_w1_b": "w1b", "lokr_w2": "w2", "lokr_w2_a": "w2a",
             "lokr_w2_b": "w2b", "lokr_t2": "t2"},
    "full": {"diff": "diff", "diff_b": "diff_b"},
}
_SHARED = {"alpha": "alpha", "dora_scale": "dora_scale"}
_REQUIRED = {"lora": ("down", "up"), "loha": ("w1a", "w1b", "w2a", "w2b"), "lokr": (), "full": ("diff",)}
# The other spellings of a LoRA's factors, as ComfyUI's loader reads them (OneTrainer's ComfyUI and "original"
# outputs write lora_A/lora_B with kohya's alpha).
_LORA_SPELLINGS = {
    "lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
    "lora_A.default.weight": "lora_down.weight", "lora_B.default.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
    "lora_linear_layer.down.weight": "lora_down.weight", "lora_linear_layer.up.weight": "lora_up.weight",
}
# Keys of algorithms difflora does not apply, known so that a dotted key splits into its module and suffix:
# LyCORIS' norm diffs, (B)OFT and GLoRA, OneTrainer's OFT, ComfyUI's weight replacement and padding, a LoRA bias.
_NOT_APPLIED = ("w_norm", "b_norm", "oft_blocks", "oft_diag", "rescale", "oft_R.weight", "oft_R.scaled_oft",
                "a1.weight", "a2.weight", "b1.weight", "b2.weight", "on_input", "set_weight", "reshape_weight",
                "lora_B.bias", "lora_up.bias")
_SUFFIXES = sorted({*(suffix for fields in KINDS.values() for suffix in fields), *_SHARED, *_LORA_SPELLINGS,
                    *_NOT_APPLIED}, key=len, reverse=True)

SplitKey = Callable[[str], "tuple[str, str] | None"]


def kohya_suffix(suffix: str) -> str:
    """A suffix in kohya's spelling: ``lora_A.weight`` → ``lora_down.weight``; any other as it is."""
    return _LORA_SPELLINGS.get(suffix, suffix)


def dotted_split(key: str) -> tuple[str, str] | None:
    """``(module name, suffix)`` of a key whose module name is dotted (``diffusion_model.input_blocks.1.1.proj_in
    .lora_A.weight`` → the name and ``lora_down.weight``), by the suffixes this family writes; ``None`` for a key
    with none of them."""
    for suffix in _SUFFIXES:
        if key.endswith("." + suffix) and len(key) > len(suffix) + 1:
            return key[: -len(suffix) - 1], kohya_suffix(suffix)
    return None


def _kind_of(suffixes: list[str]) -> str | None:
    """The algorithm whose keys these are, or ``None`` (unknown keys, two algorithms, or only shared keys)."""
    own = [suffix for suffix in suffixes if suffix not in _SHARED]
    for kind, fields in KINDS.items():
        if own and all(suffix in fields for suffix in own):
            return kind
    return None


def _set_apart_bias_diff(keys: list[str], suffix_of: dict[str, str], tensors: dict) -> tuple[list, list]:
    """``(keys to read, bias-diff keys that change nothing)`` of one module: a ``diff_b`` beside another algorithm's
    keys is set apart, and counts as applied when it is all zeros; any other module's keys as they are."""
    suffixes = [suffix_of[key] for key in keys]
    if "diff_b" not in suffixes or _kind_of([suffix for suffix in suffixes if suffix != "diff_b"]) in (None, "full"):
        return keys, []
    bias = [key for key in keys if suffix_of[key] == "diff_b"]
    unchanged = [key for key in bias if not bool(tensors[key].detach().float().abs().max() > 0)]
    return [key for key in keys if key not in bias], unchanged


def _modules(
    tensors: dict[str, torch.Tensor], source: str, split_key: SplitKey, module_key_of: Callable[[str], str | None]
) -> tuple[dict[str, tuple[str, dict]], list[str]]:
    """Every module difflora applies by module key, as (algorithm, field → tensor), and the keys it cannot apply,
    in file order: keys outside the dialect's naming, names of no layer difflora knows, and every key of a module
    that is no algorithm difflora applies (or holds only an alpha).

    Raises:
        AdapterFileError: two names in one file for the same layer, or a module missing a factor its algorithm needs.
    """
    names: dict[str, list[str]] = collections.defaultdict(list)
    suffix_of: dict[str, str] = {}
    for key in tensors:
        split = split_key(key)
        if split is not None:
            names[split[0]].append(key)
            suffix_of[key] = split[1]
    found: dict[str, tuple[str, dict]] = {}
    named_by: dict[str, str] = {}
    applied: set[str] = set()
    for name, keys in names.items():
        keys, unchanged_bias = _set_apart_bias_diff(keys, suffix_of, tensors)
        suffixes = [suffix_of[key] for key in keys]
        module_key = module_key_of(name)
        kind = _kind_of(suffixes)
        if module_key is None or kind is None:
            continue
        if module_key in found:
            raise AdapterFileError(
                f"{source}: module {module_key!r} is named twice ({named_by[module_key]} and {name})"
            )
        fields = {**KINDS[kind], **_SHARED}
        parts = {fields[suffix]: tensors[key] for key, suffix in zip(keys, suffixes)}
        missing = [field for field in _REQUIRED[kind] if field not in parts]
        if missing and kind != "lora":  # a LoRA's missing half is named by require_factors
            raise AdapterFileError(f"{source}: module {module_key!r} ({kind}) has no {missing[0]} factor")
        found[module_key] = (kind, parts)
        named_by[module_key] = name
        applied.update(keys + unchanged_bias)
    return found, [key for key in tensors if key not in applied]


def _network_argument(header: dict[str, str], entry: str, name: str):
    """One argument of the network as the header records it: kohya's ``ss_network_args`` or SimpleTuner's
    ``lycoris_config`` (JSON objects); ``None`` when absent or unreadable."""
    try:
        arguments = json.loads(header.get(entry) or "{}")
    except json.JSONDecodeError:
        return None
    return arguments.get(name) if isinstance(arguments, dict) else None


def _wd_on_output(dora_scale: torch.Tensor | None, header: dict[str, str]) -> bool:
    """DoRA's axis, told from the magnitude's shape (out × 1 × … per output row, 1 × in × … per input column, as
    LyCORIS and OneTrainer store it), else from LyCORIS' ``wd_on_output`` network argument (default: per output
    row)."""
    if dora_scale is not None and dora_scale.ndim >= 2 and (dora_scale.shape[0] == 1) != (dora_scale.shape[1] == 1):
        return dora_scale.shape[1] == 1
    value = _network_argument(header, "ss_network_args", "wd_on_output")
    if value is None:
        value = _network_argument(header, "lycoris_config", "wd_on_output")
    return str(True if value is None else value).strip().lower() not in ("false", "0", "no")


def _matrix(tensor: torch.Tensor) -> torch.Tensor:
    """A LoHa factor as a matrix: OneTrainer stores a Conv2d's as conv kernels (up out × rank × 1 × 1, down
    rank × in × kh × kw); the update is the same with them flattened, as LyCORIS stores them."""
    return tensor.flatten(1) if tensor.ndim > 2 else tensor


def _module_weights(kind: str, parts: dict, module_key: str, source: str, header: dict[str, str]) -> ModuleWeights:
    alpha = alpha_value(source, module_key, parts.pop("alpha")) if "alpha" in parts else None
    dora = {"dora_scale": parts.get("dora_scale"), "wd_on_output": _wd_on_output(parts.pop("dora_scale", None), header)}
    if kind == "lora":
        down, up, mid = require_factors(source, module_key, parts)
        return LoRAModuleWeights(down=down, up=up, alpha=alpha if alpha is not None else float(down.shape[0]),
                                 mid=mid, **dora)
    if kind == "loha":
        if "t1" not in parts:
            parts = {field: _matrix(tensor) for field, tensor in parts.items()}
        return LoHaModuleWeights(alpha=alpha if alpha is not None else float(parts["w1b"].shape[0]), **parts, **dora)
    if kind == "lokr":
        return LoKrModuleWeights(alpha=alpha, **parts, **dora)
    return FullModuleWeights(**parts, **dora)


def read_modules(
    tensors: dict[str, torch.Tensor],
    header: dict[str, str],
    source: str,
    *,
    format_name: str,
    split_key: SplitKey,
    module_key_of: Callable[[str], str | None],
) -> AdapterState:
    """An :class:`AdapterState` from a state dict of this family (LoRA, LoCon, LoHa, LoKr, full diffs, each with or
    without DoRA) whose keys ``split_key`` splits into a module name and a suffix, and ``module_key_of`` turns a
    module name into a module key (``None``: no layer difflora knows). Every header entry but ``format`` is kept.

    Raises:
        AdapterFileError: a module without a factor its algorithm needs, LoRA factors whose shapes do not fit (a
            Linear's are matrices, a Conv2d's 4-D with a 1 × 1 up), an alpha that is not one number, one layer
            named twice, or no module difflora can apply; one line naming ``source``.
    """
    found, skipped = _modules(tensors, source, split_key, module_key_of)
    modules = {module_key: _module_weights(*found[module_key], module_key, source, header)
               for module_key in sorted(found)}
    if not modules:
        first = skipped[0] if skipped else "none"
        raise AdapterFileError(
            f"{source}: {format_name} file holds no module difflora can apply "
            f"({len(skipped)} keys skipped, first: {first!r})"
        )
    metadata = {key: value for key, value in header.items() if key != "format"}
    return AdapterState(modules=modules, metadata=metadata, source_format=format_name, skipped=skipped)
