"""Adapters on every Linear and Conv2d, not only attention: the same runtime, the same maths, exact.

Kohya's default LoRA touches the transformer blocks' feed-forward and projections and CLIP's MLP; LoCon adds the
resnet, sampler and outer convs. Each is checked against the same change merged into the model's weights by
independent code, with weights, block weights, fusing and removal as for attention.
"""

import pytest
import torch
from torch import nn

from difflora import BlockWeights, LoRARuntime
from difflora.adapter import AdapterState, LoRAModuleWeights
from difflora.errors import AdapterShapeError
from difflora.keys import CLIP_PROJECTIONS, UNET_PROJECTIONS
from difflora.pipelines import load_pipeline
from helpers import outputs


PROJECTIONS = tuple("." + projection for projection in UNET_PROJECTIONS + CLIP_PROJECTIONS)


@pytest.fixture
def pipe(tiny_model_dir):
    return load_pipeline(tiny_model_dir, quiet=True)


def every_layer(pipe) -> dict[str, nn.Module]:
    """Module key → layer for every Linear and Conv2d of the UNet and text encoder (attention projections too),
    found here without difflora's code."""
    found = {}
    for component in ("unet", "text_encoder"):
        for name, module in getattr(pipe, component).named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                found[f"{component}.{name.removeprefix('text_model.')}"] = module
    return found


def random_update(shape, rank, seed, tucker=False) -> LoRAModuleWeights:
    generator = torch.Generator().manual_seed(seed)

    def draw(*size):
        return torch.randn(*size, generator=generator) * 0.2

    if len(shape) == 2:
        return LoRAModuleWeights(draw(rank, shape[1]), draw(shape[0], rank), alpha=rank / 2)
    if tucker:
        return LoRAModuleWeights(draw(rank, shape[1], 1, 1), draw(shape[0], rank, 1, 1), alpha=rank / 2,
                                 mid=draw(rank, rank, *shape[2:]))
    return LoRAModuleWeights(draw(rank, shape[1], *shape[2:]), draw(shape[0], rank, 1, 1), alpha=rank / 2)


def merged_by_hand(pipe, state: AdapterState, multiplier_of) -> None:
    """W ← W + m · (alpha/rank) · ΔW for every module, ΔW built here with plain tensor ops (einsum for Tucker)."""
    layers = every_layer(pipe)
    with torch.no_grad():
        for key, module in state.modules.items():
            layer = layers[key]
            up, down = module.up.flatten(1), module.down.flatten(1)
            if module.mid is None:
                delta = (up @ down).reshape(layer.weight.shape)
            else:
                delta = torch.einsum("op,pqhw,qi->oihw", up, module.mid, down)
            layer.weight += multiplier_of(key) * (module.alpha / module.rank) * delta


def close(ours, theirs, effect_from):
    """Equal to 1e-5 of the effect's size, and the effect itself is not nothing."""
    for mine, reference, base in zip(ours, theirs, effect_from):
        effect = (reference - base).abs().max()
        assert effect > 1e-2
        assert (mine - reference).abs().max() <= 1e-5 * max(1.0, float(effect)), (mine - reference).abs().max()


@pytest.mark.parametrize("form", ["merged", "factored"])
def test_every_linear_and_conv_carries_an_adapter_exactly(pipe, tiny_model_dir, monkeypatch, form):
    # Each call takes the cheaper form (lora.merged_form_is_cheaper); force each in turn, with several adapters.
    import difflora.lora as lora_module

    allowance = 1e9 if form == "merged" else 0.0
    monkeypatch.setattr(lora_module, "MERGED_FLOPS_ALLOWANCE", {"training": allowance, "inference": allowance})
    layers = every_layer(pipe)
    state = AdapterState(modules={key: random_update(tuple(layer.weight.shape), 2, seed)
                                  for seed, (key, layer) in enumerate(layers.items())})
    kinds = {type(layers[key]).__name__ + ("3x3" if layers[key].weight.ndim == 4 and layers[key].weight.shape[-1]
                                            == 3 else "") for key in state.modules}
    assert kinds == {"Linear", "Conv2d", "Conv2d3x3"}  # 1×1 convs (proj_in/out), 3×3 convs and Linears
    second = AdapterState(modules={key: random_update(tuple(layer.weight.shape), 3, seed + 1000, tucker=seed % 2 == 0
                                                     and layer.weight.ndim == 4 and layer.weight.shape[-1] == 3)
                                   for seed, (key, layer) in enumerate(layers.items())})
    base = outputs(pipe)
    runtime = LoRARuntime.attach(pipe)
    runtime.add_adapter("every", state, weight=0.7)
    runtime.add_adapter("second", second, weight=-0.4)
    reference = load_pipeline(tiny_model_dir, quiet=True)
    merged_by_hand(reference, state, lambda key: 0.7)
    merged_by_hand(reference, second, lambda key: -0.4)
    close(outputs(pipe), outputs(reference), base)


def test_tucker_conv_and_a_linear_file_on_a_1x1_conv(pipe, tiny_model_dir):
    layers = every_layer(pipe)
    conv3 = next(key for key, layer in layers.items() if layer.weight.ndim == 4 and layer.weight.shape[-1] == 3)
    conv1 = next(key for key, layer in layers.items() if layer.weight.ndim == 4 and layer.weight.shape[-1] == 1)
    tucker = random_update(tuple(layers[conv3].weight.shape), 3, seed=5, tucker=True)
    as_linear = random_update(tuple(layers[conv1].weight.shape[:2]), 2, seed=6)  # a file made for SD 2's Linear
    state = AdapterState(modules={conv3: tucker, conv1: as_linear})
    base = outputs(pipe)
    LoRARuntime.attach(pipe).add_adapter("mixed", state, weight=1.3)
    reference = load_pipeline(tiny_model_dir, quiet=True)
    as_conv = LoRAModuleWeights(as_linear.down[:, :, None, None], as_linear.up[:, :, None, None], as_linear.alpha)
    merged_by_hand(reference, AdapterState(modules={conv3: tucker, conv1: as_conv}), lambda key: 1.3)
    close(outputs(pipe)[:1], outputs(reference)[:1], base[:1])  # UNet layers only


def test_resnets_and_samplers_follow_their_block_weight(pipe, tiny_model_dir):
    layers = every_layer(pipe)
    state = AdapterState(modules={key: random_update(tuple(layer.weight.shape), 2, seed)
                                  for seed, (key, layer) in enumerate(layers.items()) if key.startswith("unet.")})
    weights = BlockWeights(down=0.5, mid=2.0, up=0.0, per_block={"down.1": -1.0})

    def by_hand(key):  # written out from the paths, not from BlockWeights
        path = key.removeprefix("unet.")
        if path.startswith("down_blocks.1."):
            return 0.8 * -1.0
        if path.startswith("down_blocks."):
            return 0.8 * 0.5
        if path.startswith("mid_block."):
            return 0.8 * 2.0
        if path.startswith("up_blocks."):
            return 0.0
        return 0.8  # conv_in, conv_out, time embedding: no block

    assert any(".resnets." in key for key in state.modules) and any("samplers" in key for key in state.modules)
    base = outputs(pipe)
    LoRARuntime.attach(pipe).add_adapter("blocks", state, weight=0.8, block_weights=weights)
    reference = load_pipeline(tiny_model_dir, quiet=True)
    merged_by_hand(reference, state, by_hand)
    close(outputs(pipe)[:1], outputs(reference)[:1], base[:1])


def test_fuse_unfuse_bit_exact_and_removal_leaves_no_hook(pipe):
    layers = every_layer(pipe)
    keys_before = set(pipe.unet.state_dict())
    originals = {key: layer.weight.detach().clone() for key, layer in layers.items()}
    state = AdapterState(modules={key: random_update(tuple(layer.weight.shape), 2, seed)
                                  for seed, (key, layer) in enumerate(layers.items())})
    runtime = LoRARuntime.attach(pipe)
    runtime.add_adapter("a", state, weight=0.6)
    unfused = outputs(pipe)
    for _ in range(3):
        runtime.fuse()
        assert any(not torch.equal(layer.weight, originals[key]) for key, layer in layers.items() if ".conv" in key)
        fused = outputs(pipe)
        runtime.unfuse()
        assert all(torch.equal(layer.weight, originals[key]) for key, layer in layers.items())
    for mine, theirs in zip(fused, unfused):
        assert (mine - theirs).abs().max() < 1e-4
    runtime.remove_all()
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in layers.values())
    assert not any("difflora" in name for name, _ in pipe.unet.named_modules())
    assert all(type(layer) in (nn.Linear, nn.Conv2d) for layer in layers.values())  # no parametrization left
    assert all(torch.equal(layer.weight, originals[key]) for key, layer in layers.items())
    assert set(pipe.unet.state_dict()) == keys_before


def test_hosts_sit_only_on_adapted_layers(pipe):
    layers = every_layer(pipe)
    conv = next(key for key in layers if key.endswith("resnets.0.conv1"))
    runtime = LoRARuntime.attach(pipe)
    runtime.add_adapter("one", AdapterState(modules={conv: random_update(tuple(layers[conv].weight.shape), 2, 1)}))
    outside_attention = {key: layer for key, layer in layers.items() if not key.endswith(PROJECTIONS)}
    hooked = sorted(key for key, layer in outside_attention.items() if layer._forward_hooks)
    assert hooked == [conv]  # a single-layer adapter costs nothing on the other layers
    runtime.create_adapter("attention", rank=2)
    runtime.remove("one")
    assert not any(layer._forward_hooks for layer in outside_attention.values())  # attention-only: no layer hosts


def test_a_module_that_is_no_layer_or_does_not_fit_changes_nothing(pipe):
    layers = every_layer(pipe)
    conv = next(key for key in layers if key.endswith("resnets.0.conv1"))
    runtime = LoRARuntime.attach(pipe)
    before = outputs(pipe)
    good = random_update(tuple(layers[conv].weight.shape), 2, 1)
    wrong_kernel = LoRAModuleWeights(good.down[:, :, :1, :1], good.up, good.alpha)
    for modules, message in (({"unet.down_blocks.0.resnets.0.nowhere": good}, "is not a layer of this model"),
                             ({conv: wrong_kernel}, "changes a weight of shape")):
        with pytest.raises(AdapterShapeError, match=message):
            runtime.add_adapter("bad", AdapterState(modules={**modules}))
    assert runtime.adapters == {} and not layers[conv]._forward_hooks
    for mine, theirs in zip(outputs(pipe), before):
        assert torch.equal(mine, theirs)


def test_blend_resize_and_scale_keep_conv_and_tucker_updates_exact():
    from difflora.blend import blend, resize_adapter, scale_adapter

    shape = (8, 6, 3, 3)
    locon, tucker = random_update(shape, 3, seed=1), random_update(shape, 2, seed=2, tucker=True)
    first, second = AdapterState(modules={"unet.conv_in": locon}), AdapterState(modules={"unet.conv_in": tucker})
    expected = 0.7 * locon.delta_weight() - 0.3 * tucker.delta_weight()
    concat = blend([(first, 0.7), (second, -0.3)]).state.modules["unet.conv_in"]
    assert concat.down.shape == (5, 6, 3, 3) and concat.up.shape == (8, 5, 1, 1)
    torch.testing.assert_close(concat.delta_weight(), expected, rtol=1e-5, atol=1e-6)
    result = blend([(first, 0.7), (second, -0.3)], method="svd", rank=2)
    achieved = (result.state.modules["unet.conv_in"].delta_weight() - expected).norm() / expected.norm()
    assert abs(float(achieved) - result.relative_errors["unet.conv_in"]) < 1e-5 and 0 < achieved < 1
    full = resize_adapter(second, rank=2).state.modules["unet.conv_in"]  # a Tucker core folds in exactly
    assert full.mid is None and full.down.shape == (2, 6, 3, 3)
    torch.testing.assert_close(full.delta_weight(), tucker.delta_weight(), rtol=1e-5, atol=1e-6)
    scaled = scale_adapter(second, weight=-2.0).modules["unet.conv_in"]
    torch.testing.assert_close(scaled.delta_weight(), -2.0 * tucker.delta_weight())
