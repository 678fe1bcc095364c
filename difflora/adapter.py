"""The in-memory adapter every room passes around: per adapted layer, its factors and alpha, plus metadata.

Files in any dialect are read into an :class:`AdapterState` and written from one (``difflora.formats``); the runtime
loads one into a pipeline and saves one back; blending, scaling and resizing map states to states. Module keys are
the canonical ``<component>.<layer path>`` of :mod:`difflora.keys`.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

import torch

from .keys import layer_name, split_module_key
from .lora import lora_delta, lora_scale

__all__ = ["AdapterState", "LoRAModuleWeights", "factor_shape_problem"]


def factor_shape_problem(down: torch.Tensor, up: torch.Tensor, mid: torch.Tensor | None = None) -> str | None:
    """What is wrong with the shapes of a module's factors, as the end of a sentence about the module; ``None`` when
    they fit. A Linear's factors are matrices, down rank × in and up out × rank; a Conv2d's are 4-D, down
    rank × in × kh × kw and up out × rank × 1 × 1, or with a Tucker core ``mid`` (rank × rank × kh × kw) a 1 × 1
    down. Every size > 0."""
    shapes = f"{tuple(down.shape)} and {tuple(up.shape)}" + (f" (mid {tuple(mid.shape)})" if mid is not None else "")
    expected = "down (rank × in) and up (out × rank), or 4-D conv factors"
    if down.ndim not in (2, 4) or up.ndim != down.ndim or (up.ndim == 4 and tuple(up.shape[2:]) != (1, 1)):
        return f"has factors of shapes {shapes}, expected {expected} (up 1 × 1)"
    if up.shape[1] != down.shape[0]:
        return f"has factors of shapes {shapes} whose ranks differ, expected {expected}"
    if mid is not None and (down.ndim != 4 or mid.ndim != 4 or tuple(mid.shape[:2]) != (down.shape[0],) * 2
                            or tuple(down.shape[2:]) != (1, 1)):
        return f"has factors of shapes {shapes}, expected a Tucker core rank × rank × kh × kw with a 1 × 1 down"
    if down.numel() == 0 or up.numel() == 0 or (mid is not None and mid.numel() == 0):
        return f"has empty factors of shapes {shapes}; rank, in and out features must be > 0"
    return None


def _holds_only_finite_values(tensor: torch.Tensor) -> bool:
    if tensor.dtype.itemsize == 1:  # float8: torch has no isfinite for e4m3fn, so check an fp32 copy
        tensor = tensor.float()
    return bool(torch.isfinite(tensor).all())


@dataclass
class LoRAModuleWeights:
    """One adapted layer: ``ΔW = s · up @ down`` with ``s = alpha / rank`` (``alpha / sqrt(rank)`` for rsLoRA).

    A Linear's factors are matrices (down rank × in, up out × rank); a Conv2d's are 4-D (LoCon): down
    rank × in × kh × kw and up out × rank × 1 × 1, so ``ΔW = up ∘ down`` is a conv of the layer's kernel; with a
    Tucker core ``mid`` (rank × rank × kh × kw, LyCORIS' ``lora_mid``) down is 1 × 1 and
    ``ΔW[o, i] = Σ up[o, p] mid[p, q] down[q, i]``.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    use_rslora: bool = False
    mid: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return lora_scale(self.rank, self.alpha, self.use_rslora)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape of the weight this update changes: (out, in) or (out, in, kh, kw)."""
        kernel = tuple((self.mid if self.mid is not None else self.down).shape[2:])
        return (self.up.shape[0], self.down.shape[1], *kernel)

    def delta_weight(self) -> torch.Tensor:
        """``s · up ∘ (mid ∘) down`` in fp32, shaped like the weight it changes."""
        return lora_delta(self.down, self.up, self.mid, self.scale)

    def alpha_for(self, use_rslora: bool) -> float:
        """The alpha that gives this module's scale under the ``use_rslora`` convention (``alpha / sqrt(rank)`` if
        true, ``alpha / rank`` if not): a file format with one convention still carries every module's scale."""
        if use_rslora == self.use_rslora:
            return self.alpha
        return self.scale * (math.sqrt(self.rank) if use_rslora else self.rank)

    def problem(self) -> str | None:
        """What makes this module unusable, as the end of a sentence about it (``holds NaN or inf values``), or
        ``None``: factors that do not fit together (:func:`factor_shape_problem`), are empty, not floating point or
        not finite, or an alpha that is not a finite, non-zero number. A file that passes can be applied, blended and
        resized (an SVD of a matrix holding NaN fails, and a NaN in a factor makes a black image). One pass over the
        tensors."""
        shape_problem = factor_shape_problem(self.down, self.up, self.mid)
        if shape_problem:
            return shape_problem
        factors = (self.down, self.up) if self.mid is None else (self.down, self.up, self.mid)
        if not all(factor.is_floating_point() for factor in factors):
            types = " and ".join(str(factor.dtype) for factor in factors)
            return f"has factors of type {types}, expected floating point"
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)):
            return f"has alpha {self.alpha!r}, expected a finite number"
        if self.alpha == 0:
            # kohya's trainer reads a stored 0 as alpha = rank, A1111 and ComfyUI as scale 0: no answer is right.
            return "has alpha 0, which tools read differently (kohya: alpha = rank; A1111, ComfyUI: no effect)"
        if not all(_holds_only_finite_values(factor) for factor in factors):
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
        """The layers adapted in each component by their name within a block (:func:`~difflora.keys.layer_name`),
        sorted: ``{"unet": ["conv1", "ff.net.0.proj", "to_k", …], …}``."""
        found: dict[str, set[str]] = collections.defaultdict(set)
        for module_key in self.modules:
            component, path = split_module_key(module_key)
            found[component].add(layer_name(path))
        return {component: sorted(names) for component, names in sorted(found.items())}

    def skipped_summary(self, limit: int = 5) -> str:
        """``N keys difflora cannot apply: a, b, …`` naming at most ``limit`` of :attr:`skipped`."""
        count = len(self.skipped)
        listed = ", ".join(self.skipped[:limit]) + (", ..." if count > limit else "")
        return f"{count} key{'s' if count != 1 else ''} difflora cannot apply: {listed}"
