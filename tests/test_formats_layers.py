"""Adapter files on every layer, not only attention: kohya/LyCORIS names (SD 1.x diffusers-style, SDXL's original
layout), LoCon's 4-D factors and LyCORIS' Tucker core, diffusers' and PEFT's conv LoRA.

Files are made as the other tools make them (kohya's ``networks/lora.py``: a module per Linear/Conv2d child of the
target blocks, ``lora_<component>_<path with underscores>``, conv down k × k and up 1 × 1, a 0-d alpha, saved in
fp16; LyCORIS' ``modules/locon.py``: the same names plus ``conv_in``/``conv_out``/``time_embedding``, a 1 × 1 down
and ``lora_mid`` for Tucker) and checked against diffusers' own conversions, diffusers' ``load_lora_weights`` +
``fuse_lora`` and ``peft.PeftModel``, comparing weights, not images.
"""

import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.utils import convert_unet_state_dict_to_peft
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from difflora.adapter import AdapterState, LoRAModuleWeights
from difflora.errors import AdapterFileError
from difflora.formats import parse_state_dict, read_adapter, write_adapter, write_peft_folder
from difflora.pipelines import load_pipeline

# ----- the models whose layer names files use -----------------------------------------------------------------------

SD15 = dict(
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
)
SD2 = dict(SD15, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SDXL = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
UNETS = {"sd15": SD15, "sd2": SD2, "sdxl": SDXL}
CLIP = CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      projection_dim=8)


def meta_unet(config: dict) -> UNet2DConditionModel:
    """The UNet of a model's config, its weights on the meta device: names and shapes, no memory."""
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def layers(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Every Linear and Conv2d of ``model`` by path, with its weight's shape."""
    return {name: tuple(module.weight.shape) for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}


def rank_one(shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """kohya's factors of rank 1 for a weight of ``shape``: a conv's down k × k, its up 1 × 1."""
    kernel = shape[2:]
    ones = (1,) * len(kernel)
    return {"lora_down.weight": torch.zeros(1, shape[1], *kernel), "lora_up.weight": torch.zeros(shape[0], 1, *ones)}


def kohya_tensors(prefix: str, paths: dict[str, tuple[int, ...]]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A kohya file over ``paths`` (rank 1) and which module key each flattened name must read as."""
    tensors, expected = {}, {}
    for path, shape in paths.items():
        name = f"{prefix}_{path.replace('.', '_')}"
        tensors.update({f"{name}.{suffix}": tensor for suffix, tensor in rank_one(shape).items()})
        expected[name] = path
    return tensors, expected


# ----- names --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", sorted(UNETS))
def test_every_unet_layer_reads_back_from_its_kohya_name(model):
    """kohya names SD 1.x/2.x (and SDXL, when written by diffusers-based tools) layers by diffusers' paths with
    underscores: every Linear and Conv2d of each UNet must read back as its own path, whatever underscores its
    names hold (``conv_shortcut``, ``time_emb_proj``, ``transformer_blocks``, ``to_out_0``, ``linear_1``)."""
    paths = layers(meta_unet(UNETS[model]))
    tensors, _ = kohya_tensors("lora_unet", paths)
    state = parse_state_dict(tensors, {}, source=f"{model}.safetensors")
    assert not state.skipped
    assert set(state.modules) == {f"unet.{path}" for path in paths}
    kinds = {path.rsplit(".", 1)[-1] for path in paths}
    assert {"conv_shortcut", "time_emb_proj", "proj_in", "conv", "conv_in", "linear_1", "2", "proj"} <= kinds


def test_every_text_encoder_layer_reads_back_from_its_kohya_name():
    """Text encoders as kohya names them with transformers 4 (``text_model_`` before every path but SDXL's
    ``text_projection``); the second encoder of SDXL is ``lora_te2_``, the first ``lora_te1_``."""
    first = {f"text_model.{path}": shape for path, shape in layers(CLIPTextModel(CLIP)).items()}
    second = layers(CLIPTextModelWithProjection(CLIP))
    assert "text_projection" in second and "text_model.encoder.layers.1.mlp.fc2" in second
    tensors, one = kohya_tensors("lora_te1", first)
    more, two = kohya_tensors("lora_te2", second)
    state = parse_state_dict({**tensors, **more}, {}, source="sdxl-te.safetensors")
    expected = {f"text_encoder.{path.removeprefix('text_model.')}" for path in one.values()}
    expected |= {f"text_encoder_2.{path.removeprefix('text_model.')}" for path in two.values()}
    assert set(state.modules) == expected and not state.skipped
    assert "text_encoder_2.text_projection" in state.modules and "text_encoder.encoder.layers.0.mlp.fc1" in expected


def _transformer(depth: int) -> list[str]:
    attention = [f"attn{n}.{p}" for n in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")]
    inner = attention + ["ff.net.0.proj", "ff.net.2"]
    return ["proj_in", "proj_out"] + [f"transformer_blocks.{d}.{layer}" for d in range(depth) for layer in inner]


def original_layout_layers(levels: list[int], middle: int, channels: list[int], label_embedding: bool) -> list[str]:
    """Every Linear/Conv2d path of an SGM/LDM UNet (what kohya's ``sdxl_original_unet.py`` builds for SDXL) with two
    layers per level; ``levels`` holds each level's transformer depth (0: no attention) and ``middle`` the middle
    block's, ``channels`` each level's width (a resnet that changes it has a skip connection, as every up-block
    resnet does)."""
    resnet = ["in_layers.2", "emb_layers.1", "out_layers.3"]
    names = ["input_blocks.0.0", "time_embed.0", "time_embed.2", "out.2"]
    names += ["label_emb.0.0", "label_emb.0.2"] if label_embedding else []
    index = 1
    for level, depth in enumerate(levels):
        for layer in range(2):
            names += [f"input_blocks.{index}.0.{r}" for r in resnet]
            changes = level > 0 and layer == 0 and channels[level] != channels[level - 1]
            names += [f"input_blocks.{index}.0.skip_connection"] if changes else []
            names += [f"input_blocks.{index}.1.{t}" for t in _transformer(depth)] if depth else []
            index += 1
        if level < len(levels) - 1:
            names.append(f"input_blocks.{index}.0.op")
            index += 1
    names += [f"middle_block.{slot}.{r}" for slot in (0, 2) for r in resnet]
    names += [f"middle_block.1.{t}" for t in _transformer(middle)]
    index = 0
    for level, depth in reversed(list(enumerate(levels))):
        for layer in range(3):
            names += [f"output_blocks.{index}.0.{r}" for r in resnet + ["skip_connection"]]
            names += [f"output_blocks.{index}.1.{t}" for t in _transformer(depth)] if depth else []
            names += [f"output_blocks.{index}.{2 if depth else 1}.conv"] if layer == 2 and level > 0 else []
            index += 1
    return names


ORIGINAL_LAYOUTS = {  # model → (config, transformer depth per level, in the middle block, label embedding)
    "sdxl": (SDXL, [0, 2, 10], 10, True),
    "sd15": (SD15, [1, 1, 1, 0], 1, False),
}


def single_file_mapping(names: list[str], config: dict) -> dict[str, str]:
    """diffusers' single-file converter applied to a checkpoint holding one numbered weight per layer: original name
    → diffusers path, read off the numbers."""
    checkpoint = {f"model.diffusion_model.{name}.weight": torch.tensor([float(i)]) for i, name in enumerate(names)}
    checkpoint.update({key.replace(".weight", ".bias"): value for key, value in checkpoint.items()})
    converted = convert_ldm_unet_checkpoint(checkpoint, {"layers_per_block": 2, **config})
    return {names[int(value.item())]: key.removesuffix(".weight") for key, value in converted.items()
            if key.endswith(".weight")}


def lora_loader_mapping(names: list[str]) -> dict[str, str]:
    """diffusers' kohya LoRA loader (``lora_state_dict`` + ``convert_unet_state_dict_to_peft``) on a file holding
    one numbered module per layer: original name → diffusers path."""
    tensors = {}
    for i, name in enumerate(names):
        flat = "lora_unet_" + name.replace(".", "_")
        tensors[f"{flat}.lora_down.weight"] = torch.full((1, 2), float(i))
        tensors[f"{flat}.lora_up.weight"] = torch.ones(2, 1)
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(tensors, unet_config=SimpleNamespace(layers_per_block=2))
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    return {names[int(value[0, 0].item())]: key.removesuffix(".lora_A.weight") for key, value in peft.items()
            if key.endswith(".lora_A.weight")}


@pytest.mark.parametrize("model", sorted(ORIGINAL_LAYOUTS))
def test_original_layout_names_map_as_diffusers_maps_them(model):
    """SDXL files from kohya name the UNet in the original layout. Every layer kind of it (resnet convs, time and
    label embeddings, samplers, conv_in/out, transformer projections, attention, feed-forward) maps where diffusers'
    single-file converter maps its weights, and, for SDXL, where diffusers' LoRA loader maps it; the result covers
    every Linear/Conv2d of the diffusers UNet exactly once. SD 1.x block counts too (no attention in the last level,
    so its first up block's upsampler sits in slot 1)."""
    config, levels, middle, label = ORIGINAL_LAYOUTS[model]
    names = original_layout_layers(levels, middle, list(config["block_out_channels"]), label)
    tensors = {}
    for i, name in enumerate(names):
        tensors[f"lora_unet_{name.replace('.', '_')}.lora_down.weight"] = torch.full((1, 2), float(i))
        tensors[f"lora_unet_{name.replace('.', '_')}.lora_up.weight"] = torch.ones(2, 1)
    state = parse_state_dict(tensors, {}, source=f"{model}.safetensors")
    assert not state.skipped
    ours = {names[int(m.down[0, 0].item())]: key.removeprefix("unet.") for key, m in state.modules.items()}
    assert len(ours) == len(names)
    assert ours == single_file_mapping(names, {k: v for k, v in config.items() if k == "addition_embed_type"})
    if model == "sdxl":
        assert ours == lora_loader_mapping(names)
    assert sorted(ours.values()) == sorted(layers(meta_unet(config)))  # every layer, once


@pytest.mark.parametrize(
    "name",
    ["input_blocks_2_0_op", "input_blocks_3_0_in_layers_2", "input_blocks_0_1_proj_in", "output_blocks_1_1_conv",
     "middle_block_3_in_layers_2", "down_blocks_0_resnets_0_conv_3", "down_blocks_0_resnets_0_shortcut",
     "text_model_encoder_layers_0_mlp_fc1"],
)
def test_names_of_no_layer_are_skipped_not_guessed(name):
    """A name outside the grammar (a sampler outside its slot, a layer that does not exist, a text-encoder name under
    the UNet's prefix) is reported, never mapped to the nearest guess."""
    tensors = {f"lora_unet_{name}.{s}": t for s, t in rank_one((2, 2)).items()}
    tensors.update({f"lora_unet_conv_in.{s}": t for s, t in rank_one((2, 2, 3, 3)).items()})
    state = parse_state_dict(tensors, {}, source="names.safetensors")
    assert set(state.modules) == {"unet.conv_in"}
    assert sorted(state.skipped) == [f"lora_unet_{name}.lora_down.weight", f"lora_unet_{name}.lora_up.weight"]


# ----- factors: files as kohya and LyCORIS write them ---------------------------------------------------------------

# kohya's networks/lora.py adapts every Linear/Conv2d child of these blocks (the last three with --network_args
# conv_dim), LyCORIS' kohya preset also these layers by name; the text encoder's attention and MLP.
KOHYA_UNET_BLOCKS = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
LYCORIS_UNET_LAYERS = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")
KOHYA_TEXT_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


def kohya_targets(root: torch.nn.Module, blocks: tuple[str, ...], names: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """The layers kohya's trainer adapts under ``root``, by path: Linear/Conv2d children of the target blocks, and
    the layers LyCORIS targets by name."""
    found = {}
    for name, module in root.named_modules():
        if type(module).__name__ in blocks:
            for child_name, child in module.named_modules():
                if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                    found[f"{name}.{child_name}"] = child
        elif name in names:
            found[name] = module
    return found


def kohya_module(layer: torch.nn.Module, tucker: bool, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One module's tensors as kohya/LyCORIS save them in fp16: Linear and 1 × 1 conv at dim 4 / alpha 2, k × k conv
    at conv_dim 2 / conv_alpha 1 (LoCon: down k × k, up 1 × 1; with ``tucker``, LyCORIS' 1 × 1 down and k × k mid)."""
    shape = layer.weight.shape
    kernel = tuple(shape[2:])
    rank, alpha = (2, 1.0) if kernel not in ((), (1, 1)) else (4, 2.0)
    ones = (1,) * len(kernel)
    tensors = {"lora_up.weight": torch.randn(shape[0], rank, *ones, generator=generator) * 0.1,
               "alpha": torch.tensor(alpha)}
    if tucker and kernel not in ((), (1, 1)):
        tensors["lora_down.weight"] = torch.randn(rank, shape[1], 1, 1, generator=generator) * 0.1
        tensors["lora_mid.weight"] = torch.randn(rank, rank, *kernel, generator=generator) * 0.1
    else:
        tensors["lora_down.weight"] = torch.randn(rank, shape[1], *kernel, generator=generator) * 0.1
    return {suffix: tensor.half() for suffix, tensor in tensors.items()}


def merged_update(tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """The weight change of one module, as LyCORIS' ``LoConModule.make_weight`` forms it (written here apart from
    difflora's maths): ``up @ down`` flattened, or ``rebuild_tucker``'s contraction through the core."""
    up, down = tensors["lora_up.weight"].float(), tensors["lora_down.weight"].float()
    rank = down.shape[0]
    if "lora_mid.weight" in tensors:
        rebuilt = torch.einsum("ijkl,ip,jr->prkl", tensors["lora_mid.weight"].float(), up.view(up.size(0), -1).T,
                               down.view(rank, -1))
    else:
        rebuilt = up.view(up.size(0), -1) @ down.view(rank, -1)
    return rebuilt.view(shape) * (tensors["alpha"].float() / rank)


@pytest.mark.parametrize("tucker", [False, True], ids=["kohya-locon", "lycoris-tucker"])
def test_a_kohya_locon_file_reads_every_layer_with_its_factors_and_alpha(tiny_pipeline, tmp_path, tucker):
    generator = torch.Generator().manual_seed(3)
    tensors, expected = {}, {}
    text_encoder = {("" if p.startswith("text_model.") else "text_model.") + p: layer  # as transformers 4 names them
                    for p, layer in kohya_targets(tiny_pipeline.text_encoder, KOHYA_TEXT_BLOCKS, ()).items()}
    targets = [("lora_unet", "unet", kohya_targets(tiny_pipeline.unet, KOHYA_UNET_BLOCKS, LYCORIS_UNET_LAYERS)),
               ("lora_te", "text_encoder", text_encoder)]
    for prefix, component, found in targets:
        for path, layer in found.items():
            module = kohya_module(layer, tucker, generator)
            name = f"{prefix}_{path.replace('.', '_')}"
            tensors.update({f"{name}.{suffix}": tensor for suffix, tensor in module.items()})
            expected[f"{component}.{path.removeprefix('text_model.')}"] = (module, tuple(layer.weight.shape))
    save_file(tensors, str(tmp_path / "locon.safetensors"), metadata={"ss_network_module": "networks.lora"})

    state = read_adapter(tmp_path / "locon.safetensors")
    assert state.source_format == "kohya" and not state.skipped and set(state.modules) == set(expected)
    for key, (module, shape) in expected.items():
        read = state.modules[key]
        assert torch.equal(read.down, module["lora_down.weight"]) and torch.equal(read.up, module["lora_up.weight"])
        assert read.mid is None if "lora_mid.weight" not in module else torch.equal(read.mid, module["lora_mid.weight"])
        assert read.alpha == module["alpha"].item() and read.weight_shape == shape
        torch.testing.assert_close(read.delta_weight(), merged_update(module, shape), rtol=1e-5, atol=1e-8)
    kinds = {"conv1", "conv2", "conv_shortcut", "time_emb_proj", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
             "to_out.0", "downsamplers.0.conv", "upsamplers.0.conv", "conv_in", "conv_out", "time_embedding.linear_1"}
    assert kinds <= set(state.targets()["unet"])
    assert {"mlp.fc1", "mlp.fc2", "q_proj", "out_proj"} <= set(state.targets()["text_encoder"])


# ----- what cannot be applied yet -----------------------------------------------------------------------------------

RESNET = "lora_unet_down_blocks_0_resnets_0"
# Modules as LyCORIS writes them for its other algorithms (the key suffixes of each module class's weight_list).
LYCORIS_MODULES = {  # as LyCORIS' modules store them, on the tiny model's first resnet (32 channels, 3 × 3 convs)
    "loha": {f"{RESNET}_conv1.hada_w1_a": torch.ones(32, 2), f"{RESNET}_conv1.hada_w1_b": torch.ones(2, 288),
             f"{RESNET}_conv1.hada_w2_a": torch.ones(32, 2), f"{RESNET}_conv1.hada_w2_b": torch.ones(2, 288),
             f"{RESNET}_conv1.alpha": torch.tensor(1.0)},
    "lokr": {f"{RESNET}_conv2.lokr_w1": torch.ones(4, 4), f"{RESNET}_conv2.lokr_w2_a": torch.ones(8, 2),
             f"{RESNET}_conv2.lokr_w2_b": torch.ones(2, 72), f"{RESNET}_conv2.alpha": torch.tensor(2.0)},
    "dora": {f"{RESNET}_time_emb_proj.lora_down.weight": torch.ones(2, 128),
             f"{RESNET}_time_emb_proj.lora_up.weight": torch.ones(32, 2),
             f"{RESNET}_time_emb_proj.alpha": torch.tensor(2.0),
             f"{RESNET}_time_emb_proj.dora_scale": torch.ones(32, 1)},
    "full": {"lora_unet_conv_out.diff": torch.ones(4, 32, 3, 3), "lora_unet_conv_out.diff_b": torch.ones(4)},
}
NOT_APPLIED = {
    "norm": {f"{RESNET}_norm1.w_norm": torch.ones(32), f"{RESNET}_norm1.b_norm": torch.ones(32)},
    "unknown-layer": {f"{RESNET}_conv9.lora_down.weight": torch.ones(2, 32), f"{RESNET}_conv9.lora_up.weight":
                      torch.ones(32, 2)},
    "two-algorithms": {f"{RESNET}_conv2.lokr_w1": torch.ones(4, 4), f"{RESNET}_conv1.hada_w1_a": torch.ones(32, 2),
                       "lora_unet_down_blocks_0_resnets_1_conv1.lokr_w1": torch.ones(2, 2),
                       "lora_unet_down_blocks_0_resnets_1_conv1.hada_w1_a": torch.ones(2, 2)},
    "not-kohya": {"some_embedding.weight": torch.ones(3)},
}
APPLIED = {f"{RESNET}_conv_shortcut.lora_down.weight": torch.ones(2, 32, 1, 1),
           f"{RESNET}_conv_shortcut.lora_up.weight": torch.ones(64, 2, 1, 1)}


def test_lycoris_algorithms_are_read_and_the_rest_skipped_key_by_key():
    """LoHa, LoKr, DoRA and full diffs are read as their kinds (a DoRA's axis from its magnitude's shape); norm diffs,
    names of no layer, a module mixing two algorithms and keys outside kohya's naming are reported whole, every key
    of them, never applied in part."""
    lycoris_keys = {key: tensor for module in LYCORIS_MODULES.values() for key, tensor in module.items()}
    not_applied = {key: tensor for name, module in NOT_APPLIED.items() if name != "two-algorithms"
                   for key, tensor in module.items()}
    mixed = {key: t for key, t in NOT_APPLIED["two-algorithms"].items() if "resnets_1" in key}
    state = parse_state_dict({**APPLIED, **lycoris_keys, **not_applied, **mixed}, {}, source="lycoris.safetensors")
    block = "unet.down_blocks.0.resnets.0"
    kinds = {key: (module.kind, module.dora_scale is not None) for key, module in state.modules.items()}
    assert kinds == {f"{block}.conv_shortcut": ("lora", False), f"{block}.conv1": ("loha", False),
                     f"{block}.conv2": ("lokr", False), f"{block}.time_emb_proj": ("lora", True),
                     "unet.conv_out": ("full", False)}
    assert state.modules[f"{block}.time_emb_proj"].wd_on_output
    assert state.modules[f"{block}.conv2"].scale == 1.0  # LoKr: alpha counts where a side is factorised (w2: r 2)
    assert sorted(state.skipped) == sorted([*not_applied, *mixed])
    assert state.problem() is None
    assert state.modules["unet.conv_out"].weight_shape == (4, 32, 3, 3)


@pytest.mark.parametrize(
    "tensors, message",
    [
        (NOT_APPLIED["norm"], f"holds no module difflora can apply (2 keys skipped, first: '{RESNET}_norm1.w_norm')"),
        (NOT_APPLIED["unknown-layer"], f"(2 keys skipped, first: '{RESNET}_conv9.lora_down.weight')"),
        ({**APPLIED, **{key.replace(RESNET, "lora_unet_input_blocks_1_0").replace("conv_shortcut", "skip_connection"):
                        t for key, t in APPLIED.items()}},
         f"module 'unet.down_blocks.0.resnets.0.conv_shortcut' is named twice ({RESNET}_conv_shortcut and "),
        ({f"{RESNET}_conv1.lora_down.weight": torch.ones(2, 32, 3, 3), f"{RESNET}_conv1.lora_up.weight":
          torch.ones(32, 2, 1, 1), f"{RESNET}_conv1.lora_mid.weight": torch.ones(2, 2, 3, 3)},
         "module 'unet.down_blocks.0.resnets.0.conv1' has factors of shapes (2, 32, 3, 3) and (32, 2, 1, 1) (mid"),
        ({f"{RESNET}_conv1.lora_up.weight": torch.ones(32, 2, 1, 1), f"{RESNET}_conv1.alpha": torch.tensor(1.0)},
         "module 'unet.down_blocks.0.resnets.0.conv1' has no down factor"),
    ],
    ids=["norm-only", "no-layer-only", "one-layer-twice", "tucker-with-kxk-down", "up-without-down"],
)
def test_files_with_nothing_to_apply_or_inconsistent_modules_are_refused(tensors, message):
    with pytest.raises(AdapterFileError) as error:
        parse_state_dict(tensors, {}, source="hostile.safetensors")
    text = str(error.value)
    assert text.startswith("hostile.safetensors: ") and message in text and "\n" not in text


def test_a_diffusers_module_holding_more_than_its_factors_is_skipped_whole():
    """PEFT writes a LoRA bias (``lora_B.bias``) beside the factors (``lora_bias=True``); without it the factors are
    another update, so the module is skipped, every key of it. (DoRA magnitudes are read: test_formats_dora.py.)"""
    extra = "lora_B.bias"
    dora, plain = "unet.down_blocks.0.resnets.0.conv1", "unet.conv_in"
    module = {f"{dora}.lora_A.weight": torch.ones(2, 32, 3, 3), f"{dora}.lora_B.weight": torch.ones(32, 2, 1, 1),
              f"{dora}.{extra}": torch.ones(32)}
    tensors = {**module, f"{plain}.lora_A.weight": torch.ones(2, 4, 3, 3), f"{plain}.lora_B.weight":
               torch.ones(32, 2, 1, 1)}
    state = parse_state_dict(tensors, {}, source="dora.safetensors")
    assert set(state.modules) == {plain} and sorted(state.skipped) == sorted(module)
    with pytest.raises(AdapterFileError, match=r"^dora.safetensors: holds no LoRA module difflora can apply \(3 keys"):
        parse_state_dict(module, {}, source="dora.safetensors")


# ----- round trips and what the other tools compute from written files ---------------------------------------------


def every_layer_adapter(pipe, seed: int, uniform: bool = False, tucker: bool = False) -> AdapterState:
    """Non-zero factors on every Linear and Conv2d of the UNet and text encoder: Linear rank 4 / alpha 8, 1 × 1 conv
    rank 2 / alpha 3, k × k conv rank 3 / alpha 1.5 (rank and alpha patterns), each k × k conv of the up blocks
    with a Tucker core if ``tucker``; ``uniform``: rank 4 / alpha 8 everywhere."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for component in ("unet", "text_encoder"):
        for path, shape in layers(getattr(pipe, component)).items():
            kernel = shape[2:]
            rank, alpha = (4, 8.0) if uniform or not kernel else (2, 3.0) if kernel == (1, 1) else (3, 1.5)
            ones = (1,) * len(kernel)
            up = torch.randn(shape[0], rank, *ones, generator=generator) * 0.1
            mid = None
            if tucker and kernel not in ((), (1, 1)) and path.startswith("up_blocks."):
                down = torch.randn(rank, shape[1], 1, 1, generator=generator) * 0.1
                mid = torch.randn(rank, rank, *kernel, generator=generator) * 0.3
            else:
                down = torch.randn(rank, shape[1], *kernel, generator=generator) * 0.1
            modules[f"{component}.{path}"] = LoRAModuleWeights(down=down, up=up, alpha=alpha, mid=mid)
    return AdapterState(modules=modules)


def assert_same_modules(read: AdapterState, written: AdapterState):
    assert set(read.modules) == set(written.modules)
    for key, module in written.modules.items():
        other = read.modules[key]
        assert torch.equal(other.down, module.down) and torch.equal(other.up, module.up), key
        assert (other.mid is None) == (module.mid is None), key
        assert module.mid is None or torch.equal(other.mid, module.mid), key
        assert other.scale == pytest.approx(module.scale, rel=1e-7)


def assert_weights_moved_by(model: torch.nn.Module, base: dict[str, torch.Tensor], state: AdapterState, component):
    """``model``'s weights are ``base`` plus each module's ``delta_weight()`` where ``state`` adapts a layer, and
    ``base`` exactly everywhere else."""
    after = model.state_dict()
    assert after.keys() == base.keys()
    adapted = 0
    for key, value in after.items():
        module = state.modules.get(f"{component}.{key.removesuffix('.weight')}") if key.endswith(".weight") else None
        if module is None:
            assert torch.equal(value, base[key]), key
            continue
        delta = module.delta_weight()
        assert delta.abs().max() > 1e-3  # the update is visible, so equality means something
        torch.testing.assert_close(value, base[key] + delta, rtol=0, atol=1e-5, msg=key)
        adapted += 1
    assert adapted == sum(key.startswith(component + ".") for key in state.modules)


def test_kohya_round_trip_keeps_every_layer_kind(tiny_pipeline, tmp_path):
    state = every_layer_adapter(tiny_pipeline, seed=4, tucker=True)
    path = write_adapter(state, tmp_path / "locon.safetensors", layout="kohya")
    with safe_open(str(path), "pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        header = handle.metadata()
    conv1, up_conv1 = "lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_up_blocks_0_resnets_0_conv1"
    assert shapes[f"{conv1}.lora_down.weight"] == (3, 32, 3, 3) and shapes[f"{conv1}.lora_up.weight"] == (32, 3, 1, 1)
    assert shapes[f"{up_conv1}.lora_down.weight"] == (3, 128, 1, 1) and shapes[f"{up_conv1}.lora_mid.weight"] == (
        3, 3, 3, 3)
    assert shapes["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] == (4, 32)
    assert shapes["lora_unet_time_embedding_linear_1.alpha"] == ()
    assert header["ss_network_dim"] == "4" and header["ss_network_alpha"] == "8"
    assert json.loads(header["ss_network_args"]) == {"algo": "locon", "conv_dim": "3", "conv_alpha": "1.5",
                                                     "use_tucker": "True"}
    again = read_adapter(path)
    assert again.source_format == "kohya" and not again.skipped
    assert_same_modules(again, state)


def test_kohya_round_trip_of_sdxl_layers_names_both_encoders():
    generator = torch.Generator().manual_seed(5)

    def module(out, inputs, kernel=(), mid=False):
        ones = (1,) * len(kernel)
        down = torch.randn(2, inputs, *(ones if mid else kernel), generator=generator)
        core = torch.randn(2, 2, *kernel, generator=generator) if mid else None
        return LoRAModuleWeights(down, torch.randn(out, 2, *ones, generator=generator), alpha=1.0, mid=core)

    state = AdapterState(modules={
        "unet.down_blocks.1.attentions.0.transformer_blocks.1.ff.net.2": module(64, 256),
        "unet.down_blocks.2.resnets.0.conv_shortcut": module(32, 16, (1, 1)),
        "unet.up_blocks.0.upsamplers.0.conv": module(32, 32, (3, 3), mid=True),
        "unet.add_embedding.linear_1": module(128, 2816),
        "text_encoder.encoder.layers.0.mlp.fc1": module(32, 16),
        "text_encoder_2.text_projection": module(8, 16),
        "text_encoder_2.encoder.layers.1.mlp.fc2": module(16, 32),
    })
    from difflora.formats import to_kohya_state_dict

    names = {key.split(".")[0] for key in to_kohya_state_dict(state)}
    assert {"lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_te2_text_projection",
            "lora_te2_text_model_encoder_layers_1_mlp_fc2", "lora_unet_add_embedding_linear_1"} <= names
    assert_same_modules(parse_state_dict(to_kohya_state_dict(state), {}, source="sdxl"), state)


def test_diffusers_round_trip_and_a_tucker_core_folded_into_its_down_factor(tiny_pipeline, tmp_path):
    plain = every_layer_adapter(tiny_pipeline, seed=6)
    again = read_adapter(write_adapter(plain, tmp_path / "plain.safetensors", layout="diffusers"))
    assert again.source_format == "difflora" and not again.skipped  # difflora's header marks it
    assert_same_modules(again, plain)

    tucker = every_layer_adapter(tiny_pipeline, seed=6, tucker=True)
    folded = read_adapter(write_adapter(tucker, tmp_path / "tucker.safetensors", layout="diffusers"))
    cores = [key for key, module in tucker.modules.items() if module.mid is not None]
    assert cores and all(folded.modules[key].mid is None for key in cores)
    for key, module in tucker.modules.items():
        assert folded.modules[key].rank == module.rank and folded.modules[key].weight_shape == module.weight_shape
        torch.testing.assert_close(folded.modules[key].delta_weight(), module.delta_weight(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_plain_diffusers_fuses_a_written_file_of_every_layer_to_the_update_it_holds(tiny_model_dir, tmp_path, layout):
    """diffusers' ``load_lora_weights`` (its own kohya conversion for the kohya layout) then ``fuse_lora`` changes
    exactly the weights the file adapts, by ``delta_weight()``. The kohya file has one rank and alpha and no Tucker
    core: diffusers misapplies kohya files with several (see test_formats) and cannot read ``lora_mid``."""
    pipe = load_pipeline(tiny_model_dir, quiet=True)
    base = {component: {k: v.clone() for k, v in getattr(pipe, component).state_dict().items()}
            for component in ("unet", "text_encoder")}
    state = every_layer_adapter(pipe, seed=7, uniform=layout == "kohya", tucker=layout == "diffusers")
    path = write_adapter(state, tmp_path / "every-layer.safetensors", layout=layout)
    assert isinstance(pipe, StableDiffusionPipeline)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
    for component in ("unet", "text_encoder"):
        assert_weights_moved_by(getattr(pipe, component), base[component], state, component)


def test_peft_loads_a_written_folder_of_every_layer_to_the_update_it_holds(tiny_pipeline, tmp_path):
    from peft import PeftModel

    state = every_layer_adapter(tiny_pipeline, seed=8, tucker=True)
    folder = write_peft_folder(state, tmp_path / "peft")
    config = json.loads((folder / "unet" / "adapter_config.json").read_text())
    assert "down_blocks.0.resnets.0.conv1" in config["target_modules"] and "conv_in" in config["target_modules"]
    assert config["rank_pattern"]["down_blocks.0.resnets.0.conv1"] == 3
    assert config["alpha_pattern"]["down_blocks.0.attentions.0.proj_in"] == 3.0
    again = read_adapter(folder)
    assert again.source_format == "peft" and set(again.modules) == set(state.modules)
    for key, module in state.modules.items():
        torch.testing.assert_close(again.modules[key].delta_weight(), module.delta_weight(), rtol=1e-5, atol=1e-7)
    for component in ("unet", "text_encoder"):
        model = getattr(tiny_pipeline, component)
        base = {k: v.clone() for k, v in model.state_dict().items()}
        merged = PeftModel.from_pretrained(model, str(folder / component)).merge_and_unload()
        assert_weights_moved_by(merged, base, state, component)


def test_peft_loads_the_second_text_encoder_of_sdxl_by_its_own_names(tmp_path):
    """``CLIPTextModelWithProjection`` keeps transformers' ``text_model.`` level and has ``text_projection`` beside
    it: the written folder must name layers so, or PEFT finds none of its weights and changes nothing."""
    from peft import PeftModel

    encoder = CLIPTextModelWithProjection(CLIP).eval()
    generator = torch.Generator().manual_seed(9)
    modules = {}
    for path in ("text_projection", "encoder.layers.1.mlp.fc2", "encoder.layers.0.self_attn.q_proj"):
        weight = encoder.get_submodule(path if path == "text_projection" else f"text_model.{path}").weight
        modules[f"text_encoder_2.{path}"] = LoRAModuleWeights(torch.randn(2, weight.shape[1], generator=generator),
                                                              torch.randn(weight.shape[0], 2, generator=generator), 1.0)
    state = AdapterState(modules=modules)
    folder = write_peft_folder(state, tmp_path / "peft")
    base = {k: v.clone() for k, v in encoder.state_dict().items()}
    merged = PeftModel.from_pretrained(encoder, str(folder / "text_encoder_2")).merge_and_unload()
    renamed = AdapterState(modules={key.replace("text_encoder_2.encoder", "text_encoder_2.text_model.encoder"): module
                                    for key, module in modules.items()})
    assert_weights_moved_by(merged, base, renamed, "text_encoder_2")
    assert_same_modules(read_adapter(folder), state)
