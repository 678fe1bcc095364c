"""Generating images with adapters, and PNGs that remember how they were made."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from ._files import atomic_path
from .errors import InvalidArgumentError
from .runtime import LoRARuntime

__all__ = ["GenerationSettings", "generate", "save_png", "a1111_parameters"]


# The ranges of the settings. Steps: schedulers are trained on 1000 timesteps, and several refuse more inference steps
# than that. Guidance: images are made at 1–15; far beyond, classifier-free guidance only pushes pixels to saturate,
# and 100 keeps every deliberate value. Sizes: 4096 px a side is past what SD 1.x/2.x/XL are used at (and than a GPU
# holds for them); smaller than 8 px is no image. Images per call: a batch; more is a loop. Seeds: what
# torch.Generator.manual_seed takes as a signed 64-bit number.
MAX_STEPS = 1000
MAX_GUIDANCE = 100.0
MAX_SIZE = 4096
MAX_IMAGES = 64
SEED_LIMIT = 2**63


@dataclass
class GenerationSettings:
    """Everything that decides an image, apart from the model and the adapters.

    The seed drives a ``torch.Generator("cpu")``, so a seed gives the same starting noise on every device.
    """

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    guidance: float = 7.5
    seed: int = 0
    width: int = 64
    height: int = 64
    num_images: int = 1

    def validate(self) -> None:
        """Raise :class:`InvalidArgumentError` naming the field and its range when a value cannot be used."""
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise InvalidArgumentError(f"{name} must be text, got {getattr(self, name)!r}", name)
        for name, high in (("steps", MAX_STEPS), ("num_images", MAX_IMAGES)):
            value = getattr(self, name)
            if not _is_integer(value) or not 1 <= value <= high:
                raise InvalidArgumentError(f"{name} must be an integer in [1, {high}], got {value!r}", name)
        for name in ("width", "height"):
            value = getattr(self, name)
            if not _is_integer(value) or not 8 <= value <= MAX_SIZE or value % 8:
                raise InvalidArgumentError(f"{name} must be a multiple of 8 in [8, {MAX_SIZE}], got {value!r}", name)
        if not _is_integer(self.seed) or not 0 <= self.seed < SEED_LIMIT:
            raise InvalidArgumentError(f"seed must be an integer in [0, 2**63 - 1], got {self.seed!r}", "seed")
        guidance = self.guidance
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0 <= guidance <= MAX_GUIDANCE:
            raise InvalidArgumentError(
                f"guidance must be a finite number in [0, {MAX_GUIDANCE:g}], got {guidance!r}", "guidance")


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class AdapterUse:
    """How one adapter took part in an image: for the PNG's metadata."""

    name: str
    weight: float
    source: str | None = None
    block_weights: str | None = None
    extra: dict = field(default_factory=dict)


def generate(pipe, settings: GenerationSettings, *, output_type: str = "pil", callback=None):
    """Run ``pipe`` with ``settings`` and the model's own scheduler; returns the pipeline's images.

    ``callback(step, total_steps)`` is called after every denoising step (for progress bars).
    """
    settings.validate()
    # A mix the model's dtype cannot hold is refused before any step runs, not found as a black image.
    runtime = LoRARuntime.of(pipe)
    if runtime is not None:
        runtime.check_mix()
    vae_scale = getattr(pipe, "vae_scale_factor", 8)
    for name in ("width", "height"):
        value = getattr(settings, name)
        if value % vae_scale:
            raise InvalidArgumentError(f"{name} must be a multiple of {vae_scale} for this model, got {value}", name)
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    step_callback = None
    if callback is not None:

        def step_callback(pipeline, step, timestep, tensors):
            callback(step + 1, settings.steps)
            return tensors

    result = pipe(
        prompt=settings.prompt,
        negative_prompt=settings.negative_prompt or None,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        width=settings.width,
        height=settings.height,
        num_images_per_prompt=settings.num_images,
        generator=generator,
        output_type=output_type,
        callback_on_step_end=step_callback,
    )
    return result.images


def a1111_parameters(settings: GenerationSettings, model: str, scheduler: str, adapters: list[AdapterUse]) -> str:
    """The ``parameters`` text AUTOMATIC1111 and most image viewers show (``<lora:name:weight>`` in the prompt)."""
    prompt = settings.prompt + "".join(f" <lora:{a.name}:{a.weight:g}>" for a in adapters)
    lines = [prompt]
    if settings.negative_prompt:
        lines.append(f"Negative prompt: {settings.negative_prompt}")
    lines.append(
        f"Steps: {settings.steps}, Sampler: {scheduler}, CFG scale: {settings.guidance:g}, Seed: {settings.seed}, "
        f"Size: {settings.width}x{settings.height}, Model: {model}"
    )
    return "\n".join(lines)


def save_png(
    image: Image.Image,
    path: str | os.PathLike,
    settings: GenerationSettings,
    *,
    model: str,
    scheduler: str,
    adapters: list[AdapterUse],
) -> Path:
    """Write ``image`` atomically as PNG with text chunks ``parameters`` (A1111 style) and ``difflora`` (JSON)."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(settings, model, scheduler, adapters))
    info.add_text(
        "difflora",
        json.dumps(
            {
                "settings": asdict(settings),
                "model": model,
                "scheduler": scheduler,
                "adapters": [asdict(a) for a in adapters],
            },
            sort_keys=True,
        ),
    )
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG", pnginfo=info)
    return path
