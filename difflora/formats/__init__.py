"""Adapter files: reading any LoRA layout difflora knows into an :class:`~difflora.adapter.AdapterState`, and writing
one as a difflora/diffusers or kohya ``.safetensors`` file or as PEFT folders.

Each dialect is one module of this package:

* :mod:`.diffusers`: ``<component>.<path>.lora_A.weight`` / ``.lora_B.weight`` with diffusers'
  ``lora_adapter_metadata`` header (what ``save_lora_weights`` and diffusers' training scripts write); formats
  ``difflora`` (written by difflora) and ``diffusers``. It also reads diffusers' older spellings, :mod:`.legacy`
  (``diffusers-old``: ``.lora.down.weight``; ``diffusers-attn-procs``: ``processor.to_q_lora``, ``lora_linear_layer``).
* :mod:`.kohya`: ``lora_unet_…`` / ``lora_te_…`` keys with ``.alpha`` (kohya, LyCORIS, AUTOMATIC1111, OneTrainer's
  kohya and legacy outputs), SDXL's original-layout names included, and SimpleTuner's LyCORIS files
  (``lycoris_…``).
* :mod:`.comfyui`: ComfyUI's own names, ``diffusion_model.<original-layout path>`` and
  ``text_encoders.clip_l|clip_h|clip_g.transformer.…`` (ComfyUI's trainer and extraction, OneTrainer's ComfyUI
  output).
* :mod:`.onetrainer`: OneTrainer's internal dict (``unet.<path>.lora_down.weight``) and its original-layout output
  (``input_blocks.…lora_A.weight``).
* :mod:`.peft`: PEFT adapter folders, and difflora's export of one PEFT folder per pipeline component.

Every dialect reads and writes LoRA on any Linear and Conv2d (4-D factors on a Conv2d; kohya's and LyCORIS' Tucker
core ``lora_mid`` is kept in kohya files and folded into the down factor for diffusers and PEFT); kohya's family
(kohya, ComfyUI, OneTrainer) also reads LoHa, LoKr, full diffs and DoRA (:mod:`._algorithms`). What a file holds
that difflora cannot apply (norm diffs, OFT, names of no known layer) is listed in
:attr:`~difflora.adapter.AdapterState.skipped`, every key of it, and named by algorithm in one line
(:meth:`~difflora.adapter.AdapterState.skipped_summary`).

This module picks the dialect: a state dict goes to the first of :data:`READERS` that claims its keys, a layout name
to its entry in :data:`WRITERS`. A new dialect is one module with the same functions and one entry there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import _version
from .._files import atomic_path
from ..adapter import AdapterState
from ..errors import AdapterFileError
from ..keys import is_pickle
from . import comfyui, diffusers, kohya, onetrainer, peft
from ._common import read_safetensors
from .diffusers import DIFFUSERS_METADATA_KEY, DIFFUSERS_WEIGHTS_FILE, diffusers_lora_metadata, to_diffusers_state_dict
from .kohya import kohya_metadata, to_kohya_state_dict
from .peft import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, write_peft_folder

__all__ = [
    "read_adapter",
    "parse_state_dict",
    "write_adapter",
    "to_diffusers_state_dict",
    "to_kohya_state_dict",
    "kohya_metadata",
    "WRITE_LAYOUTS",
    "write_peft_folder",
    "diffusers_lora_metadata",
    "DIFFLORA_FORMAT_VERSION",
    "DIFFUSERS_METADATA_KEY",
    "DIFFUSERS_WEIGHTS_FILE",
    "PEFT_CONFIG_FILE",
    "PEFT_WEIGHTS_FILE",
]

DIFFLORA_FORMAT_VERSION = "1"

# State-dict dialects, asked in order: the first whose ``claims(keys)`` holds reads the file with
# ``read_state_dict(tensors, header, source)``. Their prefixes never overlap (``lora_unet_``, ``diffusion_model.``,
# ``input_blocks.``); OneTrainer's internal keys share diffusers' ``unet.`` but not its factor names, so OneTrainer
# is asked first. diffusers comes last: it claims whatever is left and reads every spelling of its family
# (``diffusers.KEY_SPELLINGS``), or says it found no key it knows.
READERS = (kohya, comfyui, onetrainer, diffusers)
# Layouts ``write_adapter`` writes, each a dialect with ``file_contents(state, title) -> (tensors, header entries)``.
WRITERS = {"difflora": diffusers, "diffusers": diffusers, "kohya": kohya}
WRITE_LAYOUTS = tuple(WRITERS)


# ----- reading ------------------------------------------------------------------------------------------------------


def _checked(state: AdapterState, source: str) -> AdapterState:
    """``state`` once every module holds a LoRA that can be used: the one check of contents, whatever the dialect,
    where every command reads an adapter (see :meth:`~difflora.adapter.AdapterState.problem`)."""
    problem = state.problem()
    if problem:
        raise AdapterFileError(f"{source}: {problem}")
    return state


def _parse(tensors: dict[str, torch.Tensor], header: dict[str, str], source: str) -> AdapterState:
    reader = next(dialect for dialect in READERS if dialect.claims(tensors))
    return reader.read_state_dict(tensors, dict(header), source)


def parse_state_dict(
    tensors: dict[str, torch.Tensor], header: dict[str, str] | None = None, source: str = "state dict"
) -> AdapterState:
    """Turn a LoRA state dict (and its safetensors header) into an :class:`AdapterState`, in whichever dialect its
    keys are.

    Raises:
        AdapterFileError: when no key is in a format difflora reads or no module is one difflora can apply, a module
            lacks its up or down factor, one layer is named twice, or a module is not a usable LoRA (NaN or inf,
            empty or misshapen factors, factors not floating point, an alpha that is not a finite number > 0); one
            line naming ``source`` and the module.
    """
    return _checked(_parse(tensors, header or {}, source), source)


def _read_file(path: Path) -> AdapterState:
    tensors, header = read_safetensors(path)
    return _parse(tensors, header, source=str(path))


def _read_folder(folder: Path) -> AdapterState:
    if peft.holds_folder(folder):
        return peft.read_folder(folder)
    if (folder / DIFFUSERS_WEIGHTS_FILE).is_file():  # what diffusers' training scripts write
        return _read_file(folder / DIFFUSERS_WEIGHTS_FILE)
    raise AdapterFileError(
        f"{folder}: folder holds no {DIFFUSERS_WEIGHTS_FILE}, {PEFT_CONFIG_FILE} or per-component PEFT folders"
    )


def read_adapter(path: str | os.PathLike) -> AdapterState:
    """Read an adapter: a LoRA ``.safetensors`` file in any layout difflora reads, a PEFT adapter folder, difflora's
    per-component PEFT export, or a diffusers LoRA output folder.

    Raises:
        AdapterFileError: missing file, a pickle file (refused: safetensors only), a truncated or corrupt file, keys
            in no format difflora reads, or a module that is not a usable LoRA (as :func:`parse_state_dict`). The
            message is one line and names the file.
    """
    path = Path(path)
    if is_pickle(path):
        raise AdapterFileError(
            f"{path}: pickle files ({path.suffix}) are refused, safetensors only; convert it to .safetensors"
        )
    if not path.exists():
        raise AdapterFileError(f"{path}: no such file")
    return _checked(_read_folder(path) if path.is_dir() else _read_file(path), str(path))


# ----- writing ------------------------------------------------------------------------------------------------------


def _difflora_header(state: AdapterState, metadata: dict[str, str] | None) -> dict[str, str]:
    """The header entries every layout carries: the adapter's and the caller's metadata, then difflora's keys."""
    header = {key: str(value) for key, value in state.metadata.items()}
    header.update({key: str(value) for key, value in (metadata or {}).items()})
    header.pop(DIFFUSERS_METADATA_KEY, None)  # it describes other factors; each layout writes its own or none
    header.update(
        {
            "format": "pt",
            "difflora.format": DIFFLORA_FORMAT_VERSION,
            "difflora.version": _version.__version__,
            "difflora.ranks": json.dumps(state.ranks()),
            "difflora.alphas": json.dumps(state.alphas()),
            "difflora.targets": json.dumps(state.targets()),
        }
    )
    return header


def write_adapter(
    state: AdapterState, path: str | os.PathLike, metadata: dict[str, str] | None = None, layout: str = "difflora"
) -> Path:
    """Write ``state`` to one ``.safetensors`` file atomically (temporary file, then rename).

    ``layout``: ``difflora`` and ``diffusers`` write diffusers' keys with its ``lora_adapter_metadata`` header (so
    plain diffusers applies the right scales); ``kohya`` writes ``lora_unet_…``/``lora_te_…`` keys with each module's
    real ``.alpha`` and kohya's ``ss_*`` and ``modelspec.*`` header keys, for A1111, ComfyUI and kohya's tools.
    Every layout also carries difflora's keys: ``difflora.format``, ``difflora.version``, ``difflora.ranks``,
    ``difflora.alphas``, ``difflora.targets`` and anything in ``state.metadata`` or ``metadata``.

    Raises:
        AdapterFileError: a path not ending in ``.safetensors``, an unknown layout, an adapter with no modules, or one
            that reading would refuse (:meth:`~difflora.adapter.AdapterState.problem`: NaN or inf, misshapen
            factors, ...), so that difflora never writes a file it would not read; one line naming the path and the
            module, nothing written.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise AdapterFileError(f"{path}: adapters are written as .safetensors; give a path ending in .safetensors")
    if layout not in WRITERS:
        raise AdapterFileError(f"{path}: layout {layout!r} is not one of {', '.join(WRITE_LAYOUTS)}")
    if not state.modules:
        raise AdapterFileError(f"{path}: the adapter has no modules; nothing to write")
    problem = state.problem()  # the check every read runs
    if problem:
        raise AdapterFileError(f"{path}: not written: the adapter's {problem}")
    if layout != "kohya" and state.lora_only_problem(f"a {layout} file"):
        raise AdapterFileError(f"{path}: not written: {state.lora_only_problem(f'a {layout} file')}")
    header = _difflora_header(state, metadata)
    tensors, layout_header = WRITERS[layout].file_contents(state, title=path.stem)
    header.update(layout_header)
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=header)
    return path
