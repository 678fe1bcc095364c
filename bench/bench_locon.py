"""LoCon at SD 1.5 size: difflora against diffusers+PEFT with the same four kohya files, side by side in one run.

    python bench/bench_locon.py                     # SD 1.5 UNet config (random weights), 32×32 latents, rank 16
    python bench/bench_locon.py --layers attention  # four rank-32 files on the attention projections only
    python bench/bench_locon.py --config tiny       # the embedded tiny model's UNet, for a quick look

Four kohya-default LoCon adapters (every Linear of the transformer blocks, every conv of the resnets and samplers,
3×3 convs at conv_dim = rank), or with ``--layers attention`` four LoRAs on ``to_q/to_k/to_v/to_out.0`` only,
written as kohya files, then:

* loading: ``read_adapter`` + ``LoRARuntime.add_adapter`` against diffusers' ``load_lora_weights``;
* one UNet forward (batch 2): base, difflora unfused, difflora fused, diffusers unfused (``set_adapters``);
* ``fuse()`` against diffusers' ``fuse_lora``, and setting the four weights against ``set_adapters``.

Prints seconds and ratios. No weights are downloaded: the UNet is built from SD 1.5's public config.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file

from difflora import LoRARuntime
from difflora.adapter import AdapterState, LoRAModuleWeights
from difflora.formats import read_adapter, to_kohya_state_dict
from difflora.pipelines import load_pipeline

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
WEIGHTS = (0.7, -0.3, 0.5, 0.2)
KOHYA_CONTAINERS = (".attentions.", ".resnets.", ".downsamplers.", ".upsamplers.")  # kohya's LoCon targets
ATTENTION_PROJECTIONS = (".to_q", ".to_k", ".to_v", ".to_out.0")


def targeted(name: str, layer: torch.nn.Module, layers: str) -> bool:
    if layers == "attention":
        return isinstance(layer, torch.nn.Linear) and name.endswith(ATTENTION_PROJECTIONS)
    return isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and any(c in f".{name}" for c in KOHYA_CONTAINERS)


def kohya_default_locon(unet: UNet2DConditionModel, rank: int, seed: int, layers: str = "locon") -> AdapterState:
    """Random (non-zero) factors on every Linear and Conv2d kohya's LoCon targets (``layers="locon"``) or on the
    attention projections (``layers="attention"``)."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for name, layer in unet.named_modules():
        if not targeted(name, layer, layers):
            continue
        shape = tuple(layer.weight.shape)
        down = torch.randn(rank, *shape[1:], generator=generator) / (shape[1] * (shape[2] * shape[3]
                                                                                  if len(shape) == 4 else 1)) ** 0.5
        up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=generator) * 0.01
        modules[f"unet.{name}"] = LoRAModuleWeights(down, up, alpha=float(rank))
    return AdapterState(modules=modules)


def timed(function, repeat: int = 1) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fuse_then_unfuse(fuse, unfuse, repeat: int = 3) -> tuple[float, float]:
    """Median seconds of ``fuse`` and of ``unfuse``, each timed on its own, alternating."""
    fuse_times, unfuse_times = [], []
    for _ in range(repeat):
        fuse_times.append(timed(fuse))
        unfuse_times.append(timed(unfuse))
    return statistics.median(fuse_times), statistics.median(unfuse_times)


def build_pipelines(config: str):
    tiny = load_pipeline(None, quiet=True)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval() if config == "sd15" else tiny.unet.eval()
    pipes = []
    for _ in range(2):  # difflora's and diffusers', each on its own copy of the same UNet
        pipe = StableDiffusionPipeline(vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer,
                                       unet=copy.deepcopy(unet), scheduler=tiny.scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipes.append(pipe)
    return unet, pipes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--latent-size", type=int, default=32)
    parser.add_argument("--layers", choices=("locon", "attention"), default="locon")
    parser.add_argument("--rank", type=int, default=None, help="default: 16 for locon, 32 for attention")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    args.rank = args.rank or (32 if args.layers == "attention" else 16)
    torch.set_flush_denormal(True)  # see bench_inference.py: random weights make denormals
    base_unet, (ours, theirs) = build_pipelines(args.config)
    folder = Path(tempfile.mkdtemp(prefix="difflora-locon-bench-"))
    files = []
    for index in range(4):
        path = folder / f"locon{index}.safetensors"
        state = kohya_default_locon(base_unet, args.rank, seed=index, layers=args.layers)
        save_file(to_kohya_state_dict(state), str(path))
        files.append(path)
    modules = len(read_adapter(files[0]).modules)

    runtime = LoRARuntime.attach(ours)
    load_ours = timed(lambda: [runtime.add_adapter(f"a{i}", read_adapter(f), WEIGHTS[i]) for i, f in enumerate(files)])
    load_theirs = timed(lambda: [theirs.load_lora_weights(str(f), adapter_name=f"a{i}") for i, f in enumerate(files)])
    names = [f"a{i}" for i in range(4)]
    theirs.set_adapters(names, list(WEIGHTS))

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, args.latent_size, args.latent_size, generator=generator)
    context = torch.randn(2, 77, base_unet.config.cross_attention_dim, generator=generator)
    step = torch.tensor(500)

    def forward(unet):
        with torch.no_grad():
            return unet(latents, step, context).sample

    difference = float((forward(ours.unet) - forward(theirs.unet)).abs().max())
    samples = {"base": [], "difflora unfused": [], "diffusers+PEFT unfused": [], "difflora fused": []}
    for _ in range(args.rounds):
        for name, unet in (("base", base_unet), ("difflora unfused", ours.unet),
                           ("diffusers+PEFT unfused", theirs.unet)):
            forward(unet)
            samples[name].append(timed(lambda: forward(unet)))
        runtime.fuse()
        forward(ours.unet)
        samples["difflora fused"].append(timed(lambda: forward(ours.unet)))
        runtime.unfuse()
    fuse_ours, unfuse_ours = fuse_then_unfuse(runtime.fuse, runtime.unfuse)
    fuse_theirs, unfuse_theirs = fuse_then_unfuse(lambda: theirs.fuse_lora(adapter_names=names), theirs.unfuse_lora)
    weights_ours = timed(lambda: runtime.set_weights(dict(zip(names, reversed(WEIGHTS)))), repeat=20)
    weights_theirs = timed(lambda: theirs.set_adapters(names, list(reversed(WEIGHTS))), repeat=20)

    print(f"UNet config: {args.config}, latents 2×4×{args.latent_size}×{args.latent_size}, 4 {args.layers} files of "
          f"{modules} modules at rank {args.rank}, {args.rounds} rounds, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(f"max |difflora − diffusers| on the 4-adapter output: {difference:.2e}")
    base = statistics.median(samples["base"])
    for name, times in samples.items():
        print(f"{name:28s} {statistics.median(times):8.4f} s  {statistics.median(times) / base:6.3f}× base")
    print(f"loading 4 files: difflora {load_ours:.2f} s, diffusers {load_theirs:.2f} s "
          f"({load_ours / load_theirs:.2f}×)")
    print(f"fuse: difflora {fuse_ours:.3f} s, diffusers fuse_lora {fuse_theirs:.3f} s "
          f"({fuse_ours / fuse_theirs:.2f}×); "
          f"unfuse: difflora {unfuse_ours:.3f} s, diffusers {unfuse_theirs:.3f} s")
    print(f"setting 4 weights: difflora {weights_ours * 1e3:.2f} ms, diffusers {weights_theirs * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
