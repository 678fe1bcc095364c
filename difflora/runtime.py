"""The multi-adapter runtime: named adapters on a Stable Diffusion pipeline, with weights, block weights and fusing.

::

    runtime = LoRARuntime.attach(pipe)
    runtime.load("style.safetensors", name="style", weight=0.8)
    runtime.set_weight("style", -0.3)        # a number is set; nothing is reloaded
    runtime.fuse()                           # bake the mix into the weights: no extra cost per step
    runtime.unfuse()                         # original weights back, bit for bit

Every adapter on every attention block is one :class:`~difflora.lora.LoRAFactors` inside the block's processor; the
runtime only keeps the book of names, weights and block weights, and turns them into each branch's multiplier
``weight × block factor`` (0 when the adapter is disabled). Loading checks every module of a file against the model
before anything changes, so a failed load leaves the pipeline as it was.

Weights are finite numbers in [-100, 100] (:func:`~difflora.lora.adapter_weight`), per-block weights name blocks the
UNet has, and :meth:`LoRARuntime.check_mix` refuses a mix a layer's dtype cannot hold (fp16: 65504) before a
generation or a fuse uses it.
"""

from __future__ import annotations

import contextlib
import math
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import nn

from .adapter import (
    AdapterState,
    FullModuleWeights,
    LoHaModuleWeights,
    LoKrModuleWeights,
    LoRAModuleWeights,
    ModuleWeights,
)
from .blocks import BlockWeights
from .errors import AdapterFileError, AdapterShapeError, InvalidArgumentError
from .formats import read_adapter, write_adapter
from .keys import (
    TEXT_ENCODERS,
    adapter_name_from_path,
    join_module_key,
    projections_of,
    split_module_key,
    split_projection,
)
from .adapter_options import AdapterOptions, initial_module, target_layer_paths
from .lora import LoRAFactors, adapter_weight
from .lycoris import FullDiff, LoHaFactors, LoKrFactors, attach_magnitude
from .multilora import MultiLoRA, stored_weight
from .processors import (
    InstalledProcessors,
    LayerSite,
    SiteOnModel,
    attention_sites,
    install_processors,
    layer_sites,
)

__all__ = ["AdapterInfo", "AdapterOptions", "LoRARuntime", "default_layout"]

logger = logging.getLogger("difflora")


@dataclass(frozen=True)
class AdapterInfo:
    """What the runtime knows of one adapter. ``weight`` may be negative; ``enabled=False`` acts as weight 0."""

    name: str
    weight: float
    enabled: bool
    block_weights: BlockWeights
    module_count: int
    ranks: tuple[int, ...]
    alphas: tuple[float, ...]
    source: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


class LoRARuntime:
    """Named LoRA adapters on a pipeline's UNet and text encoder(s).

    Use :meth:`attach` rather than the constructor: it returns the pipeline's runtime, creating it once.
    """

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.components: dict[str, nn.Module] = {"unet": pipe.unet}
        for name in TEXT_ENCODERS:
            encoder = getattr(pipe, name, None)
            if encoder is not None:
                self.components[name] = encoder
        self._sites: dict[str, SiteOnModel] = attention_sites(self.components)
        self._layers: dict[str, LayerSite] = layer_sites(self.components, self._sites)
        self._installed: InstalledProcessors | None = None  # while any adapter is loaded
        self._adapters: dict[str, AdapterInfo] = {}
        self._fused = False

    @classmethod
    def attach(cls, pipe) -> LoRARuntime:
        """The runtime of ``pipe`` (a diffusers Stable Diffusion pipeline), created on first use."""
        runtime = cls.of(pipe)
        if runtime is None:
            runtime = cls(pipe)
            pipe._difflora_runtime = runtime
        return runtime

    @classmethod
    def of(cls, pipe) -> LoRARuntime | None:
        """The runtime :meth:`attach` gave ``pipe``, or ``None`` when it has none (a pipeline with no adapters)."""
        return getattr(pipe, "_difflora_runtime", None)

    # ----- what is there ------------------------------------------------------------------------------------------
    @property
    def adapters(self) -> dict[str, AdapterInfo]:
        return dict(self._adapters)

    @property
    def fused(self) -> bool:
        return self._fused

    def _info(self, name: str) -> AdapterInfo:
        if name not in self._adapters:
            known = ", ".join(self._adapters) or "none"
            raise InvalidArgumentError(f"no adapter named {name!r} (loaded: {known})", "name")
        return self._adapters[name]

    def unet_blocks(self) -> set[str]:
        """The per-block names of this UNet: ``down.0`` … and ``up.0`` … (every block, with attention or not)."""
        unet = self.components["unet"]
        return {f"down.{i}" for i in range(len(unet.down_blocks))} | {f"up.{i}" for i in range(len(unet.up_blocks))}

    def _checked_block_weights(self, block_weights: BlockWeights | None) -> BlockWeights:
        if block_weights is None:
            return BlockWeights()
        if not isinstance(block_weights, BlockWeights):
            raise InvalidArgumentError(f"block_weights must be a BlockWeights, got {block_weights!r}",
                                       "block_weights")
        block_weights.check_blocks(self.unet_blocks())
        return block_weights

    def _takes_lora(self, site_key: str) -> bool:
        installed = self._installed is not None and site_key in self._installed.hosts
        return installed or self._sites[site_key].runs_standard_attention

    def _branches(self) -> Iterator[tuple[str, MultiLoRA, nn.Linear]]:
        """(module key, branch, adapted layer) for every projection that carries LoRA now."""
        if self._installed is not None:
            yield from self._installed.branches()

    def _factors_of(self, name: str) -> Iterator[tuple[str, LoRAFactors]]:
        """(module key, factors) of adapter ``name``, in the model's order."""
        for module_key, branch, _ in self._branches():
            if name in branch.adapters:
                yield module_key, branch.adapters[name]

    def _refresh_multipliers(self, *names: str) -> None:
        """Each branch's multiplier of ``names``: weight × its block factor (0 when off; no lookup without them)."""
        infos = [(name, info, info.weight * info.enabled if info.block_weights.is_identity or not info.enabled
                  else None) for name in names for info in [self._adapters[name]]]
        for module_key, branch, _ in self._branches():
            for name, info, same_everywhere in infos:
                branch.set_multiplier(name, same_everywhere if same_everywhere is not None else info.weight *
                                      info.block_weights.factor(*module_key.split(".", 1)))

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        """Wrap any change of the mix: unfuse first, fuse again afterwards if the user had fused."""
        refuse = self._fused
        if refuse:
            self.unfuse()
        try:
            yield
        finally:
            if refuse and self._adapters:
                self.fuse()

    # ----- adding -------------------------------------------------------------------------------------------------
    def _check_name(self, name: str, replace_existing: bool) -> None:
        if not isinstance(name, str) or not name or "." in name or name.strip() != name:
            raise InvalidArgumentError(f"adapter name {name!r} must be non-empty, without dots or outer spaces", "name")
        if name in self._adapters and not replace_existing:
            raise InvalidArgumentError(
                f"an adapter named {name!r} is already loaded; remove it or pick another name", "name"
            )

    def _place(self, module_key: str, source: str) -> tuple[tuple[int, ...], torch.device]:
        """The shape of the weight ``module_key`` adapts in this model and its device, or :class:`AdapterShapeError`
        naming the module: no such layer, or an attention block running another processor."""
        try:
            component, path = split_module_key(module_key)
        except AdapterFileError:
            raise AdapterShapeError(f"{source}: module {module_key!r} is not a layer of this model") from None
        projection = split_projection(path)
        site_key = f"{component}.{projection[0]}" if projection else None
        if site_key in self._sites:
            placed = self._sites[site_key]
            if not self._takes_lora(site_key):
                raise AdapterShapeError(
                    f"{source}: {site_key} runs {type(placed.attention.processor).__name__}, not diffusers' "
                    "standard attention; difflora does not put LoRA there"
                )
            in_features, out_features = placed.site.projection_shapes(projections_of(component))[projection[1]]
            return (out_features, in_features), next(placed.attention.parameters()).device
        if module_key in self._layers:
            layer = self._layers[module_key].layer
            return tuple(layer.weight.shape), layer.weight.device
        raise AdapterShapeError(f"{source}: module {module_key!r} is not a layer of this model")

    @staticmethod
    def _fitted(
        weights: LoRAModuleWeights, shape: tuple[int, ...], module_key: str, source: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(down, up, mid)`` of ``weights`` for a weight of ``shape``: as they are, or reshaped between a Linear and
        a 1 × 1 Conv2d (SD 1.x's ``proj_in``/``proj_out`` are 1 × 1 convs, SD 2.x's and SDXL's Linears, and files
        made for one are applied to the other, as A1111 and ComfyUI do)."""
        down, up, mid = weights.down, weights.up, weights.mid
        if weights.weight_shape == shape:
            return down, up, mid
        if mid is None and weights.weight_shape[:2] == shape[:2]:
            if len(shape) == 2 and down.ndim == 4 and tuple(down.shape[2:]) == (1, 1):
                return down.flatten(1), up.flatten(1), None
            if shape[2:] == (1, 1) and down.ndim == 2:
                return down[:, :, None, None], up[:, :, None, None], None
        if mid is None and down.ndim == 2 and len(shape) == 4 and (up.shape[0], down.shape[1]) == (
                shape[0], math.prod(shape[1:])):
            # A k × k conv's LoRA as matrices (down rank × in·kh·kw), as ComfyUI's trainer saves it: the same update.
            return down.reshape(down.shape[0], *shape[1:]), up[:, :, None, None], None
        raise AdapterShapeError(
            f"{source}: module {module_key!r} changes a weight of shape {weights.weight_shape} (down "
            f"{tuple(down.shape)}, up {tuple(up.shape)}), the model's is {shape}"
        )

    def _build_update(self, weights: ModuleWeights, module_key: str, source: str) -> nn.Module:
        """The runtime update of one module of a state, fp32, frozen, on its layer's device, in its layer's shape:
        LoRAFactors for LoRA/LoCon, LoHaFactors, LoKrFactors or FullDiff for LyCORIS' kinds, a DoRA magnitude
        attached where the file has one."""
        shape, device = self._place(module_key, source)

        def moved(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return tensor.to(device=device, dtype=torch.float32) if tensor is not None else None

        if weights.kind == "lora":
            down, up, mid = self._fitted(weights, shape, module_key, source)
            update = LoRAFactors.from_tensors(moved(down), moved(up), alpha=weights.alpha,
                                              use_rslora=weights.use_rslora, mid=moved(mid))
        else:
            file_shape = weights.weight_shape
            if file_shape[0] != shape[0] or math.prod(file_shape) != math.prod(shape):
                raise AdapterShapeError(
                    f"{source}: module {module_key!r} ({weights.kind}) changes a weight of shape {file_shape}, the "
                    f"model's is {shape}"
                )
            tensors = {name: moved(tensor) for name, tensor in weights.tensors().items()}
            if weights.kind == "loha":
                update = LoHaFactors(shape, alpha=weights.alpha, **tensors)
            elif weights.kind == "lokr":
                update = LoKrFactors(shape, alpha=weights.alpha, **tensors)
            else:
                update = FullDiff(tensors["diff"].reshape(shape), tensors["diff_b"])
        if weights.dora_scale is not None:
            attach_magnitude(update, moved(weights.dora_scale), weights.wd_on_output)
        update.requires_grad_(False)
        return update

    def _build_factors(self, state: AdapterState, source: str) -> dict[str, nn.Module]:
        """The runtime updates of every module of ``state``, checked to fit: raises before anything changes if a
        module has no place in this model or does not fit it."""
        built = {}
        for module_key, weights in state.modules.items():
            problem = weights.problem()
            if problem:
                raise AdapterShapeError(f"{source}: module {module_key!r} {problem}")
            built[module_key] = self._build_update(weights, module_key, source)
        return built

    def add_adapter(
        self,
        name: str,
        state: AdapterState,
        weight: float = 1.0,
        block_weights: BlockWeights | None = None,
        *,
        source: str | None = None,
        replace_existing: bool = False,
        strict: bool = False,
    ) -> AdapterInfo:
        """Add ``state`` under ``name`` with ``weight`` (in [-100, 100], negative included) and optional block
        weights (whose per-block names must be blocks of this UNet).

        Keys of the file that difflora cannot apply (``state.skipped``) are logged by name and count, or with
        ``strict`` refused.

        Raises:
            InvalidArgumentError: bad name, weight or block weights.
            AdapterShapeError: a module of the adapter is not in this model or its shapes differ; nothing changed.
            AdapterFileError: ``strict`` and the file holds keys difflora cannot apply.
        """
        self._check_name(name, replace_existing)
        where = source or name
        if state.skipped:
            if strict:
                raise AdapterFileError(f"{where}: refused (strict): {state.skipped_summary()}", "strict")
            logger.warning("%s: not loaded: %s", where, state.skipped_summary())
        weight = adapter_weight(weight, f"weight of {name!r}")
        block_weights = self._checked_block_weights(block_weights)
        # Every factor is built (and checked to fit) before the model changes, so a failure here (a module with no
        # place in this model, bad values, out of memory) changes nothing.
        built = self._build_factors(state, where)
        with self._changing():
            if name in self._adapters:
                self._remove_factors(name)
            if self._installed is None:
                self._installed = install_processors(self.components["unet"], self._sites)
            self._installed.host_layers([self._layers[key] for key in built if key in self._layers])
            for module_key, branch, _ in self._branches():
                if module_key in built:
                    branch.add(name, built[module_key], multiplier=0.0)
            self._adapters[name] = AdapterInfo(
                name=name,
                weight=weight,
                enabled=True,
                block_weights=block_weights,
                module_count=len(state.modules),
                ranks=tuple(state.ranks()),
                alphas=tuple(state.alphas()),
                source=source,
                metadata=dict(state.metadata),
            )
            self._refresh_multipliers(name)
        return self._adapters[name]

    def load(
        self,
        path: str | os.PathLike,
        name: str | None = None,
        weight: float = 1.0,
        block_weights: BlockWeights | None = None,
        *,
        strict: bool = False,
    ) -> AdapterInfo:
        """Read an adapter file and add it; ``name`` defaults to the file's stem."""
        path = Path(path)
        state = read_adapter(path)
        name = name or adapter_name_from_path(path)
        return self.add_adapter(name, state, weight, block_weights, source=str(path), strict=strict)

    def create_adapter(self, name: str, options: AdapterOptions | None = None, /, **choices) -> AdapterInfo:
        """A new trainable adapter (fp32, ``requires_grad``) as ``options`` say, or :class:`AdapterOptions` with
        ``choices`` as keywords (``create_adapter("style", rank=8, targets="all", algo="loha")``).

        Each layer of ``options.targets`` gets the algorithm's own start (:class:`AdapterOptions`, ``init``): with
        ``init="zeros"`` every update is ``ΔW = 0`` and a DoRA magnitude the weight's norm, so a model with no other
        adapter on those layers computes exactly what it did before. The trainable tensors are :meth:`parameters`.

        Raises:
            InvalidArgumentError: an option that cannot be used, named (its ``parameter``).
        """
        known = sorted(f.name for f in fields(AdapterOptions))
        unknown = sorted(set(choices) - set(known))
        if unknown:
            raise InvalidArgumentError(f"{unknown[0]} is not an adapter option ({', '.join(known)})", unknown[0])
        options = replace(options or AdapterOptions(), **choices)
        options.validate()
        missing = [component for component in options.components if component not in self.components]
        if missing:
            raise InvalidArgumentError(f"components {missing} are not in this pipeline ({list(self.components)})",
                                       "components")
        generator = torch.Generator().manual_seed(options.seed) if options.seed is not None else None
        with self._changing():  # unfused while the magnitudes are taken: DoRA's is the norm of the model's own weight
            modules = {key: initial_module(self._place(key, "create_adapter")[0], options, generator,
                                           self._weight_of(key) if options.dora else None)
                       for key in self._target_keys(options)}
            info = self.add_adapter(name, AdapterState(modules=modules))
        for parameter in self.parameters(name):
            parameter.requires_grad_(True)
        return info

    def _target_keys(self, options: AdapterOptions) -> list[str]:
        """The module keys ``options.targets`` names in this model, in the model's order: the attention projections,
        or every Linear and Conv2d inside kohya's target module classes
        (:func:`~difflora.adapter_options.target_layer_paths`)."""
        if options.targets == "attention":
            return [join_module_key(placed.site.component, placed.site.path, projection)
                    for site_key, placed in self._sites.items()
                    if placed.site.component in options.components and self._takes_lora(site_key)
                    for projection in projections_of(placed.site.component)]
        found = [join_module_key(component, path.removeprefix("text_model."))
                 for component in options.components
                 for path in target_layer_paths(self.components[component], options.targets)]
        return [key for key in found if key in self._layers or self._takes_lora(self._site_key(key))]

    @staticmethod
    def _site_key(module_key: str) -> str:
        component, path = split_module_key(module_key)
        return f"{component}.{split_projection(path)[0]}"

    def _weight_of(self, module_key: str) -> torch.Tensor:
        """The weight the layer ``module_key`` stores (an attention projection, or a layer with or without a host)."""
        if module_key in self._layers:
            return stored_weight(self._layers[module_key].layer)
        projection = split_projection(split_module_key(module_key)[1])[1]
        return stored_weight(self._sites[self._site_key(module_key)].attention.get_submodule(projection))

    # ----- changing the mix ---------------------------------------------------------------------------------------
    def set_weight(self, name: str, weight: float) -> None:
        """Set one adapter's weight: a float on each branch, no file is read."""
        self.set_weights({name: weight})

    def set_weights(self, weights: dict[str, float]) -> None:
        """Set several adapters' weights at once (one unfuse and fuse around them when fused)."""
        for name in weights:
            self._info(name)
        checked = {name: adapter_weight(weight, f"weight of {name!r}") for name, weight in weights.items()}
        with self._changing():
            for name, weight in checked.items():
                self._adapters[name] = replace(self._adapters[name], weight=weight)
            self._refresh_multipliers(*checked)

    def set_block_weights(self, name: str, block_weights: BlockWeights) -> None:
        """Set one adapter's block weights; per-block names must be blocks of this UNet."""
        info = self._info(name)
        block_weights = self._checked_block_weights(block_weights)
        with self._changing():
            self._adapters[name] = replace(info, block_weights=block_weights)
            self._refresh_multipliers(name)

    def enable(self, name: str, enabled: bool = True) -> None:
        info = self._info(name)
        with self._changing():
            self._adapters[name] = replace(info, enabled=enabled)
            self._refresh_multipliers(name)

    def disable(self, name: str) -> None:
        self.enable(name, False)

    def _remove_factors(self, name: str) -> None:
        for _, branch, _ in self._branches():
            branch.remove(name)
        if self._installed is not None:
            self._installed.drop_idle_layer_hosts()
        self._adapters.pop(name, None)

    def _uninstall(self) -> None:
        if self._installed is not None:
            self._installed.restore()
            self._installed = None

    def remove(self, name: str) -> None:
        """Remove one adapter; removing the last restores the model's original attention processors."""
        self._info(name)
        with self._changing():
            self._remove_factors(name)
        if not self._adapters:
            if self._fused:
                self.unfuse()
            self._uninstall()

    def remove_all(self) -> None:
        for name in list(self._adapters):
            self.remove(name)

    # ----- fusing -------------------------------------------------------------------------------------------------
    def check_mix(self) -> None:
        """Refuse the active mix if some adapter's ``weight × block weight × s·B A`` is not finite or exceeds what
        its layer's dtype holds (fp16: 65504), naming the adapter and the module (:meth:`MultiLoRA.check_range`).

        :meth:`fuse` (as a :class:`FuseError`) and every forward pass without gradients check it too;
        :func:`~difflora.generate.generate` calls it before the first step. Each branch remembers the mix it
        checked, so an unchanged mix costs a comparison per branch.
        """
        for _, branch, layer in self._branches():
            branch.check_range(layer.weight.dtype)

    def fuse(self) -> None:
        """Bake the active mix into the base weights (fp32 maths, cast once); the branches then cost nothing."""
        if self._fused:
            return
        done = []  # each branch checks its mix's range before it changes a weight (MultiLoRA.fuse)
        try:
            for _, branch, layer in self._branches():
                branch.fuse(layer)
                done.append((branch, layer))
        except Exception:
            for branch, layer in done:
                branch.unfuse(layer)
            raise
        self._fused = True

    def unfuse(self) -> None:
        """Restore the weights :meth:`fuse` replaced, bit for bit."""
        for _, branch, layer in self._branches():
            branch.unfuse(layer)
        self._fused = False

    def bake(self) -> None:
        """Make the current mix part of the model for good: fuse, then drop the adapters and the kept originals.

        The pipeline is then a plain diffusers pipeline with changed weights (its own attention processors back),
        ready for ``save_pretrained``. Unlike :meth:`fuse`, this cannot be undone.
        """
        self.fuse()
        for _, branch, _ in self._branches():
            branch.commit_fuse()
        self._fused = False
        for name in list(self._adapters):
            self._remove_factors(name)
        self._uninstall()

    # ----- reading adapters back ----------------------------------------------------------------------------------
    def named_parameters(self, name: str) -> list[tuple[str, nn.Parameter]]:
        """``(<module key>.<tensor>, tensor)`` for the trainable tensors of adapter ``name``, in the model's order:
        a LoRA's ``down``, ``up`` (and ``mid``), a LoHa's ``w1a`` … ``w2b``, a LoKr's ``w1`` … ``w2b``, and a DoRA
        update's ``magnitude`` (optimizer groups tell them apart by that last name)."""
        self._info(name)
        return [(f"{module_key}.{tensor_name}", tensor) for module_key, update in self._factors_of(name)
                for tensor_name, tensor in update.named_parameters(recurse=False)]

    def parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable tensors of adapter ``name``, in :meth:`named_parameters`' order."""
        return [tensor for _, tensor in self.named_parameters(name)]

    def adapter_state(self, name: str) -> AdapterState:
        """Adapter ``name`` as data (fp32 copies on the CPU), ready for :func:`~difflora.formats.write_adapter`."""
        info = self._info(name)
        modules = {module_key: _as_module_weights(update) for module_key, update in self._factors_of(name)}
        return AdapterState(modules=modules, metadata=dict(info.metadata))

    def copy_into(self, name: str, state: AdapterState) -> None:
        """Overwrite adapter ``name``'s tensors in place with ``state``'s (same modules, kinds and shapes; a DoRA
        magnitude in any of its file shapes), e.g. on resume.

        In place, so optimizers holding these parameters keep working.
        """
        self._info(name)
        current = dict(self._factors_of(name))
        if set(current) != set(state.modules):
            different = sorted(set(current) ^ set(state.modules))[0]
            raise AdapterShapeError(f"adapter {name!r}: the saved factors cover other modules (e.g. {different!r})")
        pairs = []
        for module_key, update in current.items():
            saved, mine = _tensors_of(state.modules[module_key]), dict(update.named_parameters(recurse=False))
            if saved.keys() != mine.keys() or any(saved[tensor_name].numel() != tensor.numel() or (
                    tensor_name != "magnitude" and saved[tensor_name].shape != tensor.shape)
                    for tensor_name, tensor in mine.items()):
                raise AdapterShapeError(f"adapter {name!r}: saved {module_key} has other tensors or shapes")
            pairs += [(tensor, saved[tensor_name].reshape(tensor.shape)) for tensor_name, tensor in mine.items()]
        with torch.no_grad():  # every shape checked first, so a bad file changes nothing
            for tensor, saved_tensor in pairs:
                tensor.copy_(saved_tensor)

    def save(self, name: str, path: str | os.PathLike, metadata: dict[str, str] | None = None,
             layout: str | None = None) -> Path:
        """Write adapter ``name`` to a ``.safetensors`` file in ``layout`` (:func:`~difflora.formats.write_adapter`);
        by default diffusers' when it holds the adapter (LoRA, LoCon, PEFT's DoRA: plain diffusers loads it), else
        kohya's (LoHa, LoKr as LyCORIS writes them)."""
        state = self.adapter_state(name)
        return write_adapter(state, path, metadata, layout or default_layout(state))


def default_layout(state: AdapterState) -> str:
    """The layout a new file of ``state`` is written in: ``difflora`` (diffusers' keys) when that holds it (LoRA,
    LoCon, PEFT's DoRA), which plain diffusers applies, else ``kohya`` (LyCORIS' keys hold every kind)."""
    return "difflora" if state.lora_only_problem("a diffusers file") is None else "kohya"


def _tensors_of(weights: ModuleWeights) -> dict[str, torch.Tensor]:
    """A module's tensors by the names its runtime update gives them (the DoRA magnitude as ``magnitude``)."""
    if weights.kind == "lora":
        tensors = {"down": weights.down, "up": weights.up, "mid": weights.mid}
    elif weights.kind == "full":
        tensors = {"diff": weights.diff, "diff_b": weights.diff_b}
    else:
        tensors = dict(weights.tensors())
    tensors["magnitude"] = weights.dora_scale
    return {tensor_name: tensor for tensor_name, tensor in tensors.items() if tensor is not None}


def _as_module_weights(update: nn.Module) -> ModuleWeights:
    """A runtime update as data: fp32 copies on the CPU, its DoRA magnitude with it."""
    def copied(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return tensor.detach().float().cpu().clone() if tensor is not None else None

    dora = {"dora_scale": copied(getattr(update, "magnitude", None)),
            "wd_on_output": getattr(update, "wd_on_output", True)}
    if isinstance(update, LoRAFactors):
        return LoRAModuleWeights(down=copied(update.down), up=copied(update.up), alpha=update.alpha,
                                 use_rslora=update.use_rslora, mid=copied(update.mid), **dora)
    tensors = {name: copied(tensor) for name, tensor in update.named_parameters(recurse=False) if name != "magnitude"}
    if isinstance(update, LoHaFactors):
        return LoHaModuleWeights(alpha=update.alpha, **tensors, **dora)
    if isinstance(update, LoKrFactors):
        return LoKrModuleWeights(alpha=update.alpha if update.rank else None, **tensors, **dora)
    return FullModuleWeights(diff=tensors["diff"], diff_b=tensors.get("diff_b"), **dora)
