"""Training options have one source: TrainConfig's fields and, for the data, DataConfig's; flat on the command line,
in YAML files and in what a run writes; errors name the parameter, and the command line says its flag."""

import dataclasses
import math
import os
import subprocess
import sys

import pytest
import yaml

from difflora.data import DataConfig
from difflora.runtime import AdapterOptions
from difflora.errors import InvalidArgumentError
from difflora.train.checkpoints import changed_options
from difflora.train.config import (
    TrainConfig,
    build_arg_parser,
    config_from_args,
    config_options,
    config_to_dict,
    make_config,
)

# What config.yaml, checkpoints and adapters held before the data options moved into DataConfig.
WRITTEN_BEFORE = {
    "model": "embedded", "model_config": None, "data": "images", "output": "outputs/lora", "name": "lora",
    "resolution": 64, "center_crop": True, "random_flip": False, "caption": None, "trigger_word": None,
    "caption_dropout": 0.0, "shuffle_captions": False, "keep_tokens": 0, "buckets": True, "steps": 200,
    "epochs": None, "batch_size": 4, "gradient_accumulation": 1, "rank": 4, "alpha": None, "use_rslora": False,
    "train_unet": True, "train_text_encoder": False, "lr": 0.0001, "text_encoder_lr": None, "loraplus_ratio": 1.0,
    "lora_fa": False, "optimizer": "adamw", "weight_decay": 0.01, "max_grad_norm": 1.0, "lr_scheduler": "constant",
    "lr_warmup_steps": 0, "snr_gamma": None, "noise_offset": 0.0, "timestep_sampling": "stratified",
    "prediction_type": None, "mixed_precision": "no", "gradient_checkpointing": False, "cache_latents": True,
    "cache_dir": None, "cache_text_encoder_outputs": True, "dataloader_workers": 0, "seed": 0,
    "checkpointing_steps": 0, "checkpoints_total_limit": 3, "resume": None, "validation_prompts": [],
    "validation_steps": 0, "validation_seed": 0, "validation_inference_steps": 20, "report_to": "tensorboard",
    "log_every": 1,
}


def test_every_data_option_is_a_flat_flag_and_key_with_datas_own_help():
    flat = config_to_dict(make_config({"data": "images"}))
    added_since = {"bucket_step", "min_bucket_side", "max_bucket_side", "algo", "targets", "conv_rank", "conv_alpha",
                   "dora", "lokr_factor", "layout"}
    assert set(flat) == set(WRITTEN_BEFORE) | added_since
    assert {key: flat[key] for key in WRITTEN_BEFORE} == WRITTEN_BEFORE  # same keys, same defaults
    data_fields = {f.name for f in dataclasses.fields(DataConfig)} - {"data_dir", "seed"}
    assert data_fields <= set(flat) and "data" in flat and "dataset" not in flat
    assert not data_fields & {f.name for f in dataclasses.fields(TrainConfig)}  # declared once, in DataConfig
    helps = {action.dest: action.help for action in build_arg_parser()._actions}
    for name in data_fields:
        assert helps[name].startswith(DataConfig.__dataclass_fields__[name].metadata["help"]), name
    assert helps["data"] == DataConfig.__dataclass_fields__["data_dir"].metadata["help"]
    # The adapter's options take their help from runtime.AdapterOptions, which create_adapter and the web UI share
    # (the run's one seed is the run's own option).
    for option in dataclasses.fields(AdapterOptions):
        if option.name in set(flat) - {"seed"}:
            assert helps[option.name].startswith(option.metadata["help"]), option.name


def test_data_options_reach_the_data_config_from_flags_and_files(tmp_path):
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({
        "data": "images", "resolution": 128, "bucket-step": 16, "min_bucket_side": 64, "max_bucket_side": 192,
        "caption_dropout": 0.25, "center_crop": False, "trigger_word": "zorp", "keep_tokens": 2, "seed": 5,
    }))
    config = config_from_args(["--config", str(tmp_path / "cfg.yaml"), "--no-random-flip", "--shuffle-captions",
                               "--max-bucket-side", "256", "--caption", "a thing", "--no-buckets"])
    data = config.dataset
    assert data.data_dir == tmp_path / "images"  # relative to the file
    assert (data.resolution, data.bucket_step, data.min_bucket_side, data.max_bucket_side) == (128, 16, 64, 256)
    assert (data.caption_dropout, data.center_crop, data.random_flip) == (0.25, False, False)
    assert data.shuffle_captions
    assert (data.trigger_word, data.keep_tokens, data.caption, data.buckets) == ("zorp", 2, "a thing", False)
    assert data.seed == config.seed == 5  # one seed for the run and its data
    flat = config_to_dict(config)
    assert make_config(flat) == config  # what a run writes reads back as the same config
    assert (flat["data"], flat["bucket_step"], flat["max_bucket_side"]) == (str(tmp_path / "images"), 16, 256)


def test_a_config_written_before_still_loads_and_compares_equal():
    before = make_config(WRITTEN_BEFORE)
    assert before.dataset.bucket_sides == (32, 128)
    # Older checkpoints do not record the bucket options, which runs could not set: they ran with the defaults.
    assert changed_options(WRITTEN_BEFORE, config_to_dict(before)) == []
    later = config_to_dict(make_config({**WRITTEN_BEFORE, "min_bucket_side": 16}))
    assert changed_options(WRITTEN_BEFORE, later) == ["min_bucket_side: None → 16"]


def test_only_options_marked_as_not_shaping_the_result_change_silently_on_resume():
    outside = {name for name, option in config_options().items() if not option.shapes_result}
    assert outside == {
        "output", "resume", "steps", "epochs", "checkpointing_steps", "checkpoints_total_limit", "validation_prompts",
        "validation_steps", "validation_seed", "validation_inference_steps", "report_to", "log_every",
        "dataloader_workers", "cache_dir", "layout",
    }
    saved = config_to_dict(make_config({"data": "d"}))
    for name, value in [("steps", 9), ("output", "elsewhere"), ("dataloader_workers", 2), ("cache_dir", "c")]:
        assert changed_options(saved, {**saved, name: value}) == [], name
    for name, value in [("rank", 8), ("resolution", 128), ("bucket_step", 16), ("seed", 1), ("data", "other")]:
        assert changed_options(saved, {**saved, name: value}) == [f"{name}: {saved[name]} → {value}"]


@pytest.mark.parametrize("options, parameter", [
    ({"rank": 0}, "rank"),
    ({"batch_size": 0}, "batch_size"),
    ({"steps": None}, "steps"),
    ({"lr": 0.0}, "lr"),
    ({"alpha": -1.0}, "alpha"),
    ({"dataloader_workers": -1}, "dataloader_workers"),
    ({"train_unet": False}, "train_text_encoder"),
    ({"name": "a.b"}, "name"),
    ({"optimizer": "sgd"}, "optimizer"),
    ({"rank": "four"}, "rank"),
    ({"rank": None}, "rank"),
    ({"resolution": 60}, "resolution"),
    ({"bucket_step": 12}, "bucket_step"),
    ({"min_bucket_side": 128}, "min_bucket_side"),
    ({"learning_rate": 1.0}, "learning_rate"),
])
def test_errors_name_the_parameter(options, parameter):
    with pytest.raises(InvalidArgumentError) as caught:
        make_config({"data": "images", **options})
    assert caught.value.parameter == parameter
    assert str(caught.value).startswith((parameter + " ", f"{parameter!r} ")), str(caught.value)


@pytest.mark.parametrize("options, message", [
    ({"lr": math.inf}, "lr must be a finite number in (0, 1], got inf"),
    ({"lr": math.nan}, "lr must be a finite number in (0, 1], got nan"),
    ({"text_encoder_lr": 2.0}, "text_encoder_lr must be a finite number in (0, 1], got 2.0"),
    ({"alpha": math.inf}, "alpha must be a finite number in (0, 10000], got inf"),
    ({"loraplus_ratio": 0.0}, "loraplus_ratio must be a finite number in (0, 1000], got 0.0"),
    ({"snr_gamma": math.nan}, "snr_gamma must be a finite number in (0, 1000], got nan"),
    ({"noise_offset": math.nan}, "noise_offset must be a finite number in [0, 1], got nan"),
    ({"noise_offset": -0.1}, "noise_offset must be a finite number in [0, 1], got -0.1"),
    ({"weight_decay": math.inf}, "weight_decay must be a finite number in [0, 1], got inf"),
    ({"max_grad_norm": math.nan}, "max_grad_norm must be a finite number in [0, 1e+06], got nan"),
    ({"caption_dropout": math.nan}, "caption_dropout must be a finite number in [0, 1], got nan"),
    ({"checkpoints_total_limit": -1}, "checkpoints_total_limit must be an integer in [0, 1000000000], got -1"),
    # Numbers with no upper bound once loaded the model and died allocating (rank), or ran past generate's limit.
    ({"rank": 10**12}, f"rank must be a positive integer in [1, 1280], got {10**12}"),
    ({"batch_size": 10**6}, "batch_size must be a positive integer in [1, 256], got 1000000"),
    ({"gradient_accumulation": 10**6}, "gradient_accumulation must be a positive integer in [1, 1000], got 1000000"),
    ({"validation_inference_steps": 2000},
     "validation_inference_steps must be a positive integer in [1, 1000], got 2000"),
    ({"dataloader_workers": 10**4}, "dataloader_workers must be an integer in [0, 64], got 10000"),
    ({"resolution": 8192}, "resolution must be a positive multiple of 8 in [8, 4096], got 8192"),
    ({"bucket_step": 8192}, "bucket_step must be a positive multiple of 8 in [8, 4096], got 8192"),
    ({"max_bucket_side": 10**9}, "max_bucket_side must be a positive multiple of 8 in [8, 8192], got 1000000000"),
    ({"min_bucket_side": 16384}, "min_bucket_side must be a positive multiple of 8 in [8, 8192], got 16384"),
    ({"keep_tokens": 226}, "keep_tokens must be an integer in [0, 225], got 226"),
    ({"seed": -1}, "seed must be an integer in [0, 2**63 - 1], got -1"),
    ({"validation_seed": 2**63}, f"validation_seed must be an integer in [0, 2**63 - 1], got {2**63}"),
])
def test_numbers_are_finite_and_in_range(options, message):
    with pytest.raises(InvalidArgumentError) as caught:
        make_config({"data": "images", **options})
    assert str(caught.value) == message and caught.value.parameter == next(iter(options))
    make_config({"data": "images", "lr": 1.0, "noise_offset": 0.0, "weight_decay": 1.0, "max_grad_norm": 0.0,
                 "seed": 2**63 - 1, "checkpoints_total_limit": 0, "rank": 1280, "batch_size": 256,
                 "validation_inference_steps": 1000, "resolution": 4096, "max_bucket_side": 8192, "keep_tokens": 225})


def test_the_command_line_says_the_flag(tmp_path):
    for argv, line in [
        (["--rank", "0"], "difflora: error: --rank must be a positive integer in [1, 1280], got 0"),
        (["--bucket-step", "12"],
         "difflora: error: --bucket-step must be a positive multiple of 8 in [8, 4096], got 12"),
        (["--steps", "none"], "difflora: error: --steps must be given when epochs is not"),
        (["--noise-offset", "nan"], "difflora: error: --noise-offset must be a finite number in [0, 1], got nan"),
    ]:
        result = subprocess.run([sys.executable, "-m", "difflora", "train", "--data", str(tmp_path), *argv],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and result.stderr.strip() == line, result.stderr


def test_help_lists_every_option():
    result = subprocess.run([sys.executable, "-m", "difflora.train", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for flag in ("--data", "--resolution", "--bucket-step", "--min-bucket-side", "--max-bucket-side",
                 "--center-crop, --no-center-crop", "--dataloader-workers", "--validation-prompt"):
        assert flag in text, flag
    assert "--dataset" not in text and "--data-dir" not in text


def test_a_number_out_of_range_is_refused_before_anything_loads_or_is_written(tmp_path, monkeypatch, capsys):
    from PIL import Image

    import difflora.pipelines
    from difflora.cli import main

    def no_model_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(difflora.pipelines, "load_pipeline", no_model_load)
    (tmp_path / "data").mkdir()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / "data" / "red.png")
    argv = ["train", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "run"), "--report-to", "none"]
    assert main([*argv, "--rank", "1000000000000"]) == 2
    assert capsys.readouterr().err == (
        "difflora: error: --rank must be a positive integer in [1, 1280], got 1000000000000\n")
    assert not (tmp_path / "run").exists()  # no config.yaml left behind


# ----- YAML files ---------------------------------------------------------------------------------------------------


def test_numbers_yaml_reads_as_text_are_numbers(tmp_path):
    # PyYAML follows YAML 1.1, where 1e-3 (no dot) is a string; people write it, as most YAML readers take it.
    (tmp_path / "cfg.yaml").write_text("data: images\nlr: 1e-3\ntext_encoder_lr: '5e-5'\nrank: '8'\n")
    config = config_from_args(["--config", str(tmp_path / "cfg.yaml")])
    assert (config.lr, config.text_encoder_lr, config.rank) == (1e-3, 5e-5, 8)
    assert isinstance(config.rank, int)
    (tmp_path / "cfg.yaml").write_text("data: images\nrank: eight\n")
    with pytest.raises(InvalidArgumentError, match="'rank' must be int, got 'eight'$"):
        config_from_args(["--config", str(tmp_path / "cfg.yaml")])


@pytest.mark.parametrize("text, line", [
    ("lr: 2e0", "--config {file}: 'lr' must be a finite number in (0, 1], got 2.0"),
    ("text_encoder_lr: 3", "--config {file}: 'text_encoder_lr' must be a finite number in (0, 1], got 3.0"),
    ("resolution: 60", "--config {file}: 'resolution' must be a positive multiple of 8 in [8, 4096], got 60"),
])
def test_a_bad_value_from_a_config_file_names_the_file(text, line, tmp_path, capsys):
    from difflora.cli import main

    config = tmp_path / "cfg.yaml"
    config.write_text(f"data: images\n{text}\n")
    assert main(["train", "--config", str(config)]) == 2
    assert capsys.readouterr().err == f"difflora: error: {line.format(file=config)}\n"
    # The same value from a flag is the flag's; a flag that replaces the file's value leaves the file out of it.
    name, _, value = text.partition(": ")
    flag = "--" + name.replace("_", "-")
    assert main(["train", "--config", str(config), flag, value]) == 2
    assert capsys.readouterr().err.startswith(f"difflora: error: {flag} must be ")
    good = {"lr": "0.5", "text_encoder_lr": "0.5", "resolution": "64"}[name]
    config = config_from_args(["--config", str(config), flag, good])
    assert getattr(config.dataset if name == "resolution" else config, name) == float(good)


def test_a_config_file_that_cannot_be_read_is_one_line(tmp_path):
    for path, reason in [(tmp_path / "missing.yaml", "no such file"),
                         (tmp_path, f"cannot be read ({os.strerror(21)})"),
                         (tmp_path / ("a" * 300 + ".yaml"), f"cannot be read ({os.strerror(36)})")]:
        with pytest.raises(InvalidArgumentError) as caught:
            config_from_args(["--config", str(path)])
        assert str(caught.value) == f"config {path}: {reason}" and caught.value.parameter == "config"
