"""Single-file checkpoints: what difflora writes in the original (CompVis/LDM) layout is what diffusers reads back."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from difflora.errors import InvalidArgumentError, ModelLoadError
from difflora.generate import GenerationSettings, generate
from difflora.pipelines import load_pipeline
from difflora.single_file import (
    CLIP_PREFIX,
    OPEN_CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    save_single_file,
    state_dict_to_original,
)

COMPONENTS = ("unet", "vae", "text_encoder")
SETTINGS = GenerationSettings(prompt="a photo of a cat in the snow", steps=3, seed=1, width=64, height=64)


def _assert_same_weights(expected_pipe, actual_pipe):
    for name in COMPONENTS:
        expected = getattr(expected_pipe, name).state_dict()
        actual = getattr(actual_pipe, name).state_dict()
        assert set(actual) == set(expected), name
        for key, tensor in expected.items():
            assert torch.equal(actual[key], tensor), f"{name}.{key}"


def _variant_pipeline(tiny_model_dir) -> StableDiffusionPipeline:
    """Another SD layout: 3 UNet blocks (one without attention), 2 layers per block, 2 transformer layers, linear
    projections and per-block head dims (SD 2.x style), a 2-block VAE with 2 layers, and an OpenCLIP (GELU) text
    encoder; the tiny model's tokenizer and scheduler."""
    tiny = load_pipeline(tiny_model_dir, quiet=True)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        unet = UNet2DConditionModel(
            sample_size=16,
            block_out_channels=(32, 32, 64),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4, 8),
            use_linear_projection=True,
            transformer_layers_per_block=2,
        )
        vae = AutoencoderKL(
            block_out_channels=(32, 64),
            layers_per_block=2,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
        )
        text_config = {**tiny.text_encoder.config.to_dict(), "hidden_act": "gelu", "num_hidden_layers": 3}
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny.tokenizer,
        unet=unet,
        scheduler=tiny.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_model_dir, tmp_path_factory):
    """The tiny model written once as a single-file checkpoint, alone in its folder."""
    pipe = load_pipeline(tiny_model_dir, quiet=True)
    return save_single_file(pipe, tmp_path_factory.mktemp("single-file") / "tiny.safetensors")


@pytest.fixture(scope="module")
def variant_dir(tiny_model_dir, tmp_path_factory):
    """``_variant_pipeline`` saved as a diffusers folder (its architecture's configs for loading single files)."""
    folder = tmp_path_factory.mktemp("variant") / "variant-sd"
    _variant_pipeline(tiny_model_dir).save_pretrained(folder, safe_serialization=True)
    return folder


# ----- round trips through diffusers' single-file loader -----------------------------------------------------------


def test_the_written_checkpoint_loads_as_the_same_model(tiny_model_dir, tiny_checkpoint):
    folder_pipe = load_pipeline(tiny_model_dir, quiet=True)
    file_pipe = load_pipeline(tiny_checkpoint, model_config=tiny_model_dir, quiet=True)
    _assert_same_weights(folder_pipe, file_pipe)
    from_folder = generate(folder_pipe, SETTINGS, output_type="np")
    from_file = generate(file_pipe, SETTINGS, output_type="np")
    assert from_file.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(from_file, from_folder, rtol=0, atol=1e-5)


def test_every_weight_is_read_from_the_file_not_the_config_folder(tiny_pipeline, tiny_model_dir, tmp_path):
    # The folder given as model_config holds weights too; changed weights prove the loaded ones came from the file.
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in COMPONENTS:
            for parameter in getattr(tiny_pipeline, name).parameters():
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    path = save_single_file(tiny_pipeline, tmp_path / "changed.safetensors")
    loaded = load_pipeline(path, model_config=tiny_model_dir, quiet=True)
    _assert_same_weights(tiny_pipeline, loaded)
    folder_pipe = load_pipeline(tiny_model_dir, quiet=True)
    for name in COMPONENTS:
        before = getattr(folder_pipe, name).state_dict()
        after = getattr(loaded, name).state_dict()
        unchanged = [
            key for key, tensor in after.items() if tensor.is_floating_point() and torch.equal(tensor, before[key])
        ]
        assert not unchanged, f"{name}: {unchanged[:3]}"


def test_other_block_layouts_and_an_open_clip_text_encoder_round_trip(tiny_model_dir, variant_dir, tmp_path):
    pipe = load_pipeline(variant_dir, quiet=True)
    path = save_single_file(pipe, tmp_path / "variant.safetensors")
    with safe_open(str(path), framework="pt") as checkpoint:
        keys = set(checkpoint.keys())
    assert f"{OPEN_CLIP_PREFIX}transformer.resblocks.2.attn.in_proj_weight" in keys
    assert f"{UNET_PREFIX}input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight" in keys  # block 1, layer 0, depth 2
    assert f"{UNET_PREFIX}output_blocks.2.1.conv.weight" in keys  # the upsampler of an up block without attention
    assert f"{UNET_PREFIX}output_blocks.5.2.conv.weight" in keys  # ... and of one with attention
    _assert_same_weights(pipe, load_pipeline(path, model_config=variant_dir, quiet=True))


@pytest.mark.parametrize("layout", ["tiny", "variant"])
def test_the_mapping_is_the_exact_inverse_of_diffusers_converters(layout, tiny_model_dir, variant_dir):
    pipe = load_pipeline(tiny_model_dir if layout == "tiny" else variant_dir, quiet=True)
    original = state_dict_to_original(pipe)
    text_encoder = pipe.text_encoder
    if layout == "variant":
        text_state = convert_open_clip_checkpoint(text_encoder, original, prefix=OPEN_CLIP_PREFIX)
    else:
        text_state = convert_ldm_clip_checkpoint(original)
    converted = {
        "unet": convert_ldm_unet_checkpoint(original, dict(pipe.unet.config)),
        "vae": convert_ldm_vae_checkpoint(original, dict(pipe.vae.config)),
        # transformers >= 5.6 dropped the text_model level that the file (and older transformers) have.
        "text_encoder": {
            key if key in text_encoder.state_dict() else key.removeprefix("text_model."): tensor
            for key, tensor in text_state.items()
        },
    }
    for name in COMPONENTS:
        expected = getattr(pipe, name).state_dict()
        assert set(converted[name]) == set(expected), name
        for key, tensor in expected.items():
            assert torch.equal(converted[name][key], tensor), f"{name}.{key}"


# ----- the file -----------------------------------------------------------------------------------------------------


def test_the_file_is_one_safetensors_in_the_original_layout(tiny_checkpoint, tiny_model_dir):
    assert [entry.name for entry in tiny_checkpoint.parent.iterdir()] == [tiny_checkpoint.name]  # no temporary left
    with safe_open(str(tiny_checkpoint), framework="pt") as checkpoint:
        assert checkpoint.metadata() == {"format": "pt"}
        shapes = {key: tuple(checkpoint.get_slice(key).get_shape()) for key in checkpoint.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
    prefixes = (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX)
    assert all(key.startswith(prefixes) for key in shapes)
    pipe = load_pipeline(tiny_model_dir, quiet=True)
    for prefix, name in zip(prefixes, COMPONENTS):
        written = [key for key in shapes if key.startswith(prefix)]
        assert len(written) == len(getattr(pipe, name).state_dict()), name
    # The tiny UNet (2 blocks, 1 layer each) in LDM's numbering, the VAE's 1x1-conv attention, and the key diffusers
    # recognises SD 1.x's CLIP by.
    assert shapes[f"{UNET_PREFIX}input_blocks.0.0.weight"] == (32, 4, 3, 3)
    assert shapes[f"{UNET_PREFIX}input_blocks.2.0.op.weight"] == (32, 32, 3, 3)
    assert shapes[f"{UNET_PREFIX}input_blocks.3.0.skip_connection.weight"] == (64, 32, 1, 1)
    assert shapes[f"{UNET_PREFIX}middle_block.1.transformer_blocks.0.attn2.to_k.weight"] == (64, 32)
    assert shapes[f"{UNET_PREFIX}middle_block.2.emb_layers.1.weight"] == (64, 128)
    assert shapes[f"{UNET_PREFIX}output_blocks.1.2.conv.weight"] == (64, 64, 3, 3)
    assert shapes[f"{UNET_PREFIX}out.2.weight"] == (4, 32, 3, 3)
    assert shapes[f"{VAE_PREFIX}encoder.mid.attn_1.q.weight"] == (64, 64, 1, 1)
    assert shapes[f"{VAE_PREFIX}decoder.mid.attn_1.proj_out.weight"] == (64, 64, 1, 1)
    assert shapes[f"{VAE_PREFIX}decoder.up.0.block.0.nin_shortcut.weight"] == (32, 64, 1, 1)  # LDM's up.0 is last
    assert shapes[f"{VAE_PREFIX}decoder.up.2.upsample.conv.weight"] == (64, 64, 3, 3)
    assert shapes[f"{CLIP_PREFIX}embeddings.position_embedding.weight"] == (77, 32)


def test_dtype_casts_the_floating_weights(tiny_pipeline, tmp_path):
    path = save_single_file(tiny_pipeline, tmp_path / "half.safetensors", dtype=torch.float16)
    written = load_file(path)
    original = state_dict_to_original(tiny_pipeline)
    assert set(written) == set(original)
    for key, tensor in original.items():
        assert written[key].dtype == torch.float16, key
        assert torch.equal(written[key], tensor.to(torch.float16)), key


# ----- failures -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rename",
    [
        pytest.param(lambda key: key.replace(UNET_PREFIX, "model.diffusion_model_x."), id="all-unet-keys"),
        pytest.param(lambda key: key.replace(".output_blocks.", ".outputblocks."), id="output-blocks"),
        pytest.param(lambda key: key.replace("input_blocks.1.0.in_layers.0.", "input_blocks.1.0.in_layer0."), id="one"),
    ],
)
def test_a_checkpoint_with_corrupted_unet_keys_gives_one_line_naming_the_file(
    rename, tiny_checkpoint, tiny_model_dir, tmp_path
):
    broken = tmp_path / "broken.safetensors"
    save_file({rename(key): tensor for key, tensor in load_file(tiny_checkpoint).items()}, str(broken))
    with pytest.raises(ModelLoadError) as caught:
        load_pipeline(broken, model_config=tiny_model_dir, quiet=True)
    message = str(caught.value)
    assert str(broken) in message
    assert "\n" not in message


def test_refuses_a_unet_with_weights_the_original_layout_cannot_hold(tiny_pipeline, tmp_path):
    tiny_pipeline.unet = UNet2DConditionModel(
        **{**tiny_pipeline.unet.config, "class_embed_type": "timestep"}
    )  # LDM keeps a class embedding only in models StableDiffusionPipeline does not run
    with pytest.raises(InvalidArgumentError, match="class_embedding") as caught:
        save_single_file(tiny_pipeline, tmp_path / "refused.safetensors")
    assert "\n" not in str(caught.value)
    assert not list(tmp_path.iterdir())


def test_refuses_what_is_not_a_stable_diffusion_pipeline(tiny_pipeline, tmp_path):
    not_sd = SimpleNamespace(unet=torch.nn.Linear(2, 2), vae=tiny_pipeline.vae, text_encoder=tiny_pipeline.text_encoder)
    with pytest.raises(InvalidArgumentError, match="unet is Linear, expected UNet2DConditionModel"):
        state_dict_to_original(not_sd)
    with pytest.raises(InvalidArgumentError, match=r"\.safetensors"):
        save_single_file(tiny_pipeline, tmp_path / "model.ckpt")
    assert not list(tmp_path.iterdir())
