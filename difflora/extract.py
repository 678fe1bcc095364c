"""A LoRA (LoCon) from the difference of two models: ``tuned − base``, layer by layer, as its best low-rank factors.

For every Linear and Conv2d whose weight differs, ``ΔW = W_tuned − W_base`` (fp32, on the device asked for) is
flattened to out × in·kh·kw and cut to its best rank-``r`` factors ``ΔW ≈ U_r Σ_r V_rᵀ`` (Eckart–Young), written
as a LoRA at scale 1 (``up = U_r Σ_r``, ``down = V_rᵀ``; a conv's ``down`` keeps the kernel, its ``up`` is 1 × 1),
with each layer's relative Frobenius error ``‖ΔW − up·down‖ / ‖ΔW‖``.

Which layers, as kohya's ``networks/extract_lora_from_models.py`` decides: Linears and 1 × 1 convs at ``rank``;
k × k convs (resnets, samplers, ``conv_in``/``conv_out``) at ``conv_rank``, and without it not at all (kohya: "if
conv_dim is None, diffs do not include LoRAs for conv2d-3x3"; ComfyUI's LoraSave takes every layer at one rank).
Unlike both, nothing is clamped to a quantile (which makes the factors worse than optimal), and whatever differs
but is not extracted (k × k convs without ``conv_rank``, biases, norms, embeddings) is listed, never dropped silently.

The factors come from a randomized SVD (``torch.svd_lowrank``, Halko et al. 2011) where it is much cheaper than a
full one, with subspace iterations enough to keep its error within 0.4% of the optimum on SD 1.5's layers at a
twentieth of the time (``bench/bench_extract.py`` measures both); the error reported is always measured on the
factors written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from .adapter import AdapterState, LoRAModuleWeights
from .errors import InvalidArgumentError
from .keys import join_module_key

__all__ = ["SVD_METHODS", "ExtractOptions", "ExtractResult", "extract_lora", "layer_low_rank", "layer_weights"]

SVD_METHODS = ("auto", "full", "lowrank")

# svd_lowrank's sketch: rank + OVERSAMPLE columns and NITER subspace iterations. On SD 1.5's layers (bench/
# bench_extract.py --per-shape: a rank-16 change plus 5% noise, extracted at rank 32) its error was at most 1.0035×
# the full SVD's, in 0.05× the time; on a spectrum with no gap at all, 1.00006× (2 iterations: 1.0017×, none: 1.12×,
# tests/test_extract.py). "auto" takes it where the sketch is at most a quarter of the smaller side; below, the full
# SVD costs as little.
OVERSAMPLE = 10
NITER = 4


@dataclass
class ExtractOptions:
    """How ``difflora extract`` turns the difference of two models into a LoRA; each field's help is its flag's."""

    rank: int = field(metadata={"help": "rank of every Linear and 1×1 conv LoRA"})
    conv_rank: int | None = field(default=None, metadata={
        "help": "rank of the k×k convs' LoRA (LoCon); without it they are not extracted, as in kohya's script"})
    device: str = field(default="cpu", metadata={"help": "where the SVDs run (cpu, cuda, …)"})
    svd: str = field(default="auto", metadata={
        "help": "full: LAPACK's SVD of every layer; lowrank: torch.svd_lowrank; auto: lowrank where it is cheaper"})
    min_difference: float = field(default=0.0, metadata={
        "help": "a layer whose largest |ΔW| is at most this is taken as unchanged"})

    def validate(self) -> None:
        for name in ("rank", "conv_rank"):
            value = getattr(self, name)
            if (value is not None or name == "rank") and (not isinstance(value, int) or value <= 0):
                raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}", name)
        if self.svd not in SVD_METHODS:
            raise InvalidArgumentError(f"svd must be one of {', '.join(SVD_METHODS)}, got {self.svd!r}", "svd")
        if not (isinstance(self.min_difference, (int, float)) and 0 <= self.min_difference < math.inf):
            raise InvalidArgumentError(f"min_difference must be a finite number ≥ 0, got {self.min_difference!r}",
                                       "min_difference")

    @classmethod
    def help_of(cls, name: str) -> str:
        return next(f.metadata["help"] for f in fields(cls) if f.name == name)


@dataclass
class ExtractResult:
    """The extracted adapter, each layer's relative error, and what differs but was not extracted."""

    state: AdapterState
    relative_errors: dict[str, float] = field(default_factory=dict)
    not_extracted: list[str] = field(default_factory=list)
    squared_norms: dict[str, tuple[float, float]] = field(default_factory=dict)  # key → (‖ΔW‖², ‖error‖²)

    @property
    def overall_error(self) -> float:
        """``‖error‖ / ‖ΔW‖`` over every extracted layer together."""
        total = sum(change for change, _ in self.squared_norms.values())
        return math.sqrt(sum(error for _, error in self.squared_norms.values()) / total) if total > 0 else 0.0


def layer_low_rank(delta: torch.Tensor, rank: int, svd: str = "auto") -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(up, down, relative_error)``: factors of the matrix ``delta`` (fp32) at ``rank`` and their measured
    relative Frobenius error; ``svd`` as :class:`ExtractOptions` says."""
    rows, columns = delta.shape
    rank = min(rank, rows, columns)
    sketch = rank + OVERSAMPLE
    if svd == "lowrank" or (svd == "auto" and 4 * sketch <= min(rows, columns)):
        left, singular, right = torch.svd_lowrank(delta, q=min(sketch, rows, columns), niter=NITER)
        up, down = left[:, :rank] * singular[:rank], right[:, :rank].t()
    else:
        left, singular, right_t = torch.linalg.svd(delta, full_matrices=False)
        up, down = left[:, :rank] * singular[:rank], right_t[:rank]
    total = float(delta.norm())
    error = float((delta - up @ down).norm()) / total if total > 0 else 0.0
    return up.contiguous(), down.contiguous(), error


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear and Conv2d of ``model`` by its path (a text encoder's without ``text_model.``)."""
    return {name.removeprefix("text_model."): module for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d)) and name}


def layer_weights(components: Mapping[str, nn.Module], module_keys) -> dict[str, torch.Tensor]:
    """The weight of each layer ``module_keys`` name (``unet.….to_q``, ``text_encoder.….mlp.fc1``) in
    ``components``, or :class:`InvalidArgumentError` (``model``) naming the first the model does not have."""
    layers = {component: _layers(model) for component, model in components.items()}
    found = {}
    for module_key in module_keys:
        component, _, path = module_key.partition(".")
        layer = layers.get(component, {}).get(path)
        if layer is None:
            raise InvalidArgumentError(f"model has no layer {module_key!r} (an adapter for another model?)", "model")
        found[module_key] = layer.weight.detach()
    return found


def _differs(base: torch.Tensor, tuned: torch.Tensor, min_difference: float) -> bool:
    if min_difference == 0:
        return not torch.equal(base, tuned)
    return float((tuned.float() - base.float()).abs().max()) > min_difference


def _check_same_architecture(component: str, base: nn.Module, tuned: nn.Module) -> None:
    base_shapes = {name: tuple(p.shape) for name, p in base.named_parameters()}
    tuned_shapes = {name: tuple(p.shape) for name, p in tuned.named_parameters()}
    for name in sorted(base_shapes.keys() | tuned_shapes.keys()):
        if base_shapes.get(name) != tuned_shapes.get(name):
            raise InvalidArgumentError(
                f"tuned: {component}.{name} is {tuned_shapes.get(name, 'missing')} in the tuned model and "
                f"{base_shapes.get(name, 'missing')} in the base model: not the same architecture", "tuned")


def _as_lora(up: torch.Tensor, down: torch.Tensor, shape: tuple[int, ...]) -> LoRAModuleWeights:
    rank = down.shape[0]
    if len(shape) == 4:
        down, up = down.reshape(rank, *shape[1:]), up.reshape(shape[0], rank, 1, 1)
    return LoRAModuleWeights(down=down.cpu().contiguous(), up=up.cpu().contiguous(), alpha=float(rank))


def extract_lora(base: Mapping[str, nn.Module], tuned: Mapping[str, nn.Module],
                 options: ExtractOptions) -> ExtractResult:
    """The LoRA of ``tuned − base`` (see the module docstring), components by name (``unet``, ``text_encoder``,
    ``text_encoder_2``); both must hold the same components of the same architecture.

    Raises:
        InvalidArgumentError: bad options (naming the field), other components or shapes (``tuned``), or two models
        that do not differ at all (``tuned``).
    """
    options.validate()
    if set(base) != set(tuned):
        raise InvalidArgumentError(f"tuned: the models hold other components ({sorted(tuned)} and {sorted(base)})",
                                   "tuned")
    device = torch.device(options.device)
    modules, result = {}, ExtractResult(AdapterState(modules={}))
    for component in base:
        _check_same_architecture(component, base[component], tuned[component])
        base_layers, tuned_layers = _layers(base[component]), _layers(tuned[component])
        covered = set()
        for path, base_layer in base_layers.items():
            tuned_layer = tuned_layers[path]
            covered.add(id(tuned_layer.weight))
            if not _differs(base_layer.weight, tuned_layer.weight, options.min_difference):
                continue
            key = join_module_key(component, path)
            shape = tuple(base_layer.weight.shape)
            rank = options.conv_rank if len(shape) == 4 and shape[2:] != (1, 1) else options.rank
            if rank is None:
                result.not_extracted.append(f"{key}.weight")
                continue
            with torch.no_grad():
                delta = (tuned_layer.weight.to(device, torch.float32) - base_layer.weight.to(device, torch.float32))
                up, down, error = layer_low_rank(delta.flatten(1), rank, options.svd)
            modules[key] = _as_lora(up, down, shape)
            result.relative_errors[key] = error
            change = float(delta.norm()) ** 2
            result.squared_norms[key] = (change, change * error**2)
        base_parameters = dict(base[component].named_parameters())
        for name, parameter in tuned[component].named_parameters():
            if id(parameter) not in covered and _differs(base_parameters[name], parameter, options.min_difference):
                result.not_extracted.append(f"{component}.{name.removeprefix('text_model.')}")
    if not modules:
        raise InvalidArgumentError(
            "tuned: no Linear or Conv2d weight differs from the base model's" + (
                f" (only {len(result.not_extracted)} tensors the options leave out, e.g. {result.not_extracted[0]})"
                if result.not_extracted else "; nothing to extract"), "tuned")
    result.state = AdapterState(modules=dict(sorted(modules.items())), metadata={
        "difflora.extract": f"rank {options.rank}" + (f", conv rank {options.conv_rank}" if options.conv_rank else "")
    }, source_format="difflora")
    return result
