"""Helpers several test files share."""

from difflora import LoRARuntime
from difflora.formats import AdapterState


def random_adapter(pipe, rank: int, alpha: float, seed: int, components=("unet", "text_encoder")) -> AdapterState:
    """An adapter with non-zero factors on every attention projection of ``components`` (a zero-initialised one
    would change nothing, and a test with it could not fail)."""
    runtime = LoRARuntime(pipe)  # a scratch runtime: only used to enumerate and size the projections
    runtime.create_adapter("scratch", rank=rank, alpha=alpha, components=components, init="random", seed=seed)
    state = runtime.adapter_state("scratch")
    runtime.remove_all()
    return state
