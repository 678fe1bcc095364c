"""Train a LoRA style adapter: the recipe, top to bottom. Each step it calls is a tested library function.

    difflora train --config samples/style.yaml
    python -m difflora.train --data samples/pixel-sunsets --steps 200 --output outputs/pixsun
    accelerate launch -m difflora.train --config cfg.yaml           # any number of processes / GPUs
    torchrun --nproc_per_node 2 -m difflora.train --config cfg.yaml  # CPU data parallel (gloo)

Writes OUTPUT/NAME.safetensors (the adapter, atomically, with the resolved config in its metadata),
OUTPUT/config.yaml, OUTPUT/checkpoints/checkpoint-STEP/, OUTPUT/logs/ (TensorBoard) and OUTPUT/validation/.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..errors import DiffloraError, InvalidArgumentError
from .config import TrainConfig, config_from_args, config_to_dict

logger = logging.getLogger("difflora.train")

__all__ = ["train", "main", "TrainingResult", "TrainingDiverged"]


class TrainingDiverged(DiffloraError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainingResult:
    adapter_path: Path | None
    steps: int
    losses: list[float]
    interrupted: bool = False
    last_checkpoint: Path | None = None


class _StopRequest:
    """Ctrl-C (SIGINT) asks the loop to stop after the current step, save a checkpoint and exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self):
        def request(signum, frame):
            if self.requested:  # a second Ctrl-C stops at once
                raise KeyboardInterrupt
            self.requested = True
            logger.warning("interrupt received: finishing this step, saving a checkpoint, then stopping")

        with contextlib.suppress(ValueError):  # not in the main thread (e.g. the web UI): no handler
            self._previous = signal.signal(signal.SIGINT, request)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def train(config: TrainConfig, progress=None) -> TrainingResult:
    """Run one training; ``progress(step, total, loss)`` is called after each optimizer step (for the web UI)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from .. import data as datasets
    from ..models import load_pipeline
    from ..runtime import LoRARuntime
    from .steps import (
        RandomState,
        TextEmbeddingCache,
        build_optimizer,
        diffusion_loss,
        diffusion_target,
        draw_noise,
        encode_latents,
        lora_parameter_groups,
        steps_per_epoch,
    )
    from .checkpoints import CheckpointManager

    config.validate()
    output_dir = Path(config.output)

    # 1. The data, checked before any model loads: a folder with no usable image fails here, in a second.
    data_config = datasets.DataConfig(
        data_dir=Path(config.data),
        resolution=config.resolution,
        center_crop=config.center_crop,
        random_flip=config.random_flip,
        caption=config.caption,
        trigger_word=config.trigger_word,
        caption_dropout=config.caption_dropout,
        shuffle_captions=config.shuffle_captions,
        keep_tokens=config.keep_tokens,
        buckets=config.buckets,
        seed=config.seed,
    )
    index = datasets.scan_dataset(data_config)

    # 2. Processes, precision, logging.
    from ..models import resolve_device

    if "WORLD_SIZE" not in os.environ:
        # One process that trains more than once (the web UI, tests): accelerate keeps its state in a singleton that
        # refuses a second run with another precision, so start each run from a clean state.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(
        # accelerate sets up CPU data parallelism (gloo) under torchrun only when told the run is on the CPU.
        cpu=resolve_device("auto").type == "cpu",
        gradient_accumulation_steps=config.gradient_accumulation,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    set_seed(config.seed)
    global_batch = config.batch_size * accelerator.num_processes
    if accelerator.num_processes > 1 and index.num_samples < global_batch:
        raise InvalidArgumentError(
            f"--batch-size {config.batch_size} × {accelerator.num_processes} processes needs at least {global_batch} "
            f"images, {config.data} has {index.num_samples}"
        )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        if config.report_to != "none":
            accelerator.init_trackers("difflora", config={k: v for k, v in config_to_dict(config).items() if isinstance(v, (int, float, str, bool))})

    # 3. The model: frozen, in the training precision; the LoRA factors stay fp32.
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    pipe = load_pipeline(config.model, device=accelerator.device, dtype=torch.float32, model_config=config.model_config, quiet=True)
    unet, vae, text_encoder, noise_scheduler = pipe.unet, pipe.vae, pipe.text_encoder, pipe.scheduler
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(noise_scheduler.config)
    prediction_type = config.prediction_type or noise_scheduler.config.prediction_type
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    vae.to(dtype=weight_dtype)
    unet.to(dtype=weight_dtype)
    if not config.train_text_encoder:
        text_encoder.to(dtype=weight_dtype)

    runtime = LoRARuntime.attach(pipe)
    components = tuple(c for c, on in (("unet", config.train_unet), ("text_encoder", config.train_text_encoder)) if on)
    runtime.create_adapter(config.name, rank=config.rank, alpha=config.alpha, components=components, use_rslora=config.use_rslora, seed=config.seed)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()

    # 4. Optimizer and schedule. Parameters alternate down, up per projection (runtime.parameters' order).
    unet_ids = {id(p) for p in unet.parameters()}
    unet_params = [p for p in runtime.parameters(config.name) if id(p) in unet_ids]
    text_params = [p for p in runtime.parameters(config.name) if id(p) not in unet_ids]
    groups = lora_parameter_groups(
        [(unet_params, config.lr), (text_params, config.text_encoder_lr or config.lr)],
        loraplus_ratio=config.loraplus_ratio,
        lora_fa=config.lora_fa,
    )
    optimizer = build_optimizer(groups, config.optimizer, config.weight_decay, allow_fused=config.mixed_precision != "fp16")

    # 5. Batches. Each global batch (batch_size × processes images, one bucket) is split across processes, so N
    # processes see exactly the images, noise and timesteps of one process with the same global batch.
    dataset = datasets.CaptionedImages(index, data_config)
    sampler = datasets.BucketBatchSampler(dataset.bucket_per_index, global_batch, seed=config.seed, drop_last=len(dataset) >= global_batch)
    # Each epoch ends on an optimizer step: the batches that do not fill a last accumulation are left out, so a
    # resumed run can find its place from the step count alone.
    updates_per_epoch = steps_per_epoch(len(sampler), config.gradient_accumulation)
    batches_used_per_epoch = updates_per_epoch * config.gradient_accumulation
    total_steps = config.steps or config.epochs * updates_per_epoch
    # accelerate steps a prepared scheduler once per process on every optimizer step (it expects each process to
    # see 1/N of the data); every process here takes every step, so the schedule is N times as long.
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes,
    )

    trained = [m for m, on in ((unet, config.train_unet), (text_encoder, config.train_text_encoder)) if on]
    prepared = accelerator.prepare(*trained, optimizer, lr_scheduler)
    optimizer, lr_scheduler = prepared[-2], prepared[-1]
    model_for = dict(zip(("unet", "text_encoder") if config.train_unet else ("text_encoder",), prepared[:-2]))
    train_unet = model_for.get("unet", unet)
    train_text_encoder = model_for.get("text_encoder", text_encoder)

    random_state = RandomState(config.seed)
    checkpoints = CheckpointManager(accelerator, runtime, config, random_state)

    # 6. Caches: latents (when crops and flips are fixed) and text-encoder outputs (when it is frozen).
    use_latent_cache = config.cache_latents and datasets.can_cache_latents(data_config)
    latent_cache = (datasets.LatentDiskCache(Path(config.cache_dir)) if config.cache_dir else datasets.LatentMemoryCache()) if use_latent_cache else None
    text_cache = TextEmbeddingCache(pipe.tokenizer, text_encoder, enabled=config.cache_text_encoder_outputs and not config.train_text_encoder)

    cache_keys: dict[int, str] = {}  # a file is hashed once per run, not once per step

    def cached_latents(indices: list[int]) -> list[torch.Tensor]:
        """Latents of ``indices`` (one bucket) from the cache; the images of those not cached yet are encoded."""
        for i in indices:
            if i not in cache_keys:
                path, bucket = dataset.items[i].path, dataset.bucket_per_index[i]
                cache_keys[i] = datasets.cache_key(Path(path), bucket, data_config, model_id=str(config.model))
        missing = [i for i in indices if latent_cache.get(cache_keys[i]) is None]
        if missing:
            pixels = datasets.collate_batch([dataset[i] for i in missing])["pixel_values"]
            for i, latent in zip(missing, encode_latents(vae, pixels)):
                latent_cache.put(cache_keys[i], latent.cpu())
        return [latent_cache.get(cache_keys[i]) for i in indices]

    def latents_and_captions(indices: list[int]) -> tuple[torch.Tensor, list[str]]:
        """The batch's latents and captions. Images are loaded only for latents not in the cache yet."""
        captions = [dataset.caption(i) for i in indices]
        if latent_cache is None:
            pixels = datasets.collate_batch([dataset[i] for i in indices])["pixel_values"]
            return encode_latents(vae, pixels).to(accelerator.device), captions
        return torch.stack(cached_latents(indices)).to(accelerator.device), captions

    if latent_cache is not None:
        # Fill the cache before the first step, so the VAE never runs inside the loop. With a disk cache each process
        # encodes its share and reads the others' files; a memory cache is per process, so each encodes all.
        chunks = list(datasets.BucketBatchSampler(dataset.bucket_per_index, config.batch_size, shuffle=False))
        if isinstance(latent_cache, datasets.LatentDiskCache):
            chunks = chunks[accelerator.process_index :: accelerator.num_processes]
        for chunk in tqdm(
            chunks, disable=not accelerator.is_local_main_process, desc="caching latents", unit="batch", leave=False
        ):
            cached_latents(chunk)
        accelerator.wait_for_everyone()

    # 7. Resume.
    first_step = checkpoints.resume() if config.resume else 0

    # 8. The loop.
    losses: list[float] = []
    step = first_step
    last_checkpoint = checkpoints.latest()
    bar = tqdm(total=total_steps, initial=first_step, disable=not accelerator.is_local_main_process, desc="training", unit="step")
    rank, local_batch = accelerator.process_index, config.batch_size
    interrupted = False
    with _StopRequest() as stop:
        epoch = first_step // updates_per_epoch
        skip_batches = (first_step % updates_per_epoch) * config.gradient_accumulation
        while step < total_steps and not stop.requested:
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            for batch_number, indices in enumerate(sampler):
                if batch_number < skip_batches:
                    continue
                if batch_number >= batches_used_per_epoch:
                    break
                with accelerator.accumulate(*trained):
                    latents, captions = latents_and_captions(indices[rank * local_batch:(rank + 1) * local_batch])
                    # Noise for the whole global batch from the shared generator; this process takes its slice.
                    draw = draw_noise(
                        (len(indices), *latents.shape[1:]), noise_scheduler.config.num_train_timesteps,
                        random_state.generator, config.noise_offset, config.timestep_sampling,
                    )
                    part = slice(rank * local_batch, rank * local_batch + latents.shape[0])
                    noise, timesteps = draw.noise[part].to(accelerator.device), draw.timesteps[part].to(accelerator.device)
                    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                    if config.train_text_encoder:
                        ids = text_cache.tokenize(captions).to(accelerator.device)
                        with accelerator.autocast():
                            context = train_text_encoder(ids)[0]
                    else:
                        context = text_cache.encode(captions, accelerator.device)
                    with accelerator.autocast():
                        prediction = train_unet(noisy.to(weight_dtype), timesteps, context.to(weight_dtype)).sample
                    target = diffusion_target(noise_scheduler, latents, noise, timesteps, prediction_type)
                    loss = diffusion_loss(prediction, target, timesteps, noise_scheduler, prediction_type, config.snr_gamma)
                    mean_loss = accelerator.gather(loss.detach().reshape(1)).mean().item()
                    if not math.isfinite(mean_loss):
                        bar.close()
                        kept = f"; last good checkpoint: {last_checkpoint}" if last_checkpoint else ""
                        raise TrainingDiverged(f"loss became {mean_loss} at step {step + 1}: training stopped{kept}")
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients and config.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_([p for g in groups for p in g["params"]], config.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue
                step += 1
                losses.append(mean_loss)
                bar.update(1)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
                if step % config.log_every == 0:
                    logs = {"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0]}
                    if grad_norm is not None:
                        logs["grad_norm"] = float(grad_norm)
                    accelerator.log(logs, step=step)
                if progress is not None:
                    progress(step, total_steps, mean_loss)
                if config.checkpointing_steps and step % config.checkpointing_steps == 0:
                    last_checkpoint = checkpoints.save(step)
                if config.validation_prompts and config.validation_steps and step % config.validation_steps == 0:
                    _validate(accelerator, pipe, config, step)
                if step >= total_steps or stop.requested:
                    break
            epoch += 1
            skip_batches = 0
        interrupted = stop.requested and step < total_steps
    bar.close()

    # 9. The end: a checkpoint if interrupted, else the adapter (atomically) and final validation images.
    accelerator.wait_for_everyone()
    if interrupted:
        last_checkpoint = checkpoints.save(step)
        if accelerator.is_main_process:
            logger.warning("stopped at step %d; resume with --resume latest (checkpoint %s)", step, last_checkpoint)
        result = TrainingResult(None, step, losses, interrupted=True, last_checkpoint=last_checkpoint)
    else:
        adapter_path = output_dir / f"{config.name}.safetensors"
        if accelerator.is_main_process:
            runtime.save(config.name, adapter_path, adapter_metadata(config, pipe))
            if config.validation_prompts and not (config.validation_steps and step % config.validation_steps == 0):
                _validate(accelerator, pipe, config, step)  # unless the loop just rendered this step
        result = TrainingResult(adapter_path, step, losses, last_checkpoint=last_checkpoint)
    # The data-parallel wrappers hold the process group. Release them while every process is still here: freed after
    # end_training, when another process may have exited, gloo's teardown waited forever (seen with 2 CPU processes).
    prepared = model_for = train_unet = train_text_encoder = None
    accelerator.free_memory()
    gc.collect()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def adapter_metadata(config: TrainConfig, pipe) -> dict[str, str]:
    """What travels in the adapter's header: the resolved training config, the base model, and kohya's keys."""
    resolution = f"({config.resolution}, {config.resolution})"
    return {
        "difflora.base_model": str(config.model),
        "difflora.training_config": json.dumps(config_to_dict(config), sort_keys=True),
        "difflora.trigger_words": json.dumps([config.trigger_word] if config.trigger_word else []),
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(config.alpha if config.alpha is not None else config.rank),
        "ss_learning_rate": str(config.lr),
        "ss_max_train_steps": str(config.steps or ""),
        "ss_resolution": resolution,
        "ss_base_model_version": "sd_v1",
    }


def _validate(accelerator, pipe, config: TrainConfig, step: int) -> Path | None:
    """Validation images for the fixed prompts and seed, saved as one grid PNG and logged to TensorBoard."""
    if not accelerator.is_main_process:
        return None
    import numpy as np
    from PIL import Image

    from .._files import atomic_path

    pipe.unet.eval()
    images = []
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    for prompt in config.validation_prompts:
        generator = torch.Generator("cpu").manual_seed(config.validation_seed)
        with torch.no_grad(), accelerator.autocast():
            images.append(pipe(prompt, num_inference_steps=config.validation_inference_steps, generator=generator, width=native, height=native).images[0])
    pipe.unet.train()
    grid = Image.new("RGB", (native * len(images), native))
    for column, image in enumerate(images):
        grid.paste(image, (column * native, 0))
    path = Path(config.output) / "validation" / f"step-{step:06d}.png"
    with atomic_path(path) as temporary:
        grid.save(temporary, format="PNG")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
    return path


def main(argv: list[str] | None = None) -> int:
    from .._entry import OneLineErrorParser, quiet_libraries, run_main

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = OneLineErrorParser(prog="difflora train", description="Train a LoRA style adapter.")

    def run() -> int:
        config = config_from_args(argv, parser)
        quiet_libraries()
        result = train(config)
        if result.interrupted:
            print(f"interrupted at step {result.steps}; checkpoint {result.last_checkpoint}; resume with --resume latest",
                  file=sys.stderr)
            return 130
        print(result.adapter_path)
        return 0

    return run_main(run, parser)

