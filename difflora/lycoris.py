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

import math

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
    "factorization",
    "initial_loha",
    "initial_lokr",
    "initial_magnitude",
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


# ----- a new trainable update: each algorithm's own initialisation, so that ΔW = 0 at the start -------------------


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m · n = dimension`` and ``m ≤ n``: LoKr's split of a side into its small (``w1``) and large
    (``w2``) part, as LyCORIS' ``factorization`` makes it. A positive ``factor`` that divides ``dimension`` is taken as
    it is; otherwise the most balanced split whose small part is at most ``factor`` (-1: no limit), e.g.
    128 → (8, 16), 127 → (1, 127), 360 with factor 8 → (8, 45)."""
    if factor > 0 and dimension % factor == 0:
        return min(factor, dimension // factor), max(factor, dimension // factor)
    limit = dimension if factor < 0 else factor
    small = 1
    for candidate in range(2, math.isqrt(dimension) + 1):
        if candidate > limit:
            break
        if dimension % candidate == 0:
            small = candidate
    return small, dimension // small


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """``kaiming_uniform_(a=√5)``, the draw of an ``nn.Linear``'s weight: uniform in ±1/sqrt(fan_in), fan_in the
    product of every dimension but the first."""
    fan_in = math.prod(shape[1:])
    return (torch.rand(shape, generator=generator) * 2 - 1) / math.sqrt(fan_in)


def initial_loha(
    weight_shape: tuple[int, ...], rank: int, init: str = "zeros", generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """A new LoHa's ``w1a, w1b, w2a, w2b`` (fp32, no Tucker cores) for a weight of ``weight_shape``: w1a, w2a
    out × rank, w1b, w2b rank × in·kh·kw.

    LyCORIS' ``LohaModule`` initialisation: ``w1b``, ``w2b`` normal with std 1, ``w1a`` normal with std 0.1 and
    ``w2a`` zero, so ``ΔW = (w1a w1b) ⊙ (w2a w2b) = 0``; ``init="random"`` draws ``w2a`` like ``w1a`` (an update
    that changes the output, for tests)."""
    out_features, flat_in = weight_shape[0], math.prod(weight_shape[1:])

    def normal(shape: tuple[int, int], std: float) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * std

    w1a, w1b = normal((out_features, rank), 0.1), normal((rank, flat_in), 1.0)
    w2a = normal((out_features, rank), 0.1) if init == "random" else torch.zeros(out_features, rank)
    return {"w1a": w1a, "w1b": w1b, "w2a": w2a, "w2b": normal((rank, flat_in), 1.0)}


def initial_lokr(
    weight_shape: tuple[int, ...], rank: int, factor: int = -1, init: str = "zeros",
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """A new LoKr's tensors (fp32) for a weight of ``weight_shape``: ``w1`` (out_l × in_m, whole) and either ``w2``
    (out_k × in_n × kh × kw, whole) or ``w2a`` (out_k × rank) and ``w2b`` (rank × in_n·kh·kw), with
    ``factorization(out, factor) = (out_l, out_k)`` and ``factorization(in, factor) = (in_m, in_n)``.

    LyCORIS' ``LokrModule`` choices: ``w2`` is factorised when ``rank < max(out_k, in_n) / 2``; ``w1`` and
    ``w2a`` are drawn as ``nn.Linear`` weights (:func:`_uniform`) and ``w2`` or ``w2b`` start at zero, so
    ``ΔW = w1 ⊗ w2 = 0``; ``init="random"`` draws those too."""
    out_l, out_k = factorization(weight_shape[0], factor)
    in_m, in_n = factorization(weight_shape[1], factor)
    kernel = tuple(weight_shape[2:])

    def second(shape: tuple[int, ...]) -> torch.Tensor:
        return _uniform(shape, generator) if init == "random" else torch.zeros(shape)

    tensors = {"w1": _uniform((out_l, in_m), generator)}
    if rank < max(out_k, in_n) / 2:
        tensors["w2a"] = _uniform((out_k, rank), generator)
        tensors["w2b"] = second((rank, in_n * math.prod(kernel)))
    else:
        tensors["w2"] = second((out_k, in_n, *kernel))
    return tensors


def initial_magnitude(weight: torch.Tensor, wd_on_output: bool = True) -> torch.Tensor:
    """A new DoRA update's magnitude ``g``: the norm of ``weight`` (fp32) per output row (``wd_on_output``, LyCORIS'
    and PEFT's default) or per input column, computed as :func:`dora_weight` computes ``‖V‖``, so that with
    ``ΔW = 0`` the decomposed weight is ``W`` exactly."""
    weight = weight.detach().float()
    if wd_on_output:
        return weight.flatten(1).norm(dim=1)
    return weight.transpose(0, 1).flatten(1).norm(dim=1)


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
