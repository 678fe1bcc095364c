"""Blending, scaling and resizing adapters: exact where the maths allows, optimal where it does not."""

from pathlib import Path

import pytest
import torch
from peft.utils import merge_utils

from difflora import BlockWeights, LoRARuntime
from difflora.blend import blend, low_rank_approximation, resize_adapter, scale_adapter
from difflora._entry import error_line
from difflora.errors import InvalidArgumentError
from difflora.adapter import AdapterState, LoRAModuleWeights
from difflora.formats import write_adapter
from difflora.generate import GenerationSettings, generate
from difflora.pipelines import load_pipeline
from helpers import random_adapter

SETTINGS = GenerationSettings(prompt="a watercolor of a harbour", steps=3, guidance=5.0, seed=2, width=64, height=64)


def image(pipe):
    return generate(pipe, SETTINGS, output_type="np")[0]


def delta(module: LoRAModuleWeights) -> torch.Tensor:
    return module.scale * (module.up.double() @ module.down.double())


@pytest.fixture
def pipe(tiny_model_dir):
    return load_pipeline(tiny_model_dir, quiet=True)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")  # two adapters on purpose
def test_concat_equals_diffusers_set_adapters(pipe, tiny_model_dir, tmp_path):
    a = random_adapter(pipe, rank=4, alpha=8, seed=1)
    b = random_adapter(pipe, rank=2, alpha=1, seed=2)
    result = blend([(a, 0.7), (b, -0.3)], method="concat")
    assert result.max_relative_error == 0.0
    some_key = next(iter(result.state.modules))
    assert result.state.modules[some_key].rank == 6  # exact: the ranks add up

    ours = load_pipeline(tiny_model_dir, quiet=True)
    LoRARuntime.attach(ours).add_adapter("blend", result.state)
    plain = load_pipeline(tiny_model_dir, quiet=True)
    plain.load_lora_weights(str(write_adapter(a, tmp_path / "a.safetensors")), adapter_name="a")
    plain.load_lora_weights(str(write_adapter(b, tmp_path / "b.safetensors")), adapter_name="b")
    plain.set_adapters(["a", "b"], [0.7, -0.3])
    assert abs(image(ours) - image(plain)).max() <= 1 / 255
    assert abs(image(ours) - image(load_pipeline(tiny_model_dir, quiet=True))).max() > 10 / 255


def test_concat_handles_modules_only_some_adapters_have(pipe):
    a = random_adapter(pipe, rank=4, alpha=4, seed=3, components=("unet",))
    b = random_adapter(pipe, rank=2, alpha=2, seed=4, components=("text_encoder",))
    result = blend([(a, 1.0), (b, 0.5)], method="concat")
    assert set(result.state.modules) == set(a.modules) | set(b.modules)
    key = next(k for k in b.modules)
    torch.testing.assert_close(delta(result.state.modules[key]), 0.5 * delta(b.modules[key]))


def test_svd_at_full_rank_is_exact_and_lower_rank_is_optimal(pipe):
    a = random_adapter(pipe, rank=4, alpha=8, seed=5, components=("unet",))
    b = random_adapter(pipe, rank=3, alpha=2, seed=6, components=("unet",))
    exact = {key: 0.7 * delta(a.modules[key]) - 0.3 * delta(b.modules[key]) for key in a.modules}

    full = blend([(a, 0.7), (b, -0.3)], method="svd", rank=7)
    for key, module in full.state.modules.items():
        torch.testing.assert_close(delta(module), exact[key], rtol=0, atol=1e-5)
    assert full.max_relative_error < 1e-6

    low = blend([(a, 0.7), (b, -0.3)], method="svd", rank=3)
    for key, module in low.state.modules.items():
        singular = torch.linalg.svdvals(exact[key])
        optimum = float(singular[3:].norm() / singular.norm())
        achieved = float((delta(module) - exact[key]).norm() / exact[key].norm())
        assert module.rank == 3
        assert achieved == pytest.approx(optimum, rel=1e-4, abs=1e-7)
        assert low.relative_errors[key] == pytest.approx(optimum, rel=1e-4, abs=1e-7)


def test_low_rank_approximation_never_forms_the_full_matrix_but_agrees_with_it():
    generator = torch.Generator().manual_seed(0)
    up, down = torch.randn(300, 12, generator=generator), torch.randn(12, 200, generator=generator)
    new_up, new_down, error, singular = low_rank_approximation(up, down, rank=5)
    full = torch.linalg.svdvals(up.double() @ down.double())  # 200 values, of which only 12 can be non-zero
    torch.testing.assert_close(singular.double(), full[:12], rtol=1e-5, atol=1e-4)
    assert full[12:].max() < 1e-9 * full[0]
    assert new_up.shape == (300, 5) and new_down.shape == (5, 200)
    kept_up, _, kept_error, _ = low_rank_approximation(up, down, energy=0.9)
    assert kept_error <= (1 - 0.9) ** 0.5 + 1e-9  # the dropped squares hold at most 10% of the energy
    assert kept_up.shape[1] < 12
    with pytest.raises(InvalidArgumentError, match=r"^energy must be in \(0, 1\], got 1.5$") as caught:
        low_rank_approximation(up, down, energy=1.5)
    assert caught.value.parameter == "energy"
    with pytest.raises(InvalidArgumentError, match="^rank must be a positive integer, got 0$") as caught:
        low_rank_approximation(up, down, rank=0)
    assert caught.value.parameter == "rank"


@pytest.mark.parametrize("method, peft_merge", [("ties", merge_utils.ties), ("dare", merge_utils.dare_linear)])
def test_ties_and_dare_use_peft_on_whole_deltas(pipe, method, peft_merge):
    a = random_adapter(pipe, rank=4, alpha=4, seed=7, components=("text_encoder",))
    b = random_adapter(pipe, rank=4, alpha=8, seed=8, components=("text_encoder",))
    torch.manual_seed(0)
    result = blend([(a, 0.6), (b, 0.4)], method=method, rank=32, density=0.5)  # full rank: no truncation error
    torch.manual_seed(0)
    for key, module in sorted(result.state.modules.items()):
        deltas = [delta(a.modules[key]).float(), delta(b.modules[key]).float()]
        expected = peft_merge(deltas, torch.tensor([0.6, 0.4]), 0.5)
        torch.testing.assert_close(delta(module).float(), expected, rtol=0, atol=1e-5)


# BlockWeights(down=0.25, mid=2, up=0, te=0.5, down.0=1.5, up.1=0.75) written out by hand for every module path of
# the tiny model (two down, one mid and two up blocks with attention): a block index wins over its part.
BLOCK_WEIGHTS = BlockWeights(down=0.25, mid=2.0, up=0.0, text_encoder=0.5, per_block={"down.0": 1.5, "up.1": 0.75})
MULTIPLIER_BY_PREFIX = {
    "unet.down_blocks.0.": 1.5,
    "unet.down_blocks.1.": 0.25,
    "unet.mid_block.": 2.0,
    "unet.up_blocks.0.": 0.0,
    "unet.up_blocks.1.": 0.75,
    "text_encoder.": 0.5,
}


def hand_multiplier(module_key: str) -> float:
    (multiplier,) = [value for prefix, value in MULTIPLIER_BY_PREFIX.items() if module_key.startswith(prefix)]
    return multiplier


def merge_into_weights(pipe, state: AdapterState, multiplier) -> None:
    """The reference: ``W ← W + multiplier(key) · scale · up @ down`` in the model's own linear layers."""
    with torch.no_grad():
        for module_key, module in state.modules.items():
            component, _, path = module_key.partition(".")
            layer = getattr(pipe, component).get_submodule(path)
            layer.weight += multiplier(module_key) * module.scale * (module.up @ module.down)


def test_scale_and_block_weights(pipe, tiny_model_dir):
    state = random_adapter(pipe, rank=4, alpha=8, seed=9)
    scaled = scale_adapter(state, weight=0.5, block_weights=BLOCK_WEIGHTS)
    assert set(scaled.modules) == set(state.modules)
    for key, module in scaled.modules.items():
        expected = 0.5 * hand_multiplier(key) * delta(state.modules[key])
        torch.testing.assert_close(delta(module), expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))

    ours = load_pipeline(tiny_model_dir, quiet=True)
    LoRARuntime.attach(ours).add_adapter("scaled", scaled)
    reference = load_pipeline(tiny_model_dir, quiet=True)
    merge_into_weights(reference, state, lambda key: 0.5 * hand_multiplier(key))
    assert abs(image(ours) - image(reference)).max() < 1e-5
    assert abs(image(ours) - image(pipe)).max() > 10 / 255  # the scaled adapter still changes the picture


def test_resize_reports_the_optimal_error(pipe):
    state = random_adapter(pipe, rank=8, alpha=8, seed=10, components=("unet",))
    smaller = resize_adapter(state, rank=3)
    assert set(smaller.state.modules) == set(state.modules)
    for key, module in smaller.state.modules.items():
        original = delta(state.modules[key])
        singular = torch.linalg.svdvals(original)
        optimum = float(singular[3:].norm() / singular.norm())  # Eckart–Young: no rank-3 factors do better
        achieved = float((delta(module) - original).norm() / original.norm())  # what the written factors give
        assert module.rank == 3
        assert achieved == pytest.approx(optimum, rel=1e-4)
        assert smaller.relative_errors[key] == pytest.approx(achieved, rel=1e-4)
    kept = resize_adapter(state, energy=0.999999)
    for key, module in kept.state.modules.items():
        assert module.rank == 8
        torch.testing.assert_close(delta(module), delta(state.modules[key]), rtol=0, atol=1e-6)
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        resize_adapter(state)


def refused(call, *args, **kwargs) -> InvalidArgumentError:
    with pytest.raises(InvalidArgumentError) as caught:
        call(*args, **kwargs)
    return caught.value


def test_bad_blends_are_refused(pipe):
    """Library errors name the parameter (the command line turns it into its flag, the web UI into its field)."""
    a = random_adapter(pipe, rank=2, alpha=2, seed=11, components=("unet",))
    key = next(iter(a.modules))
    other = AdapterState(modules={key: LoRAModuleWeights(torch.ones(2, 7), torch.ones(5, 2), 2.0)})
    cases = [
        (refused(blend, [(a, 1.0)], method="average"), "method", "method 'average' is not one of concat, svd"),
        (refused(blend, [(a, 1.0)], method="svd"), "rank", "rank is required by method 'svd' (a positive integer)"),
        (refused(blend, [(a, 1.0)], method="dare", rank=0), "rank", "rank is required by method 'dare'"),
        (refused(blend, [(a, 1.0)], method="ties", rank=2, density=0.0), "density", "density must be in (0, 1]"),
        (refused(blend, [(a, float("nan"))]), "adapters", "adapters: the weight of adapter 1 must be a finite"),
        (refused(blend, []), "adapters", "adapters must hold at least one"),
        (refused(blend, [(a, 1.0), (other, 1.0)]), "adapters", f"adapters disagree on the shape of {key!r}"),
        (refused(scale_adapter, a, weight=float("inf")), "weight",
         "weight must be a finite number in [-100, 100], got inf"),
        (refused(blend, [(a, 1e38)]), "adapters", "adapters: the weight of adapter 1 must be a finite number in [-100"),
        (refused(resize_adapter, a), None, "rank or energy: resize needs exactly one of them, got neither"),
        (refused(resize_adapter, a, rank=1, energy=0.5), None, "rank or energy: resize needs exactly one of them"),
        (refused(resize_adapter, a, rank=0), "rank", "rank must be a positive integer, got 0"),
    ]
    for error, parameter, message in cases:
        assert error.parameter == parameter and str(error).startswith(message), (parameter, str(error))
        assert "--" not in str(error)
    # On the command line the parameter reads as its flag, as the message did before it named the parameter.
    assert error_line(cases[1][0], {"--rank", "--method"}).startswith("difflora: error: --rank is required by")


# ----- results too large for float32 --------------------------------------------------------------------------------

TO_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def huge_adapter(value: float = 1e37) -> AdapterState:
    """A finite adapter (every command reads it) whose factors are near float32's limit: a weight of 100 or the
    product of its factors passes 3.4e38."""
    generator = torch.Generator().manual_seed(12)
    down, up = torch.randn(2, 32, generator=generator), torch.randn(32, 2, generator=generator)
    up[0, 0] = value
    return AdapterState(modules={TO_Q: LoRAModuleWeights(down, up, alpha=2.0)})


@pytest.mark.parametrize("method, what", [
    ("concat", "its weighted up factor"), ("svd", "its weighted up factor"), ("ties", "its ties merge"),
    ("dare", "its dare merge"),
])
def test_a_blend_too_large_for_float32_is_one_line_naming_the_module(method, what, capfd):
    small = huge_adapter(1.0)
    with pytest.raises(InvalidArgumentError) as caught:
        blend([(small, 1.0), (huge_adapter(), 100.0)], method=method, rank=1)
    assert caught.value.parameter == "adapters"
    assert str(caught.value) == (
        f"adapters: module {TO_Q!r}: {what} is too large for float32 (it holds NaN or inf); use smaller weights")
    assert capfd.readouterr() == ("", "")  # refused before LAPACK saw it (MKL prints its own error on NaN)
    blend([(small, 1.0), (huge_adapter(), 1.0)], method=method, rank=1)  # the same file at weight 1 blends


def test_a_resize_too_large_for_float32_is_one_line_naming_the_module(capfd):
    huge = huge_adapter(1e37)
    huge.modules[TO_Q].down[0, 0] = 1e37  # each factor finite, their product past float32
    with pytest.raises(InvalidArgumentError) as caught:
        resize_adapter(huge, rank=1)
    assert str(caught.value) == (
        f"state: module {TO_Q!r}: the product of its factors is too large for float32 (it holds NaN or inf)")
    assert capfd.readouterr().err == ""


def test_an_svd_that_fails_is_one_line_naming_the_module(monkeypatch):
    def fails(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge because the input matrix is "
                                       "ill-conditioned or has too many repeated singular values (error code: 3).")

    monkeypatch.setattr(torch.linalg, "svd", fails)
    for method in ("svd", "ties"):
        with pytest.raises(InvalidArgumentError) as caught:
            blend([(huge_adapter(1.0), 1.0)], method=method, rank=1)
        assert str(caught.value) == f"adapters: module {TO_Q!r}: the SVD failed (linalg.svd: The algorithm failed to " \
            "converge because the input matrix is ill-conditioned or has too many repeated singular values (error " \
            "code: 3).)"


def test_scale_multiplies_in_float32_keeps_the_dtype_and_knows_sd_blocks():
    half = huge_adapter(1.0)
    module = half.modules[TO_Q]
    module.up, module.down = module.up.to(torch.bfloat16), module.down.to(torch.bfloat16)
    scaled = scale_adapter(half, weight=0.3).modules[TO_Q]
    assert scaled.up.dtype == torch.bfloat16  # the file stays as small as it was
    # The float32 product rounded once (torch's half-precision kernels also compute in float32 on the CPU, so this
    # holds for a plain bfloat16 product too: it pins the result, it cannot tell the two apart).
    assert torch.equal(scaled.up, (module.up.float() * 0.3).to(torch.bfloat16))
    assert scale_adapter(half, 1.0, BlockWeights.parse("down.3=0,up.0=0.5")).modules[TO_Q].up.equal(module.up)
    with pytest.raises(InvalidArgumentError) as caught:
        scale_adapter(half, 1.0, BlockWeights.parse("up.4=0"))
    assert str(caught.value) == ("block_weights: up.4: an SD or SDXL UNet has no such block (its blocks: "
                                 "down.0–down.3, up.0–up.3)")


def lycoris_loha_file(folder: Path) -> Path:
    """A LoHa module as LyCORIS writes it (``hada_w1_a`` … ``hada_w2_b`` and ``alpha`` under kohya's names)."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(13)
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {f"{prefix}.hada_w1_a": torch.randn(32, 2, generator=generator),
               f"{prefix}.hada_w1_b": torch.randn(2, 32, generator=generator),
               f"{prefix}.hada_w2_a": torch.randn(32, 2, generator=generator),
               f"{prefix}.hada_w2_b": torch.randn(2, 32, generator=generator),
               f"{prefix}.alpha": torch.tensor(2.0)}
    path = folder / "loha.safetensors"
    save_file(tensors, str(path),
              metadata={"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "loha"}'})
    return path


def test_blend_scale_and_resize_take_a_lycoris_file_and_refuse_what_needs_a_rank_naming_it(tmp_path, capsys):
    """Every kind goes through blend, scale and resize now (tests/test_blend_kinds.py checks the maths); what a LoHa
    needs and lacks is told in one line naming the flag, and nothing is written."""
    from difflora.cli import main
    from difflora.formats import read_adapter

    path = lycoris_loha_file(tmp_path)
    loha = read_adapter(path).modules[TO_Q]
    out = tmp_path / "out.safetensors"
    assert main(["blend", str(path), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"difflora: error: --rank is required to concat adapter 1, whose module {TO_Q!r} is loha: its update joins "
        "the blend as LoRA by SVD at that rank (a positive integer), got None\n")
    assert sorted(tmp_path.iterdir()) == [path]
    assert main(["scale", str(path), "--weight", "0.5", "--out", str(out)]) == 0
    scaled = read_adapter(out)  # a LoHa stays a LoHa, so the file is kohya's (difflora files hold LoRA only)
    assert scaled.source_format == "kohya" and scaled.modules[TO_Q].kind == "loha"
    torch.testing.assert_close(scaled.modules[TO_Q].delta_weight(), 0.5 * loha.delta_weight())
    resized = tmp_path / "resized.safetensors"
    assert main(["resize", str(path), "--rank", "1", "--out", str(resized)]) == 0
    assert "1 module, relative error per module" in capsys.readouterr().err
    assert read_adapter(resized).modules[TO_Q].kind == "lora" and read_adapter(resized).source_format == "difflora"
