"""What every command-line entry point shares: the parser whose usage errors are one line, the model options, quiet
libraries (from ``_libraries``), and the one-line error exit (``difflora: error: …``, exit code 2) for bad input
and for OS errors about a file.

``difflora`` (cli.py), ``difflora train`` / ``python -m difflora.train`` and ``difflora webui`` each build their
parser here and run through :func:`run_main`; none of them imports another's module for it.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Collection

from ._libraries import quiet_libraries
from .errors import DiffloraError

__all__ = [
    "OneLineErrorParser", "add_model_options", "error_line", "option_strings", "os_error_line", "quiet_libraries",
    "run_main",
]

PROGRAM = "difflora"


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and still exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--model-config``, ``--device`` and ``--dtype``, as every command that loads a model has them."""
    parser.add_argument(
        "--model",
        default="embedded",
        help="'embedded' (the built-in tiny Stable Diffusion, default), a diffusers folder, a single-file "
        ".safetensors checkpoint, or a hub id (downloads only then)",
    )
    parser.add_argument(
        "--model-config", default=None, help="architecture for a single-file checkpoint (a diffusers folder or hub id)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (default: auto)")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, else fp32), fp32, fp16 or bf16")


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every ``--flag`` ``parser`` accepts."""
    return {option for action in parser._actions for option in action.option_strings}


# A parameter written with underscores as a word of its own: not part of a path, a file name or a quoted key.
_IDENTIFIER = re.compile(r"(?<![^\s(])[a-z][a-z0-9]*(?:_[a-z0-9]+)+(?=$|[\s,;:)]|\.(?:\s|$))")


def error_line(error: DiffloraError, flags: Collection[str] = ()) -> str:
    """The one line a command prints for ``error``, in the command's words.

    A library error names Python parameters; where the command has a flag for one, the flag is shown instead: the
    leading parameter (``InvalidArgumentError("rank must be …", parameter="rank")`` → ``--rank must be …``), and any
    other parameter written with underscores (``… when train_unet is off`` → ``… when --train-unet is off``; plain
    words such as "model" or "steps" stay words inside a sentence).
    """
    message = " ".join(str(error).split("\n"))
    parameter = getattr(error, "parameter", None)
    if parameter:
        flag = "--" + parameter.replace("_", "-")
        if flag in flags:
            if message.startswith((parameter + " ", parameter + ":")):
                message = flag + message[len(parameter):]
            elif not message.startswith(flag):
                message = f"{flag}: {message}"

    def as_flag(match: re.Match) -> str:
        flag = "--" + match.group(0).replace("_", "-")
        return flag if flag in flags else match.group(0)

    return f"{PROGRAM}: error: {_IDENTIFIER.sub(as_flag, message)}"


def os_error_line(error: OSError) -> str:
    """The one line a command prints for an OS error no check caught first: ``difflora: error: <file>: <reason>``
    (a path the OS refuses, such as a name over 255 bytes, found by whatever looked at it)."""
    reason = error.strerror or " ".join(str(error).split()) or type(error).__name__
    files = [str(name) for name in (error.filename, error.filename2) if name is not None]
    return f"{PROGRAM}: error: {' → '.join(files)}: {reason}" if files else f"{PROGRAM}: error: {reason}"


def run_main(run: Callable[[], int], parser: argparse.ArgumentParser | None = None) -> int:
    """Call ``run`` and return its exit code; bad input (a :class:`DiffloraError`) ends in one line and code 2, and
    so does an OS error about a file (:func:`os_error_line`); Ctrl-C ends in code 130. ``parser`` gives the flags that
    library errors are translated to."""
    try:
        return run()
    except DiffloraError as error:
        print(error_line(error, option_strings(parser) if parser is not None else ()), file=sys.stderr)
        return 2
    except OSError as error:
        print(os_error_line(error), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROGRAM}: interrupted", file=sys.stderr)
        return 130
