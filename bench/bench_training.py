"""Training cost: difflora's recipe against the reference diffusers+PEFT recipe, same UNet, data, batch and steps.

    python bench/bench_training.py            # embedded tiny model, pixel-sunsets sample set, 60 steps, batch 4
    python bench/bench_training.py --set timestep_sampling=uniform   # what one difflora option is worth

The reference is diffusers' train_text_to_image_lora.py reduced to its loop: PEFT
``LoraConfig(target_modules=["to_q","to_k","to_v","to_out.0"])`` on the UNet, the VAE and the text encoder run every
step, AdamW. difflora runs its own recipe (``difflora.train.train``) with latent and text caching on. Each variant
runs in its own process, so peak memory (max RSS) is that variant's alone. Prints per-step time (the median step;
the first is excluded: it fills the caches), peak memory, held-out loss after the same number of steps, and ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def split_dataset(source: Path, folder: Path) -> tuple[Path, Path]:
    """train/ (5 of every 6 images) and held-out/ (the rest), with .txt captions."""
    from difflora.data import DataConfig, scan_dataset

    index = scan_dataset(DataConfig(data_dir=source))
    train_dir, held_dir = folder / "train", folder / "held-out"
    for target in (train_dir, held_dir):
        target.mkdir(parents=True, exist_ok=True)
    for number, item in enumerate(index.items):
        target = held_dir if number % 6 == 0 else train_dir
        shutil.copy(item.path, target / item.path.name)
        (target / item.path.with_suffix(".txt").name).write_text(item.caption)
    return train_dir, held_dir


def step_seconds(stamps: list[float]) -> float:
    """The median step: durations between consecutive optimizer steps (the first step, which builds the caches, has
    no earlier stamp). A median is not moved by a stray pause of a shared machine, as a mean is."""
    return statistics.median(later - earlier for earlier, later in zip(stamps, stamps[1:]))


def held_out(pipe, held_dir: Path) -> float:
    import torch

    from difflora.data import CaptionedImages, DataConfig, collate_batch, scan_dataset
    from difflora.train.steps import TextEmbeddingCache, encode_latents, held_out_loss

    config = DataConfig(data_dir=held_dir)
    dataset = CaptionedImages(scan_dataset(config), config)
    batch = collate_batch([dataset[i] for i in range(len(dataset))])
    latents = encode_latents(pipe.vae, batch["pixel_values"])
    context = TextEmbeddingCache(pipe.tokenizer, pipe.text_encoder).encode(batch["captions"], torch.device("cpu"))
    return held_out_loss(pipe.unet, pipe.scheduler, latents, context, draws=8)


def run_difflora(args, train_dir: Path, held_dir: Path, output: Path) -> dict:
    from difflora.pipelines import load_pipeline
    from difflora.runtime import LoRARuntime
    from difflora.train import train
    from difflora.train.config import make_config

    stamps = []
    options = dict(
        data=str(train_dir), output=str(output), steps=args.steps, batch_size=args.batch_size, rank=args.rank,
        alpha=float(args.rank), lr=args.lr, report_to="none", seed=args.seed, cache_latents=True,
        cache_text_encoder_outputs=True, buckets=False,
    )
    for assignment in args.set:  # e.g. timestep_sampling=uniform, to measure what one option is worth
        key, _, value = assignment.partition("=")
        options[key.replace("-", "_")] = yaml.safe_load(value)
    config = make_config(options)
    result = train(config, progress=lambda step, total, loss: stamps.append(time.perf_counter()))
    pipe = load_pipeline(None, quiet=True)
    LoRARuntime.attach(pipe).load(result.adapter_path)
    return {"step_seconds": step_seconds(stamps), "held_out_loss": held_out(pipe, held_dir)}


def run_reference(args, train_dir: Path, held_dir: Path) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    from difflora.data import BucketBatchSampler, CaptionedImages, DataConfig, collate_batch, scan_dataset
    from difflora.pipelines import load_pipeline

    torch.manual_seed(args.seed)
    pipe = load_pipeline(None, quiet=True)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    parameters = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=1e-2)
    config = DataConfig(data_dir=train_dir, buckets=False, seed=args.seed)
    dataset = CaptionedImages(scan_dataset(config), config)
    sampler = BucketBatchSampler(dataset.bucket_per_index, args.batch_size, drop_last=True, seed=args.seed)
    stamps, step, epoch = [], 0, 0
    while step < args.steps:
        sampler.set_epoch(epoch)
        for indices in sampler:
            batch = collate_batch([dataset[i] for i in indices])
            latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
            ids = tokenizer(batch["captions"], padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            context = text_encoder(ids)[0]
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],))
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            loss = F.mse_loss(unet(noisy, timesteps, context).sample.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            stamps.append(time.perf_counter())
            if step >= args.steps:
                break
        epoch += 1
    return {"step_seconds": step_seconds(stamps), "held_out_loss": held_out(pipe, held_dir)}


def child(args) -> None:
    work = Path(args.work)
    train_dir, held_dir = work / "train", work / "held-out"
    if args.variant == "difflora":
        result = run_difflora(args, train_dir, held_dir, work / f"run-{args.variant}")
    else:
        result = run_reference(args, train_dir, held_dir)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=8,
                        help="runs per recipe (seeds seed, seed+1, ...); medians are printed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a difflora training option for this comparison (repeatable), "
                        "e.g. timestep_sampling=uniform")
    parser.add_argument("--dataset", default=str(SAMPLES / "pixel-sunsets"))
    parser.add_argument("--variant", choices=("difflora", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child(args)
        return

    import torch

    work = Path(tempfile.mkdtemp(prefix="difflora-bench-train-"))
    split_dataset(Path(args.dataset), work)
    runs: dict[str, list[dict]] = {"reference": [], "difflora": []}
    for seed in range(args.seed, args.seed + args.seeds):  # interleaved, so machine drift hits both alike
        for variant in runs:
            command = [sys.executable, __file__, "--variant", variant, "--work", str(work), "--steps", str(args.steps),
                       "--batch-size", str(args.batch_size), "--rank", str(args.rank), "--lr", str(args.lr),
                       "--seed", str(seed), *(item for assignment in args.set for item in ("--set", assignment))]
            finished = subprocess.run(command, capture_output=True, text=True, check=True)
            line = next(line for line in finished.stdout.splitlines() if line.startswith("RESULT "))
            runs[variant].append(json.loads(line.removeprefix("RESULT ")))
    shutil.rmtree(work, ignore_errors=True)

    def median_of(variant: str) -> dict:
        return {key: statistics.median(run[key] for run in runs[variant]) for key in runs[variant][0]}

    reference, ours = median_of("reference"), median_of("difflora")
    print(f"embedded tiny model, {Path(args.dataset).name}: {args.steps} steps, batch {args.batch_size}, "
          f"rank {args.rank}, lr {args.lr}, difflora options {args.set or 'default'}, medians over {args.seeds} seeds; "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.machine()}")
    print(f"{'':22s} {'s/step':>8s} {'peak MB':>8s} {'held-out loss':>14s}")
    for name, result in (("diffusers+PEFT (ref)", reference), ("difflora", ours)):
        print(f"{name:22s} {result['step_seconds']:8.4f} {result['peak_rss_mb']:8.0f} {result['held_out_loss']:14.4f}")
    for key, label in (("held_out_loss", "held-out loss"), ("step_seconds", "s/step")):
        print(f"{label} per seed: reference " + " ".join(f"{run[key]:.4f}" for run in runs["reference"])
              + " | difflora " + " ".join(f"{run[key]:.4f}" for run in runs["difflora"]))
    print(f"ratios difflora/reference: step time {ours['step_seconds'] / reference['step_seconds']:.3f}, "
          f"peak memory {ours['peak_rss_mb'] / reference['peak_rss_mb']:.3f}, "
          f"held-out loss {ours['held_out_loss'] / reference['held_out_loss']:.3f}")


if __name__ == "__main__":
    main()
