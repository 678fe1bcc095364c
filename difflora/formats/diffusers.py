"""The diffusers dialect: PEFT-style ``<component>.<path>.lora_A.weight`` / ``.lora_B.weight`` keys, what
``save_lora_weights`` and diffusers' training scripts write, and what difflora writes (layouts ``difflora`` and
``diffusers``). Any layer path is read as the file spells it, a Conv2d's factors 4-D as PEFT's conv LoRA holds them.

PEFT's DoRA (``use_dora``) is read and written: ``<path>.lora_magnitude_vector`` beside the factors, one value per
output row (``(out,)`` on a Linear, ``(1, out, 1, 1)`` on a Conv2d), the norm that of ``W + s·BA`` with PEFT's
scale ``s`` (``lora_alpha / r``, ``/ sqrt(r)`` under rsLoRA); PEFT switches DoRA on per LoraConfig, so every
module of a component has a magnitude or none does. Text encoders' magnitudes are written
``lora_magnitude_vector.weight``, which diffusers loads where it misses PEFT's spelling
(:func:`~._common.magnitude_key`). A module holding anything else beside its factors (a ``lora_B.bias``) is skipped
whole.

Alphas come from ``.alpha`` keys, else from diffusers' ``lora_adapter_metadata`` header entry (a LoraConfig per
component, flattened as ``<component>.<option>``), resolved per module as PEFT resolves ``alpha_pattern``; a file with
neither has alpha = rank. Reading also takes diffusers' older spellings (:mod:`.legacy`), which one file may mix with
these. Writing puts the header entry in, so plain ``load_lora_weights`` applies each module at its scale.
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from ..adapter import AdapterState, LoRAModuleWeights
from ..errors import AdapterFileError
from ..keys import COMPONENTS
from . import legacy
from ._common import (
    alpha_value,
    factors_without_core,
    file_module_path,
    magnitude_as_read,
    magnitude_key,
    peft_magnitude,
    require_factors,
)

__all__ = [
    "DIFFUSERS",
    "DIFFUSERS_METADATA_KEY",
    "DIFFUSERS_WEIGHTS_FILE",
    "KEY_SPELLINGS",
    "claims",
    "diffusers_lora_metadata",
    "file_contents",
    "read_state_dict",
    "to_diffusers_state_dict",
]

DIFFUSERS = "diffusers"
# diffusers reads its LoraConfig per component from this safetensors header key.
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
# The file diffusers' training scripts write into their output folder.
DIFFUSERS_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"

# ----- reading ------------------------------------------------------------------------------------------------------

# group 1 is the module path; PEFT may put the adapter's name before `.weight`.
_LORA_A = re.compile(r"^(.+)\.lora_A(?:\.[A-Za-z0-9_-]+)?\.weight$")
_LORA_B = re.compile(r"^(.+)\.lora_B(?:\.[A-Za-z0-9_-]+)?\.weight$")
_ALPHA = re.compile(r"^(.+)\.alpha$")
# PEFT saves `lora_magnitude_vector`; a model's own state dict holds `lora_magnitude_vector.<adapter>.weight` (PEFT
# 0.12 and later) or `lora_magnitude_vector.<adapter>` (PEFT 0.9 to 0.11, a ParameterDict).
_MAGNITUDE = re.compile(r"^(.+)\.lora_magnitude_vector(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?$")


def _match_peft_key(rest: str) -> tuple[str, str, str] | None:
    """``(module path, 'diffusers', 'down'|'up'|'magnitude')`` of a ``lora_A``/``lora_B``/``lora_magnitude_vector``
    key (component prefix removed); a magnitude on an attention's ``to_out`` list is :mod:`.legacy`'s."""
    for pattern, factor in ((_LORA_A, "down"), (_LORA_B, "up"), (_MAGNITUDE, "magnitude")):
        match = pattern.match(rest)
        if match and not (factor == "magnitude" and match.group(1).endswith(".to_out")):
            return match.group(1), DIFFUSERS, factor
    return None


# Key spellings of the diffusers family, each ``rest → (module path, format name, factor) | None``; they never match
# the same key. A file may mix them, and the commonest names its format.
KEY_SPELLINGS: tuple[Callable[[str], tuple[str, str, str] | None], ...] = (_match_peft_key, legacy.match_key)


def claims(keys: Iterable[str]) -> bool:
    """diffusers reads whatever no other dialect claimed (and says so when it finds no key it knows)."""
    return True


def _split_component(key: str) -> tuple[str, str] | None:
    key = key.removeprefix("base_model.model.")
    component, _, rest = key.partition(".")
    if component in COMPONENTS:
        return component, rest.removeprefix("text_model.")
    if key.startswith(("down_blocks.", "mid_block.", "up_blocks.")):
        return "unet", key  # the oldest diffusers files carry no component prefix
    return None


def _classify(key: str) -> tuple[str, str, str] | None:
    """``(canonical module key, format, 'down'|'up'|'alpha')`` for a key difflora understands, else ``None``."""
    located = _split_component(key)
    if located is None:
        return None
    component, rest = located
    for spelling in KEY_SPELLINGS:
        matched = spelling(rest)
        if matched:
            path, format_name, factor = matched
            return f"{component}.{path}", format_name, factor
    alpha = _ALPHA.match(rest)
    if alpha:
        return f"{component}.{alpha.group(1)}", "", "alpha"
    return None


def _diffusers_alpha(config: dict, module_key: str, rank: int, source: str) -> tuple[float, bool] | None:
    """Alpha and rsLoRA flag of one module from a diffusers/PEFT LoraConfig dict, as PEFT itself resolves them.

    Raises:
        AdapterFileError: an ``alpha_pattern`` that is not a mapping of regular expressions, or an alpha that is not a
            number (its range is checked with the factors).
    """
    from peft.utils.other import get_pattern_key

    if not config:
        return None
    alpha_pattern = config.get("alpha_pattern") or {}
    alpha = config.get("lora_alpha")
    if not isinstance(alpha_pattern, dict):
        raise AdapterFileError(
            f"{source}: LoraConfig alpha_pattern is a {type(alpha_pattern).__name__}, not a mapping of patterns"
        )
    path = module_key.partition(".")[2]
    # Text-encoder patterns written with transformers 4 carry the `text_model.` prefix our paths drop.
    for candidate in (path, f"text_model.{path}") if alpha_pattern else ():
        try:
            pattern = get_pattern_key(list(alpha_pattern), candidate)
        except re.error as error:
            raise AdapterFileError(
                f"{source}: LoraConfig alpha_pattern has a key that is not a regular expression ({error})"
            ) from None
        if pattern in alpha_pattern:
            alpha = alpha_pattern[pattern]
            break
    if alpha is None:
        alpha = rank
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise AdapterFileError(f"{source}: module {module_key!r} has LoraConfig alpha {alpha!r:.40}, not a number")
    return float(alpha), _config_flag(config, "use_rslora", source)


def _config_flag(config: dict, option: str, source: str) -> bool:
    """A LoraConfig switch (``use_rslora``, ``use_dora``; absent: false): a JSON boolean, or the text true/false (any
    case) some exporters write; any other value (``"no"``, 0, null) is refused rather than guessed (``bool("false")``
    is True)."""
    value = config.get(option, False)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise AdapterFileError(f"{source}: LoraConfig {option} is {value!r:.40}, expected true or false")


def _check_dora_switch(factors: dict[str, dict[str, torch.Tensor]], configs: dict[str, dict], source: str) -> None:
    """Every module of a component has a DoRA magnitude or none has, as its LoraConfig's ``use_dora`` says when the
    file carries one: PEFT and diffusers build a magnitude for every module of a ``use_dora`` config (from the base
    weight, where the file has none) and ignore magnitudes otherwise, so a file that disagrees with itself is applied
    by no tool as written.

    Raises:
        AdapterFileError: naming the first module out of step and what its LoraConfig or its component says.
    """
    by_component: dict[str, dict[str, bool]] = collections.defaultdict(dict)
    for module_key in sorted(factors):
        by_component[module_key.partition(".")[0]][module_key] = "magnitude" in factors[module_key]
    for component, has_magnitude in by_component.items():
        config = configs.get(component, {})
        declared = _config_flag(config, "use_dora", source) if "use_dora" in config else None
        with_magnitude = [key for key, has in has_magnitude.items() if has]
        without = [key for key, has in has_magnitude.items() if not has]
        if declared is False and with_magnitude:
            raise AdapterFileError(f"{source}: module {with_magnitude[0]!r} has a DoRA magnitude "
                                   "(lora_magnitude_vector), but its LoraConfig says use_dora false")
        if without and (declared or with_magnitude):
            others = len(with_magnitude)
            reason = ("its LoraConfig says use_dora true" if declared
                      else f"{others} other module{'s' if others != 1 else ''} of {component} "
                           f"{'have' if others != 1 else 'has'} one")
            raise AdapterFileError(
                f"{source}: module {without[0]!r} has no DoRA magnitude (lora_magnitude_vector), but {reason}"
            )


def _component_configs(header: dict[str, str], source: str) -> dict[str, dict]:
    """Per-component LoraConfig dicts from diffusers' ``lora_adapter_metadata`` header entry.

    Raises:
        AdapterFileError: the entry is not a JSON object; one line naming ``source``.
    """
    raw = header.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as error:
        raise AdapterFileError(f"{source}: header entry {DIFFUSERS_METADATA_KEY!r} is not JSON ({error})") from None
    if not isinstance(flat, dict):
        raise AdapterFileError(
            f"{source}: header entry {DIFFUSERS_METADATA_KEY!r} is not a JSON object (got {type(flat).__name__})"
        )
    configs: dict[str, dict] = collections.defaultdict(dict)
    for key, value in flat.items():
        component, _, option = key.partition(".")
        configs[component][option] = value
    return dict(configs)


@dataclass
class _SortedKeys:
    """A state dict's keys sorted out: factors per module, alphas from ``.alpha`` keys, how many factors each format
    gave, and the keys difflora cannot apply (reported, never dropped silently)."""

    factors: dict[str, dict[str, torch.Tensor]] = field(default_factory=lambda: collections.defaultdict(dict))
    alphas: dict[str, float] = field(default_factory=dict)
    formats: collections.Counter = field(default_factory=collections.Counter)
    skipped: list[str] = field(default_factory=list)
    withheld: int = 0  # LoRA modules skipped whole because they hold more than LoRA factors


def _owner(key: str) -> str | None:
    """The module key of a LoRA module a key belongs to by its spelling (``<path>.lora_magnitude_vector[.weight]``,
    ``<path>.lora_B.bias``, …: what PEFT writes beside ``lora_A``/``lora_B`` for DoRA, LoRA biases and the like),
    else ``None``."""
    located = _split_component(key)
    if located is None or ".lora_" not in located[1]:
        return None
    component, rest = located
    return f"{component}.{rest.partition('.lora_')[0]}"


def _sort_keys(tensors: dict[str, torch.Tensor], source: str) -> _SortedKeys:
    keys = _SortedKeys()
    module_keys: dict[str, list[str]] = collections.defaultdict(list)
    for key, tensor in tensors.items():
        classified = _classify(key)
        if classified is None:
            keys.skipped.append(key)
            continue
        module_key, format_name, factor = classified
        if factor == "alpha":
            keys.alphas[module_key] = alpha_value(source, module_key, tensor)
            continue
        keys.formats[format_name] += 1
        keys.factors[module_key][factor] = tensor
        module_keys[module_key].append(key)
    # A module that holds more than its LoRA factors (a DoRA magnitude, a LoRA bias) is another update than its
    # factors alone: every key of it is skipped rather than applied wrongly.
    for owner in {_owner(key) for key in keys.skipped} & set(keys.factors):
        del keys.factors[owner]
        keys.withheld += 1
        keys.skipped += module_keys[owner]
        for key in module_keys[owner]:
            keys.formats[_classify(key)[1]] -= 1
    return keys


def read_state_dict(tensors: dict[str, torch.Tensor], header: dict[str, str], source: str) -> AdapterState:
    """An :class:`AdapterState` from keys in the diffusers family's spellings (see :data:`KEY_SPELLINGS`).

    Raises:
        AdapterFileError: no key in a spelling difflora reads, a module without its up or down factor, factors whose
            shapes do not fit, an alpha that is not one number, or a ``lora_adapter_metadata`` header entry that is
            not a JSON object (or holds a LoraConfig difflora cannot read).
    """
    keys = _sort_keys(tensors, source)
    if not keys.factors and keys.withheld:
        raise AdapterFileError(
            f"{source}: holds no LoRA module difflora can apply ({len(keys.skipped)} keys skipped, "
            f"first: {keys.skipped[0]!r})"
        )
    if not tensors:
        raise AdapterFileError(f"{source}: holds no tensors")
    if not keys.factors:
        raise AdapterFileError(
            f"{source}: no LoRA keys in a format difflora reads (first key: {next(iter(tensors))!r})"
        )
    configs = _component_configs(header, source)
    modules: dict[str, LoRAModuleWeights] = {}
    for module_key in sorted(keys.factors):
        parts = keys.factors[module_key]
        down, up, _ = require_factors(source, module_key, parts)
        rank = down.shape[0]
        component = module_key.partition(".")[0]
        use_rslora = False
        if module_key in keys.alphas:
            alpha = keys.alphas[module_key]
        else:
            resolved = _diffusers_alpha(configs.get(component, {}), module_key, rank, source)
            alpha, use_rslora = resolved if resolved else (float(rank), False)
        magnitude = magnitude_as_read(parts["magnitude"], up.shape[0]) if "magnitude" in parts else None
        modules[module_key] = LoRAModuleWeights(down=down, up=up, alpha=alpha, use_rslora=use_rslora,
                                                dora_scale=magnitude)
    _check_dora_switch(keys.factors, configs, source)

    format_name = (+keys.formats).most_common(1)[0][0]
    if format_name == DIFFUSERS and header.get("difflora.format"):
        format_name = "difflora"
    metadata = {key: value for key, value in header.items() if key not in ("format", DIFFUSERS_METADATA_KEY)}
    return AdapterState(modules=modules, metadata=metadata, source_format=format_name, skipped=keys.skipped)


# ----- writing ------------------------------------------------------------------------------------------------------


def to_diffusers_state_dict(state: AdapterState) -> dict[str, torch.Tensor]:
    """The tensors of the diffusers layout: ``<component>.<path>.lora_A.weight`` / ``.lora_B.weight``, 4-D on a
    Conv2d as PEFT's conv LoRA holds them (A rank × in × kh × kw, B out × rank × 1 × 1), and a DoRA magnitude
    (:func:`~._common.peft_magnitude`, :func:`~._common.magnitude_key`); a Tucker core is folded into A
    (:func:`~._common.factors_without_core`)."""
    tensors = {}
    for module_key, weights in state.modules.items():
        component, _, path = module_key.partition(".")
        prefix = f"{component}.{file_module_path(component, path)}"
        down, up = factors_without_core(weights)
        tensors[f"{prefix}.lora_A.weight"] = down.detach().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = up.detach().contiguous()
        magnitude = peft_magnitude(weights)
        if magnitude is not None:
            tensors[magnitude_key(component, prefix)] = magnitude
    return tensors


def _component_config(modules: dict[str, LoRAModuleWeights]) -> dict[str, object]:
    """The LoraConfig of one component (module path → weights) under which PEFT gives every module its scale."""
    use_rslora = all(weights.use_rslora for weights in modules.values())

    rank = collections.Counter(w.rank for w in modules.values()).most_common(1)[0][0]
    alphas = {path: w.alpha_for(use_rslora) for path, w in modules.items()}
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {path: w.rank for path, w in modules.items() if w.rank != rank},
        "alpha_pattern": {path: module_alpha for path, module_alpha in alphas.items() if module_alpha != alpha},
        # Full module paths: PEFT then adapts exactly the modules the file holds.
        "target_modules": sorted(modules),
        "use_rslora": use_rslora,
        # PEFT's DoRA is all of a config's modules or none (AdapterState.lora_only_problem checks it before writing).
        "use_dora": any(w.dora_scale is not None for w in modules.values()),
        "lora_bias": False,
        "init_lora_weights": True,
    }


def diffusers_lora_metadata(state: AdapterState) -> dict[str, object]:
    """diffusers' per-component LoraConfig (flattened as ``<component>.<option>``) that reproduces every scale."""
    by_component: dict[str, dict[str, LoRAModuleWeights]] = collections.defaultdict(dict)
    for module_key, weights in state.modules.items():
        component, _, path = module_key.partition(".")
        by_component[component][path] = weights
    flat: dict[str, object] = {}
    for component, modules in by_component.items():
        flat.update({f"{component}.{option}": value for option, value in _component_config(modules).items()})
    return flat


def file_contents(state: AdapterState, title: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a diffusers-layout file and its header entry (``title`` is not written in this layout)."""
    header = {DIFFUSERS_METADATA_KEY: json.dumps(diffusers_lora_metadata(state), sort_keys=True)}
    return to_diffusers_state_dict(state), header
