"""LyCORIS' updates against two references: the same maths written here by hand (einsum, kron), and LyCORIS' own
functional code (``lycoris-lora``). Every algorithm × {Linear, Conv 1×1, Conv 3×3}, fp32, 1e-5 relative."""

import pytest
import torch

from difflora.lora import lora_delta
from difflora.lycoris import FullDiff, LoHaFactors, LoKrFactors, dora_weight, loha_delta, lokr_delta

lycoris = pytest.importorskip("lycoris.functional", reason="lycoris-lora is the second reference (test extra)")

SHAPES = {"linear": (12, 8), "conv1x1": (12, 8, 1, 1), "conv3x3": (12, 8, 3, 3)}
RANK = 3


def draw(*size, seed=[0]):
    seed[0] += 1
    return torch.randn(*size, generator=torch.Generator().manual_seed(seed[0]))


def relative(ours, theirs):
    return float((ours - theirs).norm() / theirs.norm())


WITH_TUCKER = [(kind, tucker) for kind in SHAPES for tucker in (False, True) if not tucker or kind != "linear"]


@pytest.mark.parametrize("kind, tucker", WITH_TUCKER)  # a Tucker core needs a conv kernel
def test_lora_and_locon_equal_lycoris(kind, tucker):
    shape = SHAPES[kind]
    conv = len(shape) == 4
    kernel = shape[2:] if conv else ()
    if tucker:
        down, up, mid = draw(RANK, shape[1], 1, 1), draw(shape[0], RANK, 1, 1), draw(RANK, RANK, *kernel)
    else:
        down, up, mid = draw(RANK, shape[1], *kernel), draw(shape[0], RANK, *(1, 1)[:len(kernel)]), None
    ours = lora_delta(down, up, mid, scale=0.5)
    theirs = lycoris.locon.diff_weight(down, up, mid, gamma=0.5)
    assert ours.shape == shape and relative(ours, theirs) < 1e-5
    if mid is None:  # by hand: a matrix product of the flattened factors
        assert relative(ours, 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(shape)) < 1e-5


@pytest.mark.parametrize("kind, tucker", WITH_TUCKER)
def test_loha_equals_lycoris_and_the_hadamard_product(kind, tucker):
    shape = SHAPES[kind]
    out_features, in_features, kernel = shape[0], shape[1], shape[2:]
    if tucker:
        w1a, w1b, w2a, w2b = draw(RANK, out_features), draw(RANK, in_features), draw(RANK, out_features), draw(
            RANK, in_features)
        t1, t2 = draw(RANK, RANK, *kernel), draw(RANK, RANK, *kernel)
        halves = [torch.einsum("ijhw,io,jc->ochw", t, a, b) for t, a, b in ((t1, w1a, w1b), (t2, w2a, w2b))]
    else:
        flat_in = in_features * (kernel[0] * kernel[1] if kernel else 1)
        w1a, w1b, w2a, w2b = draw(out_features, RANK), draw(RANK, flat_in), draw(out_features, RANK), draw(
            RANK, flat_in)
        t1 = t2 = None
        halves = [(w1a @ w1b).reshape(shape), (w2a @ w2b).reshape(shape)]
    update = LoHaFactors(shape, w1a, w1b, w2a, w2b, t1, t2, alpha=1.5)
    assert update.scale == 1.5 / RANK
    ours = update.delta_weight()
    by_hand = halves[0] * halves[1] * update.scale
    theirs = lycoris.loha.diff_weight(w1b, w1a, w2b, w2a, t1, t2, gamma=update.scale).reshape(shape)
    assert ours.shape == shape and relative(ours, by_hand) < 1e-5 and relative(ours, theirs) < 1e-5
    assert relative(loha_delta(w1a, w1b, w2a, w2b, t1, t2, update.scale, shape), by_hand) < 1e-5


LOKR_LAYOUTS = ["whole", "w1-factorised", "w2-factorised", "w2-tucker"]


@pytest.mark.parametrize("kind, layout", [(kind, layout) for kind in SHAPES for layout in LOKR_LAYOUTS
                                          if layout != "w2-tucker" or kind != "linear"])
def test_lokr_equals_lycoris_and_the_kronecker_product(kind, layout):
    shape = SHAPES[kind]
    kernel = shape[2:]
    a, b = 3, 2  # out = a·c, in = b·d
    c, d = shape[0] // a, shape[1] // b
    flat_d = d * (kernel[0] * kernel[1] if kernel else 1)
    w1, w1a, w1b = (None, draw(a, RANK), draw(RANK, b)) if layout == "w1-factorised" else (draw(a, b), None, None)
    w2 = w2a = w2b = t2 = None
    if layout == "w2-factorised":
        w2a, w2b = draw(c, RANK), draw(RANK, flat_d)
        right = (w2a @ w2b).reshape(c, d, *kernel)
    elif layout == "w2-tucker":
        w2a, w2b, t2 = draw(RANK, c), draw(RANK, d), draw(RANK, RANK, *kernel)
        right = torch.einsum("ijhw,io,jc->ochw", t2, w2a, w2b).contiguous()
    else:
        w2 = draw(c, d, *kernel)
        right = w2
    update = LoKrFactors(shape, w1, w1a, w1b, w2, w2a, w2b, t2, alpha=4.0)
    factorised = layout != "whole"
    assert update.scale == (4.0 / RANK if factorised else 1.0)  # alpha counts only where a side is factorised
    left = w1 if w1 is not None else w1a @ w1b
    by_hand = torch.kron(left.reshape(a, b, *[1] * len(kernel)), right) * update.scale
    ours = update.delta_weight()
    assert ours.shape == shape and relative(ours, by_hand) < 1e-5
    theirs = lycoris.lokr.kron_weight(w1, w1a, w1b, w2, w2a, w2b.reshape(RANK, d, *kernel) if (
        w2b is not None and t2 is None and kernel) else w2b, t2, scale=update.scale).reshape(shape)
    assert relative(ours, theirs) < 1e-5
    assert relative(lokr_delta(w1, w1a, w1b, w2, w2a, w2b, t2, update.scale, shape), by_hand) < 1e-5


def test_lokr_with_both_sides_factorised_at_different_ranks_scales_by_w2s_rank():
    """ComfyUI, A1111 and Forge take ``dim`` from ``w2_b`` when both sides are factorised (each overwrites it in that
    order); LyCORIS writes equal ranks, so only files made otherwise tell the two apart."""
    w1a, w1b, w2a, w2b = draw(3, 2), draw(2, 2), draw(4, 5), draw(5, 4)
    update = LoKrFactors((12, 8), w1a=w1a, w1b=w1b, w2a=w2a, w2b=w2b, alpha=10.0)
    assert update.rank == 5 and update.scale == 2.0
    by_hand = torch.kron(w1a @ w1b, w2a @ w2b) * (10.0 / 5)
    assert relative(update.delta_weight(), by_hand) < 1e-5


@pytest.mark.parametrize("kind", SHAPES)
def test_full_diff_is_the_diff_and_its_bias(kind):
    shape = SHAPES[kind]
    diff, diff_b = draw(*shape), draw(shape[0])
    update = FullDiff(diff, diff_b)
    assert torch.equal(update.delta_weight(), diff) and torch.equal(update.bias_delta(), diff_b)
    x = draw(2, shape[1], 5, 5) if len(shape) == 4 else draw(2, shape[1])
    conv = torch.nn.Conv2d(shape[1], shape[0], shape[2:], padding=shape[2] // 2) if len(shape) == 4 else None
    expected = (torch.nn.functional.conv2d(x, diff, diff_b, padding=shape[2] // 2) if conv is not None
                else x @ diff.t() + diff_b)
    torch.testing.assert_close(update(x, 1.0, conv), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("wd_on_output", [True, False])
def test_dora_at_full_strength_equals_lycoris_and_interpolates_below(kind, wd_on_output):
    shape = SHAPES[kind]
    weight, delta = draw(*shape), draw(*shape) * 0.1
    if wd_on_output:
        magnitude = draw(shape[0]).abs().reshape(shape[0], *[1] * (len(shape) - 1))
    else:
        magnitude = draw(shape[1]).abs().reshape(1, shape[1], *[1] * (len(shape) - 2))
    full = dora_weight(weight, delta, magnitude, 1.0, wd_on_output)
    theirs = lycoris.general.weight_decompose(weight + delta, magnitude, 1.0, wd_on_output)
    assert relative(full, theirs) < 1e-5  # LyCORIS adds eps to the norm: far below 1e-5 here
    # By hand: the norm per output row (or input column) of V = W + ΔW, then g · V / ‖V‖.
    merged = weight + delta
    dims = tuple(range(1, len(shape))) if wd_on_output else (0, *range(2, len(shape)))
    by_hand = magnitude * merged / merged.pow(2).sum(dim=dims, keepdim=True).sqrt()
    assert relative(full, by_hand) < 1e-5
    # Below full strength, the weight moves from W towards the DoRA weight (A1111's and ComfyUI's convention).
    half = dora_weight(weight, delta, magnitude, 0.3, wd_on_output)
    assert relative(half, weight + 0.3 * (by_hand - weight)) < 1e-5
    assert torch.equal(dora_weight(weight, delta, magnitude, 0.0, wd_on_output), weight)
