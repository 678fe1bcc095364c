"""The maths of a training step: noise, target, loss, optimizer groups. ``recipe.py`` strings the steps together.

The objective is Stable Diffusion's: noise latents ``x₀`` to ``x_t = √ᾱ_t x₀ + √(1-ᾱ_t) ε`` at a random timestep and
regress the UNet's output on ``ε`` (epsilon prediction) or ``v = √ᾱ_t ε − √(1-ᾱ_t) x₀`` (v-prediction), optionally
weighted by Min-SNR-γ (Hang et al. 2023) and with offset noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError

__all__ = [
    "NoiseDraw",
    "draw_noise",
    "diffusion_target",
    "diffusion_loss",
    "TextEmbeddingCache",
    "encode_latents",
    "lora_parameter_groups",
    "build_optimizer",
    "held_out_loss",
    "RandomState",
    "steps_per_epoch",
]


class RandomState:
    """A seeded ``torch.Generator`` that accelerate can save and restore with a checkpoint (state_dict protocol)."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


@dataclass
class NoiseDraw:
    noise: torch.Tensor
    timesteps: torch.Tensor


def draw_noise(
    latent_shape: tuple[int, ...],
    num_train_timesteps: int,
    generator: torch.Generator,
    noise_offset: float = 0.0,
    timestep_sampling: str = "uniform",
) -> NoiseDraw:
    """Noise and timesteps for a batch, drawn on the CPU from ``generator`` (same numbers on every device).

    Data-parallel runs draw for the *global* batch on every process and each takes its slice, so a run on N processes
    sees exactly the noise of a one-process run with the same global batch.

    ``timestep_sampling="uniform"`` draws each sample's timestep independently. ``"stratified"`` is the
    low-discrepancy sampler of Variational Diffusion Models (Kingma et al. 2021): one uniform offset ``u`` per batch and
    timesteps at ``(u + i/B) mod 1`` of the range, so a batch of ``B`` covers the range evenly. Each timestep is still
    uniform on its own, so the expected loss is unchanged; the batch loss varies less, and training gets further in
    the same steps.
    """
    noise = torch.randn(latent_shape, generator=generator)
    if noise_offset:
        # Offset noise (Guttenberg 2023): a per-channel constant shift lets the model learn overall brightness.
        noise = noise + noise_offset * torch.randn((latent_shape[0], latent_shape[1], 1, 1), generator=generator)
    batch = latent_shape[0]
    if timestep_sampling == "uniform":
        timesteps = torch.randint(0, num_train_timesteps, (batch,), generator=generator)
    elif timestep_sampling == "stratified":
        offset = torch.rand((), generator=generator, dtype=torch.float64)
        fractions = (offset + torch.arange(batch, dtype=torch.float64) / batch) % 1.0
        timesteps = (fractions * num_train_timesteps).long().clamp_(max=num_train_timesteps - 1)
    else:
        raise InvalidArgumentError(
            f"timestep_sampling {timestep_sampling!r} is not uniform or stratified", "timestep_sampling")
    return NoiseDraw(noise, timesteps)


def diffusion_target(
    noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise InvalidArgumentError(f"prediction_type {prediction_type!r} is not epsilon or v_prediction", "prediction_type")


def diffusion_loss(
    model_output: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    noise_scheduler,
    prediction_type: str,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """Mean squared error in fp32; with ``snr_gamma``, each sample weighted by ``min(SNR, γ)/SNR`` (ε) or
    ``min(SNR, γ)/(SNR+1)`` (v), which is Min-SNR-γ expressed for each target."""
    squared_error = F.mse_loss(model_output.float(), target.float(), reduction="none")
    per_sample = squared_error.mean(dim=list(range(1, target.ndim)))
    if snr_gamma is None:
        return per_sample.mean()
    from diffusers.training_utils import compute_snr  # here: importing diffusers takes seconds

    snr = compute_snr(noise_scheduler, timesteps.to(model_output.device))
    clipped = torch.clamp(snr, max=snr_gamma)
    weights = clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)
    return (per_sample * weights).mean()


class TextEmbeddingCache:
    """Text-encoder outputs, computed once per distinct caption while the text encoder is frozen.

    With caption shuffling or dropout the set of distinct captions grows, but each is still encoded once.
    """

    def __init__(self, tokenizer, text_encoder, enabled: bool = True) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.enabled = enabled
        self._cache: dict[str, torch.Tensor] = {}

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(
            captions, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids

    def encode(self, captions: list[str], device: torch.device) -> torch.Tensor:
        if not self.enabled:
            return self.text_encoder(self.tokenize(captions).to(device))[0]
        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if missing:
            with torch.no_grad():
                hidden = self.text_encoder(self.tokenize(missing).to(device))[0]
            for caption, row in zip(missing, hidden):
                self._cache[caption] = row
        return torch.stack([self._cache[c] for c in captions]).to(device)

    def __len__(self) -> int:
        return len(self._cache)


def encode_latents(vae, pixel_values: torch.Tensor) -> torch.Tensor:
    """Scaled VAE latents of images in [-1, 1]. The posterior *mean* is used: it is what a cache can hold, and the
    same for every run, so cached and uncached training see the same latents."""
    with torch.no_grad():
        posterior = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
        latents = posterior.mean
    scaling = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * scaling).float()


def lora_parameter_groups(
    parameters_by_lr: list[tuple[list[tuple[str, torch.nn.Parameter]], float]],
    loraplus_ratio: float = 1.0,
    lora_fa: bool = False,
) -> list[dict]:
    """Optimizer parameter groups from ``[(named parameters, lr), ...]``, each parameter named as
    :meth:`~difflora.runtime.LoRARuntime.named_parameters` names it (``<module key>.<tensor>``).

    LoRA+ (Hayou et al. 2024): the ``up`` (B) factors get ``lr × loraplus_ratio``. LoRA-FA (Zhang et al. 2023): the
    ``down`` (A) factors (and Tucker cores) stay at their random initialisation (``requires_grad = False``) and only
    ``up`` trains. Every other tensor (a DoRA magnitude, LoHa's and LoKr's factors) trains at ``lr``.
    """
    groups = []
    for named, lr in parameters_by_lr:
        roles: dict[str, list] = {"down": [], "up": [], "other": []}
        for name, parameter in named:
            role = name.rpartition(".")[2]
            roles["down" if role in ("down", "mid") else role if role == "up" else "other"].append(parameter)
        if lora_fa:
            for down in roles["down"]:
                down.requires_grad_(False)
        else:
            groups.append({"params": roles["down"], "lr": lr})
        groups.append({"params": roles["up"], "lr": lr * loraplus_ratio})
        groups.append({"params": roles["other"], "lr": lr})
    return [group for group in groups if group["params"]]


def build_optimizer(
    groups: list[dict], optimizer: str, weight_decay: float, allow_fused: bool = True
) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW when asked for and installed.

    ``allow_fused=False`` for fp16 mixed precision: a GradScaler always steps a fused optimizer (it skips overflowed
    updates inside the kernel), so accelerate could not tell a skipped step and the schedule would advance anyway.
    """
    if optimizer == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise InvalidArgumentError(
                "optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes)", "optimizer") from None
        return bitsandbytes.optim.AdamW8bit(groups, weight_decay=weight_decay)
    if optimizer != "adamw":
        raise InvalidArgumentError(f"optimizer {optimizer!r} is not adamw or adamw8bit", "optimizer")
    # fused: one kernel updates all the small LoRA tensors (CPU and GPU), instead of a Python loop over them; foreach
    # (one op per step of the update over all tensors) otherwise. torch checks fused support only at the first step,
    # so it is decided here.
    parameters = [p for group in groups for p in group["params"]]
    fused = allow_fused and all(p.is_floating_point() and p.device.type in _fused_adamw_devices() for p in parameters)
    return torch.optim.AdamW(groups, weight_decay=weight_decay, **({"fused": True} if fused else {"foreach": True}))


def _fused_adamw_devices() -> tuple[str, ...]:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return tuple(_get_fused_kernels_supported_devices())
    except ImportError:  # a private helper; these have fused AdamW in the torch versions difflora supports
        return ("cpu", "cuda")


def held_out_loss(
    unet,
    noise_scheduler,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    prediction_type: str = "epsilon",
    seed: int = 1234,
    draws: int = 4,
) -> float:
    """Mean denoising loss over ``draws`` fixed (noise, timestep) draws per sample: a comparable number across
    models, for checking that an adapter learned (lower than the base model's on held-out images of the style)."""
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    device = next(unet.parameters()).device
    with torch.no_grad():
        for _ in range(draws):
            draw = draw_noise(tuple(latents.shape), noise_scheduler.config.num_train_timesteps, generator)
            noise, timesteps = draw.noise.to(device), draw.timesteps.to(device)
            noisy = noise_scheduler.add_noise(latents.to(device), noise, timesteps)
            output = unet(noisy, timesteps, text_embeddings.to(device)).sample
            target = diffusion_target(noise_scheduler, latents.to(device), noise, timesteps, prediction_type)
            total += F.mse_loss(output.float(), target.float()).item()
    return total / draws


def steps_per_epoch(batches_per_epoch: int, gradient_accumulation: int) -> int:
    """Optimizer steps in an epoch when every step takes ``gradient_accumulation`` whole batches."""
    if batches_per_epoch < gradient_accumulation:
        raise InvalidArgumentError(
            f"gradient_accumulation {gradient_accumulation} needs at least that many batches per epoch, "
            f"the data gives {batches_per_epoch}", "gradient_accumulation"
        )
    return batches_per_epoch // gradient_accumulation
