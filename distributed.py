"""Several GPUs and several machines, on torch.distributed alone (the engine torchtune and
torchtitan use: no accelerate, no DeepSpeed). The config is the same as on one GPU:

    python train.py configs/x.py                                  # one GPU
    torchrun --nproc_per_node 8 train.py configs/x.py             # the 8 GPUs of one machine
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \\
             --rdzv_endpoint host0:29500 train.py configs/x.py    # run on each of 2 machines

torchrun starts one process (a rank) per GPU; `init` reads its environment. What changes:

Batches. `batch_size` is per GPU. train.py's DataOrder yields global batches of batch_size x
ranks items; rank r loads rows r*batch_size .. (r+1)*batch_size - 1 (`World.batch`). Every
rank draws the random numbers of the whole global batch (caption dropout, noise, noise levels)
from the same seeded generator, in the order one process would, and the network sees only its
rows (batch["rows"] in training.training_loss, whose loss is then the global batch's mean:
`global_loss`). N GPUs therefore compute the one-GPU step of the global batch, and a resume
continues it exactly. The learning rate applies to the gradient averaged over the global batch
(it is not scaled by N). torch's own generators (LoRA dropout, stochastic rounding) are rank
0's on every rank (`World.same_rng`), so replicated weights stay equal.

Data parallel ("ddp": LoRA, or full fine-tuning with distributed="ddp"). Every GPU holds the
whole model; after a step's backward passes the trainable gradients are averaged by
all-reduce in buckets (`average_gradients`), only those: a FLUX rank-16 LoRA moves about
70 MB per step. The fused step averages each gradient in its hook, before it is used, so it
works here; block swap works too (LoRA weights never leave the device).

FSDP2 ("fsdp": full fine-tuning; what "auto" picks unless the config uses what FSDP cannot
run, block swap, the fused step, Adafactor, fp16: a one-GPU config then runs data parallel,
as on one GPU, and says why). `shard` applies torch.distributed.fsdp.fully_shard as
torchtitan does: each of the family's blocks (already gradient-checkpointed) its own unit,
then the root. Every rank loads the checkpoint memory-mapped in the file's own dtype (the
pages are shared by the ranks of a machine: host memory does not grow with the GPU count),
and makes fp32 master weights of one block at a time, which FSDP moves to the GPU and
shards: each GPU keeps 1/N of the fp32 weights, their gradients and AdamW's state. The
policy: parameters gathered in the config's dtype for compute, gradients reduce-scattered
in fp32. Inputs are cast as on one GPU (the family casts to the weights' dtype, which with
FSDP reads the fp32 master outside the forward; a hook on each Linear and Conv casts a
floating input to the gathered weight's dtype), so timesteps and RoPE stay fp32 as there.

Checkpoints. A sharded run saves its resumable state with torch.distributed.checkpoint
(every rank writes its shards; nothing is gathered), and any number of processes loads it
back, one included: DCP reshards on load. The final model file is gathered one tensor at a
time and written by rank 0 in the original layout (never the whole model in one place).
Data-parallel states are the one-GPU format, written by rank 0. Either kind resumes on
another GPU count as long as the global batch stays (batch_size x GPUs).

Caching. Each rank encodes its share of the images and captions (`build_shared`) and writes
them (atomically: a file appears whole or not at all); once all are done (`agree`) every rank
reads the whole cache.

Files and errors. Rank 0 alone writes files, samples and logs; the other ranks print
nothing but their errors. Where ranks do different work (their caching shares, rank 0's
writing) the phase ends in `agree`: every rank learns whether any failed, and all stop with
the failing rank's message instead of waiting for it. A stop request (Ctrl-C, SIGTERM) is
agreed at each step boundary, so every rank saves the same step.
"""
import atexit
import datetime
import json
import os
import struct
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

import atomic
from config import DTYPES, ConfigError

MODES = ("auto", "ddp", "fsdp")  # the config's `distributed`
TIMEOUT = datetime.timedelta(minutes=30)  # the longest a rank waits for the others (rank 0 writing a model)
BUCKET_BYTES = 256 * 2**20  # gradients all-reduced together (a flat copy of this size at a time)
SHARDED = "sharded"  # the torch.distributed.checkpoint folder inside a state folder


class OtherRankFailed(RuntimeError):
    """Another rank stopped with an error, so this one stops too; the message names it."""


# --- the processes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """This process's place among the ranks torchrun started (one GPU each). World() is one
    process, where every method below does what one process does."""

    rank: int = 0
    size: int = 1
    mode: str = "single"  # "single", "ddp" (data parallel) or "fsdp"
    device: torch.device = torch.device("cpu")
    mesh: object = None  # FSDP's DeviceMesh

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"

    def describe(self) -> str:
        if self.size == 1 and not self.sharded:
            return "one process"
        kind = {"ddp": "data parallel", "fsdp": "FSDP2 (sharded)"}[self.mode]
        return f"{self.size} processes, {kind}, on {self.device.type}"

    def batch_note(self, cfg: dict) -> str:
        """What batch_size and learning_rate mean on these GPUs, a line for the step arithmetic ("" on one)."""
        if self.size == 1:
            return ""
        total = cfg["batch_size"] * self.size
        return (f"{self.describe()}: batch {cfg['batch_size']} per GPU x {self.size} GPUs = a global batch of "
                f"{total} samples per step; learning_rate {cfg['learning_rate']:g} applies to the gradient averaged "
                f"over those {total} (as on one GPU with batch_size={total}; it is not scaled by the number of GPUs)\n")

    def same_rng(self) -> None:
        """torch's global generators (CPU and this GPU's) as rank 0 has them, on every rank, after
        the ranks' different caching shares: from here every rank draws alike, so the LoRA
        weights start equal, and replicated weights stay equal under random draws in the step
        (stochastic rounding); LoRA dropout draws the same masks for each rank's rows, as
        accelerate's default seeding does. The noise comes from the run's own generator."""
        if self.size == 1:
            return
        cuda = self.device.type == "cuda"
        states = [torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if cuda else None]
        dist.broadcast_object_list(states, src=0, device=self.device)
        torch.set_rng_state(states[0])
        if cuda:
            torch.cuda.set_rng_state(states[1], self.device)

    # --- batches ---

    def batch(self, load, dataset, indices: list[int], device) -> dict:
        """`load(dataset, indices, device)` of this rank's rows of a global batch only, placed in a
        batch of the global size (`as_global`); batch["rows"] says which rows ran here
        (training.training_loss). One process: `load` of all of them."""
        rows = self.rows(len(indices))
        if rows is None:
            return load(dataset, indices, device)
        return {**self.as_global(load(dataset, indices[rows], device), rows, len(indices)), "rows": rows}

    def rows(self, batch_size: int) -> slice | None:
        """This rank's rows of a global batch (None on one process: all of it)."""
        if self.size == 1:
            return None
        share = batch_size // self.size
        return slice(self.rank * share, (self.rank + 1) * share)

    @staticmethod
    def as_global(batch: dict, rows: slice, size: int) -> dict:
        """This rank's rows placed in a global batch of `size`, the other rows zeros (or empty
        captions): random draws over the batch are then the ones one process makes."""
        out = {}
        for key, value in batch.items():
            if torch.is_tensor(value):
                out[key] = value.new_zeros((size, *value.shape[1:]))
            else:  # a list: the captions
                out[key] = [""] * size
            out[key][rows] = value
        return out

    # --- gradients (data parallel) ---

    def average_gradients(self, params: list[nn.Parameter]) -> None:
        """Data parallel: every gradient becomes its mean over the ranks. All-reduce of flat
        buckets of one dtype and device; nothing to do on one process or with FSDP (which
        reduce-scatters in backward)."""
        if self.mode != "ddp":
            return
        for bucket in _buckets([p.grad for p in params if p.grad is not None]):
            flat = torch.cat([g.reshape(-1) for g in bucket]).to(self.device)  # NCCL: host gradients visit the GPU
            dist.all_reduce(flat)
            flat /= self.size
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def average_(self, grad: Tensor) -> None:
        """One gradient averaged in place (the fused step's hook, before the update)."""
        dist.all_reduce(grad)
        grad /= self.size

    def averaging(self) -> tuple:
        """(average all gradients, average one in place) for training.build_optimization: data
        parallel only (FSDP reduce-scatters in backward; one process has nothing to average)."""
        return (self.average_gradients, self.average_) if self.mode == "ddp" else (None, None)

    # --- agreeing ---

    @contextmanager
    def agree(self, what: str):
        """A phase the ranks run differently. When it ends every rank knows whether any
        failed: a failed rank raises its own error, the others OtherRankFailed naming it."""
        if self.size == 1:
            yield
            return
        error = None
        try:
            yield
        except Exception as raised:  # every kind: the other ranks must hear of it
            error = raised
        reports = [None] * self.size
        dist.all_gather_object(reports, None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = [(rank, report) for rank, report in enumerate(reports) if report]
        if failed:
            rank, report = failed[0]
            raise OtherRankFailed(f"rank {rank} stopped while {what}: {report}")

    def on_main(self, work, *args, **kwargs):
        """`work(*args, **kwargs)` on rank 0 alone (writing files); every rank stops if it fails."""
        with self.agree(work.__name__.replace("_", " ")):
            return work(*args, **kwargs) if self.main else None

    def agreed_signal(self, signum: int | None) -> int | None:
        """The stop request any rank has received, on every rank (so all save the same step)."""
        if self.size == 1:
            return signum
        flag = torch.tensor([signum or 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None


def _buckets(grads: list[Tensor]) -> list[list[Tensor]]:
    """Gradients in groups of one dtype and device, each at most about BUCKET_BYTES."""
    out, current, size, kind = [], [], 0, None
    for g in grads:
        if current and ((g.dtype, g.device) != kind or size + g.nbytes > BUCKET_BYTES):
            out.append(current)
            current, size = [], 0
        current.append(g)
        size, kind = size + g.nbytes, (g.dtype, g.device)
    return out + ([current] if current else [])


def fsdp_problems(cfg: dict) -> list[str]:
    """What in a full fine-tuning config FSDP cannot run, each with what to set instead."""
    swapping = cfg["blocks_to_swap"] > 0 or cfg["double_blocks_to_swap"] > 0 or cfg["single_blocks_to_swap"] > 0
    problems = [
        (swapping, "block swap: FSDP already spreads the weights over the GPUs (each holds 1/N). Set "
                   "blocks_to_swap=0, or distributed='ddp' to keep the whole model, swapped, on every GPU"),
        (cfg["fused_backward"], "fused_backward: FSDP already keeps only 1/N of the gradients on each GPU. Set "
                                "fused_backward=False (max_grad_norm clips as usual)"),
        (cfg["optimizer"] != "adamw", f"optimizer={cfg['optimizer']!r}: FSDP trains sharded fp32 master weights "
                                      "with AdamW, whose state is sharded too; set optimizer='adamw'"),
        (cfg["dtype"] == "fp16", "dtype='fp16': FSDP computes in the config's dtype from fp32 master weights "
                                 "without fp16 loss scaling; use dtype='bf16', or distributed='ddp' for fp16"),
    ]
    return [message for found, message in problems if found]


def choose_mode(cfg: dict, size: int) -> str:
    """distributed="auto": data parallel for LoRA; FSDP for full fine-tuning, unless the config
    uses what FSDP cannot run (a one-GPU config's block swap, fused step, Adafactor): then data
    parallel, the config's memory settings on every GPU. One process needs neither (unless
    distributed="fsdp" is asked for under torchrun)."""
    if cfg["distributed"] == "fsdp":
        return "fsdp"
    if size == 1:
        return "single"
    if cfg["distributed"] == "auto":
        return "fsdp" if cfg["train_mode"] == "full" and not fsdp_problems(cfg) else "ddp"
    return cfg["distributed"]


def check(cfg: dict, size: int) -> str:
    """The mode for `size` processes; combinations that cannot work are refused here, before
    anything loads, with what to do instead."""
    mode = choose_mode(cfg, size)
    if mode != "fsdp":
        return mode
    lora = ["LoRA trains data parallel (distributed='ddp', what 'auto' picks): its gradients are small, and FSDP "
            "would gather the frozen base for every forward and backward. To fit the base on each GPU use "
            "fp8_base or blocks_to_swap"] if cfg["train_mode"] == "lora" else []
    problems = lora + fsdp_problems(cfg)
    if problems:
        raise ConfigError(f"distributed='fsdp' over {size} GPU(s) cannot run this config:\n  " + "\n  ".join(problems))
    return mode


def auto_note(cfg: dict, mode: str) -> str:
    """Why distributed="auto" trains the whole model data parallel ("" when it does not)."""
    if cfg["distributed"] != "auto" or cfg["train_mode"] != "full" or mode != "ddp":
        return ""
    return ("distributed='auto': full fine-tuning data parallel (the whole model, set up as on one GPU, on every "
            "GPU), since FSDP cannot run this config (for FSDP, change these):\n  " + "\n  ".join(fsdp_problems(cfg)))


def init(cfg: dict, device: torch.device) -> World:
    """This process's World from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK):
    NCCL with one GPU per local rank on CUDA, gloo on CPU. Without torchrun: one process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    mode = check(cfg, size)
    if "RANK" not in os.environ:
        if mode == "fsdp":
            raise ConfigError("distributed='fsdp' shards over the processes torchrun starts: launch with "
                              "torchrun --nproc_per_node N train.py CONFIG")
        return World(device=device)
    if mode == "single":
        return World(device=device)
    if auto_note(cfg, mode):
        print(auto_note(cfg, mode))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT, device_id=device if device.type == "cuda" else None)
        atexit.register(shutdown)
    mesh = None
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (size,))
    return World(dist.get_rank(), size, mode, device, mesh)


def global_loss(loss: Tensor, per_sample: Tensor) -> tuple[Tensor, Tensor]:
    """A rank's (mean loss, per-sample losses) of its rows as the global batch's: the loss's value
    becomes the mean over the ranks (what one process reports) while its gradient stays this
    rank's (the gradient all-reduce or reduce-scatter averages those); the per-sample losses of
    every rank, in rank order."""
    parts = [torch.empty_like(per_sample) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, per_sample.detach().contiguous())
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    mean /= dist.get_world_size()
    return loss + (mean - loss.detach()), torch.cat(parts)


def restore_rng(world: World, state: dict, generator: torch.Generator) -> None:
    """checkpoint.restore_rng (rank 0 saved the state), then every rank draws as rank 0 does."""
    import checkpoint

    checkpoint.restore_rng(state, generator)
    world.same_rng()


def shutdown() -> None:
    """The end of a torchrun process (train.py's command line)."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def quiet():
    """Under torchrun rank 0 prints; the other ranks are silent (their errors surface as
    exceptions, which the command line reports on every rank)."""
    if int(os.environ.get("RANK", "0")) == 0:
        yield
        return
    with open(os.devnull, "w") as null, redirect_stdout(null), redirect_stderr(null), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def rank_label() -> str:
    """" (rank 3)" under torchrun with several processes, for error messages."""
    return f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


# --- caching -----------------------------------------------------------------------------------


def build_shared(world: World, cache, items: list, *args, **kwargs):
    """`cache.build(items, ...)` split over the ranks: each encodes and writes its share
    (every size-th item), then, once all are done, every rank builds the whole list, which
    finds each entry on disk (checked in full, not encoded again). A rank that fails stops
    them all (`agree`)."""
    if world.size == 1:
        return cache.build(items, *args, **kwargs)
    with world.agree("caching"):
        cache.build(items[world.rank :: world.size], *args, **kwargs)
    recache, cache.recache = cache.recache, False  # recache=True: the shares were just rebuilt
    try:
        return cache.build(items, *args, **{**kwargs, "progress": False})
    finally:
        cache.recache = recache


# --- FSDP ----------------------------------------------------------------------------------------


def load_dtype(world: World, sd: dict, dtype: torch.dtype) -> torch.dtype:
    """The dtype the denoiser loads in: the config's, or with FSDP the file's own (memory-mapped,
    no copy per rank; `shard` makes the fp32 masters one block at a time)."""
    if not world.sharded:
        return dtype
    counts: dict = {}
    for tensor in sd.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=counts.get) if counts else dtype


def sharder(world: World, cfg: dict):
    """training.prepare's `shard` for FSDP runs (None otherwise)."""
    if not world.sharded:
        return None
    return lambda model, groups: shard(model, groups, world, DTYPES[cfg["dtype"]])


def shard(model: nn.Module, groups: dict[str, list[nn.Module]], world: World, compute: torch.dtype) -> None:
    """FSDP2 in torchtitan's order: each block, already gradient-checkpointed, becomes its own
    unit (its fp32 masters made on the way to the GPU, then sharded), then the root takes the
    rest. Gathered in `compute` for the forward and backward, gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    # cast_forward_inputs=False: inputs keep their dtype (fp32 timesteps and RoPE, as on one GPU)
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in (b for blocks in groups.values() for b in blocks):
        block.to(device=world.device, dtype=torch.float32)  # one block's masters at a time
        fully_shard(block, mesh=world.mesh, mp_policy=policy)
    for p in model.parameters():
        if not isinstance(p, DTensor):  # the root's own weights (embedders, final layer)
            p.data = p.data.to(world.device, torch.float32)
    fully_shard(model, mesh=world.mesh, mp_policy=policy)
    # the families' forwards return views (unpatching) and never change them in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    if compute != torch.float32:
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                module.register_forward_pre_hook(_cast_to_weight)


def _cast_to_weight(module: nn.Module, args: tuple) -> tuple:
    """A floating input in the dtype of the module's (gathered) weight. On one GPU the family
    casts its inputs to the weights' dtype; with FSDP it reads the fp32 master there."""
    dtype = module.weight.dtype
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def local(value: Tensor) -> Tensor:
    """A replicated DTensor (a norm over sharded gradients) as a plain tensor."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


# --- checkpoints ---------------------------------------------------------------------------------


def is_sharded(state_dir: Path) -> bool:
    return (Path(state_dir) / SHARDED).is_dir()


def _dcp_state(model: nn.Module, optimizer, ema, names: list[str]) -> dict:
    """What torch.distributed.checkpoint saves and loads: model, optimizer (by parameter name)
    and EMA, as DTensor shards with FSDP, plain tensors on one process."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    if ema is not None:
        state["ema"] = dict(zip(names, ema.shadow))
    return state


def save_sharded(world: World, folder: Path, model: nn.Module, optimizer, ema, names: list[str]) -> None:
    """Every rank writes its shards of the weights, optimizer state and EMA into `folder`
    (torch.distributed.checkpoint: nothing is gathered)."""
    import torch.distributed.checkpoint as dcp

    model.reshard()  # the root's weights as shards (a no-grad forward leaves them gathered)
    dcp.save(_dcp_state(model, optimizer, ema, names), checkpoint_id=str(Path(folder) / SHARDED))


def load_sharded(folder: Path, model: nn.Module, optimizer, ema, names: list[str]) -> None:
    """Weights, optimizer state and EMA from a sharded state into this run's, sharded or not,
    on any number of processes (DCP reshards; each rank reads the pieces it needs)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if hasattr(model, "reshard"):
        model.reshard()
    state = _dcp_state(model, optimizer, ema, names)  # initializes the optimizer state to load into
    with warnings.catch_warnings():  # on one process DCP warns that it loads without a process group: as meant
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(Path(folder) / SHARDED))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    if ema is not None:
        with torch.no_grad():
            for shadow, saved in zip(ema.shadow, (state["ema"][name] for name in names)):
                shadow.copy_(saved)


def save_state(world: World, run_dir: Path, step: int, prepared, opt, info: dict, keep_last: int) -> None:
    """A resumable state. One process or data parallel: checkpoint.save_state by rank 0. FSDP:
    rank 0 makes the folder, every rank writes its shards, then rank 0 adds the rest
    (scheduler, EMA settings, RNG, state.json) and moves it into place."""
    import checkpoint

    if not world.sharded:
        world.on_main(checkpoint.save_state, run_dir, step, prepared.trainable, opt.fused or opt.optimizer,
                      opt.scheduler, opt.ema, info, keep_last)
        return
    world.on_main(checkpoint.begin_state, run_dir, step)
    save_sharded(world, checkpoint.state_tmp_dir(run_dir, step), prepared.model, opt.optimizer, opt.ema,
                 _names(prepared.trainable, opt.params))
    ema = {k: v for k, v in opt.ema.state_dict().items() if k != "shadow"} if opt.ema is not None else None
    extra = {"scheduler": opt.scheduler.state_dict(), "ema": ema, "rng": info.pop("rng")}
    world.on_main(checkpoint.commit_state, run_dir, step, extra, info, keep_last)


def load_state(world: World, state_dir: Path, prepared, opt) -> tuple[dict, dict]:
    """The trained weights, optimizer state and EMA of a state into this run: a one-GPU (or data
    parallel) state into one (checkpoint.load_trained); a sharded state into this run's weights,
    sharded or not, on any number of processes; a one-GPU state into FSDP's shards. Returns
    (training_state, state.json info) for the rest (scheduler, RNG, data order)."""
    import checkpoint

    if not is_sharded(state_dir) and not world.sharded:
        return checkpoint.load_trained(state_dir, prepared.trainable, opt)
    extra, info = checkpoint.load_info(state_dir)
    names = _names(prepared.trainable, opt.params)
    if is_sharded(state_dir):
        load_sharded(state_dir, prepared.model, opt.optimizer, opt.ema, names)
        if opt.fused is not None:
            opt.fused.num_steps = info["step"]
    else:
        _load_full_into_shards(state_dir, extra, prepared.trainable, opt)
    if opt.ema is not None and extra["ema"] is not None:
        opt.ema.decay, opt.ema.update_every = extra["ema"]["decay"], extra["ema"]["update_every"]
        opt.ema.num_updates = extra["ema"]["num_updates"]
    return extra, info


def _names(trainable: dict[str, nn.Parameter], params: list[nn.Parameter]) -> list[str]:
    """The names of `params` (the optimized ones, EMA's order) in `trainable`."""
    by_id = {id(p): name for name, p in trainable.items()}
    return [by_id[id(p)] for p in params]


def _load_full_into_shards(state_dir: Path, extra: dict, trainable: dict, opt) -> None:
    """A one-GPU state into FSDP's shards: each rank copies its part of every weight from the
    memory-mapped file, and of the optimizer's and EMA's tensors (memory-mapped too)."""
    from models.loading import load_state_dict

    saved = load_state_dict(Path(state_dir) / "trainable.safetensors")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(_shard_like(saved[name], p))
    state = extra["optimizer"]
    state = state.get("optimizer", state)  # a fused step's state holds the optimizer's
    params = [p for group in opt.optimizer.param_groups for p in group["params"]]
    shards = {i: {key: _shard_like(value, params[i]) if torch.is_tensor(value) and value.ndim else value
                  for key, value in per_param.items()} for i, per_param in state["state"].items()}
    opt.optimizer.load_state_dict({"state": shards, "param_groups": state["param_groups"]})
    if opt.ema is not None and extra["ema"] is not None:
        with torch.no_grad():
            for shadow, full in zip(opt.ema.shadow, extra["ema"]["shadow"]):
                shadow.copy_(_shard_like(full, shadow))


def _shard_like(full: Tensor, like: Tensor) -> Tensor:
    """This rank's shard of a whole tensor, placed and typed like `like` (a DTensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(like.device, like.dtype)
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)  # no communication


def read_sharded(folder: Path) -> dict:
    """A sharded state's tensors in memory, on one process (to look at; resuming uses
    load_sharded): {"model": ..., "optimizer": ..., "ema": ...}, nested by name."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": one process, as meant
        warnings.simplefilter("ignore", UserWarning)
        return _load_state_dict_from_keys(checkpoint_id=str(Path(folder) / SHARDED))


# --- the model file ----------------------------------------------------------------------------


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
                      torch.float8_e5m2: "F8_E5M2"}


def write_model(world: World, tensors: dict[str, Tensor], path: Path, metadata: dict[str, str],
                dtype: torch.dtype) -> None:
    """A model file in the original layout (floating tensors in `dtype`), written by rank 0; with
    FSDP gathered one tensor at a time (write_gathered)."""
    if world.sharded:
        return write_gathered(world, tensors, path, metadata, dtype)

    def write_model_file():
        atomic.write_safetensors({k: v.detach().to(dtype).contiguous().cpu() for k, v in tensors.items()}, path,
                                 metadata)

    world.on_main(write_model_file)


def write_gathered(world: World, tensors: dict[str, Tensor], path: Path, metadata: dict[str, str],
                   dtype: torch.dtype) -> None:
    """A safetensors file of sharded tensors (floating ones in `dtype`), gathered one tensor at
    a time and streamed to disk by rank 0: the whole model is never in one place. Every rank
    takes part in every gather, also after a write error on rank 0 (which it reports then)."""
    from torch.distributed.tensor import DTensor

    out = {name: dtype if t.is_floating_point() else t.dtype for name, t in tensors.items()}
    header, offset = {"__metadata__": metadata}, 0
    for name, t in tensors.items():
        size = t.numel() * out[name].itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[out[name]], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned

    def gathered():  # a collective per sharded tensor: every rank runs all of it
        for name, t in tensors.items():
            yield name, (t.full_tensor() if isinstance(t, DTensor) else t)

    def write(tmp: Path, parts) -> None:
        with open(tmp, "wb") as file:
            file.write(struct.pack("<Q", len(text)) + text)
            for name, full in parts:
                file.write(full.detach().to("cpu", out[name]).contiguous().view(torch.uint8).numpy().tobytes())

    parts = gathered()
    with world.agree(f"writing {Path(path).name}"):
        try:
            if world.main:
                atomic.write_file(path, lambda tmp: write(tmp, parts))
        finally:
            for _ in parts:  # the rest of the gathers (all of them off rank 0, or after a write error)
                pass
