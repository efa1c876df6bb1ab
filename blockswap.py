"""Block swap: keep only some of a network's blocks' weights on the compute device.

FLUX.1 [dev] holds 19 double and 38 single blocks, about 24 GB in bf16. With block swap the
weights of a block that is not running live in host memory and are copied in just before the
block runs, in forward (first to last) and in backward (last to first). Only the big weights
move: the `.weight` of every nn.Linear and nn.Conv1d/2d in a block (an fp8 Linear from fp8.py
included). Biases, norm scales, buffers, gradients and LoRA weights (lora.py keeps them
outside the network's module tree) stay on the device. The Parameter objects are kept; only
their `.data` is re-pointed, so optimizers and LoRA hooks never notice.

What swaps is named by the family (families/: `Family.blocks` gives the groups of blocks in
execution order, `Family.swap_counts` how many of each group swap, with kohya's rules). A
group's blocks may differ in shape (SD3's pre-only last block, SD3.5 Medium's attn2 blocks,
SDXL's levels): each device slot is one byte buffer sized for the largest block of its group,
and a block's weights are views into it at fixed offsets.

The schedule. A group of N blocks of which S are swapped gets K = N - S device slots, and
block b always uses slot b % K:

    N = 6, S = 4, K = 2      slot 0: blocks 0, 2, 4      slot 1: blocks 1, 3, 5
    forward:   run 0 -> load 2 into slot 0 | run 1 -> load 3 | run 2 -> load 4 | ...
    backward:  start 4 (5 is done) -> load 3 into slot 1 | start 3 -> load 2 | ...

A load is issued as soon as the slot's previous block is finished, so it overlaps the
compute of the K - 1 blocks in between. After a backward the slots hold blocks 0..K-1
again, the layout a forward starts from; a forward-only pass (sampling, validation) wraps
around at its end and leaves the same layout, so training and sampling alternate freely.
Because a block returns to the same slot (the same device memory) for its backward, the
tensors autograd saved in forward are valid again when it runs; this works with and
without gradient checkpointing. Slots that no swapped block passes through (S < K) keep
their block as it is.

One ring for every block (`ring=K`): instead of slots per group, every block of every group
streams through one ring of K device slots, each sized for the largest block of all groups
(FLUX: two slots of a double block's size, through which the 19 double and 38 single blocks
pass in turn). The groups must run one after another in the order given (a family's `blocks`
lists them so); block b of the concatenated order uses slot b % K, and everything above holds
with the groups' blocks numbered as one list.

Modes:
- "exchange" (sd-scripts, OneTrainer): the outgoing block's weights are copied back to the
  host before the slot receives the incoming block. Needed when the swapped weights are
  trained (full fine-tuning); the optimizer must then step each weight while its block is
  resident, i.e. the step fused into backward (optim.py). Host memory: the S blocks that
  are out plus one spare buffer that receives the next outgoing block.
- "h2d_only" (musubi-tuner's LoRAStreamOffloader): for frozen swapped weights (LoRA on a
  frozen or fp8 base). The host copy is the master, nothing is copied back: half the
  transfers. A swapped weight that requires grad is refused.

Host memory, h2d_only (`staging`): by default each swapped block's weights are copied into a
host buffer of their own (pinned with `pin_memory`), which becomes the master. With
`staging=True` no host copy is made: the master is the tensors loading produced (views into
the memory-mapped checkpoint for a released fp8 file, or the fp8 weights quantized in host
memory), pageable, so the OS manages them; each load copies the block into one of two pinned
staging buffers (the blocks in flight) and from there to its slot. For a machine on which
pinned copies of every swapped block would not fit.

Signals come from module hooks on each block, so a network's forward knows nothing of
swapping: a forward pre-hook waits for the block's load; a forward hook issues the next
load and puts a hook on the block's outputs, which fires in backward before any of the
block's backward work, including its checkpoint recompute (activations.py checkpoints
inside the block's forward, so these hooks never fire in a recompute). Autograd runs the
nodes of a graph in reverse order of creation, so when block b's outputs receive their
gradient, block b + 1's backward is complete and its slot can be refilled.

CUDA: copies run on one persistent side stream, ordered against the compute stream with
events (no host synchronisation; with staging, the host waits for a staging buffer's previous
copy, issued two loads earlier, before refilling it), from pinned host memory (`pin_memory=True`; with pageable
memory a copy back to the host makes the CPU wait for the GPU, so there is less overlap).
Everywhere else the same code runs with synchronous copies: with device="cpu" the "device
slots" are CPU buffers of their own, distinct from the host copies, so the bookkeeping, the
re-pointing and the schedule are exercised all the same (tests/test_blockswap.py also delays
each copy until it is waited for, as a side stream would). The memory plan runs this code on
the meta device (`host_device="meta"`, with an `allocate` callback that labels the buffers).
`stalls` counts blocks whose load could not overlap any compute; it stays 0 in steady
training and sampling.

Before reading swapped weights on the host (saving a full fine-tune, EMA, the final file),
call `synchronize()`; `remove()` puts every weight back on the device.
"""
import contextlib

import torch
from torch import Tensor, nn

MODES = ("exchange", "h2d_only")
MIN_RESIDENT = 2  # at least two blocks of each group stay: one runs while the next loads
STAGING_BUFFERS = 2  # with staging: pinned buffers per group, for the loads in flight (one lands, one fills)
ALIGN = 256  # byte alignment of each weight inside a slot buffer (what CUDA kernels expect)
SWAPPABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def swappable_weights(block: nn.Module) -> list[nn.Parameter]:
    """The weights that move: `.weight` of every Linear and Conv in the block, in module order."""
    return [m.weight for m in block.modules() if isinstance(m, SWAPPABLE)]


def block_bytes(block: nn.Module) -> int:
    """Bytes that swapping this block moves (and saves on the device)."""
    return sum(w.numel() * w.element_size() for w in swappable_weights(block))


def check_counts(groups: dict[str, list[nn.Module]], counts: dict[str, int]) -> dict[str, int]:
    """Each group swaps 0 to N - MIN_RESIDENT blocks; a ValueError says what is possible."""
    unknown = sorted(set(counts) - set(groups))
    if unknown:
        raise ValueError(f"no block group named {unknown}; this model's groups are {list(groups)}")
    for name, n in counts.items():
        size = len(groups[name])
        if not isinstance(n, int) or not 0 <= n <= size - MIN_RESIDENT:
            raise ValueError(f"{name}: cannot swap {n!r} of {size} blocks; choose 0 to "
                             f"{max(size - MIN_RESIDENT, 0)} ({MIN_RESIDENT} must stay on the device)")
    return {name: counts.get(name, 0) for name in groups}


def check_ring(groups: dict[str, list[nn.Module]], slots: int) -> None:
    """A ring of `slots` device slots for every block of `groups`: 2 to the number of blocks."""
    total = sum(len(blocks) for blocks in groups.values())
    if not isinstance(slots, int) or not MIN_RESIDENT <= slots <= total:
        raise ValueError(f"a ring of {slots!r} device slots for {total} blocks: choose {MIN_RESIDENT} to {total} "
                         "(one block computes while the next loads)")


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _views(buffer: Tensor, like: list[Tensor]) -> list[Tensor]:
    """Tensors shaped and typed as `like`, laid out one after another (aligned) in a byte buffer."""
    views, offset = [], 0
    for t in like:
        nbytes = t.numel() * t.element_size()
        views.append(buffer[offset : offset + nbytes].view(t.dtype).view(t.shape))
        offset += _aligned(nbytes)
    return views


def _layout_bytes(weights: list[Tensor]) -> int:
    return sum(_aligned(w.numel() * w.element_size()) for w in weights)


# --- one group of blocks -------------------------------------------------------------------------


class _Group:
    """The blocks of one group (or of the ring), their K device slots and their host copies."""

    def __init__(self, name: str, blocks: list[nn.Module], num_swapped: int):
        self.name = name
        self.num_blocks = len(blocks)
        self.num_slots = self.num_blocks - num_swapped  # K
        self.weights = [swappable_weights(b) for b in blocks]  # block -> its Parameters, fixed order
        self.buffer_bytes = max(_layout_bytes(ws) for ws in self.weights)  # a slot fits the largest block
        self.occupant = list(range(self.num_slots))  # slot -> block whose weights it holds
        self.slots: list[Tensor | None] = [None] * self.num_slots  # slot -> byte buffer (shared slots only)
        self.ready: list = [None] * self.num_slots  # slot -> CUDA event recorded after its last load
        self.loaded_at = [0] * self.num_slots  # slot -> the block start (BlockSwap.clock) of its last load
        self.host: list[Tensor | None] = [None] * self.num_blocks  # block -> host byte buffer
        self.loaded: list[list[Tensor] | None] = [None] * self.num_blocks  # staging: block -> its weights as loaded
        self.staging: list[Tensor] = []  # staging: pinned byte buffers for the loads in flight, used in turn
        self.staging_free: list = []  # staging: per buffer, the CUDA event after which it may be refilled
        self.loads = 0  # loads issued (which staging buffer is next)
        self.spare: Tensor | None = None  # exchange: the host buffer that receives the next outgoing block
        self.expects_backward = False  # did the last forward of a block build a graph?
        self.backward_started: int | None = None  # the block whose backward began last

    def slot_of(self, block: int) -> int:
        return block % self.num_slots

    def shares_slot(self, block: int) -> bool:
        """Whether another block uses this block's slot (otherwise it never moves)."""
        return self.slot_of(block) + self.num_slots < self.num_blocks

    def moving_blocks(self) -> list[int]:
        return [b for b in range(self.num_blocks) if self.shares_slot(b)]

    def block_bytes(self, block: int) -> int:
        return sum(w.numel() * w.element_size() for w in self.weights[block])

    def master(self, block: int) -> list[Tensor]:
        """Where the block's weights wait while it is out: views of its host buffer, or (staging)
        the tensors loading made."""
        if self.loaded[block] is not None:
            return self.loaded[block]
        return _views(self.host[block], self.weights[block])


# --- the swapper ---------------------------------------------------------------------------------

RING = "+"  # joins the group names into the ring's name ("double_blocks+single_blocks")


class BlockSwap:
    """Swap `counts[name]` blocks of each group in `groups` (name -> blocks in execution order),
    or, with `ring=K`, stream every block of every group through one ring of K device slots
    (the groups run one after another in the order given; `counts` is then ignored).

    Everything of `model` except the moving blocks' weights is moved to `device`; blocks
    0..K-1 of each group (of the ring) start resident. Build it after fp8 conversion (fp8.py)
    and LoRA injection, before training starts; `remove()` undoes it. `staging=True`
    (h2d_only) reads the swapped weights where loading left them instead of copying them into
    host buffers of its own, through pinned staging buffers (module docstring).

    `allocate(kind, nbytes, device, pin)` makes every buffer: "slot" on the device, "host" for a
    swapped block's host copy, "master" for h2d_only's host copy of a block that starts in a
    slot, "spare" for exchange's extra host buffer, "staging" for a staging buffer. The default
    is torch.empty of bytes; the memory plan passes one that labels what it makes."""

    def __init__(self, model: nn.Module, groups: dict[str, list[nn.Module]], counts: dict[str, int], device,
                 mode: str = "exchange", pin_memory: bool = True, host_device="cpu", allocate=None,
                 ring: int = 0, staging: bool = False):
        if mode not in MODES:
            raise ValueError(f"swap_mode={mode!r}: choose one of {MODES}")
        if staging and mode != "h2d_only":
            raise ValueError("staging reads the swapped weights where loading left them and never writes them: "
                             "it needs swap_mode='h2d_only'")
        if ring:
            check_ring(groups, ring)
            blocks = [block for group in groups.values() for block in group]
            groups, counts = {RING.join(groups): blocks}, {RING.join(groups): len(blocks) - ring}
        counts = check_counts(groups, counts)
        self.model = model
        self.mode = mode
        self.ring = ring
        self.staging = staging
        self.device = torch.device(device)
        self.host_device = torch.device(host_device)
        self.on_cuda = self.device.type == "cuda"
        self.pin_memory = pin_memory and self.on_cuda  # pinning needs CUDA
        self.allocate = allocate or _empty_bytes
        self.stream = torch.cuda.Stream(self.device) if self.on_cuda else None
        self.forward_only = False  # set by inference(); no-grad forwards are detected by themselves
        self.transfers = {"h2d": 0, "d2h": 0}  # whole blocks copied, for tests and logs
        self.bytes_moved = {"h2d": 0, "d2h": 0}  # the weight bytes of those blocks
        self.stalls = 0  # blocks whose load was issued only as they started: no overlap
        self.clock = 0  # counts block starts, forward and backward
        self.groups = {name: _Group(name, groups[name], n) for name, n in counts.items() if n > 0}
        if mode == "h2d_only":
            self._check_frozen()

        moving = {id(w) for g in self.groups.values() for b in g.moving_blocks() for w in g.weights[b]}
        _move_to_device_except(model, moving, self.device)
        for group in self.groups.values():
            self._place(group)
        self._handles = []
        for name, group in self.groups.items():
            for index, block in enumerate(groups[name]):
                self._handles.append(block.register_forward_pre_hook(self._pre_hook(group, index)))
                self._handles.append(block.register_forward_hook(self._post_hook(group, index)))

    def _check_frozen(self) -> None:
        trainable = [f"{g.name}.{b}" for g in self.groups.values() for b in range(g.num_blocks)
                     if any(w.requires_grad for w in g.weights[b])]
        if trainable:
            raise ValueError(
                f"swap_mode='h2d_only' never copies weights back, but weights of {trainable[:4]} require "
                "grad (full fine-tuning?). Use swap_mode='exchange', or freeze the base (LoRA)."
            )

    # -- placement --

    def _buffer(self, kind: str, group: _Group, block: int | None = None) -> Tensor:
        """A slot or host buffer sized for the group's largest block; h2d_only's host copies, which
        never change hands, sized for their own `block` (a UNet's blocks differ a hundredfold)."""
        on_device = kind == "slot"
        nbytes = group.buffer_bytes
        if self.mode == "h2d_only" and block is not None:
            nbytes = _layout_bytes(group.weights[block])
        pin = self.on_cuda if kind == "staging" else self.pin_memory and not on_device
        return self.allocate(kind, nbytes, self.device if on_device else self.host_device, pin)

    def _place(self, group: _Group) -> None:
        """Slots that swapped blocks pass through become byte buffers holding their first block;
        the swapped blocks (and, for h2d_only, the slots' first blocks) get host buffers, or
        with staging keep their weights as loaded."""
        for b in group.moving_blocks():
            weights = group.weights[b]
            if self.staging:
                group.loaded[b] = [w.data for w in weights]  # the master: the tensors as loaded
            if b < group.num_slots:  # starts resident, in its slot's buffer
                group.slots[b] = self._buffer("slot", group)
                targets = _views(group.slots[b], weights)
                if self.mode == "h2d_only" and not self.staging:  # the master copy on the host
                    group.host[b] = self._buffer("master", group, b)
                    self._fill(_views(group.host[b], weights), weights)
            elif self.staging:
                continue  # waits where it is
            else:
                group.host[b] = self._buffer("host", group, b)
                targets = _views(group.host[b], weights)
            self._fill(targets, weights)
            for w, target in zip(weights, targets):
                w.data = target
        if self.mode == "exchange":
            group.spare = self._buffer("spare", group)
        if self.staging:
            group.staging = [self._buffer("staging", group) for _ in range(min(STAGING_BUFFERS, group.num_slots))]
            group.staging_free = [None] * len(group.staging)

    @staticmethod
    def _fill(targets: list[Tensor], weights: list[Tensor]) -> None:
        with torch.no_grad():
            for target, w in zip(targets, weights):
                target.copy_(w.data)

    # -- moving one block into its slot --

    def _load(self, group: _Group, block: int) -> None:
        """Bring `block` into its slot, sending the slot's current block back to the host.
        Returns at once on CUDA: the copies run on the side stream after all compute issued so far."""
        slot = group.slot_of(block)
        outgoing = group.occupant[slot]
        if outgoing == block:
            return
        buffer = group.slots[slot]
        copies, staged, staging = [], [], None  # (destination, source), run in this order
        if self.mode == "exchange":
            copies += zip(_views(group.spare, group.weights[outgoing]), _views(buffer, group.weights[outgoing]))
            group.host[outgoing], group.spare = group.spare, None
            self.transfers["d2h"] += 1
            self.bytes_moved["d2h"] += group.block_bytes(outgoing)
        incoming = _views(buffer, group.weights[block])
        if self.staging:  # host: as loaded -> pinned staging buffer; side stream: staging -> slot
            staging = group.loads % len(group.staging)
            through = _views(group.staging[staging], group.weights[block])
            staged = list(zip(through, group.master(block)))
            copies += zip(incoming, through)
        else:
            copies += zip(incoming, group.master(block))
        group.loads += 1
        self.transfers["h2d"] += 1
        self.bytes_moved["h2d"] += group.block_bytes(block)
        group.ready[slot] = self._copy(copies, staged, None if staging is None else group.staging_free[staging])
        if staging is not None:
            group.staging_free[staging] = group.ready[slot]
        group.loaded_at[slot] = self.clock
        for w, host in zip(group.weights[outgoing], group.master(outgoing)):
            w.data = host
        for w, dev in zip(group.weights[block], incoming):
            w.data = dev
        if self.mode == "exchange":
            # The incoming block's host buffer is free once the copy above has run; later copies on
            # the same stream are ordered after it, so it can receive the next outgoing block.
            group.spare, group.host[block] = group.host[block], None
        group.occupant[slot] = block

    def _copy(self, copies: list[tuple[Tensor, Tensor]], staged: list[tuple[Tensor, Tensor]] = (),
              staging_free=None):
        """Issue the copies; returns what `_wait_for` needs to know they are done (a CUDA event).
        `staged` (pageable host -> pinned staging) run first, on the host, once the staging
        buffer's previous copy to the device (`staging_free`) is done."""
        if not self.on_cuda:
            with torch.no_grad():
                for destination, source in list(staged) + list(copies):
                    destination.copy_(source)
            return None
        if staging_free is not None:
            staging_free.synchronize()  # issued two loads ago: normally long done
        with torch.no_grad():
            for destination, source in staged:
                destination.copy_(source)
        # The slot's previous block may still be computing: the side stream waits for it on the GPU.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream), torch.no_grad():
            for destination, source in copies:
                destination.copy_(source, non_blocking=True)
            return self.stream.record_event()

    def _wait_for(self, event) -> None:
        """Make the compute stream wait (on the GPU) until a load is complete."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def _wait(self, group: _Group, block: int) -> None:
        """Make `block` resident before it computes."""
        slot = group.slot_of(block)
        self._load(group, block)  # nothing to do if it was prefetched
        if group.loaded_at[slot] == self.clock:
            self.stalls += 1  # issued as this block started: compute waits for the whole copy
        self._wait_for(group.ready[slot])

    # -- forward (module hooks; they never fire in a checkpoint recompute) --

    def _pre_hook(self, group: _Group, index: int):
        def hook(module, args):
            group.backward_started = None
            self.clock += 1
            self._wait(group, index)

        return hook

    def _post_hook(self, group: _Group, index: int):
        def hook(module, args, outputs):
            tensors = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
            graph = [t for t in tensors if isinstance(t, Tensor) and t.requires_grad]
            group.expects_backward = torch.is_grad_enabled() and bool(graph)
            self._after_block(group, index)
            for t in graph:
                t.register_hook(lambda grad: self._backward_starts(group, index))

        return hook

    def _after_block(self, group: _Group, index: int) -> None:
        after = index + group.num_slots  # the next block in this slot
        if after < group.num_blocks:
            self._load(group, after)
        elif self.forward_only or not group.expects_backward:
            # No backward follows: wrap around, so the next forward finds blocks 0..K-1.
            self._load(group, group.slot_of(index))

    # -- backward --

    def _backward_starts(self, group: _Group, index: int) -> None:
        if group.backward_started == index:
            return  # the second output of the same block
        group.backward_started = index
        self.clock += 1
        done = index + 1  # its backward is complete: refill its slot with the block before
        if done < group.num_blocks and done - group.num_slots >= 0:
            self._load(group, done - group.num_slots)
        self._wait(group, index)

    # -- public --

    @contextlib.contextmanager
    def inference(self):
        """Forward-only prefetching (wrap around at the end) for forwards that build a graph but
        are never backpropagated. Forwards under torch.no_grad() get it without this."""
        previous, self.forward_only = self.forward_only, True
        try:
            yield self
        finally:
            self.forward_only = previous

    def reset_layout(self) -> None:
        """Load blocks 0..K-1 of each group, e.g. after a forward whose backward was skipped.
        (Not needed otherwise: a missing block is loaded when it runs, with a stall.)"""
        for group in self.groups.values():
            for slot in range(group.num_slots):
                if group.slots[slot] is not None:
                    self._load(group, slot)

    def resident_blocks(self) -> dict[str, list[int]]:
        """group -> indices of its blocks whose weights are on the device."""
        return {name: sorted(g.occupant) for name, g in self.groups.items()}

    def synchronize(self) -> None:
        """Wait (on the host) for every copy in flight: before reading weights on the host."""
        if self.on_cuda:
            self.stream.synchronize()

    def describe(self) -> str:
        parts = [f"{name}: {g.num_blocks - g.num_slots} of {g.num_blocks} swapped ({g.num_slots} device slots, "
                 f"{g.buffer_bytes / 2**20:,.0f} MiB each)" for name, g in self.groups.items()]
        if self.ring and self.groups:
            g = next(iter(self.groups.values()))
            parts = [f"every block of {g.name.replace(RING, ' and ')} ({g.num_blocks}) streams through a ring of "
                     f"{g.num_slots} device slots of {g.buffer_bytes / 2**20:,.0f} MiB"]
        host = "read as loaded through pinned staging buffers" if self.staging else \
            ("pinned" if self.pin_memory else "pageable") + " host copies"
        return f"block swap ({self.mode}, {host}): " + ("; ".join(parts) or "nothing swapped")

    def loaded_weights(self) -> list[Tensor]:
        """With staging: the tensors as loaded that the swapped weights are read from (host memory
        that stays in use; the memory plan counts it)."""
        return [t for g in self.groups.values() for ts in g.loaded if ts is not None for t in ts]

    def remove(self) -> None:
        """Put every weight back on the device in its own tensor (needs room for the whole model)
        and detach."""
        self.synchronize()
        for group in self.groups.values():
            for weights in group.weights:
                for w in weights:
                    w.data = w.data.to(self.device, copy=True)  # out of the shared buffers
        for handle in self._handles:
            handle.remove()
        self.groups = {}


def _empty_bytes(kind: str, nbytes: int, device, pin: bool) -> Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, device=device, pin_memory=pin)


def _move_to_device_except(model: nn.Module, skip: set[int], device: torch.device) -> None:
    """Move every parameter and buffer to `device` except the Parameters whose id is in `skip`,
    without ever holding the skipped ones on the device (so loading never peaks at full size)."""
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and id(param) not in skip:
                param.data = param.data.to(device)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
