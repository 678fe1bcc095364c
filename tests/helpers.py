"""Helpers several test files share."""

import contextlib
import socket

import torch

from difflora import LoRARuntime
from difflora.adapter import AdapterState


def random_adapter(pipe, rank: int, alpha: float, seed: int, components=("unet", "text_encoder")) -> AdapterState:
    """An adapter with non-zero factors on every attention projection of ``components`` (a zero-initialised one
    would change nothing, and a test with it could not fail)."""
    # Drawn by the pipeline's own runtime, under a passing name (a second runtime on the same pipeline would fight the
    # first over its attention blocks and hooks).
    runtime = LoRARuntime.attach(pipe)
    runtime.create_adapter("__scratch__", rank=rank, alpha=alpha, components=components, init="random", seed=seed)
    state = runtime.adapter_state("__scratch__")
    runtime.remove("__scratch__")
    return state


@contextlib.contextmanager
def served_app(session):
    """The web UI of ``session`` served in this process on a free port of 127.0.0.1; yields its URL."""
    from difflora.webui import build_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = build_app(session)
    app.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, ssr_mode=False, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


def outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's prediction and the text encoder's hidden states for fixed inputs: what the kind, layer, DoRA and
    extract tests compare between a runtime and an independent merge."""
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return (pipe.unet(latents, torch.tensor([500]), context).sample,
                pipe.text_encoder(torch.tensor([[1, 5, 9, 2]]))[0])
