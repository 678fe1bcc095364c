"""The difflora web UI: a Gradio page over the library, for people who would rather not type commands.

    difflora webui --model MODEL --lora-dir DIR [--data-root DIR] [--host 127.0.0.1] [--port 7860] [--share]
    python webui/app.py --model MODEL --lora-dir DIR
    python -m difflora.webui --model MODEL --lora-dir DIR

The rooms, lowest first; only the page's modules import gradio, so importing this package does not:

- :mod:`~difflora.webui.library`: the adapter folder (:func:`resolve_inside`, :class:`AdapterLibrary`).
- :mod:`~difflora.webui.requests`: what the forms ask for (:class:`GenerateRequest`, :class:`BlendRequest`,
  :class:`TrainRequest`, ``<lora:name:weight>`` prompt tags) and the parsing of form values.
- :mod:`~difflora.webui.training_job`: one training run at a time, in the background (:class:`TrainingJob`).
- :mod:`~difflora.webui.session`: :class:`WebUISession`, the one pipeline and its runtime; every action of the page
  is one of its methods, calling the same library functions the CLI calls. Tests call them directly.
- :mod:`~difflora.webui.page`: the Gradio page (:func:`build_app`), one module per tab (``tab_generate``,
  ``tab_blend``, ``tab_inspect``, ``tab_train``) and what they share (``page_kit``): the modules that import gradio.
- here: :func:`main`, the command (options, loading the model, launching).

Safety: the server binds to 127.0.0.1 unless ``--host`` says otherwise and makes no public link unless ``--share``.
Every file it reads or writes by name is inside ``--lora-dir`` (``../x``, absolute paths and symlinks leading out
are refused). Training datasets are read, never written, from folders inside ``--data-root`` (the adapter folder
when it is not given): a name relative to it, or an absolute path inside it; symlinks leading out are refused.
Uploads are accepted only when :func:`~difflora.formats.read_adapter` reads them as safetensors LoRA files; Gradio
keeps them in ``<lora-dir>/.gradio-cache``, from which a refused upload is deleted at once, an added one once it is
copied into the adapter folder, and one only inspected when its page uploads another or after an hour at most
(:mod:`~difflora.webui.page` says what else is kept there, and for how long). Values Gradio itself refuses (a
dropdown value not among the choices, a number out of its field's range) are logged as one line. One lock guards
the pipeline: each request sets the whole adapter mix it needs under the lock, then generates, so concurrent users
queue and never see each other's weights.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from .._entry import OneLineErrorParser, add_model_options, quiet_libraries, run_main
from ..errors import InvalidArgumentError
from .library import AdapterLibrary, FileKey, resolve_inside
from .requests import (
    MODEL_SCHEDULER,
    SCHEDULERS,
    SLOT_COUNT,
    AdapterSlot,
    BlendRequest,
    GenerateRequest,
    TrainRequest,
    more_training_options,
    parse_prompt_loras,
)
from .session import BLEND_PREVIEW_ADAPTER, GenerateResult, SavedBlend, WebUISession
from .training_job import TrainingJob, TrainingStatus

if TYPE_CHECKING:
    import gradio

__all__ = [
    "BLEND_PREVIEW_ADAPTER",
    "MODEL_SCHEDULER",
    "SCHEDULERS",
    "SLOT_COUNT",
    "AdapterLibrary",
    "AdapterSlot",
    "BlendRequest",
    "FileKey",
    "GenerateRequest",
    "GenerateResult",
    "SavedBlend",
    "TrainRequest",
    "TrainingJob",
    "TrainingStatus",
    "WebUISession",
    "build_app",
    "build_parser",
    "main",
    "more_training_options",
    "parse_prompt_loras",
    "resolve_inside",
]

logger = logging.getLogger(__name__)


def build_app(session: WebUISession) -> gradio.Blocks:
    """The Gradio page for ``session`` (see :func:`difflora.webui.page.build_app`); needs gradio."""
    return _page().build_app(session)


def _page() -> ModuleType:
    """:mod:`difflora.webui.page`, which imports gradio (as the tabs' modules do); without it, a one-line error."""
    try:
        from . import page
    except ImportError as error:
        if (error.name or "").startswith("difflora"):
            raise  # a fault of difflora itself, not a missing package
        raise InvalidArgumentError("the web UI needs gradio: pip install 'difflora[webui]'") from None
    return page


def build_parser(prog: str = "difflora webui") -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog=prog, description="Start the difflora web UI (Gradio) on one model and one adapter folder."
    )
    add_model_options(parser)
    parser.add_argument("--lora-dir", required=True,
                        help="adapter folder: the only place the UI reads adapters from and writes files to")
    parser.add_argument("--data-root", default=None, metavar="DIR",
                        help="folder holding the training datasets: the Train tab offers its folders and reads "
                             "(never writes) only folders inside it (default: the --lora-dir)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``difflora webui``: parse options, load the model, serve until Ctrl-C. Bad input: one line, exit code 2."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    return run_main(lambda: _serve(args), parser)


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    # Gradio keeps uploads and copies of served files in a cache folder; keep it inside the adapter folder too, so
    # the UI writes nowhere else (a hidden folder: the adapter list shows top-level *.safetensors only).
    lora_dir = Path(args.lora_dir).expanduser()
    if lora_dir.is_dir():
        os.environ.setdefault("GRADIO_TEMP_DIR", str(lora_dir.resolve() / ".gradio-cache"))
    page = _page()  # before the (slow) model load
    quiet_libraries()
    app = page.build_app(WebUISession.open(args.model, args.lora_dir, device=args.device, dtype=args.dtype,
                                           model_config=args.model_config, data_root=args.data_root))
    try:
        app.launch(server_name=args.host, server_port=args.port, share=args.share, ssr_mode=False)
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
    return 0
