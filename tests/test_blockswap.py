"""Block swap on a tiny FLUX: swapping changes where weights live, never what is computed.

The "device" is the CPU here; copies are delayed until waited for (LaggingCopies), as on
a CUDA side stream. A swapped model and an unswapped copy train side by side and
must agree bit for bit (outputs, gradients, AdamW updates), in training, in sampling and
alternating between the two. Where the weights are is checked independently of blockswap's
own bookkeeping: the device slots are the storage that blocks 0..K-1 held right after the
swap was built, and every block must compute with weights inside that storage.
"""
import copy

import pytest
import torch
from torch import nn

from blockswap import BlockSwap, kohya_split, max_blocks_to_swap, offload_activations, swap_counts
from lora import LoRANetwork, flux_lora_targets
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


class ResidencyCheck:
    """On every block call (forward, checkpoint recompute, sampling): the block's Linear weights
    lie in the device slots, and no more than K blocks of a kind have weights there."""

    def __init__(self, model: Flux, swapped: dict[str, int]):
        self.model = model
        self.slots, self.limit = {}, {}
        self.calls = 0
        for kind, n in swapped.items():
            blocks = getattr(model, kind)
            self.limit[kind] = len(blocks) - n
            self.slots[kind] = {w.data_ptr() for b in blocks[: self.limit[kind]] for w in linear_weights(b)}
            for i, block in enumerate(blocks):
                block.register_forward_pre_hook(lambda module, args, kind=kind, i=i: self.check(kind, i))

    def resident(self, kind: str) -> list[int]:
        blocks = getattr(self.model, kind)
        return [b for b, block in enumerate(blocks) if {w.data_ptr() for w in linear_weights(block)} & self.slots[kind]]

    def check(self, kind: str, index: int) -> None:
        self.calls += 1
        block = getattr(self.model, kind)[index]
        outside = [w.shape for w in linear_weights(block) if w.data_ptr() not in self.slots[kind]]
        assert not outside, f"{kind}.{index} computes with weights outside the device slots: {outside}"
        assert len(self.resident(kind)) <= self.limit[kind], f"{kind}: resident {self.resident(kind)}"


class LaggingCopies(BlockSwap):
    """BlockSwap with the CUDA side stream's timing on the CPU: a copy runs only when something
    waits for it (in queue order, as on one stream). A block that computes without waiting for
    its load, or waits for the wrong one, sees stale weights and the results differ."""

    def __init__(self, *args, **kwargs):
        self.queue, self.done = [], 0
        super().__init__(*args, **kwargs)

    def _copy(self, copies):
        self.queue.append(list(copies))
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
        quantize_linears_(reference)
    swapped = copy.deepcopy(reference)
    pairs = []
    for model in (reference, swapped):
        model.to(device)
        model.gradient_checkpointing = checkpointing
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
    (ref, ref_params, ref_opt), (model, params, opt) = make_pair(train, checkpointing, fp8)
    swap = LaggingCopies(model, "cpu", blocks_to_swap=BLOCKS_TO_SWAP, mode=mode)
    residency = ResidencyCheck(model, SWAPPED)
    initial = {"double_blocks": [0, 1], "single_blocks": [0, 1]}
    assert swap.resident_blocks() == initial
    masters = {id(t): t.clone() for g in swap.groups.values() for host in g.host if host for t in host}

    for step in range(STEPS):
        before = dict(swap.transfers)
        out_ref, grads_ref = train_step(ref, ref_params, ref_opt, seed=step)
        out, grads = train_step(model, params, opt, seed=step)
        assert torch.equal(out_ref, out)
        assert_same(grads_ref, grads, "gradient")
        assert_same(ref_params, params, "parameter after AdamW")
        assert swap.stalls == 0  # every block was prefetched before it ran
        assert swap.resident_blocks() == initial  # the backward brought the first blocks back
        # every swapped block came in once in forward and once in backward
        loaded = swap.transfers["h2d"] - before["h2d"]
        assert loaded == 2 * sum(SWAPPED.values())
        assert swap.transfers["d2h"] - before["d2h"] == (loaded if mode == "exchange" else 0)

        assert torch.equal(sample(ref, seed=100 + step), sample(model, seed=100 + step))
        assert swap.resident_blocks() == initial  # sampling wrapped around

    assert residency.calls >= STEPS * 2 * 10  # forward, (recompute), sampling of all 10 blocks
    assert max(len(residency.resident(k)) for k in SWAPPED) <= 2
    if mode == "h2d_only":  # the host masters were never written
        for g in swap.groups.values():
            for host in g.host:
                for t in host or []:
                    assert torch.equal(t, masters[id(t)])


def test_remove_restores_a_plain_model():
    (ref, _, _), (model, _, _) = make_pair("full", checkpointing=True)
    swap = BlockSwap(model, "cpu", double_blocks_to_swap=1, single_blocks_to_swap=3)
    assert swap.resident_blocks() == {"double_blocks": [0, 1, 2], "single_blocks": [0, 1, 2]}
    sample(model, seed=0)
    swap.remove()
    assert model.block_hooks == []
    ptrs = [w.data_ptr() for _, _, b in model.blocks() for w in linear_weights(b)]
    assert len(set(ptrs)) == len(ptrs)  # every weight has storage of its own again
    assert torch.equal(sample(ref, seed=1), sample(model, seed=1))


def test_forward_without_backward_and_inference_switch():
    (ref, _, _), (model, _, _) = make_pair("full", checkpointing=True)
    swap = BlockSwap(model, "cpu", blocks_to_swap=BLOCKS_TO_SWAP)
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
    assert swap_counts(model, blocks_to_swap=3) == {"double_blocks": 1, "single_blocks": 4}
    assert swap_counts(model, single_blocks_to_swap=2) == {"double_blocks": 0, "single_blocks": 2}
    assert swap_counts(model, 3, -1, -1) == swap_counts(model, 3)  # -1: the config's "not given"
    with pytest.raises(ValueError, match="at most 4"):
        swap_counts(model, blocks_to_swap=5)
    with pytest.raises(ValueError, match="double_blocks: cannot swap 3 of 4"):
        swap_counts(model, double_blocks_to_swap=3)
    with pytest.raises(ValueError, match="not both"):
        swap_counts(model, blocks_to_swap=2, single_blocks_to_swap=2)
    with pytest.raises(ValueError, match="swap_mode"):
        BlockSwap(model, "cpu", blocks_to_swap=2, mode="offload")


def test_h2d_only_refuses_trainable_swapped_weights():
    model = Flux(PARAMS)  # full fine-tuning: every weight requires grad
    with pytest.raises(ValueError, match="never copies weights back"):
        BlockSwap(model, "cpu", blocks_to_swap=2, mode="h2d_only")
    assert model.block_hooks == []


def test_blocks_sharing_a_slot_must_match():
    from fp8 import Fp8Linear

    model = Flux(PARAMS)
    model.single_blocks[3].linear1 = Fp8Linear.from_linear(model.single_blocks[3].linear1)
    with pytest.raises(ValueError, match="share a device slot"):
        BlockSwap(model, "cpu", single_blocks_to_swap=4)


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
    img, txt, vec = (1, 16, 64), (1, 8, 64), (1, 64)
    assert packed.count(img) >= 4 and packed.count(txt) >= 4 and packed.count(vec) >= 10  # block inputs
    weights = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)}
    weights |= {shape[::-1] for shape in weights}  # F.linear saves weight.t()
    assert not weights & set(packed)  # (embedders and final layer run outside checkpoints)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: side stream, events, pinned memory")
@pytest.mark.parametrize("mode", ["exchange", "h2d_only"])
def test_cuda_overlapped_swap_matches(mode):
    (ref, ref_params, ref_opt), (model, params, opt) = make_pair("lora", True, device="cuda")
    model.to("cpu")  # the swap moves what stays resident; swapped weights never reach the GPU
    swap = BlockSwap(model, "cuda", blocks_to_swap=BLOCKS_TO_SWAP, mode=mode, pin_memory=True)
    assert all(t.is_pinned() for g in swap.groups.values() for host in g.host if host for t in host)
    for step in range(STEPS):
        out_ref, grads_ref = train_step(ref, ref_params, ref_opt, step, "cuda")
        out, grads = train_step(model, params, opt, step, "cuda")
        torch.testing.assert_close(out, out_ref)
        torch.testing.assert_close(grads, grads_ref)
        torch.testing.assert_close(sample(model, 100 + step, "cuda"), sample(ref, 100 + step, "cuda"))
    swap.synchronize()
    for kind, n in SWAPPED.items():  # only K blocks of each kind have weights on the GPU
        blocks = getattr(model, kind)
        on_gpu = [b for b, block in enumerate(blocks) if any(w.is_cuda for w in linear_weights(block))]
        assert on_gpu == list(range(len(blocks) - n))
