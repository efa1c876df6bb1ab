"""Dataset scan, image loading, and the latent / text caches: what is reused, what is rebuilt."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cache
from cache import (
    CacheEntryError,
    CachedDataset,
    ImageItem,
    ImageReadError,
    LatentCache,
    TextCache,
    load_image,
    scan_dataset,
)

RES = 16  # images are cached at 16x16; the fake VAE downscales by 4 -> latents (4, 4, 4)


class FakeVAE:
    """A fixed average-pool + 1x1 projection that counts its calls and the images it saw."""

    def __init__(self, factor=4, channels=4, nan_for=None):
        self.weight = torch.randn(channels, 3, generator=torch.Generator().manual_seed(0))
        self.factor, self.nan_for = factor, nan_for
        self.calls, self.images = 0, 0

    def __call__(self, pixels):
        assert not torch.is_grad_enabled()
        assert pixels.dtype == torch.float32 and pixels.min() >= -1 and pixels.max() <= 1
        self.calls += 1
        self.images += pixels.shape[0]
        latents = torch.einsum("oc,bchw->bohw", self.weight, F.avg_pool2d(pixels, self.factor))
        if self.nan_for is not None and self.images > self.nan_for:  # the nan_for-th image (0-based) onwards
            latents[-1, 0, 0, 0] = float("nan")
        return latents


class FakeTextEncoder:
    """Embeddings made from the caption's characters; records every caption it encodes."""

    def __init__(self, length=6, nan_caption=None):
        self.length, self.nan_caption = length, nan_caption
        self.seen = []

    def __call__(self, captions):
        assert not torch.is_grad_enabled()
        self.seen += captions
        codes = torch.tensor([[ord(c) for c in (text + " " * self.length)[: self.length]] for text in captions]).float()
        t5 = codes[:, :, None] * torch.linspace(-1, 1, 8)  # (B, L, 8)
        if self.nan_caption in captions:
            t5[captions.index(self.nan_caption), 0, 0] = float("inf")
        return {"t5": t5, "t5_mask": codes != 32, "clip_pooled": codes.mean(1, keepdim=True).expand(-1, 3).clone()}


def expected_latent(image_path):
    """What the cache should hold for an image: the fake VAE applied directly."""
    with torch.no_grad():
        return FakeVAE()(load_image(image_path, RES)[0][None])[0]


def make_image(path: Path, size=(24, 20), seed=0, mode="RGB"):
    """Random noise of (width, height) `size`, saved in the format its suffix says."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path)
    return path


def make_dataset(folder: Path, n=3):
    for i in range(n):
        make_image(folder / f"img{i}.png", size=(24 + 4 * i, 20), seed=i)
        (folder / f"img{i}.txt").write_text(f"caption {i}")
    return scan_dataset(folder)


def latent_cache(tmp_path, **overrides):
    settings = dict(cache_dir=tmp_path / "cache", encoder_identity="fake-vae:v1", resolution=RES, dtype=torch.float32)
    return LatentCache(**(settings | overrides))


# ---------------------------------------------------------------- scan


def test_caption_files_instance_prompt_and_repeats(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red ball\n  on grass\n")
    make_image(tmp_path / "b.JPG")
    (tmp_path / "b.txt").write_text("ohwx dog")
    make_image(tmp_path / "sub" / "c.webp")  # no caption file
    make_image(tmp_path / ".hidden" / "d.png")  # hidden folders are left out
    (tmp_path / "notes.txt").write_text("not a caption")

    with pytest.warns(UserWarning, match=r"1 image\(s\) have no caption.*'ohwx, photo'.*c\.webp"):
        items = scan_dataset(tmp_path, instance_prompt="ohwx", repeats=2, default_caption="photo")

    assert [item.image_path.name for item in items] == ["a.png", "b.JPG", "c.webp"] * 2
    assert [item.caption for item in items[:3]] == ["ohwx, a red ball on grass", "ohwx dog", "ohwx, photo"]
    assert [item.repeat for item in items] == [0, 0, 0, 1, 1, 1]
    assert all(item.crop is None and not item.flip for item in items)


def test_metadata_jsonl_layout(tmp_path):
    make_image(tmp_path / "x.png")
    make_image(tmp_path / "imgs" / "y.jpg")
    make_image(tmp_path / "unlisted.png")  # only the lines of metadata.jsonl count
    lines = [{"file_name": "imgs/y.jpg", "text": "a yellow\nbird"}, {}, {"file_name": "x.png"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(line) if line else "" for line in lines))

    with pytest.warns(UserWarning, match=r"x\.png"):
        items = scan_dataset(tmp_path, default_caption="something")
    assert [(item.image_path, item.caption) for item in items] == [
        (tmp_path / "imgs" / "y.jpg", "a yellow bird"),
        (tmp_path / "x.png", "something"),
    ]

    (tmp_path / "metadata.jsonl").write_text('{"file_name": "gone.png", "text": "t"}\n')
    with pytest.raises(ValueError, match="gone.png"):
        scan_dataset(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "t"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2"):
        scan_dataset(tmp_path)


def test_scan_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        scan_dataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="no images"):
        scan_dataset(tmp_path)
    make_image(tmp_path / "a.png")
    with pytest.raises(ValueError, match="repeats"):
        scan_dataset(tmp_path, repeats=0)


# ---------------------------------------------------------------- images


def test_load_image_alpha_on_white_exif_rotation_and_center_crop(tmp_path):
    # Left half transparent, right half opaque red: the left half must come back white.
    rgba = np.zeros((10, 20, 4), dtype=np.uint8)
    rgba[:, 10:] = (255, 0, 0, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    pixels, box = load_image(tmp_path / "alpha.png", (10, 20))
    assert pixels.shape == (3, 10, 20) and box == (0, 0, 10, 20)
    assert torch.allclose(pixels[:, :, :10], torch.ones(3, 10, 10))
    assert torch.allclose(pixels[:, :, 10:], torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 10, 10))

    # A 40x20 image, center-cropped to 10x10 after resizing its short side to 10.
    make_image(tmp_path / "wide.png", size=(40, 20))
    pixels, box = load_image(tmp_path / "wide.png", 10)
    assert pixels.shape == (3, 10, 10) and box == (0, 5, 10, 10)

    # EXIF orientation 6 (rotate 90 degrees): a stored 20 wide x 10 high photo is upright 10 x 20.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.full((10, 20, 3), 128, np.uint8)).save(tmp_path / "rotated.jpg", exif=exif)
    pixels, box = load_image(tmp_path / "rotated.jpg", (20, 10))
    assert pixels.shape == (3, 20, 10) and box == (0, 0, 20, 10)  # no crop needed once upright


def test_random_crop_is_reproducible_and_differs_per_repeat(tmp_path):
    make_image(tmp_path / "wide.png", size=(80, 16))
    (tmp_path / "wide.txt").write_text("x")
    boxes = [load_image(tmp_path / "wide.png", RES, "random", torch.Generator().manual_seed(s))[1] for s in (1, 1, 2)]
    assert boxes[0] == boxes[1]

    items = scan_dataset(tmp_path, repeats=4)
    vae = FakeVAE()
    entries = latent_cache(tmp_path, crop_mode="random").build(items, vae, progress=False)
    crops = [entry.crop for entry in entries]
    assert len(set(crops)) > 1 and vae.images == 4  # each repeat its own crop and entry

    again = FakeVAE()
    entries_again = latent_cache(tmp_path, crop_mode="random").build(items, again, progress=False)
    assert again.calls == 0 and [entry.crop for entry in entries_again] == crops
    other_seed = latent_cache(tmp_path, crop_mode="random", seed=7).build(items, FakeVAE(), progress=False)
    assert [entry.crop for entry in other_seed] != crops


def test_explicit_crop_box_and_flip_are_their_own_entries(tmp_path):
    items = make_dataset(tmp_path / "data", n=1)  # 24x20 -> resized 19x16
    plain = items[0]
    boxed = ImageItem(plain.image_path, plain.caption, crop=(0, 3, 16, 16))
    flipped = ImageItem(plain.image_path, plain.caption, flip=True)
    cache_ = latent_cache(tmp_path)
    entries = cache_.build([plain, boxed, flipped], FakeVAE(), progress=False)
    assert len({e.key for e in entries}) == 3
    # the flipped entry records its box in the mirrored image (SDXL's crop conditioning):
    # left = resized width 19 - right edge 17 = 2
    assert [e.crop for e in entries] == [(0, 1, 16, 16), (0, 3, 16, 16), (0, 2, 16, 16)]
    # The fake VAE pools 4x4 blocks, so mirroring the image mirrors the latent.
    assert torch.allclose(cache_.load(entries[2].key), cache_.load(entries[0].key).flip(-1))

    too_far = ImageItem(plain.image_path, plain.caption, crop=(0, 4, 16, 16))
    with pytest.raises(ValueError, match=r"img0\.png: crop box \(0, 4, 16, 16\) does not fit"):
        cache_.build([too_far], FakeVAE(), progress=False)


# ---------------------------------------------------------------- latent cache: reuse and invalidation


def test_unchanged_dataset_is_reused_without_the_encoder(tmp_path):
    items = make_dataset(tmp_path / "data") * 2  # a repeated center crop shares one entry
    vae = FakeVAE()
    first = latent_cache(tmp_path).build(items, vae, batch_size=2, progress=False)
    assert vae.images == 3 and len(first) == 6
    assert first[0].original_size == (20, 24) and first[0].crop == (0, 1, RES, RES)  # 24x20 -> 19x16, centered

    again = FakeVAE()
    second = latent_cache(tmp_path).build(items, again, batch_size=2, progress=False)
    assert again.calls == 0
    assert [e.key for e in second] == [e.key for e in first] and [e.crop for e in second] == [e.crop for e in first]


def test_changed_image_encodes_only_that_image(tmp_path):
    items = make_dataset(tmp_path / "data")
    first = latent_cache(tmp_path).build(items, FakeVAE(), progress=False)
    make_image(items[1].image_path, size=(28, 20), seed=99)  # new bytes, same name

    vae = FakeVAE()
    second = latent_cache(tmp_path).build(items, vae, progress=False)
    assert vae.images == 1
    assert [a.key == b.key for a, b in zip(first, second)] == [True, False, True]


def test_content_hash_ignores_touch_but_sees_new_bytes(tmp_path):
    items = make_dataset(tmp_path / "data")
    latent_cache(tmp_path, hash_content=True).build(items, FakeVAE(), progress=False)
    os.utime(items[0].image_path, ns=(10**18, 10**18))  # same bytes, new mtime

    vae = FakeVAE()
    latent_cache(tmp_path, hash_content=True).build(items, vae, progress=False)
    assert vae.calls == 0
    by_mtime = FakeVAE()
    latent_cache(tmp_path, hash_content=False).build(items, by_mtime, progress=False)
    assert by_mtime.images == 3  # path + size + mtime is another key family than the hash

    make_image(items[2].image_path, size=(32, 20), seed=42)
    vae = FakeVAE()
    latent_cache(tmp_path, hash_content=True).build(items, vae, progress=False)
    assert vae.images == 1


@pytest.mark.parametrize(
    "change",
    [
        {"resolution": 8},
        {"resolution": (16, 20)},
        {"encoder_identity": "fake-vae:v2"},
        {"dtype": torch.bfloat16},
        {"recache": True},
    ],
)
def test_changed_setting_or_recache_encodes_everything(tmp_path, change):
    items = make_dataset(tmp_path / "data")
    first = latent_cache(tmp_path).build(items, FakeVAE(), progress=False)
    vae = FakeVAE()
    second = latent_cache(tmp_path, **change).build(items, vae, progress=False)
    assert vae.images == 3
    if "recache" not in change:
        assert not {e.key for e in first} & {e.key for e in second}
        assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 6  # the old entries stay


def test_load_checks_the_entry(tmp_path):
    items = make_dataset(tmp_path / "data", n=2)
    cache_ = latent_cache(tmp_path)
    entries = cache_.build(items, FakeVAE(), progress=False)
    latent = cache_.load(entries[0].key)
    assert latent.shape == (4, 4, 4) and latent.dtype == torch.float32
    assert torch.equal(latent, expected_latent(items[0].image_path))

    with pytest.raises(CacheEntryError, match="was made by 'fake-vae:v1'"):
        latent_cache(tmp_path, encoder_identity="other").load(entries[0].key)
    cache_.path(entries[1].key).write_bytes(cache_.path(entries[0].key).read_bytes())  # a file under another name
    with pytest.raises(CacheEntryError, match="other inputs"):
        cache_.load(entries[1].key)


# ---------------------------------------------------------------- latent cache: failures


class DiskFull(OSError):
    pass


@pytest.mark.parametrize("fail_in", ["save_file", "replace"])
def test_interrupted_write_leaves_nothing_loadable(tmp_path, monkeypatch, fail_in):
    items = make_dataset(tmp_path / "data")
    real_save, real_replace, writes = cache.safetensors.torch.save_file, os.replace, []

    def save_then_fail(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        writes.append(filename)
        if fail_in == "save_file" and len(writes) == 2:
            with open(filename, "r+b") as file:  # half a file, as a crash midway would leave
                file.truncate(os.path.getsize(filename) // 2)
            raise DiskFull("no space left on device")

    def replace_or_fail(source, target):
        if fail_in == "replace" and len(writes) == 2:
            raise DiskFull("interrupted")
        real_replace(source, target)

    monkeypatch.setattr(cache.safetensors.torch, "save_file", save_then_fail)
    monkeypatch.setattr(cache.os, "replace", replace_or_fail)
    with pytest.raises(DiskFull):
        latent_cache(tmp_path).build(items, FakeVAE(), progress=False)
    monkeypatch.undo()

    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".safetensors"]  # one entry, no temp files
    vae = FakeVAE()
    entries = latent_cache(tmp_path).build(items, vae, progress=False)
    assert vae.images == 2 and len(entries) == 3


@pytest.mark.parametrize("damage", ["truncate", "flip_a_byte", "garbage"])
def test_damaged_entry_is_rebuilt_not_trusted(tmp_path, damage):
    items = make_dataset(tmp_path / "data")
    cache_ = latent_cache(tmp_path)
    entries = cache_.build(items, FakeVAE(), progress=False)
    path = cache_.path(entries[1].key)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 10]
    elif damage == "flip_a_byte":
        data[-3] ^= 0x40  # inside the tensor bytes
    else:
        data = bytearray(b"\x00garbage" * 5)
    path.write_bytes(bytes(data))
    with pytest.raises(CacheEntryError):
        cache_.load(entries[1].key)

    vae = FakeVAE()
    with pytest.warns(UserWarning, match="rebuilding 1 damaged"):
        rebuilt = latent_cache(tmp_path).build(items, vae, progress=False)
    assert vae.images == 1
    assert torch.equal(cache_.load(rebuilt[1].key), expected_latent(items[1].image_path))


def test_corrupt_image_is_skipped_and_listed_or_stops(tmp_path):
    items = make_dataset(tmp_path / "data")
    broken = tmp_path / "data" / "broken.png"
    broken.write_bytes(b"this is not a png" * 10)
    items = items[:1] + [ImageItem(broken, "broken")] + items[1:] + [ImageItem(tmp_path / "gone.png", "gone")]

    cache_ = latent_cache(tmp_path)
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image\(s\).*broken\.png.*gone\.png"):
        entries = cache_.build(items, FakeVAE(), batch_size=2, progress=False)
    assert [e.item.image_path.name for e in entries] == ["img0.png", "img1.png", "img2.png"]
    assert [path.name for path, _ in cache_.skipped] == ["broken.png", "gone.png"]

    with pytest.raises(ImageReadError, match="broken.png"):
        latent_cache(tmp_path, on_error="stop", recache=True).build(items[:3], FakeVAE(), progress=False)


def test_nan_latent_stops_caching_with_the_file_name(tmp_path):
    items = make_dataset(tmp_path / "data")
    with pytest.raises(FloatingPointError, match="img1.png"):
        latent_cache(tmp_path).build(items, FakeVAE(nan_for=1), progress=False)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1  # img0 only; nothing written for img1


def test_encoder_output_of_wrong_shape_is_refused(tmp_path):
    items = make_dataset(tmp_path / "data", n=1)
    with pytest.raises(ValueError, match="no whole downscale"):
        latent_cache(tmp_path).build(items, lambda pixels: torch.zeros(1, 4, 5, 4), progress=False)


# ---------------------------------------------------------------- text cache


def text_cache(tmp_path, **overrides):
    settings = dict(cache_dir=tmp_path / "text", encoder_identity="fake-t5:v1", max_length=6, apply_mask=False)
    return TextCache(**(settings | overrides))


def test_text_cache_encodes_each_new_caption_once(tmp_path):
    encoder = FakeTextEncoder()
    keys = text_cache(tmp_path).build(["a cat", "a dog", "a cat"], encoder, batch_size=8, progress=False)
    assert encoder.seen == ["a cat", "a dog"] and keys[0] == keys[2] != keys[1]
    loaded = text_cache(tmp_path).load("a dog")
    assert {name: tuple(t.shape) for name, t in loaded.items()} == {"t5": (6, 8), "t5_mask": (6,), "clip_pooled": (3,)}
    assert loaded["t5_mask"].dtype == torch.bool

    encoder = FakeTextEncoder()
    text_cache(tmp_path).build(["a cat", "a red dog"], encoder, progress=False)
    assert encoder.seen == ["a red dog"]  # only the changed caption


@pytest.mark.parametrize(
    "change",
    [
        {"encoder_identity": "fake-t5:v2"},
        {"max_length": 7},
        {"apply_mask": True},
        {"dtype": torch.bfloat16},
        {"recache": True},
    ],
)
def test_text_cache_setting_change_reencodes(tmp_path, change):
    text_cache(tmp_path).build(["a cat", "a dog"], FakeTextEncoder(), progress=False)
    encoder = FakeTextEncoder(length=change.get("max_length", 6))
    text_cache(tmp_path, **change).build(["a cat", "a dog"], encoder, progress=False)
    assert encoder.seen == ["a cat", "a dog"]


def test_text_cache_nan_stops_with_the_caption_and_damage_is_rebuilt(tmp_path):
    with pytest.raises(FloatingPointError, match="a bad caption"):
        encoder = FakeTextEncoder(nan_caption="a bad caption")
        text_cache(tmp_path).build(["fine", "a bad caption"], encoder, progress=False)

    cache_ = text_cache(tmp_path)
    path = cache_.path(cache_.key("fine"))
    path.write_bytes(path.read_bytes()[:-4])
    encoder = FakeTextEncoder()
    with pytest.warns(UserWarning, match="rebuilding 1 damaged"):
        cache_.build(["fine"], encoder, progress=False)
    assert encoder.seen == ["fine"] and cache_.load("fine")["t5"].shape == (6, 8)


# ---------------------------------------------------------------- dataset


def test_cached_dataset_batches_through_a_dataloader(tmp_path):
    items = make_dataset(tmp_path / "data")
    latents = latent_cache(tmp_path, dtype=torch.bfloat16)
    entries = latents.build(items, FakeVAE(), progress=False)
    texts = text_cache(tmp_path)
    texts.build(sorted({e.caption for e in entries}), FakeTextEncoder(), progress=False)

    dataset = CachedDataset(entries, latents, texts)
    sample = dataset[2]
    assert sample["latent"].shape == (4, 4, 4) and sample["latent"].dtype == torch.bfloat16
    assert sample["caption"] == "caption 2" and sample["index"] == 2 and sample["t5"].shape == (6, 8)

    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=CachedDataset.collate)
    batch = next(iter(loader))
    assert batch["latent"].shape == (2, 4, 4, 4)
    assert batch["t5"].shape == (2, 6, 8) and batch["t5_mask"].shape == (2, 6) and batch["clip_pooled"].shape == (2, 3)
    assert batch["caption"] == ["caption 0", "caption 1"] and batch["index"].tolist() == [0, 1]
    assert batch["original_size"].tolist() == [[20, 24], [20, 28]]
    assert batch["crop_top_left"].tolist() == [[0, 1], [0, 3]]  # 19 and 22 wide, centered
    assert batch["target_size"].tolist() == [[16, 16], [16, 16]]  # the crop: the size SDXL is told it trains at
    assert cache.collate([dataset[2]])["latent"].shape == (1, 4, 4, 4)
