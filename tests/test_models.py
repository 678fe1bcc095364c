"""The embedded tiny model and loading the models users name."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from difflora.errors import InvalidArgumentError, ModelLoadError
from difflora.models import build_tiny_model, default_model_dir, ensure_default_model, load_pipeline, resolve_dtype


def test_tiny_model_is_deterministic_and_small(tiny_model_dir, tmp_path):
    again = build_tiny_model(tmp_path / "again")
    for part in ("unet", "vae", "text_encoder"):
        (first,) = (tiny_model_dir / part).glob("*.safetensors")
        (second,) = (again / part).glob("*.safetensors")
        assert first.read_bytes() == second.read_bytes(), part
    size = sum(p.stat().st_size for p in tiny_model_dir.rglob("*") if p.is_file())
    assert size < 20 * 2**20


def test_plain_diffusers_loads_and_runs_the_tiny_model(tiny_model_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    config = pipe.unet.config
    assert config.cross_attention_dim == 32 and tuple(config.block_out_channels) == (32, 64)
    assert "CrossAttnDownBlock2D" in config.down_block_types and "CrossAttnUpBlock2D" in config.up_block_types
    image = pipe("a photo of a cat", num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all() and image.std() > 0.01


def test_tokenizer_is_clip_like(tiny_model_dir):
    pipe = load_pipeline(tiny_model_dir, quiet=True)
    tokenizer = pipe.tokenizer
    ids = tokenizer("a photo of a cat").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert len(ids) == 7  # bos, five words learned as whole tokens, eos
    padded = tokenizer("a photo of a cat", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(padded) == 77
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]


def test_default_model_is_cached_once(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path / "cache"))
    assert default_model_dir().parent == tmp_path / "cache"
    built = ensure_default_model()
    marker = built / "difflora_tiny.json"
    stamp = marker.stat().st_mtime_ns
    assert ensure_default_model() == built and marker.stat().st_mtime_ns == stamp
    pipe = load_pipeline(None, quiet=True)
    assert pipe.unet.config.block_out_channels == (32, 64) or list(pipe.unet.config.block_out_channels) == [32, 64]
    # An old or broken cache is rebuilt.
    marker.write_text('{"tiny_model_version": 0}')
    ensure_default_model()
    assert '"tiny_model_version": 1' in marker.read_text()


def test_bad_models_give_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty").mkdir()
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x02")
    (tmp_path / "broken.safetensors").write_bytes(b"garbage")
    cases = [
        (tmp_path / "missing-folder", "no such file or folder"),
        (tmp_path / "empty", "no model_index.json"),
        (tmp_path / "model.ckpt", "pickle checkpoints are refused"),
        (tmp_path / "broken.safetensors", "could not load"),
        ("someone/no-such-model-anywhere", "could not load"),
    ]
    for model, message in cases:
        with pytest.raises(ModelLoadError) as error:
            load_pipeline(model)
        text = str(error.value)
        assert message in text and str(model) in text and "\n" not in text, text


def test_dtype_names():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype("fp16") == torch.float16
    with pytest.raises(InvalidArgumentError, match="--dtype 'fp8'"):
        resolve_dtype("fp8")
