"""Activation memory, applied to a network from outside: gradient checkpointing of its
blocks, offloading what autograd saves to host memory, and token chunks of the feed-forwards.

Both act on the lists of blocks a family names (families/: `Family.blocks`), so a network's
forward stays the reference code: it calls `block(x, ...)` and knows nothing of either.

Gradient checkpointing. `checkpoint_blocks(blocks)` replaces each block's `forward` on the
instance with one that runs the original forward under torch.utils.checkpoint (non-reentrant)
when gradients are being recorded: the block keeps only its inputs, and its forward runs again
in backward. Module hooks (block swap's, the memory plan's) fire around `block(...)` and
therefore once per forward, never in the recompute, which calls the original forward directly.

Token chunks. `chunk_feedforward(tokens)` makes the token-wise parts a network marks with
models.layers.tokenwise (FLUX: the MLPs, linear1, linear2 over [attention | GELU]) run on that
many tokens at a time, each chunk recomputed in backward: the 4x-wide hidden activations of a
block's recompute then exist for one chunk. The one lever that needs the network's help: parts
of a feed-forward are lines of a block's forward, not modules that could be wrapped from here.
"""
import contextlib
import weakref

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def checkpoint_blocks(blocks: list[nn.Module], enabled: bool = True) -> None:
    """Checkpoint every block in `blocks` (enabled=False undoes it). Idempotent."""
    for block in blocks:
        if enabled and "forward" not in block.__dict__:
            original = block.forward  # the class's forward, bound to this block

            def forward(*args, _original=original, **kwargs):
                if torch.is_grad_enabled():
                    return checkpoint(_original, *args, use_reentrant=False, **kwargs)
                return _original(*args, **kwargs)

            block.forward = forward
        elif not enabled and "forward" in block.__dict__:
            del block.forward  # back to the class's forward


def chunk_feedforward(tokens: int) -> None:
    """Run every network's token-wise parts in chunks of `tokens` tokens from now on (0: whole).
    Same results (each token meets the same operations); the cost is one more forward of each
    chunked part per training step (its recompute inside the block's recompute)."""
    from models.layers import set_token_chunk

    set_token_chunk(tokens)


def offload_activations(enabled: bool = True, pin_memory: bool = True, host_device="cpu",
                        allocating_host=contextlib.nullcontext):
    """A context for the training forward: every tensor autograd saves goes to host memory and
    comes back when backward needs it. With gradient checkpointing that is each block's inputs
    (the block's own saved tensors belong to the checkpoint and are recomputed). Weights are
    left alone: a Parameter, or a view of one (F.linear saves weight.t()), is kept as it is, and
    a tensor saved several times (an input of every block) is copied once.
    Costs a copy each way per saved tensor; sd-scripts reports up to ~1 GB less for FLUX LoRA.

    The memory plan runs this same code on the meta device: `host_device="meta"` and
    `allocating_host` (a context in which the host copies are made) let it count the copies
    as host memory."""
    if not enabled:
        return contextlib.nullcontext()
    packed: dict[int, tuple] = {}  # id -> (weakref, version, what pack returned): a tensor saved again is copied once

    def pack(tensor: Tensor):
        if isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter):
            return tensor
        seen = packed.get(id(tensor))
        if seen is not None and seen[0]() is tensor and seen[1] == tensor._version:
            return seen[2]  # e.g. FLUX's positional embedding, an input of every block
        pin = pin_memory and tensor.device.type == "cuda"
        with allocating_host():
            host = torch.empty(tensor.shape, dtype=tensor.dtype, device=host_device, pin_memory=pin)
        host.copy_(tensor, non_blocking=pin)  # ordered on the compute stream before any reuse
        packed[id(tensor)] = (weakref.ref(tensor), tensor._version, (tensor.device, host))
        return tensor.device, host

    def unpack(packed):
        if isinstance(packed, Tensor):
            return packed
        device, host = packed
        if host.device == device:  # the plan: host and device are both meta; the copy back is new memory
            return host.clone()
        return host.to(device, non_blocking=True)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
