"""Aspect-ratio buckets: every image trains at about the same area (resolution x resolution
pixels) in the bucket whose shape is closest to its own, instead of being squared.

    resos = bucket_resolutions(settings)              # the (width, height) of every bucket
    reso = assign(settings, resos, (width, height))   # an image's bucket, or a reason to skip it
    layout = merge_small(buckets, batch_size)         # no bucket smaller than one batch

The rules (kohya sd-scripts' BucketManager, written out so they can be checked by hand):
- Buckets: the square whose side is resolution rounded down to `steps`, and for every width w
  from min_reso to max_reso in `steps`, the height h = min(max_reso, area // w rounded down to
  `steps`), kept when h >= min_reso; both (w, h) and (h, w).
- An image goes to the bucket with the nearest aspect ratio (|w/h - bucket w/h| smallest; the
  first in sorted order on a tie), is resized to just cover it and cropped (center or random).
- no_upscale: an image larger than the area is scaled down to it (keeping its shape) and, if a
  side is still above max_reso, further until it fits; the bucket is that size with each side
  rounded down to `steps`, so no image is ever enlarged. An image with a side under `steps`
  cannot fill any bucket: it is skipped with that reason.
- A bucket holding fewer samples (images x repeats) than the batch size is merged into the bucket
  of nearest aspect ratio (|log(ar_a / ar_b)| smallest; ties: the fuller bucket, then the first
  in sorted order), smallest bucket first, until every bucket fills a batch (or one is left).
  Its images are then resized and cropped to the neighbour's resolution. Nothing is dropped.
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import atomic


@dataclass(frozen=True)
class BucketSettings:
    resolution: int  # the training area is resolution x resolution pixels
    min_reso: int
    max_reso: int
    steps: int  # bucket sides are multiples of this
    no_upscale: bool = False
    enabled: bool = True  # False: one square bucket of resolution x resolution


def bucket_resolutions(s: BucketSettings) -> list[tuple[int, int]]:
    """Every bucket (width, height) at the settings' area, sorted."""
    if not s.enabled:
        return [(s.resolution, s.resolution)]
    area = s.resolution * s.resolution
    side = s.resolution // s.steps * s.steps
    resos = {(side, side)}
    for width in range(s.min_reso, s.max_reso + 1, s.steps):
        height = min(s.max_reso, area // width // s.steps * s.steps)
        if height >= s.min_reso:
            resos |= {(width, height), (height, width)}
    return sorted(resos)


def assign(s: BucketSettings, resos: list[tuple[int, int]], size: tuple[int, int]) -> tuple[int, int] | str:
    """The (width, height) bucket of an upright image of `size` (width, height), or the reason
    it cannot be used."""
    width, height = size
    if not s.enabled:
        return resos[0]
    if not s.no_upscale:
        ratio = width / height
        return min(resos, key=lambda r: abs(r[0] / r[1] - ratio))  # min keeps the first on a tie
    scale = min(1.0, math.sqrt(s.resolution * s.resolution / (width * height)), s.max_reso / max(width, height))
    bucket = (int(width * scale) // s.steps * s.steps, int(height * scale) // s.steps * s.steps)
    if min(bucket) == 0:
        return f"{width}x{height} is smaller than one bucket step ({s.steps} px) on a side (bucket_no_upscale)"
    return bucket


def log_ratio_distance(a: tuple[int, int], b: tuple[int, int]) -> float:
    return abs(math.log((a[0] / a[1]) / (b[0] / b[1])))


@dataclass
class Bucket:
    """The samples of one section at one resolution."""

    section: int
    resolution: tuple[int, int]  # (width, height)
    batch_size: int
    members: list[int] = field(default_factory=list)  # sample indices
    merged_from: list[tuple[int, int]] = field(default_factory=list)  # resolutions folded into this one

    @property
    def batches(self) -> int:
        return len(self.members) // self.batch_size


def merge_small(buckets: list[Bucket]) -> list[Bucket]:
    """Merge every bucket with fewer members than its batch size into its nearest neighbour of
    the same section (see the module docstring). Returns the buckets left, sorted."""
    buckets = sorted(buckets, key=lambda b: (b.section, b.resolution))
    while True:
        small = [b for b in buckets if len(b.members) < b.batch_size
                 and any(o is not b and o.section == b.section for o in buckets)]
        if not small:
            return buckets
        victim = min(small, key=lambda b: len(b.members))  # the first on a tie: sorted order
        others = [o for o in buckets if o is not victim and o.section == victim.section]
        target = min(others, key=lambda o: (log_ratio_distance(o.resolution, victim.resolution), -len(o.members)))
        target.members = sorted(target.members + victim.members)
        target.merged_from += [victim.resolution] + victim.merged_from
        buckets.remove(victim)


def table(buckets: list[Bucket], section_names: list[str]) -> str:
    """The bucket table as printed: one line per bucket."""
    lines = ["bucket     samples  batches" + ("  section" if len(section_names) > 1 else "")]
    for b in buckets:
        width, height = b.resolution
        merged = f"  (merged in: {', '.join(f'{w}x{h}' for w, h in b.merged_from)})" if b.merged_from else ""
        section = f"  {section_names[b.section]}" if len(section_names) > 1 else ""
        lines.append(f"{f'{width}x{height}':<11} {len(b.members):>6}  {b.batches:>7}{section}{merged}")
    total = sum(b.batches for b in buckets)
    lines.append(f"{'total':<11} {sum(len(b.members) for b in buckets):>6}  {total:>7}")
    return "\n".join(lines)


def write_json(path: Path, buckets: list[Bucket], skipped: list[tuple[str, str]]) -> None:
    """buckets.json: [{"resolution": [w, h], "count": n, ...} per bucket, {"skipped": [[path, reason], ...]}]."""
    entries = [{"resolution": list(b.resolution), "count": len(b.members), "batches": b.batches,
                "batch_size": b.batch_size, "section": b.section,
                "merged_from": [list(r) for r in b.merged_from]} for b in buckets]
    entries.append({"skipped": [[str(p), reason] for p, reason in skipped]})
    atomic.write_text(Path(path), json.dumps(entries, indent=1))
