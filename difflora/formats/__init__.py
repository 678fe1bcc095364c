"""Adapter files: the in-memory adapter, and reading and writing ``.safetensors`` LoRA files.

In memory an adapter is an :class:`AdapterState`: for each adapted projection, its ``down`` (rank × in) and ``up``
(out × rank) factors and its ``alpha``. Projections are named by a canonical key
``<component>.<block path>.<projection>``, e.g. ``unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k`` or
``text_encoder.encoder.layers.0.self_attn.q_proj`` (text-encoder paths drop the ``text_model.`` prefix, which recent
transformers removed and older files carry).

Files difflora reads (detected from the keys):

* ``difflora`` / ``diffusers``: ``unet.<path>.lora_A.weight`` / ``.lora_B.weight`` (what ``save_lora_weights`` and
  diffusers' training scripts write), alphas from diffusers' ``lora_adapter_metadata`` header or ``.alpha`` keys;
* ``diffusers-old``: ``<path>.lora.down.weight`` / ``.lora.up.weight`` (diffusers 0.2x);
* ``diffusers-attn-procs``: the legacy attention-processor keys ``<path>.processor.to_q_lora.down.weight``, and the
  text-encoder ``<path>.lora_linear_layer.down.weight``.

difflora writes the ``diffusers`` layout with diffusers' ``lora_adapter_metadata`` header (rank and alpha per module),
so that plain ``StableDiffusionPipeline.load_lora_weights`` applies it at the right scale, plus ``difflora.*`` keys.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .._files import atomic_directory, atomic_path
from ..errors import AdapterFileError
from ..adapter import AdapterState, LoRAModuleWeights
from ..keys import COMPONENTS, PICKLE_SUFFIXES, split_module_key

__all__ = [
    "read_adapter",
    "parse_state_dict",
    "write_adapter",
    "to_diffusers_state_dict",
    "to_kohya_state_dict",
    "kohya_metadata",
    "WRITE_LAYOUTS",
    "write_peft_folder",
]

DIFFLORA_FORMAT_VERSION = "1"
# diffusers reads its LoraConfig per component from this safetensors header key.
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"


# ----- reading ------------------------------------------------------------------------------------------------------

# (pattern on a key with its component prefix removed, format name, factor); group 1 is the module path.
_FACTOR_PATTERNS = [
    (re.compile(r"^(.+)\.lora_A(?:\.[A-Za-z0-9_-]+)?\.weight$"), "diffusers", "down"),
    (re.compile(r"^(.+)\.lora_B(?:\.[A-Za-z0-9_-]+)?\.weight$"), "diffusers", "up"),
    (re.compile(r"^(.+)\.lora\.down\.weight$"), "diffusers-old", "down"),
    (re.compile(r"^(.+)\.lora\.up\.weight$"), "diffusers-old", "up"),
    (re.compile(r"^(.+)\.lora_linear_layer\.down\.weight$"), "diffusers-attn-procs", "down"),
    (re.compile(r"^(.+)\.lora_linear_layer\.up\.weight$"), "diffusers-attn-procs", "up"),
]
_LEGACY_PROCESSOR = re.compile(r"^(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_ALPHA = re.compile(r"^(.+)\.alpha$")


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
    legacy = _LEGACY_PROCESSOR.match(rest)
    if legacy:
        block, projection, factor = legacy.groups()
        projection = "to_out.0" if projection == "to_out" else projection
        return f"{component}.{block}.{projection}", "diffusers-attn-procs", factor
    for pattern, format_name, factor in _FACTOR_PATTERNS:
        match = pattern.match(rest)
        if match:
            return f"{component}.{match.group(1)}", format_name, factor
    alpha = _ALPHA.match(rest)
    if alpha:
        return f"{component}.{alpha.group(1)}", "", "alpha"
    return None


def _check_factor_shapes(source: str, module_key: str, down: torch.Tensor, up: torch.Tensor) -> None:
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0] or down.shape[0] == 0:
        raise AdapterFileError(
            f"{source}: module {module_key!r} has factors of shapes {tuple(down.shape)} and {tuple(up.shape)}, "
            "expected down (rank × in) and up (out × rank)"
        )


def _diffusers_alpha(config: dict, path: str, rank: int) -> tuple[float, bool] | None:
    """Alpha and rsLoRA flag of one module from a diffusers/PEFT LoraConfig dict, as PEFT itself resolves them."""
    from peft.utils.other import get_pattern_key

    if not config:
        return None
    alpha_pattern = config.get("alpha_pattern") or {}
    alpha = config.get("lora_alpha")
    if alpha_pattern:
        # Text-encoder patterns written with transformers 4 carry the `text_model.` prefix our paths drop.
        for candidate in (path, f"text_model.{path}"):
            pattern = get_pattern_key(list(alpha_pattern), candidate)
            if pattern in alpha_pattern:
                alpha = alpha_pattern[pattern]
                break
    if alpha is None:
        alpha = rank
    return float(alpha), bool(config.get("use_rslora", False))


def _component_configs(header: dict[str, str]) -> dict[str, dict]:
    """Per-component LoraConfig dicts from diffusers' ``lora_adapter_metadata`` header entry."""
    raw = header.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as error:
        raise AdapterFileError(f"header entry {DIFFUSERS_METADATA_KEY!r} is not JSON ({error})") from None
    configs: dict[str, dict] = collections.defaultdict(dict)
    for key, value in flat.items():
        component, _, option = key.partition(".")
        configs[component][option] = value
    return dict(configs)


def parse_state_dict(
    tensors: dict[str, torch.Tensor], header: dict[str, str] | None = None, source: str = "state dict"
) -> AdapterState:
    """Turn a LoRA state dict (and its safetensors header) into an :class:`AdapterState`.

    Raises:
        AdapterFileError: when no key is in a format difflora reads, or a module lacks its up or down factor.
    """
    header = dict(header or {})
    if any(key.startswith(_KOHYA_PREFIXES) for key in tensors):
        return _parse_kohya(tensors, header, source)
    factors: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    alphas: dict[str, float] = {}
    formats: collections.Counter = collections.Counter()
    skipped: list[str] = []
    for key, tensor in tensors.items():
        classified = _classify(key)
        if classified is None:
            skipped.append(key)
            continue
        module_key, format_name, factor = classified
        if factor == "alpha":
            alphas[module_key] = float(tensor.item())
            continue
        try:
            split_module_key(module_key)
        except AdapterFileError:
            skipped.append(key)
            continue
        formats[format_name] += 1
        factors[module_key][factor] = tensor
    if not factors:
        raise AdapterFileError(f"{source}: no LoRA keys in a format difflora reads (first key: {next(iter(tensors), 'none')!r})")

    configs = _component_configs(header)
    modules: dict[str, LoRAModuleWeights] = {}
    for module_key in sorted(factors):
        pair = factors[module_key]
        if set(pair) != {"down", "up"}:
            missing = "up" if "down" in pair else "down"
            raise AdapterFileError(f"{source}: module {module_key!r} has no {missing} factor")
        down, up = pair["down"], pair["up"]
        _check_factor_shapes(source, module_key, down, up)
        rank = down.shape[0]
        component, _, path = module_key.partition(".")
        use_rslora = False
        if module_key in alphas:
            alpha = alphas[module_key]
        else:
            resolved = _diffusers_alpha(configs.get(component, {}), path, rank)
            alpha, use_rslora = resolved if resolved else (float(rank), False)
        modules[module_key] = LoRAModuleWeights(down=down, up=up, alpha=alpha, use_rslora=use_rslora)

    format_name = formats.most_common(1)[0][0]
    if format_name == "diffusers" and header.get("difflora.format"):
        format_name = "difflora"
    metadata = {key: value for key, value in header.items() if key not in ("format", DIFFUSERS_METADATA_KEY)}
    return AdapterState(modules=modules, metadata=metadata, source_format=format_name, skipped=skipped)


# ----- kohya / A1111 / ComfyUI ---------------------------------------------------------------------------------------

_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_KOHYA_KEY = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
# kohya flattens module paths with underscores; these patterns put the dots back for the modules difflora adapts.
_KOHYA_UNET_MODULE = re.compile(
    r"^(?:(down_blocks|up_blocks)_(\d+)_|(mid_block)_)attentions_(\d+)_transformer_blocks_(\d+)_(attn1|attn2)_"
    r"(to_q|to_k|to_v|to_out_0)$"
)
# SDXL files name UNet blocks in the original layout: input_blocks_I_1 / middle_block_1 / output_blocks_J_1 hold the
# attention of down block (I-1)//3 (layer (I-1)%3), the mid block, and up block J//3 (attention J%3): SDXL has
# two layers per down block plus a downsampler (three slots) and three per up block.
_KOHYA_SDXL_UNET_MODULE = re.compile(
    r"^(?:(input_blocks|output_blocks)_(\d+)_1|(middle_block)_1)_transformer_blocks_(\d+)_(attn1|attn2)_"
    r"(to_q|to_k|to_v|to_out_0)$"
)
_SDXL_SLOTS_PER_BLOCK = 3
_KOHYA_TEXT_MODULE = re.compile(r"^(?:text_model_)?encoder_layers_(\d+)_self_attn_(q_proj|k_proj|v_proj|out_proj)$")
_KOHYA_COMPONENT = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}


def _kohya_module_key(prefix: str, name: str) -> str | None:
    """``lora_unet_down_blocks_0_…_attn1_to_q`` → ``unet.down_blocks.0.….attn1.to_q``; ``None`` for other modules."""
    component = _KOHYA_COMPONENT[prefix]
    if component == "unet":
        match = _KOHYA_UNET_MODULE.match(name)
        if not match:
            return _kohya_sdxl_module_key(name)
        kind, index, mid, attention, block, attn, projection = match.groups()
        where = f"{kind}.{index}" if kind else mid
        projection = "to_out.0" if projection == "to_out_0" else projection
        return f"unet.{where}.attentions.{attention}.transformer_blocks.{block}.{attn}.{projection}"
    match = _KOHYA_TEXT_MODULE.match(name)
    if not match:
        return None
    layer, projection = match.groups()
    return f"{component}.encoder.layers.{layer}.self_attn.{projection}"


def _kohya_sdxl_module_key(name: str) -> str | None:
    """``input_blocks_4_1_transformer_blocks_0_attn1_to_q`` → ``unet.down_blocks.1.attentions.0.…``; else ``None``."""
    match = _KOHYA_SDXL_UNET_MODULE.match(name)
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


def _parse_kohya(tensors: dict[str, torch.Tensor], header: dict[str, str], source: str) -> AdapterState:
    """kohya sd-scripts / A1111 / ComfyUI LoRA: ``lora_unet_…`` and ``lora_te_…`` with ``.lora_down``, ``.lora_up``
    and ``.alpha`` (scale = alpha / rank; alpha = rank when absent). Other modules and LyCORIS keys are reported in
    ``skipped``."""
    factors: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    skipped = []
    for key, tensor in tensors.items():
        match = _KOHYA_KEY.match(key)
        module_key = _kohya_module_key(match.group(1), match.group(2)) if match else None
        if module_key is None or (match.group(3) != "alpha" and tensor.ndim != 2):
            skipped.append(key)  # conv LoRA (4-D), LoHa/LoKr, feed-forward and projection modules
            continue
        factors[module_key][{"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[match.group(3)]] = tensor
    modules = {}
    for module_key in sorted(factors):
        parts = factors[module_key]
        if "down" not in parts or "up" not in parts:
            raise AdapterFileError(f"{source}: module {module_key!r} has no {'up' if 'down' in parts else 'down'} factor")
        _check_factor_shapes(source, module_key, parts["down"], parts["up"])
        alpha = float(parts["alpha"].item()) if "alpha" in parts else float(parts["down"].shape[0])
        modules[module_key] = LoRAModuleWeights(down=parts["down"], up=parts["up"], alpha=alpha)
    if not modules:
        raise AdapterFileError(f"{source}: kohya file holds no attention LoRA difflora can apply ({len(skipped)} keys skipped)")
    metadata = {key: value for key, value in header.items() if key != "format"}
    return AdapterState(modules=modules, metadata=metadata, source_format="kohya", skipped=skipped)


def _kohya_name(module_key: str) -> str:
    component, _, path = module_key.partition(".")
    prefix = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}[component]
    return f"{prefix}_{_file_module_path(component, path).replace('.', '_')}"


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
        tensors[f"{name}.alpha"] = torch.tensor(weights.scale * weights.rank, dtype=torch.float32)
    return tensors


def kohya_metadata(state: AdapterState, title: str = "difflora adapter") -> dict[str, str]:
    """kohya's ``ss_*`` keys and the ``modelspec.*`` keys A1111 and ComfyUI show."""
    ranks = collections.Counter(w.rank for w in state.modules.values())
    alphas = collections.Counter(w.scale * w.rank for w in state.modules.values())
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


# ----- files and folders -------------------------------------------------------------------------------------------

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types and OSError for truncated/corrupt files
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise AdapterFileError(f"{path}: not a readable safetensors file ({reason})") from None
    return tensors, header


def _guess_component(tensors: dict[str, torch.Tensor]) -> str:
    keys = " ".join(tensors)
    return "unet" if ("down_blocks." in keys or "mid_block." in keys or "up_blocks." in keys) else "text_encoder"


def _read_peft_folder(folder: Path, component: str | None = None) -> AdapterState:
    """A PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``), honouring its
    ``rank_pattern``, ``alpha_pattern`` and ``use_rslora``."""
    config_path = folder / PEFT_CONFIG_FILE
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise AdapterFileError(f"{config_path}: not a readable PEFT config ({str(error).splitlines()[0]})") from None
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterFileError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA")
    weights_path = folder / PEFT_WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterFileError(f"{folder}: PEFT folder has no {PEFT_WEIGHTS_FILE}")
    tensors, header = _read_safetensors(weights_path)
    component = component or _guess_component(tensors)
    prefixed = {f"{component}.{key.removeprefix('base_model.model.')}": value for key, value in tensors.items()}
    header[DIFFUSERS_METADATA_KEY] = json.dumps({f"{component}.{option}": value for option, value in config.items()})
    state = parse_state_dict(prefixed, header, source=str(folder))
    state.source_format = "peft"
    state.metadata.pop(DIFFUSERS_METADATA_KEY, None)
    return state


def _read_folder(folder: Path) -> AdapterState:
    if (folder / PEFT_CONFIG_FILE).is_file():
        return _read_peft_folder(folder)
    parts = [component for component in COMPONENTS if (folder / component / PEFT_CONFIG_FILE).is_file()]
    if parts:  # difflora's PEFT export: one PEFT folder per pipeline component
        states = [_read_peft_folder(folder / component, component) for component in parts]
        merged = AdapterState(modules={}, source_format="peft")
        for state in states:
            merged.modules.update(state.modules)
            merged.metadata.update(state.metadata)
            merged.skipped += state.skipped
        return merged
    if (folder / DIFFUSERS_WEIGHTS_FILE).is_file():  # what diffusers' training scripts write
        tensors, header = _read_safetensors(folder / DIFFUSERS_WEIGHTS_FILE)
        return parse_state_dict(tensors, header, source=str(folder / DIFFUSERS_WEIGHTS_FILE))
    raise AdapterFileError(f"{folder}: folder holds no {DIFFUSERS_WEIGHTS_FILE}, {PEFT_CONFIG_FILE} or per-component PEFT folders")


def read_adapter(path: str | os.PathLike) -> AdapterState:
    """Read an adapter: a LoRA ``.safetensors`` file in any layout difflora reads, a PEFT adapter folder, difflora's
    per-component PEFT export, or a diffusers LoRA output folder.

    Raises:
        AdapterFileError: missing file, a pickle file (refused: safetensors only), a truncated or corrupt file, or keys
            in no format difflora reads. The message is one line and names the file.
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterFileError(f"{path}: pickle files ({path.suffix}) are refused, safetensors only; convert it to .safetensors")
    if not path.exists():
        raise AdapterFileError(f"{path}: no such file")
    if path.is_dir():
        return _read_folder(path)
    tensors, header = _read_safetensors(path)
    return parse_state_dict(tensors, header, source=str(path))


# ----- writing ------------------------------------------------------------------------------------------------------


def _file_module_path(component: str, path: str) -> str:
    # Text encoders are written with transformers' historical `text_model.` prefix, which every diffusers version
    # reads (recent ones strip it) while older ones require it.
    return f"text_model.{path}" if component.startswith("text_encoder") else path


def to_diffusers_state_dict(state: AdapterState) -> dict[str, torch.Tensor]:
    """The tensors of the diffusers layout: ``<component>.<path>.lora_A.weight`` / ``.lora_B.weight``."""
    tensors = {}
    for module_key, weights in state.modules.items():
        component, _, path = module_key.partition(".")
        prefix = f"{component}.{_file_module_path(component, path)}"
        tensors[f"{prefix}.lora_A.weight"] = weights.down.detach().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = weights.up.detach().contiguous()
    return tensors


def diffusers_lora_metadata(state: AdapterState) -> dict[str, object]:
    """diffusers' per-component LoraConfig (flattened as ``<component>.<option>``) that reproduces every scale."""
    by_component: dict[str, dict[str, LoRAModuleWeights]] = collections.defaultdict(dict)
    for module_key, weights in state.modules.items():
        component, _, path = module_key.partition(".")
        by_component[component][path] = weights
    flat: dict[str, object] = {}
    for component, modules in by_component.items():
        use_rslora = all(weights.use_rslora for weights in modules.values())

        def alpha_for(weights: LoRAModuleWeights) -> float:
            # A module whose rsLoRA flag differs from the component's gets the alpha that gives the same scale.
            if weights.use_rslora == use_rslora:
                return weights.alpha
            return weights.scale * (math.sqrt(weights.rank) if use_rslora else weights.rank)

        rank = collections.Counter(w.rank for w in modules.values()).most_common(1)[0][0]
        alpha = collections.Counter(alpha_for(w) for w in modules.values()).most_common(1)[0][0]
        config = {
            "r": rank,
            "lora_alpha": alpha,
            "rank_pattern": {path: w.rank for path, w in modules.items() if w.rank != rank},
            "alpha_pattern": {path: alpha_for(w) for path, w in modules.items() if alpha_for(w) != alpha},
            # Full module paths: PEFT then adapts exactly the modules the file holds.
            "target_modules": sorted(modules),
            "use_rslora": use_rslora,
            "use_dora": False,
            "lora_bias": False,
            "init_lora_weights": True,
        }
        flat.update({f"{component}.{option}": value for option, value in config.items()})
    return flat


WRITE_LAYOUTS = ("difflora", "diffusers", "kohya")


def write_adapter(
    state: AdapterState, path: str | os.PathLike, metadata: dict[str, str] | None = None, layout: str = "difflora"
) -> Path:
    """Write ``state`` to one ``.safetensors`` file atomically (temporary file, then rename).

    ``layout``: ``difflora`` and ``diffusers`` write diffusers' keys with its ``lora_adapter_metadata`` header (so
    plain diffusers applies the right scales); ``kohya`` writes ``lora_unet_…``/``lora_te_…`` keys with each module's
    real ``.alpha`` and kohya's ``ss_*`` and ``modelspec.*`` header keys, for A1111, ComfyUI and kohya's tools.
    Every layout also carries difflora's keys: ``difflora.format``, ``difflora.version``, ``difflora.ranks``,
    ``difflora.alphas``, ``difflora.targets`` and anything in ``state.metadata`` or ``metadata``.
    """
    from .. import __version__

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise AdapterFileError(f"{path}: adapters are written as .safetensors; give a path ending in .safetensors")
    if layout not in WRITE_LAYOUTS:
        raise AdapterFileError(f"{path}: layout {layout!r} is not one of {', '.join(WRITE_LAYOUTS)}")
    if not state.modules:
        raise AdapterFileError(f"{path}: the adapter has no modules; nothing to write")
    targets = collections.defaultdict(set)
    for module_key in state.modules:
        component, _, projection = split_module_key(module_key)
        targets[component].add(projection)
    header = {key: str(value) for key, value in state.metadata.items()}
    header.update({key: str(value) for key, value in (metadata or {}).items()})
    header.update(
        {
            "format": "pt",
            DIFFUSERS_METADATA_KEY: json.dumps(diffusers_lora_metadata(state), sort_keys=True),
            "difflora.format": DIFFLORA_FORMAT_VERSION,
            "difflora.version": __version__,
            "difflora.ranks": json.dumps(state.ranks()),
            "difflora.alphas": json.dumps(state.alphas()),
            "difflora.targets": json.dumps({component: sorted(names) for component, names in sorted(targets.items())}),
        }
    )
    if layout == "kohya":
        header.pop(DIFFUSERS_METADATA_KEY)
        header.update(kohya_metadata(state, title=path.stem))
        tensors = to_kohya_state_dict(state)
    else:
        tensors = to_diffusers_state_dict(state)
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=header)
    return path


def write_peft_folder(state: AdapterState, folder: str | os.PathLike) -> Path:
    """Write ``state`` as one PEFT adapter folder per component (``FOLDER/unet``, ``FOLDER/text_encoder``), each with
    ``adapter_config.json`` (rank, alpha, rank/alpha patterns, exact target modules) and
    ``adapter_model.safetensors``, loadable with ``peft.PeftModel.from_pretrained(pipe.unet, FOLDER / "unet")``.

    The folder is built beside ``folder`` and renamed into place, so a failure leaves nothing behind.
    """
    from .. import __version__

    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise AdapterFileError(f"{folder}: exists; give a new folder for the PEFT output")
    if not state.modules:
        raise AdapterFileError(f"{folder}: the adapter has no modules; nothing to write")
    with atomic_directory(folder) as staging:
        flat = diffusers_lora_metadata(state)
        for component in sorted({key.split(".", 1)[0] for key in state.modules}):
            config = {option.split(".", 1)[1]: value for option, value in flat.items() if option.startswith(component + ".")}
            config.update({"peft_type": "LORA", "task_type": None, "base_model_name_or_path": state.metadata.get("difflora.base_model"),
                           "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True})
            tensors = {}
            for module_key, weights in state.modules.items():
                if module_key.startswith(component + "."):
                    path = module_key.split(".", 1)[1]
                    tensors[f"base_model.model.{path}.lora_A.weight"] = weights.down.detach().contiguous()
                    tensors[f"base_model.model.{path}.lora_B.weight"] = weights.up.detach().contiguous()
            (staging / component).mkdir()
            (staging / component / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
            save_file(tensors, str(staging / component / PEFT_WEIGHTS_FILE), metadata={"format": "pt", "difflora.version": __version__})
    return folder
