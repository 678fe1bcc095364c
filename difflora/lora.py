"""The LoRA maths, and nothing else: one adapter's low-rank update of one layer, its scale, its initialisation.

This module and :mod:`difflora.multilora` (several named adapters on one layer, exact fusing) import torch only.
Processors, file formats, blending, training and the UI build on them.

For a linear map ``y = W x + b`` with ``W`` of shape ``(out_features, in_features)``, one adapter adds

    ΔW = s · B A,    A = ``down`` (rank × in_features),  B = ``up`` (out_features × rank),
    s = alpha / rank            (LoRA, Hu et al. 2021)
    s = alpha / sqrt(rank)      (rsLoRA, Kalajdzievski 2023)

For a Conv2d (LoCon) ``A`` is a conv with the layer's kernel, stride and padding (rank × in × kh × kw) and ``B`` a
1 × 1 conv (out × rank × 1 × 1), so ``ΔW`` is a conv of the layer's kernel; with a Tucker core (LyCORIS' ``mid``,
rank × rank × kh × kw) ``A`` is 1 × 1 and the core carries the kernel. Several adapters, each with a multiplier ``m``
(the user's weight times any per-block weight), add ``Σ_a m_a · s_a · B_a A_a``.

``W x + Σ m s B A x`` can be computed two ways with the same result: factored (two rank-wide matmuls over every token)
or merged (``(W + Σ m s B A) x``, one matmul with a weight built per call). :func:`merged_form_is_cheaper` picks one.

A user's weight lies in [-100, 100] (:func:`adapter_weight`), which keeps typos such as 1e38 from making an all-black
image; :meth:`MultiLoRA.check_range` refuses a mix whose change does not fit the layer's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidArgumentError, number_in

__all__ = [
    "MAX_ADAPTER_WEIGHT",
    "LoRAFactors",
    "adapter_weight",
    "fold_tucker_core",
    "initial_down",
    "initial_factors",
    "lora_delta",
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
    return number_in(value, -MAX_ADAPTER_WEIGHT, MAX_ADAPTER_WEIGHT, what, parameter, convert=True)


def lora_scale(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """The factor ``s`` that multiplies ``B A``: ``alpha / rank``, or ``alpha / sqrt(rank)`` for rsLoRA."""
    if rank <= 0:
        raise InvalidArgumentError(f"rank must be a positive integer, got {rank}", "rank")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def lora_delta(
    down: torch.Tensor, up: torch.Tensor, mid: torch.Tensor | None = None, scale: float = 1.0
) -> torch.Tensor:
    """``scale · up ∘ down`` in fp32, shaped like the weight it changes.

    Linear: down ``r × in``, up ``out × r`` → ``out × in``. Conv2d (LoCon): down ``r × in × kh × kw``, up
    ``out × r × 1 × 1`` → ``out × in × kh × kw``. With a Tucker core ``mid`` (``r × r × kh × kw``) and a 1 × 1 down:
    ``ΔW[o, i, h, w] = Σ_pq up[o, p] · mid[p, q, h, w] · down[q, i]``.
    """
    up_matrix, down_matrix = up.float().flatten(1), down.float().flatten(1)
    if mid is not None:
        delta = torch.einsum("op,pqhw,qi->oihw", up_matrix, mid.float(), down_matrix)
    else:
        delta = (up_matrix @ down_matrix).reshape(up.shape[0], *down.shape[1:])
    return delta * scale


def fold_tucker_core(down: torch.Tensor, mid: torch.Tensor | None) -> torch.Tensor:
    """A conv update's ``down`` with its Tucker core folded in: ``down'[p, i, h, w] = Σ_q mid[p, q, h, w] ·
    down[q, i]`` (rank × in × kh × kw), the same update at the same rank (``up ∘ mid ∘ down = up ∘ down'``).
    Without a core, ``down`` itself. Computed in fp32 at least (fp64 stays fp64)."""
    if mid is None:
        return down
    dtype = torch.promote_types(down.dtype, torch.float32)
    return torch.einsum("pqhw,qi->pihw", mid.to(dtype), down.to(dtype).flatten(1))


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


class LoRAFactors(nn.Module):
    """One adapter's low-rank update of one layer: ``ΔW = scale · up ∘ (mid ∘) down``.

    Args:
        in_features: input features (Linear) or channels (Conv2d) of the adapted weight ``W``.
        out_features: its output features or channels.
        rank: inner dimension ``r`` of the factors.
        alpha: scaling numerator; ``None`` means ``alpha = rank`` (scale 1).
        use_rslora: use ``alpha / sqrt(rank)`` instead of ``alpha / rank``.
        kernel_size: a Conv2d's ``(kh, kw)``; ``None`` for a Linear.
        tucker: a Conv2d update with a Tucker core ``mid`` (r × r × kh × kw) and a 1 × 1 ``down``.

    Shapes: Linear ``down`` r × in, ``up`` out × r; Conv2d ``down`` r × in × kh × kw (1 × 1 with ``tucker``),
    ``up`` out × r × 1 × 1. ``down`` (and ``mid``) are initialised by :func:`initial_down` and ``up`` with zeros, so
    a new adapter starts as the identity change ``ΔW = 0``.

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
        kernel_size: tuple[int, int] | None = None,
        tucker: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for option, value in (("in_features", in_features), ("out_features", out_features), ("rank", rank)):
            if not isinstance(value, int) or value <= 0:
                raise InvalidArgumentError(f"{option} must be a positive integer, got {value!r}", option)
        if tucker and kernel_size is None:
            raise InvalidArgumentError("tucker needs a conv kernel_size", "tucker")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.use_rslora = use_rslora
        self.kernel_size = tuple(kernel_size) if kernel_size is not None else None
        conv = (1, 1) if self.kernel_size is not None else ()
        down_kernel = conv if tucker else (self.kernel_size or ())
        self.down = nn.Parameter(torch.empty(rank, in_features, *down_kernel, dtype=dtype, device=device))
        self.up = nn.Parameter(torch.zeros(out_features, rank, *conv, dtype=dtype, device=device))
        mid = torch.empty(rank, rank, *self.kernel_size, dtype=dtype, device=device) if tucker else None
        self.mid = nn.Parameter(mid) if mid is not None else None
        self._largest: dict[str, object] = {}  # largest_entries' numbers and the factor versions they hold for
        self.reset_parameters()

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape of the weight this update changes: (out, in) or (out, in, kh, kw)."""
        return (self.out_features, self.in_features, *(self.kernel_size or ()))

    def factors(self) -> tuple[nn.Parameter, ...]:
        """``(down, up)``, or ``(down, up, mid)`` with a Tucker core: the trainable tensors."""
        # Straight from _parameters (registration order): nn.Module.__getattr__ made this a hot spot per forward.
        return tuple(parameter for parameter in self._parameters.values() if parameter is not None)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            fan_in = self.down[0].numel()
            self.down.copy_(initial_down(self.rank, fan_in).reshape(self.down.shape))
            if self.mid is not None:  # as a conv weight of that fan-in draws
                self.mid.copy_(torch.randn(self.mid.shape) / self.mid[0].numel() ** 0.5)
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
        cls,
        down: torch.Tensor,
        up: torch.Tensor,
        alpha: float | None = None,
        use_rslora: bool = False,
        mid: torch.Tensor | None = None,
    ) -> LoRAFactors:
        """Factors holding copies of ``down``, ``up`` (and ``mid``), in the shapes of the class docstring."""
        conv = down.ndim == 4
        fits = (down.ndim in (2, 4) and up.ndim == down.ndim and up.shape[1] == down.shape[0]
                and (not conv or tuple(up.shape[2:]) == (1, 1)))
        if mid is not None:
            fits = fits and conv and tuple(down.shape[2:]) == (1, 1) and tuple(mid.shape[:2]) == (down.shape[0],) * 2
        if not fits:
            shapes = f"{tuple(down.shape)} and {tuple(up.shape)}" + (f", mid {tuple(mid.shape)}" if mid is not None
                                                                      else "")
            raise InvalidArgumentError(
                "LoRA factors must be down (rank × in) and up (out × rank), or conv factors down "
                f"(rank × in × kh × kw) and up (out × rank × 1 × 1), got {shapes}", "down")
        kernel = tuple((mid if mid is not None else down).shape[2:]) if conv else None
        factors = cls(down.shape[1], up.shape[0], down.shape[0], alpha, use_rslora, kernel_size=kernel,
                      tucker=mid is not None, dtype=down.dtype, device=down.device)
        with torch.no_grad():
            factors.down.copy_(down)
            factors.up.copy_(up.to(down.dtype))
            if mid is not None:
                factors.mid.copy_(mid.to(down.dtype))
        return factors

    @property
    def scale(self) -> float:
        return lora_scale(self.rank, self.alpha, self.use_rslora)

    def delta_weight(self) -> torch.Tensor:
        """``scale · up ∘ down`` in fp32, shaped like the weight (:func:`lora_delta`)."""
        return lora_delta(self.down, self.up, self.mid, self.scale)

    def version(self) -> tuple[int, ...]:
        """Changes whenever a factor is written in place (optimizer steps, ``load_state_dict``): for caches."""
        return tuple(parameter._version for parameter in self._parameters.values() if parameter is not None)

    def largest_entries(self, exact: bool = False) -> tuple[float, float]:
        """``(max |s·B A|, max |s·B|)``, what this adapter adds to its layer at multiplier 1 and its scaled ``up``
        (the factor the stacked form casts to the layer's dtype).

        Without ``exact`` the first is an upper bound that costs no product: ``|(B A)_ij| ≤ ‖B_i‖ ‖A_:j‖``
        (Cauchy–Schwarz), computed in fp64 (with a Tucker core, the exact value). With ``exact`` it is the maximum
        of :meth:`delta_weight` (fp32, as a fuse computes it; inf when that overflows). Both are cached until a
        factor changes in place.
        """
        key = (self.version(), self.scale)
        if self._largest.get("key") != key:
            self._largest = {"key": key}  # older versions are never asked for again
        found = self._largest
        with torch.no_grad():
            if "up" not in found:
                up, down, scale = self.up.detach().double().flatten(1), self.down.detach().double(), abs(self.scale)
                found["up"] = float(up.abs().max()) * scale
                if self.mid is None:
                    found["bound"] = float(up.norm(dim=1).max() * down.flatten(1).norm(dim=0).max()) * scale
            if (exact or "bound" not in found) and "change" not in found:
                found["change"] = float(self.delta_weight().detach().abs().max())
        return (found["change"] if exact or "bound" not in found else found["bound"]), found["up"]

    def forward(self, x: torch.Tensor, multiplier: float = 1.0, conv: nn.Conv2d | None = None) -> torch.Tensor:
        """``multiplier · scale · B A x``: for a Linear, ``x`` of shape (..., in_features); for a Conv2d, ``x`` of
        shape (batch, in, h, w) and ``conv`` the layer whose stride, padding and dilation ``A`` (or the core) takes.

        The factor is applied to the rank-sized intermediate ``A x``, the smallest tensor on the way.
        """
        factor = self.scale * multiplier
        if self.kernel_size is None:
            return ((x @ self.down.to(x.dtype).t()) * factor) @ self.up.to(x.dtype).t()
        spatial = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation}
        if self.mid is None:
            hidden = F.conv2d(x, self.down.to(x.dtype), **spatial)
        else:
            hidden = F.conv2d(F.conv2d(x, self.down.to(x.dtype)), self.mid.to(x.dtype), **spatial)
        return F.conv2d(hidden * factor, self.up.to(x.dtype))

    def extra_repr(self) -> str:
        kernel = f", kernel={self.kernel_size}" if self.kernel_size else ""
        tucker = ", tucker" if self.mid is not None else ""
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha:g}{kernel}{tucker}"
