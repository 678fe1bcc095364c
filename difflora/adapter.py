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

__all__ = ["AdapterState", "LoRAModuleWeights", "factor_shape_problem"]


def factor_shape_problem(down: torch.Tensor, up: torch.Tensor) -> str | None:
    """What is wrong with the shapes of a module's factors (down: rank × in, up: out × rank, each size > 0), as the
    end of a sentence about the module; ``None`` when they fit."""
    shapes = f"{tuple(down.shape)} and {tuple(up.shape)}"
    if down.ndim != 2 or up.ndim != 2:
        return f"has factors of shapes {shapes}, expected two matrices: down (rank × in) and up (out × rank)"
    if up.shape[1] != down.shape[0]:
        return f"has factors of shapes {shapes} whose ranks differ, expected down (rank × in) and up (out × rank)"
    if down.numel() == 0 or up.numel() == 0:
        return f"has empty factors of shapes {shapes}; rank, in and out features must be > 0"
    return None


def _holds_only_finite_values(tensor: torch.Tensor) -> bool:
    if tensor.dtype.itemsize == 1:  # float8: torch has no isfinite for e4m3fn, so check an fp32 copy
        tensor = tensor.float()
    return bool(torch.isfinite(tensor).all())


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

    def problem(self) -> str | None:
        """What makes this module unusable, as the end of a sentence about it (``holds NaN or inf values``), or
        ``None``: factors that are not two fitting, non-empty floating-point matrices of finite values, or an alpha
        that is not a finite, non-zero number. A file that passes can be applied, blended and resized (an SVD of a
        matrix holding NaN fails, and a NaN in a factor makes a black image). One pass over the tensors."""
        shape_problem = factor_shape_problem(self.down, self.up)
        if shape_problem:
            return shape_problem
        if not (self.down.is_floating_point() and self.up.is_floating_point()):
            return f"has factors of type {self.down.dtype} and {self.up.dtype}, expected floating point"
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)):
            return f"has alpha {self.alpha!r}, expected a finite number"
        if self.alpha == 0:
            # kohya's trainer reads a stored 0 as alpha = rank, A1111 and ComfyUI as scale 0: no answer is right.
            return "has alpha 0, which tools read differently (kohya: alpha = rank; A1111, ComfyUI: no effect)"
        if not (_holds_only_finite_values(self.down) and _holds_only_finite_values(self.up)):
            return "holds NaN or inf values"
        return None


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

    def problem(self) -> str | None:
        """The first module that cannot be used and why (``module 'unet.….to_q' holds NaN or inf values``), or
        ``None`` (see :meth:`LoRAModuleWeights.problem`)."""
        for module_key, weights in self.modules.items():
            module_problem = weights.problem()
            if module_problem:
                return f"module {module_key!r} {module_problem}"
        return None

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
