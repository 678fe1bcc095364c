"""Blend, scale, resize and conversion to LoRA for every kind of update (LoRA, LoCon with and without a Tucker core,
LoHa, LoKr, full diffs, DoRA) on a Linear, a 1×1 conv and a 3×3 conv, against dense maths written here: exact where
the maths allows (1e-5 of the update, fp32), and where it does not, the best factors of the rank with the error the
result reports equal to the error measured."""

import pytest
import torch
from peft.utils import merge_utils

from difflora.adapter import AdapterState, FullModuleWeights, LoHaModuleWeights, LoKrModuleWeights, LoRAModuleWeights
from difflora.blend import as_lora, blend, resize_adapter, scale_adapter
from difflora.blocks import BlockWeights
from difflora.errors import InvalidArgumentError

# Module key → the layer's weight shape; the names are SD's (a 3×3 conv is told by its name when a LoHa or LoKr
# holds it as a matrix, out × in·9, as LyCORIS writes them).
LAYERS = {
    "unet.down_blocks.0.resnets.0.time_emb_proj": (8, 6),
    "unet.down_blocks.0.attentions.0.proj_in": (8, 6, 1, 1),
    "unet.down_blocks.0.resnets.0.conv1": (8, 6, 3, 3),
}
KINDS = ["lora", "tucker", "loha", "loha_tucker", "lokr", "lokr_whole", "full", "dora", "loha_dora"]


def draw(*size, seed):
    return torch.randn(*size, generator=torch.Generator().manual_seed(seed)) * 0.4


def update_of(kind, shape, seed):
    """(module weights as a file holds them, ΔW written here by hand in the layer's shape, DoRA magnitude or None).

    Tucker kinds exist for k×k convs only; on other layers they fall back to their plain form."""
    out_features, in_features, kernel = shape[0], shape[1], shape[2:]
    flat = in_features * (kernel[0] * kernel[1] if kernel else 1)
    tucker = kind.endswith("tucker") and kernel == (3, 3)
    magnitude = draw(out_features, seed=seed + 9).abs() + 0.5 if kind.endswith("dora") else None
    if kind in ("lora", "dora") or (kind == "tucker" and not tucker):
        down, up = draw(3, in_features, *kernel, seed=seed), draw(out_features, 3, *[1] * len(kernel), seed=seed + 1)
        delta = (up.flatten(1) @ down.flatten(1)).reshape(shape) * (2.0 / 3)
        return LoRAModuleWeights(down, up, alpha=2.0, dora_scale=magnitude), delta, magnitude
    if kind == "tucker":
        down, up = draw(3, in_features, 1, 1, seed=seed), draw(out_features, 3, 1, 1, seed=seed + 1)
        mid = draw(3, 3, *kernel, seed=seed + 2)
        delta = torch.einsum("op,pqhw,qi->oihw", up.flatten(1), mid, down.flatten(1)) * (5.0 / 3)
        return LoRAModuleWeights(down, up, alpha=5.0, mid=mid), delta, None
    if kind.startswith("loha") and tucker:
        w1a, w1b, w2a, w2b = (draw(2, out_features, seed=seed), draw(2, in_features, seed=seed + 1),
                              draw(2, out_features, seed=seed + 2), draw(2, in_features, seed=seed + 3))
        t1, t2 = draw(2, 2, *kernel, seed=seed + 4), draw(2, 2, *kernel, seed=seed + 5)
        first = torch.einsum("ijhw,io,jc->ochw", t1, w1a, w1b)
        second = torch.einsum("ijhw,io,jc->ochw", t2, w2a, w2b)
        return LoHaModuleWeights(w1a, w1b, w2a, w2b, alpha=1.0, t1=t1, t2=t2), first * second * 0.5, None
    if kind.startswith("loha"):
        w1a, w1b, w2a, w2b = (draw(out_features, 2, seed=seed), draw(2, flat, seed=seed + 1),
                              draw(out_features, 2, seed=seed + 2), draw(2, flat, seed=seed + 3))
        delta = ((w1a @ w1b) * (w2a @ w2b)).reshape(shape) * (4.0 / 2)
        return LoHaModuleWeights(w1a, w1b, w2a, w2b, alpha=4.0, dora_scale=magnitude), delta, magnitude
    if kind == "lokr":  # w1 whole (2 × 2), w2 factorised at rank 2: scale alpha / 2
        w1, w2a = draw(2, 2, seed=seed), draw(out_features // 2, 2, seed=seed + 1)
        w2b = draw(2, flat // 2, seed=seed + 2)
        right = (w2a @ w2b).reshape(out_features // 2, in_features // 2, *kernel)
        delta = torch.kron(w1.reshape(2, 2, *[1] * len(kernel)), right) * (3.0 / 2)
        return LoKrModuleWeights(w1=w1, w2a=w2a, w2b=w2b, alpha=3.0), delta, None
    if kind == "lokr_whole":  # both sides whole, w2 with the kernel: no scale
        w1, w2 = draw(4, 2, seed=seed), draw(out_features // 4, in_features // 2, *kernel, seed=seed + 1)
        return LoKrModuleWeights(w1=w1, w2=w2), torch.kron(w1.reshape(4, 2, *[1] * len(kernel)), w2), None
    diff = draw(*shape, seed=seed)
    return FullModuleWeights(diff), diff, None


def state_of(kind, seed=0):
    """(AdapterState with ``kind`` on every layer, {key: ΔW by hand}, {key: magnitude})."""
    modules, deltas, magnitudes = {}, {}, {}
    for index, (key, shape) in enumerate(LAYERS.items()):
        modules[key], deltas[key], magnitudes[key] = update_of(kind, shape, seed + 10 * index)
    return AdapterState(modules=modules), deltas, magnitudes


def lora_delta(module: LoRAModuleWeights, shape) -> torch.Tensor:
    """A result's ΔW, by hand: scale · up @ down, in the layer's shape."""
    assert module.kind == "lora" and module.mid is None
    return (module.up.flatten(1).double() @ module.down.flatten(1).double()).reshape(shape) * module.scale


def relative(ours, exact) -> float:
    return float((ours.double() - exact.double()).norm() / exact.double().norm())


def best_error(matrix, rank) -> float:
    singular = torch.linalg.svdvals(matrix.double().flatten(1))
    return float(singular[rank:].norm() / singular.norm())


def dora_change(weight, delta, magnitude, strength):
    """W' − W for DoRA at ``strength`` (A1111/ComfyUI): W + m·(g ⊙ V/‖V‖ − W) with V = W + ΔW, norm per output row."""
    target = weight + delta
    norms = target.flatten(1).norm(dim=1).reshape(-1, *[1] * (target.ndim - 1))
    return strength * (magnitude.reshape(norms.shape) * target / norms - weight)


@pytest.mark.parametrize("other", [k for k in KINDS if k not in ("lora", "tucker", "dora", "loha_dora")])
def test_concat_keeps_lora_kinds_exact_and_adds_other_kinds_at_their_best_rank(other):
    lora, lora_deltas, _ = state_of("lora", seed=1)
    tucker, tucker_deltas, _ = state_of("tucker", seed=2)
    others, other_deltas, _ = state_of(other, seed=3)

    exact_only = blend([(lora, 0.7), (tucker, -0.3)])
    assert exact_only.max_relative_error == 0.0
    for key, shape in LAYERS.items():
        module = exact_only.state.modules[key]
        assert module.rank == 6 and module.weight_shape == shape  # a conv stays a conv LoRA: k×k down, 1×1 up
        expected = 0.7 * lora_deltas[key] - 0.3 * tucker_deltas[key]
        assert relative(lora_delta(module, shape), expected) < 1e-5

    with pytest.raises(InvalidArgumentError) as caught:
        blend([(lora, 0.7), (others, 0.5)])
    assert caught.value.parameter == "rank" and str(caught.value).startswith("rank is required to concat adapter 2")

    result = blend([(lora, 0.7), (tucker, -0.3), (others, 0.5)], rank=1)
    for key, shape in LAYERS.items():
        module = result.state.modules[key]
        exact_part = 0.7 * lora_deltas[key] - 0.3 * tucker_deltas[key]
        exact = exact_part + 0.5 * other_deltas[key]
        assert module.rank == 7 and module.weight_shape == shape
        # The LoRA kinds' part is kept exactly; the other kind's part is its best rank-1 approximation.
        dropped = best_error(0.5 * other_deltas[key], 1) * float((0.5 * other_deltas[key]).double().norm())
        assert result.relative_errors[key] == pytest.approx(dropped / float(exact.double().norm()), rel=1e-4, abs=1e-6)
        assert relative(lora_delta(module, shape), exact) == pytest.approx(result.relative_errors[key], rel=1e-4,
                                                                           abs=1e-6)
    full_rank = blend([(lora, 0.7), (others, 0.5)], rank=54)  # every singular value kept: exact
    for key, shape in LAYERS.items():
        exact = 0.7 * lora_deltas[key] + 0.5 * other_deltas[key]
        assert relative(lora_delta(full_rank.state.modules[key], shape), exact) < 1e-5
        assert full_rank.relative_errors[key] < 1e-5


def test_svd_ties_and_dare_take_every_kind_through_its_dense_update():
    states = [state_of(kind, seed=5 * index) for index, kind in enumerate(("loha", "lokr", "full", "tucker"))]
    weights = [0.6, -0.4, 0.3, 0.8]
    adapters = [(state, weight) for (state, _, _), weight in zip(states, weights)]
    for rank in (2, 54):
        result = blend(adapters, method="svd", rank=rank)
        for key, shape in LAYERS.items():
            exact = sum(weight * deltas[key] for (_, deltas, _), weight in zip(states, weights))
            achieved = relative(lora_delta(result.state.modules[key], shape), exact)
            optimum = best_error(exact, rank)
            assert achieved == pytest.approx(optimum, rel=1e-4, abs=1e-6)  # Eckart–Young: the best of that rank
            assert result.relative_errors[key] == pytest.approx(optimum, rel=1e-4, abs=1e-6)
            assert rank < 6 or achieved < 1e-5
    for method, merge in (("ties", merge_utils.ties), ("dare", merge_utils.dare_linear)):
        torch.manual_seed(3)
        result = blend(adapters, method=method, rank=54, density=0.6)
        torch.manual_seed(3)  # DARE's random drops, drawn in the blend's order of modules (sorted)
        for key, shape in sorted(LAYERS.items()):
            merged = merge([deltas[key].flatten(1) for _, deltas, _ in states], torch.tensor(weights), 0.6)
            assert relative(lora_delta(result.state.modules[key], shape), merged.reshape(shape)) < 1e-5


@pytest.mark.parametrize("kind", [k for k in KINDS if not k.endswith("dora")])
def test_scale_is_exact_for_every_kind_and_keeps_its_kind(kind):
    state, deltas, _ = state_of(kind, seed=7)
    blocks = BlockWeights.parse("down.0=0.5")
    scaled = scale_adapter(state, weight=-1.5, block_weights=blocks)
    for key, module in scaled.modules.items():
        assert module.kind == state.modules[key].kind
        expected = -1.5 * 0.5 * deltas[key]
        assert relative(module.delta_weight().reshape(expected.shape), expected) < 1e-5
        assert relative(state.modules[key].delta_weight().reshape(expected.shape), deltas[key]) < 1e-6  # untouched
    if kind == "full":
        bias = FullModuleWeights(draw(8, 6, seed=1), draw(8, seed=2))
        scaled_bias = scale_adapter(AdapterState(modules={"unet.x": bias}), weight=0.25).modules["unet.x"]
        assert torch.equal(scaled_bias.diff_b, bias.diff_b * 0.25)


def test_scale_keeps_dora_at_one_drops_it_at_zero_and_refuses_other_factors():
    state, _, _ = state_of("dora", seed=8)
    assert scale_adapter(state, 1.0).modules == state.modules
    kept = scale_adapter(state, 1.0, BlockWeights.parse("down=0")).modules
    assert kept == {}  # every module is in down block 0: at weight 0 a DoRA changes nothing
    with pytest.raises(InvalidArgumentError) as caught:
        scale_adapter(state, 0.5)
    key = next(iter(LAYERS))
    assert str(caught.value) == (
        f"state: module {key!r} is lora with DoRA, whose change is not linear in its weight: it cannot be scaled by "
        "0.5 without the base model's weights (factors 0 and 1 can)")


@pytest.mark.parametrize("kind", KINDS)
def test_resize_turns_every_kind_into_its_best_lora_and_reports_the_error(kind):
    state, deltas, magnitudes = state_of(kind, seed=9)
    for rank in (1, 54):
        result = resize_adapter(state, rank=rank)
        for key, shape in LAYERS.items():
            module = result.state.modules[key]
            # A conv's kernel as the file tells it (a 1×1 conv's LoHa is a matrix: a Linear-shaped LoRA, which the
            # runtime, A1111 and ComfyUI apply to a 1×1 conv), and SD's 3×3 by the layer's name.
            told = len(state.modules[key].weight_shape) == 4 or shape[2:] == (3, 3)
            assert module.kind == "lora" and module.weight_shape == (shape if told else shape[:2])
            achieved = relative(lora_delta(module, shape), deltas[key])
            assert achieved == pytest.approx(best_error(deltas[key], rank), rel=1e-4, abs=2e-6)
            assert result.relative_errors[key] == pytest.approx(achieved, rel=1e-4, abs=2e-6)
            if magnitudes[key] is not None:  # DoRA stays DoRA: the update inside it resized, the magnitude kept
                assert torch.equal(module.dora_scale, magnitudes[key])
    energy = resize_adapter(state, energy=0.999999)
    assert all(error < 2e-3 for error in energy.relative_errors.values())


def holds_plain_lora(module_key, module):
    return module.kind == "lora" and module.dora_scale is None


def holds_lora_and_dora(module_key, module):
    return module.kind == "lora" and module.wd_on_output


def test_as_lora_keeps_what_the_target_holds_and_turns_the_rest_into_lora():
    lora, _, _ = state_of("lora", seed=11)
    loha, loha_deltas, _ = state_of("loha", seed=12)
    mixed = AdapterState(modules={**{f"{key}": module for key, module in loha.modules.items()},
                                  "unet.conv_in": lora.modules["unet.down_blocks.0.resnets.0.conv1"]},
                         metadata={"ss_output_name": "x"}, skipped=["lora_unet_x.w_norm"])
    result = as_lora(mixed, 54, holds_plain_lora)
    assert result.state.modules["unet.conv_in"] is mixed.modules["unet.conv_in"]  # written as it is
    assert set(result.relative_errors) == set(LAYERS)  # only the modules turned into LoRA have an error
    for key, shape in LAYERS.items():
        assert relative(lora_delta(result.state.modules[key], shape), loha_deltas[key]) < 1e-5
    assert result.state.metadata == mixed.metadata and result.state.skipped == mixed.skipped
    low = as_lora(mixed, 1, holds_plain_lora)
    for key in LAYERS:
        assert low.relative_errors[key] == pytest.approx(best_error(loha_deltas[key], 1), rel=1e-4)

    with pytest.raises(InvalidArgumentError) as caught:
        as_lora(mixed, None, holds_plain_lora)
    assert caught.value.parameter == "rank" and str(caught.value).startswith(
        "rank is required: module 'unet.down_blocks.0.resnets.0.time_emb_proj' is loha, which the target holds only "
        "as LoRA by SVD at that rank")
    dora, _, _ = state_of("loha_dora", seed=13)
    key = next(iter(LAYERS))
    with pytest.raises(InvalidArgumentError) as caught:
        as_lora(dora, 4, holds_plain_lora)
    assert str(caught.value).startswith(f"state: module {key!r} is loha with DoRA, which the target cannot hold; "
                                        "DoRA's change depends on the base model's weights")
    kept = as_lora(dora, 54, holds_lora_and_dora)  # a target holding PEFT's DoRA: the magnitude travels
    assert all(module.kind == "lora" and module.dora_scale is not None for module in kept.state.modules.values())


def test_blend_refuses_dora_and_bias_changes_without_what_they_need_and_takes_dora_with_the_base():
    dora, deltas, magnitudes = state_of("dora", seed=14)
    lora, lora_deltas, _ = state_of("lora", seed=15)
    key = next(iter(LAYERS))
    with pytest.raises(InvalidArgumentError) as caught:
        blend([(lora, 1.0), (dora, 1.0)], rank=4)
    assert caught.value.parameter == "adapters"
    assert str(caught.value) == (
        f"adapters: adapter 2's module {key!r} is lora with DoRA, whose change depends on the base model's weights: "
        "give them, or use the adapter as it is (generate, merge)")
    with_bias = AdapterState(modules={key: FullModuleWeights(draw(8, 6, seed=1), draw(8, seed=2))})
    with pytest.raises(InvalidArgumentError, match="is a full diff that also changes the bias"):
        blend([(with_bias, 1.0)], method="svd", rank=2)

    base = {key: draw(*shape, seed=20 + index) for index, (key, shape) in enumerate(LAYERS.items())}
    result = blend([(lora, -0.5), (dora, 0.7)], method="svd", rank=54, base_weights=base)
    for key, shape in LAYERS.items():
        exact = -0.5 * lora_deltas[key] + dora_change(base[key], deltas[key], magnitudes[key], 0.7)
        assert relative(lora_delta(result.state.modules[key], shape), exact) < 1e-5
