"""The Inspect tab: what an adapter file is made of (format, algorithms and layer kinds per component, ranks,
targets, keys not applied), from the adapter folder or an upload, and adding an upload to the folder.

What stays in Gradio's cache (``<lora-dir>/.gradio-cache`` under ``difflora webui``): a refused upload is deleted at
once, an added one once it is copied into the adapter folder; one that was only inspected is kept for the "Add"
button until the same page uploads another file or clears it, and for at most an hour (``UPLOAD_KEPT_SECONDS``,
also when the page is closed); "Add" after that asks for the upload again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from ..errors import InvalidArgumentError
from ..keys import ADAPTER_SUFFIX
from .library import format_summary
from .page_kit import FREE, AdapterLists, shown_in_page
from .session import WebUISession

__all__ = ["UPLOAD_KEPT_SECONDS", "InspectTab", "bind_inspect", "inspect_tab"]

# How long an upload that was only inspected is kept in Gradio's cache for the "Add" button (see _Uploads).
UPLOAD_KEPT_SECONDS = 3600


@dataclass
class InspectTab:
    picker: gr.Dropdown
    upload: gr.File
    add_button: gr.Button
    summary: gr.Markdown
    details: gr.JSON


def inspect_tab(names: list[str]) -> InspectTab:
    with gr.Tab("Inspect", id="inspect"):
        with gr.Row():
            picker = gr.Dropdown(names, value=None, label="Adapter file", elem_id="inspect-file")
            upload = gr.File(label="…or upload one (.safetensors)", file_types=[ADAPTER_SUFFIX],
                             elem_id="inspect-upload")
        add_button = gr.Button("Add the upload to the adapter folder", elem_id="inspect-add-upload")
        summary = gr.Markdown(elem_id="inspect-summary")
        details = gr.JSON(label="Everything (describe_adapter)", elem_id="inspect-json")
    return InspectTab(picker, upload, add_button, summary, details)



@dataclass
class _Uploads:
    """Uploads as the Inspect tab's callbacks take them: unprocessed, a ``FileData`` dict whose ``path`` is in
    Gradio's cache folder. (Processed, Gradio's File would leave an empty temporary file in the cache per event.)

    No upload stays in the cache for long: a refused one is deleted at once, an added one once it is copied into the
    adapter folder, and one that was only inspected is kept for "Add" while it is the page's upload, for at most
    ``UPLOAD_KEPT_SECONDS``: the page's ``gr.State`` (see :func:`bind_inspect`) holds it, and deletes it when the
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


def bind_inspect(session: WebUISession, tab: InspectTab, lists: AdapterLists) -> None:
    uploads = _Uploads(Path(tab.upload.GRADIO_CACHE))
    # The page's inspected upload (its path in the cache), kept for "Add": per browser session, deleted when the
    # page replaces or clears it, and by Gradio once the state is older than its time to live (also when the page
    # was closed).
    kept = gr.State(None, time_to_live=UPLOAD_KEPT_SECONDS, delete_callback=uploads.discard)

    @shown_in_page()
    def on_inspect(name):
        if not name:
            return "Choose an adapter file.", None
        summary = session.inspect(name)
        return format_summary(summary, name), summary

    @shown_in_page()
    def on_inspect_upload(uploaded, previous):
        if previous and Path(previous) != uploads.location(uploaded):
            uploads.discard(previous)  # replaced: the page's "Add" can no longer reach it
        path = uploads.path(uploaded)
        if path is None:
            return "", None, None
        with uploads.deleted_if_refused(path):
            summary = session.inspect_upload(path)
        return format_summary(summary, f"{path.name} (upload, not yet in the adapter folder)"), summary, str(path)

    @shown_in_page()
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
