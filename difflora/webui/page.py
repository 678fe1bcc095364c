"""The Gradio page: :func:`build_app` puts the tabs together and binds what they share.

Each tab is one module that builds its components and binds its events (:mod:`~difflora.webui.tab_generate`,
:mod:`~difflora.webui.tab_blend`, :mod:`~difflora.webui.tab_inspect`, :mod:`~difflora.webui.tab_train`);
:mod:`~difflora.webui.page_kit` holds what they share (field labels, one-line errors, the adapter lists). These are
the modules of difflora that import gradio. Each callback turns form values into a request
(:mod:`~difflora.webui.requests`), calls one :class:`~difflora.webui.session.WebUISession` method and turns a
:class:`~difflora.errors.DiffloraError` into a one-line message in the page that names the field at fault.

What stays in Gradio's cache (``<lora-dir>/.gradio-cache`` under ``difflora webui``): uploads as
:mod:`~difflora.webui.tab_inspect` says; everything else Gradio keeps there (copies of the images and files it
served) is deleted once a day old, and all of it when the server stops (``CACHE_KEPT``).

Stable element ids for browser tests: ``prompt``, ``negative-prompt``, ``generate-button``, ``gallery``,
``used-seed``, ``generate-status``, ``add-adapter-row``, ``lora-N-file``/``-weight``/``-enabled``/``-blocks``/
``-remove``/``-kinds`` (N = 0, 1, … the rows in the page's order), ``refresh-adapters``, ``adapter-table``,
``blend-…``, ``inspect-…`` and ``train-…`` (see each component).
"""

from __future__ import annotations

import gradio as gr

from .page_kit import (
    BLEND_LABELS,
    FREE,
    GENERATE_LABELS,
    TRAIN_LABELS,
    AdapterLists,
    FieldLabels,
    PageBlocks,
    in_field_words,
)
from .session import WebUISession
from .tab_blend import bind_blend, blend_tab
from .tab_generate import generate_tab
from .tab_inspect import UPLOAD_KEPT_SECONDS, bind_inspect, inspect_tab
from .tab_train import TrainTab, bind_train, progress_html, train_tab

__all__ = ["BLEND_LABELS", "CACHE_KEPT", "GENERATE_LABELS", "TRAIN_LABELS", "UPLOAD_KEPT_SECONDS", "FieldLabels",
           "build_app", "in_field_words", "progress_html"]

# Everything else Gradio keeps in its cache (copies of the images and files it served, uploads no event asked about)
# is deleted once a day old, checked every hour, and all of it when the server stops: (frequency, age) in seconds.
CACHE_KEPT = (3600, 86400)


def _bind_page_load(app: gr.Blocks, session: WebUISession, lists: AdapterLists, train: TrainTab) -> None:
    # Dropdown choices are kept per browser session: a page opened after files were added lists them too, and a
    # page opened while a run trains follows its progress.
    def on_page_load():
        status = session.training.status()
        datasets = gr.Dropdown(choices=session.training.dataset_folders())
        return *lists.fresh(), datasets, progress_html(status), gr.Timer(active=status.state == "running")

    app.load(on_page_load, outputs=[*lists.outputs, train.dataset, train.progress, train.timer],
             api_visibility="private", show_progress="hidden", **FREE)


def build_app(session: WebUISession) -> gr.Blocks:
    """The Gradio page for ``session``: Generate, Blend & export, Inspect and Train tabs (element ids: see the
    module docstring)."""
    names = session.library.names()
    with PageBlocks(title="difflora", analytics_enabled=False, delete_cache=CACHE_KEPT) as app:
        gr.Markdown(f"## difflora\nModel `{session.model_label}` · adapter folder `{session.root}`")
        generate = generate_tab(app, session, names)
        blend = blend_tab(names)
        inspect = inspect_tab(names)
        train = train_tab(session)
        lists = AdapterLists(session.library, [*blend.pickers, inspect.picker], generate.names,
                             generate.adapter_table)

        def adapter_lists():
            """Fresh choices for every adapter dropdown, and the adapter table."""  # the API's description too
            return lists.fresh()

        generate.refresh.click(adapter_lists, outputs=lists.outputs, api_name="refresh_adapters", **FREE)
        _bind_page_load(app, session, lists, train)
        bind_blend(session, blend, generate.form, lists)
        bind_inspect(session, inspect, lists)
        bind_train(session, train, lists)
    app.queue(default_concurrency_limit=1)
    return app
