"""The in-memory adapter every room passes around: per adapted projection, its factors and alpha, plus metadata.

Files in any dialect are read into an :class:`AdapterState` and written from one (``difflora.formats``); the runtime
loads one into a pipeline and saves one back; blending, scaling and resizing map states to states. Module keys are
the canonical ``<component>.<block path>.<projection>`` of :mod:`difflora.keys`.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch

from .lora import lora_scale

__all__ = ["AdapterState", "LoRAModuleWeights"]


@dataclass
class LoRAModuleWeights:
    """One adapted projection: ``ΔW = s · up @ down`` with ``s = alpha / rank`` (``alpha / sqrt(rank)`` for rsLoRA)."""

    down: torch.Tensor  # rank × in_features
    up: torch.Tensor  # out_features × rank
    alpha: float
    use_rslora: bool = False

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return lora_scale(self.rank, self.alpha, self.use_rslora)


@dataclass
class AdapterState:
    """An adapter as data: canonical module key → factors, plus the string metadata that travels with the file.

    ``skipped`` lists the keys of the file that hold no LoRA difflora can apply (DoRA magnitudes, LyCORIS, ...):
    they are reported, never silently dropped.
    """

    modules: dict[str, LoRAModuleWeights]
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: str = "difflora"
    skipped: list[str] = field(default_factory=list)

    def modules_per_component(self) -> dict[str, int]:
        return dict(collections.Counter(key.split(".", 1)[0] for key in self.modules))

    def ranks(self) -> list[int]:
        return sorted({weights.rank for weights in self.modules.values()})

    def alphas(self) -> list[float]:
        return sorted({weights.alpha for weights in self.modules.values()})
