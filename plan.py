"""Where device memory goes in one training step, found without weights or a GPU:

    python train.py configs/flux_12gb.py --plan

Method
  1. The full-size model is built on the meta device (tensors that have shapes and dtypes
     but no data) and set up as training sets it up: weights in the config's dtype, fp8
     base weights (fp8.py), LoRA (lora.py) or every weight trainable, the optimizer and the
     fused step (optim.py), gradient checkpointing.
  2. One training step of the config runs on those tensors: the forward at the config's
     resolution and batch size, the flow-matching loss, backward, gradient clipping and the
     optimizer step. MemoryTracker, a TorchDispatchMode, sees every tensor an operator
     creates. It counts each storage once, from its creation until it is freed (a weakref
     callback), under a category, and remembers the breakdown at the moment the device
     total is highest. A first, trivial backward creates the optimizer state through the
     same code, so the measured step finds it in place, as every step after the first does.
  3. Block swap is placed by blockswap.py's rules rather than run: the Linear weights of
     the swapped blocks are counted in host memory, the device holds K = N - S blocks of
     each kind, and the first min(S, K) of them are the slots the swapped blocks pass
     through. Activation offload runs as training runs it (blockswap.offload_activations:
     what autograd saves outside the checkpointed blocks, among it each block's inputs, goes
     to host memory and comes back in backward), with the copies counted as host memory.

Attention is counted as CUDA's SDPA runs it: the flash kernel
(`aten._scaled_dot_product_flash_attention`; with a T5 mask the memory-efficient one) saves
its output and an fp32 logsumexp (B, heads, L), never an L x L matrix. With kernels="auto"
or "triton" (and triton installed) the element-wise chains are counted as the Triton kernels
in kernels.py save them (their fake implementations run on meta tensors), and the optimizer
updates of kernels_optim.py run their host code with the launches skipped, as on CUDA.
AdamW runs one tensor at a time, the nearest meta-device relative of CUDA's fused AdamW.

What the plan does not see, printed as margins beside it:
  - the caching allocator rounds every block up to 512 bytes (computed and printed), and
    packs small requests into 2 MiB segments;
  - fragmentation: reserved memory exceeds allocated memory, typically by 5-10 %
    (`PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` keeps it low);
  - workspaces inside kernels: cuBLAS's (32 MiB) and flash backward's fp32 dq accumulator
    (B x L x hidden x 4 bytes, 54 MiB at 1024 px), estimated and printed;
  - the CUDA context, 0.5-1 GiB that only nvidia-smi shows;
  - sampling and validation between steps (no gradients, but the VAE decoder comes to the
    device while samples decode).
Autograd decides what is saved from the operators, not from the device, so the model's own
code saves on meta tensors what it saves on CUDA; attention, whose CPU and CUDA kernels
differ, is routed as above. tests/test_plan.py checks the accounting against the CPU
allocator on real tensors.

Speed: most meta kernels are written in Python, and a FLUX step runs about 50,000 operators,
mostly the same few on the same shapes, so MetaOpCache remembers each one's output shapes.
"""
import time
import weakref
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import blockswap
import distributed
import families
import fp8
import kernels_optim
import sample
import training
from activations import offload_activations
from config import DTYPES
from models import layers
from models.vae import decode_tiled

GiB = 2**30
MiB = 2**20

# Device categories, in the order they are printed.
FROZEN = "frozen weights (resident)"
SLOTS = "swap slots"
TRAINABLE = "trainable weights"
GRADIENTS = "gradients"
OPTIMIZER = "optimizer state"
ACTIVATIONS = "activations and temporaries"
TEXT = "text encoders"  # caching
CODEC = "autoencoder"  # caching (encode) and sampling (decode)
DEVICE_CATEGORIES = (FROZEN, SLOTS, TRAINABLE, GRADIENTS, OPTIMIZER, ACTIVATIONS, TEXT, CODEC)
# Host categories.
SWAPPED = "swapped block weights"
SWAP_SPARE = "other host copies of swapped blocks"
STAGING = "pinned staging buffers"  # swap_staging: the blocks in flight
OFFLOADED = "offloaded activations"
TEXT_HOST = "text encoders in host memory"  # caching with text_encoder_placement="cpu"
HOST_CATEGORIES = (SWAPPED, SWAP_SPARE, STAGING, OFFLOADED, TEXT_HOST)

ALLOCATOR_BLOCK = 512  # the CUDA caching allocator's smallest block and rounding unit
CUBLAS_WORKSPACE = 32 * 2**20  # what torch gives cuBLAS per handle and stream on recent GPUs
CUDA_CONTEXT_GIB = (0.5, 1.0)  # outside torch's accounting; nvidia-smi shows it
FRAGMENTATION = (0.05, 0.10)  # reserved over allocated, typical range


def allocator_bytes(nbytes: int) -> int:
    """What the caching allocator hands out for a request: rounded up to 512 bytes."""
    return max(ALLOCATOR_BLOCK, -(-nbytes // ALLOCATOR_BLOCK) * ALLOCATOR_BLOCK) if nbytes else 0


# --- running operators on meta tensors quickly -----------------------------------------------------


_VIEWS: dict = {}  # operator -> whether it returns a view


def _returns_view(func) -> bool:
    """Whether an operator's result aliases an input without writing it (view, split, ...)."""
    if func not in _VIEWS:
        _VIEWS[func] = any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
    return _VIEWS[func]


_PLAIN = (bool, int, float, complex, str, torch.dtype, torch.device, torch.layout, torch.memory_format)


def _flatten(value, tensors: list, key: list) -> None:
    """Collect the tensors of nested arguments, and a hashable key of everything that
    decides the result's shapes: tensor shapes, strides, dtypes, devices and other values."""
    if isinstance(value, Tensor):
        tensors.append(value)
        key.append((tuple(value.shape), value.stride(), value.dtype, value.device))
    elif isinstance(value, (tuple, list)):
        if all(type(item) is int for item in value):  # a shape or a list of dims: the common case
            key.append(tuple(value))
            return
        key.append(len(value))
        for item in value:
            _flatten(item, tensors, key)
    elif isinstance(value, dict):
        _flatten(tuple(value.items()), tensors, key)
    elif value is None or isinstance(value, _PLAIN):
        key.append(value)
    else:  # e.g. a TorchScript object: not a shape-deciding value we can compare
        raise TypeError(f"cannot key on {type(value).__name__}")


def _layout(tensors: list[Tensor]) -> list:
    return [(t.shape, t.stride(), t.storage_offset()) for t in tensors]


class MetaOpCache:
    """Runs an operator on meta tensors once per (operator, argument shapes and values) and
    afterwards makes empty tensors of the remembered shapes. Views, operators whose result
    shares an input's storage, and operators that change an input's shape always run."""

    def __init__(self):
        self.results: dict = {}  # key -> description of the result, or None: always run

    def __call__(self, func, args: tuple, kwargs: dict):
        if _returns_view(func):
            return func(*args, **kwargs)
        tensors, key = [], [func]
        try:
            _flatten((args, kwargs), tensors, key)
        except TypeError:  # an argument that is not a plain value: nothing to remember
            return func(*args, **kwargs)
        key = tuple(key)
        entry = self.results.get(key, False)
        if entry is False:
            before = _layout(tensors)
            out = func(*args, **kwargs)
            cacheable = _layout(tensors) == before and not _aliases_new_input(out, tensors)
            self.results[key] = _describe(out, tensors) if cacheable else None
            return out
        if entry is None:
            return func(*args, **kwargs)
        return _rebuild(entry, tensors)


SHARED_OP_CACHE = MetaOpCache()  # results depend only on the key, so plans in one process share it


def _aliases_new_input(out, tensors: list[Tensor]) -> bool:
    """A result that is not an argument itself but shares an argument's storage (_unsafe_view)."""
    inputs = {t.untyped_storage()._cdata for t in tensors}
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return any(isinstance(o, Tensor) and all(o is not t for t in tensors)
               and o.untyped_storage()._cdata in inputs for o in outs)


def _describe(out, tensors: list[Tensor]):
    if isinstance(out, Tensor):
        for i, t in enumerate(tensors):
            if out is t:
                return ("argument", i)  # in-place and out= operators return an argument
        return ("new", tuple(out.shape), out.stride(), out.dtype, out.device)
    if isinstance(out, (tuple, list)):
        return ("sequence", type(out), tuple(_describe(o, tensors) for o in out))
    return ("value", out)


def _rebuild(entry, tensors: list[Tensor]):
    kind = entry[0]
    if kind == "argument":
        return tensors[entry[1]]
    if kind == "new":
        _, shape, stride, dtype, device = entry
        return torch.empty_strided(shape, stride, dtype=dtype, device=device)
    if kind == "sequence":
        return entry[1](_rebuild(e, tensors) for e in entry[2])
    return entry[1]


# --- counting bytes ------------------------------------------------------------------------------


@dataclass
class _Storage:
    nbytes: int
    place: str  # "device" or "host"
    category: str
    ref: object = None  # the weakref whose callback uncounts it


class MemoryTracker(TorchDispatchMode):
    """Live bytes per (place, category), and the device breakdown at the highest device total.

    Every storage an operator creates is counted as `self.category` in `self.place` (change
    them with `allocating`); tensors made before tracking are added with `track`. A storage
    is uncounted when it is freed. `run_op` runs the operators (MetaOpCache for meta
    tensors); by default they run as they are."""

    def __init__(self, device_type: str = "meta", run_op=None):
        super().__init__()
        self.device_type = device_type  # tensors elsewhere (CPU scalars such as AdamW's step count) are not counted
        self.run_op = run_op
        self.storages: dict[int, _Storage] = {}
        self.live: Counter = Counter()  # (place, category) -> bytes
        self.device_bytes = 0
        self.device_rounded = 0  # the same, each storage rounded as the allocator rounds it
        self.host_bytes = 0
        self.category, self.place = ACTIVATIONS, "device"
        self.where = "setup"  # what the step is doing, for the report
        self.largest_query = 0  # elements of the largest attention query seen (workspace estimate)
        self.counting_flops = False  # while True, `flops` adds up the operators' FLOPs (matmuls, attention)
        self.flops = 0
        self.longest_sequence = 0  # tokens of the longest attention
        self.reset_peak()

    def reset_peak(self) -> None:
        self.start_bytes = self.device_bytes  # what was live when measuring began
        self.peak_bytes = self.device_bytes
        self.peak_rounded = self.device_rounded
        self.peak_breakdown = self.breakdown("device")
        self.peak_where = self.where
        self.host_peak_bytes = self.host_bytes
        self.host_peak_breakdown = self.breakdown("host")
        self.high_water = Counter(self.live)  # (place, category) -> the most it held at once

    def breakdown(self, place: str) -> dict[str, int]:
        names = DEVICE_CATEGORIES if place == "device" else HOST_CATEGORIES
        return {name: self.live[(place, name)] for name in names}

    # -- what creates storages --

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = self.run_op(func, args, kwargs) if self.run_op else func(*args, **kwargs)
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, Tensor):
                self._add(tensor, self.category, self.place)
        if self.counting_flops and func.overloadpacket in flop_registry:  # torch's FlopCounterMode formulas
            self.flops += flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)
        return out

    @contextmanager
    def allocating(self, category: str | None = None, place: str | None = None):
        """New storages inside the block count as this category / place."""
        saved = self.category, self.place
        self.category, self.place = category or self.category, place or self.place
        try:
            yield
        finally:
            self.category, self.place = saved

    @contextmanager
    def doing(self, where: str):
        saved, self.where = self.where, where
        try:
            yield
        finally:
            self.where = saved

    def track(self, tensor: Tensor, category: str, place: str = "device") -> None:
        """Count a tensor made before tracking, or move a counted one to another category."""
        key = tensor.untyped_storage()._cdata
        entry = self.storages.get(key)
        if entry is None:
            self._add(tensor, category, place)
            return
        self._count(entry, -1)
        entry.category, entry.place = category, place
        self._count(entry, +1)

    # -- the counting itself --

    def _add(self, tensor: Tensor, category: str, place: str) -> None:
        if tensor.device.type != self.device_type:
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.storages:
            return  # a view or an in-place result: already counted
        entry = _Storage(storage.nbytes(), place, category)
        entry.ref = _weakref(storage, self._freed, key)
        self.storages[key] = entry
        self._count(entry, +1)

    def _freed(self, key: int) -> None:
        entry = self.storages.pop(key, None)
        if entry is not None:
            self._count(entry, -1)

    def _count(self, entry: _Storage, sign: int) -> None:
        key = (entry.place, entry.category)
        self.live[key] += sign * entry.nbytes
        self.high_water[key] = max(self.high_water[key], self.live[key])
        if entry.place == "host":
            self.host_bytes += sign * entry.nbytes
            if self.host_bytes > self.host_peak_bytes:
                self.host_peak_bytes = self.host_bytes
                self.host_peak_breakdown = self.breakdown("host")
            return
        self.device_bytes += sign * entry.nbytes
        self.device_rounded += sign * allocator_bytes(entry.nbytes)
        if self.device_bytes > self.peak_bytes:
            self.peak_bytes, self.peak_rounded = self.device_bytes, self.device_rounded
            self.peak_breakdown = self.breakdown("device")
            self.peak_where = self.where


def _weakref(storage, callback, key: int):
    return weakref.ref(storage, lambda _ref: callback(key))


# --- attention and activation offload as the plan counts them ----------------------------------


def flash_attention(tracker: "MemoryTracker", q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """layers.attention, through the operators CUDA's SDPA picks, so that autograd saves what
    they save: q, k, v, the output and an fp32 logsumexp (B, heads, L); never an L x L matrix.
    (F.scaled_dot_product_attention itself would take the math path on meta tensors.)"""
    tracker.largest_query = max(tracker.largest_query, q.numel())  # flash backward's fp32 dq buffer
    tracker.longest_sequence = max(tracker.longest_sequence, q.shape[2])
    if q.device.type == "cpu":  # real CPU tensors (the plan's own test): CPU flash saves the same
        if mask is not None:
            return layers.attention(q, k, v, mask)  # plain SDPA inside attention_impl
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]
    elif mask is None:
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]
    else:  # a key mask: the memory-efficient kernel, with SDPA's additive bias broadcast (no L x L memory)
        b, heads, length, _ = q.shape
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        bias = bias[:, None, None, :].expand(b, heads, length, k.shape[2])
        out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True)[0]
    return rearrange(out, "B H L D -> B L (H D)")


def offloaded_activations(tracker: MemoryTracker, cfg: dict):
    """activations.offload_activations as training runs it, with its host copies made as
    tracked meta tensors counted in host memory."""
    return offload_activations(cfg["offload_activations"], pin_memory=False, host_device=tracker.device_type,
                               allocating_host=lambda: tracker.allocating(OFFLOADED, "host"))


# --- the model, set up as training sets it up -----------------------------------------------------


@dataclass
class Setup:
    cfg: dict
    family: object  # families.Family
    params: object
    params_source: str
    prepared: training.Prepared
    opt: training.Optimization
    tracker: MemoryTracker
    flops: int = 0  # of one batch's forward and backward (walk)
    weights_moved: int = 0  # bytes block swap copied during it, both ways
    text: dict | None = None  # text encoders that train: name -> (network, inputs(device))

    @property
    def model(self) -> nn.Module:
        return self.prepared.model

    @property
    def trainable(self) -> list[nn.Parameter]:
        return self.opt.params


def model_params(family, cfg: dict) -> tuple[object, str]:
    """The model's shapes: from the checkpoint header when the file is there, else the released model's."""
    path = cfg["model_path"]
    if path and Path(path).exists():
        checkpoint = family.read_checkpoint(path, cfg)  # memory-mapped: reads the header
        return family.params(checkpoint, cfg), f"shapes read from {path}"
    overrides = " with model_overrides" if cfg["model_overrides"] else ""
    return family.default_params(cfg), f"{path or 'model_path'} not found: {family.title} released shapes{overrides}"


SWAP_CATEGORIES = {"slot": (SLOTS, "device"), "host": (SWAPPED, "host"), "master": (SWAP_SPARE, "host"),
                   "spare": (SWAP_SPARE, "host"), "staging": (STAGING, "host")}


def swap_allocator(tracker: MemoryTracker, host_device):
    """BlockSwap's `allocate`: every buffer it makes, labelled (device slots, host copies)."""

    def allocate(kind: str, nbytes: int, device, pin: bool) -> Tensor:
        category, place = SWAP_CATEGORIES[kind]
        with tracker.allocating(category, place):
            return torch.empty(nbytes, dtype=torch.uint8, device=device if place == "device" else host_device)

    return allocate


def build(cfg: dict, device: str = "meta", params=None, seed: int = 0) -> Setup:
    """The model, what trains, swap placement, optimizer and EMA of a config, set up by
    training.py as a run sets them up, on `device` ("meta" for the plan; "cpu" builds real
    tensors, which the plan's test compares against)."""
    family = families.resolve(cfg["model_family"], cfg["model_path"], cfg["allow_pickle"]).family
    params, source = model_params(family, cfg) if params is None else (params, "given shapes")
    run_op = SHARED_OP_CACHE if device == "meta" else None
    tracker = MemoryTracker(device, run_op)
    torch.manual_seed(seed)
    with _ops_through(run_op):
        with torch.device(device):
            model = family.build(params)
        model.to(DTYPES[cfg["dtype"]])
        model.requires_grad_(False)
        if cfg["fp8_base"]:
            fp8.quantize_linears_(model, [b for group in family.blocks(model).values() for b in group],
                                  per_row=cfg["fp8_per_row"])
    for t in list(model.parameters()) + list(model.buffers()):
        tracker.track(t, FROZEN)

    def label_trainable(network, trainable: dict) -> None:
        for p in trainable.values():
            tracker.track(p, TRAINABLE)
        for b in network.buffers() if network is not None else ():  # the LoRA alphas
            tracker.track(b, TRAINABLE)

    text = trained_text_encoders(cfg, family, params, tracker, device)
    with tracker, tracker.allocating(TRAINABLE):  # LoRA weights are made here
        prepared = training.prepare(model, family, cfg, device, host_device=device,
                                    allocate=swap_allocator(tracker, device), on_trainable=label_trainable,
                                    text_networks={name: network for name, (network, _) in text.items()})
    label_loaded_weights(tracker, [prepared.swap])
    with tracker, _ops_through(None):
        _label_gradients(tracker, list(prepared.trainable.values()))  # before the fused step's hooks free them
        with tracker.allocating(OPTIMIZER):
            # AdamW one tensor at a time: on CUDA training runs the fused kernel, which makes no
            # temporaries of the whole set; the per-tensor loop is its nearest relative off CUDA.
            opt = training.build_optimization(prepared.trainable, cfg, foreach=False,
                                              lr_multipliers=training.lr_multipliers(family, cfg, prepared.trainable))
    return Setup(cfg, family, params, source, prepared, opt, tracker, text=text)


def trained_text_encoders(cfg: dict, family, params, tracker: MemoryTracker, device) -> dict:
    """The text encoders of text_encoder_lr, built as caching builds them and kept on the device
    through training (counted as text encoders): name -> (network, inputs(device))."""
    if not cfg["text_encoder_lr"]:
        return {}
    per_step = {**cfg, "text_batch_size": cfg["batch_size"]}  # a training batch's captions
    encoders = [e for e in family.plan_text_encoders(per_step, params) if e[0] in cfg["text_encoder_lr"]]
    text = {}
    with tracker, tracker.allocating(TEXT), _ops_through(tracker.run_op), torch.device(device):
        for name, build, inputs in encoders:
            text[name] = (build().eval().requires_grad_(False), inputs)
    return text


def label_loaded_weights(tracker: MemoryTracker, swaps: list) -> None:
    """swap_staging: the swapped weights stay where loading left them, in host memory."""
    for swap in swaps:
        for t in swap.loaded_weights() if swap is not None else ():
            tracker.track(t, SWAPPED, "host")


@contextmanager
def _ops_through(run_op):
    """Run setup operators through the meta cache too (fp8 quantization runs ~10 ops per Linear)."""
    if run_op is None:
        yield
        return

    class _Cached(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return run_op(func, args, kwargs or {})

    with _Cached():
        yield


# --- one training step ---------------------------------------------------------------------------


def prime_optimizer(setup: Setup) -> None:
    """Create the optimizer state (and FusedBackwardStep's bookkeeping) through the training code:
    a backward through a trivial graph gives every trainable weight a gradient, then a step."""
    tracker = setup.tracker
    with tracker.allocating(OPTIMIZER), tracker.doing("creating the optimizer state"):
        loss = sum((p.float() * 0).sum() for p in setup.trainable)
        loss.backward()  # what outlives this block was made by the optimizer: its state
        finish_step(setup)


def finish_step(setup: Setup) -> None:
    """What the training loop does after the backward passes of a step."""
    training.close_gradients(setup.opt, setup.cfg)
    ema = setup.opt.ema
    training.apply_step(setup.opt, ema.update_every if ema is not None else 1)  # a step on which the EMA updates


def _label_gradients(tracker: MemoryTracker, trainable: list[nn.Parameter]) -> None:
    """A finished gradient counts as a gradient (until then it is an autograd temporary)."""

    def hook(p):
        if p.grad is not None:
            tracker.track(p.grad, GRADIENTS)

    for p in trainable:
        p.register_post_accumulate_grad_hook(hook)


def _label_blocks(setup: Setup) -> list:
    """Hooks that tell the tracker which block runs, in forward and in backward."""
    tracker, handles = setup.tracker, []
    for kind, blocks in setup.family.blocks(setup.model).items():
        for index, block in enumerate(blocks):
            name = f"{kind}.{index}"

            def pre(module, args, name=name):
                tracker.where = f"forward, {name}"

            def post(module, args, outputs, name=name):
                for t in outputs if isinstance(outputs, (tuple, list)) else (outputs,):
                    if isinstance(t, Tensor) and t.requires_grad:  # its gradient arrives as the block's backward starts
                        t.register_hook(lambda grad, name=name: setattr(tracker, "where", f"backward, {name}"))

            handles += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
    return handles


def triton_like_cuda(cfg: dict) -> bool:
    """Whether training on CUDA runs the Triton kernels (element-wise chains, optimizer updates):
    kernels="auto" or "triton", whether or not triton is installed where the plan is made."""
    return cfg["kernels"] in ("auto", "triton")


def walk(setup: Setup, measure=nullcontext) -> None:
    """Prime the optimizer, then run one measured training step; `measure()` wraps the step."""
    cfg, tracker, model, family = setup.cfg, setup.tracker, setup.model, setup.family
    device = next(model.parameters()).device
    objective = family.objective(cfg)
    triton = device.type == "meta" and triton_like_cuda(cfg)
    handles = _label_blocks(setup)
    try:
        # On meta, Triton's element-wise kernels run their fake (shape) versions and the optimizer
        # kernels their host code without launching: what a CUDA run allocates, counted.
        with tracker, layers.using_kernels("triton" if triton else "torch"), \
                layers.attention_impl(partial(flash_attention, tracker)), \
                kernels_optim.launches_skipped() if triton else nullcontext():
            prime_optimizer(setup)
            tracker.reset_peak()
            swap, batches = setup.prepared.swap, min(cfg["gradient_accumulation_steps"], 2)
            moved = sum(swap.bytes_moved.values()) if swap is not None else 0
            tracker.flops, tracker.counting_flops = 0, True
            with measure():
                for _ in range(batches):  # a second one meets live gradients
                    with tracker.doing("loading the batch"):
                        batch = family.plan_batch(cfg, setup.params, device)
                    with tracker.doing("forward"), offloaded_activations(tracker, cfg):
                        loss = training.training_loss(family, objective, model, batch, cfg)[0]
                        for network, inputs in (setup.text or {}).values():  # captions encoded with gradients
                            loss = loss + network(**inputs(device))[0].float().sum() * 0
                    with tracker.doing("backward"):
                        loss.backward()
                    del loss, batch
                tracker.counting_flops = False
                setup.flops = tracker.flops // batches
                setup.weights_moved = ((sum(swap.bytes_moved.values()) if swap is not None else 0) - moved) // batches
                with tracker.doing("optimizer step"):
                    finish_step(setup)
    finally:
        for handle in handles:
            handle.remove()


# --- the plan ------------------------------------------------------------------------------------


def plan(cfg: dict, params=None, gpus: int = 1) -> dict:
    """Plan a whole run of `cfg` on the meta device: caching (the autoencoder and the text
    encoders, each within the config's placement), one training step, and sampling (a no-grad
    forward with the training state resident, then the decode). Returns the numbers, in bytes:
    the training step's breakdown (device: category -> bytes at its peak, peak_bytes, peak_where,
    device_high_water, allocator_rounding_bytes, host, host_bytes, swap), `stages` (each
    Stage of each phase) and `phases` (phase -> peak bytes, "whole run" their maximum). On
    `gpus` GPUs (torchrun) with FSDP, `phases` are per GPU and `several` holds their parts."""
    start = time.perf_counter()
    mode = distributed.check(cfg, gpus)  # what cannot run on that many GPUs is refused here, too
    setup = build(cfg, "meta", params)
    walk(setup)
    result = summarize(setup)
    training_stage = Stage("training", "one step", result["peak_bytes"], result["peak_bytes"] - setup.tracker.start_bytes,
                           result["host_bytes"])
    stages = plan_caching(cfg, setup.family, setup.params) + [training_stage] + plan_sampling(setup, result["peak_bytes"])
    result["stages"] = stages
    result["phases"] = {phase: max(s.peak for s in stages if s.phase == phase)
                        for phase in ("caching", "training", "sampling")}
    result["phases"]["whole run"] = max(result["phases"].values())
    result["host_phases"] = {phase: max(s.host for s in stages if s.phase == phase)
                             for phase in ("caching", "training", "sampling")}
    result["host_phases"]["whole run"] = max(result["host_phases"].values())
    result["several"] = several_gpus(setup, result, gpus, mode)
    result["seconds"] = time.perf_counter() - start
    return result


# --- several GPUs ------------------------------------------------------------------------------------

FSDP_MASTERS = "fp32 master weights (1/N each)"
FSDP_GRADIENTS = "fp32 gradients (1/N each)"
FSDP_OPTIMIZER = "AdamW state (and EMA), fp32 (1/N each)"
FSDP_GATHERED = "gathered: two blocks and the root's weights"
FSDP_REDUCING = "one block's gradients, to reduce-scatter"


def several_gpus(setup: Setup, result: dict, gpus: int, mode: str) -> dict | None:
    """Per-GPU figures on `gpus` GPUs. Data parallel: each GPU holds the one-GPU figures (the
    walk ran at batch_size per GPU); the all-reduce adds one flat bucket after backward. FSDP:
    estimated from the walk, which measured the activations of one GPU's rows: the fp32 masters,
    gradients and AdamW state (and EMA) divided over the GPUs, plus the blocks gathered for
    compute in the config's dtype (the running one and the prefetched next) and one block's
    gradients on their way to the reduce-scatter. `phases` become per GPU."""
    if mode == "single":
        return None
    trained = result["trainable_parameters"]
    if mode == "ddp":
        return {"gpus": gpus, "mode": mode, "bucket": min(distributed.BUCKET_BYTES, 4 * trained)}
    compute = DTYPES[setup.cfg["dtype"]].itemsize
    blocks = [b for group in setup.family.blocks(setup.model).values() for b in group]
    largest = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    root = result["parameters"] - sum(p.numel() for b in blocks for p in b.parameters())
    state = (8 + (4 if setup.cfg["ema_decay"] else 0)) * trained
    parts = {FSDP_MASTERS: 4 * result["parameters"] // gpus, FSDP_GRADIENTS: 4 * trained // gpus,
             FSDP_OPTIMIZER: state // gpus, FSDP_GATHERED: (2 * largest + root) * compute,
             FSDP_REDUCING: largest * (compute + 4), ACTIVATIONS: result["device_high_water"][ACTIVATIONS]}
    resident = parts[FSDP_MASTERS] + parts[FSDP_OPTIMIZER] + parts[FSDP_GATHERED]
    sampling = [s.increase for s in result["stages"] if s.phase == "sampling"]
    phases = result["phases"]
    phases["training"] = sum(parts.values())
    phases["sampling"] = resident + max(sampling, default=0)
    phases["whole run"] = max(phases["caching"], phases["training"], phases["sampling"])
    return {"gpus": gpus, "mode": mode, "parts": parts}


def format_several(result: dict, cfg: dict) -> list[str]:
    several = result["several"]
    if several is None:
        return []
    n = several["gpus"]
    if several["mode"] == "ddp":
        note = distributed.auto_note(cfg, "ddp")
        return [f"several GPUs: data parallel over {n}: every GPU holds the one-GPU figures above (batch_size "
                f"{cfg['batch_size']} per GPU, a global batch of {cfg['batch_size'] * n}); after backward the "
                f"gradient all-reduce adds one flat bucket of {several['bucket'] / MiB:,.0f} MiB"] \
            + ([note] if note else []) + [""]
    lines = [f"several GPUs: FSDP2 over {n}, per GPU, estimated from the one-GPU step (batch_size "
             f"{cfg['batch_size']} per GPU)", "".ljust(60) + "GiB"]
    lines += [_row(name.replace("1/N", f"1/{n}"), f"{value / GiB:.2f}") for name, value in several["parts"].items()]
    lines += ["  " + "-" * 61, _row("planned peak per GPU, training", f"{result['phases']['training'] / GiB:.2f}"),
              "  (the stages below are one GPU's run; the 'planned peak' lines are per GPU)", ""]
    return lines


# --- the phases around the training step --------------------------------------------------------------


@dataclass
class Stage:
    phase: str  # "caching", "training" or "sampling"
    what: str
    peak: int  # bytes on the device at the stage's highest point
    increase: int  # of which the stage itself added (the rest was there before it began)
    host: int = 0  # bytes of host memory for tensors at the stage's highest point


@contextmanager
def counted_as_cuda(tracker: MemoryTracker, cfg: dict):
    """The walk's conventions: kernels and attention as CUDA runs them, launches skipped."""
    triton = tracker.device_type == "meta" and triton_like_cuda(cfg)
    with tracker, layers.using_kernels("triton" if triton else "torch"), \
            layers.attention_impl(partial(flash_attention, tracker)), \
            kernels_optim.launches_skipped() if triton else nullcontext():
        yield


@contextmanager
def stage(tracker: MemoryTracker, phase: str, what: str, out: list, measure=nullcontext):
    """Run a block without gradients as one stage: its peak is appended to `out` as a Stage.
    `measure()` wraps the block (tests put the CPU allocator's profiler there)."""
    tracker.reset_peak()
    with tracker.doing(f"{phase}: {what}"), torch.no_grad(), measure():
        yield
    out.append(Stage(phase, what, tracker.peak_bytes, tracker.peak_bytes - tracker.start_bytes, tracker.host_peak_bytes))


def plan_sampling(setup: Setup, training_peak: int, measure=nullcontext) -> list[Stage]:
    """Samples between steps: the training state stays (weights, trainable weights, optimizer
    state, EMA; the gradients are gone), the denoiser runs without gradients at the sample size,
    then the autoencoder comes to the device and decodes, whole or in tiles (vae_tile_size: -1
    tiles when a whole decode would raise the training peak)."""
    cfg, family, tracker, model = setup.cfg, setup.family, setup.tracker, setup.model
    device, stages = next(model.parameters()).device, []
    model.eval()
    with counted_as_cuda(tracker, cfg):
        with stage(tracker, "sampling", "the denoiser, no gradients", stages, measure):
            batch = family.plan_batch(dict(cfg, batch_size=1), setup.params, device)
            x0 = batch["latent"].float()
            noised = family.objective(cfg).noised(x0, None, family.seq_len(x0))
            latent = family.predict(model, noised.x_t, noised.t, family.conditioning(batch, cfg)).float()
            del batch, x0, noised
        stages += plan_decode(setup, latent, training_peak, measure)
    model.train()
    return stages


def plan_decode(setup: Setup, latent: Tensor, training_peak: int, measure=nullcontext) -> list[Stage]:
    """The decode of one sample with the autoencoder on the device (nothing for pixel models)."""
    cfg, tracker = setup.cfg, setup.tracker
    with tracker.allocating(CODEC), _ops_through(setup.tracker.run_op), torch.device(latent.device):
        codec = setup.family.plan_codec(cfg, setup.params)
        if codec is None:
            return []
        codec = codec.to(setup.family.codec_dtype(cfg))
    z = latent.to(setup.family.codec_dtype(cfg))
    tiles = [cfg["vae_tile_size"]] if cfg["vae_tile_size"] >= 0 else [0, sample.AUTO_TILE]
    for tile in tiles:
        stages = []
        with stage(tracker, "sampling", f"the decode ({f'tiles of {tile} latent px' if tile else 'whole'})", stages,
                   measure):
            pixels = decode_tiled(codec, z, tile, max(1, tile // 8)) if tile else codec.decode(z)
            del pixels
        if stages[0].peak <= training_peak or tile == tiles[-1]:
            return stages
    raise AssertionError("unreachable")


def plan_caching(cfg: dict, family, params, device="meta", measure=nullcontext) -> list[Stage]:
    """Before the denoiser loads: the autoencoder encodes vae_batch_size images, then the text
    encoders, placed as text_encoder_placement / text_encoder_fp8 say, encode text_batch_size
    captions. Each stage on a fresh device (the previous one has left it)."""
    dtype, stages = family.codec_dtype(cfg), []
    tracker = MemoryTracker(str(device), SHARED_OP_CACHE if str(device) == "meta" else None)
    with tracker, tracker.allocating(CODEC), _ops_through(tracker.run_op), torch.device(device):
        codec = family.plan_codec(cfg, params)
        codec = codec.to(dtype) if codec is not None else None
    if codec is not None:
        with counted_as_cuda(tracker, cfg), stage(tracker, "caching", f"the autoencoder encodes "
                                                   f"{cfg['vae_batch_size']} image(s)", stages, measure):
            size = cfg["resolution"]
            codec.encode(torch.randn(cfg["vae_batch_size"], 3, size, size, device=device, dtype=dtype))
    del codec
    return stages + plan_text_encoding(cfg, family, params, device, measure)


def plan_text_encoding(cfg: dict, family, params, device="meta", measure=nullcontext) -> list[Stage]:
    """The text encoders as caching holds them (all at once, placed), each running in turn."""
    tracker = MemoryTracker(str(device), SHARED_OP_CACHE if str(device) == "meta" else None)
    encoders = family.plan_text_encoders(cfg, params)
    with tracker, tracker.allocating(TEXT), _ops_through(tracker.run_op), torch.device(device):
        networks = {name: build() for name, build, _ in encoders}
        swaps = training.place_text_encoders(networks, cfg, device, host_device=device,
                                             allocate=swap_allocator(tracker, device))
    label_loaded_weights(tracker, swaps)
    if cfg["text_encoder_placement"] == "cpu":  # they stay in host memory and run there
        for net in networks.values():
            for t in list(net.parameters()) + list(net.buffers()):
                tracker.track(t, TEXT_HOST, "host")
    how = {"device": "on the device", "stream": "layers streamed", "cpu": "on the CPU"}[cfg["text_encoder_placement"]]
    what = f"the text encoders ({', '.join(networks)}; {how}{', fp8' if cfg['text_encoder_fp8'] else ''})"
    stages = []
    with counted_as_cuda(tracker, cfg), stage(tracker, "caching", what, stages, measure):
        if cfg["text_encoder_placement"] != "cpu":
            for name, _, inputs in encoders:
                networks[name](**inputs(device))
    del swaps, networks
    return stages


def swap_summary(setup: Setup) -> dict:
    """Per group of blocks: how many swap, of how many, through how many slots, and the bytes
    of its largest block (what swapping one more saves at most)."""
    swap = setup.prepared.swap
    if swap is not None and swap.ring:
        ring = next(iter(swap.groups.values()))
        return {ring.name: {"swapped": ring.num_blocks, "of": ring.num_blocks, "blocks": list(range(ring.num_blocks)),
                            "mode": setup.cfg["swap_mode"], "device_slots": ring.num_slots,
                            "bytes_per_block": ring.buffer_bytes, "ring": True}}
    out = {}
    for name, blocks in setup.family.blocks(setup.model).items():
        swapped = 0 if swap is None or name not in swap.groups else len(blocks) - swap.groups[name].num_slots
        out[name] = {"swapped": swapped, "of": len(blocks), "blocks": list(range(len(blocks) - swapped, len(blocks))),
                     "mode": setup.cfg["swap_mode"], "device_slots": min(swapped, len(blocks) - swapped),
                     "bytes_per_block": max(blockswap.block_bytes(b) for b in blocks)}
    return out


def summarize(setup: Setup, seconds: float = 0.0) -> dict:
    tracker, cfg = setup.tracker, setup.cfg
    host = {SWAPPED: tracker.live[("host", SWAPPED)], SWAP_SPARE: tracker.live[("host", SWAP_SPARE)],
            STAGING: tracker.live[("host", STAGING)],
            OFFLOADED: tracker.host_peak_breakdown[OFFLOADED]}  # offloaded activations at their highest
    return {
        "device": dict(tracker.peak_breakdown),
        "peak_bytes": tracker.peak_bytes,
        "peak_where": tracker.peak_where,
        "device_high_water": {name: tracker.high_water[("device", name)] for name in DEVICE_CATEGORIES},
        "allocator_rounding_bytes": tracker.peak_rounded - tracker.peak_bytes,
        # flash backward accumulates dq in fp32 (the query's size) inside the kernel, beside cuBLAS's workspace
        "workspace_bytes": CUBLAS_WORKSPACE + 4 * tracker.largest_query,
        "host": host,
        "host_bytes": sum(host.values()),
        "swap": swap_summary(setup),
        "flops": setup.flops,
        "bytes_moved": {"block weights": setup.weights_moved,
                        "activations": 2 * host[OFFLOADED]},  # to the host in forward, back in backward
        "parameters": sum(p.numel() for p in setup.model.parameters()),
        "trainable_parameters": sum(p.numel() for p in setup.trainable),
        "tokens": tracker.longest_sequence,
        "model": setup.family.describe(setup.params),
        "params_source": setup.params_source,
        "kernels": "Triton" if triton_like_cuda(cfg) else "torch",
        "seconds": seconds,
    }


def _row(name: str, value: str) -> str:
    return f"  {name:<52}{value:>9}"


def format_plan(result: dict, cfg: dict) -> str:
    """The printed table: device memory at the peak, margins, host memory, block swap."""
    gib = lambda n: f"{n / GiB:.2f}"  # noqa: E731
    trained = f"LoRA rank {cfg['network_dim']}" if cfg["train_mode"] == "lora" else "full fine-tuning"
    switches = [cfg["dtype"] + (" + fp8 base" if cfg["fp8_base"] else ""), cfg["optimizer"],
                "fused step" if cfg["fused_backward"] else "", "checkpointing" if cfg["gradient_checkpointing"] else "",
                "offloaded activations" if cfg["offload_activations"] else ""]
    lines = [
        f"memory plan: {trained} ({result['trainable_parameters'] / 1e6:,.1f} M of "
        f"{result['parameters'] / 1e6:,.1f} M parameters train); {', '.join(s for s in switches if s)}",
        f"  {result['model']}, {cfg['resolution']} px, batch {cfg['batch_size']}: attention over {result['tokens']} "
        f"tokens per sample; {result['params_source']}",
        f"  attention counted as flash (no L x L matrix); element-wise chains and optimizer updates as "
        f"{result['kernels']} code",
        "",
        f"the training step: device memory at its peak ({result['peak_where']})".ljust(60) + "GiB",
    ]
    lines += [_row(name, gib(n)) for name, n in result["device"].items() if n or name not in (TEXT, CODEC)]
    lines += ["  " + "-" * 61, _row("planned peak (bytes torch allocates)", gib(result["peak_bytes"]))]
    most = result["device_high_water"]
    lines.append(f"  (the most at any moment: gradients {gib(most[GRADIENTS])}, activations and temporaries "
                 f"{gib(most[ACTIVATIONS])})")
    rounded = result["peak_bytes"] + result["allocator_rounding_bytes"]
    low, high = expected_nvidia_smi(result)
    lines += [
        "margins outside the plan",
        _row("allocator rounding (512-byte blocks)", gib(result["allocator_rounding_bytes"])),
        _row("fragmentation (reserved over allocated), 5-10 %",
             f"{rounded * FRAGMENTATION[0] / GiB:.2f}-{rounded * FRAGMENTATION[1] / GiB:.2f}"),
        _row("cuBLAS workspace, flash backward's fp32 dq buffer", gib(result["workspace_bytes"])),
        _row("CUDA context (nvidia-smi only)", f"{CUDA_CONTEXT_GIB[0]:.1f}-{CUDA_CONTEXT_GIB[1]:.1f}"),
        _row("so nvidia-smi should show about (whole run)", f"{low / GiB:.1f}-{high / GiB:.1f}"),
        "",
    ]
    sections = [lines, format_host(result, cfg), format_swap(result), [""], format_time(result), [""],
                format_several(result, cfg), format_phases(result)]
    return "\n".join(line for section in sections for line in section)


def format_host(result: dict, cfg: dict) -> list[str]:
    """Host memory while training, by kind."""
    def label(name: str) -> str:
        if name == SWAPPED and cfg["swap_staging"]:
            return name + " (as loaded)"
        return name + (" (pinned)" if cfg["pin_memory"] else " (pageable)") if name in (SWAPPED, SWAP_SPARE) else name

    lines = ["host memory while training".ljust(60) + "GiB"]
    lines += [_row(label(name), f"{n / GiB:.2f}") for name, n in result["host"].items() if n or name != STAGING]
    return lines + [
        _row("host memory for tensors", f"{result['host_bytes'] / GiB:.2f}"),
        "  plus the process itself (Python, torch, the CUDA runtime: a few GB), and the page cache",
        "  of the memory-mapped checkpoint while it loads",
        "",
    ]


# Link rates of the PCIe slots a consumer GPU sits in: GT/s per lane x lanes x 128/130 encoding / 8 bits.
PCIE = {"PCIe 3.0 x8": 8 * 8 * 128 / 130 / 8 * 1e9, "PCIe 4.0 x16": 16 * 16 * 128 / 130 / 8 * 1e9}


def format_time(result: dict) -> list[str]:
    """Bytes over the PCIe link per training step against the step's arithmetic: where the link
    time stays below the compute time the copies hide behind compute (they overlap on a side
    stream) and the card is compute-bound."""
    moved = result["bytes_moved"]
    total, flops = sum(moved.values()), result["flops"]
    lines = ["time of a training step, estimated (a plan cannot time; bench/gpu_check.py measures)",
             f"  over the PCIe link per step: {moved['block weights'] / 1e9:.1f} GB of block weights, "
             f"{moved['activations'] / 1e9:.1f} GB of offloaded activations (out and back): {total / 1e9:.1f} GB"]
    if total:
        lines.append("  transfer time: " + ", ".join(f"{total / rate:.2f} s at {name} ({rate / 1e9:.1f} GB/s)"
                                                    for name, rate in PCIE.items()))
    lines.append(f"  arithmetic: {flops / 1e12:,.0f} TFLOP per step (matmuls and attention: forward, recompute, "
                 f"backward): {flops / 10e12:.1f} s at 10 TFLOP/s sustained, {flops / 50e12:.1f} s at 50")
    if total:
        lines.append("  so a card is transfer-bound only above " + ", ".join(
            f"{flops / (total / rate) / 1e12:,.0f} TFLOP/s sustained at {name}" for name, rate in PCIE.items()))
    return lines


def format_phases(result: dict) -> list[str]:
    """Each phase's stages, then the summary lines scripts read (their wording is fixed)."""
    lines = ["the whole run: peak memory of each stage (planned)".ljust(52) + "device GiB  host GiB"]
    lines += [f"  {s.phase + ': ' + s.what:<56}{s.peak / GiB:>6.2f}{s.host / GiB:>10.2f}" for s in result["stages"]]
    lines += [f"planned peak, {name}: {peak / GiB:.2f} GiB" for name, peak in result["phases"].items()]
    lines.append(f"planned host memory for tensors, whole run: {result['host_phases']['whole run'] / GiB:.2f} GiB")
    return lines


def expected_nvidia_smi(result: dict) -> tuple[float, float]:
    """The planned peak of the whole run with the margins added, low and high, in bytes."""
    peak = result.get("phases", {}).get("whole run", result["peak_bytes"])
    rounded = peak + result["allocator_rounding_bytes"] + result["workspace_bytes"]
    low = rounded * (1 + FRAGMENTATION[0]) + CUDA_CONTEXT_GIB[0] * GiB
    high = rounded * (1 + FRAGMENTATION[1]) + CUDA_CONTEXT_GIB[1] * GiB
    return low, high


def format_swap(result: dict) -> list[str]:
    """Which blocks are swapped, and what swapping one saves."""
    lines = []
    for name, s in result["swap"].items():
        per = f"{s['bytes_per_block'] / MiB:,.0f} MiB"
        if s.get("ring"):
            lines.append(f"block swap ({s['mode']}): every block of {name.replace(blockswap.RING, ' and ')} "
                         f"({s['of']}) streams through one ring of {s['device_slots']} device slots of {per}")
        elif s["swapped"]:
            first, last = s["blocks"][0], s["blocks"][-1]
            lines.append(f"block swap ({s['mode']}): {name} {s['swapped']} of {s['of']} swapped, blocks {first}-{last} "
                         f"start in host memory and pass through {s['device_slots']} device slots; "
                         f"{per} saved per block")
        else:
            lines.append(f"block swap: no {name} swapped; swapping one would save {per}")
    return lines


def main(cfg: dict) -> dict:
    """`python train.py CONFIG --plan [--plan_gpus=N]`: print the plan and return its numbers."""
    result = plan(cfg, gpus=cfg["plan_gpus"])
    print(format_plan(result, cfg))
    print(f"(planned in {result['seconds']:.1f} s without reading a weight)")
    return result
