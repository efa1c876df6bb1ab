"""What trains, and one training step: the functions train.py and the memory plan both call,
so the plan cannot drift from training.

    network = load_network(family, cfg, sd)               # or family.build(params) on meta
    prepared = prepare(network, family, cfg, device)      # what trains, checkpointing, swap
    opt = build_optimization(prepared.trainable, cfg)     # optimizer, fused step, schedule, EMA
    loss, per_sample, noised = training_loss(family, objective, prepared.model, batch, cfg, generator)
    backward(opt, loss)                                   # loss.backward(), scaled for fp16
    grad_norm = close_gradients(opt, cfg)                 # unscale (fp16), clip (or close the fused step)
    apply_step(opt, step)                                  # optimizer step, schedule, EMA
"""
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import activations
import atomic
import blockswap
import distributed
import fp8
import lora
import losses
import optim
from config import DTYPES, warmup_steps
from models.loading import load_state_dict


# --- what trains -----------------------------------------------------------------------------------


@dataclass
class Prepared:
    model: nn.Module
    network: lora.LoRANetwork | None  # None for full fine-tuning
    trainable: dict[str, nn.Parameter]  # by name: the LoRA weights, or every weight of the model
    swap: blockswap.BlockSwap | None
    targets: dict[str, int]  # LoRA module path -> rank (empty for full fine-tuning)


def load_network(family, cfg: dict, sd: dict, dtype: torch.dtype) -> nn.Module:
    """The denoiser in host memory (the file stays memory-mapped; fp8 base if the config says).
    With fp8_base_cache, the fp8 weights come memory-mapped from a file of them, written there
    the first time (fp8_weight_file)."""
    if cfg["fp8_base"] and cfg["fp8_base_cache"]:
        sd = load_state_dict(fp8_weight_file(family, cfg, sd, dtype))
    return family.load(sd, cfg, dtype=dtype, device="cpu")


def fp8_weight_file(family, cfg: dict, sd: dict, dtype: torch.dtype) -> Path:
    """The network with its block weights quantized to fp8, as a checkpoint in fp8_base_cache
    (fp8 weights and `.weight_scale`s in the checkpoint's names: ComfyUI's scaled-fp8 layout,
    which loads as it is), keyed by the model file, fp8_per_row and dtype. Quantizing a bf16
    file leaves the fp8 weights in process memory (11 GiB for FLUX.1); read from this file they
    are pages of a memory-mapped file, which the OS can drop and read again: with swap_staging
    that is what a 16 GB machine needs."""
    source = Path(cfg["model_path"])
    stat = source.stat()
    key = f"{source.name}|{stat.st_size}|{stat.st_mtime_ns}|{cfg['fp8_per_row']}|{cfg['dtype']}"
    name = f"{source.name.split('.')[0]}-fp8-{hashlib.sha256(key.encode()).hexdigest()[:12]}.safetensors"
    path = Path(cfg["fp8_base_cache"]) / name
    if not path.exists():
        print(f"writing the fp8 weights once to {path} (read memory-mapped from now on)")
        tensors = {k: v.contiguous() for k, v in family.load(sd, cfg, dtype=dtype, device="cpu").state_dict().items()}
        atomic.write_safetensors(tensors, path, {"source": source.name, "key": key})
    return path


def choose_trainable(model: nn.Module, family, cfg: dict, device=None):
    """A LoRA network on the family's targets (train_mode "lora"; its fp32 weights on `device`)
    or every weight of the model ("full"). Returns (network or None, trainable by name, targets)."""
    model.requires_grad_(False)
    if cfg["train_mode"] == "full":
        model.requires_grad_(True)
        return None, dict(model.named_parameters()), {}
    targets = family.lora_targets(model, cfg)
    alphas = {path: network_alpha(cfg) for path in targets} | family.lora_alphas(cfg, targets)
    # LoRA weights train in lora_dtype (fp32 by default; bf16 with stochastically rounded updates)
    # whatever the base dtype; LoRAModule casts them to the input's dtype for the matmul.
    network = lora.LoRANetwork.inject(model, targets, alpha=alphas, dropout=cfg["network_dropout"],
                                      dtype=DTYPES[cfg["lora_dtype"]], device=device, prefix=family.lora_prefix)
    return network, dict(network.named_parameters()), targets


def network_alpha(cfg: dict) -> float:
    """alpha for scale alpha / rank: the config's, or the rank when it is 0 (scale 1; kohya's
    "alpha None or 0 means alpha = rank")."""
    return cfg["network_alpha"] or float(cfg["network_dim"])


def prepare(model: nn.Module, family, cfg: dict, device, host_device="cpu", allocate=None,
            on_trainable=None, shard=None) -> Prepared:
    """Set the network up as training runs it: what trains, gradient checkpointing of the
    family's blocks, token chunks of the feed-forwards (for every forward from now on, sampling
    included), block swap (or the whole model on `device`). `host_device`, `allocate` and
    `on_trainable(network, trainable)` (called before placement) let the memory plan run the
    same code on the meta device and label what it makes. `shard(model, groups)` (FSDP,
    distributed.py) replaces placement: each block sharded after its checkpointing, then the rest."""
    network, trainable, targets = choose_trainable(model, family, cfg, device)
    if on_trainable is not None:
        on_trainable(network, trainable)
    groups = family.blocks(model)
    activations.checkpoint_blocks([b for group in groups.values() for b in group], cfg["gradient_checkpointing"])
    activations.chunk_feedforward(cfg["feedforward_chunk"] if cfg["chunk_feedforward"] else 0)
    swap = None
    if shard is None:
        swap = place(model, family, cfg, device, cfg["swap_mode"], host_device, allocate)
    else:
        shard(model, groups)
        trainable = {name: p for name, p in model.named_parameters() if name in trainable}  # the sharded ones
    model.train()
    if network is not None:
        network.train()
    return Prepared(model, network, trainable, swap, targets)


def place(model: nn.Module, family, cfg: dict, device, mode: str, host_device="cpu",
          allocate=None) -> blockswap.BlockSwap | None:
    """The model on `device`, except the weights of the blocks the config swaps (training and
    sampling alike), which stay in host memory and stream in: some blocks of each group
    (blocks_to_swap with the family's split), or every block through one ring of swap_ring
    device slots; read through staging buffers with swap_staging."""
    counts = family.swap_counts(model, cfg)
    if not any(counts.values()) and not cfg["swap_ring"]:
        model.to(device)
        return None
    return blockswap.BlockSwap(model, family.blocks(model), counts, device, mode=mode, pin_memory=cfg["pin_memory"],
                               host_device=host_device, allocate=allocate, ring=cfg["swap_ring"],
                               staging=cfg["swap_staging"] and mode == "h2d_only")


# --- the text encoders during caching ----------------------------------------------------------------

TEXT_PLACEMENTS = ("device", "stream", "cpu")


def place_text_encoders(networks: dict[str, nn.Module], cfg: dict, device, host_device="cpu",
                        allocate=None) -> list[blockswap.BlockSwap]:
    """Put the text encoders where the config says while captions are encoded, within the
    device budget: text_encoder_fp8 stores their layers' Linear weights in fp8 (a released fp8
    T5 file stays its fp8 numbers); text_encoder_placement "device" moves them whole, "stream"
    keeps each encoder's layers in host memory and streams them through two device slots
    (blockswap, one way; with swap_staging read as loaded, without a pinned copy), "cpu" leaves
    them on the CPU. Returns the swaps (keep them alive)."""
    from models.text import encoder_blocks, fp8_linears

    placement, swaps = cfg["text_encoder_placement"], []
    for net in networks.values():
        blocks = encoder_blocks(net)
        if cfg["text_encoder_fp8"]:
            fp8.quantize_linears_(net, fp8_linears(net))
        if placement == "cpu":
            continue
        if placement == "stream" and len(blocks) > blockswap.MIN_RESIDENT:
            counts = {"layers": len(blocks) - blockswap.MIN_RESIDENT}
            swaps.append(blockswap.BlockSwap(net, {"layers": blocks}, counts, device, mode="h2d_only",
                                             pin_memory=cfg["pin_memory"], host_device=host_device, allocate=allocate,
                                             staging=cfg["swap_staging"]))
        else:
            net.to(device)
    return swaps


def text_encoder_load_device(cfg: dict, device):
    """Where a family loads its text encoders: straight onto the device when they run there in
    their own dtype, else into host memory (placed by place_text_encoders)."""
    whole_on_device = cfg["text_encoder_placement"] == "device" and not cfg["text_encoder_fp8"]
    return device if whole_on_device else "cpu"


# --- optimizer, schedule, fused step, EMA ------------------------------------------------------------


@dataclass
class Optimization:
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    fused: optim.FusedBackwardStep | None
    ema: optim.EMA | None
    scaler: "LossScaler | None" = None  # dtype="fp16": dynamic loss scaling
    skipped: bool = False  # the last step's gradients overflowed in fp16: no update was made
    average: Callable | None = None  # data parallel: average(params) makes each gradient its mean over the GPUs


def param_groups(trainable: dict[str, nn.Parameter], cfg: dict, lr_multipliers: dict[str, float] | None):
    """The trainable parameters, in groups of equal learning rate: learning_rate times the
    multiplier a family gives a parameter by name (block-wise learning rates, LoRA+); one group
    when there are none."""
    if not lr_multipliers:
        return list(trainable.values())
    groups: dict[float, list] = {}
    for name, p in trainable.items():
        groups.setdefault(float(lr_multipliers.get(name, 1.0)), []).append(p)
    return [{"params": ps, "lr": cfg["learning_rate"] * m} for m, ps in groups.items() if m > 0]


def build_optimization(trainable: dict[str, nn.Parameter], cfg: dict, seed: int | None = None,
                       foreach: bool | None = None, lr_multipliers: dict[str, float] | None = None,
                       world=None) -> Optimization:
    """The optimizer (and the step fused into backward), its LR schedule and the EMA. `seed`
    seeds the fused step's rounding noise (None on the meta device); `foreach` chooses AdamW's
    implementation off CUDA (optim.build_optimizer); `lr_multipliers` (parameter name ->
    factor; 0 freezes) come from the family (Family.lr_multipliers). With several GPUs data
    parallel (`world`, distributed.World) the gradients are averaged over them: each in the fused
    step's hook before it is used, or all of them in close_gradients."""
    frozen = {name for name, factor in (lr_multipliers or {}).items() if factor == 0}
    for name in frozen:  # no gradient at all: nothing would ever step or clear it
        trainable[name].requires_grad_(False)
    params = [p for name, p in trainable.items() if name not in frozen]
    extra = {"stochastic_rounding": cfg["stochastic_rounding"]} if cfg["optimizer"] in ("adafactor", "adamw8bit") \
        else {"foreach": foreach}
    optimizer = optim.build_optimizer(param_groups(trainable, cfg, lr_multipliers), cfg["optimizer"], lr=cfg["learning_rate"],
                                      weight_decay=cfg["weight_decay"], betas=tuple(cfg["betas"]), eps=cfg["eps"],
                                      **extra)
    scheduler = optim.build_scheduler(optimizer, cfg["lr_scheduler"], warmup_steps=warmup_steps(cfg),
                                      total_steps=cfg["max_train_steps"], end_lr_ratio=cfg["lr_end_ratio"],
                                      power=cfg["lr_power"])
    average_all, average_one = world.averaging() if world is not None else (None, None)
    fused = None
    if cfg["fused_backward"]:
        fused = optim.FusedBackwardStep(optimizer, max_grad_norm=0.0, seed=seed,
                                        max_grad_norm_per_param=cfg["max_grad_norm_per_param"] or None,
                                        stochastic_rounding=cfg["stochastic_rounding"], average=average_one)
    ema = optim.EMA(params, decay=cfg["ema_decay"], update_every=cfg["ema_every"]) if cfg["ema_decay"] else None
    scaler = LossScaler() if cfg["dtype"] == "fp16" else None
    return Optimization(params, optimizer, scheduler, fused, ema, scaler, average=average_all)


# --- one step ----------------------------------------------------------------------------------------


def training_loss(family, objective, model: nn.Module, batch: dict, cfg: dict,
                  generator: torch.Generator | None = None):
    """One forward pass: noise the cached latents at drawn levels and score the prediction.
    Noise and levels come from a CPU generator in training (runs reproduce across devices and
    resumes); the memory plan passes None and draws on the device. Returns (mean loss,
    per-sample losses (B,), the losses.Noised draw).

    With several GPUs `batch` is the global batch (distributed.World.batch): every GPU draws for
    all of it, as one process would, and only its `batch["rows"]` go through the network. The
    returns are still the global batch's: the loss's value is the mean over the GPUs (its
    gradient this GPU's rows'), and the per-sample losses those of every GPU."""
    x0 = batch["latent"].float()
    noised = objective.noised(x0, generator, family.seq_len(x0))
    cond = family.conditioning(batch, cfg, generator)
    rows, mask, ran = batch.get("rows"), batch.get("mask"), noised
    if rows is not None:  # this GPU's rows
        size = x0.shape[0]
        x0, mask, cond = take_rows(x0, rows, size), take_rows(mask, rows, size), take_rows(cond, rows, size)
        ran = losses.Noised(**take_rows(vars(noised), rows, size))
    out = family.predict(model, ran.x_t, ran.t, cond)
    loss, per_sample = objective.loss(out, x0, ran, mask=mask)
    if rows is not None:
        loss, per_sample = distributed.global_loss(loss, per_sample)
    return loss, per_sample, noised


def take_rows(value, rows: slice, size: int):
    """The rows of a batch-first tensor, or of each one in a dict (others are left as they are)."""
    if isinstance(value, dict):
        return {k: take_rows(v, rows, size) for k, v in value.items()}
    if torch.is_tensor(value) and value.ndim and value.shape[0] == size:
        return value[rows]
    return value


def backward(opt: Optimization, loss: Tensor) -> None:
    """loss.backward(), with the loss multiplied by the fp16 loss scale when there is one."""
    (loss * opt.scaler.scale if opt.scaler is not None else loss).backward()


def close_gradients(opt: Optimization, cfg: dict) -> Tensor:
    """After the step's backward passes: undo the fp16 loss scale, then clip to the global norm
    (the fused step has already updated every weight and only measured the norm). Returns the
    norm before clipping; with fp16 gradients that overflowed it is inf or NaN and `opt.skipped`
    says that apply_step will make no update."""
    if opt.fused is not None:
        opt.fused.step()
        return opt.fused.last_grad_norm
    if opt.average is not None:
        opt.average(opt.params)  # data parallel: the mean gradient over the global batch
    opt.skipped = opt.scaler is not None and not opt.scaler.unscale_(opt.params)
    return distributed.local(optim.clip_grad_norm_(opt.params, cfg["max_grad_norm"] or float("inf")))


def apply_step(opt: Optimization, step: int, swap: blockswap.BlockSwap | None = None) -> None:
    """The optimizer step (unless fused, or skipped after an fp16 overflow), the LR schedule, and
    the EMA of step number `step` (counted from 1: the steps done once this one is). With block
    swap the EMA reads swapped weights from their host copies: it waits for the side stream's
    copies first."""
    if opt.scaler is not None:
        opt.scaler.update(finite=not opt.skipped)
    if opt.fused is None:
        if not opt.skipped:
            opt.optimizer.step()
        opt.optimizer.zero_grad(set_to_none=True)
    opt.scheduler.step()
    if opt.ema is not None:
        if swap is not None and step % opt.ema.update_every == 0:
            swap.synchronize()  # a host sync, on the steps the average updates
        opt.ema.update(step)


# --- fp16: dynamic loss scaling ----------------------------------------------------------------------


class LossScaler:
    """Dynamic loss scaling for dtype="fp16", with torch.amp.GradScaler's rules and defaults.

    fp16 keeps 5 exponent bits: gradients below ~6e-8 flush to zero in an fp16 backward. So the
    loss is multiplied by `scale` before backward (training.backward), which lifts every gradient
    by the same factor, and the gradients are divided by it again before clipping and the step
    (unscale_). If a gradient came out inf or NaN, the scale was too large: the step is skipped
    (no update; the schedule and the EMA still count it) and the scale is multiplied by
    `backoff_factor`. After `growth_interval` finite steps in a row it is multiplied by
    `growth_factor`. A run thus finds the largest scale that does not overflow within a few
    steps of starting, and keeps probing upward."""

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        self.scale, self.growth_factor, self.backoff_factor = init_scale, growth_factor, backoff_factor
        self.growth_interval = growth_interval
        self.good_steps = 0  # finite steps since the last change of scale

    @torch.no_grad()
    def unscale_(self, params: list[nn.Parameter]) -> bool:
        """Divide every gradient by the scale; return whether all of them are finite (one host
        sync). On the meta device (the memory plan) nothing can be read: True."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return True
        finite = torch.stack([g.isfinite().all() for g in grads]).all()
        torch._foreach_mul_(grads, 1.0 / self.scale)
        return finite.device.type == "meta" or bool(finite)

    def update(self, finite: bool) -> None:
        if not finite:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
