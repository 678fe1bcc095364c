"""Training from the web UI: at most one :func:`difflora.train.train` run at a time, in a background thread.

The run reads its dataset from a folder inside the data root (``--data-root``, or the adapter folder when none is
given), writes its folder ``<lora-dir>/training/<name>/`` (config, logs, validation images) and, when it finishes,
its adapter is copied atomically to ``<lora-dir>/<name>.safetensors``, where the adapter lists find it. The page polls
:meth:`TrainingJob.status`; nothing here knows about Gradio.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from .._files import atomic_path
from ..errors import DiffloraError, InvalidArgumentError
from ..keys import ADAPTER_SUFFIX
from .library import OUTPUTS_FOLDER, TRAINING_FOLDER, AdapterLibrary, adapter_file_name, existing_folder, resolve_inside
from .requests import TrainRequest

__all__ = ["TrainingJob", "TrainingStatus"]

logger = logging.getLogger(__name__)


@dataclass
class TrainingStatus:
    state: str  # "idle", "running", "finished" or "failed"
    name: str | None = None
    step: int = 0
    total: int = 0
    loss: float | None = None
    message: str = "No training run yet."
    adapter_file: str | None = None
    preview: Path | None = None
    finished_runs: int = 0  # goes up when a run ends, so the page knows to refresh its adapter lists
    error: DiffloraError | None = None  # why a run failed on bad input, for the page to word by its fields


class TrainingJob:
    """At most one :func:`difflora.train.train` run at a time, in a background thread, with its progress.

    The run writes its folder ``<lora-dir>/training/<name>/`` (config, logs, validation images) and, when it
    finishes, its adapter is copied atomically to ``<lora-dir>/<name>.safetensors``.
    """

    def __init__(self, library: AdapterLibrary, model: str, model_config: str | None = None,
                 native_size: int = 0, data_root: str | os.PathLike | None = None) -> None:
        self.library = library
        self.model = model
        self.model_config = model_config
        self.native_size = native_size
        # Datasets are read from inside this folder only (the adapter folder when none is given), as files are
        # written inside the adapter folder only: a page must not turn the server's other folders into training data.
        self.data_root = existing_folder(data_root, "data_root") if data_root is not None else library.root
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._status = TrainingStatus("idle")

    @property
    def data_place(self) -> str:
        """How messages and the page call :attr:`data_root`."""
        return "the adapter folder" if self.data_root == self.library.root else "the data root"

    def dataset_folder(self, text: str) -> Path:
        """The folder ``text`` names inside :attr:`data_root`: relative to it, or absolute and inside it; folders
        whose real path (symlinks followed) leaves it are refused. It must exist."""
        text = (text or "").strip()
        if not text:
            raise InvalidArgumentError("dataset folder: choose or type the folder holding the training images")
        folder = resolve_inside(self.data_root, text, "dataset folder", place=self.data_place, absolute=True)
        if not folder.is_dir():
            raise InvalidArgumentError(f"dataset folder {text!r}: no such folder in {self.data_place} {self.data_root}")
        return folder

    def dataset_folders(self) -> list[str]:
        """The folders at the top of :attr:`data_root`, sorted, for the page to offer; hidden folders, the UI's own
        folders (outputs, training runs) and symlinks that lead out are not listed."""
        own = {OUTPUTS_FOLDER, TRAINING_FOLDER} if self.data_root == self.library.root else set()
        found = []
        for entry in self.data_root.iterdir():
            if entry.name.startswith(".") or entry.name in own:
                continue
            try:
                if resolve_inside(self.data_root, entry.name, place=self.data_place).is_dir():
                    found.append(entry.name)
            except InvalidArgumentError:
                continue
        return sorted(found, key=str.lower)

    def _config(self, request: TrainRequest):
        from ..train import make_config

        name = (request.name or "").strip()
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise InvalidArgumentError(f"adapter name {name!r}: use letters, digits, '-' and '_' only")
        adapter_file = adapter_file_name(name, "adapter name")
        if resolve_inside(self.library.root, adapter_file, "adapter name").exists():
            raise InvalidArgumentError(f"{adapter_file} already exists in the adapter folder; choose another name")
        output = resolve_inside(self.library.root, f"{TRAINING_FOLDER}/{name}", "training folder")
        options = {
            "model": self.model,
            "model_config": self.model_config,
            "data": str(self.dataset_folder(request.dataset)),
            "output": str(output),
            "name": name,
            **request.options(self.native_size),
            "report_to": "none",  # TensorBoard is an optional extra; the page shows the progress
        }
        return make_config(options)

    def start(self, request: TrainRequest) -> TrainingStatus:
        """Check the request and start training in a background thread.

        Raises:
            InvalidArgumentError: a run is already in progress, or an option, name or folder cannot be used.
        """
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                raise InvalidArgumentError(
                    f"a training run is already in progress ({self._status.name}); wait for it to finish"
                )
            config = self._config(request)
            self._status = TrainingStatus("running", name=config.name, total=config.steps,
                                          message=f"training {config.name}: loading the model…",
                                          finished_runs=self._status.finished_runs)
            self._thread = threading.Thread(target=self._run, args=(config,), name="difflora-training", daemon=True)
            self._thread.start()
            return self.status()

    def _run(self, config) -> None:
        from ..train import train

        def on_step(step: int, total: int, loss: float) -> None:
            self._update(step=step, total=total, loss=loss, message=f"training {config.name}: step {step}/{total}")

        try:
            result = train(config, progress=on_step)
            if result.adapter_path is None:
                raise InvalidArgumentError(f"training stopped at step {result.steps} before the end")
            adapter_file = f"{config.name}{ADAPTER_SUFFIX}"
            with atomic_path(self.library.root / adapter_file) as temporary:
                shutil.copyfile(result.adapter_path, temporary)
            message = f"finished: {adapter_file}"
            if result.losses:
                message = (f"finished: {adapter_file} is in the adapter list ({result.steps} steps, "
                           f"last loss {result.losses[-1]:.4f})")
            self._update(state="finished", adapter_file=adapter_file, message=message)
        except DiffloraError as error:
            # A detached copy: the exception itself holds train()'s frames (model, optimizer, caches) in its
            # traceback, which would stay in memory until the next run.
            detached = DiffloraError(str(error), error.parameter)
            self._update(state="failed", message=f"training failed: {error}", error=detached)
        except Exception:
            logger.exception("training %s failed", config.name)
            self._update(state="failed", message="training failed on the server (details are in its log)")
        finally:
            with self._lock:
                if self._status.state == "running":  # e.g. KeyboardInterrupt
                    self._status = dataclasses.replace(self._status, state="failed", message="training stopped")
                self._status = dataclasses.replace(self._status, finished_runs=self._status.finished_runs + 1)

    def _update(self, **changes) -> None:
        with self._lock:
            self._status = dataclasses.replace(self._status, **changes)

    def status(self) -> TrainingStatus:
        """The current run's progress, with the newest validation image of the run if there is one."""
        status = self._status
        if status.name:
            previews = sorted((self.library.root / TRAINING_FOLDER / status.name / "validation").glob("step-*.png"))
            if previews:
                status = dataclasses.replace(status, preview=previews[-1])
        return status

    def wait(self, timeout: float | None = None) -> TrainingStatus:
        """Block until the current run ends (or ``timeout`` seconds pass); for scripts and tests."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.status()
