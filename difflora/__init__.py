"""difflora: LoRA adapters for diffusion models — attention processors, multi-adapter runtime, files, training, UI."""

from ._version import __version__
from .blocks import BlockWeights
from .errors import AdapterFileError, AdapterShapeError, DiffloraError, InvalidArgumentError, ModelLoadError
from .adapter import AdapterState, LoRAModuleWeights
from .formats import read_adapter, write_adapter
from .lora import LoRAFactors, lora_scale
from .multilora import MultiLoRA
from .processors import AttentionSite, CLIPLoRAAttnProcessor, LoRAAttnProcessor
from .runtime import AdapterInfo, LoRARuntime

__all__ = [
    "__version__",
    "AdapterFileError",
    "AdapterInfo",
    "AdapterShapeError",
    "AdapterState",
    "AttentionSite",
    "BlockWeights",
    "CLIPLoRAAttnProcessor",
    "DiffloraError",
    "InvalidArgumentError",
    "LoRAAttnProcessor",
    "LoRAFactors",
    "LoRAModuleWeights",
    "LoRARuntime",
    "ModelLoadError",
    "MultiLoRA",
    "load_pipeline",
    "lora_scale",
    "read_adapter",
    "write_adapter",
]


def __getattr__(name: str):
    # pipelines.py imports diffusers' pipelines, which is slow; load it only when asked for.
    if name == "load_pipeline":
        from .pipelines import load_pipeline

        return load_pipeline
    raise AttributeError(f"module 'difflora' has no attribute {name!r}")
