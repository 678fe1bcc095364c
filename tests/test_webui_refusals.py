"""What the web UI refuses, and that a refusal leaves nothing behind: datasets only from inside the data root,
refused uploads deleted from Gradio's cache (accepted ones once copied, inspected ones once replaced or after their
time), Gradio's own refusals one line in the server log (the Train tab's numbers stop at the library's maxima), weights
checked once by the library's rule, and the library's refusals of weights and block weights (a mix float16 cannot
hold included) told by the adapter row that holds them, the mix before put back."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry calls

import json  # noqa: E402
import logging  # noqa: E402
import pickle  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import httpx  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from difflora import LoRARuntime, webui  # noqa: E402
from difflora.errors import InvalidArgumentError  # noqa: E402
from difflora.formats import read_adapter, write_adapter  # noqa: E402
from difflora.pipelines import load_pipeline  # noqa: E402
from difflora.webui import AdapterLibrary, GenerateRequest, TrainingJob, WebUISession  # noqa: E402
from difflora.webui import page, tab_inspect  # noqa: E402
from difflora.webui.page import GENERATE_LABELS, in_field_words  # noqa: E402
from helpers import random_adapter, served_app  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_model_dir):
    """An adapter folder with two random adapters; a data root with two datasets, a hidden folder and a symlink
    leading out of it; a folder outside both; and a folder of its own for Gradio's cache."""
    base = tmp_path_factory.mktemp("refusals")
    found = SimpleNamespace(lora_dir=base / "loras", data_root=base / "data", outside=base / "outside",
                            cache=base / "gradio-cache")
    for folder in (found.lora_dir, found.data_root / "cats", found.data_root / "dogs", found.data_root / ".hidden",
                   found.outside / "secret"):
        folder.mkdir(parents=True)
    (found.data_root / "escape").symlink_to(found.outside, target_is_directory=True)
    runtime = LoRARuntime.attach(load_pipeline(tiny_model_dir, quiet=True))
    for seed, name in enumerate(("alpha", "beta"), start=1):
        runtime.create_adapter(name, rank=2, init="random", seed=seed)
        runtime.save(name, found.lora_dir / f"{name}.safetensors")
    return found


@pytest.fixture(scope="module")
def served(folders, tiny_model_dir, tmp_path_factory):
    """The page on the tiny model with ``--data-root``, Gradio's cache in ``folders.cache`` (as ``difflora webui``
    puts it in the adapter folder), and a gradio_client connected to it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(folders.cache))  # read when the page is built and served
        session = WebUISession(load_pipeline(tiny_model_dir, quiet=True), folders.lora_dir,
                               data_root=folders.data_root)
        with served_app(session) as url:
            downloads = str(tmp_path_factory.mktemp("downloads"))
            yield session, Client(url, verbose=False, analytics_enabled=False, download_files=downloads)


def generate_form(slots=(), prompt="a castle", fuse=False):
    """The Generate tab's values (GenerateRequest.FORM_FIELDS, then the adapter rows), 2 steps at 64 × 64."""
    values = [prompt, "", 2, 5.0, 7, False, 64, 64, "Model default", 1, fuse]
    return values + [[list(slot) for slot in slots]]


def train_form(dataset):
    return ["named", dataset, 2, 2, 0, 1e-3, 1, 64, "", "", 0]


def test_datasets_come_only_from_inside_the_data_root(folders, tmp_path):
    job = TrainingJob(AdapterLibrary(folders.lora_dir), "embedded", data_root=folders.data_root)
    assert job.dataset_folders() == ["cats", "dogs"]  # no hidden folder, no symlink leading out
    cats = (folders.data_root / "cats").resolve()
    assert job.dataset_folder("cats") == cats and job.dataset_folder(str(folders.data_root / "cats")) == cats
    refused = ["/etc", str(folders.outside / "secret"), "../outside/secret", "escape", "escape/secret",
               str(folders.data_root / "escape"), "cats/../../outside", str(folders.lora_dir)]
    for dataset in refused:
        with pytest.raises(InvalidArgumentError, match="refused"):
            job.dataset_folder(dataset)
    with pytest.raises(InvalidArgumentError, match="no such folder"):
        job.dataset_folder("birds")
    with pytest.raises(InvalidArgumentError, match="--data-root|data_root"):
        TrainingJob(AdapterLibrary(folders.lora_dir), "embedded", data_root=folders.data_root / "missing")

    # Without a data root, the adapter folder is the root: its own folders (outputs, training runs) are not offered.
    for folder in ("set", "outputs", "training"):
        (tmp_path / folder).mkdir()
    own = TrainingJob(AdapterLibrary(tmp_path), "embedded")
    assert own.dataset_folders() == ["set"] and own.dataset_folder("set") == (tmp_path / "set").resolve()
    with pytest.raises(InvalidArgumentError, match="refused, it is not inside the adapter folder"):
        own.dataset_folder(str(folders.data_root / "cats"))


def test_the_train_tab_offers_the_folders_of_the_data_root_and_refuses_others(served, folders):
    session, client = served
    offered = client.predict(api_name="/dataset_folders")
    assert [value for _, value in offered["choices"]] == ["cats", "dogs"]
    (folders.data_root / "birds").mkdir()
    try:
        offered = client.predict(api_name="/dataset_folders")  # the refresh button: new folders appear
        assert [value for _, value in offered["choices"]] == ["birds", "cats", "dogs"]
    finally:
        (folders.data_root / "birds").rmdir()
    for dataset in ("/etc", str(folders.outside / "secret"), "escape", "../outside/secret"):
        with pytest.raises(AppError, match="^dataset folder .*: refused"):
            client.predict(*train_form(dataset), api_name="/train_start")
    assert session.training.status().state == "idle" and not (folders.lora_dir / "training").exists()


def cached(folders, name: str) -> list:
    """The copies of an upload called ``name`` in Gradio's cache."""
    return sorted(folders.cache.rglob(name))


def test_refused_and_added_uploads_leave_nothing_in_gradios_cache(served, folders, tmp_path):
    """Gradio keeps every upload in its cache; a refused one is deleted at once, an accepted one once it is copied
    into the adapter folder (and, until then, kept for the "Add" button)."""
    session, client = served

    def cache_contents():
        return sorted(str(path.relative_to(folders.cache)) for path in folders.cache.rglob("*"))

    before = cache_contents()
    uploads = {
        "garbage.safetensors": os.urandom(4096),
        "pickled.safetensors": pickle.dumps({"lora_down": list(range(64))}),  # a pickle in disguise
        "model.ckpt": pickle.dumps({"state_dict": {}}),
    }
    for name, data in uploads.items():
        (tmp_path / name).write_bytes(data)
    save_file({"model.diffusion_model.weight": torch.ones(4, 4)}, tmp_path / "not-a-lora.safetensors")
    for name in [*uploads, "not-a-lora.safetensors"]:
        for api_name in ("/inspect_upload", "/add_upload"):
            with pytest.raises(AppError):
                client.predict(handle_file(str(tmp_path / name)), api_name=api_name)
            assert cache_contents() == before, (name, api_name)
        assert not (folders.lora_dir / name).exists()

    good = tmp_path / "gamma.safetensors"
    good.write_bytes((folders.lora_dir / "alpha.safetensors").read_bytes())
    try:
        client.predict(handle_file(str(good)), api_name="/inspect_upload")
        assert "gamma.safetensors" in {path.name for path in folders.cache.rglob("*")}  # waits for "Add"
        message, *_ = client.predict(handle_file(str(good)), api_name="/add_upload")
        assert "gamma.safetensors" in message and (folders.lora_dir / "gamma.safetensors").is_file()
        assert cache_contents() == before
    finally:
        (folders.lora_dir / "gamma.safetensors").unlink(missing_ok=True)


def test_gradios_own_refusals_are_one_line_in_the_server_log(served, caplog, capfd):
    """A value Gradio refuses before any callback runs (a stale page, an API client): the client gets Gradio's one
    line, the server log one line too, and no traceback."""
    session, client = served
    caplog.set_level(logging.WARNING, logger="difflora.webui.page_kit")
    with pytest.raises(AppError, match="not in the list of choices"):
        client.predict("stale.safetensors", api_name="/inspect")
    too_many_steps = generate_form([("alpha.safetensors", 0.5, True, "")])
    too_many_steps[2] = 500  # the Steps slider stops at 150
    with pytest.raises(AppError, match="greater than maximum"):
        client.predict(*too_many_steps, api_name="/generate")
    steps = train_form("cats")
    steps[2] = "many"  # a value of the wrong type: Gradio's own message, which it would not even send
    with pytest.raises(AppError, match="Could not preprocess input component at index 2"):
        client.predict(*steps, api_name="/train_start")
    records = [record for record in caplog.records if record.name == "difflora.webui.page_kit"]
    assert [record.levelno for record in records] == [logging.WARNING] * 3
    assert all(word in record.getMessage() for record, word in zip(records, ("stale.safetensors", "maximum", "'many'")))
    assert all("\n" not in record.getMessage() and record.exc_info is None for record in records)
    assert "Traceback" not in capfd.readouterr().err


def test_the_train_tabs_numbers_stop_at_the_librarys_maxima(served, caplog):
    """Rank, steps, batch size, resolution (4096), alpha, learning rate and validation interval: the page's fields
    carry the library's maxima, so Gradio refuses a larger number at once, in one line, and no run starts."""
    from difflora.data import DATA_RANGES
    from difflora.train.config import NUMBER_RANGES

    session, client = served
    fields = {component["props"].get("elem_id"): component["props"] for component in client.config["components"]}
    maxima = {"steps": NUMBER_RANGES["steps"][1], "rank": NUMBER_RANGES["rank"][1],
              "alpha": NUMBER_RANGES["alpha"][1], "lr": NUMBER_RANGES["lr"][1],
              "batch-size": NUMBER_RANGES["batch_size"][1], "resolution": DATA_RANGES["resolution"][1],
              "validation-steps": NUMBER_RANGES["validation_steps"][1]}
    assert maxima["resolution"] == 4096
    assert {name: fields[f"train-{name}"].get("maximum") for name in maxima} == maxima
    caplog.set_level(logging.WARNING, logger="difflora.webui.page_kit")
    for index, name, above in [(2, "steps", 1), (3, "rank", 1), (6, "batch-size", 1), (7, "resolution", 8)]:
        form = train_form("cats")
        form[index] = maxima[name] + above
        with pytest.raises(AppError, match=f"greater than maximum value {maxima[name]}"):
            client.predict(*form, api_name="/train_start")
    assert session.training.status().state == "idle"
    assert len([record for record in caplog.records if "refused by the page (train_start)" in record.getMessage()]) == 4


def test_weight_and_block_weight_errors_are_told_by_their_row(served, monkeypatch):
    """The library's refusals of a weight or block weights (parameters ``weight``, ``block_weights``) are told by
    the row (or prompt tag) that holds them, never as a flag; the mix in place stays as it was."""
    session, client = served
    rows = [("alpha.safetensors", 0.5, True, ""), ("beta.safetensors", 0.5, True, "down=nan")]
    with pytest.raises(AppError) as caught:
        client.predict(*generate_form(rows), api_name="/generate")
    assert str(caught.value).startswith("Block weights of adapter 2: down must be a finite number")

    client.predict(*generate_form([("alpha.safetensors", 0.7, True, "")]), api_name="/generate")  # the mix in place
    runtime = session.runtime
    set_weight, set_block_weights = runtime.set_weight, runtime.set_block_weights

    def narrow_set_weight(name, weight):  # the runtime's range check, narrowed to what a slider can send
        if abs(weight) > 1:
            raise InvalidArgumentError(f"weight of {name!r} must be a finite number in [-1, 1], got {weight!r}",
                                       "weight")
        set_weight(name, weight)

    def block_checking_set_block_weights(name, block_weights):
        if "up.9" in block_weights.per_block:
            raise InvalidArgumentError("block_weights: up.9: the model has no such block (its blocks: down.0–down.1, "
                                       "up.0–up.1)", "block_weights")
        set_block_weights(name, block_weights)

    monkeypatch.setattr(runtime, "set_weight", narrow_set_weight)
    monkeypatch.setattr(runtime, "set_block_weights", block_checking_set_block_weights)
    cases = [
        (generate_form([("alpha.safetensors", 0.3, True, ""), ("beta.safetensors", 1.5, True, "")]),
         "Weight of adapter 2: must be a finite number in [-1, 1], got 1.5"),
        (generate_form([("beta.safetensors", 0.2, True, ""), ("alpha.safetensors", 0.3, True, "up.9=0")]),
         "Block weights of adapter 2: up.9: the model has no such block (its blocks: down.0–down.1, up.0–up.1)"),
        (generate_form([("alpha.safetensors", 0.3, True, "")], prompt="a castle <lora:beta:1.5>"),
         "Prompt: tag <lora:beta:1.5>: weight must be a finite number in [-1, 1], got 1.5"),
    ]
    for form, expected in cases:
        with pytest.raises(AppError) as caught:
            client.predict(*form, api_name="/generate")
        assert str(caught.value) == expected
        active = {name: info.weight for name, info in runtime.adapters.items() if info.enabled}
        assert active == {"alpha": 0.7}, expected  # the change of alpha's weight before the refusal was undone


def test_an_upload_only_inspected_goes_when_its_page_replaces_it_or_after_its_time(served, folders, tmp_path,
                                                                                    monkeypatch):
    """Gradio would keep an upload that was only inspected for ever: it goes when the same page uploads another
    file or clears it, or once it is older than ``UPLOAD_KEPT_SECONDS`` (also when the page never comes back);
    "Add" then asks for the upload again, and nothing reaches the adapter folder."""
    session, client = served
    gamma, delta = tmp_path / "gamma.safetensors", tmp_path / "delta.safetensors"
    gamma.write_bytes((folders.lora_dir / "alpha.safetensors").read_bytes())
    delta.write_bytes((folders.lora_dir / "beta.safetensors").read_bytes())
    client.predict(handle_file(str(gamma)), api_name="/inspect_upload")
    assert cached(folders, "gamma.safetensors")  # kept for "Add"
    client.predict(handle_file(str(delta)), api_name="/inspect_upload")  # the same page (client session) replaces it
    assert not cached(folders, "gamma.safetensors") and cached(folders, "delta.safetensors")

    monkeypatch.setattr(tab_inspect, "UPLOAD_KEPT_SECONDS", 1)
    with served_app(session) as url:
        short = Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path / "downloads"))
        short.predict(handle_file(str(gamma)), api_name="/inspect_upload")
        (kept,) = cached(folders, "gamma.safetensors")
        deadline = time.monotonic() + 20  # Gradio looks for expired state every second
        while kept.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not kept.exists() and not kept.parent.exists()  # the file, and the folder Gradio made for it
        assert cached(folders, "delta.safetensors")  # the other page's upload is still in its time
        # What the page still shows and sends with "Add": the upload as it was (gradio_client would upload it anew).
        stale = {"path": str(kept), "orig_name": kept.name, "meta": {"_type": "gradio.FileData"}}
        assert re.fullmatch(r"upload gamma\.safetensors: no longer on the server .*; upload it again",
                            error_of_call(url, "add_upload", stale))
    assert not (folders.lora_dir / "gamma.safetensors").exists()
    client.predict(api_name="/clear_upload")  # the page's × on its upload
    assert not cached(folders, "delta.safetensors")
    message, *_ = client.predict(handle_file(str(delta)), api_name="/add_upload")  # uploaded again, and added
    assert "delta.safetensors" in message and not cached(folders, "delta.safetensors")
    (folders.lora_dir / "delta.safetensors").unlink()


def test_whatever_else_gradio_keeps_goes_after_its_time(served, folders, tmp_path, monkeypatch):
    """The backstop for the rest of the cache (``CACHE_KEPT``): an upload no event ever asked about (sent straight to
    Gradio's upload route) is deleted once it is older than the age, here one second."""
    session, _ = served
    monkeypatch.setattr(page, "CACHE_KEPT", (1, 1))
    with served_app(session) as url:
        sent = httpx.post(f"{url}gradio_api/upload", files=[("files", ("orphan.safetensors", b"0" * 64))], timeout=60)
        (orphan,) = map(Path, sent.json())
        assert orphan.is_file() and orphan.is_relative_to(folders.cache)
        deadline = time.monotonic() + 20
        while orphan.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not orphan.exists()


def error_of_call(url: str, api_name: str, *data) -> str | None:
    """The error message an event of the page sends for ``data`` exactly as given (no file uploaded), or None."""
    event = httpx.post(f"{url}gradio_api/call/{api_name}", json={"data": list(data)}, timeout=60).json()
    stream = httpx.get(f"{url}gradio_api/call/{api_name}/{event['event_id']}", timeout=60).text
    lines = stream.splitlines()
    for kind, payload in zip(lines, lines[1:]):
        if kind == "event: error":
            return json.loads(payload.removeprefix("data: "))["error"]
    return None


def test_a_weight_out_of_range_is_refused_before_any_file_is_read(served, monkeypatch):
    """A weight is checked once, when the request is read, by the library's rule: a prompt tag's 1e38 never gets
    as far as loading its file, and the mix in place stays."""
    session, _ = served
    session.generate(GenerateRequest.from_form(generate_form([("alpha.safetensors", 0.4, True, "")])))
    reads = []
    monkeypatch.setattr(webui.session, "read_adapter", lambda path: reads.append(path) or read_adapter(path))
    for prompt in ("a castle <lora:beta:1e38>", "a castle <lora:beta:nan>"):
        with pytest.raises(InvalidArgumentError) as caught:
            session.generate(GenerateRequest.from_form(generate_form([("alpha.safetensors", 0.9, True, "")], prompt)))
        assert in_field_words(caught.value, GENERATE_LABELS).startswith(
            f"Prompt: tag {prompt.split()[-1]}: weight must be a finite number in [-100, 100], got ")
    assert reads == []
    assert {name: info.weight for name, info in session.runtime.adapters.items() if info.enabled} == {"alpha": 0.4}


@pytest.fixture(scope="module")
def half_session(tiny_model_dir, tmp_path_factory):
    """A session on the tiny model in float16 with two adapters: ``good``, and ``big``, whose change of one UNet
    layer at weight 1 is more than float16 holds (65504) although every number in its file is finite."""
    lora_dir = tmp_path_factory.mktemp("half-loras")
    pipe = load_pipeline(tiny_model_dir, device="cpu", dtype=torch.float16, quiet=True)
    good = random_adapter(pipe, rank=2, alpha=2, seed=1, components=("unet",))
    big = random_adapter(pipe, rank=2, alpha=2, seed=4, components=("unet",))
    big.modules[sorted(big.modules)[0]].up.mul_(1e6)
    write_adapter(good, lora_dir / "good.safetensors")
    write_adapter(big, lora_dir / "big.safetensors")
    return WebUISession(pipe, lora_dir)


@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused"])
def test_a_mix_the_model_cannot_hold_is_told_by_its_row_and_the_mix_before_stays(half_session, fuse):
    """The runtime's dtype check refuses ``big`` at weight 1 in float16; the refusal names the row (or prompt tag)
    that asked for it, and the runtime holds the mix of the request before, giving the same image as before."""
    session = half_session
    before = session.generate(GenerateRequest.from_form(generate_form([("good.safetensors", 0.5, True, "")])))
    refused = [
        (generate_form([("good.safetensors", 0.5, True, ""), ("big.safetensors", 1.0, True, "")], fuse=fuse),
         "Weight of adapter 2: is too large for unet."),
        (generate_form([("good.safetensors", 0.5, True, "")], "a castle <lora:big:1>", fuse=fuse),
         "Prompt: tag <lora:big:1>: weight is too large for unet."),
    ]
    for form, expected in refused:
        with pytest.raises(InvalidArgumentError) as caught:
            session.generate(GenerateRequest.from_form(form))
        assert in_field_words(caught.value, GENERATE_LABELS).startswith(expected), str(caught.value)
        assert "in float16" in str(caught.value)
        active = {name: info.weight for name, info in session.runtime.adapters.items() if info.enabled}
        assert active == {"good": 0.5} and not session.runtime.fused, expected
    after = session.generate(GenerateRequest.from_form(generate_form([("good.safetensors", 0.5, True, "")])))
    assert pixels_equal(before.files[0], after.files[0])


def pixels_equal(first, second) -> bool:
    from PIL import Image, ImageChops

    with Image.open(first) as one, Image.open(second) as other:
        return ImageChops.difference(one.convert("RGB"), other.convert("RGB")).getbbox() is None


def blend_form(rows, method="concat", rank=0):
    """The Blend tab's values: its rows (file, weight, block weights), then method, rank and density."""
    rows = [list(row) for row in rows] + [[None, 1.0, ""]] * (webui.SLOT_COUNT - len(rows))
    return [value for row in rows for value in row] + [method, rank, 0.5]


def test_bad_block_weights_of_a_blend_row_are_told_by_the_row_and_nothing_is_written(served, folders):
    """A blend row's block weights are checked as the Generate tab's are (against the model's own blocks), told by
    their row in one line, before any file is written."""
    session, client = served
    cases = [
        ([("alpha.safetensors", 0.5, ""), ("beta.safetensors", 0.5, "down=lots")],
         "Block weights of adapter 2: down must be a number, got 'lots'"),
        ([("alpha.safetensors", 0.5, "up.7=0")],
         "Block weights of adapter 1: up.7: the model has no such block (its blocks: down.0–down.1, up.0–up.1)"),
        ([("alpha.safetensors", 0.5, ""), ("beta.safetensors", 0.5, "mid=1,mid=0")],
         "Block weights of adapter 2: 'mid=1' and 'mid=0' both set block mid; give each block once"),
    ]
    for rows, expected in cases:
        with pytest.raises(AppError) as caught:
            client.predict(*blend_form(rows), "blocked", "difflora", api_name="/blend_save")
        assert str(caught.value) == expected
        assert not (folders.lora_dir / "blocked.safetensors").exists()


def test_the_generate_apis_adapter_rows_are_checked_row_by_row(served):
    """The API's adapter rows: anything but a list of [file, weight, enabled, block_weights] is refused in one line
    naming the row, and any row number is told by its place, past the rows a page starts with."""
    session, client = served
    settings = generate_form()[:-1]
    rows = [["alpha.safetensors", 0.5, True, ""]] + [[None, 1.0, True, ""]] * 5 + [["beta.safetensors", 150, True, ""]]
    cases = [
        (5, "Adapters: must be a list of [file, weight, enabled, block_weights] rows, got 5"),
        ([["alpha.safetensors", 0.5, True, ""], ["beta.safetensors", 1.0]],
         "Adapters: row 2 must be [file, weight, enabled, block_weights], got ['beta.safetensors', 1.0]"),
        ([[7, 0.5, True, ""]], "Adapters: row 1: the file must be a name, got 7"),
        (rows, "Weight of adapter 7: must be a finite number in [-100, 100], got 150.0"),
    ]
    for adapters, expected in cases:
        with pytest.raises(AppError) as caught:
            client.predict(*settings, adapters, api_name="/generate")
        assert str(caught.value) == expected


def test_the_train_apis_more_options_are_checked_and_told_by_their_field(served):
    """An API client sets "More options" as a dict by name: an option the tab does not set, or a value the training
    config refuses, is one line in the words of the page's field, and no run starts."""
    session, client = served
    cases = [
        ({"algo": "lohx"}, "Algo: "),
        ({"conv_rank": -3}, "Conv rank: "),
        ({"resume": "latest"}, "'resume' is not an option the Train tab sets"),
    ]
    for more, expected in cases:
        with pytest.raises(AppError) as caught:
            client.predict(*train_form("cats"), more, api_name="/train_start")
        assert str(caught.value).startswith(expected) and "\n" not in str(caught.value), str(caught.value)
        assert "--" not in str(caught.value)
    assert session.training.status().state == "idle"
