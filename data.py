"""The data phase of a run: the dataset sections' images checked, put in aspect-ratio buckets
and split before any model loads, then every image encoded once by the family's codec and every
caption variant by its text encoders (placed within the device budget), written to the caches
on disk; the encoders then leave.

    items = plan_data(cfg, family, run_dir)                      # phase 1: no model yet; buckets.json
    data = load_data(cfg, family, params, device, dtype, items)  # phase 2: the caches
    order = DataOrder([(b.members, b.batch_size) for b in data.buckets], seed)  # the batches

A sample is one image x one repeat of a section; an epoch walks every sample once, in batches
drawn from one bucket at a time (DataOrder). What changes from epoch to epoch (the
caption's shuffle, tag dropout and wildcards, the flip) is drawn from (seed, epoch, sample)
alone, so every caption the run will train on is known before the text encoders run, and
each is encoded once into the text cache.
"""
import hashlib
import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import buckets
import cache
import captions
import checkpoint
import config
import distributed
import sample
import training
from config import ConfigError


@dataclass
class Sample:
    """One image x one repeat of a section."""

    item: cache.ImageItem  # its bucket's size, crop mode and mask source; caption as in the file
    section: int
    key: str  # "section:relative path:repeat": seeds its caption and flip draws


@dataclass
class Items:
    """Phase 1's view of the dataset."""

    train: list[Sample]  # repeat-major within each section
    val: list[Sample]
    buckets: list[buckets.Bucket]  # members are indices into train
    sections: list[dict]  # each section's whole config (config.sections)
    skipped: list  # (image path, reason)
    fingerprint: str  # changes when the images, their captions or the repeats change
    gpus: int = 1  # several GPUs: each bucket's batches are global, batch_size x gpus (distributed.py)


def dataset_items(cfg: dict, family, gpus: int = 1) -> Items:
    """Scan every section, drop (or stop at) unreadable images, hold out `validation_count`
    images (seeded), put each training image in its bucket, merge buckets smaller than a
    batch, and check the batch sizes: all before any model loads. On `gpus` GPUs a batch is
    global, batch_size x gpus samples of one bucket, which the GPUs split (distributed.py)."""
    sections = config.sections(cfg)
    images, skipped, sizes = [], [], {}  # images: (section, ImageItem)
    for index, section in enumerate(sections):
        scanned = cache.scan_dataset(section["dataset_dir"], caption_ext=section["caption_ext"],
                                     keep_lines=section["enable_wildcard"])
        readable, unreadable = cache.check_images(scanned, section["resolution"], cfg["on_bad_image"], sizes)
        images += [(index, item) for item in readable]
        skipped += unreadable
    val_count = cfg["validation_count"]
    if val_count >= len(images):
        raise ConfigError(f"validation_count={val_count} leaves no training images ({len(images)} readable"
                          + (f", {len(skipped)} unreadable" if skipped else "") + ")")
    split = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg["seed"])).tolist()
    train_images = [images[i] for i in sorted(split[val_count:])]
    val_images = [images[i] for i in split[:val_count]]
    train, bucket_list, kept = [], [], set()
    for index, section in enumerate(sections):
        ours = [item for s, item in train_images if s == index]
        placed, too_small = place_in_buckets(section, family, ours, sizes)
        skipped += too_small
        check_batch(section, len({s.item.image_path for s in placed}), len(skipped), len(sections) > 1, gpus)
        offset = len(train)
        train += [replace(s, section=index) for s in placed]
        bucket_list += [replace(b, section=index, members=[m + offset for m in b.members])
                        for b in group_buckets(placed, section["batch_size"] * gpus)]
        kept |= {s.item.image_path for s in placed}
    bucket_list = buckets.merge_small(bucket_list)
    fit_to_buckets(train, bucket_list)
    val = [validation_sample(sections[s], family, s, item, sizes) for s, item in val_images]
    return Items(train, [v for v in val if v is not None], bucket_list, sections, skipped,
                 fingerprint(sections, images), gpus)


def place_in_buckets(section: dict, family, items: list, sizes: dict) -> tuple[list[Sample], list]:
    """Every (image, repeat) of a section as a Sample whose item.size is its bucket before
    merging, and the images no bucket can take, with the reason."""
    settings = bucket_settings(section, family)
    resos = buckets.bucket_resolutions(settings)
    folder, samples, too_small, assigned = Path(section["dataset_dir"]), [], [], {}
    for item in items:
        bucket = buckets.assign(settings, resos, sizes[item.image_path])
        if isinstance(bucket, str):
            too_small.append((item.image_path, bucket))
        else:
            assigned[item.image_path] = bucket
    masks = mask_sources(section, [it for it in items if it.image_path in assigned])
    for repeat in range(section["repeats"]):
        for item in items:
            if item.image_path not in assigned:
                continue
            width, height = assigned[item.image_path]
            placed = replace(item, size=(height, width), crop=section["crop"], repeat=repeat,
                             mask=masks.get(item.image_path))
            name = item.image_path.relative_to(folder) if item.image_path.is_relative_to(folder) else item.image_path
            samples.append(Sample(placed, 0, f"{section['dataset_dir']}:{name}:{repeat}"))
    return samples, too_small


def bucket_settings(section: dict, family) -> buckets.BucketSettings:
    return buckets.BucketSettings(section["resolution"], section["min_bucket_reso"], section["max_bucket_reso"],
                                  config.bucket_steps(section, family), section["bucket_no_upscale"],
                                  section["enable_bucket"])


def group_buckets(samples: list[Sample], batch_size: int) -> list[buckets.Bucket]:
    """The samples of one section grouped by their bucket (indices into `samples`)."""
    found: dict[tuple[int, int], buckets.Bucket] = {}
    for index, s in enumerate(samples):
        reso = (s.item.size[1], s.item.size[0])  # (width, height)
        found.setdefault(reso, buckets.Bucket(0, reso, batch_size)).members.append(index)
    return list(found.values())


def fit_to_buckets(train: list[Sample], bucket_list: list[buckets.Bucket]) -> None:
    """After merging: each sample takes its final bucket's size."""
    for bucket in bucket_list:
        width, height = bucket.resolution
        for m in bucket.members:
            train[m].item = replace(train[m].item, size=(height, width))


def validation_sample(section: dict, family, index: int, item, sizes: dict) -> Sample | None:
    """A held-out image at its bucket (never merged: validation runs one image at a time)."""
    settings = bucket_settings(section, family)
    bucket = buckets.assign(settings, buckets.bucket_resolutions(settings), sizes[item.image_path])
    if isinstance(bucket, str):
        return None
    mask = mask_sources(section, [item]).get(item.image_path)
    return Sample(replace(item, size=(bucket[1], bucket[0]), crop="center", mask=mask), index,
                  f"{section['dataset_dir']}:{item.image_path.name}:val")


def mask_sources(section: dict, items: list) -> dict:
    """image path -> "alpha" or its mask file (alpha_mask, or masked_loss with mask_dir); images
    without a mask file train on every pixel (listed in a warning)."""
    if section["alpha_mask"]:
        return {item.image_path: "alpha" for item in items}
    if not section["masked_loss"]:
        return {}
    folder, masks_dir, found, missing = Path(section["dataset_dir"]), Path(section["mask_dir"]), {}, []
    for item in items:
        relative = item.image_path.relative_to(folder) if item.image_path.is_relative_to(folder) else item.image_path
        candidates = [masks_dir / relative.with_suffix(ext) for ext in cache.IMAGE_EXTENSIONS]
        mask = next((str(c) for c in candidates if c.is_file()), None)
        if mask is None:
            missing.append(item.image_path.name)
        found[item.image_path] = mask
    if missing:
        warnings.warn(f"{len(missing)} image(s) have no mask in {masks_dir} and train on every pixel: "
                      f"{cache.list_some(missing)}", stacklevel=3)
    return {path: mask for path, mask in found.items() if mask is not None}


def fingerprint(sections: list[dict], images: list) -> str:
    """A short hash of the dataset (cache.dataset_fingerprint per section): resume refuses a run
    whose dataset changed."""
    parts = [cache.dataset_fingerprint([item for s, item in images if s == index], section["dataset_dir"],
                                       section["repeats"]) for index, section in enumerate(sections)]
    if len(parts) == 1:
        return parts[0]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def apply_epochs(cfg: dict, items: Items) -> None:
    """max_train_epochs > 0 sets max_train_steps: epochs x batches per epoch / accumulation,
    rounded up (kohya's rule; the last step may run a few batches into the next epoch)."""
    if cfg["max_train_epochs"]:
        per_epoch = sum(b.batches for b in items.buckets)
        cfg["max_train_steps"] = max(1, -(-cfg["max_train_epochs"] * per_epoch // cfg["gradient_accumulation_steps"]))
        print(f"max_train_epochs={cfg['max_train_epochs']}: {per_epoch} batches per epoch -> "
              f"max_train_steps={cfg['max_train_steps']}")
        if config.warmup_steps(cfg) > cfg["max_train_steps"]:
            raise ConfigError(f"lr_warmup_steps={cfg['lr_warmup_steps']} is more than the run's "
                              f"{cfg['max_train_steps']} steps")


def check_batch(cfg: dict, num_images: int, num_skipped: int = 0, several: bool = False, gpus: int = 1) -> None:
    epoch_size = num_images * cfg["repeats"]
    if cfg["batch_size"] * gpus > epoch_size:
        skipped = f", {num_skipped} unreadable left out" if num_skipped else ""
        where = f" in {cfg['dataset_dir']}" if several else ""
        batch = f"batch_size={cfg['batch_size']}" + (f" x {gpus} GPUs" if gpus > 1 else "")
        raise ConfigError(f"{batch} is larger than the dataset{where} ({num_images} images"
                          f"{skipped} x {cfg['repeats']} repeats = {epoch_size}); lower batch_size or raise repeats")


def report_buckets(items: Items, run_dir: Path | None) -> None:
    """Print the bucket table and every skipped image with its reason; write buckets.json."""
    names = [Path(s["dataset_dir"]).name for s in items.sections]
    print(buckets.table(items.buckets, names))
    for path, reason in items.skipped:
        print(f"  skipped {path}: {reason}")
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        buckets.write_json(Path(run_dir) / "buckets.json", items.buckets, items.skipped)


def plan_data(cfg: dict, family, run_dir: Path | None, gpus: int = 1) -> Items:
    """Phase 1's data part: the items, their bucket table printed and written to buckets.json
    (when run_dir is given) before any model loads, and max_train_epochs turned into steps."""
    items = dataset_items(cfg, family, gpus)
    report_buckets(items, run_dir)
    apply_epochs(cfg, items)
    return items


def arithmetic(data: "Data", order: "DataOrder", cfg: dict) -> str:
    """The step arithmetic, per dataset section (images x repeats = samples -> batches of its
    batch size) and for the whole (batches per epoch / accumulation), and the images left out."""
    lines, total = [], 0
    for index, section in enumerate(data.sections):
        samples = [s for s in data.train.samples if s.section == index]
        images = len({s.item.image_path for s in samples})
        mine = [b for b in data.buckets if b.section == index]
        total += len(samples)
        lines.append(f"{Path(section['dataset_dir']).name}: {images} images x {section['repeats']} repeats = "
                     f"{images * section['repeats']} samples in {len(mine)} bucket(s) -> "
                     f"{sum(b.batches for b in mine)} batches of {batch_size(section, mine)} at "
                     f"{section['resolution']}px")
    if len(lines) > 1:
        lines.append(f"all sections: {total} samples")
    accumulation = cfg["gradient_accumulation_steps"]
    per_epoch = order.batches_per_epoch / accumulation
    lines.append(f"{order.batches_per_epoch} batches per epoch / accumulation {accumulation} = {per_epoch:g} steps per "
                 f"epoch; {cfg['max_train_steps']} steps = {cfg['max_train_steps'] / max(per_epoch, 1e-9):.1f} epochs")
    small = [Path(path).name for path, reason in data.skipped if "bucket" in reason]
    unreadable = [Path(path).name for path, reason in data.skipped if "bucket" not in reason]
    if unreadable:
        lines.append(f"skipped {len(unreadable)} unreadable image(s): {', '.join(unreadable)}")
    if small:
        lines.append(f"skipped {len(small)} image(s) too small for any bucket: {', '.join(small)} (buckets.json "
                     "says why)")
    return "\n".join(lines)


def batch_size(section: dict, section_buckets: list) -> int:
    """A section's batch size: with several GPUs the global one its buckets batch by."""
    return section_buckets[0].batch_size if section_buckets else section["batch_size"]


def schedule(cfg: dict) -> str:
    """'saving every 250 steps[ and every 2 epochs], sampling every ...'."""
    parts = []
    for verb, steps, epochs in (("saving", "save_every", "save_every_n_epochs"),
                                ("sampling", "sample_every", "sample_every_n_epochs")):
        every_epochs = f" and every {cfg[epochs]} epochs" if cfg[epochs] else ""
        parts.append(f"{verb} every {cfg[steps]} steps{every_epochs}")
    return ", ".join(parts)


def dataset_facts(data: "Data", cfg: dict) -> dict:
    """What kohya's metadata records about the dataset: per folder its repeats, image count and
    tag frequency; the buckets and the augmentation settings."""
    dirs, tags = {}, {}
    for index, section in enumerate(data.sections):
        folder = Path(section["dataset_dir"]).name
        samples = [s for s in data.train.samples if s.section == index]
        dirs[folder] = {"n_repeats": section["repeats"], "img_count": len({s.item.image_path for s in samples})}
        counts = tags.setdefault(folder, {})
        for s in samples[: dirs[folder]["img_count"]]:  # repeat-major: the first repeat holds each image once
            for tag in (t.strip() for t in s.item.caption.split(",")):
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
    bucketed = cfg["enable_bucket"]
    facts = {"dataset_dirs": dirs, "tag_frequency": tags,
             "min_bucket_reso": cfg["min_bucket_reso"] if bucketed else None,  # kohya: None without buckets
             "max_bucket_reso": cfg["max_bucket_reso"] if bucketed else None,
             "bucket_info": {"buckets": {str(i): {"resolution": list(b.resolution), "count": len(b.members)}
                                         for i, b in enumerate(data.buckets)}}}
    for key in ("flip_aug", "shuffle_caption", "keep_tokens", "enable_bucket", "bucket_no_upscale",
                "caption_tag_dropout_rate"):
        facts[key] = cfg[key]
    return facts


def due(count: int, every: int) -> bool:
    """Whether a step or epoch count is a positive multiple of `every` (0: never)."""
    return bool(every) and count > 0 and count % every == 0


class DataOrder:
    """Which samples form each batch. Per epoch, from a generator seeded by (seed, epoch): each
    bucket's samples in a random order, cut into batches of the bucket's batch size (a tail that
    does not fill a batch waits for another epoch), then the batches of all buckets shuffled
    together, so a batch never mixes buckets. (epoch, position) is all that resume needs to
    continue with the same batches; the state also names the layout, so a resume whose buckets
    differ is refused."""

    def __init__(self, buckets: list[tuple[list[int], int]], seed: int):
        self.buckets = [(list(members), size) for members, size in buckets]  # (sample indices, batch size)
        self.seed = seed
        self.epoch, self.position = 0, 0
        self.num_items = sum(len(members) for members, _ in self.buckets)
        self.batches_per_epoch = sum(len(members) // size for members, size in self.buckets)
        self._epoch_batches: tuple[int, list] = (-1, [])
        self.epochs_seen = 0  # epochs done when finished_epoch last looked

    def batches(self, epoch: int) -> list[list[int]]:
        """Every batch of an epoch, in order."""
        if self._epoch_batches[0] == epoch:
            return self._epoch_batches[1]
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        batches = []
        for members, size in self.buckets:
            order = torch.randperm(len(members), generator=generator).tolist()
            batches += [[members[i] for i in order[k : k + size]] for k in range(0, len(order) - size + 1, size)]
        if len(self.buckets) > 1:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        self._epoch_batches = (epoch, batches)
        return batches

    def next_batch(self) -> list[int]:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        batch = self.batches(self.epoch)[self.position]
        self.position += 1
        return batch

    @property
    def epochs_done(self) -> int:
        return self.epoch + (self.position >= self.batches_per_epoch)

    def finished_epoch(self) -> int:
        """The number of epochs done if the batches taken since the last call ended one, else 0
        (epoch-based saves and samples)."""
        done, seen = self.epochs_done, self.epochs_seen
        self.epochs_seen = done
        return done if done > seen else 0

    def layout(self) -> str:
        return hashlib.sha256(json.dumps(self.buckets).encode()).hexdigest()[:16]

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "layout": self.layout()}

    def load(self, state: dict) -> None:
        if state.get("layout", self.layout()) != self.layout():
            raise checkpoint.RunFolderError(
                "cannot resume: the buckets differ from the saved run's (bucket or dataset settings changed), so "
                "the next batches would not be the ones the run was going to train on. Put them back or start a "
                "new run.")
        self.epoch, self.position = state["epoch"], state["position"]
        self.epochs_seen = self.epochs_done


# --- phase 2: the caches ---------------------------------------------------------------------------


class SampleSet(torch.utils.data.Dataset):
    """Samples read from the caches. dataset[i] is sample i as in epoch 0; dataset[(i, epoch)]
    as in that epoch (its flip and caption variant): {"latent": (C, h, w), "mask": (1, h, w)
    with masked loss, each text tensor of its caption, "caption", "index", "original_size",
    "crop_top_left" (of a flipped sample: in the mirrored image) and "target_size" (its bucket),
    height/top first; SDXL conditions on the last three (main's SDXL reads target_size)}."""

    def __init__(self, samples: list[Sample], variants: list[list], latent_cache, text_cache, sections: list[dict],
                 seed: int, masked: bool):
        self.samples, self.variants = samples, variants  # variants[i]: [plain entry] or [plain, flipped]
        self.latent_cache, self.text_cache = latent_cache, text_cache
        self.recipes = [captions.CaptionRecipe.from_config(s) for s in sections]
        self.seed, self.masked = seed, masked

    def __len__(self) -> int:
        return len(self.samples)

    def caption(self, index: int, epoch: int) -> str:
        s = self.samples[index]
        return captions.render(self.recipes[s.section], s.item.caption, captions.rng_for(self.seed, epoch, s.key))

    def entry(self, index: int, epoch: int) -> cache.LatentEntry:
        """The plain or the flipped entry: a coin drawn from (seed, epoch, sample) with flip_aug."""
        variants = self.variants[index]
        if len(variants) == 1:
            return variants[0]
        return variants[captions.rng_for(self.seed, epoch, self.samples[index].key, "flip").random() < 0.5]

    def __getitem__(self, index) -> dict:
        index, epoch = index if isinstance(index, tuple) else (index, 0)
        entry, caption = self.entry(index, epoch), self.caption(index, epoch)
        out = dict(self.latent_cache.load_tensors(entry.key))  # "latent" (and "mask")
        if self.masked and "mask" not in out:  # an image without a mask trains on every pixel
            out["mask"] = torch.ones(1, *out["latent"].shape[1:])
        try:
            out |= self.text_cache.load(caption)
        except cache.CacheEntryError as error:
            raise cache.CacheEntryError(error.path, f"(caption {caption!r} of epoch {epoch}) {error.reason}; the "
                                                    "text cache holds the captions of the epochs the run planned")
        return out | {"caption": caption, "index": index, "original_size": torch.tensor(entry.original_size),
                      "crop_top_left": torch.tensor(entry.crop[:2]), "target_size": torch.tensor(entry.crop[2:])}

    def captions_for(self, epochs: int) -> set[str]:
        """Every caption the samples render to in epochs 0 .. epochs-1 (one render for a sample
        whose caption cannot change)."""
        out = set()
        for index, s in enumerate(self.samples):
            changes = self.recipes[s.section].changes_per_epoch(s.item.caption)
            out |= {self.caption(index, epoch) for epoch in range(epochs if changes else 1)}
        return out


@dataclass
class Data:
    train: SampleSet
    val: SampleSet | None
    buckets: list  # buckets.Bucket, members are indices into train
    text_cache: cache.TextCache
    empty_caption: dict  # the text tensors of "", on the device (caption dropout)
    prompts: list  # sample.SamplePrompt
    codec: object  # models.VAECodec or PixelCodec, in host memory between samples
    skipped: list  # (image path, reason)
    epochs: int  # the epochs whose caption variants are cached
    sections: list  # each dataset section's whole config
    live_text: "LiveText | None" = None  # text encoders that train (text_encoder_lr), in place of the cache

    @property
    def text_networks(self) -> dict | None:
        return self.live_text.networks if self.live_text is not None else None


def load_data(cfg: dict, family, params, device, dtype, items: Items, world=None) -> Data:
    """Phase 2: every image (and its flip) encoded once by the codec and every caption variant by
    the text encoders, written to disk, keyed by everything that changes them; the encoders leave
    the device. With several GPUs (`world`, distributed.py) each encodes its share, then all read
    the whole."""
    world = world or distributed.World()
    prompts = sample.read_prompt_file(cfg["sample_prompts"], family.prompt_defaults(cfg, params)) \
        if cfg["sample_prompts"] else []
    prompts = sample.at_sizes(prompts, cfg["sample_sizes"])
    cache_dir = Path(cfg["cache_dir"] or Path(items.sections[0]["dataset_dir"]) / ".cache")
    codec = family.codec(cfg, dtype, device)
    latent_cache = cache.LatentCache(cache_dir / "latents", codec.identity, cfg["resolution"], cfg["crop"],
                                     dtype=torch.float32, hash_content=cfg["hash_images"], recache=cfg["recache"],
                                     on_error=cfg["on_bad_image"], seed=cfg["seed"])
    train_variants, failed = encode_samples(latent_cache, codec, items.train, items.sections, cfg, world)
    val_variants, failed_val = encode_samples(latent_cache, codec, items.val, None, cfg, world)
    skipped = items.skipped + failed + failed_val
    bucket_list = items.buckets
    if not all(train_variants):  # an image that failed to decode: its bucket may need merging again
        bucket_list = drop_failed(items, train_variants, len(skipped))
        train_variants, _ = encode_samples(latent_cache, codec, items.train, items.sections, cfg, world)  # moved
    codec.to("cpu")  # the decoder comes back for samples only
    masked = any(s["masked_loss"] or s["alpha_mask"] for s in items.sections)
    train = SampleSet(items.train, train_variants, latent_cache, None, items.sections, cfg["seed"], masked)
    val_kept = [i for i, v in enumerate(val_variants) if v]
    val = SampleSet([items.val[i] for i in val_kept], [val_variants[i] for i in val_kept], latent_cache, None,
                    items.sections, cfg["seed"], masked) if val_kept else None
    epochs = epochs_needed(cfg, bucket_list)
    needed = train.captions_for(epochs) | (val.captions_for(1) if val else set())
    unique = sorted(needed | {p.prompt for p in prompts} | {p.negative for p in prompts} | {""})
    report_variants(train, epochs, len(needed))  # before the encoders run: how many captions they will see
    text_cache = encode_captions(cfg, family, params, dtype, device, cache_dir / "text", unique, world)
    live = text_cache if isinstance(text_cache, LiveText) else None
    for dataset in (train, val) if val else (train,):
        dataset.text_cache = NoText() if live and dataset is train else text_cache
    empty = {k: v.to(device) for k, v in text_cache.load("").items()} if live is None else {}
    return Data(train, val, bucket_list, text_cache, empty, prompts, codec, skipped, epochs, items.sections, live)


def encode_samples(latent_cache, codec, samples: list[Sample], sections: list[dict] | None, cfg: dict,
                   world: distributed.World):
    """Each sample's latent entries, [plain] or [plain, flipped] (flip_aug; never for validation),
    [] for an image that failed; and the (path, reason) of the failures."""
    if not samples:
        return [], []
    flips = [bool(sections and sections[s.section]["flip_aug"]) for s in samples]
    items = [s.item for s in samples] + [replace(s.item, flip=True) for s, f in zip(samples, flips) if f]
    entries = distributed.build_shared(world, latent_cache, items, codec.encode, batch_size=cfg["vae_batch_size"])
    by_item = {(e.item.image_path, e.item.repeat, e.item.flip): e for e in entries}
    variants = []
    for s, flip in zip(samples, flips):
        found = [by_item.get((s.item.image_path, s.item.repeat, f)) for f in ((False, True) if flip else (False,))]
        variants.append(found if all(found) else [])
    return variants, list(latent_cache.skipped)


def drop_failed(items: Items, variants: list[list], num_skipped: int) -> list:
    """The buckets without the samples whose image failed to decode (merged again if one became
    smaller than a batch); the batch size checked again."""
    kept = [replace(b, members=[m for m in b.members if variants[m]]) for b in items.buckets]
    for index, section in enumerate(items.sections):
        images = {items.train[m].item.image_path for b in kept if b.section == index for m in b.members}
        check_batch(section, len(images), num_skipped, len(items.sections) > 1, items.gpus)
    kept = buckets.merge_small([b for b in kept if b.members])
    fit_to_buckets(items.train, kept)  # a sample that moved needs its latent at the new size
    return kept


def epochs_needed(cfg: dict, bucket_list: list) -> int:
    """The epochs max_train_steps reaches into (micro-batches run on across epoch ends)."""
    per_epoch = max(1, sum(b.batches for b in bucket_list))
    return -(-cfg["max_train_steps"] * cfg["gradient_accumulation_steps"] // per_epoch)


def encode_captions(cfg: dict, family, params, dtype, device, folder: Path, unique: list[str],
                    world: distributed.World):
    """The text encoders, placed within the budget, encode the captions the cache lacks; then leave.
    Returns the cache, or with text encoders that train (text_encoder_lr) a LiveText of them."""
    text = family.text_encoder(cfg, params, dtype, training.text_encoder_load_device(cfg, device))
    swaps = training.place_text_encoders(text.networks(), cfg, device)
    text_cache = cache.TextCache(folder, text.identity, family.text_length(cfg, params), family.text_mask(cfg),
                                 recache=cfg["recache"])
    warn_truncated(text, unique)
    live = LiveText(text) if cfg["text_encoder_lr"] else None  # text encoders that train bypass the cache
    if live is not None:
        return live  # it stays on the device, in the training step
    distributed.build_shared(world, text_cache, unique, text.encode, batch_size=cfg["text_batch_size"])
    del text, swaps  # T5-XXL is 9 GB in bf16: gone before the denoiser loads
    return text_cache


class LiveText:
    """Text encoders that train (text_encoder_lr), in place of the text cache: the prompt encoder
    stays on the device (in eval mode: T5's own dropout off). `live(captions)` encodes a batch
    with gradients (the training step, caption dropout included); `load(caption)` one caption
    without them, as TextCache.load gives it (validation batches, samples)."""

    def __init__(self, text):
        self.text = text
        self.networks = text.networks()
        for network in self.networks.values():
            network.eval()

    def __call__(self, captions: list[str]) -> dict:
        return training.encode_text(self.text, captions)

    def load(self, caption: str) -> dict:
        modes = [(m, m.training) for network in self.networks.values() for m in network.modules()]
        for network in self.networks.values():
            network.eval()  # the LoRAs' dropouts off
        try:
            with torch.no_grad():
                return {k: v[0] for k, v in self([caption]).items()}
        finally:
            for module, mode in modes:
                module.training = mode


class NoText:
    """The training set's text when the encoders train: nothing from a cache (the step encodes)."""

    def load(self, caption: str) -> dict:
        return {}


def report_variants(train: SampleSet, epochs: int, needed: int) -> None:
    """How many captions the per-epoch caption operations make the text encoders encode (kohya
    refuses shuffle_caption with cached text outputs; here every variant is cached once)."""
    changing = sum(train.recipes[s.section].changes_per_epoch(s.item.caption) for s in train.samples)
    if not changing:
        return
    base = len({s.item.caption for s in train.samples})
    print(f"caption operations: {changing} of {len(train)} samples change their caption per epoch; "
          f"{needed} distinct captions over {epochs} epochs go into the text cache (encoded once each)")
    if needed > 10 * base:
        warnings.warn(f"the caption operations make {needed} captions to encode, {needed / base:.0f} times the "
                      f"{base} captions of the files: caching them takes as much longer. Fewer epochs, a lower "
                      "caption_tag_dropout_rate or shuffle_caption=False keep it down", stacklevel=3)


def warn_truncated(text, captions_: list[str]) -> None:
    """One warning for the captions a text encoder cuts: how many, and how many tokens."""
    if not hasattr(text, "tokens_lost"):
        return
    cut = {}
    for caption in captions_:
        lost = {name: n for name, n in text.tokens_lost(caption).items() if n > 0}
        if lost:
            cut[caption] = lost
    if cut:
        worst = max(cut.items(), key=lambda item: max(item[1].values()))
        warnings.warn(f"{len(cut)} caption(s) are longer than the text encoders take and are cut; the longest "
                      f"loses {worst[1]} tokens: {worst[0][:80]!r}...", stacklevel=2)
