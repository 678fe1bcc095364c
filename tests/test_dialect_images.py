"""Files in every dialect difflora reads, each kind written the way its tool writes it, generate the image of the same
change merged into the weights by code written here from the formulas (≤ 1/255), and a truncated or inconsistent
file of each kind is refused in one line with the pipeline left as it was.

The layers are ones whose names are the same in diffusers' layout and the original one on the tiny model (one layer
per block, where SD's two-layer blocks number differently): input block 1, the middle block, output blocks 0 and 1.
"""

import pytest
import torch
from safetensors.torch import save_file

from difflora import LoRARuntime
from difflora.errors import DiffloraError
from difflora.generate import GenerationSettings, generate
from difflora.pipelines import load_pipeline

SETTINGS = GenerationSettings(prompt="a harbour at dusk", steps=2, guidance=5.0, seed=5, width=64, height=64)
ONE_LEVEL = 1 / 255

# diffusers path → original-layout path, on the tiny model (written out here, not taken from difflora).
UNET_LAYERS = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj":
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.0.attentions.0.proj_in": "input_blocks.1.1.proj_in",  # a 1 × 1 conv in SD 1.x
    "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",  # 3 × 3
    "mid_block.resnets.0.time_emb_proj": "middle_block.0.emb_layers.1",
    "up_blocks.0.resnets.1.conv_shortcut": "output_blocks.1.0.skip_connection",
}
TEXT_LAYERS = ("encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1")


def flat(path):
    return path.replace(".", "_")


# Each dialect: the module name of a UNet layer (diffusers path, original path) and of a CLIP layer (None when the
# tool writes no text encoder), the LoRA factor names it writes, the dtype it saves in, and DoRA's axis.
DIALECTS = {
    "kohya": dict(unet=lambda d, o: f"lora_unet_{flat(d)}", text=lambda p: f"lora_te_text_model_{flat(p)}",
                  factors=("lora_down.weight", "lora_up.weight"), dtype=torch.float16, dora_on_output=True),
    "kohya-original-layout": dict(unet=lambda d, o: f"lora_unet_{flat(o)}",
                                  text=lambda p: f"lora_te1_text_model_{flat(p)}",
                                  factors=("lora_down.weight", "lora_up.weight"), dtype=torch.bfloat16,
                                  dora_on_output=True),
    "comfyui": dict(unet=lambda d, o: f"diffusion_model.{o}",
                    text=lambda p: f"text_encoders.clip_l.transformer.text_model.{p}",
                    factors=("lora_down.weight", "lora_up.weight"), dtype=torch.bfloat16, dora_on_output=True),
    "onetrainer-comfyui": dict(unet=lambda d, o: f"diffusion_model.{o}",
                               text=lambda p: f"text_encoders.clip_l.transformer.text_model.{p}",
                               factors=("lora_A.weight", "lora_B.weight"), dtype=torch.float32, dora_on_output=False),
    "simpletuner-lycoris": dict(unet=lambda d, o: f"lycoris_{flat(d)}", text=None,
                                factors=("lora_down.weight", "lora_up.weight"), dtype=torch.bfloat16,
                                dora_on_output=True),
    "onetrainer-internal": dict(unet=lambda d, o: f"unet.{d}", text=lambda p: f"text_encoder.text_model.{p}",
                                factors=("lora_down.weight", "lora_up.weight"), dtype=torch.float32,
                                dora_on_output=False),
    "onetrainer-original": dict(unet=lambda d, o: o, text=None, factors=("lora_A.weight", "lora_B.weight"),
                                dtype=torch.float16, dora_on_output=False),
}
KINDS = ("lora", "loha", "lokr", "full", "dora")


def layer_of(pipe, component, path):
    modules = dict(getattr(pipe, component).named_modules())
    return modules.get(path) or modules[f"text_model.{path}"]


def draw(generator, *shape, scale=0.2):
    return torch.randn(*shape, generator=generator) * scale


def module_tensors(kind, layer, generator, factors, conv_kernels, dora_on_output):
    """One module's tensors as LyCORIS, kohya, ComfyUI and OneTrainer write them (suffix → tensor), with what it
    changes written here: (ΔW, Δbias or None, DoRA magnitude or None)."""
    shape = tuple(layer.weight.shape)
    out_features, in_features, kernel = shape[0], shape[1], shape[2:]
    flat_in = in_features * (kernel[0] * kernel[1] if kernel else 1)
    rank, alpha = 2, 3.0
    if kind in ("lora", "dora"):
        down, up = draw(generator, rank, in_features, *kernel), draw(generator, out_features, rank, *[1] * len(kernel))
        delta = (up.flatten(1) @ down.flatten(1)).reshape(shape) * (alpha / rank)
        tensors = {factors[0]: down, factors[1]: up, "alpha": torch.tensor(alpha)}
        magnitude = None
        if kind == "dora":  # LyCORIS: out × 1 (× 1 × 1) per output row; OneTrainer: 1 × in (× 1 × 1) per input column
            count = out_features if dora_on_output else in_features
            magnitude = draw(generator, count).abs() + 0.5
            stored = (count, 1) if dora_on_output else (1, count)
            tensors["dora_scale"] = magnitude.reshape(*stored, *[1] * len(kernel))
        return tensors, (delta, None, (magnitude, dora_on_output) if kind == "dora" else None)
    if kind == "loha":
        w1a, w1b, w2a, w2b = (draw(generator, out_features, rank), draw(generator, rank, flat_in),
                              draw(generator, out_features, rank), draw(generator, rank, flat_in))
        delta = ((w1a @ w1b) * (w2a @ w2b)).reshape(shape) * (alpha / rank)
        if conv_kernels and kernel:  # OneTrainer keeps a Conv2d's LoHa factors as conv kernels
            w1a, w2a = w1a[:, :, None, None], w2a[:, :, None, None]
            w1b, w2b = w1b.reshape(rank, in_features, *kernel), w2b.reshape(rank, in_features, *kernel)
        return ({"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "alpha": torch.tensor(alpha)},
                (delta, None, None))
    if kind == "lokr":  # w1 whole (2 × 2), w2 factorised at rank 2: scale alpha / rank
        w1 = draw(generator, 2, 2, scale=1.0)
        w2a, w2b = draw(generator, out_features // 2, rank), draw(generator, rank, flat_in // 2)
        right = (w2a @ w2b).reshape(out_features // 2, in_features // 2, *kernel)
        delta = torch.kron(w1.reshape(2, 2, *[1] * len(kernel)), right) * (alpha / rank)
        return {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(alpha)}, (delta, None, None)
    diff = draw(generator, *shape, scale=0.05)
    if layer.bias is None:  # LyCORIS writes a bias diff only for a layer with a bias
        return {"diff": diff}, (diff, None, None)
    diff_b = draw(generator, out_features, scale=0.05)
    return {"diff": diff, "diff_b": diff_b}, (diff, diff_b, None)


def dialect_file(pipe, dialect, kind, seed=0):
    """A file of ``kind`` on every layer of this test in ``dialect``'s names, as its tool saves it, and the changes
    it holds: {(component, path): (ΔW, Δbias, (magnitude, per output row) or None)}."""
    spec = DIALECTS[dialect]
    generator = torch.Generator().manual_seed(seed)
    sites = [("unet", path, spec["unet"](path, original)) for path, original in UNET_LAYERS.items()]
    if spec["text"] is not None:
        sites += [("text_encoder", path, spec["text"](path)) for path in TEXT_LAYERS]
    tensors, changes = {}, {}
    for component, path, name in sites:
        module, change = module_tensors(kind, layer_of(pipe, component, path), generator, spec["factors"],
                                        dialect.startswith("onetrainer"), spec["dora_on_output"])
        # What the file holds is what the merge below uses: the values after the cast to the tool's dtype.
        module = {suffix: tensor.to(spec["dtype"]) for suffix, tensor in module.items()}
        tensors.update({f"{name}.{suffix}": tensor.contiguous() for suffix, tensor in module.items()})
        changes[component, path] = tuple(_as_stored(change, module, kind))
    return tensors, changes


def _as_stored(change, module, kind):
    """The change recomputed from the tensors as stored (fp16/bf16 files round their values)."""
    stored = {suffix: tensor.float() for suffix, tensor in module.items()}
    delta, bias, dora = change
    scale = float(stored["alpha"]) / 2 if "alpha" in stored else 1.0
    if kind in ("lora", "dora"):
        down = next(t for s, t in stored.items() if s in ("lora_down.weight", "lora_A.weight"))
        up = next(t for s, t in stored.items() if s in ("lora_up.weight", "lora_B.weight"))
        delta = (up.flatten(1) @ down.flatten(1)).reshape(delta.shape) * scale
        if dora is not None:
            dora = (stored["dora_scale"].flatten(), dora[1])
    elif kind == "loha":
        w = {s: t.flatten(1) for s, t in stored.items() if s.startswith("hada")}
        delta = ((w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"])).reshape(delta.shape) * scale
    elif kind == "lokr":
        kernel = delta.shape[2:]
        right = (stored["lokr_w2_a"] @ stored["lokr_w2_b"]).reshape(delta.shape[0] // 2, delta.shape[1] // 2, *kernel)
        delta = torch.kron(stored["lokr_w1"].reshape(2, 2, *[1] * len(kernel)), right) * scale
    else:
        delta, bias = stored["diff"], stored.get("diff_b")
    return delta, bias, dora


def merged(weight, delta, dora, strength):
    """W after the change at ``strength``: W + m·ΔW, or with DoRA (A1111's and ComfyUI's convention)
    W + m·(g ⊙ V / ‖V‖ − W), V = W + ΔW, the norm per output row or per input column."""
    if dora is None:
        return weight + strength * delta
    magnitude, per_output = dora
    target = weight + delta
    if per_output:
        norms = target.flatten(1).norm(dim=1).reshape(-1, *[1] * (target.ndim - 1))
        scaled = magnitude.reshape(norms.shape) * target / norms
    else:
        norms = target.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (target.ndim - 2))
        scaled = magnitude.reshape(norms.shape) * target / norms
    return weight + strength * (scaled - weight)


def image(pipe):
    return torch.from_numpy(generate(pipe, SETTINGS, output_type="np")[0])


@pytest.fixture(scope="module")
def pipes(tiny_model_dir):
    """(a pipeline for difflora's runtime, one whose weights the test merges and restores, the image of neither
    changed): one of each for the module, as loading one costs more than the test."""
    ours, reference = load_pipeline(tiny_model_dir, quiet=True), load_pipeline(tiny_model_dir, quiet=True)
    return ours, reference, image(reference)


def image_merged_by_hand(pipe, changes, strength):
    """The image with ``changes`` merged into ``pipe``'s weights at ``strength``; the weights put back after."""
    originals = {}
    with torch.no_grad():
        for (component, path), (delta, bias, dora) in changes.items():
            layer = layer_of(pipe, component, path)
            bias_before = None if layer.bias is None else layer.bias.detach().clone()
            originals[layer] = (layer.weight.detach().clone(), bias_before)
            layer.weight.copy_(merged(layer.weight.detach().float(), delta, dora, strength))
            if bias is not None:
                layer.bias += strength * bias
    try:
        return image(pipe)
    finally:
        with torch.no_grad():
            for layer, (weight, bias) in originals.items():
                layer.weight.copy_(weight)
                if bias is not None:
                    layer.bias.copy_(bias)


# Every kind in the dialects added last, two in the others (whose reading of every kind test_kinds.py and
# test_formats_layers.py cover through kohya files).
CASES = [(dialect, kind) for dialect in DIALECTS for kind in KINDS
         if dialect in ("comfyui", "onetrainer-internal", "simpletuner-lycoris") or kind in ("lora", "loha")]


@pytest.mark.parametrize("dialect, kind", CASES)
def test_a_file_in_each_dialect_gives_the_image_of_its_change_merged_by_hand(pipes, tmp_path, dialect, kind):
    ours, reference, base_image = pipes
    tensors, changes = dialect_file(ours, dialect, kind)
    path = tmp_path / f"{dialect}-{kind}.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    strength = 0.7
    runtime = LoRARuntime.attach(ours)
    info = runtime.load(path, name="under_test", weight=strength, strict=True)  # strict: every key applied
    try:
        assert info.module_count == len(changes)
        mine = image(ours)
    finally:
        runtime.remove("under_test")
    theirs = image_merged_by_hand(reference, changes, strength)
    assert float((theirs - base_image).abs().max()) > 4 * ONE_LEVEL  # the change shows
    assert float((mine - theirs).abs().max()) <= ONE_LEVEL


# ----- refused files --------------------------------------------------------------------------------------------------

# For each kind, a key removed (a factor missing) and a factor of a shape that does not fit its partner.
INCONSISTENT = {
    "lora": ("lora_up.weight", "lora_down.weight"),
    "loha": ("hada_w2_b", "hada_w1_b"),
    "lokr": ("lokr_w2_b", "lokr_w2_a"),
    "full": ("diff", "diff"),
    "dora": ("lora_down.weight", "dora_scale"),
}


def _grown(tensor):
    """The tensor with its last dimension one longer: no longer the shape its partner or layer needs."""
    return torch.cat([tensor, tensor[..., :1]], dim=-1)


def assert_refused_and_unchanged(pipe, path, expected_words):
    before = {key: value.clone() for key, value in pipe.unet.state_dict().items()}
    text_before = {key: value.clone() for key, value in pipe.text_encoder.state_dict().items()}
    runtime = LoRARuntime.attach(pipe)
    try:
        with pytest.raises(DiffloraError) as error:
            runtime.load(path, name="refused")
    finally:
        if "refused" in runtime.adapters:  # accepted wrongly: leave the shared pipeline as it was for the next test
            runtime.remove("refused")
    message = str(error.value)
    assert "\n" not in message and str(path) in message, message
    assert any(word in message for word in expected_words), message
    after = pipe.unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[key], value) for key, value in before.items())
    assert all(torch.equal(pipe.text_encoder.state_dict()[key], value) for key, value in text_before.items())
    assert not runtime.adapters


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dialect", ["comfyui", "onetrainer-internal", "simpletuner-lycoris", "kohya-original-layout"])
def test_a_truncated_or_inconsistent_file_of_each_kind_is_refused_in_one_line(pipes, tmp_path, dialect, kind):
    pipe = pipes[0]
    tensors, _ = dialect_file(pipe, dialect, kind, seed=3)
    whole = tmp_path / "whole.safetensors"
    save_file(tensors, str(whole))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    assert_refused_and_unchanged(pipe, truncated, ["not a readable safetensors file"])

    missing_suffix, misshapen_suffix = INCONSISTENT[kind]
    if kind == "dora":
        missing_suffix = "lora_up.weight"
    conv_module = DIALECTS[dialect]["unet"]("down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2")
    factors = dict(zip(("lora_down.weight", "lora_up.weight"), DIALECTS[dialect]["factors"]))

    def key(module, suffix):
        return f"{module}.{factors.get(suffix, suffix)}"

    without = {k: v for k, v in tensors.items() if k != key(conv_module, missing_suffix)}
    save_file(without, str(tmp_path / "missing.safetensors"))
    assert_refused_and_unchanged(pipe, tmp_path / "missing.safetensors", ["has no", "do not fit"])

    misshapen = dict(tensors)
    misshapen[key(conv_module, misshapen_suffix)] = _grown(tensors[key(conv_module, misshapen_suffix)])
    save_file(misshapen, str(tmp_path / "misshapen.safetensors"))
    assert_refused_and_unchanged(pipe, tmp_path / "misshapen.safetensors", ["shape", "do not fit"])
