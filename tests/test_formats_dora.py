"""PEFT's and diffusers' DoRA (``lora_magnitude_vector``), read and written: adapters made by PEFT itself
(``LoraConfig(use_dora=True)``) and saved by PEFT's and diffusers' own save functions are applied by difflora as PEFT
computes them and as a merge written here does; what difflora writes is applied by diffusers' ``load_lora_weights``
and PEFT's ``from_pretrained`` as difflora applies it; kohya's ``dora_scale`` carries the same update both ways; and
what PEFT cannot hold, or a file that disagrees with itself, is refused in one line."""

import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import save_file

from difflora import LoRARuntime
from difflora.adapter import AdapterState, LoRAModuleWeights
from difflora.errors import AdapterFileError
from difflora.formats import read_adapter, write_adapter, write_peft_folder
from difflora.generate import GenerationSettings, generate
from difflora.pipelines import load_pipeline
from helpers import outputs

# Every kind of layer PEFT's DoRA adapts on the tiny model: an attention projection (difflora's processor), the
# attention output, a Linear, a 1×1 conv (SD 1.x's proj_in), a 3×3 conv, and CLIP's attention and MLP.
UNET_CONFIG = dict(r=2, lora_alpha=3, use_dora=True, alpha_pattern={"conv1": 5},
                   target_modules=["to_q", "to_out.0", "time_emb_proj", "proj_in", "conv1"])
TEXT_CONFIG = dict(r=4, lora_alpha=3, use_dora=True, use_rslora=True, target_modules=["k_proj", "fc1"])
PROBE = "down_blocks.0.resnets.0.conv1"


@pytest.fixture
def fresh(tiny_model_dir):
    """A new tiny pipeline per call (fp32, CPU)."""
    return lambda: load_pipeline(tiny_model_dir, quiet=True)


def draw(*size, seed):
    return torch.randn(*size, generator=torch.Generator().manual_seed(seed))


def trained_looking(model: torch.nn.Module, seed: int) -> None:
    """Give every DoRA layer of ``model`` what training leaves: lora_B non-zero (PEFT starts it at 0, which would
    change nothing) and magnitudes moved off the weight norms PEFT starts them at."""
    with torch.no_grad():
        for index, module in enumerate(m for m in model.modules() if isinstance(m, LoraLayer)):
            for factors in (module.lora_A["default"], module.lora_B["default"]):
                factors.weight.copy_(draw(*factors.weight.shape, seed=seed + 3 * index) * 0.3)
            magnitude = module.lora_magnitude_vector["default"].weight
            magnitude.mul_(1 + 0.3 * draw(*magnitude.shape, seed=seed + 3 * index + 2).tanh())


def with_peft_dora(pipe, how: str, seed: int = 0):
    """``pipe`` with trained-looking PEFT DoRA adapters on its UNet and text encoder, injected the way PEFT's users
    (``get_peft_model``) or diffusers' training scripts (``add_adapter``) do; returns the two PEFT models (or the
    two models themselves)."""
    models = []
    for model, config in ((pipe.unet, UNET_CONFIG), (pipe.text_encoder, TEXT_CONFIG)):
        if how == "peft":
            models.append(get_peft_model(model, LoraConfig(**config)))
        else:
            model.add_adapter(LoraConfig(**config))
            models.append(model)
        trained_looking(model, seed)
    return models


def assert_close(ours, reference, base):
    """Equal within 1e-5 of the adapter's effect on each output, and the effect is real."""
    for mine, theirs, before in zip(ours, reference, base):
        effect = float((theirs - before).abs().max())
        assert effect > 1e-3, effect
        assert float((mine - theirs).abs().max()) <= 1e-5 * max(1.0, effect), (float((mine - theirs).abs().max()),
                                                                                effect)


def merged_by_hand(peft_pipe, reference, configs=(UNET_CONFIG, TEXT_CONFIG)) -> None:
    """Write into ``reference``'s weights DoRA's weight from the tensors of ``peft_pipe``'s PEFT layers:
    ``W' = g ⊙ V / ‖V‖``, ``V = W + s·B A``, the norm over every axis but the output row, ``s = alpha / r``
    (``/ sqrt(r)`` under rsLoRA, alpha from the config's pattern)."""
    for component, config in zip(("unet", "text_encoder"), configs):
        ours, theirs = getattr(peft_pipe, component), getattr(reference, component)
        for name, layer in ours.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            path = name.removeprefix("base_model.model.")
            alpha = next((a for pattern, a in config.get("alpha_pattern", {}).items() if path.endswith(pattern)),
                         config["lora_alpha"])
            scale = alpha / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
            weight = layer.get_base_layer().weight.detach()
            down, up = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
            direction = weight + scale * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
            norms = direction.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.ndim - 1))
            magnitude = layer.lora_magnitude_vector["default"].weight.detach().reshape(norms.shape)
            with torch.no_grad():
                theirs.get_submodule(path).weight.copy_(magnitude * direction / norms)


def applied_by_difflora(pipe, state, weight: float = 1.0):
    LoRARuntime.attach(pipe).add_adapter("dora", state, weight=weight)
    return outputs(pipe)


def image(pipe):
    settings = GenerationSettings(prompt="an oil painting of a lighthouse", steps=3, guidance=5.0, seed=3, width=64,
                                  height=64)
    return generate(pipe, settings, output_type="np")[0]


def test_a_peft_dora_folder_is_applied_as_peft_computes_it(fresh, tmp_path):
    """``PeftModel.save_pretrained`` folders (rsLoRA, an alpha pattern, Linear, 1×1 and 3×3 convs, CLIP): read as
    DoRA, applied equal to PEFT's own forward and to a merge written here."""
    base = outputs(fresh())
    peft_pipe = fresh()
    for component, model in zip(("unet", "text_encoder"), with_peft_dora(peft_pipe, "peft")):
        model.save_pretrained(tmp_path / component)
    theirs = outputs(peft_pipe)

    state = read_adapter(tmp_path)  # one PEFT folder per component
    assert state.kinds() == ["lora+dora"] and not state.skipped
    assert set(state.modules) == {f"{component}.{name}" for component in ("unet", "text_encoder")
                                  for name, module in getattr(peft_pipe, component).named_modules()
                                  if isinstance(module, LoraLayer)}
    assert tuple(state.modules[f"unet.{PROBE}"].dora_scale.shape) == (32,)  # PEFT's (1, 32, 1, 1), per output row
    assert_close(applied_by_difflora(fresh(), state), theirs, base)
    reference = fresh()
    merged_by_hand(peft_pipe, reference)
    assert_close(outputs(reference), theirs, base)
    # One PEFT folder alone is read too, its component told from its keys.
    alone = read_adapter(tmp_path / "unet")
    assert set(alone.modules) == {key for key in state.modules if key.startswith("unet.")}


@pytest.mark.parametrize("metadata", [True, False], ids=["with-lora-metadata", "without"])
def test_a_dora_file_saved_by_diffusers_is_applied_as_diffusers_and_peft_compute_it(fresh, tmp_path, metadata):
    """What diffusers' training scripts write (``add_adapter`` + ``save_lora_weights``, with the LoraConfig in the
    header as today's scripts do, or without as older ones did, so alpha = rank): applied equal to the forward of the
    PEFT model that was saved (with the header) or a merge written here (alpha = rank), and on the UNet to diffusers'
    own ``load_lora_weights`` of the file (which misses the text encoder's magnitudes in PEFT's spelling)."""
    from diffusers import StableDiffusionPipeline

    base = outputs(fresh())
    peft_pipe = fresh()
    unet, text_encoder = with_peft_dora(peft_pipe, "diffusers")
    configs = {"unet_lora_adapter_metadata": unet.peft_config["default"].to_dict(),
               "text_encoder_lora_adapter_metadata": text_encoder.peft_config["default"].to_dict()}
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet),
                                              text_encoder_lora_layers=get_peft_model_state_dict(text_encoder),
                                              **(configs if metadata else {}))
    path = tmp_path / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as handle:
        assert f"unet.{PROBE}.lora_magnitude_vector" in handle.keys()

    state = read_adapter(path)
    assert state.kinds() == ["lora+dora"] and not state.skipped
    ours = applied_by_difflora(fresh(), state)
    if metadata:
        assert_close(ours, outputs(peft_pipe), base)
    else:
        reference = fresh()
        merged_by_hand(peft_pipe, reference, [{**config, "lora_alpha": config["r"], "alpha_pattern": {},
                                               "use_rslora": False} for config in (UNET_CONFIG, TEXT_CONFIG)])
        assert_close(ours, outputs(reference), base)
    diffusers_pipe = fresh()
    diffusers_pipe.load_lora_weights(path)
    assert_close(ours[:1], outputs(diffusers_pipe)[:1], base[:1])


def difflora_dora_adapter(pipe) -> AdapterState:
    """A DoRA adapter as difflora holds one (from a kohya ``dora_scale`` file, or trained): per-output magnitudes,
    different alphas, an rsLoRA module and a Tucker core that PEFT has no place for (folded on writing)."""
    layers = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": {},
              "unet.down_blocks.0.resnets.0.time_emb_proj": {"alpha": 1.0},
              "unet.down_blocks.0.attentions.0.proj_in": {"use_rslora": True},
              f"unet.{PROBE}": {"tucker": True},
              "text_encoder.encoder.layers.0.self_attn.k_proj": {}}
    modules = {}
    for seed, (key, options) in enumerate(layers.items()):
        component, _, path = key.partition(".")
        out_features, in_features, *kernel = getattr(pipe, component).get_submodule(path).weight.shape
        rank = 3
        down = draw(rank, in_features, *([1, 1] if options.get("tucker") else kernel), seed=10 * seed) * 0.3
        up = draw(out_features, rank, *[1] * len(kernel), seed=10 * seed + 1) * 0.3
        mid = draw(rank, rank, *kernel, seed=10 * seed + 2) * 0.5 if options.get("tucker") else None
        magnitude = draw(out_features, seed=10 * seed + 3).abs() + 0.5
        modules[key] = LoRAModuleWeights(down, up, alpha=options.get("alpha", 2.0), mid=mid, dora_scale=magnitude,
                                         use_rslora=options.get("use_rslora", False))
    return AdapterState(modules=modules)


def test_what_difflora_writes_diffusers_and_peft_apply_as_difflora_does(fresh, tmp_path):
    """A DoRA adapter written as a diffusers file and as PEFT folders: diffusers' ``load_lora_weights`` and PEFT's
    ``PeftModel.from_pretrained`` apply it as difflora's runtime does (and diffusers' image is difflora's, 1/255)."""
    base_pipe = fresh()
    base, base_image = outputs(base_pipe), image(base_pipe)
    state = difflora_dora_adapter(fresh())
    ours_pipe = fresh()
    ours = applied_by_difflora(ours_pipe, state)

    path = write_adapter(state, tmp_path / "dora.safetensors", layout="diffusers")
    header = json.loads(safe_open(str(path), "pt").metadata()["lora_adapter_metadata"])
    assert header["unet.use_dora"] is True and header["text_encoder.use_dora"] is True
    diffusers_pipe = fresh()
    diffusers_pipe.load_lora_weights(path)
    assert_close(ours, outputs(diffusers_pipe), base)
    ours_image = image(ours_pipe)
    assert abs(ours_image - image(diffusers_pipe)).max() <= 1 / 255
    assert abs(ours_image - base_image).max() > 10 / 255  # the adapter is visible, so equality means something

    folder = write_peft_folder(state, tmp_path / "peft")
    assert json.loads((folder / "unet" / "adapter_config.json").read_text())["use_dora"] is True
    peft_pipe = fresh()
    for component in ("unet", "text_encoder"):
        PeftModel.from_pretrained(getattr(peft_pipe, component), folder / component)
    assert_close(ours, outputs(peft_pipe), base)


def test_dora_goes_through_kohya_and_back_with_the_same_update(fresh, tmp_path):
    """diffusers → kohya (``dora_scale``, per output row) → diffusers → PEFT: every module keeps its update and its
    magnitude (1e-5), and every step is read as DoRA."""
    state = difflora_dora_adapter(fresh())
    diffusers_file = read_adapter(write_adapter(state, tmp_path / "a.safetensors", layout="diffusers"))
    kohya_file = read_adapter(write_adapter(diffusers_file, tmp_path / "b.safetensors", layout="kohya"))
    again = read_adapter(write_adapter(kohya_file, tmp_path / "c.safetensors", layout="diffusers"))
    peft_folder = read_adapter(write_peft_folder(again, tmp_path / "peft"))
    for read in (diffusers_file, kohya_file, again, peft_folder):
        assert set(read.modules) == set(state.modules) and read.kinds() == ["lora+dora"]
        for key, module in state.modules.items():
            delta = module.delta_weight()  # a folded Tucker core sums in another order: 1e-5 of the largest entry
            torch.testing.assert_close(read.modules[key].delta_weight(), delta, rtol=0,
                                       atol=1e-5 * float(delta.abs().max()))
            torch.testing.assert_close(read.modules[key].dora_scale.flatten(), module.dora_scale, rtol=1e-5, atol=0)
            assert read.modules[key].wd_on_output


def one_line_refusal(call, *names):
    with pytest.raises(AdapterFileError) as error:
        call()
    text = str(error.value)
    assert "\n" not in text and all(name in text for name in names), text
    return text


def test_what_peft_cannot_hold_is_refused_naming_the_module(fresh, tmp_path):
    """DoRA per input column (LyCORIS' ``wd_on_output=False``) and DoRA on some of a component's modules only have
    no PEFT form: the diffusers, difflora and PEFT writers refuse them in one line naming the module, writing
    nothing."""
    state = difflora_dora_adapter(fresh())
    column = "unet.down_blocks.0.resnets.0.time_emb_proj"
    in_features = state.modules[column].weight_shape[1]
    state.modules[column].dora_scale, state.modules[column].wd_on_output = torch.rand(in_features) + 0.5, False
    assert state.problem() is None  # a valid adapter, which kohya files keep
    partial = difflora_dora_adapter(fresh())
    plain = "text_encoder.encoder.layers.0.self_attn.k_proj"
    partial.modules[plain].dora_scale = None
    partial.modules["text_encoder.encoder.layers.0.mlp.fc1"] = LoRAModuleWeights(
        draw(2, 32, seed=1), draw(64, 2, seed=2), alpha=2.0, dora_scale=torch.rand(64) + 0.5)
    for adapter, names in ((state, (column, "per input column")), (partial, (plain, "fc1", "every module"))):
        for layout in ("diffusers", "difflora"):
            out = tmp_path / f"{layout}.safetensors"
            one_line_refusal(lambda: write_adapter(adapter, out, layout=layout), str(out), *names)
            assert not out.exists()
        one_line_refusal(lambda: write_peft_folder(adapter, tmp_path / "peft"), *names)
        assert not (tmp_path / "peft").exists()
        read_adapter(write_adapter(adapter, tmp_path / "kept.safetensors", layout="kohya"))
    # A component without DoRA beside one with it is what PEFT holds: one LoraConfig per component.
    mixed = difflora_dora_adapter(fresh())
    mixed.modules[plain].dora_scale = None
    assert read_adapter(write_peft_folder(mixed, tmp_path / "peft")).kinds() == ["lora", "lora+dora"]


def dora_file(tmp_path, name, tensors, config=None):
    header = {"lora_adapter_metadata": json.dumps(config)} if config else None
    save_file(tensors, str(tmp_path / name), metadata=header)
    return tmp_path / name


def test_dora_files_that_disagree_with_themselves_are_refused_in_one_line(fresh, tmp_path):
    """A magnitude under ``use_dora: false``, a module without one under ``use_dora: true`` or beside modules with
    one, a magnitude of the wrong size, or a magnitude alone: no tool applies these as written."""
    state = difflora_dora_adapter(fresh())
    state.modules = {key: module for key, module in state.modules.items() if key.startswith("unet.")}
    written = write_adapter(state, tmp_path / "good.safetensors", layout="diffusers")
    with safe_open(str(written), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        config = json.loads(handle.metadata()["lora_adapter_metadata"])
    probe, proj_in = f"unet.{PROBE}", "unet.down_blocks.0.attentions.0.proj_in"  # proj_in: first in order
    without_probe = {key: value for key, value in tensors.items() if key != f"{probe}.lora_magnitude_vector"}
    cases = {
        "switched-off": (tensors, {**config, "unet.use_dora": False}, (proj_in, "use_dora false")),
        "missing": (without_probe, config, (probe, "no DoRA magnitude", "use_dora true")),
        "missing-no-config": (without_probe, None, (probe, "no DoRA magnitude", "3 other modules of unet")),
        "wrong-size": ({**tensors, f"{probe}.lora_magnitude_vector": torch.ones(1, 31, 1, 1)}, config,
                       (probe, "(1, 31, 1, 1)", "one value per output (32)")),
        "alone": ({f"{probe}.lora_magnitude_vector": torch.ones(1, 32, 1, 1)}, None, (probe, "no down factor")),
    }
    for name, (contents, header, names) in cases.items():
        path = dora_file(tmp_path, f"{name}.safetensors", contents, header)
        one_line_refusal(lambda: read_adapter(path), str(path), *names)


def test_older_spellings_of_the_magnitude_are_read(fresh):
    """A model's own state dict holds ``lora_magnitude_vector.<adapter>.weight`` (PEFT ≥ 0.12) or
    ``lora_magnitude_vector.<adapter>`` (PEFT 0.9–0.11); diffusers once spelled a ``to_out`` magnitude without its
    ``.0``: all read as the same module's magnitude."""
    from difflora.formats import parse_state_dict

    prefix = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    magnitude = torch.rand(32) + 0.5
    for spelling in ("to_out.0.lora_magnitude_vector.default.weight", "to_out.0.lora_magnitude_vector.default",
                     "to_out.0.lora_magnitude_vector", "to_out.lora_magnitude_vector"):
        state = parse_state_dict({f"{prefix}.to_out.0.lora_A.weight": draw(2, 32, seed=1),
                                  f"{prefix}.to_out.0.lora_B.weight": draw(32, 2, seed=2),
                                  f"{prefix}.{spelling}": magnitude})
        assert list(state.modules) == [f"{prefix}.to_out.0"] and not state.skipped, spelling
        assert torch.equal(state.modules[f"{prefix}.to_out.0"].dora_scale, magnitude)
