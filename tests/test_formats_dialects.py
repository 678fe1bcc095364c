"""The formats package picks a dialect in one place: a new dialect is one module plus one entry in
``formats.READERS`` / ``formats.WRITERS``; diffusers' spellings, old and new, may share one file."""

import types

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
