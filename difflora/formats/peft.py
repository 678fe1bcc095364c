"""PEFT adapter folders: ``adapter_config.json`` (a LoraConfig) beside ``adapter_model.safetensors`` with
``base_model.model.<path>.lora_A.weight`` / ``.lora_B.weight`` keys, one folder per model.

difflora reads such a folder (honouring ``rank_pattern``, ``alpha_pattern`` and ``use_rslora``) and its own export:
one PEFT folder per pipeline component (``FOLDER/unet``, ``FOLDER/text_encoder``), each loadable with
``peft.PeftModel.from_pretrained(pipe.unet, FOLDER / "unet")``. Any Linear or Conv2d is adapted (PEFT's conv LoRA:
``lora_A`` rank × in × kh × kw, ``lora_B`` out × rank × 1 × 1; a Tucker core is folded into ``lora_A``), and DoRA
(``use_dora``: ``lora_magnitude_vector`` per output row, read and written as :mod:`.diffusers` describes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import _version
from .._files import atomic_directory
from ..adapter import AdapterState
from ..errors import AdapterFileError, first_line
from ..keys import COMPONENTS
from . import diffusers
from ._common import factors_without_core, file_module_path, magnitude_key, peft_magnitude, read_safetensors

__all__ = ["PEFT", "PEFT_CONFIG_FILE", "PEFT_WEIGHTS_FILE", "holds_folder", "read_folder", "write_peft_folder"]

PEFT = "peft"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"

# ----- reading ------------------------------------------------------------------------------------------------------


def _component_folders(folder: Path) -> list[str]:
    """The components of difflora's PEFT export in ``folder`` (one PEFT folder each)."""
    return [component for component in COMPONENTS if (folder / component / PEFT_CONFIG_FILE).is_file()]


def holds_folder(folder: Path) -> bool:
    """Whether ``folder`` is a PEFT adapter folder or difflora's per-component PEFT export."""
    return (folder / PEFT_CONFIG_FILE).is_file() or bool(_component_folders(folder))


# Top-level layers of a diffusers UNet: a PEFT folder whose keys hold one of them adapts a UNet.
_UNET_MARKERS = (
    "down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "time_embedding.", "add_embedding."
)


def _guess_component(tensors: dict[str, torch.Tensor]) -> str:
    keys = [key.removeprefix("base_model.model.") for key in tensors]
    return "unet" if any(key.startswith(_UNET_MARKERS) for key in keys) else "text_encoder"


def _read_one(folder: Path, component: str | None = None) -> AdapterState:
    """One PEFT adapter folder; its LoraConfig goes to the diffusers reader as the header entry diffusers writes."""
    config_path = folder / PEFT_CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: not JSON, or not UTF-8 text
        raise AdapterFileError(f"{config_path}: not a readable PEFT config ({first_line(error)})") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{config_path}: not a PEFT config (a JSON object), got a {type(config).__name__}")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterFileError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA")
    weights_path = folder / PEFT_WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterFileError(f"{folder}: PEFT folder has no {PEFT_WEIGHTS_FILE}")
    tensors, header = read_safetensors(weights_path)
    component = component or _guess_component(tensors)
    prefixed = {f"{component}.{key.removeprefix('base_model.model.')}": value for key, value in tensors.items()}
    flat_config = {f"{component}.{option}": value for option, value in config.items()}
    header[diffusers.DIFFUSERS_METADATA_KEY] = json.dumps(flat_config)
    state = diffusers.read_state_dict(prefixed, header, source=str(folder))
    state.source_format = PEFT
    state.metadata.pop(diffusers.DIFFUSERS_METADATA_KEY, None)
    return state


def read_folder(folder: Path) -> AdapterState:
    """A PEFT adapter folder, or difflora's export (one PEFT folder per component) as one adapter.

    Raises:
        AdapterFileError: an unreadable config, a PEFT type other than LORA, no weights file, or weights difflora
            cannot read; one line naming the file or folder.
    """
    if (folder / PEFT_CONFIG_FILE).is_file():
        return _read_one(folder)
    states = [_read_one(folder / component, component) for component in _component_folders(folder)]
    merged = AdapterState(modules={}, source_format=PEFT)
    for state in states:
        merged.modules.update(state.modules)
        merged.metadata.update(state.metadata)
        merged.skipped += state.skipped
    return merged


# ----- writing ------------------------------------------------------------------------------------------------------


def _peft_config(flat: dict[str, object], component: str, base_model: str | None) -> dict[str, object]:
    """``adapter_config.json`` of one component: its part of diffusers' flattened LoraConfig plus PEFT's fields."""
    config = {option.split(".", 1)[1]: value for option, value in flat.items() if option.startswith(component + ".")}
    config.update(
        {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": base_model,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
        }
    )
    return config


def _peft_path(component: str, path: str) -> str:
    """A module path as the component's model names it: ``CLIPTextModelWithProjection`` (``text_encoder_2``) keeps
    transformers' ``text_model.`` level, which ``CLIPTextModel`` dropped in transformers 5; PEFT loads weights by
    exact name, so a folder spelled otherwise would load nothing."""
    return file_module_path(component, path) if component == "text_encoder_2" else path


def _peft_tensors(state: AdapterState, component: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for module_key, weights in state.modules.items():
        if module_key.startswith(component + "."):
            path = _peft_path(component, module_key.split(".", 1)[1])
            down, up = factors_without_core(weights)  # PEFT's conv LoRA has no Tucker core
            tensors[f"base_model.model.{path}.lora_A.weight"] = down.detach().contiguous()
            tensors[f"base_model.model.{path}.lora_B.weight"] = up.detach().contiguous()
            magnitude = peft_magnitude(weights)
            if magnitude is not None:
                tensors[magnitude_key(component, f"base_model.model.{path}")] = magnitude
    return tensors


def write_peft_folder(state: AdapterState, folder: str | os.PathLike) -> Path:
    """Write ``state`` as one PEFT adapter folder per component (``FOLDER/unet``, ``FOLDER/text_encoder``), each with
    ``adapter_config.json`` (rank, alpha, rank/alpha patterns, exact target modules, ``use_dora``) and
    ``adapter_model.safetensors``, loadable with ``peft.PeftModel.from_pretrained(pipe.unet, FOLDER / "unet")``.

    The folder is built beside ``folder`` and renamed into place, so a failure leaves nothing behind.

    Raises:
        AdapterFileError: ``folder`` exists and is not an empty folder, the adapter has no modules, reading would
            refuse it (:meth:`~difflora.adapter.AdapterState.problem`), or PEFT cannot hold it (another kind than
            LoRA, DoRA per input column, DoRA on some of a component's modules only:
            :meth:`~difflora.adapter.AdapterState.lora_only_problem`); one line naming the folder and the module.
    """
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise AdapterFileError(f"{folder}: exists; give a new folder for the PEFT output")
    if not state.modules:
        raise AdapterFileError(f"{folder}: the adapter has no modules; nothing to write")
    problem = state.problem() or state.lora_only_problem("a PEFT folder")  # never write what reading refuses
    if problem:
        raise AdapterFileError(f"{folder}: not written: the adapter's {problem}")
    flat = diffusers.diffusers_lora_metadata(state)
    base_model = state.metadata.get("difflora.base_model")
    header = {"format": "pt", "difflora.version": _version.__version__}
    with atomic_directory(folder) as staging:
        for component in sorted({key.split(".", 1)[0] for key in state.modules}):
            (staging / component).mkdir()
            config = _peft_config(flat, component, base_model)
            (staging / component / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
            save_file(_peft_tensors(state, component), str(staging / component / PEFT_WEIGHTS_FILE), metadata=header)
    return folder
