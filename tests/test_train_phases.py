"""The phases of the training recipe, each on its own: set-up (accelerator, frozen model, adapter, optimisation,
latent source, run files), one accumulation micro-batch, what follows an optimizer step, and the end of a run."""

import json
import math
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from diffusers import DDPMScheduler

import difflora.train.phases as phases
import difflora.train.steps as steps
from difflora.data import CaptionedImages, scan_dataset
from difflora.latent_cache import LatentDiskCache, LatentMemoryCache
from difflora.train.config import config_to_dict, make_config
from difflora.train.phases import (
    MicroBatchOutcome,
    StepReporter,
    StopRequest,
    TrainingStep,
    add_trainable_adapter,
    adapter_metadata,
    build_optimisation,
    end_training,
    finish,
    load_frozen_model,
    make_accelerator,
    make_latent_source,
    write_run_files,
)
from difflora.train.sources import BatchSource

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def config(tmp_path, **overrides):
    options = dict(data=str(SAMPLES / "pixel-sunsets"), output=str(tmp_path / "run"), steps=4, batch_size=2,
                   report_to="none", seed=3)
    options.update(overrides)
    return make_config(options)


# ----- set-up -------------------------------------------------------------------------------------------------------


def test_each_run_gets_a_fresh_accelerator_with_its_precision_accumulation_and_seed(tmp_path):
    first = make_accelerator(config(tmp_path, mixed_precision="bf16", gradient_accumulation=2, seed=1))
    drawn_first = torch.rand(3)
    assert (first.mixed_precision, first.gradient_accumulation_steps) == ("bf16", 2)
    second = make_accelerator(config(tmp_path, seed=1))  # another precision in the same process
    drawn_second = torch.rand(3)
    assert (second.mixed_precision, second.gradient_accumulation_steps) == ("no", 1)
    assert torch.equal(drawn_first, drawn_second)  # seeded from the config


def test_the_model_is_frozen_in_the_training_precision(tmp_path, tiny_model_dir):
    cpu = torch.device("cpu")
    model = load_frozen_model(config(tmp_path, model=str(tiny_model_dir), mixed_precision="bf16"), cpu)
    modules = (model.unet, model.vae, model.text_encoder)
    assert not any(parameter.requires_grad for module in modules for parameter in module.parameters())
    assert model.unet.dtype == model.vae.dtype == model.text_encoder.dtype == model.weight_dtype == torch.bfloat16
    assert isinstance(model.noise_scheduler, DDPMScheduler) and model.prediction_type == "epsilon"
    training_it = load_frozen_model(config(tmp_path, model=str(tiny_model_dir), mixed_precision="bf16",
                                           train_text_encoder=True, prediction_type="v_prediction"), cpu)
    assert training_it.text_encoder.dtype == torch.float32 and training_it.unet.dtype == torch.bfloat16
    assert training_it.prediction_type == "v_prediction"


def test_adapter_groups_and_schedule(tmp_path, tiny_model_dir):
    run = config(tmp_path, model=str(tiny_model_dir), train_text_encoder=True, lr=1e-3, text_encoder_lr=5e-4,
                 loraplus_ratio=4.0, lr_scheduler="linear")
    accelerator = make_accelerator(run)
    model = load_frozen_model(run, accelerator.device)
    runtime = add_trainable_adapter(model, run)
    factors = list(runtime.parameters(run.name))
    assert all(p.requires_grad and p.dtype == torch.float32 for p in factors)
    assert all(torch.count_nonzero(up) == 0 for up in factors[1::2]) and all(d.abs().sum() > 0 for d in factors[0::2])
    assert runtime.adapter_state(run.name).modules_per_component() == {"text_encoder": 8, "unet": 56}

    optimisation = build_optimisation(accelerator, model, runtime, run, total_steps=4)
    # UNet down, UNet up (LoRA+: ×4), text-encoder down and up at their own rate.
    assert [group["lr"] for group in optimisation.optimizer.param_groups] == [1e-3, 4e-3, 5e-4, 2e-3]
    assert {id(p) for p in optimisation.parameters()} == {id(p) for p in factors}
    assert optimisation.trained == [model.unet, model.text_encoder]
    for _ in range(4):
        optimisation.optimizer.step()
        optimisation.lr_scheduler.step()
    assert optimisation.lr_scheduler.get_last_lr() == [0.0, 0.0, 0.0, 0.0]  # the linear schedule ends at step 4


def test_latents_are_cached_only_when_crops_and_flips_are_fixed(tmp_path):
    model = SimpleNamespace(vae=None)
    dataset = SimpleNamespace()
    assert isinstance(make_latent_source(config(tmp_path), model, dataset, "cpu").cache, LatentMemoryCache)
    on_disk = make_latent_source(config(tmp_path, cache_dir=str(tmp_path / "c")), model, dataset, "cpu")
    assert isinstance(on_disk.cache, LatentDiskCache) and on_disk.cache.folder == tmp_path / "c"
    assert make_latent_source(config(tmp_path, random_flip=True), model, dataset, "cpu").cache is None
    assert make_latent_source(config(tmp_path, center_crop=False), model, dataset, "cpu").cache is None
    assert make_latent_source(config(tmp_path, cache_latents=False), model, dataset, "cpu").cache is None
    assert make_latent_source(config(tmp_path, dataloader_workers=2), model, dataset, "cpu").workers == 2


class RecordingAccelerator:
    """The accelerate calls the phases make around the model, recorded."""

    def __init__(self, main=True):
        self.is_main_process, self.is_local_main_process, self.trackers = main, False, []
        self.calls, self.logged = [], []

    def log(self, values, step):
        self.logged.append((step, values))

    def init_trackers(self, name, config):
        self.calls.append(("init_trackers", name, sorted(config)))

    def wait_for_everyone(self):
        self.calls.append("wait_for_everyone")

    def free_memory(self):
        self.calls.append("free_memory")

    def end_training(self):
        self.calls.append("end_training")


def test_run_files_are_written_once_by_the_main_process(tmp_path):
    run = config(tmp_path, report_to="tensorboard")
    write_run_files(RecordingAccelerator(main=False), run)
    assert not (tmp_path / "run").exists()
    accelerator = RecordingAccelerator()
    write_run_files(accelerator, run)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()) == config_to_dict(run)
    (name, project, scalars), = accelerator.calls
    assert (name, project) == ("init_trackers", "difflora") and "validation_prompts" not in scalars
    assert {"rank", "resolution", "data", "lr"} <= set(scalars)


# ----- one micro-batch ----------------------------------------------------------------------------------------------


def micro_batch_run(tmp_path, tiny_model_dir, **overrides):
    """What train() builds before its loop, from set-up phases, for a run of ``overrides``."""
    run = config(tmp_path, model=str(tiny_model_dir), lr=1e-2, **overrides)
    accelerator = make_accelerator(run)
    dataset = CaptionedImages(scan_dataset(run.dataset), run.dataset)
    batches = BatchSource(dataset, batch_size=run.batch_size, gradient_accumulation=run.gradient_accumulation,
                          steps=run.steps, epochs=run.epochs, seed=run.seed)
    model = load_frozen_model(run, accelerator.device)
    runtime = add_trainable_adapter(model, run)
    optimisation = build_optimisation(accelerator, model, runtime, run, batches.total_steps)
    latents = make_latent_source(run, model, dataset, accelerator.device)
    text = steps.TextEmbeddingCache(model.pipe.tokenizer, model.text_encoder)
    step = TrainingStep(accelerator, model, optimisation, latents, text, dataset, torch.Generator().manual_seed(0), run)
    return step, batches.from_step(0, load_images=not latents.cached), list(runtime.parameters(run.name))


def test_a_micro_batch_accumulates_and_the_last_of_an_accumulation_steps_the_optimizer(tmp_path, tiny_model_dir):
    step, batches, factors = micro_batch_run(tmp_path, tiny_model_dir, gradient_accumulation=2)
    ups = factors[1::2]
    first = step(next(batches))
    assert math.isfinite(first.loss) and not first.optimizer_stepped and first.grad_norm is None
    assert all(torch.count_nonzero(up) == 0 for up in ups)  # no update yet
    assert sum(up.grad.abs().sum() for up in ups) > 0  # but gradients, kept for the next micro-batch
    accumulated = [up.grad.clone() for up in ups]
    second = step(next(batches))
    assert second.optimizer_stepped and second.grad_norm is not None and second.grad_norm > 0
    assert all(up.grad is None for up in ups)  # zeroed after the step
    moved = [torch.count_nonzero(up) > 0 for up in ups]
    assert all(moved) and len(moved) == len(accumulated) == 56


def test_a_loss_that_is_not_finite_is_returned_before_anything_is_applied(tmp_path, tiny_model_dir, monkeypatch):
    step, batches, factors = micro_batch_run(tmp_path, tiny_model_dir, random_flip=True)  # images, no latent cache
    real_loss = steps.diffusion_loss
    monkeypatch.setattr(steps, "diffusion_loss", lambda *args, **kwargs: real_loss(*args, **kwargs) * float("inf"))
    before = [factor.detach().clone() for factor in factors]
    outcome = step(next(batches))
    assert math.isinf(outcome.loss) and not outcome.optimizer_stepped
    assert all(factor.grad is None for factor in factors)  # no backward pass
    assert all(torch.equal(factor, old) for factor, old in zip(factors, before))
    assert step.optimisation.optimizer.state_dict()["state"] == {}  # the optimizer never stepped


# ----- after an optimizer step --------------------------------------------------------------------------------------


class RecordingCheckpoints:
    def __init__(self, latest=None):
        self._latest, self.saved = latest, []

    def latest(self):
        return self._latest

    def save(self, step):
        self.saved.append(step)
        return Path(f"checkpoint-{step:06d}")


def reporter(tmp_path, monkeypatch, first_step=0, latest=None, **overrides):
    run = config(tmp_path, steps=6, log_every=2, checkpointing_steps=3, validation_prompts=["a moon"],
                 validation_steps=4, **overrides)
    rendered = []
    monkeypatch.setattr(phases, "render_validation", lambda accelerator, pipe, config, step: rendered.append(step))
    progress = []
    schedule = SimpleNamespace(get_last_lr=lambda: [0.5])
    made = StepReporter(RecordingAccelerator(), SimpleNamespace(lr_scheduler=schedule), RecordingCheckpoints(latest),
                        "the pipe", run, 6, first_step, lambda *args: progress.append(args))
    return made, rendered, progress


def test_logs_checkpoints_validation_and_progress_follow_their_intervals(tmp_path, monkeypatch):
    made, rendered, progress = reporter(tmp_path, monkeypatch)
    with made:
        for step in range(1, 7):
            made.after_optimizer_step(MicroBatchOutcome(loss=step / 10, grad_norm=step, optimizer_stepped=True))
    assert made.step == 6 and made.losses == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert made.accelerator.logged == [(step, {"loss": step / 10, "lr": 0.5, "grad_norm": step}) for step in (2, 4, 6)]
    assert progress == [(step, 6, step / 10) for step in range(1, 7)]
    assert made.checkpoints.saved == [3, 6] and made.last_checkpoint == Path("checkpoint-000006")
    assert rendered == [4]
    assert str(made.diverged(float("nan"))) == (
        "loss became nan at step 7: training stopped; last good checkpoint: checkpoint-000006")


def test_a_resumed_run_counts_on_from_its_checkpoint(tmp_path, monkeypatch):
    made, rendered, progress = reporter(tmp_path, monkeypatch, first_step=3, latest=Path("checkpoint-000003"))
    assert made.last_checkpoint == Path("checkpoint-000003") and made.bar.n == 3
    made.after_optimizer_step(MicroBatchOutcome(loss=1.0, grad_norm=None, optimizer_stepped=True))
    assert made.step == 4 and progress == [(4, 6, 1.0)] and rendered == [4]
    assert made.accelerator.logged == [(4, {"loss": 1.0, "lr": 0.5})]  # no norm when not clipped
    assert "last good checkpoint: checkpoint-000003" in str(made.diverged(float("inf")))
    no_checkpoint, _, _ = reporter(tmp_path, monkeypatch)
    assert str(no_checkpoint.diverged(float("inf"))) == "loss became inf at step 1: training stopped"


def test_ctrl_c_asks_to_stop_once_then_stops_at_once():
    previous = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous


# ----- the end ------------------------------------------------------------------------------------------------------


class RecordingRuntime:
    def __init__(self):
        self.saved = []

    def save(self, name, path, metadata=None, layout=None):
        self.saved.append((name, path, metadata))


def finished_reporter(tmp_path, monkeypatch, step, **overrides):
    made, rendered, _ = reporter(tmp_path, monkeypatch, **overrides)
    made.step, made.losses = step, [1.0] * step
    return made, rendered


def test_an_interrupted_run_ends_in_a_checkpoint(tmp_path, monkeypatch):
    made, rendered = finished_reporter(tmp_path, monkeypatch, step=2)
    runtime = RecordingRuntime()
    result = finish(made.accelerator, made, runtime, interrupted=True)
    assert result.interrupted and result.adapter_path is None and result.steps == 2
    assert made.checkpoints.saved == [2] and result.last_checkpoint == Path("checkpoint-000002")
    assert runtime.saved == [] and rendered == [] and result.main_process
    other, _ = finished_reporter(tmp_path, monkeypatch, step=2)
    other.accelerator.is_main_process = False
    assert not finish(other.accelerator, other, RecordingRuntime(), interrupted=True).main_process


def test_a_finished_run_writes_the_adapter_and_the_last_validation_images(tmp_path, monkeypatch):
    made, rendered = finished_reporter(tmp_path, monkeypatch, step=6, trigger_word="pixsun")
    runtime = RecordingRuntime()
    result = finish(made.accelerator, made, runtime, interrupted=False)
    assert not result.interrupted and result.adapter_path == tmp_path / "run" / "lora.safetensors"
    assert result.losses == [1.0] * 6 and made.checkpoints.saved == []
    (name, path, metadata), = runtime.saved
    assert (name, path, metadata) == ("lora", result.adapter_path, adapter_metadata(made.config))
    assert json.loads(metadata["difflora.training_config"]) == config_to_dict(made.config)
    assert json.loads(metadata["difflora.trigger_words"]) == ["pixsun"] and metadata["ss_resolution"] == "(64, 64)"
    assert rendered == [6]  # step 6 is not a validation step (every 4): the final images are rendered here
    assert result.main_process
    other, _ = finished_reporter(tmp_path, monkeypatch, step=6)
    other.accelerator.is_main_process = False
    not_main = finish(other.accelerator, other, RecordingRuntime(), interrupted=False)
    assert not not_main.main_process  # under torchrun: this process does not say where the file is
    just_rendered, rendered = finished_reporter(tmp_path, monkeypatch, step=4)
    finish(just_rendered.accelerator, just_rendered, RecordingRuntime(), interrupted=False)
    assert rendered == []  # the loop rendered step 4 already


def test_data_parallel_wrappers_are_released_before_the_run_ends():
    accelerator = RecordingAccelerator()
    optimisation = phases.Optimisation([], None, None, [], unet="ddp unet", text_encoder="text encoder")
    accelerator.free_memory = lambda: accelerator.calls.append(("free_memory", optimisation.unet))
    end_training(accelerator, optimisation)
    assert accelerator.calls == [("free_memory", None), "wait_for_everyone", "end_training"]
    assert optimisation.text_encoder is None
