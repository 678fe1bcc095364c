"""The web UI's one pipeline, its LoRA runtime and its lock: every action of the page is one method here.

:class:`WebUISession` calls the same library functions the CLI calls (``generate``, ``blend``, ``read_adapter``,
``write_adapter``, ``describe_adapter``). One lock guards the pipeline: each request sets the whole adapter mix it
needs under the lock, then generates, so concurrent users queue and never see each other's weights. Adapter files
stay loaded in the runtime (disabled when not asked for), so moving a weight slider sets a number and reads no file.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import os
import random
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._files import atomic_path
from ..adapter import AdapterState
from ..blend import BlendResult, blend, scale_adapter
from ..blocks import BlockWeights
from ..errors import AdapterFileError, DiffloraError, InvalidArgumentError
from ..extract import layer_weights
from ..formats import WRITE_LAYOUTS, read_adapter, write_adapter
from ..generate import AdapterUse, GenerationSettings, generate, save_png
from ..keys import ADAPTER_SUFFIX, adapter_name_from_path
from ..reports import describe_adapter, error_summary, worst_modules
from ..runtime import AdapterInfo, LoRARuntime
from .library import OUTPUTS_FOLDER, AdapterLibrary, FileKey, adapter_file_name, existing_folder, resolve_inside
from .requests import MODEL_SCHEDULER, SCHEDULERS, AdapterSlot, BlendRequest, GenerateRequest, parse_prompt_loras
from .training_job import TrainingJob

if TYPE_CHECKING:
    from PIL import Image

_NOT_IN_A_PAGE_NAME = re.compile(r"[^A-Za-z0-9_-]")

__all__ = ["BLEND_PREVIEW_ADAPTER", "GenerateResult", "SavedBlend", "WebUISession", "error_report"]

BLEND_PREVIEW_ADAPTER = "__blend_preview__"  # the runtime name of a blend while it is previewed
MAX_CACHED_ADAPTERS = 8  # loaded files kept in the runtime (disabled) after they leave the mix


@dataclass
class GenerateResult:
    files: list[Path]
    seed: int
    prompt: str  # as the model saw it, <lora:…> tags removed
    scheduler: str
    adapters: list[AdapterUse]


@dataclass
class SavedBlend:
    path: Path
    report: str  # Markdown: where it went and the per-module error summary


def error_report(result: BlendResult, method: str) -> str:
    """Markdown summary of a blend's per-module relative errors ‖ΔW_exact − ΔW_result‖ / ‖ΔW_exact‖."""
    lines = [error_summary(result.relative_errors)]
    if result.relative_errors and result.max_relative_error == 0.0:
        lines.append(f"({method} is exact here: the blend equals the weighted sum of the adapters)")
    elif result.relative_errors:
        lines += ["", "| module | relative error |", "| --- | --- |"]
        lines += [f"| `{module}` | {error:.3e} |" for module, error in worst_modules(result.relative_errors)]
    return "\n".join(lines)


@dataclass
class _LoadedFile:
    adapter: str  # its name in the runtime
    key: FileKey


class WebUISession:
    """The pipeline, its LoRA runtime, the adapter folder and the training job behind one web UI.

    Every method that touches the pipeline takes :attr:`lock`, sets the full adapter mix it needs and only then
    generates, so requests from several browser tabs cannot mix their adapters.
    """

    def __init__(self, pipe, lora_dir: str | os.PathLike, model_label: str = "embedded",
                 model_config: str | None = None, data_root: str | os.PathLike | None = None) -> None:
        self.pipe = pipe
        self.runtime = LoRARuntime.attach(pipe)
        self.library = AdapterLibrary(lora_dir)
        self.model_label = model_label
        self.lock = threading.Lock()
        self.native_size = int(pipe.unet.config.sample_size * getattr(pipe, "vae_scale_factor", 8))
        self._model_scheduler = pipe.scheduler
        self._schedulers: dict[str, Any] = {MODEL_SCHEDULER: pipe.scheduler}
        # file name → runtime adapter, most recently used last; reloaded only when the file's FileKey changes
        self._loaded: collections.OrderedDict[str, _LoadedFile] = collections.OrderedDict()
        self.training = TrainingJob(self.library, model_label, model_config, native_size=self.native_size,
                                    data_root=data_root)

    @classmethod
    def open(cls, model: str, lora_dir: str | os.PathLike, *, device: str = "auto", dtype: str = "auto",
             model_config: str | None = None, data_root: str | os.PathLike | None = None) -> WebUISession:
        """Load ``model`` (as ``--model`` names it) and start a session on ``lora_dir``, training on datasets
        inside ``data_root`` (``lora_dir`` when not given)."""
        from ..pipelines import load_pipeline, resolve_device, resolve_dtype

        AdapterLibrary(lora_dir)  # a missing folder fails before the (slow) model load
        if data_root is not None:
            existing_folder(data_root, "data_root")
        resolved_device = resolve_device(device)
        pipe = load_pipeline(model, device=resolved_device, dtype=resolve_dtype(dtype, resolved_device),
                             model_config=model_config, quiet=True)
        return cls(pipe, lora_dir, model_label=str(model), model_config=model_config, data_root=data_root)

    @property
    def root(self) -> Path:
        return self.library.root

    @property
    def outputs_dir(self) -> Path:
        return self.root / OUTPUTS_FOLDER

    # ----- the adapter mix (every method here is called with the lock held) -------------------------------------
    def _adapter_name_for(self, file: str) -> str:
        """A runtime name for a file: the name ``keys.adapter_name_from_path`` gives it, as one plain word (it is
        shown in the page's Markdown status lines), made unique."""
        base = _NOT_IN_A_PAGE_NAME.sub("_", adapter_name_from_path(self.root / file))
        taken = {loaded.adapter for name, loaded in self._loaded.items() if name != file} | {BLEND_PREVIEW_ADAPTER}
        name, number = base, 2
        while name in taken:
            name, number = f"{base}_{number}", number + 1
        return name

    def _ensure_loaded(self, file: str) -> str:
        """The runtime name of ``file``, reading it only if it is new or changed since it was loaded."""
        path = self.library.path_of(file)
        key = FileKey.of(path)
        loaded = self._loaded.get(file)
        if loaded is not None and loaded.key == key and loaded.adapter in self.runtime.adapters:
            self._loaded.move_to_end(file)
            return loaded.adapter
        name = loaded.adapter if loaded is not None else self._adapter_name_for(file)
        state = read_adapter(path)
        self.runtime.add_adapter(name, state, weight=0.0, source=str(path), replace_existing=True)
        self._loaded[file] = _LoadedFile(name, key)
        self._loaded.move_to_end(file)
        return name

    def _checked_slots(self, slots: list[AdapterSlot]) -> list[tuple[AdapterSlot, BlockWeights]]:
        """Each slot with its parsed block weights, refusing repeated files, bad names and bad block weights before
        anything changes; a bad number is told by the slot's own field. (Each slot checked its weight when it was
        made: :class:`AdapterSlot`.)"""
        files = [slot.file for slot in slots]
        repeated = sorted({file for file in files if files.count(file) > 1})
        if repeated:
            raise InvalidArgumentError(f"adapter {repeated[0]} is selected twice (slots or <lora:…> tags); use it once")
        checked = [(slot, _parsed_block_weights(slot)) for slot in slots]
        for slot, _ in checked:
            self.library.path_of(slot.file)
        return checked

    def _apply_mix(self, slots: list[AdapterSlot], fuse: bool) -> list[AdapterUse]:
        """Make the runtime hold exactly ``slots``: load new files, set numbers on loaded ones, disable the rest.

        Only what differs is changed (a changed number costs a float per branch, no file is read), so an unchanged
        mix stays fused between requests. A mix the model's dtype cannot hold (:meth:`LoRARuntime.check_mix`, which
        :func:`~difflora.generate.generate` would refuse) is refused here, told by the slot of the adapter at fault,
        and the mix before is put back.
        """
        checked = self._checked_slots(slots)
        if BLEND_PREVIEW_ADAPTER in self.runtime.adapters:
            self.runtime.remove(BLEND_PREVIEW_ADAPTER)
        # All or nothing: a number the runtime refuses (or a mix too large to fuse) puts the mix back as it was;
        # files loaded for this request stay loaded, disabled.
        before, was_fused = self.runtime.adapters, self.runtime.fused
        wanted: dict[str, tuple[AdapterSlot, BlockWeights]] = {}
        uses = []
        try:
            for slot, block_weights in checked:
                if not slot.enabled:
                    continue  # off: it stays disabled (or unloaded) like every adapter not asked for
                name = self._ensure_loaded(slot.file)
                wanted[name] = (slot, block_weights)
                shown_blocks = None if block_weights.is_identity else str(block_weights)
                uses.append(AdapterUse(name, float(slot.weight), slot.file, shown_blocks))
            self._set_runtime_mix(wanted)
            with _told_by_adapter(wanted):
                self.runtime.check_mix()
            # Before fusing, which a removal would undo and redo; the adapters of the mix before stay for now, in
            # case it must be put back.
            self._forget_old_files(keep=set(wanted) | {name for name, info in before.items() if info.enabled})
            if fuse and wanted and not self.runtime.fused:
                with _told_by_adapter(wanted):
                    self.runtime.fuse()
            elif not fuse and self.runtime.fused:
                self.runtime.unfuse()
        except DiffloraError:
            self._restore_mix(before, was_fused)
            raise
        return uses

    def _set_runtime_mix(self, wanted: dict[str, tuple[AdapterSlot, BlockWeights]]) -> None:
        """Enable ``wanted`` (runtime name → its slot, block weights) at the slot's numbers and disable every other
        adapter; a number the runtime refuses is told by its slot's field."""
        before, was_fused = self.runtime.adapters, self.runtime.fused
        changes: list[tuple[AdapterSlot | None, str, Callable[[], None]]] = []  # (slot, the part it sets, change)
        for name, info in before.items():
            if name not in wanted:
                if info.enabled:
                    changes.append((None, "", functools.partial(self.runtime.disable, name)))
                continue
            slot, block_weights = wanted[name]
            if info.weight != float(slot.weight):
                changes.append((slot, "weight", functools.partial(self.runtime.set_weight, name, float(slot.weight))))
            if info.block_weights != block_weights:
                changes.append((slot, "block_weights",
                                functools.partial(self.runtime.set_block_weights, name, block_weights)))
            if not info.enabled:
                changes.append((None, "", functools.partial(self.runtime.enable, name)))
        if changes and was_fused:
            self.runtime.unfuse()  # once, rather than an unfuse and fuse around every single change
        for slot, part, change in changes:
            if slot is None:
                change()
                continue
            with _told_as(slot, part):
                change()

    def _restore_mix(self, before: dict[str, AdapterInfo], was_fused: bool) -> None:
        """Put back the numbers of ``before`` (the runtime's adapters as they were), and fusing."""
        for name, info in self.runtime.adapters.items():
            old = before.get(name)
            if old is None:
                self.runtime.disable(name)
                continue
            if info.weight != old.weight:
                self.runtime.set_weight(name, old.weight)
            if info.block_weights != old.block_weights:
                self.runtime.set_block_weights(name, old.block_weights)
            if info.enabled != old.enabled:
                self.runtime.enable(name, old.enabled)
        if was_fused and not self.runtime.fused:
            self.runtime.fuse()

    def _forget_old_files(self, keep: set[str]) -> None:
        """Remove the least recently used files from the runtime beyond ``MAX_CACHED_ADAPTERS``, and vanished ones."""
        for file, loaded in list(self._loaded.items()):
            gone = not (self.root / file).is_file()
            over = len(self._loaded) > MAX_CACHED_ADAPTERS
            if loaded.adapter not in keep and (gone or over):
                if loaded.adapter in self.runtime.adapters:
                    self.runtime.remove(loaded.adapter)
                del self._loaded[file]

    def _use_scheduler(self, label: str) -> str:
        """Put the scheduler named ``label`` on the pipeline (built once from the model's own config)."""
        if label not in SCHEDULERS:
            raise InvalidArgumentError(f"scheduler {label!r} is not one of {', '.join(SCHEDULERS)}", "scheduler")
        if label not in self._schedulers:
            import diffusers

            scheduler_class = getattr(diffusers, SCHEDULERS[label])
            self._schedulers[label] = scheduler_class.from_config(self._model_scheduler.config)
        self.pipe.scheduler = self._schedulers[label]
        return type(self.pipe.scheduler).__name__

    def _settings(self, request: GenerateRequest, prompt: str) -> GenerationSettings:
        seed = random.SystemRandom().randrange(2**31) if request.random_seed else request.seed
        settings = GenerationSettings(
            prompt=prompt,
            negative_prompt=request.negative_prompt,
            steps=request.steps,
            guidance=request.guidance,
            seed=seed,
            width=request.width or self.native_size,
            height=request.height or self.native_size,
            num_images=request.num_images,
        )
        settings.validate()
        return settings

    # ----- actions -----------------------------------------------------------------------------------------------
    def generate(self, request: GenerateRequest, progress: Callable[[int, int], None] | None = None) -> GenerateResult:
        """Generate with the request's adapters (slots and ``<lora:…>`` prompt tags); save each image as a PNG in
        ``<lora-dir>/outputs/`` carrying the settings and the adapter mix."""
        prompt, tagged = parse_prompt_loras(request.prompt)
        settings = self._settings(request, prompt)
        with self.lock:
            uses = self._apply_mix(request.adapters + tagged, request.fuse)
            scheduler = self._use_scheduler(request.scheduler)
            images = generate(self.pipe, settings, callback=progress)
            files = []
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for index, image in enumerate(images):
                path = self._free_output_path(f"{stamp}-{settings.seed}-{index}")
                save_png(image, path, settings, model=self.model_label, scheduler=scheduler, adapters=uses)
                files.append(path)
        return GenerateResult(files, settings.seed, prompt, scheduler, uses)

    def _free_output_path(self, stem: str) -> Path:
        path, number = self.outputs_dir / f"{stem}.png", 1
        while path.exists():
            path, number = self.outputs_dir / f"{stem}-{number}.png", number + 1
        return path

    def blend(self, request: BlendRequest) -> BlendResult:
        """The weighted blend of the request's files (read fresh: blending is an explicit, rare action)."""
        if not request.adapters:
            raise InvalidArgumentError("blend: choose at least one adapter")
        states = []
        for slot, block_weights in [(slot, _parsed_block_weights(slot)) for slot in request.adapters]:
            state = read_adapter(self.library.path_of(slot.file))
            if not block_weights.is_identity:  # the row's block weights, as the Generate tab would apply them
                with _told_as(slot, "block_weights"):
                    block_weights.check_blocks(self.runtime.unet_blocks())
                    state = scale_adapter(state, 1.0, block_weights)
            states.append((state, slot.weight))
        options = {"method": request.method, "rank": request.rank, "density": request.density}
        dora = {key for state, _ in states for key, module in state.modules.items() if module.dora_scale is not None}
        if dora:  # DoRA's change depends on the base weights: the model's own (blend refuses DoRA without them)
            options["base_weights"] = self._base_weights(dora)
        return blend(states, **options)

    def _base_weights(self, module_keys: set[str]) -> dict[str, torch.Tensor]:
        """The model's own weights of the layers ``module_keys`` name, copied under the lock (unfused first: a fused
        mix is in the weights; the next generation fuses it again when asked)."""
        with self.lock:
            if self.runtime.fused:
                self.runtime.unfuse()
            return {key: weight.clone() for key, weight in layer_weights(self.runtime.components, module_keys).items()}

    def preview_blend(self, request: BlendRequest, generation: GenerateRequest,
                      progress: Callable[[int, int], None] | None = None) -> tuple[Image.Image, int, str]:
        """One image of the blend alone (other adapters and prompt tags off) with the Generate tab's settings, its
        seed, and the blend's per-module error (:func:`error_report`).

        The blend is added to the runtime under a temporary name for this image and removed afterwards.
        """
        result = self.blend(request)
        prompt, _ = parse_prompt_loras(generation.prompt)
        settings = dataclasses.replace(self._settings(generation, prompt), num_images=1)
        with self.lock:
            self._apply_mix([], fuse=False)
            self._use_scheduler(generation.scheduler)
            self.runtime.add_adapter(BLEND_PREVIEW_ADAPTER, result.state, 1.0, source="blend preview")
            try:
                image = generate(self.pipe, settings, callback=progress)[0]
            finally:
                self.runtime.remove(BLEND_PREVIEW_ADAPTER)
        return image, settings.seed, error_report(result, request.method)

    def save_blend(self, request: BlendRequest, name: str, layout: str = "difflora") -> SavedBlend:
        """Write the blend into the adapter folder as ``name`` (an existing file is never overwritten)."""
        if layout not in WRITE_LAYOUTS:
            raise InvalidArgumentError(f"layout {layout!r} is not one of {', '.join(WRITE_LAYOUTS)}", "layout")
        file = adapter_file_name(name, "blend name")
        path = resolve_inside(self.root, file, "blend name")
        if path.exists():
            raise InvalidArgumentError(f"{file} already exists in the adapter folder; choose another name")
        result = self.blend(request)
        sources = ", ".join(f"{slot.file}:{slot.weight:g}" + (f" ({slot.block_weights.strip()})"
                                                               if slot.block_weights.strip() else "")
                            for slot in request.adapters)
        write_adapter(result.state, path, {"difflora.blend_sources": sources}, layout=layout)
        report = f"Saved `{file}` ({layout} format) in the adapter folder.\n\n" + error_report(result, request.method)
        return SavedBlend(path, report)

    def inspect(self, name: str) -> dict:
        """``describe_adapter`` of a file of the adapter folder, with its trigger words."""
        return describe_adapter(read_adapter(self.library.path_of(name, "inspect")))

    def inspect_upload(self, uploaded: str | os.PathLike) -> dict:
        """``describe_adapter`` of an uploaded file; anything but a safetensors LoRA file is refused."""
        return describe_adapter(_read_upload(Path(uploaded)))

    def add_upload(self, uploaded: str | os.PathLike, name: str | None = None) -> str:
        """Copy an uploaded adapter into the adapter folder after reading it as a LoRA file; returns its file name."""
        uploaded = Path(uploaded)
        _read_upload(uploaded)
        file = adapter_file_name(name or uploaded.name, "upload")
        path = resolve_inside(self.root, file, "upload")
        if path.exists():
            raise InvalidArgumentError(f"{file} already exists in the adapter folder; rename the upload")
        with atomic_path(path) as temporary:
            shutil.copyfile(uploaded, temporary)
        return file


def _parsed_block_weights(slot: AdapterSlot) -> BlockWeights:
    """The slot's block weights parsed (none: 1 everywhere), a bad one told by the slot's own field."""
    if not (slot.block_weights and slot.block_weights.strip()):
        return BlockWeights()
    with _told_as(slot, "block_weights"):
        return BlockWeights.parse(slot.block_weights, "block_weights")


@contextlib.contextmanager
def _told_as(slot: AdapterSlot, part: str) -> Iterator[None]:
    """Errors raised inside, about ``slot``'s ``part``, told by the slot's own field (:meth:`AdapterSlot.told`)."""
    try:
        yield
    except DiffloraError as error:
        raise slot.told(error, part) from None


@contextlib.contextmanager
def _told_by_adapter(wanted: dict[str, tuple[AdapterSlot, BlockWeights]]) -> Iterator[None]:
    """Errors raised inside about the weight of one adapter of the mix (the runtime's range check names it:
    ``weight of adapter 'x' is too large …``), told by the slot that asked for it; others as they are."""
    try:
        yield
    except DiffloraError as error:
        if error.parameter == "weight":
            for name, (slot, _) in wanted.items():
                if f"adapter {name!r}" in str(error):
                    raise slot.told(error, "weight") from None
        raise


def _read_upload(path: Path) -> AdapterState:
    """Read an upload as a LoRA file. Only ``.safetensors`` is accepted: a pickle is refused before it is opened."""
    if path.suffix.lower() != ADAPTER_SUFFIX:
        raise AdapterFileError(
            f"upload {path.name}: only .safetensors adapter files are accepted (pickles are refused)"
        )
    try:
        return read_adapter(path)
    except AdapterFileError as error:
        # Name the upload, not the server's temporary copy of it.
        message = str(error).replace(str(path), "").lstrip(": ")
        raise AdapterFileError(f"upload {path.name} refused: {message}") from None
