"""The steps the training recipe is made of, each on its own, and the options that change how a run goes."""

import math
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from difflora.errors import InvalidArgumentError
from difflora.lora import LoRAFactors
from difflora.train import train
from difflora.train.config import make_config
from difflora.train.steps import build_optimizer, diffusion_loss, diffusion_target, draw_noise, lora_parameter_groups

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


@pytest.fixture
def scheduler():
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def test_v_prediction_target(scheduler):
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([10, 500, 990])
    alpha_bar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents  # v = √ᾱ ε − √(1−ᾱ) x₀
    torch.testing.assert_close(diffusion_target(scheduler, latents, noise, timesteps, "v_prediction"), expected)
    assert diffusion_target(scheduler, latents, noise, timesteps, "epsilon") is noise
    with pytest.raises(InvalidArgumentError, match="^prediction_type 'sample'") as caught:
        diffusion_target(scheduler, latents, noise, timesteps, "sample")
    assert caught.value.parameter == "prediction_type"


def test_min_snr_weighting(scheduler):
    output, target = torch.zeros(2, 4, 4, 4), torch.ones(2, 4, 4, 4)  # per-sample MSE = 1
    timesteps = torch.tensor([5, 900])  # SNR far above and far below γ = 5
    snr = scheduler.alphas_cumprod[timesteps] / (1 - scheduler.alphas_cumprod[timesteps])
    assert snr[0] > 5 > snr[1]
    plain = diffusion_loss(output, target, timesteps, scheduler, "epsilon")
    assert plain.item() == 1.0
    eps = diffusion_loss(output, target, timesteps, scheduler, "epsilon", snr_gamma=5.0)
    assert eps.item() == pytest.approx(((5 / snr[0]) + 1.0).item() / 2, rel=1e-5)
    v = diffusion_loss(output, target, timesteps, scheduler, "v_prediction", snr_gamma=5.0)
    assert v.item() == pytest.approx(((5 / (snr[0] + 1)) + snr[1] / (snr[1] + 1)).item() / 2, rel=1e-5)


def test_noise_draws_are_reproducible_and_offset():
    first = draw_noise((4, 4, 8, 8), 1000, torch.Generator().manual_seed(1), noise_offset=0.1)
    again = draw_noise((4, 4, 8, 8), 1000, torch.Generator().manual_seed(1), noise_offset=0.1)
    assert torch.equal(first.noise, again.noise) and torch.equal(first.timesteps, again.timesteps)
    assert first.timesteps.min() >= 0 and first.timesteps.max() < 1000

    # The offset is one constant per sample and channel (the image's overall brightness), of std noise_offset: the
    # offset draw follows the plain noise from the same generator, so their difference is the offset alone.
    shape, offset = (512, 4, 8, 8), 0.1
    offset_noise = draw_noise(shape, 1000, torch.Generator().manual_seed(2), noise_offset=offset).noise
    plain_noise = draw_noise(shape, 1000, torch.Generator().manual_seed(2)).noise
    shift = offset_noise - plain_noise
    per_channel = shift[:, :, :1, :1]
    torch.testing.assert_close(shift, per_channel.expand(shape), rtol=0, atol=1e-6)  # constant over H×W
    assert per_channel.std().item() == pytest.approx(offset, rel=0.05)  # 2,048 offsets: std within 5%


def test_stratified_timesteps_cover_the_range_evenly_and_stay_uniform_each():
    generator = torch.Generator().manual_seed(0)
    batch, steps = 8, 1000
    draws = [draw_noise((batch, 4, 2, 2), steps, generator, timestep_sampling="stratified").timesteps
             for _ in range(4000)]
    for timesteps in draws[:50]:
        # One timestep in each eighth of the range: sorted, neighbours are 1/8 of the range apart (±1 from flooring).
        gaps = torch.diff(torch.sort(timesteps).values).float()
        assert ((gaps - steps / batch).abs() <= 1).all(), timesteps
    # Each timestep alone is uniform: every tenth of the range gets a tenth of the draws (32,000 draws; ±5%).
    counts = torch.bincount(torch.cat(draws) // 100, minlength=10).float()
    assert ((counts / counts.mean() - 1).abs() < 0.05).all(), counts
    with pytest.raises(InvalidArgumentError, match="^timestep_sampling 'lognormal'") as caught:
        draw_noise((2, 4, 2, 2), steps, generator, timestep_sampling="lognormal")
    assert caught.value.parameter == "timestep_sampling"


def test_adamw_is_fused_where_the_device_has_it_and_not_under_fp16_scaling():
    def kind(parameter, **kwargs):
        optimizer = build_optimizer([{"params": [parameter], "lr": 1e-3}], "adamw", 0.01, **kwargs)
        return "fused" if optimizer.defaults["fused"] else "foreach" if optimizer.defaults["foreach"] else "loop"

    assert kind(torch.nn.Parameter(torch.randn(3, 3))) == "fused"
    assert kind(torch.nn.Parameter(torch.randn(3, 3)), allow_fused=False) == "foreach"
    # torch only checks fused support at the first step; a device without it gets foreach from the start.
    assert kind(torch.nn.Parameter(torch.randn(3, 3, device="meta"))) == "foreach"


def test_loraplus_and_lora_fa_groups():
    factors = [LoRAFactors(8, 8, 2), LoRAFactors(8, 8, 2)]
    magnitude = torch.nn.Parameter(torch.ones(8))  # a DoRA magnitude: neither A nor B
    named = [(f"unet.layer{i}.{name}", p) for i, f in enumerate(factors)
             for name, p in (("down", f.down), ("up", f.up))]
    named.append(("unet.layer1.magnitude", magnitude))
    params = [p for _, p in named]
    groups = lora_parameter_groups([(named, 1e-4)], loraplus_ratio=16.0)
    assert [g["lr"] for g in groups] == [1e-4, 1.6e-3, 1e-4]
    assert groups[0]["params"] == [factors[0].down, factors[1].down]
    assert groups[1]["params"] == [factors[0].up, factors[1].up] and groups[2]["params"] == [magnitude]
    groups = lora_parameter_groups([(named, 1e-4)], lora_fa=True)
    assert len(groups) == 2 and all(p.requires_grad is False for p in params[0:4:2]) and magnitude.requires_grad
    with pytest.raises(InvalidArgumentError, match="^optimizer 'sgd' is not adamw") as caught:
        build_optimizer(groups, "sgd", 0.0)
    assert caught.value.parameter == "optimizer"


def test_mixed_precision_accumulation_checkpointing_logs_and_validation(tmp_path, tiny_model_dir):
    config = make_config(dict(
        data=str(SAMPLES / "ink-waves"), model=str(tiny_model_dir), output=str(tmp_path / "run"), steps=2,
        batch_size=2, gradient_accumulation=2, mixed_precision="bf16", gradient_checkpointing=True,
        train_text_encoder=True, text_encoder_lr=5e-4, loraplus_ratio=4.0, lr_scheduler="cosine", lr_warmup_steps=1,
        prediction_type="v_prediction", validation_prompts=["inkwave style, a moon"], validation_inference_steps=2,
        shuffle_captions=True, keep_tokens=1, caption_dropout=0.2, random_flip=True, seed=1,
    ))
    result = train(config)
    assert result.steps == 2 and all(math.isfinite(loss) for loss in result.losses)
    from difflora.formats import read_adapter

    adapter = read_adapter(result.adapter_path)
    assert adapter.modules_per_component() == {"text_encoder": 8, "unet": 56}
    assert all(module.down.dtype == torch.float32 for module in adapter.modules.values())  # LoRA stays fp32
    # The optimizer stepped under bf16: `up` starts at zero, so every module's `up` that is non-zero was learned, in
    # both components, and nothing became NaN or inf.
    for key, module in adapter.modules.items():
        assert torch.isfinite(module.down).all() and torch.isfinite(module.up).all(), key
        assert module.up.abs().max().item() > 0, key
    assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents*"))
    assert (tmp_path / "run" / "validation" / "step-000002.png").is_file()


def test_cached_and_uncached_training_are_the_same(tmp_path, tiny_model_dir):
    from difflora.formats import read_adapter

    results = []
    for cache in (True, False):
        config = make_config(dict(
            data=str(SAMPLES / "pixel-sunsets"), model=str(tiny_model_dir), output=str(tmp_path / f"run-{cache}"),
            steps=8, batch_size=4, lr=1e-2, report_to="none", cache_latents=cache, cache_text_encoder_outputs=cache,
            seed=2,
        ))
        results.append(train(config))
    cached, uncached = results
    # The caches encode in other batch groupings, so only fp32 round-off differs (which Adam can scale up to a
    # step on near-zero entries): compare the losses and the learned factors as a whole.
    assert cached.losses == pytest.approx(uncached.losses, abs=1e-5)
    a, b = read_adapter(cached.adapter_path), read_adapter(uncached.adapter_path)
    ups_a = torch.cat([module.up.flatten() for _, module in sorted(a.modules.items())])
    ups_b = torch.cat([b.modules[key].up.flatten() for key, _ in sorted(a.modules.items())])
    assert (ups_b - ups_a).norm() / ups_a.norm() < 1e-4



def test_dataloader_workers_load_the_same_batches_in_the_same_order(tmp_path, tiny_model_dir):
    from difflora.formats import read_adapter

    results = []
    for workers in (0, 2):
        # Random flips: no latent cache, images loaded every step, and different each epoch (8 steps cross one).
        config = make_config(dict(
            data=str(SAMPLES / "pixel-sunsets"), model=str(tiny_model_dir), output=str(tmp_path / f"run-{workers}"),
            steps=8, batch_size=4, lr=1e-2, report_to="none", random_flip=True, dataloader_workers=workers, seed=2,
        ))
        results.append(train(config))
    in_process, in_workers = results
    assert in_process.losses == in_workers.losses
    a, b = read_adapter(in_process.adapter_path), read_adapter(in_workers.adapter_path)
    assert all(torch.equal(b.modules[key].up, module.up) for key, module in a.modules.items())
