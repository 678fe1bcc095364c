"""``difflora extract`` at SD 1.5 size: its SVDs (``--svd auto``, randomized where cheaper) against a full-matrix SVD
of every layer (``--svd full``, ``torch.linalg.svd``), time and error side by side in one run.

    python bench/bench_extract.py                  # SD 1.5 UNet config (random weights), change rank 16, extract 32
    python bench/bench_extract.py --config tiny    # the embedded tiny model's UNet, for a quick look
    python bench/bench_extract.py --per-shape      # one layer of each distinct shape, times weighted by their count

The base is a UNet built from SD 1.5's public config with random weights (nothing downloaded); the tuned model is the
base plus, on every Linear and Conv2d, a known change of rank ``--change-rank`` (1% of the weight's norm) and dense
noise (``--noise`` of the change's norm), as a fine-tune is: mostly low-rank, never exactly. Both runs extract every
layer (k×k convs at ``--conv-rank``); the error of each layer is measured on the factors written.

A full SVD of every SD 1.5 layer takes over half an hour on 2 busy CPU cores; ``--per-shape`` runs both SVDs
(``difflora.extract.layer_low_rank``, what ``extract_lora`` calls per layer) on one layer of each distinct shape and
weights each shape's time by how many layers have it: the same sums, from ~30 SVDs instead of 282.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import torch
from diffusers import UNet2DConditionModel

from difflora.extract import ExtractOptions, extract_lora, layer_low_rank

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
    norm_num_groups=32,
)


def tuned_from(base: UNet2DConditionModel, change_rank: int, noise: float, seed: int) -> UNet2DConditionModel:
    """``base`` + a rank-``change_rank`` change of 1% of each weight's norm + noise of ``noise`` of the change's."""
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in tuned.modules():
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                weight = layer.weight
                rows, columns = weight.shape[0], weight[0].numel()
                rank = min(change_rank, rows, columns)
                change = torch.randn(rows, rank, generator=generator) @ torch.randn(rank, columns, generator=generator)
                change *= 0.01 * weight.norm() / change.norm()
                dense = torch.randn(rows, columns, generator=generator)
                change += dense * (noise * change.norm() / dense.norm())
                weight += change.reshape(weight.shape)
    return tuned


def timed_extract(base, tuned, options: ExtractOptions):
    start = time.perf_counter()
    result = extract_lora({"unet": base}, {"unet": tuned}, options)
    return result, time.perf_counter() - start


def per_shape(base, tuned, args) -> None:
    """Both SVDs on one layer of each distinct shape; totals weighted by the number of layers of that shape."""
    shapes: dict[tuple[int, ...], list] = {}
    for (name, layer), tuned_layer in zip(base.named_modules(), tuned.modules()):
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            shapes.setdefault(tuple(layer.weight.shape), []).append((layer, tuned_layer))
    seconds = {"auto": 0.0, "full": 0.0}
    squared = {"auto": 0.0, "full": 0.0}
    total, ratios = 0.0, []
    for shape, layers in sorted(shapes.items(), key=lambda item: -torch.Size(item[0]).numel()):
        layer, tuned_layer = layers[0]
        delta = (tuned_layer.weight - layer.weight).detach().float().flatten(1)
        rank = args.conv_rank if len(shape) == 4 and shape[2:] != (1, 1) else args.rank
        errors = {}
        for svd in ("auto", "full"):
            start = time.perf_counter()
            _, _, errors[svd] = layer_low_rank(delta, rank, svd)
            seconds[svd] += (time.perf_counter() - start) * len(layers)
            squared[svd] += len(layers) * (errors[svd] * float(delta.norm())) ** 2
        total += len(layers) * float(delta.norm()) ** 2
        if errors["full"] > 1e-6:  # a layer extracted exactly has no ratio (both ~0)
            ratios.append(errors["auto"] / errors["full"])
        print(f"  {str(shape):<22} x{len(layers):<3} error auto {errors['auto']:.5f} full {errors['full']:.5f}")
    for svd in ("auto", "full"):
        print(f"  --svd {svd:<5} {seconds[svd]:8.1f} s (weighted)   overall error {(squared[svd] / total) ** 0.5:.5f}")
    print(f"ratios auto/full: time {seconds['auto'] / seconds['full']:.3f}x, overall error "
          f"{(squared['auto'] / squared['full']) ** 0.5:.5f}x, per-shape error mean {sum(ratios) / len(ratios):.5f}x, "
          f"max {max(ratios):.5f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--change-rank", type=int, default=16)
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--conv-rank", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--per-shape", action="store_true", help="one layer per distinct shape (see the docstring)")
    args = parser.parse_args()

    torch.manual_seed(0)
    base = UNet2DConditionModel(**(SD15_UNET if args.config == "sd15" else TINY_UNET)).eval()
    tuned = tuned_from(base, args.change_rank, args.noise, seed=1)
    layers = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in base.modules())
    print(f"{args.config} UNet: {sum(p.numel() for p in base.parameters()) / 1e6:.0f}M parameters, {layers} Linear/"
          f"Conv2d layers; change rank {args.change_rank} + noise {args.noise}; extract rank {args.rank}, conv rank "
          f"{args.conv_rank}; torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor()}")
    if args.per_shape:
        per_shape(base, tuned, args)
        return

    runs = {}
    for svd in ("auto", "full"):
        options = ExtractOptions(rank=args.rank, conv_rank=args.conv_rank, device=args.device, svd=svd)
        runs[svd] = timed_extract(base, tuned, options)
        result, seconds = runs[svd]
        errors = result.relative_errors
        print(f"  --svd {svd:<5} {seconds:8.1f} s   {len(errors)} layers, overall error {result.overall_error:.5f}, "
              f"per layer mean {sum(errors.values()) / len(errors):.5f}, max {max(errors.values()):.5f}")

    (auto, auto_seconds), (full, full_seconds) = runs["auto"], runs["full"]
    ratios = [auto.relative_errors[key] / full.relative_errors[key] for key in full.relative_errors
              if full.relative_errors[key] > 0]
    worst = max(full.relative_errors, key=lambda key: auto.relative_errors[key] / max(full.relative_errors[key], 1e-30))
    print(f"ratios auto/full: time {auto_seconds / full_seconds:.3f}x, overall error "
          f"{auto.overall_error / full.overall_error:.5f}x, per-layer error mean {sum(ratios) / len(ratios):.5f}x, "
          f"max {max(ratios):.5f}x ({worst})")


if __name__ == "__main__":
    main()
