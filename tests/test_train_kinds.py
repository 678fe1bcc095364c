"""Training every kind: LoRA on kohya's default layers, LoCon, LoHa, LoKr and DoRA (``--targets``, ``--conv-rank``,
``--algo``, ``--dora``). Each starts exactly at the base model, trains only its own tensors, and writes a file that
equals an independently written merge (kohya's layout, as LyCORIS reads it) or loads in plain diffusers (LoRA)."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from difflora import LoRARuntime
from difflora.adapter_options import AdapterOptions, initial_module
from difflora.data import DataConfig, CaptionedImages, collate_batch, scan_dataset
from difflora.errors import InvalidArgumentError
from difflora.formats import read_adapter
from difflora.generate import GenerationSettings, generate
from difflora.pipelines import load_pipeline
from difflora.train import train
from difflora.train.config import config_from_args, make_config
from difflora.train.steps import TextEmbeddingCache, encode_latents, held_out_loss

SAMPLES = Path(__file__).resolve().parent.parent / "samples"

# kohya-ss/sd-scripts networks/lora.py, written out here rather than taken from difflora: the module classes whose
# Linear and Conv2d layers a LoRA trains by default, and those its LoCon (conv_dim) adds.
KOHYA_UNET_TARGETS = ("Transformer2DModel",)
KOHYA_UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
KOHYA_TEXT_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")

# (algo, targets, dora): every algorithm, on convs too, with and without DoRA.
# kohya's text-encoder names carry transformers' older text_model. prefix, which recent versions dropped.
TEXT_PREFIX = "lora_te_text_model"

KINDS = [("lora", "all", False), ("lora", "transformer", True), ("loha", "all", True), ("lokr", "all", False)]


def kohya_names(pipe, unet_classes, text_classes) -> set[str]:
    """The ``lora_unet_…``/``lora_te_…`` names kohya's create_modules gives the layers it adapts."""
    names = set()
    for prefix, model, classes in (("lora_unet", pipe.unet, unet_classes),
                                   (TEXT_PREFIX, pipe.text_encoder, text_classes)):
        for name, module in model.named_modules():
            if type(module).__name__ in classes:
                for child_name, child in module.named_modules():
                    if type(child).__name__ in ("Linear", "Conv2d"):
                        names.add(f"{prefix}.{name}.{child_name}".replace(".", "_"))
    return names


def layers_by_kohya_name(pipe) -> dict[str, torch.nn.Module]:
    layers = {}
    for prefix, model in (("lora_unet", pipe.unet), (TEXT_PREFIX, pipe.text_encoder)):
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                layers[f"{prefix}_{name}".replace(".", "_")] = module
    return layers


def independent_delta(tensors: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """ΔW of one module of a kohya/LyCORIS file, from its tensors, as LyCORIS defines each algorithm."""
    t = {key: value.double() for key, value in tensors.items()}
    if "lora_down.weight" in t:
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        return (up.flatten(1) @ down.flatten(1)).reshape(shape) * (t["alpha"] / down.shape[0])
    if "hada_w1_a" in t:
        rank = t["hada_w1_b"].shape[0]
        product = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        return product.reshape(shape) * (t["alpha"] / rank)
    w1 = t["lokr_w1"]
    if "lokr_w2" in t:
        w2, scale = t["lokr_w2"], 1.0
    else:
        w2, scale = t["lokr_w2_a"] @ t["lokr_w2_b"], t["alpha"] / t["lokr_w2_b"].shape[0]
    w2 = w2.reshape(shape[0] // w1.shape[0], shape[1] // w1.shape[1], *shape[2:])
    left = w1.reshape(*w1.shape, *[1] * (len(shape) - 2))
    return torch.kron(left, w2) * scale


def merge_independently(pipe, path: Path) -> int:
    """Write every module of the kohya-layout file ``path`` into ``pipe``'s weights (fp64 maths, DoRA as
    ``g · V / ‖V‖`` per output row with ``V = W + ΔW``); returns the number of modules merged."""
    raw, layers = load_file(str(path)), layers_by_kohya_name(pipe)
    modules: dict[str, dict] = {}
    for key, tensor in raw.items():
        name, _, suffix = key.partition(".")
        modules.setdefault(name, {})[suffix] = tensor
    with torch.no_grad():
        for name, tensors in modules.items():
            weight = layers[name].weight
            merged = weight.double() + independent_delta(tensors, weight.shape)
            if "dora_scale" in tensors:
                norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.ndim - 1))
                merged = tensors["dora_scale"].double().reshape(norm.shape) * merged / norm
            weight.copy_(merged.float())
    return len(modules)


def outputs(pipe) -> torch.Tensor:
    """The UNet's prediction for fixed inputs, conditioned by the text encoder (both adapted)."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    ids = torch.randint(0, pipe.tokenizer.vocab_size, (1, 8), generator=generator)
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([500]), pipe.text_encoder(ids)[0]).sample


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert ((actual - expected).norm() / expected.norm()).item() < 1e-5


def images(tmp_path, count=4) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for item in scan_dataset(DataConfig(data_dir=SAMPLES / "ink-waves")).items[:count]:
        shutil.copy(item.path, folder / item.path.name)
        (folder / item.path.with_suffix(".txt").name).write_text(item.caption)
    return folder


def kind_config(tmp_path, data, model, algo, targets, dora, **overrides):
    options = dict(data=str(data), model=str(model), output=str(tmp_path / "run"), steps=3, batch_size=2,
                   resolution=32, rank=2, alpha=4.0, lr=1e-2, report_to="none", seed=3, algo=algo, targets=targets,
                   dora=dora, train_text_encoder=True)
    if targets == "all":
        options.update(conv_rank=3, conv_alpha=1.5)
    options.update(overrides)
    return make_config(options)


# ----- the start, the layers, the file ------------------------------------------------------------------------------


@pytest.mark.parametrize("algo, targets, dora", KINDS)
def test_every_kind_starts_exactly_at_the_base_model(tiny_pipeline, algo, targets, dora):
    base = outputs(tiny_pipeline)
    runtime = LoRARuntime.attach(tiny_pipeline)
    runtime.create_adapter("new", algo=algo, targets=targets, dora=dora, seed=1, components=("unet", "text_encoder"))
    assert torch.equal(outputs(tiny_pipeline), base)  # ΔW = 0 and the magnitude the weight's own norm: exact
    named = runtime.named_parameters("new")
    assert named and all(tensor.requires_grad and tensor.dtype == torch.float32 for _, tensor in named)
    roles = {name.rpartition(".")[2] for name, _ in named}
    expected = {"lora": {"down", "up"}, "loha": {"w1a", "w1b", "w2a", "w2b"}, "lokr": {"w1", "w2", "w2a", "w2b"}}
    assert roles - {"magnitude"} <= expected[algo] and ("magnitude" in roles) == dora
    # The same adapter drawn at random does change the output: the check above can fail.
    runtime.remove("new")
    runtime.create_adapter("new", algo=algo, targets=targets, dora=dora, seed=1, init="random",
                           components=("unet", "text_encoder"))
    assert not torch.allclose(outputs(tiny_pipeline), base, rtol=0, atol=1e-4)


LYCORIS_NAMES = {"hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b", "lokr_w1": "w1",
                 "lokr_w1_a": "w1a", "lokr_w1_b": "w1b", "lokr_w2": "w2", "lokr_w2_a": "w2a", "lokr_w2_b": "w2b",
                 "dora_scale": "dora_scale"}


@pytest.mark.parametrize("layer", [torch.nn.Linear(64, 32), torch.nn.Conv2d(32, 64, 3), torch.nn.Conv2d(96, 32, 1)],
                         ids=["linear", "conv3x3", "conv1x1"])
@pytest.mark.parametrize("algo, factor", [("loha", -1), ("lokr", -1), ("lokr", 4)])
def test_new_loha_and_lokr_are_shaped_and_started_as_lycoris_makes_them(layer, algo, factor):
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    reference = (LohaModule("x", layer, 1.0, 4, 2.0, weight_decompose=True) if algo == "loha" else
                 LokrModule("x", layer, 1.0, 4, 2.0, factor=factor, weight_decompose=True))
    options = AdapterOptions(algo=algo, rank=4, alpha=2.0, lokr_factor=factor, dora=True)
    ours = initial_module(tuple(layer.weight.shape), options, torch.Generator().manual_seed(0), layer.weight)
    theirs = {LYCORIS_NAMES[name]: tensor.detach() for name, tensor in reference.named_parameters()}
    mine = {name: tensor for name, tensor in {**ours.tensors(), "dora_scale": ours.dora_scale}.items()
            if tensor is not None}
    assert {name: tuple(t.shape) for name, t in mine.items() if name != "dora_scale"} == {
        name: tuple(t.shape) for name, t in theirs.items() if name != "dora_scale"}
    # The same tensors start at zero, so ΔW = 0; the same scale; the magnitude the weight's norm per output row.
    assert {name for name, t in mine.items() if not t.any()} == {name for name, t in theirs.items() if not t.any()}
    assert ours.scale == pytest.approx(float(reference.scale))
    torch.testing.assert_close(mine["dora_scale"], theirs["dora_scale"].flatten(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("targets", ["transformer", "all"])
def test_targets_are_the_layers_kohya_trains(tiny_pipeline, tmp_path, targets):
    unet_classes = KOHYA_UNET_TARGETS + (KOHYA_UNET_CONV_TARGETS if targets == "all" else ())
    expected = kohya_names(tiny_pipeline, unet_classes, KOHYA_TEXT_TARGETS)  # on the model as loaded
    layers = layers_by_kohya_name(tiny_pipeline)
    runtime = LoRARuntime.attach(tiny_pipeline)
    conv = dict(conv_rank=3, conv_alpha=1.5) if targets == "all" else {}
    runtime.create_adapter("kohya", rank=2, alpha=4.0, targets=targets, components=("unet", "text_encoder"), **conv)
    path = runtime.save("kohya", tmp_path / "kohya.safetensors", layout="kohya")
    raw = load_file(str(path))
    written = {key.partition(".")[0] for key in raw}
    assert written == expected
    for name in written:  # 3 × 3 convs take conv_rank and conv_alpha, every other layer rank and alpha
        kernel = tuple(layers[name].weight.shape[2:])
        rank, alpha = (3, 1.5) if kernel not in ((), (1, 1)) else (2, 4.0)
        assert raw[f"{name}.lora_down.weight"].shape[0] == rank and raw[f"{name}.alpha"].item() == alpha, name


@pytest.mark.parametrize("algo, targets, dora", KINDS)
def test_saved_file_reloads_to_the_runtimes_output_and_an_independent_merge(tiny_model_dir, tmp_path, algo,
                                                                            targets, dora):
    made = load_pipeline(tiny_model_dir, quiet=True)
    runtime = LoRARuntime.attach(made)
    runtime.create_adapter("kind", algo=algo, targets=targets, dora=dora, rank=2, alpha=3.0, init="random", seed=2,
                           components=("unet", "text_encoder"))
    with torch.no_grad():  # a trained magnitude is no longer the weight's norm
        for name, tensor in runtime.named_parameters("kind"):
            if name.endswith("magnitude"):
                tensor.mul_(1 + 0.5 * torch.rand(tensor.shape, generator=torch.Generator().manual_seed(4)))
    expected = outputs(made)
    path = runtime.save("kind", tmp_path / "kind.safetensors")
    with safe_open(str(path), "pt") as handle:
        kohya = any(key.startswith("lora_unet_") for key in handle.keys())
    assert kohya == (algo != "lora")  # diffusers' layout where diffusers holds the kind (LoRA, LoCon, PEFT's DoRA)

    reloaded = load_pipeline(tiny_model_dir, quiet=True)
    LoRARuntime.attach(reloaded).load(path)
    assert_close(outputs(reloaded), expected)
    assert_close(outputs(independently_adapted(tiny_model_dir, path)), expected)


def independently_adapted(model_dir, path: Path):
    """A pipeline with the file ``path`` applied by other code: merged by this file's own maths (kohya layout), or
    loaded by plain diffusers and PEFT (diffusers' layout)."""
    pipe = load_pipeline(model_dir, quiet=True)
    with safe_open(str(path), "pt") as handle:
        kohya = any(key.startswith("lora_unet_") for key in handle.keys())
    if kohya:
        assert merge_independently(pipe, path) == len(read_adapter(path).modules)
    else:
        pipe.load_lora_weights(str(path))
    return pipe


# ----- training -----------------------------------------------------------------------------------------------------


def mean_loss(pipe, folder) -> float:
    dataset = CaptionedImages(scan_dataset(DataConfig(data_dir=folder, resolution=32)),
                              DataConfig(data_dir=folder, resolution=32))
    batch = collate_batch([dataset[i] for i in range(len(dataset))])
    latents = encode_latents(pipe.vae, batch["pixel_values"])
    context = TextEmbeddingCache(pipe.tokenizer, pipe.text_encoder).encode(batch["captions"], torch.device("cpu"))
    return held_out_loss(pipe.unet, pipe.scheduler, latents, context, draws=4)


@pytest.mark.parametrize("algo, targets, dora", KINDS)
def test_each_kind_trains_and_its_file_equals_an_independent_merge(tmp_path, tiny_model_dir, algo, targets, dora):
    data = images(tmp_path)
    result = train(kind_config(tmp_path, data, tiny_model_dir, algo, targets, dora, steps=4))
    header = safe_open(str(result.adapter_path), "pt").metadata()
    assert json.loads(header["difflora.training_config"])["algo"] == algo
    base = load_pipeline(tiny_model_dir, quiet=True)
    ours = load_pipeline(tiny_model_dir, quiet=True)
    LoRARuntime.attach(ours).load(result.adapter_path)
    assert mean_loss(ours, data) < mean_loss(base, data)  # it learned the images it saw
    if dora:  # every magnitude trained too: each started at its weight's norms per output row
        moved = []
        for key, module in read_adapter(result.adapter_path).modules.items():
            component, _, path = key.partition(".")
            start = getattr(base, component).get_submodule(path).weight.detach().flatten(1).norm(dim=1)
            moved.append((module.dora_scale.flatten() - start).abs().max().item())
            assert moved[-1] > 0, key
        assert max(moved) > 1e-3
    assert_close(outputs(independently_adapted(tiny_model_dir, result.adapter_path)), outputs(ours))
    assert not torch.allclose(outputs(ours), outputs(base), rtol=0, atol=1e-4)


def test_transformer_lora_loads_in_plain_diffusers(tmp_path, tiny_model_dir):
    result = train(kind_config(tmp_path, images(tmp_path), tiny_model_dir, "lora", "transformer", False))
    state = read_adapter(result.adapter_path)
    assert any(key.endswith("ff.net.2") for key in state.modules) and any("mlp.fc1" in key for key in state.modules)
    settings = GenerationSettings("inkwave style, a moon", steps=3, seed=1, width=64, height=64)
    ours = load_pipeline(tiny_model_dir, quiet=True)
    LoRARuntime.attach(ours).load(result.adapter_path)
    plain = load_pipeline(tiny_model_dir, quiet=True)
    plain.load_lora_weights(str(result.adapter_path))
    ours_image = generate(ours, settings, output_type="np")[0]
    assert abs(ours_image - generate(plain, settings, output_type="np")[0]).max() <= 1 / 255
    base_image = generate(load_pipeline(tiny_model_dir, quiet=True), settings, output_type="np")[0]
    assert abs(ours_image - base_image).max() > 1 / 255


@pytest.mark.parametrize("algo, targets, dora", [("loha", "all", True), ("lokr", "all", False)])
def test_resume_continues_every_kind_exactly(tmp_path, tiny_model_dir, algo, targets, dora):
    data = images(tmp_path)
    common = dict(steps=4, checkpointing_steps=0, train_text_encoder=False)
    straight = train(kind_config(tmp_path / "a", data, tiny_model_dir, algo, targets, dora, **common))

    def interrupt_at_two(step, total, loss):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    stopped = train(kind_config(tmp_path / "b", data, tiny_model_dir, algo, targets, dora, **common),
                    progress=interrupt_at_two)
    assert stopped.interrupted and stopped.steps == 2
    resumed = train(kind_config(tmp_path / "b", data, tiny_model_dir, algo, targets, dora, resume="latest", **common))
    assert resumed.losses == pytest.approx(straight.losses[2:], abs=1e-6)
    a, b = load_file(str(straight.adapter_path)), load_file(str(resumed.adapter_path))
    assert a.keys() == b.keys()
    for key, tensor in a.items():
        torch.testing.assert_close(b[key], tensor, rtol=0, atol=1e-6)


@pytest.mark.parametrize("algo, targets, dora", KINDS)
def test_every_kind_trains_in_bf16_with_gradient_checkpointing_and_fp32_factors(tmp_path, tiny_model_dir, algo,
                                                                                 targets, dora):
    result = train(kind_config(tmp_path, images(tmp_path, 2), tiny_model_dir, algo, targets, dora, steps=2,
                               mixed_precision="bf16", gradient_checkpointing=True))
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    raw = load_file(str(result.adapter_path))
    assert all(tensor.dtype == torch.float32 and torch.isfinite(tensor).all() for tensor in raw.values())
    # What starts at zero (LoRA's up, LoHa's w2a, LoKr's w2 or w2b) moved: the optimizer stepped under bf16.
    started_at_zero = ("lora_B.weight", "lora_up.weight", "hada_w2_a", "lokr_w2", "lokr_w2_b")
    moved = [tensor for key, tensor in raw.items() if key.endswith(started_at_zero)]
    assert moved and all(tensor.abs().max() > 0 for tensor in moved)


@pytest.mark.skipif(sys.platform == "win32", reason="gloo on one machine")
def test_two_cpu_processes_train_loha_with_dora_as_one_process(tmp_path, tiny_model_dir):
    data = images(tmp_path)
    base = ["--data", str(data), "--model", str(tiny_model_dir), "--steps", "2", "--rank", "2", "--lr", "1e-2",
            "--resolution", "32", "--report-to", "none", "--seed", "5", "--algo", "loha", "--targets", "all",
            "--dora", "--conv-rank", "2"]
    single = subprocess.run(
        [sys.executable, "-m", "difflora.train", *base, "--batch-size", "4", "--output", str(tmp_path / "one")],
        capture_output=True, text=True, timeout=600,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
         "-m", "difflora.train", *base, "--batch-size", "2", "--output", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert double.returncode == 0, double.stderr[-3000:]
    one = load_file(str(tmp_path / "one" / "lora.safetensors"))
    two = load_file(str(tmp_path / "two" / "lora.safetensors"))
    assert one.keys() == two.keys() and any(key.endswith("dora_scale") for key in one)
    # w2a starts at zero, so all of it was learned; compare it as a whole. Reductions run in another order, and Adam
    # turns those rounding differences on near-zero entries into step-sized ones (measured 0.2% here); gradients not
    # averaged across the processes would leave each half-batch's own update, tens of percent apart.
    learned_one = torch.cat([one[key].flatten() for key in sorted(one) if key.endswith("hada_w2_a")])
    learned_two = torch.cat([two[key].flatten() for key in sorted(one) if key.endswith("hada_w2_a")])
    assert learned_one.norm() > 0 and (learned_two - learned_one).norm() / learned_one.norm() < 1e-2


# ----- options ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, parameter, message", [
    (dict(conv_rank=8), "conv_rank", "conv_rank applies with targets all only"),
    (dict(conv_alpha=2.0, targets="transformer"), "conv_alpha", "conv_alpha applies with targets all only"),
    (dict(lokr_factor=4, algo="loha"), "lokr_factor", "lokr_factor applies with algo lokr only"),
    (dict(lokr_factor=0, algo="lokr"), "lokr_factor", "lokr_factor must be -1 or a positive integer"),
    (dict(use_rslora=True, algo="loha"), "use_rslora", "use_rslora applies with algo lora only"),
    (dict(loraplus_ratio=4.0, algo="lokr"), "loraplus_ratio", "loraplus_ratio applies to algo lora only"),
    (dict(lora_fa=True, algo="loha"), "lora_fa", "lora_fa applies to algo lora only"),
    (dict(layout="diffusers", algo="loha"), "layout", "layout diffusers holds LoRA, LoCon and DoRA only"),
    (dict(targets="everything"), "targets", "targets must be one of attention, transformer, all"),
    (dict(conv_rank=0, targets="all"), "conv_rank", "conv_rank must be"),
])
def test_options_that_cannot_apply_are_refused_by_name(options, parameter, message):
    with pytest.raises(InvalidArgumentError, match=f"^{message}") as caught:
        make_config({"data": "d", **options})
    assert caught.value.parameter == parameter


def test_the_command_line_takes_every_kinds_flags():
    config = config_from_args(["--data", "d", "--algo", "lokr", "--lokr-factor", "4", "--targets", "all",
                               "--conv-rank", "8", "--conv-alpha", "4", "--dora", "--layout", "kohya"])
    options = config.adapter_options()
    assert (options.algo, options.lokr_factor, options.targets, options.conv_rank, options.conv_alpha,
            options.dora) == ("lokr", 4, "all", 8, 4.0, True)
    assert config.layout == "kohya" and options.components == ("unet",) and options.seed == config.seed


def test_create_adapter_names_an_option_it_does_not_know(tiny_pipeline):
    runtime = LoRARuntime.attach(tiny_pipeline)
    with pytest.raises(InvalidArgumentError, match="^rnak is not an adapter option") as caught:
        runtime.create_adapter("typo", rnak=4)
    assert caught.value.parameter == "rnak" and not runtime.adapters
    with pytest.raises(InvalidArgumentError, match="^conv_rank applies with targets all only") as caught:
        runtime.create_adapter("narrow", conv_rank=4)
    assert caught.value.parameter == "conv_rank" and not runtime.adapters
