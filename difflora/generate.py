"""Generating images with adapters, and PNGs that remember how they were made."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from ._files import atomic_path
from .errors import InvalidArgumentError, number_in, seed_number
from .runtime import LoRARuntime

__all__ = ["GenerationSettings", "generate", "save_png", "save_pngs", "a1111_parameters"]


# The ranges of the settings. Steps: schedulers are trained on 1000 timesteps, and several refuse more inference steps
# than that. Guidance: images are made at 1–15; far beyond, classifier-free guidance only pushes pixels to saturate,
# and 100 keeps every deliberate value. Sizes: 4096 px a side is past what SD 1.x/2.x/XL are used at (and than a GPU
# holds for them); smaller than 8 px is no image. Images per call: a batch; more is a loop. Seeds: errors.SEED_RANGE.
MAX_STEPS = 1000
MAX_GUIDANCE = 100.0
MAX_SIZE = 4096
MAX_IMAGES = 64


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
        number_in(self.steps, 1, MAX_STEPS, "steps", "steps", integer=True)
        number_in(self.num_images, 1, MAX_IMAGES, "num_images", "num_images", integer=True)
        for name in ("width", "height"):
            number_in(getattr(self, name), 8, MAX_SIZE, name, name, integer=True, multiple_of=8)
        seed_number(self.seed)
        number_in(self.guidance, 0.0, MAX_GUIDANCE, "guidance", "guidance")


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


def _png_info(settings: GenerationSettings, model: str, scheduler: str,
              adapters: list[AdapterUse]) -> PngImagePlugin.PngInfo:
    """The PNG text chunks ``parameters`` (A1111 style) and ``difflora`` (JSON)."""
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
    return info


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
    return save_pngs([image], [path], settings, model=model, scheduler=scheduler, adapters=adapters)[0]


def save_pngs(
    images: list[Image.Image],
    paths: list[str | os.PathLike],
    settings: GenerationSettings,
    *,
    model: str,
    scheduler: str,
    adapters: list[AdapterUse],
) -> list[Path]:
    """Write each image to its path as :func:`save_png` does, all or none: every image is written beside its path
    first, and only when all are written are they renamed into place (a full disk at the third image leaves the
    first two unwritten)."""
    if len(images) != len(paths):
        raise InvalidArgumentError(f"paths must hold one path per image ({len(images)}), got {len(paths)}", "paths")
    info = _png_info(settings, model, scheduler, adapters)
    with contextlib.ExitStack() as staged:
        for image, path in zip(images, paths):
            temporary = staged.enter_context(atomic_path(path))
            image.save(temporary, format="PNG", pnginfo=info)
    return [Path(path) for path in paths]
