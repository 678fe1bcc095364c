"""``difflora.compat``: what diffusers, ComfyUI, A1111 and Forge apply of a file.

diffusers' predictions are checked against the installed diffusers: each file, written the way kohya's
``networks/lora.py``, LyCORIS and diffusers write them, is loaded with ``pipe.load_lora_weights`` and fused, and every
layer's weight is compared with the same file loaded and fused by difflora: equal → applied, changed otherwise →
applied differently, unchanged → ignored; an exception → the load fails. ComfyUI's, A1111's and Forge's expectations
are written by hand from their code (the versions ``difflora.compat``'s docstring pins), not run.
"""

import copy
import json
import logging

import pytest
import diffusers.utils.logging
import torch
from safetensors.torch import save_file

from difflora import LoRARuntime
from difflora.adapter import AdapterState
from difflora.compat import APPLIES, DIFFERS, IGNORES, compat_report, file_modules
from difflora.formats import parse_state_dict, to_diffusers_state_dict, write_adapter
from difflora.formats._common import read_safetensors
from difflora.pipelines import load_pipeline


def draw(*size, seed):
    return torch.randn(*size, generator=torch.Generator().manual_seed(seed)) * 0.1


def adapted_layers(pipe, original_layout=False):
    """``(kohya name, component, module path, layer)`` of every Linear and Conv2d an adapter may target; UNet names
    in SDXL's original layout with ``original_layout`` (as kohya's sd-scripts write SDXL files)."""
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_",
                "text_encoder_2": "lora_te2_"}
    found = []
    for component, prefix in prefixes.items():
        if getattr(pipe, component, None) is None:
            continue
        for path, layer in getattr(pipe, component).named_modules():
            if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) or "embeddings" in path:
                continue
            if component == "unet":
                flat = original_layout_name(path, pipe.unet) if original_layout else path
            else:
                flat = path if path.startswith("text_model.") or path == "text_projection" else f"text_model.{path}"
            found.append((prefix + flat.replace(".", "_"), component, path, layer))
    return found


_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
           "conv_shortcut": "skip_connection"}
_TOP = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2"}


def original_layout_name(path, unet):
    """A diffusers UNet path in the original (SGM) layout of a UNet with two layers per block, as SDXL's: input
    block 1 + 3·b + l, output block 3·b + l, the samplers in the third slot, the middle block resnet, attention,
    resnet."""
    if path in _TOP:
        return _TOP[path]
    parts = path.split(".")
    if parts[0] == "mid_block":
        if parts[1] == "resnets":
            return f"middle_block.{2 * int(parts[2])}.{_RESNET[parts[3]]}"
        return "middle_block.1." + ".".join(parts[3:])
    block = int(parts[1])
    if parts[2] == "downsamplers":
        return f"input_blocks.{3 + 3 * block}.0.op"
    if parts[2] == "upsamplers":
        return f"output_blocks.{3 * block + 2}.{2 if getattr(unet.up_blocks[block], 'attentions', None) else 1}.conv"
    index = 1 + 3 * block + int(parts[3]) if parts[0] == "down_blocks" else 3 * block + int(parts[3])
    kind = "input_blocks" if parts[0] == "down_blocks" else "output_blocks"
    if parts[2] == "resnets":
        return f"{kind}.{index}.0.{_RESNET[parts[4]]}"
    return f"{kind}.{index}.1." + ".".join(parts[4:])


def tiny_sdxl(tiny_model_dir):
    """A tiny SDXL pipeline (two layers per block, ``add_embedding``, CLIP-L and CLIP-G with its ``text_projection``),
    the same weights every call."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
        transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, projection_dim=32, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(tiny_model_dir / "vae"), text_encoder=CLIPTextModel(config),
        text_encoder_2=CLIPTextModelWithProjection(config), tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
        scheduler=EulerDiscreteScheduler())


def kohya_lora(pipe, alpha_of=lambda name: 2.0, dora=False, rank=4, original_layout=False):
    """A kohya/LyCORIS LoRA (LoCon on convs) on every layer, as ``networks/lora.py`` writes it: per module
    ``lora_down.weight`` (rank × in [× kh × kw]), ``lora_up.weight`` (out × rank [× 1 × 1]), ``alpha`` (fp32 0-d);
    with ``dora`` LyCORIS' ``dora_scale`` (out × 1 [× 1 × 1], per output row)."""
    tensors = {}
    for seed, (name, _, _, layer) in enumerate(adapted_layers(pipe, original_layout)):
        weight = layer.weight
        kernel = tuple(weight.shape[2:])
        tensors[f"{name}.lora_down.weight"] = draw(rank, weight.shape[1], *kernel, seed=3 * seed)
        tensors[f"{name}.lora_up.weight"] = draw(weight.shape[0], rank, *[1] * len(kernel), seed=3 * seed + 1)
        tensors[f"{name}.alpha"] = torch.tensor(alpha_of(name))
        if dora:
            norms = weight.detach().flatten(1).norm(dim=1)
            tensors[f"{name}.dora_scale"] = (norms * 1.5).reshape(-1, 1, *[1] * len(kernel))
    return tensors


def lycoris_module(pipe, kind, tensors=None):
    """One module of LyCORIS' ``kind`` on the first conv 3×3 of the UNet, as LyCORIS names its keys, in place of
    that layer's module in ``tensors`` (a kohya LoRA of every layer by default)."""
    tensors = kohya_lora(pipe) if tensors is None else tensors
    name, _, _, layer = next(entry for entry in adapted_layers(pipe) if entry[3].weight.ndim == 4
                             and entry[3].weight.shape[2] == 3)
    out_features, in_features = layer.weight.shape[:2]
    for key in [key for key in tensors if key.startswith(name + ".")]:
        del tensors[key]
    if kind == "tucker":
        tensors.update({f"{name}.lora_down.weight": draw(2, in_features, 1, 1, seed=1),
                        f"{name}.lora_mid.weight": draw(2, 2, 3, 3, seed=2),
                        f"{name}.lora_up.weight": draw(out_features, 2, 1, 1, seed=3)})
    elif kind == "loha":
        tensors.update({f"{name}.hada_w1_a": draw(out_features, 2, seed=1),
                        f"{name}.hada_w1_b": draw(2, in_features * 9, seed=2),
                        f"{name}.hada_w2_a": draw(out_features, 2, seed=3),
                        f"{name}.hada_w2_b": draw(2, in_features * 9, seed=4)})
    elif kind == "lokr":
        tensors.update({f"{name}.lokr_w1": draw(2, 2, seed=1),
                        f"{name}.lokr_w2": draw(out_features // 2, in_features // 2, 3, 3, seed=2)})
    elif kind == "full":
        tensors.update({f"{name}.diff": draw(*layer.weight.shape, seed=1)})
    tensors[f"{name}.alpha"] = torch.tensor(2.0)
    return tensors


def both_layouts(pipe):
    """An SDXL kohya file naming its down blocks diffusers' way and every other UNet layer in the original layout."""
    tensors = kohya_lora(pipe, original_layout=True)
    for (name, _, path, _), (diffusers_name, *_) in zip(adapted_layers(pipe, True), adapted_layers(pipe)):
        if path.startswith("down_blocks."):
            tensors.update({diffusers_name + key[len(name):]: tensors.pop(key) for key in list(tensors)
                            if key.startswith(name + ".")})
    return tensors


def peft_dora(pipe):
    """diffusers' keys with PEFT's ``lora_magnitude_vector`` per module (as ``save_lora_weights`` writes a DoRA)."""
    tensors = to_diffusers_state_dict(parse_state_dict(kohya_lora(pipe, dora=True), {}))
    assert any(key.endswith("lora_magnitude_vector.weight") for key in tensors)
    return tensors


FILES = {
    # name → (model, builder, what diffusers does by its code: applies / differs … / ignores … / fails)
    "kohya LoRA/LoCon, every layer": ("sd", lambda pipe: kohya_lora(pipe), "applies"),
    # attention projections with an alpha not their component's commonest get the commonest (alpha_pattern keys
    # named after converted keys); other layers keep theirs
    "kohya, per-module alphas": ("sd", lambda pipe: kohya_lora(pipe, alpha_of=lambda name: 3.0 if name.endswith(
        ("to_q", "k_proj", "conv1")) else 2.0), "differs to_q k_proj"),
    "kohya DoRA": ("sd", lambda pipe: kohya_lora(pipe, dora=True), "differs all"),
    # one SimpleTuner lycoris_ key and the file is no longer "every key kohya's": nothing is converted or applied
    "kohya + one lycoris_ module": ("sd", lambda pipe: {**{key: value for key, value in kohya_lora(pipe).items()
                                                           if not key.startswith("lora_unet_conv_in.")},
                                                        "lycoris_conv_in.lora_down.weight": draw(2, 4, 3, 3, seed=1),
                                                        "lycoris_conv_in.lora_up.weight": draw(32, 2, 1, 1, seed=2)},
                                    "ignores all"),
    "LoCon with Tucker core": ("sd", lambda pipe: lycoris_module(pipe, "tucker"), "fails"),
    "LoHa": ("sd", lambda pipe: lycoris_module(pipe, "loha"), "fails"),
    "LoKr": ("sd", lambda pipe: lycoris_module(pipe, "lokr"), "fails"),
    "full diff": ("sd", lambda pipe: lycoris_module(pipe, "full"), "fails"),
    # PEFT's DoRA, applied by diffusers itself (use_dora from lora_magnitude_vector); no header: alpha = rank in both
    "diffusers/PEFT DoRA": ("sd", lambda pipe: peft_dora(pipe), "applies"),
    # _maybe_map_sgm_blocks_to_diffusers, then the same conversion
    "SDXL kohya, original layout": ("sdxl", lambda pipe: kohya_lora(pipe, original_layout=True), "applies"),
    # diffusers-style names as difflora's kohya writer spells them: add_embedding_linear_N is not converted
    "SDXL kohya, diffusers-style names": ("sdxl", lambda pipe: kohya_lora(pipe), "ignores lora_unet_add_embedding"),
    # a file with both layouts: the original-layout keys are dropped
    "SDXL kohya, both layouts": ("sdxl", both_layouts, "ignores lora_unet_input_blocks lora_unet_middle_block "
                                 "lora_unet_output_blocks"),
}


@pytest.fixture
def pipe(tiny_model_dir):
    return load_pipeline(tiny_model_dir, quiet=True)


def layer_weights(pipe):
    return {(component, path): layer.weight.detach().clone() for _, component, path, layer in adapted_layers(pipe)}


def what_diffusers_did(make_pipe, path):
    """``None`` when ``load_lora_weights`` raises, else per layer: applies/differs/ignores against difflora's merge
    (both on pipelines from ``make_pipe()``)."""
    base = make_pipe()
    before = layer_weights(base)
    layers = {(component, path): layer for _, component, path, layer in adapted_layers(base)}  # PEFT wraps them
    ours = make_pipe()
    runtime = LoRARuntime.attach(ours)
    tensors, header = read_safetensors(path)
    runtime.add_adapter("file", parse_state_dict(tensors, header), 1.0)
    runtime.fuse()
    expected = layer_weights(ours)
    try:
        base.load_lora_weights(str(path), adapter_name="file")
    except ValueError:
        return None
    base.fuse_lora(adapter_names=["file"])
    after = {key: layer.weight.detach() for key, layer in layers.items()}
    outcome = {}
    for key, weight in after.items():
        if torch.equal(weight, before[key]):
            outcome[key] = IGNORES
        else:
            scale = (expected[key] - before[key]).abs().max().item()
            outcome[key] = APPLIES if (weight - expected[key]).abs().max().item() <= 1e-5 * scale else DIFFERS
    return outcome


_PIPELINES = {}


def fresh_pipeline(model, tiny_model_dir):
    """A pipeline of ``model`` (``sd``: the embedded model, ``sdxl``: :func:`tiny_sdxl`) that a test may change: a
    copy of one built once per session."""
    if model not in _PIPELINES:
        _PIPELINES[model] = load_pipeline(tiny_model_dir, quiet=True) if model == "sd" else tiny_sdxl(tiny_model_dir)
    return copy.deepcopy(_PIPELINES[model])


@pytest.mark.parametrize("name", list(FILES))
def test_diffusers_prediction_is_what_the_installed_diffusers_does(tiny_model_dir, tmp_path, name, caplog):
    model, build, by_code = FILES[name]

    def make_pipe():
        return fresh_pipeline(model, tiny_model_dir)
    path = tmp_path / "file.safetensors"
    save_file(build(make_pipe()), str(path))
    tensors, header = read_safetensors(path)
    report = compat_report(tensors, header, parse_state_dict(tensors, header))[0]
    assert report.tool == "diffusers" and ("SDXL" in report.target) == (model == "sdxl")
    # Another test may have quieted diffusers (difflora's commands do: _libraries.quiet_libraries); its warnings are
    # part of what is checked here.
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_warning()
    diffusers.utils.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            real = what_diffusers_did(make_pipe, path)
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    if real is None:
        assert by_code == "fails" and not report.loads, report.failure
        return
    assert report.loads, report.failure
    predicted = {}
    for module in file_modules(tensors):
        component, _, module_path = module.module_key.partition(".")
        layer_path = module_path if (component, module_path) in real else f"text_model.{module_path}"
        predicted[component, layer_path] = report.outcomes[module.name]
    assert predicted == real
    counts = {outcome: list(real.values()).count(outcome) for outcome in (APPLIES, DIFFERS, IGNORES)}
    named = sum(module.name.startswith(tuple(by_code.split()[1:])) or module.name.endswith(tuple(by_code.split()[1:]))
                for module in file_modules(tensors))
    if by_code == "applies":
        assert counts == {APPLIES: len(real), DIFFERS: 0, IGNORES: 0}
    elif by_code == "ignores all":
        assert counts[IGNORES] == len(real)
    elif by_code == "differs all":
        assert counts[DIFFERS] == len(real) and "dora_scale" in caplog.text
    elif by_code.startswith("ignores"):  # the modules named
        assert counts[IGNORES] == named > 0 and counts[DIFFERS] == 0
    else:  # the attention projections named, not conv1
        assert counts[DIFFERS] == named > 0


def test_diffusers_reads_its_own_files_and_difflora_files_exactly(pipe, tiny_model_dir, tmp_path):
    """A difflora/diffusers-layout file (``lora_A``/``lora_B`` with ``lora_adapter_metadata`` holding alpha ≠ rank)
    is applied whole by diffusers; ComfyUI reads no metadata (scale 1) and maps no PEFT attention names; A1111 reads
    no diffusers names; Forge drops the whole file (more than 12 keys it cannot place)."""
    tensors = kohya_lora(pipe, alpha_of=lambda name: 2.0)
    kohya = tmp_path / "kohya.safetensors"
    save_file(tensors, str(kohya))
    state = parse_state_dict(*read_safetensors(kohya))
    path = write_adapter(state, tmp_path / "diffusers.safetensors", layout="diffusers")
    tensors, header = read_safetensors(path)
    diffusers, comfy, a1111, forge = compat_report(tensors, header, parse_state_dict(tensors, header))
    real = what_diffusers_did(lambda: fresh_pipeline("sd", tiny_model_dir), path)
    assert set(real.values()) == {APPLIES} and diffusers.applied == diffusers.total == len(real)
    attention = sum(1 for module in file_modules(tensors) if module.name.rsplit(".", 1)[-1] in
                    ("to_q", "to_k", "to_v", "0") and module.component == "unet")
    assert comfy.count(IGNORES) == attention and comfy.count(DIFFERS) == comfy.total - attention
    assert a1111.applied == 0 and not forge.loads


def test_comfyui_a1111_and_forge_by_their_code(pipe, tmp_path):
    """Hand-written from their code: a kohya DoRA file (magnitude per output row) is applied by all three, ComfyUI
    and Forge normalising by ‖W‖ and A1111 per input column, so every module differs; a LoHa module is read by all
    three (A1111's ModuleTypeHada, ComfyUI's LoHaAdapter)."""
    tensors = lycoris_module(pipe, "loha", kohya_lora(pipe, dora=True))
    _, comfy, a1111, forge = compat_report(tensors, {}, parse_state_dict(tensors, {}))
    total = len(file_modules(tensors))
    for report in (comfy, a1111, forge):
        assert report.loads and report.applied == total
        assert report.count(DIFFERS) == total - 1 and report.count(APPLIES) == 1  # the LoHa module has no DoRA


def test_inspect_compat_prints_one_block_per_tool(pipe, tmp_path, capsys):
    from difflora.cli import main

    path = tmp_path / "dora.safetensors"
    save_file(kohya_lora(pipe, dora=True), str(path))
    assert main(["inspect", str(path), "--compat"]) == 0
    text = capsys.readouterr().out
    for tool in ("diffusers", "ComfyUI", "A1111", "Forge"):
        assert f"\n{tool} (" in text
    assert "DoRA magnitude dropped" in text
    assert main(["inspect", str(path), "--compat", "--json"]) == 0
    compat = json.loads(capsys.readouterr().out)["compat"]
    assert [entry["tool"] for entry in compat] == ["diffusers", "ComfyUI", "A1111", "Forge"]
    assert compat[0]["differs"] == compat[0]["modules"] > 0


def tensors_named(*names, rank=2):
    """Small LoRA modules under the given names (kohya's parts), for key-map expectations (shapes do not matter)."""
    tensors = {}
    for seed, name in enumerate(names):
        tensors.update({f"{name}.lora_down.weight": draw(rank, 8, seed=seed), f"{name}.lora_up.weight": draw(
            8, rank, seed=seed + 100), f"{name}.alpha": torch.tensor(1.0)})
    return tensors


def test_names_each_tool_maps_by_its_code():
    """An SDXL file in every spelling, expectations written from each tool's key maps:
    A1111 converts diffusers-style names with SD 1.x block arithmetic (up_blocks.0's upsampler becomes
    output_blocks_2_1_conv, which SDXL's UNet does not have), applies CLIG-G attention through its
    MultiheadAttention only with q, k, v and out together, and reads no lycoris_ names; ComfyUI and Forge map all of
    them (model_lora_keys_unet: lora_unet_ in both layouts and lycoris_; model_lora_keys_clip: lora_te2_);
    diffusers converts only files whose every key is kohya's, so with the lycoris_ module nothing is converted and
    its ``.alpha`` key, without ``lora`` in its name, fails the load ("Invalid LoRA checkpoint")."""
    names = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (APPLIES, APPLIES, APPLIES),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (APPLIES, APPLIES, APPLIES),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (APPLIES, IGNORES, APPLIES),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1": (APPLIES, APPLIES, APPLIES),
        "lora_unet_up_blocks_0_upsamplers_0_conv": (APPLIES, IGNORES, APPLIES),
        "lycoris_down_blocks_0_resnets_0_conv1": (APPLIES, IGNORES, APPLIES),
    }
    tensors = tensors_named(*names)
    state = parse_state_dict(tensors, {})
    diffusers, comfy, a1111, forge = compat_report(tensors, {}, state)
    assert "SDXL" in diffusers.target and not diffusers.loads and diffusers.applied == 0
    for name, expected in names.items():
        assert (comfy.outcomes[name], a1111.outcomes[name], forge.outcomes[name]) == expected, name
    assert forge.loads and a1111.loads
    # LyCORIS' norm diffs (w_norm/b_norm) on a resnet's GroupNorm and a CLIP layer norm: every UNet weight is in
    # ComfyUI's and Forge's key maps, CLIP's layer norms only in A1111's module names; diffusers refuses the keys
    norms = {"lora_unet_down_blocks_0_resnets_0_norm1.w_norm": torch.ones(8),
             "lora_unet_down_blocks_0_resnets_0_norm1.b_norm": torch.zeros(8),
             "lora_te_text_model_encoder_layers_0_layer_norm1.w_norm": torch.ones(8)}
    diffusers, comfy, a1111, forge = compat_report(norms, {}, AdapterState(modules={}))
    assert not diffusers.loads
    assert [report.count(APPLIES) for report in (comfy, a1111, forge)] == [1, 2, 1]


def test_forge_drops_a_file_with_more_than_12_keys_it_cannot_place():
    """sd_forge_lora/networks.py: ``if len(lora_unmatch) > 12: … LoRA version mismatch … return model, clip``. A
    PEFT-spelled SD 1.x file's attention projections are in no ComfyUI/Forge key map (only ….processor.to_q is):
    six of them (12 keys) are ignored and the rest applied; seven (14 keys) and Forge applies nothing."""
    def peft_file(count):
        tensors = {}
        for index in range(count):
            path = (f"unet.down_blocks.{index // 4}.attentions.0.transformer_blocks.0.attn{index % 2 + 1}"
                    f".to_{'qk'[index // 2 % 2]}")
            tensors.update({f"{path}.lora_A.weight": draw(2, 8, seed=index),
                            f"{path}.lora_B.weight": draw(8, 2, seed=index + 50)})
        tensors.update({"unet.down_blocks.0.resnets.0.conv1.lora_A.weight": draw(2, 8, 3, 3, seed=99),
                        "unet.down_blocks.0.resnets.0.conv1.lora_B.weight": draw(8, 2, 1, 1, seed=98)})
        return tensors

    for count, forge_loads in ((6, True), (7, False)):
        tensors = file_modules(peft_file(count))
        assert len(tensors) == count + 1
        report = compat_report(peft_file(count), {}, parse_state_dict(peft_file(count), {}))
        comfy, forge = report[1], report[3]
        assert comfy.count(IGNORES) == count and comfy.count(APPLIES) == 1
        assert forge.loads == forge_loads and forge.applied == (1 if forge_loads else 0)
