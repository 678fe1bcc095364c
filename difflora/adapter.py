"""The in-memory adapter every room passes around: per adapted layer, its factors and alpha, plus metadata.

Files in any dialect are read into an :class:`AdapterState` and written from one (``difflora.formats``); the runtime
loads one into a pipeline and saves one back; blending, scaling and resizing map states to states. Module keys are
the canonical ``<component>.<layer path>`` of :mod:`difflora.keys`.
"""

from __future__ import annotations

import collections
import math
import re
from dataclasses import dataclass, field

import torch

from .keys import layer_name, split_module_key
from .lora import lora_delta, lora_scale
from .lycoris import loha_delta, lokr_delta

__all__ = [
    "AdapterState",
    "FullModuleWeights",
    "LoHaModuleWeights",
    "LoKrModuleWeights",
    "LoRAModuleWeights",
    "ModuleWeights",
    "dora_problem",
    "factor_shape_problem",
    "skipped_kinds",
]


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
    dora_scale: torch.Tensor | None = None  # DoRA's magnitude (see difflora.lycoris.dora_weight)
    wd_on_output: bool = True  # DoRA's norm per output row (True) or per input column

    kind = "lora"

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
        return dora_problem(self)


def dora_problem(module) -> str | None:
    """What is wrong with a module's DoRA magnitude: its shape (out × 1… per output row, 1 × in × 1… per input
    column, as ``wd_on_output`` says) or its values (finite)."""
    scale = module.dora_scale
    if scale is None:
        return None
    out_features, in_features = module.weight_shape[0], module.weight_shape[1]
    expected = out_features if module.wd_on_output else in_features
    axis = 0 if module.wd_on_output else 1
    if not scale.is_floating_point() or scale.numel() != expected or (scale.ndim > 1 and scale.shape[axis] != expected):
        side = "output" if module.wd_on_output else "input"
        return f"has a DoRA magnitude of shape {tuple(scale.shape)}, expected one value per {side} ({expected})"
    if not _holds_only_finite_values(scale):
        return "holds NaN or inf values in its DoRA magnitude"
    return None


def _problem_of(tensors: dict[str, torch.Tensor | None], alpha: float | None) -> str | None:
    """The checks every kind shares: floating-point, non-empty, finite tensors and a finite non-zero alpha."""
    present = {name: tensor for name, tensor in tensors.items() if tensor is not None}
    for name, tensor in present.items():
        if not tensor.is_floating_point():
            return f"has {name} of type {tensor.dtype}, expected floating point"
        if tensor.numel() == 0:
            return f"has an empty {name} of shape {tuple(tensor.shape)}"
    if alpha is not None and not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha != 0):
        return f"has alpha {alpha!r}, expected a finite non-zero number"
    if not all(_holds_only_finite_values(tensor) for tensor in present.values()):
        return "holds NaN or inf values"
    return None


@dataclass
class LoHaModuleWeights:
    """One layer's LoHa update (LyCORIS ``hada_*`` keys): ``ΔW = s · (w1a w1b) ⊙ (w2a w2b)`` (see
    :mod:`difflora.lycoris`). Without Tucker cores the shape is the matrix view out × in·kh·kw, which the runtime
    gives the layer's own shape."""

    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    alpha: float | None = None
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None
    wd_on_output: bool = True

    kind = "loha"
    use_rslora = False

    @property
    def rank(self) -> int:
        return self.w1b.shape[0]

    @property
    def scale(self) -> float:
        return lora_scale(self.rank, self.alpha if self.alpha is not None else self.rank)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.t1 is not None:
            return (self.w1a.shape[1], self.w1b.shape[1], *self.t1.shape[2:])
        return (self.w1a.shape[0], self.w1b.shape[1])

    def tensors(self) -> dict[str, torch.Tensor | None]:
        return {"w1a": self.w1a, "w1b": self.w1b, "w2a": self.w2a, "w2b": self.w2b, "t1": self.t1, "t2": self.t2}

    def delta_weight(self) -> torch.Tensor:
        return loha_delta(self.w1a, self.w1b, self.w2a, self.w2b, self.t1, self.t2, self.scale, self.weight_shape)

    def problem(self) -> str | None:
        tucker = self.t1 is not None
        if tucker != (self.t2 is not None) or any(t.ndim < 2 for t in (self.w1a, self.w1b, self.w2a, self.w2b)):
            return "has LoHa factors that do not fit together (two matrix pairs, and both Tucker cores or none)"
        pairs = ((self.w1a, self.w1b), (self.w2a, self.w2b))
        if tucker:
            fits = all(a.ndim == 2 and b.ndim == 2 and a.shape[0] == b.shape[0] == self.rank for a, b in pairs)
            fits = fits and all(t.ndim == 4 and tuple(t.shape[:2]) == (self.rank,) * 2 for t in (self.t1, self.t2))
        else:
            fits = all(a.ndim == 2 and a.shape[1] == b.shape[0] == self.rank for a, b in pairs)
            fits = fits and self.w1a.shape[0] == self.w2a.shape[0] and self.w1b[0].numel() == self.w2b[0].numel()
        if not fits:
            shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in self.tensors().items() if t is not None)
            return f"has LoHa factors whose shapes do not fit together ({shapes})"
        return _problem_of(self.tensors(), self.alpha) or dora_problem(self)


@dataclass
class LoKrModuleWeights:
    """One layer's LoKr update (LyCORIS ``lokr_*`` keys): ``ΔW = s · w1 ⊗ w2``, each side whole or factorised (see
    :mod:`difflora.lycoris`). Without a kernel in ``w2`` the shape is the matrix view out × in·kh·kw."""

    w1: torch.Tensor | None = None
    w1a: torch.Tensor | None = None
    w1b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2a: torch.Tensor | None = None
    w2b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None
    wd_on_output: bool = True

    kind = "lokr"
    use_rslora = False

    def _left(self) -> tuple[int, int]:
        return tuple(self.w1.shape) if self.w1 is not None else (self.w1a.shape[0], self.w1b.shape[1])

    def _right(self) -> tuple[int, ...]:
        if self.w2 is not None:
            return tuple(self.w2.shape)
        if self.t2 is not None:
            return (self.w2a.shape[1], self.w2b.shape[1], *self.t2.shape[2:])
        return (self.w2a.shape[0], self.w2b[0].numel())

    @property
    def rank(self) -> int:
        factorised = self.w2b if self.w2 is None else (self.w1b if self.w1 is None else None)  # as LoKrFactors
        return factorised.shape[0] if factorised is not None else 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank and self.alpha is not None else 1.0

    @property
    def weight_shape(self) -> tuple[int, ...]:
        (a, b), right = self._left(), self._right()
        return (a * right[0], b * right[1], *right[2:])

    def tensors(self) -> dict[str, torch.Tensor | None]:
        return {"w1": self.w1, "w1a": self.w1a, "w1b": self.w1b, "w2": self.w2, "w2a": self.w2a, "w2b": self.w2b,
                "t2": self.t2}

    def delta_weight(self) -> torch.Tensor:
        return lokr_delta(self.w1, self.w1a, self.w1b, self.w2, self.w2a, self.w2b, self.t2, self.scale,
                          self.weight_shape)

    def problem(self) -> str | None:
        sides_whole = (self.w1 is not None, self.w2 is not None)
        pairs_given = (self.w1a is not None and self.w1b is not None, self.w2a is not None and self.w2b is not None)
        if not all(whole != pair for whole, pair in zip(sides_whole, pairs_given)):
            return "has LoKr factors that do not fit together (each side whole, lokr_wN, or a pair lokr_wN_a/_b)"
        try:
            self.weight_shape
            fits = (self.w1 is not None or self.w1a.shape[1] == self.w1b.shape[0]) and (
                self.w2 is not None or (self.w2a.shape[0 if self.t2 is not None else 1] == self.w2b.shape[0]))
        except (IndexError, AttributeError):
            fits = False
        if not fits:
            shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in self.tensors().items() if t is not None)
            return f"has LoKr factors whose shapes do not fit together ({shapes})"
        return _problem_of(self.tensors(), self.alpha if self.rank else None) or dora_problem(self)


@dataclass
class FullModuleWeights:
    """One layer's full update (LyCORIS ``diff`` and ``diff_b``): the weight change and the bias change."""

    diff: torch.Tensor
    diff_b: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None
    wd_on_output: bool = True

    kind = "full"
    use_rslora = False
    alpha = 1.0
    rank = 0
    scale = 1.0

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.diff.shape)

    def tensors(self) -> dict[str, torch.Tensor | None]:
        return {"diff": self.diff, "diff_b": self.diff_b}

    def delta_weight(self) -> torch.Tensor:
        return self.diff.float()

    def problem(self) -> str | None:
        bias_fits = self.diff_b is None or tuple(self.diff_b.shape) == self.diff.shape[:1]
        if self.diff.ndim not in (2, 4) or not bias_fits:
            bias = f" and diff_b {tuple(self.diff_b.shape)}" if self.diff_b is not None else ""
            return f"has a full diff of shape {tuple(self.diff.shape)}{bias}, expected a weight's shape and its bias'"
        return _problem_of(self.tensors(), None) or dora_problem(self)


ModuleWeights = LoRAModuleWeights | LoHaModuleWeights | LoKrModuleWeights | FullModuleWeights
"""One adapted layer's update, of any kind difflora applies."""


@dataclass
class AdapterState:
    """An adapter as data: canonical module key → factors, plus the string metadata that travels with the file.

    ``skipped`` lists the keys of the file that hold nothing difflora can apply (norm diffs, OFT, names of no known
    layer, ...): they are reported, never silently dropped.
    """

    modules: dict[str, ModuleWeights]
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
        """The ranks of the low-rank modules (full diffs and LoKr without a factorised side have none)."""
        return sorted({weights.rank for weights in self.modules.values() if weights.rank})

    def layer_kinds(self) -> dict[str, dict[str, int]]:
        """Per component, how many modules adapt each kind of layer: ``linear``, ``conv 1x1``, ``conv 3x3``, …
        (as far as the file tells: LoHa/LoKr without a kernel hold a conv's weight as a matrix)."""
        found: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for module_key, weights in self.modules.items():
            shape = weights.weight_shape
            kind = f"conv {shape[2]}x{shape[3]}" if len(shape) == 4 else "linear"
            found[module_key.split(".", 1)[0]][kind] += 1
        return {component: dict(sorted(counts.items())) for component, counts in sorted(found.items())}

    def alphas(self) -> list[float]:
        return sorted({weights.alpha for weights in self.modules.values() if weights.alpha is not None})

    def kinds(self) -> list[str]:
        """The algorithms of the modules (``lora``, ``loha``, ``lokr``, ``full``), DoRA as ``+dora``: sorted."""
        return sorted({weights.kind + ("+dora" if weights.dora_scale is not None else "")
                       for weights in self.modules.values()})

    def targets(self) -> dict[str, list[str]]:
        """The layers adapted in each component by their name within a block (:func:`~difflora.keys.layer_name`),
        sorted: ``{"unet": ["conv1", "ff.net.0.proj", "to_k", …], …}``."""
        found: dict[str, set[str]] = collections.defaultdict(set)
        for module_key in self.modules:
            component, path = split_module_key(module_key)
            found[component].add(layer_name(path))
        return {component: sorted(names) for component, names in sorted(found.items())}

    def lora_only_problem(self, target: str) -> str | None:
        """Why ``target`` (a format holding LoRA and PEFT's DoRA only: diffusers files, PEFT folders) cannot take this
        adapter, the first module it cannot hold named: one of another kind, a DoRA magnitude per input column (PEFT's
        is per output row), or a component with DoRA on some modules only (PEFT's ``use_dora`` is one switch per
        LoraConfig, one config per component); ``None`` when it holds every module."""
        first_of_component: dict[str, tuple[str, bool]] = {}
        for module_key, weights in self.modules.items():
            dora = weights.dora_scale is not None
            if weights.kind != "lora":
                kind = weights.kind + (" with DoRA" if dora else "")
                return (f"module {module_key!r} is {kind}, and {target} holds LoRA and DoRA only "
                        "(kohya files keep every kind: --to kohya)")
            if dora and not weights.wd_on_output:
                return (f"module {module_key!r} has a DoRA magnitude per input column, and {target} holds DoRA per "
                        "output row only (kohya files keep it: --to kohya)")
            first_key, first_dora = first_of_component.setdefault(module_key.partition(".")[0], (module_key, dora))
            if dora != first_dora:
                plain, with_dora = (first_key, module_key) if dora else (module_key, first_key)
                return (f"module {plain!r} has no DoRA magnitude and {with_dora!r} has one, and {target} holds DoRA "
                        "on every module of a component or none (kohya files keep both: --to kohya)")
        return None

    def skipped_summary(self, limit: int = 5) -> str:
        """:attr:`skipped` in one line, by what the keys are (:func:`skipped_kinds`), each kind with its count and
        first key, at most ``limit`` kinds: ``12 keys difflora cannot apply: oft ×8 (lora_unet_….oft_blocks, …),
        unknown layer ×4 (lora_unet_….lora_down.weight, …)``."""
        count = len(self.skipped)
        kinds = skipped_kinds(self.skipped)
        listed = [f"{kind} ×{len(keys)} ({keys[0]}{', …' if len(keys) > 1 else ''})"
                  for kind, keys in list(kinds.items())[:limit]]
        if len(kinds) > limit:
            listed.append(f"{len(kinds) - limit} more kinds")
        return f"{count} key{'s' if count != 1 else ''} difflora cannot apply: {', '.join(listed)}"


# What a skipped key is, by its own name, checked in this order over every key of its module: algorithms difflora
# does not apply, PEFT's parts beside a LoRA, OneTrainer's bundled embeddings.
_SKIPPED_ALGORITHMS = (
    ("oft", re.compile(r"\.(?:oft_blocks|oft_diag|oft_R\.weight|oft_R\.scaled_oft|rescale)$")),
    ("norm diff", re.compile(r"\.(?:w_norm|b_norm)$")),
    ("glora", re.compile(r"\.[ab][12]\.weight$")),
    ("ia3", re.compile(r"\.on_input$")),
    ("dora magnitude", re.compile(r"\.lora_magnitude_vector(?:\.weight)?$")),
    ("lora bias", re.compile(r"\.lora_(?:B|up)\.bias$")),
    ("embedding", re.compile(r"^bundle_emb\.")),
)
# The key's last names after its module's: a parameter, maybe with PEFT's adapter name and ``.weight``.
_KEY_SUFFIX = re.compile(r"\.(?:lora_linear_layer\.|lora\.)?[A-Za-z0-9_]+(?:\.default)?(?:\.weight|\.bias)?$")
# The algorithms difflora applies, by their keys' names; a module of one of them was skipped for its layer.
_APPLIED_FAMILIES = {
    "lora": re.compile(r"\.(?:lora_(?:down|up|mid|A|B)|lora(?:_linear_layer)?\.(?:down|up))(?:\.default)?\.weight$"),
    "loha": re.compile(r"\.hada_\w+$"),
    "lokr": re.compile(r"\.lokr_\w+$"),
    "full": re.compile(r"\.diff$"),
}
# GroupNorm and LayerNorm layers by their names in diffusers', the original and CLIP's layouts.
_NORM_LAYER = re.compile(r"(?:^|[._])(?:\w*norm\w*|in_layers[._]0|out_layers[._]0)$|(?:^|\.|_unet_)out[._]0$")


def _skipped_kind(module: str, keys: list[str]) -> str:
    """What one module's skipped keys are: an algorithm difflora does not apply, a norm's or a bias' diff, a LoRA of
    no layer difflora knows, two algorithms on one layer, or other keys."""
    for kind, pattern in _SKIPPED_ALGORITHMS:
        if any(pattern.search(key) for key in keys):
            return kind
    if all(key.endswith((".diff", ".diff_b")) for key in keys) and _NORM_LAYER.search(module):
        return "norm diff"
    if all(key.endswith(".diff_b") for key in keys):
        return "bias diff"  # set apart from the update of its weight, which was applied
    families = {family for family, pattern in _APPLIED_FAMILIES.items() if any(pattern.search(key) for key in keys)}
    if len(families) > 1:
        return "mixed algorithms"
    return "unknown layer" if families else "other keys"


def skipped_kinds(keys: list[str]) -> dict[str, list[str]]:
    """Skipped keys by what they are (``oft``, ``norm diff``, ``bias diff``, ``unknown layer``, ``mixed
    algorithms``, …), each kind's keys in their order, the kinds by their first key. A key is judged with the other
    keys of its module (a LoRA beside an OFT block is part of the OFT module)."""
    modules: dict[str, list[str]] = collections.defaultdict(list)
    for key in keys:
        modules[_KEY_SUFFIX.sub("", key)].append(key)
    kind_of = {key: kind for module, members in modules.items()
               for kind in [_skipped_kind(module, members)] for key in members}
    kinds: dict[str, list[str]] = {}
    for key in keys:
        kinds.setdefault(kind_of[key], []).append(key)
    return kinds
