"""The difflora web UI: a Gradio page over the library, for people who would rather not type commands.

    difflora webui --model MODEL --lora-dir DIR [--host 127.0.0.1] [--port 7860] [--share]
    python webui/app.py --model MODEL --lora-dir DIR

The file is in three parts, read top to bottom:

1. :class:`AdapterLibrary` and :class:`WebUISession` (and :class:`TrainingJob`): plain Python with no Gradio in it.
   They hold the one pipeline and its :class:`~difflora.runtime.LoRARuntime`, and every action of the page is one
   of their methods, calling the same library functions the CLI calls. Tests call them directly.
2. :func:`build_app`: the Gradio Blocks page. Each callback turns form values into a request, calls one method,
   and turns a :class:`~difflora.errors.DiffloraError` into a one-line message in the page.
3. :func:`main`: options, loading the model, launching.

Safety: the server binds to 127.0.0.1 unless ``--host`` says otherwise and makes no public link unless ``--share``.
Every file it reads or writes by name is inside ``--lora-dir`` (``../x``, absolute paths and symlinks leading out
are refused); the one exception is a training dataset folder, which is only read. Uploads are accepted only when
:func:`~difflora.formats.read_adapter` reads them as safetensors LoRA files. One lock guards the pipeline: each
request sets the whole adapter mix it needs under the lock, then generates, so concurrent users queue and never see
each other's weights.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import logging
import os
import random
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._files import atomic_path
from ..blend import BLEND_METHODS, BlendResult, blend
from ..blocks import BlockWeights
from ..errors import AdapterFileError, DiffloraError, InvalidArgumentError, finite_number
from ..adapter import AdapterState
from ..formats import WRITE_LAYOUTS, read_adapter, write_adapter
from ..reports import describe_adapter, error_summary, summary_rows, worst_modules
from ..generate import AdapterUse, GenerationSettings, generate, save_png
from ..runtime import LoRARuntime

if TYPE_CHECKING:
    import gradio
    from PIL import Image

__all__ = [
    "SCHEDULERS",
    "SLOT_COUNT",
    "AdapterLibrary",
    "AdapterSlot",
    "BlendRequest",
    "GenerateRequest",
    "GenerateResult",
    "TrainRequest",
    "TrainingJob",
    "TrainingStatus",
    "WebUISession",
    "build_app",
    "main",
    "parse_prompt_loras",
    "resolve_inside",
]

logger = logging.getLogger("difflora.webui")

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
OUTPUTS_FOLDER = "outputs"  # generated PNGs, inside --lora-dir
TRAINING_FOLDER = "training"  # one folder per training run, inside --lora-dir
BLEND_PREVIEW_ADAPTER = "__blend_preview__"  # the runtime name of a blend while it is previewed
MAX_CACHED_ADAPTERS = 8  # loaded files kept in the runtime (disabled) after they leave the mix
ADAPTER_SUFFIX = ".safetensors"


# ----- files inside --lora-dir -------------------------------------------------------------------------------------


def resolve_inside(root: Path, name: str, what: str = "file") -> Path:
    """The real path of ``name`` (relative to ``root``), refusing anything that would lead outside ``root``.

    ``root`` must already be resolved. Refused: empty names, absolute paths, ``..`` parts, and names whose real path
    (symlinks followed) is not inside ``root``. The check is on the resolved path, so a symlink inside the folder
    pointing elsewhere is refused too.
    """
    if not isinstance(name, str) or not name.strip():
        raise InvalidArgumentError(f"{what}: no name given")
    if "\x00" in name:
        raise InvalidArgumentError(f"{what} {name!r}: refused, names cannot hold NUL characters")
    candidate = Path(name)
    if candidate.is_absolute() or candidate.drive:
        raise InvalidArgumentError(f"{what} {name!r}: refused, only names inside the adapter folder {root} are allowed")
    if ".." in candidate.parts:
        raise InvalidArgumentError(f"{what} {name!r}: refused, '..' would lead outside the adapter folder {root}")
    resolved = (root / candidate).resolve()
    if not resolved.is_relative_to(root):
        raise InvalidArgumentError(f"{what} {name!r}: refused, it leads outside the adapter folder {root} (symlink?)")
    return resolved


def _new_file_name(name: str, what: str) -> str:
    """A plain ``NAME.safetensors`` from what the user typed (the suffix is added when missing)."""
    name = (name or "").strip()
    if not name:
        raise InvalidArgumentError(f"{what}: type a file name")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise InvalidArgumentError(f"{what} {name!r}: refused, give a plain file name (no folders) inside the adapter folder")
    if not name.lower().endswith(ADAPTER_SUFFIX):
        if Path(name).suffix.lower() in (".bin", ".ckpt", ".pt", ".pth", ".pkl"):
            raise InvalidArgumentError(f"{what} {name!r}: adapters are written as .safetensors only")
        name += ADAPTER_SUFFIX
    return name


@dataclass(frozen=True)
class FileKey:
    """Identifies one version of a file without reading it: a changed file gets a new key and is read again."""

    path: str
    mtime_ns: int
    size: int

    @classmethod
    def of(cls, path: Path) -> FileKey:
        stat = path.stat()
        return cls(str(path), stat.st_mtime_ns, stat.st_size)


class AdapterLibrary:
    """The adapter files of ``--lora-dir`` (top level ``*.safetensors``), with a summary of each.

    Summaries (format, ranks, trigger words) are kept per :class:`FileKey`, so listing the folder again reads only
    files that are new or changed.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise InvalidArgumentError(f"--lora-dir {root}: no such folder (create it first)")
        self._summaries: dict[FileKey, dict] = {}

    def path_of(self, name: str, what: str = "adapter") -> Path:
        """The real path of an existing adapter file ``name`` inside the folder."""
        path = resolve_inside(self.root, name, what)
        if not path.is_file():
            raise AdapterFileError(f"{what} {name!r}: no such file in the adapter folder {self.root}")
        return path

    def names(self) -> list[str]:
        """File names of the adapters, sorted; files (or symlinks) whose real path leaves the folder are not listed."""
        found = []
        for entry in self.root.iterdir():
            if entry.suffix.lower() != ADAPTER_SUFFIX or entry.name.startswith("."):
                continue
            try:
                if resolve_inside(self.root, entry.name).is_file():
                    found.append(entry.name)
            except InvalidArgumentError:
                continue
        return sorted(found, key=str.lower)

    def summary(self, name: str) -> dict:
        """``describe_adapter`` of the file plus its trigger words; an unreadable file gets ``{"error": message}``."""
        path = self.path_of(name)
        key = FileKey.of(path)
        if key not in self._summaries:
            try:
                summary = describe_adapter(read_adapter(path))
            except DiffloraError as error:
                summary = {"error": str(error)}
            self._summaries[key] = summary
        return self._summaries[key]

    def table(self) -> str:
        """The adapter list as a Markdown table: file, format, rank(s), trigger words."""
        names = self.names()
        if not names:
            return f"No adapters in `{self.root}` yet: add `.safetensors` files there, train one, or save a blend."
        rows = ["| file | format | rank(s) | trigger words |", "| --- | --- | --- | --- |"]
        for name in names:
            summary = self.summary(name)
            if "error" in summary:
                rows.append(f"| {_cell(name)} | unreadable | | {_cell(summary['error'])} |")
            else:
                ranks = ", ".join(map(str, summary["ranks"]))
                rows.append(f"| {_cell(name)} | {summary['format']} | {ranks} | {_cell(', '.join(summary['trigger_words']))} |")
        return "\n".join(rows)


def _cell(text: str) -> str:
    """Text made safe for one Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


# ----- requests ------------------------------------------------------------------------------------------------------


@dataclass
class AdapterSlot:
    """One adapter row of the page: a file of the adapter folder, its weight, on/off, and optional block weights."""

    file: str | None
    weight: float = 1.0
    enabled: bool = True
    block_weights: str = ""


_PROMPT_LORA = re.compile(r"<lora:([^:<>]+)(?::([^:<>]*))?>", re.IGNORECASE)


def parse_prompt_loras(prompt: str) -> tuple[str, list[AdapterSlot]]:
    """Take ``<lora:name:weight>`` tags (AUTOMATIC1111's syntax) out of a prompt.

    Returns the prompt the model sees (tags removed, spaces tidied) and one slot per tag; ``name`` is a file of the
    adapter folder with or without ``.safetensors``, ``weight`` defaults to 1.
    """
    slots = []
    for match in _PROMPT_LORA.finditer(prompt):
        name, weight_text = match.group(1).strip(), (match.group(2) or "").strip()
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            raise InvalidArgumentError(f"prompt tag {match.group(0)}: weight {weight_text!r} is not a number") from None
        file = name if name.lower().endswith(ADAPTER_SUFFIX) else name + ADAPTER_SUFFIX
        slots.append(AdapterSlot(file, weight))
    text = _PROMPT_LORA.sub(" ", prompt)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" +([,.;])", r"\1", text)
    return text.strip(), slots


def _as_int(value: Any, option: str, minimum: int = 0) -> int:
    """An integer from a form value (Gradio sends numbers as floats), at least ``minimum``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{option} must be a whole number, got {value!r}") from None
    if number != int(number) or number < minimum:
        raise InvalidArgumentError(f"{option} must be a whole number >= {minimum}, got {value!r}")
    return int(number)


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
        expected = len(cls.FORM_FIELDS) + SLOT_COUNT * len(cls.SLOT_FIELDS)
        if len(values) != expected:
            raise InvalidArgumentError(f"the Generate form sends {expected} values, got {len(values)}")
        form = dict(zip(cls.FORM_FIELDS, values))
        slots = []
        for index in range(SLOT_COUNT):
            start = len(cls.FORM_FIELDS) + index * len(cls.SLOT_FIELDS)
            file, weight, enabled, blocks = values[start:start + len(cls.SLOT_FIELDS)]
            if file:
                slots.append(AdapterSlot(str(file), finite_number(weight, f"weight of adapter {index + 1}"), bool(enabled), blocks or ""))
        return cls(
            prompt=form["prompt"] or "",
            negative_prompt=form["negative_prompt"] or "",
            steps=_as_int(form["steps"], "steps", 1),
            guidance=finite_number(form["guidance"], "guidance"),
            seed=_as_int(form["seed"] or 0, "seed"),
            random_seed=bool(form["random_seed"]),
            width=_as_int(form["width"] or 0, "width"),
            height=_as_int(form["height"] or 0, "height"),
            scheduler=form["scheduler"] or MODEL_SCHEDULER,
            num_images=_as_int(form["num_images"], "number of images", 1),
            fuse=bool(form["fuse"]),
            adapters=slots,
        )


@dataclass
class GenerateResult:
    files: list[Path]
    seed: int
    prompt: str  # as the model saw it, <lora:…> tags removed
    scheduler: str
    adapters: list[AdapterUse]


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
        expected = SLOT_COUNT * len(cls.SLOT_FIELDS) + len(cls.FORM_FIELDS)
        if len(values) != expected:
            raise InvalidArgumentError(f"the Blend form sends {expected} values, got {len(values)}")
        pairs = [
            (str(values[2 * i]), finite_number(values[2 * i + 1], f"blend weight {i + 1}"))
            for i in range(SLOT_COUNT)
            if values[2 * i]
        ]
        method, rank, density = values[2 * SLOT_COUNT:]
        rank = _as_int(rank or 0, "rank")
        return cls(pairs, method or "concat", rank or None, finite_number(density, "density"))


@dataclass
class SavedBlend:
    path: Path
    report: str  # Markdown: where it went and the per-module error summary


def error_report(result: BlendResult, method: str) -> str:
    """Markdown summary of a blend's per-module relative errors ‖ΔW_exact − ΔW_result‖ / ‖ΔW_exact‖."""
    lines = [error_summary(result.relative_errors)]
    if method == "concat":
        lines.append("(concat is exact: the blend equals the weighted sum of the adapters)")
    elif result.relative_errors:
        lines += ["", "| module | relative error |", "| --- | --- |"]
        lines += [f"| `{module}` | {error:.3e} |" for module, error in worst_modules(result.relative_errors)]
    return "\n".join(lines)


# ----- the session: one pipeline, one runtime, one lock ---------------------------------------------------------------


@dataclass
class _LoadedFile:
    adapter: str  # its name in the runtime
    key: FileKey


class WebUISession:
    """The pipeline, its LoRA runtime, the adapter folder and the training job behind one web UI.

    Every method that touches the pipeline takes :attr:`lock`, sets the full adapter mix it needs and only then
    generates, so requests from several browser tabs cannot mix their adapters.
    """

    def __init__(self, pipe, lora_dir: str | os.PathLike, model_label: str = "embedded", model_config: str | None = None) -> None:
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
        self.training = TrainingJob(self.library, model_label, model_config, native_size=self.native_size)

    @classmethod
    def open(cls, model: str, lora_dir: str | os.PathLike, *, device: str = "auto", dtype: str = "auto",
             model_config: str | None = None) -> WebUISession:
        """Load ``model`` (as ``--model`` names it) and start a session on ``lora_dir``."""
        from ..models import load_pipeline, resolve_device, resolve_dtype

        AdapterLibrary(lora_dir)  # a missing folder fails before the (slow) model load
        resolved_device = resolve_device(device)
        pipe = load_pipeline(model, device=resolved_device, dtype=resolve_dtype(dtype, resolved_device),
                             model_config=model_config, quiet=True)
        return cls(pipe, lora_dir, model_label=str(model), model_config=model_config)

    @property
    def root(self) -> Path:
        return self.library.root

    @property
    def outputs_dir(self) -> Path:
        return self.root / OUTPUTS_FOLDER

    # ----- the adapter mix -------------------------------------------------------------------------------------
    def loaded_files(self) -> dict[str, str]:
        """File name → runtime adapter name of every file loaded so far (enabled or not)."""
        return {file: loaded.adapter for file, loaded in self._loaded.items()}

    def _adapter_name_for(self, file: str) -> str:
        """A runtime name for a file: its stem with anything but letters, digits, ``-`` and ``_`` made ``_``."""
        base = re.sub(r"[^A-Za-z0-9_-]", "_", Path(file).stem) or "adapter"
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

    def _apply_mix(self, slots: list[AdapterSlot], fuse: bool) -> list[AdapterUse]:
        """Make the runtime hold exactly ``slots``: load new files, set numbers on loaded ones, disable the rest.

        Only what differs is changed (a changed number costs a float per branch, no file is read), so an unchanged
        mix stays fused between requests. Must be called with :attr:`lock` held.
        """
        files = [slot.file for slot in slots]
        repeated = sorted({file for file in files if files.count(file) > 1})
        if repeated:
            raise InvalidArgumentError(f"adapter {repeated[0]} is selected twice (slots or <lora:…> tags); use it once")
        wanted: dict[str, tuple[float, BlockWeights]] = {}
        uses = []
        parsed = [(slot, BlockWeights.parse(slot.block_weights, f"block weights of {slot.file}")
                   if slot.block_weights and slot.block_weights.strip() else BlockWeights()) for slot in slots]
        for slot, block_weights in parsed:
            self.library.path_of(slot.file)  # refuse bad names before anything changes
            finite_number(slot.weight, f"weight of {slot.file}")
        if BLEND_PREVIEW_ADAPTER in self.runtime.adapters:
            self.runtime.remove(BLEND_PREVIEW_ADAPTER)
        for slot, block_weights in parsed:
            if not slot.enabled:
                continue  # off: it stays disabled (or unloaded) like every adapter not asked for
            name = self._ensure_loaded(slot.file)
            wanted[name] = (float(slot.weight), block_weights)
            uses.append(AdapterUse(name, float(slot.weight), slot.file, None if block_weights.is_identity else str(block_weights)))
        changes = []
        for name, info in self.runtime.adapters.items():
            if name not in wanted:
                if info.enabled:
                    changes.append(functools.partial(self.runtime.disable, name))
                continue
            weight, block_weights = wanted[name]
            if info.weight != weight:
                changes.append(functools.partial(self.runtime.set_weight, name, weight))
            if info.block_weights != block_weights:
                changes.append(functools.partial(self.runtime.set_block_weights, name, block_weights))
            if not info.enabled:
                changes.append(functools.partial(self.runtime.enable, name))
        if changes and self.runtime.fused:
            self.runtime.unfuse()  # once, rather than an unfuse and fuse around every single change
        for change in changes:
            change()
        self._forget_old_files(keep=set(wanted))
        if fuse and wanted and not self.runtime.fused:
            self.runtime.fuse()
        elif not fuse and self.runtime.fused:
            self.runtime.unfuse()
        return uses

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
            raise InvalidArgumentError(f"scheduler {label!r} is not one of {', '.join(SCHEDULERS)}")
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
        states = [(read_adapter(self.library.path_of(file)), weight) for file, weight in request.adapters]
        return blend(states, method=request.method, rank=request.rank, density=request.density)

    def preview_blend(self, request: BlendRequest, generation: GenerateRequest,
                      progress: Callable[[int, int], None] | None = None) -> tuple[Image.Image, int]:
        """One image of the blend alone (other adapters and prompt tags off) with the Generate tab's settings.

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
        return image, settings.seed

    def save_blend(self, request: BlendRequest, name: str, layout: str = "difflora") -> SavedBlend:
        """Write the blend into the adapter folder as ``name`` (an existing file is never overwritten)."""
        if layout not in WRITE_LAYOUTS:
            raise InvalidArgumentError(f"format {layout!r} is not one of {', '.join(WRITE_LAYOUTS)}")
        file = _new_file_name(name, "blend name")
        path = resolve_inside(self.root, file, "blend name")
        if path.exists():
            raise InvalidArgumentError(f"{file} already exists in the adapter folder; choose another name")
        result = self.blend(request)
        sources = ", ".join(f"{source}:{weight:g}" for source, weight in request.adapters)
        write_adapter(result.state, path, {"difflora.blend_sources": sources}, layout=layout)
        report = f"Saved `{file}` ({layout} format) in the adapter folder.\n\n" + error_report(result, request.method)
        return SavedBlend(path, report)

    def inspect(self, name: str) -> dict:
        """``describe_adapter`` of a file of the adapter folder, with its trigger words."""
        return self._described(read_adapter(self.library.path_of(name, "inspect")))

    def inspect_upload(self, uploaded: str | os.PathLike) -> dict:
        """``describe_adapter`` of an uploaded file; anything but a safetensors LoRA file is refused."""
        return self._described(_read_upload(Path(uploaded)))

    @staticmethod
    def _described(state: AdapterState) -> dict:
        return describe_adapter(state)

    def add_upload(self, uploaded: str | os.PathLike, name: str | None = None) -> str:
        """Copy an uploaded adapter into the adapter folder after reading it as a LoRA file; returns its file name."""
        uploaded = Path(uploaded)
        _read_upload(uploaded)
        file = _new_file_name(name or uploaded.name, "upload")
        path = resolve_inside(self.root, file, "upload")
        if path.exists():
            raise InvalidArgumentError(f"{file} already exists in the adapter folder; rename the upload")
        with atomic_path(path) as temporary:
            shutil.copyfile(uploaded, temporary)
        return file


def _read_upload(path: Path) -> AdapterState:
    """Read an upload as a LoRA file. Only ``.safetensors`` is accepted: a pickle is refused before it is opened."""
    if path.suffix.lower() != ADAPTER_SUFFIX:
        raise AdapterFileError(f"upload {path.name}: only .safetensors adapter files are accepted (pickles are refused)")
    try:
        return read_adapter(path)
    except AdapterFileError as error:
        # Name the upload, not the server's temporary copy of it.
        raise AdapterFileError(f"upload {path.name} refused: {str(error).replace(str(path), '').lstrip(': ')}") from None


def format_summary(summary: dict, title: str) -> str:
    """A describe_adapter summary as Markdown: the rows ``difflora inspect`` prints."""
    return "\n".join([f"### {title}", *(f"- **{label}**: {_cell(value)}" for label, value in summary_rows(summary))])


# ----- training in the background -----------------------------------------------------------------------------------


@dataclass
class TrainRequest:
    """The Train tab. ``dataset`` is an absolute folder or a folder inside the adapter folder; it is only read."""

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


class TrainingJob:
    """At most one :func:`difflora.train.train` run at a time, in a background thread, with its progress.

    The run writes its folder ``<lora-dir>/training/<name>/`` (config, logs, validation images) and, when it
    finishes, its adapter is copied atomically to ``<lora-dir>/<name>.safetensors``.
    """

    def __init__(self, library: AdapterLibrary, model: str, model_config: str | None = None, native_size: int = 0) -> None:
        self.library = library
        self.model = model
        self.model_config = model_config
        self.native_size = native_size
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._status = TrainingStatus("idle")

    def dataset_folder(self, text: str) -> Path:
        """An absolute folder as typed, or a relative one inside the adapter folder. It must exist."""
        text = (text or "").strip()
        if not text:
            raise InvalidArgumentError("dataset folder: type the folder holding the training images")
        path = Path(text).expanduser()
        folder = path.resolve() if path.is_absolute() else resolve_inside(self.library.root, text, "dataset folder")
        if not folder.is_dir():
            raise InvalidArgumentError(f"dataset folder {text}: no such folder")
        return folder

    def _config(self, request: TrainRequest):
        from ..train import make_config

        name = (request.name or "").strip()
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise InvalidArgumentError(f"adapter name {name!r}: use letters, digits, '-' and '_' only")
        adapter_file = _new_file_name(name, "adapter name")
        if resolve_inside(self.library.root, adapter_file, "adapter name").exists():
            raise InvalidArgumentError(f"{adapter_file} already exists in the adapter folder; choose another name")
        output = resolve_inside(self.library.root, f"{TRAINING_FOLDER}/{name}", "training folder")
        options = {
            "model": self.model,
            "model_config": self.model_config,
            "data": str(self.dataset_folder(request.dataset)),
            "output": str(output),
            "name": name,
            "steps": _as_int(request.steps, "steps", 1),
            "rank": _as_int(request.rank, "rank", 1),
            "alpha": finite_number(request.alpha, "alpha") if request.alpha else None,
            "lr": finite_number(request.lr, "learning rate"),
            "batch_size": _as_int(request.batch_size, "batch size", 1),
            "resolution": _as_int(request.resolution, "resolution") or self.native_size or 512,
            "trigger_word": (request.trigger_word or "").strip() or None,
            "validation_prompts": [request.validation_prompt.strip()] if (request.validation_prompt or "").strip() else [],
            "validation_steps": _as_int(request.validation_steps or 0, "validation every"),
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
            self._update(state="finished", adapter_file=adapter_file,
                         message=f"finished: {adapter_file} is in the adapter list ({result.steps} steps, "
                                 f"last loss {result.losses[-1]:.4f})" if result.losses else f"finished: {adapter_file}")
        except DiffloraError as error:
            self._update(state="failed", message=f"training failed: {error}")
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


def _progress_html(status: TrainingStatus) -> str:
    from html import escape

    text = escape(status.message)
    if status.loss is not None and status.state == "running":
        text += f" · loss {status.loss:.4f}"
    bar = f'<progress value="{status.step}" max="{max(status.total, 1)}" style="width:100%"></progress>' if status.total else ""
    return f'{bar}<div>{text}</div>'


# ----- the page ---------------------------------------------------------------------------------------------------------


def _shown_in_page(function: Callable) -> Callable:
    """Turn errors into one-line messages in the page: a DiffloraError shows its message; anything else a short
    generic one, with the traceback logged on the server only."""
    import gradio as gr

    @functools.wraps(function)  # keeps the signature, where Gradio looks for a gr.Progress default
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except gr.Error:
            raise
        except DiffloraError as error:
            raise gr.Error(str(error), print_exception=False) from None
        except Exception:
            logger.exception("web UI action %s failed", function.__name__)
            raise gr.Error("Something went wrong on the server; the details are in its log.", print_exception=False) from None

    return wrapper


def build_app(session: WebUISession) -> gradio.Blocks:
    """The Gradio page for ``session``: Generate, Blend & export, Inspect and Train tabs.

    Stable element ids for browser tests: ``prompt``, ``negative-prompt``, ``generate-button``, ``gallery``,
    ``used-seed``, ``generate-status``, ``lora-N-file``/``-weight``/``-enabled``/``-blocks`` (N = 0…3),
    ``refresh-adapters``, ``adapter-table``, ``blend-…``, ``inspect-…`` and ``train-…`` (see each component).
    """
    import gradio as gr

    library = session.library
    names = library.names()
    form: list[gr.components.Component] = []  # the Generate form, in GenerateRequest.from_form order
    file_pickers: list[gr.Dropdown] = []  # every dropdown of adapter files, refreshed together

    with gr.Blocks(title="difflora", analytics_enabled=False) as app:
        gr.Markdown(f"## difflora\nModel `{session.model_label}` · adapter folder `{session.root}`")
        with gr.Tab("Generate", id="generate"):
            with gr.Row():
                with gr.Column(scale=3):
                    prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt",
                                        placeholder="a castle at dusk <lora:style:0.8>  (<lora:file:weight> loads a file of the adapter folder)")
                    negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="negative-prompt")
                    with gr.Row():
                        steps = gr.Slider(1, 150, value=20, step=1, label="Steps", elem_id="steps")
                        guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="Guidance", elem_id="guidance")
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="seed")
                        random_seed = gr.Checkbox(value=False, label="Random seed", elem_id="random-seed")
                        used_seed = gr.Number(value=None, label="Seed used", precision=0, interactive=False, elem_id="used-seed")
                    with gr.Row():
                        width = gr.Slider(64, 2048, value=max(64, session.native_size), step=8, label="Width", elem_id="width")
                        height = gr.Slider(64, 2048, value=max(64, session.native_size), step=8, label="Height", elem_id="height")
                    with gr.Row():
                        scheduler = gr.Dropdown(list(SCHEDULERS), value=MODEL_SCHEDULER, label="Scheduler", elem_id="scheduler")
                        num_images = gr.Slider(1, 8, value=1, step=1, label="Images", elem_id="num-images")
                        fuse = gr.Checkbox(value=False, label="Fuse for speed", elem_id="fuse",
                                           info="bake the mix into the weights; undone exactly when the mix changes")
                    form += [prompt, negative, steps, guidance, seed, random_seed, width, height, scheduler, num_images, fuse]
                    gr.Markdown(f"**Adapters** (up to {SLOT_COUNT} here; more with `<lora:file:weight>` in the prompt). "
                                "Block weights: `down=…,mid=…,up=…,up.1=…,te=…`.")
                    for index in range(SLOT_COUNT):
                        with gr.Row():
                            picker = gr.Dropdown(names, value=None, label=f"Adapter {index + 1}", elem_id=f"lora-{index}-file", scale=3)
                            weight = gr.Slider(-2, 2, value=1.0, step=0.05, label="Weight", elem_id=f"lora-{index}-weight", scale=3)
                            enabled = gr.Checkbox(value=True, label="On", elem_id=f"lora-{index}-enabled", scale=1)
                            blocks = gr.Textbox(label="Block weights", placeholder="down=1,mid=1,up=1",
                                                elem_id=f"lora-{index}-blocks", scale=2)
                        file_pickers.append(picker)
                        form += [picker, weight, enabled, blocks]
                    generate_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
                with gr.Column(scale=2):
                    gallery = gr.Gallery(label="Images", elem_id="gallery", columns=2, format="png", interactive=False)
                    generate_status = gr.Markdown(elem_id="generate-status")
                    refresh = gr.Button("Refresh adapter list", elem_id="refresh-adapters", size="sm")
                    adapter_table = gr.Markdown(library.table(), elem_id="adapter-table")

        with gr.Tab("Blend & export", id="blend"):
            blend_form: list[gr.components.Component] = []
            gr.Markdown("Blend adapters with weights. **concat** is exact (rank = sum of ranks); **svd** is the best "
                        "rank-R approximation; **ties**/**dare** are PEFT's merges. Preview uses the Generate tab's prompt "
                        "and settings, with the blend alone.")
            for index in range(SLOT_COUNT):
                with gr.Row():
                    picker = gr.Dropdown(names, value=None, label=f"Adapter {index + 1}", elem_id=f"blend-{index}-file")
                    weight = gr.Slider(-2, 2, value=1.0, step=0.05, label="Weight", elem_id=f"blend-{index}-weight")
                file_pickers.append(picker)
                blend_form += [picker, weight]
            with gr.Row():
                method = gr.Dropdown(list(BLEND_METHODS), value="concat", label="Method", elem_id="blend-method")
                rank = gr.Number(value=8, precision=0, minimum=0, label="Rank (svd, ties, dare)", elem_id="blend-rank")
                density = gr.Slider(0.05, 1, value=0.5, step=0.05, label="Density (ties, dare)", elem_id="blend-density")
            blend_form += [method, rank, density]
            with gr.Row():
                preview_button = gr.Button("Preview", elem_id="blend-preview-button")
                blend_name = gr.Textbox(label="Save as (file name in the adapter folder)", placeholder="my-blend",
                                        elem_id="blend-name")
                layout = gr.Dropdown(list(WRITE_LAYOUTS), value="difflora", label="Format", elem_id="blend-format")
                save_button = gr.Button("Save", variant="primary", elem_id="blend-save-button")
            with gr.Row():
                preview_image = gr.Image(label="Preview", type="pil", format="png", interactive=False, elem_id="blend-preview")
                with gr.Column():
                    blend_report = gr.Markdown(elem_id="blend-report")
                    blend_file = gr.File(label="Download", interactive=False, elem_id="blend-file")

        with gr.Tab("Inspect", id="inspect"):
            with gr.Row():
                inspect_picker = gr.Dropdown(names, value=None, label="Adapter file", elem_id="inspect-file")
                file_pickers.append(inspect_picker)
                upload = gr.File(label="…or upload one (.safetensors)", file_types=[ADAPTER_SUFFIX], elem_id="inspect-upload")
            add_button = gr.Button("Add the upload to the adapter folder", elem_id="inspect-add-upload")
            inspect_text = gr.Markdown(elem_id="inspect-summary")
            inspect_json = gr.JSON(label="Everything (describe_adapter)", elem_id="inspect-json")

        with gr.Tab("Train", id="train"):
            gr.Markdown("Train a style adapter on a folder of images (`.txt` captions beside them, or a "
                        "`metadata.jsonl`). The folder may be anywhere readable (absolute path) or inside the adapter "
                        "folder (relative path); it is only read. One run at a time.")
            with gr.Row():
                train_name = gr.Textbox(label="Adapter name", value="my-style", elem_id="train-name")
                dataset = gr.Textbox(label="Dataset folder", elem_id="train-dataset")
                trigger = gr.Textbox(label="Trigger word", elem_id="train-trigger")
            with gr.Row():
                train_steps = gr.Number(value=200, precision=0, minimum=1, label="Steps", elem_id="train-steps")
                train_rank = gr.Number(value=4, precision=0, minimum=1, label="Rank", elem_id="train-rank")
                train_alpha = gr.Number(value=0, label="Alpha (0: rank)", elem_id="train-alpha")
                train_lr = gr.Number(value=1e-4, label="Learning rate", elem_id="train-lr")
                train_batch = gr.Number(value=4, precision=0, minimum=1, label="Batch size", elem_id="train-batch-size")
                train_resolution = gr.Number(value=session.native_size, precision=0, minimum=8, step=8,
                                             label="Resolution", elem_id="train-resolution")
            with gr.Row():
                validation_prompt = gr.Textbox(label="Validation prompt", elem_id="train-validation-prompt")
                validation_steps = gr.Number(value=0, precision=0, minimum=0, label="Validation every N steps (0: at the end)",
                                             elem_id="train-validation-steps")
            train_form = [train_name, dataset, train_steps, train_rank, train_alpha, train_lr, train_batch,
                          train_resolution, trigger, validation_prompt, validation_steps]
            train_button = gr.Button("Start training", variant="primary", elem_id="train-start")
            train_progress = gr.HTML(_progress_html(session.training.status()), elem_id="train-progress")
            train_preview = gr.Image(label="Validation image", type="filepath", interactive=False, elem_id="train-preview")
            seen_runs = gr.State(session.training.status().finished_runs)
            timer = gr.Timer(1.0, active=False)

        # ----- callbacks: form values → request → one session method → outputs ---------------------------------
        def adapter_lists():
            """Fresh choices for every adapter dropdown, and the adapter table."""
            choices = library.names()
            return [gr.Dropdown(choices=choices) for _ in file_pickers] + [library.table()]

        refresh_outputs = [*file_pickers, adapter_table]

        # Gradio finds gr.Progress by a positional parameter's default, so it comes before the form values.
        @_shown_in_page
        def on_generate(progress=gr.Progress(), *values):
            request = GenerateRequest.from_form(values)
            result = session.generate(request, progress=lambda step, total: progress((step, total), desc="denoising"))
            mix = ", ".join(f"{use.name} {use.weight:g}" for use in result.adapters) or "none"
            fused = " (fused)" if session.runtime.fused else ""
            status = (f"{len(result.files)} image(s) saved in `{OUTPUTS_FOLDER}/` · seed {result.seed} · "
                      f"{result.scheduler} · adapters{fused}: {mix}")
            return [str(path) for path in result.files], result.seed, status

        @_shown_in_page
        def on_preview(progress=gr.Progress(), *values):
            blend_values, generate_values = values[:len(blend_form)], values[len(blend_form):]
            image, used = session.preview_blend(BlendRequest.from_form(blend_values), GenerateRequest.from_form(generate_values),
                                                progress=lambda step, total: progress((step, total), desc="denoising"))
            return image, f"Preview of the blend alone · seed {used}"

        @_shown_in_page
        def on_save(*values):
            *blend_values, name, file_format = values
            saved = session.save_blend(BlendRequest.from_form(blend_values), name, file_format)
            return str(saved.path), saved.report, *adapter_lists()

        @_shown_in_page
        def on_inspect(name):
            if not name:
                return "Choose an adapter file.", None
            summary = session.inspect(name)
            return format_summary(summary, name), summary

        @_shown_in_page
        def on_inspect_upload(uploaded):
            if not uploaded:
                return "", None
            summary = session.inspect_upload(uploaded)
            return format_summary(summary, f"{Path(uploaded).name} (upload, not yet in the adapter folder)"), summary

        @_shown_in_page
        def on_add_upload(uploaded):
            if not uploaded:
                raise InvalidArgumentError("upload a .safetensors file first")
            file = session.add_upload(uploaded)
            return f"Added `{file}` to the adapter folder.", *adapter_lists()

        @_shown_in_page
        def on_train(name, folder, steps_value, rank_value, alpha_value, lr_value, batch, resolution, trigger_word,
                     prompt_text, every):
            request = TrainRequest(name=name, dataset=folder, steps=steps_value, rank=rank_value, alpha=alpha_value or None,
                                   lr=lr_value, batch_size=batch, resolution=resolution or 0, trigger_word=trigger_word or "",
                                   validation_prompt=prompt_text or "", validation_steps=every or 0)
            status = session.training.start(request)
            return _progress_html(status), gr.Timer(active=True)

        def on_tick(last_seen):
            status = session.training.status()
            preview = str(status.preview) if status.preview else gr.skip()
            running = status.state == "running"
            if status.finished_runs != last_seen:  # a run ended since this page last looked: list its adapter
                return _progress_html(status), preview, gr.Timer(active=running), status.finished_runs, *adapter_lists()
            return (_progress_html(status), preview, gr.Timer(active=running), last_seen,
                    *[gr.skip() for _ in refresh_outputs])

        def on_page_load():
            status = session.training.status()
            return *adapter_lists(), _progress_html(status), gr.Timer(active=status.state == "running")

        pipeline = {"concurrency_id": "pipeline", "concurrency_limit": 1}  # one generation at a time, queued
        free = {"concurrency_limit": None}  # reads no pipeline state: never waits behind a generation
        generate_button.click(on_generate, inputs=form, outputs=[gallery, used_seed, generate_status],
                              api_name="generate", **pipeline)
        refresh.click(adapter_lists, outputs=refresh_outputs, api_name="refresh_adapters", **free)
        # Dropdown choices are kept per browser session: a page opened after files were added lists them too, and
        # a page opened while a run trains follows its progress.
        app.load(on_page_load, outputs=[*refresh_outputs, train_progress, timer], api_visibility="private",
                 show_progress="hidden", **free)
        preview_button.click(on_preview, inputs=blend_form + form, outputs=[preview_image, blend_report],
                             api_name="blend_preview", **pipeline)
        save_button.click(on_save, inputs=blend_form + [blend_name, layout],
                          outputs=[blend_file, blend_report, *refresh_outputs], api_name="blend_save", **free)
        inspect_picker.change(on_inspect, inputs=inspect_picker, outputs=[inspect_text, inspect_json], api_name="inspect", **free)
        upload.upload(on_inspect_upload, inputs=upload, outputs=[inspect_text, inspect_json], api_name="inspect_upload", **free)
        add_button.click(on_add_upload, inputs=upload, outputs=[inspect_text, *refresh_outputs], api_name="add_upload", **free)
        train_button.click(on_train, inputs=train_form, outputs=[train_progress, timer], api_name="train_start", **free)
        timer.tick(on_tick, inputs=seen_runs, outputs=[train_progress, train_preview, timer, seen_runs, *refresh_outputs],
                   api_visibility="private", show_progress="hidden", **free)
    app.queue(default_concurrency_limit=1)
    return app


# ----- the command ---------------------------------------------------------------------------------------------------


def build_parser(prog: str = "difflora webui") -> argparse.ArgumentParser:
    from .._entry import OneLineErrorParser, add_model_options

    parser = OneLineErrorParser(prog=prog, description="Start the difflora web UI (Gradio) on one model and one adapter folder.")
    add_model_options(parser)
    parser.add_argument("--lora-dir", required=True,
                        help="adapter folder: the only place the UI reads adapters from and writes files to")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``difflora webui``: parse options, load the model, serve until Ctrl-C. Bad input: one line, exit code 2."""
    from .._entry import run_main

    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    return run_main(lambda: _serve(args), parser)


def _serve(args: argparse.Namespace) -> int:
    from .._entry import quiet_libraries

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    # Gradio keeps uploads and copies of served files in a cache folder; keep it inside the adapter folder too, so
    # the UI writes nowhere else (a hidden folder: the adapter list shows top-level *.safetensors only).
    lora_dir = Path(args.lora_dir).expanduser()
    if lora_dir.is_dir():
        os.environ.setdefault("GRADIO_TEMP_DIR", str(lora_dir.resolve() / ".gradio-cache"))
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise InvalidArgumentError("the web UI needs gradio: pip install 'difflora[webui]'") from None
    quiet_libraries()
    app = build_app(WebUISession.open(args.model, args.lora_dir, device=args.device, dtype=args.dtype,
                                      model_config=args.model_config))
    try:
        app.launch(server_name=args.host, server_port=args.port, share=args.share, ssr_mode=False)
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
    return 0

