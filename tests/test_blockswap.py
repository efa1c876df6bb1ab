"""Block swap on a tiny FLUX: swapping changes where weights live, never what is computed.

The "device" is the CPU here; copies are delayed until waited for (LaggingCopies), as on
a CUDA side stream. A swapped model and an unswapped copy train side by side and
must agree bit for bit (outputs, gradients, AdamW updates), in training, in sampling and
alternating between the two. Where the weights are is checked independently of blockswap's
own bookkeeping: the device slots are the storage that blocks 0..K-1 held right after the
swap was built, and every Linear must compute with a weight inside that storage, in forward
and in a checkpoint recompute alike. Every block can also stream through one ring of slots
that both kinds share (blocks of two sizes in slots sized for the larger), with the swapped
weights read where loading left them (staging). A network whose blocks differ in shape (and
hold convs) swaps the same way.
"""
import copy

import pytest
import torch
from torch import nn

from activations import checkpoint_blocks, offload_activations
from blockswap import BlockSwap, check_counts
from families.flux import FAMILY as FLUX
from families.flux import kohya_split, max_blocks_to_swap
from families.flux import lora_targets as flux_lora_targets
from lora import LoRANetwork
from models.flux import Flux, FluxParams, img_ids, txt_ids

PARAMS = FluxParams(
    in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=48, hidden_size=64,
    num_heads=2, depth=4, depth_single_blocks=6, axes_dim=[4, 14, 14],
)
BLOCKS_TO_SWAP = 4  # the most for this size: 2 of 4 double, 4 of 6 single -> 2 device slots each
SWAPPED = {"double_blocks": 2, "single_blocks": 4}
STEPS = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def make_batch(seed: int, device="cpu") -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = dict(
        img=torch.randn(1, 16, 16, generator=g),  # an 8x8 latent of 4 channels, packed
        img_ids=img_ids(1, 8, 8),
        txt=torch.randn(1, 8, 48, generator=g),
        txt_ids=txt_ids(1, 8),
        timesteps=torch.rand(1, generator=g),
        y=torch.randn(1, 32, generator=g),
        guidance=torch.full((1,), 3.5),
    )
    target = torch.randn(1, 16, 16, generator=g)
    return {k: v.to(device) for k, v in batch.items()}, target.to(device)


def linear_weights(block: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in block.modules() if isinstance(m, nn.Linear)]


def storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class ResidencyCheck:
    """On every Linear call inside a swapped block (forward, checkpoint recompute, sampling): its
    weight lies in the device slots of its pool, and no more than K blocks of the pool have weights
    there. A pool is one group's slots, or the ring that all groups share: `pools` maps a name to
    (the kinds whose blocks pass through it, K); its slots are the storage that its first K blocks
    held right after the swap was built."""

    def __init__(self, model: Flux, pools: dict[str, tuple[tuple[str, ...], int]]):
        self.model = model
        self.pools = pools
        self.slots = {}
        self.calls = 0
        for pool, (kinds, k) in pools.items():
            order = [(kind, i) for kind in kinds for i in range(len(getattr(model, kind)))]
            self.slots[pool] = {storage(w) for kind, i in order[:k] for w in linear_weights(getattr(model, kind)[i])}
            for kind, i in order:
                for linear in (m for m in getattr(model, kind)[i].modules() if isinstance(m, nn.Linear)):
                    linear.register_forward_pre_hook(lambda module, args, p=pool, kind=kind, i=i: self.check(p, kind, i, module))

    def resident(self, pool: str) -> list[tuple[str, int]]:
        """The blocks of the pool whose weights are in its slots now."""
        kinds, _ = self.pools[pool]
        return [(kind, b) for kind in kinds for b, block in enumerate(getattr(self.model, kind))
                if {storage(w) for w in linear_weights(block)} & self.slots[pool]]

    def check(self, pool: str, kind: str, index: int, linear: nn.Linear) -> None:
        self.calls += 1
        assert storage(linear.weight) in self.slots[pool], f"{kind}.{index} computes with a weight outside the slots"
        assert len(self.resident(pool)) <= self.pools[pool][1], f"{pool}: resident {self.resident(pool)}"


def per_group_pools(model: Flux, swapped: dict[str, int]) -> dict:
    return {kind: ((kind,), len(getattr(model, kind)) - n) for kind, n in swapped.items()}


def swap_config(blocks_to_swap=0, double=-1, single=-1) -> dict:
    return {"blocks_to_swap": blocks_to_swap, "double_blocks_to_swap": double, "single_blocks_to_swap": single}


def attach(model, cls=None, mode="exchange", device="cpu", pin_memory=False, **counts):
    """BlockSwap (or a subclass) on a FLUX model with the family's groups and split rule."""
    counts = FLUX.swap_counts(model, swap_config(**counts))
    return (cls or BlockSwap)(model, FLUX.blocks(model), counts, device, mode=mode, pin_memory=pin_memory)


class LaggingCopies(BlockSwap):
    """BlockSwap with the CUDA side stream's timing on the CPU: a copy runs only when something
    waits for it (in queue order, as on one stream). A block that computes without waiting for
    its load, or waits for the wrong one, sees stale weights and the results differ."""

    def __init__(self, *args, **kwargs):
        self.queue, self.done = [], 0
        super().__init__(*args, **kwargs)

    def _copy(self, copies, staged=(), staging_free=None):
        self.queue.append(list(staged) + list(copies))  # staged copies run first, as on CUDA
        return len(self.queue)  # the "event": this copy and all before it

    def _wait_for(self, event):
        while event is not None and self.done < event:
            for destination, source in self.queue[self.done]:
                destination.copy_(source)
            self.done += 1

    def synchronize(self):
        self._wait_for(len(self.queue))


def make_pair(train: str, checkpointing: bool, fp8: bool = False, device="cpu"):
    """Two identical tiny FLUX models with their trainable parameters and AdamW optimizers."""
    torch.manual_seed(0)
    reference = Flux(PARAMS)
    if fp8:
        from fp8 import quantize_linears_

        reference.requires_grad_(False)  # fp8 storage is for a frozen base
        quantize_linears_(reference, [b for group in FLUX.blocks(reference).values() for b in group])
    swapped = copy.deepcopy(reference)
    pairs = []
    for model in (reference, swapped):
        model.to(device)
        checkpoint_blocks([b for group in FLUX.blocks(model).values() for b in group], checkpointing)
        if train == "lora":
            model.requires_grad_(False)
            torch.manual_seed(1)
            network = LoRANetwork.inject(model, flux_lora_targets(model, rank=4), device=device)
            for lora in network.loras.values():  # a nonzero up, so every LoRA weight gets a gradient
                nn.init.normal_(lora.lora_up.weight, std=0.05)
            params = list(network.parameters())
        else:
            params = list(model.parameters())
        pairs.append((model, params, torch.optim.AdamW(params, lr=1e-3)))
    return pairs


def train_step(model, params, optimizer, seed, device="cpu"):
    batch, target = make_batch(seed, device)
    optimizer.zero_grad(set_to_none=True)
    out = model(**batch)
    ((out - target) ** 2).mean().backward()
    grads = [p.grad.clone() for p in params]
    optimizer.step()
    return out.detach(), grads


@torch.no_grad()
def sample(model, seed, device="cpu"):
    return model(**make_batch(seed, device)[0])


def assert_same(a: list, b: list, what: str) -> None:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert torch.equal(x, y), f"{what} {i} differs: max |diff| {(x - y).abs().max().item()}"


def assert_steps_alike(twins, step: int) -> None:
    """One training step of the unswapped model and of its swapped twin: the same output,
    gradients and updated parameters, bit for bit."""
    (ref, ref_params, ref_opt), (model, params, opt) = twins
    out_ref, grads_ref = train_step(ref, ref_params, ref_opt, seed=step)
    out, grads = train_step(model, params, opt, seed=step)
    assert torch.equal(out_ref, out)
    assert_same(grads_ref, grads, "gradient")
    assert_same(ref_params, params, "parameter after the step")


CASES = [
    # (train, swap mode, gradient checkpointing, fp8 base)
    ("full", "exchange", True, False),
    ("full", "exchange", False, False),
    ("lora", "exchange", True, False),
    ("lora", "h2d_only", True, False),
    ("lora", "h2d_only", False, False),
    ("lora", "h2d_only", True, True),
]


@pytest.mark.parametrize("train,mode,checkpointing,fp8", CASES)
def test_swapping_changes_nothing_that_is_computed(train, mode, checkpointing, fp8):
    twins = make_pair(train, checkpointing, fp8)
    (ref, _, _), (model, _, _) = twins
    swap = attach(model, LaggingCopies, mode=mode, blocks_to_swap=BLOCKS_TO_SWAP)
    residency = ResidencyCheck(model, per_group_pools(model, SWAPPED))
    initial = {"double_blocks": [0, 1], "single_blocks": [0, 1]}
    assert swap.resident_blocks() == initial
    masters = {id(t): t.clone() for g in swap.groups.values() for t in g.host if t is not None}

    for step in range(STEPS):
        before = dict(swap.transfers)
        assert_steps_alike(twins, step)
        assert swap.stalls == 0  # every block was prefetched before it ran
        assert swap.resident_blocks() == initial  # the backward brought the first blocks back
        # every swapped block came in once in forward and once in backward
        loaded = swap.transfers["h2d"] - before["h2d"]
        assert loaded == 2 * sum(SWAPPED.values())
        assert swap.transfers["d2h"] - before["d2h"] == (loaded if mode == "exchange" else 0)

        assert torch.equal(sample(ref, seed=100 + step), sample(model, seed=100 + step))
        assert swap.resident_blocks() == initial  # sampling wrapped around

    linears = 4 * 10 + 6 * 3
    assert residency.calls >= STEPS * (3 if checkpointing else 2) * linears  # forward, (recompute), sampling
    assert max(len(residency.resident(k)) for k in SWAPPED) <= 2
    if mode == "h2d_only":  # the host masters were never written
        for g in swap.groups.values():
            for t in g.host:
                if t is not None:
                    assert torch.equal(t, masters[id(t)])


RING_CASES = [
    # (train, swap mode, gradient checkpointing, fp8 base, ring slots, staging)
    ("lora", "h2d_only", True, True, 2, True),  # configs/flux_4gb.py's setting
    ("lora", "h2d_only", True, False, 2, False),
    ("lora", "h2d_only", False, True, 3, True),
    ("full", "exchange", True, False, 2, False),
]


@pytest.mark.parametrize("train,mode,checkpointing,fp8,slots,staging", RING_CASES)
def test_every_block_streams_through_one_ring(train, mode, checkpointing, fp8, slots, staging):
    """All 10 blocks (4 double, 6 single: two sizes) pass through `slots` device slots shared by both
    kinds; training and sampling compute exactly what the unswapped twin computes."""
    twins = make_pair(train, checkpointing, fp8)
    (ref, _, _), (model, _, _) = twins
    swap = LaggingCopies(model, FLUX.blocks(model), {}, "cpu", mode=mode, pin_memory=False, ring=slots,
                         staging=staging)
    ring = swap.groups["double_blocks+single_blocks"]
    blocks = len(model.double_blocks) + len(model.single_blocks)
    assert (ring.num_blocks, ring.num_slots) == (blocks, slots)
    assert ring.buffer_bytes == max(_layout(ws) for ws in ring.weights) == _layout(ring.weights[0])  # a double block
    residency = ResidencyCheck(model, {"ring": (("double_blocks", "single_blocks"), slots)})
    initial = {"double_blocks+single_blocks": list(range(slots))}
    assert swap.resident_blocks() == initial
    masters = [t.clone() for t in swap.loaded_weights()]
    if staging:  # no host copy of its own: the weights as loaded, read through two staging buffers
        assert all(t is None for t in ring.host) and len(ring.staging) == 2 and len(masters) == 10 * 4 + 6 * 3

    for step in range(STEPS):
        before = dict(swap.transfers)
        assert_steps_alike(twins, step)
        assert swap.stalls == 0 and swap.resident_blocks() == initial
        assert swap.transfers["h2d"] - before["h2d"] == 2 * (blocks - slots)  # every block in, forward and backward
        assert swap.transfers["d2h"] - before["d2h"] == (2 * (blocks - slots) if mode == "exchange" else 0)
        assert torch.equal(sample(ref, seed=100 + step), sample(model, seed=100 + step))
        assert swap.resident_blocks() == initial

    assert residency.calls >= STEPS * (3 if checkpointing else 2) * (4 * 10 + 6 * 3)
    assert_same(masters, swap.loaded_weights(), "weight as loaded")  # read, never written


def _layout(weights) -> int:
    from blockswap import _layout_bytes

    return _layout_bytes(weights)


def test_ring_and_staging_refusals():
    model = Flux(PARAMS)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="a ring of 11 device slots for 10 blocks: choose 2 to 10"):
        BlockSwap(model, FLUX.blocks(model), {}, "cpu", mode="h2d_only", ring=11)
    with pytest.raises(ValueError, match="staging .* needs swap_mode='h2d_only'"):
        BlockSwap(model, FLUX.blocks(model), {}, "cpu", mode="exchange", ring=2, staging=True)


def test_remove_restores_a_plain_model():
    (ref, _, _), (model, _, _) = make_pair("full", checkpointing=True)
    swap = attach(model, double=1, single=3)
    assert swap.resident_blocks() == {"double_blocks": [0, 1, 2], "single_blocks": [0, 1, 2]}
    sample(model, seed=0)
    swap.remove()
    blocks = [b for group in FLUX.blocks(model).values() for b in group]
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in blocks)  # no hook left behind
    ptrs = [storage(w) for b in blocks for w in linear_weights(b)]
    assert len(set(ptrs)) == len(ptrs)  # every weight has storage of its own again
    assert torch.equal(sample(ref, seed=1), sample(model, seed=1))


def test_forward_without_backward_and_inference_switch():
    (ref, _, _), (model, _, _) = make_pair("full", checkpointing=True)
    swap = attach(model, blocks_to_swap=BLOCKS_TO_SWAP)
    batch, _ = make_batch(0)
    model(**batch)  # builds a graph that is never used: the last blocks stay resident
    assert swap.resident_blocks() == {"double_blocks": [2, 3], "single_blocks": [4, 5]}
    swap.reset_layout()
    assert swap.resident_blocks() == {"double_blocks": [0, 1], "single_blocks": [0, 1]}
    with swap.inference():  # a graph-building forward declared forward-only wraps around
        out = model(**batch)
    assert swap.resident_blocks() == {"double_blocks": [0, 1], "single_blocks": [0, 1]}
    assert torch.equal(out, ref(**batch))


def test_counts_and_limits():
    assert kohya_split(35) == (17, 36)
    assert max_blocks_to_swap(19, 38) == 35  # FLUX.1: all but two of each kind
    assert max_blocks_to_swap(4, 6) == 4
    model = Flux(PARAMS)
    groups = FLUX.blocks(model)

    def swap_counts(**counts):
        return check_counts(groups, FLUX.swap_counts(model, swap_config(**counts)))

    assert swap_counts(blocks_to_swap=3) == {"double_blocks": 1, "single_blocks": 4}
    assert swap_counts(single=2) == {"double_blocks": 0, "single_blocks": 2}
    with pytest.raises(ValueError, match="at most 4"):
        swap_counts(blocks_to_swap=5)
    with pytest.raises(ValueError, match="double_blocks: cannot swap 3 of 4"):
        swap_counts(double=3)
    with pytest.raises(ValueError, match="not both"):
        swap_counts(blocks_to_swap=2, single=2)
    with pytest.raises(ValueError, match="swap_mode"):
        attach(model, blocks_to_swap=2, mode="offload")


def test_h2d_only_refuses_trainable_swapped_weights():
    model = Flux(PARAMS)  # full fine-tuning: every weight requires grad
    with pytest.raises(ValueError, match="never copies weights back"):
        attach(model, blocks_to_swap=2, mode="h2d_only")
    assert not any(b._forward_pre_hooks for group in FLUX.blocks(model).values() for b in group)


class Uneven(nn.Module):
    """Blocks of different widths and layer kinds (Linear, Conv2d, Conv1d) in one group, as SD3's
    pre-only last block, SD3.5 Medium's attn2 blocks and SDXL's levels have."""

    def __init__(self):
        super().__init__()
        widths = [8, 16, 8, 24, 8, 12]
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "conv": nn.Conv2d(4, 4, 3, padding=1), "up": nn.Linear(4, w), "down": nn.Linear(w, 4),
            "mix": nn.Conv1d(4, 4, 1)}) for w in widths)

    def forward(self, x):  # x (B, 4, H, W)
        for block in self.blocks:
            x = block["conv"](x)
            h = block["down"](torch.tanh(block["up"](x.permute(0, 2, 3, 1))))  # (B, H, W, 4)
            b, hh, ww, c = h.shape
            h = block["mix"](h.reshape(b, hh * ww, c).transpose(1, 2)).transpose(1, 2).reshape(b, hh, ww, c)
            x = x + h.permute(0, 3, 1, 2)
        return x


@pytest.mark.parametrize("mode", ["exchange", "h2d_only"])
def test_blocks_of_different_shapes_share_slots(mode):
    torch.manual_seed(0)
    ref = Uneven()
    model = copy.deepcopy(ref)
    for m in (ref, model):  # h2d_only: the weights are frozen and the biases train
        for name, p in m.named_parameters():
            p.requires_grad_(mode == "exchange" or name.endswith("bias"))
    swap = LaggingCopies(model, {"blocks": list(model.blocks)}, {"blocks": 4}, "cpu", mode=mode)
    group = swap.groups["blocks"]
    assert sum(t is not None for t in group.slots) == 2
    widest = 4 * 4 * 9 * 4 + 2 * 4 * (4 * 24) + 4 * 16  # conv 3x3, up/down at width 24, conv1d, fp32
    assert group.buffer_bytes >= widest
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        out_ref, out = ref(x), model(x)
        assert torch.equal(out, out_ref)
        out_ref.square().mean().backward()
        out.square().mean().backward()
        assert_same([p.grad for p in ref.parameters() if p.requires_grad],
                    [p.grad for p in model.parameters() if p.requires_grad], "gradient")
        assert swap.resident_blocks() == {"blocks": [0, 1]} and swap.stalls == 0
        with torch.no_grad():
            assert torch.equal(ref(x), model(x))


def test_offload_activations_keeps_results_and_skips_weights(monkeypatch):
    """With checkpointing, the saved tensors are the blocks' inputs: they go to the host, weights stay."""
    (ref, ref_params, ref_opt), (model, params, opt) = make_pair("lora", checkpointing=True)
    packed = []
    real_empty = torch.empty

    def recording_empty(*args, **kwargs):  # every host buffer the pack hook makes
        tensor = real_empty(*args, **kwargs)
        packed.append(tuple(tensor.shape))
        return tensor

    out_ref, grads_ref = train_step(ref, ref_params, ref_opt, seed=0)
    with offload_activations(True):
        monkeypatch.setattr(torch, "empty", recording_empty)
        batch, target = make_batch(0)
        out = model(**batch)
        monkeypatch.setattr(torch, "empty", real_empty)
    ((out - target) ** 2).mean().backward()
    assert torch.equal(out.detach(), out_ref)
    assert_same(grads_ref, [p.grad for p in params], "gradient")
    img, txt, vec, pe = (1, 16, 64), (1, 8, 64), (1, 64), (1, 1, 24, 16, 2, 2)
    assert packed.count(img) >= 4 and packed.count(txt) >= 4  # block inputs
    assert packed.count(vec) == 1 and packed.count(pe) == 1  # inputs of all 10 blocks: copied once
    weights = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)}
    weights |= {shape[::-1] for shape in weights}  # F.linear saves weight.t()
    assert not weights & set(packed)  # (embedders and final layer run outside checkpoints)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: side stream, events, pinned memory")
@pytest.mark.parametrize("mode,ring,staging", [("exchange", 0, False), ("h2d_only", 0, False), ("h2d_only", 2, True)])
def test_cuda_overlapped_swap_matches(mode, ring, staging):
    (ref, ref_params, ref_opt), (model, params, opt) = make_pair("lora", True, device="cuda")
    model.to("cpu")  # the swap moves what stays resident; swapped weights never reach the GPU
    if ring:
        swap = BlockSwap(model, FLUX.blocks(model), {}, "cuda", mode=mode, ring=ring, staging=staging)
    else:
        swap = attach(model, mode=mode, device="cuda", pin_memory=True, blocks_to_swap=BLOCKS_TO_SWAP)
    host = [t for g in swap.groups.values() for t in (g.staging if staging else g.host) if t is not None]
    assert host and all(t.is_pinned() for t in host)
    for step in range(STEPS):
        out_ref, grads_ref = train_step(ref, ref_params, ref_opt, step, "cuda")
        out, grads = train_step(model, params, opt, step, "cuda")
        torch.testing.assert_close(out, out_ref)
        torch.testing.assert_close(grads, grads_ref)
        torch.testing.assert_close(sample(model, 100 + step, "cuda"), sample(ref, 100 + step, "cuda"))
    swap.synchronize()
    on_gpu = [(kind, b) for kind in SWAPPED for b, block in enumerate(getattr(model, kind))
              if any(w.is_cuda for w in linear_weights(block))]
    if ring:  # the ring's first blocks, whatever their kind
        assert on_gpu == [("double_blocks", b) for b in range(ring)]
    else:  # K blocks of each kind
        assert on_gpu == [(kind, b) for kind, n in SWAPPED.items() for b in range(len(getattr(model, kind)) - n)]
