"""What every tab of the page shares: the words errors are told in, the one-line refusals, the adapter lists.

A callback wrapped in :func:`shown_in_page` turns a :class:`~difflora.errors.DiffloraError` into a one-line message
in the page that names the field at fault (:func:`in_field_words`, with the tab's :class:`FieldLabels`);
:class:`PageBlocks` does the same for the values Gradio itself refuses before any callback runs.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import gradio as gr

from ..errors import DiffloraError
from .library import AdapterLibrary
from .requests import more_training_options

__all__ = ["BLEND_LABELS", "FREE", "GENERATE_LABELS", "PIPELINE", "TRAIN_LABELS", "AdapterLists", "FieldLabels",
           "PageBlocks", "denoising", "in_field_words", "shown_in_page"]

logger = logging.getLogger(__name__)

PIPELINE = {"concurrency_id": "pipeline", "concurrency_limit": 1}  # one generation at a time, queued
FREE = {"concurrency_limit": None}  # reads no pipeline state: never waits behind a generation

# An adapter row's weight and block weights are told by their row (``AdapterSlot.parameter``: ``weight_2``).
_ROW_PARAMETER = re.compile(r"(weight|block_weights)_([1-9][0-9]*)")
_ROW_PARTS = {"weight": "Weight", "block_weights": "Block weights"}


class FieldLabels(Mapping[str, str]):
    """Parameter → the label of its field in one tab: the words an error naming that parameter is told in (a UI
    user reads "Rank (svd, ties, dare): …", never "--rank"). With ``rows``, the tab has adapter rows, and
    ``weight_N`` / ``block_weights_N`` are "Weight of adapter N" / "Block weights of adapter N" for any N."""

    def __init__(self, labels: Mapping[str, str], rows: bool = False) -> None:
        self._labels = dict(labels)
        self.rows = rows

    def __getitem__(self, parameter: str) -> str:
        if parameter in self._labels:
            return self._labels[parameter]
        match = _ROW_PARAMETER.fullmatch(parameter) if self.rows else None
        if match is None:
            raise KeyError(parameter)
        return f"{_ROW_PARTS[match.group(1)]} of adapter {match.group(2)}"

    def __iter__(self) -> Iterator[str]:
        return iter(self._labels)

    def __len__(self) -> int:
        return len(self._labels)

    def __or__(self, other: FieldLabels) -> FieldLabels:
        return FieldLabels({**self._labels, **other._labels}, self.rows or other.rows)


GENERATE_LABELS = FieldLabels({
    "prompt": "Prompt", "negative_prompt": "Negative prompt", "steps": "Steps", "guidance": "Guidance",
    "seed": "Seed", "width": "Width", "height": "Height", "scheduler": "Scheduler", "num_images": "Images",
    "adapters": "Adapters",
}, rows=True)
BLEND_LABELS = FieldLabels({
    "method": "Method", "rank": "Rank (svd, ties, dare)", "density": "Density (ties, dare)", "layout": "Format",
    "adapters": "Adapters",
}, rows=True)
TRAIN_LABELS = FieldLabels({
    "name": "Adapter name", "data": "Dataset folder", "data_dir": "Dataset folder", "trigger_word": "Trigger word",
    "steps": "Steps", "rank": "Rank", "alpha": "Alpha (0: rank)", "lr": "Learning rate", "batch_size": "Batch size",
    "resolution": "Resolution", "validation_prompts": "Validation prompt",
    "validation_steps": "Validation every N steps (0: at the end)",
    # "More options": each by its name in words ("conv_rank": "Conv rank").
    **{name: name.replace("_", " ").capitalize() for name in more_training_options()},
})


def in_field_words(error: DiffloraError, labels: Mapping[str, str]) -> str:
    """The one-line message of ``error`` as the page shows it: an error naming a parameter that has a field here
    (``error.parameter``) is told by the field's label, e.g. ``rank must be …`` → ``Rank (svd, ties, dare): must be …``.
    """
    message = " ".join(str(error).split("\n"))
    parameter = getattr(error, "parameter", None)
    label = labels.get(parameter) if parameter else None
    if label is None:
        return message
    if message.startswith((parameter + " ", parameter + ":")):
        message = message[len(parameter):].lstrip(" :")
    return f"{label}: {message}"


def shown_in_page(labels: Mapping[str, str] | None = None) -> Callable[[Callable], Callable]:
    """Turn errors into one-line messages in the page: a DiffloraError shows its message (in the words of
    ``labels``, parameter → field label); anything else a short generic one, with the traceback logged on the
    server only."""
    labels = labels or {}

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)  # keeps the signature, where Gradio looks for a gr.Progress default
        def wrapper(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except gr.Error:
                raise
            except DiffloraError as error:
                raise gr.Error(in_field_words(error, labels), print_exception=False) from None
            except Exception:
                logger.exception("web UI action %s failed", function.__name__)
                raise gr.Error("Something went wrong on the server; the details are in its log.",
                               print_exception=False) from None

        return wrapper

    return decorate


class PageBlocks(gr.Blocks):
    """A ``gr.Blocks`` whose own refusals of the values it is sent are logged as one line: a dropdown value not
    among the choices, a number out of its field's range (a stale page or an API client sends them), a value of the
    wrong type, a file path that was not uploaded.

    Gradio raises these while it prepares the inputs, before any callback runs, and prints a full traceback for
    each (for some, it sends the client no message at all); the client is sent the one line.
    """

    async def preprocess_data(self, block_fn, *args, **kwargs):
        try:
            return await super().preprocess_data(block_fn, *args, **kwargs)
        except gr.Error as error:
            if error.print_exception:
                _log_refusal(block_fn, error.message)
                error.print_exception = False
            raise
        except ValueError as error:  # Gradio's ComponentProcessingError, InvalidPathError; pydantic's ValidationError
            raise gr.Error(_log_refusal(block_fn, str(error)), print_exception=False) from None


def _log_refusal(block_fn, message: str) -> str:
    """Log a refusal of the page's inputs as one line; returns the line."""
    line = " ".join(str(message).split())
    line = line if len(line) <= 600 else line[:597] + "..."  # long choice lists: the start says enough
    event = getattr(block_fn, "api_name", None) or getattr(block_fn, "name", None) or "an event"
    logger.warning("refused by the page (%s): %s", event, line)
    return line


@dataclass
class AdapterLists:
    """Every list of adapter files in the page and the adapter table, refreshed together: the fixed dropdowns
    (Blend, Inspect) get new choices, and ``names`` (the list the Generate tab's rows are drawn with) a new list."""

    library: AdapterLibrary
    pickers: list[gr.Dropdown]
    names: gr.State
    table: gr.Markdown

    @property
    def outputs(self) -> list[gr.components.Component]:
        return [*self.pickers, self.names, self.table]

    def fresh(self) -> list:
        """Fresh choices for every adapter dropdown, and the adapter table."""
        choices = self.library.names()
        return [gr.Dropdown(choices=choices) for _ in self.pickers] + [choices, self.library.table()]

    def unchanged(self) -> list:
        return [gr.skip() for _ in self.outputs]


def denoising(progress: gr.Progress) -> Callable[[int, int], None]:
    return lambda step, total: progress((step, total), desc="denoising")
