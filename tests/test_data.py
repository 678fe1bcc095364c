"""Training data: scanning kohya and imagefolder folders, image conversion, buckets, samplers, captions, latent caches,
and the two sample style sets under samples/."""

import json
import logging
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflora.data import (
    BucketBatchSampler,
    CaptionedImages,
    DataConfig,
    assign_bucket,
    collate_batch,
    load_rgb,
    make_buckets,
    prepare_image,
    process_caption,
    scan_dataset,
)
from difflora.errors import DatasetError, InvalidArgumentError
from difflora.latent_cache import LatentDiskCache, LatentMemoryCache, cache_key, can_cache_latents

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def save_image(path: Path, size=(16, 16), colour=(200, 40, 40), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ----- scanning -----------------------------------------------------------------------------------------------------


def test_kohya_folder_captions_and_repeats_are_read_recursively(tmp_path):
    save_image(tmp_path / "3_mystyle" / "a.png")
    write(tmp_path / "3_mystyle" / "a.txt", "  a red square, flat  \n")
    save_image(tmp_path / "3_mystyle" / "close-ups" / "b.jpg", size=(32, 16))
    write(tmp_path / "3_mystyle" / "close-ups" / "b.caption", "a wide red square")
    save_image(tmp_path / "extra" / "c.PNG")
    write(tmp_path / "extra" / "c.txt", "third")
    save_image(tmp_path / ".ipynb_checkpoints" / "hidden.png")  # hidden folders are not data
    index = scan_dataset(DataConfig(tmp_path))
    assert [item.path.relative_to(tmp_path).as_posix() for item in index.items] == [
        "3_mystyle/a.png", "3_mystyle/close-ups/b.jpg", "extra/c.PNG",
    ]
    assert [item.caption for item in index.items] == ["a red square, flat", "a wide red square", "third"]
    assert [item.caption_source for item in index.items] == ["txt", "caption", "txt"]
    assert [item.repeats for item in index.items] == [3, 3, 1]
    assert (index.items[1].width, index.items[1].height) == (32, 16)
    assert index.num_samples == 7 and index.skipped == [] and index.uncaptioned == 0
    assert len(CaptionedImages(index, DataConfig(tmp_path))) == 7


def test_metadata_jsonl_captions_the_files_it_lists(tmp_path):
    for name in ("one.png", "two.png", "three.png"):
        save_image(tmp_path / name)
    save_image(tmp_path / "sub" / "four.png")
    write(tmp_path / "one.txt", "the txt caption loses to metadata")
    write(tmp_path / "three.txt", "three from txt")
    write(tmp_path / "metadata.jsonl", "\n".join([
        json.dumps({"file_name": "one.png", "text": " first "}),
        json.dumps({"file_name": "two.png", "text": "second"}),
        "",
        json.dumps({"file_name": "gone.png", "text": "no such file"}),
    ]))
    write(tmp_path / "sub" / "metadata.jsonl", json.dumps({"file_name": "four.png", "text": "fourth"}) + "\n")
    index = scan_dataset(DataConfig(tmp_path))
    captions = {item.path.name: (item.caption, item.caption_source) for item in index.items}
    assert captions == {
        "one.png": ("first", "metadata"), "two.png": ("second", "metadata"),
        "three.png": ("three from txt", "txt"), "four.png": ("fourth", "metadata"),
    }
    skipped = [(path.name, reason) for path, reason in index.skipped]
    assert skipped == [("gone.png", "listed in metadata.jsonl but not found")]


def test_bad_metadata_line_names_the_file_and_line(tmp_path):
    save_image(tmp_path / "a.png")
    write(tmp_path / "metadata.jsonl", json.dumps({"file_name": "a.png", "text": "ok"}) + "\n{not json\n")
    with pytest.raises(DatasetError, match=r"metadata\.jsonl line 2 is not JSON"):
        scan_dataset(DataConfig(tmp_path))


def test_fallback_caption_and_trigger_word(tmp_path):
    save_image(tmp_path / "a.png")
    save_image(tmp_path / "b.png")
    write(tmp_path / "b.txt", "a blue thing")
    save_image(tmp_path / "c.png")
    write(tmp_path / "c.txt", "zorp, already tagged")
    plain = scan_dataset(DataConfig(tmp_path))
    assert [item.caption for item in plain.items] == ["", "a blue thing", "zorp, already tagged"]
    assert plain.uncaptioned == 1

    config = DataConfig(tmp_path, caption="a thing", trigger_word="zorp")
    index = scan_dataset(config)
    assert index.items[0].caption == "a thing" and index.items[0].caption_source == "fallback"
    assert index.uncaptioned == 1
    assert all("zorp" not in item.caption for item in index.items[:2])  # the trigger word is added at load time
    dataset = CaptionedImages(index, config)
    assert [dataset[i]["caption"] for i in range(3)] == ["zorp, a thing", "zorp, a blue thing", "zorp, already tagged"]
    no_caption = CaptionedImages(plain, DataConfig(tmp_path, trigger_word="zorp"))
    assert no_caption[0]["caption"] == "zorp"


def test_unreadable_files_are_listed_skipped_and_logged(tmp_path, caplog):
    save_image(tmp_path / "good.png")
    write(tmp_path / "broken.png", "these bytes are not a PNG")
    (tmp_path / "empty.jpg").write_bytes(b"")
    write(tmp_path / "notes.md", "not an image, not a candidate")
    with caplog.at_level(logging.WARNING, logger="difflora.data"):
        index = scan_dataset(DataConfig(tmp_path))
    assert [item.path.name for item in index.items] == ["good.png"]
    assert [(path.name, reason) for path, reason in index.skipped] == [
        ("broken.png", "cannot identify image file"), ("empty.jpg", "cannot identify image file"),
    ]
    assert "broken.png" in caplog.text and "empty.jpg" in caplog.text


def test_a_folder_without_a_usable_image_fails_in_one_line_naming_it(tmp_path):
    folder = tmp_path / "my data"
    for name in ("a.png", "b.png", "c.webp"):
        write(folder / name, "garbage")
    with pytest.raises(DatasetError) as caught:
        scan_dataset(DataConfig(folder))
    message = str(caught.value)
    assert "\n" not in message and str(folder) in message
    assert "3 files skipped: a.png: cannot identify image file, b.png: cannot identify image file" in message

    write(tmp_path / "only-text" / "a.txt", "a caption without an image")
    with pytest.raises(DatasetError, match="holds no images"):
        scan_dataset(DataConfig(tmp_path / "only-text"))
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(DataConfig(tmp_path / "missing"))


def test_scanning_a_bad_folder_imports_no_model_code(tmp_path):
    write(tmp_path / "a.png", "garbage")
    script = (
        "import sys\n"
        "from difflora.data import DataConfig, DatasetError, scan_dataset\n"
        f"try:\n    scan_dataset(DataConfig({str(tmp_path)!r}))\n"
        "except DatasetError as error:\n    print('error:', error)\n"
        "print('model modules:', sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers')))\n"
    )
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "error: data folder" in output and "model modules: []" in output


def test_options_are_validated_by_name(tmp_path):
    for kwargs, parameter in [
        ({"resolution": 60}, "resolution"),
        ({"caption_dropout": 1.5}, "caption_dropout"),
        ({"keep_tokens": -1}, "keep_tokens"),
        ({"bucket_step": 12}, "bucket_step"),
        ({"bucket_step": 48}, "bucket_step"),  # does not divide the resolution
        ({"min_bucket_side": 20}, "min_bucket_side"),
        ({"max_bucket_side": 48}, "max_bucket_side"),
        ({"min_bucket_side": 72}, "min_bucket_side"),  # above the resolution
    ]:
        with pytest.raises(InvalidArgumentError, match=f"^{parameter} ") as caught:
            DataConfig(tmp_path, **kwargs)
        assert caught.value.parameter == parameter, kwargs
    # Unset sides stay unset (a saved config keeps following the resolution) and resolve from the resolution.
    config = DataConfig(tmp_path, resolution=512)
    assert (config.min_bucket_side, config.max_bucket_side) == (None, None)
    assert config.bucket_sides == (256, 1024)
    assert DataConfig(tmp_path, resolution=64, min_bucket_side=48, max_bucket_side=96).bucket_sides == (48, 96)


# ----- images -------------------------------------------------------------------------------------------------------


def pixel(image: Image.Image, x=0, y=0):
    assert image.mode == "RGB"
    return image.getpixel((x, y))


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 0)), (255, 255, 255)),  # fully transparent → white paper
        (lambda: Image.new("RGBA", (4, 4), (0, 0, 0, 128)), (127, 127, 127)),
        (lambda: Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),
        (lambda: Image.new("L", (4, 4), 77), (77, 77, 77)),
        (lambda: Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
        (lambda: Image.fromarray(np.full((4, 4), 65535, np.uint16)), (255, 255, 255)),  # I;16 white stays white
        (lambda: Image.fromarray(np.full((4, 4), 32896, np.uint16)), (128, 128, 128)),  # scaled, not clipped
        (lambda: Image.new("I", (4, 4), 32896), (128, 128, 128)),  # Pillow holds 16-bit data as "I" too
    ],
    ids=["RGBA-clear", "RGBA-half", "LA", "L", "CMYK", "I16-white", "I16-grey", "I"],
)
def test_images_are_converted_to_rgb(tmp_path, make, expected):
    image = make()
    suffix = ".jpg" if image.mode == "CMYK" else ".tif" if image.mode == "I" else ".png"
    path = tmp_path / f"image{suffix}"
    image.save(path, **({"quality": 100} if suffix == ".jpg" else {}))
    got = pixel(load_rgb(path))
    tolerance = 3 if suffix == ".jpg" else 1
    assert max(abs(a - b) for a, b in zip(got, expected)) <= tolerance, (Image.open(path).mode, got)


def test_palette_transparency_is_white_and_exif_rotation_is_applied(tmp_path):
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 1), 1)
    palette.save(tmp_path / "p.png", transparency=0)
    converted = load_rgb(tmp_path / "p.png")
    assert pixel(converted) == (255, 255, 255) and pixel(converted, 1, 1) == (0, 255, 0)

    tall = Image.new("RGB", (32, 16), (10, 20, 30))
    exif = tall.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    tall.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_rgb(tmp_path / "rotated.jpg").size == (16, 32)
    item = scan_dataset(DataConfig(tmp_path)).items[1]
    assert item.path.name == "rotated.jpg" and (item.width, item.height) == (16, 32)


def test_unreadable_image_at_load_time_names_the_file(tmp_path):
    write(tmp_path / "bad.png", "nope")
    with pytest.raises(DatasetError, match="bad.png"):
        load_rgb(tmp_path / "bad.png")


# ----- buckets and batches ------------------------------------------------------------------------------------------


def test_buckets_fit_the_area_and_a_wide_image_gets_a_wide_bucket(tmp_path):
    config = DataConfig(tmp_path, resolution=64)
    buckets = make_buckets(config)
    assert (64, 64) in buckets and (128, 32) in buckets and (32, 128) in buckets
    assert len(set(buckets)) == len(buckets) and {(h, w) for w, h in buckets} == set(buckets)
    for width, height in buckets:
        assert width * height <= 64 * 64 and width % 8 == 0 and height % 8 == 0
        assert 32 <= width <= 128 and 32 <= height <= 128
        assert (width + 8) * height > 64 * 64 or width == 128  # no bucket can grow without passing the area
    width, height = assign_bucket(200, 100, buckets)
    assert width > height and 1.6 <= width / height <= 2.4  # 64² has no 2:1 bucket: one of the two nearest
    assert assign_bucket(240, 100, buckets) == (96, 40) and assign_bucket(100, 240, buckets) == (40, 96)
    assert assign_bucket(100, 100, buckets) == (64, 64)
    assert assign_bucket(1000, 500, make_buckets(DataConfig(tmp_path, resolution=128))) == (184, 88)
    assert assign_bucket(30, 10, [(48, 16), (24, 8)]) == (48, 16)  # equal ratio: the larger bucket wins
    assert make_buckets(DataConfig(tmp_path, resolution=64, buckets=False)) == [(64, 64)]


def test_prepare_image_covers_and_crops_the_bucket(tmp_path):
    left_red = np.zeros((20, 40, 3), np.uint8)
    left_red[:, :20] = (255, 0, 0)
    left_red[:, 20:] = (0, 0, 255)
    image = Image.fromarray(left_red)
    pixels = prepare_image(image, (16, 16))
    assert pixels.shape == (3, 16, 16) and pixels.min() >= -1 and pixels.max() <= 1
    assert pixels[0, 8, 0] > 0.9 and pixels[2, 8, 15] > 0.9  # center crop keeps both halves
    crops = {
        tuple(prepare_image(image, (16, 16), center_crop=False, rng=random.Random(seed))[0, 0].tolist())
        for seed in range(20)
    }
    assert len(crops) > 1
    first = prepare_image(image, (16, 16), center_crop=False, flip=True, rng=random.Random(5))
    assert torch.equal(first, prepare_image(image, (16, 16), center_crop=False, flip=True, rng=random.Random(5)))
    with pytest.raises(InvalidArgumentError):
        prepare_image(image, (16, 16), center_crop=False)


def bucket_dataset(tmp_path: Path) -> CaptionedImages:
    for index in range(7):
        save_image(tmp_path / f"square_{index}.png", size=(32, 32))
    for index in range(5):
        save_image(tmp_path / f"wide_{index}.png", size=(64, 32))
    for index in range(4):
        save_image(tmp_path / "2_tall" / f"tall_{index}.png", size=(32, 64))
    config = DataConfig(tmp_path, resolution=32)
    return CaptionedImages(scan_dataset(config), config)


def test_every_batch_comes_from_one_bucket_and_covers_the_epoch(tmp_path):
    dataset = bucket_dataset(tmp_path)
    assert len(dataset) == 7 + 5 + 8 and len(set(dataset.bucket_per_index)) == 3
    sampler = BucketBatchSampler(dataset.bucket_per_index, batch_size=3, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 + 2 + 3
    assert sorted(index for batch in batches for index in batch) == list(range(len(dataset)))
    for batch in batches:
        assert len({dataset.bucket_per_index[index] for index in batch}) == 1
    assert list(sampler) == batches  # the same epoch gives the same batches
    sampler.set_epoch(1)
    assert list(sampler) != batches
    dropping = BucketBatchSampler(dataset.bucket_per_index, batch_size=3, drop_last=True)
    assert len(dropping) == 2 + 1 + 2 and all(len(batch) == 3 for batch in dropping)

    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_batch)
    for batch in loader:
        width, height = batch["buckets"][0]
        assert batch["pixel_values"].shape == (len(batch["captions"]), 3, height, width)
        assert len(batch["paths"]) == len(batch["indices"])


def test_distributed_ranks_get_disjoint_equal_shares(tmp_path):
    buckets = bucket_dataset(tmp_path).bucket_per_index
    for drop_last in (False, True):
        for epoch in (0, 3):
            shares = []
            for rank in range(3):
                sampler = BucketBatchSampler(buckets, batch_size=2, drop_last=drop_last, num_replicas=3, rank=rank)
                sampler.set_epoch(epoch)
                shares.append(list(sampler))
                assert len(shares[-1]) == len(sampler)
            assert len({len(share) for share in shares}) == 1
            seen = [index for share in shares for batch in share for index in batch]
            assert len(seen) == len(set(seen))
    assert len(BucketBatchSampler(buckets, batch_size=2, num_replicas=3, rank=0)) == (4 + 3 + 4) // 3
    with pytest.raises(InvalidArgumentError, match="^batch_size 100 leaves 0 batches"):
        BucketBatchSampler(buckets, batch_size=100, drop_last=True)
    with pytest.raises(InvalidArgumentError, match="rank"):
        BucketBatchSampler(buckets, batch_size=2, num_replicas=2, rank=2)


# ----- captions -----------------------------------------------------------------------------------------------------


def test_caption_dropout_rate_and_its_exact_extremes(tmp_path):
    save_image(tmp_path / "500_one" / "a.png", size=(8, 8))
    write(tmp_path / "500_one" / "a.txt", "a caption")
    index = scan_dataset(DataConfig(tmp_path, resolution=8))
    for rate in (0.0, 0.3, 1.0):
        config = DataConfig(tmp_path, resolution=8, caption_dropout=rate, seed=4)
        dataset = CaptionedImages(index, config)
        captions = []
        for epoch in (0, 1):
            dataset.set_epoch(epoch)
            captions += [dataset[i]["caption"] for i in range(len(dataset))]
        dropped = captions.count("") / len(captions)
        if rate in (0.0, 1.0):
            assert dropped == rate
        else:
            assert abs(dropped - rate) < 0.04
        assert set(captions) <= {"", "a caption"}


def test_shuffle_keeps_the_first_tags_and_is_reproducible(tmp_path):
    caption = "zorp, red, square, flat, bold, simple, small, glossy"
    config = DataConfig(tmp_path, shuffle_captions=True, keep_tokens=2)
    shuffled = [process_caption(caption, config, random.Random(seed)) for seed in range(30)]
    tags = caption.split(", ")
    for result in shuffled:
        parts = result.split(", ")
        assert parts[:2] == tags[:2] and sorted(parts[2:]) == sorted(tags[2:])
    assert len({result for result in shuffled}) > 10
    assert process_caption(caption, DataConfig(tmp_path), random.Random(0)) == caption  # no shuffle: untouched

    save_image(tmp_path / "a.png", size=(8, 8))
    write(tmp_path / "a.txt", caption)
    config = DataConfig(tmp_path, resolution=8, shuffle_captions=True, keep_tokens=1, seed=9)
    dataset = CaptionedImages(scan_dataset(config), config)
    first = [dataset[0]["caption"] for _ in range(2)]
    again = CaptionedImages(scan_dataset(config), config)[0]["caption"]
    assert first[0] == first[1] == again
    per_epoch = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        per_epoch.add(dataset[0]["caption"])
    assert len(per_epoch) > 1 and all(result.startswith("zorp, ") for result in per_epoch)

    with_trigger = DataConfig(tmp_path, trigger_word="zorp", shuffle_captions=True, keep_tokens=1)
    for seed in range(10):
        result = process_caption(caption, with_trigger, random.Random(seed)).split(", ")
        assert result[:2] == ["zorp", "red"] and result.count("zorp") == 1 and sorted(result) == sorted(tags)


# ----- latent caches ------------------------------------------------------------------------------------------------


def test_cache_key_follows_the_file_content_and_pixel_settings(tmp_path):
    path = save_image(tmp_path / "a.png")
    config = DataConfig(tmp_path)
    key = cache_key(path, (64, 64), config)
    assert key == cache_key(path, (64, 64), DataConfig(tmp_path)) and len(key) == 64
    assert key != cache_key(path, (72, 56), config)
    assert key != cache_key(path, (64, 64), DataConfig(tmp_path, center_crop=False))
    assert key != cache_key(path, (64, 64), DataConfig(tmp_path, resolution=128))
    assert key != cache_key(path, (64, 64), config, model_id="another-vae")
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert cache_key(path, (64, 64), config) != key


def test_latent_caches_round_trip_and_the_disk_cache_survives(tmp_path):
    config = DataConfig(tmp_path)
    key = cache_key(save_image(tmp_path / "a.png"), (64, 64), config)
    latents = torch.randn(4, 8, 8)
    folder = tmp_path / "latents"
    for cache in (LatentMemoryCache(), LatentDiskCache(folder)):
        assert key not in cache and cache.get(key) is None
        cache.put(key, latents)
        assert key in cache and torch.equal(cache.get(key), latents)
        with pytest.raises(InvalidArgumentError):
            cache.put("../escape", latents)
    reopened = LatentDiskCache(folder)
    assert key in reopened and torch.equal(reopened.get(key), latents)
    assert [path.name for path in folder.iterdir()] == [f"{key}.safetensors"]  # no temporary file left behind
    (folder / f"{key}.safetensors").write_bytes(b"truncated")
    assert LatentDiskCache(folder).get(key) is None  # a damaged file is recomputed, not trusted


def test_latents_can_be_cached_only_without_random_crop_or_flip(tmp_path):
    assert can_cache_latents(DataConfig(tmp_path))
    assert not can_cache_latents(DataConfig(tmp_path, random_flip=True))
    assert not can_cache_latents(DataConfig(tmp_path, center_crop=False))


# ----- the sample sets ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "folder, trigger, source", [("pixel-sunsets", "pixsun", "txt"), ("ink-waves", "inkwave", "metadata")]
)
def test_sample_sets_scan_to_24_captioned_images(folder, trigger, source):
    index = scan_dataset(DataConfig(SAMPLES / folder))
    assert len(index.items) == 24 and index.skipped == []
    for item in index.items:
        assert (item.width, item.height) == (64, 64) and item.caption_source == source
        assert item.caption.startswith(f"{trigger} style, ")
