"""Values: every weight and number finite and in range with the range in the message (one check, ``number_in``), in
the library and on the command line; a mix whose change overflows the model's dtype refused before generating,
fusing or merging, naming the adapter by its file; per-block names that are not blocks of the model (or, without
one, of an SD/SDXL UNet) refused, and a block named twice refused."""

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from difflora import LoRARuntime
from difflora.blocks import BlockWeights, describe_blocks, unet_blocks
from difflora.cli import LoRASpec, _adapter_names, main
from difflora.errors import SEED_RANGE, FuseError, InvalidArgumentError, number_in
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


# ----- the one range check ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, low, high, options, message", [
    (0, 1, 1000, {"integer": True}, "x must be a positive integer in [1, 1000], got 0"),
    (1001, 1, 1000, {"integer": True}, "x must be a positive integer in [1, 1000], got 1001"),
    (True, 1, 1000, {"integer": True}, "x must be a positive integer in [1, 1000], got True"),
    (2.0, 1, 1000, {"integer": True}, "x must be a positive integer in [1, 1000], got 2.0"),
    (60, 8, 4096, {"integer": True, "multiple_of": 8}, "x must be a positive multiple of 8 in [8, 4096], got 60"),
    (-1, *SEED_RANGE, {"integer": True}, "x must be an integer in [0, 2**63 - 1], got -1"),
    (math.nan, 0.0, 100.0, {}, "x must be a finite number in [0, 100], got nan"),
    (-math.inf, -100.0, 100.0, {}, "x must be a finite number in [-100, 100], got -inf"),
    (0.0, 0.0, 1.0, {"low_open": True}, "x must be a finite number in (0, 1], got 0.0"),
    ("7", 0.0, 100.0, {}, "x must be a finite number in [0, 100], got '7'"),
    ("1e38", -100.0, 100.0, {"convert": True}, "x must be a finite number in [-100, 100], got 1e+38"),
    ("lots", -100.0, 100.0, {"convert": True}, "x must be a number, got 'lots'"),
])
def test_one_range_check_puts_the_range_in_the_message(value, low, high, options, message):
    with pytest.raises(InvalidArgumentError) as caught:
        number_in(value, low, high, "x", "x_parameter", **options)
    assert str(caught.value) == message and caught.value.parameter == "x_parameter"


def test_one_range_check_returns_the_number_it_accepts():
    assert number_in(1000, 1, 1000, "steps", integer=True) == 1000
    assert number_in(1, 0.0, 1.0, "p") == 1.0 and isinstance(number_in(1, 0.0, 1.0, "p"), float)
    assert number_in(" -0.5", -1.0, 1.0, "w", convert=True) == -0.5
    assert number_in(SEED_RANGE[1], *SEED_RANGE, "seed", integer=True) == 2**63 - 1


def test_the_seed_range_is_the_same_everywhere(tmp_path, capsys):
    message = f"must be an integer in [0, 2**63 - 1], got {2**63}"
    with pytest.raises(InvalidArgumentError, match=re.escape(f"seed {message}")):
        GenerationSettings("p", seed=2**63).validate()
    from difflora.train.config import make_config

    for name in ("seed", "validation_seed"):
        with pytest.raises(InvalidArgumentError, match=re.escape(f"{name} {message}")):
            make_config({"data": "images", name: 2**63})
    assert refused(capsys, ["init-model", str(tmp_path / "tiny"), "--seed", str(2**63)], tmp_path) == (
        f"difflora: error: --seed {message}")


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


@pytest.mark.parametrize("text, first, second, block", [
    ("te=1,te=2", "te=1", "te=2", "text_encoder"),
    ("text=1,text_encoder=0", "text=1", "text_encoder=0", "text_encoder"),
    ("up.1=0.5,up.01=1", "up.1=0.5", "up.01=1", "up.1"),
    ("down=0,mid=1,DOWN=1", "down=0", "DOWN=1", "down"),
])
def test_a_block_named_twice_is_refused(text, first, second, block):
    with pytest.raises(InvalidArgumentError) as caught:
        BlockWeights.parse(text)
    assert str(caught.value) == (
        f"block_weights: {first!r} and {second!r} both set block {block}; give each block once")
    assert caught.value.parameter == "block_weights"
    # A part and one of its blocks are two names: the block wins over its part.
    assert BlockWeights.parse("up=0,up.1=0.5").factor("unet", "up_blocks.1.attentions.0") == 0.5


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
    ("steps", 0, "steps must be a positive integer in [1, 1000], got 0"),
    ("steps", 1001, "steps must be a positive integer in [1, 1000], got 1001"),
    ("num_images", 65, "num_images must be a positive integer in [1, 64], got 65"),
    ("seed", -1, "seed must be an integer in [0, 2**63 - 1], got -1"),
    ("seed", 2**63, f"seed must be an integer in [0, 2**63 - 1], got {2**63}"),
    ("width", 0, "width must be a positive multiple of 8 in [8, 4096], got 0"),
    ("width", 4104, "width must be a positive multiple of 8 in [8, 4096], got 4104"),
    ("height", 60, "height must be a positive multiple of 8 in [8, 4096], got 60"),
    ("height", True, "height must be a positive multiple of 8 in [8, 4096], got True"),
])
def test_generation_settings_are_in_range(field, value, message):
    GenerationSettings("p", guidance=0.0, seed=2**63 - 1, width=4096, steps=1000, num_images=64).validate()
    settings = GenerationSettings("p")
    setattr(settings, field, value)
    with pytest.raises(InvalidArgumentError) as caught:
        settings.validate()
    assert str(caught.value) == message and caught.value.parameter == field


@pytest.mark.parametrize("flag, value, message", [
    ("--width", "0", "--width must be a positive multiple of 8 in [8, 4096], got 0"),  # not the native size
    ("--height", "0", "--height must be a positive multiple of 8 in [8, 4096], got 0"),
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


@pytest.mark.parametrize("command", ["generate", "merge"])
def test_the_command_line_refuses_a_mix_the_model_cannot_hold_naming_the_file(
        command, half_pipeline, tiny_model_dir, tmp_path, capsys):
    state, key = overflowing_adapter(half_pipeline)
    adapter = write_adapter(state, tmp_path / "big.safetensors")
    small = write_adapter(random_adapter(half_pipeline, rank=2, alpha=2, seed=5), tmp_path / "small.safetensors")
    argv = [command, "--model", str(tiny_model_dir), "--dtype", "fp16", "--lora", str(small), "--lora", str(adapter)]
    argv += ["--prompt", "p", "--steps", "1", "--out", str(tmp_path / "o.png")] if command == "generate" else [
        "--out", str(tmp_path / "merged")]
    line = refused(capsys, argv, tmp_path)
    # The adapter is named by its file (big.safetensors → 'big'), as the user knows it.
    assert line.startswith(f"difflora: error: weight of adapter 'big' is too large for {key} in float16: "), line


def test_adapters_are_named_by_their_files_and_the_names_are_unique():
    specs = [LoRASpec(Path(path)) for path in (
        "a/style.safetensors", "b/style.safetensors", "style_1.safetensors", "c/style.v2.safetensors")]
    assert _adapter_names(specs) == ["style", "style_1", "style_1_2", "style_v2"]


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


def test_the_command_line_refuses_blocks_no_model_has_and_scale_warns_of_idle_ones(
        tiny_model_dir, adapter_file, tmp_path, capsys):
    argv = ["generate", "--model", str(tiny_model_dir), "--lora", str(adapter_file), "--block-weights", "up.9=1",
            "--prompt", "p", "--steps", "1", "--out", str(tmp_path / "o.png")]
    assert refused(capsys, argv, tmp_path) == (
        f"difflora: error: --block-weights: up.9: the model has no such block (its blocks: {TINY_BLOCKS})")
    from difflora.formats import read_adapter
    from difflora.adapter import AdapterState

    # Without a model, scale takes any block an SD or SDXL UNet has (A1111 presets name down.3 and up.0, which have
    # no attention in SD 1.5): a block the adapter has no module in changes nothing, and one warning line says so.
    whole = read_adapter(adapter_file)
    down_only = AdapterState({key: module for key, module in whole.modules.items() if "down_blocks" in key})
    down_file = write_adapter(down_only, tmp_path / "down-only.safetensors")
    out = tmp_path / "s.safetensors"
    argv = ["scale", str(down_file), "--block-weights", "up.1=0,down.3=0.5,down.1=2", "--out", str(out)]
    assert refused(capsys, [*argv[:3], "down.4=0,up.1=0", *argv[4:]], tmp_path) == (
        "difflora: error: --block-weights: down.4: an SD or SDXL UNet has no such block (its blocks: "
        "down.0–down.3, up.0–up.3)")
    assert main(argv) == 0
    assert capsys.readouterr().err == (
        f"difflora: warning: --block-weights: no module of {down_file} is in down.3, up.1, so their weights change "
        "nothing\n")
    scaled = read_adapter(out)
    for key, module in down_only.modules.items():
        expected = 2.0 if key.startswith("unet.down_blocks.1.") else 1.0
        assert torch.equal(scaled.modules[key].up, module.up * expected), key
