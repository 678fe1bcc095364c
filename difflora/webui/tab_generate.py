"""The Generate tab: the settings, as many adapter rows as the user adds, the gallery.

The rows are drawn by a ``gr.render`` from what is kept per browser session: the rows (``rows``: each its id and
its fields; every change of a field is written there, one change at a time), their ids alone (``layout``: "Add an
adapter" appends one, a row's ✕ removes it) and the adapter files they offer (``choices``, refreshed with every other
adapter list). The rows are drawn again when ``layout`` or ``choices`` change, each as ``rows`` holds it (Gradio
6.31 does not keep a dropdown's or a slider's value across a render by its ``key``). The Generate button's event is
bound inside the render with the rows' fields as inputs: the page sends what its fields show at the click, whatever
number of rows there is.

An API client calls ``/generate`` with the settings (``GenerateRequest.FORM_FIELDS``) and the adapter rows as one
list of ``[file, weight, enabled, block_weights]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gradio as gr

from ..errors import DiffloraError, first_line
from .library import OUTPUTS_FOLDER, kinds_text
from .page_kit import FREE, GENERATE_LABELS, PIPELINE, denoising, shown_in_page
from .requests import MODEL_SCHEDULER, SCHEDULERS, GenerateRequest
from .session import WebUISession

__all__ = ["ROWS_AT_START", "GenerateTab", "generate_tab"]

ROWS_AT_START = 1  # adapter rows of a page just opened; "Add an adapter" adds more, without a limit


@dataclass
class GenerateTab:
    form: list[gr.components.Component]  # the settings, in GenerateRequest.FORM_FIELDS order (rows not included)
    names: gr.State  # the adapter files the rows offer
    refresh: gr.Button
    adapter_table: gr.Markdown


def _settings(session: WebUISession) -> tuple[list[gr.components.Component], gr.Number]:
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


# Changes of the rows (a field edited, a row added or removed) one at a time, in the order the page sent them: each
# is a new list made from the one before, so none is lost.
ROW_EDITS = {"concurrency_id": "adapter-rows", "concurrency_limit": 1}
_QUIET = {"api_visibility": "private", "show_progress": "hidden"}


def _new_row(row_id: int) -> dict[str, Any]:
    """A row as the page's state keeps it: its id, then its fields by their ``SLOT_FIELDS`` names."""
    return {"id": row_id, "file": None, "weight": 1.0, "enabled": True, "block_weights": ""}


def _row_added(rows: list[dict]) -> tuple[list[dict], list[int]]:
    """The rows with a new empty one at the end, and their ids."""
    rows = [*rows, _new_row(max((row["id"] for row in rows), default=-1) + 1)]
    return rows, [row["id"] for row in rows]


def _row_removed(rows: list[dict], row_id: int) -> tuple[list[dict], list[int]]:
    rows = [row for row in rows if row["id"] != row_id]
    return rows, [row["id"] for row in rows]


def _field_set(rows: list[dict], row_id: int, part: str, value: Any) -> list[dict]:
    return [{**row, part: value} if row["id"] == row_id else row for row in rows]


def _adapter_row(place: int, row: dict[str, Any], files: list[str], session: WebUISession,
                 rows: gr.State, layout: gr.State) -> list[gr.components.Component]:
    """One adapter row (``place`` 0, 1, … in the page) drawn from its state ``row``: its fields in ``SLOT_FIELDS``
    order; below them, what the chosen file is made of (algorithms, layer kinds). Each field's change is kept in
    ``rows``, so the row is drawn as it was when rows are added or removed; its ✕ removes it."""
    row_id = row["id"]
    file = row["file"] if row["file"] in files else None  # a file gone from the folder is not offered any more
    # interactive=True throughout: left to infer it, Gradio drew a rendered row's slider read-only.
    with gr.Group(key=f"group-{row_id}"):
        with gr.Row(key=f"row-{row_id}"):
            picker = gr.Dropdown(files, value=file, label=f"Adapter {place + 1}", elem_id=f"lora-{place}-file",
                                 key=f"file-{row_id}", scale=3, interactive=True)
            weight = gr.Slider(-2, 2, value=row["weight"], step=0.05, label="Weight", elem_id=f"lora-{place}-weight",
                               key=f"weight-{row_id}", scale=3, interactive=True)
            enabled = gr.Checkbox(value=row["enabled"], label="On", elem_id=f"lora-{place}-enabled",
                                  key=f"on-{row_id}", scale=1, interactive=True)
            blocks = gr.Textbox(value=row["block_weights"], label="Block weights", placeholder="down=1,mid=1,up=1",
                                elem_id=f"lora-{place}-blocks", key=f"blocks-{row_id}", scale=2, interactive=True)
            remove = gr.Button("✕ Remove", elem_id=f"lora-{place}-remove", key=f"remove-{row_id}", size="sm",
                               scale=1, min_width=60)
        kinds = gr.Markdown(_kinds_of(session, file), elem_id=f"lora-{place}-kinds", key=f"kinds-{row_id}")
    fields = [picker, weight, enabled, blocks]
    for part, field_ in zip(GenerateRequest.SLOT_FIELDS, fields):
        field_.change(lambda current, value, part=part: _field_set(current, row_id, part, value),
                      inputs=[rows, field_], outputs=rows, **_QUIET, **ROW_EDITS)
    picker.change(lambda name: _kinds_of(session, name), inputs=picker, outputs=kinds, **_QUIET,
                  **FREE)
    remove.click(lambda current: _row_removed(current, row_id), inputs=rows, outputs=[rows, layout], **_QUIET,
                 **ROW_EDITS)
    return fields


def _kinds_of(session: WebUISession, file: str | None) -> str:
    """What ``file`` of the adapter folder is made of, in a line (nothing when no file is chosen; why not, when the
    file is gone or unreadable: the row says so rather than failing to draw)."""
    if not file:
        return ""
    try:
        return kinds_text(session.library.summary(file))
    except DiffloraError as error:
        return f"{file}: {first_line(error)}"


def _rows_as_lists(values: Sequence, width: int) -> list[list]:
    """The rows' field values (flat, as the page sends them) as one list per row."""
    return [list(values[start:start + width]) for start in range(0, len(values), width)]


def generate_tab(app: gr.Blocks, session: WebUISession, names: list[str]) -> GenerateTab:
    """The tab and its events (the page's Generate button, the API's ``/generate``, the rows' add and remove)."""
    with gr.Tab("Generate", id="generate"):
        with gr.Row():
            with gr.Column(scale=3):
                form, used_seed = _settings(session)
                gr.Markdown("**Adapters** (as many rows as you add; more with `<lora:file:weight>` in the prompt). "
                            "Block weights: `down=…,mid=…,up=…,up.1=…,te=…`.")
                # The rows as the page shows them (their ids and fields), their ids alone (what changes when a
                # row is added or removed), and the files they offer.
                rows = gr.State([_new_row(row_id) for row_id in range(ROWS_AT_START)])
                layout = gr.State(list(range(ROWS_AT_START)))
                choices = gr.State(names)
                rows_area = gr.Column()
                add = gr.Button("Add an adapter", elem_id="add-adapter-row", size="sm")
                button = gr.Button("Generate", variant="primary", elem_id="generate-button")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Images", elem_id="gallery", columns=2, format="png", interactive=False)
                status = gr.Markdown(elem_id="generate-status")
                refresh = gr.Button("Refresh adapter list", elem_id="refresh-adapters", size="sm")
                adapter_table = gr.Markdown(session.library.table(), elem_id="adapter-table")
                # The API's adapter rows (a list of SLOT_FIELDS lists); the page sends its rows' own fields instead.
                api_rows = gr.JSON(value=[], visible=False, label=GENERATE_LABELS["adapters"])
    shown = [gallery, used_seed, status]
    width = len(GenerateRequest.SLOT_FIELDS)

    def generated(settings: list, adapters: list, progress: gr.Progress) -> tuple[list[str], int, str]:
        result = session.generate(GenerateRequest.from_form([*settings, adapters]), progress=denoising(progress))
        mix = ", ".join(f"{use.name} {use.weight:g}" for use in result.adapters) or "none"
        fused = " (fused)" if session.runtime.fused else ""
        text = (f"{len(result.files)} image(s) saved in `{OUTPUTS_FOLDER}/` · seed {result.seed} · "
                f"{result.scheduler} · adapters{fused}: {mix}")
        return [str(path) for path in result.files], result.seed, text

    # Gradio finds gr.Progress by a positional parameter's default, so it comes before the form values.
    @shown_in_page(GENERATE_LABELS)
    def on_generate(progress=gr.Progress(), *values):
        """Generate with the settings and the adapter rows (a list of [file, weight, enabled, block_weights])."""
        *settings, adapters = values
        return generated(settings, adapters, progress)

    @shown_in_page(GENERATE_LABELS)
    def on_generate_in_page(progress=gr.Progress(), *values):
        settings, fields = list(values[:len(form)]), values[len(form):]
        return generated(settings, _rows_as_lists(fields, width), progress)

    gr.on([], on_generate, inputs=[*form, api_rows], outputs=shown, api_name="generate", **PIPELINE)
    add.click(_row_added, inputs=rows, outputs=[rows, layout], **_QUIET, **ROW_EDITS)

    # Drawn when the page loads, when a row is added or removed and when the file list changes; not when a field
    # changes (the field shows its own value), so typing in a field is never interrupted.
    with rows_area:
        @gr.render(inputs=[rows, choices], triggers=[app.load, layout.change, choices.change])
        def adapter_rows(current: list[dict], files: list[str]):
            fields = []
            for place, row in enumerate(current):
                fields += _adapter_row(place, row, files, session, rows, layout)
            if not current:
                gr.Markdown("No adapter rows: add one, or use `<lora:file:weight>` in the prompt.")
            button.click(on_generate_in_page, inputs=[*form, *fields], outputs=shown, api_visibility="private",
                         **PIPELINE)

    return GenerateTab(form, choices, refresh, adapter_table)
