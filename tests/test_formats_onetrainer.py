"""OneTrainer's LoRA outputs for SD 1.5 and SDXL, with the keys, layouts and conventions its LoRASaverMixin writes:
the internal dict (``unet.<path>.lora_down.weight``), the original layout (``input_blocks.….lora_A.weight``), its
kohya and legacy outputs; LoRA, DoRA per input column, LoHa with conv-kernel factors and LoKr read to the update
they hold, OFT and bundled embeddings named as skipped."""

import pytest
import torch

from difflora import LoRARuntime
from difflora.errors import DiffloraError
from difflora.formats import parse_state_dict
from difflora.pipelines import load_pipeline

GENERATOR_SEED = 7


def draw(*shape, seed=GENERATOR_SEED):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.2


def lora_module(name, out_features, in_features, kernel=(), rank=4, alpha=2.0, down="lora_down", up="lora_up"):
    return {f"{name}.{down}.weight": draw(rank, in_features, *kernel, seed=1),
            f"{name}.{up}.weight": draw(out_features, rank, *[1] * len(kernel), seed=2),
            f"{name}.alpha": torch.tensor(alpha)}


def test_the_internal_dict_reads_diffusers_paths_of_every_component():
    tensors = {
        **lora_module("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k", 640, 640),
        **lora_module("unet.up_blocks.1.resnets.2.conv1", 1280, 1920, kernel=(3, 3)),
        **lora_module("text_encoder.text_model.encoder.layers.3.mlp.fc2", 768, 3072),
        **lora_module("text_encoder_2.text_model.encoder.layers.30.self_attn.v_proj", 1280, 1280),
    }
    header = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
              "ot_branch": "master", "ot_revision": "4f1c2a9"}  # what DtypeModelSaverMixin writes
    state = parse_state_dict(tensors, header, "backup/lora/lora.safetensors")
    assert state.source_format == "onetrainer" and not state.skipped and state.metadata == header
    assert sorted(state.modules) == [
        "text_encoder.encoder.layers.3.mlp.fc2",
        "text_encoder_2.encoder.layers.30.self_attn.v_proj",
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k",
        "unet.up_blocks.1.resnets.2.conv1",
    ]
    assert state.modules["unet.up_blocks.1.resnets.2.conv1"].weight_shape == (1280, 1920, 3, 3)
    assert state.modules["text_encoder.encoder.layers.3.mlp.fc2"].scale == 2.0 / 4


def test_a_diffusers_file_is_still_read_as_diffusers():
    """OneTrainer's diffusers output and diffusers' own share the ``unet.`` prefix: their factor names tell them."""
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    tensors = {f"{key}.lora_A.weight": draw(4, 320), f"{key}.lora_B.weight": draw(320, 4)}
    assert parse_state_dict(tensors, {}, "diffusers.safetensors").source_format == "diffusers"


def test_the_original_layout_output_names_the_unet_without_a_prefix():
    tensors = {
        **lora_module("input_blocks.1.1.proj_in", 320, 320, kernel=(1, 1), down="lora_A", up="lora_B"),
        **lora_module("output_blocks.2.1.conv", 1280, 1280, kernel=(3, 3), down="lora_A", up="lora_B"),
        **lora_module("middle_block.1.transformer_blocks.0.attn2.to_v", 1280, 768, down="lora_A", up="lora_B"),
    }
    state = parse_state_dict(tensors, {}, "original.safetensors")
    assert state.source_format == "onetrainer" and not state.skipped
    assert sorted(state.modules) == ["unet.down_blocks.0.attentions.0.proj_in",
                                     "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
                                     "unet.up_blocks.0.upsamplers.0.conv"]
    assert all(module.alpha == 2.0 for module in state.modules.values())


def test_the_kohya_and_legacy_outputs_are_kohya_files():
    """SD's kohya output keeps diffusers' UNet names under ``lora_unet_`` with ``lora_te_``; SDXL's legacy output is
    diffusers' UNet names with ``lora_te1_``/``lora_te2_``."""
    sd = {**lora_module("lora_unet_down_blocks_0_attentions_0_proj_in", 320, 320, kernel=(1, 1)),
          **lora_module("lora_te_text_model_encoder_layers_0_mlp_fc1", 3072, 768)}
    state = parse_state_dict(sd, {}, "kohya.safetensors")
    assert state.source_format == "kohya"
    assert sorted(state.modules) == ["text_encoder.encoder.layers.0.mlp.fc1", "unet.down_blocks.0.attentions.0.proj_in"]
    sdxl = {**lora_module("lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_ff_net_2", 640, 2560),
            **lora_module("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768),
            **lora_module("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280)}
    state = parse_state_dict(sdxl, {}, "legacy.safetensors")
    assert sorted(state.modules) == ["text_encoder.encoder.layers.0.self_attn.q_proj",
                                     "text_encoder_2.encoder.layers.0.self_attn.q_proj",
                                     "unet.down_blocks.1.attentions.0.transformer_blocks.1.ff.net.2"]


def test_dora_per_input_column_loha_as_conv_kernels_and_lokr_hold_the_updates_onetrainer_trained():
    conv = "unet.down_blocks.0.resnets.0.conv2"
    linear = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    # DoRAModule with decompose_output_axis off (OneTrainer's default): the magnitude is 1 × in × 1 × 1.
    magnitude = draw(1, 320, 1, 1, seed=3).abs() + 0.5
    dora = {**lora_module(conv, 320, 320, kernel=(3, 3)), f"{conv}.dora_scale": magnitude}
    # LoHaModule on a Conv2d: its factors are the weights of a conv pair (up out × rank × 1 × 1, down
    # rank × in × kh × kw).
    w1a, w1b, w2a, w2b = draw(320, 4, 1, 1, seed=4), draw(4, 320, 3, 3, seed=5), draw(320, 4, 1, 1, seed=6), \
        draw(4, 320, 3, 3, seed=8)
    loha = {f"{conv}.hada_w1_a": w1a, f"{conv}.hada_w1_b": w1b, f"{conv}.hada_w2_a": w2a, f"{conv}.hada_w2_b": w2b,
            f"{conv}.alpha": torch.tensor(4.0)}
    # LoKrModule: lokr_w1 whole, lokr_w2 factorised, alpha (scale alpha / dim).
    w1, w2a_k, w2b_k = draw(8, 8, seed=9), draw(40, 4, seed=10), draw(4, 96, seed=11)
    lokr = {f"{linear}.lokr_w1": w1, f"{linear}.lokr_w2_a": w2a_k, f"{linear}.lokr_w2_b": w2b_k,
            f"{linear}.alpha": torch.tensor(2.0)}

    state = parse_state_dict(dora, {}, "dora.safetensors")
    module = state.modules[conv]
    assert module.wd_on_output is False and torch.equal(module.dora_scale.flatten(), magnitude.flatten())

    state = parse_state_dict(loha, {}, "loha.safetensors")
    expected = ((w1a.flatten(1) @ w1b.flatten(1)) * (w2a.flatten(1) @ w2b.flatten(1))).reshape(320, 320, 3, 3)
    got = state.modules[conv].delta_weight().reshape(320, 320, 3, 3)
    torch.testing.assert_close(got, expected * (4.0 / 4), rtol=1e-5, atol=1e-6)

    state = parse_state_dict(lokr, {}, "lokr.safetensors")
    torch.testing.assert_close(state.modules[linear].delta_weight(), torch.kron(w1, w2a_k @ w2b_k) * (2.0 / 4),
                               rtol=1e-5, atol=1e-6)


def test_oft_and_bundled_embeddings_are_named_and_strict_refuses_them(tiny_model_dir):
    pipe = load_pipeline(tiny_model_dir, quiet=True)
    to_q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    to_k = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    tensors = {
        **lora_module(to_q, 32, 32),
        f"{to_k}.oft_R.weight": draw(4, 36, seed=12),  # OFTModule: block-diagonal rotation, and its scaled marker
        f"{to_k}.oft_R.scaled_oft": torch.tensor(1.0),
        "bundle_emb.<pixsun>.clip_l": draw(2, 32, seed=13),
    }
    state = parse_state_dict(tensors, {}, "oft.safetensors")
    assert list(state.modules) == [to_q]
    assert state.skipped_summary() == (
        f"3 keys difflora cannot apply: oft ×2 ({to_k}.oft_R.weight, …), embedding ×1 (bundle_emb.<pixsun>.clip_l)")
    before = {key: value.clone() for key, value in pipe.unet.state_dict().items()}
    runtime = LoRARuntime.attach(pipe)
    refusal = r"^oft\.safetensors: refused \(strict\): 3 keys difflora cannot apply: oft"
    with pytest.raises(DiffloraError, match=refusal):
        runtime.add_adapter("oft", state, source="oft.safetensors", strict=True)
    assert not runtime.adapters
    assert all(torch.equal(pipe.unet.state_dict()[key], value) for key, value in before.items())
    runtime.add_adapter("oft", state)  # by default the LoRA is applied
    assert runtime.adapters["oft"].module_count == 1
