"""The Train tab: a folder of the data root, the options, one run at a time in the background, its progress.

The tab's own fields hold the options most runs set; "More options" holds every other option of the training
dataclass (:func:`~difflora.webui.requests.more_training_options`), each field built from its type, help, choices
and range, so an option added to :class:`~difflora.train.TrainConfig` appears there by itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

import gradio as gr

from ..data import DATA_RANGES
from ..train.config import NUMBER_RANGES as TRAINING_RANGES
from .page_kit import FREE, TRAIN_LABELS, AdapterLists, in_field_words, shown_in_page
from .requests import MoreOption, TrainRequest, more_training_options
from .session import WebUISession
from .training_job import TrainingStatus

__all__ = ["TrainTab", "bind_train", "progress_html", "train_tab"]


@dataclass
class TrainTab:
    form: list[gr.components.Component]  # in TrainRequest.from_form order
    dataset: gr.Dropdown
    refresh_datasets: gr.Button
    button: gr.Button
    progress: gr.HTML
    preview: gr.Image
    seen_runs: gr.State
    timer: gr.Timer
    more_options_api: gr.JSON  # the API's "More options" (a dict by name); the page sends its fields instead


def progress_html(status: TrainingStatus) -> str:
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


def _train_maximum(parameter: str) -> float | None:
    """The largest value the library accepts for a training option (its range), so Gradio refuses more at once;
    None for an option without a range."""
    if parameter in DATA_RANGES:
        return DATA_RANGES[parameter][1]
    return TRAINING_RANGES[parameter][1] if parameter in TRAINING_RANGES else None


def _more_option_field(option: MoreOption) -> gr.components.Component:
    """The field of one of the "More options", built from the training dataclass (its help, choices, range)."""
    common = {"label": TRAIN_LABELS[option.name], "info": option.help,
              "elem_id": "train-" + option.name.replace("_", "-")}
    if option.choices:
        choices = [("default", "") if choice is None else choice for choice in option.choices]
        return gr.Dropdown(choices, value="" if option.default is None else option.default, **common)
    if option.kind is bool:
        return gr.Checkbox(value=bool(option.default), **common)
    if option.kind in (int, float) and option.optional:
        # Text, empty meaning unset: Gradio's Number has no empty state (it would show and send 0).
        return gr.Textbox(value="" if option.default is None else str(option.default), placeholder="unset",
                          **common)
    if option.kind in (int, float):
        ranged = DATA_RANGES.get(option.name) or TRAINING_RANGES.get(option.name)
        minimum = ranged[0] if ranged and option.kind is int else None  # (0, x] ranges: the library says "> 0"
        return gr.Number(value=option.default, precision=0 if option.kind is int else None, minimum=minimum,
                         maximum=_train_maximum(option.name), **common)
    return gr.Textbox(value=option.default or "", **common)


def _more_options() -> list[gr.components.Component]:
    """Every training option the tab's own fields do not hold, in ``difflora train --help`` order, four a row."""
    options = list(more_training_options().values())
    fields = []
    with gr.Accordion("More options (those of difflora train)", open=False, elem_id="train-more"):
        for start in range(0, len(options), 4):
            with gr.Row():
                fields += [_more_option_field(option) for option in options[start:start + 4]]
    return fields


def train_tab(session: WebUISession) -> TrainTab:
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
        form = [name, dataset, steps, rank, alpha, lr, batch, resolution, trigger, validation_prompt, validation_steps,
                *_more_options()]
        button = gr.Button("Start training", variant="primary", elem_id="train-start")
        status = session.training.status()
        progress = gr.HTML(progress_html(status), elem_id="train-progress")
        preview = gr.Image(label="Validation image", type="filepath", interactive=False, elem_id="train-preview")
        seen_runs = gr.State(status.finished_runs)
        timer = gr.Timer(1.0, active=False)
        more_options_api = gr.JSON(value={}, visible=False, label="More options")
    return TrainTab(form, dataset, refresh_datasets, button, progress, preview, seen_runs, timer, more_options_api)


def bind_train(session: WebUISession, tab: TrainTab, lists: AdapterLists) -> None:
    # The parameter names are the API's (gradio_client's keyword arguments for /train_start).
    @shown_in_page(TRAIN_LABELS)
    def on_train(name, folder, steps_value, rank_value, alpha_value, lr_value, batch, resolution, trigger_word,
                 prompt_text, every, *more):
        request = TrainRequest.from_form([name, folder, steps_value, rank_value, alpha_value, lr_value, batch,
                                          resolution, trigger_word, prompt_text, every, *more])
        return progress_html(session.training.start(request)), gr.Timer(active=True)

    def on_tick(last_seen):
        status = session.training.status()
        preview = str(status.preview) if status.preview else gr.skip()
        timer = gr.Timer(active=status.state == "running")
        if status.finished_runs != last_seen:  # a run ended since this page last looked: list its adapter
            return progress_html(status), preview, timer, status.finished_runs, *lists.fresh()
        return progress_html(status), preview, timer, last_seen, *lists.unchanged()

    def dataset_folders():
        """The folders of the data root, fresh: the Train tab's dataset choices."""  # the API's description too
        return gr.Dropdown(choices=session.training.dataset_folders())

    # The page sends every field; an API client the tab's own fields and a dict of the "More options" it sets.
    tab.button.click(on_train, inputs=tab.form, outputs=[tab.progress, tab.timer], api_visibility="private", **FREE)
    gr.on([], on_train, inputs=[*tab.form[:len(TrainRequest.FORM_FIELDS)], tab.more_options_api],
          outputs=[tab.progress, tab.timer], api_name="train_start", **FREE)
    tab.refresh_datasets.click(dataset_folders, outputs=tab.dataset, api_name="dataset_folders", **FREE)
    tab.timer.tick(on_tick, inputs=tab.seen_runs, outputs=[tab.progress, tab.preview, tab.timer, tab.seen_runs,
                                                           *lists.outputs],
                   api_visibility="private", show_progress="hidden", **FREE)
