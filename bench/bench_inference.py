"""Inference cost of adapters: difflora's processors (1 and 4 unfused adapters, fused) against the base UNet and
against diffusers+PEFT ``set_adapters`` with the same adapters, on the same UNet config, in one run.

    python bench/bench_inference.py                     # SD 1.5 UNet config (random weights), 32×32 latents
    python bench/bench_inference.py --config tiny       # the embedded tiny model's UNet, for a quick look

Prints median seconds per UNet forward (batch 2, as with classifier-free guidance) and ratios against the base.
No weights are downloaded: the SD 1.5 UNet is built from its public config with random weights.
"""

from __future__ import annotations

import argparse
import copy
import platform
import random
import statistics
import time
from types import SimpleNamespace

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig

from difflora import LoRARuntime

# The public architecture of runwayml/stable-diffusion-v1-5's UNet (unet/config.json).
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
ADAPTER_NAMES = ("a", "b", "c", "d")
WEIGHTS = (0.7, -0.3, 0.5, 0.2)


def build_unet(config: str) -> UNet2DConditionModel:
    torch.manual_seed(0)
    if config == "sd15":
        return UNet2DConditionModel(**SD15_UNET).eval()
    from difflora.pipelines import load_pipeline

    return load_pipeline(None, quiet=True).unet.eval()


def time_forward(unet, latents, context, timestep) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        unet(latents, timestep, context)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--latent-size", type=int, default=32, help="latent side (32 = 256 px images for SD 1.5)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # Random weights drive some attention logits far apart; exp() of their differences lands in denormal floats, which
    # x86 computes many times slower. How many depends on the weights, so a variant's time would depend on its values
    # rather than its work (seen here: an unfused mix 0.9x the base, the same mix fused 1.06x). Flush them to zero, as
    # GPUs do, for every variant alike.
    torch.set_flush_denormal(True)

    template = build_unet(args.config)
    base_unet, peft_unet, ours_unet = (copy.deepcopy(template) for _ in range(3))  # alike in memory, all copies
    cross_dim = template.config.cross_attention_dim
    del template
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, args.latent_size, args.latent_size, generator=generator)
    context = torch.randn(2, 77, cross_dim, generator=generator)
    timestep = torch.tensor(500)

    # difflora: four adapters of random (non-zero) factors on every attention projection.
    runtime = LoRARuntime(SimpleNamespace(unet=ours_unet))
    for index, name in enumerate(ADAPTER_NAMES):
        runtime.create_adapter(name, rank=args.rank, alpha=args.rank, init="random", seed=index)
    states = {name: runtime.adapter_state(name) for name in ADAPTER_NAMES}

    # diffusers + PEFT: the same four adapters, loaded as PEFT LoRA layers on the same projections.
    for name in ADAPTER_NAMES:
        peft_unet.add_adapter(
            LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
            adapter_name=name,
        )
        with torch.no_grad():
            for module_key, module in states[name].modules.items():
                layer = peft_unet.get_submodule(module_key.removeprefix("unet."))
                layer.lora_A[name].weight.copy_(module.down)
                layer.lora_B[name].weight.copy_(module.up)

    def ours(count):
        def setup():
            runtime.unfuse()
            runtime.set_weights({n: (WEIGHTS[i] if i < count else 0.0) for i, n in enumerate(ADAPTER_NAMES)})

        return setup

    def ours_fused():
        runtime.set_weights(dict(zip(ADAPTER_NAMES, WEIGHTS)))
        runtime.fuse()

    def peft(count):
        return lambda: peft_unet.set_adapters(list(ADAPTER_NAMES[:count]), list(WEIGHTS[:count]))

    variants = {
        "base": (base_unet, lambda: None),
        "difflora 4 loaded, weight 0": (ours_unet, ours(0)),
        "difflora 1 adapter": (ours_unet, ours(1)),
        "difflora 4 adapters": (ours_unet, ours(4)),
        "difflora 4 fused": (ours_unet, ours_fused),
        "diffusers+PEFT 1 adapter": (peft_unet, peft(1)),
        "diffusers+PEFT 4 adapters": (peft_unet, peft(4)),
    }
    # Check the two implementations compute the same thing before timing them.
    with torch.no_grad():
        ours(4)()
        peft(4)()
        ours, theirs = ours_unet(latents, timestep, context).sample, peft_unet(latents, timestep, context).sample
        difference = (ours - theirs).abs().max()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    shuffler = random.Random(0)
    for _ in range(args.rounds):  # interleaved rounds, so drift in machine speed hits every variant alike
        # A new order each round: a variant timed right after a fuse or after PEFT's set_adapters was measured up to
        # 15% off in a fixed order, whichever it was.
        shuffler.shuffle(order)
        for name in order:
            unet, setup = variants[name]
            setup()
            # One untimed pass after each change: the first pass after fusing runs on freshly written weights and
            # new allocations (measured 1.2× slower here), which a generation of many steps pays once, not per step.
            time_forward(unet, latents, context, timestep)
            samples[name].append(time_forward(unet, latents, context, timestep))
    runtime.unfuse()

    print(f"UNet config: {args.config}, latents 2×4×{args.latent_size}×{args.latent_size}, rank {args.rank}, "
          f"{args.rounds} rounds, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}")
    print(f"max |difflora − PEFT| on the 4-adapter output: {difference:.2e}")
    base = statistics.median(samples["base"])
    print(f"{'variant':30s} {'median s':>9s} {'× base':>8s}")
    for name, times in samples.items():
        median = statistics.median(times)
        print(f"{name:30s} {median:9.4f} {median / base:8.3f}")
    ratio = statistics.median(samples["difflora 4 adapters"]) / statistics.median(samples["diffusers+PEFT 4 adapters"])
    print(f"difflora 4 unfused / diffusers+PEFT 4: {ratio:.3f}")


if __name__ == "__main__":
    main()
