"""A new trainable adapter: what it is made of (:class:`AdapterOptions`), which layers it adapts, how it starts.

Torch only (no diffusers import): :func:`target_layer_paths` finds layers by their module classes, and
:func:`initial_module` makes one layer's :mod:`difflora.adapter` weights as each algorithm's reference starts them, so
that a new adapter changes nothing (``ΔW = 0``). :meth:`~difflora.runtime.LoRARuntime.create_adapter` puts them on a
pipeline; training's options (``difflora.train.config``) and the web UI's training tab take their defaults and help
from :class:`AdapterOptions`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapter import LoHaModuleWeights, LoKrModuleWeights, LoRAModuleWeights, ModuleWeights
from .errors import InvalidArgumentError, finite_number
from .lora import INITIALISATIONS, initial_factors, lora_scale
from .lycoris import initial_loha, initial_lokr, initial_magnitude

__all__ = ["ALGORITHMS", "AdapterOptions", "KOHYA_TARGET_CLASSES", "TARGETS", "initial_module", "target_layer_paths"]

TARGETS = ("attention", "transformer", "all")
ALGORITHMS = ("lora", "loha", "lokr")
# kohya-ss/sd-scripts networks/lora.py: the module classes in which every Linear and Conv2d is adapted.
# "transformer" is its default (UNET_TARGET_REPLACE_MODULE and TEXT_ENCODER_TARGET_REPLACE_MODULE); "all" adds
# UNET_TARGET_REPLACE_MODULE_CONV2D_3X3, its LoCon (resnet convs, time_emb_proj, conv_shortcut, sampler convs).
KOHYA_TARGET_CLASSES = {
    "transformer": ("Transformer2DModel", "CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"),
    "all": ("ResnetBlock2D", "Downsample2D", "Upsample2D"),
}


def _described(default, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class AdapterOptions:
    """What :meth:`~difflora.runtime.LoRARuntime.create_adapter` makes: the algorithm, the layers and their sizes,
    and the start. Each field's ``help`` is what ``difflora train --help`` and the web UI's training tab show.

    Linear layers and 1 × 1 convs get ``rank``/``alpha``; k × k convs (``targets="all"``) ``conv_rank``/
    ``conv_alpha``, by default the same rank and scale. The start (``init="zeros"``) is each algorithm's reference:
    LoRA a Gaussian ``down`` and a zero ``up`` (kohya and PEFT: zero ``up``); LoHa and LoKr as LyCORIS' modules
    (``w2a`` zero; ``w2`` or ``w2b`` zero); DoRA's magnitude the weight's norm per output row. Each is ``ΔW = 0``.
    """

    rank: int = _described(4, "rank of each update (LoRA, LoHa; LoKr: of w2 when it is factorised)")
    alpha: float | None = _described(None, "alpha: the update is scaled by alpha/rank (default: rank, i.e. scale 1)")
    targets: str = _described(
        "attention", "layers to adapt: attention (the attention projections); transformer (kohya's default: every "
        "Linear of the transformer blocks, and the text encoder's attention and MLP when it trains); all (also the "
        "resnet and sampler convs: LoCon)", TARGETS)
    conv_rank: int | None = _described(None, "rank of the 3×3 convs with --targets all (default: rank)")
    conv_alpha: float | None = _described(
        None, "alpha of the 3×3 convs with --targets all (default: the scale alpha/rank of the other layers)")
    algo: str = _described("lora", "algorithm: lora (LoCon on convs), loha (Hadamard product), lokr (Kronecker "
                           "product); LoHa and LoKr files are written in kohya's layout (LyCORIS keys)",
                           ALGORITHMS)
    dora: bool = _described(False, "DoRA: also train a magnitude per output row (weight-decomposed adapter)")
    lokr_factor: int = _described(-1, "LoKr: split each side as LyCORIS' factorization(dim, factor) (-1: most "
                                      "balanced)")
    use_rslora: bool = _described(False, "rsLoRA scaling alpha/sqrt(rank) (algo lora)")
    init: str = _described("zeros", "zeros: each algorithm's start, ΔW = 0 (training); random: an update that "
                                    "changes the output (tests, benchmarks)", INITIALISATIONS)
    seed: int | None = _described(None, "seed of the random factors (default: torch's global generator)")
    components: tuple[str, ...] = _described(("unet",), "pipeline components that get the adapter")

    def validate(self) -> None:
        """Raise :class:`InvalidArgumentError` naming the option when a value cannot be used or has no effect."""
        for option in ("rank", "conv_rank"):
            value = getattr(self, option)
            if (value is not None or option == "rank") and (type(value) is not int or value <= 0):
                raise InvalidArgumentError(f"{option} must be a positive integer, got {value!r}", option)
        for option in ("alpha", "conv_alpha"):
            if getattr(self, option) is not None and finite_number(getattr(self, option), option, option) == 0:
                raise InvalidArgumentError(f"{option} must not be 0 (the update would be scaled by 0)", option)
        for option, choices in (("targets", TARGETS), ("algo", ALGORITHMS), ("init", INITIALISATIONS)):
            if getattr(self, option) not in choices:
                raise InvalidArgumentError(
                    f"{option} must be one of {', '.join(choices)}, got {getattr(self, option)!r}", option)
        if type(self.lokr_factor) is not int or not (self.lokr_factor == -1 or self.lokr_factor > 0):
            raise InvalidArgumentError(f"lokr_factor must be -1 or a positive integer, got {self.lokr_factor!r}",
                                       "lokr_factor")
        # An option that would change nothing is refused rather than ignored.
        for option, default, needs, applies in (("conv_rank", None, "targets all", self.targets == "all"),
                                                ("conv_alpha", None, "targets all", self.targets == "all"),
                                                ("lokr_factor", -1, "algo lokr", self.algo == "lokr"),
                                                ("use_rslora", False, "algo lora", self.algo == "lora")):
            if getattr(self, option) != default and not applies:
                raise InvalidArgumentError(f"{option} applies with {needs} only (targets {self.targets}, algo "
                                           f"{self.algo})", option)

    def rank_and_alpha(self, weight_shape: tuple[int, ...]) -> tuple[int, float]:
        """The rank and alpha of the update of a weight of ``weight_shape``: ``conv_rank``/``conv_alpha`` for a
        k × k conv, ``rank``/``alpha`` for the rest. The default conv alpha keeps the other layers' scale."""
        alpha = float(self.alpha if self.alpha is not None else self.rank)
        if len(weight_shape) < 4 or tuple(weight_shape[2:]) == (1, 1):
            return self.rank, alpha
        rank = self.conv_rank or self.rank
        if self.conv_alpha is not None:
            return rank, float(self.conv_alpha)
        scale = lora_scale(self.rank, alpha, self.use_rslora)
        return rank, scale * (math.sqrt(rank) if self.use_rslora else rank)


def target_layer_paths(model: nn.Module, targets: str) -> list[str]:
    """The paths in ``model`` of every Linear and Conv2d inside a module of kohya's target classes for ``targets``
    (``transformer`` or ``all``; :data:`KOHYA_TARGET_CLASSES`), in the model's order, each once: what kohya's
    ``create_modules`` adapts."""
    classes = {*KOHYA_TARGET_CLASSES["transformer"], *(KOHYA_TARGET_CLASSES["all"] if targets == "all" else ())}
    found = {}
    for path, module in model.named_modules():
        if type(module).__name__ in classes:
            for child, layer in module.named_modules():
                if isinstance(layer, (nn.Linear, nn.Conv2d)):
                    found[f"{path}.{child}"] = None
    return list(found)


def initial_module(
    weight_shape: tuple[int, ...], options: AdapterOptions, generator: torch.Generator | None = None,
    weight: torch.Tensor | None = None,
) -> ModuleWeights:
    """One new module of ``options.algo`` for a weight of ``weight_shape``, as the algorithm's reference starts it
    (lora: :func:`~difflora.lora.initial_factors`, a k × k down and a 1 × 1 up on a conv; loha, lokr:
    :func:`~difflora.lycoris.initial_loha`, :func:`~difflora.lycoris.initial_lokr`), with ``options.dora`` a
    magnitude from the layer's ``weight`` (:func:`~difflora.lycoris.initial_magnitude`)."""
    rank, alpha = options.rank_and_alpha(weight_shape)
    if options.algo == "lora":
        down, up = initial_factors(rank, math.prod(weight_shape[1:]), weight_shape[0], options.init, generator)
        if len(weight_shape) == 4:
            down, up = down.reshape(rank, *weight_shape[1:]), up[:, :, None, None]
        module = LoRAModuleWeights(down, up, alpha, options.use_rslora)
    elif options.algo == "loha":
        module = LoHaModuleWeights(alpha=alpha, **initial_loha(weight_shape, rank, options.init, generator))
    else:
        tensors = initial_lokr(weight_shape, rank, options.lokr_factor, options.init, generator)
        module = LoKrModuleWeights(alpha=alpha if "w2a" in tensors else None, **tensors)
    if options.dora:
        if weight is None:
            raise InvalidArgumentError("weight is needed for a DoRA magnitude (options.dora)", "weight")
        module.dora_scale = initial_magnitude(weight)
    return module
