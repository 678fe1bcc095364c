"""The Blend & export tab: ``SLOT_COUNT`` rows (file, weight, block weights), the method, a preview and a save.

A row's block weights scale its adapter block by block before the blend (the session checks them against the
model's blocks), so a blend of ``a`` with ``down=0`` behaves as ``a`` with those block weights in the Generate tab.
What the blend costs, module by module (the relative error of each module that is not exact), is shown beside the
preview; a module the blend refuses is told there in one line.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from ..blend import BLEND_METHODS
from ..formats import WRITE_LAYOUTS
from .library import kinds_text
from .page_kit import BLEND_LABELS, FREE, GENERATE_LABELS, PIPELINE, AdapterLists, denoising, shown_in_page
from .requests import SLOT_COUNT, BlendRequest, GenerateRequest
from .session import WebUISession

__all__ = ["BlendTab", "bind_blend", "blend_tab"]


@dataclass
class BlendTab:
    form: list[gr.components.Component]  # in BlendRequest.from_form order
    pickers: list[gr.Dropdown]
    kinds: list[gr.Markdown]  # what each row's file is made of
    preview_button: gr.Button
    name: gr.Textbox
    layout: gr.Dropdown
    save_button: gr.Button
    preview: gr.Image
    report: gr.Markdown
    file: gr.File


def blend_tab(names: list[str]) -> BlendTab:
    labels = BLEND_LABELS
    with gr.Tab("Blend & export", id="blend"):
        form: list[gr.components.Component] = []
        pickers, kinds = [], []
        gr.Markdown("Blend adapters of any kind with weights and block weights (`down=…,mid=…,up=…,up.1=…,te=…`, "
                    "as on the Generate tab). **concat** is exact for LoRA (rank = sum of ranks), and LoHa, LoKr "
                    "and full diffs join it as LoRA at the rank given; **svd** is the best rank-R approximation; "
                    "**ties**/**dare** are PEFT's merges. Each inexact module's error is reported. Preview uses the "
                    "Generate tab's prompt and settings, with the blend alone.")
        for index in range(SLOT_COUNT):
            with gr.Group():
                with gr.Row():
                    picker = gr.Dropdown(names, value=None, label=f"Adapter {index + 1}",
                                         elem_id=f"blend-{index}-file", scale=3)
                    weight = gr.Slider(-2, 2, value=1.0, step=0.05, label="Weight", elem_id=f"blend-{index}-weight",
                                       scale=3)
                    blocks = gr.Textbox(label="Block weights", placeholder="down=1,mid=1,up=1",
                                        elem_id=f"blend-{index}-blocks", scale=2)
                kinds.append(gr.Markdown(elem_id=f"blend-{index}-kinds"))
            pickers.append(picker)
            form += [picker, weight, blocks]
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
    return BlendTab(form, pickers, kinds, preview_button, name, layout, save_button, preview, report, file)


def bind_blend(session: WebUISession, tab: BlendTab, settings: list, lists: AdapterLists) -> None:
    """The tab's events; ``settings`` are the Generate tab's fields (``GenerateRequest.FORM_FIELDS``) the preview
    is made with."""

    @shown_in_page(GENERATE_LABELS | BLEND_LABELS)
    def on_preview(progress=gr.Progress(), *values):
        blend_values, generate_values = values[:len(tab.form)], values[len(tab.form):]
        image, used, report = session.preview_blend(BlendRequest.from_form(blend_values),
                                                    GenerateRequest.from_form([*generate_values, []]),
                                                    progress=denoising(progress))
        return image, f"Preview of the blend alone · seed {used}\n\n{report}"

    @shown_in_page(BLEND_LABELS)
    def on_save(*values):
        *blend_values, name, file_format = values
        saved = session.save_blend(BlendRequest.from_form(blend_values), name, file_format)
        return str(saved.path), saved.report, *lists.fresh()

    @shown_in_page()
    def kinds_of_file(name):
        return kinds_text(session.library.summary(name)) if name else ""

    tab.preview_button.click(on_preview, inputs=tab.form + settings, outputs=[tab.preview, tab.report],
                             api_name="blend_preview", **PIPELINE)
    tab.save_button.click(on_save, inputs=tab.form + [tab.name, tab.layout],
                          outputs=[tab.file, tab.report, *lists.outputs], api_name="blend_save", **FREE)
    for picker, kinds in zip(tab.pickers, tab.kinds):
        picker.change(kinds_of_file, inputs=picker, outputs=kinds, api_visibility="private", show_progress="hidden",
                      **FREE)
