"""Dataset scan, image loading, and the on-disk latent and text-embedding caches.

Training never runs the VAE or the text encoders: before the loop every image is encoded
once into a latent and every caption into its text-encoder outputs, and each result is
written to disk as one small safetensors file. The encoders can then leave the GPU.

    folder ──scan_dataset──> [ImageItem] ──LatentCache.build(encode_images)──> [LatentEntry]
                                  └─ captions ──TextCache.build(encode_texts)──> files
    CachedDataset(entries, latent_cache, text_cache)[i] -> {"latent", text tensors, "caption", ...}

How an entry is found again. Each entry's file name is a hash of every input that changes
it (`LatentCache.fields`, `TextCache.fields`): the image file (path + size + mtime, or a
sha256 of its bytes), the output size, the crop, the flip, the encoder identity and the
dtype; for text, the caption, encoder identity, max length and mask setting. The same
fields are stored in the file's metadata, with a checksum of each tensor. A changed input
gives a new file name, so only the changed items are encoded again; an unchanged one is
found, checked and reused without calling the encoder; `recache=True` ignores the disk.
Old entries are never deleted (a folder of small files; delete it to reclaim the space).

Decisions a user should know:
- `repeats=N` repeats the item list N times; each copy carries its `repeat` index.
- A random crop is drawn from a seed made of (the cache's seed, the image's file name, the
  repeat index): the same crop every run, so it can be cached, and a different crop for
  each repeat of an image. A center crop is the same for every repeat, so repeats share
  one entry.
- The crop box of a center or random crop is a function of the image, the output size and
  that seed, all of which are in the key; the box itself is stored in the entry (SDXL
  conditions on it). An item with an explicit `crop` box has the box itself in the key.
- `build()` reads every reused entry in full to check it, so a truncated or damaged file
  is rebuilt rather than trusted. That costs one read of the cache per run.
"""
import hashlib
import itertools
import json
import os
import shutil
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import safetensors.torch
import torch
from einops import rearrange
from PIL import Image, ImageOps
from safetensors import safe_open
from torch import Tensor
from tqdm import tqdm

import atomic

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CACHE_FORMAT = "2"  # bump when an entry's layout changes: every older entry is then rebuilt
CROP_MODES = ("center", "random")
ENTRY_HEADER_BYTES = 1024  # a cache file's safetensors header (key fields, checksums) is under 1 KiB
# Names CachedDataset puts beside the text tensors; an encoder output may not use them.
SAMPLE_NAMES = ("latent", "mask", "caption", "index", "original_size", "crop_top_left", "target_size")


# ---------------------------------------------------------------- dataset scan


@dataclass
class ImageItem:
    """One training image as scan_dataset finds it."""

    image_path: Path
    caption: str  # the text trained on, instance prompt / trigger word already prepended
    # "center", "random" or a (top, left, height, width) box in the resized image; None: the
    # cache's crop mode
    crop: tuple[int, int, int, int] | str | None = None
    repeat: int = 0  # which copy of the image this is, 0 .. repeats-1
    flip: bool = False  # mirror left-right (set on a copy to cache a flipped version too)
    size: tuple[int, int] | None = None  # (height, width) to crop to (its bucket); None: the cache's resolution
    mask: str | None = None  # loss mask: "alpha" (the image's alpha channel) or a mask image file; None: none


def scan_dataset(folder, caption_ext=".txt", instance_prompt=None, repeats=1, default_caption="",
                 keep_lines=False) -> list[ImageItem]:
    """Find the images of a dataset folder and their captions.

    Two layouts: images (png/jpg/jpeg/webp/bmp, subfolders included) each with a caption file
    of the same name (`cat.png` + `cat.txt`, the kohya / SimpleTuner convention), or a
    `metadata.jsonl` whose lines are {"file_name": "cat.png", "text": "a cat"} (the Hugging
    Face imagefolder convention; "caption" is accepted for "text").
    An image without a caption gets `default_caption`; those images are listed in a warning.
    `instance_prompt` (a trigger word) is put in front of every caption, unless the caption
    already has it. Whitespace runs become one space; keep_lines=True keeps the lines of a
    caption apart ("\n"), for captions.py to draw one per epoch. Returns the images in file
    order, the whole list `repeats` times.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {folder}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a whole number >= 1, got {repeats!r}")
    metadata = folder / "metadata.jsonl"
    if metadata.exists():
        pairs = read_metadata_jsonl(metadata, keep_lines)
    else:
        pairs = read_caption_files(folder, caption_ext, keep_lines)
    if not pairs:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {folder}")
    uncaptioned = [path for path, caption in pairs if caption is None]
    if uncaptioned:
        fallback = with_instance_prompt(default_caption, instance_prompt)
        warnings.warn(
            f"{len(uncaptioned)} image(s) have no caption and are trained on {fallback!r}: "
            f"{list_some(p.name for p in uncaptioned)}",
            stacklevel=2,
        )
    warn_caption_problems(pairs, caption_ext)
    final = [(path, with_instance_prompt(default_caption if c is None else c, instance_prompt)) for path, c in pairs]
    return [ImageItem(path, caption, repeat=repeat) for repeat in range(repeats) for path, caption in final]


def warn_caption_problems(pairs: list[tuple[Path, str | None]], caption_ext: str) -> None:
    """Warnings for empty caption files and for images that share one caption file
    (a.jpg and a.png both read a.txt)."""
    empty = [path for path, caption in pairs if caption is not None and not caption.strip()]
    if empty:
        warnings.warn(f"{len(empty)} image(s) have an empty caption: {list_some(p.name for p in empty)}", stacklevel=3)
    by_caption_file: dict[Path, list[Path]] = {}
    for path, _ in pairs:
        by_caption_file.setdefault(path.with_suffix(caption_ext if caption_ext.startswith(".") else "." + caption_ext),
                                   []).append(path)
    shared = {f: ps for f, ps in by_caption_file.items() if len(ps) > 1}
    if shared:
        examples = [" and ".join(p.name for p in ps) + f" share {f.name}" for f, ps in shared.items()]
        warnings.warn(f"{len(shared)} caption file(s) serve several images: {list_some(examples, 5)}", stacklevel=3)


EXIF_ORIENTATION = 0x0112  # values 5 to 8 turn the image by 90 degrees


def check_images(items: list[ImageItem], resolution, on_error: str = "skip",
                 sizes: dict | None = None) -> tuple[list[ImageItem], list]:
    """Open every image's header and check its data before any model loads. Returns the
    readable items and the (path, reason) of the others; on_error="stop" raises instead.
    Warns about images smaller than the training size (they are upscaled). `sizes`, when
    given, receives each readable image's upright (width, height) by path."""
    readable, skipped, small = [], [], []
    height, width = as_height_width(resolution)
    for item in items:
        try:
            with Image.open(item.image_path) as image:
                size = image.size
                image.verify()  # the file's structure and checksums, without decoding the pixels
            with Image.open(item.image_path) as image:  # verify() leaves the image unusable: open again
                if image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                    size = size[::-1]  # open_rgb turns it upright
        except Exception as error:  # PIL raises many kinds; each means "cannot use this file"
            if on_error == "stop":
                raise ImageReadError(f"cannot read image {item.image_path}: {type(error).__name__}: {error}") from None
            skipped.append((item.image_path, f"{type(error).__name__}: {error}"))
            continue
        if size[0] < width or size[1] < height:
            small.append(item.image_path.name)
        if sizes is not None:
            sizes[item.image_path] = size
        readable.append(item)
    if skipped:
        warnings.warn(f"skipping {len(skipped)} unreadable image(s) (on_bad_image='skip'): "
                      f"{list_some(Path(p).name for p, _ in skipped)}", stacklevel=2)
    if small:
        warnings.warn(f"{len(small)} image(s) are smaller than {width}x{height} and will be upscaled: "
                      f"{list_some(small, 10)}", stacklevel=2)
    return readable, skipped


def dataset_fingerprint(items: list[ImageItem], folder, repeats: int) -> str:
    """A short hash of what the dataset is (each image's path in the folder, size and caption,
    and the repeats): resume refuses a run whose dataset changed."""
    rows = [(str(Path(it.image_path).relative_to(folder)) if Path(it.image_path).is_relative_to(folder)
             else str(it.image_path), Path(it.image_path).stat().st_size, it.caption) for it in items]
    return hashlib.sha256(json.dumps([rows, repeats]).encode()).hexdigest()[:16]


def read_caption_files(folder: Path, caption_ext: str, keep_lines=False) -> list[tuple[Path, str | None]]:
    """(image, caption or None) for every image under `folder`, hidden folders left out."""
    caption_ext = caption_ext if caption_ext.startswith(".") else "." + caption_ext
    images = sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )
    return [(image, read_caption(image.with_suffix(caption_ext), keep_lines)) for image in images]


def read_caption(path: Path, keep_lines=False) -> str | None:
    """The caption in a text file, or None when there is no such file."""
    if not path.exists():
        return None
    try:
        return clean_caption(path.read_text(encoding="utf-8-sig"), keep_lines)
    except UnicodeDecodeError as error:
        raise ValueError(f"caption file {path} is not UTF-8 text ({error}); save it as UTF-8") from None


def read_metadata_jsonl(path: Path, keep_lines=False) -> list[tuple[Path, str | None]]:
    """(image, caption or None) for every line of a metadata.jsonl; a missing image is an error."""
    pairs, missing = [], []
    for line_number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {line_number}: not valid JSON ({error})") from None
        if not isinstance(record, dict) or "file_name" not in record:
            expected = '{"file_name": ..., "text": ...}'
            raise ValueError(f"{path}, line {line_number}: expected {expected}, got {line.strip()[:200]}")
        image = path.parent / record["file_name"]
        if not image.is_file():
            missing.append(record["file_name"])
        caption = record.get("text", record.get("caption"))
        pairs.append((image, None if caption is None else clean_caption(str(caption), keep_lines)))
    if missing:
        raise ValueError(
            f"{path} names {len(missing)} image(s) that do not exist: {list_some(missing)}. Fix or remove those lines."
        )
    return pairs


def clean_caption(text: str, keep_lines=False) -> str:
    """Runs of whitespace, newlines included, become one space; keep_lines=True keeps the
    non-empty lines apart."""
    if keep_lines:
        return "\n".join(line for line in (" ".join(part.split()) for part in text.splitlines()) if line)
    return " ".join(text.split())


def with_instance_prompt(caption: str, instance_prompt: str | None) -> str:
    """The trigger word in front, trimmed and never twice (captions.with_instance_prompt)."""
    import captions

    return captions.with_instance_prompt(caption, instance_prompt or "")


def list_some(names, limit: int = 20) -> str:
    names = [str(n) for n in names]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ---------------------------------------------------------------- images


def as_height_width(resolution: int | tuple[int, int]) -> tuple[int, int]:
    """An int means a square; a pair is (height, width)."""
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"resolution must be positive, got {resolution!r}")
    return int(height), int(width)


def open_rgb(path) -> Image.Image:
    """Decode an image fully (so a broken file fails here), upright per its EXIF, as RGB."""
    with Image.open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image)  # a copy, rotated as the camera meant
    if image.mode.startswith("I"):  # 16-bit grayscale PNG: 0..65535 -> 0..255
        gray = (np.asarray(image, dtype=np.float32) / 257).clip(0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")  # transparent parts turn white
    return image.convert("RGB")


def cover_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The (height, width) that keeps the aspect ratio and just covers `target`."""
    scale = max(target[0] / size[0], target[1] / size[1])
    return max(target[0], round(size[0] * scale)), max(target[1], round(size[1] * scale))


def choose_crop(resized: tuple[int, int], target: tuple[int, int], mode: str, generator=None) -> tuple[int, ...]:
    """A (top, left, height, width) box of size `target` inside an image of size `resized`."""
    slack_h, slack_w = resized[0] - target[0], resized[1] - target[1]
    if mode == "center":
        return slack_h // 2, slack_w // 2, *target
    if mode == "random":
        top = int(torch.randint(0, slack_h + 1, (), generator=generator))
        left = int(torch.randint(0, slack_w + 1, (), generator=generator))
        return top, left, *target
    raise ValueError(f"crop must be one of {CROP_MODES} or a (top, left, height, width) box, got {mode!r}")


def crop_geometry(original: tuple[int, int], resolution, crop="center", generator=None):
    """(resized (height, width), crop box (top, left, height, width) in the resized image) for an
    image of `original` (height, width) cropped to `resolution` by `crop` (see load_image)."""
    if isinstance(crop, str):
        target = as_height_width(resolution)
        resized = cover_size(original, target)
        return resized, choose_crop(resized, target, crop, generator)
    box = tuple(int(v) for v in crop)
    resized = cover_size(original, box[2:])
    top, left, height, width = box
    if top < 0 or left < 0 or top + height > resized[0] or left + width > resized[1]:
        raise ValueError(f"crop box {box} does not fit the image resized to {resized}")
    return resized, box


def resize_crop_flip(image: Image.Image, resized, box, flip: bool, resample=Image.Resampling.LANCZOS) -> Image.Image:
    top, left, height, width = box
    if resized != (image.height, image.width):
        image = image.resize((resized[1], resized[0]), resample)  # PIL sizes are (w, h)
    image = image.crop((left, top, left + width, top + height))
    return ImageOps.mirror(image) if flip else image


def mirrored_box(box, resized_width: int) -> tuple[int, int, int, int]:
    """The crop box as seen in the mirrored image, what SDXL's crop conditioning takes for a
    flipped sample: the left edge becomes (resized width - right edge); the top stays (kohya
    sd-scripts mirrors its crop_ltrb the same way, train_util.py: `target_size[0] - crop_ltrb[2]`)."""
    top, left, height, width = box
    return top, resized_width - left - width, height, width


def prepare_image(image: Image.Image, resolution, crop="center", generator=None, flip=False):
    """load_image on an opened RGB image, also returning the (height, width) of the original.
    A flipped image's box is given in the flipped frame (mirrored_box)."""
    original = (image.height, image.width)
    resized, box = crop_geometry(original, resolution, crop, generator)
    image = resize_crop_flip(image, resized, box, flip)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (H, W, 3), 0..255
    box = mirrored_box(box, resized[1]) if flip else box
    return rearrange(pixels, "h w c -> c h w").float() / 127.5 - 1, box, original


def open_mask(source: str, image_path, size: tuple[int, int]) -> Image.Image:
    """The loss mask of an image as an 8-bit grey image of the upright image's (height, width):
    its alpha channel (opaque = trained; no alpha: all trained), or a mask file (white = trained,
    black = ignored), resized to the image when it differs."""
    path = image_path if source == "alpha" else source
    with Image.open(path) as opened:
        opened.load()
        upright = ImageOps.exif_transpose(opened)
    if source == "alpha":
        has_alpha = upright.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in upright.info
        return upright.convert("RGBA").getchannel("A") if has_alpha else Image.new("L", upright.size, 255)
    mask = upright.convert("L")
    if mask.size != (size[1], size[0]):
        mask = mask.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return mask


def latent_mask(mask: Image.Image, resized, box, flip: bool, downscale: int) -> Tensor:
    """(1, h, w) in [0, 1] at the latent's size: the mask cropped like the image, then averaged
    over each latent pixel's downscale x downscale patch (area downscaling; a latent pixel whose
    pixels are all masked is exactly 0)."""
    cropped = resize_crop_flip(mask, resized, box, flip, Image.Resampling.BOX)  # area averages: no ringing
    pixels = torch.from_numpy(np.array(cropped, dtype=np.float32) / 255.0)[None, None]  # (1, 1, H, W)
    return torch.nn.functional.avg_pool2d(pixels, downscale)[0] if downscale > 1 else pixels[0]


def load_image(path, resolution, crop="center", generator=None, flip=False) -> tuple[Tensor, tuple[int, int, int, int]]:
    """An image as pixels (3, H, W) float32 in [-1, 1], and the crop box used.

    The image is resized (aspect ratio kept) so that it just covers `resolution` (an int for a
    square, or (height, width)), then cropped to it. `crop` is "center", "random" (drawn with
    `generator`) or an explicit (top, left, height, width) box in the resized image, whose
    height and width then replace `resolution`. EXIF rotation is applied and transparent
    pixels become white.
    """
    pixels, box, _ = prepare_image(open_rgb(path), resolution, crop, generator, flip)
    return pixels, box


# ---------------------------------------------------------------- entries on disk


class CacheEntryError(RuntimeError):
    """A cache file that is missing, unreadable, or does not hold what its name says."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = Path(path), reason
        hint = "Run the caching step again (it rebuilds such files), or set recache=True."
        super().__init__(f"cache file {path} {reason}. {hint}")


class ImageReadError(ValueError):
    """An image that cannot be read, with on_error="stop" (a user error: no traceback)."""


def entry_key(fields: dict) -> str:
    """The file name of an entry: a hash of everything that changes it."""
    text = json.dumps(fields, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def checksum(tensor: Tensor) -> str:
    """crc32 of a tensor's bytes; catches a file damaged inside its data."""
    raw = tensor.detach().contiguous().flatten().view(torch.uint8).numpy()
    return f"{zlib.crc32(raw):08x}"


def write_entry(path: Path, tensors: dict[str, Tensor], fields: dict, info: dict) -> None:
    """Save an entry with its key fields, tensor checksums and derived `info` as metadata."""
    metadata = {
        "cache_format": CACHE_FORMAT,
        "fields": json.dumps(fields, sort_keys=True),
        "checksums": json.dumps({name: checksum(t) for name, t in tensors.items()}),
        "info": json.dumps(info),
    }
    atomic.write_safetensors(tensors, path, metadata)


def read_entry(path: Path, key: str) -> tuple[dict[str, Tensor], dict, dict]:
    """(tensors, fields, info) of an entry, after checking the file is whole and is `key`'s."""

    def damaged(reason: str) -> CacheEntryError:
        return CacheEntryError(path, reason)

    if not path.exists():
        raise damaged("is missing")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except Exception as error:  # truncated, garbage, unreadable: safetensors says which
        raise damaged(f"is unreadable ({error})") from error
    if metadata.get("cache_format") != CACHE_FORMAT:
        raise damaged(f"has cache format {metadata.get('cache_format')!r}, expected {CACHE_FORMAT!r}")
    try:
        fields = json.loads(metadata["fields"])
        checksums = json.loads(metadata["checksums"])
        info = json.loads(metadata["info"])
    except (KeyError, ValueError) as error:
        raise damaged(f"has damaged metadata ({error})") from error
    if entry_key(fields) != key:
        raise damaged("holds an entry for other inputs than its name says")
    if set(checksums) != set(tensors) or any(checksum(t) != checksums[name] for name, t in tensors.items()):
        raise damaged("does not match its checksums")
    not_finite = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if not_finite:
        raise damaged(f"has NaN or inf values in {not_finite}")
    return tensors, fields, info


def dtype_name(dtype: torch.dtype | None) -> str:
    return "as encoded" if dtype is None else str(dtype).removeprefix("torch.")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_latent_shape(latent: Tensor, size: tuple[int, int], where) -> tuple[int, int]:
    """(channels, downscale factor) of a (C, h, w) latent of an image of `size`, or an error."""
    if latent.ndim != 3 or latent.shape[1] == 0 or latent.shape[2] == 0:
        raise ValueError(f"{where}: a latent must be (C, h, w), got shape {tuple(latent.shape)}")
    channels, h, w = latent.shape
    if size[0] % h or size[1] % w or size[0] // h != size[1] // w:
        raise ValueError(f"{where}: latent shape {tuple(latent.shape)} is no whole downscale of the image size {size}")
    return channels, size[0] // h


# ---------------------------------------------------------------- latent cache


@dataclass
class LatentEntry:
    """A cached latent for one item, with what SDXL's size conditioning needs."""

    key: str
    item: ImageItem
    original_size: tuple[int, int]  # (height, width) of the upright image file
    crop: tuple[int, int, int, int]  # (top, left, height, width) in the resized image

    @property
    def caption(self) -> str:
        return self.item.caption

    @property
    def image_path(self) -> Path:
        return self.item.image_path


class LatentCache:
    """VAE latents on disk, one safetensors file per (image, size, crop, flip, encoder, dtype).

    encoder_identity names the VAE weights and its compute dtype (e.g. a file hash + "bf16"):
    change it and everything is encoded again. Latents are stored in `dtype`. Images that
    cannot be read are skipped and listed (on_error="skip") or stop the run ("stop").
    """

    def __init__(
        self,
        cache_dir,
        encoder_identity: str,
        resolution: int | tuple[int, int],
        crop_mode: str = "center",
        dtype: torch.dtype = torch.bfloat16,
        hash_content: bool = False,
        recache: bool = False,
        on_error: str = "skip",
        seed: int = 0,
    ):
        if not encoder_identity or not isinstance(encoder_identity, str):
            raise ValueError("encoder_identity must be a non-empty string naming the VAE weights and dtype")
        if crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {crop_mode!r}")
        if on_error not in ("skip", "stop"):
            raise ValueError(f'on_error must be "skip" or "stop", got {on_error!r}')
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.encoder_identity = encoder_identity
        self.resolution = as_height_width(resolution)
        self.crop_mode = crop_mode
        self.dtype = dtype
        self.hash_content = hash_content
        self.recache = recache
        self.on_error = on_error
        self.seed = seed
        self.skipped: list[tuple[Path, str]] = []  # (image, reason) from the last build()
        self._sha256: dict[tuple, str] = {}  # (path, size, mtime) -> content hash, within a run

    def path(self, key: str) -> Path:
        return self.cache_dir / f"{key}.safetensors"

    def image_identity(self, path: Path) -> dict:
        stat = path.stat()  # raises if the image is gone
        if not self.hash_content:
            return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        memo = (str(path), stat.st_size, stat.st_mtime_ns)
        if memo not in self._sha256:
            self._sha256[memo] = file_sha256(path)
        return {"sha256": self._sha256[memo]}  # moving or touching the file keeps the entry

    def crop_seed(self, item: ImageItem) -> int:
        """The seed of an item's random crop: fixed per (cache seed, file name, repeat)."""
        text = f"{self.seed}:{item.image_path.name}:{item.repeat}"
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1  # < 2**63

    def target_size(self, item: ImageItem) -> tuple[int, int]:
        if item.crop is not None and not isinstance(item.crop, str):
            return tuple(item.crop[2:])
        return tuple(item.size) if item.size is not None else self.resolution

    def crop_of(self, item: ImageItem):
        """The item's crop: its box, its mode, or the cache's mode."""
        if item.crop is None:
            return self.crop_mode
        if isinstance(item.crop, str) and item.crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES} or a (top, left, height, width) box, got {item.crop!r}")
        return item.crop

    def fields(self, item: ImageItem) -> dict:
        """Everything that changes the latent of `item`; the entry's file name is a hash of it."""
        crop = self.crop_of(item)
        fields = {
            "kind": "latent",
            "image": self.image_identity(Path(item.image_path)),
            "size": list(self.target_size(item)),
            "crop": crop if isinstance(crop, str) else list(crop),
            "flip": item.flip,
            "encoder": self.encoder_identity,
            "dtype": dtype_name(self.dtype),
        }
        if fields["crop"] == "random":
            fields["crop_seed"] = self.crop_seed(item)
        if item.mask is not None:  # the alpha channel is part of the image; a mask file has its own identity
            fields["mask"] = "alpha" if item.mask == "alpha" else self.image_identity(Path(item.mask))
        return fields

    def build(
        self,
        items: list[ImageItem],
        encode_images: Callable[[Tensor], Tensor],
        batch_size: int = 1,
        progress: bool = True,
    ) -> list[LatentEntry]:
        """Give every item a valid cache file, encoding only the items that lack one.

        encode_images gets a float32 CPU batch (B, 3, H, W) in [-1, 1] and returns latents
        (B, C, h, w) on any device; it runs under torch.no_grad(), and build() keeps no
        reference to it or to its outputs. Returns one entry per item, in item order, leaving
        out unreadable images (listed in `self.skipped` and in a warning).
        """
        self.skipped = []
        keyed, fields_of = self._key_items(items)
        found, todo = self._find_on_disk(keyed)  # key -> (original size, crop, kind); key -> item
        found |= self._encode_missing(todo, fields_of, encode_images, batch_size, progress)
        self._check_same_latent_kind(found)
        if self.skipped:
            self.skipped.sort()
            reasons = list_some(f"{path} ({reason})" for path, reason in self.skipped)
            warnings.warn(f"skipped {len(self.skipped)} unreadable image(s) (on_error='skip'): {reasons}", stacklevel=2)
        return [LatentEntry(key, item, *found[key][:2]) for item, key in keyed if key in found]

    def _key_items(self, items: list[ImageItem]) -> tuple[list[tuple[ImageItem, str]], dict[str, dict]]:
        """(item, key) for each item whose image file exists, and the fields behind each key."""
        keyed, fields_of = [], {}
        for item in items:
            try:
                fields = self.fields(item)
            except OSError as error:  # the file is gone or unreadable
                self._image_failed(item.image_path, error)
                continue
            key = entry_key(fields)
            fields_of[key] = fields
            keyed.append((item, key))
        return keyed, fields_of

    def _find_on_disk(self, keyed: list[tuple[ImageItem, str]]) -> tuple[dict, dict]:
        """Split the keys into valid entries on disk (checked in full) and those to encode."""
        found, todo, damaged = {}, {}, []
        for item, key in keyed:
            if key in found or key in todo:
                continue  # repeats of a center crop share one entry
            if self.recache or not self.path(key).exists():
                todo[key] = item
                continue
            try:
                found[key] = self._check_entry(key)
            except CacheEntryError as error:
                damaged.append(f"{error.path.name}: {error.reason}")
                todo[key] = item
        if damaged:
            warnings.warn(
                f"rebuilding {len(damaged)} damaged latent cache file(s): {list_some(damaged, 5)}",
                stacklevel=3,
            )
        return found, todo

    def load(self, key: str) -> Tensor:
        """The latent (C, h, w) of an entry, checked against its name, checksum and shape."""
        return self._read(key)[0]["latent"]

    def load_tensors(self, key: str) -> dict[str, Tensor]:
        """{"latent": (C, h, w)} and, for an item with a mask, "mask": (1, h, w) in [0, 1]."""
        return self._read(key)[0]

    def _read(self, key: str) -> tuple[dict[str, Tensor], dict, tuple[int, int]]:
        """(tensors, info, (channels, downscale)) of an entry, checked in full, or CacheEntryError."""
        path = self.path(key)
        tensors, fields, info = read_entry(path, key)
        if fields.get("encoder") != self.encoder_identity or fields.get("dtype") != dtype_name(self.dtype):
            raise CacheEntryError(path, f"was made by {fields.get('encoder')!r} in {fields.get('dtype')}, "
                                        f"not by this cache's {self.encoder_identity!r} in {dtype_name(self.dtype)}")
        expected = {"latent", "mask"} if "mask" in fields else {"latent"}
        if set(tensors) != expected:
            raise CacheEntryError(path, f"holds {sorted(tensors)}, expected {sorted(expected)}")
        try:
            kind = check_latent_shape(tensors["latent"], tuple(fields["size"]), path)
        except (KeyError, ValueError) as error:
            raise CacheEntryError(path, f"has a wrong shape ({error})") from error
        if "mask" in tensors and tuple(tensors["mask"].shape) != (1, *tensors["latent"].shape[1:]):
            raise CacheEntryError(path, f"has a mask of shape {tuple(tensors['mask'].shape)} for a latent of shape "
                                        f"{tuple(tensors['latent'].shape)}")
        return tensors, info, kind

    def _check_entry(self, key: str) -> tuple[tuple[int, int], tuple[int, int, int, int], tuple[int, int]]:
        """(original size, crop, (channels, downscale)) of a valid entry on disk, or CacheEntryError."""
        _, info, kind = self._read(key)
        try:
            return tuple(info["original_size"]), tuple(info["crop"]), kind
        except (KeyError, TypeError) as error:
            raise CacheEntryError(self.path(key), f"lacks its crop information ({error})") from error

    def _encode_missing(self, todo: dict, fields_of: dict, encode_images, batch_size: int, progress: bool) -> dict:
        """Encode the items of `todo` in batches of one output size; write each latent."""
        done = {}
        pending = sorted(todo.items(), key=lambda key_item: self.target_size(key_item[1]))
        with tqdm(total=len(pending), desc="caching latents", unit="img", disable=not progress) as bar:
            for _, same_size in itertools.groupby(pending, key=lambda key_item: self.target_size(key_item[1])):
                same_size = list(same_size)
                for start in range(0, len(same_size), batch_size):
                    batch = same_size[start : start + batch_size]
                    done |= self._encode_batch(batch, fields_of, encode_images)
                    bar.update(len(batch))
        return done

    def _encode_batch(self, batch: list, fields_of: dict, encode_images) -> dict:
        """Load, encode, check and write one batch of (key, item) of the same output size."""
        loaded = []  # (key, item, pixels, crop, original size)
        for key, item in batch:
            try:
                image = open_rgb(item.image_path)
            except Exception as error:  # Pillow raises many kinds for a broken file
                self._image_failed(item.image_path, error)
                continue
            generator = None
            crop = self.crop_of(item)
            if crop == "random":
                generator = torch.Generator().manual_seed(fields_of[key]["crop_seed"])
            try:
                resized, box = crop_geometry((image.height, image.width), self.target_size(item), crop, generator)
                mask = open_mask(item.mask, item.image_path, (image.height, image.width)) if item.mask else None
            except ValueError as error:  # an explicit crop box that does not fit: a setting to fix
                raise ValueError(f"{item.image_path}: {error}") from None
            except OSError as error:  # an unreadable mask file
                self._image_failed(item.mask, error)
                continue
            pixels, recorded, original = prepare_image(image, box[2:], box, None, item.flip)  # recorded: flipped frame
            loaded.append((key, item, pixels, recorded, original, (mask, resized, box)))
        if not loaded:
            return {}
        pixels = torch.stack([entry[2] for entry in loaded])  # (B, 3, H, W)
        with torch.no_grad():
            latents = encode_images(pixels)
        if not isinstance(latents, Tensor) or latents.shape[0] != len(loaded):
            raise ValueError(f"encode_images must return a tensor (B, C, h, w) with B={len(loaded)}, "
                             f"got {getattr(latents, 'shape', type(latents))}")
        latents = latents.detach().to("cpu", self.dtype)

        done = {}
        for (key, item, _, box, original, (mask, resized, unflipped)), latent in zip(loaded, latents):
            latent = latent.clone()  # its own storage, not a view of the batch
            if not torch.isfinite(latent).all():
                raise FloatingPointError(
                    f"the latent of {item.image_path} has {int((~torch.isfinite(latent)).sum())} NaN or inf values; "
                    "caching stopped. Check the image and the VAE dtype (the SDXL VAE needs float32)."
                )
            kind = check_latent_shape(latent, tuple(box[2:]), item.image_path)
            info = {"image": str(item.image_path), "original_size": list(original), "crop": list(box)}
            tensors = {"latent": latent}
            if mask is not None:
                tensors["mask"] = latent_mask(mask, resized, unflipped, item.flip, kind[1])
            write_entry(self.path(key), tensors, fields_of[key], info)
            done[key] = (original, box, kind)
        return done

    def _check_same_latent_kind(self, found: dict) -> None:
        kinds = {kind for _, _, kind in found.values()}
        if len(kinds) > 1:
            raise ValueError(
                f"cached latents disagree in (channels, downscale): {sorted(kinds)}. The encoder changed without a new "
                "encoder_identity; give it one that names the VAE, or set recache=True."
            )

    def _image_failed(self, path, error: Exception) -> None:
        reason = f"{type(error).__name__}: {error}"
        if self.on_error == "stop":
            hint = "Fix or remove it, or set on_error='skip' to leave it out."
            raise ImageReadError(f"cannot read image {path}: {reason}. {hint}") from error
        self.skipped.append((Path(path), reason))


# ---------------------------------------------------------------- text cache


class TextCache:
    """Text-encoder outputs on disk, one file per (caption, encoder, max length, mask, dtype).

    An entry is a dict of tensors without the batch dimension, named by the encode function
    (e.g. {"t5": (L, 4096), "t5_mask": (L,), "clip_pooled": (768,)}). Floating tensors are
    stored in `dtype` (None keeps what the encoder returns; then encoder_identity should name
    its dtype).
    """

    def __init__(
        self,
        cache_dir,
        encoder_identity: str,
        max_length: int,
        apply_mask: bool,
        recache: bool = False,
        dtype: torch.dtype | None = None,
    ):
        if not encoder_identity or not isinstance(encoder_identity, str):
            raise ValueError("encoder_identity must be a non-empty string naming the text encoder weights and dtype")
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.encoder_identity = encoder_identity
        self.max_length = int(max_length)
        self.apply_mask = bool(apply_mask)
        self.recache = recache
        self.dtype = dtype

    def fields(self, caption: str) -> dict:
        """Everything that changes the embedding of `caption`."""
        return {
            "kind": "text",
            "caption": caption,
            "encoder": self.encoder_identity,
            "max_length": self.max_length,
            "apply_mask": self.apply_mask,
            "dtype": dtype_name(self.dtype),
        }

    def key(self, caption: str) -> str:
        return entry_key(self.fields(caption))

    def path(self, key: str) -> Path:
        return self.cache_dir / f"{key}.safetensors"

    def build(
        self,
        captions: list[str],
        encode_texts: Callable[[list[str]], dict[str, Tensor]],
        batch_size: int = 8,
        progress: bool = True,
    ) -> list[str]:
        """Give every caption a valid cache file, encoding only the captions that lack one.

        encode_texts gets a list of captions and returns a dict of tensors whose first
        dimension is the batch; it runs under torch.no_grad(). Returns the keys, one per caption.
        """
        keys = [self.key(caption) for caption in captions]
        shapes, todo, damaged = {}, {}, []  # key -> {name: shape}; key -> caption; file names
        for caption, key in zip(captions, keys):
            if key in shapes or key in todo:
                continue
            if self.recache or not self.path(key).exists():
                todo[key] = caption
                continue
            try:
                tensors, _, _ = read_entry(self.path(key), key)
                shapes[key] = {name: tuple(t.shape) for name, t in tensors.items()}
            except CacheEntryError as error:
                damaged.append(f"{error.path.name}: {error.reason}")
                todo[key] = caption
        if damaged:
            warnings.warn(
                f"rebuilding {len(damaged)} damaged text cache file(s): {list_some(damaged, 5)}",
                stacklevel=2,
            )

        pending = list(todo.items())
        with tqdm(total=len(pending), desc="caching text", unit="caption", disable=not progress) as bar:
            for start in range(0, len(pending), batch_size):
                batch = pending[start : start + batch_size]
                shapes |= self._encode_batch(batch, encode_texts, to_write=len(pending) if start == 0 else 0)
                bar.update(len(batch))

        distinct = {tuple(sorted(s.items())) for s in shapes.values()}
        if len(distinct) > 1:
            raise ValueError(
                f"cached text embeddings disagree in names or shapes: {sorted(distinct)[:3]}. The encoder or its "
                "padding changed without a new encoder_identity / max_length; fix that, or set recache=True."
            )
        return keys

    def load(self, caption: str) -> dict[str, Tensor]:
        """The cached encoder outputs of `caption`, checked against its name and checksums."""
        key = self.key(caption)
        return read_entry(self.path(key), key)[0]

    def _encode_batch(self, batch: list[tuple[str, str]], encode_texts, to_write: int = 0) -> dict:
        """Encode and write one batch; with `to_write` (the first batch), first say how much disk
        the entries to write will take, and stop if the disk has less free."""
        captions = [caption for _, caption in batch]
        with torch.no_grad():
            outputs = encode_texts(captions)
        if not isinstance(outputs, dict) or not outputs:
            raise ValueError(f"encode_texts must return a dict of tensors, got {type(outputs).__name__}")
        for name, value in outputs.items():
            if name in SAMPLE_NAMES:
                raise ValueError(f"encode_texts output name {name!r} is reserved for the dataset; rename it")
            if not isinstance(value, Tensor) or value.ndim == 0 or value.shape[0] != len(captions):
                raise ValueError(f"encode_texts output {name!r} must be a tensor with first dimension {len(captions)}, "
                                 f"got {getattr(value, 'shape', type(value))}")
        if to_write:
            self._check_disk({name: self._stored(value[0]) for name, value in outputs.items()}, to_write)
        shapes = {}
        for row, (key, caption) in enumerate(batch):
            tensors = {name: self._stored(value[row]) for name, value in outputs.items()}
            for name, tensor in tensors.items():
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise FloatingPointError(
                        f"text encoder output {name!r} has NaN or inf values for caption {caption[:200]!r}; "
                        "caching stopped. Check the text encoder dtype (T5 overflows in float16)."
                    )
            fields = self.fields(caption)
            write_entry(self.path(key), tensors, fields, {"caption": caption})
            shapes[key] = {name: tuple(t.shape) for name, t in tensors.items()}
        return shapes

    def _check_disk(self, entry: dict[str, Tensor], count: int) -> None:
        """Print the disk `count` entries like `entry` need (tensor bytes plus about 1 KiB of
        header each); an OSError when the cache's disk has less free."""
        per_entry = sum(t.numel() * t.element_size() for t in entry.values()) + ENTRY_HEADER_BYTES
        total = per_entry * count
        dtypes = sorted({dtype_name(t.dtype) for t in entry.values() if t.is_floating_point()})
        print(f"text cache: {count} caption(s) to encode, about {total / 2**20:,.1f} MiB on disk "
              f"({per_entry / 2**10:,.0f} KiB each, {', '.join(dtypes)}) in {self.cache_dir}")
        free = shutil.disk_usage(self.cache_dir).free
        if free < total:
            raise OSError(f"the text cache needs about {total / 2**30:.2f} GiB but {self.cache_dir} has "
                          f"{free / 2**30:.2f} GiB free; free some space or set cache_dir elsewhere")

    def _stored(self, tensor: Tensor) -> Tensor:
        """One row of an output on the CPU, in its own storage, floats in the cache dtype."""
        tensor = tensor.detach().to("cpu")
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        return tensor.clone()


# ---------------------------------------------------------------- dataset


class CachedDataset(torch.utils.data.Dataset):
    """Training samples read from the caches.

    Sample i: {"latent": (C, h, w), each text tensor of its caption, "caption": str,
    "index": i, "original_size": (2,), "crop_top_left": (2,) and "target_size": (2,), the
    cropped image's size in pixels (height/top first; SDXL conditions on all three)}. Use
    `collate` as the DataLoader's collate_fn.
    """

    def __init__(self, entries: list[LatentEntry], latent_cache: LatentCache, text_cache: TextCache | None = None):
        self.entries = entries
        self.latent_cache = latent_cache
        self.text_cache = text_cache

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        sample = dict(self.latent_cache.load_tensors(entry.key))  # "latent" (and "mask")
        if self.text_cache is not None:
            sample |= self.text_cache.load(entry.item.caption)
        sample |= {
            "caption": entry.item.caption,
            "index": index,
            "original_size": torch.tensor(entry.original_size),
            "crop_top_left": torch.tensor(entry.crop[:2]),
            "target_size": torch.tensor(entry.crop[2:]),
        }
        return sample

    @staticmethod
    def collate(samples: list[dict]) -> dict:
        return collate(samples)


def collate(samples: list[dict]) -> dict:
    """A batch from samples: tensors stacked on a new first dimension, ints a tensor, strings a list."""
    batch = {}
    for name, first in samples[0].items():
        values = [sample[name] for sample in samples]
        if isinstance(first, Tensor):
            batch[name] = torch.stack(values)
        elif isinstance(first, int):
            batch[name] = torch.tensor(values)
        else:
            batch[name] = values
    return batch
