"""Keeping the libraries difflora drives (diffusers, transformers, accelerate) quiet where the user did not ask."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

__all__ = ["progress_bars_disabled", "quiet_libraries"]


def quiet_libraries() -> None:
    """Keep the terminal for what the user asked: no weight-loading bars or library chatter (errors still show)."""
    import diffusers
    import transformers

    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one INFO line per file of every checkpoint
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@contextlib.contextmanager
def progress_bars_disabled() -> Iterator[None]:
    """Silence diffusers' and transformers' own progress bars (loading, writing shards) and restore them after."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    restore = []
    for library in (diffusers_logging, transformers_logging):
        if library.is_progress_bar_enabled():
            library.disable_progress_bar()
            restore.append(library.enable_progress_bar)
    try:
        yield
    finally:
        for enable in restore:
            enable()
