"""What the page's forms ask for, as plain dataclasses, and the parsing of form values into them.

Gradio sends a form as a flat list of values (numbers as floats, empty fields as ``None`` or ``""``); each request's
``from_form`` takes that list in the order of its ``FORM_FIELDS`` (and ``SLOT_FIELDS`` per adapter row), so the
page, an API client and the tests agree on one order. Bad values raise :class:`~difflora.errors.InvalidArgumentError`
naming the parameter (``steps``, ``rank``, …), which the page turns into its field's label.
"""

from __future__ import annotations

import re
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
    "TrainRequest",
    "parse_prompt_loras",
    "whole_number",
]

SLOT_COUNT = 4  # adapter rows in the Generate and Blend tabs; more adapters can come from <lora:name:w> prompt tags
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

    ``row`` is the page's adapter row it came from (1…``SLOT_COUNT``) and ``tag`` the ``<lora:…>`` prompt tag, so
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

    # The order of the Generate tab's fields as the page (and an API client) sends them; slots follow.
    FORM_FIELDS = ("prompt", "negative_prompt", "steps", "guidance", "seed", "random_seed", "width", "height",
                   "scheduler", "num_images", "fuse")
    SLOT_FIELDS = ("file", "weight", "enabled", "block_weights")

    @classmethod
    def from_form(cls, values: Sequence[Any]) -> GenerateRequest:
        """A request from the form values in ``FORM_FIELDS`` order, then ``SLOT_COUNT`` × ``SLOT_FIELDS``."""
        _check_length(values, len(cls.FORM_FIELDS) + SLOT_COUNT * len(cls.SLOT_FIELDS), "Generate")
        form = dict(zip(cls.FORM_FIELDS, values))
        slots = []
        for index in range(SLOT_COUNT):
            start = len(cls.FORM_FIELDS) + index * len(cls.SLOT_FIELDS)
            file, weight, enabled, blocks = values[start:start + len(cls.SLOT_FIELDS)]
            if file:  # the slot checks its weight, told by its row
                slots.append(AdapterSlot(str(file), weight, bool(enabled), blocks or "", row=index + 1))
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
    """The Blend tab: up to ``SLOT_COUNT`` (file, weight) pairs, the method, its rank and density."""

    adapters: list[tuple[str, float]]
    method: str = "concat"
    rank: int | None = None
    density: float = 0.5

    SLOT_FIELDS = ("file", "weight")
    FORM_FIELDS = ("method", "rank", "density")

    @classmethod
    def from_form(cls, values: Sequence[Any]) -> BlendRequest:
        """From ``SLOT_COUNT`` × (file, weight), then method, rank (0: none) and density."""
        _check_length(values, SLOT_COUNT * len(cls.SLOT_FIELDS) + len(cls.FORM_FIELDS), "Blend")
        pairs = [
            (str(values[2 * i]), adapter_weight(values[2 * i + 1], f"weight_{i + 1}", f"weight_{i + 1}"))
            for i in range(SLOT_COUNT)
            if values[2 * i]
        ]
        method, rank, density = values[2 * SLOT_COUNT:]
        rank = whole_number(rank or 0, "rank")
        return cls(pairs, method or "concat", rank or None, finite_number(density, "density", "density"))


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

    # The order of the Train tab's fields as the page sends them (the dataclass's own order).
    FORM_FIELDS = ("name", "dataset", "steps", "rank", "alpha", "lr", "batch_size", "resolution", "trigger_word",
                   "validation_prompt", "validation_steps")

    @classmethod
    def from_form(cls, values: Sequence[Any]) -> TrainRequest:
        """A request from the form values in ``FORM_FIELDS`` order; numbers are checked by :meth:`options`."""
        _check_length(values, len(cls.FORM_FIELDS), "Train")
        form = dict(zip(cls.FORM_FIELDS, values))
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
        )

    def options(self, native_size: int) -> dict[str, Any]:
        """The training options this request sets, checked, keyed as :func:`difflora.train.make_config` takes them.

        ``native_size`` is the model's image size, the resolution when the request gives none.
        """
        validation_prompt = (self.validation_prompt or "").strip()
        return {
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
