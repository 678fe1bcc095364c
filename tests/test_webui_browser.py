"""The web UI in a real browser: Playwright's Python package driving Debian's Chromium (never a downloaded browser).

Open the page, type a prompt, pick an adapter and move its weight slider, click Generate, see an image appear; add
rows until six adapters of every kind are mixed (a LoHa and a LoKr file as LyCORIS writes them among them), remove
one, and get the library's image of that mix; start a LoHa training run from the Train tab with its "More options".
Screenshots are saved to ``test-artifacts/``. Skipped, with the reason, only where no Chromium or no Playwright can
be had (``scripts/setup.sh`` installs both where it can).
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from difflora import LoRARuntime  # noqa: E402
from difflora.blocks import BlockWeights  # noqa: E402
from difflora.generate import GenerationSettings, generate  # noqa: E402
from difflora.pipelines import load_pipeline  # noqa: E402
from test_webui import lycoris_files  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Chromium's own background traffic would only meet this machine's closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python package is not installed")
if CHROMIUM is None:
    pytest.skip("no Chromium on this machine (apt-get install chromium; scripts/setup.sh does it as root)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    from difflora.webui import WebUISession
    from helpers import served_app

    lora_dir = tmp_path_factory.mktemp("browser-loras")
    runtime = LoRARuntime.attach(load_pipeline(tiny_model_dir, quiet=True))
    runtime.create_adapter("inkstyle", rank=4, alpha=4.0, init="random", seed=3)
    runtime.save("inkstyle", lora_dir / "inkstyle.safetensors")
    for seed, name in enumerate(("beta", "gamma", "decoy"), start=4):
        runtime.create_adapter(name, rank=2, alpha=4.0, components=("unet", "text_encoder"), init="random", seed=seed)
    runtime.save("beta", lora_dir / "beta.safetensors")
    runtime.save("decoy", lora_dir / "decoy.safetensors")
    runtime.save("gamma", lora_dir / "gamma.safetensors", layout="kohya")
    lycoris_files(runtime.pipe, lora_dir)
    session = WebUISession(load_pipeline(tiny_model_dir, quiet=True), lora_dir, model_label="tiny")
    with served_app(session) as url:
        yield session, url


def test_type_prompt_move_slider_generate_and_see_an_image(served):
    session, url = served
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(url)
            page.locator("#prompt textarea").fill("inkstyle, waves under a moon")
            page.locator("#steps input[type=number]").fill("3")
            page.locator("#steps input[type=number]").press("Enter")

            page.locator("#lora-0-file input").click()
            page.get_by_role("option", name="inkstyle.safetensors").click()
            slider_number = page.locator("#lora-0-weight input[type=number]")
            slider_number.fill("0.6")
            slider_number.press("Enter")

            page.locator("#generate-button").click()
            image = page.locator("#gallery img").first
            image.wait_for(state="visible", timeout=120_000)
            page.screenshot(path=str(ARTIFACTS / "webui-generate.png"), full_page=True)
            assert image.get_attribute("src")
        finally:
            browser.close()
    # What the page asked for reached the runtime: the file loaded once, at the slider's weight.
    infos = list(session.runtime.adapters.values())
    assert len(infos) == 1 and infos[0].weight == pytest.approx(0.6) and infos[0].enabled
    assert list((session.root / "outputs").glob("*.png"))


def choose(page, place: int, file: str) -> None:
    page.locator(f"#lora-{place}-file input").click()
    page.get_by_role("option", name=file, exact=True).click()


def set_number(page, selector: str, value: float) -> None:
    field = page.locator(selector)
    field.fill(str(value))
    field.press("Enter")


def library_image(tiny_model_dir, mix, settings: GenerationSettings, lora_dir: Path) -> np.ndarray:
    pipe = load_pipeline(tiny_model_dir, quiet=True)
    runtime = LoRARuntime.attach(pipe)
    for file, weight, blocks in mix:
        runtime.load(lora_dir / file, weight=weight, block_weights=BlockWeights.parse(blocks) if blocks else None)
    return generate(pipe, settings, output_type="np")[0]


def test_six_rows_of_every_kind_added_and_one_removed_give_the_librarys_image(served, tiny_model_dir):
    """Rows are added without a limit and removed; each row says what its file is made of; the image is the
    library's for the mix the rows show, LoHa and LoKr files as LyCORIS writes them included."""
    session, url = served
    mix = [("inkstyle.safetensors", 0.6, ""), ("beta.safetensors", -0.5, ""), ("gamma.safetensors", 0.7, "down=0"),
           ("loha.safetensors", 0.8, ""), ("lokr.safetensors", 0.9, "up=0.5"), ("decoy.safetensors", 0.4, "")]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 2200})
            page.goto(url)
            page.locator("#prompt textarea").fill("waves under a moon")
            set_number(page, "#steps input[type=number]", 3)
            # Seven rows: the six of the mix, with a decoy in the third place that is removed again.
            rows = [*mix[:2], ("decoy.safetensors", 1.5, "mid=2"), *mix[2:]]
            for place, (file, weight, blocks) in enumerate(rows):
                if place:
                    page.locator("#add-adapter-row").click()
                page.locator(f"#lora-{place}-file input").wait_for(state="visible", timeout=30_000)
                choose(page, place, file)
                set_number(page, f"#lora-{place}-weight input[type=number]", weight)
                if blocks:
                    page.locator(f"#lora-{place}-blocks input, #lora-{place}-blocks textarea").fill(blocks)
            kinds = {place: page.locator(f"#lora-{place}-kinds") for place in (4, 5)}
            for place, algo in ((4, "loha"), (5, "lokr")):
                kinds[place].get_by_text(algo, exact=False).wait_for(timeout=30_000)
            assert "unet: " in kinds[4].inner_text() and "text_encoder: linear 1" in kinds[4].inner_text()
            page.locator("#lora-2-remove").click()
            page.locator("#lora-6-file").wait_for(state="detached", timeout=30_000)
            # The rows after the removed one kept their files, weights and block weights, now one place up.
            assert page.locator("#lora-2-file input").input_value() == "gamma.safetensors"
            assert page.locator("#lora-2-blocks input, #lora-2-blocks textarea").input_value() == "down=0"
            assert float(page.locator("#lora-5-weight input[type=number]").input_value()) == 0.4

            page.locator("#generate-button").click()
            image = page.locator("#gallery img").first
            image.wait_for(state="visible", timeout=180_000)
            page.screenshot(path=str(ARTIFACTS / "webui-six-rows.png"), full_page=True)
        finally:
            browser.close()
    active = {info.source.rsplit("/", 1)[-1]: info.weight for info in session.runtime.adapters.values() if info.enabled}
    assert active == {file: weight for file, weight, _ in mix}
    (saved,) = sorted((session.root / "outputs").glob("*.png"), key=lambda path: path.stat().st_mtime)[-1:]
    shown = np.asarray(Image.open(saved).convert("RGB"), dtype=np.float32) / 255
    size = max(64, session.native_size)
    settings = GenerationSettings("waves under a moon", steps=3, guidance=7.5, seed=0, width=size, height=size)
    assert np.abs(shown - library_image(tiny_model_dir, mix, settings, session.root)).max() <= 1 / 255 + 1e-6
    # The LoHa and LoKr rows did act: without them, the image is another one.
    others = [row for row in mix if row[0] not in ("loha.safetensors", "lokr.safetensors")]
    assert np.abs(shown - library_image(tiny_model_dir, others, settings, session.root)).max() > 4 / 255


def test_the_train_tab_trains_what_its_fields_say_more_options_included(tiny_model_dir, tmp_path):
    """Start a run from the page with every "More options" field as the page shows it but one (the algorithm:
    LoHa): the fields the page sends are accepted (an unset number is an empty field, not 0) and the run trains a
    LoHa adapter into the list."""
    from difflora.formats import read_adapter
    from difflora.webui import WebUISession
    from helpers import served_app

    samples = Path(__file__).resolve().parent.parent / "samples"
    session = WebUISession(load_pipeline(tiny_model_dir, quiet=True), tmp_path, model_label=str(tiny_model_dir),
                           data_root=samples)
    with served_app(session) as url, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(url)
            page.get_by_role("tab", name="Train").click()
            page.locator("#train-dataset input").fill("pixel-sunsets")
            page.locator("#train-dataset input").press("Enter")
            for field, value in (("name", "pageloha"), ("steps", 2), ("batch-size", 2), ("rank", 2)):
                page.locator(f"#train-{field} input, #train-{field} textarea").first.fill(str(value))
            page.locator("#train-more").get_by_text("More options").click()
            page.locator("#train-algo input").click()
            page.get_by_role("option", name="loha", exact=True).click()
            page.locator("#train-start").click()
            page.locator("#train-progress").get_by_text("training pageloha").wait_for(timeout=60_000)
        finally:
            browser.close()
    status = session.training.wait(timeout=300)
    assert status.state == "finished", status.message
    assert read_adapter(tmp_path / "pageloha.safetensors").kinds() == ["loha"]
