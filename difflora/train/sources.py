"""Where a training step's inputs come from: the run's batches in order (from any step on), and their latents.

Neither needs a model to be tested: :class:`BatchSource` is arithmetic over a sampler, and :class:`LatentSource`
takes any module with the VAE's ``encode``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data import BucketBatchSampler, CaptionedImages, collate_batch, image_batches
from ..errors import InvalidArgumentError
from ..latent_cache import LatentDiskCache, LatentMemoryCache, cache_key
from . import steps as step_maths  # looked up at each call, so a test can replace one function

__all__ = ["BatchPosition", "BatchSource", "LatentSource", "MicroBatch", "batch_positions"]


@dataclass(frozen=True)
class BatchPosition:
    """Where a micro-batch sits: its epoch, its place in that epoch's batch list, and the optimizer step (1-based)
    it is part of."""

    epoch: int
    batch: int
    step: int


def batch_positions(
    batches_per_epoch: int, gradient_accumulation: int, total_steps: int, first_step: int = 0
) -> Iterator[BatchPosition]:
    """The micro-batches of optimizer steps ``first_step + 1 … total_steps``, in order.

    An optimizer step takes ``A = gradient_accumulation`` consecutive batches of one epoch, and every epoch ends on
    an optimizer step (its last ``batches_per_epoch mod A`` batches are left out). With ``U = batches_per_epoch div A``
    steps per epoch, step ``s + 1`` is batches ``(s mod U)·A … (s mod U)·A + A − 1`` of epoch ``s div U``: a resumed
    run finds its place from its step count alone.
    """
    per_epoch = step_maths.steps_per_epoch(batches_per_epoch, gradient_accumulation)
    for step in range(first_step, total_steps):
        epoch, within = divmod(step, per_epoch)
        for part in range(gradient_accumulation):
            yield BatchPosition(epoch, within * gradient_accumulation + part, step + 1)


@dataclass
class MicroBatch:
    """One accumulation micro-batch as one process sees it: its part (``share``) of the global batch."""

    step: int  # the optimizer step it is part of (1-based)
    global_size: int  # images in the global batch, over all processes
    share: slice  # this process's part of the global batch
    indices: list[int]  # the dataset indices of that part
    pixels: torch.Tensor | None = None  # their images (N × 3 × H × W in [-1, 1]) when asked for


class BatchSource:
    """The batches of a run, in order, from any optimizer step on.

    Each global batch (``batch_size × num_processes`` images of one bucket) is split across the processes, so N
    processes see exactly the images of one process with the same global batch. Images are loaded only when asked
    for (when the latents are not cached), an epoch at a time, by ``workers`` DataLoader processes.
    """

    def __init__(
        self, dataset: CaptionedImages, *, batch_size: int, gradient_accumulation: int, steps: int | None,
        epochs: int | None, seed: int, process_index: int = 0, num_processes: int = 1, workers: int = 0,
    ) -> None:
        global_batch = batch_size * num_processes
        if num_processes > 1 and len(dataset) < global_batch:
            raise InvalidArgumentError(
                f"batch_size {batch_size} × {num_processes} processes needs at least {global_batch} images, "
                f"{dataset.config.data_dir} has {len(dataset)}", "batch_size"
            )
        self.dataset = dataset
        self.sampler = BucketBatchSampler(
            dataset.bucket_per_index, global_batch, seed=seed, drop_last=len(dataset) >= global_batch
        )
        self.gradient_accumulation = gradient_accumulation
        self.updates_per_epoch = step_maths.steps_per_epoch(len(self.sampler), gradient_accumulation)
        self.total_steps = steps or epochs * self.updates_per_epoch
        self.batch_size, self.process_index, self.workers = batch_size, process_index, workers

    def share(self, global_size: int) -> slice:
        """This process's part of a global batch of ``global_size`` images."""
        start = self.process_index * self.batch_size
        return slice(start, min(start + self.batch_size, global_size))

    def from_step(self, first_step: int = 0, load_images: bool = False) -> Iterator[MicroBatch]:
        """The micro-batches of the optimizer steps after ``first_step`` (0: the whole run), with their images when
        ``load_images``."""
        positions = batch_positions(len(self.sampler), self.gradient_accumulation, self.total_steps, first_step)
        for epoch, in_epoch in itertools.groupby(positions, key=lambda position: position.epoch):
            self.sampler.set_epoch(epoch)
            self.dataset.set_epoch(epoch)  # before the DataLoader's workers copy the dataset
            epoch_batches = list(self.sampler)
            chosen = [(position.step, epoch_batches[position.batch]) for position in in_epoch]
            shares = [self.share(len(indices)) for _, indices in chosen]
            local = [indices[share] for (_, indices), share in zip(chosen, shares)]
            images = iter(image_batches(self.dataset, local, self.workers)) if load_images else None
            for (step, indices), share, mine in zip(chosen, shares, local):
                pixels = next(images)["pixel_values"] if images is not None else None
                yield MicroBatch(step, len(indices), share, mine, pixels)


class LatentSource:
    """Scaled VAE latents of training images: from a cache (memory or disk) filled before the first step, or, with
    no cache, encoded from each batch's images.

    Latents are the posterior mean (:func:`~.steps.encode_latents`), so cached and uncached runs train on the same
    numbers up to the round-off of how images were grouped into VAE batches.
    """

    def __init__(
        self, vae: torch.nn.Module, dataset: CaptionedImages, cache: LatentMemoryCache | LatentDiskCache | None,
        *, model_id: str = "", device: torch.device | str = "cpu", workers: int = 0,
    ) -> None:
        self.vae, self.dataset, self.cache = vae, dataset, cache
        self.model_id, self.device, self.workers = model_id, torch.device(device), workers
        self._keys: dict[int, str] = {}  # a file is hashed once per run, not once per step

    @property
    def cached(self) -> bool:
        return self.cache is not None

    def prefill(
        self, chunk_size: int, process_index: int = 0, num_processes: int = 1, show_progress: bool = False
    ) -> None:
        """Fill the cache, so the VAE never runs inside the training loop.

        The images are encoded ``chunk_size`` at a time, one bucket per chunk, only those whose latent is not cached
        yet. A disk cache is shared: each process encodes its share of the chunks and reads the others' files after
        them. A memory cache is per process, so each encodes all.
        """
        if self.cache is None:
            return
        chunks = list(BucketBatchSampler(self.dataset.bucket_per_index, chunk_size, shuffle=False))
        if isinstance(self.cache, LatentDiskCache):
            chunks = chunks[process_index::num_processes]
        missing = [indices for indices in self._missing_per_chunk(chunks) if indices]
        loaded = image_batches(self.dataset, missing, self.workers)
        bar = tqdm(loaded, disable=not show_progress, desc="caching latents", unit="batch", leave=False)
        for indices, batch in zip(missing, bar):
            self._encode_into_cache(indices, batch["pixel_values"])

    def get(self, indices: list[int], pixels: torch.Tensor | None = None) -> torch.Tensor:
        """The latents of ``indices`` (one bucket) on the device, ``N × C × h × w``. ``pixels`` are their images,
        needed when there is no cache; with one, an image whose latent is missing is loaded and encoded here."""
        if self.cache is None:
            return step_maths.encode_latents(self.vae, pixels).to(self.device)
        missing = [index for index in indices if self.cache.get(self._key(index)) is None]
        if missing:
            self._encode_into_cache(missing, collate_batch([self.dataset[index] for index in missing])["pixel_values"])
        return torch.stack([self.cache.get(self._key(index)) for index in indices]).to(self.device)

    def _key(self, index: int) -> str:
        if index not in self._keys:
            item, bucket = self.dataset.items[index], self.dataset.bucket_per_index[index]
            self._keys[index] = cache_key(Path(item.path), bucket, self.dataset.config, model_id=self.model_id)
        return self._keys[index]

    def _missing_per_chunk(self, chunks: list[list[int]]) -> list[list[int]]:
        """The indices of each chunk whose latent is neither cached nor encoded by an earlier chunk (an image that
        repeats within a chunk is encoded with it each time, as the loop's own fill would)."""
        coming: set[str] = set()
        missing = []
        for chunk in chunks:
            chunk_missing = [i for i in chunk if self._key(i) not in coming and self.cache.get(self._key(i)) is None]
            coming.update(self._key(i) for i in chunk_missing)
            missing.append(chunk_missing)
        return missing

    def _encode_into_cache(self, indices: list[int], pixels: torch.Tensor) -> None:
        for index, latent in zip(indices, step_maths.encode_latents(self.vae, pixels)):
            self.cache.put(self._key(index), latent.cpu())
