"""Where the training loop's inputs come from, without a model: the batch arithmetic (epochs, accumulation, resume,
processes) and the latent source (caches, their pre-fill, images loaded by DataLoader workers)."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from difflora.data import (
    BucketBatchSampler,
    CaptionedImages,
    DataConfig,
    collate_batch,
    scan_dataset,
)
from difflora.errors import InvalidArgumentError
from difflora.latent_cache import LatentDiskCache, LatentMemoryCache
from difflora.train.sources import BatchPosition, BatchSource, LatentSource, batch_positions


class Buckets:
    """The part of a dataset BatchSource uses without images: buckets, epochs, and the epoch each batch was drawn in."""

    def __init__(self, bucket_per_index):
        self.bucket_per_index = bucket_per_index
        self.epoch = 0
        self.config = DataConfig(Path("stub"))

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.bucket_per_index)


def source(dataset, **overrides):
    options = dict(batch_size=2, gradient_accumulation=2, steps=5, epochs=None, seed=7)
    options.update(overrides)
    return BatchSource(dataset, **options)


# 11 images in two buckets, batches of 2 (drop_last): 3 + 2 = 5 batches an epoch; accumulation 2 makes 2 optimizer
# steps an epoch and leaves the fifth batch out, so 5 steps cross two epoch boundaries.
ELEVEN = [(64, 64)] * 6 + [(96, 40)] * 5


def test_positions_end_every_epoch_on_an_optimizer_step():
    positions = list(batch_positions(batches_per_epoch=5, gradient_accumulation=2, total_steps=5))
    assert positions == [
        BatchPosition(0, 0, 1), BatchPosition(0, 1, 1), BatchPosition(0, 2, 2), BatchPosition(0, 3, 2),
        BatchPosition(1, 0, 3), BatchPosition(1, 1, 3), BatchPosition(1, 2, 4), BatchPosition(1, 3, 4),
        BatchPosition(2, 0, 5), BatchPosition(2, 1, 5),
    ]
    assert list(batch_positions(5, 2, 5, first_step=3)) == positions[6:]
    with pytest.raises(InvalidArgumentError) as caught:
        list(batch_positions(batches_per_epoch=1, gradient_accumulation=2, total_steps=1))
    assert caught.value.parameter == "gradient_accumulation"


def test_uninterrupted_run_takes_each_epochs_shuffled_batches_in_order():
    dataset = Buckets(ELEVEN)
    batches = source(dataset)
    assert (batches.updates_per_epoch, batches.total_steps) == (2, 5)
    seen = [(batch.step, dataset.epoch, batch.indices) for batch in batches.from_step(0)]
    sampler = BucketBatchSampler(ELEVEN, 2, seed=7, drop_last=True)
    expected = []
    for epoch, steps in ((0, (1, 2)), (1, (3, 4)), (2, (5,))):
        sampler.set_epoch(epoch)
        epoch_batches = list(sampler)
        assert len(epoch_batches) == 5
        for number, step in enumerate(steps):
            expected += [(step, epoch, epoch_batches[2 * number]), (step, epoch, epoch_batches[2 * number + 1])]
    assert seen == expected
    assert len({tuple(indices) for _, epoch, indices in seen if epoch == 0}) == 4  # four distinct batches an epoch


def test_resume_at_every_step_reproduces_the_uninterrupted_batch_sequence():
    def run(first_step):
        dataset = Buckets(ELEVEN)
        return [(batch.step, dataset.epoch, batch.indices, batch.share, batch.global_size)
                for batch in source(dataset).from_step(first_step)]

    straight = run(0)
    assert len(straight) == 5 * 2
    for first_step in range(0, 6):
        assert run(first_step) == straight[first_step * 2:], first_step


def test_processes_split_each_global_batch_between_them():
    single = list(source(Buckets(ELEVEN), batch_size=4, gradient_accumulation=1, steps=4).from_step(0))
    ranks = [list(source(Buckets(ELEVEN), batch_size=2, gradient_accumulation=1, steps=4, process_index=rank,
                         num_processes=2).from_step(0)) for rank in (0, 1)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 4
    for whole, first, second in zip(single, *ranks):
        assert first.indices + second.indices == whole.indices and len(whole.indices) == 4
        assert (first.share, second.share) == (slice(0, 2), slice(2, 4))
        assert first.global_size == second.global_size == 4 and first.step == second.step == whole.step
    with pytest.raises(InvalidArgumentError, match="needs at least 12 images") as caught:
        source(Buckets(ELEVEN), batch_size=6, process_index=0, num_processes=2)
    assert caught.value.parameter == "batch_size"


def test_epochs_set_the_length_when_steps_are_not_given():
    assert source(Buckets(ELEVEN), steps=None, epochs=3).total_steps == 6
    assert source(Buckets(ELEVEN), steps=4, epochs=3).total_steps == 4  # steps win


# ----- images and latents ---------------------------------------------------------------------------------------------


def image_folder(folder: Path, count: int = 6, repeats: int = 1) -> Path:
    """``count`` small noise images, squares and 4:1 strips in turn (the first three under a repeat folder when
    ``repeats`` > 1): two buckets at resolution 16, and pixels that a flip or crop changes."""
    rng = np.random.default_rng(0)
    for number in range(count):
        sub = folder / (f"{repeats}_rep" if repeats > 1 and number < 3 else "plain")
        sub.mkdir(parents=True, exist_ok=True)
        width, height = (48, 12) if number % 2 else (16, 16)
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"image{number}.png")
    return folder


def captioned(folder: Path, **options) -> CaptionedImages:
    config = DataConfig(folder, resolution=16, bucket_step=8, **options)
    return CaptionedImages(scan_dataset(config), config)


@pytest.mark.parametrize("workers", [0, 2])
def test_loaded_images_are_those_of_their_epoch_with_any_number_of_workers(tmp_path, workers):
    dataset = captioned(image_folder(tmp_path, count=8), random_flip=True, seed=3)
    batches = BatchSource(dataset, batch_size=2, gradient_accumulation=1, steps=8, epochs=None, seed=1,
                          workers=workers)
    assert batches.updates_per_epoch == 4  # 4 + 4 images in two buckets: a new epoch every 4 steps
    reference = captioned(tmp_path, random_flip=True, seed=3)
    by_epoch: dict[int, dict[int, torch.Tensor]] = {0: {}, 1: {}}
    for batch in batches.from_step(0, load_images=True):
        epoch = (batch.step - 1) // 4
        reference.set_epoch(epoch)
        expected = collate_batch([reference[index] for index in batch.indices])["pixel_values"]
        torch.testing.assert_close(batch.pixels, expected, rtol=0, atol=0)
        by_epoch[epoch].update(zip(batch.indices, batch.pixels))
    assert sorted(by_epoch[0]) == sorted(by_epoch[1]) == list(range(8))
    assert any(not torch.equal(by_epoch[0][i], by_epoch[1][i]) for i in range(8))  # the flips change each epoch
    assert all(batch.pixels is None for batch in batches.from_step(6))  # no images unless asked for


@dataclass
class _LatentDist:
    mean: torch.Tensor


class StubVAE(torch.nn.Module):
    """Stands in for the VAE: latents are the 4×4 average of the image (3 channels), and every call is recorded."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.config = type("Config", (), {"scaling_factor": 0.5})()
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.calls: list[int] = []

    def encode(self, pixels):
        self.calls.append(len(pixels))
        return type("Posterior", (), {"latent_dist": _LatentDist(F.avg_pool2d(pixels, 4) * self.weight)})()


def test_cached_latents_equal_latents_encoded_on_the_fly_and_the_vae_runs_only_to_fill_the_cache(tmp_path):
    dataset = captioned(image_folder(tmp_path))
    vae = StubVAE()
    latents = LatentSource(vae, dataset, LatentMemoryCache())
    latents.prefill(chunk_size=2)
    # Chunks are the unshuffled batches of 2 of each bucket: (0, 2), (4,) for squares and (1, 3), (5,) for the rest.
    assert sorted(vae.calls) == [1, 1, 2, 2]
    vae.calls.clear()
    on_the_fly = LatentSource(StubVAE(), dataset, None)
    for indices in ([0, 2], [5], [3, 1]):
        pixels = collate_batch([dataset[index] for index in indices])["pixel_values"]
        torch.testing.assert_close(latents.get(indices), on_the_fly.get(indices, pixels), rtol=0, atol=0)
    assert vae.calls == []  # the cache served every latent


def test_prefill_encodes_each_chunk_once_and_skips_what_an_earlier_chunk_encoded(tmp_path):
    dataset = captioned(image_folder(tmp_path, repeats=3))
    assert len(dataset) == 3 * 3 + 3
    vae = StubVAE()
    LatentSource(vae, dataset, LatentMemoryCache()).prefill(chunk_size=4)
    # Squares 0,1,2 (image0 ×3), 6,7,8 (image2 ×3), 10; strips 3,4,5 (image1 ×3), 9, 11. Chunks of 4 per bucket:
    # (0,1,2,6) (7,8,10) (3,4,5,9) (11). A repeat within a chunk is encoded with it (as the loop's own fill does);
    # image2's repeats in the second chunk were encoded by the first, so that chunk encodes only image4.
    assert vae.calls == [4, 1, 4, 1]


def test_disk_cache_is_filled_in_shares_by_each_process_and_read_by_all(tmp_path):
    dataset = captioned(image_folder(tmp_path / "images"))
    folder = tmp_path / "latents"
    encoded = []
    for rank in (0, 1):
        vae = StubVAE()
        LatentSource(vae, dataset, LatentDiskCache(folder)).prefill(2, process_index=rank, num_processes=2)
        encoded.append(sum(vae.calls))
    # Chunks (0, 2) (4) (1, 3) (5): process 0 takes the first and third, process 1 the others.
    assert encoded == [4, 2] and len(list(folder.glob("*.safetensors"))) == 6
    vae = StubVAE()
    reader = LatentSource(vae, dataset, LatentDiskCache(folder))
    reader.prefill(2)
    assert reader.get([1, 3]).shape == (2, 3, 2, 8) and vae.calls == []
    broken = sorted(folder.glob("*.safetensors"))[0]
    broken.write_bytes(b"truncated")
    fresh = LatentSource(vae, dataset, LatentDiskCache(folder))
    assert [fresh.get([index]).shape[0] for index in range(len(dataset))] == [1] * 6
    assert vae.calls == [1]  # the unreadable file was encoded again, once
