"""The data phase of a run: the dataset's images checked and split before any model loads,
then every image encoded once by the family's codec and every caption by its text encoders
(placed within the device budget), written to the caches on disk; the encoders then leave.

    items = dataset_items(cfg)                                   # phase 1: no model yet
    data = load_data(cfg, family, params, device, dtype, items)  # phase 2: the caches
"""
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import cache
import distributed
import sample
import training
from config import ConfigError


@dataclass
class Items:
    """Phase 1's view of the dataset: readable images split into training and validation."""

    train: list  # cache.ImageItem, one per training image (per repeat when crops are random)
    val: list
    skipped: list  # (image path, reason)
    fingerprint: str  # changes when the images, their captions or the repeats change


def dataset_items(cfg: dict, gpus: int = 1) -> Items:
    """Scan the dataset, drop (or stop at) unreadable images, hold out `validation_count`
    images (seeded), and check the global batch (batch_size x gpus) against what is left: all
    before any model loads."""
    items = cache.scan_dataset(cfg["dataset_dir"], caption_ext=cfg["caption_ext"],
                               instance_prompt=cfg["instance_prompt"] or None, repeats=1)
    items, skipped = cache.check_images(items, cfg["resolution"], cfg["on_bad_image"])
    val_count = cfg["validation_count"]
    if val_count >= len(items):
        raise ConfigError(f"validation_count={val_count} leaves no training images ({len(items)} readable"
                          + (f", {len(skipped)} unreadable" if skipped else "") + ")")
    split = torch.randperm(len(items), generator=torch.Generator().manual_seed(cfg["seed"])).tolist()
    train_items = [items[i] for i in sorted(split[val_count:])]
    check_batch(cfg, len(train_items), len(skipped), gpus)
    if cfg["crop"] == "random" and cfg["repeats"] > 1:  # each repeat its own crop (and cache entry)
        train_items = [replace(it, repeat=r) for r in range(cfg["repeats"]) for it in train_items]
    return Items(train_items, [items[i] for i in split[:val_count]], skipped,
                 cache.dataset_fingerprint(items, cfg["dataset_dir"], cfg["repeats"]))


def check_batch(cfg: dict, num_images: int, num_skipped: int = 0, gpus: int = 1) -> None:
    epoch_size = num_images * cfg["repeats"]
    if cfg["batch_size"] * gpus > epoch_size:
        skipped = f", {num_skipped} unreadable left out" if num_skipped else ""
        batch = f"batch_size={cfg['batch_size']}" + (f" x {gpus} GPUs" if gpus > 1 else "")
        raise ConfigError(f"{batch} is larger than the dataset ({num_images} images{skipped} "
                          f"x {cfg['repeats']} repeats = {epoch_size}); lower batch_size or raise repeats")


@dataclass
class Data:
    train: cache.CachedDataset
    val: cache.CachedDataset | None
    text_cache: cache.TextCache
    empty_caption: dict  # the text tensors of "", on the device (caption dropout)
    prompts: list  # sample.SamplePrompt
    codec: object  # models.VAECodec or PixelCodec, in host memory between samples
    skipped: list  # (image path, reason)


def load_data(cfg: dict, family, params, device, dtype, items: Items, world=None) -> Data:
    """Phase 2: every image encoded once by the codec and every caption by the text encoders,
    written to disk, keyed by everything that changes them; the encoders leave the device.
    With several GPUs (`world`, distributed.py) each encodes its share, then all read the whole."""
    world = world or distributed.World()
    train_items, val_items = items.train, items.val
    prompts = sample.read_prompt_file(cfg["sample_prompts"], family.prompt_defaults(cfg, params)) \
        if cfg["sample_prompts"] else []
    cache_dir = Path(cfg["cache_dir"] or Path(cfg["dataset_dir"]) / ".cache")
    codec = family.codec(cfg, dtype, device)
    latent_cache = cache.LatentCache(cache_dir / "latents", codec.identity, cfg["resolution"], cfg["crop"],
                                     dtype=torch.float32, hash_content=cfg["hash_images"], recache=cfg["recache"],
                                     on_error=cfg["on_bad_image"], seed=cfg["seed"])
    batch = cfg["vae_batch_size"]
    kept_train = distributed.build_shared(world, latent_cache, train_items, codec.encode, batch_size=batch)
    skipped = items.skipped + list(latent_cache.skipped)
    kept_val = distributed.build_shared(world, latent_cache, val_items, codec.encode, batch_size=batch) if val_items \
        else []
    skipped += latent_cache.skipped if val_items else []
    check_batch(cfg, len({it.item.image_path for it in kept_train}), len(skipped), world.size)  # failed decodes
    codec.to("cpu")  # the decoder comes back for samples only
    text = family.text_encoder(cfg, params, dtype, training.text_encoder_load_device(cfg, device))
    swaps = training.place_text_encoders(text.networks(), cfg, device)
    text_cache = cache.TextCache(cache_dir / "text", text.identity, family.text_length(cfg, params),
                                 family.text_mask(cfg), recache=cfg["recache"])
    captions = [it.caption for it in kept_train + kept_val] + [p.prompt for p in prompts] + [p.negative for p in prompts]
    unique = sorted(set(captions + [""]))  # "" for caption dropout and empty negatives
    warn_truncated(text, unique)
    distributed.build_shared(world, text_cache, unique, text.encode, batch_size=cfg["text_batch_size"])
    del text, swaps  # T5-XXL is 9 GB in bf16: gone before the denoiser loads
    empty = {k: v.to(device) for k, v in text_cache.load("").items()}
    val = cache.CachedDataset(kept_val, latent_cache, text_cache) if kept_val else None
    return Data(cache.CachedDataset(kept_train, latent_cache, text_cache), val, text_cache, empty, prompts, codec,
                skipped)


def warn_truncated(text, captions: list[str]) -> None:
    """One warning for the captions a text encoder cuts: how many, and how many tokens."""
    if not hasattr(text, "tokens_lost"):
        return
    cut = {}
    for caption in captions:
        lost = {name: n for name, n in text.tokens_lost(caption).items() if n > 0}
        if lost:
            cut[caption] = lost
    if cut:
        worst = max(cut.items(), key=lambda item: max(item[1].values()))
        warnings.warn(f"{len(cut)} caption(s) are longer than the text encoders take and are cut; the longest "
                      f"loses {worst[1]} tokens: {worst[0][:80]!r}...", stacklevel=2)
