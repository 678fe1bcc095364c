"""The web UI on the tiny model: through the served page (gradio_client) where the page matters, and through the
plain session methods for prompt tags and the one-training-at-a-time rule."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry calls

import json
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from difflora import LoRARuntime, webui  # noqa: E402
from difflora.adapter import AdapterState  # noqa: E402
from difflora.blend import blend  # noqa: E402
from difflora.blocks import BlockWeights  # noqa: E402
from difflora.errors import AdapterFileError, InvalidArgumentError  # noqa: E402
from difflora.formats import read_adapter  # noqa: E402
from difflora.generate import GenerationSettings, generate  # noqa: E402
from difflora.pipelines import load_pipeline  # noqa: E402
from difflora.train import make_config  # noqa: E402
from helpers import served_app  # noqa: E402
from difflora.webui import (  # noqa: E402
    SLOT_COUNT,
    AdapterLibrary,
    AdapterSlot,
    GenerateRequest,
    TrainingJob,
    TrainRequest,
    WebUISession,
    parse_prompt_loras,
)

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
PROMPT = "a castle at dusk"


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_model_dir):
    """An adapter folder with two random (non-zero) adapters of different ranks, one also on the text encoder."""
    folder = tmp_path_factory.mktemp("loras")
    runtime = LoRARuntime.attach(load_pipeline(tiny_model_dir, quiet=True))
    runtime.create_adapter("alpha", rank=4, init="random", seed=1)
    runtime.create_adapter("beta", rank=2, alpha=4.0, components=("unet", "text_encoder"), init="random", seed=2)
    runtime.save("alpha", folder / "alpha.safetensors", {"difflora.trigger_words": json.dumps(["alphastyle"])})
    runtime.save("beta", folder / "beta.safetensors")
    return folder


@pytest.fixture(scope="module")
def session(lora_dir, tiny_model_dir):
    return WebUISession(load_pipeline(tiny_model_dir, quiet=True), lora_dir, model_label=str(tiny_model_dir),
                        data_root=SAMPLES)


@pytest.fixture(scope="module")
def client(session, tmp_path_factory):
    """The page served in this process on a free port of 127.0.0.1, and a gradio_client connected to it."""
    with served_app(session) as url:
        downloads = str(tmp_path_factory.mktemp("downloads"))
        yield Client(url, verbose=False, analytics_enabled=False, download_files=downloads)


def generate_form(prompt=PROMPT, slots=(), steps=3, seed=7, fuse=False, scheduler=webui.MODEL_SCHEDULER):
    """The Generate tab's values in the order the page sends them (GenerateRequest.FORM_FIELDS, then the slots)."""
    values = [prompt, "", steps, 5.0, seed, False, 64, 64, scheduler, 1, fuse]
    return values + [[list(slot) for slot in slots]]


def settings_form(**settings):
    """The Generate tab's settings alone (what the blend preview takes): no adapter rows."""
    return generate_form(**settings)[:-1]


def blend_form(pairs, method="concat", rank=0, density=0.5):
    """The Blend tab's values: its SLOT_COUNT rows (file, weight, block weights; "" when a pair gives none)."""
    rows = [[*pair, ""][:3] for pair in pairs] + [[None, 1.0, ""]] * (SLOT_COUNT - len(pairs))
    return [value for row in rows for value in row] + [method, rank, density]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255


def gallery_files(gallery) -> list[str]:
    return [item["image"] if isinstance(item, dict) else item[0] for item in gallery]


def library_image(tiny_model_dir, lora_dir, weights: dict[str, float], seed=7, scheduler: str | None = None,
                  blended: AdapterState | None = None, block_weights: dict[str, str] | None = None) -> np.ndarray:
    """The image the library gives without the UI: ``weights`` of files of ``lora_dir`` (with ``block_weights``
    of some, by name), optionally a ``blended`` adapter at weight 1, and the diffusers ``scheduler`` class built
    from the model's own scheduler config."""
    pipe = load_pipeline(tiny_model_dir, quiet=True)
    runtime = LoRARuntime.attach(pipe)
    for name, weight in weights.items():
        blocks = (block_weights or {}).get(name)
        runtime.load(lora_dir / f"{name}.safetensors", weight=weight,
                     block_weights=BlockWeights.parse(blocks) if blocks else None)
    if blended is not None:
        runtime.add_adapter("blended", blended, 1.0)
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    settings = GenerationSettings(PROMPT, steps=3, guidance=5.0, seed=seed, width=64, height=64)
    return generate(pipe, settings, output_type="np")[0]


def lycoris_files(pipe, folder: Path) -> None:
    """``loha.safetensors`` and ``lokr.safetensors`` as LyCORIS writes them (its kohya-named ``lycoris.kohya``
    network): ``hada_w1_a`` … ``hada_w2_b`` / ``lokr_w1`` whole with ``lokr_w2_a``/``_b``, and ``alpha``, on an
    attention projection, a 3×3 conv (held as a matrix out × in·9, LyCORIS' layout without a Tucker core), a
    Linear of a resnet and the CLIP MLP."""
    generator = torch.Generator().manual_seed(31)

    def draw(*size):
        return torch.randn(*size, generator=generator) * 0.3

    layers = {**{f"lora_unet_{path}": module for path, module in pipe.unet.named_modules()},
              **{f"lora_te_{path.removeprefix('text_model.')}": module
                 for path, module in pipe.text_encoder.named_modules()}}
    shapes = {name.replace(".", "_"): tuple(module.weight.shape) for name, module in layers.items()
              if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}
    targets = {
        "loha": ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                 "lora_unet_down_blocks_0_resnets_0_conv1", "lora_te_encoder_layers_0_mlp_fc1"],
        "lokr": ["lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v",
                 "lora_unet_down_blocks_0_resnets_0_time_emb_proj", "lora_unet_up_blocks_1_resnets_0_conv2"],
    }
    for algo, names in targets.items():
        tensors = {}
        for name in names:
            out_features, in_features, *kernel = shapes[name]
            flat = in_features * (kernel[0] * kernel[1] if kernel else 1)
            if algo == "loha":
                tensors |= {f"{name}.hada_w1_a": draw(out_features, 2), f"{name}.hada_w1_b": draw(2, flat),
                            f"{name}.hada_w2_a": draw(out_features, 2), f"{name}.hada_w2_b": draw(2, flat)}
            else:
                tensors |= {f"{name}.lokr_w1": draw(2, 2), f"{name}.lokr_w2_a": draw(out_features // 2, 2),
                            f"{name}.lokr_w2_b": draw(2, flat // 2)}
            tensors[f"{name}.alpha"] = torch.tensor(2.0)
        save_file(tensors, str(folder / f"{algo}.safetensors"),
                  metadata={"ss_network_module": "lycoris.kohya", "ss_network_args": f'{{"algo": "{algo}"}}'})


def test_page_generates_the_library_image_and_saves_it_with_its_parameters(client, session, tiny_model_dir, lora_dir):
    slots = [("alpha.safetensors", 0.7, True, ""), ("beta.safetensors", -0.4, True, "")]
    gallery, used_seed, status = client.predict(*generate_form(slots=slots), api_name="/generate")
    (page_file,) = gallery_files(gallery)
    assert used_seed == 7 and "alpha 0.7" in status
    expected = library_image(tiny_model_dir, lora_dir, {"alpha": 0.7, "beta": -0.4})
    assert np.abs(pixels(page_file) - expected).max() <= 1 / 255 + 1e-6
    base = library_image(tiny_model_dir, lora_dir, {})
    assert np.abs(pixels(page_file) - base).max() > 4 / 255  # the adapters did act
    # The PNG in <lora-dir>/outputs carries the settings and the adapter mix.
    (saved,) = sorted((lora_dir / "outputs").glob("*.png"))
    record = json.loads(Image.open(saved).text["difflora"])
    assert record["settings"]["seed"] == 7 and record["settings"]["prompt"] == PROMPT
    assert [(a["name"], a["weight"], a["source"]) for a in record["adapters"]] == [
        ("alpha", 0.7, "alpha.safetensors"), ("beta", -0.4, "beta.safetensors")]
    assert "<lora:alpha:0.7>" in Image.open(saved).text["parameters"]


def test_moving_a_slider_reads_no_file_and_changes_the_image(client, session, lora_dir, monkeypatch):
    slots = [("alpha.safetensors", 0.7, True, ""), ("beta.safetensors", -0.4, True, "")]
    first, _, _ = client.predict(*generate_form(slots=slots), api_name="/generate")
    reads = []
    monkeypatch.setattr(webui.session, "read_adapter", lambda path: reads.append(path) or read_adapter(path))
    moved = [("alpha.safetensors", 1.5, True, "down=0,mid=1,up=1"), ("beta.safetensors", -0.4, False, "")]
    second, _, status = client.predict(*generate_form(slots=moved, fuse=True), api_name="/generate")
    third, _, _ = client.predict(*generate_form(slots=moved, fuse=False), api_name="/generate")
    assert reads == []  # weights, block weights, on/off and fusing are numbers on loaded adapters
    adapters = session.runtime.adapters
    assert adapters["alpha"].weight == 1.5 and adapters["alpha"].block_weights.down == 0.0
    assert not adapters["beta"].enabled and not session.runtime.fused and "(fused)" in status
    first_image, second_image = pixels(gallery_files(first)[0]), pixels(gallery_files(second)[0])
    assert np.abs(first_image - second_image).max() > 4 / 255
    assert np.abs(second_image - pixels(gallery_files(third)[0])).max() <= 1 / 255  # fused == unfused
    # The count above can fail: a file that changed on disk (new mtime) is read again, once.
    alpha = lora_dir / "alpha.safetensors"
    os.utime(alpha, ns=(alpha.stat().st_atime_ns, alpha.stat().st_mtime_ns + 1_000_000))
    client.predict(*generate_form(slots=moved), api_name="/generate")
    client.predict(*generate_form(slots=moved), api_name="/generate")
    assert reads == [alpha.resolve()]


@pytest.mark.parametrize("label, scheduler_class", [("DPM++ 2M", "DPMSolverMultistepScheduler"),
                                                    ("Euler a", "EulerAncestralDiscreteScheduler")])
def test_other_schedulers_run(client, tiny_model_dir, lora_dir, label, scheduler_class):
    """The page's image is the library's image with that scheduler, not with the model's default one."""
    gallery, _, status = client.predict(*generate_form(scheduler=label), api_name="/generate")
    (page_file,) = gallery_files(gallery)
    assert scheduler_class in status
    assert json.loads(Image.open(page_file).text["difflora"])["scheduler"] == scheduler_class
    expected = library_image(tiny_model_dir, lora_dir, {}, scheduler=scheduler_class)
    assert np.abs(pixels(page_file) - expected).max() <= 1 / 255 + 1e-6
    model_default = library_image(tiny_model_dir, lora_dir, {})
    assert np.abs(pixels(page_file) - model_default).max() > 4 / 255


def test_blend_save_writes_a_file_and_preview_leaves_no_adapter(client, session, lora_dir, tiny_model_dir):
    pairs = [("alpha.safetensors", 0.6), ("beta.safetensors", 0.5)]
    saved, report, *_ = client.predict(*blend_form(pairs, method="svd", rank=2), "mix", "kohya", api_name="/blend_save")
    written = read_adapter(lora_dir / "mix.safetensors")
    assert written.source_format == "kohya" and written.ranks() == [2]
    assert "modules" in report and "relative error" in report
    assert read_adapter(saved).ranks() == [2]  # the download is the same file
    with pytest.raises(AppError, match="already exists"):
        client.predict(*blend_form(pairs), "mix", "difflora", api_name="/blend_save")

    # The preview is the blend alone: the library's image for the blended adapter, with the slots' adapters off.
    slots = [("alpha.safetensors", 0.7, True, "")]
    image, note = client.predict(*blend_form(pairs), *settings_form(slots=slots), api_name="/blend_preview")
    assert "seed 7" in note
    states = [(read_adapter(lora_dir / file), weight) for file, weight in pairs]
    expected = library_image(tiny_model_dir, lora_dir, {}, blended=blend(states).state)
    assert np.abs(pixels(image) - expected).max() <= 1 / 255 + 1e-6
    base = library_image(tiny_model_dir, lora_dir, {})
    assert np.abs(pixels(image) - base).max() > 4 / 255
    assert webui.BLEND_PREVIEW_ADAPTER not in session.runtime.adapters


def test_errors_in_the_page_name_the_field_not_a_flag(client, lora_dir):
    """A library error naming its parameter is shown by the label of the page's field for it, never as a flag.
    (Out-of-range numbers and unknown choices are refused by Gradio before the callback, so these are the library's
    own checks: blend's rank, the training config's learning rate.)"""
    pairs = [("alpha.safetensors", 0.6), ("beta.safetensors", 0.5)]
    with pytest.raises(AppError) as caught:
        client.predict(*blend_form(pairs, method="svd", rank=0), "rankless", "difflora", api_name="/blend_save")
    assert str(caught.value).startswith("Rank (svd, ties, dare): ") and "--" not in str(caught.value)
    assert not (lora_dir / "rankless.safetensors").exists()
    with pytest.raises(AppError) as caught:
        client.predict("named", str(SAMPLES / "pixel-sunsets"), 2, 2, 0, -1.0, 1, 64, "", "", 0,
                       api_name="/train_start")
    assert str(caught.value).startswith("Learning rate: ") and "--" not in str(caught.value)


def test_inspect_shows_format_ranks_and_trigger_words(client):
    text, summary = client.predict("beta.safetensors", api_name="/inspect")
    assert summary["format"] == "difflora" and summary["ranks"] == [2] and summary["alphas"] == [4.0]
    assert set(summary["modules_per_component"]) == {"unet", "text_encoder"} and "**ranks**: 2" in text
    _, alpha = client.predict("alpha.safetensors", api_name="/inspect")
    assert alpha["trigger_words"] == ["alphastyle"]


def test_paths_outside_the_adapter_folder_are_refused(client, session, lora_dir, tmp_path):
    before = set(lora_dir.parent.iterdir())
    for name in ("../evil", "/tmp/evil", "..\\evil"):
        with pytest.raises(AppError, match="refused"):
            client.predict(*blend_form([("alpha.safetensors", 1.0)]), name, "difflora", api_name="/blend_save")
    with pytest.raises(AppError, match="refused"):
        client.predict(*generate_form(prompt="a castle <lora:../loras/alpha:1>"), api_name="/generate")
    with pytest.raises(AppError):
        client.predict("/etc/passwd", api_name="/inspect")  # not a choice of the list, and outside anyway
    assert set(lora_dir.parent.iterdir()) == before and not Path("/tmp/evil.safetensors").exists()
    for name in ("/etc/passwd", "../x.safetensors", "sub/../../x.safetensors"):
        with pytest.raises(InvalidArgumentError, match="refused"):
            session.inspect(name)
    # A symlink inside the folder that leads out is neither listed nor read.
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((lora_dir / "alpha.safetensors").read_bytes())
    link = lora_dir / "link.safetensors"
    link.symlink_to(outside)
    try:
        assert "link.safetensors" not in session.library.names()
        with pytest.raises(InvalidArgumentError, match="refused"):
            session.inspect("link.safetensors")
    finally:
        link.unlink()


def test_invalid_uploads_are_refused_and_valid_ones_added(client, session, lora_dir, tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(256))
    pickle = tmp_path / "pickled.safetensors"
    torch.save({"lora_down": torch.zeros(2)}, pickle)
    for upload in (garbage, pickle):
        with pytest.raises(AppError, match="refused"):
            client.predict(handle_file(str(upload)), api_name="/inspect_upload")
        with pytest.raises(AppError, match="refused"):
            client.predict(handle_file(str(upload)), api_name="/add_upload")
        assert not (lora_dir / upload.name).exists()
    with pytest.raises(AdapterFileError, match="pickles are refused"):
        session.add_upload(tmp_path / "model.ckpt")
    good = tmp_path / "gamma.safetensors"
    good.write_bytes((lora_dir / "beta.safetensors").read_bytes())
    text, summary = client.predict(handle_file(str(good)), api_name="/inspect_upload")
    assert summary["ranks"] == [2] and "upload" in text
    message, *lists = client.predict(handle_file(str(good)), api_name="/add_upload")
    assert "gamma.safetensors" in message and (lora_dir / "gamma.safetensors").is_file()
    assert "gamma.safetensors" in lists[-1]


def test_prompt_tags_are_parsed_and_generate_like_slots(session):
    text, slots = parse_prompt_loras("a castle <lora:alpha:0.5>, at dusk <LORA:beta.safetensors>")
    assert text == "a castle, at dusk"
    assert slots == [AdapterSlot("alpha.safetensors", 0.5, tag="<lora:alpha:0.5>"),
                     AdapterSlot("beta.safetensors", 1.0, tag="<LORA:beta.safetensors>")]
    with pytest.raises(InvalidArgumentError, match="weight must be a number, got .lots."):
        parse_prompt_loras("<lora:alpha:lots>")

    tagged = session.generate(GenerateRequest(f"{PROMPT} <lora:alpha:0.5>", steps=3, guidance=5.0, seed=3))
    assert tagged.prompt == PROMPT and [(u.name, u.weight) for u in tagged.adapters] == [("alpha", 0.5)]
    slotted = session.generate(GenerateRequest(PROMPT, steps=3, guidance=5.0, seed=3,
                                               adapters=[AdapterSlot("alpha.safetensors", 0.5)]))
    assert np.array_equal(pixels(tagged.files[0]), pixels(slotted.files[0]))
    with pytest.raises(InvalidArgumentError, match="selected twice"):
        session.generate(GenerateRequest(f"{PROMPT} <lora:alpha:0.5>", steps=1,
                                         adapters=[AdapterSlot("alpha.safetensors", 1.0)]))
    with pytest.raises(AdapterFileError, match="no such file"):
        session.generate(GenerateRequest(f"{PROMPT} <lora:missing:1>", steps=1))


def test_one_training_at_a_time_and_its_adapter_joins_the_list(tmp_path, tiny_model_dir):
    library = AdapterLibrary(tmp_path)
    job = TrainingJob(library, str(tiny_model_dir), native_size=64, data_root=SAMPLES)
    request = TrainRequest(name="pixsun", dataset=str(SAMPLES / "pixel-sunsets"), steps=2, batch_size=2, rank=2,
                           lr=1e-3, trigger_word="pixsun", validation_prompt="pixsun style, a sunset")
    with pytest.raises(InvalidArgumentError, match="refused"):
        job.start(TrainRequest(name="x", dataset="../elsewhere"))
    assert job.start(request).state == "running"
    with pytest.raises(InvalidArgumentError, match="a training run is already in progress"):
        job.start(TrainRequest(name="other", dataset=str(SAMPLES / "pixel-sunsets"), steps=2))
    status = job.wait(timeout=120)
    assert status.state == "finished", status.message
    assert status.adapter_file == "pixsun.safetensors" and "pixsun.safetensors" in library.names()
    assert status.preview is not None and status.preview.is_file() and status.finished_runs == 1
    assert library.summary("pixsun.safetensors")["trigger_words"] == ["pixsun"]
    assert (tmp_path / "training" / "pixsun" / "config.yaml").is_file()
    with pytest.raises(InvalidArgumentError, match="already exists"):
        job.start(request)


def test_concurrent_users_get_their_own_mix(session, lora_dir, tiny_model_dir):
    """Two users generating at once with different mixes each get the image of their own mix."""
    import threading

    requests = {
        "first": GenerateRequest.from_form(generate_form(slots=[("alpha.safetensors", 0.9, True, "")], seed=3)),
        "second": GenerateRequest.from_form(generate_form(slots=[("beta.safetensors", -0.5, True, "")], seed=3)),
    }
    results, errors = {}, []

    def user(name):
        try:
            results[name] = session.generate(requests[name])
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=user, args=(name,)) for name in requests for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    for name, (file, weight) in {"first": ("alpha", 0.9), "second": ("beta", -0.5)}.items():
        pipe = load_pipeline(tiny_model_dir, quiet=True)
        LoRARuntime.attach(pipe).load(lora_dir / f"{file}.safetensors", weight=weight)
        settings = GenerationSettings(PROMPT, steps=3, guidance=5.0, seed=3, width=64, height=64)
        expected = generate(pipe, settings, output_type="np")[0]
        assert abs(pixels(results[name].files[0]) - expected).max() <= 1 / 255, name


@pytest.fixture(scope="module")
def lycoris_in_folder(client, lora_dir, tiny_model_dir):
    """``loha.safetensors`` and ``lokr.safetensors`` (as LyCORIS writes them) in the adapter folder, and in the
    lists of the client's page."""
    lycoris_files(load_pipeline(tiny_model_dir, quiet=True), lora_dir)
    client.predict(api_name="/refresh_adapters")
    return lora_dir


def test_every_kind_generates_the_library_image_and_is_inspected_by_kind(client, lycoris_in_folder, tiny_model_dir):
    """A LoHa and a LoKr file with a LoRA, in rows of the API's list, give the library's image of that mix; Inspect
    names each file's algorithm and its layers per component."""
    lora_dir = lycoris_in_folder
    slots = [("loha.safetensors", 0.8, True, ""), ("alpha.safetensors", 0.5, True, ""),
             ("lokr.safetensors", -0.7, True, "up=0.5")]
    gallery, _, status = client.predict(*generate_form(slots=slots), api_name="/generate")
    page_image = pixels(gallery_files(gallery)[0])
    expected = library_image(tiny_model_dir, lora_dir, {"loha": 0.8, "alpha": 0.5, "lokr": -0.7},
                             block_weights={"lokr": "up=0.5"})
    assert np.abs(page_image - expected).max() <= 1 / 255 + 1e-6
    assert np.abs(page_image - library_image(tiny_model_dir, lora_dir, {"alpha": 0.5})).max() > 4 / 255
    *_, table = client.predict(api_name="/refresh_adapters")
    assert "| loha.safetensors | kohya | loha · text_encoder: linear 1 · unet: linear 2 |" in table
    for file, algorithm in (("loha.safetensors", "loha"), ("lokr.safetensors", "lokr")):
        text, summary = client.predict(file, api_name="/inspect")
        assert summary["algorithms"] == [algorithm] and f"**algorithms**: {algorithm}" in text
        assert "**layers**: " in text and "unet: linear" in text
    assert "text_encoder: linear 1" in client.predict("loha.safetensors", api_name="/inspect")[0]


def test_blend_rows_block_weights_act_as_they_do_on_the_generate_tab(client, tiny_model_dir, lora_dir):
    """A concat blend of rows with block weights previews as the library's image of the same adapters at the same
    weights and block weights (concat is exact); without the block weights the image is another one."""
    rows = [("alpha.safetensors", 0.6, "down=0,mid=2"), ("beta.safetensors", 0.5, "up.1=0,te=0")]
    image, note = client.predict(*blend_form(rows), *settings_form(), api_name="/blend_preview")
    expected = library_image(tiny_model_dir, lora_dir, {"alpha": 0.6, "beta": 0.5},
                             block_weights={"alpha": "down=0,mid=2", "beta": "up.1=0,te=0"})
    assert np.abs(pixels(image) - expected).max() <= 1 / 255 + 1e-6
    plain = library_image(tiny_model_dir, lora_dir, {"alpha": 0.6, "beta": 0.5})
    assert np.abs(pixels(image) - plain).max() > 4 / 255
    assert "seed 7" in note and "exact" in note


def test_a_blend_of_every_kind_is_the_librarys_blend_with_its_error_per_module(client, lycoris_in_folder):
    """LoHa and LoKr rows blend into the file the library's ``blend`` makes of the same states (their updates at
    the form's rank), and the report names the modules that are not exact with their relative error."""
    lora_dir = lycoris_in_folder
    rows = [("loha.safetensors", 0.8, ""), ("alpha.safetensors", 0.5, ""), ("lokr.safetensors", -0.6, "")]
    saved, report, *_ = client.predict(*blend_form(rows, method="concat", rank=2), "kinds-mix", "difflora",
                                       api_name="/blend_save")
    written = read_adapter(lora_dir / "kinds-mix.safetensors")
    states = [(read_adapter(lora_dir / file), weight) for file, weight, _ in rows]
    expected = blend(states, method="concat", rank=2)
    assert set(written.modules) == set(expected.state.modules)
    for key, module in expected.state.modules.items():
        mine = written.modules[key]
        change, reference = mine.up.flatten(1) @ mine.down.flatten(1), module.up.flatten(1) @ module.down.flatten(1)
        assert torch.allclose(change, reference, rtol=1e-5, atol=1e-6 * float(reference.abs().max())), key
    worst = max(expected.relative_errors, key=expected.relative_errors.get)
    assert expected.relative_errors[worst] > 0 and f"`{worst}`" in report and "relative error" in report
    (lora_dir / "kinds-mix.safetensors").unlink()


def test_the_train_tabs_more_options_are_the_training_dataclasss_and_reach_the_run(client, tmp_path, tiny_model_dir):
    """Every option of the training dataclass the tab's own fields do not hold is a field of "More options", built
    from its type and choices (the algorithm, targets and DoRA among them); what the page sends there is what the
    run trains: a LoHa on the transformer blocks' layers."""
    fields = {component["props"].get("elem_id"): component for component in client.config["components"]}
    for name, option in webui.more_training_options().items():
        field = fields[f"train-{name.replace('_', '-')}"]
        assert field["props"]["label"] == name.replace("_", " ").capitalize()
        if option.choices:
            assert [choice[1] for choice in field["props"]["choices"]] == ["" if c is None else c
                                                                           for c in option.choices]
    assert {"algo", "targets", "dora", "conv_rank"} <= set(webui.more_training_options())
    # The fields as the page first shows them are the dataclass's defaults (an unset number: an empty field).
    shown = [fields[f"train-{name.replace('_', '-')}"]["props"].get("value") for name in webui.more_training_options()]
    basic = ["named", str(SAMPLES / "pixel-sunsets"), 2, 2, 0, 1e-3, 2, 64, "", "", 0]
    options = webui.TrainRequest.from_form(basic + shown).options(64)
    assert {name: options[name] for name in webui.more_training_options()} == {
        name: option.default for name, option in webui.more_training_options().items()}
    make_config({"data": str(SAMPLES / "pixel-sunsets"), **options})
    values = [None] * len(webui.TrainRequest.FORM_FIELDS)
    values[:2] = ["lohastyle", str(SAMPLES / "pixel-sunsets")]
    values[2:8] = [2, 2, 0, 1e-3, 2, 64]
    more = {name: option.default for name, option in webui.more_training_options().items()}
    more |= {"algo": "loha", "targets": "transformer", "conv_rank": "", "seed": 3.0}
    request = webui.TrainRequest.from_form(values + list(more.values()))
    job = TrainingJob(AdapterLibrary(tmp_path), str(tiny_model_dir), native_size=64, data_root=SAMPLES)
    assert job.start(request).state == "running"
    status = job.wait(timeout=300)
    assert status.state == "finished", status.message
    trained = read_adapter(tmp_path / "lohastyle.safetensors")
    assert trained.kinds() == ["loha"] and "ff.net.2" in trained.targets()["unet"]


def test_a_dora_row_blends_against_the_models_own_weights(client, session, lora_dir, tiny_model_dir):
    """DoRA's change depends on the base weights, which ``blend`` refuses to guess: the Blend tab gives it the
    model's own, so the file is the library's blend with the weights of a freshly loaded model (fused or not)."""
    from difflora.extract import layer_weights

    runtime = LoRARuntime.attach(load_pipeline(tiny_model_dir, quiet=True))
    runtime.create_adapter("magnitudes", rank=2, dora=True, init="random", seed=5)
    runtime.save("magnitudes", lora_dir / "magnitudes.safetensors")
    client.predict(api_name="/refresh_adapters")
    client.predict(*generate_form(slots=[("alpha.safetensors", 0.5, True, "")], fuse=True), api_name="/generate")
    rows = [("magnitudes.safetensors", 0.7, ""), ("alpha.safetensors", 0.5, "")]
    try:
        client.predict(*blend_form(rows, method="concat", rank=3), "dora-mix", "difflora", api_name="/blend_save")
        written = read_adapter(lora_dir / "dora-mix.safetensors")
    finally:
        (lora_dir / "magnitudes.safetensors").unlink()
        (lora_dir / "dora-mix.safetensors").unlink(missing_ok=True)
    states = [(runtime.adapter_state("magnitudes"), 0.7), (read_adapter(lora_dir / "alpha.safetensors"), 0.5)]
    with pytest.raises(InvalidArgumentError):
        blend(states, method="concat", rank=3)  # no base weights: refused
    dora = [key for key, module in states[0][0].modules.items() if module.dora_scale is not None]
    fresh = load_pipeline(tiny_model_dir, quiet=True)
    base = layer_weights({"unet": fresh.unet, "text_encoder": fresh.text_encoder}, dora)
    expected = blend(states, method="concat", rank=3, base_weights=base).state
    assert dora and set(written.modules) == set(expected.modules)
    for key, module in expected.modules.items():
        mine = written.modules[key]
        change, reference = mine.up.flatten(1) @ mine.down.flatten(1), module.up.flatten(1) @ module.down.flatten(1)
        assert torch.allclose(change, reference, rtol=1e-5, atol=1e-6 * float(reference.abs().max())), key
