"""The Gradio page: the only module of difflora that imports gradio.

:func:`build_app` builds one tab after another (Generate, Blend & export, Inspect, Train), each builder returning its
components, then binds the events. Each callback turns form values into a request
(:mod:`~difflora.webui.requests`), calls one :class:`~difflora.webui.session.WebUISession` method and turns a
:class:`~difflora.errors.DiffloraError` into a one-line message in the page that names the field at fault.

What stays in Gradio's cache (``<lora-dir>/.gradio-cache`` under ``difflora webui``): a refused upload is deleted at
once, an added one once it is copied into the adapter folder; one that was only inspected is kept for the "Add"
button until the same page uploads another file or clears it, and for at most an hour (``UPLOAD_KEPT_SECONDS``,
also when the page is closed); "Add" after that asks for the upload again. Everything else Gradio keeps there
(copies of the images and files it served) is deleted once a day old, and all of it when the server stops
(``CACHE_KEPT``).

Stable element ids for browser tests: ``prompt``, ``negative-prompt``, ``generate-button``, ``gallery``,
``used-seed``, ``generate-status``, ``lora-N-file``/``-weight``/``-enabled``/``-blocks`` (N = 0…3),
``refresh-adapters``, ``adapter-table``, ``blend-…``, ``inspect-…`` and ``train-…`` (see each component).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from html import escape
from pathlib import Path

import gradio as gr

from ..blend import BLEND_METHODS
from ..data import DATA_RANGES
from ..errors import DiffloraError, InvalidArgumentError
from ..formats import WRITE_LAYOUTS
from ..keys import ADAPTER_SUFFIX
from ..train.config import NUMBER_RANGES as TRAINING_RANGES
from .library import OUTPUTS_FOLDER, AdapterLibrary, format_summary
from .requests import MODEL_SCHEDULER, SCHEDULERS, SLOT_COUNT, BlendRequest, GenerateRequest, TrainRequest
from .session import WebUISession
from .training_job import TrainingStatus

__all__ = ["BLEND_LABELS", "GENERATE_LABELS", "TRAIN_LABELS", "build_app", "in_field_words"]

logger = logging.getLogger(__name__)

# How long an upload that was only inspected is kept in Gradio's cache for the "Add" button (see _Uploads).
UPLOAD_KEPT_SECONDS = 3600
# Everything else Gradio keeps in its cache (copies of the images and files it served, uploads no event asked about)
# is deleted once a day old, checked every hour, and all of it when the server stops: (frequency, age) in seconds.
CACHE_KEPT = (3600, 86400)

# Parameter → the label of its field, per tab: the labels the fields are built with, and the words an error naming
# that parameter is told in (a UI user reads "Rank (svd, ties, dare): …", never "--rank").
# An adapter row's weight and block weights are told by their row (``AdapterSlot.parameter``: ``weight_2``).
_ROW_LABELS = {f"{part}_{row}": f"{label} of adapter {row}" for row in range(1, SLOT_COUNT + 1)
               for part, label in (("weight", "Weight"), ("block_weights", "Block weights"))}
GENERATE_LABELS = {
    "prompt": "Prompt", "negative_prompt": "Negative prompt", "steps": "Steps", "guidance": "Guidance",
    "seed": "Seed", "width": "Width", "height": "Height", "scheduler": "Scheduler", "num_images": "Images",
    **_ROW_LABELS,
}
BLEND_LABELS = {
    "method": "Method", "rank": "Rank (svd, ties, dare)", "density": "Density (ties, dare)", "layout": "Format",
    "adapters": "Adapters", **{f"weight_{row}": f"Weight of adapter {row}" for row in range(1, SLOT_COUNT + 1)},
}
TRAIN_LABELS = {
    "name": "Adapter name", "data": "Dataset folder", "data_dir": "Dataset folder", "trigger_word": "Trigger word",
    "steps": "Steps", "rank": "Rank", "alpha": "Alpha (0: rank)", "lr": "Learning rate", "batch_size": "Batch size",
    "resolution": "Resolution", "validation_prompts": "Validation prompt",
    "validation_steps": "Validation every N steps (0: at the end)",
}


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


def _shown_in_page(labels: Mapping[str, str] | None = None) -> Callable[[Callable], Callable]:
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


def _progress_html(status: TrainingStatus) -> str:
    if status.error is not None:
        text = escape(f"training failed: {in_field_words(status.error, TRAIN_LABELS)}")
    else:
        text = escape(status.message)
    if status.loss is not None and status.state == "running":
        text += f" · loss {status.loss:.4f}"
    bar = ""
    if status.total:
        bar = f'<progress value="{status.step}" max="{max(status.total, 1)}" style="width:100%"></progress>'
    return f'{bar}<div>{text}</div>'


class _Page(gr.Blocks):
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


# ----- the tabs: components only ----------------------------------------------------------------------------------


@dataclass
class _GenerateTab:
    form: list[gr.components.Component]  # in GenerateRequest.from_form order
    pickers: list[gr.Dropdown]
    button: gr.Button
    gallery: gr.Gallery
    used_seed: gr.Number
    status: gr.Markdown
    refresh: gr.Button
    adapter_table: gr.Markdown


@dataclass
class _BlendTab:
    form: list[gr.components.Component]  # in BlendRequest.from_form order
    pickers: list[gr.Dropdown]
    preview_button: gr.Button
    name: gr.Textbox
    layout: gr.Dropdown
    save_button: gr.Button
    preview: gr.Image
    report: gr.Markdown
    file: gr.File


@dataclass
class _InspectTab:
    picker: gr.Dropdown
    upload: gr.File
    add_button: gr.Button
    summary: gr.Markdown
    details: gr.JSON


@dataclass
class _TrainTab:
    form: list[gr.components.Component]  # in TrainRequest.from_form order
    dataset: gr.Dropdown
    refresh_datasets: gr.Button
    button: gr.Button
    progress: gr.HTML
    preview: gr.Image
    seen_runs: gr.State
    timer: gr.Timer


def _generate_settings(session: WebUISession) -> tuple[list[gr.components.Component], gr.Number]:
    """The Generate tab's fields above the adapter rows (in ``GenerateRequest.FORM_FIELDS`` order), and the
    read-only "Seed used" field among them."""
    labels = GENERATE_LABELS
    prompt = gr.Textbox(label=labels["prompt"], lines=3, elem_id="prompt",
                        placeholder="a castle at dusk <lora:style:0.8>  "
                                    "(<lora:file:weight> loads a file of the adapter folder)")
    negative = gr.Textbox(label=labels["negative_prompt"], lines=2, elem_id="negative-prompt")
    with gr.Row():
        steps = gr.Slider(1, 150, value=20, step=1, label=labels["steps"], elem_id="steps")
        guidance = gr.Slider(0, 20, value=7.5, step=0.5, label=labels["guidance"], elem_id="guidance")
    with gr.Row():
        seed = gr.Number(value=0, precision=0, minimum=0, label=labels["seed"], elem_id="seed")
        random_seed = gr.Checkbox(value=False, label="Random seed", elem_id="random-seed")
        used_seed = gr.Number(value=None, label="Seed used", precision=0, interactive=False, elem_id="used-seed")
    size = max(64, session.native_size)
    with gr.Row():
        width = gr.Slider(64, 2048, value=size, step=8, label=labels["width"], elem_id="width")
        height = gr.Slider(64, 2048, value=size, step=8, label=labels["height"], elem_id="height")
    with gr.Row():
        scheduler = gr.Dropdown(list(SCHEDULERS), value=MODEL_SCHEDULER, label=labels["scheduler"],
                                elem_id="scheduler")
        num_images = gr.Slider(1, 8, value=1, step=1, label=labels["num_images"], elem_id="num-images")
        fuse = gr.Checkbox(value=False, label="Fuse for speed", elem_id="fuse",
                           info="bake the mix into the weights; undone exactly when the mix changes")
    fields = [prompt, negative, steps, guidance, seed, random_seed, width, height, scheduler, num_images, fuse]
    return fields, used_seed


def _generate_slots(names: list[str]) -> tuple[list[gr.Dropdown], list[gr.components.Component]]:
    """The adapter rows of the Generate tab: their file pickers, and their fields in ``SLOT_FIELDS`` order."""
    pickers, fields = [], []
    for index in range(SLOT_COUNT):
        with gr.Row():
            picker = gr.Dropdown(names, value=None, label=f"Adapter {index + 1}", elem_id=f"lora-{index}-file",
                                 scale=3)
            weight = gr.Slider(-2, 2, value=1.0, step=0.05, label="Weight", elem_id=f"lora-{index}-weight", scale=3)
            enabled = gr.Checkbox(value=True, label="On", elem_id=f"lora-{index}-enabled", scale=1)
            blocks = gr.Textbox(label="Block weights", placeholder="down=1,mid=1,up=1",
                                elem_id=f"lora-{index}-blocks", scale=2)
        pickers.append(picker)
        fields += [picker, weight, enabled, blocks]
    return pickers, fields


def _generate_tab(session: WebUISession, names: list[str]) -> _GenerateTab:
    with gr.Tab("Generate", id="generate"):
        with gr.Row():
            with gr.Column(scale=3):
                form, used_seed = _generate_settings(session)
                gr.Markdown(f"**Adapters** (up to {SLOT_COUNT} here; more with `<lora:file:weight>` in the prompt). "
                            "Block weights: `down=…,mid=…,up=…,up.1=…,te=…`.")
                pickers, slot_fields = _generate_slots(names)
                button = gr.Button("Generate", variant="primary", elem_id="generate-button")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Images", elem_id="gallery", columns=2, format="png", interactive=False)
                status = gr.Markdown(elem_id="generate-status")
                refresh = gr.Button("Refresh adapter list", elem_id="refresh-adapters", size="sm")
                adapter_table = gr.Markdown(session.library.table(), elem_id="adapter-table")
    return _GenerateTab(form + slot_fields, pickers, button, gallery, used_seed, status, refresh, adapter_table)


def _blend_tab(names: list[str]) -> _BlendTab:
    labels = BLEND_LABELS
    with gr.Tab("Blend & export", id="blend"):
        form: list[gr.components.Component] = []
        pickers = []
        gr.Markdown("Blend adapters with weights. **concat** is exact (rank = sum of ranks); **svd** is the best "
                    "rank-R approximation; **ties**/**dare** are PEFT's merges. Preview uses the Generate tab's "
                    "prompt and settings, with the blend alone.")
        for index in range(SLOT_COUNT):
            with gr.Row():
                picker = gr.Dropdown(names, value=None, label=f"Adapter {index + 1}", elem_id=f"blend-{index}-file")
                weight = gr.Slider(-2, 2, value=1.0, step=0.05, label="Weight", elem_id=f"blend-{index}-weight")
            pickers.append(picker)
            form += [picker, weight]
        with gr.Row():
            method = gr.Dropdown(list(BLEND_METHODS), value="concat", label=labels["method"], elem_id="blend-method")
            rank = gr.Number(value=8, precision=0, minimum=0, label=labels["rank"], elem_id="blend-rank")
            density = gr.Slider(0.05, 1, value=0.5, step=0.05, label=labels["density"], elem_id="blend-density")
        form += [method, rank, density]
        with gr.Row():
            preview_button = gr.Button("Preview", elem_id="blend-preview-button")
            name = gr.Textbox(label="Save as (file name in the adapter folder)", placeholder="my-blend",
                              elem_id="blend-name")
            layout = gr.Dropdown(list(WRITE_LAYOUTS), value="difflora", label=labels["layout"], elem_id="blend-format")
            save_button = gr.Button("Save", variant="primary", elem_id="blend-save-button")
        with gr.Row():
            preview = gr.Image(label="Preview", type="pil", format="png", interactive=False, elem_id="blend-preview")
            with gr.Column():
                report = gr.Markdown(elem_id="blend-report")
                file = gr.File(label="Download", interactive=False, elem_id="blend-file")
    return _BlendTab(form, pickers, preview_button, name, layout, save_button, preview, report, file)


def _inspect_tab(names: list[str]) -> _InspectTab:
    with gr.Tab("Inspect", id="inspect"):
        with gr.Row():
            picker = gr.Dropdown(names, value=None, label="Adapter file", elem_id="inspect-file")
            upload = gr.File(label="…or upload one (.safetensors)", file_types=[ADAPTER_SUFFIX],
                             elem_id="inspect-upload")
        add_button = gr.Button("Add the upload to the adapter folder", elem_id="inspect-add-upload")
        summary = gr.Markdown(elem_id="inspect-summary")
        details = gr.JSON(label="Everything (describe_adapter)", elem_id="inspect-json")
    return _InspectTab(picker, upload, add_button, summary, details)


def _train_maximum(parameter: str) -> float:
    """The largest value the library accepts for a training option (its range), so Gradio refuses more at once."""
    if parameter in DATA_RANGES:
        return DATA_RANGES[parameter][1]
    return TRAINING_RANGES[parameter][1]


def _train_tab(session: WebUISession) -> _TrainTab:
    labels = TRAIN_LABELS
    with gr.Tab("Train", id="train"):
        job = session.training
        gr.Markdown(f"Train a style adapter on a folder of images (`.txt` captions beside them, or a "
                    f"`metadata.jsonl`). The folder must be inside {job.data_place} `{job.data_root}` (choose one "
                    f"of its folders, or type a path inside it); it is only read. One run at a time.")
        with gr.Row():
            name = gr.Textbox(label=labels["name"], value="my-style", elem_id="train-name")
            with gr.Column():
                # Typed paths are allowed (folders deeper down): the session checks them, not Gradio's choices.
                dataset = gr.Dropdown(job.dataset_folders(), value=None, allow_custom_value=True,
                                      label=labels["data"], elem_id="train-dataset")
                refresh_datasets = gr.Button("Refresh folders", elem_id="train-refresh-datasets", size="sm")
            trigger = gr.Textbox(label=labels["trigger_word"], elem_id="train-trigger")
        # Maxima from the library's ranges: Gradio refuses a larger number before the callback runs (one line).
        # Minima stay the form's own (alpha 0 means alpha = rank); the library checks the rest.
        top = _train_maximum
        with gr.Row():
            steps = gr.Number(value=200, precision=0, minimum=1, maximum=top("steps"), label=labels["steps"],
                              elem_id="train-steps")
            rank = gr.Number(value=4, precision=0, minimum=1, maximum=top("rank"), label=labels["rank"],
                             elem_id="train-rank")
            alpha = gr.Number(value=0, maximum=top("alpha"), label=labels["alpha"], elem_id="train-alpha")
            lr = gr.Number(value=1e-4, maximum=top("lr"), label=labels["lr"], elem_id="train-lr")
            batch = gr.Number(value=4, precision=0, minimum=1, maximum=top("batch_size"), label=labels["batch_size"],
                              elem_id="train-batch-size")
            resolution = gr.Number(value=session.native_size, precision=0, minimum=8, maximum=top("resolution"),
                                   step=8, label=labels["resolution"], elem_id="train-resolution")
        with gr.Row():
            validation_prompt = gr.Textbox(label=labels["validation_prompts"], elem_id="train-validation-prompt")
            validation_steps = gr.Number(value=0, precision=0, minimum=0, maximum=top("validation_steps"),
                                         label=labels["validation_steps"], elem_id="train-validation-steps")
        form = [name, dataset, steps, rank, alpha, lr, batch, resolution, trigger, validation_prompt, validation_steps]
        button = gr.Button("Start training", variant="primary", elem_id="train-start")
        status = session.training.status()
        progress = gr.HTML(_progress_html(status), elem_id="train-progress")
        preview = gr.Image(label="Validation image", type="filepath", interactive=False, elem_id="train-preview")
        seen_runs = gr.State(status.finished_runs)
        timer = gr.Timer(1.0, active=False)
    return _TrainTab(form, dataset, refresh_datasets, button, progress, preview, seen_runs, timer)


# ----- the events: form values → request → one session method → outputs -------------------------------------------

PIPELINE = {"concurrency_id": "pipeline", "concurrency_limit": 1}  # one generation at a time, queued
FREE = {"concurrency_limit": None}  # reads no pipeline state: never waits behind a generation


@dataclass
class _AdapterLists:
    """Every dropdown of adapter files and the adapter table, refreshed together."""

    library: AdapterLibrary
    pickers: list[gr.Dropdown]
    table: gr.Markdown

    @property
    def outputs(self) -> list[gr.components.Component]:
        return [*self.pickers, self.table]

    def fresh(self) -> list:
        """Fresh choices for every adapter dropdown, and the adapter table."""
        choices = self.library.names()
        return [gr.Dropdown(choices=choices) for _ in self.pickers] + [self.library.table()]

    def unchanged(self) -> list:
        return [gr.skip() for _ in self.outputs]


def _denoising(progress: gr.Progress) -> Callable[[int, int], None]:
    return lambda step, total: progress((step, total), desc="denoising")


def _bind_generate(session: WebUISession, tab: _GenerateTab, lists: _AdapterLists) -> None:
    # Gradio finds gr.Progress by a positional parameter's default, so it comes before the form values.
    @_shown_in_page(GENERATE_LABELS)
    def on_generate(progress=gr.Progress(), *values):
        result = session.generate(GenerateRequest.from_form(values), progress=_denoising(progress))
        mix = ", ".join(f"{use.name} {use.weight:g}" for use in result.adapters) or "none"
        fused = " (fused)" if session.runtime.fused else ""
        status = (f"{len(result.files)} image(s) saved in `{OUTPUTS_FOLDER}/` · seed {result.seed} · "
                  f"{result.scheduler} · adapters{fused}: {mix}")
        return [str(path) for path in result.files], result.seed, status

    def adapter_lists():
        """Fresh choices for every adapter dropdown, and the adapter table."""  # the API's description too
        return lists.fresh()

    tab.button.click(on_generate, inputs=tab.form, outputs=[tab.gallery, tab.used_seed, tab.status],
                     api_name="generate", **PIPELINE)
    tab.refresh.click(adapter_lists, outputs=lists.outputs, api_name="refresh_adapters", **FREE)


def _bind_page_load(app: gr.Blocks, session: WebUISession, lists: _AdapterLists, train: _TrainTab) -> None:
    # Dropdown choices are kept per browser session: a page opened after files were added lists them too, and a
    # page opened while a run trains follows its progress.
    def on_page_load():
        status = session.training.status()
        datasets = gr.Dropdown(choices=session.training.dataset_folders())
        return *lists.fresh(), datasets, _progress_html(status), gr.Timer(active=status.state == "running")

    app.load(on_page_load, outputs=[*lists.outputs, train.dataset, train.progress, train.timer],
             api_visibility="private", show_progress="hidden", **FREE)


def _bind_blend(session: WebUISession, tab: _BlendTab, generate_form: list, lists: _AdapterLists) -> None:
    @_shown_in_page({**GENERATE_LABELS, **BLEND_LABELS})
    def on_preview(progress=gr.Progress(), *values):
        blend_values, generate_values = values[:len(tab.form)], values[len(tab.form):]
        image, used = session.preview_blend(BlendRequest.from_form(blend_values),
                                            GenerateRequest.from_form(generate_values), progress=_denoising(progress))
        return image, f"Preview of the blend alone · seed {used}"

    @_shown_in_page(BLEND_LABELS)
    def on_save(*values):
        *blend_values, name, file_format = values
        saved = session.save_blend(BlendRequest.from_form(blend_values), name, file_format)
        return str(saved.path), saved.report, *lists.fresh()

    tab.preview_button.click(on_preview, inputs=tab.form + generate_form, outputs=[tab.preview, tab.report],
                             api_name="blend_preview", **PIPELINE)
    tab.save_button.click(on_save, inputs=tab.form + [tab.name, tab.layout],
                          outputs=[tab.file, tab.report, *lists.outputs], api_name="blend_save", **FREE)


@dataclass
class _Uploads:
    """Uploads as the Inspect tab's callbacks take them: unprocessed, a ``FileData`` dict whose ``path`` is in
    Gradio's cache folder. (Processed, Gradio's File would leave an empty temporary file in the cache per event.)

    No upload stays in the cache for long: a refused one is deleted at once, an added one once it is copied into the
    adapter folder, and one that was only inspected is kept for "Add" while it is the page's upload, for at most
    ``UPLOAD_KEPT_SECONDS``: the page's ``gr.State`` (see :func:`_bind_inspect`) holds it, and deletes it when the
    page uploads another file, clears the upload, or the state expires.
    """

    cache: Path

    @staticmethod
    def location(payload) -> Path | None:
        """Where the upload's file is (or was) in the cache, or None when nothing was uploaded."""
        if not payload:
            return None
        return Path(payload["path"] if isinstance(payload, Mapping) else payload)

    def path(self, payload) -> Path | None:
        """The upload's file in the cache, or None when nothing was uploaded."""
        path = self.location(payload)
        if path is None:
            return None
        if not path.is_file():
            raise InvalidArgumentError(f"upload {path.name}: no longer on the server (refused, already added, "
                                       "replaced or kept past its time); upload it again")
        return path

    def discard(self, path: str | Path | None) -> None:
        """Delete ``path`` from the cache, and the folder Gradio made for it when that is left empty. Never raises:
        Gradio calls it from its state-expiry loop, which an exception would stop."""
        if not path:
            return
        with contextlib.suppress(OSError, ValueError):
            cache, path = self.cache.resolve(), Path(path).resolve()
            if path == cache or not path.is_relative_to(cache):
                return  # not an upload in the cache: never delete anything else
            path.unlink(missing_ok=True)
            if path.parent != cache:
                path.parent.rmdir()

    @contextlib.contextmanager
    def deleted_if_refused(self, path: Path) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self.discard(path)
            raise


def _bind_inspect(session: WebUISession, tab: _InspectTab, lists: _AdapterLists) -> None:
    uploads = _Uploads(Path(tab.upload.GRADIO_CACHE))
    # The page's inspected upload (its path in the cache), kept for "Add": per browser session, deleted when the
    # page replaces or clears it, and by Gradio once the state is older than its time to live (also when the page
    # was closed).
    kept = gr.State(None, time_to_live=UPLOAD_KEPT_SECONDS, delete_callback=uploads.discard)

    @_shown_in_page()
    def on_inspect(name):
        if not name:
            return "Choose an adapter file.", None
        summary = session.inspect(name)
        return format_summary(summary, name), summary

    @_shown_in_page()
    def on_inspect_upload(uploaded, previous):
        if previous and Path(previous) != uploads.location(uploaded):
            uploads.discard(previous)  # replaced: the page's "Add" can no longer reach it
        path = uploads.path(uploaded)
        if path is None:
            return "", None, None
        with uploads.deleted_if_refused(path):
            summary = session.inspect_upload(path)
        return format_summary(summary, f"{path.name} (upload, not yet in the adapter folder)"), summary, str(path)

    @_shown_in_page()
    def on_add_upload(uploaded, previous):
        path = uploads.path(uploaded)
        if path is None:
            raise InvalidArgumentError("upload a .safetensors file first")
        try:
            file = session.add_upload(path)
        finally:
            uploads.discard(path)  # refused, or copied into the adapter folder
        return f"Added `{file}` to the adapter folder.", None, *lists.fresh()

    def on_clear_upload(previous):
        uploads.discard(previous)
        return None

    shown = [tab.summary, tab.details]
    tab.picker.change(on_inspect, inputs=tab.picker, outputs=shown, api_name="inspect", **FREE)
    # preprocess=False: the callbacks get the upload's path in the cache (see _Uploads) and check its type
    # themselves, in one line.
    tab.upload.upload(on_inspect_upload, inputs=[tab.upload, kept], outputs=[*shown, kept], api_name="inspect_upload",
                      preprocess=False, **FREE)
    tab.upload.clear(on_clear_upload, inputs=kept, outputs=kept, api_name="clear_upload",
                     api_visibility="undocumented", **FREE)
    tab.add_button.click(on_add_upload, inputs=[tab.upload, kept], outputs=[tab.summary, kept, *lists.outputs],
                         api_name="add_upload", preprocess=False, **FREE)


def _bind_train(session: WebUISession, tab: _TrainTab, lists: _AdapterLists) -> None:
    # The parameter names are the API's (gradio_client's keyword arguments for /train_start).
    @_shown_in_page(TRAIN_LABELS)
    def on_train(name, folder, steps_value, rank_value, alpha_value, lr_value, batch, resolution, trigger_word,
                 prompt_text, every):
        request = TrainRequest.from_form([name, folder, steps_value, rank_value, alpha_value, lr_value, batch,
                                          resolution, trigger_word, prompt_text, every])
        return _progress_html(session.training.start(request)), gr.Timer(active=True)

    def on_tick(last_seen):
        status = session.training.status()
        preview = str(status.preview) if status.preview else gr.skip()
        timer = gr.Timer(active=status.state == "running")
        if status.finished_runs != last_seen:  # a run ended since this page last looked: list its adapter
            return _progress_html(status), preview, timer, status.finished_runs, *lists.fresh()
        return _progress_html(status), preview, timer, last_seen, *lists.unchanged()

    def dataset_folders():
        """The folders of the data root, fresh: the Train tab's dataset choices."""  # the API's description too
        return gr.Dropdown(choices=session.training.dataset_folders())

    tab.button.click(on_train, inputs=tab.form, outputs=[tab.progress, tab.timer], api_name="train_start", **FREE)
    tab.refresh_datasets.click(dataset_folders, outputs=tab.dataset, api_name="dataset_folders", **FREE)
    tab.timer.tick(on_tick, inputs=tab.seen_runs, outputs=[tab.progress, tab.preview, tab.timer, tab.seen_runs,
                                                           *lists.outputs],
                   api_visibility="private", show_progress="hidden", **FREE)


def build_app(session: WebUISession) -> gr.Blocks:
    """The Gradio page for ``session``: Generate, Blend & export, Inspect and Train tabs (element ids: see the
    module docstring)."""
    names = session.library.names()
    with _Page(title="difflora", analytics_enabled=False, delete_cache=CACHE_KEPT) as app:
        gr.Markdown(f"## difflora\nModel `{session.model_label}` · adapter folder `{session.root}`")
        generate = _generate_tab(session, names)
        blend = _blend_tab(names)
        inspect = _inspect_tab(names)
        train = _train_tab(session)
        lists = _AdapterLists(session.library, [*generate.pickers, *blend.pickers, inspect.picker],
                              generate.adapter_table)
        _bind_generate(session, generate, lists)
        _bind_page_load(app, session, lists, train)
        _bind_blend(session, blend, generate.form, lists)
        _bind_inspect(session, inspect, lists)
        _bind_train(session, train, lists)
    app.queue(default_concurrency_limit=1)
    return app
