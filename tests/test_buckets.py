"""Real datasets: aspect-ratio buckets (checked against a hand computation), batches that never
mix buckets and continue on resume, caption operations, masked loss through train.main, sample
grids, the comparison strip, TensorBoard events."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import buckets
import captions
import data
import demo_data
import families
import metrics
import sample
import train
from config import ConfigError, load_config

pytestmark = pytest.mark.usefixtures("one_thread")

FLUX = families.get("flux")
# The hand computation: area 64 x 64, sides 32 .. 128 in steps of 16. For width w the height is
# min(128, 4096 // w rounded down to 16): 32 -> 128, 48 -> 80, 64 -> 64, 80 -> 48, 96 -> 32,
# 112 -> 32, 128 -> 32; each also turned, plus the square.
HAND_BUCKETS = [(32, 96), (32, 112), (32, 128), (48, 80), (64, 64), (80, 48), (96, 32), (112, 32), (128, 32)]
# 40 images in 6 aspect ratios and 3 odd sizes, (width, height) x count -> the bucket of nearest w/h:
IMAGES = {(64, 64): 8, (96, 64): 7, (64, 96): 7, (128, 48): 6, (48, 128): 6, (200, 40): 3,
          (65, 63): 1, (10, 300): 1, (17, 17): 1}
# 64x64 (1.0) <- 64x64, 65x63, 17x17 = 10; 80x48 (1.67) <- 96x64 (1.5) = 7; 48x80 (0.6) <- 64x96 = 7;
# 96x32 (3.0) <- 128x48 (2.67) = 6; 32x96 (0.33) <- 48x128 (0.375) = 6; 128x32 (4.0) <- 200x40 (5.0) = 3;
# 32x128 (0.25) <- 10x300 (0.033) = 1. With batch 4, 32x128 (1) merges first into 32x96 (|log(.25/.33)|
# = 0.29, nearest), then 128x32 (3) into 96x32 (|log(4/3)| = 0.29):
HAND_TABLE = {(32, 96): 7, (48, 80): 7, (64, 64): 10, (80, 48): 7, (96, 32): 9}


def make_images(folder: Path, sizes: dict, broken: int = 1) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for (width, height), count in sizes.items():
        for i in range(count):
            stem = folder / f"img_{width}x{height}_{i}"
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(stem.with_suffix(".png"))
            stem.with_suffix(".txt").write_text(f"k4s4, {width} by {height}, tag{i}, noise")
    for i in range(broken):
        (folder / f"broken{i}.png").write_bytes(b"not an image")
    return folder


def bucket_config(tmp_path, folder, **settings) -> dict:
    path = tmp_path / "bucket_config.py"
    base = dict(dataset_dir=str(folder), enable_bucket=True, resolution=64, min_bucket_reso=32, max_bucket_reso=128,
                bucket_reso_steps=16, batch_size=4, model_family="flux")
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in {**base, **settings}.items()))
    return load_config(str(path), check_files=False)


def test_bucket_resolutions_match_the_hand_computation():
    settings = buckets.BucketSettings(64, 32, 128, 16)
    assert buckets.bucket_resolutions(settings) == HAND_BUCKETS
    resos = buckets.bucket_resolutions(settings)
    assert buckets.assign(settings, resos, (96, 64)) == (80, 48)
    assert buckets.assign(settings, resos, (10, 300)) == (32, 128)
    no_up = buckets.BucketSettings(64, 32, 128, 16, no_upscale=True)
    assert buckets.assign(no_up, resos, (17, 17)) == (16, 16)  # never enlarged: its own size, floored to 16
    assert buckets.assign(no_up, resos, (200, 40)) == (128, 16)  # area 8000 > 4096: scaled by 128/200 (longest side)
    assert "smaller than one bucket step" in buckets.assign(no_up, resos, (10, 300))


def test_forty_images_no_image_lost_table_matches_hand(tmp_path, capsys):
    folder = make_images(tmp_path / "data", IMAGES)
    with pytest.warns(UserWarning, match="skipping 1 unreadable"):
        items = data.dataset_items(bucket_config(tmp_path, folder), FLUX)
    data.report_buckets(items, tmp_path / "run")
    table = {b.resolution: len(b.members) for b in items.buckets}
    assert table == HAND_TABLE
    merged = {b.resolution: b.merged_from for b in items.buckets if b.merged_from}
    assert merged == {(32, 96): [(32, 128)], (96, 32): [(128, 32)]}
    # every image is in exactly one bucket, or skipped with a reason
    in_buckets = sorted(items.train[m].item.image_path.name for b in items.buckets for m in b.members)
    skipped = [Path(p).name for p, _ in items.skipped]
    assert len(in_buckets) == len(set(in_buckets)) == 40 and skipped == ["broken0.png"]
    assert sorted(in_buckets + skipped) == sorted(p.name for p in folder.glob("*.png"))
    for b in items.buckets:  # each sample crops to its final bucket (merged ones included)
        assert all(items.train[m].item.size == (b.resolution[1], b.resolution[0]) for m in b.members)
    written = json.loads((tmp_path / "run" / "buckets.json").read_text())
    assert [(tuple(e["resolution"]), e["count"]) for e in written[:-1]] == sorted(HAND_TABLE.items())
    assert written[-1]["skipped"][0][0].endswith("broken0.png") and written[-1]["skipped"][0][1]
    out = capsys.readouterr().out
    assert "64x64" in out and "(merged in: 128x32)" in out and "skipped" in out and "broken0.png" in out


def test_batches_never_mix_buckets_and_resume_continues_them(tmp_path):
    folder = make_images(tmp_path / "data", IMAGES, broken=0)
    items = data.dataset_items(bucket_config(tmp_path, folder, repeats=2), FLUX)
    bucket_of = {m: b.resolution for b in items.buckets for m in b.members}
    order = data.DataOrder([(b.members, b.batch_size) for b in items.buckets], seed=3)
    # with 2 repeats only 32x128 (2 samples) is smaller than a batch: 32x96 14, 48x80 14, 64x64 20,
    # 80x48 14, 96x32 12, 128x32 6 -> 3 + 3 + 5 + 3 + 3 + 1 batches of 4
    assert {b.resolution: len(b.members) for b in items.buckets} == {
        (32, 96): 14, (48, 80): 14, (64, 64): 20, (80, 48): 14, (96, 32): 12, (128, 32): 6}
    assert order.batches_per_epoch == 18
    straight = [order.next_batch() for _ in range(3 * 18)]
    for epoch in range(3):
        batches = straight[epoch * 18 : (epoch + 1) * 18]
        assert all(len({bucket_of[m] for m in batch}) == 1 and len(batch) == 4 for batch in batches)
        flat = [m for batch in batches for m in batch]
        assert len(flat) == len(set(flat))  # each sample at most once per epoch
    assert straight[:18] != straight[18:36]  # a new order every epoch

    first = data.DataOrder([(b.members, b.batch_size) for b in items.buckets], seed=3)
    head = [first.next_batch() for _ in range(25)]
    resumed = data.DataOrder([(b.members, b.batch_size) for b in items.buckets], seed=3)
    resumed.load(json.loads(json.dumps(first.state())))
    assert head + [resumed.next_batch() for _ in range(29)] == straight
    other = data.DataOrder([(b.members[:-1], b.batch_size) for b in items.buckets], seed=3)
    with pytest.raises(train.checkpoint.RunFolderError, match="buckets differ"):
        other.load(first.state())


def test_dataset_sections_multi_resolution_and_step_arithmetic(tmp_path):
    folder = make_images(tmp_path / "data", {(64, 64): 4, (96, 64): 4}, broken=0)
    cfg = bucket_config(tmp_path, folder, datasets=[
        {"image_dir": str(folder), "num_repeats": 2},
        {"dataset_dir": str(folder), "resolution": 32, "min_bucket_reso": 16, "max_bucket_reso": 64, "batch_size": 2}])
    items = data.dataset_items(cfg, FLUX)
    table = {(b.section, b.resolution): (len(b.members), b.batches) for b in items.buckets}
    # section 0 at area 64^2: 64x64 x 2 repeats = 8, 96x64 -> 80x48 x 2 = 8; section 1 at area 32^2
    # (buckets 16x48, 16x64, 32x32, 48x16, 64x16): 64x64 -> 32x32, 96x64 (1.5) -> 32x32 (1.0 beats 48x16's 3.0)
    assert table == {(0, (64, 64)): (8, 2), (0, (80, 48)): (8, 2), (1, (32, 32)): (8, 4)}
    with pytest.raises(ConfigError, match=r"datasets\[0\]: 'repeat' cannot be set per section. Did you mean 'repeats'"):
        bucket_config(tmp_path, folder, datasets=[{"dataset_dir": str(folder), "repeat": 2}])


def test_caption_operations_are_deterministic_under_the_seed():
    recipe = captions.CaptionRecipe(instance_prompt="k4s4 ", keep_tokens=1, shuffle_caption=True,
                                    caption_tag_dropout_rate=0.3)
    text = "a, b, c, d, e, f, g"
    renders = [captions.render(recipe, text, captions.rng_for(7, epoch, "s:0")) for epoch in range(6)]
    assert renders == [captions.render(recipe, text, captions.rng_for(7, epoch, "s:0")) for epoch in range(6)]
    assert len(set(renders)) > 1 and all(r.startswith("k4s4, ") for r in renders)
    assert renders != [captions.render(recipe, text, captions.rng_for(8, epoch, "s:0")) for epoch in range(6)]
    # the trigger word, trimmed, never twice
    assert captions.with_instance_prompt("k4s4, a cat", "k4s4 ") == "k4s4, a cat"
    assert captions.with_instance_prompt("a cat", "k4s4 ") == "k4s4, a cat"
    keep = captions.CaptionRecipe(keep_tokens_separator="|||", shuffle_caption=True)
    out = captions.render(keep, "x, y ||| a, b, c ||| z", captions.rng_for(0, 0, "k"))
    assert out.startswith("x, y, ") and out.endswith(", z") and sorted(out.split(", ")[2:5]) == ["a", "b", "c"]
    wild = captions.CaptionRecipe(enable_wildcard=True, caption_prefix="pre", caption_suffix="post")
    seen = {captions.render(wild, "a {red|blue} cat\nanother line", captions.rng_for(0, e, "w")) for e in range(40)}
    assert seen == {"pre a red cat post", "pre a blue cat post", "pre another line post"}


def test_many_caption_variants_are_announced_before_encoding(capsys):
    import cache
    import config

    section = dict(config.DEFAULTS, shuffle_caption=True)
    samples = [data.Sample(cache.ImageItem(Path(f"{i}.png"), "a, b, c, d, e, f"), 0, f"d:{i}.png:0") for i in range(2)]
    train_set = data.SampleSet(samples, [[None]] * 2, None, None, [section], seed=0, masked=False)
    needed = train_set.captions_for(epochs=30)
    assert len(needed) > 40 and all(sorted(c.split(", ")) == list("abcdef") for c in needed)
    with pytest.warns(UserWarning, match=r"make \d+ captions to encode, \d+ times the 1 captions of the files"):
        data.report_variants(train_set, 30, len(needed))
    assert f"2 of 2 samples change their caption per epoch; {len(needed)} distinct captions over 30 epochs" in \
        capsys.readouterr().out


def shaped_dataset(folder: Path, transparent: bool) -> Path:
    """Images of exactly their bucket sizes (32x32, 48x16, 16x48: no resize, no crop), coloured
    shapes; with `transparent` a band of each is transparent (alpha 0: white in the image)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    colours = list(demo_data.COLOURS)
    for i in range(12):
        size = [(32, 32), (48, 16), (16, 48)][i % 3]
        image = demo_data.draw_shape(colours[i % 4], demo_data.SHAPES[i % 3], demo_data.random.Random(i), size)
        rgba = np.concatenate([np.asarray(image), np.full((size[1], size[0], 1), 255, np.uint8)], axis=2)
        if transparent:
            left = int(rng.integers(0, size[0] // 2))
            rgba[:, left : left + size[0] // 3, 3] = 0  # masked band, off-centre: a wrong flip shows
        Image.fromarray(rgba, "RGBA").save(folder / f"s{i}.png")
        (folder / f"s{i}.txt").write_text(f"a {colours[i % 4]} {demo_data.SHAPES[i % 3]}")
    return folder


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    return demo_data.make_demo(tmp_path_factory.mktemp("demo"))


def run_config(tmp_path: Path, demo_files: dict, **settings) -> str:
    from test_train import config_file

    base = dict(resolution=32, enable_bucket=True, min_bucket_reso=16, max_bucket_reso=48, batch_size=2,
                max_train_steps=4, save_every=2)
    return config_file(tmp_path, demo_files, **{**base, **settings})


def test_resume_through_train_main_continues_with_the_same_batches_flips_and_captions(tmp_path, demo_files):
    """Buckets, flips and per-epoch caption shuffles: 3 + 5 resumed steps train exactly as 8
    straight ones (6 batches an epoch: the resumed part crosses into the second epoch, whose
    caption variants the first part's text cache did not need)."""
    files = dict(demo_files, dataset_dir=str(shaped_dataset(tmp_path / "data", transparent=False)))
    settings = dict(flip_aug=True, shuffle_caption=True, caption_separator=" ", keep_tokens=1, save_every=0,
                    network_dropout=0.1)
    finals = []
    for name, steps in (("straight", [8]), ("split", [3, 8])):
        (tmp_path / name).mkdir()
        for i, max_steps in enumerate(steps):
            cfg = run_config(tmp_path / name, files, max_train_steps=max_steps, resume="latest" if i else "",
                             **settings)
            finals.append(train.main([cfg]))
    straight, split = finals[0], finals[-1]
    losses = [[json.loads(line)["loss"] for line in (f.parent / "metrics.jsonl").read_text().splitlines()]
              for f in (straight, split)]
    assert len(losses[0]) == 8 and losses[0] == losses[1]
    a, b = load_file(str(straight)), load_file(str(split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_masked_pixels_contribute_nothing_through_train_main(tmp_path, demo_files, monkeypatch):
    files = dict(demo_files, dataset_dir=str(shaped_dataset(tmp_path / "data", transparent=True)))
    captured = {}
    real_load_batch, real_predict = train.load_batch, FLUX.predict

    def capture(dataset, indices, device):
        captured["batch"] = real_load_batch(dataset, indices, device)
        return captured["batch"]

    def run(name: str, where: str | None) -> tuple[list, dict]:
        """A run whose prediction gets huge values on the transparent (white) pixels, on the
        others, or nowhere."""
        def predict(model, x_t, t, cond):
            out = real_predict(model, x_t, t, cond)
            white = (captured["batch"]["latent"] == 1.0).all(dim=1, keepdim=True)  # transparent turns white
            assert torch.equal(white.float(), 1 - captured["batch"]["mask"])  # the mask is the alpha, flipped too
            chosen = {"masked": white, "kept": ~white, None: torch.zeros_like(white)}[where]
            return out + 1e3 * torch.randn(out.shape, generator=torch.Generator().manual_seed(0)) * chosen

        monkeypatch.setattr(FLUX, "predict", predict)
        (tmp_path / name).mkdir()
        cfg = run_config(tmp_path / name, files, alpha_mask=True, flip_aug=True, max_train_steps=4, seed=5,
                         cache_dir=str(tmp_path / "cache"))  # one cache for the three runs
        final = train.main([cfg])
        losses = [json.loads(line)["loss"] for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
        return losses, load_file(str(final))

    monkeypatch.setattr(train, "load_batch", capture)
    plain_losses, plain = run("plain", None)
    masked_losses, masked = run("garbage_masked", "masked")
    kept_losses, _ = run("garbage_kept", "kept")
    assert masked_losses == plain_losses and all(torch.equal(plain[k], masked[k]) for k in plain)
    assert kept_losses != plain_losses  # the same garbage on trained pixels changes everything


def test_demo_buckets_grids_comparison_strip_and_tensorboard(tmp_path, demo_files, monkeypatch):
    files = demo_data.make_demo(tmp_path / "demo", shapes_of_images=True)
    files = dict(demo_files, dataset_dir=files["dataset_dir"])
    cfg = run_config(tmp_path, files, sample_every=2, sample_steps=1, validation_count=2, validate_every=2,
                     batch_size=4, tensorboard=True)
    final = train.main([cfg])
    run_dir = final.parent
    table = {tuple(e["resolution"]): e["count"] for e in json.loads((run_dir / "buckets.json").read_text())[:-1]}
    assert set(table) == {(32, 32), (48, 16), (16, 48)} and sum(table.values()) == 72 - 2
    grid = Image.open(run_dir / "samples" / "grids" / "step000002.png")  # 4 prompts at 32x32: 2 x 2 cells
    assert grid.size == (2 * 32, 2 * (32 + sample.LABEL_HEIGHT))
    strip_path = sample.main(["--compare", str(run_dir), "--device", "cpu", "--seed", "3"])[0]
    strip = Image.open(strip_path)
    labels = json.loads(strip.info["parameters"])["files"]
    assert labels == ["base", "step 2", "step 4", "final"] and strip.size == (4 * 32, 32 + sample.LABEL_HEIGHT)
    if metrics.tensorboard_installed():
        assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    png = Image.open(run_dir / "loss.png")
    assert png.size == (800, 400)


def test_runs_without_tensorboard(tmp_path, demo_files, monkeypatch):
    monkeypatch.setattr(metrics, "tensorboard_installed", lambda: False)
    final = train.main([run_config(tmp_path, demo_files, max_train_steps=2, save_every=0, resolution=16,
                                   enable_bucket=False)])
    assert not (final.parent / "tensorboard").exists() and (final.parent / "metrics.jsonl").exists()


@pytest.mark.skipif(not metrics.tensorboard_installed(), reason="the tensorboard package is not installed (optional)")
def test_tensorboard_events_hold_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = metrics.MetricsLog(tmp_path)
    log.log({"step": 1, "loss": 0.5, "lr": 1e-3, "loss_by_sigma": {"0.0-0.1": (0.7, 3)}})
    log.image("samples", Image.new("RGB", (8, 6), "red"), 1)
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "loss_by_sigma/0.0-0.1"} <= set(events.Tags()["scalars"])
    assert events.Scalars("loss")[0].value == 0.5 and "samples" in events.Tags()["images"]


def test_epoch_keys_warmup_ratio_sections_caption_variants_and_the_summary(tmp_path, demo_files, capsys):
    folder = shaped_dataset(tmp_path / "data", transparent=False)  # 12 images: 4 each of 32x32, 48x16, 16x48
    sections = [{"image_dir": str(folder), "shuffle_caption": True, "caption_separator": " ", "keep_tokens": 1},
                {"dataset_dir": str(folder), "resolution": 16, "max_bucket_reso": 32, "batch_size": 4}]
    cfg = run_config(tmp_path, dict(demo_files, dataset_dir=str(folder)), datasets=sections, max_train_epochs=2,
                     save_every=0, save_every_n_epochs=1, sample_every=0, sample_every_n_epochs=1, sample_steps=1,
                     lr_warmup_steps=0.5, lr_scheduler="constant_with_warmup")
    with pytest.raises(ConfigError, match="lr_scheduler='constant' has no warmup"):
        train.main([cfg, "--lr_scheduler=constant"])  # before anything is cached
    final = train.main([cfg])
    out, run_dir = capsys.readouterr().out, final.parent
    # section 0: 3 buckets of 4 in batches of 2 = 6; section 1 at 16px: all 12 in 16x16, batches of 4 = 3
    assert "data: 12 images x 1 repeats = 12 samples in 3 bucket(s) -> 6 batches of 2 at 32px" in out
    assert "data: 12 images x 1 repeats = 12 samples in 1 bucket(s) -> 3 batches of 4 at 16px" in out
    assert "all sections: 24 samples" in out and "max_train_epochs=2: 9 batches per epoch -> max_train_steps=18" in out
    assert sorted(p.name for p in run_dir.glob("t_step*.safetensors")) == ["t_step000009.safetensors",
                                                                           "t_step000018.safetensors"]
    assert {p.name for p in (run_dir / "samples" / "grids").glob("*")} == {"step000009.png", "step000018.png"}
    lrs = [json.loads(line)["lr"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lrs[:10] == pytest.approx([1e-3 * k / 9 for k in range(10)])  # warmup 0.5 x 18 steps, then constant
    # "a red circle" with the first word kept becomes "a circle red" in some epochs: both are in the text cache
    assert "samples change their caption per epoch" in out
    assert "finished: everything is in" in out and "python sample.py --compare" in out
    assert f'pipe.load_lora_weights("{final}")' in out and "buckets.json" in out
    meta = json.loads(load_file_metadata(final)["trainer_config"])
    assert [s.get("image_dir", s.get("dataset_dir")) for s in meta["datasets"]] == ["data", "data"]  # no local paths


def load_file_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()
