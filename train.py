"""Train a LoRA (or the whole model) on a diffusion model: FLUX.1 today, the family a config names.

    python train.py configs/flux_24gb.py [--key=value ...]
    python train.py configs/demo.py          # a tiny model on CPU, no downloads
    python train.py CONFIG --plan            # device memory plan, no weights, no GPU

Read `train()` top to bottom; it runs named phases:
  1. checks that need files but no model (dataset, prompts, the model's shapes, swap counts)
  2. data: latent and text caches on disk; the encoders leave the device after
  3. the denoiser and what trains (training.py, through the family in families/)
  4. optimizer, schedule, fused step, EMA (training.py)
  5. resume
  6. the loop: loss, backward, step; validation, samples, checkpoints
  7. finish: the final file
"""
import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import atomic
import cache
import checkpoint
import families
import lora
import losses
import sample
import training
from activations import offload_activations
from config import DEFAULTS, DTYPES, ConfigError, format_config, load_config
from metrics import MetricsLog
from models.layers import set_kernels


class TrainingError(RuntimeError):
    """The run cannot go on (a NaN loss, say); the last good checkpoint is untouched."""


# --- the pieces the loop uses -----------------------------------------------------------------


class DataOrder:
    """Which items form each batch: a seeded permutation per epoch, walked in batch-size steps.
    (epoch, position) is all that resume needs to continue with the same batches."""

    def __init__(self, num_items: int, batch_size: int, seed: int):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.epoch, self.position = 0, 0
        self.batches_per_epoch = num_items // batch_size  # the tail that does not fill a batch waits for the next epoch

    def next_batch(self) -> list[int]:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_items, generator=generator).tolist()
        start = self.position * self.batch_size
        self.position += 1
        return order[start : start + self.batch_size]

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


def load_batch(dataset, indices: list[int], device) -> dict:
    """Stack cached items into a batch on the device (tests wrap this to inject bad data)."""
    batch = cache.collate([dataset[i] for i in indices])
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def drop_captions(batch: dict, empty: dict, rate: float, generator: torch.Generator) -> dict:
    """Replace each sample's text tensors by the empty caption's with probability `rate`
    (kohya's caption_dropout_rate): the model also learns the unconditional prediction that
    classifier-free guidance (`--l` in prompts) needs."""
    if rate <= 0:
        return batch
    drop = torch.rand(len(batch["latent"]), generator=generator) < rate  # drawn every step: resume-safe
    out = dict(batch)
    for key, value in empty.items():
        where = drop.to(value.device).view(-1, *[1] * value.ndim)  # (B, 1, ...) over a per-caption tensor
        out[key] = torch.where(where, value.unsqueeze(0).to(batch[key].dtype), batch[key])
    return out


VALIDATION_LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)


@torch.no_grad()
def validation_loss(run: "Run", indices: list[int]) -> tuple[float, dict]:
    """Mean loss on fixed images at fixed noise levels with fixed noise: a curve that rises
    when the model over-fits. Returns the mean and the mean per noise level."""
    model, objective = run.prepared.model, run.objective
    was_training = model.training
    model.eval()
    per_level = {s: [] for s in VALIDATION_LEVELS}
    for i in indices:
        batch = load_batch(run.data.val, [i], run.device)
        x0 = batch["latent"].float()
        generator = torch.Generator().manual_seed(run.cfg["seed"] + i)
        for s in VALIDATION_LEVELS:
            noise = torch.randn(x0.shape, generator=generator).to(run.device)
            noised = objective.noised_at(x0, noise, s)
            out = run.family.predict(model, noised.x_t, noised.t, run.family.conditioning(batch, run.cfg))
            per_level[s].append(objective.loss(out, x0, noised)[0].item())
    model.train(was_training)
    means = {f"{s:.1f}": sum(v) / len(v) for s, v in per_level.items()}
    return sum(means.values()) / len(means), means


def sample_images(run: "Run", step: int) -> list[Path]:
    """Samples through the model as it is being trained (LoRA active), saved as PNGs. The
    decoder visits the device only for this."""
    model, codec = run.prepared.model, run.data.codec
    was_training = model.training
    model.eval()
    codec.to(run.device)
    paths = []
    for i, prompt in enumerate(run.data.prompts):
        cond = run.family.sample_conditioning(batch_text(run.data.text_cache, prompt.prompt), prompt, run.device)
        neg = None
        if prompt.cfg_scale != 1.0:
            neg = run.family.sample_conditioning(batch_text(run.data.text_cache, prompt.negative), prompt, run.device)
        image = sample.generate(run.family, model, codec, prompt, cond, neg)
        path = run.run_dir / "samples" / f"step{step:06d}_{i:02d}.png"
        sample.save_image(image, path, prompt, {"step": step})
        paths.append(path)
    codec.to("cpu")
    model.train(was_training)
    return paths


def batch_text(text_cache, caption: str) -> dict:
    return {k: v.unsqueeze(0) for k, v in text_cache.load(caption).items()}


def install_stop_handler() -> dict:
    """Ctrl-C or SIGTERM asks the loop to save at the next step boundary and exit.
    The previous handlers are kept in the returned dict for `restore_stop_handler`."""
    flag = {"stop": False, "previous": {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}}

    def handler(signum, frame):
        if flag["stop"]:  # a second Ctrl-C exits at once
            raise KeyboardInterrupt
        flag["stop"] = True
        print(f"\n{signal.Signals(signum).name}: saving at the end of this step, then exiting")

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return flag


def restore_stop_handler(flag: dict) -> None:
    for signum, previous in flag["previous"].items():
        signal.signal(signum, previous)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA GPU is visible; use device='cpu' or 'auto'")
    return torch.device(name)


def peak_memory_gb(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


# --- main --------------------------------------------------------------------------------------


def main(argv=None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    plan_only = "--plan" in argv
    argv = [a for a in argv if a != "--plan"]
    config_path = argv[0] if argv and not argv[0].startswith("--") else None
    # all config errors surface here; the plan reads no files, so they need not exist yet
    cfg = load_config(config_path, [a for a in argv if a.startswith("--")], check_files=not plan_only)
    if plan_only:
        import plan

        return plan.main(cfg)
    stop = install_stop_handler()
    try:
        return train(cfg, stop)
    finally:
        restore_stop_handler(stop)


# --- the phases --------------------------------------------------------------------------------


@dataclass
class Data:
    train: cache.CachedDataset
    val: cache.CachedDataset | None
    text_cache: cache.TextCache
    empty_caption: dict  # the text tensors of "", on the device (caption dropout)
    prompts: list  # sample.SamplePrompt
    codec: object  # models.VAECodec or PixelCodec, in host memory between samples
    skipped: list  # (image path, reason)


@dataclass
class Run:
    """Everything the loop reads and changes, in one place."""

    cfg: dict
    family: families.Family
    params: object
    device: torch.device
    run_dir: Path
    data: Data
    prepared: training.Prepared
    opt: training.Optimization
    objective: object
    order: DataOrder
    generator: torch.Generator
    metrics: MetricsLog | None = None
    step: int = 0
    started_at: float = 0.0


def split_items(cfg: dict) -> tuple[list, list]:
    """The dataset's items, with `validation_count` of them held out (seeded)."""
    items = cache.scan_dataset(cfg["dataset_dir"], caption_ext=cfg["caption_ext"],
                               instance_prompt=cfg["instance_prompt"] or None, repeats=1)
    val_count = cfg["validation_count"]
    if val_count >= len(items):
        raise ConfigError(f"validation_count={val_count} leaves no training images (found {len(items)})")
    split = torch.randperm(len(items), generator=torch.Generator().manual_seed(cfg["seed"])).tolist()
    return [items[i] for i in sorted(split[val_count:])], [items[i] for i in split[:val_count]]


def check_batch(cfg: dict, num_images: int) -> None:
    epoch_size = num_images * cfg["repeats"]
    if cfg["batch_size"] > epoch_size:
        raise ConfigError(f"batch_size={cfg['batch_size']} is larger than the dataset ({num_images} images x "
                          f"{cfg['repeats']} repeats = {epoch_size}); lower batch_size or raise repeats")


def check_swap(family, params, cfg: dict) -> None:
    """Blocks to swap per group, checked against the model's depth before anything loads."""
    with torch.device("meta"):  # no memory: only the block lists are needed
        skeleton = family.build(params)
    try:
        import blockswap

        blockswap.check_counts(family.blocks(skeleton), family.swap_counts(skeleton, cfg))
    except ValueError as error:
        raise ConfigError(str(error)) from None


def load_data(cfg: dict, family, params, device, dtype) -> Data:
    """Phase 2: every image encoded once by the codec and every caption by the text encoders,
    written to disk, keyed by everything that changes them; the encoders leave the device."""
    train_items, val_items = split_items(cfg)
    check_batch(cfg, len(train_items))
    prompts = sample.read_prompt_file(cfg["sample_prompts"], family.prompt_defaults(cfg, params)) \
        if cfg["sample_prompts"] else []
    prompts = sample.at_sizes(prompts, cfg["sample_sizes"])
    cache_dir = Path(cfg["cache_dir"] or Path(cfg["dataset_dir"]) / ".cache")
    codec = family.codec(cfg, dtype, device)
    latent_cache = cache.LatentCache(cache_dir / "latents", codec.identity, cfg["resolution"], cfg["crop"],
                                     dtype=torch.float32, hash_content=cfg["hash_images"], recache=cfg["recache"],
                                     on_error=cfg["on_bad_image"], seed=cfg["seed"])
    kept_train = latent_cache.build(train_items, codec.encode)
    skipped = list(latent_cache.skipped)
    kept_val = latent_cache.build(val_items, codec.encode) if val_items else []
    skipped += latent_cache.skipped if val_items else []
    codec.to("cpu")  # the decoder comes back for samples only
    text = family.text_encoder(cfg, params, dtype, device)
    text_cache = cache.TextCache(cache_dir / "text", text.identity, family.text_length(cfg, params),
                                 family.text_mask(cfg), recache=cfg["recache"])
    captions = [it.caption for it in kept_train + kept_val] + [p.prompt for p in prompts] + [p.negative for p in prompts]
    text_cache.build(sorted(set(captions + [""])), text.encode)  # "" for caption dropout and empty negatives
    del text  # T5-XXL is 9 GB in bf16: gone before the denoiser loads
    empty = {k: v.to(device) for k, v in text_cache.load("").items()}
    val = cache.CachedDataset(kept_val, latent_cache, text_cache) if kept_val else None
    return Data(cache.CachedDataset(kept_train, latent_cache, text_cache), val, text_cache, empty, prompts, codec,
                skipped)


def build_run(cfg: dict, family, sd: dict, params, device, run_dir: Path, data: Data) -> Run:
    """Phases 3 and 4: the denoiser in host memory (the file memory-mapped), what trains, swap
    placement, then the optimizer, schedule, fused step and EMA."""
    model = training.load_network(family, cfg, sd, DTYPES[cfg["dtype"]])
    prepared = training.prepare(model, family, cfg, device)
    if prepared.swap is not None:
        print(prepared.swap.describe())
    opt = training.build_optimization(prepared.trainable, cfg, seed=cfg["seed"],
                                      lr_multipliers=family.lr_multipliers(cfg, prepared.trainable))
    order = DataOrder(len(data.train) * cfg["repeats"], cfg["batch_size"], cfg["seed"])  # index % images
    return Run(cfg, family, params, device, run_dir, data, prepared, opt, family.objective(cfg), order,
               torch.Generator().manual_seed(cfg["seed"]))


def resume(run: Run) -> None:
    """Phase 5: trainable weights, optimizer, schedule, EMA, RNG and data position from a state."""
    resume_dir = checkpoint.find_resume_dir(run.run_dir, run.cfg["resume"])
    if resume_dir is None:
        return
    saved, extra, info = checkpoint.load_state(resume_dir)
    with torch.no_grad():
        for name, p in run.prepared.trainable.items():
            p.copy_(saved[name])
    optimizer = run.opt.fused or run.opt.optimizer
    optimizer.load_state_dict(extra["optimizer"])
    if run.opt.fused is None:
        import optim

        optim.restore_state_dtypes_(run.opt.optimizer, extra["optimizer"])
    run.opt.scheduler.load_state_dict(extra["scheduler"])
    if run.opt.ema is not None and extra["ema"] is not None:
        run.opt.ema.load_state_dict(extra["ema"])
    checkpoint.restore_rng(extra["rng"], run.generator)
    run.order.load(info["data_order"])
    run.step = info["step"]
    print(f"resumed from {resume_dir} at step {run.step}")


def print_arithmetic(run: Run) -> None:
    """Phase 6's preamble: the settings that differ from the defaults and the step arithmetic."""
    cfg = run.cfg
    per_step = cfg["batch_size"] * cfg["gradient_accumulation_steps"]
    steps_per_epoch = max(1, run.order.num_items // per_step)
    changed = {k: v for k, v in cfg.items() if v != DEFAULTS[k]}
    print(f"config (differences from the defaults; all of it is in {run.run_dir / 'config.py'}):")
    print(format_config(changed), end="")
    print(f"{len(run.data.train)} images x {cfg['repeats']} repeats / (batch {cfg['batch_size']} x accumulation "
          f"{cfg['gradient_accumulation_steps']}) = {steps_per_epoch} steps per epoch; "
          f"{cfg['max_train_steps']} steps = {cfg['max_train_steps'] / steps_per_epoch:.1f} epochs")
    n_trainable = sum(p.numel() for p in run.prepared.trainable.values())
    held_out = len(run.data.val) if run.data.val is not None else 0
    print(f"training {n_trainable:,} parameters ({cfg['train_mode']}); saving every {cfg['save_every']} steps, "
          f"sampling every {cfg['sample_every']}, validating every {cfg['validate_every']} ({held_out} held-out images)")
    if run.data.skipped:
        names = ", ".join(Path(path).name for path, _ in run.data.skipped)
        print(f"skipped {len(run.data.skipped)} unreadable image(s): {names}")


def lora_metadata(run: Run) -> dict[str, str]:
    cfg, family = run.cfg, run.family
    network_args = {k: cfg[k] for k in lora.NETWORK_CONFIG_KEYS + family.lora_config_keys}
    return lora.kohya_metadata(cfg, run.params, family.lora_metadata(cfg, run.params), network_args, step=run.step,
                               epoch=run.order.epoch, num_images=len(run.data.train),
                               training_started_at=run.started_at)


def save(run: Run) -> None:
    """The LoRA step file (and its EMA twin) and a resumable state."""
    cfg, step = run.cfg, run.step
    network, ema = run.prepared.network, run.opt.ema
    if run.prepared.swap is not None:
        run.prepared.swap.synchronize()  # swapped weights are read on the host below
    if network is not None:
        meta = lora_metadata(run)
        save_dtype = DTYPES[cfg["save_dtype"]]
        network.save(run.run_dir / f"{cfg['run_name']}_step{step:06d}.safetensors", meta, dtype=save_dtype)
        if ema is not None:
            with ema.swapped(run.opt.params):
                network.save(run.run_dir / f"{cfg['run_name']}_step{step:06d}_ema.safetensors", meta, dtype=save_dtype)
    info = {"data_order": run.order.state(), "rng": checkpoint.rng_state(run.generator), "config": cfg}
    checkpoint.save_state(run.run_dir, step, run.prepared.trainable, run.opt.fused or run.opt.optimizer,
                          run.opt.scheduler, ema, info, cfg["keep_last"])


def train_step(run: Run, bins: losses.LossBins) -> dict:
    """One optimizer step over `gradient_accumulation_steps` micro-batches; returns its record."""
    cfg, data = run.cfg, run.data
    step_loss = 0.0
    for _ in range(cfg["gradient_accumulation_steps"]):
        indices = [i % len(data.train) for i in run.order.next_batch()]
        batch = drop_captions(load_batch(data.train, indices, run.device), data.empty_caption,
                              cfg["caption_dropout_rate"], run.generator)
        with offload_activations(cfg["offload_activations"], pin_memory=cfg["pin_memory"]):
            loss, per_sample, noised = training.training_loss(run.family, run.objective, run.prepared.model, batch,
                                                              cfg, run.generator)
        if not torch.isfinite(loss):  # a host sync, once per micro-batch
            raise TrainingError(
                f"loss is {loss.item()} at step {run.step + 1} (images {batch['caption']}, noise levels "
                f"{noised.level.tolist()}). Nothing was saved; the last good state is in {run.run_dir / 'state'}. "
                "Lower learning_rate, use dtype='bf16' rather than fp16, or check the data.")
        (loss / cfg["gradient_accumulation_steps"]).backward()  # fused: the weights update in here
        step_loss += loss.item() / cfg["gradient_accumulation_steps"]
        bins.add(per_sample.detach(), noised.level)  # stays on the device: no extra sync
    grad_norm = training.close_gradients(run.opt, cfg)
    if not torch.isfinite(grad_norm):
        raise TrainingError(f"gradient norm is {grad_norm.item()} at step {run.step + 1}; nothing was saved. "
                            "Lower learning_rate or check the data.")
    lr = run.opt.scheduler.get_last_lr()[0]
    training.apply_step(run.opt, run.step + 1)
    run.step += 1
    return {"step": run.step, "epoch": run.order.epoch, "loss": step_loss, "lr": lr, "grad_norm": grad_norm.item()}


def after_step(run: Run, record: dict, bins: losses.LossBins, stop: dict) -> None:
    """Validation, metrics, samples and checkpoints of the step just done."""
    cfg, step = run.cfg, run.step
    last = step == cfg["max_train_steps"]
    if run.data.val is not None and cfg["validate_every"] and step % cfg["validate_every"] == 0:
        record["val_loss"], record["val_loss_by_sigma"] = validation_loss(run, list(range(len(run.data.val))))
    if step % 10 == 0 or last:
        record["loss_by_sigma"] = bins.summary()
        bins.reset()
    if step % cfg["log_every"] == 0 or "val_loss" in record or last:
        run.metrics.log(record)
    if run.data.prompts and cfg["sample_every"] and (step % cfg["sample_every"] == 0 or last):
        sample_images(run, step)
    if (cfg["save_every"] and step % cfg["save_every"] == 0) or last or stop["stop"]:
        save(run)
        run.metrics.plot()


def loop(run: Run, stop: dict) -> None:
    """Phase 6: steps until max_train_steps or a stop request."""
    cfg = run.cfg
    if run.data.prompts and cfg["sample_at_start"] and run.step == 0:
        sample_images(run, 0)
    bins = losses.LossBins()
    bar = tqdm(total=cfg["max_train_steps"], initial=run.step, dynamic_ncols=True)
    start, first = time.perf_counter(), run.step
    while run.step < cfg["max_train_steps"]:
        record = train_step(run, bins)
        record["s_per_it"] = (time.perf_counter() - start) / max(run.step - first, 1)
        record["peak_mem_gb"] = peak_memory_gb(run.device)
        after_step(run, record, bins, stop)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", mem=f"{record['peak_mem_gb']:.1f}G")
        bar.update(1)
        if stop["stop"]:
            print(f"stopped at step {run.step}; resume with --resume=latest")
            break
    bar.close()


def train(cfg: dict, stop: dict | None = None) -> Path:
    """The whole run. `stop["stop"]` turning True (Ctrl-C, SIGTERM) saves and ends it at the
    next step boundary."""
    stop = stop if stop is not None else {"stop": False}
    family = families.get(cfg["model_family"])
    device = pick_device(cfg["device"])
    dtype = DTYPES[cfg["dtype"]]
    set_kernels(cfg["kernels"])
    torch.manual_seed(cfg["seed"])
    run_dir = Path(cfg["output_dir"]) / cfg["run_name"]
    run_dir.mkdir(parents=True, exist_ok=True)

    # 1. checks that need files but no model
    sd = family.read_checkpoint(cfg["model_path"], cfg)  # memory-mapped: no data read yet
    params = family.params(sd, cfg)
    check_swap(family, params, cfg)
    # 2. data and caches
    data = load_data(cfg, family, params, device, dtype)
    # 3, 4. the denoiser, what trains, the optimizer
    run = build_run(cfg, family, sd, params, device, run_dir, data)
    del sd
    # 5. resume
    resume(run)
    atomic.write_text(run_dir / "config.py", format_config(cfg))
    run.metrics = MetricsLog(run_dir, resume_step=run.step)
    run.started_at = time.time()
    print_arithmetic(run)
    # 6. the loop
    loop(run, stop)
    # 7. finish
    final = finish(run)
    run.metrics.plot()
    return final


def finish(run: Run) -> Path:
    """The final file next to the step files, and how to use it."""
    cfg = run.cfg
    save_dtype = DTYPES[cfg["save_dtype"]]
    path = run.run_dir / f"{cfg['run_name']}.safetensors"
    if run.prepared.network is not None:
        run.prepared.network.save(path, lora_metadata(run), dtype=save_dtype)
        print(f"LoRA saved: {path} ({run.family.lora_usage(path)})")
        for note in run.family.lora_loader_notes(run.prepared.targets):
            print(f"  note: {note}")
    else:
        if run.prepared.swap is not None:
            run.prepared.swap.synchronize()
        model = run.prepared.model
        tensors = {k: v.detach().to(save_dtype).contiguous().cpu() for k, v in model.state_dict().items()}
        atomic.write_safetensors(tensors, path, {"trainer_config": json.dumps(cfg, default=str)})
        print(f"model saved: {path} (original {run.family.title} keys; loads wherever the original file does)")
    return path


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, FileNotFoundError, TrainingError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
