"""The LoRA maths, and nothing else: low-rank factors, several named adapters on one linear map, exact fusing.

This module imports torch only. Processors, file formats, blending, training and the UI build on it.

For a linear map ``y = W x + b`` with ``W`` of shape ``(out_features, in_features)``, one adapter adds

    ΔW = s · B A,    A = ``down`` (rank × in_features),  B = ``up`` (out_features × rank),
    s = alpha / rank            (LoRA, Hu et al. 2021)
    s = alpha / sqrt(rank)      (rsLoRA, Kalajdzievski 2023)

and several adapters, each with a multiplier ``m`` (the user's weight times any per-block weight), add
``Σ_a m_a · s_a · B_a A_a``.

``W x + Σ m s B A x`` can be computed two ways with the same result: factored (two rank-wide matmuls over every token)
or merged (``(W + Σ m s B A) x``, one matmul with a weight built per call). :func:`merged_form_is_cheaper` picks one.

Two limits keep a mix from making an all-black image: a user's weight lies in [-100, 100] (:func:`adapter_weight`),
and :meth:`MultiLoRA.check_range` refuses a mix whose ``m · s · B A`` does not fit the layer's dtype (fp16 holds
65504), naming the adapter and the module, before a forward pass or a fuse uses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_globals

from .errors import DiffloraError, FuseError, InvalidArgumentError

__all__ = [
    "MAX_ADAPTER_WEIGHT",
    "ActiveAdapter",
    "AdapterDict",
    "LoRAFactors",
    "MultiLoRA",
    "adapter_weight",
    "initial_down",
    "initial_factors",
    "lora_scale",
    "merged_form_is_cheaper",
]


# Useful adapter weights lie within about ±2 (a few styles are pushed to ±5); far beyond, no adapter gives a usable
# image, and a typo such as 1e38 reached the maths as an all-black image. ±100 leaves every deliberate use in and
# keeps such numbers out. A weight inside the range can still overflow a half-precision layer when the factors are
# large: MultiLoRA.check_range refuses that, naming the module.
MAX_ADAPTER_WEIGHT = 100.0


def adapter_weight(value, what: str = "weight", parameter: str | None = "weight") -> float:
    """``value`` as an adapter's weight: a finite number in [-100, 100] (:data:`MAX_ADAPTER_WEIGHT`), or
    :class:`InvalidArgumentError` naming ``what`` (an option, a form field) and the range."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{what} must be a number, got {value!r}", parameter) from None
    if not -MAX_ADAPTER_WEIGHT <= number <= MAX_ADAPTER_WEIGHT:  # NaN fails every comparison
        raise InvalidArgumentError(
            f"{what} must be a finite number in [{-MAX_ADAPTER_WEIGHT:g}, {MAX_ADAPTER_WEIGHT:g}], got {number!r}",
            parameter)
    return number


def lora_scale(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """The factor ``s`` that multiplies ``B A``: ``alpha / rank``, or ``alpha / sqrt(rank)`` for rsLoRA."""
    if rank <= 0:
        raise InvalidArgumentError(f"rank must be a positive integer, got {rank}", "rank")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def initial_down(rank: int, in_features: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A new adapter's ``down`` (A) factor: Gaussian with standard deviation ``1 / rank``.

    The LoRA paper's Gaussian A, at the scale diffusers' LoRA training scripts use (PEFT ``init_lora_weights=
    "gaussian"``). ``up`` starts at zero, so a new adapter changes nothing. It learns faster than the Kaiming-uniform
    A of ``nn.Linear`` (std ``1/sqrt(3·in_features)``, smaller): lower held-out loss after the same steps, in PEFT and
    difflora alike (docs/benchmarks.md).
    """
    return torch.randn(rank, in_features, generator=generator) / rank


INITIALISATIONS = ("zeros", "random")


def initial_factors(
    rank: int, in_features: int, out_features: int, init: str = "zeros", generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down, up)`` of a new adapter, fp32: rank × in_features and out_features × rank.

    ``init="zeros"`` starts training: ``down`` from :func:`initial_down`, ``up = 0``, so ``ΔW = 0`` (LoRA's own
    choice). ``init="random"`` draws both as ``nn.Linear`` draws a weight (uniform in ±1/sqrt(fan_in)): an adapter that
    changes the output, for tests and benchmarks.
    """
    if init == "zeros":
        return initial_down(rank, in_features, generator), torch.zeros(out_features, rank)
    if init == "random":
        down = (torch.rand(rank, in_features, generator=generator) * 2 - 1) / in_features**0.5
        up = (torch.rand(out_features, rank, generator=generator) * 2 - 1) / rank**0.5
        return down, up
    raise InvalidArgumentError(f"init must be one of {', '.join(INITIALISATIONS)}, got {init!r}", "init")


# How much more arithmetic the merged form may do and still be taken, measured per layer on a CPU. Training: rank-wide
# matmuls over many tokens and their gradients are memory-bound and run far below peak, so merged is faster up to about
# twice the factored form's flops (64-wide layers of a tiny UNet at rank 8, SD 1.5's 320-wide ones at rank 64+) and
# slower from about three times (1280-wide at rank 8). Inference: building W + ΔW is no cheaper than its flops, so
# the forms are compared as counted (SD 1.5 at 32×32 latents, 4 rank-16 adapters: 320-wide layers 1.06× the plain
# layer merged vs 1.26× factored; cross-attention keys 768→320 from 154 tokens at rank 64: 1.69× merged, 1.42×
# factored).
MERGED_FLOPS_ALLOWANCE = {"training": 2.0, "inference": 1.0}


def merged_form_is_cheaper(tokens: int, in_features: int, out_features: int, rank: int, with_gradients: bool) -> bool:
    """Whether ``(W + ΔW) x`` costs less than ``W x + B (A x)`` for ``tokens`` rows of ``x`` and total rank ``rank``.

    Extra arithmetic over the base layer's own matmul(s):
      merged:   build ``ΔW`` (in·out·rank); with gradients also the weight-sized gradient (tokens·in·out) and the two
                factor gradients from it (2·in·out·rank).
      factored: ``A x`` and ``B (A x)`` (tokens·rank·(in+out)); with gradients twice that again backwards.
    """
    weight_size = in_features * out_features
    rank_wide = tokens * rank * (in_features + out_features)
    if with_gradients:
        merged, factored = tokens * weight_size + 3 * weight_size * rank, 3 * rank_wide
    else:
        merged, factored = weight_size * (rank + 1), rank_wide
    return merged <= MERGED_FLOPS_ALLOWANCE["training" if with_gradients else "inference"] * factored


_GLOBAL_HOOKS = (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"
)


def _runs_plain_forward(base: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``base(x)`` is just ``F.linear(x, base.weight, base.bias)``: a plain ``nn.Linear`` with a plain weight on
    ``x``'s device, its ``forward`` not replaced (accelerate's offload and device-map hooks replace it on the
    instance) and no module hooks of its own or global ones."""
    return (
        type(base) is nn.Linear
        and type(base.weight) is nn.Parameter
        and base.weight.device == x.device
        and "forward" not in base.__dict__
        and not hasattr(base, "_hf_hook")
        and not (base._forward_hooks or base._forward_pre_hooks or base._backward_hooks or base._backward_pre_hooks)
        and not any(getattr(_module_globals, name, None) for name in _GLOBAL_HOOKS)
    )


class LoRAFactors(nn.Module):
    """One adapter's low-rank update of one linear map: ``ΔW = scale · up @ down``.

    Args:
        in_features: columns of the adapted weight ``W``.
        out_features: rows of ``W``.
        rank: inner dimension ``r`` of the factors.
        alpha: scaling numerator; ``None`` means ``alpha = rank`` (scale 1).
        use_rslora: use ``alpha / sqrt(rank)`` instead of ``alpha / rank``.

    ``down`` is initialised by :func:`initial_down` and ``up`` with zeros, so a new adapter starts as the identity
    change ``ΔW = 0``.

    Raises:
        InvalidArgumentError: when a size is not positive.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float | None = None,
        use_rslora: bool = False,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for option, value in (("in_features", in_features), ("out_features", out_features), ("rank", rank)):
            if not isinstance(value, int) or value <= 0:
                raise InvalidArgumentError(f"{option} must be a positive integer, got {value!r}", option)
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.use_rslora = use_rslora
        self.down = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.up = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        self._largest: dict[str, object] = {}  # largest_entries' numbers and the factor versions they hold for
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.down.copy_(initial_down(self.rank, self.in_features))
            self.up.zero_()

    def _apply(self, fn, recurse: bool = True):
        # Keep the factors' dtype (fp32) when the model around them is cast (pipe.to(torch.float16), .half()): the
        # delta is computed in fp32 and cast once (peft and diffusers keep trainable LoRA weights fp32 the same way).
        # Device moves still apply.
        def same_dtype(tensor: torch.Tensor) -> torch.Tensor:
            converted = fn(tensor)
            if tensor.is_floating_point() and converted.dtype != tensor.dtype:
                return tensor.to(device=converted.device)  # the move without the cast: no rounding
            return converted

        return super()._apply(same_dtype, recurse)

    @classmethod
    def from_tensors(
        cls, down: torch.Tensor, up: torch.Tensor, alpha: float | None = None, use_rslora: bool = False
    ) -> LoRAFactors:
        """Factors holding copies of ``down`` (rank × in) and ``up`` (out × rank)."""
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise InvalidArgumentError(
                "LoRA factors must be down (rank × in) and up (out × rank), "
                f"got {tuple(down.shape)} and {tuple(up.shape)}"
            )
        rank, in_features, out_features = down.shape[0], down.shape[1], up.shape[0]
        factors = cls(in_features, out_features, rank, alpha, use_rslora, dtype=down.dtype, device=down.device)
        with torch.no_grad():
            factors.down.copy_(down)
            factors.up.copy_(up.to(down.dtype))
        return factors

    @property
    def scale(self) -> float:
        return lora_scale(self.rank, self.alpha, self.use_rslora)

    def delta_weight(self) -> torch.Tensor:
        """``scale · up @ down`` in fp32, shape (out_features, in_features)."""
        return (self.up.float() @ self.down.float()) * self.scale

    def largest_entries(self, exact: bool = False) -> tuple[float, float]:
        """``(max |s·B A|, max |s·B|)``, what this adapter adds to its layer at multiplier 1 and its scaled ``up``
        (the factor the stacked form casts to the layer's dtype).

        Without ``exact`` the first is an upper bound that costs no product: ``|(B A)_ij| ≤ ‖B_i‖ ‖A_:j‖``
        (Cauchy–Schwarz), computed in fp64. With ``exact`` it is the maximum of :meth:`delta_weight` (fp32, as a
        fuse computes it; inf when that overflows). Both are cached until a factor changes in place.
        """
        key = (self.down._version, self.up._version, self.scale)
        if self._largest.get("key") != key:
            self._largest = {"key": key}  # older versions are never asked for again
        found = self._largest
        with torch.no_grad():
            if "up" not in found:
                up, down, scale = self.up.detach().double(), self.down.detach().double(), abs(self.scale)
                found["up"] = float(up.abs().max()) * scale
                found["bound"] = float(up.norm(dim=1).max() * down.norm(dim=0).max()) * scale
            if exact and "change" not in found:
                found["change"] = float(self.delta_weight().detach().abs().max())
        return (found["change"] if exact else found["bound"]), found["up"]

    def forward(self, x: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
        """``multiplier · scale · B A x`` for ``x`` of shape (..., in_features).

        The factor is applied to the rank-sized intermediate ``A x``, the smallest tensor on the way.
        """
        return ((x @ self.down.to(x.dtype).t()) * (self.scale * multiplier)) @ self.up.to(x.dtype).t()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha:g}"


class AdapterDict(nn.Module):
    """Adapters by name, registered as submodules (so ``.to()`` and ``state_dict()`` see them).

    Unlike ``nn.ModuleDict`` it accepts any name without a dot, including ones that are ``nn.Module`` attributes
    (an adapter may well be called ``train``): entries live in ``_modules`` and are only reached by ``[name]``.
    """

    def __setitem__(self, name: str, module: nn.Module) -> None:
        if not isinstance(name, str) or not name or "." in name:
            raise InvalidArgumentError(f"adapter name {name!r} must be a non-empty string without dots")
        self._modules[name] = module

    def __getitem__(self, name: str) -> nn.Module:
        return self._modules[name]

    def __delitem__(self, name: str) -> None:
        del self._modules[name]

    def __contains__(self, name: object) -> bool:
        return name in self._modules

    def __iter__(self):
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)

    def items(self):
        return self._modules.items()


@dataclass(frozen=True)
class ActiveAdapter:
    name: str
    factors: LoRAFactors
    multiplier: float


class MultiLoRA(nn.Module):
    """Several named adapters on one linear map: ``y = W x + b + Σ_a m_a · s_a · B_a A_a x``.

    The host (an attention processor) computes ``W x + b`` and adds :meth:`delta`. Each adapter's multiplier ``m_a`` is
    a plain float set by the runtime; an adapter with multiplier 0 costs nothing. Without gradients, the active
    adapters are stacked into one pair of matrices (``[A_1; A_2; …]`` and ``[m_1 s_1 B_1, m_2 s_2 B_2, …]``), so
    any number of adapters costs two matmuls; the stack is rebuilt only when a multiplier or a factor changes.

    :meth:`fuse` writes ``W + Σ m s B A`` (computed in fp32, cast once) into the base layer and keeps the original
    weight, so :meth:`unfuse` restores it bit-exactly however many times it is done.

    Before a forward pass without gradients and before a fuse, :meth:`check_range` refuses a mix that the layer's
    dtype cannot hold; ``module`` (the module key, e.g. ``unet.….attn1.to_q``) names the layer in its message.
    """

    def __init__(self, in_features: int, out_features: int, module: str = "") -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.module = module
        self.adapters = AdapterDict()
        self.multipliers: dict[str, float] = {}
        self.fused = False
        self._stack_key: tuple | None = None
        self._stack: tuple[torch.Tensor, torch.Tensor] | None = None
        self._checked_key: tuple | None = None

    # ----- adapters -------------------------------------------------------------------------------------------
    def add(self, name: str, factors: LoRAFactors, multiplier: float = 1.0) -> None:
        if (factors.in_features, factors.out_features) != (self.in_features, self.out_features):
            raise InvalidArgumentError(
                f"adapter {name!r}: factors map {factors.in_features}→{factors.out_features}, "
                f"the layer maps {self.in_features}→{self.out_features}"
            )
        self.adapters[name] = factors
        self.multipliers[name] = float(multiplier)
        self._stack_key = None

    def remove(self, name: str) -> None:
        if name in self.adapters:
            del self.adapters[name]
            self.multipliers.pop(name, None)
            self._stack_key = None

    def set_multiplier(self, name: str, multiplier: float) -> None:
        if name in self.adapters:
            self.multipliers[name] = float(multiplier)

    def active(self) -> list[ActiveAdapter]:
        return [
            ActiveAdapter(name, factors, self.multipliers[name])
            for name, factors in self.adapters.items()
            if self.multipliers.get(name, 0.0) != 0.0
        ]

    # ----- the range check ------------------------------------------------------------------------------------
    @staticmethod
    def _mix_key(active: list[ActiveAdapter]) -> tuple:
        # Parameter._version changes on every in-place update (optimizer steps, load_state_dict), so a key built
        # from it never matches a changed factor.
        return tuple(
            (a.name, a.multiplier, a.factors.down._version, a.factors.up._version, a.factors.scale) for a in active
        )

    def check_range(self, dtype: torch.dtype, error: type[DiffloraError] = InvalidArgumentError) -> None:
        """Refuse the active mix if an adapter's ``m · s · B A`` (fp32) or its scaled factor ``m · s · B`` is not
        finite or exceeds what ``dtype`` holds (``torch.finfo(dtype).max``: 65504 for fp16), naming the adapter, the
        module and the numbers: ``error`` (:class:`InvalidArgumentError`, or :class:`FuseError` from :meth:`fuse`)
        with ``parameter="weight"``.

        Cheap: a bound first (no product), the exact maximum only when the bound is over the limit; each adapter's
        numbers are cached until its factors change, and a mix already checked for ``dtype`` is not checked again.
        """
        active = self.active()
        key = (dtype, self._mix_key(active))
        if key == self._checked_key or not dtype.is_floating_point:
            return
        limit = torch.finfo(dtype).max
        for adapter in active:
            multiplier = abs(adapter.multiplier)
            bound, largest_up = adapter.factors.largest_entries()
            if multiplier * bound <= limit and multiplier * largest_up <= limit:
                continue
            largest_change, _ = adapter.factors.largest_entries(exact=True)
            reached = max(multiplier * largest_change, multiplier * largest_up)
            if not reached <= limit:  # inf and NaN included
                dtype_name = str(dtype).removeprefix("torch.")
                raise error(
                    f"weight of adapter {adapter.name!r} is too large for {self.module or 'this layer'} in "
                    f"{dtype_name}: at multiplier {adapter.multiplier:g} (weight × block weight) its change reaches "
                    f"{reached:.3g}, more than {dtype_name} holds ({limit:g}); use a smaller weight", "weight")
        self._checked_key = key

    # ----- forward --------------------------------------------------------------------------------------------
    def linear(self, base: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + Σ m s B A x``, in the merged or the factored form, whichever costs less for this ``x``.

        The merged form calls ``F.linear`` with the base layer's tensors, so it is only taken where that is all the
        layer's forward would do (:func:`_runs_plain_forward`); offloaded, hooked and quantised layers run their own.
        """
        if self.fused:
            return base(x)
        active = self.active()
        if not active:
            return base(x)
        trainable = any(a.factors.down.requires_grad or a.factors.up.requires_grad for a in active)
        if not trainable:
            self.check_range(x.dtype)
        tokens = x.numel() // x.shape[-1] if x.ndim else 1
        total_rank = sum(a.factors.rank for a in active)
        if _runs_plain_forward(base, x) and merged_form_is_cheaper(
            tokens, self.in_features, self.out_features, total_rank, trainable and torch.is_grad_enabled()
        ):
            weight = base.weight.float() + self._merged_delta(active, trainable, x.device)
            return F.linear(x, weight.to(x.dtype), base.bias)
        delta = self.delta(x)
        output = base(x)
        return output + delta.to(output.dtype)

    def _merged_delta(self, active: list[ActiveAdapter], trainable: bool, device: torch.device) -> torch.Tensor:
        if trainable:  # each adapter's own graph, never the cached stack (as in delta())
            return self.delta_weight()
        down_stack, up_stack = self._stacked(active, torch.float32, device)
        return up_stack @ down_stack

    def delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """``Σ m s B A x`` for ``x`` of shape (..., in_features), or ``None`` when nothing is active or fused."""
        if self.fused:
            return None
        active = self.active()
        if not active:
            return None
        if any(a.factors.down.requires_grad or a.factors.up.requires_grad for a in active):
            # Trainable factors: keep each adapter's own graph (the factors may be fp32 while x is fp16/bf16 under
            # autocast), and never cache them: optimizers may write them through .data, unseen by _version.
            total = None
            for adapter in active:
                term = adapter.factors(x, adapter.multiplier)
                total = term if total is None else total + term
            return total
        self.check_range(x.dtype)
        down_stack, up_stack = self._stacked(active, x.dtype, x.device)
        return (x @ down_stack.t()) @ up_stack.t()

    def _stacked(self, active: list[ActiveAdapter], dtype: torch.dtype, device: torch.device):
        key = (dtype, device, self._mix_key(active))  # a stale stack is never used (see _mix_key)
        if key != self._stack_key:
            with torch.no_grad():
                down_stack = torch.cat([a.factors.down.float() for a in active], dim=0)
                up_stack = torch.cat([a.factors.up.float() * (a.multiplier * a.factors.scale) for a in active], dim=1)
            self._stack = (down_stack.to(device=device, dtype=dtype), up_stack.to(device=device, dtype=dtype))
            self._stack_key = key
        return self._stack

    def delta_weight(self) -> torch.Tensor | None:
        """``Σ m s B A`` in fp32, shape (out_features, in_features), or ``None`` when nothing is active."""
        total = None
        for adapter in self.active():
            term = adapter.factors.delta_weight() * adapter.multiplier
            total = term if total is None else total + term
        return total

    # ----- fusing ---------------------------------------------------------------------------------------------
    def fuse(self, base: nn.Linear) -> None:
        """Write the active mix into ``base.weight`` and keep the original for :meth:`unfuse`."""
        if self.fused:
            raise RuntimeError("already fused; unfuse first")
        self.check_range(base.weight.dtype, FuseError)
        delta = self.delta_weight()
        original = base.weight.detach().clone()
        if delta is not None:
            fused = (original.float() + delta.to(original.device)).to(original.dtype)
            if not torch.isfinite(fused).all():
                raise FuseError(f"fusing would write NaN/inf into a {tuple(original.shape)} {original.dtype} weight "
                                "(weights too large for its precision); nothing was changed")
            with torch.no_grad():
                base.weight.copy_(fused)
        # A non-persistent buffer follows .to(device) with the module and stays out of state_dict().
        self.register_buffer("original_weight", original, persistent=False)
        self.fused = True

    def unfuse(self, base: nn.Linear) -> None:
        """Restore the weight :meth:`fuse` replaced, bit for bit."""
        if not self.fused:
            return
        with torch.no_grad():
            base.weight.copy_(self.original_weight)
        self._forget_original()

    def commit_fuse(self) -> None:
        """Make a fuse permanent: the fused weight stays in the base layer and the original is dropped, so nothing
        can unfuse it. The branch then adds nothing of its own (``fused`` is off and its adapters are the caller's
        to remove)."""
        if self.fused:
            self._forget_original()

    def _forget_original(self) -> None:
        del self.original_weight
        self.fused = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={list(self.adapters)}, fused={self.fused}"
