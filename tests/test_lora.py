"""The LoRA maths on its own: factors, several adapters on one layer, fusing."""

import math

import pytest
import torch
from torch import nn

from difflora.errors import FuseError, InvalidArgumentError
import difflora.lora as lora_module
from difflora.lora import LoRAFactors, lora_scale, merged_form_is_cheaper
from difflora.multilora import MultiLoRA


def random_factors(in_features, out_features, rank, alpha, seed, use_rslora=False):
    generator = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, in_features, generator=generator)
    up = torch.randn(out_features, rank, generator=generator)
    return LoRAFactors.from_tensors(down, up, alpha=alpha, use_rslora=use_rslora)


def test_scale_is_alpha_over_rank_or_sqrt_rank():
    assert lora_scale(8, 4) == 0.5
    assert lora_scale(16, 4, use_rslora=True) == 1.0
    with pytest.raises(InvalidArgumentError, match="rank"):
        lora_scale(0, 1)


def test_new_factors_start_as_zero_change_and_reject_bad_sizes():
    factors = LoRAFactors(12, 10, rank=4, alpha=8)
    assert torch.count_nonzero(factors.up) == 0 and torch.count_nonzero(factors.down) > 0
    assert torch.equal(factors.delta_weight(), torch.zeros(10, 12))
    for kwargs in ({"rank": 0}, {"rank": -2}, {"rank": 2.5}):
        with pytest.raises(InvalidArgumentError, match="rank"):
            LoRAFactors(12, 10, **kwargs)
    with pytest.raises(InvalidArgumentError, match="in_features"):
        LoRAFactors(0, 10, rank=2)


def test_forward_equals_merged_weight():
    factors = random_factors(12, 10, rank=3, alpha=5, seed=0)
    x = torch.randn(7, 12)
    expected = x @ (5 / 3 * factors.up @ factors.down).t()
    torch.testing.assert_close(factors(x), expected, rtol=0, atol=1e-5)


def test_weighted_adapters_equal_weighted_sum_of_deltas():
    layer = nn.Linear(12, 10)
    branch = MultiLoRA(12, 10)
    a, b = random_factors(12, 10, 4, 8, seed=1), random_factors(12, 10, 2, 1, seed=2, use_rslora=True)
    branch.add("a", a, multiplier=0.7)
    branch.add("b", b, multiplier=-0.3)
    x = torch.randn(5, 12)
    merged = layer.weight + 0.7 * a.delta_weight() - 0.3 * b.delta_weight()
    expected = x @ merged.t() + layer.bias
    with torch.no_grad():
        out = layer(x) + branch.delta(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert (out - layer(x)).abs().max() > 1e-2  # the adapters really change the output


def test_zero_multiplier_and_removal_cost_nothing():
    branch = MultiLoRA(6, 6)
    branch.add("a", random_factors(6, 6, 2, 2, seed=3), multiplier=0.0)
    assert branch.delta(torch.randn(2, 6)) is None
    branch.set_multiplier("a", 1.0)
    assert branch.delta(torch.randn(2, 6)) is not None
    branch.remove("a")
    assert branch.delta(torch.randn(2, 6)) is None


def test_stacked_cache_follows_multiplier_and_in_place_updates():
    branch = MultiLoRA(6, 4)
    factors = random_factors(6, 4, 2, 2, seed=4)
    branch.add("a", factors, multiplier=1.0)
    x = torch.randn(3, 6)
    with torch.no_grad():
        first = branch.delta(x)
        branch.set_multiplier("a", 2.0)
        torch.testing.assert_close(branch.delta(x), 2 * first)
        factors.up.mul_(3.0)  # an optimizer step or load_state_dict writes in place
        torch.testing.assert_close(branch.delta(x), 6 * first)


def test_gradients_flow_to_both_factors_in_training():
    branch = MultiLoRA(6, 4)
    factors = LoRAFactors(6, 4, rank=2, alpha=4)
    with torch.no_grad():
        factors.up.normal_()  # up = 0 (a new adapter) would leave down without a gradient to check
    branch.add("train", factors, multiplier=0.5)
    x, target = torch.randn(3, 6), torch.randn(3, 4)
    (branch.delta(x) * target).sum().backward()
    # The same loss on plain tensors: ∂/∂B and ∂/∂A of Σ (m·s·B A x) ⊙ T.
    down = factors.down.detach().clone().requires_grad_()
    up = factors.up.detach().clone().requires_grad_()
    (((x @ down.t()) @ up.t()) * (0.5 * factors.scale) * target).sum().backward()
    torch.testing.assert_close(factors.up.grad, up.grad)
    torch.testing.assert_close(factors.down.grad, down.grad)
    assert torch.count_nonzero(factors.up.grad) > 0 and torch.count_nonzero(factors.down.grad) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fuse_unfuse_is_bit_exact_over_many_cycles(dtype):
    torch.manual_seed(0)
    layer = nn.Linear(16, 8).to(dtype)
    original = layer.weight.detach().clone()
    branch = MultiLoRA(16, 8)
    branch.add("a", random_factors(16, 8, 4, 8, seed=5), multiplier=0.7)
    branch.add("b", random_factors(16, 8, 2, 2, seed=6), multiplier=-0.3)
    for _ in range(50):
        branch.fuse(layer)
        assert not torch.equal(layer.weight, original)
        branch.unfuse(layer)
    assert torch.equal(layer.weight, original)


def test_fused_layer_equals_unfused_branch():
    layer = nn.Linear(16, 8)
    branch = MultiLoRA(16, 8)
    branch.add("a", random_factors(16, 8, 4, 8, seed=7), multiplier=0.5)
    x = torch.randn(4, 16)
    with torch.no_grad():
        unfused = layer(x) + branch.delta(x)
        branch.fuse(layer)
        assert branch.delta(x) is None  # fused: the branch adds nothing on top
        fused = layer(x)
    torch.testing.assert_close(fused, unfused, rtol=0, atol=1e-5)


def test_a_committed_fuse_keeps_the_fused_weight_and_forgets_the_original():
    layer = nn.Linear(16, 8)
    branch = MultiLoRA(16, 8)
    branch.add("a", random_factors(16, 8, 4, 8, seed=9), multiplier=0.5)
    branch.fuse(layer)
    fused = layer.weight.detach().clone()
    branch.commit_fuse()
    assert not branch.fused and "original_weight" not in branch._buffers
    branch.unfuse(layer)  # nothing left to restore
    assert torch.equal(layer.weight, fused)


def test_fuse_refuses_non_finite_result_and_changes_nothing():
    layer = nn.Linear(4, 4)
    original = layer.weight.detach().clone()
    branch = MultiLoRA(4, 4, "unet.block.to_q")
    bad = random_factors(4, 4, 1, 1, seed=8)
    with torch.no_grad():
        bad.up.fill_(math.inf)
    branch.add("bad", bad)
    with pytest.raises(FuseError, match="weight of adapter 'bad' is too large for unet.block.to_q in float32"):
        branch.fuse(layer)
    assert torch.equal(layer.weight, original) and not branch.fused
    # A change that fp16 holds, on a weight it also holds, whose sum it does not: the fused weight is checked too.
    half = nn.Linear(1, 1).half()
    with torch.no_grad():
        half.weight.fill_(60000.0)
    kept = half.weight.detach().clone()
    sum_too_large = MultiLoRA(1, 1)
    sum_too_large.add("big", LoRAFactors.from_tensors(torch.ones(1, 1), torch.full((1, 1), 60000.0)))
    with pytest.raises(FuseError, match="NaN/inf"):
        sum_too_large.fuse(half)
    assert torch.equal(half.weight, kept) and not sum_too_large.fused


def test_shape_mismatch_names_both_shapes():
    branch = MultiLoRA(6, 4)
    with pytest.raises(InvalidArgumentError, match=r"shape \(4, 5\), the layer's is \(4, 6\)"):
        branch.add("a", LoRAFactors(5, 4, rank=2))
    conv = MultiLoRA(6, 4, kernel_size=(3, 3))
    with pytest.raises(InvalidArgumentError, match=r"shape \(4, 6, 1, 1\), the layer's is \(4, 6, 3, 3\)"):
        conv.add("a", LoRAFactors(6, 4, rank=2, kernel_size=(1, 1)))


def force(monkeypatch, form: str) -> None:
    allowance = 1e9 if form == "merged" else 0.0
    monkeypatch.setattr(lora_module, "MERGED_FLOPS_ALLOWANCE", {"training": allowance, "inference": allowance})


def _two_adapter_branch(trainable: bool) -> tuple[nn.Linear, MultiLoRA, LoRAFactors, LoRAFactors]:
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    layer.requires_grad_(False)
    branch = MultiLoRA(16, 8)
    a, b = random_factors(16, 8, 4, 8, seed=8), random_factors(16, 8, 2, 2, seed=9, use_rslora=True)
    for factors in (a, b):
        factors.requires_grad_(trainable)
    branch.add("a", a, multiplier=0.7)
    branch.add("b", b, multiplier=-0.3)
    return layer, branch, a, b


@pytest.mark.parametrize("form", ["merged", "factored"])
def test_both_forms_of_linear_equal_the_merged_weight_and_give_the_same_gradients(monkeypatch, form):
    # The allowance decides the form: huge → always merged, 0 → always factored.
    force(monkeypatch, form)
    layer, branch, a, b = _two_adapter_branch(trainable=True)
    x = torch.randn(3, 5, 16, requires_grad=True)
    target = torch.randn(3, 5, 8)
    merged_weight = layer.weight + 0.7 * a.delta_weight() - 0.3 * b.delta_weight()
    expected = x @ merged_weight.t() + layer.bias
    (expected * target).sum().backward()
    expected_grads = [t.grad.clone() for t in (x, a.down, a.up, b.down, b.up)]
    for t in (x, a.down, a.up, b.down, b.up):
        t.grad = None

    out = branch.linear(layer, x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    (out * target).sum().backward()
    for got, want in zip((x.grad, a.down.grad, a.up.grad, b.down.grad, b.up.grad), expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["merged", "factored"])
def test_linear_without_gradients_matches_fused_layer(monkeypatch, form):
    force(monkeypatch, form)
    layer, branch, _, _ = _two_adapter_branch(trainable=False)
    x = torch.randn(4, 16)
    with torch.no_grad():
        unfused = branch.linear(layer, x)
        branch.fuse(layer)
        fused = branch.linear(layer, x)  # fused: the plain layer
        branch.unfuse(layer)
        branch.set_multiplier("a", 0.0)
        branch.set_multiplier("b", 0.0)
        assert torch.equal(branch.linear(layer, x), layer(x))  # nothing active: the plain layer
    torch.testing.assert_close(fused, unfused, rtol=0, atol=1e-5)


def test_layers_with_hooks_keep_their_own_forward(monkeypatch):
    force(monkeypatch, "merged")  # merged would be chosen for a plain layer
    layer, branch, a, b = _two_adapter_branch(trainable=False)
    calls = []
    layer.register_forward_pre_hook(lambda module, inputs: calls.append(1))  # e.g. accelerate's offload hook
    x = torch.randn(4, 16)
    with torch.no_grad():
        out = branch.linear(layer, x)
    assert calls == [1]
    expected = x @ (layer.weight + 0.7 * a.delta_weight() - 0.3 * b.delta_weight()).t() + layer.bias
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_layers_offloaded_by_accelerate_keep_their_own_forward():
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Recorder(ModelHook):  # accelerate replaces the layer's forward; module hook dicts stay empty
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Recorder.calls += 1
            return args, kwargs

    layer, branch, a, b = _two_adapter_branch(trainable=False)
    add_hook_to_module(layer, Recorder())
    x = torch.randn(4, 16)
    expected = x @ (layer.weight + 0.7 * a.delta_weight() - 0.3 * b.delta_weight()).t() + layer.bias
    for form in ("merged", "factored"):
        with pytest.MonkeyPatch.context() as monkeypatch, torch.no_grad():
            force(monkeypatch, form)
            torch.testing.assert_close(branch.linear(layer, x), expected, rtol=0, atol=1e-5)
    assert Recorder.calls == 2


def test_merged_form_is_chosen_where_it_does_less_work():
    # Many tokens through a small layer: building W + ΔW once beats two rank-wide matmuls over every token.
    assert merged_form_is_cheaper(tokens=8192, in_features=320, out_features=320, rank=8, with_gradients=False)
    # Training adds a weight-sized gradient per layer: too dear for wide layers at a low rank (SD 1.5's 1280-wide
    # blocks), worth it for narrow layers or high ranks.
    assert not merged_form_is_cheaper(tokens=512, in_features=1280, out_features=1280, rank=8, with_gradients=True)
    assert merged_form_is_cheaper(tokens=1024, in_features=32, out_features=32, rank=8, with_gradients=True)
    assert merged_form_is_cheaper(tokens=8192, in_features=320, out_features=320, rank=128, with_gradients=True)
    # Few tokens, a wide layer (text-encoder states into cross-attention): factored.
    assert not merged_form_is_cheaper(tokens=77, in_features=768, out_features=320, rank=8, with_gradients=True)
