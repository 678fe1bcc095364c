"""Every kind of update through the runtime: LoRA, LoHa, LoKr, full diffs and DoRA on attention projections, Linears,
1×1 and 3×3 convs and CLIP, alone and mixed on one layer, each equal to the same change merged into the weights by
code written here (1e-5 of the effect), in both forms, fused and unfused bit-exactly."""

import pytest
import torch

from difflora import LoRARuntime
from difflora.adapter import AdapterState, FullModuleWeights, LoHaModuleWeights, LoKrModuleWeights, LoRAModuleWeights
from difflora.pipelines import load_pipeline
from helpers import outputs

LAYERS = {  # module key → (what it is) on the tiny model
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "attention projection (processor)",
    "unet.down_blocks.0.resnets.0.time_emb_proj": "Linear",
    "unet.down_blocks.0.attentions.0.proj_in": "Conv 1x1",
    "unet.down_blocks.0.resnets.0.conv1": "Conv 3x3",
    "text_encoder.encoder.layers.0.self_attn.k_proj": "CLIP projection",
}
KINDS = ["lora", "loha", "lokr", "full", "dora"]


@pytest.fixture
def pipe(tiny_model_dir):
    return load_pipeline(tiny_model_dir, quiet=True)


def layer_of(pipe, key):
    component, _, path = key.partition(".")
    modules = dict(getattr(pipe, component).named_modules())
    return modules.get(path) or modules[f"text_model.{path}"]


def draw(*size, seed):
    return torch.randn(*size, generator=torch.Generator().manual_seed(seed)) * 0.3


def update_of(kind, shape, seed):
    """(module weights as a file holds them, ΔW written here by hand, DoRA magnitude or None)."""
    out_features, in_features, kernel = shape[0], shape[1], shape[2:]
    flat = in_features * (kernel[0] * kernel[1] if kernel else 1)
    if kind in ("lora", "dora"):
        down, up = draw(2, in_features, *kernel, seed=seed), draw(out_features, 2, *[1] * len(kernel), seed=seed + 1)
        delta = (up.flatten(1) @ down.flatten(1)).reshape(shape) * (3.0 / 2)
        magnitude = draw(out_features, seed=seed + 2).abs() + 0.5 if kind == "dora" else None
        return LoRAModuleWeights(down, up, alpha=3.0, dora_scale=magnitude), delta, magnitude
    if kind == "loha":
        w1a, w1b, w2a, w2b = (draw(out_features, 2, seed=seed), draw(2, flat, seed=seed + 1),
                              draw(out_features, 2, seed=seed + 2), draw(2, flat, seed=seed + 3))
        delta = ((w1a @ w1b) * (w2a @ w2b)).reshape(shape) * (4.0 / 2)
        return LoHaModuleWeights(w1a, w1b, w2a, w2b, alpha=4.0), delta, None
    if kind == "lokr":  # w1 whole (2 × 2), w2 factorised at rank 2: scale alpha / 2
        w1, w2a = draw(2, 2, seed=seed), draw(out_features // 2, 2, seed=seed + 1)
        w2b = draw(2, flat // 2, seed=seed + 2)
        right = (w2a @ w2b).reshape(out_features // 2, in_features // 2, *kernel)
        delta = torch.kron(w1.reshape(2, 2, *[1] * len(kernel)), right) * (3.0 / 2)
        return LoKrModuleWeights(w1=w1, w2a=w2a, w2b=w2b, alpha=3.0), delta, None
    diff = draw(*shape, seed=seed)
    return FullModuleWeights(diff), diff, None


def merged_by_hand(weight, changes):
    """W after ``changes``: [(multiplier, ΔW, magnitude or None)], the plain ones summed first, then each DoRA:
    W ← W + m · (g ⊙ V / ‖V‖ − W), V = W + ΔW, the norm per output row."""
    merged = weight.detach().clone()
    for multiplier, delta, magnitude in changes:
        if magnitude is None:
            merged += multiplier * delta
    for multiplier, delta, magnitude in changes:
        if magnitude is not None:
            target = merged + delta
            norms = target.flatten(1).norm(dim=1).reshape(-1, *[1] * (target.ndim - 1))
            merged = merged + multiplier * (magnitude.reshape(norms.shape) * target / norms - merged)
    return merged


def assert_close(ours, reference, base):
    for mine, theirs, before in zip(ours, reference, base):
        effect = float((theirs - before).abs().max())
        assert (mine - theirs).abs().max() <= 1e-5 * max(1.0, effect), (float((mine - theirs).abs().max()), effect)
    assert max(float((theirs - before).abs().max()) for theirs, before in zip(reference, base)) > 1e-3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", ["merged", "factored"])
def test_each_kind_on_each_layer_kind_equals_a_merge_by_hand(pipe, tiny_model_dir, monkeypatch, kind, form):
    import difflora.lora as lora_module

    if form == "factored":  # LoHa, LoKr and full diffs take the merged form where they can; force LoRA's factored
        monkeypatch.setattr(lora_module, "MERGED_FLOPS_ALLOWANCE", {"training": 0.0, "inference": 0.0})
    modules, expected = {}, {}
    for seed, key in enumerate(LAYERS):
        weights, delta, magnitude = update_of(kind, tuple(layer_of(pipe, key).weight.shape), seed * 10)
        modules[key], expected[key] = weights, (delta, magnitude)
    base = outputs(pipe)
    runtime = LoRARuntime.attach(pipe)
    runtime.add_adapter(kind, AdapterState(modules=modules), weight=0.6)
    reference = load_pipeline(tiny_model_dir, quiet=True)
    with torch.no_grad():
        for key, (delta, magnitude) in expected.items():
            layer = layer_of(reference, key)
            layer.weight.copy_(merged_by_hand(layer.weight, [(0.6, delta, magnitude)]))
    assert_close(outputs(pipe), outputs(reference), base)
    # Fused: the same numbers, and unfused: the original weights bit for bit.
    originals = {key: layer_of(pipe, key).weight.detach().clone() for key in LAYERS}
    unfused = outputs(pipe)
    runtime.fuse()
    assert_close(outputs(pipe), unfused, base)
    runtime.unfuse()
    assert all(torch.equal(layer_of(pipe, key).weight, weight) for key, weight in originals.items())


def test_kinds_mix_on_one_layer(pipe, tiny_model_dir):
    """A LoHa at 0.7, a LoRA at −0.3 and a DoRA at 1.0 at once, on every layer kind."""
    mixes = {"loha": 0.7, "lora": -0.3, "dora": 1.0}
    expected = {key: [] for key in LAYERS}
    runtime = LoRARuntime.attach(pipe)
    base = outputs(pipe)
    for index, (kind, weight) in enumerate(mixes.items()):
        modules = {}
        for seed, key in enumerate(LAYERS):
            weights, delta, magnitude = update_of(kind, tuple(layer_of(pipe, key).weight.shape), 100 * index + seed)
            modules[key] = weights
            expected[key].append((weight, delta, magnitude))
        runtime.add_adapter(kind, AdapterState(modules=modules), weight=weight)
    reference = load_pipeline(tiny_model_dir, quiet=True)
    with torch.no_grad():
        for key, changes in expected.items():
            layer = layer_of(reference, key)
            layer.weight.copy_(merged_by_hand(layer.weight, changes))
    assert_close(outputs(pipe), outputs(reference), base)
    runtime.set_weight("dora", 0.0)  # a DoRA at 0 is the other two alone
    reference = load_pipeline(tiny_model_dir, quiet=True)
    with torch.no_grad():
        for key, changes in expected.items():
            layer = layer_of(reference, key)
            layer.weight.copy_(merged_by_hand(layer.weight, changes[:2]))
    assert_close(outputs(pipe), outputs(reference), base)


def test_a_full_diff_changes_the_bias_too(pipe, tiny_model_dir):
    key = "unet.down_blocks.0.resnets.0.conv1"
    layer = layer_of(pipe, key)
    diff, diff_b = draw(*layer.weight.shape, seed=3), draw(layer.weight.shape[0], seed=4)
    base = outputs(pipe)
    runtime = LoRARuntime.attach(pipe)
    runtime.add_adapter("full", AdapterState(modules={key: FullModuleWeights(diff, diff_b)}), weight=0.5)
    reference = load_pipeline(tiny_model_dir, quiet=True)
    with torch.no_grad():
        layer_of(reference, key).weight += 0.5 * diff
        layer_of(reference, key).bias += 0.5 * diff_b
    assert_close(outputs(pipe)[:1], outputs(reference)[:1], base[:1])
    bias = layer.bias.detach().clone()
    runtime.fuse()
    assert_close(outputs(pipe)[:1], outputs(reference)[:1], base[:1])
    runtime.unfuse()
    assert torch.equal(layer.bias, bias)


def test_every_kind_goes_through_kohya_files_and_diffusers_formats_refuse_what_they_cannot_hold(pipe, tmp_path):
    from difflora.cli import main
    from difflora.formats import read_adapter, write_adapter

    modules = {}
    for seed, (kind, key) in enumerate(zip(KINDS, LAYERS)):
        modules[key] = update_of(kind, tuple(layer_of(pipe, key).weight.shape), seed * 7)[0]
    state = AdapterState(modules=modules)
    path = write_adapter(state, tmp_path / "kinds.safetensors", layout="kohya")
    again = read_adapter(path)
    assert {key: module.kind for key, module in again.modules.items()} == {
        key: module.kind for key, module in modules.items()}
    for key, module in modules.items():  # lossless: the same update, the same DoRA magnitude
        torch.testing.assert_close(again.modules[key].delta_weight(), module.delta_weight(), rtol=0, atol=0)
        assert (again.modules[key].dora_scale is None) == (module.dora_scale is None)
    for to in ("diffusers", "peft", "difflora"):
        out = tmp_path / ("peft-out" if to == "peft" else f"{to}.safetensors")
        assert main(["convert", str(path), "--to", to, "--out", str(out)]) == 2
        assert not out.exists()
