"""Training on the tiny model: the file it writes, that it learns, that runs survive, and data parallelism."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from difflora import LoRARuntime
from difflora.data import DataConfig, CaptionedImages, collate_batch, scan_dataset
from difflora.errors import InvalidArgumentError
from difflora.formats import read_adapter
from difflora.generate import GenerationSettings, generate
from difflora.pipelines import load_pipeline
from difflora.train import TrainingDiverged, train
from difflora.train.checkpoints import changed_options
from difflora.train.config import TrainConfig, config_from_args, config_to_dict, make_config
from difflora.train.steps import TextEmbeddingCache, encode_latents, held_out_loss

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def style_split(tmp_path, name="pixel-sunsets"):
    """Copy a sample style set (24 images) into train/ (20) and held-out/ (every sixth image, 4) with .txt captions."""
    index = scan_dataset(DataConfig(data_dir=SAMPLES / name))
    train_dir, held_dir = tmp_path / "train", tmp_path / "held-out"
    train_dir.mkdir()
    held_dir.mkdir()
    for number, item in enumerate(index.items):
        target = held_dir if number % 6 == 0 else train_dir
        shutil.copy(item.path, target / item.path.name)
        (target / item.path.with_suffix(".txt").name).write_text(item.caption)
    return train_dir, held_dir


def config(tmp_path, data, **overrides) -> TrainConfig:
    options = dict(data=str(data), output=str(tmp_path / "run"), steps=4, batch_size=2, rank=4, alpha=8.0,
                   report_to="none", seed=3)
    options.update(overrides)
    return make_config(options)


def test_trained_file_loads_in_plain_diffusers_and_matches_runtime(tmp_path, tiny_model_dir):
    train_dir, _ = style_split(tmp_path)
    result = train(config(tmp_path, train_dir, model=str(tiny_model_dir), steps=3, lr=1e-2, train_text_encoder=True))
    assert result.adapter_path.is_file() and result.steps == 3 and len(result.losses) == 3
    with safe_open(str(result.adapter_path), "pt") as handle:
        header = handle.metadata()
    trained_config = json.loads(header["difflora.training_config"])
    assert trained_config["steps"] == 3 and trained_config["rank"] == 4 and header["ss_network_alpha"] == "8.0"
    assert (Path(result.adapter_path).parent / "config.yaml").is_file()

    settings = GenerationSettings("pixsun style, a sunset", steps=3, seed=1, width=64, height=64)
    ours = load_pipeline(tiny_model_dir, quiet=True)
    LoRARuntime.attach(ours).load(result.adapter_path)
    plain = load_pipeline(tiny_model_dir, quiet=True)
    plain.load_lora_weights(str(result.adapter_path))
    base = generate(load_pipeline(tiny_model_dir, quiet=True), settings, output_type="np")[0]
    ours_image = generate(ours, settings, output_type="np")[0]
    assert abs(ours_image - generate(plain, settings, output_type="np")[0]).max() <= 1 / 255
    assert abs(ours_image - base).max() > 1 / 255  # training moved the adapter away from zero


def mean_held_out_loss(pipe, folder):
    index = scan_dataset(DataConfig(data_dir=folder))
    dataset = CaptionedImages(index, DataConfig(data_dir=folder))
    batch = collate_batch([dataset[i] for i in range(len(dataset))])
    latents = encode_latents(pipe.vae, batch["pixel_values"])
    context = TextEmbeddingCache(pipe.tokenizer, pipe.text_encoder).encode(batch["captions"], torch.device("cpu"))
    return held_out_loss(pipe.unet, pipe.scheduler, latents, context, draws=8)


def test_it_learns_the_style(tmp_path, tiny_model_dir):
    train_dir, held_dir = style_split(tmp_path)
    result = train(config(tmp_path, train_dir, model=str(tiny_model_dir), steps=60, batch_size=4, lr=3e-3, rank=8,
                          alpha=8.0))
    pipe = load_pipeline(tiny_model_dir, quiet=True)
    base_loss = mean_held_out_loss(pipe, held_dir)
    LoRARuntime.attach(pipe).load(result.adapter_path)
    adapted_loss = mean_held_out_loss(pipe, held_dir)
    assert adapted_loss < 0.9 * base_loss, (base_loss, adapted_loss)


def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_model_dir, caplog):
    train_dir, _ = style_split(tmp_path)
    # Accumulation 2 over 10 batches an epoch: 5 steps an epoch, so the run crosses an epoch boundary after resuming.
    common = dict(model=str(tiny_model_dir), steps=8, lr=1e-2, lr_scheduler="linear", snr_gamma=5.0, noise_offset=0.05,
                  gradient_accumulation=2)
    straight = train(config(tmp_path / "a", train_dir, **common))

    def interrupt_at_three(step, total, loss):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C does: the loop finishes the step and saves

    stopped = train(config(tmp_path / "b", train_dir, **common), progress=interrupt_at_three)
    assert stopped.interrupted and stopped.steps == 3 and stopped.adapter_path is None
    assert stopped.last_checkpoint.name == "checkpoint-000003"
    with caplog.at_level(logging.WARNING, logger="difflora.train"):
        resumed = train(config(tmp_path / "b", train_dir, resume="latest", **common))
    assert not [r for r in caplog.records if "differ" in r.getMessage()]  # same options: no warning
    assert resumed.steps == 8
    assert resumed.losses == pytest.approx(straight.losses[3:], abs=1e-6)
    a, b = read_adapter(straight.adapter_path), read_adapter(resumed.adapter_path)
    for key, module in a.modules.items():
        torch.testing.assert_close(b.modules[key].up, module.up, rtol=0, atol=1e-6)
        torch.testing.assert_close(b.modules[key].down, module.down, rtol=0, atol=1e-6)


def test_resume_names_the_options_that_changed_since_the_checkpoint():
    saved = config_to_dict(make_config({"data": "d", "steps": 5}))
    later = config_to_dict(make_config({"data": "d", "steps": 9, "output": "o2", "lr": 1e-3,
                                        "timestep_sampling": "uniform"}))
    # More steps and another output folder continue the same run; the learning rate and timesteps do not.
    assert changed_options(saved, later) == ["lr: 0.0001 → 0.001", "timestep_sampling: stratified → uniform"]
    older = {key: value for key, value in saved.items() if key != "timestep_sampling"}  # a checkpoint from before
    assert changed_options(older, saved) == ["timestep_sampling: unset → stratified"]
    # A path recorded as typed (older checkpoints) is the same folder normalised; another folder is not.
    typed = {**saved, "data": "./d/"}
    assert changed_options(typed, saved) == []
    assert changed_options({**saved, "data": "other"}, saved) == ["data: other → d"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    train_dir, _ = style_split(tmp_path)
    import difflora.train.steps as training

    calls = []
    real_loss = training.diffusion_loss

    def loss_that_diverges_at_step_three(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(training, "diffusion_loss", loss_that_diverges_at_step_three)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 3.*checkpoint-000002"):
        train(config(tmp_path, train_dir, model=str(tiny_model_dir), steps=10, checkpointing_steps=2))
    assert not (tmp_path / "run" / "lora.safetensors").exists()
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-000002"
    assert read_adapter(checkpoint / "adapter.safetensors").modules  # the good checkpoint is intact and readable


def test_latent_cache_on_disk_is_reused_and_invalidated(tmp_path, tiny_model_dir, monkeypatch):
    train_dir, _ = style_split(tmp_path)
    cache = tmp_path / "latents"
    import difflora.train.steps as training

    calls = []
    original = training.encode_latents
    monkeypatch.setattr(training, "encode_latents",
                        lambda vae, pixels: calls.append(len(pixels)) or original(vae, pixels))
    options = dict(model=str(tiny_model_dir), steps=10, batch_size=4, cache_dir=str(cache))
    train(config(tmp_path / "one", train_dir, **options))
    first = sum(calls)
    assert first == len(list(cache.glob("*.safetensors"))) == 20
    calls.clear()
    train(config(tmp_path / "two", train_dir, **options))
    assert sum(calls) == 0  # every latent came from the cache
    changed = sorted(train_dir.glob("*.png"))[0]
    changed.write_bytes(changed.read_bytes() + b"\0")  # one byte more: a new file as far as the cache knows
    train(config(tmp_path / "three", train_dir, **options))
    assert sum(calls) == 1


def test_config_file_flags_and_errors(tmp_path):
    (tmp_path / "cfg.yaml").write_text("data: images\nrank: 8\nlearning-rate-typo: 1\n")
    with pytest.raises(InvalidArgumentError, match="unknown option 'learning-rate-typo'"):
        config_from_args(["--config", str(tmp_path / "cfg.yaml")])
    (tmp_path / "cfg.yaml").write_text("data: images\nrank: 8\nlr: 0.001\n")
    loaded = config_from_args(["--config", str(tmp_path / "cfg.yaml"), "--rank", "16"])
    assert loaded.rank == 16 and loaded.lr == 0.001 and loaded.dataset.data_dir == tmp_path / "images"
    assert config_from_args(["--data", "x", "--epochs", "2"]).steps is None
    # Library errors name the parameter; the command line turns it into the flag (test_train_config.py).
    for argv, parameter, message in [
        (["--data", "x", "--rank", "0"], "rank", "rank must be a positive integer"),
        (["--data", "x", "--resolution", "60"], "resolution", "resolution must be a positive multiple of 8"),
        (["--data", "x", "--caption-dropout", "1.5"], "caption_dropout",
         r"caption_dropout must be a finite number in \[0, 1\]"),
        (["--steps", "3"], "data", "data is required"),
    ]:
        with pytest.raises(InvalidArgumentError, match=f"^{message}") as caught:
            config_from_args(argv)
        assert caught.value.parameter == parameter


def test_bad_data_fails_before_any_model_loads(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    result = subprocess.run(
        [sys.executable, "-m", "difflora.train", "--data", str(tmp_path), "--model", str(tmp_path / "no-model"),
         "--report-to", "none"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "holds no readable images" in lines[0] and "broken.png" in lines[0]


@pytest.mark.parametrize("main_process, interrupted", [(True, False), (False, False), (True, True), (False, True)])
def test_only_the_main_process_says_where_the_adapter_is(main_process, interrupted, monkeypatch, capsys):
    from difflora.train import recipe
    from difflora.train.phases import TrainingResult

    result = TrainingResult(None if interrupted else Path("run/lora.safetensors"), 3, [1.0], interrupted=interrupted,
                            last_checkpoint=Path("run/checkpoints/checkpoint-000003"), main_process=main_process)
    monkeypatch.setattr(recipe, "train", lambda config: result)
    assert recipe.main(["--data", "images"]) == (130 if interrupted else 0)
    captured = capsys.readouterr()
    said = captured.err if interrupted else captured.out
    expected = "interrupted at step 3" if interrupted else "run/lora.safetensors"
    assert (expected in said) == main_process, said


@pytest.mark.skipif(sys.platform == "win32", reason="gloo on one machine")
def test_two_cpu_processes_equal_one_process(tmp_path, tiny_model_dir):
    train_dir, _ = style_split(tmp_path)
    # A schedule with warm-up and decay: accelerate would run it N times as fast on N processes if not told.
    base = ["--data", str(train_dir), "--model", str(tiny_model_dir), "--steps", "3", "--rank", "4", "--lr", "1e-2",
            "--report-to", "none", "--seed", "5", "--lr-scheduler", "linear", "--lr-warmup-steps", "1"]
    single = subprocess.run(
        [sys.executable, "-m", "difflora.train", *base, "--batch-size", "4", "--output", str(tmp_path / "one")],
        capture_output=True, text=True, timeout=300,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    double = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "difflora.train", *base, "--batch-size", "2", "--output", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert double.returncode == 0, double.stderr[-3000:]
    assert double.stdout.splitlines() == [str(tmp_path / "two" / "lora.safetensors")]  # once, not once per process
    written = list((tmp_path / "two").glob("*.safetensors"))
    assert [p.name for p in written] == ["lora.safetensors"]
    one, two = read_adapter(tmp_path / "one" / "lora.safetensors"), read_adapter(written[0])
    # fp32 reductions run in another order across processes, and Adam turns tiny gradient differences on
    # near-zero entries into step-sized ones, so compare the learned factors as a whole: `up` starts at zero, so
    # all of it was learned.
    ups_one = torch.cat([module.up.flatten() for _, module in sorted(one.modules.items())])
    ups_two = torch.cat([two.modules[key].up.flatten() for key, _ in sorted(one.modules.items())])
    assert (ups_two - ups_one).norm() / ups_one.norm() < 1e-3
    assert ups_one.norm() > 0
