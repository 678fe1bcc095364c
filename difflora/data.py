"""Image–caption datasets for LoRA training: scanning a folder, aspect-ratio buckets, captions, and latent caches.

A data folder follows one of two conventions, and may mix them:

* kohya: images anywhere below the folder, each caption in a same-name ``.txt`` (or ``.caption``) file; a folder
  named ``N_name`` (``10_mystyle``) repeats the images below it N times per epoch;
* Hugging Face imagefolder: a ``metadata.jsonl`` whose lines hold ``file_name`` (relative to the jsonl's folder) and
  ``text``; it is the caption source for the files it lists.

:func:`scan_dataset` only reads image headers, so a caller can reject a bad folder before it loads any model.
Training images are ``3 × H × W`` tensors in ``[-1, 1]``, batched one bucket at a time by :class:`BucketBatchSampler`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import DatasetError, InvalidArgumentError, number_in

__all__ = [
    "IMAGE_SUFFIXES", "BucketBatchSampler", "CaptionedImages", "DataConfig", "DatasetIndex",
    "ImageItem", "assign_bucket",
    "collate_batch", "image_batches", "load_rgb", "make_buckets", "prepare_image", "process_caption", "scan_dataset",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CAPTION_SUFFIXES = (".txt", ".caption")  # the first one found wins
METADATA_FILE = "metadata.jsonl"
_REPEAT_FOLDER = re.compile(r"^([1-9][0-9]*)_.+$")

# The ranges of the data's numbers: name → (low, high, the multiple an integer must be; None for a real number, 1
# for any integer). Sizes in pixels are multiples of 8 (the VAE's factor). Resolution: 4096, as generate's
# MAX_SIZE: past what SD 1.x/2.x/XL are used at, and a batch of it is more than a GPU holds. Bucket sides: a side up
# to twice the largest resolution (the default longest side, resolution×2), a step at most the resolution it divides;
# the buckets are every pair of sides, so an unbounded side is an endless scan. Caption dropout: a probability. Kept
# tags: kohya's longest prompt is 225 tokens and a tag is at least one, so keeping more in place changes nothing.
MAX_RESOLUTION = 4096
DATA_RANGES = {
    "bucket_step": (8, MAX_RESOLUTION, 8),
    "resolution": (8, MAX_RESOLUTION, 8),
    "min_bucket_side": (8, 2 * MAX_RESOLUTION, 8),
    "max_bucket_side": (8, 2 * MAX_RESOLUTION, 8),
    "caption_dropout": (0.0, 1.0, None),
    "keep_tokens": (0, 225, 1),
}


@dataclass
class DataConfig:
    """How a data folder becomes training samples.

    Each field is the option ``--<name-with-dashes>`` of ``difflora train`` and a key of its YAML files, except
    ``data_dir`` (``--data``, named by its ``option`` metadata) and ``seed`` (the run's ``--seed``). Errors name the
    field (``InvalidArgumentError(…, parameter="resolution")``).
    """

    data_dir: Path = field(metadata={
        "help": "image folder (kohya .txt captions, N_name repeat folders) or HF imagefolder with metadata.jsonl",
        "option": "data",
    })
    resolution: int = field(default=64, metadata={
        "help": "training resolution: each bucket holds about resolution² pixels (a multiple of 8)"})
    center_crop: bool = field(default=True, metadata={"help": "crop the center (off: crop at a random place)"})
    random_flip: bool = field(default=False, metadata={"help": "mirror half of the samples horizontally"})
    caption: str | None = field(default=None, metadata={"help": "caption for images that have none"})
    trigger_word: str | None = field(default=None, metadata={"help": "word put in front of every caption"})
    caption_dropout: float = field(default=0.0, metadata={
        "help": "probability that a caption is dropped (trains unconditional guidance too)"})
    shuffle_captions: bool = field(default=False, metadata={"help": "shuffle the comma-separated tags of each caption"})
    keep_tokens: int = field(default=0, metadata={"help": "leading tags kept in place when shuffling"})
    buckets: bool = field(default=True, metadata={"help": "aspect-ratio buckets (each batch from one bucket)"})
    bucket_step: int = field(default=8, metadata={"help": "bucket sides are multiples of this (a multiple of 8)"})
    min_bucket_side: int | None = field(default=None, metadata={
        "help": "shortest bucket side (unset: resolution/2, rounded down to a multiple of bucket_step)"})
    max_bucket_side: int | None = field(default=None, metadata={"help": "longest bucket side (unset: resolution×2)"})
    seed: int = field(default=0, metadata={"help": "seed of crops, flips, caption shuffles and dropout"})

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        self.validate()

    @property
    def bucket_sides(self) -> tuple[int, int]:
        """The shortest and longest bucket side: ``min_bucket_side`` and ``max_bucket_side``, or when unset,
        ``resolution/2`` (rounded down to a multiple of ``bucket_step``, at least one step) and ``resolution×2``."""
        step = self.bucket_step
        shortest, longest = self.min_bucket_side, self.max_bucket_side
        if shortest is None:
            shortest = max(step, self.resolution // 2 // step * step)
        if longest is None:
            longest = self.resolution * 2
        return shortest, longest

    def validate(self) -> None:
        """Raise :class:`InvalidArgumentError` naming the first field whose value cannot be used, with its range
        (:data:`DATA_RANGES`)."""
        for name, (low, high, multiple_of) in DATA_RANGES.items():
            value = getattr(self, name)
            if value is not None or name not in ("min_bucket_side", "max_bucket_side"):  # unset: from resolution
                number_in(value, low, high, name, name, integer=multiple_of is not None,
                          multiple_of=multiple_of if multiple_of != 1 else None)
        if not self.buckets:
            return
        step = self.bucket_step
        if self.resolution % step:
            raise InvalidArgumentError(f"bucket_step {step} must divide resolution {self.resolution}", "bucket_step")
        shortest, longest = self.bucket_sides
        for name, side in (("min_bucket_side", shortest), ("max_bucket_side", longest)):
            if side % step:
                raise InvalidArgumentError(f"{name} must be a positive multiple of bucket_step, got {side!r}", name)
        if shortest > self.resolution:
            raise InvalidArgumentError(f"min_bucket_side {shortest} must be at most resolution {self.resolution}",
                                       "min_bucket_side")
        if longest < self.resolution:
            raise InvalidArgumentError(f"max_bucket_side {longest} must be at least resolution {self.resolution}",
                                       "max_bucket_side")


# ----- scanning -----------------------------------------------------------------------------------------------------


@dataclass
class ImageItem:
    """One image of the folder: its oriented size, its caption as written (no trigger word yet) and its repeats."""

    path: Path
    caption: str
    width: int
    height: int
    repeats: int = 1
    caption_source: str = "none"  # "txt", "caption", "metadata", "fallback" (config.caption) or "none"


@dataclass
class DatasetIndex:
    """What :func:`scan_dataset` found: usable images in sorted path order, and the files it skipped with why."""

    data_dir: Path
    items: list[ImageItem]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        """Samples per epoch: each image counted as many times as it repeats."""
        return sum(item.repeats for item in self.items)

    @property
    def uncaptioned(self) -> int:
        """Images with no caption of their own (they got the fallback caption, or none)."""
        return sum(item.caption_source in ("fallback", "none") for item in self.items)


def _read_caption_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"caption file {path} cannot be read as UTF-8 text: {error}") from None
    # The first non-empty line, as kohya's tools do: later lines are usually notes or a second captioner's output.
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _read_metadata(folder: Path) -> tuple[dict[Path, str], list[tuple[Path, str]]]:
    """Captions from every ``metadata.jsonl`` below ``folder``, and the files they list that do not exist."""
    captions: dict[Path, str] = {}
    missing: list[tuple[Path, str]] = []
    for jsonl in sorted(path for path in folder.rglob(METADATA_FILE) if not _hidden(path, folder)):
        for number, line in enumerate(jsonl.read_text(encoding="utf-8-sig").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetError(f"{jsonl} line {number} is not JSON: {error.msg}") from None
            if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
                raise DatasetError(f"{jsonl} line {number} has no \"file_name\" string")
            text = record.get("text", record.get("caption", ""))
            image_path = (jsonl.parent / record["file_name"]).resolve()
            captions[image_path] = text.strip() if isinstance(text, str) else ""
            if not image_path.is_file():
                missing.append((image_path, f"listed in {jsonl.name} but not found"))
    return captions, missing


def _hidden(path: Path, folder: Path) -> bool:
    """Whether ``path`` is in a hidden folder below ``folder`` (.ipynb_checkpoints, caches) or is hidden itself."""
    return any(part.startswith(".") for part in path.relative_to(folder).parts)


def _repeats(relative: Path) -> int:
    """Repeats from the innermost ``N_name`` folder between the data folder and the image (1 if there is none)."""
    for part in reversed(relative.parts[:-1]):
        match = _REPEAT_FOLDER.match(part)
        if match:
            return int(match.group(1))
    return 1


def _image_size(path: Path) -> tuple[int, int]:
    """Width and height as the image will be shown (EXIF rotations swap them), reading only its header."""
    with Image.open(path) as image:
        image.verify()  # checks the file's structure without decoding it; the image is unusable after this
    with Image.open(path) as image:
        width, height = image.size
        # Only read EXIF already parsed from the header: for a PNG, getexif() without it decodes the whole image.
        has_exif = "exif" in image.info or image.format == "TIFF"
        rotated = has_exif and image.getexif().get(0x0112) in (5, 6, 7, 8)  # orientations that turn by 90°
    if width <= 0 or height <= 0:
        raise ValueError("image has no pixels")
    return (height, width) if rotated else (width, height)


def _one_line(error: Exception, path: Path) -> str:
    if isinstance(error, Image.UnidentifiedImageError):
        return "cannot identify image file"
    text = " ".join(str(error).replace(repr(str(path)), "").split())
    return text or type(error).__name__


def scan_dataset(config: DataConfig) -> DatasetIndex:
    """Find the images of ``config.data_dir`` and their captions, reading only image headers (no model import).

    Unreadable images are skipped, listed in ``skipped`` and logged. Raises :class:`DatasetError` when the folder
    is missing or holds no readable image, so a training run fails before it loads a model.
    """
    folder = config.data_dir
    try:
        is_folder = folder.is_dir()
    except OSError as error:  # a name the OS refuses outright (too long)
        raise DatasetError(f"data folder {folder}: {error.strerror or error}") from None
    if not is_folder:
        raise DatasetError(f"data folder {folder} does not exist or is not a folder")
    metadata_captions, skipped = _read_metadata(folder)
    candidates = sorted(
        path for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
        and not _hidden(path, folder)
    )
    items = []
    for path in candidates:
        try:
            width, height = _image_size(path)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            skipped.append((path, _one_line(error, path)))
            continue
        caption, source = metadata_captions.get(path.resolve(), ""), "metadata"
        if not caption:
            sidecar = next((path.with_suffix(s) for s in CAPTION_SUFFIXES if path.with_suffix(s).is_file()), None)
            caption = _read_caption_file(sidecar) if sidecar else ""
            source = sidecar.suffix[1:] if sidecar else "none"
        if not caption and config.caption:
            caption, source = config.caption.strip(), "fallback"
        elif not caption:
            source = "none"
        items.append(ImageItem(path, caption, width, height, _repeats(path.relative_to(folder)), source))
    if not items:
        if not skipped:
            raise DatasetError(f"data folder {folder} holds no images ({' '.join(IMAGE_SUFFIXES)})")
        raise DatasetError(
            f"data folder {folder} holds no readable images "
            f"({len(skipped)} files skipped: {_describe_skipped(skipped, limit=5)})"
        )
    if skipped:  # after the check above, so a folder with nothing usable gives one message, not two
        logger.warning("skipped %d file(s) in %s: %s", len(skipped), folder, _describe_skipped(skipped, limit=20))
    index = DatasetIndex(folder, items, skipped)
    if index.uncaptioned:
        logger.info("%d of %d images in %s have no caption of their own", index.uncaptioned, len(items), folder)
    return index


def _describe_skipped(skipped: list[tuple[Path, str]], limit: int) -> str:
    shown = ", ".join(f"{path.name}: {reason}" for path, reason in skipped[:limit])
    return shown + (", ..." if len(skipped) > limit else "")


# ----- images -------------------------------------------------------------------------------------------------------


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image as 8-bit RGB the way a viewer shows it.

    EXIF orientation is applied; transparency is composited on white (a transparent background must not turn
    black); 16-bit grayscale is scaled to 8 bits (Pillow's own conversion clips everything above 255 to white).
    """
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
                # "I" is how Pillow holds 16-bit PNGs/TIFFs, so it is read as 0..65535 too.
                levels = np.asarray(image, dtype=np.float64).clip(0, 65535) / 257.0
                return Image.fromarray(levels.round().astype(np.uint8), "L").convert("RGB")
            if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
                rgba = image.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, rgba).convert("RGB")
            return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGB (convert loads, and copies)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DatasetError(f"image {path} cannot be read: {_one_line(error, Path(path))}") from None


def make_buckets(config: DataConfig) -> list[tuple[int, int]]:
    """The (width, height) buckets: sides are multiples of ``bucket_step`` within the min/max sides, area at most
    ``resolution²``, and neither side can grow by a step without passing that area (so no bucket wastes pixels).

    The set is symmetric (a tall bucket for every wide one) and holds ``(resolution, resolution)``.
    """
    if not config.buckets:
        return [(config.resolution, config.resolution)]
    area, step = config.resolution**2, config.bucket_step
    shortest, longest = config.bucket_sides
    sides = range(shortest, longest + 1, step)

    def longest(other: int) -> int | None:
        fitting = [side for side in sides if side * other <= area]
        return fitting[-1] if fitting else None

    return sorted((width, longest(width)) for width in sides if longest(width) and longest(longest(width)) == width)


def assign_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest to ``width / height`` (distance of log ratios, so 2:1 and 1:2 are
    equally far from 1:1); among equally near buckets, the largest."""
    if width <= 0 or height <= 0 or not buckets:
        raise InvalidArgumentError(f"cannot bucket a {width}×{height} image among {len(buckets)} buckets")
    ratio = math.log(width / height)

    def distance(bucket: tuple[int, int]) -> tuple[float, int]:
        # Rounding makes exact ties (an image halfway between two buckets) compare equal despite float noise.
        return round(abs(math.log(bucket[0] / bucket[1]) - ratio), 9), -bucket[0] * bucket[1]

    return min(buckets, key=distance)


def prepare_image(
    image: Image.Image, bucket: tuple[int, int], center_crop: bool = True, flip: bool = False,
    rng: random.Random | None = None,
) -> torch.Tensor:
    """Resize ``image`` to cover ``bucket`` (aspect kept, Lanczos), crop it to the bucket, and return ``3 × H × W``
    floats in ``[-1, 1]``.

    ``center_crop=False`` crops at a random place and ``flip=True`` mirrors with probability 1/2; both draw from
    ``rng`` (the crop first), which they then require.
    """
    width, height = bucket
    if (not center_crop or flip) and rng is None:
        raise InvalidArgumentError("rng is required for a random crop or flip", "rng")
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    spare_x, spare_y = size[0] - width, size[1] - height
    if center_crop:
        left, top = spare_x // 2, spare_y // 2
    else:
        left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
    image = image.crop((left, top, left + width, top + height))
    if flip and rng.random() < 0.5:
        image = ImageOps.mirror(image)
    pixels = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
    return pixels.float() / 127.5 - 1.0


# ----- captions, dataset, sampler -----------------------------------------------------------------------------------


def _stable_seed(*parts: object) -> int:
    """A seed from ``parts`` that is the same in every process (Python's ``hash`` of a str is salted per run)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:7], "big")


def _stable_rng(*parts: object) -> random.Random:
    return random.Random(_stable_seed(*parts))


def process_caption(caption: str, config: DataConfig, rng: random.Random) -> str:
    """The caption a sample trains on: tags shuffled (the first ``keep_tokens`` stay), the trigger word in front,
    then emptied with probability ``caption_dropout``. ``rng`` is drawn from in that order.

    The trigger word is never shuffled (it is what calls up the LoRA) nor doubled: a caption that already starts with
    it keeps one, and ``keep_tokens`` counts the tags after it.
    """
    trigger = (config.trigger_word or "").strip()
    first, _, rest = caption.partition(",")
    if trigger and first.strip() == trigger:
        caption = rest.strip()
    if config.shuffle_captions:
        tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
        kept, shuffled = tags[: config.keep_tokens], tags[config.keep_tokens :]
        rng.shuffle(shuffled)
        caption = ", ".join(kept + shuffled)
    if trigger:
        caption = f"{trigger}, {caption}" if caption else trigger
    # rng.random() < 0 never holds and < 1 always does, so dropout 0 and 1 are exact.
    return "" if rng.random() < config.caption_dropout else caption


class CaptionedImages(torch.utils.data.Dataset):
    """The samples of a scanned folder, each image listed ``repeats`` times.

    Randomness (crop, flip, caption shuffle and dropout) comes from ``(seed, epoch, index)`` alone, so a sample is
    the same in any worker or process and changes with :meth:`set_epoch`. DataLoader workers copy the dataset when
    they start: with ``persistent_workers=True`` they keep the epoch they started with.
    """

    def __init__(self, index: DatasetIndex, config: DataConfig) -> None:
        self.config = config
        self.items = [item for item in index.items for _ in range(item.repeats)]
        bucket_list = make_buckets(config)
        by_item = {id(item): assign_bucket(item.width, item.height, bucket_list) for item in index.items}
        self.bucket_per_index = [by_item[id(item)] for item in self.items]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def caption(self, index: int) -> str:
        """Sample ``index``'s caption this epoch (trigger word, shuffle, dropout), without loading its image."""
        rng = _stable_rng(self.config.seed, self.epoch, index, "caption")
        return process_caption(self.items[index].caption, self.config, rng)

    def __getitem__(self, index: int) -> dict:
        item, bucket, config = self.items[index], self.bucket_per_index[index], self.config
        caption = self.caption(index)
        image_rng = _stable_rng(config.seed, self.epoch, index, "image")
        pixels = prepare_image(load_rgb(item.path), bucket, config.center_crop, config.random_flip, image_rng)
        return {"pixel_values": pixels, "caption": caption, "path": str(item.path), "bucket": bucket, "index": index}


def collate_batch(samples: list[dict]) -> dict:
    """Stack :class:`CaptionedImages` samples into a batch; they must share one bucket (:class:`BucketBatchSampler`)."""
    sizes = sorted({tuple(sample["pixel_values"].shape[1:]) for sample in samples})
    if len(sizes) > 1:
        raise InvalidArgumentError(f"a batch mixes image sizes {sizes}; batch with BucketBatchSampler")
    return {
        "pixel_values": torch.stack([sample["pixel_values"] for sample in samples]),
        "captions": [sample["caption"] for sample in samples],
        "paths": [sample["path"] for sample in samples],
        "buckets": [sample["bucket"] for sample in samples],
        "indices": torch.tensor([sample["index"] for sample in samples]),
    }


def image_batches(
    dataset: CaptionedImages, batches: Sequence[list[int]], workers: int = 0
) -> torch.utils.data.DataLoader:
    """The collated samples (:func:`collate_batch`) of ``batches``, in their order, loaded by ``workers`` DataLoader
    processes (0: this one). A sample depends only on ``(seed, epoch, index)``, so any number of workers gives the
    same batches; each worker copies ``dataset`` when iteration starts, so call :meth:`CaptionedImages.set_epoch`
    before iterating."""
    # A generator of its own: a DataLoader otherwise draws its workers' base seed from torch's global RNG on every
    # iteration, shifting the stream other code (dropout, a user's callback) reads.
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate_batch, num_workers=workers,
                                       generator=torch.Generator())


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of dataset indices, each from a single bucket.

    Each epoch (:meth:`set_epoch`) shuffles the indices within every bucket and then the order of the batches, with a
    generator seeded from ``(seed, epoch)``: every process computes the same batch list and takes every
    ``num_replicas``-th batch from ``rank``, so ranks get disjoint shares. The batches that do not divide evenly among
    the ranks are dropped (different ones each epoch), so every rank runs the same number of steps.
    """

    def __init__(
        self, bucket_per_index: Sequence[tuple[int, int]], batch_size: int, shuffle: bool = True,
        drop_last: bool = False, seed: int = 0, num_replicas: int = 1, rank: int = 0,
    ) -> None:
        if batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be >= 1, got {batch_size}", "batch_size")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            # No parameter= here: this rank is a process's, and the command line's --rank is the LoRA rank.
            raise InvalidArgumentError(f"rank {rank} is not in 0..{num_replicas - 1} (num_replicas={num_replicas})")
        self.groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, bucket in enumerate(bucket_per_index):
            self.groups[tuple(bucket)].append(index)
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, seed
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        rounding = math.floor if drop_last else math.ceil
        self.total_batches = sum(rounding(len(group) / batch_size) for group in self.groups.values())
        if self.total_batches < num_replicas:
            largest = max((len(group) for group in self.groups.values()), default=0)
            raise InvalidArgumentError(
                f"batch_size {batch_size} leaves {self.total_batches} batches for {num_replicas} process(es) "
                f"(largest bucket: {largest} images{', drop_last on' if drop_last else ''})", "batch_size"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.total_batches // self.num_replicas

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(_stable_seed(self.seed, self.epoch, "batches"))
        batches = []
        for bucket in sorted(self.groups):
            group = self.groups[bucket]
            if self.shuffle:
                group = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
            for start in range(0, len(group), self.batch_size):
                batch = group[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        kept = len(self) * self.num_replicas
        yield from batches[:kept][self.rank :: self.num_replicas]
