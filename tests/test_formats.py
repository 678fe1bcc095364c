"""Adapter files: difflora's own, what diffusers and PEFT write, the legacy layouts, and bad files."""

import json
import pickle
import re

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

import difflora.formats as formats
from difflora import LoRARuntime
from difflora.errors import AdapterFileError, DiffloraError
from difflora.adapter import AdapterState, LoRAModuleWeights
from difflora.formats import read_adapter, write_adapter
from difflora.reports import describe_adapter
from difflora.generate import GenerationSettings, generate
from difflora.pipelines import load_pipeline
from helpers import random_adapter

SETTINGS = GenerationSettings(prompt="an oil painting of a lighthouse", steps=3, guidance=5.0, seed=3, width=64,
                              height=64)
ONE_LEVEL = 1 / 255


def image(pipe):
    return generate(pipe, SETTINGS, output_type="np")[0]


@pytest.fixture
def pipe(tiny_model_dir):
    return load_pipeline(tiny_model_dir, quiet=True)


def mixed_adapter(pipe) -> AdapterState:
    """Non-zero factors, alpha ≠ rank, and a few modules with another rank and alpha (rank/alpha patterns)."""
    state = random_adapter(pipe, rank=4, alpha=8, seed=1)
    generator = torch.Generator().manual_seed(2)
    for index, key in enumerate(sorted(state.modules)):
        if index % 5 == 0:  # some modules: rank 2, alpha 3
            module = state.modules[key]
            state.modules[key] = LoRAModuleWeights(
                torch.randn(2, module.down.shape[1], generator=generator) * 0.1,
                torch.randn(module.up.shape[0], 2, generator=generator) * 0.1,
                alpha=3.0,
            )
    return state


def test_difflora_file_round_trips_and_carries_metadata(pipe, tmp_path):
    state = mixed_adapter(pipe)
    path = write_adapter(state, tmp_path / "style.safetensors", {"difflora.base_model": "embedded"})
    again = read_adapter(path)
    assert again.source_format == "difflora"
    assert set(again.modules) == set(state.modules)
    for key, module in state.modules.items():
        other = again.modules[key]
        assert torch.equal(other.down, module.down) and torch.equal(other.up, module.up)
        assert other.alpha == module.alpha and other.scale == module.scale
    with safe_open(str(path), "pt") as handle:
        header = handle.metadata()
    assert header["difflora.base_model"] == "embedded"
    assert json.loads(header["difflora.ranks"]) == [2, 4]
    assert json.loads(header["difflora.alphas"]) == [3.0, 8.0]
    assert json.loads(header["difflora.targets"])["unet"] == ["to_k", "to_out.0", "to_q", "to_v"]
    assert "difflora.version" in header and "lora_adapter_metadata" in header
    summary = describe_adapter(again)
    assert summary["modules_per_component"] == {"text_encoder": 8, "unet": 56}
    assert summary["ranks"] == [2, 4] and summary["format"] == "difflora"


def test_plain_diffusers_loads_difflora_file_at_the_right_scale(tiny_model_dir, pipe, tmp_path):
    state = mixed_adapter(pipe)
    path = write_adapter(state, tmp_path / "style.safetensors")
    runtime = LoRARuntime.attach(pipe)
    runtime.load(path, weight=1.0)
    ours = image(pipe)

    plain = load_pipeline(tiny_model_dir, quiet=True)
    base = image(plain)
    plain.load_lora_weights(str(path))
    theirs = image(plain)
    assert abs(ours - theirs).max() <= ONE_LEVEL
    assert abs(ours - base).max() > 10 * ONE_LEVEL  # the adapter is visible, so equality means something


def write_with_diffusers(pipe, folder, rank, alpha, with_metadata):
    """A LoRA file as diffusers' training scripts write it (PEFT adapters, then save_lora_weights)."""
    unet_config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False,
                             target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    text_config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False,
                             target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    torch.manual_seed(5)
    pipe.unet.add_adapter(unet_config)
    pipe.text_encoder.add_adapter(text_config)
    extra = {}
    if with_metadata:
        extra = {"unet_lora_adapter_metadata": unet_config.to_dict(),
                 "text_encoder_lora_adapter_metadata": text_config.to_dict()}
    type(pipe).save_lora_weights(
        str(folder),
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        **extra,
    )
    return folder / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("with_metadata", [True, False], ids=["new-scripts", "old-scripts"])
def test_diffusers_peft_file_loads_into_difflora(tiny_model_dir, tmp_path, with_metadata):
    writer = load_pipeline(tiny_model_dir, quiet=True)
    # Old scripts wrote no alpha: diffusers then assumes alpha = rank, so such files are trained with alpha = rank.
    rank, alpha = (4, 8) if with_metadata else (4, 4)
    path = write_with_diffusers(writer, tmp_path, rank, alpha, with_metadata)

    plain = load_pipeline(tiny_model_dir, quiet=True)
    plain.load_lora_weights(str(path))
    theirs = image(plain)

    ours_pipe = load_pipeline(tiny_model_dir, quiet=True)
    info = LoRARuntime.attach(ours_pipe).load(tmp_path)  # the folder works as well as the file
    assert info.module_count == 64 and info.alphas == (float(alpha),)
    ours = image(ours_pipe)
    assert abs(ours - theirs).max() <= ONE_LEVEL
    assert abs(ours - image(load_pipeline(tiny_model_dir, quiet=True))).max() > 10 * ONE_LEVEL


def test_legacy_layouts_read_as_the_same_adapter(pipe, tmp_path):
    state = mixed_adapter(pipe)
    legacy, old = {}, {}
    for key, module in state.modules.items():
        component, _, path = key.partition(".")
        if component == "unet":
            if path.endswith(".to_out.0"):
                block, projection = path.removesuffix(".to_out.0"), "to_out"
            else:
                block, projection = path.rsplit(".", 1)
            legacy[f"unet.{block}.processor.{projection}_lora.down.weight"] = module.down
            legacy[f"unet.{block}.processor.{projection}_lora.up.weight"] = module.up
        else:
            legacy[f"text_encoder.text_model.{path}.lora_linear_layer.down.weight"] = module.down
            legacy[f"text_encoder.text_model.{path}.lora_linear_layer.up.weight"] = module.up
        old[f"{key}.lora.down.weight"] = module.down
        old[f"{key}.lora.up.weight"] = module.up
        old[f"{key}.alpha"] = torch.tensor(module.alpha)
    save_file(legacy, str(tmp_path / "legacy.safetensors"))
    save_file(old, str(tmp_path / "old.safetensors"))

    from_legacy = read_adapter(tmp_path / "legacy.safetensors")
    from_old = read_adapter(tmp_path / "old.safetensors")
    assert from_legacy.source_format == "diffusers-attn-procs" and from_old.source_format == "diffusers-old"
    assert set(from_legacy.modules) == set(state.modules) == set(from_old.modules)
    for key, module in state.modules.items():
        for read in (from_legacy, from_old):
            assert torch.equal(read.modules[key].down, module.down) and torch.equal(read.modules[key].up, module.up)
            assert not read.modules[key].use_rslora
        assert from_legacy.modules[key].alpha == module.rank  # no alpha in the legacy files: alpha = rank
        assert from_old.modules[key].alpha == module.alpha


def test_unreadable_keys_are_reported_not_dropped(pipe, tmp_path):
    """A module's factors beside a LoRA bias (PEFT's ``lora_bias``) are another update: the whole module is skipped,
    named key by key, and the rest of the file is read."""
    state = mixed_adapter(pipe)
    tensors = formats.to_diffusers_state_dict(state)
    biased = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    tensors[f"{biased}.lora_B.bias"] = torch.ones(32)
    save_file(tensors, str(tmp_path / "biased.safetensors"))
    loaded = read_adapter(tmp_path / "biased.safetensors")
    assert sorted(loaded.skipped) == [f"{biased}.lora_A.weight", f"{biased}.lora_B.bias", f"{biased}.lora_B.weight"]
    assert set(loaded.modules) == set(state.modules) - {biased}


TO_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def file_with(folder, name, contents):
    """``folder/name`` holding ``contents``: bytes as they are, a dict of tensors as a safetensors file."""
    path = folder / name
    if isinstance(contents, bytes):
        path.write_bytes(contents)
    else:
        save_file(contents, str(path))
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.safetensors", "no such file"),
        (lambda d: file_with(d, "model.bin", b"\x80\x02"), "pickle"),
        (lambda d: file_with(d, "model.ckpt", b"\x80\x02"), "pickle"),
        (lambda d: file_with(d, "garbage.safetensors", b"not a safetensors file at all"), "not a readable safetensors"),
        (lambda d: file_with(d, "foo.safetensors", {"foo.weight": torch.ones(2)}), "no LoRA keys"),
        (lambda d: file_with(d, "half.safetensors", {f"{TO_Q}.lora_A.weight": torch.ones(2, 32)}), "no up factor"),
        (lambda d: d, "no pytorch_lora_weights"),
        (
            lambda d: file_with(
                d, "rank0.safetensors",
                {f"{TO_Q}.lora_A.weight": torch.ones(0, 32), f"{TO_Q}.lora_B.weight": torch.ones(32, 0)},
            ),
            "has empty factors of shapes (0, 32) and (32, 0)",
        ),
    ],
    ids=["missing", "bin", "ckpt", "garbage", "no-lora-keys", "half-module", "empty-folder", "rank-zero"],
)
def test_bad_files_give_one_line_errors(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(AdapterFileError) as error:
        read_adapter(path)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert str(path) in str(error.value)


KOHYA_TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def pair(down, up, name=TO_Q, spelling="diffusers"):
    """One module's factors in a dialect's spelling."""
    if spelling == "kohya":
        return {f"{KOHYA_TO_Q}.lora_down.weight": down, f"{KOHYA_TO_Q}.lora_up.weight": up}
    return {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}


NAN_DOWN = torch.ones(2, 32).index_fill_(1, torch.tensor([5]), float("nan"))
GOOD = pair(torch.ones(2, 32), torch.ones(32, 2))
GOOD_KOHYA = pair(torch.ones(2, 32), torch.ones(32, 2), spelling="kohya")
META = "lora_adapter_metadata"
MODULE = f"module {TO_Q!r} "  # how an error names the module at fault


@pytest.mark.parametrize(
    "tensors, header, message",
    [
        (pair(NAN_DOWN, torch.ones(32, 2)), {}, MODULE + "holds NaN or inf values"),
        (pair(torch.ones(2, 32), torch.full((32, 2), float("-inf")), spelling="kohya"), {}, MODULE + "holds NaN"),
        (pair(torch.ones(2, 32, 1), torch.ones(32, 2, 1), spelling="kohya"), {}, MODULE + "has factors of shapes (2,"),
        (pair(torch.ones(2, 32, 3, 3), torch.ones(32, 2, 3, 3), spelling="kohya"), {}, "4-D conv factors (up 1 × 1)"),
        (pair(torch.ones(2, 32, dtype=torch.int32), torch.ones(32, 2, dtype=torch.int32)), {},
         MODULE + "has factors of type torch.int32 and torch.int32, expected floating point"),
        (pair(torch.ones(2, 32), torch.ones(32, 2, dtype=torch.complex64)), {}, "expected floating point"),
        ({**GOOD, f"{TO_Q}.alpha": torch.tensor(0.0)}, {}, MODULE + "has alpha 0, which tools read differently"),
        ({**GOOD, f"{TO_Q}.alpha": torch.tensor(float("inf"))}, {}, MODULE + "has alpha inf, expected a finite number"),
        ({**GOOD, f"{TO_Q}.alpha": torch.ones(3)}, {}, MODULE + "has an alpha of shape (3,)"),
        ({**GOOD_KOHYA, f"{KOHYA_TO_Q}.alpha": torch.ones(0)}, {}, MODULE + "has an alpha of shape (0,)"),
        (GOOD, {META: '{"unet.lora_alpha": NaN}'}, MODULE + "has alpha nan"),
        (GOOD, {META: '{"unet.lora_alpha": "8"}'}, MODULE + "has LoraConfig alpha '8', not a number"),
        (GOOD, {META: '{"unet.alpha_pattern": ["to_q"]}'}, "LoraConfig alpha_pattern is a list, not a mapping"),
        (GOOD, {META: '{"unet.alpha_pattern": {"(": 4}}'}, "alpha_pattern has a key that is not a regular expression"),
        (GOOD, {META: "{'unet.r': 2}"}, f"header entry {META!r} is not JSON"),
        (GOOD, {META: '"unet"'}, f"header entry {META!r} is not a JSON object (got str)"),
    ],
    ids=["nan", "kohya-inf", "kohya-3d", "kohya-up-3x3", "int32", "complex", "alpha-zero", "alpha-inf", "alpha-vector",
         "kohya-alpha-empty",
         "config-alpha-nan", "config-alpha-string", "alpha-pattern-list", "alpha-pattern-regex", "metadata-not-json",
         "metadata-not-object"],
)
def test_unusable_contents_are_refused_naming_the_source_and_module(tensors, header, message):
    """parse_state_dict is where every file's contents are checked, whatever its dialect: NaN or inf, factors that
    are no matrices or not floating point, an alpha that is 0, not finite or no number at all, and a
    LoraConfig header difflora cannot read. The error is one line naming the file (and the module at fault); nothing
    reaches the caller as a torch or JSON traceback."""
    with pytest.raises(AdapterFileError) as error:
        formats.parse_state_dict(tensors, header, source="hostile.safetensors")
    text = str(error.value)
    assert text.startswith("hostile.safetensors: ") and message in text and "\n" not in text


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_low_precision_factors_are_read_and_their_nan_refused(dtype, tmp_path):
    """Files in every floating type safetensors holds are read (torch has no isfinite for float8 e4m3, so the check
    must not call it there), and a NaN in them is still refused."""
    down, up = torch.full((2, 32), 0.5).to(dtype), torch.full((32, 2), 0.25).to(dtype)
    path = file_with(tmp_path, "low.safetensors", pair(down, up))
    assert read_adapter(path).modules[TO_Q].down.dtype == dtype
    down[1, 1] = float("nan")
    path = file_with(tmp_path, "low-nan.safetensors", pair(down, up))
    with pytest.raises(AdapterFileError, match="holds NaN or inf values"):
        read_adapter(path)


def test_a_renamed_checkpoint_is_named_as_a_pickle_and_never_opened(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    bare = file_with(tmp_path, "bare.safetensors", pickle.dumps({"hook": Payload()}, protocol=2))
    zipped = tmp_path / "zipped.safetensors"
    torch.save({"hook": Payload()}, zipped)
    for path, kind in ((bare, "holds a pickle"), (zipped, "holds a zip archive (what torch.save writes)")):
        with pytest.raises(AdapterFileError, match=re.escape(f"{path}: {kind}, not safetensors")):
            read_adapter(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "config, message",
    [(b'{"r": 2, "lora_alpha"', "not a readable PEFT config"), (b"\xff\xfe{}", "not a readable PEFT config"),
     (b'["r", 2]', "not a PEFT config (a JSON object), got a list")],
    ids=["truncated", "not-utf8", "list"],
)
def test_peft_config_that_is_not_a_json_object_names_the_file(tmp_path, config, message):
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes(config)
    save_file({"base_model.model.down_blocks.0.attn1.to_q.lora_A.weight": torch.ones(2, 32)},
              str(folder / "adapter_model.safetensors"))
    with pytest.raises(AdapterFileError) as error:
        read_adapter(folder)
    assert str(error.value).startswith(f"{folder / 'adapter_config.json'}: {message}")


def test_truncated_file_is_refused(pipe, tmp_path):
    path = write_adapter(mixed_adapter(pipe), tmp_path / "full.safetensors")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="not a readable safetensors") as error:
        read_adapter(truncated)
    assert "\n" not in str(error.value)


def test_failed_write_leaves_no_file(pipe, tmp_path, monkeypatch):
    state = mixed_adapter(pipe)
    target = tmp_path / "out.safetensors"
    write_adapter(state, target)
    before = target.read_bytes()

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(formats, "save_file", failing_save)
    with pytest.raises((OSError, DiffloraError)):  # how the failure is worded is _files.py's; here: nothing is left
        write_adapter(state, target)
    assert target.read_bytes() == before  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]  # no temporary left behind
    with pytest.raises(AdapterFileError, match=".safetensors"):
        write_adapter(state, tmp_path / "out.bin")


def test_kohya_file_with_alpha_not_rank_equals_merged_weights(pipe, tiny_model_dir, tmp_path):
    from difflora.formats import to_kohya_state_dict

    state = mixed_adapter(pipe)  # alphas 8 and 3 on ranks 4 and 2
    tensors = to_kohya_state_dict(state)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha" in tensors
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    # What difflora cannot apply must be reported, not dropped: a norm diff (its alpha too), a module mixing two
    # algorithms, an unknown layer.
    cannot = {
        "lora_unet_mid_block_attentions_0_norm.w_norm": torch.ones(64),
        "lora_unet_mid_block_attentions_0_norm.alpha": torch.tensor(4.0),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.ones(4, 32, 3, 3),
        "lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": torch.ones(32, 4),
        "lora_unet_down_blocks_0_resnets_0_shortcut.lora_down.weight": torch.ones(4, 32, 1, 1),
    }
    tensors.update(cannot)
    save_file(tensors, str(tmp_path / "kohya.safetensors"), metadata={"ss_network_dim": "4", "ss_network_alpha": "8"})
    loaded = read_adapter(tmp_path / "kohya.safetensors")
    assert loaded.source_format == "kohya" and sorted(loaded.skipped) == sorted(cannot)
    assert loaded.metadata["ss_network_alpha"] == "8"

    LoRARuntime.attach(pipe).add_adapter("kohya", loaded)
    reference = load_pipeline(tiny_model_dir, quiet=True)
    with torch.no_grad():
        for key, module in state.modules.items():
            component, _, path = key.partition(".")
            layer = getattr(reference, component).get_submodule(path)
            layer.weight += (module.alpha / module.rank) * (module.up @ module.down)
    assert abs(image(pipe) - image(reference)).max() < 1e-5


def test_difflora_to_kohya_round_trips_losslessly(pipe, tmp_path):
    state = mixed_adapter(pipe)
    path = write_adapter(state, tmp_path / "kohya.safetensors", layout="kohya")
    again = read_adapter(path)
    assert again.source_format == "kohya" and not again.skipped
    for key, module in state.modules.items():
        assert torch.equal(again.modules[key].down, module.down) and torch.equal(again.modules[key].up, module.up)
        assert again.modules[key].scale == pytest.approx(module.scale, rel=1e-7)


def test_difflora_to_kohya_loads_in_plain_diffusers(pipe, tiny_model_dir, tmp_path):
    # One rank and one alpha (≠ rank) for every module: diffusers 0.42's kohya loader misapplies files whose
    # modules have different ranks or alphas (measured here: up to 0.047 off), which A1111 and ComfyUI read per
    # module; difflora's own reading of such files is checked against merged weights above.
    state = random_adapter(pipe, rank=4, alpha=8, seed=4)
    path = write_adapter(state, tmp_path / "kohya.safetensors", layout="kohya")
    with safe_open(str(path), "pt") as handle:
        header = handle.metadata()
        assert all(key.startswith(("lora_unet_", "lora_te_")) for key in handle.keys())
    assert header["ss_network_dim"] == "4" and header["ss_network_alpha"] == "8"
    assert header["modelspec.architecture"] == "stable-diffusion-v1/lora"

    LoRARuntime.attach(pipe).add_adapter("ours", state)
    plain = load_pipeline(tiny_model_dir, quiet=True)
    plain.load_lora_weights(str(path))
    assert abs(image(pipe) - image(plain)).max() <= ONE_LEVEL


def test_peft_folder_round_trip_and_peft_loads_it(pipe, tiny_model_dir, tmp_path):
    from peft import PeftModel

    from difflora.formats import write_peft_folder

    state = mixed_adapter(pipe)  # rank and alpha patterns must survive
    folder = write_peft_folder(state, tmp_path / "peft")
    assert sorted(p.name for p in folder.iterdir()) == ["text_encoder", "unet"]
    again = read_adapter(folder)
    assert again.source_format == "peft" and set(again.modules) == set(state.modules)
    for key, module in state.modules.items():
        assert torch.equal(again.modules[key].down, module.down) and torch.equal(again.modules[key].up, module.up)
        assert again.modules[key].scale == module.scale
    assert read_adapter(folder / "unet").modules_per_component() == {"unet": 56}  # one component folder alone

    # peft.PeftModel itself loads each component folder and computes what difflora computes.
    ours = load_pipeline(tiny_model_dir, quiet=True)
    LoRARuntime.attach(ours).add_adapter("a", state)
    reference = load_pipeline(tiny_model_dir, quiet=True)
    unet = PeftModel.from_pretrained(reference.unet, str(folder / "unet"))
    text_encoder = PeftModel.from_pretrained(reference.text_encoder, str(folder / "text_encoder"))
    ids = ours.tokenizer(["a harbour at night"], padding="max_length", return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_context = ours.text_encoder(ids)[0]
        torch.testing.assert_close(text_encoder(input_ids=ids)[0], ours_context, rtol=0, atol=1e-5)
        torch.testing.assert_close(unet(latents, 10, ours_context).sample, ours.unet(latents, 10, ours_context).sample,
                                   rtol=0, atol=1e-5)
    with pytest.raises(AdapterFileError, match="exists"):
        write_peft_folder(state, folder)


def test_written_files_get_the_usual_permissions(pipe, tmp_path):
    import os
    import stat

    state = random_adapter(pipe, rank=2, alpha=2, seed=1, components=("unet",))
    path = write_adapter(state, tmp_path / "a.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_kohya_sdxl_keys_map_to_diffusers_modules():
    """SDXL kohya files name UNet blocks in the original layout; the attention modules map onto diffusers' names
    (SDXL: down blocks 1-2 and up blocks 0-1 hold attention, two layers down and three up, ten transformer blocks)."""
    cases = {  # kohya name → difflora module key
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_k":
            "unet.down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k",
        "lora_unet_input_blocks_8_1_transformer_blocks_9_attn1_to_out_0":
            "unet.down_blocks.2.attentions.1.transformer_blocks.9.attn1.to_out.0",
        "lora_unet_middle_block_1_transformer_blocks_3_attn2_to_v":
            "unet.mid_block.attentions.0.transformer_blocks.3.attn2.to_v",
        "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q":
            "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_out_0":
            "unet.up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_out.0",
        "lora_te2_text_model_encoder_layers_31_self_attn_out_proj":
            "text_encoder_2.encoder.layers.31.self_attn.out_proj",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
            "text_encoder.encoder.layers.0.self_attn.q_proj",
    }
    tensors = {}
    for name in cases:
        tensors[f"{name}.lora_down.weight"] = torch.ones(4, 8)
        tensors[f"{name}.lora_up.weight"] = torch.ones(8, 4)
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    tensors["lora_unet_input_blocks_4_0_in_layers_0.w_norm"] = torch.ones(8)  # a norm diff on a resnet's GroupNorm
    state = formats.parse_state_dict(tensors, {}, source="sdxl.safetensors")
    assert set(state.modules) == set(cases.values())
    assert state.skipped == ["lora_unet_input_blocks_4_0_in_layers_0.w_norm"]
    assert all(module.alpha == 2.0 for module in state.modules.values())


def test_a_negative_alpha_is_read_as_written():
    # A negative alpha flips the update's sign; A1111 and ComfyUI apply it so, and so does difflora (alpha 0, which
    # tools read differently, is refused above).
    tensors = {**GOOD_KOHYA, f"{KOHYA_TO_Q}.alpha": torch.tensor(-4.0)}
    state = formats.parse_state_dict(tensors, {}, source="negative.safetensors")
    (module,) = state.modules.values()
    assert module.alpha == -4.0 and module.scale == -2.0


# ----- use_rslora as exporters write it -----------------------------------------------------------------------------

RSLORA_KEY = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def rslora_sources(tmp_path, written) -> list:
    """The same rank-4, alpha-8 module as a diffusers file (``lora_adapter_metadata``) and a PEFT folder
    (``adapter_config.json``), each with ``use_rslora`` written as ``written``."""
    generator = torch.Generator().manual_seed(4)
    down, up = torch.randn(4, 32, generator=generator), torch.randn(32, 4, generator=generator)
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["to_q"], "use_rslora": written}
    file = tmp_path / "diffusers.safetensors"
    header = json.dumps({f"unet.{option}": value for option, value in config.items()})
    save_file({f"{RSLORA_KEY}.lora_A.weight": down, f"{RSLORA_KEY}.lora_B.weight": up}, str(file),
              metadata={"format": "pt", "lora_adapter_metadata": header})
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    path = RSLORA_KEY.removeprefix("unet.")
    save_file({f"base_model.model.{path}.lora_A.weight": down, f"base_model.model.{path}.lora_B.weight": up},
              str(folder / "adapter_model.safetensors"))
    return [file, folder]


@pytest.mark.parametrize("written, use_rslora", [
    (True, True), (False, False), ("false", False), ("False", False), ("TRUE", True), ("true", True),
])
def test_use_rslora_is_read_as_the_exporter_meant_it(written, use_rslora, tmp_path):
    for source in rslora_sources(tmp_path, written):
        module = read_adapter(source).modules[RSLORA_KEY]
        assert module.use_rslora is use_rslora, source
        assert module.scale == (8 / 2 if use_rslora else 8 / 4)  # alpha/√rank or alpha/rank


@pytest.mark.parametrize("written", ["no", "0", 1, None, ["true"]])
def test_a_use_rslora_that_is_not_true_or_false_is_refused_naming_the_file(written, tmp_path):
    for source in rslora_sources(tmp_path, written):
        with pytest.raises(AdapterFileError) as caught:
            read_adapter(source)
        assert str(caught.value) == f"{source}: LoraConfig use_rslora is {written!r}, expected true or false"
