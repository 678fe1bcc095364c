"""The command line seen from outside: images on disk with their parameters, inspect, one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from difflora import LoRARuntime
from difflora.cli import main, parse_lora_spec
from difflora.errors import InvalidArgumentError
from difflora.pipelines import load_pipeline


@pytest.fixture(scope="module")
def adapter_file(tiny_model_dir, tmp_path_factory):
    pipe = load_pipeline(tiny_model_dir, quiet=True)
    runtime = LoRARuntime.attach(pipe)
    runtime.create_adapter("style", rank=4, alpha=2, components=("unet", "text_encoder"), init="random", seed=3)
    path = tmp_path_factory.mktemp("adapters") / "style.safetensors"
    return runtime.save("style", path, {"difflora.base_model": "embedded"})


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "difflora", *args], capture_output=True, text=True, timeout=300)


def test_generate_writes_png_with_parameters_and_matches_library(tiny_model_dir, adapter_file, tmp_path):
    out = tmp_path / "image.png"
    result = run_cli(
        "generate", "--model", str(tiny_model_dir), "--lora", f"{adapter_file}:0.8", "--prompt", "a castle",
        "--negative-prompt", "blurry", "--steps", "3", "--guidance", "6", "--seed", "11", "--out", str(out),
    )
    assert result.returncode == 0, result.stderr
    image = Image.open(out)
    assert image.size == (64, 64)
    parameters = image.text["parameters"]
    assert "a castle <lora:style:0.8>" in parameters and "Negative prompt: blurry" in parameters
    assert "Steps: 3" in parameters and "Seed: 11" in parameters
    recorded = json.loads(image.text["difflora"])
    assert recorded["adapters"][0]["weight"] == 0.8 and recorded["settings"]["guidance"] == 6.0

    # The same image from the Python API.
    from difflora.generate import GenerationSettings, generate

    pipe = load_pipeline(tiny_model_dir, quiet=True)
    LoRARuntime.attach(pipe).load(adapter_file, weight=0.8)
    settings = GenerationSettings("a castle", "blurry", steps=3, guidance=6.0, seed=11, width=64, height=64)
    expected = generate(pipe, settings)[0]
    assert list(image.convert("RGB").getdata()) == list(expected.getdata())


def test_generate_on_embedded_default_and_fused(tmp_path, adapter_file, capsys):
    common = ["generate", "--prompt", "x", "--steps", "2"]
    images = {}
    for name, extra in (("fused", ["--lora", str(adapter_file), "--fuse"]), ("unfused", ["--lora", str(adapter_file)]),
                        ("base", [])):
        out = tmp_path / f"{name}.png"
        assert main([*common, *extra, "--out", str(out)]) == 0
        images[name] = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    assert images["fused"].shape == (64, 64, 3)
    # Fusing bakes the same mix into the weights: the same image up to rounding, and the adapter's, not the base's.
    assert np.abs(images["fused"] - images["unfused"]).max() <= 1
    assert np.abs(images["fused"] - images["base"]).max() > 8


def test_inspect_names_format_ranks_alphas_modules(adapter_file, capsys):
    assert main(["inspect", str(adapter_file)]) == 0
    text = capsys.readouterr().out
    assert "format:     difflora" in text and "ranks:      4" in text and "alphas:     2" in text
    assert "unet: 56" in text and "text_encoder: 8" in text and "difflora.base_model: embedded" in text
    assert main(["inspect", "--json", str(adapter_file)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["modules_per_component"] == {"text_encoder": 8, "unet": 56}


def test_lora_spec_parsing(tmp_path):
    assert parse_lora_spec("a.safetensors:0.7").weight == 0.7
    assert parse_lora_spec("a.safetensors:-0.3").weight == -0.3
    assert parse_lora_spec("a.safetensors").weight == 1.0
    with pytest.raises(InvalidArgumentError, match="weight must be a number, got 'abc'"):
        parse_lora_spec("a.safetensors:abc")


def bad_inputs(tiny_model_dir, adapter_file, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(adapter_file.read_bytes()[:1000])
    misfit = tmp_path / "misfit.safetensors"
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{key}.lora_A.weight": torch.ones(4, 31), f"{key}.lora_B.weight": torch.ones(32, 4)}, str(misfit))
    unknown = tmp_path / "unknown.safetensors"
    save_file({"model.weight": torch.ones(3)}, str(unknown))
    pickle = tmp_path / "lora.ckpt"
    pickle.write_bytes(b"\x80\x02}q\x00.")
    model = ["--model", str(tiny_model_dir)]
    common = ["generate", *model, "--prompt", "p", "--steps", "2"]
    return [
        ([*common, "--lora", f"{adapter_file}:abc", "--out", "o.png"], "weight must be a number, got 'abc'"),
        ([*common, "--lora", str(tmp_path / "nope.safetensors"), "--out", "o.png"], "no such file"),
        ([*common, "--lora", str(pickle), "--out", "o.png"], "pickle files"),
        ([*common, "--lora", str(truncated), "--out", "o.png"], "not a readable safetensors"),
        ([*common, "--lora", str(unknown), "--out", "o.png"], "no LoRA keys"),
        ([*common, "--lora", str(misfit), "--out", "o.png"], "(4, 31)"),
        ([*common, "--steps", "0", "--out", "o.png"], "--steps must be a positive integer in [1, 1000], got 0"),
        ([*common, "--width", "-64", "--out", "o.png"],
         "--width must be a positive multiple of 8 in [8, 4096], got -64"),
        ([*common, "--out", "o.jpg"], "--out o.jpg: give a path ending in .png"),
        ([*common, "--block-weights", "sideways=1", "--out", "o.png"], "unknown block"),
        (["generate", "--model", str(tmp_path / "no-model"), "--prompt", "p", "--out", "o.png"], "no-model"),
        (["inspect", str(truncated)], "truncated.safetensors"),
    ]


def test_every_bad_input_is_one_line_and_exit_2(tiny_model_dir, adapter_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv, message in bad_inputs(tiny_model_dir, adapter_file, tmp_path):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, argv
        assert err.startswith("difflora: error: ") and err.count("\n") == 1, err
        assert message in err, (argv, err)
    assert not list(tmp_path.glob("o.*"))  # nothing half-written


def test_bad_input_from_the_real_command(tmp_path):
    result = run_cli("generate", "--prompt", "p", "--lora", "x.safetensors:abc", "--out", str(tmp_path / "o.png"))
    assert result.returncode == 2
    expected = "difflora: error: --lora x.safetensors:abc: weight must be a number, got 'abc'"
    assert result.stderr.strip().splitlines() == [expected]
    usage = run_cli("generate", "--steps", "many")
    assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1


def test_init_model_writes_a_loadable_folder(tiny_model_dir, tmp_path, capsys):
    assert main(["init-model", str(tmp_path / "tiny")]) == 0
    written = load_pipeline(tmp_path / "tiny", quiet=True)
    reference = load_pipeline(tiny_model_dir, quiet=True)  # the embedded model, seed 0
    for component in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(written, component).state_dict(), getattr(reference, component).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert written.tokenizer("a red fox").input_ids == reference.tokenizer("a red fox").input_ids
    assert main(["init-model", str(tmp_path / "tiny")]) == 2  # not over an existing model


def test_convert_to_kohya_and_back(adapter_file, tmp_path, capsys):
    kohya = tmp_path / "style-kohya.safetensors"
    assert main(["convert", str(adapter_file), "--to", "kohya", "--out", str(kohya)]) == 0
    capsys.readouterr()  # convert's own output
    assert main(["inspect", "--json", str(kohya)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "kohya" and summary["alphas"] == [2.0] and summary["metadata"]["ss_network_dim"] == "4"
    back = tmp_path / "back.safetensors"
    assert main(["convert", str(kohya), "--to", "difflora", "--out", str(back)]) == 0
    from difflora.formats import read_adapter

    original, returned = read_adapter(adapter_file), read_adapter(back)
    for key, module in original.modules.items():
        assert torch.equal(returned.modules[key].up, module.up) and returned.modules[key].alpha == module.alpha


def test_convert_strict_refuses_what_it_cannot_carry(adapter_file, tmp_path, capsys):
    from difflora.formats import read_adapter, to_kohya_state_dict

    tensors = to_kohya_state_dict(read_adapter(adapter_file))
    tensors["lora_unet_mid_block_resnets_0_norm1.diff"] = torch.ones(64)  # a norm's full diff: not applied
    save_file(tensors, str(tmp_path / "with-conv.safetensors"))
    out = tmp_path / "out.safetensors"
    with_conv = str(tmp_path / "with-conv.safetensors")
    assert main(["convert", with_conv, "--to", "difflora", "--out", str(out), "--strict"]) == 2
    assert "--strict" in capsys.readouterr().err and not out.exists()
    assert main(["convert", str(tmp_path / "with-conv.safetensors"), "--to", "difflora", "--out", str(out)]) == 0
    assert "not carried over: 1 key difflora cannot apply" in capsys.readouterr().err and out.exists()


def test_blend_scale_resize_commands(adapter_file, tmp_path, capsys):
    from difflora.formats import read_adapter

    blended = tmp_path / "blend.safetensors"
    svd = ["--method", "svd", "--rank", "2"]
    assert main(["blend", f"{adapter_file}:0.7", f"{adapter_file}:-0.3", *svd, "--out", str(blended)]) == 0
    err = capsys.readouterr().err
    assert "relative error per module" in err
    assert read_adapter(blended).ranks() == [2]
    scaled = tmp_path / "s.safetensors"
    assert main(["scale", str(adapter_file), "--weight", "0.5", "--block-weights", "up=0", "--out", str(scaled)]) == 0
    original, written = read_adapter(adapter_file), read_adapter(scaled)
    assert written.modules.keys() == original.modules.keys()
    for key, module in original.modules.items():
        expected = 0.0 if key.startswith("unet.up_blocks.") else 0.5  # --weight 0.5, and up=0 in the up blocks
        delta = written.modules[key].scale * written.modules[key].up @ written.modules[key].down
        torch.testing.assert_close(delta, expected * module.scale * module.up @ module.down, rtol=1e-5, atol=1e-7)
    resized = str(tmp_path / "r.safetensors")
    assert main(["resize", str(adapter_file), "--energy", "0.9", "--format", "kohya", "--out", resized]) == 0
    assert read_adapter(tmp_path / "r.safetensors").source_format == "kohya"
    assert main(["blend", f"{adapter_file}:x", "--out", str(tmp_path / "bad.safetensors")]) == 2
    assert main(["blend", str(adapter_file), "--method", "svd", "--out", str(tmp_path / "bad.safetensors")]) == 2
    assert "--rank is required by method 'svd'" in capsys.readouterr().err
    assert not (tmp_path / "bad.safetensors").exists()


def test_merge_writes_a_diffusers_folder_with_the_adapters_baked_in(tiny_model_dir, adapter_file, tmp_path):
    from diffusers import StableDiffusionPipeline

    from difflora.generate import GenerationSettings, generate

    out = tmp_path / "merged"
    two_adapters = ["--lora", f"{adapter_file}:0.7", "--lora", f"{adapter_file}:-0.2"]
    assert main(["merge", "--model", str(tiny_model_dir), *two_adapters, "--out", str(out)]) == 0
    merged = StableDiffusionPipeline.from_pretrained(out)
    merged.set_progress_bar_config(disable=True)
    assert not any("difflora" in key or "lora" in key for key in merged.unet.state_dict())
    settings = GenerationSettings("a castle", steps=3, seed=4, width=64, height=64)
    pipe = load_pipeline(tiny_model_dir, quiet=True)
    LoRARuntime.attach(pipe).load(adapter_file, weight=0.5)  # 0.7 − 0.2 of the same adapter
    expected = generate(pipe, settings, output_type="np")[0]
    assert abs(generate(merged, settings, output_type="np")[0] - expected).max() < 1e-5
    # not over a model
    assert main(["merge", "--model", str(tiny_model_dir), "--lora", str(adapter_file), "--out", str(out)]) == 2

    # The same merge as one single-file checkpoint, loaded back through diffusers' single-file loader.
    single = tmp_path / "merged.safetensors"
    assert main(["merge", "--model", str(tiny_model_dir), "--lora", f"{adapter_file}:0.5", "--out", str(single)]) == 0
    from_file = load_pipeline(single, model_config=tiny_model_dir, quiet=True)
    assert abs(generate(from_file, settings, output_type="np")[0] - expected).max() < 1e-5


def test_generate_lists_or_refuses_keys_it_cannot_apply(tiny_model_dir, adapter_file, tmp_path, capsys, caplog):
    from difflora.formats import read_adapter, to_kohya_state_dict

    tensors = to_kohya_state_dict(read_adapter(adapter_file))
    tensors["lora_unet_mid_block_resnets_0_norm1.diff"] = torch.ones(64)  # a norm's full diff: not applied
    conv = tmp_path / "conv.safetensors"
    save_file(tensors, str(conv))
    common = ["generate", "--model", str(tiny_model_dir), "--lora", str(conv), "--prompt", "p", "--steps", "1"]
    assert main([*common, "--strict", "--out", str(tmp_path / "strict.png")]) == 2
    expected = "refused (strict): 1 key difflora cannot apply: norm diff ×1 (lora_unet_mid_block_resnets_0_norm1.diff)"
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "strict.png").exists()
    assert main([*common, "--out", str(tmp_path / "ok.png")]) == 0
    # a warning on stderr outside pytest
    assert f"not loaded: {expected.removeprefix('refused (strict): ')}" in caplog.text


def test_corrupted_or_mismatched_inputs_write_nothing(adapter_file, tmp_path, capsys):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(adapter_file.read_bytes()[:500])
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    other = tmp_path / "other-model.safetensors"
    save_file({f"{key}.lora_A.weight": torch.ones(2, 48), f"{key}.lora_B.weight": torch.ones(48, 2)}, str(other))
    cases = [
        (["convert", str(truncated), "--to", "kohya"], "not a readable safetensors"),
        (["convert", str(truncated), "--to", "peft"], "not a readable safetensors"),
        (["blend", str(adapter_file), str(truncated)], "not a readable safetensors"),
        (["blend", str(adapter_file), str(other)], "disagree on the shape"),
        (["scale", str(truncated), "--weight", "2"], "not a readable safetensors"),
        (["resize", str(adapter_file), "--rank", "0"], "--rank must be a positive integer"),
    ]
    for index, (argv, message) in enumerate(cases):
        out = tmp_path / (f"out{index}" if "peft" in argv else f"out{index}.safetensors")
        assert main([*argv, "--out", str(out)]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-model.safetensors", "truncated.safetensors"]


def test_error_lines_name_flags_but_leave_paths_and_keys_alone():
    from difflora._entry import error_line
    from difflora.errors import DiffloraError

    flags = {"--rank", "--train-unet", "--train-text-encoder", "--block-weights"}
    error = DiffloraError("train_text_encoder must be on when train_unet is off", "train_text_encoder")
    assert error_line(error, flags) == "difflora: error: --train-text-encoder must be on when --train-unet is off"
    where = "/tmp/block_weights/x.safetensors: module 'unet.block_weights.to_q'"
    error = DiffloraError(f"{where} holds NaN (block_weights).")
    assert error_line(error, flags) == f"difflora: error: {where} holds NaN (--block-weights)."
    assert error_line(DiffloraError("rank must be > 0", "rank"), flags) == "difflora: error: --rank must be > 0"
    assert error_line(DiffloraError("rank must be > 0", "rank"), ()) == "difflora: error: rank must be > 0"
