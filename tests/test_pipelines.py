"""Loading the models users name: folders, single files, hub ids, the embedded default; devices and dtypes."""

import warnings

import pytest
import torch
from diffusers import StableDiffusionPipeline

from difflora import pipelines
from difflora.errors import InvalidArgumentError, ModelLoadError
from difflora.pipelines import load_pipeline, resolve_device, resolve_dtype


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
    with pytest.raises(InvalidArgumentError, match=r"dtype 'fp8' is not one of auto, fp32.*bfloat16"):
        resolve_dtype("fp8", "cpu")


def test_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available() and not pipelines._mps_available():
        assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(InvalidArgumentError, match="'toaster'"):
        resolve_device("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidArgumentError, match="CUDA is not available"):
            resolve_device("cuda")
