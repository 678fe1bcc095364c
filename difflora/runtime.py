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
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .blocks import BlockWeights
from .errors import AdapterFileError, AdapterShapeError, InvalidArgumentError, finite_number
from .adapter import AdapterState, LoRAModuleWeights
from .formats import read_adapter, write_adapter
from .keys import TEXT_ENCODERS, adapter_name_from_path, projections_of, split_module_key
from .lora import LoRAFactors, initial_down
from .processors import (
    AttentionSite,
    CLIPLoRAAttnProcessor,
    LoRAAttnProcessor,
    text_encoder_attention_sites,
    unet_attention_sites,
)

__all__ = ["LoRARuntime", "AdapterInfo"]

logger = logging.getLogger("difflora")

_HOST_ATTRIBUTE = "difflora_lora"  # where a CLIP attention block keeps its LoRA processor
_STANDARD_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")


@dataclass(frozen=True)
class AdapterInfo:
    """What the runtime knows of one adapter. ``weight`` may be negative; ``enabled=False`` acts as weight 0."""

    name: str
    weight: float
    enabled: bool
    block_weights: BlockWeights
    modules: int
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
        # site key "<component>.<path>" → (site, the attention module it sits on)
        self._sites: dict[str, tuple[AttentionSite, nn.Module]] = {}
        for site in unet_attention_sites(pipe.unet):
            self._sites[f"unet.{site.path}"] = (site, pipe.unet.get_submodule(site.path))
        for component, encoder in self.components.items():
            if component == "unet":
                continue
            modules = dict(encoder.named_modules())
            for site in text_encoder_attention_sites(encoder, component):
                attn = modules.get(site.path) or modules[f"text_model.{site.path}"]
                self._sites[f"{component}.{site.path}"] = (site, attn)
        self._processors: dict[str, LoRAAttnProcessor | CLIPLoRAAttnProcessor] = {}
        self._original_unet_processors: dict | None = None
        self._adapters: dict[str, AdapterInfo] = {}
        self._fused = False

    @classmethod
    def attach(cls, pipe) -> LoRARuntime:
        """The runtime of ``pipe`` (a diffusers Stable Diffusion pipeline), created on first use."""
        runtime = getattr(pipe, "_difflora_runtime", None)
        if runtime is None:
            runtime = cls(pipe)
            pipe._difflora_runtime = runtime
        return runtime

    # ----- what is there ------------------------------------------------------------------------------------------
    @property
    def adapters(self) -> dict[str, AdapterInfo]:
        return dict(self._adapters)

    @property
    def fused(self) -> bool:
        return self._fused

    @property
    def sites(self) -> list[AttentionSite]:
        return [site for site, _ in self._sites.values()]

    def _info(self, name: str) -> AdapterInfo:
        if name not in self._adapters:
            known = ", ".join(self._adapters) or "none"
            raise InvalidArgumentError(f"no adapter named {name!r} (loaded: {known})")
        return self._adapters[name]

    # ----- processors ---------------------------------------------------------------------------------------------
    def _install(self) -> None:
        if self._processors:
            return
        unet = self.components["unet"]
        # Build every processor first (a block whose sizes do not fit raises here), then change the model. Blocks
        # running another processor (IP-Adapter, custom attention) keep it and take no LoRA.
        built = {}
        for site_key, (site, attn) in self._sites.items():
            if self._takes_lora(site_key):
                built[site_key] = (LoRAAttnProcessor if site.component == "unet" else CLIPLoRAAttnProcessor)(site, attn)
        originals = dict(unet.attn_processors)
        unet.set_attn_processor({
            name: built.get(f"unet.{name.removesuffix('.processor')}", processor) for name, processor in originals.items()
        })
        for site_key, processor in built.items():
            if isinstance(processor, CLIPLoRAAttnProcessor):
                attn = self._sites[site_key][1]
                # A submodule of the block, so it follows the text encoder's .to(device, dtype).
                attn.add_module(_HOST_ATTRIBUTE, processor)
                processor.install(attn)
        self._original_unet_processors = originals
        self._processors = built

    def _takes_lora(self, site_key: str) -> bool:
        """Whether difflora can host LoRA on this block: CLIP attention, or a UNet block on diffusers' standard
        attention (another processor, e.g. IP-Adapter's, computes something difflora's processor would not)."""
        site, attn = self._sites[site_key]
        if site.component != "unet" or site_key in self._processors:
            return True
        return type(attn.processor).__name__ in _STANDARD_PROCESSORS

    def _uninstall(self) -> None:
        if not self._processors:
            return
        for site_key, processor in self._processors.items():
            _, attn = self._sites[site_key]
            if isinstance(processor, CLIPLoRAAttnProcessor):
                processor.uninstall()
                delattr(attn, _HOST_ATTRIBUTE)
        self.components["unet"].set_attn_processor(self._original_unet_processors)
        self._processors = {}
        self._original_unet_processors = None

    def _refresh_multipliers(self, name: str) -> None:
        info = self._adapters[name]
        for site_key, processor in self._processors.items():
            site, _ = self._sites[site_key]
            factor = info.block_weights.factor(site.component, site.path) if info.enabled else 0.0
            for branch in processor.branches.values():
                branch.set_multiplier(name, info.weight * factor)

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
            raise InvalidArgumentError(f"adapter name {name!r} must be non-empty, without dots or outer spaces")
        if name in self._adapters and not replace_existing:
            raise InvalidArgumentError(f"an adapter named {name!r} is already loaded; remove it or pick another name")

    def _check_fits(self, state: AdapterState, source: str) -> dict[str, tuple[str, str]]:
        """Map every module of ``state`` to (site key, projection), raising before anything changes if one misfits."""
        placement = {}
        for module_key, weights in state.modules.items():
            component, path, projection = split_module_key(module_key)
            site_key = f"{component}.{path}"
            if site_key not in self._sites:
                raise AdapterShapeError(f"{source}: module {module_key!r} is not an attention projection of this model")
            site, attn = self._sites[site_key]
            if not self._takes_lora(site_key):
                raise AdapterShapeError(
                    f"{source}: {component}.{path} runs {type(attn.processor).__name__}, not diffusers' standard "
                    "attention; difflora does not put LoRA there"
                )
            projections = projections_of(component)
            in_features, out_features = site.projection_shapes(projections)[projection]
            expected_down, expected_up = (weights.rank, in_features), (out_features, weights.rank)
            if tuple(weights.down.shape) != expected_down or tuple(weights.up.shape) != expected_up:
                raise AdapterShapeError(
                    f"{source}: module {module_key!r} has down {tuple(weights.down.shape)} and up "
                    f"{tuple(weights.up.shape)}, the model needs down {expected_down} and up {expected_up}"
                )
            if not (torch.isfinite(weights.down).all() and torch.isfinite(weights.up).all()):
                raise AdapterShapeError(f"{source}: module {module_key!r} holds NaN or inf values")
            placement[module_key] = (site_key, projection)
        return placement

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
        """Add ``state`` under ``name`` with ``weight`` (any float, negative included) and optional block weights.

        Keys of the file that difflora cannot apply (``state.skipped``) are logged by name and count, or with
        ``strict`` refused.

        Raises:
            InvalidArgumentError: bad name or weight.
            AdapterShapeError: a module of the adapter is not in this model or its shapes differ; nothing changed.
            AdapterFileError: ``strict`` and the file holds keys difflora cannot apply.
        """
        self._check_name(name, replace_existing)
        where = source or name
        if state.skipped:
            listed = ", ".join(state.skipped[:5]) + (", ..." if len(state.skipped) > 5 else "")
            if strict:
                raise AdapterFileError(f"{where}: {len(state.skipped)} keys difflora cannot apply (strict): {listed}")
            logger.warning("%s: %d keys difflora cannot apply were not loaded: %s", where, len(state.skipped), listed)
        weight = finite_number(weight, f"weight of {name!r}")
        placement = self._check_fits(state, where)
        # Every factor is built before the model changes, so a failure here (bad values, out of memory) changes nothing.
        built = []
        for module_key, weights in state.modules.items():
            site_key, projection = placement[module_key]
            # Beside the layer it adapts; LoRA factors stay fp32 whatever the model's dtype.
            device = next(self._sites[site_key][1].parameters()).device
            factors = LoRAFactors.from_tensors(
                weights.down.to(device=device, dtype=torch.float32),
                weights.up.to(device=device, dtype=torch.float32),
                alpha=weights.alpha,
                use_rslora=weights.use_rslora,
            )
            factors.requires_grad_(False)
            built.append((site_key, projection, factors))
        with self._changing():
            if name in self._adapters:
                self._remove_factors(name)
            self._install()
            for site_key, projection, factors in built:
                self._processors[site_key].branch(projection).add(name, factors, multiplier=0.0)
            self._adapters[name] = AdapterInfo(
                name=name,
                weight=weight,
                enabled=True,
                block_weights=block_weights or BlockWeights(),
                modules=len(state.modules),
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
        return self.add_adapter(name or adapter_name_from_path(path), state, weight, block_weights, source=str(path), strict=strict)

    def create_adapter(
        self,
        name: str,
        rank: int,
        alpha: float | None = None,
        *,
        components: tuple[str, ...] = ("unet",),
        use_rslora: bool = False,
        init: str = "zeros",
        seed: int | None = None,
    ) -> AdapterInfo:
        """A new adapter on every attention projection of ``components``, trainable (fp32, ``requires_grad``).

        ``init="zeros"`` starts training: ``down`` from :func:`~difflora.lora.initial_down`, ``up = 0`` (no change to
        the model, LoRA's own choice). ``init="random"`` draws both factors as ``nn.Linear`` draws a weight (uniform in
        ±1/sqrt(fan_in)), which tests and benchmarks use to get an adapter that changes the output.
        """
        if not isinstance(rank, int) or rank <= 0:
            raise InvalidArgumentError(f"rank must be a positive integer, got {rank!r}")
        unknown = [component for component in components if component not in self.components]
        if unknown:
            raise InvalidArgumentError(f"components {unknown} are not in this pipeline ({list(self.components)})")
        if init not in ("zeros", "random"):
            raise InvalidArgumentError(f"init must be 'zeros' or 'random', got {init!r}")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        modules = {}
        for site_key, (site, _) in self._sites.items():
            if site.component not in components or not self._takes_lora(site_key):
                continue
            projections = projections_of(site.component)
            for projection, (in_features, out_features) in site.projection_shapes(projections).items():
                if init == "zeros":
                    down, up = initial_down(rank, in_features, generator), torch.zeros(out_features, rank)
                else:  # both factors as nn.Linear initialises its weight: uniform in ±1/sqrt(fan_in)
                    down = (torch.rand(rank, in_features, generator=generator) * 2 - 1) / in_features**0.5
                    up = (torch.rand(out_features, rank, generator=generator) * 2 - 1) / rank**0.5
                modules[f"{site_key}.{projection}"] = LoRAModuleWeights(down, up, float(alpha or rank), use_rslora)
        info = self.add_adapter(name, AdapterState(modules=modules))
        for parameter in self.parameters(name):
            parameter.requires_grad_(True)
        return info

    # ----- changing the mix ---------------------------------------------------------------------------------------
    def set_weight(self, name: str, weight: float) -> None:
        """Set one adapter's weight: a float on each branch, no file is read."""
        info = self._info(name)
        weight = finite_number(weight, f"weight of {name!r}")
        with self._changing():
            self._adapters[name] = replace(info, weight=weight)
            self._refresh_multipliers(name)

    def set_weights(self, weights: dict[str, float]) -> None:
        for name in weights:
            self._info(name)
        with self._changing():
            for name, weight in weights.items():
                self._adapters[name] = replace(self._adapters[name], weight=finite_number(weight, f"weight of {name!r}"))
                self._refresh_multipliers(name)

    def set_block_weights(self, name: str, block_weights: BlockWeights) -> None:
        info = self._info(name)
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
        for processor in self._processors.values():
            for branch in processor.branches.values():
                branch.remove(name)
        self._adapters.pop(name, None)

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
    def fuse(self) -> None:
        """Bake the active mix into the base weights (fp32 maths, cast once); the branches then cost nothing."""
        if self._fused:
            return
        done = []
        try:
            for site_key, processor in self._processors.items():
                processor.fuse(self._sites[site_key][1])
                done.append(site_key)
        except Exception:
            for site_key in done:
                self._processors[site_key].unfuse(self._sites[site_key][1])
            raise
        self._fused = True

    def unfuse(self) -> None:
        """Restore the weights :meth:`fuse` replaced, bit for bit."""
        for site_key, processor in self._processors.items():
            processor.unfuse(self._sites[site_key][1])
        self._fused = False

    def bake(self) -> None:
        """Make the current mix part of the model for good: fuse, then drop the adapters and the kept originals.

        The pipeline is then a plain diffusers pipeline with changed weights (its own attention processors back),
        ready for ``save_pretrained``. Unlike :meth:`fuse`, this cannot be undone.
        """
        self.fuse()
        for processor in self._processors.values():
            for branch in processor.branches.values():
                branch.fused = False
                if "original_weight" in branch._buffers:
                    del branch.original_weight
        self._fused = False
        for name in list(self._adapters):
            self._remove_factors(name)
        self._uninstall()

    # ----- reading adapters back ----------------------------------------------------------------------------------
    def parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable tensors of adapter ``name`` (every ``down`` and ``up``), in a fixed order."""
        self._info(name)
        found = []
        for processor in self._processors.values():
            for branch in processor.branches.values():
                if name in branch.adapters:
                    factors = branch.adapters[name]
                    found += [factors.down, factors.up]
        return found

    def adapter_state(self, name: str) -> AdapterState:
        """Adapter ``name`` as data (fp32 copies on the CPU), ready for :func:`~difflora.formats.write_adapter`."""
        info = self._info(name)
        modules = {}
        for site_key, processor in self._processors.items():
            for projection in processor.projections:
                branch = processor.branch(projection)
                if name in branch.adapters:
                    factors = branch.adapters[name]
                    modules[f"{site_key}.{projection}"] = LoRAModuleWeights(
                        down=factors.down.detach().float().cpu().clone(),
                        up=factors.up.detach().float().cpu().clone(),
                        alpha=factors.alpha,
                        use_rslora=factors.use_rslora,
                    )
        return AdapterState(modules=modules, metadata=dict(info.metadata))

    def copy_into(self, name: str, state: AdapterState) -> None:
        """Overwrite adapter ``name``'s factors in place with ``state``'s (same modules and shapes), e.g. on resume.

        In place, so optimizers holding these parameters keep working.
        """
        current = self.adapter_state(name)
        if set(current.modules) != set(state.modules):
            missing = sorted(set(current.modules) ^ set(state.modules))[:1]
            raise AdapterShapeError(f"adapter {name!r}: the saved factors cover other modules (e.g. {missing[0]!r})")
        pairs = []
        for site_key, processor in self._processors.items():
            for projection in processor.projections:
                branch = processor.branch(projection)
                if name in branch.adapters:
                    saved, factors = state.modules[f"{site_key}.{projection}"], branch.adapters[name]
                    if saved.down.shape != factors.down.shape or saved.up.shape != factors.up.shape:
                        raise AdapterShapeError(f"adapter {name!r}: saved {site_key}.{projection} has other shapes")
                    pairs.append((saved, factors))
        with torch.no_grad():  # every shape checked first, so a bad file changes nothing
            for saved, factors in pairs:
                factors.down.copy_(saved.down)
                factors.up.copy_(saved.up)

    def save(self, name: str, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
        """Write adapter ``name`` to a ``.safetensors`` file that difflora and plain diffusers load."""
        return write_adapter(self.adapter_state(name), path, metadata)
