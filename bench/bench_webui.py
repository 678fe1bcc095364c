"""Web UI figures: slider change → image through the served page vs the same generation without the UI, and the
time to switch the adapter mix (no file is reloaded).

    python bench/bench_webui.py                    # embedded tiny model, 2 adapters, 20 steps, 64×64

The page is served in this process on 127.0.0.1 and driven through gradio_client (the HTTP/queue path a browser
uses). Each round moves a weight slider and generates; the reference is ``difflora.generate.generate`` with the
same mix set directly on the runtime. Medians of interleaved rounds, ratio printed.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from gradio_client import Client

    from difflora import LoRARuntime
    from difflora.generate import GenerationSettings, generate
    from difflora.pipelines import load_pipeline
    from difflora.webui import MODEL_SCHEDULER, WebUISession, build_app

    lora_dir = Path(tempfile.mkdtemp(prefix="difflora-bench-webui-"))
    maker = LoRARuntime.attach(load_pipeline(None, quiet=True))
    for seed, name in enumerate(("one", "two")):
        maker.create_adapter(name, rank=8, components=("unet", "text_encoder"), init="random", seed=seed)
        maker.save(name, lora_dir / f"{name}.safetensors")

    session = WebUISession(load_pipeline(None, quiet=True), lora_dir, model_label="embedded")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = build_app(session)
    app.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, ssr_mode=False, quiet=True)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False, analytics_enabled=False,
                    download_files=str(lora_dir / "downloads"))

    direct = load_pipeline(None, quiet=True)
    runtime = LoRARuntime.attach(direct)
    runtime.load(lora_dir / "one.safetensors", name="one")
    runtime.load(lora_dir / "two.safetensors", name="two")
    settings = GenerationSettings("a lighthouse", steps=args.steps, seed=1, width=64, height=64)

    def form(weight: float) -> list:
        values = ["a lighthouse", "", args.steps, 7.5, 1, False, 64, 64, MODEL_SCHEDULER, 1, False]
        return values + [[["one.safetensors", weight, True, ""], ["two.safetensors", -0.3, True, ""]]]

    client.predict(*form(0.5), api_name="/generate")  # warm-up: files loaded once here
    generate(direct, settings)
    through_ui, without_ui, switches = [], [], []
    for round_number in range(args.rounds):
        weight = 0.2 + 0.1 * round_number  # a new slider position every round
        start = time.perf_counter()
        client.predict(*form(weight), api_name="/generate")
        through_ui.append(time.perf_counter() - start)

        start = time.perf_counter()
        runtime.set_weights({"one": weight, "two": -0.3})
        switches.append(time.perf_counter() - start)
        start = time.perf_counter()
        generate(direct, settings)
        without_ui.append(time.perf_counter() - start)
    app.close()

    ui, plain, switch = statistics.median(through_ui), statistics.median(without_ui), statistics.median(switches)
    print(f"embedded tiny model, 2 adapters, {args.steps} steps 64×64, {args.rounds} rounds; "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.machine()}")
    print(f"slider change → image through the page: {ui:.3f} s; same generation without the UI: {plain:.3f} s; "
          f"overhead ratio {ui / plain:.2f}")
    print(f"switching the adapter mix (set_weights, no file read): {switch * 1000:.3f} ms")


if __name__ == "__main__":
    main()
