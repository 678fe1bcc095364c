"""Blending cost: difflora's factor-space SVD against the full-matrix way, on the real SD 1.5 layer shapes.

    python bench/bench_blend.py                  # 4 adapters of rank 32 → rank 32, weights 0.7 −0.3 0.5 0.2
    python bench/bench_blend.py --quick          # a smoke run: CLIP-L's 48 projections only, no UNet load

The full-matrix way (what kohya's svd_merge_lora does) builds every module's d×k delta for each adapter, sums them,
and runs ``torch.linalg.svd`` on the sum. difflora stacks the factors, takes QRs and an SVD of a 128×128 core.
Shapes come from the public SD 1.5 UNet and CLIP-L configs (no weights: the factors are random). Also times
``convert`` (difflora → kohya and back) and loading such an adapter into a model. One run, ratios printed.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from difflora.blend import blend
from difflora.adapter import AdapterState, LoRAModuleWeights
from difflora.formats import read_adapter, write_adapter

WEIGHTS = (0.7, -0.3, 0.5, 0.2)


def sd15_attention_shapes() -> dict[str, tuple[int, int]]:
    """module key → (out_features, in_features) of every attention projection of SD 1.5's UNet and text encoder."""
    shapes = {}
    channels, cross = (320, 640, 1280, 1280), 768
    for block, width in enumerate(channels[:3]):  # the last down block has no attention
        for attention in range(2):
            _add_block(shapes, f"unet.down_blocks.{block}.attentions.{attention}.transformer_blocks.0", width, cross)
    _add_block(shapes, "unet.mid_block.attentions.0.transformer_blocks.0", 1280, cross)
    for block, width in zip((1, 2, 3), (1280, 640, 320)):  # the first up block has no attention
        for attention in range(3):
            _add_block(shapes, f"unet.up_blocks.{block}.attentions.{attention}.transformer_blocks.0", width, cross)
    for layer in range(12):
        for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"text_encoder.encoder.layers.{layer}.self_attn.{projection}"] = (768, 768)
    return shapes


def _add_block(shapes, prefix, width, cross):
    for attn, key_width in (("attn1", width), ("attn2", cross)):
        shapes[f"{prefix}.{attn}.to_q"] = (width, width)
        shapes[f"{prefix}.{attn}.to_k"] = (width, key_width)
        shapes[f"{prefix}.{attn}.to_v"] = (width, key_width)
        shapes[f"{prefix}.{attn}.to_out.0"] = (width, width)


def random_adapter(shapes, rank: int, seed: int) -> AdapterState:
    generator = torch.Generator().manual_seed(seed)
    modules = {
        key: LoRAModuleWeights(torch.randn(rank, fan_in, generator=generator) / fan_in**0.5,
                               torch.randn(fan_out, rank, generator=generator) * 0.01, alpha=rank / 2)
        for key, (fan_out, fan_in) in shapes.items()
    }
    return AdapterState(modules=modules)


def full_matrix_svd(adapters, rank: int) -> dict[str, float]:
    """The reference: each d×k delta built, summed, SVD'd; returns each module's relative error at ``rank``."""
    errors = {}
    for key in adapters[0][0].modules:
        total = sum(weight * state.modules[key].scale * (state.modules[key].up @ state.modules[key].down)
                    for state, weight in adapters)
        left, singular, right_t = torch.linalg.svd(total, full_matrices=False)
        approximation = (left[:, :rank] * singular[:rank]) @ right_t[:rank]
        errors[key] = float((total - approximation).norm() / total.norm())
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=32, help="rank of each adapter and of the result")
    parser.add_argument("--quick", action="store_true",
                        help="the text encoder's projections only and no loading into a UNet (checks the script runs)")
    args = parser.parse_args()
    shapes = sd15_attention_shapes()
    if args.quick:
        shapes = {key: shape for key, shape in shapes.items() if key.startswith("text_encoder.")}
    adapters = [(random_adapter(shapes, args.rank, seed), weight) for seed, weight in enumerate(WEIGHTS)]

    start = time.perf_counter()
    result = blend(adapters, method="svd", rank=args.rank)
    ours_seconds = time.perf_counter() - start
    start = time.perf_counter()
    reference_errors = full_matrix_svd(adapters, args.rank)
    reference_seconds = time.perf_counter() - start
    ours_mean = sum(result.relative_errors.values()) / len(result.relative_errors)
    reference_mean = sum(reference_errors.values()) / len(reference_errors)
    largest_gap = max(abs(result.relative_errors[k] - reference_errors[k]) for k in reference_errors)

    with tempfile.TemporaryDirectory() as folder:
        path = write_adapter(adapters[0][0], Path(folder) / "a.safetensors")
        start = time.perf_counter()
        kohya = write_adapter(read_adapter(path), Path(folder) / "k.safetensors", layout="kohya")
        back = write_adapter(read_adapter(kohya), Path(folder) / "b.safetensors")
        convert_seconds = time.perf_counter() - start
        load_seconds = None if args.quick else time_loading(back)

    where = "CLIP-L" if args.quick else "UNet + CLIP-L"
    print(f"{len(shapes)} attention projections of SD 1.5 ({where}), 4 adapters of rank {args.rank} → rank "
          f"{args.rank}; {torch.get_num_threads()} threads, torch {torch.__version__}, {platform.machine()}")
    print(f"difflora svd (factor space):   {ours_seconds:8.2f} s, mean relative error {ours_mean:.6f}")
    print(f"full-matrix svd (reference):   {reference_seconds:8.2f} s, mean relative error {reference_mean:.6f}")
    print(f"speed-up: {reference_seconds / ours_seconds:.1f}x; largest per-module error gap {largest_gap:.2e}")
    loading = "skipped (--quick)" if load_seconds is None else f"{load_seconds:.2f} s"
    print(f"convert difflora → kohya → difflora: {convert_seconds:.2f} s; load into the SD 1.5 UNet: {loading}")


def time_loading(path: Path) -> float:
    """Seconds to read the file and attach it to an SD 1.5-shaped UNet (random weights, built from its config)."""
    from difflora.runtime import LoRARuntime

    import bench_inference  # the SD 1.5 UNet config lives there

    unet = bench_inference.build_unet("sd15")
    start = time.perf_counter()
    state = read_adapter(path)
    state.modules = {k: v for k, v in state.modules.items() if k.startswith("unet.")}  # no text encoder built here
    runtime = LoRARuntime(SimpleNamespace(unet=unet))
    runtime.add_adapter("a", state)
    return time.perf_counter() - start


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
