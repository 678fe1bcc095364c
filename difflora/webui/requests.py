"""What the page's forms ask for, as plain dataclasses, and the parsing of form values into them.

Gradio sends a form as a flat list of values (numbers as floats, empty fields as ``None`` or ``""``); each request's
``from_form`` takes that list in the order of its ``FORM_FIELDS`` (and ``SLOT_FIELDS`` per adapter row), so the
page, an API client and the tests agree on one order. Bad values raise :class:`~difflora.errors.InvalidArgumentError`
naming the parameter (``steps``, ``rank``, …), which the page turns into its field's label.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import DiffloraError, InvalidArgumentError, finite_number
from ..keys import ADAPTER_SUFFIX
from ..lora import adapter_weight

__all__ = [
    "MODEL_SCHEDULER",
    "SCHEDULERS",
    "SLOT_COUNT",
    "AdapterSlot",
    "BlendRequest",
    "GenerateRequest",
    "MoreOption",
    "TrainRequest",
    "adapter_rows",
    "more_training_options",
    "parse_prompt_loras",
    "whole_number",
]

SLOT_COUNT = 4  # adapter rows in the Blend tab (the Generate tab has as many as the user adds)
MODEL_SCHEDULER = "Model default"
# Label → diffusers scheduler class; each is built with from_config(the model's own scheduler config).
SCHEDULERS: dict[str, str | None] = {
    MODEL_SCHEDULER: None,
    "DPM++ 2M": "DPMSolverMultistepScheduler",
    "Euler": "EulerDiscreteScheduler",
    "Euler a": "EulerAncestralDiscreteScheduler",
    "DDIM": "DDIMScheduler",
    "PNDM": "PNDMScheduler",
}


@dataclass
class AdapterSlot:
    """One adapter of a generation: a file of the adapter folder, its weight, on/off, and optional block weights.

    ``row`` is the page's adapter row it came from (1, 2, …) and ``tag`` the ``<lora:…>`` prompt tag, so
    an error about its weight or block weights is told by the field that holds them (:meth:`parameter`).

    The weight is checked here, once, by the library's rule (:func:`~difflora.lora.adapter_weight`: a finite number
    in [-100, 100], the range in the message): every slot, from a form row, a prompt tag or a caller of the session,
    is built through this class, so a weight the runtime would refuse never gets as far as loading a file.
    """

    file: str | None
    weight: float = 1.0
    enabled: bool = True
    block_weights: str = ""
    row: int | None = None
    tag: str | None = None

    def __post_init__(self) -> None:
        try:
            self.weight = adapter_weight(self.weight)
        except DiffloraError as error:
            raise self.told(error, "weight") from None

    def parameter(self, part: str) -> str:
        """The form parameter holding this slot's ``part`` (``weight`` or ``block_weights``): ``weight_2`` for the
        second row, ``prompt`` for a prompt tag, ``part`` itself for a slot from neither."""
        if self.row is not None:
            return f"{part}_{self.row}"
        return "prompt" if self.tag else part

    def told(self, error: DiffloraError, part: str) -> DiffloraError:
        """``error``, raised about this slot's ``part`` (``weight`` or ``block_weights``), in the words of the slot's
        own field: ``weight must be …`` becomes ``weight_2 must be …`` (parameter ``weight_2``, the page's second
        row), ``prompt tag <lora:x:9>: weight must be …`` (parameter ``prompt``) or ``weight of x.safetensors must
        be …``. The same kind of error, in one line."""
        message = " ".join(str(error).split("\n"))
        for prefix in dict.fromkeys(filter(None, (error.parameter, part))):
            # The library's subject, with the runtime's name for the adapter if it gives one: "weight of 'x'".
            subject = re.match(rf"{re.escape(prefix)}(?: of (?:adapter )?'[^']*')?(?=[ :])", message)
            if subject:
                rest = message[subject.end():]
                break
        else:
            rest = ": " + message
        parameter = self.parameter(part)
        if self.row is not None:
            return type(error)(parameter + rest, parameter)
        if self.tag:
            return type(error)(f"prompt tag {self.tag}: {part}{rest}", parameter)
        return type(error)(f"{part.replace('_', ' ')} of {self.file}{rest}", parameter)


_PROMPT_LORA = re.compile(r"<lora:([^:<>]+)(?::([^:<>]*))?>", re.IGNORECASE)


def parse_prompt_loras(prompt: str) -> tuple[str, list[AdapterSlot]]:
    """Take ``<lora:name:weight>`` tags (AUTOMATIC1111's syntax) out of a prompt.

    Returns the prompt the model sees (tags removed, spaces tidied) and one slot per tag; ``name`` is a file of the
    adapter folder with or without ``.safetensors``, ``weight`` defaults to 1.
    """
    slots = []
    for match in _PROMPT_LORA.finditer(prompt):
        name, weight_text = match.group(1).strip(), (match.group(2) or "").strip()
        tag = match.group(0)
        file = name if name.lower().endswith(ADAPTER_SUFFIX) else name + ADAPTER_SUFFIX
        slots.append(AdapterSlot(file, weight_text or 1.0, tag=tag))  # the slot checks its weight
    text = _PROMPT_LORA.sub(" ", prompt)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" +([,.;])", r"\1", text)
    return text.strip(), slots


def whole_number(value: Any, parameter: str, minimum: int = 0) -> int:
    """An integer from a form value (Gradio sends numbers as floats), at least ``minimum``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{parameter} must be a whole number, got {value!r}", parameter) from None
    if number != int(number) or number < minimum:
        raise InvalidArgumentError(f"{parameter} must be a whole number >= {minimum}, got {value!r}", parameter)
    return int(number)


def _check_length(values: Sequence[Any], expected: int, form: str) -> None:
    if len(values) != expected:
        raise InvalidArgumentError(f"the {form} form sends {expected} values, got {len(values)}")


def adapter_rows(rows: Any, fields: Sequence[str], parameter: str = "adapters") -> list[AdapterSlot]:
    """The slots of a list of adapter rows, each row its values in ``fields`` order (a subset of ``file``,
    ``weight``, ``enabled``, ``block_weights``, ``file`` first). Rows without a file are empty and skipped; each
    other row's slot is numbered by its place in the list (1, 2, …), so an error about its weight or block weights
    is told by that row (``weight_3``). ``None`` or an empty list is no rows."""
    if rows is None or rows == "":
        return []
    shape = f"[{', '.join(fields)}]"
    if not isinstance(rows, (list, tuple)):
        raise InvalidArgumentError(f"{parameter} must be a list of {shape} rows, got {rows!r}", parameter)
    slots = []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, (list, tuple)) or len(row) != len(fields):
            raise InvalidArgumentError(f"{parameter}: row {number} must be {shape}, got {row!r}", parameter)
        values = dict(zip(fields, row))
        if not values["file"]:
            continue
        if not isinstance(values["file"], str):
            raise InvalidArgumentError(f"{parameter}: row {number}: the file must be a name, got {values['file']!r}",
                                       parameter)
        slots.append(AdapterSlot(values["file"], values.get("weight", 1.0),  # the slot checks its weight
                                 bool(values.get("enabled", True)), values.get("block_weights") or "", row=number))
    return slots


@dataclass
class GenerateRequest:
    """Everything the Generate tab sends. ``width``/``height`` 0 mean the model's native size."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    guidance: float = 7.5
    seed: int = 0
    random_seed: bool = False
    width: int = 0
    height: int = 0
    scheduler: str = MODEL_SCHEDULER
    num_images: int = 1
    fuse: bool = False
    adapters: list[AdapterSlot] = field(default_factory=list)

    # The order of the Generate tab's fields as the page (and an API client) sends them; the adapter rows follow as
    # one list, each row its values in SLOT_FIELDS order (as many rows as the page has).
    FORM_FIELDS = ("prompt", "negative_prompt", "steps", "guidance", "seed", "random_seed", "width", "height",
                   "scheduler", "num_images", "fuse")
    SLOT_FIELDS = ("file", "weight", "enabled", "block_weights")

    @classmethod
    def from_form(cls, values: Sequence[Any]) -> GenerateRequest:
        """A request from the form values in ``FORM_FIELDS`` order, then the list of adapter rows (``SLOT_FIELDS``
        each; empty rows are skipped)."""
        _check_length(values, len(cls.FORM_FIELDS) + 1, "Generate")
        form = dict(zip(cls.FORM_FIELDS, values))
        slots = adapter_rows(values[-1], cls.SLOT_FIELDS)
        return cls(
            prompt=form["prompt"] or "",
            negative_prompt=form["negative_prompt"] or "",
            steps=whole_number(form["steps"], "steps", 1),
            guidance=finite_number(form["guidance"], "guidance", "guidance"),
            seed=whole_number(form["seed"] or 0, "seed"),
            random_seed=bool(form["random_seed"]),
            width=whole_number(form["width"] or 0, "width"),
            height=whole_number(form["height"] or 0, "height"),
            scheduler=form["scheduler"] or MODEL_SCHEDULER,
            num_images=whole_number(form["num_images"], "num_images", 1),
            fuse=bool(form["fuse"]),
            adapters=slots,
        )


@dataclass
class BlendRequest:
    """The Blend tab: up to ``SLOT_COUNT`` rows (file, weight, block weights), the method, its rank and density.

    Each row's block weights scale its adapter block by block before the blend
    (:func:`~difflora.blend.scale_adapter`), as they would in the Generate tab."""

    adapters: list[AdapterSlot]
    method: str = "concat"
    rank: int | None = None
    density: float = 0.5

    SLOT_FIELDS = ("file", "weight", "block_weights")
    FORM_FIELDS = ("method", "rank", "density")

    @classmethod
    def from_form(cls, values: Sequence[Any]) -> BlendRequest:
        """From ``SLOT_COUNT`` × ``SLOT_FIELDS``, then method, rank (0: none) and density."""
        width = len(cls.SLOT_FIELDS)
        _check_length(values, SLOT_COUNT * width + len(cls.FORM_FIELDS), "Blend")
        rows = [values[index * width:(index + 1) * width] for index in range(SLOT_COUNT)]
        slots = adapter_rows(rows, cls.SLOT_FIELDS)
        method, rank, density = values[SLOT_COUNT * width:]
        rank = whole_number(rank or 0, "rank")
        return cls(slots, method or "concat", rank or None, finite_number(density, "density", "density"))


# Training options set by the page itself or shown in the Train tab's own fields. Every other option of
# difflora.train.TrainConfig is a field of the tab's "More options" (an option added to the dataclass appears there
# by itself), except paths the page does not offer (a disk cache, a checkpoint to resume: outside the adapter
# folder), the log backend, and epochs (the tab's steps win over them).
_TRAIN_SET_ELSEWHERE = frozenset({
    "model", "model_config", "data", "output", "name", "resume", "cache_dir", "report_to", "epochs",
    "steps", "rank", "alpha", "lr", "batch_size", "resolution", "trigger_word", "validation_prompts",
    "validation_steps",
})


@dataclass(frozen=True)
class MoreOption:
    """A training option of the Train tab's "More options", as its field is built: ``kind`` is ``bool``, ``int``,
    ``float`` or ``str``; ``optional`` when it may be unset (``None``, an empty field)."""

    name: str
    kind: type
    default: Any
    help: str
    choices: tuple | None
    optional: bool


@functools.cache
def more_training_options() -> dict[str, MoreOption]:
    """The Train tab's "More options" by name, in ``difflora train --help`` order, from the training dataclass."""
    from ..train.config import config_options

    found = {}
    for name, option in config_options().items():
        hint = option.hint
        optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
        if optional:
            hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        if name in _TRAIN_SET_ELSEWHERE or hint not in (bool, int, float, str):
            continue
        default = option.field.default if option.field.default is not dataclasses.MISSING else None
        found[name] = MoreOption(name, hint, default, option.field.metadata.get("help", ""),
                                 option.field.metadata.get("choices"), optional)
    return found


def _more_option_value(option: MoreOption, value: Any) -> Any:
    """A "More options" field's value as the training config takes it: empty is unset (``None``) where the option
    may be unset, a number typed as text (an optional number's field) that number, a whole float an int (Gradio
    and JSON send numbers as floats); the config checks the rest."""
    if isinstance(value, str) and option.kind in (int, float):
        value = value.strip()
    if option.optional and (value is None or value == ""):
        return None
    if isinstance(value, str) and option.kind in (int, float):
        try:
            value = float(value)
        except ValueError:
            raise InvalidArgumentError(f"{option.name} must be a number, got {value!r}", option.name) from None
    if option.kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


@dataclass
class TrainRequest:
    """The Train tab. ``dataset`` is a folder inside the data root (relative to it, or absolute); it is only read."""

    name: str
    dataset: str
    steps: int = 200
    rank: int = 4
    alpha: float | None = None
    lr: float = 1e-4
    batch_size: int = 4
    resolution: int = 0  # 0: the model's native size
    trigger_word: str = ""
    validation_prompt: str = ""
    validation_steps: int = 0  # 0: a validation image only at the end
    more_options: dict[str, Any] = field(default_factory=dict)  # "More options": name → value

    # The order of the Train tab's fields as the page sends them (the dataclass's own order); the "More options"
    # follow, in more_training_options() order.
    FORM_FIELDS = ("name", "dataset", "steps", "rank", "alpha", "lr", "batch_size", "resolution", "trigger_word",
                   "validation_prompt", "validation_steps")

    @classmethod
    def from_form(cls, values: Sequence[Any]) -> TrainRequest:
        """A request from the form values in ``FORM_FIELDS`` order, then the "More options": none, one dict of them
        by name (an API client), or every one's value in :func:`more_training_options` order (the page); numbers
        are checked by :meth:`options`."""
        basic, rest = values[:len(cls.FORM_FIELDS)], values[len(cls.FORM_FIELDS):]
        if len(rest) == 1 and (rest[0] is None or isinstance(rest[0], dict)):
            more = dict(rest[0] or {})
        elif rest:
            _check_length(values, len(cls.FORM_FIELDS) + len(more_training_options()), "Train")
            more = dict(zip(more_training_options(), rest))
        else:
            _check_length(values, len(cls.FORM_FIELDS), "Train")
            more = {}
        form = dict(zip(cls.FORM_FIELDS, basic))
        return cls(
            name=form["name"],
            dataset=form["dataset"],
            steps=form["steps"],
            rank=form["rank"],
            alpha=form["alpha"] or None,  # 0: alpha = rank
            lr=form["lr"],
            batch_size=form["batch_size"],
            resolution=form["resolution"] or 0,
            trigger_word=form["trigger_word"] or "",
            validation_prompt=form["validation_prompt"] or "",
            validation_steps=form["validation_steps"] or 0,
            more_options=more,
        )

    def options(self, native_size: int) -> dict[str, Any]:
        """The training options this request sets, checked, keyed as :func:`difflora.train.make_config` takes them.

        ``native_size`` is the model's image size, the resolution when the request gives none.
        """
        validation_prompt = (self.validation_prompt or "").strip()
        known = more_training_options()
        for name in self.more_options:
            if name not in known:
                raise InvalidArgumentError(f"{name!r} is not an option the Train tab sets", name)
        more = {name: _more_option_value(known[name], value) for name, value in self.more_options.items()}
        return more | {
            "steps": whole_number(self.steps, "steps", 1),
            "rank": whole_number(self.rank, "rank", 1),
            "alpha": finite_number(self.alpha, "alpha", "alpha") if self.alpha else None,
            "lr": finite_number(self.lr, "lr", "lr"),
            "batch_size": whole_number(self.batch_size, "batch_size", 1),
            "resolution": whole_number(self.resolution, "resolution") or native_size or 512,
            "trigger_word": (self.trigger_word or "").strip() or None,
            "validation_prompts": [validation_prompt] if validation_prompt else [],
            "validation_steps": whole_number(self.validation_steps or 0, "validation_steps"),
        }
