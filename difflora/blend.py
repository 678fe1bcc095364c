"""Blending, scaling and resizing adapters, exactly where exactness is possible and optimally where it is not.

Every adapter module is a low-rank product ``ΔW = s · B A``. A weighted blend ``Σ wᵢ ΔWᵢ`` is again such a product
with the factors side by side: ``[w₁s₁B₁ … wₙsₙBₙ] · [A₁; …; Aₙ]``. So:

* ``concat`` writes exactly that (rank = Σ rankᵢ). No cross terms, any ranks and alphas, modules present in only
  some adapters (PEFT's "linear" combination multiplies factors and needs equal ranks; see peft #1155).
* ``svd`` returns the best rank-``r`` approximation of the same sum (Eckart–Young), computed from the factors: QR of
  the stacked ``B`` (out × R) and of the stacked ``Aᵀ`` (in × R), then an SVD of the small R × R core. The d × k
  matrix is never formed, and each module's relative Frobenius error is reported.
* ``ties`` and ``dare`` act on whole weight deltas (they prune and sign-elect entries), so they use
  ``peft.utils.merge_utils`` on each module's ``ΔWᵢ`` and then take the best rank-``r`` factors of the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .adapter import AdapterState, LoRAModuleWeights
from .blocks import SD_UNET_BLOCKS, BlockWeights
from .errors import InvalidArgumentError, finite_number, first_line
from .lora import adapter_weight, fold_tucker_core

__all__ = ["BLEND_METHODS", "BlendResult", "blend", "scale_adapter", "resize_adapter", "low_rank_approximation"]

BLEND_METHODS = ("concat", "svd", "ties", "dare")


@dataclass
class BlendResult:
    """The blended adapter and, per module, the relative error ``‖ΔW_exact − ΔW_result‖_F / ‖ΔW_exact‖_F``."""

    state: AdapterState
    relative_errors: dict[str, float] = field(default_factory=dict)

    @property
    def max_relative_error(self) -> float:
        return max(self.relative_errors.values(), default=0.0)


def _weighted_factors(module: LoRAModuleWeights, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) as fp32 matrices with the weight and the scale folded into ``up``: ``ΔW·weight = up @ down`` with
    ``ΔW`` flattened to out × (in·kh·kw) for a conv. A Tucker core is folded into ``down`` (``mid ∘ down`` is a
    rank × in × kh × kw conv), which is exact at the same rank."""
    down = fold_tucker_core(module.down, module.mid).float()
    return module.up.float().flatten(1) * (weight * module.scale), down.flatten(1)


def _as_module(up: torch.Tensor, down: torch.Tensor, weight_shape: tuple[int, ...]) -> LoRAModuleWeights:
    """Matrix factors back in the layer's shapes (4-D for a conv), at scale 1 (``alpha = rank``)."""
    rank = down.shape[0]
    if len(weight_shape) == 4:
        down, up = down.reshape(rank, *weight_shape[1:]), up.reshape(weight_shape[0], rank, 1, 1)
    return LoRAModuleWeights(down=down.contiguous(), up=up.contiguous(), alpha=float(rank))


def _stacked(adapters: list[tuple[AdapterState, float]], module_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    ups, downs = [], []
    for state, weight in adapters:
        if module_key in state.modules:
            up, down = _weighted_factors(state.modules[module_key], weight)
            ups.append(up)
            downs.append(down)
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


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
    if energy is not None:
        if not 0.0 < energy <= 1.0:
            raise InvalidArgumentError(f"energy must be in (0, 1], got {energy}", parameter="energy")
        shares = torch.cumsum(singular**2, 0) / max(float((singular**2).sum()), 1e-300)
        rank = int(torch.searchsorted(shares, torch.tensor(energy, dtype=shares.dtype) - 1e-12).item()) + 1
    if rank is None or rank <= 0:
        raise InvalidArgumentError(f"rank must be a positive integer, got {rank}", parameter="rank")
    rank = min(rank, singular.numel())
    total = float(singular.norm())
    error = float(singular[rank:].norm()) / total if total > 0 else 0.0
    new_up = (q_up @ left[:, :rank]) * singular[:rank]
    new_down = (q_down @ right_t[:rank].t()).t()
    return new_up.float(), new_down.float(), error, singular


def _check_options(adapters: list[tuple[AdapterState, float]], method: str, rank: int | None, density: float) -> None:
    if not adapters:
        raise InvalidArgumentError("adapters must hold at least one (adapter, weight) pair, got none",
                                   parameter="adapters")
    for index, (state, weight) in enumerate(adapters):
        adapter_weight(weight, f"adapters: the weight of adapter {index + 1}", parameter="adapters")
        _refuse_other_kinds(state, "adapters", f"adapter {index + 1}'s ")
    if method not in BLEND_METHODS:
        raise InvalidArgumentError(f"method {method!r} is not one of {', '.join(BLEND_METHODS)}", parameter="method")
    if method != "concat" and (rank is None or rank <= 0):
        raise InvalidArgumentError(f"rank is required by method {method!r} (a positive integer), got {rank}",
                                   parameter="rank")
    if method in ("ties", "dare") and not 0.0 < finite_number(density, "density", parameter="density") <= 1.0:
        raise InvalidArgumentError(f"density must be in (0, 1], got {density}", parameter="density")


def _refuse_other_kinds(state: AdapterState, parameter: str, which: str = "") -> None:
    """:class:`InvalidArgumentError` naming the first module that is not a plain LoRA (LoHa, LoKr, a full diff, a
    DoRA magnitude): the maths here is that of ``s · B A``, and any other update rebuilt as such would be wrong."""
    for module_key, module in state.modules.items():
        if module.kind != "lora" or module.dora_scale is not None:
            kind = module.kind + ("+dora" if module.dora_scale is not None else "")
            raise InvalidArgumentError(
                f"{parameter}: {which}module {module_key!r} is a {kind} update; blend, scale and resize take LoRA "
                "factors only", parameter)


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


def _check_shapes(adapters: list[tuple[AdapterState, float]], module_key: str) -> tuple[int, ...]:
    """The shape of the weight every adapter's ``module_key`` changes; they must agree."""
    shapes = {s.modules[module_key].weight_shape for s, _ in adapters if module_key in s.modules}
    if len(shapes) > 1:
        raise InvalidArgumentError(
            f"adapters disagree on the shape of {module_key!r}: {sorted(shapes)} (other base models?)",
            parameter="adapters",
        )
    return shapes.pop()


def blend(
    adapters: list[tuple[AdapterState, float]],
    method: str = "concat",
    rank: int | None = None,
    density: float = 0.5,
) -> BlendResult:
    """``Σ weight · adapter`` as one adapter (see the module docstring for the methods).

    ``rank`` is required by ``svd``, ``ties`` and ``dare`` (the result's rank); ``density`` is the share of entries
    ``ties``/``dare`` keep. The result has scale 1 (``alpha = rank``) on every module.
    """
    _check_options(adapters, method, rank, density)
    module_keys = sorted({key for state, _ in adapters for key in state.modules})
    modules, errors = {}, {}
    for module_key in module_keys:
        weight_shape = _check_shapes(adapters, module_key)
        if method in ("concat", "svd"):
            up, down = _stacked(adapters, module_key)
            _refuse_non_finite(module_key, (up,), "its weighted up factor", "adapters")
            if method == "svd":
                up, down, errors[module_key], _ = low_rank_approximation(
                    up, down, rank=rank, module_key=module_key, parameter="adapters")
            else:
                errors[module_key] = 0.0
        else:
            up, down, errors[module_key] = _merge_full(adapters, module_key, method, rank, density)
        _refuse_non_finite(module_key, (up, down), "the blend", "adapters")
        modules[module_key] = _as_module(up, down, weight_shape)
    metadata = {"difflora.blend": f"{method}" + (f", rank {rank}" if rank else "")}
    return BlendResult(AdapterState(modules=modules, metadata=metadata, source_format="difflora"), errors)


def _merge_full(adapters, module_key: str, method: str, rank: int, density: float):
    """TIES/DARE via PEFT on full deltas, then the best rank-``rank`` factors; error is against the merged delta."""
    from peft.utils import merge_utils

    deltas, weights = [], []
    for state, weight in adapters:
        if module_key in state.modules:
            up, down = _weighted_factors(state.modules[module_key], 1.0)
            deltas.append(up @ down)
            weights.append(weight)
    weight_tensor = torch.tensor(weights, dtype=torch.float32)
    if method == "ties":
        merged = merge_utils.ties(deltas, weight_tensor, density)
    else:
        merged = merge_utils.dare_linear(deltas, weight_tensor, density)
    # Before the SVD: LAPACK fails on NaN or inf (after printing its own error), and finite factors can still have
    # a product or a weighted sum past float32.
    _refuse_non_finite(module_key, (merged,), f"its {method} merge", "adapters")
    left, singular, right_t = _svd(merged.double(), module_key, "adapters")
    rank = min(rank, singular.numel())
    total = float(singular.norm())
    error = float(singular[rank:].norm()) / total if total > 0 else 0.0
    return (left[:, :rank] * singular[:rank]).float(), right_t[:rank].float(), error


def scale_adapter(state: AdapterState, weight: float = 1.0, block_weights: BlockWeights | None = None) -> AdapterState:
    """The adapter with every module's ``up`` multiplied by ``weight`` × its block weight: a file that behaves at
    weight 1 as the original did at that weight.

    The product is computed in fp32 and cast once to the factor's dtype, so a half-precision factor loses no more
    than one rounding; one that no longer fits its dtype becomes inf, which writing refuses. Without a model, the
    per-block names must be blocks an SD or SDXL UNet has (:data:`~difflora.blocks.SD_UNET_BLOCKS`).
    """
    weight = adapter_weight(weight)
    block_weights = block_weights or BlockWeights()
    block_weights.check_blocks(SD_UNET_BLOCKS, "an SD or SDXL UNet")
    _refuse_other_kinds(state, "state")
    modules = {}
    for module_key, module in state.modules.items():
        component, _, path = module_key.partition(".")
        factor = weight * block_weights.factor(component, path)
        modules[module_key] = LoRAModuleWeights(
            module.down.clone(), (module.up.float() * factor).to(module.up.dtype), module.alpha, module.use_rslora,
            mid=module.mid.clone() if module.mid is not None else None,
        )
    return AdapterState(modules=modules, metadata=dict(state.metadata), source_format=state.source_format)


def resize_adapter(state: AdapterState, rank: int | None = None, energy: float | None = None) -> BlendResult:
    """Each module at rank ``rank`` (or the least rank holding ``energy`` of its squared singular values), the
    optimal factors of that rank, with each module's relative error. Modules already small enough are kept exactly."""
    if (rank is None) == (energy is None):
        given = "neither" if rank is None else "both"
        raise InvalidArgumentError(f"rank or energy: resize needs exactly one of them, got {given}")
    _refuse_other_kinds(state, "state")
    modules, errors = {}, {}
    for module_key, module in state.modules.items():
        up, down = _weighted_factors(module, 1.0)
        _refuse_non_finite(module_key, (up,), "its up factor times its scale", "state", advice="")
        new_up, new_down, errors[module_key], _ = low_rank_approximation(
            up, down, rank=rank, energy=energy, module_key=module_key, parameter="state")
        modules[module_key] = _as_module(new_up, new_down, module.weight_shape)
    return BlendResult(AdapterState(modules=modules, metadata=dict(state.metadata), source_format="difflora"), errors)
