"""The formats package picks a dialect in one place: a new dialect is one module plus one entry in
``formats.READERS`` / ``formats.WRITERS``; diffusers' spellings, old and new, may share one file."""

import json
import types

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import difflora.formats as formats
from difflora.adapter import AdapterState, LoRAModuleWeights

KEY = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"


def one_module_adapter() -> AdapterState:
    return AdapterState(modules={KEY: LoRAModuleWeights(torch.ones(2, 4), torch.full((4, 2), 0.5), alpha=4.0)})


def toy_dialect() -> types.SimpleNamespace:
    """A dialect as a module would be: ``claims``, ``read_state_dict`` and ``file_contents``."""

    def read_state_dict(tensors, header, source):
        modules = {KEY: LoRAModuleWeights(tensors["toy.down"], tensors["toy.up"], alpha=float(header["toy.alpha"]))}
        return AdapterState(modules=modules, source_format="toy")

    def file_contents(state, title):
        weights = state.modules[KEY]
        return {"toy.down": weights.down, "toy.up": weights.up}, {"toy.alpha": str(weights.alpha), "toy.title": title}

    return types.SimpleNamespace(
        claims=lambda keys: any(key.startswith("toy.") for key in keys),
        read_state_dict=read_state_dict,
        file_contents=file_contents,
    )


def test_a_new_dialect_is_one_entry_where_formats_are_picked(tmp_path, monkeypatch):
    toy = toy_dialect()
    monkeypatch.setattr(formats, "READERS", (toy, *formats.READERS))
    monkeypatch.setitem(formats.WRITERS, "toy", toy)
    path = formats.write_adapter(one_module_adapter(), tmp_path / "mine.safetensors", layout="toy")
    with safe_open(str(path), "pt") as handle:
        assert sorted(handle.keys()) == ["toy.down", "toy.up"]
        header = handle.metadata()
    assert header["toy.title"] == "mine" and header["difflora.ranks"] == "[2]"  # difflora's keys in every layout
    again = formats.read_adapter(path)
    assert again.source_format == "toy" and again.modules[KEY].alpha == 4.0
    assert torch.equal(again.modules[KEY].up, torch.full((4, 2), 0.5))
    # The dialects already there still read what they read.
    kohya = formats.write_adapter(one_module_adapter(), tmp_path / "kohya.safetensors", layout="kohya")
    assert formats.read_adapter(kohya).source_format == "kohya"


def test_diffusers_old_and_new_spellings_mix_in_one_file(tmp_path):
    """diffusers 0.21 wrote ``.lora.down`` UNet keys beside ``lora_linear_layer`` text-encoder keys; the commonest
    spelling names the format."""
    text_key = "text_encoder.encoder.layers.0.self_attn.k_proj"
    value_key, peft_key = KEY.replace("to_q", "to_v"), KEY.replace("to_q", "to_k")
    generator = torch.Generator().manual_seed(0)
    down, up, text_down, text_up = (torch.randn(shape, generator=generator) for shape in [(2, 4), (4, 2)] * 2)
    tensors = {
        f"{KEY}.lora.down.weight": down,
        f"{KEY}.lora.up.weight": up,
        f"{KEY}.alpha": torch.tensor(1.0),
        f"{value_key}.lora.down.weight": down.clone(),
        f"{value_key}.lora.up.weight": up.clone(),
        "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_linear_layer.down.weight": text_down,
        "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_linear_layer.up.weight": text_up,
        f"{peft_key}.lora_A.weight": down.clone(),
        f"{peft_key}.lora_B.weight": up.clone(),
    }
    save_file(tensors, str(tmp_path / "mixed.safetensors"))
    state = formats.read_adapter(tmp_path / "mixed.safetensors")
    assert set(state.modules) == {KEY, value_key, peft_key, text_key} and not state.skipped
    assert torch.equal(state.modules[KEY].down, down) and torch.equal(state.modules[text_key].up, text_up)
    assert state.modules[KEY].alpha == 1.0 and state.modules[text_key].alpha == 2.0  # its alpha key, else the rank
    assert state.source_format == "diffusers-old"


# ----- SimpleTuner's LyCORIS files ---------------------------------------------------------------------------------

def lycoris_config_header(**extra) -> dict[str, str]:
    """The header SimpleTuner's save hook writes beside LyCORIS' weights: its lycoris_config and modelspec keys."""
    config = {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 16,
              "apply_preset": {"target_module": ["Attention", "FeedForward"]}, **extra}
    return {"lycoris_config": json.dumps(config), "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": "stable-diffusion-v1/lora"}


def test_simpletuner_lycoris_files_name_the_unets_layers_in_diffusers_layout():
    """LyCORIS' wrapper, as SimpleTuner creates it on the UNet, names each module ``lycoris_<its flattened diffusers
    path>``; a LoKr there keeps both sides whole (linear_dim above the layer's size) and LoCon convs are 4-D."""
    generator = torch.Generator().manual_seed(3)
    attention = "lycoris_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    conv = "lycoris_mid_block_resnets_0_conv1"
    tensors = {
        f"{attention}.lokr_w1": torch.randn(4, 4, generator=generator),
        f"{attention}.lokr_w2": torch.randn(80, 80, generator=generator),
        f"{attention}.alpha": torch.tensor(10000.0),
        f"{conv}.lora_down.weight": torch.randn(4, 1280, 3, 3, generator=generator),
        f"{conv}.lora_up.weight": torch.randn(1280, 4, 1, 1, generator=generator),
        f"{conv}.alpha": torch.tensor(1.0),
        "lycoris_input_blocks_1_1_proj_in.lora_down.weight": torch.ones(4, 320),  # the original layout: no
        "lycoris_input_blocks_1_1_proj_in.lora_up.weight": torch.ones(320, 4),  # LyCORIS name of these models
    }
    state = formats.parse_state_dict({key: value.to(torch.bfloat16) for key, value in tensors.items()},
                                     lycoris_config_header(), "pytorch_lora_weights.safetensors")
    assert sorted(state.modules) == ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                                     "unet.mid_block.resnets.0.conv1"]
    lokr = state.modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert lokr.kind == "lokr" and lokr.scale == 1.0  # both sides whole: alpha does not scale
    assert state.modules["unet.mid_block.resnets.0.conv1"].scale == 1.0 / 4
    assert state.skipped_summary() == ("2 keys difflora cannot apply: unknown layer ×2 "
                                       "(lycoris_input_blocks_1_1_proj_in.lora_down.weight, …)")
    assert json.loads(state.metadata["lycoris_config"])["algo"] == "lokr"


@pytest.mark.parametrize("wd_on_output", [True, False])
def test_doras_axis_comes_from_simpletuners_lycoris_config_when_the_magnitude_does_not_tell(wd_on_output):
    name = "lycoris_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = {f"{name}.lora_down.weight": torch.ones(2, 8), f"{name}.lora_up.weight": torch.ones(8, 2),
               f"{name}.dora_scale": torch.ones(8)}  # one value per row and per column: the shape cannot tell
    state = formats.parse_state_dict(tensors, lycoris_config_header(algo="lora", wd_on_output=wd_on_output), "x")
    assert state.modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"].wd_on_output is wd_on_output


# ----- what cannot be applied, named in one line -------------------------------------------------------------------

def test_skipped_keys_are_named_by_algorithm_in_one_line_with_their_count_and_first_key():
    skipped = [
        "lora_unet_down_blocks_0_attentions_0_proj_in.oft_blocks",  # LyCORIS (B)OFT, its alpha with it
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha",
        "lora_unet_up_blocks_0_resnets_0_conv1.oft_diag",
        "lora_unet_mid_block_resnets_0_norm1.w_norm",  # LyCORIS' norm diffs
        "lora_unet_mid_block_resnets_0_norm1.b_norm",
        "diffusion_model.out.0.diff",  # ComfyUI's trainer: a norm's diff, a bias diff
        "diffusion_model.input_blocks.1.1.proj_in.diff_b",
        "lora_unet_no_such_block_0_conv1.lora_down.weight",  # a LoRA of no known layer
        "lora_unet_no_such_block_0_conv1.lora_up.weight",
        "lora_unet_mid_block_resnets_0_conv2.lora_down.weight",  # two algorithms on one layer
        "lora_unet_mid_block_resnets_0_conv2.hada_w1_a",
        "unet.mid_block.attentions.0.proj_in.lora_magnitude_vector",
    ]
    summary = AdapterState(modules={}, skipped=skipped).skipped_summary(limit=10)
    assert summary == (
        "12 keys difflora cannot apply: oft ×3 (lora_unet_down_blocks_0_attentions_0_proj_in.oft_blocks, …), "
        "norm diff ×3 (lora_unet_mid_block_resnets_0_norm1.w_norm, …), "
        "bias diff ×1 (diffusion_model.input_blocks.1.1.proj_in.diff_b), "
        "unknown layer ×2 (lora_unet_no_such_block_0_conv1.lora_down.weight, …), "
        "mixed algorithms ×2 (lora_unet_mid_block_resnets_0_conv2.lora_down.weight, …), "
        "dora magnitude ×1 (unet.mid_block.attentions.0.proj_in.lora_magnitude_vector)"
    )
    assert AdapterState(modules={}, skipped=skipped).skipped_summary(limit=2).endswith(
        "norm diff ×3 (lora_unet_mid_block_resnets_0_norm1.w_norm, …), 4 more kinds")


def test_convert_names_what_a_comfyui_file_cannot_carry_and_strict_refuses_it(tmp_path, capsys):
    from difflora.cli import main

    name = "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_v"
    tensors = {f"{name}.lora_up.weight": torch.ones(64, 2), f"{name}.lora_down.weight": torch.ones(2, 64),
               "diffusion_model.middle_block.1.norm.w_norm": torch.ones(64),
               "diffusion_model.middle_block.1.norm.b_norm": torch.ones(64)}
    source = tmp_path / "comfy.safetensors"
    save_file(tensors, str(source))
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(source), "--to", "kohya", "--out", str(out), "--strict"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("difflora: error: --strict") and str(source) in error and error.count("\n") == 1
    assert "norm diff ×2 (diffusion_model.middle_block.1.norm.b_norm, …)" in error and not out.exists()  # file order
    assert main(["convert", str(source), "--to", "kohya", "--out", str(out)]) == 0
    assert "not carried over: 2 keys difflora cannot apply: norm diff ×2" in capsys.readouterr().err
    assert list(formats.read_adapter(out).modules) == ["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_v"]


@pytest.mark.parametrize("dora", [False, True])
def test_simpletuners_peft_output_is_the_diffusers_dialect_and_applies_as_peft_does(tiny_model_dir, tmp_path, dora):
    """SimpleTuner's LoRA (not LyCORIS) save hook: ``save_lora_weights`` with the UNet's PEFT state dict as it is, the
    text encoder's through ``convert_state_dict_to_diffusers``, and ``_collate_lora_metadata``'s configs."""
    from diffusers.training_utils import _collate_lora_metadata
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from difflora import LoRARuntime
    from difflora.pipelines import load_pipeline

    peft_pipe = load_pipeline(tiny_model_dir, quiet=True)
    torch.manual_seed(0)
    peft_pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", use_dora=dora,
                                          target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"]))
    peft_pipe.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", use_dora=dora,
                                                  target_modules=["q_proj", "v_proj", "fc1"]))
    with torch.no_grad():  # PEFT starts B at zero and the magnitude at the weight's norm: a change that shows
        for model in (peft_pipe.unet, peft_pipe.text_encoder):
            for name, parameter in model.named_parameters():
                if "lora_B" in name or "lora_magnitude_vector" in name:
                    parameter.mul_(1.2).add_(torch.randn_like(parameter) * 0.1)
    layers = {"unet_lora_layers": get_peft_model_state_dict(peft_pipe.unet),
              "text_encoder_lora_layers": convert_state_dict_to_diffusers(
                  get_peft_model_state_dict(peft_pipe.text_encoder))}
    metadata = _collate_lora_metadata({"unet": peft_pipe.unet, "text_encoder": peft_pipe.text_encoder})
    type(peft_pipe).save_lora_weights(tmp_path, **layers, **metadata)

    state = formats.read_adapter(tmp_path)
    assert state.source_format == "diffusers" and not state.skipped
    assert state.kinds() == (["lora+dora"] if dora else ["lora"])
    pipe = load_pipeline(tiny_model_dir, quiet=True)
    LoRARuntime.attach(pipe).add_adapter("simpletuner", state)
    generator = torch.Generator().manual_seed(1)
    latents, tokens = torch.randn(1, 4, 16, 16, generator=generator), torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        context = peft_pipe.text_encoder(tokens)[0]
        ours_context = pipe.text_encoder(tokens)[0]
        theirs = peft_pipe.unet(latents, torch.tensor([500]), context).sample
        ours = pipe.unet(latents, torch.tensor([500]), ours_context).sample
        base = load_pipeline(tiny_model_dir, quiet=True).unet(latents, torch.tensor([500]), context).sample
    effect = float((theirs - base).abs().max())
    assert effect > 1e-3 and float((ours - theirs).abs().max()) <= 1e-5 * max(1.0, effect)
    torch.testing.assert_close(ours_context, context, rtol=1e-5, atol=1e-5)
