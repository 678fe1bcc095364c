"""ComfyUI's own names (``diffusion_model.<original layout>``, ``text_encoders.clip_l|clip_h|clip_g.transformer.…``)
in every LoRA spelling its loader reads, and files as ComfyUI's trainer and extraction node save them: read to the
layers they name, applied exactly, and what cannot be applied named by algorithm in one line."""

import logging

import pytest
import torch
from safetensors.torch import save_file

from difflora import LoRARuntime
from difflora.errors import DiffloraError
from difflora.formats import parse_state_dict, read_adapter
from difflora.pipelines import load_pipeline

NAMES = {  # ComfyUI's name → the layer it is, in diffusers' names (SD 1.x and SDXL: two layers per block)
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q":
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "diffusion_model.input_blocks.5.1.transformer_blocks.0.attn2.to_out.0":
        "unet.down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_out.0",
    "diffusion_model.input_blocks.2.1.transformer_blocks.0.ff.net.0.proj":
        "unet.down_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj",
    "diffusion_model.input_blocks.1.1.proj_in": "unet.down_blocks.0.attentions.0.proj_in",
    "diffusion_model.input_blocks.4.0.in_layers.2": "unet.down_blocks.1.resnets.0.conv1",
    "diffusion_model.input_blocks.4.0.skip_connection": "unet.down_blocks.1.resnets.0.conv_shortcut",
    "diffusion_model.input_blocks.3.0.op": "unet.down_blocks.0.downsamplers.0.conv",
    "diffusion_model.middle_block.0.emb_layers.1": "unet.mid_block.resnets.0.time_emb_proj",
    "diffusion_model.middle_block.1.proj_out": "unet.mid_block.attentions.0.proj_out",
    "diffusion_model.middle_block.2.out_layers.3": "unet.mid_block.resnets.1.conv2",
    "diffusion_model.output_blocks.2.1.conv": "unet.up_blocks.0.upsamplers.0.conv",  # SD 1.x: no attention there
    "diffusion_model.output_blocks.5.2.conv": "unet.up_blocks.1.upsamplers.0.conv",
    "diffusion_model.output_blocks.11.1.transformer_blocks.0.attn1.to_k":
        "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_k",
    "diffusion_model.input_blocks.0.0": "unet.conv_in",
    "diffusion_model.out.2": "unet.conv_out",
    "diffusion_model.time_embed.2": "unet.time_embedding.linear_2",
    "diffusion_model.label_emb.0.0": "unet.add_embedding.linear_1",
    "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj":
        "text_encoder.encoder.layers.0.self_attn.q_proj",
    "text_encoders.clip_h.transformer.text_model.encoder.layers.22.mlp.fc2": "text_encoder.encoder.layers.22.mlp.fc2",
    "text_encoders.clip_g.transformer.text_model.encoder.layers.31.self_attn.out_proj":
        "text_encoder_2.encoder.layers.31.self_attn.out_proj",
    "text_encoders.clip_g.transformer.text_projection": "text_encoder_2.text_projection",
}
NO_LAYER = [
    "diffusion_model.out.0",  # the last GroupNorm
    "diffusion_model.input_blocks.1.1.norm",
    "diffusion_model.input_blocks.2.0.op",  # a resnet's slot holds no downsampler
    "text_encoders.clip_l.transformer.text_model.final_layer_norm",
    "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q",
]


def lora(rank, out_features, in_features, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rank, in_features, generator=generator), torch.randn(out_features, rank, generator=generator)


def test_comfyui_names_read_back_to_the_layers_they_name_and_names_of_no_layer_are_skipped():
    tensors = {}
    for index, name in enumerate([*NAMES, *NO_LAYER]):
        down, up = lora(2, 4, 4, index)
        tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up})
    state = parse_state_dict(tensors, {}, "names.safetensors")
    assert state.source_format == "comfyui"
    assert sorted(state.modules) == sorted(NAMES.values())
    for index, (name, module_key) in enumerate(NAMES.items()):
        assert torch.equal(state.modules[module_key].down, tensors[f"{name}.lora_down.weight"])
    assert sorted(state.skipped) == sorted(f"{name}.{factor}" for name in NO_LAYER
                                           for factor in ("lora_down.weight", "lora_up.weight"))
    assert state.skipped_summary().startswith("10 keys difflora cannot apply: unknown layer ×10 (")


# Every LoRA spelling ComfyUI's LoRAAdapter.load reads after a module's name: (down key, up key).
SPELLINGS = [
    ("lora_down.weight", "lora_up.weight"),  # kohya's; ComfyUI's trainer and extraction node
    ("lora_A.weight", "lora_B.weight"),  # OneTrainer's ComfyUI output
    ("lora.down.weight", "lora.up.weight"),
    ("lora_linear_layer.down.weight", "lora_linear_layer.up.weight"),
    ("lora_A.default.weight", "lora_B.default.weight"),
]


@pytest.mark.parametrize("down_key, up_key", SPELLINGS)
@pytest.mark.parametrize("alpha", [None, 3.0])
def test_every_lora_spelling_comfyui_reads_is_the_same_module_at_comfyuis_scale(down_key, up_key, alpha):
    name = "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v"
    down, up = lora(4, 8, 6, seed=1)
    tensors = {f"{name}.{down_key}": down, f"{name}.{up_key}": up}
    if alpha is not None:
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    state = parse_state_dict(tensors, {}, "spelling.safetensors")
    module = state.modules["unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v"]
    assert torch.equal(module.down, down) and torch.equal(module.up, up) and not state.skipped
    # ComfyUI: scale alpha / rank with an alpha, 1 without one.
    assert module.scale == (alpha / 4 if alpha is not None else 1.0)


# ----- ComfyUI's trainer ------------------------------------------------------------------------------------------

# Layers of the tiny model (one layer per block, so only input block 1, the middle block and output blocks 0-1 share
# their numbering with SD's) by ComfyUI's name and diffusers'.
TRAINED = {
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0":
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj":
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "input_blocks.1.1.proj_in": "down_blocks.0.attentions.0.proj_in",
    "middle_block.0.emb_layers.1": "mid_block.resnets.0.time_emb_proj",
    "output_blocks.0.0.skip_connection": "up_blocks.0.resnets.0.conv_shortcut",
}
NORMS = {"input_blocks.1.1.norm": "down_blocks.0.attentions.0.norm",
         "middle_block.0.in_layers.0": "mid_block.resnets.0.norm1"}


def unet_layer(pipe, path):
    return dict(pipe.unet.named_modules())[path]


def trainer_file(pipe, zero_biases=False):
    """The state dict ComfyUI's TrainLoraNode returns and SaveLoRA writes, for the layers above: per layer of two or
    more dimensions ``lora_up.weight`` (out × rank) and ``lora_down.weight`` (rank × in·kh·kw, a matrix even for a
    conv) with an ``alpha`` of 1.0; a ``diff`` for each 1-D weight (the norms); a ``diff_b`` for every bias; all in
    the default lora_dtype bf16."""
    generator = torch.Generator().manual_seed(4)
    tensors, rank = {}, 8
    for comfy_name, path in {**TRAINED, **NORMS}.items():
        layer = unet_layer(pipe, path)
        name = f"diffusion_model.{comfy_name}"
        if layer.weight.ndim >= 2:
            in_features = layer.weight[0].numel()
            tensors[f"{name}.lora_up.weight"] = torch.randn(layer.weight.shape[0], rank, generator=generator) * 0.3
            tensors[f"{name}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) * 0.3
            tensors[f"{name}.alpha"] = torch.tensor(1.0)
        else:
            tensors[f"{name}.diff"] = torch.randn(layer.weight.shape, generator=generator) * 0.1
        if layer.bias is not None:
            bias = torch.randn(layer.bias.shape, generator=generator) * 0.1
            tensors[f"{name}.diff_b"] = bias * 0 if zero_biases else bias
    return {key: tensor.to(torch.bfloat16) for key, tensor in tensors.items()}


def unet_output(pipe):
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([500]), context).sample


def test_a_file_as_comfyuis_trainer_saves_it_applies_its_lora_and_names_its_bias_and_norm_diffs(
    tiny_model_dir, tmp_path, caplog
):
    pipe = load_pipeline(tiny_model_dir, quiet=True)
    tensors = trainer_file(pipe)
    path = tmp_path / "ComfyUI_trained_lora_16_steps_00001_.safetensors"
    save_file(tensors, str(path))
    state = read_adapter(path)
    assert state.source_format == "comfyui"
    assert sorted(state.modules) == sorted(f"unet.{path}" for path in TRAINED.values())
    biases = [key for key in tensors if key.endswith(".diff_b") and not any(norm in key for norm in NORMS)]
    norms = [key for key in tensors if any(norm in key for norm in NORMS)]
    assert sorted(state.skipped) == sorted(biases + norms)
    summary = state.skipped_summary()
    assert summary.startswith(f"{len(biases) + len(norms)} keys difflora cannot apply: ")
    assert f"bias diff ×{len(biases)} (" in summary and f"norm diff ×{len(norms)} (" in summary and "\n" not in summary

    # --strict refuses it, and the pipeline is as it was.
    before = {key: value.clone() for key, value in pipe.unet.state_dict().items()}
    with pytest.raises(DiffloraError, match=r"refused \(strict\): .*bias diff ×"):
        LoRARuntime.attach(pipe).load(path, strict=True)
    assert all(torch.equal(pipe.unet.state_dict()[key], value) for key, value in before.items())

    # By default the LoRA is applied, at ComfyUI's scale (alpha 1 / rank 8), and the rest named in the log.
    base = unet_output(pipe)
    with caplog.at_level(logging.WARNING, logger="difflora"):
        LoRARuntime.attach(pipe).load(path, weight=0.9)
    assert "bias diff ×" in caplog.text and "norm diff ×" in caplog.text
    reference = load_pipeline(tiny_model_dir, quiet=True)
    with torch.no_grad():
        for comfy_name, diffusers_path in TRAINED.items():
            layer = unet_layer(reference, diffusers_path)
            up = tensors[f"diffusion_model.{comfy_name}.lora_up.weight"].float()
            down = tensors[f"diffusion_model.{comfy_name}.lora_down.weight"].float()
            layer.weight += 0.9 * (1.0 / 8) * (up @ down).reshape(layer.weight.shape)
    ours, theirs = unet_output(pipe), unet_output(reference)
    effect = float((theirs - base).abs().max())
    assert effect > 1e-3 and float((ours - theirs).abs().max()) <= 1e-5 * max(1.0, effect)


def test_bias_diffs_that_are_zeros_change_nothing_and_count_as_applied(tiny_model_dir):
    pipe = load_pipeline(tiny_model_dir, quiet=True)
    state = parse_state_dict(trainer_file(pipe, zero_biases=True), {}, "zeros.safetensors")
    assert all(".diff_b" not in key or any(norm in key for norm in NORMS) for key in state.skipped)
    assert not [kind for kind in state.skipped_summary().split(": ", 1)[1].split(", ") if kind.startswith("bias")]


def test_a_file_as_comfyuis_extraction_node_saves_it_reads_at_scale_one():
    """LoraSave: ``lora_up``/``lora_down`` in fp16, a conv's factors 4-D, no alpha (ComfyUI applies scale 1)."""
    generator = torch.Generator().manual_seed(2)
    up, down = torch.randn(64, 4, 1, 1, generator=generator), torch.randn(4, 32, 3, 3, generator=generator)
    name = "diffusion_model.input_blocks.4.0.in_layers.2"
    tensors = {f"{name}.lora_up.weight": up.half(), f"{name}.lora_down.weight": down.half()}
    state = parse_state_dict(tensors, {}, "ComfyUI_extracted_lora_00001_.safetensors")
    module = state.modules["unet.down_blocks.1.resnets.0.conv1"]
    expected = (up.half().float().flatten(1) @ down.half().float().flatten(1)).reshape(64, 32, 3, 3)
    torch.testing.assert_close(module.delta_weight(), expected, rtol=1e-6, atol=1e-6)


def test_a_3x3_conv_trained_by_comfyui_with_matrix_factors_is_applied_as_its_update(tiny_model_dir):
    """TrainLoraNode gives a Conv2d the LoRA of its flattened weight: up out × rank, down rank × in·kh·kw."""
    pipe = load_pipeline(tiny_model_dir, quiet=True)
    layer = unet_layer(pipe, "down_blocks.0.resnets.0.conv1")
    generator = torch.Generator().manual_seed(6)
    up = torch.randn(layer.weight.shape[0], 8, generator=generator) * 0.3
    down = torch.randn(8, layer.weight[0].numel(), generator=generator) * 0.3
    name = "diffusion_model.input_blocks.1.0.in_layers.2"
    state = parse_state_dict({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down,
                              f"{name}.alpha": torch.tensor(1.0)}, {}, "trained.safetensors")
    base = unet_output(pipe)
    LoRARuntime.attach(pipe).add_adapter("trained", state, weight=1.0)
    reference = load_pipeline(tiny_model_dir, quiet=True)
    with torch.no_grad():
        unet_layer(reference, "down_blocks.0.resnets.0.conv1").weight += (up @ down).reshape(layer.weight.shape) / 8
    ours, theirs = unet_output(pipe), unet_output(reference)
    effect = float((theirs - base).abs().max())
    assert effect > 1e-3 and float((ours - theirs).abs().max()) <= 1e-5 * max(1.0, effect)
