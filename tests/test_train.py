"""The real entry point (train.main) on tiny weights: learning, resume, bad input."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import cache
import checkpoint
import demo_data
import train
from config import ConfigError
from models.flux import Flux


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    return demo_data.make_demo(tmp_path_factory.mktemp("demo"))


def config_file(tmp_path: Path, demo_files: dict, **settings) -> str:
    base = dict(
        demo_files,
        model_overrides={"axes_dim": [8, 20, 20]},
        output_dir=str(tmp_path / "runs"),
        cache_dir=str(tmp_path / "cache"),
        run_name="t",
        device="cpu",
        dtype="fp32",
        resolution=16,
        t5_max_length=8,
        batch_size=4,
        network_dim=4,
        network_alpha=4.0,
        learning_rate=1e-3,
        max_train_steps=6,
        save_every=3,
        sample_every=0,
        sample_at_start=False,
        validate_every=0,
        gradient_checkpointing=False,
        lr_scheduler="constant",
    )
    base.update(settings)
    if base.get("train_mode") == "full":  # LoRA settings are refused for full fine-tuning
        base.pop("network_dim"), base.pop("network_alpha")
    path = tmp_path / "config.py"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in base.items()))
    return str(path)


def losses_of(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lora_loss_falls_on_a_fixed_tiny_set(tmp_path, demo_files):
    cfg = config_file(tmp_path, demo_files, max_train_steps=40, save_every=0, learning_rate=3e-3,
                      timestep_sampling="uniform", train_single_blocks="none")
    final = train.main([cfg])
    losses = losses_of(final.parent)
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.85 * first, (first, last)
    with safe_open(str(final), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert all(k.startswith("lora_unet_double_blocks_") for k in keys)
    assert (final.parent / "loss.png").exists()
    bins = [json.loads(line).get("loss_by_sigma") for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
    every_tenth = [b for b in bins if b]
    assert len(every_tenth) == 4  # steps 10, 20, 30, 40
    assert sum(count for _, count in every_tenth[0].values()) == 10 * 4  # 10 steps of batch 4, every sample binned


def test_resume_gives_identical_losses_and_weights(tmp_path, demo_files):
    straight = tmp_path / "straight"
    straight.mkdir()
    train.main([config_file(straight, demo_files, max_train_steps=6, network_dropout=0.1)])

    split = tmp_path / "split"
    split.mkdir()
    train.main([config_file(split, demo_files, max_train_steps=3, network_dropout=0.1)])
    train.main([config_file(split, demo_files, max_train_steps=6, network_dropout=0.1, resume="latest")])

    a_dir, b_dir = straight / "runs" / "t", split / "runs" / "t"
    assert losses_of(a_dir) == losses_of(b_dir)
    a, b = load_file(str(a_dir / "t.safetensors")), load_file(str(b_dir / "t.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_samples_validation_and_full_finetune(tmp_path, demo_files):
    cfg = config_file(tmp_path, demo_files, train_mode="full", max_train_steps=2, sample_every=2, save_every=1,
                      sample_at_start=True, sample_steps=2, validation_count=2, validate_every=1, ema_decay=0.9)
    final = train.main([cfg])
    run = final.parent
    assert len(list((run / "samples").glob("step000000_*.png"))) == 4
    assert len(list((run / "samples").glob("step000002_*.png"))) == 4
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["val_loss"]) for r in records)
    assert set(load_file(str(final))) >= {"img_in.weight", "double_blocks.0.img_attn.qkv.weight"}

    # the EMA, step by step from the base weights w0: e1 = 0.9 w0 + 0.1 w1, e2 = 0.9 e1 + 0.1 w2
    base = load_file(demo_files["flux_path"])
    ema = base_ema = {k: v.float() for k, v in base.items()}
    # the EMA's shadow list follows the model's parameter order
    order = [name for name, _ in Flux.from_state_dict(base, axes_dim=[8, 20, 20]).named_parameters()]
    for step in (1, 2):
        saved, extra, _ = checkpoint.load_state(run / "state" / f"step_{step:06d}")
        assert sorted(saved) == sorted(ema) == sorted(order) and extra["ema"]["num_updates"] == step
        ema = {k: 0.9 * ema[k] + 0.1 * saved[k] for k in saved}
        for key, shadow in zip(order, extra["ema"]["shadow"], strict=True):
            torch.testing.assert_close(shadow, ema[key], rtol=1e-6, atol=1e-7, msg=lambda m: f"step {step} {key}: {m}")
    moved = [k for k in ema if not torch.equal(saved[k], base_ema[k])]
    assert moved and all((ema[k] - saved[k]).abs().max() > 0 for k in moved)  # an average, not the last weights


def test_nan_loss_stops_and_keeps_the_last_good_state(tmp_path, demo_files, monkeypatch):
    real_load_batch = train.load_batch
    calls = {"n": 0}

    def poisoned(dataset, indices, device):
        batch = real_load_batch(dataset, indices, device)
        calls["n"] += 1
        if calls["n"] == 5:  # step 5: after the step-3 save
            batch["latent"][0, 0, 0, 0] = float("nan")
        return batch

    monkeypatch.setattr(train, "load_batch", poisoned)
    cfg = config_file(tmp_path, demo_files, max_train_steps=6, save_every=3)
    with pytest.raises(train.TrainingError, match="loss is nan at step 5"):
        train.main([cfg])
    run = tmp_path / "runs" / "t"
    states = sorted(p.name for p in (run / "state").iterdir())
    assert states == ["step_000003"]
    saved = load_file(str(run / "state" / "step_000003" / "trainable.safetensors"))
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert not (run / "t.safetensors").exists()


def test_config_typo_and_missing_file_fail_before_any_model_loads(tmp_path, demo_files, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    import models.flux
    from families.flux import Flux as FluxFamily

    monkeypatch.setattr(models.flux.Flux, "from_state_dict", no_loading)
    monkeypatch.setattr(FluxFamily, "load", no_loading)
    with pytest.raises(ConfigError, match="Did you mean 'learning_rate'"):
        train.main([config_file(tmp_path, demo_files), "--learning_rat=1e-4"])
    with pytest.raises(ConfigError, match="not found"):
        train.main([config_file(tmp_path, demo_files, flux_path=str(tmp_path / "nope.safetensors"))])
    with pytest.raises(ConfigError, match="larger than the dataset"):
        train.main([config_file(tmp_path, demo_files, batch_size=1000)])
    with pytest.raises(ConfigError, match="should be a int"):
        train.main([config_file(tmp_path, demo_files), "--max_train_steps=1.5"])


def test_corrupt_image_is_skipped_and_listed(tmp_path, demo_files, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_files["dataset_dir"], data)
    (data / "broken.png").write_bytes(b"not a png at all")
    (data / "broken.txt").write_text("a broken image")
    files = dict(demo_files, dataset_dir=str(data))
    train.main([config_file(tmp_path, files, max_train_steps=1)])
    out = capsys.readouterr().out
    assert "skipped 1 unreadable image" in out and "broken.png" in out
    with pytest.raises(cache.ImageReadError, match=r"cannot read image .*broken\.png"):
        train.main([config_file(tmp_path, files, max_train_steps=1, on_bad_image="stop", recache=True, run_name="t2")])


@pytest.fixture(scope="module")
def deeper_flux(tmp_path_factory):
    """The demo architecture with 3 + 3 blocks, so that one of each kind can be swapped."""
    from safetensors.torch import save_file

    from models.flux import Flux, FluxParams

    torch.manual_seed(0)
    model = Flux(FluxParams(**{**demo_data.FLUX_TINY, "depth": 3, "depth_single_blocks": 3}))
    path = tmp_path_factory.mktemp("deeper") / "flux.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def run_losses(tmp_path: Path, demo_files: dict, name: str, **settings) -> list[float]:
    folder = tmp_path / name
    folder.mkdir()
    final = train.main([config_file(folder, demo_files, save_every=0, **settings)])
    return losses_of(final.parent)


def test_block_swap_trains_exactly_like_no_swap(tmp_path, demo_files, deeper_flux):
    files = dict(demo_files, flux_path=deeper_flux)
    plain = run_losses(tmp_path, files, "plain", max_train_steps=3, gradient_checkpointing=True)
    swapped = run_losses(tmp_path, files, "swap", max_train_steps=3, gradient_checkpointing=True,
                         double_blocks_to_swap=1, single_blocks_to_swap=1, swap_mode="h2d_only")
    assert plain == swapped


def test_fused_backward_full_finetune_equals_the_plain_step(tmp_path, demo_files):
    common = dict(train_mode="full", max_train_steps=3, max_grad_norm=0.0)
    plain = run_losses(tmp_path, demo_files, "plain", **common)
    fused = run_losses(tmp_path, demo_files, "fused", fused_backward=True, **common)
    assert plain == fused


def test_fp8_base_lora_trains(tmp_path, demo_files, monkeypatch):
    """The block Linears are float8_e4m3fn during and after training; every LoRA weight moved."""
    import fp8

    seen = {}
    real_choose = train.training.choose_trainable

    def recording_choose(model, family, cfg, device=None):
        network, trainable, targets = real_choose(model, family, cfg, device)
        seen.update(model=model, trainable=trainable, start={k: v.detach().clone() for k, v in trainable.items()})
        return network, trainable, targets

    monkeypatch.setattr(train.training, "choose_trainable", recording_choose)
    losses = run_losses(tmp_path, demo_files, "fp8", max_train_steps=2, fp8_base=True)
    assert all(math.isfinite(x) for x in losses)
    model = seen["model"]
    fp8_linears = {name: m for name, m in model.named_modules() if isinstance(m, fp8.Fp8Linear)}
    assert "double_blocks.0.img_attn.qkv" in fp8_linears and "single_blocks.0.linear1" in fp8_linears
    assert all(m.weight.dtype == torch.float8_e4m3fn and not m.weight.requires_grad for m in fp8_linears.values())
    trainable, start = seen["trainable"], seen["start"]
    assert len(trainable) > 0 and all(p.dtype == torch.float32 for p in trainable.values())
    unchanged = [name for name, p in trainable.items() if torch.equal(p.detach(), start[name])]
    assert unchanged == []  # two AdamW steps: the ups leave zero at step 1, the downs follow at step 2


def test_impossible_memory_combinations_are_config_errors(tmp_path, demo_files):
    with pytest.raises(ConfigError, match="max_grad_norm=0"):
        train.main([config_file(tmp_path, demo_files, fused_backward=True)])
    with pytest.raises(ConfigError, match="needs train_mode='lora'"):
        train.main([config_file(tmp_path, demo_files, fp8_base=True, train_mode="full")])
    with pytest.raises(ConfigError, match="must stay on the"):
        train.main([config_file(tmp_path, demo_files, blocks_to_swap=2)])


def test_sigterm_saves_at_the_step_boundary_and_resume_continues(tmp_path, demo_files, monkeypatch):
    import os
    import signal

    real_load_batch = train.load_batch
    calls = {"n": 0}

    def terminate_during_step_2(dataset, indices, device):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step: the step finishes, then saves
        return real_load_batch(dataset, indices, device)

    monkeypatch.setattr(train, "load_batch", terminate_during_step_2)
    cfg = config_file(tmp_path, demo_files, max_train_steps=6, save_every=0)
    with pytest.raises(train.RunStopped, match="stopped at step 2.*--resume=latest") as stopped:
        train.main([cfg])
    assert stopped.value.code == 143  # 128 + SIGTERM, as schedulers expect of a terminated job
    run = tmp_path / "runs" / "t"
    assert sorted(p.name for p in (run / "state").iterdir()) == ["step_000002"]
    assert not (run / "t.safetensors").exists() and (run / "t_step000002.safetensors").exists()
    assert signal.getsignal(signal.SIGTERM) is not None  # handlers restored
    monkeypatch.setattr(train, "load_batch", real_load_batch)
    train.main([config_file(tmp_path, demo_files, max_train_steps=6, save_every=0, resume="latest")])
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))


def test_caption_dropout_swaps_in_the_empty_caption():
    batch = {"latent": torch.zeros(64, 1), "t5": torch.ones(64, 3, 2), "clip_pooled": torch.ones(64, 4)}
    empty = {"t5": torch.zeros(3, 2), "clip_pooled": torch.zeros(4)}
    out = train.drop_captions(batch, empty, 0.5, torch.Generator().manual_seed(0))
    dropped = out["clip_pooled"][:, 0] == 0
    assert 10 < dropped.sum() < 54  # about half
    assert torch.equal(out["t5"][:, 0, 0] == 0, dropped)  # the same samples lose both tensors
    assert train.drop_captions(batch, empty, 0.0, torch.Generator()) is batch


def test_full_finetune_with_swap_updates_each_block_while_it_is_on_the_device(tmp_path, demo_files, deeper_flux):
    """Exchange-mode swap + the fused step: the same losses and weights as without swapping."""
    files = dict(demo_files, flux_path=deeper_flux)
    common = dict(train_mode="full", max_train_steps=3, max_grad_norm=0.0, fused_backward=True,
                  gradient_checkpointing=True, optimizer="adafactor")
    plain = run_losses(tmp_path, files, "plain", **common)
    swapped = run_losses(tmp_path, files, "swap", double_blocks_to_swap=1, single_blocks_to_swap=1, **common)
    assert plain == swapped
    a = load_file(str(tmp_path / "plain" / "runs" / "t" / "t.safetensors"))
    b = load_file(str(tmp_path / "swap" / "runs" / "t" / "t.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_latent_path_with_an_autoencoder_and_the_t5_mask(tmp_path, demo_files):
    """A tiny autoencoder in the ae.safetensors layout (16 latent channels, 2x down) and a
    FLUX taking 64-channel tokens: caching, training with the T5 mask, sampling, decoding."""
    from safetensors.torch import save_file

    from models.flux import Flux, FluxParams
    from models.vae import AutoEncoder, AutoEncoderParams

    torch.manual_seed(0)
    ae = AutoEncoder(AutoEncoderParams(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=16))
    ae_path = tmp_path / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, str(ae_path))
    model = Flux(FluxParams(**{**demo_data.FLUX_TINY, "in_channels": 64, "out_channels": 64}))
    flux_path = tmp_path / "flux.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(flux_path))

    files = dict(demo_files, flux_path=str(flux_path), ae_path=str(ae_path))
    cfg = config_file(tmp_path, files, max_train_steps=2, apply_t5_attn_mask=True, sample_every=2,
                      sample_steps=2, caption_dropout_rate=0.5)
    final = train.main([cfg])
    samples = sorted((final.parent / "samples").glob("step000002_*.png"))
    assert len(samples) == 4
    from PIL import Image

    assert Image.open(samples[0]).size == (16, 16)  # decoded back to the training resolution
    assert all(math.isfinite(x) for x in losses_of(final.parent))
