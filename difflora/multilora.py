"""Several named adapters on one layer: their sum, the forms that compute it, the range check, exact fusing.

Torch only, like :mod:`difflora.lora` whose :class:`~difflora.lora.LoRAFactors` it holds. The hosts
(:mod:`difflora.processors`) own a :class:`MultiLoRA` per adapted layer; the runtime sets its multipliers.

Two limits keep a mix from making an all-black image: a user's weight lies in [-100, 100]
(:func:`~difflora.lora.adapter_weight`), and :meth:`MultiLoRA.check_range` refuses a mix whose ``m · s · B A`` does
not fit the layer's dtype (fp16 holds 65504), naming the adapter and the module, before a forward pass or a fuse
uses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_globals
from torch.nn.utils import parametrize

from .errors import DiffloraError, FuseError, InvalidArgumentError
from .lora import LoRAFactors, fold_tucker_core, merged_form_is_cheaper
from .lycoris import dora_weight

__all__ = ["ActiveAdapter", "AdapterDict", "Mix", "MultiLoRA", "stored_weight"]


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
class Mix:
    """What one forward call adds: the active adapters, whether any is trainable, and the mix's key (``None`` when
    trainable: trainable factors are never cached). ``low_rank`` are the LoRA updates that stack (no DoRA);
    ``others`` the rest (LoHa, LoKr, full diffs, and any update with a DoRA magnitude), built whole."""

    active: list[ActiveAdapter]
    trainable: bool
    key: tuple | None
    low_rank: list[ActiveAdapter]
    others: list[ActiveAdapter]

    @property
    def needs_merged_form(self) -> bool:
        """A DoRA update rescales the whole weight: it has no factored form."""
        return any(_magnitude(a.factors) is not None for a in self.others)


@dataclass(frozen=True)
class ActiveAdapter:
    name: str
    factors: LoRAFactors
    multiplier: float


def _magnitude(update: nn.Module) -> torch.Tensor | None:
    return getattr(update, "magnitude", None)


def _stacks(update: nn.Module) -> bool:
    """Whether ``update`` joins the stacked low-rank pair: a LoRA without a DoRA magnitude."""
    return isinstance(update, LoRAFactors) and _magnitude(update) is None


def stored_weight(layer: nn.Module) -> torch.Tensor:
    """The weight tensor ``layer`` stores: its ``weight``, or the original under a parametrization (a hosted layer's
    ``weight`` is computed per call)."""
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight.original
    return layer.weight


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry is finite. A NaN or inf makes the fp32 sum non-finite, so the sum (one read) decides;
    only a sum overflowing from finite entries needs the entrywise check."""
    return bool(torch.isfinite(tensor.sum(dtype=torch.float32))) or bool(torch.isfinite(tensor).all())


def _put_back(parameter: torch.Tensor, original: torch.Tensor) -> None:
    """Put ``original`` back as ``parameter``'s values: its very tensor when it still fits (same shape, dtype and
    device), else copied in (the model was moved or cast while fused)."""
    current = parameter.data
    if (original.shape, original.dtype, original.device) == (current.shape, current.dtype, current.device):
        parameter.data = original
    else:
        current.copy_(original)


def _conv_down(factors: LoRAFactors) -> torch.Tensor:
    """``A`` as an fp32 matrix r × (in·kh·kw), a Tucker core folded in."""
    return fold_tucker_core(factors.down, factors.mid).float().flatten(1)


class MultiLoRA(nn.Module):
    """Several named adapters on one layer: ``y = W x + b + Σ_a m_a · s_a · B_a A_a x`` (a Linear), or the same with
    convolutions (a Conv2d with ``kernel_size``).

    The host (an attention processor, or a layer's hook) computes ``W x + b`` and adds :meth:`delta`. Each adapter's
    multiplier ``m_a`` is a plain float set by the runtime; an adapter with multiplier 0 costs nothing. On a Linear
    without gradients, the active adapters are stacked into one pair of matrices (``[A_1; A_2; …]`` and
    ``[m_1 s_1 B_1, m_2 s_2 B_2, …]``), so any number of adapters costs two matmuls; the stack is rebuilt only when a
    multiplier or a factor changes.

    :meth:`fuse` writes ``W + Σ m s B A`` (computed in fp32, cast once) into the base layer and keeps the original
    weight, so :meth:`unfuse` restores it bit-exactly however many times it is done.

    Before a forward pass without gradients and before a fuse, :meth:`check_range` refuses a mix that the layer's
    dtype cannot hold; ``module`` (the module key, e.g. ``unet.….attn1.to_q``) names the layer in its message.
    """

    def __init__(
        self, in_features: int, out_features: int, module: str = "", kernel_size: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.kernel_size = tuple(kernel_size) if kernel_size is not None else None
        self.module = module
        self.adapters = AdapterDict()
        self.multipliers: dict[str, float] = {}
        self.fused = False
        self._stack_key: tuple | None = None
        self._stack: tuple[torch.Tensor, torch.Tensor] | None = None
        self._checked_key: tuple | None = None
        self._active: list[ActiveAdapter] | None = None

    # ----- adapters -------------------------------------------------------------------------------------------
    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape of the adapted weight: (out, in) or (out, in, kh, kw)."""
        return (self.out_features, self.in_features, *(self.kernel_size or ()))

    def add(self, name: str, factors: LoRAFactors, multiplier: float = 1.0) -> None:
        if factors.weight_shape != self.weight_shape:
            raise InvalidArgumentError(
                f"adapter {name!r}: factors change a weight of shape {factors.weight_shape}, "
                f"the layer's is {self.weight_shape}"
            )
        self.adapters[name] = factors
        self.multipliers[name] = float(multiplier)
        self._stack_key, self._active = None, None

    def remove(self, name: str) -> None:
        if name in self.adapters:
            del self.adapters[name]
            self.multipliers.pop(name, None)
            self._stack_key, self._active = None, None

    def set_multiplier(self, name: str, multiplier: float) -> None:
        multiplier = float(multiplier)
        if self.multipliers.get(name, multiplier) != multiplier:  # held exactly for the adapters on this layer
            self.multipliers[name] = multiplier
            self.__dict__["_active"] = None  # a plain attribute: skip nn.Module.__setattr__, asked per branch

    def active(self) -> list[ActiveAdapter]:
        """The adapters with a non-zero multiplier (kept until an adapter or a multiplier changes: asked per call)."""
        if self._active is None:
            self._active = [
                ActiveAdapter(name, factors, self.multipliers[name])
                for name, factors in self.adapters.items()
                if self.multipliers.get(name, 0.0) != 0.0
            ]
        return self._active

    # ----- the range check ------------------------------------------------------------------------------------
    @staticmethod
    def _mix_key(active: list[ActiveAdapter]) -> tuple:
        # Parameter._version changes on every in-place update (optimizer steps, load_state_dict), so a key built
        # from it never matches a changed factor.
        return tuple((a.name, a.multiplier, a.factors.version(), a.factors.scale) for a in active)

    def check_range(
        self, dtype: torch.dtype, error: type[DiffloraError] = InvalidArgumentError, mix_key: tuple | None = None
    ) -> None:
        """Refuse the active mix if an adapter's ``m · s · B A`` (fp32) or its scaled factor ``m · s · B`` is not
        finite or exceeds what ``dtype`` holds (``torch.finfo(dtype).max``: 65504 for fp16), naming the adapter, the
        module and the numbers: ``error`` (:class:`InvalidArgumentError`, or :class:`FuseError` from :meth:`fuse`)
        with ``parameter="weight"``.

        Cheap: a bound first (no product), the exact maximum only when the bound is over the limit; each adapter's
        numbers are cached until its factors change, and a mix already checked for ``dtype`` is not checked again
        (``mix_key``: the mix's key when the caller has it already).
        """
        active = self.active()
        key = (dtype, mix_key if mix_key is not None else self._mix_key(active))
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
    def snapshot(self) -> Mix | None:
        """The mix one forward call computes (``None`` when nothing is active or the mix is fused), taken once per
        call and handed to :meth:`plan`, :meth:`merged_weight` and :meth:`delta`, so a call asks for each adapter's
        factors and versions once."""
        if self.fused:
            return None
        active = self.active()
        if not active:
            return None
        trainable = any(factor.requires_grad for a in active for factor in a.factors.factors())
        low_rank = [a for a in active if _stacks(a.factors)]
        others = [a for a in active if not _stacks(a.factors)]
        return Mix(active, trainable, None if trainable else self._mix_key(active), low_rank, others)

    def plan(self, x: torch.Tensor, mix: Mix | None = None) -> str | None:
        """How to add the active mix for input ``x``: ``"merged"`` (``(W + ΔW) x``), ``"factored"``
        (``W x + B (A x)``) or ``None`` (nothing active, or fused), whichever costs less
        (:func:`~difflora.lora.merged_form_is_cheaper`; a conv counts each output pixel as a token and
        ``in · kh · kw`` inputs). Without gradients, the mix is checked against ``x``'s dtype first."""
        mix = mix or self.snapshot()
        if mix is None:
            return None
        if not mix.trainable:
            self.check_range(x.dtype, mix_key=mix.key)
        if mix.others:
            return "merged"  # updates built whole: adding them to W costs no more than one product
        tokens = x.numel() // self.in_features if self.kernel_size else x.numel() // max(x.shape[-1], 1)
        kernel = self.kernel_size[0] * self.kernel_size[1] if self.kernel_size else 1
        total_rank = sum(a.factors.rank for a in mix.active)
        cheaper = merged_form_is_cheaper(tokens, self.in_features * kernel, self.out_features, total_rank,
                                         mix.trainable and torch.is_grad_enabled())
        return "merged" if cheaper else "factored"

    def merged_weight(
        self, weight: torch.Tensor, dtype: torch.dtype | None = None, mix: Mix | None = None
    ) -> torch.Tensor:
        """The weight the mix makes of ``weight``, computed in fp32 and cast once, to ``dtype`` (default:
        ``weight``'s): ``W + Σ m s B A`` for the stacking LoRAs (each trainable adapter's own graph, else the cached
        stack), plus each other update's ``m · ΔW``, then each DoRA update in turn
        (:func:`~difflora.lycoris.dora_weight` of the weight so far)."""
        mix = mix or self.snapshot()
        if mix is None:
            return weight if dtype is None else weight.to(dtype)
        merged = weight.float()
        if mix.low_rank:
            if mix.trainable:
                merged = merged + sum(a.factors.delta_weight() * a.multiplier for a in mix.low_rank)
            else:
                down_stack, up_stack = self._stacked(mix, torch.float32, weight.device)
                # W + U D in one kernel: no ΔW-sized temporary
                merged = torch.addmm(merged.reshape(weight.shape[0], -1), up_stack, down_stack).reshape(weight.shape)
        for adapter in mix.others:
            delta = adapter.factors.delta_weight().reshape(weight.shape)
            magnitude = _magnitude(adapter.factors)
            if magnitude is None:
                merged = merged + adapter.multiplier * delta
            else:
                merged = dora_weight(merged, delta, magnitude, adapter.multiplier, adapter.factors.wd_on_output)
        return merged.to(dtype or weight.dtype)

    def bias_delta(self, mix: Mix | None = None) -> torch.Tensor | None:
        """``Σ m Δb`` of the updates that change the bias (full diffs' ``diff_b``), fp32, or ``None``."""
        mix = mix or self.snapshot()
        terms = [a.factors.bias_delta() * a.multiplier for a in (mix.others if mix else [])
                 if getattr(a.factors, "bias_delta", lambda: None)() is not None]
        return sum(terms) if terms else None

    def linear(self, base: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + Σ m s B A x``, in the merged or the factored form, whichever costs less for this ``x``.

        The merged form calls ``F.linear`` with the base layer's tensors, so it is only taken where that is all the
        layer's forward would do (:func:`_runs_plain_forward`); offloaded, hooked and quantised layers run their own.
        """
        mix = self.snapshot()
        form = self.plan(x, mix)
        if form == "merged" and _runs_plain_forward(base, x):
            bias, bias_delta = base.bias, self.bias_delta(mix)
            if bias_delta is not None:
                bias = (bias.float() + bias_delta if bias is not None else bias_delta).to(x.dtype)
            return F.linear(x, self.merged_weight(base.weight, x.dtype, mix), bias)
        output = base(x)
        if form is None:
            return output
        return output + self.delta(x, mix=mix).to(output.dtype)

    def delta(self, x: torch.Tensor, conv: nn.Conv2d | None = None, mix: Mix | None = None) -> torch.Tensor | None:
        """``Σ m s B A x``, or ``None`` when nothing is active or fused: for a Linear ``x`` of shape
        (..., in_features); for a Conv2d ``x`` of shape (batch, in, h, w) and ``conv`` the layer (its stride, padding
        and dilation). ``mix``: the call's :meth:`snapshot`, already checked by :meth:`plan`."""
        if mix is None:
            mix = self.snapshot()
            if mix is not None and not mix.trainable:
                self.check_range(x.dtype, mix_key=mix.key)
        if mix is None:
            return None
        if mix.needs_merged_form:
            raise InvalidArgumentError(
                f"{self.module or 'this layer'}: a DoRA adapter needs the merged form, and this layer runs a forward "
                "of its own (offloaded or hooked): load the model without offloading", "model")
        # Trainable factors keep each adapter's own graph (the factors may be fp32 while x is fp16/bf16 under
        # autocast), and are never cached: optimizers may write them through .data, unseen by _version. Updates
        # built whole (LoHa, LoKr, full) apply their ΔW as a layer of their own.
        singles = mix.active if mix.trainable else mix.others
        total = None
        if mix.low_rank and not mix.trainable:
            total = self._stacked_delta(x, conv, mix)
        for adapter in singles:
            term = adapter.factors(x, adapter.multiplier, conv)
            total = term if total is None else total + term
        return total

    def _stacked_delta(self, x: torch.Tensor, conv: nn.Conv2d | None, mix: Mix) -> torch.Tensor:
        down_stack, up_stack = self._stacked(mix, x.dtype, x.device)
        if self.kernel_size is None:
            return (x @ down_stack.t()) @ up_stack.t()
        spatial = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation}
        down_kernels = down_stack.reshape(down_stack.shape[0], self.in_features, *self.kernel_size)
        return F.conv2d(F.conv2d(x, down_kernels, **spatial), up_stack[:, :, None, None])

    def _stacked(self, mix: Mix, dtype: torch.dtype, device: torch.device):
        """``[A_1; A_2; …]`` (Σr × in·kh·kw) and ``[m_1 s_1 B_1, …]`` (out × Σr), cached per mix. A Tucker core is
        folded into its ``A`` (``mid ∘ down`` is an r × in × kh × kw conv, exactly)."""
        key = (dtype, device, mix.key)  # a stale stack is never used (see _mix_key)
        if key != self._stack_key:
            with torch.no_grad():
                down_stack = torch.cat([_conv_down(a.factors) for a in mix.low_rank], dim=0)
                up_stack = torch.cat([a.factors.up.float().flatten(1) * (a.multiplier * a.factors.scale)
                                      for a in mix.low_rank], dim=1)
            self._stack = (down_stack.to(device=device, dtype=dtype), up_stack.to(device=device, dtype=dtype))
            self._stack_key = key
        return self._stack

    def delta_weight(self) -> torch.Tensor | None:
        """``Σ m ΔW`` in fp32, shaped like the weight, or ``None`` when nothing is active. (A DoRA update rescales the
        weight it is added to, so with one the change is ``merged_weight(W) − W``, not this sum.)"""
        total = None
        for adapter in self.active():
            term = adapter.factors.delta_weight().reshape(self.weight_shape) * adapter.multiplier
            total = term if total is None else total + term
        return total

    # ----- fusing ---------------------------------------------------------------------------------------------
    def fuse(self, base: nn.Linear | nn.Conv2d) -> None:
        """Write the active mix into ``base``'s weight (and bias, for full diffs) and keep the originals for
        :meth:`unfuse`.

        The fused weight is a new tensor put in the parameter's place and the original tensor is kept as it is, not
        copied: fusing costs one pass to make the fused weight and one to check it, and unfusing puts the original
        back without touching its values.
        """
        if self.fused:
            raise RuntimeError("already fused; unfuse first")
        weight = stored_weight(base)
        self.check_range(weight.dtype, FuseError)
        mix = self.snapshot()
        bias_delta = self.bias_delta(mix)
        if bias_delta is not None and base.bias is None:
            raise FuseError(f"{self.module or 'this layer'}: a full diff changes a bias the layer does not have")
        original = weight.data
        if mix is not None:
            with torch.no_grad():
                fused = self.merged_weight(original, mix=mix)
                if fused.data_ptr() == original.data_ptr():
                    fused = fused.clone()  # nothing to add here: still never alias the kept original
            if not _all_finite(fused):
                raise FuseError(f"fusing would write NaN/inf into a {tuple(original.shape)} {original.dtype} weight "
                                "(weights too large for its precision); nothing was changed")
            weight.data = fused
            if bias_delta is not None:
                self.register_buffer("original_bias", base.bias.data, persistent=False)
                base.bias.data = (base.bias.data.float() + bias_delta).to(base.bias.dtype)
        # A non-persistent buffer follows .to(device) with the module and stays out of state_dict().
        self.register_buffer("original_weight", original, persistent=False)
        self.fused = True

    def unfuse(self, base: nn.Linear | nn.Conv2d) -> None:
        """Restore the weight (and bias) :meth:`fuse` replaced, bit for bit."""
        if not self.fused:
            return
        with torch.no_grad():
            _put_back(stored_weight(base), self.original_weight)
            if "original_bias" in self._buffers:
                _put_back(base.bias, self.original_bias)
        self._forget_original()

    def commit_fuse(self) -> None:
        """Make a fuse permanent: the fused weight stays in the base layer and the original is dropped, so nothing
        can unfuse it. The branch then adds nothing of its own (``fused`` is off and its adapters are the caller's
        to remove)."""
        if self.fused:
            self._forget_original()

    def _forget_original(self) -> None:
        del self.original_weight
        if "original_bias" in self._buffers:
            del self.original_bias
        self.fused = False

    def extra_repr(self) -> str:
        kernel = f", kernel={self.kernel_size}" if self.kernel_size else ""
        return (f"in={self.in_features}, out={self.out_features}{kernel}, adapters={list(self.adapters)}, "
                f"fused={self.fused}")
