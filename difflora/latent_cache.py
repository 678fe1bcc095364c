"""Latent caches: a training image's VAE latent computed once and kept, in memory or as files across runs.

A latent is keyed by :func:`cache_key` (the file's bytes and everything that shapes its pixels), so a changed image
or setting is never served a stale latent.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._files import atomic_path
from .data import DataConfig
from .errors import InvalidArgumentError

__all__ = ["LatentDiskCache", "LatentMemoryCache", "cache_key", "can_cache_latents"]

logger = logging.getLogger(__name__)

_CACHE_KEY = re.compile(r"^[0-9a-f]{16,128}$")
_LATENT_CACHE_VERSION = "difflora-latents-1"  # bump when the pixels a key stands for change meaning


def can_cache_latents(config: DataConfig) -> bool:
    """Whether a sample's pixels are the same every epoch, so its VAE latent can be computed once and reused.

    A random crop or flip draws new pixels each epoch; a cached latent would freeze the first draw and silently
    turn the augmentation off.
    """
    return config.center_crop and not config.random_flip


def cache_key(path: Path, bucket: tuple[int, int], config: DataConfig, model_id: str = "") -> str:
    """Key of an image's latent: sha256 of the file's bytes and of everything that shapes its pixels (bucket,
    resolution, crop and flip mode). A changed file or size gets a new key, so a stale latent is never read.
    ``model_id`` names the VAE when several share a cache folder."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    crop = "center" if config.center_crop else "random"
    flip = "flip" if config.random_flip else "noflip"
    shaping = f"{_LATENT_CACHE_VERSION}|{bucket[0]}x{bucket[1]}|{config.resolution}|{crop}|{flip}|{model_id}"
    digest.update(b"|" + shaping.encode())
    return digest.hexdigest()


def _check_key(key: str) -> None:
    # Keys become file names: only hex digests, so a key can never point outside the cache folder.
    if not _CACHE_KEY.match(key):
        raise InvalidArgumentError(f"key {key!r} is not a hex digest (use cache_key)", "key")


class LatentMemoryCache:
    """Latents held in memory, keyed by :func:`cache_key`."""

    def __init__(self) -> None:
        self._latents: dict[str, torch.Tensor] = {}

    def get(self, key: str) -> torch.Tensor | None:
        return self._latents.get(key)

    def put(self, key: str, latents: torch.Tensor) -> None:
        _check_key(key)
        self._latents[key] = latents.detach().to("cpu", copy=True)

    def __contains__(self, key: object) -> bool:
        return key in self._latents


class LatentDiskCache:
    """Latents as ``<folder>/<key>.safetensors`` files, written atomically, so a cache survives between runs and a
    crash mid-write leaves no half file. A file that cannot be read counts as missing (it is recomputed)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._read: dict[str, torch.Tensor] = {}  # each file is read once per run, not once per step

    def _path(self, key: str) -> Path:
        _check_key(key)
        return self.folder / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        if key in self._read:
            return self._read[key]
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            self._read[key] = load_file(str(path))["latents"]
            return self._read[key]
        except (OSError, SafetensorError, KeyError) as error:
            logger.warning("latent cache file %s cannot be read (%s); it will be recomputed", path, error)
            return None

    def put(self, key: str, latents: torch.Tensor) -> None:
        latents = latents.detach().to("cpu").contiguous()
        with atomic_path(self._path(key)) as temporary:
            save_file({"latents": latents}, str(temporary))
        self._read[key] = latents

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(_CACHE_KEY.match(key)) and self._path(key).is_file()
