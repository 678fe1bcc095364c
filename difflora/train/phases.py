"""The phases of a training run, in the order :func:`~.recipe.train` calls them.

Set-up: :func:`make_accelerator`, :func:`load_frozen_model`, :func:`add_trainable_adapter`,
:func:`build_optimisation`, :func:`make_latent_source`. The loop: :class:`TrainingStep` (one accumulation
micro-batch) and :class:`StepReporter` (what follows an optimizer step). The end: :func:`finish` and
:func:`end_training`. Each is tested on its own.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ..data import CaptionedImages
from ..latent_cache import LatentDiskCache, LatentMemoryCache, can_cache_latents
from ..errors import DiffloraError
from . import steps as step_maths  # looked up at each call, so a test can replace one function
from .config import TrainConfig, config_to_dict
from .sources import LatentSource, MicroBatch

__all__ = [
    "FrozenModel", "MicroBatchOutcome", "Optimisation", "StepReporter", "StopRequest", "TrainingDiverged",
    "TrainingResult", "TrainingStep", "add_trainable_adapter", "adapter_metadata", "build_optimisation",
    "end_training", "finish", "load_frozen_model", "make_accelerator", "make_latent_source", "render_validation",
    "validates_at", "write_run_files",
]

logger = logging.getLogger("difflora.train")

ProgressCallback = Callable[[int, int, float], None]


class TrainingDiverged(DiffloraError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainingResult:
    adapter_path: Path | None
    steps: int
    losses: list[float]
    interrupted: bool = False
    last_checkpoint: Path | None = None
    main_process: bool = True  # False in the other processes of a data-parallel run, which write nothing


# ----- set-up -------------------------------------------------------------------------------------------------------


def make_accelerator(config: TrainConfig):
    """An ``accelerate.Accelerator`` for the run's processes, precision, accumulation and logging; seeds every RNG."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    from ..pipelines import resolve_device

    if "WORLD_SIZE" not in os.environ:
        # One process that trains more than once (the web UI, tests): accelerate keeps its state in a singleton that
        # refuses a second run with another precision, so start each run from a clean state.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    output_dir = Path(config.output)
    accelerator = Accelerator(
        # accelerate sets up CPU data parallelism (gloo) under torchrun only when told the run is on the CPU.
        cpu=resolve_device("auto").type == "cpu",
        gradient_accumulation_steps=config.gradient_accumulation,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    set_seed(config.seed)
    return accelerator


def write_run_files(accelerator, config: TrainConfig) -> None:
    """OUTPUT/config.yaml (the resolved flat options) and the trackers, from the main process."""
    if not accelerator.is_main_process:
        return
    output_dir = Path(config.output)
    output_dir.mkdir(parents=True, exist_ok=True)
    options = config_to_dict(config)
    (output_dir / "config.yaml").write_text(yaml.safe_dump(options, sort_keys=False))
    if config.report_to != "none":
        scalars = {name: value for name, value in options.items() if isinstance(value, (int, float, str, bool))}
        accelerator.init_trackers("difflora", config=scalars)


@dataclass
class FrozenModel:
    """The base model as training uses it: frozen, in the training precision (``weight_dtype``), with a DDPM noise
    scheduler and the prediction type the loss regresses on."""

    pipe: object  # the StableDiffusionPipeline, for validation images
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    noise_scheduler: object
    weight_dtype: torch.dtype
    prediction_type: str


def load_frozen_model(config: TrainConfig, device: torch.device) -> FrozenModel:
    """Load ``config.model`` and freeze it. The VAE and UNet (and the text encoder unless it trains) are cast to the
    mixed-precision dtype; the LoRA factors added later stay fp32."""
    from diffusers import DDPMScheduler

    from ..pipelines import load_pipeline

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    pipe = load_pipeline(config.model, device=device, dtype=torch.float32, model_config=config.model_config, quiet=True)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    pipe.vae.to(dtype=weight_dtype)
    pipe.unet.to(dtype=weight_dtype)
    if not config.train_text_encoder:
        pipe.text_encoder.to(dtype=weight_dtype)
    prediction_type = config.prediction_type or noise_scheduler.config.prediction_type
    return FrozenModel(pipe, pipe.unet, pipe.vae, pipe.text_encoder, noise_scheduler, weight_dtype, prediction_type)


def add_trainable_adapter(model: FrozenModel, config: TrainConfig):
    """Attach a :class:`~difflora.runtime.LoRARuntime` and create the adapter ``config.name`` on the trained
    components (:meth:`TrainConfig.adapter_options`: its algorithm, targets and sizes; fp32, ``ΔW = 0``, random
    factors from ``config.seed``); returns the runtime."""
    from ..runtime import LoRARuntime

    runtime = LoRARuntime.attach(model.pipe)
    runtime.create_adapter(config.name, config.adapter_options())
    if config.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            model.text_encoder.gradient_checkpointing_enable()
    return runtime


@dataclass
class Optimisation:
    """What the optimizer step needs: parameter groups, the optimizer and schedule (as ``accelerate.prepare``
    wrapped them), the trained modules, and what the step calls (``unet``/``text_encoder``: the data-parallel
    wrappers of the trained ones, the frozen modules otherwise)."""

    groups: list[dict]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    trained: list[torch.nn.Module]
    unet: torch.nn.Module | None
    text_encoder: torch.nn.Module | None

    def parameters(self) -> list[torch.nn.Parameter]:
        return [parameter for group in self.groups for parameter in group["params"]]

    def release_models(self) -> None:
        """Drop the references to the data-parallel wrappers (see :func:`end_training`)."""
        self.unet = self.text_encoder = None


def build_optimisation(accelerator, model: FrozenModel, runtime, config: TrainConfig, total_steps: int) -> Optimisation:
    """Parameter groups (LoRA+ and LoRA-FA, a learning rate per component), AdamW, the learning-rate schedule, and
    ``accelerator.prepare`` of the trained modules with them."""
    from diffusers.optimization import get_scheduler

    # Named by module key and tensor (…to_q.down, …to_q.up, …magnitude): lora_parameter_groups groups them by role.
    named = runtime.named_parameters(config.name)
    unet_params = [(name, p) for name, p in named if name.startswith("unet.")]
    text_params = [(name, p) for name, p in named if not name.startswith("unet.")]
    groups = step_maths.lora_parameter_groups(
        [(unet_params, config.lr), (text_params, config.text_encoder_lr or config.lr)],
        loraplus_ratio=config.loraplus_ratio,
        lora_fa=config.lora_fa,
    )
    optimizer = step_maths.build_optimizer(groups, config.optimizer, config.weight_decay,
                                           allow_fused=config.mixed_precision != "fp16")
    # accelerate steps a prepared scheduler once per process on every optimizer step (it expects each process to
    # see 1/N of the data); every process here takes every step, so the schedule is N times as long.
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes,
    )
    trained = [m for m, on in ((model.unet, config.train_unet), (model.text_encoder, config.train_text_encoder)) if on]
    prepared = accelerator.prepare(*trained, optimizer, lr_scheduler)
    wrapped = dict(zip(("unet", "text_encoder") if config.train_unet else ("text_encoder",), prepared[:-2]))
    return Optimisation(groups, prepared[-2], prepared[-1], trained,
                        wrapped.get("unet", model.unet), wrapped.get("text_encoder", model.text_encoder))


def make_latent_source(config: TrainConfig, model: FrozenModel, dataset: CaptionedImages, device) -> LatentSource:
    """A cache (on disk with ``cache_dir``, else in memory) when ``cache_latents`` and the crops and flips are fixed,
    else no cache: every batch is encoded."""
    cache = None
    if config.cache_latents and can_cache_latents(config.dataset):
        cache = LatentDiskCache(Path(config.cache_dir)) if config.cache_dir else LatentMemoryCache()
    return LatentSource(model.vae, dataset, cache, model_id=str(config.model), device=device,
                        workers=config.dataloader_workers)


# ----- the loop -----------------------------------------------------------------------------------------------------


@dataclass
class MicroBatchOutcome:
    loss: float  # the mean over every process's part of the global batch
    grad_norm: float | None  # before clipping, when clipped
    optimizer_stepped: bool  # the micro-batch completed an accumulation and the optimizer stepped


@dataclass
class TrainingStep:
    """One accumulation micro-batch: noise, prediction, loss, backward; on the last of an accumulation, clipping
    and the optimizer and schedule steps (accelerate skips them on the others)."""

    accelerator: object
    model: FrozenModel
    optimisation: Optimisation
    latents: LatentSource
    text: step_maths.TextEmbeddingCache
    dataset: CaptionedImages
    generator: torch.Generator  # the run's noise and timesteps (RandomState, saved with checkpoints)
    config: TrainConfig

    def __call__(self, batch: MicroBatch) -> MicroBatchOutcome:
        """Run ``batch``. A loss that is not finite is returned before the backward pass: nothing is applied."""
        accelerator, config, optimisation = self.accelerator, self.config, self.optimisation
        grad_norm = None
        with accelerator.accumulate(*optimisation.trained):
            latents = self.latents.get(batch.indices, batch.pixels)
            noise, timesteps = self._noise(batch, latents)
            noisy = self.model.noise_scheduler.add_noise(latents, noise, timesteps)
            context = self._text_context([self.dataset.caption(index) for index in batch.indices])
            with accelerator.autocast():
                dtype = self.model.weight_dtype
                prediction = optimisation.unet(noisy.to(dtype), timesteps, context.to(dtype)).sample
            target = step_maths.diffusion_target(
                self.model.noise_scheduler, latents, noise, timesteps, self.model.prediction_type)
            loss = step_maths.diffusion_loss(prediction, target, timesteps, self.model.noise_scheduler,
                                             self.model.prediction_type, config.snr_gamma)
            mean_loss = accelerator.gather(loss.detach().reshape(1)).mean().item()
            if not math.isfinite(mean_loss):
                return MicroBatchOutcome(mean_loss, None, optimizer_stepped=False)
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(optimisation.parameters(), config.max_grad_norm)
            optimisation.optimizer.step()
            optimisation.lr_scheduler.step()
            optimisation.optimizer.zero_grad(set_to_none=True)
        return MicroBatchOutcome(mean_loss, grad_norm, optimizer_stepped=accelerator.sync_gradients)

    def _noise(self, batch: MicroBatch, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and timesteps drawn for the whole global batch from the shared generator; this process's share."""
        draw = step_maths.draw_noise(
            (batch.global_size, *latents.shape[1:]), self.model.noise_scheduler.config.num_train_timesteps,
            self.generator, self.config.noise_offset, self.config.timestep_sampling,
        )
        device = self.accelerator.device
        return draw.noise[batch.share].to(device), draw.timesteps[batch.share].to(device)

    def _text_context(self, captions: list[str]) -> torch.Tensor:
        if self.config.train_text_encoder:
            ids = self.text.tokenize(captions).to(self.accelerator.device)
            with self.accelerator.autocast():
                return self.optimisation.text_encoder(ids)[0]
        return self.text.encode(captions, self.accelerator.device)


@dataclass
class StepReporter:
    """What follows each optimizer step: the progress bar, logs, the progress callback, checkpoints and validation
    images, at their intervals. Holds the step count, the losses and the last checkpoint."""

    accelerator: object
    optimisation: Optimisation
    checkpoints: object  # CheckpointManager
    pipe: object
    config: TrainConfig
    total_steps: int
    step: int
    progress: ProgressCallback | None = None
    losses: list[float] = field(default_factory=list)
    last_checkpoint: Path | None = None

    def __post_init__(self) -> None:
        from tqdm.auto import tqdm

        self.last_checkpoint = self.checkpoints.latest()
        self.bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step",
                        disable=not self.accelerator.is_local_main_process)

    def __enter__(self) -> StepReporter:
        return self

    def __exit__(self, *exc) -> bool:
        self.bar.close()
        return False

    def after_optimizer_step(self, outcome: MicroBatchOutcome) -> None:
        config = self.config
        self.step += 1
        self.losses.append(outcome.loss)
        lr = self.optimisation.lr_scheduler.get_last_lr()[0]
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{outcome.loss:.4f}", lr=f"{lr:.2e}")
        if self.step % config.log_every == 0:
            logs = {"loss": outcome.loss, "lr": lr}
            if outcome.grad_norm is not None:
                logs["grad_norm"] = float(outcome.grad_norm)
            self.accelerator.log(logs, step=self.step)
        if self.progress is not None:
            self.progress(self.step, self.total_steps, outcome.loss)
        if config.checkpointing_steps and self.step % config.checkpointing_steps == 0:
            self.last_checkpoint = self.checkpoints.save(self.step)
        if validates_at(config, self.step):
            render_validation(self.accelerator, self.pipe, config, self.step)

    def diverged(self, loss: float) -> TrainingDiverged:
        """The error for a loss that is not finite in the step being run."""
        kept = f"; last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint else ""
        return TrainingDiverged(f"loss became {loss} at step {self.step + 1}: training stopped{kept}")


def validates_at(config: TrainConfig, step: int) -> bool:
    """Whether the loop renders validation images after ``step``."""
    return bool(config.validation_prompts and config.validation_steps and step % config.validation_steps == 0)


def render_validation(accelerator, pipe, config: TrainConfig, step: int) -> Path | None:
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
            images.append(pipe(prompt, num_inference_steps=config.validation_inference_steps, generator=generator,
                               width=native, height=native).images[0])
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


class StopRequest:
    """Ctrl-C (SIGINT) asks the loop to stop after the current step, save a checkpoint and exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopRequest:
        def request(signum, frame):
            if self.requested:  # a second Ctrl-C stops at once
                raise KeyboardInterrupt
            self.requested = True
            logger.warning("interrupt received: finishing this step, saving a checkpoint, then stopping")

        with contextlib.suppress(ValueError):  # not in the main thread (e.g. the web UI): no handler
            self._previous = signal.signal(signal.SIGINT, request)
        return self

    def __exit__(self, *exc) -> bool:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


# ----- the end ------------------------------------------------------------------------------------------------------


def finish(accelerator, reporter: StepReporter, runtime, interrupted: bool) -> TrainingResult:
    """A checkpoint when interrupted; else the adapter (written atomically) and the final validation images."""
    config, step = reporter.config, reporter.step
    accelerator.wait_for_everyone()
    if interrupted:
        checkpoint = reporter.checkpoints.save(step)
        if accelerator.is_main_process:
            logger.warning("stopped at step %d; resume with --resume latest (checkpoint %s)", step, checkpoint)
        return TrainingResult(None, step, reporter.losses, interrupted=True, last_checkpoint=checkpoint,
                              main_process=accelerator.is_main_process)
    adapter_path = Path(config.output) / f"{config.name}.safetensors"
    if accelerator.is_main_process:
        layout = None if config.layout == "auto" else config.layout
        runtime.save(config.name, adapter_path, adapter_metadata(config), layout)
        if config.validation_prompts and not validates_at(config, step):  # unless the loop just rendered this step
            render_validation(accelerator, reporter.pipe, config, step)
    return TrainingResult(adapter_path, step, reporter.losses, last_checkpoint=reporter.last_checkpoint,
                          main_process=accelerator.is_main_process)


def end_training(accelerator, optimisation: Optimisation) -> None:
    """Release the data-parallel wrappers, then end accelerate's run (trackers, process group)."""
    # The data-parallel wrappers hold the process group. Release them while every process is still here: freed after
    # end_training, when another process may have exited, gloo's teardown waited forever (seen with 2 CPU processes).
    optimisation.release_models()
    accelerator.free_memory()
    gc.collect()
    accelerator.wait_for_everyone()
    accelerator.end_training()


def adapter_metadata(config: TrainConfig) -> dict[str, str]:
    """What travels in the adapter's header: the resolved training config, the base model, and kohya's keys."""
    resolution = config.dataset.resolution
    trigger_word = config.dataset.trigger_word
    return {
        "difflora.base_model": str(config.model),
        "difflora.training_config": json.dumps(config_to_dict(config), sort_keys=True),
        "difflora.trigger_words": json.dumps([trigger_word] if trigger_word else []),
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(config.alpha if config.alpha is not None else config.rank),
        "ss_learning_rate": str(config.lr),
        "ss_max_train_steps": str(config.steps or ""),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_base_model_version": "sd_v1",
    }
