"""Blending, scaling and resizing adapters of every kind, exactly where exactness is possible and optimally where
it is not.

A LoRA module is a low-rank product ``ΔW = s · B A``. A weighted blend ``Σ wᵢ ΔWᵢ`` of LoRAs is again such a
product with the factors side by side: ``[w₁s₁B₁ … wₙsₙBₙ] · [A₁; …; Aₙ]`` (a conv's Tucker core folded into its
``A``, exact at the same rank). The other kinds (LoHa, LoKr, full diffs) are no such product: they enter as their
dense update ``ΔW`` (:meth:`~difflora.adapter.LoHaModuleWeights.delta_weight`) and leave as the best LoRA of a
given rank, with the error. So:

* ``concat`` writes the LoRA factors side by side, exactly (rank = Σ rankᵢ; any ranks and alphas; modules present in
  only some adapters; PEFT's "linear" combination multiplies factors and needs equal ranks, see peft #1155). The
  other kinds' sum in a module joins it as its best rank-``rank`` factors (Eckart–Young), the only inexact part.
* ``svd`` returns the best rank-``r`` approximation of the whole sum: for LoRAs alone from their factors (QR of the
  stacked ``B`` and ``Aᵀ``, then an SVD of the small core, never forming the d × k matrix); with any other kind from
  the dense sum.
* ``ties`` and ``dare`` act on whole weight deltas (they prune and sign-elect entries), so they use
  ``peft.utils.merge_utils`` on each module's ``ΔWᵢ`` of any kind and then take the best rank-``r`` factors.

Every inexact module's relative Frobenius error ``‖ΔW_exact − ΔW_result‖ / ‖ΔW_exact‖`` is reported.

**DoRA** (a magnitude ``g``: the layer becomes ``g ⊙ (W + ΔW) / ‖W + ΔW‖``) changes a layer by an amount that
depends on the base weight ``W`` and is not linear in the adapter's weight. Without the base model no sum, scale or
low-rank copy of it is the same change, so: ``blend`` refuses a DoRA module unless ``base_weights`` are given (then
its change against the base, ``w · (g ⊙ V/‖V‖ − W)`` at weight ``w``, A1111's and ComfyUI's strength convention,
is blended like a full diff and the result is plain LoRA; kohya's ``svd_merge_lora.py`` and ComfyUI have no DoRA
blend); ``scale`` keeps DoRA modules whose factor is 1, drops those at 0 (exactly no change) and refuses others;
``resize`` and :func:`as_lora` approximate the update ``ΔW`` inside DoRA and keep the magnitude (the module stays
DoRA; the error reported is that of ``ΔW``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .adapter import AdapterState, LoRAModuleWeights, ModuleWeights
from .blocks import SD_UNET_BLOCKS, BlockWeights
from .errors import InvalidArgumentError, finite_number, first_line
from .lora import adapter_weight, fold_tucker_core
from .lycoris import dora_weight

__all__ = [
    "BLEND_METHODS", "BlendResult", "as_lora", "blend", "dense_change", "layer_shape", "low_rank_approximation",
    "resize_adapter", "scale_adapter",
]

BLEND_METHODS = ("concat", "svd", "ties", "dare")

# The k × k convolutions of SD 1.x, SD 2.x and SDXL UNets by their last name (resnets' conv1/conv2, the samplers'
# conv, conv_in/conv_out): all 3 × 3. LyCORIS writes a LoHa or LoKr of such a conv without its kernel (out × in·9),
# and a LoRA of it needs the kernel back (k × k down, 1 × 1 up) to be a conv LoRA every tool applies.
_KERNEL_3X3_LAYERS = ("conv1", "conv2", "conv", "conv_in", "conv_out")


@dataclass
class BlendResult:
    """The blended adapter and, per module, the relative error ``‖ΔW_exact − ΔW_result‖_F / ‖ΔW_exact‖_F``."""

    state: AdapterState
    relative_errors: dict[str, float] = field(default_factory=dict)

    @property
    def max_relative_error(self) -> float:
        return max(self.relative_errors.values(), default=0.0)


def layer_shape(module_key: str, shapes: set[tuple[int, ...]]) -> tuple[int, ...]:
    """The shape of the layer ``module_key`` that updates of ``shapes`` change: a conv's 4-D shape where any update
    tells it, else SD's 3 × 3 kernel for a conv named so whose matrix view (out × in·9) is all the file says, else
    the matrix. Updates must agree on out × in·kh·kw, or :class:`InvalidArgumentError` (``adapters``)."""
    views = {(shape[0], math.prod(shape[1:])) for shape in shapes}
    kernels = {shape for shape in shapes if len(shape) == 4}
    if len(views) > 1 or len(kernels) > 1:
        raise InvalidArgumentError(
            f"adapters disagree on the shape of {module_key!r}: {sorted(shapes)} (other base models?)", "adapters")
    if kernels:
        return kernels.pop()
    (out_features, flat), = views
    if module_key.rsplit(".", 1)[-1] in _KERNEL_3X3_LAYERS and flat % 9 == 0:
        return (out_features, flat // 9, 3, 3)
    return (out_features, flat)


def _weighted_factors(module: LoRAModuleWeights, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) as fp32 matrices with the weight and the scale folded into ``up``: ``ΔW·weight = up @ down`` with
    ``ΔW`` flattened to out × (in·kh·kw) for a conv. A Tucker core is folded into ``down`` (``mid ∘ down`` is a
    rank × in × kh × kw conv), which is exact at the same rank."""
    down = fold_tucker_core(module.down, module.mid).float()
    return module.up.float().flatten(1) * (weight * module.scale), down.flatten(1)


def _low_rank_problem(module: ModuleWeights, has_base: bool) -> str | None:
    """Why ``module``'s change cannot become LoRA factors, as the end of a sentence about it, or ``None``."""
    if getattr(module, "diff_b", None) is not None:
        return "is a full diff that also changes the bias (diff_b), which a LoRA cannot hold"
    if module.dora_scale is not None and not has_base:
        return (f"is {module.kind} with DoRA, whose change depends on the base model's weights: give them, or use "
                "the adapter as it is (generate, merge)")
    return None


def dense_change(module: ModuleWeights, weight: float = 1.0, base_weight: torch.Tensor | None = None, *,
                 module_key: str = "module", parameter: str = "state") -> torch.Tensor:
    """``weight · ΔW`` of any kind as an fp32 matrix out × in·kh·kw; for a DoRA module its change of
    ``base_weight`` at that weight, ``weight · (g ⊙ V/‖V‖ − W)`` with ``V = W + ΔW``. A DoRA module without a base
    weight, or a full diff with a bias change (``diff_b``, which no LoRA holds), is :class:`InvalidArgumentError`
    naming ``module_key`` and ``parameter``."""
    problem = _low_rank_problem(module, base_weight is not None)
    if problem:
        raise InvalidArgumentError(f"{parameter}: module {module_key!r} {problem}", parameter)
    if module.dora_scale is None:
        return module.delta_weight().flatten(1) * weight
    base = base_weight.float().reshape(layer_shape(module_key, {module.weight_shape, tuple(base_weight.shape)}))
    delta = module.delta_weight().reshape(base.shape)
    return (dora_weight(base, delta, module.dora_scale, 1.0, module.wd_on_output) - base).flatten(1) * weight


def _as_module(up: torch.Tensor, down: torch.Tensor, weight_shape: tuple[int, ...]) -> LoRAModuleWeights:
    """Matrix factors back in the layer's shapes (4-D for a conv: k × k down, 1 × 1 up), at scale 1
    (``alpha = rank``)."""
    rank = down.shape[0]
    if len(weight_shape) == 4:
        down, up = down.reshape(rank, *weight_shape[1:]), up.reshape(weight_shape[0], rank, 1, 1)
    return LoRAModuleWeights(down=down.contiguous(), up=up.contiguous(), alpha=float(rank))


def _kept_rank(singular: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """How many singular values to keep: ``rank``, or the fewest whose squares hold ``energy`` of the total."""
    if energy is not None:
        if not 0.0 < energy <= 1.0:
            raise InvalidArgumentError(f"energy must be in (0, 1], got {energy}", parameter="energy")
        shares = torch.cumsum(singular.double() ** 2, 0) / max(float((singular.double() ** 2).sum()), 1e-300)
        rank = int(torch.searchsorted(shares, torch.tensor(energy, dtype=shares.dtype) - 1e-12).item()) + 1
    if rank is None or rank <= 0:
        raise InvalidArgumentError(f"rank must be a positive integer, got {rank}", parameter="rank")
    return min(rank, singular.numel())


def _truncation_error(singular: torch.Tensor, rank: int) -> float:
    """``‖σ[rank:]‖ / ‖σ‖``: the relative Frobenius error of the best rank-``rank`` factors (Eckart–Young)."""
    total = float(singular.double().norm())
    return float(singular[rank:].double().norm()) / total if total > 0 else 0.0


def low_rank_approximation(up: torch.Tensor, down: torch.Tensor, rank: int | None = None, energy: float | None = None,
                           *, module_key: str = "matrix", parameter: str = "up"):
    """Best factors of ``up @ down`` (out × R times R × in) at a lower rank, without forming the product.

    ``rank`` keeps that many singular values; ``energy`` keeps the fewest whose squares hold at least that share of
    the total. Returns ``(new_up, new_down, relative_error, singular_values)``; the error is the Frobenius norm of
    the dropped singular values over that of all, which Eckart–Young shows is the least any factors of that rank
    can have. A product too large for fp32 is :class:`InvalidArgumentError` naming ``module_key`` and ``parameter``.
    """
    # fp32 throughout: QR is backward stable, so the error stays at fp32 round-off of ‖ΔW‖, far below any truncation.
    q_up, r_up = torch.linalg.qr(up.float(), mode="reduced")  # up = Q_u R_u
    q_down, r_down = torch.linalg.qr(down.float().t(), mode="reduced")  # downᵀ = Q_d R_d
    core = r_up @ r_down.t()  # up @ down = Q_u (R_u R_dᵀ) Q_dᵀ, and the core is small
    _refuse_non_finite(module_key, (core,), "the product of its factors", parameter, advice="")
    left, singular, right_t = _svd(core, module_key, parameter)
    rank = _kept_rank(singular, rank, energy)
    new_up = (q_up @ left[:, :rank]) * singular[:rank]
    new_down = (q_down @ right_t[:rank].t()).t()
    return new_up.float(), new_down.float(), _truncation_error(singular, rank), singular


def _best_factors(matrix: torch.Tensor, rank: int | None, energy: float | None, module_key: str, parameter: str):
    """``(up, down, relative_error, singular_values)``: the best factors of a dense fp32 ``matrix`` at ``rank`` (or
    ``energy``), by a thin SVD (LAPACK's gesdd, exact to fp32 round-off)."""
    _refuse_non_finite(module_key, (matrix,), "its dense update", parameter)
    left, singular, right_t = _svd(matrix.float(), module_key, parameter)
    rank = _kept_rank(singular, rank, energy)
    return (left[:, :rank] * singular[:rank]).contiguous(), right_t[:rank].contiguous(), \
        _truncation_error(singular, rank), singular


def _is_lora(module: ModuleWeights) -> bool:
    return module.kind == "lora" and module.dora_scale is None


def _check_options(adapters: list[tuple[AdapterState, float]], method: str, rank: int | None, density: float,
                   base_weights: Mapping[str, torch.Tensor] | None) -> None:
    if not adapters:
        raise InvalidArgumentError("adapters must hold at least one (adapter, weight) pair, got none",
                                   parameter="adapters")
    if method not in BLEND_METHODS:
        raise InvalidArgumentError(f"method {method!r} is not one of {', '.join(BLEND_METHODS)}", parameter="method")
    if method != "concat" and (rank is None or rank <= 0):
        raise InvalidArgumentError(f"rank is required by method {method!r} (a positive integer), got {rank}",
                                   parameter="rank")
    for index, (state, weight) in enumerate(adapters):
        adapter_weight(weight, f"adapters: the weight of adapter {index + 1}", parameter="adapters")
        for module_key, module in state.modules.items():
            if _is_lora(module):
                continue
            problem = _low_rank_problem(module, module_key in (base_weights or {}))
            if problem:
                raise InvalidArgumentError(f"adapters: adapter {index + 1}'s module {module_key!r} {problem}",
                                           "adapters")
            if method == "concat" and (rank is None or rank <= 0):
                kind = module.kind + (" with DoRA" if module.dora_scale is not None else "")
                raise InvalidArgumentError(
                    f"rank is required to concat adapter {index + 1}, whose module {module_key!r} is {kind}: its "
                    f"update joins the blend as LoRA by SVD at that rank (a positive integer), got {rank}", "rank")
    if method in ("ties", "dare") and not 0.0 < finite_number(density, "density", parameter="density") <= 1.0:
        raise InvalidArgumentError(f"density must be in (0, 1], got {density}", parameter="density")


def _refuse_non_finite(module_key: str, tensors: tuple[torch.Tensor, ...], what: str, parameter: str,
                       advice: str = "use smaller weights") -> None:
    """:class:`InvalidArgumentError` naming the module when ``tensors`` hold NaN or inf: a result too large for fp32
    (huge factors times a weight), which no command could use and an SVD cannot take."""
    if not all(bool(torch.isfinite(tensor).all()) for tensor in tensors):
        raise InvalidArgumentError(
            f"{parameter}: module {module_key!r}: {what} is too large for float32 (it holds NaN or inf)"
            + (f"; {advice}" if advice else ""), parameter)


def _svd(matrix: torch.Tensor, module_key: str, parameter: str):
    """``torch.linalg.svd(matrix)`` (thin), with LAPACK's failure to converge as one line naming the module."""
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError as error:
        raise InvalidArgumentError(f"{parameter}: module {module_key!r}: the SVD failed ({first_line(error)})",
                                   parameter) from None


def blend(
    adapters: list[tuple[AdapterState, float]],
    method: str = "concat",
    rank: int | None = None,
    density: float = 0.5,
    base_weights: Mapping[str, torch.Tensor] | None = None,
) -> BlendResult:
    """``Σ weight · adapter`` as one LoRA adapter (see the module docstring for the methods and the kinds).

    ``rank`` is required by ``svd``, ``ties`` and ``dare`` (the result's rank), and by ``concat`` when an adapter
    holds other kinds than LoRA (the rank their update gets); ``density`` is the share of entries ``ties``/``dare``
    keep; ``base_weights`` (module key → the base model's weight of that layer) let DoRA modules in. The result has
    scale 1 (``alpha = rank``) on every module.
    """
    _check_options(adapters, method, rank, density, base_weights)
    module_keys = sorted({key for state, _ in adapters for key in state.modules})
    modules, errors = {}, {}
    for module_key in module_keys:
        present = [(state.modules[module_key], weight) for state, weight in adapters if module_key in state.modules]
        shape = layer_shape(module_key, {module.weight_shape for module, _ in present})
        base = (base_weights or {}).get(module_key)
        if method in ("ties", "dare"):
            up, down, errors[module_key] = _merge_full(present, module_key, method, rank, density, base)
        else:
            up, down, errors[module_key] = _sum_module(present, module_key, method, rank, base)
        _refuse_non_finite(module_key, (up, down), "the blend", "adapters")
        modules[module_key] = _as_module(up, down, shape)
    metadata = {"difflora.blend": f"{method}" + (f", rank {rank}" if rank else "")}
    return BlendResult(AdapterState(modules=modules, metadata=metadata, source_format="difflora"), errors)


def _sum_module(present: list[tuple[ModuleWeights, float]], module_key: str, method: str, rank: int | None,
                base: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One module of a ``concat`` or ``svd`` blend: ``(up, down, relative_error)``."""
    factors = [_weighted_factors(module, weight) for module, weight in present if _is_lora(module)]
    ups, downs = [up for up, _ in factors], [down for _, down in factors]
    _refuse_non_finite(module_key, tuple(ups), "its weighted up factor", "adapters")
    others = [dense_change(module, weight, base, module_key=module_key, parameter="adapters")
              for module, weight in present if not _is_lora(module)]
    if not others:
        if method == "concat":
            return torch.cat(ups, dim=1), torch.cat(downs, dim=0), 0.0
        up, down, error, _ = low_rank_approximation(torch.cat(ups, dim=1), torch.cat(downs, dim=0), rank=rank,
                                                    module_key=module_key, parameter="adapters")
        return up, down, error
    other_sum = torch.stack(others).sum(0)
    exact = other_sum + (torch.cat(ups, dim=1) @ torch.cat(downs, dim=0) if ups else 0.0)
    if method == "svd":
        up, down, error, _ = _best_factors(exact, rank, None, module_key, "adapters")
        return up, down, error
    # concat: the LoRA factors exactly, the other kinds' sum at its best rank-`rank` factors beside them.
    up, down, _, singular = _best_factors(other_sum, rank, None, module_key, "adapters")
    dropped = float(singular[min(rank, singular.numel()):].double().norm())
    total = float(exact.double().norm())
    return torch.cat([*ups, up], dim=1), torch.cat([*downs, down], dim=0), dropped / total if total > 0 else 0.0


def _merge_full(present: list[tuple[ModuleWeights, float]], module_key: str, method: str, rank: int,
                density: float, base: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """TIES/DARE via PEFT on full deltas, then the best rank-``rank`` factors; error is against the merged delta."""
    from peft.utils import merge_utils

    deltas = [dense_change(module, 1.0, base, module_key=module_key, parameter="adapters") for module, _ in present]
    weight_tensor = torch.tensor([weight for _, weight in present], dtype=torch.float32)
    if method == "ties":
        merged = merge_utils.ties(deltas, weight_tensor, density)
    else:
        merged = merge_utils.dare_linear(deltas, weight_tensor, density)
    # Before the SVD: LAPACK fails on NaN or inf (after printing its own error), and finite factors can still have
    # a product or a weighted sum past float32.
    _refuse_non_finite(module_key, (merged,), f"its {method} merge", "adapters")
    up, down, error, _ = _best_factors(merged, rank, None, module_key, "adapters")
    return up, down, error


def _scaled(module: ModuleWeights, factor: float) -> ModuleWeights:
    """``module`` whose update is ``factor`` times its own, exactly: the one factor the update is linear in
    (LoRA's ``up``, LoHa's ``w1a``, LoKr's ``w1`` or ``w1a``, a full diff and its bias change) multiplied in fp32
    and cast once to its dtype."""

    def times(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return (tensor.float() * factor).to(tensor.dtype) if tensor is not None else None

    if module.kind == "lora":
        return dataclasses.replace(module, up=times(module.up))
    if module.kind == "loha":
        return dataclasses.replace(module, w1a=times(module.w1a))
    if module.kind == "lokr":
        return dataclasses.replace(module, w1=times(module.w1), w1a=times(module.w1a))
    return dataclasses.replace(module, diff=times(module.diff), diff_b=times(module.diff_b))


def scale_adapter(state: AdapterState, weight: float = 1.0, block_weights: BlockWeights | None = None) -> AdapterState:
    """The adapter with every module's update multiplied by ``weight`` × its block weight: a file that behaves at
    weight 1 as the original did at that weight, exactly, for every kind (:func:`_scaled`).

    The product is computed in fp32 and cast once to the factor's dtype, so a half-precision factor loses no more
    than one rounding; one that no longer fits its dtype becomes inf, which writing refuses. A DoRA module is kept
    at factor 1 and dropped at 0 (no change at all); any other factor is :class:`InvalidArgumentError`: DoRA's
    change is not linear in its weight. Without a model, the per-block names must be blocks an SD or SDXL UNet has
    (:data:`~difflora.blocks.SD_UNET_BLOCKS`).
    """
    weight = adapter_weight(weight)
    block_weights = block_weights or BlockWeights()
    block_weights.check_blocks(SD_UNET_BLOCKS, "an SD or SDXL UNet")
    modules = {}
    for module_key, module in state.modules.items():
        component, _, path = module_key.partition(".")
        factor = weight * block_weights.factor(component, path)
        if module.dora_scale is None:
            modules[module_key] = _scaled(module, factor)
        elif factor == 1.0:
            modules[module_key] = module
        elif factor != 0.0:
            raise InvalidArgumentError(
                f"state: module {module_key!r} is {module.kind} with DoRA, whose change is not linear in its weight: "
                f"it cannot be scaled by {factor:g} without the base model's weights (factors 0 and 1 can)", "state")
    return AdapterState(modules=modules, metadata=dict(state.metadata), source_format=state.source_format)


def _low_rank_module(module: ModuleWeights, module_key: str, rank: int | None, energy: float | None,
                     parameter: str) -> tuple[LoRAModuleWeights, float]:
    """``module`` as the best LoRA at ``rank`` (or ``energy``) and its relative error; a DoRA magnitude is kept (the
    update inside DoRA approximated); a bias change refused."""
    problem = _low_rank_problem(module, True)
    if problem:
        raise InvalidArgumentError(f"{parameter}: module {module_key!r} {problem}", parameter)
    shape = layer_shape(module_key, {module.weight_shape})
    if module.kind == "lora":
        up, down = _weighted_factors(module, 1.0)
        _refuse_non_finite(module_key, (up,), "its up factor times its scale", parameter, advice="")
        new_up, new_down, error, _ = low_rank_approximation(up, down, rank=rank, energy=energy,
                                                            module_key=module_key, parameter=parameter)
    else:
        plain = dataclasses.replace(module, dora_scale=None)
        new_up, new_down, error, _ = _best_factors(dense_change(plain, module_key=module_key, parameter=parameter),
                                                   rank, energy, module_key, parameter)
    lora = _as_module(new_up, new_down, shape)
    lora.dora_scale, lora.wd_on_output = module.dora_scale, module.wd_on_output
    return lora, error


def resize_adapter(state: AdapterState, rank: int | None = None, energy: float | None = None) -> BlendResult:
    """Each module as the optimal LoRA of rank ``rank`` (or the least rank holding ``energy`` of its squared
    singular values), with each module's relative error: LoRA from its factors, LoHa, LoKr and full diffs from their
    dense update; DoRA keeps its magnitude. Modules already small enough are kept exactly (to round-off)."""
    if (rank is None) == (energy is None):
        given = "neither" if rank is None else "both"
        raise InvalidArgumentError(f"rank or energy: resize needs exactly one of them, got {given}")
    modules, errors = {}, {}
    for module_key, module in state.modules.items():
        modules[module_key], errors[module_key] = _low_rank_module(module, module_key, rank, energy, "state")
    return BlendResult(AdapterState(modules=modules, metadata=dict(state.metadata), source_format="difflora"), errors)


def as_lora(state: AdapterState, rank: int | None, holds: Callable[[str, ModuleWeights], bool],
            target: str = "the target") -> BlendResult:
    """``state`` for ``target`` (a file format), which holds what ``holds(module_key, module)`` accepts: those modules
    as they are, every other one as the best LoRA at ``rank`` (a conv's k × k down, 1 × 1 up; a DoRA magnitude kept
    where the target then holds it), with the relative error of each module so turned.

    Raises:
        InvalidArgumentError: ``rank`` missing (or not positive) while a module needs it; a module the target cannot
        hold even as LoRA (DoRA where it holds none, a full diff's bias change), naming it.
    """
    modules, errors = {}, {}
    for module_key, module in state.modules.items():
        if holds(module_key, module):
            modules[module_key] = module
            continue
        problem = _low_rank_problem(module, True)  # a DoRA magnitude travels if the target holds it, see below
        if problem is None and module.kind != "lora" and (rank is None or rank <= 0):
            raise InvalidArgumentError(
                f"rank is required: module {module_key!r} is {module.kind}, which {target} holds only as LoRA by "
                f"SVD at that rank (a positive integer), got {rank}", "rank")
        if problem is None and module.kind != "lora":
            lora, error = _low_rank_module(module, module_key, rank, None, "state")
            if holds(module_key, lora):
                modules[module_key], errors[module_key] = lora, error
                continue
        kind = module.kind + (" with DoRA" if module.dora_scale is not None else "")
        problem = problem or (f"is {kind}, which {target} cannot hold" + (
            "; DoRA's change depends on the base model's weights, so it has no LoRA equivalent without them"
            if module.dora_scale is not None else ""))
        raise InvalidArgumentError(f"state: module {module_key!r} {problem}", "state")
    return BlendResult(AdapterState(modules=modules, metadata=dict(state.metadata), source_format=state.source_format,
                                   skipped=list(state.skipped)), errors)
