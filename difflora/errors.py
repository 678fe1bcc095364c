"""Exceptions difflora raises on bad input, and the one range check every number goes through.

Every error names the file, key or option at fault and what was expected, in one line, so the CLI can print it as
it is (``difflora: error: <message>``) and exit with code 2. :func:`number_in` is how every option, weight and
setting is checked against its range (``guidance must be a finite number in [0, 100], got nan``), so the range is
always in the message.
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


# What torch.Generator.manual_seed takes: a signed 64-bit number that is not negative. Every seed (generation,
# training, validation, the tiny model's) is checked against this one range.
SEED_RANGE = (0, 2**63 - 1)


def _bound_text(bound) -> str:
    if bound == SEED_RANGE[1]:
        return "2**63 - 1"
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def number_in(
    value,
    low: float,
    high: float,
    what: str,
    parameter: str | None = None,
    *,
    integer: bool = False,
    multiple_of: int | None = None,
    low_open: bool = False,
    convert: bool = False,
) -> float | int:
    """``value`` if it is a number in ``[low, high]`` (``(low, high]`` when ``low_open``), else
    :class:`InvalidArgumentError` naming ``what`` (a parameter, an option, a form field) with the range, in one line:
    ``steps must be a positive integer in [1, 1000], got 0``.

    ``integer`` asks for an ``int`` (``multiple_of`` for a multiple of it); otherwise an ``int`` or ``float`` that is
    finite (NaN and inf fail every range). A ``bool`` is not a number here, and neither is text unless ``convert``
    (text typed by a person: ``float(value)``, or ``int(value)`` for an integer), when the message shows the number
    read. Returns the number (a float unless ``integer``).
    """
    interval = f"{'(' if low_open else '['}{_bound_text(low)}, {_bound_text(high)}]"
    article = "a positive" if low >= 1 else "an" if integer and not multiple_of else "a"
    kind = (f"{article} multiple of {multiple_of}" if multiple_of else f"{article} integer" if integer
            else "a finite number")
    number = value
    if convert and not isinstance(value, bool):
        try:
            number = int(value) if integer and isinstance(value, str) else value if integer else float(value)
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"{what} must be {'an integer' if integer else 'a number'}, got {value!r}",
                                       parameter) from None
    wanted = int if integer else (int, float)
    in_range = (not isinstance(number, bool) and isinstance(number, wanted)
                and (low < number if low_open else low <= number) and number <= high)  # NaN fails every comparison
    if not in_range or (multiple_of and number % multiple_of):
        raise InvalidArgumentError(f"{what} must be {kind} in {interval}, got {number!r}", parameter)
    return number if integer else float(number)


def seed_number(value, what: str = "seed", parameter: str | None = "seed") -> int:
    """``value`` as a seed: an integer in :data:`SEED_RANGE` (:func:`number_in`)."""
    return number_in(value, *SEED_RANGE, what, parameter, integer=True)


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first non-empty line of ``error``'s message (its type's name if it has none), cut to ``limit`` characters:
    what a one-line error shows of a library's exception."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = lines[0] if lines else type(error).__name__
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."
