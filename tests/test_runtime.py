"""The processors and the multi-adapter runtime on the tiny pipeline: equal to merged weights, exact fusing."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from difflora import BlockWeights, LoRAFactors, LoRARuntime
from difflora.errors import AdapterShapeError, InvalidArgumentError
from difflora.adapter import AdapterState, LoRAModuleWeights
from difflora.generate import GenerationSettings, generate
from difflora.pipelines import load_pipeline
from helpers import random_adapter
from difflora.processors import LoRAAttnProcessor, AttentionSite, unet_attention_sites

SETTINGS = GenerationSettings(prompt="a red fox in the snow", steps=3, guidance=5.0, seed=7, width=64, height=64)


@pytest.fixture
def pipe(tiny_model_dir):
    return load_pipeline(tiny_model_dir, quiet=True)


def merge_into_weights(pipe, adapters: list[tuple[AdapterState, float]], keep=lambda module_key: True):
    """The reference: ``W ← W + Σ weight · scale · up @ down`` written into the model's own linear layers."""
    with torch.no_grad():
        for state, weight in adapters:
            for module_key, module in state.modules.items():
                if not keep(module_key):
                    continue
                component, _, path = module_key.partition(".")
                model = getattr(pipe, component)
                try:
                    layer = model.get_submodule(path)
                except AttributeError:
                    layer = model.get_submodule(f"text_model.{path}")
                layer.weight += weight * module.scale * (module.up @ module.down)


def image(pipe):
    return generate(pipe, SETTINGS, output_type="np")[0]


def test_processor_sizes_come_from_the_block(pipe):
    channels = list(pipe.unet.config.block_out_channels)
    sites = unet_attention_sites(pipe.unet)
    assert len(sites) == len(pipe.unet.attn_processors)
    for site in sites:
        expected = {"down": lambda i: channels[i], "up": lambda i: channels[::-1][i], "mid": lambda i: channels[-1]}
        assert site.block_hidden_size == expected[site.block_kind](site.block_index)
        if site.path.endswith("attn1"):
            assert site.cross_attention_dim is None
        else:
            assert site.cross_attention_dim == pipe.unet.config.cross_attention_dim
    # A block whose sizes do not fit its layers is named in the error.
    site = sites[0]
    wrong = AttentionSite(
        site.component, site.path, site.block_kind, site.block_index, site.block_hidden_size * 2, None
    )
    with pytest.raises(AdapterShapeError, match=site.path.replace(".", r"\.")):
        LoRAAttnProcessor(wrong, pipe.unet.get_submodule(site.path))


def test_adapter_output_equals_merged_weights(tiny_model_dir, pipe):
    state = random_adapter(pipe, rank=4, alpha=8, seed=1)
    runtime = LoRARuntime.attach(pipe)
    runtime.add_adapter("style", state, weight=0.8)
    with_lora = image(pipe)

    reference = load_pipeline(tiny_model_dir, quiet=True)
    base = image(reference)
    merge_into_weights(reference, [(state, 0.8)])
    merged = image(reference)
    assert abs(with_lora - merged).max() < 1e-5
    assert abs(with_lora - base).max() > 1e-3  # the adapter does change the image

    # And at the UNet itself, on one forward pass.
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = pipe.unet(latents, 10, context).sample
        theirs = reference.unet(latents, 10, context).sample
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_zero_initialised_adapter_leaves_image_identical(pipe, tiny_model_dir):
    base = image(load_pipeline(tiny_model_dir, quiet=True))
    runtime = LoRARuntime.attach(pipe)
    runtime.create_adapter("fresh", rank=4, components=("unet", "text_encoder"))
    assert (image(pipe) == base).all()


def test_two_weighted_adapters_equal_weighted_sum_of_deltas(pipe, tiny_model_dir):
    a = random_adapter(pipe, rank=4, alpha=8, seed=2)
    b = random_adapter(pipe, rank=2, alpha=1, seed=3, components=("unet",))
    runtime = LoRARuntime.attach(pipe)
    runtime.add_adapter("a", a, weight=0.7)
    runtime.add_adapter("b", b, weight=-0.3)
    reference = load_pipeline(tiny_model_dir, quiet=True)
    merge_into_weights(reference, [(a, 0.7), (b, -0.3)])
    assert abs(image(pipe) - image(reference)).max() < 1e-5

    # Changing a weight is setting a number; the result follows.
    runtime.set_weight("b", 0.0)
    only_a = load_pipeline(tiny_model_dir, quiet=True)
    merge_into_weights(only_a, [(a, 0.7)])
    assert abs(image(pipe) - image(only_a)).max() < 1e-5


def test_up_block_weight_zero_equals_adapter_without_up_blocks(pipe, tiny_model_dir):
    state = random_adapter(pipe, rank=4, alpha=4, seed=4)
    runtime = LoRARuntime.attach(pipe)
    runtime.add_adapter("a", state, weight=1.0, block_weights=BlockWeights(up=0.0))
    reference = load_pipeline(tiny_model_dir, quiet=True)
    merge_into_weights(reference, [(state, 1.0)], keep=lambda key: not key.startswith("unet.up_blocks."))
    assert abs(image(pipe) - image(reference)).max() < 1e-5
    # Per block index: only up.1 off.
    runtime.set_block_weights("a", BlockWeights(per_block={"up.1": 0.0}))
    reference = load_pipeline(tiny_model_dir, quiet=True)
    merge_into_weights(reference, [(state, 1.0)], keep=lambda key: not key.startswith("unet.up_blocks.1."))
    assert abs(image(pipe) - image(reference)).max() < 1e-5


def test_disable_enable_and_remove_restore_original_processors(pipe, tiny_model_dir):
    base = image(pipe)
    originals = {name: type(p) for name, p in pipe.unet.attn_processors.items()}
    runtime = LoRARuntime.attach(pipe)
    runtime.add_adapter("a", random_adapter(pipe, 4, 4, seed=5), weight=1.0)
    assert all(isinstance(p, LoRAAttnProcessor) for p in pipe.unet.attn_processors.values())
    changed = image(pipe)
    runtime.disable("a")
    assert (image(pipe) == base).all()
    runtime.enable("a")
    assert abs(image(pipe) - changed).max() < 1e-6
    runtime.remove("a")
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == originals
    assert all(type(p) is AttnProcessor2_0 for p in pipe.unet.attn_processors.values())
    assert not any("difflora" in key or ".processor." in key for key in pipe.unet.state_dict())
    assert not any("difflora" in key for key in pipe.text_encoder.state_dict())
    assert (image(pipe) == base).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fuse_unfuse_restores_weights_bit_exactly(tiny_model_dir, dtype):
    pipe = load_pipeline(tiny_model_dir, dtype=dtype, quiet=True)
    runtime = LoRARuntime.attach(pipe)
    runtime.add_adapter("a", random_adapter(pipe, 4, 8, seed=6), weight=0.7)
    runtime.add_adapter("b", random_adapter(pipe, 2, 1, seed=7), weight=-0.3)
    originals = {
        component: {name: p.detach().clone() for name, p in getattr(pipe, component).named_parameters()}
        for component in ("unet", "text_encoder")
    }
    for _ in range(50):
        runtime.fuse()
        runtime.unfuse()
    for component, parameters in originals.items():
        current = dict(getattr(pipe, component).named_parameters())
        assert all(torch.equal(current[name], value) for name, value in parameters.items())
    runtime.fuse()
    changed = [name for name, p in pipe.unet.named_parameters() if not torch.equal(p, originals["unet"][name])]
    assert changed and all(name.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v", "0") for name in changed)


def test_fuse_keeps_the_original_tensor_and_unfuse_survives_a_cast_while_fused(tiny_model_dir):
    """Fusing puts a new tensor in each adapted weight's place and keeps the original as it is (no copy): unfuse
    gives back the very tensor. Cast while fused, the kept original is cast with the model and copied back."""
    pipe = load_pipeline(tiny_model_dir, quiet=True)
    runtime = LoRARuntime.attach(pipe)
    runtime.add_adapter("a", random_adapter(pipe, 4, 8, seed=6), weight=0.7)
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    original = layer.weight.data
    runtime.fuse()
    assert layer.weight.data_ptr() != original.data_ptr() and not torch.equal(layer.weight, original)
    runtime.unfuse()
    assert layer.weight.data_ptr() == original.data_ptr()
    kept = original.clone()
    runtime.fuse()
    pipe.unet.to(torch.float64)
    runtime.unfuse()
    assert layer.weight.dtype == torch.float64 and torch.equal(layer.weight, kept.double())


def test_fused_image_equals_unfused_image(pipe):
    runtime = LoRARuntime.attach(pipe)
    runtime.add_adapter("a", random_adapter(pipe, 4, 8, seed=8), weight=0.7)
    runtime.add_adapter("b", random_adapter(pipe, 2, 1, seed=9), weight=-0.3)
    unfused = image(pipe)
    runtime.fuse()
    assert abs(image(pipe) - unfused).max() < 1e-5
    # A weight change while fused re-fuses with the new mix.
    runtime.set_weight("b", 0.0)
    fused_a = image(pipe)
    runtime.unfuse()
    assert abs(image(pipe) - fused_a).max() < 1e-5


def test_rslora_scale(pipe, tiny_model_dir):
    state = random_adapter(pipe, rank=4, alpha=2, seed=10, components=("unet",))
    for module in state.modules.values():
        module.use_rslora = True
    assert next(iter(state.modules.values())).scale == 1.0  # 2 / sqrt(4)
    LoRARuntime.attach(pipe).add_adapter("rs", state)
    reference = load_pipeline(tiny_model_dir, quiet=True)
    merge_into_weights(reference, [(state, 1.0)])
    assert abs(image(pipe) - image(reference)).max() < 1e-5


def test_bad_adapters_leave_the_pipeline_as_it_was(pipe):
    runtime = LoRARuntime.attach(pipe)
    good = random_adapter(pipe, 4, 4, seed=11)
    runtime.add_adapter("good", good, weight=0.5)
    before = image(pipe)
    processors_before = dict(pipe.unet.attn_processors)

    misfit = AdapterState(modules=dict(good.modules))
    first_key = sorted(misfit.modules)[-1]
    module = misfit.modules[first_key]
    misfit.modules[first_key] = LoRAModuleWeights(module.down[:, :-1], module.up, module.alpha)
    with pytest.raises(AdapterShapeError) as error:
        runtime.add_adapter("misfit", misfit)
    message = str(error.value)
    assert first_key in message and str(tuple(module.down[:, :-1].shape)) in message and "\n" not in message

    unknown = AdapterState(modules={"unet.nowhere.attn1.to_q": module})
    with pytest.raises(AdapterShapeError, match="is not a layer of this model"):
        runtime.add_adapter("unknown", unknown)
    with pytest.raises(InvalidArgumentError, match="already loaded"):
        runtime.add_adapter("good", good)
    with pytest.raises(InvalidArgumentError, match="number"):
        runtime.set_weight("good", "abc")
    with pytest.raises(InvalidArgumentError, match="no adapter named"):
        runtime.set_weight("missing", 1.0)
    for rank in (0, -1):
        with pytest.raises(InvalidArgumentError, match="rank"):
            runtime.create_adapter("new", rank=rank)

    assert list(runtime.adapters) == ["good"]
    assert dict(pipe.unet.attn_processors) == processors_before
    assert (image(pipe) == before).all()


def unet_output(pipe, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([500]), context).sample


def test_adapter_named_like_a_module_attribute(pipe):
    runtime = LoRARuntime.attach(pipe)
    base = unet_output(pipe)
    runtime.create_adapter("train", rank=2, components=("unet",), init="random", seed=1)
    runtime.set_weight("train", 0.5)
    with_train = unet_output(pipe)
    state = runtime.adapter_state("train")
    assert state.modules
    runtime.remove_all()
    runtime.add_adapter("plain_name", state, weight=0.5)  # the same adapter under an ordinary name
    torch.testing.assert_close(with_train, unet_output(pipe), rtol=0, atol=0)
    assert (with_train - base).abs().max() > 1e-3  # and the weight took: the adapter acts


def test_a_load_that_fails_midway_changes_nothing(pipe, monkeypatch):
    import difflora.runtime as runtime_module

    runtime = LoRARuntime.attach(pipe)
    originals = dict(pipe.unet.attn_processors)
    state = random_adapter(pipe, 4, 4, seed=12)
    real = runtime_module.LoRAFactors.from_tensors
    calls = []

    def fail_on_the_fifth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise MemoryError("simulated out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(runtime_module.LoRAFactors, "from_tensors", fail_on_the_fifth)
    with pytest.raises(MemoryError):
        runtime.add_adapter("first", state)
    assert runtime.adapters == {} and dict(pipe.unet.attn_processors) == originals  # nothing installed

    monkeypatch.setattr(runtime_module.LoRAFactors, "from_tensors", real)
    runtime.add_adapter("kept", state, weight=0.5)
    runtime.fuse()
    before = image(pipe)
    calls.clear()
    monkeypatch.setattr(runtime_module.LoRAFactors, "from_tensors", fail_on_the_fifth)
    with pytest.raises(MemoryError):
        runtime.add_adapter("kept", state, weight=1.0, replace_existing=True)
    assert list(runtime.adapters) == ["kept"] and runtime.adapters["kept"].weight == 0.5 and runtime.fused
    assert (image(pipe) == before).all()


def test_factors_stay_fp32_when_the_pipeline_is_cast(pipe):
    runtime = LoRARuntime.attach(pipe)
    fp32_base = image(pipe)
    runtime.add_adapter("a", random_adapter(pipe, 4, 8, seed=13), weight=0.42)
    fp32_weaker = image(pipe)  # the adapter at 60% of its weight, which a cast must not turn it into
    runtime.set_weight("a", 0.7)
    fp32_image = image(pipe)
    factors = [p.detach().clone() for p in runtime.parameters("a")]
    pipe.to(torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in runtime.parameters("a"))
    bf16_image = image(pipe)
    runtime.disable("a")
    rounding = abs(image(pipe) - fp32_base).max()  # what bf16 rounding alone does to this image
    runtime.enable("a")
    assert abs(bf16_image - fp32_image).max() <= 2 * rounding  # bf16 rounding only
    assert abs(fp32_weaker - fp32_image).max() > 3 * rounding  # so a weaker (or stronger) adapter would show
    pipe.to(torch.float32)  # the base weights were rounded to bf16 and stay so; the factors were never rounded
    assert all(torch.equal(p, kept) for p, kept in zip(runtime.parameters("a"), factors))


def test_blocks_with_other_processors_keep_them(pipe):
    class CustomAttention(AttnProcessor2_0):  # stands for IP-Adapter's or any other special processor
        pass

    name = next(iter(pipe.unet.attn_processors))
    custom = CustomAttention()
    processors = dict(pipe.unet.attn_processors)
    processors[name] = custom
    pipe.unet.set_attn_processor(processors)  # (diffusers empties the dict it is given)
    state = random_adapter(pipe, 2, 2, seed=14, components=("unet",))  # created on the standard blocks only
    block = name.removesuffix(".processor")
    assert not any(key.startswith(f"unet.{block}.") for key in state.modules)

    runtime = LoRARuntime.attach(pipe)
    runtime.add_adapter("a", state)
    assert pipe.unet.attn_processors[name] is custom
    hosts = sum(isinstance(p, LoRAAttnProcessor) for p in pipe.unet.attn_processors.values())
    assert hosts == len(pipe.unet.attn_processors) - 1
    there = AdapterState(modules={f"unet.{block}.to_q": next(iter(state.modules.values()))})
    with pytest.raises(AdapterShapeError, match="runs CustomAttention"):
        runtime.add_adapter("there", there)
    runtime.remove_all()
    assert pipe.unet.attn_processors[name] is custom


def test_installing_processors_returns_a_handle_that_restores_the_model(pipe):
    from difflora.processors import CLIPLoRAAttnProcessor, attention_sites, install_processors

    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    originals = dict(pipe.unet.attn_processors)
    ids = torch.tensor([[1, 2, 3]])
    text_before = pipe.text_encoder(ids)[0]
    installed = install_processors(pipe.unet, attention_sites(components))
    assert all(isinstance(p, LoRAAttnProcessor) for p in pipe.unet.attn_processors.values())
    clip_hosts = [host for host in installed.hosts.values() if isinstance(host, CLIPLoRAAttnProcessor)]
    assert len(clip_hosts) == pipe.text_encoder.config.num_hidden_layers
    # One branch per projection, each adapting the layer it names.
    keys = [module_key for module_key, _, _ in installed.branches()]
    assert len(keys) == 4 * len(installed.hosts) and len(set(keys)) == len(keys)
    for module_key, branch, layer in installed.branches():
        component, _, path = module_key.partition(".")
        model = components[component]
        named = dict(model.named_modules())
        assert layer is named.get(path, named.get(f"text_model.{path}"))
        assert (branch.in_features, branch.out_features) == (layer.in_features, layer.out_features)
    # A branch with an adapter acts through the CLIP hooks while installed ...
    _, branch, layer = next(item for item in installed.branches() if item[0].startswith("text_encoder."))
    branch.add("a", LoRAFactors.from_tensors(torch.ones(1, layer.in_features), torch.ones(layer.out_features, 1)))
    assert not torch.equal(pipe.text_encoder(ids)[0], text_before)
    # ... and restore() puts back the model's own processors and removes every hook.
    installed.restore()
    assert dict(pipe.unet.attn_processors) == originals
    torch.testing.assert_close(pipe.text_encoder(ids)[0], text_before, rtol=0, atol=0)
    assert not any("difflora" in name for name, _ in pipe.text_encoder.named_modules())
