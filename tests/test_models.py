"""The embedded tiny model, its cache, and loading the models users name."""

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from difflora import models
from difflora.errors import InvalidArgumentError, ModelLoadError
from difflora.models import (
    TINY_MODEL_VERSION,
    build_tiny_model,
    default_model_dir,
    ensure_default_model,
    load_pipeline,
    resolve_device,
    resolve_dtype,
)


def _folder_bytes(folder):
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


# ----- building -----------------------------------------------------------------------------------------------------


def test_building_twice_writes_identical_weights_and_leaves_global_rng_alone(tiny_model_dir, tmp_path):
    torch.manual_seed(1234)
    expected_next = torch.rand(1)
    torch.manual_seed(1234)
    again = build_tiny_model(tmp_path / "again")
    assert torch.equal(torch.rand(1), expected_next)  # the caller's random stream is untouched
    for weights in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                    "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt"):
        assert (tiny_model_dir / weights).read_bytes() == (again / weights).read_bytes(), weights
    assert _folder_bytes(tiny_model_dir) < 12 * 2**20
    marker = json.loads((tiny_model_dir / "difflora_tiny.json").read_text())
    assert marker["tiny_model_version"] == TINY_MODEL_VERSION
    assert not [p.name for p in tmp_path.iterdir() if p.name != "again"]  # no staging folder left behind


def test_a_different_seed_gives_different_weights(tiny_model_dir, tmp_path):
    other = build_tiny_model(tmp_path / "other", seed=1)
    name = "unet/diffusion_pytorch_model.safetensors"
    assert (tiny_model_dir / name).read_bytes() != (other / name).read_bytes()


def test_building_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(InvalidArgumentError, match="taken"):
        build_tiny_model(tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_a_crash_while_building_leaves_nothing(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        build_tiny_model(tmp_path / "tiny")
    assert list(tmp_path.iterdir()) == []


# ----- what was built -----------------------------------------------------------------------------------------------


def test_plain_diffusers_loads_and_runs_the_tiny_model(tiny_model_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet.config
    assert tuple(unet.block_out_channels) == (32, 64) and unet.cross_attention_dim == 32
    assert set(unet.down_block_types) == {"CrossAttnDownBlock2D"} and set(unet.up_block_types) == {"CrossAttnUpBlock2D"}
    assert unet.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.heads > 1
    assert pipe.vae_scale_factor == 4 and unet.sample_size * pipe.vae_scale_factor == 64
    assert pipe.safety_checker is None and pipe.scheduler.config.beta_schedule == "scaled_linear"

    generator = torch.Generator("cpu").manual_seed(0)
    image = pipe("a photo of a cat", num_inference_steps=2, generator=generator, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all() and image.std() > 0.01


def test_tokenizer_is_clip_like(tiny_pipeline):
    tokenizer = tiny_pipeline.tokenizer
    ids = tokenizer("a photo of a cat").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    padded = tokenizer("a photo of a cat", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert tokenizer.model_max_length == 77 and len(padded) == 77
    assert padded[len(ids):] == [tokenizer.pad_token_id] * (77 - len(ids))
    # Every word the merges were learned from is one token; anything else still encodes, byte by byte at worst.
    assert all(len(tokenizer(word).input_ids) == 3 for word in models._TOKENIZER_WORDS)
    assert tokenizer.unk_token_id not in tokenizer("Zebra™ 42 naïve")["input_ids"][1:-1]
    assert len(tokenizer) == tiny_pipeline.text_encoder.config.vocab_size


# ----- the cache ----------------------------------------------------------------------------------------------------


def test_default_model_dir_follows_the_environment(tmp_path, monkeypatch):
    folder = f"tiny-sd-v{TINY_MODEL_VERSION}"
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path / "mine"))
    assert default_model_dir() == tmp_path / "mine" / folder
    monkeypatch.delenv("DIFFLORA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model_dir() == tmp_path / "xdg" / "difflora" / folder
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model_dir() == tmp_path / "home" / ".cache" / "difflora" / folder


def test_the_embedded_model_is_built_once_and_rebuilt_when_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path / "cache"))
    built = ensure_default_model()
    assert built == default_model_dir() and (built / "model_index.json").is_file()
    marker = built / "difflora_tiny.json"
    stamp = marker.stat().st_mtime_ns
    assert ensure_default_model() == built and marker.stat().st_mtime_ns == stamp

    for name in (None, "", "embedded"):
        assert load_pipeline(name, quiet=True).unet.config.cross_attention_dim == 32
    assert marker.stat().st_mtime_ns == stamp

    marker.write_text('{"tiny_model_version": 0}')  # a cache from another difflora
    ensure_default_model()
    assert json.loads(marker.read_text())["tiny_model_version"] == TINY_MODEL_VERSION
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [built.name]  # nothing stale left beside it


def test_losing_the_build_race_uses_the_winners_copy(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path / "cache"))

    def another_process_wins(output_dir, seed=0):
        shutil.copytree(tiny_model_dir, output_dir)
        raise OSError(39, "Directory not empty")  # what our own rename onto the winner's folder raises

    monkeypatch.setattr(models, "build_tiny_model", another_process_wins)
    assert ensure_default_model() == default_model_dir()

    # A failure with no winner's copy in place is the caller's to see, not swallowed.
    shutil.rmtree(default_model_dir())

    def disk_full(output_dir, seed=0):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(models, "build_tiny_model", disk_full)
    with pytest.raises(OSError, match="No space left"):
        ensure_default_model()
    assert not default_model_dir().exists()


# ----- loading ------------------------------------------------------------------------------------------------------


def test_load_pipeline_applies_dtype_device_and_quiet_without_deprecation_warnings(tiny_model_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = load_pipeline(tiny_model_dir, device="cpu", dtype=torch.bfloat16, quiet=True)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.device == torch.device("cpu")
    assert pipe._progress_bar_config.get("disable") is True
    assert not [w for w in caught if "dtype" in str(w.message)], [str(w.message) for w in caught]
    assert not hasattr(load_pipeline(tiny_model_dir), "_progress_bar_config")  # progress bars stay on by default


@pytest.mark.parametrize(
    "make_model, message",
    [
        (lambda tmp: tmp / "missing-folder", "no such file or folder"),
        (lambda tmp: "./models/typo", "no such file or folder"),
        (lambda tmp: tmp / "missing.safetensors", "no such file or folder"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "no model_index.json"),
        (lambda tmp: (tmp / "model.ckpt").write_bytes(b"\x80\x02}.") and tmp / "model.ckpt", "pickle checkpoints"),
        (lambda tmp: (tmp / "model.bin").write_bytes(b"\x80\x02}.") and tmp / "model.bin", "to .safetensors"),
        (lambda tmp: (tmp / "bad.safetensors").write_bytes(b"garbage") and tmp / "bad.safetensors", "could not load"),
        (lambda tmp: "someone/no-such-model-anywhere", "could not load"),
    ],
    ids=["missing", "typo", "missing-file", "no-index", "ckpt", "bin", "broken", "hub-offline"],
)
def test_bad_models_give_one_line_errors_naming_them(make_model, message, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = make_model(tmp_path)
    with pytest.raises(ModelLoadError) as error:
        load_pipeline(model)
    text = str(error.value)
    assert "\n" not in text and str(model) in text and message in text, text


def test_library_failures_are_cut_to_one_line_and_chained(tiny_model_dir, monkeypatch):
    cause = ValueError("first line " + "x" * 500 + "\nTraceback (most recent call last):\n  more")

    def fail(*args, **kwargs):
        raise cause

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", fail)
    with pytest.raises(ModelLoadError) as error:
        load_pipeline(tiny_model_dir)
    text = str(error.value)
    assert "\n" not in text and str(tiny_model_dir) in text and "first line" in text and len(text) < 400
    assert error.value.__cause__ is cause


# ----- devices and dtypes -------------------------------------------------------------------------------------------


def test_dtype_names():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("fp32", "cpu") == resolve_dtype("float32", "cpu") == torch.float32
    assert resolve_dtype("FP16", "cpu") == resolve_dtype("float16", "cpu") == torch.float16
    assert resolve_dtype("bf16", "cpu") == resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(InvalidArgumentError, match=r"--dtype 'fp8' is not one of auto, fp32.*bfloat16"):
        resolve_dtype("fp8", "cpu")


def test_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available() and not models._mps_available():
        assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(InvalidArgumentError, match="'toaster'"):
        resolve_device("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidArgumentError, match="CUDA is not available"):
            resolve_device("cuda")
