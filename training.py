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
import re
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
    grad_sq: dict | None = None  # log_block_grad_norms: trainable name -> its last squared gradient norm


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


def choose_trainable(model: nn.Module, family, cfg: dict, device=None, text_networks: dict | None = None):
    """train_mode "lora": a LoRA network on the targets (the family's selection, or a `targets`
    preset), plus a LoRA on each text encoder of text_encoder_lr (`text_networks`: encoder name
    -> its network), its weights (lora_dtype) on `device`, started from network_weights when given.
    "full": every weight of the model, or a preset's layers. Returns (network or None,
    trainable by name, denoiser targets)."""
    model.requires_grad_(False)
    if cfg["train_mode"] == "full":
        return None, full_trainable(model, family, cfg), {}
    targets = lora_targets(model, family, cfg)
    # LoRA weights train in lora_dtype (fp32 by default; bf16 with stochastically rounded updates)
    # whatever the base dtype; LoRAModule casts them to the input's dtype for the matmul.
    options = dict(dropout=cfg["network_dropout"], rank_dropout=cfg["rank_dropout"],
                   module_dropout=cfg["module_dropout"], dora=cfg["use_dora"], dtype=DTYPES[cfg["lora_dtype"]],
                   device=device)
    alphas = {path: network_alpha(cfg) for path in targets} | family.lora_alphas(cfg, targets)
    splits = fused_splits(model, family, targets) if cfg["split_qkv"] else None
    networks = [lora.LoRANetwork.inject(model, targets, alpha=alphas, prefix=family.lora_prefix, splits=splits,
                                        **options)]
    for encoder in cfg["text_encoder_lr"]:
        if encoder not in (text_networks or {}):
            raise ValueError(f"text_encoder_lr names {encoder!r}, but no such text encoder is loaded")
        te_model, prefix = text_networks[encoder], family.text_encoder_loras()[encoder][0]
        te_targets = family.text_encoder_lora_targets(encoder, te_model, cfg["network_dim"])
        networks.append(lora.LoRANetwork.inject(te_model, te_targets, alpha=network_alpha(cfg), prefix=prefix,
                                                names=lora.text_encoder_names(te_model, te_targets), **options))
        for module in networks[-1].loras.values():  # a LoRA's dropouts follow its layer's mode; the encoder
            module.base.train()  # itself stays in eval mode (T5's own dropout off); data.LiveText.load evaluates
    network = networks[0] if len(networks) == 1 else lora.LoRANetwork.join(networks)
    if cfg["network_weights"] and not next(network.parameters()).is_meta:
        fresh = lora.load_network_weights(network, cfg["network_weights"], family)
        if fresh:
            print(f"network_weights: {len(fresh)} modules are not in {cfg['network_weights']} and start fresh: "
                  f"{', '.join(fresh[:4])}{' ...' if len(fresh) > 4 else ''}")
    return network, dict(network.named_parameters()), targets


def lora_targets(model: nn.Module, family, cfg: dict) -> dict[str, int]:
    """Module path -> rank: a `targets` preset (lora.PRESETS, over the family's lora_layers) or
    the family's own selection keys."""
    if cfg["targets"]:
        return lora.preset_targets(family.lora_layers(model), cfg["targets"], family, cfg["network_dim"],
                                   cfg["group_ranks"])
    return family.lora_targets(model, cfg)


def full_trainable(model: nn.Module, family, cfg: dict) -> dict[str, nn.Parameter]:
    """Full fine-tuning: every weight, or with a `targets` preset the weights and biases of the
    layers it selects (everything else frozen)."""
    if not cfg["targets"]:
        model.requires_grad_(True)
        return dict(model.named_parameters())
    modules = dict(model.named_modules())
    trainable = {f"{path}.{name}": p for path in lora.preset_layers(family.lora_layers(model), cfg["targets"], family)
                 for name, p in modules[path].named_parameters(recurse=False)}
    for p in trainable.values():
        p.requires_grad_(True)
    return trainable


def fused_splits(model: nn.Module, family, targets: dict[str, int]) -> dict[str, list[int]]:
    """split_qkv: module path -> row slices, for the targets that are fused weights."""
    modules = dict(model.named_modules())
    splits = {path: rows for path in targets if (rows := family.lora_fused_rows(path, modules[path]))}
    if not splits:
        raise ValueError(f"split_qkv: none of the LoRA targets is a fused q/k/v weight of {family.title}; "
                         "remove split_qkv")
    return splits


def lr_multipliers(family, cfg: dict, trainable: dict[str, nn.Parameter]) -> dict[str, float]:
    """Learning-rate factors by parameter name: the family's (block-wise rates, frozen blocks),
    times LoRA+'s ratio on the up matrices (loraplus_lr_ratio) and each text encoder's own rate
    (text_encoder_lr / learning_rate) on its LoRA."""
    factors = dict(family.lr_multipliers(cfg, trainable))
    te_rates = {f".{family.text_encoder_loras()[encoder][0]}_": lr / cfg["learning_rate"]
                for encoder, lr in cfg["text_encoder_lr"].items()}
    for name in trainable:
        factor = factors.get(name, 1.0) * next((rate for p, rate in te_rates.items() if p in name), 1.0)
        if cfg["loraplus_lr_ratio"] and ".lora_up." in name:
            factor *= cfg["loraplus_lr_ratio"]
        if factor != 1.0:
            factors[name] = factor
    return factors


def describe_trainable(prepared, family, cfg: dict) -> list[str]:
    """What trains, for the log: the selection, its modules folded by block index, its parameters."""
    count = sum(p.numel() for p in prepared.trainable.values() if p.requires_grad)
    how = f"preset {cfg['targets']!r}" if cfg["targets"] else f"{family.title}'s selection keys"
    if prepared.network is None:
        if not cfg["targets"]:
            total = sum(p.numel() for p in prepared.trainable.values())
            frozen = f" ({total - count:,} frozen by the family's block selection)" if count < total else ""
            return [f"full fine-tuning: {count:,} parameters{frozen}"]
        paths = sorted({name.rsplit(".", 1)[0] for name in prepared.trainable})
        return [f"full fine-tuning, {how}: {len(paths)} layers, {count:,} parameters:"] + \
            [f"  {line}" for line in lora.describe_paths(paths)]
    lines = [f"LoRA on {len(prepared.targets)} layers ({how}), {count:,} trainable parameters:"]
    lines += [f"  {line}" for line in lora.describe_paths(list(prepared.targets))]
    for encoder, (prefix, _) in family.text_encoder_loras().items():
        names = [n for n in prepared.network.loras if n.startswith(prefix + "_")]
        if names:
            lines.append(f"  text encoder {encoder} ({prefix}): {len(names)} layers")
    return lines


def network_alpha(cfg: dict) -> float:
    """alpha for scale alpha / rank: the config's, or the rank when it is 0 (scale 1; kohya's
    "alpha None or 0 means alpha = rank")."""
    return cfg["network_alpha"] or float(cfg["network_dim"])


def prepare(model: nn.Module, family, cfg: dict, device, host_device="cpu", allocate=None,
            on_trainable=None, shard=None, text_networks: dict | None = None) -> Prepared:
    """Set the network up as training runs it: what trains, gradient checkpointing of the
    family's blocks, token chunks of the feed-forwards (for every forward from now on, sampling
    included), block swap (or the whole model on `device`). `host_device`, `allocate` and
    `on_trainable(network, trainable)` (called before placement) let the memory plan run the
    same code on the meta device and label what it makes. `shard(model, groups)` (FSDP,
    distributed.py) replaces placement: each block sharded after its checkpointing, then the rest.
    `text_networks` are the text encoders' networks, for text-encoder LoRA."""
    network, trainable, targets = choose_trainable(model, family, cfg, device, text_networks)
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
    grad_sq = watch_gradients(trainable) if cfg["log_block_grad_norms"] else None
    return Prepared(model, network, trainable, swap, targets, grad_sq)


def watch_gradients(trainable: dict[str, nn.Parameter]) -> dict:
    """A hook on each trainable tensor that keeps its gradient's squared norm once the gradient
    is complete (before a fused step frees it; registered before the optimizer's hooks, so it
    runs first). With accumulation the last micro-batch's call sees the whole sum."""
    grad_sq: dict = {}
    for name, p in trainable.items():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda param, name=name: grad_sq.__setitem__(
                name, param.grad.detach().float().square().sum()))
    return grad_sq


def block_grad_norms(prepared: Prepared) -> dict:
    """{"block_grad_norms": {block: norm}} of the step just done (for metrics.jsonl; log_block_grad_norms),
    blocks as the module paths name them ("double_blocks.3", "input_blocks.4", "img_in"; text
    encoders by their kohya prefix, "lora_te1"); {} when off. With fp16 loss scaling, of the
    scaled gradients."""
    if not prepared.grad_sq:
        return {}
    paths = prepared.network.module_paths if prepared.network is not None else {}
    groups: dict[str, list[Tensor]] = {}
    for name, value in prepared.grad_sq.items():
        # LoRA: "loras.<kohya name>.lora_up.weight" -> its module path; full fine-tuning: the name itself
        module = name.split(".")[1] if prepared.network is not None else name.rsplit(".", 1)[0]
        path = module if module.startswith("lora_te") else paths.get(module, module)
        groups.setdefault(block_of(path), []).append(value)
    prepared.grad_sq.clear()
    norms = torch.stack([torch.stack(values).sum() for values in groups.values()]).sqrt().tolist()  # one sync
    return {"block_grad_norms": dict(zip(groups, norms))}


def block_of(path: str) -> str:
    """The block a module path sits in: "double_blocks.3.img_attn.qkv" -> "double_blocks.3";
    outside the blocks its top-level module ("img_in"); a text-encoder LoRA its prefix ("lora_te1")."""
    if path.startswith("lora_te"):
        return path[:len("lora_te1")]
    match = re.match(r"[A-Za-z_]+\.\d+(?=\.)", path)
    return match.group(0) if match else path.split(".")[0]


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


def encode_text(text_encoder, captions: list[str]) -> dict:
    """Captions through a prompt encoder (models/) with gradients, for text encoders that train.
    Its `encode` runs under no_grad for caching; the decorator keeps the plain function as
    `__wrapped__` (functools.wraps), which is called here. Under no_grad (validation, samples)
    this is encode itself."""
    encode = type(text_encoder).encode
    return getattr(encode, "__wrapped__", encode)(text_encoder, list(captions))


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
