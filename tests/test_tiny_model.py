"""The embedded tiny model: built reproducibly and atomically, cached once per version, loadable by plain diffusers."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from difflora import tiny_model
from difflora.errors import InvalidArgumentError
from difflora.pipelines import load_pipeline
from difflora.tiny_model import TINY_MODEL_VERSION, build_tiny_model, default_model_dir, ensure_default_model


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


def test_the_tokenizer_is_learned_the_same_in_every_process(tmp_path):
    # Hash randomisation differs per process; the learned merges (so every token id) must not.
    script = "from difflora.tiny_model import _tokenizer_files; import sys; sys.stdout.write(repr(_tokenizer_files()))"
    outputs = [
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120,
                       env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout
        for seed in (1, 2)
    ]
    assert outputs[0] == outputs[1] and "merges.txt" in outputs[0]


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
    assert all(len(tokenizer(word).input_ids) == 3 for word in tiny_model._TOKENIZER_WORDS)
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

    older = built.parent / "tiny-sd-v0"  # what an older difflora left in the cache
    shutil.copytree(built, older)
    marker.write_text('{"tiny_model_version": 0}')  # a cache from another difflora
    ensure_default_model()
    assert json.loads(marker.read_text())["tiny_model_version"] == TINY_MODEL_VERSION
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [built.name]  # nothing stale left beside it


def test_losing_the_build_race_uses_the_winners_copy(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path / "cache"))

    def another_process_wins(output_dir, seed=0):
        shutil.copytree(tiny_model_dir, output_dir)
        raise OSError(39, "Directory not empty")  # what our own rename onto the winner's folder raises

    monkeypatch.setattr(tiny_model, "build_tiny_model", another_process_wins)
    assert ensure_default_model() == default_model_dir()

    # A failure with no winner's copy in place is the caller's to see, not swallowed.
    shutil.rmtree(default_model_dir())

    def disk_full(output_dir, seed=0):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tiny_model, "build_tiny_model", disk_full)
    with pytest.raises(OSError, match="No space left"):
        ensure_default_model()
    assert not default_model_dir().exists()
