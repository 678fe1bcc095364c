"""Exceptions difflora raises on bad input.

Every error names the file, key or option at fault and what was expected, in one line, so the CLI can print it as
it is (``difflora: error: <message>``) and exit with code 2.
"""

from __future__ import annotations

import math


class DiffloraError(Exception):
    """Base class of every error difflora raises for bad input; its message is one line.

    ``parameter`` names the Python parameter at fault (``rank``, ``model``) when there is one, and the message then
    starts with it in a library user's words (``rank must be a positive integer, got 0``). The command line turns it
    into its flag (``--rank must be …``) and the web UI into its field.
    """

    def __init__(self, message: str, parameter: str | None = None) -> None:
        super().__init__(message)
        self.parameter = parameter


class InvalidArgumentError(DiffloraError, ValueError):
    """An option or argument has a value that cannot be used (a weight that is not a number, a rank <= 0, ...)."""


class AdapterFileError(DiffloraError):
    """An adapter file is missing, is not safetensors, is truncated, or its keys are in no format difflora reads."""


class AdapterShapeError(DiffloraError):
    """An adapter's tensors do not fit the modules of the model it is loaded into."""


class ModelLoadError(DiffloraError):
    """A model (diffusers folder, single-file checkpoint or hub id) could not be loaded."""


class DatasetError(DiffloraError):
    """A data folder is missing, holds no readable image, or has a caption or metadata file that cannot be read."""


class FuseError(DiffloraError):
    """Fusing would write NaN or inf into a base weight (the mix is too large for the weight's precision)."""


def finite_number(value, what: str, parameter: str | None = None) -> float:
    """``value`` as a finite float, or :class:`InvalidArgumentError` naming ``what`` (an option, a form field)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{what} must be a number, got {value!r}", parameter) from None
    if not math.isfinite(number):
        raise InvalidArgumentError(f"{what} must be a finite number, got {value!r}", parameter)
    return number


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first non-empty line of ``error``'s message (its type's name if it has none), cut to ``limit`` characters:
    what a one-line error shows of a library's exception."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = lines[0] if lines else type(error).__name__
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."
