"""LoRA attention processors for the diffusers UNet and for CLIP text encoders.

A processor sits on one attention block and holds a :class:`~difflora.lora.MultiLoRA` for each of the block's four
projections (query, key, value, output). Its sizes come from where the block sits, as diffusers' own LoRA processors
once did: ``down_blocks.i`` → ``block_out_channels[i]``, ``mid_block`` → ``block_out_channels[-1]``, ``up_blocks.i`` →
``reversed(block_out_channels)[i]``; self-attention (``attn1``) reads the hidden states, cross-attention (``attn2``)
reads ``cross_attention_dim``-wide encoder states. The sizes are checked against the real projection shapes.

The UNet processor replaces diffusers' ``AttnProcessor2_0`` (same maths, plus the LoRA branches). CLIP attention in
transformers has no processor slot, so its processor adds the branches with forward hooks on the four projections,
which leaves the text encoder's own attention code untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .blocks import block_of
from .errors import AdapterShapeError
from .keys import CLIP_PROJECTIONS, UNET_PROJECTIONS, join_module_key, projections_of
from .multilora import MultiLoRA

__all__ = [
    "AttentionSite",
    "CLIPLoRAAttnProcessor",
    "HookedBranch",
    "InstalledProcessors",
    "LayerHost",
    "LayerSite",
    "LoRAAttnProcessor",
    "SiteOnModel",
    "attention_sites",
    "install_processors",
    "layer_sites",
    "text_encoder_attention_sites",
    "unet_attention_sites",
]

# diffusers' own attention processors, whose maths LoRAAttnProcessor reproduces. A block running another one
# (IP-Adapter, a custom attention) computes something else: it keeps its processor and takes no LoRA.
STANDARD_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")
_HOST_ATTRIBUTE = "difflora_lora"  # where a CLIP attention block keeps its LoRA processor (so it follows .to())



def _branch_key(projection: str) -> str:
    # nn.ModuleDict keys may not contain dots.
    return projection.replace(".", "_")


@dataclass(frozen=True)
class AttentionSite:
    """Where an attention block sits and the sizes that follow from it.

    Attributes:
        component: pipeline component holding the block (``unet``, ``text_encoder``, ``text_encoder_2``).
        path: the block's module path inside the component, e.g.
            ``down_blocks.0.attentions.0.transformer_blocks.0.attn1``
            or ``encoder.layers.3.self_attn`` (text-encoder paths never carry the ``text_model.`` prefix).
        block_kind: ``down``, ``mid`` or ``up`` for the UNet, ``text`` for text encoders.
        block_index: index in ``down_blocks``/``up_blocks``, ``None`` for the mid block and text encoders.
        block_hidden_size: width of the hidden states (queries, values, output).
        cross_attention_dim: width of the encoder states keys/values read, ``None`` for self-attention.
    """

    component: str
    path: str
    block_kind: str
    block_index: int | None
    block_hidden_size: int
    cross_attention_dim: int | None

    @property
    def key_input_size(self) -> int:
        return self.cross_attention_dim if self.cross_attention_dim is not None else self.block_hidden_size

    def projection_shapes(self, projections: tuple[str, ...]) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection, from the block's sizes alone."""
        query, key, value, output = projections
        hidden, key_input = self.block_hidden_size, self.key_input_size
        return {query: (hidden, hidden), key: (key_input, hidden), value: (key_input, hidden), output: (hidden, hidden)}


def unet_attention_sites(unet: nn.Module) -> list[AttentionSite]:
    """One :class:`AttentionSite` per entry of ``unet.attn_processors``, sized from ``unet.config``."""
    config = unet.config
    channels = list(config.block_out_channels)
    cross_attention_dim = config.cross_attention_dim
    if isinstance(cross_attention_dim, (list, tuple)):  # per-block cross-attention widths (rare configs)
        cross_attention_dim = None
    sites = []
    for processor_name in unet.attn_processors:
        path = processor_name.removesuffix(".processor")
        kind, index = block_of("unet", path)
        if kind == "mid":
            hidden = channels[-1]
        elif kind == "down":
            hidden = channels[index]
        elif kind == "up":
            hidden = list(reversed(channels))[index]
        else:
            raise AdapterShapeError(f"unet attention block {path!r} sits in no down/mid/up block; cannot size its LoRA")
        is_cross = path.endswith("attn2")
        block_cross_dim = cross_attention_dim if is_cross else None
        if is_cross and block_cross_dim is None:
            block_cross_dim = unet.get_submodule(path).to_k.in_features
        sites.append(AttentionSite("unet", path, kind, index, hidden, block_cross_dim))
    return sites


def text_encoder_attention_sites(text_encoder: nn.Module, component: str = "text_encoder") -> list[AttentionSite]:
    """One :class:`AttentionSite` per CLIP self-attention block, sized from the text config's ``hidden_size``."""
    hidden = text_encoder.config.hidden_size
    sites = []
    for name, module in text_encoder.named_modules():
        if name.endswith("self_attn") and all(hasattr(module, p) for p in CLIP_PROJECTIONS):
            sites.append(AttentionSite(component, name.removeprefix("text_model."), "text", None, hidden, None))
    return sites


def _linear(attn: nn.Module, projection: str) -> nn.Linear:
    return attn.get_submodule(projection)


class _LoRAAttentionHost(nn.Module):
    """What the UNet and CLIP processors share: one MultiLoRA per projection, checked against the real layers."""

    projections: tuple[str, ...] = ()

    def __init__(self, site: AttentionSite, attn: nn.Module) -> None:
        super().__init__()
        self.site = site
        self.branches = nn.ModuleDict()
        for projection, (in_features, out_features) in site.projection_shapes(self.projections).items():
            layer = _linear(attn, projection)
            if (layer.in_features, layer.out_features) != (in_features, out_features):
                raise AdapterShapeError(
                    f"{site.component}.{site.path}.{projection}: block sizes give {in_features}→{out_features}, "
                    f"the layer is {layer.in_features}→{layer.out_features}"
                )
            module_key = join_module_key(site.component, site.path, projection)
            self.branches[_branch_key(projection)] = MultiLoRA(in_features, out_features, module_key)

    def branch(self, projection: str) -> MultiLoRA:
        return self.branches[_branch_key(projection)]

    def projection_branches(self, attn: nn.Module) -> Iterator[tuple[str, MultiLoRA, nn.Linear]]:
        """(projection, its branch, the layer it adapts) for the four projections of ``attn``, in order."""
        for projection in self.projections:
            yield projection, self.branch(projection), _linear(attn, projection)


class LoRAAttnProcessor(_LoRAAttentionHost):
    """Attention for a diffusers ``Attention`` block with LoRA on ``to_q``, ``to_k``, ``to_v`` and ``to_out.0``.

    The computation is diffusers' ``AttnProcessor2_0`` (``scaled_dot_product_attention``), with each projection
    ``p(x)`` replaced by ``p(x) + Σ m s B A x`` (:meth:`MultiLoRA.linear`). With no active adapter it gives the same
    numbers as that processor.
    """

    projections = UNET_PROJECTIONS

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = self.branch("to_q").linear(attn.to_q, hidden_states)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        key = self.branch("to_k").linear(attn.to_k, encoder_hidden_states)
        value = self.branch("to_v").linear(attn.to_v, encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = self.branch("to_out.0").linear(attn.to_out[0], hidden_states)
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class CLIPLoRAAttnProcessor(_LoRAAttentionHost):
    """LoRA for a CLIP self-attention block (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``).

    transformers' CLIP attention has no processor slot, so :meth:`install` joins each projection's branch to the
    projection's own forward (:class:`HookedBranch`, as every layer host does); the block's attention code runs
    unchanged. :meth:`uninstall` takes the hooks off.
    """

    projections = CLIP_PROJECTIONS

    def __init__(self, site: AttentionSite, attn: nn.Module) -> None:
        super().__init__(site, attn)
        self._hooked: list[HookedBranch] = []

    def install(self, attn: nn.Module) -> None:
        self.uninstall()
        self._hooked = [HookedBranch(self.branch(projection), _linear(attn, projection))
                        for projection in self.projections]
        for hooked in self._hooked:
            hooked.install()

    def uninstall(self) -> None:
        for hooked in self._hooked:
            hooked.uninstall()
        self._hooked = []


# ----- finding the blocks and installing the processors ---------------------------------------------------------


@dataclass(frozen=True)
class SiteOnModel:
    """An attention site and the attention module of the model it describes."""

    site: AttentionSite
    attention: nn.Module

    @property
    def runs_standard_attention(self) -> bool:
        """Whether difflora can host LoRA here: CLIP attention, or a UNet block on diffusers' standard processor."""
        return self.site.component != "unet" or type(self.attention.processor).__name__ in STANDARD_PROCESSORS


def attention_sites(components: dict[str, nn.Module]) -> dict[str, SiteOnModel]:
    """Every attention block of a pipeline's ``unet`` and text encoders, keyed ``"<component>.<path>"``."""
    found: dict[str, SiteOnModel] = {}
    for component, model in components.items():
        if component == "unet":
            for site in unet_attention_sites(model):
                found[f"unet.{site.path}"] = SiteOnModel(site, model.get_submodule(site.path))
            continue
        modules = dict(model.named_modules())
        for site in text_encoder_attention_sites(model, component):
            attention = modules.get(site.path) or modules[f"text_model.{site.path}"]
            found[f"{component}.{site.path}"] = SiteOnModel(site, attention)
    return found


class InstalledProcessors:
    """LoRA processors installed on a pipeline's attention blocks, and what they replaced.

    :meth:`restore` puts the model's own processors back (UNet) and removes the hooks (CLIP). ``hosts`` maps each
    site key to its processor.
    """

    def __init__(self, unet: nn.Module, sites: dict[str, SiteOnModel],
                 hosts: dict[str, LoRAAttnProcessor | CLIPLoRAAttnProcessor], original_unet_processors: dict) -> None:
        self.unet = unet
        self.sites = sites
        self.hosts = hosts
        self.layer_hosts: dict[str, LayerHost] = {}  # module key → the host of a layer outside attention
        self._original_unet_processors = original_unet_processors
        self._branch_list: list[tuple[str, MultiLoRA, nn.Linear | nn.Conv2d]] | None = None

    def branches(self) -> list[tuple[str, MultiLoRA, nn.Linear | nn.Conv2d]]:
        """(module key, branch, adapted layer) for every projection of every attention host, then every layer
        host. Listed once and kept until a layer host comes or goes: setting weights walks it per adapter."""
        if self._branch_list is None:
            listed = []
            for site_key, host in self.hosts.items():
                site = self.sites[site_key].site
                for projection, branch, layer in host.projection_branches(self.sites[site_key].attention):
                    listed.append((join_module_key(site.component, site.path, projection), branch, layer))
            for module_key, layer_host in self.layer_hosts.items():
                listed.append((module_key, layer_host.branch, layer_host.site.layer))
            self._branch_list = listed
        return self._branch_list

    def host_layers(self, layers: list[LayerSite]) -> None:
        """Put a host on each of ``layers`` that has none yet (build all first, then install: nothing half done)."""
        new = {site.module_key: LayerHost(site) for site in layers if site.module_key not in self.layer_hosts}
        for module_key, layer_host in new.items():
            layer_host.install()
            self.layer_hosts[module_key] = layer_host
        self._branch_list = None

    def drop_idle_layer_hosts(self) -> None:
        """Remove the hosts of layers no adapter is on any more, so an unused layer costs nothing."""
        for module_key, layer_host in list(self.layer_hosts.items()):
            if not len(layer_host.branch.adapters):
                layer_host.uninstall()
                del self.layer_hosts[module_key]
                self._branch_list = None

    def restore(self) -> None:
        for site_key, host in self.hosts.items():
            if isinstance(host, CLIPLoRAAttnProcessor):
                host.uninstall()
                delattr(self.sites[site_key].attention, _HOST_ATTRIBUTE)
        for layer_host in self.layer_hosts.values():
            layer_host.uninstall()
        self.unet.set_attn_processor(self._original_unet_processors)
        self.hosts, self.layer_hosts = {}, {}
        self._branch_list = None


def install_processors(unet: nn.Module, sites: dict[str, SiteOnModel]) -> InstalledProcessors:
    """A LoRA processor on every site of ``sites`` (empty branches), returning the handle that restores the model.

    Every processor is built before the model changes, so a block whose sizes do not fit raises with the model as it
    was. Sites not running diffusers' standard attention are left alone.
    """
    hosts: dict[str, LoRAAttnProcessor | CLIPLoRAAttnProcessor] = {}
    for site_key, placed in sites.items():
        if placed.runs_standard_attention:
            host_class = LoRAAttnProcessor if placed.site.component == "unet" else CLIPLoRAAttnProcessor
            hosts[site_key] = host_class(placed.site, placed.attention)
    originals = dict(unet.attn_processors)
    unet.set_attn_processor({
        name: hosts.get(f"unet.{name.removesuffix('.processor')}", processor) for name, processor in originals.items()
    })
    for site_key, host in hosts.items():
        if isinstance(host, CLIPLoRAAttnProcessor):
            attention = sites[site_key].attention
            attention.add_module(_HOST_ATTRIBUTE, host)
            host.install(attention)
    return InstalledProcessors(unet, sites, hosts, originals)


# ----- every other layer: a thin host on a forward hook ---------------------------------------------------------


@dataclass(frozen=True)
class LayerSite:
    """A Linear or Conv2d of a pipeline component outside the attention projections (feed-forward, ``proj_in``/
    ``proj_out``, resnet and sampler convs, ``conv_in``/``conv_out``, time embeddings, CLIP's MLP, …)."""

    component: str
    path: str
    layer: nn.Module

    @property
    def module_key(self) -> str:
        return join_module_key(self.component, self.path)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.layer.weight.shape)


def _hostable(module: nn.Module) -> bool:
    # LoRA on a grouped or non-zero-padded conv is not what files mean by LoCon; Stable Diffusion has neither.
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros"
    return isinstance(module, nn.Linear)


def layer_sites(components: dict[str, nn.Module], attention: dict[str, SiteOnModel]) -> dict[str, LayerSite]:
    """Every Linear and Conv2d of ``components`` by module key, but the projections of the attention blocks in
    ``attention`` (their processors host those)."""
    projections = {id(placed.attention.get_submodule(projection))
                   for placed in attention.values() for projection in projections_of(placed.site.component)}
    found: dict[str, LayerSite] = {}
    for component, model in components.items():
        for name, module in model.named_modules():
            if name and _hostable(module) and id(module) not in projections:
                site = LayerSite(component, name.removeprefix("text_model."), module)
                found[site.module_key] = site
    return found


class _MixedIn(nn.Module):
    """The parametrization of a hooked layer's weight: the mix's weight while its branch runs the merged form for
    the current call, else ``W`` itself (``torch.nn.utils.parametrize``, as minLoRA does)."""

    def __init__(self, hooked: HookedBranch) -> None:
        super().__init__()
        self._hooked = [hooked]  # in a list: not a submodule

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self._hooked[0].weight_for_this_call(weight)


def _merges(layer: nn.Module) -> bool:
    """Whether the merged form can stand in the layer's own forward: a plain weight nobody else parametrizes and no
    forward replaced on the instance (accelerate's offload and device-map hooks do that)."""
    return (not parametrize.is_parametrized(layer, "weight") and type(layer.weight) is nn.Parameter
            and "forward" not in layer.__dict__ and not hasattr(layer, "_hf_hook"))


class HookedBranch:
    """Joins a :class:`MultiLoRA` to a Linear's or Conv2d's own forward, which runs unchanged (so do any hooks or
    offloading on it).

    A forward pre-hook takes the branch's snapshot and asks for the cheaper form for this input
    (:meth:`MultiLoRA.plan`). Merged: the layer's weight is a parametrization that gives the mix's weight for this
    call (a conv then costs one conv, not three; LoHa, LoKr and DoRA need it). Factored: a forward hook adds
    ``Σ m s B A x``. A full diff's bias change is added by the forward hook in either form.
    """

    def __init__(self, branch: MultiLoRA, layer: nn.Module) -> None:
        self.branch = branch
        self.layer = layer
        self.conv = isinstance(layer, nn.Conv2d)
        self._handles: list = []
        self._merges = False
        self._form: str | None = None
        self._mix = None  # the branch's snapshot for the call under way

    def _plan(self, module: nn.Module, inputs: tuple) -> None:
        self._mix = self.branch.snapshot()
        form = self.branch.plan(inputs[0], self._mix)
        self._form = "factored" if form == "merged" and not self._merges else form

    def weight_for_this_call(self, weight: torch.Tensor) -> torch.Tensor:
        return self.branch.merged_weight(weight, mix=self._mix) if self._form == "merged" else weight

    def _add(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        form, mix, self._form, self._mix = self._form, self._mix, None, None  # the weight is W outside a call
        if form == "factored":
            return output + self.branch.delta(inputs[0], module if self.conv else None, mix).to(output.dtype)
        bias_delta = self.branch.bias_delta(mix) if form == "merged" else None
        if bias_delta is None:
            return output
        shape = (-1, 1, 1) if self.conv else (-1,)
        return output + bias_delta.reshape(shape).to(output.dtype)

    def install(self) -> None:
        self.uninstall()
        self._merges = _merges(self.layer)
        if self._merges:
            parametrize.register_parametrization(self.layer, "weight", _MixedIn(self))
        self._handles = [self.layer.register_forward_pre_hook(self._plan), self.layer.register_forward_hook(self._add)]

    def uninstall(self) -> None:
        if not self._handles:
            return
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._merges:  # only the parametrization this host put there (install refuses a parametrized weight)
            parametrize.remove_parametrizations(self.layer, "weight", leave_parametrized=False)
            self._merges = False


class LayerHost(nn.Module):
    """The thin host of one Linear or Conv2d outside attention: a :class:`MultiLoRA` joined to the layer's forward
    by a :class:`HookedBranch`. It is a submodule of the layer while installed, so it follows the model's
    ``.to(device)``."""

    def __init__(self, site: LayerSite) -> None:
        super().__init__()
        layer = site.layer
        self.site = site
        conv = isinstance(layer, nn.Conv2d)
        in_features = layer.in_channels if conv else layer.in_features
        out_features = layer.out_channels if conv else layer.out_features
        kernel = tuple(layer.kernel_size) if conv else None
        self.branch = MultiLoRA(in_features, out_features, site.module_key, kernel)
        self._hooked = HookedBranch(self.branch, layer)

    def install(self) -> None:
        self.uninstall()
        self.site.layer.add_module(_HOST_ATTRIBUTE, self)
        self._hooked.install()

    def uninstall(self) -> None:
        if _HOST_ATTRIBUTE in self.site.layer._modules:
            self._hooked.uninstall()
            delattr(self.site.layer, _HOST_ATTRIBUTE)
