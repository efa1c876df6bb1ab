"""Train a LoRA (or the whole model) on FLUX.1.

    python train.py configs/flux_24gb.py [--key=value ...]
    python train.py configs/demo.py          # a tiny model on CPU, no downloads
    python train.py CONFIG --plan            # device memory plan, no weights, no GPU

Read top to bottom: config -> data and caches -> model and LoRA -> optimizer ->
resume -> the loop (loss, backward, step; validation, samples, checkpoints).
"""
import json
import math
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

import blockswap
import cache
import checkpoint
import fp8
import lora
import losses
import optim
import sample
from config import DEFAULTS, ConfigError, format_config, load_config
from metrics import MetricsLog
from models import flux, load_codec, load_text_encoder
from models.layers import set_kernels
from models.loading import load_state_dict

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


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


def conditioning(batch: dict) -> dict:
    return {k: batch[k] for k in ("t5", "clip_pooled", "t5_mask") if k in batch}


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


def training_loss(model, objective, batch: dict, generator: torch.Generator):
    """One forward pass: noise the cached latents at sampled levels and score the prediction.
    Noise and levels come from a CPU generator, so runs reproduce across devices and resumes."""
    x0 = batch["latent"].float()
    b, _, h, w = x0.shape
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    sigma = objective.sample_sigmas(b, flux.image_seq_len(h, w), generator=generator).to(x0.device)
    x_t = objective.noisy(x0, noise, sigma)
    out = flux.denoise(model, x_t, sigma, conditioning(batch), objective.guidance(b, x0.device, x0.dtype))
    loss, per_sample = objective.loss(out, x0, noise, sigma, x_t)
    return loss, per_sample, sigma


@torch.no_grad()
def validation_loss(model, objective, dataset, indices: list[int], device, seed: int) -> tuple[float, dict]:
    """Mean loss on fixed images at fixed noise levels with fixed noise: a curve that rises
    when the model over-fits. Returns the mean and the mean per noise level."""
    levels = (0.1, 0.3, 0.5, 0.7, 0.9)
    was_training = model.training
    model.eval()
    per_level = {s: [] for s in levels}
    for i in indices:
        batch = load_batch(dataset, [i], device)
        x0 = batch["latent"].float()
        generator = torch.Generator().manual_seed(seed + i)
        for s in levels:
            noise = torch.randn(x0.shape, generator=generator).to(device)
            sigma = torch.full((1,), s, device=device)
            x_t = objective.noisy(x0, noise, sigma)
            out = flux.denoise(model, x_t, sigma, conditioning(batch), objective.guidance(1, device, x0.dtype))
            per_level[s].append(objective.loss(out, x0, noise, sigma, x_t)[0].item())
    model.train(was_training)
    means = {f"{s:.1f}": sum(v) / len(v) for s, v in per_level.items()}
    return sum(means.values()) / len(means), means


def sample_images(model, codec, text_cache, prompts, run_dir: Path, step: int, device) -> list[Path]:
    """Samples through the model as it is being trained (LoRA active), saved as PNGs. The
    decoder visits the device only for this."""
    was_training = model.training
    model.eval()
    codec.to(device)
    paths = []
    for i, prompt in enumerate(prompts):
        cond = batch_text(text_cache, prompt.prompt, device)
        neg = batch_text(text_cache, prompt.negative, device) if prompt.cfg_scale != 1.0 else None
        image = sample.generate(model, codec, prompt, cond, neg)
        path = run_dir / "samples" / f"step{step:06d}_{i:02d}.png"
        sample.save_png(image, path, prompt, {"step": step})
        paths.append(path)
    codec.to("cpu")
    model.train(was_training)
    return paths


def batch_text(text_cache, caption: str, device) -> dict:
    return {k: v.unsqueeze(0).to(device) for k, v in text_cache.load(caption).items()}


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


def swap_counts(params, cfg: dict) -> dict[str, int]:
    """Blocks to swap per kind, checked against the model's depth before anything loads."""
    if cfg["blocks_to_swap"] <= 0 and cfg["double_blocks_to_swap"] <= 0 and cfg["single_blocks_to_swap"] <= 0:
        return {"double_blocks": 0, "single_blocks": 0}
    with torch.device("meta"):  # no memory: only the block lists are needed
        skeleton = flux.Flux(params)
    try:
        return blockswap.swap_counts(skeleton, cfg["blocks_to_swap"] or None, cfg["double_blocks_to_swap"],
                                     cfg["single_blocks_to_swap"])
    except ValueError as error:
        raise ConfigError(str(error)) from None


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


def train(cfg: dict, stop: dict | None = None) -> Path:
    """The whole run. `stop["stop"]` turning True (Ctrl-C, SIGTERM) saves and ends it at the
    next step boundary."""
    stop = stop if stop is not None else {"stop": False}
    device = pick_device(cfg["device"])
    dtype = DTYPES[cfg["dtype"]]
    set_kernels(cfg["kernels"])
    torch.manual_seed(cfg["seed"])
    run_dir = Path(cfg["output_dir"]) / cfg["run_name"]
    run_dir.mkdir(parents=True, exist_ok=True)

    # 1. Checks that need files but no model: the dataset, prompts, the model's shape -----------
    items = cache.scan_dataset(cfg["dataset_dir"], caption_ext=cfg["caption_ext"],
                               instance_prompt=cfg["instance_prompt"] or None, repeats=1)
    val_count = cfg["validation_count"]
    if val_count >= len(items):
        raise ConfigError(f"validation_count={val_count} leaves no training images (found {len(items)})")
    split = torch.randperm(len(items), generator=torch.Generator().manual_seed(cfg["seed"])).tolist()
    val_items = [items[i] for i in split[:val_count]]
    train_items = [items[i] for i in sorted(split[val_count:])]
    epoch_size = len(train_items) * cfg["repeats"]
    if cfg["batch_size"] > epoch_size:
        raise ConfigError(f"batch_size={cfg['batch_size']} is larger than the dataset ({len(train_items)} images x "
                          f"{cfg['repeats']} repeats = {epoch_size}); lower batch_size or raise repeats")
    flux_sd = load_state_dict(cfg["flux_path"], allow_pickle=cfg["allow_pickle"])  # memory-mapped: no data read yet
    params = flux.infer_params(flux_sd, **cfg["model_overrides"])
    prompt_defaults = sample.SamplePrompt(prompt="", width=cfg["resolution"], height=cfg["resolution"],
                                          steps=cfg["sample_steps"] if params.guidance_embed else 4,
                                          guidance=cfg["sample_guidance"], seed=cfg["seed"])
    prompts = sample.read_prompt_file(cfg["sample_prompts"], prompt_defaults) if cfg["sample_prompts"] else []
    max_length = cfg["t5_max_length"] or flux.default_t5_max_length(params)
    counts = swap_counts(params, cfg)

    # 2. Caches: latents and text embeddings on disk; the encoders leave the device after -------
    cache_dir = Path(cfg["cache_dir"] or Path(cfg["dataset_dir"]) / ".cache")
    codec = load_codec(cfg["ae_path"], dtype=dtype, device=device)
    latent_cache = cache.LatentCache(cache_dir / "latents", codec.identity, cfg["resolution"], cfg["crop"],
                                     dtype=torch.float32, hash_content=cfg["hash_images"], recache=cfg["recache"],
                                     on_error=cfg["on_bad_image"], seed=cfg["seed"])
    kept_train = latent_cache.build(train_items, codec.encode)
    skipped = list(latent_cache.skipped)
    kept_val = latent_cache.build(val_items, codec.encode) if val_items else []
    skipped += latent_cache.skipped if val_items else []
    codec.to("cpu")  # the decoder comes back for samples only
    text = load_text_encoder(cfg["clip_l_path"], cfg["t5_path"], cfg["clip_tokenizer"], cfg["t5_tokenizer"],
                             max_length=max_length, apply_mask=cfg["apply_t5_attn_mask"], dtype=dtype, device=device)
    text_cache = cache.TextCache(cache_dir / "text", text.identity, max_length, cfg["apply_t5_attn_mask"],
                                 recache=cfg["recache"])
    captions = [it.caption for it in kept_train + kept_val] + [p.prompt for p in prompts] + [p.negative for p in prompts]
    text_cache.build(sorted(set(captions + [""])), text.encode)  # "" for caption dropout and empty negatives
    del text  # T5-XXL is 9 GB in bf16: gone before the denoiser loads
    train_data = cache.CachedDataset(kept_train, latent_cache, text_cache)
    empty_caption = {k: v.to(device) for k, v in text_cache.load("").items()}
    val_data = cache.CachedDataset(kept_val, latent_cache, text_cache) if kept_val else None

    # 3. The denoiser, and what trains ----------------------------------------------------------
    # Built in host memory (the file stays memory-mapped); only what runs on the device moves there.
    if cfg["fp8_base"]:  # frozen block Linears as float8_e4m3fn (released fp8 files load as they are)
        model = fp8.load_flux_fp8(flux_sd, dtype=dtype, device="cpu", per_row=cfg["fp8_per_row"],
                                  **cfg["model_overrides"])
    else:
        model = flux.Flux.from_state_dict(flux_sd, dtype=dtype, device="cpu", **cfg["model_overrides"])
    del flux_sd
    model.gradient_checkpointing = cfg["gradient_checkpointing"]
    network, trainable = lora.setup_training(model, cfg, device)  # a LoRA network, or every weight
    swap = None
    if any(counts.values()):  # swapped blocks' big weights stay in host memory and stream in
        swap = blockswap.BlockSwap(model, device, double_blocks_to_swap=counts["double_blocks"],
                                   single_blocks_to_swap=counts["single_blocks"], mode=cfg["swap_mode"],
                                   pin_memory=cfg["pin_memory"])
        print(swap.describe())
    else:
        model.to(device)
    model.train()
    if network is not None:
        network.train()  # LoRA dropout follows the network's mode, not the model's
    n_trainable = sum(p.numel() for p in trainable.values())

    # 4. Optimizer, schedule, EMA ---------------------------------------------------------------
    optimizer = optim.build_optimizer(list(trainable.values()), cfg["optimizer"], lr=cfg["learning_rate"],
                                      weight_decay=cfg["weight_decay"], betas=tuple(cfg["betas"]), eps=cfg["eps"])
    scheduler = optim.build_scheduler(optimizer, cfg["lr_scheduler"], warmup_steps=cfg["lr_warmup_steps"],
                                      total_steps=cfg["max_train_steps"], end_lr_ratio=cfg["lr_end_ratio"],
                                      power=cfg["lr_power"])
    fused = optim.FusedBackwardStep(optimizer, max_grad_norm=0.0, seed=cfg["seed"],
                                    max_grad_norm_per_param=cfg["max_grad_norm_per_param"] or None,
                                    stochastic_rounding=cfg["stochastic_rounding"]) if cfg["fused_backward"] else None
    ema = optim.EMA(list(trainable.values()), decay=cfg["ema_decay"], update_every=cfg["ema_every"]) if cfg["ema_decay"] else None
    objective = losses.FlowMatching(
        timestep_sampling=cfg["timestep_sampling"], sigmoid_scale=cfg["sigmoid_scale"],
        discrete_flow_shift=cfg["discrete_flow_shift"], logit_mean=cfg["logit_mean"], logit_std=cfg["logit_std"],
        mode_scale=cfg["mode_scale"], model_prediction_type=cfg["model_prediction_type"], loss_type=cfg["loss_type"],
        huber_c=cfg["huber_c"], huber_schedule=cfg["huber_schedule"], guidance_scale=cfg["guidance_scale"])
    generator = torch.Generator().manual_seed(cfg["seed"])
    order = DataOrder(len(train_data) * cfg["repeats"], cfg["batch_size"], cfg["seed"])  # index % images

    # 5. Resume -----------------------------------------------------------------------------------
    step = 0
    resume_dir = checkpoint.find_resume_dir(run_dir, cfg["resume"])
    if resume_dir is not None:
        saved, extra, info = checkpoint.load_state(resume_dir)
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(saved[name])
        if fused is not None:
            fused.load_state_dict(extra["optimizer"])
        else:
            optimizer.load_state_dict(extra["optimizer"])
            optim.restore_state_dtypes_(optimizer, extra["optimizer"])
        scheduler.load_state_dict(extra["scheduler"])
        if ema is not None and extra["ema"] is not None:
            ema.load_state_dict(extra["ema"])
        checkpoint.restore_rng(extra["rng"], generator)
        order.load(info["data_order"])
        step = info["step"]
        print(f"resumed from {resume_dir} at step {step}")
    (run_dir / "config.py").write_text(format_config(cfg))
    metrics = MetricsLog(run_dir, resume_step=step)

    # 6. The step arithmetic, up front ------------------------------------------------------------
    per_step = cfg["batch_size"] * cfg["gradient_accumulation_steps"]
    steps_per_epoch = max(1, order.num_items // per_step)
    changed = {k: v for k, v in cfg.items() if v != DEFAULTS[k]}
    print(f"config (differences from the defaults; all of it is in {run_dir / 'config.py'}):")
    print(format_config(changed), end="")
    print(f"{len(train_data)} images x {cfg['repeats']} repeats / (batch {cfg['batch_size']} x accumulation "
          f"{cfg['gradient_accumulation_steps']}) = {steps_per_epoch} steps per epoch; "
          f"{cfg['max_train_steps']} steps = {cfg['max_train_steps'] / steps_per_epoch:.1f} epochs")
    print(f"training {n_trainable:,} parameters ({cfg['train_mode']}); saving every {cfg['save_every']} steps, "
          f"sampling every {cfg['sample_every']}, validating every {cfg['validate_every']} "
          f"({len(kept_val)} held-out images)")
    if skipped:
        names = ", ".join(Path(path).name for path, _ in skipped)
        print(f"skipped {len(skipped)} unreadable image(s): {names}")

    def metadata(step: int) -> dict[str, str]:
        return lora.kohya_metadata(cfg, params, flux.variant(params), step=step, epoch=order.epoch,
                                   num_images=len(train_data))

    def save(step: int) -> None:
        save_dtype = DTYPES[cfg["save_dtype"]]
        if network is not None:
            meta = metadata(step)
            network.save(run_dir / f"{cfg['run_name']}_step{step:06d}.safetensors", meta, dtype=save_dtype)
            if ema is not None:
                with ema.swapped(list(trainable.values())):
                    network.save(run_dir / f"{cfg['run_name']}_step{step:06d}_ema.safetensors", meta, dtype=save_dtype)
        info = {"data_order": order.state(), "rng": checkpoint.rng_state(generator), "config": cfg}
        checkpoint.save_state(run_dir, step, trainable, fused or optimizer, scheduler, ema, info, cfg["keep_last"])

    # 7. The loop ---------------------------------------------------------------------------------
    if prompts and cfg["sample_at_start"] and step == 0:
        sample_images(model, codec, text_cache, prompts, run_dir, 0, device)
    bins = losses.LossBins()
    bar = tqdm(total=cfg["max_train_steps"], initial=step, dynamic_ncols=True)
    start = time.perf_counter()
    while step < cfg["max_train_steps"]:
        step_loss = 0.0
        for _ in range(cfg["gradient_accumulation_steps"]):
            indices = [i % len(train_data) for i in order.next_batch()]
            batch = drop_captions(load_batch(train_data, indices, device), empty_caption,
                                  cfg["caption_dropout_rate"], generator)
            with blockswap.offload_activations(cfg["offload_activations"], pin_memory=cfg["pin_memory"]):
                loss, per_sample, sigma = training_loss(model, objective, batch, generator)
            if not torch.isfinite(loss):  # a host sync, once per micro-batch
                raise TrainingError(
                    f"loss is {loss.item()} at step {step + 1} (images {[batch['caption'][j] for j in range(len(indices))]}, "
                    f"noise levels {sigma.tolist()}). Nothing was saved; the last good state is in {run_dir / 'state'}. "
                    "Lower learning_rate, use dtype='bf16' rather than fp16, or check the data.")
            (loss / cfg["gradient_accumulation_steps"]).backward()  # fused: the weights update in here
            step_loss += loss.item() / cfg["gradient_accumulation_steps"]
            bins.add(per_sample.detach(), sigma)  # stays on the device: no extra sync
        if fused is not None:
            fused.step()  # closes the step the hooks took; the global norm is only measured
            grad_norm = fused.last_grad_norm
        else:
            grad_norm = optim.clip_grad_norm_(list(trainable.values()), cfg["max_grad_norm"] or float("inf"))
        if not torch.isfinite(grad_norm):
            raise TrainingError(f"gradient norm is {grad_norm.item()} at step {step + 1}; nothing was saved. "
                                "Lower learning_rate or check the data.")
        if fused is None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        if ema is not None:
            ema.update(step)

        lr = scheduler.get_last_lr()[0]
        record = {"step": step, "epoch": order.epoch, "loss": step_loss, "lr": lr, "grad_norm": grad_norm.item(),
                  "s_per_it": (time.perf_counter() - start) / max(step - bar.initial, 1),
                  "peak_mem_gb": peak_memory_gb(device)}
        if val_data is not None and cfg["validate_every"] and step % cfg["validate_every"] == 0:
            record["val_loss"], record["val_loss_by_sigma"] = validation_loss(
                model, objective, val_data, list(range(len(val_data))), device, cfg["seed"])
        if step % 10 == 0 or step == cfg["max_train_steps"]:
            record["loss_by_sigma"] = bins.summary()
            bins.reset()
        if step % cfg["log_every"] == 0 or "val_loss" in record:
            metrics.log(record)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", mem=f"{record['peak_mem_gb']:.1f}G")
        bar.update(1)

        last = step == cfg["max_train_steps"]
        if prompts and cfg["sample_every"] and (step % cfg["sample_every"] == 0 or last):
            sample_images(model, codec, text_cache, prompts, run_dir, step, device)
        if (cfg["save_every"] and step % cfg["save_every"] == 0) or last or stop["stop"]:
            save(step)
            metrics.plot()
        if stop["stop"]:
            print(f"stopped at step {step}; resume with --resume=latest")
            break
    bar.close()
    final = finish(cfg, run_dir, network, model, metadata(step) if network is not None else {})
    metrics.plot()
    return final


def finish(cfg, run_dir: Path, network, model, meta: dict[str, str]) -> Path:
    """The final file next to the step files, and how to use it."""
    save_dtype = DTYPES[cfg["save_dtype"]]
    path = run_dir / f"{cfg['run_name']}.safetensors"
    if network is not None:
        network.save(path, meta, dtype=save_dtype)
        print(f"LoRA saved: {path} (kohya keys; loads in ComfyUI 'Load LoRA' and diffusers "
              f"pipe.load_lora_weights('{path}'))")
    else:
        from safetensors.torch import save_file

        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().to(save_dtype).contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"trainer_config": json.dumps(cfg, default=str)})
        tmp.replace(path)
        print(f"model saved: {path} (original FLUX keys; loads wherever flux1-dev.safetensors does)")
    return path


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, FileNotFoundError, TrainingError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
