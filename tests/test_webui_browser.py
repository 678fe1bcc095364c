"""The web UI in a real browser: Playwright's Python package driving Debian's Chromium (never a downloaded browser).

Open the page, type a prompt, pick an adapter and move its weight slider, click Generate, see an image appear.
A screenshot is saved to ``test-artifacts/webui-generate.png``. Skipped, with the reason, only where no Chromium or
no Playwright can be had (``scripts/setup.sh`` installs both where it can).
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from difflora import LoRARuntime  # noqa: E402
from difflora.pipelines import load_pipeline  # noqa: E402

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
