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
import random
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
import data
import distributed
import families
import lora
import losses
import metrics
import sample
import training
from activations import offload_activations
from config import DEFAULTS, DTYPES, ConfigError, format_config, load_config
from metrics import MetricsLog
from models.layers import set_kernels


class TrainingError(RuntimeError):
    """The run cannot go on (a NaN loss, say); the last good checkpoint is untouched."""


# --- the pieces the loop uses -----------------------------------------------------------------


def load_batch(dataset, indices: list[int], device) -> dict:
    """Stack cached items into a batch on the device (tests wrap this to inject bad data)."""
    batch = cache.collate([dataset[i] for i in indices])
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def drop_captions(batch: dict, empty: dict, rate: float, generator: torch.Generator, live_text=None) -> dict:
    """Replace each sample's text tensors by the empty caption's with probability `rate`
    (kohya's caption_dropout_rate): the model also learns the unconditional prediction that
    classifier-free guidance (`--l` in prompts) needs."""
    if rate <= 0 and live_text is None:
        return batch
    drop = torch.rand(len(batch["latent"]), generator=generator) < rate  # drawn every step: resume-safe
    if live_text is not None:  # text encoders that train: the captions ("" if dropped) through them now
        return {**batch, **live_text(["" if d else c for d, c in zip(drop.tolist(), batch["caption"])])}
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
            per_level[s].append(objective.loss(out, x0, noised, mask=batch.get("mask"))[0].item())
    model.train(was_training)
    means = {f"{s:.1f}": sum(v) / len(v) for s, v in per_level.items()}
    return sum(means.values()) / len(means), means


def sample_images(run: "Run", step: int) -> list[Path]:
    """Samples through the model as it is being trained (LoRA active), saved as PNGs. The
    latents first, then the decoder visits the device for the decodes (tiled when a whole
    decode would raise the run's peak, vae_tile_size=-1)."""
    model, codec = run.prepared.model, run.data.codec
    was_training = model.training
    model.eval()
    latents = []
    for prompt in run.data.prompts:
        cond = run.family.sample_conditioning(batch_text(run.data.text_cache, prompt.prompt), prompt, run.device)
        neg = None
        if prompt.cfg_scale != 1.0:
            neg = run.family.sample_conditioning(batch_text(run.data.text_cache, prompt.negative), prompt, run.device)
        latents.append(sample.generate_latent(run.family, model, codec, prompt, cond, neg))
    images = sample.decode_images(codec, latents, run.device, run.cfg["vae_tile_size"], headroom(run.device))
    paths = []
    for i, (prompt, image) in enumerate(zip(run.data.prompts, images)):
        path = run.run_dir / "samples" / f"step{step:06d}_{i:02d}.png"
        run.world.on_main(sample.save_image, image, path, prompt, {"step": step})
        paths.append(path)
    grid = sample.image_grid(images, [p.prompt for p in run.data.prompts])  # every prompt of this step
    run.world.on_main(sample.save_image, grid, run.run_dir / "samples" / "grids" / f"step{step:06d}.png",
                      run.data.prompts[0], {"step": step})
    if run.metrics is not None:
        run.metrics.image("samples", grid, step)
    model.train(was_training)
    return paths


def headroom(device):
    """Bytes a decode may take without raising the run's peak so far (CUDA)."""
    if device.type != "cuda":
        return None
    return lambda: max(torch.cuda.max_memory_allocated(device) - torch.cuda.memory_allocated(device), 0)


def batch_text(text_cache, caption: str) -> dict:
    return {k: v.unsqueeze(0) for k, v in text_cache.load(caption).items()}


class RunStopped(Exception):
    """Ctrl-C or SIGTERM ended the run (after saving, when it came during the loop). `code` is
    the exit status schedulers expect: 130 for SIGINT, 143 for SIGTERM."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.code = 128 + signum


class StopRequests:
    """Ctrl-C and SIGTERM: before the loop (caching, loading) they stop at once; in the loop
    they ask it to save at the next step boundary and end (a second Ctrl-C stops at once).
    Used as a context manager; the previous handlers come back on exit."""

    def __init__(self, world: distributed.World | None = None):
        self.signum: int | None = None  # the signal that asked the loop to stop
        self.in_loop, self.world = False, world or distributed.World()
        self.previous = {}

    def __enter__(self) -> "StopRequests":
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if not self.in_loop or self.signum is not None:
            raise RunStopped(signum, f"{name}: stopped before the first training step; nothing was trained")
        self.signum = signum
        print(f"\n{name}: saving at the end of this step, then exiting")

    @property
    def requested(self) -> bool:
        self.signum = self.world.agreed_signal(self.signum)  # several GPUs: any one's request, on all of them
        return self.signum is not None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA GPU is visible; use device='cpu' or 'auto'")
    return torch.device(name)


def peak_memory_gb(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


# --- main --------------------------------------------------------------------------------------


USAGE = """usage: python train.py CONFIG [--key=value ...] [--plan] [--debug]
       torchrun --nproc_per_node N train.py CONFIG [--key=value ...]     several GPUs (README)

  CONFIG         a config file: Python assignments that differ from config.py's defaults
  --key=value    override one setting (every key and its default is in config.py)
  --plan         print where GPU memory goes, without loading a weight or needing a GPU
  --debug        show the traceback of an error

  python train.py configs/demo.py                        a tiny model on CPU, no downloads
  python train.py configs/flux_12gb.py --dataset_dir=data/me --instance_prompt=ohwx
  python train.py configs/flux_12gb.py --resume=latest   continue after a stop
"""


def parse_args(argv: list[str]) -> tuple[str | None, list[str], bool]:
    """(config path or None, --key=value overrides, --plan). The config path comes first;
    anything else that is not --key=value is an error."""
    plan_only = "--plan" in argv
    argv = [a for a in argv if a not in ("--plan", "--debug")]
    config_path = argv[0] if argv and not argv[0].startswith("--") else None
    rest = argv[1:] if config_path is not None else argv
    stray = [a for a in rest if not a.startswith("--")]
    if stray:
        where = "put the config file first" if config_path is None or rest.index(stray[0]) else ""
        raise ConfigError(f"unexpected argument {stray[0]!r}: overrides look like --key=value"
                          + (f"; {where}" if where else "") + " (python train.py --help)")
    return config_path, rest, plan_only


def main(argv=None) -> Path:
    """Train (or plan, with --plan) from a command line; returns the final file (the plan's
    numbers). A stop request raises RunStopped after saving."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(USAGE, end="")
        raise SystemExit(0)
    config_path, overrides, plan_only = parse_args(argv)
    with distributed.quiet():  # under torchrun the first process prints, the others report errors only
        # all config errors surface here; the plan reads no files, so they need not exist yet
        cfg = load_config(config_path, overrides, check_files=not plan_only)
        if plan_only:
            import plan

            return plan.main(cfg)
        return train(cfg)


# --- the phases --------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything the loop reads and changes, in one place."""

    cfg: dict
    family: families.Family
    params: object
    device: torch.device
    run_dir: Path
    data: data.Data
    prepared: training.Prepared
    opt: training.Optimization
    objective: object
    order: data.DataOrder
    generator: torch.Generator
    metrics: MetricsLog | None = None
    step: int = 0
    started_at: float = 0.0  # when training began (kept across resumes)
    session_id: int = 0  # kohya's ss_session_id: a random number per process
    identity: dict | None = None  # model file and dataset fingerprint (run_identity)
    world: distributed.World = distributed.World()  # the processes torchrun started (distributed.py)


def check_model_settings(family, params, cfg: dict) -> None:
    """Swap counts and LoRA targets (block lists, group ranks), checked on a meta skeleton of
    the model (no memory) before anything loads."""
    import blockswap

    with torch.device("meta"):
        skeleton = family.build(params)
    try:
        blockswap.check_counts(family.blocks(skeleton), family.swap_counts(skeleton, cfg))
        if cfg["train_mode"] == "lora":
            family.lora_targets(skeleton, cfg)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def build_run(cfg: dict, family, sd: dict, params, world: distributed.World, run_dir: Path, cached: data.Data) -> Run:
    """Phases 3 and 4: the denoiser in host memory (the file memory-mapped), what trains, swap
    placement (or FSDP's shards), then the optimizer, schedule, fused step and EMA."""
    model = training.load_network(family, cfg, sd, distributed.load_dtype(world, sd, DTYPES[cfg["dtype"]]))
    family = family.for_network(model)  # the run's family knows the network's shapes (LoRA file names)
    prepared = training.prepare(model, family, cfg, world.device, shard=distributed.sharder(world, cfg),
                                text_networks=cached.text_networks)
    if prepared.swap is not None:
        print(prepared.swap.describe())
    opt = training.build_optimization(prepared.trainable, cfg, seed=cfg["seed"],
                                      lr_multipliers=training.lr_multipliers(family, cfg, prepared.trainable), world=world)
    order = data.DataOrder([(b.members, b.batch_size) for b in cached.buckets], cfg["seed"])  # global batches
    return Run(cfg, family, params, world.device, run_dir, cached, prepared, opt, family.objective(cfg), order,
               torch.Generator().manual_seed(cfg["seed"]), world=world)


def resume(run: Run, resume_dir: Path | None) -> None:
    """Phase 5: trainable weights, optimizer, schedule, EMA, RNG and data position from a state.
    The learning rate and schedule length come from the current config."""
    if resume_dir is None:
        return
    extra, info = distributed.load_state(run.world, resume_dir, run.prepared, run.opt)  # weights, optimizer, EMA
    scheduler = run.opt.scheduler
    base_lrs = list(scheduler.base_lrs)  # this config's learning rates, per group
    scheduler.load_state_dict(extra["scheduler"])  # the step count (and the saved base rates) come back
    scheduler.base_lrs = base_lrs
    rates = [base * factor(scheduler.last_epoch) for base, factor in zip(base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(run.opt.optimizer.param_groups, rates):  # the rate of the next step
        group["lr"] = lr
    scheduler._last_lr = [group["lr"] for group in run.opt.optimizer.param_groups]
    if run.opt.scaler is not None and info.get("loss_scaler"):
        run.opt.scaler.load_state_dict(info["loss_scaler"])
    distributed.restore_rng(run.world, extra["rng"], run.generator)
    run.order.load(info["data_order"])
    run.step = info["step"]
    run.started_at = info.get("training_started_at", run.started_at)
    print(f"resumed from {resume_dir} at step {run.step}")


def print_arithmetic(run: Run) -> None:
    """Phase 6's preamble: the settings that differ from the defaults and the step arithmetic."""
    cfg = run.cfg
    changed = {k: v for k, v in cfg.items() if v != DEFAULTS[k]}
    print(f"config (differences from the defaults; all of it is in {run.run_dir / 'config.py'}):")
    print(format_config(changed), end="")
    print(data.arithmetic(run.data, run.order, cfg))  # per dataset section and for the whole; images left out
    print(run.world.batch_note(cfg), end="")  # several GPUs: what batch_size and learning_rate mean there
    print("\n".join(training.describe_trainable(run.prepared, run.family, cfg)))
    n_trainable = sum(p.numel() for p in run.prepared.trainable.values() if p.requires_grad)
    held_out = len(run.data.val) if run.data.val is not None else 0
    print(f"training {n_trainable:,} parameters ({cfg['train_mode']}); {data.schedule(cfg)}, "
          f"validating every {cfg['validate_every']} ({held_out} held-out images)")


def lora_metadata(run: Run) -> dict[str, str]:
    cfg, family = run.cfg, run.family
    network_args = {k: cfg[k] for k in lora.NETWORK_CONFIG_KEYS + family.lora_config_keys}
    # kohya counts epochs from 1
    return lora.kohya_metadata(public_config(cfg), run.params, family.lora_metadata(cfg, run.params), network_args,
                               step=run.step, epoch=run.order.epoch + 1, run=run_facts(run))


def run_facts(run: Run) -> dict:
    """What kohya records about a run besides its settings (train_network.py's metadata)."""
    cfg, order = run.cfg, run.order
    updates_per_epoch = max(1, -(-order.batches_per_epoch // cfg["gradient_accumulation_steps"]))
    optimizer = type(run.opt.optimizer)
    facts = {
        "session_id": run.session_id,
        "training_started_at": run.started_at,
        "num_train_images": order.num_items,  # images x repeats, as kohya counts them
        "num_validation_images": len(run.data.val) if run.data.val is not None else 0,
        "num_batches_per_epoch": order.batches_per_epoch,
        "num_epochs": -(-cfg["max_train_steps"] // updates_per_epoch),
        "total_batch_size": cfg["batch_size"] * run.world.size * cfg["gradient_accumulation_steps"],
        "optimizer": f"{optimizer.__module__}.{optimizer.__name__}",
        "sd_model_name": Path(cfg["model_path"]).name,
        **data.dataset_facts(run.data, cfg),  # folders, tag frequency, buckets
    }
    if cfg["ae_path"]:
        facts["vae_name"] = Path(cfg["ae_path"]).name
    return facts


def save(run: Run) -> None:
    """The LoRA step file (and its EMA twin) and a resumable state."""
    cfg, step = run.cfg, run.step
    network, ema = run.prepared.network, run.opt.ema
    if run.prepared.swap is not None:
        run.prepared.swap.synchronize()  # swapped weights are read on the host below
    if network is not None and run.world.main:  # the first process writes files
        meta = lora_metadata(run)
        save_dtype = DTYPES[cfg["save_dtype"]]
        lora.save_lora(network, run.run_dir / f"{cfg['run_name']}_step{step:06d}.safetensors", meta, save_dtype,
                       run.family, cfg["lora_format"])
        if ema is not None:
            with ema.swapped(run.opt.params):
                lora.save_lora(network, run.run_dir / f"{cfg['run_name']}_step{step:06d}_ema.safetensors", meta,
                               save_dtype, run.family, cfg["lora_format"])
    info = {"data_order": run.order.state(), "rng": checkpoint.rng_state(run.generator), "config": cfg,
            "identity": run.identity, "training_started_at": run.started_at,
            "loss_scaler": run.opt.scaler.state_dict() if run.opt.scaler is not None else None}
    distributed.save_state(run.world, run.run_dir, step, run.prepared, run.opt, info, cfg["keep_last"])


def last_good_state(run: Run) -> str:
    dirs = checkpoint.state_dirs(run.run_dir)
    return f"the last good state is {dirs[-1]}" if dirs else "no state had been saved yet"


def train_step(run: Run, bins: losses.LossBins) -> dict:
    """One optimizer step over `gradient_accumulation_steps` micro-batches; returns its record."""
    cfg, data = run.cfg, run.data
    step_loss = 0.0
    for _ in range(cfg["gradient_accumulation_steps"]):
        indices = [(i, run.order.epoch) for i in run.order.next_batch()]  # (sample, epoch): its flip and caption
        # several GPUs: this one's rows of the global batch, the others' zeros (distributed.World.batch)
        batch = drop_captions(run.world.batch(load_batch, data.train, indices, run.device), data.empty_caption,
                              cfg["caption_dropout_rate"], run.generator, data.live_text)
        with offload_activations(cfg["offload_activations"], pin_memory=cfg["pin_memory"]):
            loss, per_sample, noised = training.training_loss(run.family, run.objective, run.prepared.model, batch,
                                                              cfg, run.generator)
        if not torch.isfinite(loss):  # a host sync, once per micro-batch
            raise TrainingError(
                f"loss is {loss.item()} at step {run.step + 1} (images {batch['caption']}, noise levels "
                f"{noised.level.tolist()}). Nothing was saved; {last_good_state(run)}. "
                "Lower learning_rate, use dtype='bf16' rather than fp16, or check the data.")
        training.backward(run.opt, loss / cfg["gradient_accumulation_steps"])  # fused: the weights update in here
        step_loss += loss.item() / cfg["gradient_accumulation_steps"]
        bins.add(per_sample.detach(), noised.level)  # stays on the device: no extra sync
    grad_norm = training.close_gradients(run.opt, cfg)
    if not torch.isfinite(grad_norm) and not run.opt.skipped:  # fp16 overflows lower the loss scale instead
        raise TrainingError(f"gradient norm is {grad_norm.item()} at step {run.step + 1}; nothing was saved; "
                            f"{last_good_state(run)}. Lower learning_rate or check the data.")
    lr = run.opt.scheduler.get_last_lr()[0]
    training.apply_step(run.opt, run.step + 1, run.prepared.swap)
    run.step += 1
    record = {"step": run.step, "epoch": run.order.epoch, "loss": step_loss, "lr": lr, "grad_norm": grad_norm.item(),
              **training.block_grad_norms(run.prepared)}
    if run.opt.scaler is not None:
        record["loss_scale"] = run.opt.scaler.scale  # the scale the next step uses
    return record


def after_step(run: Run, record: dict, bins: losses.LossBins, stop: StopRequests) -> None:
    """Validation, metrics, samples and checkpoints of the step just done."""
    cfg, step = run.cfg, run.step
    last = step == cfg["max_train_steps"]
    if run.data.val is not None and cfg["validate_every"] and step % cfg["validate_every"] == 0:
        record["val_loss"], record["val_loss_by_sigma"] = validation_loss(run, list(range(len(run.data.val))))
    if step % 10 == 0 or last or stop.requested:
        record["loss_by_sigma"] = bins.summary()
        bins.reset()
    if step % cfg["log_every"] == 0 or last or stop.requested or "val_loss" in record or "loss_by_sigma" in record:
        run.metrics.log(record)
    epoch = run.order.finished_epoch()  # 0 unless the step just done ended an epoch
    sampling = run.data.prompts and (cfg["sample_every"] or cfg["sample_every_n_epochs"])
    if sampling and (data.due(step, cfg["sample_every"]) or last or data.due(epoch, cfg["sample_every_n_epochs"])):
        sample_images(run, step)
    if data.due(step, cfg["save_every"]) or last or stop.requested or data.due(epoch, cfg["save_every_n_epochs"]):
        save(run)
        run.metrics.plot()


def loop(run: Run, stop: StopRequests) -> None:
    """Phase 6: steps until max_train_steps or a stop request."""
    cfg = run.cfg
    if run.data.prompts and cfg["sample_at_start"] and run.step == 0:
        sample_images(run, 0)
    bins = losses.LossBins()
    bar = tqdm(total=cfg["max_train_steps"], initial=run.step, dynamic_ncols=True, disable=not run.world.main)
    start, first = time.perf_counter(), run.step
    stop.in_loop = True
    while run.step < cfg["max_train_steps"] and not stop.requested:
        record = train_step(run, bins)
        record["s_per_it"] = (time.perf_counter() - start) / max(run.step - first, 1)
        record["peak_mem_gb"] = peak_memory_gb(run.device)
        after_step(run, record, bins, stop)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", mem=f"{record['peak_mem_gb']:.1f}G")
        bar.update(1)
    stop.in_loop = False
    bar.close()


def train(cfg: dict) -> Path:
    """The whole run, in phases. Ctrl-C or SIGTERM during the loop saves at the step boundary
    and raises RunStopped (exit status 130 / 143); before the loop it stops at once."""
    family = families.get(cfg["model_family"])
    world = distributed.init(cfg, pick_device(cfg["device"]))  # torchrun's processes; refuses what cannot run
    set_kernels(cfg["kernels"])
    torch.manual_seed(cfg["seed"])
    run_dir = Path(cfg["output_dir"]) / cfg["run_name"]
    world.on_main(checkpoint.claim_run_dir, run_dir, cfg["run_name"], cfg["resume"], cfg["overwrite"])  # first
    resume_dir = checkpoint.find_resume_dir(run_dir, cfg["resume"])
    with StopRequests(world) as stop:
        # 1. checks that need files but no model
        sd = family.read_checkpoint(cfg["model_path"], cfg)  # memory-mapped: no data read yet
        params = family.params(sd, cfg)
        check_model_settings(family, params, cfg)
        # buckets.json (rank 0) and the bucket table, before any model loads
        items = data.plan_data(cfg, family, run_dir if world.main else None, world.size)
        identity = checkpoint.run_identity(cfg, items.fingerprint, world.size)
        if resume_dir is not None:
            checkpoint.check_resume(resume_dir, cfg, family.lora_config_keys + family.trained_config_keys, identity)
        # 2. data and caches
        cached = data.load_data(cfg, family, params, world.device, DTYPES[cfg["dtype"]], items, world)
        # 3, 4. the denoiser, what trains, the optimizer
        world.same_rng()  # every GPU draws alike from here, whatever its caching share drew
        run = build_run(cfg, family, sd, params, world, run_dir, cached)
        run.identity, run.session_id = identity, random.randint(0, 2**32)
        del sd
        # 5. resume
        run.started_at = time.time()
        resume(run, resume_dir)
        world.on_main(atomic.write_text, run_dir / "config.py", format_config(cfg))
        run.metrics = MetricsLog(run_dir, resume_step=run.step, tensorboard=cfg["tensorboard"], write=world.main)
        print_arithmetic(run)
        # 6. the loop
        loop(run, stop)
    run.metrics.plot()
    run.metrics.close()
    if stop.requested:
        metrics.print_summary(run, None)
        raise RunStopped(stop.signum, f"stopped at step {run.step} ({signal.Signals(stop.signum).name}); the state "
                                      f"is saved: continue with --resume=latest")
    # 7. finish
    return finish(run)


def finish(run: Run) -> Path:
    """The final file next to the step files (and its EMA twin), and how to use it."""
    cfg = run.cfg
    path = run.run_dir / f"{cfg['run_name']}.safetensors"
    if run.prepared.swap is not None:
        run.prepared.swap.synchronize()  # swapped weights are read on the host below
    write_final(run, path)
    if run.opt.ema is not None:
        with run.opt.ema.swapped(run.opt.params):
            write_final(run, path.with_name(f"{cfg['run_name']}_ema.safetensors"))
    metrics.print_summary(run, path)
    return path


def write_final(run: Run, path: Path) -> None:
    """The LoRA file, or for full fine-tuning the model in the original layout."""
    save_dtype = DTYPES[run.cfg["save_dtype"]]
    if run.prepared.network is not None:
        run.world.on_main(lora.save_lora, run.prepared.network, path, lora_metadata(run), save_dtype, run.family,
                          run.cfg["lora_format"])
        return
    distributed.write_model(run.world, run.prepared.model.state_dict(), path,
                            {"trainer_config": json.dumps(public_config(run.cfg), default=str)}, save_dtype)


def public_config(cfg: dict) -> dict:
    """The config as it goes into files others may read: paths cut to their base names (kohya
    writes no local paths either)."""
    from config import PATH_KEYS

    keys = PATH_KEYS + ("cache_dir", "output_dir", "sample_prompts", "clip_tokenizer", "clip_g_tokenizer", "t5_tokenizer",
                        "resume", "mask_dir", "image_dir", "conditioning_data_dir")  # the last two: kohya names
    out = {k: (Path(v).name if k in keys and isinstance(v, str) and v else v) for k, v in cfg.items()}
    return out | {"datasets": [public_config(section) for section in cfg.get("datasets", [])]}  # their folders too


USER_ERRORS = (ConfigError, checkpoint.RunFolderError, TrainingError, FileNotFoundError, ValueError, OSError,
               distributed.OtherRankFailed)


def run_cli() -> int:
    """The command line: errors a user can cause are one or two lines (--debug: the traceback)."""
    debug = "--debug" in sys.argv
    try:
        main()
    except RunStopped as stopped:
        print(stopped, file=sys.stderr)
        return stopped.code
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"error{distributed.rank_label()}: {error}", file=sys.stderr)  # under torchrun: which process
        print("(--debug shows the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_cli())
