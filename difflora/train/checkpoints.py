"""Resumable training checkpoints on accelerate's ``save_state``/``load_state``.

A checkpoint holds the optimizer, the learning-rate schedule, every process's RNG states, difflora's noise
generator and the adapter, but not the frozen base model: accelerate's save hook writes only the adapter file.
Checkpoints are written to a temporary folder and renamed, so an interrupted save never looks like a checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from ..errors import InvalidArgumentError
from ..formats import read_adapter
from .config import config_options, config_to_dict

__all__ = ["CheckpointManager", "changed_options"]

logger = logging.getLogger("difflora.train")

# Options a run could not set before they were recorded: a checkpoint without them ran with their defaults.
_RECORDED_SINCE_SETTABLE = ("bucket_step", "min_bucket_side", "max_bucket_side", "algo", "targets", "conv_rank",
                            "conv_alpha", "dora", "lokr_factor")


def changed_options(saved: dict, current: dict) -> list[str]:
    """``"name: saved → current"`` for each option that shapes the result (see :mod:`.config`) and differs between a
    checkpoint's config and this run's. An option the checkpoint does not know counts as changed, unless older runs
    could not set it and so ran with its default."""
    options = config_options()
    saved = {**{name: options[name].default for name in _RECORDED_SINCE_SETTABLE}, **saved}
    return [
        f"{name}: {saved.get(name, 'unset')!s} → {value!s}"
        for name, value in current.items()
        if (name not in options or options[name].shapes_result) and (name not in saved or not _same(saved[name], value))
    ]


def _same(saved: object, current: object) -> bool:
    # Paths are recorded as the user typed them (older checkpoints) or normalised (``./imgs/`` → ``imgs``).
    if isinstance(saved, str) and isinstance(current, str):
        return saved == current or Path(saved) == Path(current)
    return saved == current


_NAME = re.compile(r"^checkpoint-(\d+)$")
_ADAPTER_FILE = "adapter.safetensors"
_STEP_FILE = "difflora_step.json"


class CheckpointManager:
    def __init__(self, accelerator, runtime, config, random_state) -> None:
        self.accelerator = accelerator
        self.runtime = runtime
        self.config = config
        self.folder = Path(config.output) / "checkpoints"
        accelerator.register_for_checkpointing(random_state)
        accelerator.register_save_state_pre_hook(self._save_adapter_only)
        accelerator.register_load_state_pre_hook(self._load_adapter_only)

    # accelerate hooks: replace the full-model state dicts by the adapter file.
    def _save_adapter_only(self, models, weights, output_dir) -> None:
        if self.accelerator.is_main_process:
            self.runtime.save(self.config.name, Path(output_dir) / _ADAPTER_FILE)
        weights.clear()

    def _load_adapter_only(self, models, input_dir) -> None:
        self.runtime.copy_into(self.config.name, read_adapter(Path(input_dir) / _ADAPTER_FILE))
        models.clear()

    def checkpoints(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir()
                 if (m := _NAME.match(p.name)) and (p / _STEP_FILE).is_file()]
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, step: int) -> Path:
        final = self.folder / f"checkpoint-{step:06d}"
        staging = self.folder / f".checkpoint-{step:06d}.tmp"
        if self.accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(staging))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            (staging / _STEP_FILE).write_text(json.dumps({"step": step, "config": config_to_dict(self.config)}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            self._prune()
        self.accelerator.wait_for_everyone()
        return final

    def _prune(self) -> None:
        limit = self.config.checkpoints_total_limit
        if limit:
            for old in self.checkpoints()[:-limit]:
                shutil.rmtree(old, ignore_errors=True)

    def resume(self) -> int:
        """Load ``config.resume`` (``latest`` or a folder); return the step it was saved at."""
        wanted = self.config.resume
        path = self.latest() if wanted == "latest" else Path(wanted)
        if path is None:
            raise InvalidArgumentError(f"resume latest: no checkpoint in {self.folder}", "resume")
        if not (path / _STEP_FILE).is_file():
            raise InvalidArgumentError(f"resume {wanted}: {path} is not a difflora checkpoint (no {_STEP_FILE})",
                                       "resume")
        saved = json.loads((path / _STEP_FILE).read_text())
        changed = changed_options(saved["config"], config_to_dict(self.config)) if "config" in saved else []
        if changed and self.accelerator.is_main_process:
            # A warning, not an error: changing e.g. the learning rate on resume can be meant.
            logger.warning("resuming %s with options that differ from its run (%s): the result will not be the "
                           "uninterrupted run's", path, "; ".join(changed))
        self.accelerator.load_state(str(path))
        return saved["step"]
