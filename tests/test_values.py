"""Values: every weight and number finite and in range with the range in the message, in the library and on the
command line; a mix whose change overflows the model's dtype refused before generating or fusing; per-block names
that are not blocks of the model (or of the adapter) refused."""

import math

import pytest
import torch
from torch import nn

from difflora import LoRARuntime
from difflora.blocks import BlockWeights, describe_blocks, unet_blocks
from difflora.cli import main
from difflora.errors import FuseError, InvalidArgumentError
from difflora.formats import write_adapter
from difflora.generate import GenerationSettings, generate
from difflora.lora import LoRAFactors, adapter_weight
from difflora.multilora import MultiLoRA
from difflora.pipelines import load_pipeline

from helpers import random_adapter

TINY_BLOCKS = "down.0–down.1, up.0–up.1"


@pytest.fixture(scope="module")
def adapter_file(tiny_model_dir, tmp_path_factory):
    pipe = load_pipeline(tiny_model_dir, quiet=True)
    path = tmp_path_factory.mktemp("adapters") / "style.safetensors"
    return write_adapter(random_adapter(pipe, rank=4, alpha=4, seed=1), path)


def refused(capsys, argv, tmp_path) -> str:
    """The one line ``argv`` ends in (exit code 2), having written nothing in ``tmp_path``."""
    before = sorted(tmp_path.rglob("*"))
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert sorted(tmp_path.rglob("*")) == before
    return err.rstrip("\n")


# ----- adapter weights ----------------------------------------------------------------------------------------------


def test_adapter_weights_are_finite_and_within_100():
    assert adapter_weight("-100") == -100.0 and adapter_weight(100) == 100.0 and adapter_weight("0.5") == 0.5
    for value, shown in ((1e38, "1e+38"), ("nan", "nan"), (-100.5, "-100.5"), ("inf", "inf")):
        with pytest.raises(InvalidArgumentError) as caught:
            adapter_weight(value)
        assert str(caught.value) == f"weight must be a finite number in [-100, 100], got {shown}"
        assert caught.value.parameter == "weight"
    with pytest.raises(InvalidArgumentError, match="^weight must be a number, got 'lots'$"):
        adapter_weight("lots")


def test_the_runtime_refuses_weights_out_of_range_and_changes_nothing(tiny_pipeline):
    runtime = LoRARuntime.attach(tiny_pipeline)
    state = random_adapter(tiny_pipeline, rank=2, alpha=2, seed=0)
    processors = dict(tiny_pipeline.unet.attn_processors)
    in_range = r"must be a finite number in \[-100, 100\]"
    with pytest.raises(InvalidArgumentError, match=rf"^weight of 'a' {in_range}, got 1e\+38$"):
        runtime.add_adapter("a", state, 1e38)
    assert runtime.adapters == {} and dict(tiny_pipeline.unet.attn_processors) == processors
    runtime.add_adapter("a", state, 0.5)
    with pytest.raises(InvalidArgumentError, match=rf"^weight of 'a' {in_range}, got nan$"):
        runtime.set_weight("a", math.nan)
    assert runtime.adapters["a"].weight == 0.5


def test_the_command_line_refuses_an_adapter_weight_out_of_range(tmp_path, capsys):
    argv = ["generate", "--prompt", "p", "--lora", "f.safetensors:1e38", "--out", str(tmp_path / "o.png")]
    assert refused(capsys, argv, tmp_path) == (
        "difflora: error: --lora f.safetensors:1e38: weight must be a finite number in [-100, 100], got 1e+38")
    argv = ["scale", "f.safetensors", "--weight", "nan", "--out", str(tmp_path / "s.safetensors")]
    assert refused(capsys, argv, tmp_path) == (
        "difflora: error: --weight must be a finite number in [-100, 100], got nan")


# ----- block weights ------------------------------------------------------------------------------------------------


def test_block_weights_are_finite_and_within_100():
    assert BlockWeights.parse("down=-100,up.1=100").per_block == {"up.1": 100.0}
    for text, message in [
        ("down=nan", "block_weights: down must be a finite number in [-100, 100], got nan"),
        ("up.1=1e9", "block_weights: up.1 must be a finite number in [-100, 100], got 1000000000.0"),
        ("te=-inf", "block_weights: te must be a finite number in [-100, 100], got -inf"),
    ]:
        with pytest.raises(InvalidArgumentError) as caught:
            BlockWeights.parse(text)
        assert str(caught.value) == message and caught.value.parameter == "block_weights"
    with pytest.raises(InvalidArgumentError, match=r"^block_weights: mid must be a finite number in \[-100, 100\]"):
        BlockWeights(mid=math.inf)
    with pytest.raises(InvalidArgumentError, match=r"^block_weights: down.0 must be a finite number"):
        BlockWeights(per_block={"down.0": math.nan})


def test_the_command_line_refuses_a_block_weight_out_of_range(tmp_path, capsys):
    argv = ["generate", "--prompt", "p", "--block-weights", "down=nan", "--out", str(tmp_path / "o.png")]
    assert refused(capsys, argv, tmp_path) == (
        "difflora: error: --block-weights: down must be a finite number in [-100, 100], got nan")


# ----- generation settings ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, message", [
    ("guidance", math.nan, "guidance must be a finite number in [0, 100], got nan"),
    ("guidance", math.inf, "guidance must be a finite number in [0, 100], got inf"),
    ("guidance", -1.0, "guidance must be a finite number in [0, 100], got -1.0"),
    ("guidance", "7", "guidance must be a finite number in [0, 100], got '7'"),
    ("steps", 0, "steps must be an integer in [1, 1000], got 0"),
    ("steps", 1001, "steps must be an integer in [1, 1000], got 1001"),
    ("num_images", 65, "num_images must be an integer in [1, 64], got 65"),
    ("seed", -1, "seed must be an integer in [0, 2**63 - 1], got -1"),
    ("seed", 2**63, f"seed must be an integer in [0, 2**63 - 1], got {2**63}"),
    ("width", 0, "width must be a multiple of 8 in [8, 4096], got 0"),
    ("width", 4104, "width must be a multiple of 8 in [8, 4096], got 4104"),
    ("height", 60, "height must be a multiple of 8 in [8, 4096], got 60"),
    ("height", True, "height must be a multiple of 8 in [8, 4096], got True"),
])
def test_generation_settings_are_in_range(field, value, message):
    GenerationSettings("p", guidance=0.0, seed=2**63 - 1, width=4096, steps=1000, num_images=64).validate()
    settings = GenerationSettings("p")
    setattr(settings, field, value)
    with pytest.raises(InvalidArgumentError) as caught:
        settings.validate()
    assert str(caught.value) == message and caught.value.parameter == field


@pytest.mark.parametrize("flag, value, message", [
    ("--width", "0", "--width must be a multiple of 8 in [8, 4096], got 0"),  # not the native size in disguise
    ("--height", "0", "--height must be a multiple of 8 in [8, 4096], got 0"),
    ("--guidance", "nan", "--guidance must be a finite number in [0, 100], got nan"),
    ("--seed", str(2**63), f"--seed must be an integer in [0, 2**63 - 1], got {2**63}"),
])
def test_the_command_line_refuses_settings_out_of_range(flag, value, message, tmp_path, capsys):
    argv = ["generate", "--prompt", "p", flag, value, "--out", str(tmp_path / "o.png")]
    assert refused(capsys, argv, tmp_path) == f"difflora: error: {message}"


# ----- what a weight does to the model's dtype ----------------------------------------------------------------------


def one_by_one(up: float, down: float = 1.0) -> LoRAFactors:
    """Rank-1 factors of a 1 → 1 map with scale 1: ``s·B A = up · down``."""
    return LoRAFactors.from_tensors(torch.full((1, 1), down), torch.full((1, 1), up), alpha=1.0)


def test_a_change_the_dtype_cannot_hold_is_refused_naming_adapter_and_module():
    branch = MultiLoRA(1, 1, "unet.mid_block.attn1.to_q")
    branch.add("big", one_by_one(1000.0), multiplier=65.0)
    branch.check_range(torch.float16)  # 65000 fits float16
    branch.check_range(torch.float32)
    branch.set_multiplier("big", 70.0)
    branch.check_range(torch.float32)
    with pytest.raises(InvalidArgumentError) as caught:
        branch.check_range(torch.float16)
    assert str(caught.value) == (
        "weight of adapter 'big' is too large for unet.mid_block.attn1.to_q in float16: at multiplier 70 (weight × "
        "block weight) its change reaches 7e+04, more than float16 holds (65504); use a smaller weight")
    assert caught.value.parameter == "weight"
    # A small product of a large factor: the factored form casts m·s·B to float16, which it cannot hold.
    factor = MultiLoRA(1, 1, "unet.x.to_k")
    factor.add("wide", one_by_one(1e5, 1e-5))
    with pytest.raises(InvalidArgumentError, match="^weight of adapter 'wide' is too large for unet.x.to_k in float16"):
        factor.check_range(torch.float16)
    layer = nn.Linear(1, 1).half()
    with pytest.raises(FuseError, match="^weight of adapter 'wide' is too large"):
        factor.fuse(layer)
    assert not factor.fused


def test_the_range_check_is_cheap_and_remembers_what_it_checked(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 16, generator=generator), torch.randn(8, 4, generator=generator)
    reference = LoRAFactors.from_tensors(down, up)
    bound, largest_up = reference.largest_entries()
    exact, _ = reference.largest_entries(exact=True)
    assert exact == float(reference.delta_weight().detach().abs().max()) and exact < bound
    products, looked_up = [], []
    delta_weight, largest_entries = LoRAFactors.delta_weight, LoRAFactors.largest_entries
    monkeypatch.setattr(LoRAFactors, "delta_weight", lambda self: products.append(1) or delta_weight(self))
    monkeypatch.setattr(LoRAFactors, "largest_entries",
                        lambda self, exact=False: looked_up.append(exact) or largest_entries(self, exact))
    factors = LoRAFactors.from_tensors(down, up)
    branch = MultiLoRA(16, 8)
    branch.add("a", factors)
    branch.check_range(torch.float16)
    assert products == []  # the bound is under the limit: no product formed
    multiplier = 65504 / math.sqrt(bound * exact)  # over the bound's limit, under the exact value's
    assert multiplier * largest_up < 65504 and multiplier * 0.99 * bound > 65504
    branch.set_multiplier("a", multiplier)
    branch.check_range(torch.float16)
    assert products == [1]  # the exact maximum, once
    calls = len(looked_up)
    branch.check_range(torch.float16)
    assert len(looked_up) == calls  # the same mix is not checked again
    branch.set_multiplier("a", multiplier * 0.99)
    branch.check_range(torch.float16)
    assert products == [1]  # another multiplier: the factors' numbers are reused
    with torch.no_grad():
        factors.up.mul_(1.0)  # an in-place change (an optimizer step, a copy) makes them stale
    branch.check_range(torch.float16)
    assert products == [1, 1]


@pytest.fixture
def half_pipeline(tiny_model_dir):
    return load_pipeline(tiny_model_dir, device="cpu", dtype=torch.float16, quiet=True)


def overflowing_adapter(pipe):
    """An adapter whose one UNet module, at weight 1, changes its float16 layer by more than 65504."""
    state = random_adapter(pipe, rank=2, alpha=2, seed=4, components=("unet",))
    key = sorted(state.modules)[0]
    state.modules[key].up.mul_(1e6)
    return state, key


def test_a_mix_the_model_cannot_hold_is_refused_before_generating_or_fusing(half_pipeline):
    state, key = overflowing_adapter(half_pipeline)
    runtime = LoRARuntime.attach(half_pipeline)
    runtime.add_adapter("big", state, 1.0)
    unet_calls = []
    half_pipeline.unet.register_forward_pre_hook(lambda module, inputs: unet_calls.append(1))
    with pytest.raises(InvalidArgumentError, match=f"^weight of adapter 'big' is too large for {key} in float16: "):
        generate(half_pipeline, GenerationSettings("p", steps=2))
    assert unet_calls == []  # refused before the first step
    weights = {name: tensor.clone() for name, tensor in half_pipeline.unet.state_dict().items()}
    with pytest.raises(FuseError, match=f"^weight of adapter 'big' is too large for {key} in float16: "):
        runtime.fuse()
    assert not runtime.fused
    assert all(torch.equal(tensor, weights[name]) for name, tensor in half_pipeline.unet.state_dict().items())
    runtime.set_weight("big", 1e-9)
    runtime.check_mix()  # small enough now


def test_the_command_line_refuses_a_mix_the_model_cannot_hold(half_pipeline, tiny_model_dir, tmp_path, capsys):
    state, key = overflowing_adapter(half_pipeline)
    adapter = write_adapter(state, tmp_path / "big.safetensors")
    argv = ["generate", "--model", str(tiny_model_dir), "--dtype", "fp16", "--lora", str(adapter), "--prompt", "p",
            "--steps", "1", "--out", str(tmp_path / "o.png")]
    line = refused(capsys, argv, tmp_path)
    assert line.startswith(f"difflora: error: weight of adapter 'big' is too large for {key} in float16: "), line


# ----- block names --------------------------------------------------------------------------------------------------


def test_blocks_are_described_as_runs():
    assert describe_blocks({"down.0", "down.1", "down.2", "up.0", "up.2", "up.3"}) == "down.0–down.2, up.0, up.2–up.3"
    assert describe_blocks(set()) == "none"
    assert unet_blocks([("unet", "up_blocks.1.attentions.0"), ("unet", "mid_block.attentions.0"),
                        ("text_encoder", "encoder.layers.0.self_attn")]) == {"up.1"}


def test_block_names_the_model_does_not_have_are_refused(tiny_pipeline):
    runtime = LoRARuntime.attach(tiny_pipeline)
    state = random_adapter(tiny_pipeline, rank=2, alpha=2, seed=0)
    assert runtime.unet_blocks() == {"down.0", "down.1", "up.0", "up.1"}
    processors = dict(tiny_pipeline.unet.attn_processors)
    with pytest.raises(InvalidArgumentError) as caught:
        runtime.add_adapter("a", state, 1.0, BlockWeights.parse("up.9=1"))
    assert str(caught.value) == f"block_weights: up.9: the model has no such block (its blocks: {TINY_BLOCKS})"
    assert caught.value.parameter == "block_weights"
    assert runtime.adapters == {} and dict(tiny_pipeline.unet.attn_processors) == processors
    runtime.add_adapter("a", state, 1.0, BlockWeights.parse("up.1=0.5"))
    with pytest.raises(InvalidArgumentError, match=r"^block_weights: down.2, up.7: the model has no such block"):
        runtime.set_block_weights("a", BlockWeights(per_block={"down.2": 0.0, "up.7": 1.0}))
    assert runtime.adapters["a"].block_weights.per_block == {"up.1": 0.5}


def test_the_command_line_refuses_blocks_the_model_or_the_adapter_does_not_have(
        tiny_model_dir, adapter_file, tmp_path, capsys):
    argv = ["generate", "--model", str(tiny_model_dir), "--lora", str(adapter_file), "--block-weights", "up.9=1",
            "--prompt", "p", "--steps", "1", "--out", str(tmp_path / "o.png")]
    assert refused(capsys, argv, tmp_path) == (
        f"difflora: error: --block-weights: up.9: the model has no such block (its blocks: {TINY_BLOCKS})")
    from difflora.formats import read_adapter
    from difflora.adapter import AdapterState

    whole = read_adapter(adapter_file)
    down_only = AdapterState({key: module for key, module in whole.modules.items() if "down_blocks" in key})
    down_file = write_adapter(down_only, tmp_path / "down-only.safetensors")
    argv = ["scale", str(down_file), "--block-weights", "up.1=0", "--out", str(tmp_path / "s.safetensors")]
    assert refused(capsys, argv, tmp_path) == (
        "difflora: error: --block-weights: up.1: the adapter has no such block (its blocks: down.0–down.1)")
    argv[3] = "down.1=0"
    assert main(argv) == 0 and (tmp_path / "s.safetensors").exists()
