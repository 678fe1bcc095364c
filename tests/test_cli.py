"""The command line seen from outside: images on disk with their parameters, inspect, one-line errors."""

import contextlib
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


# ----- every kind through convert, blend, merge; extract's flags ------------------------------------------------------

TO_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV1 = "unet.down_blocks.0.resnets.0.conv1"
TIME_EMB = "unet.down_blocks.0.resnets.0.time_emb_proj"


def lycoris_mix_file(pipe, folder):
    """A file as LyCORIS and kohya write them, under kohya's names: a LoRA on an attention projection
    (``lora_down``/``lora_up``/``alpha``), a LoHa on a 3×3 conv held as a matrix out × in·9 (``hada_*``, LyCORIS'
    non-Tucker conv layout) and a LoKr on a Linear (``lokr_w1`` whole, ``lokr_w2_a``/``_b``)."""
    generator = torch.Generator().manual_seed(21)

    def draw(*size):
        return torch.randn(*size, generator=generator) * 0.2

    layers = dict(pipe.unet.named_modules())
    q_out, q_in = layers[TO_Q.removeprefix("unet.")].weight.shape
    c_out, c_in = layers[CONV1.removeprefix("unet.")].weight.shape[:2]
    t_out, t_in = layers[TIME_EMB.removeprefix("unet.")].weight.shape
    name = {key: "lora_unet_" + key.removeprefix("unet.").replace(".", "_") for key in (TO_Q, CONV1, TIME_EMB)}
    tensors = {
        f"{name[TO_Q]}.lora_down.weight": draw(4, q_in), f"{name[TO_Q]}.lora_up.weight": draw(q_out, 4),
        f"{name[TO_Q]}.alpha": torch.tensor(2.0),
        f"{name[CONV1]}.hada_w1_a": draw(c_out, 2), f"{name[CONV1]}.hada_w1_b": draw(2, c_in * 9),
        f"{name[CONV1]}.hada_w2_a": draw(c_out, 2), f"{name[CONV1]}.hada_w2_b": draw(2, c_in * 9),
        f"{name[CONV1]}.alpha": torch.tensor(2.0),
        f"{name[TIME_EMB]}.lokr_w1": draw(2, 2), f"{name[TIME_EMB]}.lokr_w2_a": draw(t_out // 2, 2),
        f"{name[TIME_EMB]}.lokr_w2_b": draw(2, t_in // 2), f"{name[TIME_EMB]}.alpha": torch.tensor(1.0),
    }
    path = folder / "mix.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_module": "lycoris.kohya",
                                            "ss_network_args": '{"algo": "loha"}'})
    return path


def unet_output(pipe):
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([500]), context).sample


def test_convert_to_diffusers_writes_lora_as_it_is_and_the_rest_as_lora_at_rank(tiny_model_dir, tmp_path, capsys):
    from difflora.formats import read_adapter

    source = lycoris_mix_file(load_pipeline(tiny_model_dir, quiet=True), tmp_path)
    original = read_adapter(source)
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(source), "--to", "diffusers", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"difflora: error: --rank is required: module {CONV1!r} is loha, which a diffusers file holds only as LoRA "
        "by SVD at that rank (a positive integer), got None\n")
    for bad, message in ((["--rank", "0"], "--rank must be a positive integer"),
                         (["--rank", "4", "--to", "kohya"], "--rank must be a positive integer, for --to diffusers")):
        argv = ["convert", str(source), "--to", "diffusers", *bad, "--out", str(out)]
        assert main(argv) == 2 and message in capsys.readouterr().err
    assert not out.exists()

    assert main(["convert", str(source), "--to", "diffusers", "--rank", "288", "--out", str(out)]) == 0
    assert "turned into LoRA by SVD at rank 288: 2 modules, relative error per module" in capsys.readouterr().err
    converted = read_adapter(out)
    assert set(converted.modules) == set(original.modules)
    assert torch.equal(converted.modules[TO_Q].up, original.modules[TO_Q].up)  # LoRA: as it is
    conv = converted.modules[CONV1]  # a conv LoRA: 3×3 down, 1×1 up
    assert conv.kind == "lora" and conv.down.shape[2:] == (3, 3) and conv.up.shape[2:] == (1, 1)
    for key in (CONV1, TIME_EMB):  # at full rank, the same update
        expected = original.modules[key].delta_weight().flatten(1)
        assert float((converted.modules[key].delta_weight().flatten(1) - expected).norm() / expected.norm()) < 1e-5

    ours, theirs = load_pipeline(tiny_model_dir, quiet=True), load_pipeline(tiny_model_dir, quiet=True)
    LoRARuntime.attach(ours).load(out, weight=0.8)
    LoRARuntime.attach(theirs).load(source, weight=0.8)
    plain = load_pipeline(tiny_model_dir, quiet=True)
    plain.load_lora_weights(str(out))  # diffusers itself applies every module of the converted file
    plain.set_adapters(plain.get_active_adapters(), [0.8])
    expected, before = unet_output(theirs), unet_output(load_pipeline(tiny_model_dir, quiet=True))
    effect = float((expected - before).abs().max())
    assert effect > 1e-3
    for pipe in (ours, plain):
        assert float((unet_output(pipe) - expected).abs().max()) <= 1e-5 * max(1.0, effect)

    low = tmp_path / "low"
    assert main(["convert", str(source), "--to", "peft", "--rank", "1", "--out", str(low)]) == 0
    assert "at rank 1" in capsys.readouterr().err and (low / "unet" / "adapter_config.json").exists()


def test_blend_of_a_lycoris_file_and_a_lora_and_merge_of_every_kind(tiny_model_dir, adapter_file, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    from difflora.formats import read_adapter

    source = lycoris_mix_file(load_pipeline(tiny_model_dir, quiet=True), tmp_path)
    blended = tmp_path / "blend.safetensors"
    assert main(["blend", f"{source}:0.6", f"{adapter_file}:-0.4", "--rank", "288", "--out", str(blended)]) == 0
    assert "relative error per module" in capsys.readouterr().err
    mix, lora, result = read_adapter(source), read_adapter(adapter_file), read_adapter(blended)
    for key in set(mix.modules) | set(lora.modules):
        expected = sum(weight * state.modules[key].delta_weight().flatten(1)
                       for state, weight in ((mix, 0.6), (lora, -0.4)) if key in state.modules)
        got = result.modules[key].delta_weight().flatten(1)
        assert float((got - expected).norm() / expected.norm()) < 1e-5, key

    # merge bakes LoRA, LoHa and LoKr into the weights: the saved model equals the runtime with the file.
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_model_dir), "--lora", f"{source}:0.7", "--out", str(out)]) == 0
    merged = StableDiffusionPipeline.from_pretrained(out)
    reference = load_pipeline(tiny_model_dir, quiet=True)
    LoRARuntime.attach(reference).load(source, weight=0.7)
    expected, before = unet_output(reference), unet_output(load_pipeline(tiny_model_dir, quiet=True))
    effect = float((expected - before).abs().max())
    assert effect > 1e-3 and float((unet_output(merged) - expected).abs().max()) <= 1e-5 * max(1.0, effect)


def test_extract_refuses_bad_flags_in_one_line_before_loading_models(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    common = ["extract", "--base", str(tiny_model_dir), "--tuned", str(tiny_model_dir)]
    cases = [
        ([*common, "--rank", "0", "--out", str(out)], "difflora: error: --rank must be a positive integer, got 0"),
        ([*common, "--rank", "2", "--conv-rank", "-3", "--out", str(out)],
         "difflora: error: --conv-rank must be a positive integer, got -3"),
        ([*common, "--rank", "2", "--out", str(tmp_path / "x.bin")], "difflora: error: --out"),
        ([*common, "--rank", "2", "--out", str(out)],
         "difflora: error: --tuned: no Linear or Conv2d weight differs from the base model's; nothing to extract"),
        (["extract", "--base", str(tiny_model_dir), "--tuned", str(tmp_path / "nowhere"), "--rank", "2", "--out",
          str(out)], "nowhere"),
        (["extract", "--base", str(tiny_model_dir), "--rank", "2"], "the following arguments are required: --tuned"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) if "--tuned" not in argv else contextlib.nullcontext():
            assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)
    assert list(tmp_path.iterdir()) == []


def test_blend_takes_dora_with_the_base_model_and_refuses_it_without(tiny_model_dir, adapter_file, tmp_path, capsys):
    """A DoRA file as LyCORIS writes it (``dora_scale`` out × 1 beside ``lora_down``/``lora_up``): its change
    depends on the base weights, so blend needs --model; with it, the blend at weight w is the DoRA at w."""
    pipe = load_pipeline(tiny_model_dir, quiet=True)
    weight = dict(pipe.unet.named_modules())[TO_Q.removeprefix("unet.")].weight.detach()
    generator = torch.Generator().manual_seed(5)
    name = "lora_unet_" + TO_Q.removeprefix("unet.").replace(".", "_")
    tensors = {f"{name}.lora_down.weight": torch.randn(2, weight.shape[1], generator=generator) * 0.3,
               f"{name}.lora_up.weight": torch.randn(weight.shape[0], 2, generator=generator) * 0.3,
               f"{name}.alpha": torch.tensor(2.0),
               f"{name}.dora_scale": weight.norm(dim=1, keepdim=True) * (1.5 + torch.rand(weight.shape[0], 1))}
    dora = tmp_path / "dora.safetensors"
    save_file(tensors, str(dora), metadata={"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": '
                                            '"lora", "dora_wd": true, "wd_on_output": true}'})
    out = tmp_path / "blend.safetensors"
    assert main(["blend", f"{dora}:0.7", "--method", "svd", "--rank", "32", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"difflora: error: {dora}: module {TO_Q!r} is lora with DoRA, whose change depends on the base model's "
        "weights: give that model with --model (or use the file as it is: generate, merge)\n")
    assert not out.exists()
    argv = ["blend", f"{dora}:0.7", f"{adapter_file}:0.0", "--rank", "32", "--model", str(tiny_model_dir)]
    assert main([*argv, "--out", str(out)]) == 0
    ours, theirs = load_pipeline(tiny_model_dir, quiet=True), load_pipeline(tiny_model_dir, quiet=True)
    LoRARuntime.attach(ours).load(out)
    LoRARuntime.attach(theirs).load(dora, weight=0.7)
    expected, before = unet_output(theirs), unet_output(pipe)
    effect = float((expected - before).abs().max())
    assert effect > 1e-3 and float((unet_output(ours) - expected).abs().max()) <= 1e-5 * max(1.0, effect)
