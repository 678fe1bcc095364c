"""The in-memory adapter every room passes around: per adapted projection, its factors and alpha, plus metadata.

Files in any dialect are read into an :class:`AdapterState` and written from one (``difflora.formats``); the runtime
loads one into a pipeline and saves one back; blending, scaling and resizing map states to states. Module keys are
the canonical ``<component>.<block path>.<projection>`` of :mod:`difflora.keys`.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

import torch

from .keys import split_module_key
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

    def alpha_for(self, use_rslora: bool) -> float:
        """The alpha that gives this module's scale under the ``use_rslora`` convention (``alpha / sqrt(rank)`` if
        true, ``alpha / rank`` if not): a file format with one convention still carries every module's scale."""
        if use_rslora == self.use_rslora:
            return self.alpha
        return self.scale * (math.sqrt(self.rank) if use_rslora else self.rank)


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

    def targets(self) -> dict[str, list[str]]:
        """The projections adapted in each component, sorted: ``{"unet": ["to_k", "to_out.0", …], …}``."""
        found: dict[str, set[str]] = collections.defaultdict(set)
        for module_key in self.modules:
            component, _, projection = split_module_key(module_key)
            found[component].add(projection)
        return {component: sorted(projections) for component, projections in sorted(found.items())}

    def skipped_summary(self, limit: int = 5) -> str:
        """``N keys difflora cannot apply: a, b, …`` naming at most ``limit`` of :attr:`skipped`."""
        count = len(self.skipped)
        listed = ", ".join(self.skipped[:limit]) + (", ..." if count > limit else "")
        return f"{count} key{'s' if count != 1 else ''} difflora cannot apply: {listed}"
