"""Train a LoRA style adapter: the recipe, top to bottom. Each phase it calls is a tested library function.

    difflora train --config samples/style.yaml
    python -m difflora.train --data samples/pixel-sunsets --steps 200 --output outputs/pixsun
    accelerate launch -m difflora.train --config cfg.yaml           # any number of processes / GPUs
    torchrun --nproc_per_node 2 -m difflora.train --config cfg.yaml  # CPU data parallel (gloo)

Writes OUTPUT/NAME.safetensors (the adapter, atomically, with the resolved config in its metadata),
OUTPUT/config.yaml, OUTPUT/checkpoints/checkpoint-STEP/, OUTPUT/logs/ (TensorBoard) and OUTPUT/validation/.
"""

from __future__ import annotations

import logging
import math
import sys

from .._files import check_output
from ..data import CaptionedImages, scan_dataset
from .checkpoints import CheckpointManager
from .config import TrainConfig, config_from_args
from .phases import (
    ProgressCallback,
    StepReporter,
    StopRequest,
    TrainingDiverged,
    TrainingResult,
    TrainingStep,
    add_trainable_adapter,
    build_optimisation,
    end_training,
    finish,
    load_frozen_model,
    make_accelerator,
    make_latent_source,
    write_run_files,
)
from .sources import BatchSource
from .steps import RandomState, TextEmbeddingCache

__all__ = ["train", "main", "TrainingResult", "TrainingDiverged"]


def train(config: TrainConfig, progress: ProgressCallback | None = None) -> TrainingResult:
    """Run one training; ``progress(step, total, loss)`` is called after each optimizer step (for the web UI)."""
    config.validate()
    check_output(config.output, "folder", parameter="output")  # a run that cannot write its files does no work
    index = scan_dataset(config.dataset)  # a folder with no usable image fails here, before any model loads
    accelerator = make_accelerator(config)
    dataset = CaptionedImages(index, config.dataset)
    batches = BatchSource(
        dataset, batch_size=config.batch_size, gradient_accumulation=config.gradient_accumulation,
        steps=config.steps, epochs=config.epochs, seed=config.seed, process_index=accelerator.process_index,
        num_processes=accelerator.num_processes, workers=config.dataloader_workers,
    )

    model = load_frozen_model(config, accelerator.device)
    runtime = add_trainable_adapter(model, config)
    optimisation = build_optimisation(accelerator, model, runtime, config, batches.total_steps)
    random_state = RandomState(config.seed)
    checkpoints = CheckpointManager(accelerator, runtime, config, random_state)

    # Caches: latents (when crops and flips are fixed), filled before the first step; text-encoder outputs while it
    # is frozen.
    latents = make_latent_source(config, model, dataset, accelerator.device)
    if latents.cached:
        latents.prefill(config.batch_size, accelerator.process_index, accelerator.num_processes,
                        show_progress=accelerator.is_local_main_process)
        accelerator.wait_for_everyone()
    text = TextEmbeddingCache(model.pipe.tokenizer, model.text_encoder,
                              enabled=config.cache_text_encoder_outputs and not config.train_text_encoder)

    first_step = checkpoints.resume() if config.resume else 0
    # Written once the model, the data and the checkpoint to resume are known to be sound: a run refused on the way
    # (a --model that does not load, a missing checkpoint) leaves its output folder as it was.
    write_run_files(accelerator, config)
    training_step = TrainingStep(accelerator, model, optimisation, latents, text, dataset, random_state.generator,
                                 config)
    reporter = StepReporter(accelerator, optimisation, checkpoints, model.pipe, config, batches.total_steps,
                            first_step, progress)
    with StopRequest() as stop, reporter:
        for batch in batches.from_step(first_step, load_images=not latents.cached):
            outcome = training_step(batch)
            if not math.isfinite(outcome.loss):
                raise reporter.diverged(outcome.loss)
            if outcome.optimizer_stepped:
                reporter.after_optimizer_step(outcome)
                if stop.requested:
                    break
        interrupted = stop.requested and reporter.step < batches.total_steps

    result = finish(accelerator, reporter, runtime, interrupted)
    end_training(accelerator, optimisation)
    return result


def main(argv: list[str] | None = None) -> int:
    from .._entry import OneLineErrorParser, quiet_libraries, run_main

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = OneLineErrorParser(prog="difflora train", description="Train a LoRA style adapter.")

    def run() -> int:
        config = config_from_args(argv, parser)
        quiet_libraries()
        result = train(config)
        if result.interrupted:
            if result.main_process:
                print(f"interrupted at step {result.steps}; checkpoint {result.last_checkpoint}; "
                      "resume with --resume latest", file=sys.stderr)
            return 130
        if result.main_process:  # under torchrun every process returns here; the file is the main process's
            print(result.adapter_path)
        return 0

    return run_main(run, parser)
