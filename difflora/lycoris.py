"""LyCORIS' other updates of a layer, torch only: LoHa, LoKr, full diffs, and DoRA's weight decomposition.

Each class holds one adapter's update of one Linear or Conv2d and offers what :class:`~difflora.lora.LoRAFactors`
does (``delta_weight``, ``forward``, ``factors``, ``version``, ``largest_entries``), so a
:class:`~difflora.multilora.MultiLoRA` mixes any of them with LoRA. Shapes follow LyCORIS' files (``W`` is
out × in, or out × in × kh × kw; ``in·k`` is in · kh · kw):

* **LoHa** (Hadamard product, Hyeon-Woo et al. 2022): ``ΔW = s · (w1a w1b) ⊙ (w2a w2b)`` with w1a, w2a out × r and
  w1b, w2b r × in·k; with Tucker cores t1, t2 (r × r × kh × kw), w1a, w2a are r × out and w1b, w2b r × in, and each
  half is ``Σ_ij t[i, j] w_a[i, o] w_b[j, i']``. ``s = alpha / r``, ``r = w1b.shape[0]``.
* **LoKr** (Kronecker product, Yeh et al. 2023): ``ΔW = s · w1 ⊗ w2`` with w1 a × b (or w1a a × r, w1b r × b), w2
  c × d × kh × kw (or w2a c × r, w2b r × d·k, or a Tucker core t2 with w2a r × c, w2b r × d); out = a·c, in = b·d.
  ``s = alpha / r`` where a side is factorised (r = that side's ``w_b.shape[0]``), else 1.
* **Full** (LyCORIS' ``full``): ``ΔW = diff`` and, optionally, a bias change ``diff_b``; no scale.
* **DoRA** (Liu et al. 2024): an update with a magnitude vector ``g`` (``dora_scale``). The weight at strength
  ``m`` is ``W + m · (g ⊙ V / ‖V‖ − W)`` with ``V = W + s·ΔW`` and the norm taken per output row
  (``wd_on_output``, LyCORIS' and PEFT's default) or per input column: at ``m = 1`` exactly DoRA, at ``m = 0`` the
  base weight. This is the convention of AUTOMATIC1111 and ComfyUI (LyCORIS' own loader scales the normalisation
  instead, ``V · (m (g/‖V‖ − 1) + 1)`` with ``V = W + ΔW``; the two agree at ``m = 1``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora import lora_scale

__all__ = [
    "FullDiff",
    "LoHaFactors",
    "LoKrFactors",
    "attach_magnitude",
    "dora_weight",
    "loha_delta",
    "lokr_delta",
]


def _tucker(core: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``Σ_ij core[i, j, …] up[i, o] down[j, c]`` → o × c × …: one half of a Tucker-decomposed update."""
    return torch.einsum("ij...,io,jc->oc...", core, up, down)


def loha_delta(
    w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
    t1: torch.Tensor | None, t2: torch.Tensor | None, scale: float, weight_shape: tuple[int, ...],
) -> torch.Tensor:
    """A LoHa's ``ΔW`` in fp32, shaped ``weight_shape`` (see the module docstring)."""
    w1a, w1b, w2a, w2b = (tensor.float() for tensor in (w1a, w1b, w2a, w2b))
    if t1 is not None and t2 is not None:
        first, second = _tucker(t1.float(), w1a, w1b), _tucker(t2.float(), w2a, w2b)
    else:
        first, second = w1a @ w1b.flatten(1), w2a @ w2b.flatten(1)
    return (first * second).reshape(weight_shape) * scale


def lokr_delta(
    w1: torch.Tensor | None, w1a: torch.Tensor | None, w1b: torch.Tensor | None,
    w2: torch.Tensor | None, w2a: torch.Tensor | None, w2b: torch.Tensor | None,
    t2: torch.Tensor | None, scale: float, weight_shape: tuple[int, ...],
) -> torch.Tensor:
    """A LoKr's ``ΔW`` in fp32, shaped ``weight_shape`` (see the module docstring)."""
    left = w1.float() if w1 is not None else w1a.float() @ w1b.float()
    if w2 is not None:
        right = w2.float()
    elif t2 is not None:
        right = _tucker(t2.float(), w2a.float(), w2b.float())
    else:
        right = w2a.float() @ w2b.float().flatten(1)
    out_right = weight_shape[0] // left.shape[0]
    right = right.reshape(out_right, -1, *weight_shape[2:]).contiguous()
    while left.ndim < right.ndim:
        left = left.unsqueeze(-1)
    return torch.kron(left, right).reshape(weight_shape) * scale


def dora_weight(
    weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, multiplier: float, wd_on_output: bool
) -> torch.Tensor:
    """``W + m · (g ⊙ V / ‖V‖ − W)`` with ``V = W + ΔW`` (fp32), the norm per output row or per input column."""
    merged = weight.float() + delta
    if wd_on_output:
        norm = merged.flatten(1).norm(dim=1).reshape(merged.shape[0], *[1] * (merged.ndim - 1))
    else:
        norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, merged.shape[1], *[1] * (merged.ndim - 2))
    decomposed = merged * (magnitude.float().reshape(norm.shape) / norm)
    return weight.float() + multiplier * (decomposed - weight.float())


def attach_magnitude(update: nn.Module, magnitude: torch.Tensor, wd_on_output: bool = True) -> nn.Module:
    """Make ``update`` (any of LoRAFactors, LoHaFactors, LoKrFactors, FullDiff) a DoRA update: its magnitude ``g``
    (one value per output row, or per input column when not ``wd_on_output``) is registered as the parameter
    ``magnitude``, fp32, frozen like the rest of a loaded update."""
    update.register_parameter("magnitude", nn.Parameter(magnitude.detach().float().flatten().clone(),
                                                        requires_grad=False))
    update.wd_on_output = wd_on_output
    return update


class _DenseUpdate(nn.Module):
    """What LoHa, LoKr and full diffs share: their ``ΔW`` is built whole, then applied as a layer of its own."""

    kind = "dense"

    def __init__(self, weight_shape: tuple[int, ...], rank: int, alpha: float) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_shape[0], weight_shape[1]
        self.kernel_size = tuple(weight_shape[2:]) or None
        self.rank = rank
        self.alpha = float(alpha)
        self.use_rslora = False
        self._largest: dict[str, object] = {}

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features, *(self.kernel_size or ()))

    def factors(self) -> tuple[nn.Parameter, ...]:
        return tuple(parameter for parameter in self._parameters.values() if parameter is not None)

    def version(self) -> tuple[int, ...]:
        return tuple(parameter._version for parameter in self._parameters.values() if parameter is not None)

    def bias_delta(self) -> torch.Tensor | None:
        return None

    def largest_entries(self, exact: bool = False) -> tuple[float, float]:
        """``(max |ΔW|, max |ΔW|)``: the change is built whole, so its maximum is the bound (cached per version)."""
        key = self.version()
        if self._largest.get("key") != key:
            with torch.no_grad():
                largest = float(self.delta_weight().detach().abs().max())
            self._largest = {"key": key, "largest": largest}
        return self._largest["largest"], self._largest["largest"]

    def forward(self, x: torch.Tensor, multiplier: float = 1.0, conv: nn.Conv2d | None = None) -> torch.Tensor:
        """``multiplier · ΔW x`` (and the bias change), as the layer's own op with ``ΔW`` as its weight."""
        delta = self.delta_weight() * multiplier
        bias = self.bias_delta()
        bias = bias.to(x.dtype) * multiplier if bias is not None else None
        if self.kernel_size is None:
            return F.linear(x, delta.to(x.dtype), bias)
        return F.conv2d(x, delta.to(x.dtype), bias, conv.stride, conv.padding, conv.dilation)

    def _apply(self, fn, recurse: bool = True):
        # Keep fp32 under a model cast, as LoRAFactors does.
        def same_dtype(tensor: torch.Tensor) -> torch.Tensor:
            converted = fn(tensor)
            if tensor.is_floating_point() and converted.dtype != tensor.dtype:
                return tensor.to(device=converted.device)
            return converted

        return super()._apply(same_dtype, recurse)


def _parameter(tensor: torch.Tensor | None) -> nn.Parameter | None:
    return nn.Parameter(tensor.detach().float().clone(), requires_grad=False) if tensor is not None else None


class LoHaFactors(_DenseUpdate):
    """One adapter's LoHa update (``hada_*`` keys): ``ΔW = s · (w1a w1b) ⊙ (w2a w2b)``, Tucker cores optional."""

    kind = "loha"

    def __init__(self, weight_shape, w1a, w1b, w2a, w2b, t1=None, t2=None, alpha: float | None = None) -> None:
        rank = w1b.shape[0]
        super().__init__(tuple(weight_shape), rank, rank if alpha is None else alpha)
        for name, tensor in (("w1a", w1a), ("w1b", w1b), ("w2a", w2a), ("w2b", w2b), ("t1", t1), ("t2", t2)):
            self.register_parameter(name, _parameter(tensor))

    @property
    def scale(self) -> float:
        return lora_scale(self.rank, self.alpha)

    def delta_weight(self) -> torch.Tensor:
        return loha_delta(self.w1a, self.w1b, self.w2a, self.w2b, self.t1, self.t2, self.scale, self.weight_shape)


class LoKrFactors(_DenseUpdate):
    """One adapter's LoKr update (``lokr_*`` keys): ``ΔW = s · w1 ⊗ w2``, either side whole or factorised."""

    kind = "lokr"

    def __init__(self, weight_shape, w1=None, w1a=None, w1b=None, w2=None, w2a=None, w2b=None, t2=None,
                 alpha: float | None = None) -> None:
        # The rank of the factorised side; with both factorised, w2's (as ComfyUI, A1111 and Forge read it; the
        # ranks are equal in what LyCORIS writes)
        factorised = w2b if w2 is None else (w1b if w1 is None else None)
        rank = factorised.shape[0] if factorised is not None else 0
        super().__init__(tuple(weight_shape), rank, alpha if (alpha is not None and rank) else max(rank, 1))
        for name, tensor in (("w1", w1), ("w1a", w1a), ("w1b", w1b), ("w2", w2), ("w2a", w2a), ("w2b", w2b),
                             ("t2", t2)):
            self.register_parameter(name, _parameter(tensor))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 1.0

    def delta_weight(self) -> torch.Tensor:
        return lokr_delta(self.w1, self.w1a, self.w1b, self.w2, self.w2a, self.w2b, self.t2, self.scale,
                          self.weight_shape)


class FullDiff(_DenseUpdate):
    """One adapter's full update (``diff``, ``diff_b``): ``ΔW`` and the bias change as they are."""

    kind = "full"

    def __init__(self, diff: torch.Tensor, diff_b: torch.Tensor | None = None) -> None:
        super().__init__(tuple(diff.shape), 0, 1.0)
        self.register_parameter("diff", _parameter(diff))
        self.register_parameter("diff_b", _parameter(diff_b))

    @property
    def scale(self) -> float:
        return 1.0

    def delta_weight(self) -> torch.Tensor:
        return self.diff.float()

    def bias_delta(self) -> torch.Tensor | None:
        return self.diff_b.float() if self.diff_b is not None else None
