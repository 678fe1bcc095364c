"""What the web UI refuses, and that a refusal leaves nothing behind: datasets only from inside the data root,
refused uploads deleted from Gradio's cache (accepted ones once copied), Gradio's own refusals one line in the server
log, and the library's refusals of weights and block weights told by the adapter row that holds them."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry calls

import logging  # noqa: E402
import pickle  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from difflora import LoRARuntime  # noqa: E402
from difflora.errors import InvalidArgumentError  # noqa: E402
from difflora.pipelines import load_pipeline  # noqa: E402
from difflora.webui import SLOT_COUNT, AdapterLibrary, TrainingJob, WebUISession  # noqa: E402
from helpers import served_app  # noqa: E402


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


def generate_form(slots=(), prompt="a castle"):
    """The Generate tab's values (GenerateRequest.FORM_FIELDS, then the adapter rows), 2 steps at 64 × 64."""
    values = [prompt, "", 2, 5.0, 7, False, 64, 64, "Model default", 1, False]
    rows = [list(slot) for slot in slots] + [[None, 1.0, True, ""]] * (SLOT_COUNT - len(slots))
    return values + [value for row in rows for value in row]


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
    caplog.set_level(logging.WARNING, logger="difflora.webui.page")
    with pytest.raises(AppError, match="not in the list of choices"):
        client.predict("stale.safetensors", api_name="/inspect")
    with pytest.raises(AppError, match="greater than maximum"):
        client.predict(*generate_form([("alpha.safetensors", 5.0, True, "")]), api_name="/generate")
    steps = train_form("cats")
    steps[2] = "many"  # a value of the wrong type: Gradio's own message, which it would not even send
    with pytest.raises(AppError, match="Could not preprocess input component at index 2"):
        client.predict(*steps, api_name="/train_start")
    records = [record for record in caplog.records if record.name == "difflora.webui.page"]
    assert [record.levelno for record in records] == [logging.WARNING] * 3
    assert all(word in record.getMessage() for record, word in zip(records, ("stale.safetensors", "maximum", "'many'")))
    assert all("\n" not in record.getMessage() and record.exc_info is None for record in records)
    assert "Traceback" not in capfd.readouterr().err


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
