"""Token chunks of the feed-forwards (models/layers.py: tokenwise; activations.chunk_feedforward):
the same numbers as the whole pass in fp32, and less activation memory in the plan.

Everything a chunk computes per token (outputs, losses, the gradient that flows out of a
feed-forward into the rest of the block) must be bit-identical to the unchunked pass. The one
thing that is not: a LoRA weight *inside* a chunked layer gets its gradient as a sum over tokens,
which chunking adds up chunk by chunk instead of in one matmul, so it agrees to rounding; every
other gradient is exact. (Equal rows also need the matmul of a chunk to round each row as the
whole matmul does. MKL on one thread does, except for matmuls of a few rows, where it may pick
another kernel: tokenwise splits the tokens into chunks of equal size, never a small remainder,
and these tests use chunks of some dozens of tokens.)"""
import copy

import pytest
import torch
from torch import nn

import plan
from activations import checkpoint_blocks
from config import DEFAULTS
from families.flux import FAMILY as FLUX
from families.flux import lora_targets
from lora import LoRANetwork
from models import flux
from models.layers import token_chunks, tokenwise

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

PARAMS = flux.FluxParams(in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=48, hidden_size=64,
                         num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[4, 14, 14])
CHUNK = 88  # 256 image tokens -> 88, 88, 80; 264 joint tokens -> 3 x 88; 8 text tokens stay whole
MLP_GROUPS = {"img_mlp": 0, "txt_mlp": 0, "single": 0}  # the LoRA groups on chunked layers


def batch(seed: int) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    inputs = dict(img=torch.randn(1, 256, 16, generator=g), img_ids=flux.img_ids(1, 32, 32),
                  txt=torch.randn(1, 8, 48, generator=g), txt_ids=flux.txt_ids(1, 8),
                  timesteps=torch.rand(1, generator=g), y=torch.randn(1, 32, generator=g),
                  guidance=torch.full((1,), 3.5))
    return inputs, torch.randn(1, 256, 16, generator=g)


def twins(group_ranks: dict, checkpointing: bool = True):
    """Two identical tiny FLUX models with LoRA (nonzero up weights) and AdamW each."""
    torch.manual_seed(0)
    base = flux.Flux(PARAMS).requires_grad_(False)
    out = []
    for model in (base, copy.deepcopy(base)):
        checkpoint_blocks([b for group in FLUX.blocks(model).values() for b in group], checkpointing)
        torch.manual_seed(1)
        network = LoRANetwork.inject(model, lora_targets(model, 4, group_ranks=group_ranks))
        for module in network.loras.values():
            nn.init.normal_(module.lora_up.weight, std=0.05)
        out.append((model, network, torch.optim.AdamW(network.parameters(), lr=1e-3)))
    return out


def step(model, network, optimizer, seed: int, chunk: int):
    inputs, target = batch(seed)
    with token_chunks(chunk):
        out = model(**inputs)
        loss = (out - target).square().mean()
        loss.backward()
        with torch.no_grad():
            sampled = model(**batch(100 + seed)[0])
    grads = {name: p.grad.clone() for name, p in network.named_parameters()}
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), sampled, grads


@pytest.mark.parametrize("checkpointing", [True, False])
def test_chunked_training_is_bit_identical_when_the_chunked_layers_are_frozen(checkpointing):
    """LoRA on attention and modulation only, the chunked MLPs / linear1 / linear2 frozen: three
    AdamW steps, losses, sampled outputs, every gradient and every LoRA weight identical."""
    (whole, whole_net, whole_opt), (chunked, chunked_net, chunked_opt) = twins(MLP_GROUPS, checkpointing)
    calls = []
    for block in chunked.single_blocks:  # the chunked parts really run in chunks
        block.linear2.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[1]))
    for seed in range(3):
        loss_a, sample_a, grads_a = step(whole, whole_net, whole_opt, seed, chunk=0)
        loss_b, sample_b, grads_b = step(chunked, chunked_net, chunked_opt, seed, chunk=CHUNK)
        assert torch.equal(loss_a, loss_b) and torch.equal(sample_a, sample_b)
        for name in grads_a:
            assert torch.equal(grads_a[name], grads_b[name]), name
    for (name, a), b in zip(whole_net.named_parameters(), chunked_net.parameters()):
        assert torch.equal(a, b), name
    assert set(calls) == {CHUNK}


def test_lora_inside_chunked_layers_differs_only_in_its_sums_over_tokens():
    """LoRA on every Linear: the loss, the sample and the gradients of LoRA weights outside the
    chunked layers are identical; those inside agree to rounding (a sum over tokens, chunk by chunk)."""
    (whole, whole_net, whole_opt), (chunked, chunked_net, chunked_opt) = twins({})
    loss_a, sample_a, grads_a = step(whole, whole_net, whole_opt, 0, chunk=0)
    loss_b, sample_b, grads_b = step(chunked, chunked_net, chunked_opt, 0, chunk=CHUNK)
    assert torch.equal(loss_a, loss_b) and torch.equal(sample_a, sample_b)
    inside = [n for n in grads_a if any(f"_{part}_" in f"_{n.replace('.', '_')}_" for part in
                                        ("img_mlp", "txt_mlp", "linear1", "linear2"))]
    assert len(inside) == 2 * (2 * 4 + 2 * 2)  # down + up: 4 MLP Linears per double block, 2 per single block
    assert sum(not torch.equal(grads_a[n], grads_b[n]) for n in inside) > 0  # summed in another order
    for name in grads_a:
        if name in inside:
            torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(grads_a[name], grads_b[name]), name


def test_a_chunked_feedforward_equals_the_whole_one_exactly():
    """A frozen MLP: output and the gradient of its input, bit for bit; the tokens are split in
    chunks of equal size (no small remainder), and in backward the hidden activations exist one
    chunk at a time (the recompute)."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 256), nn.GELU(approximate="tanh"), nn.Linear(256, 64)).requires_grad_(False)
    x = torch.randn(2, 300, 64, requires_grad=True)
    out = tokenwise(mlp, x)
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    widths = []
    mlp[1].register_forward_hook(lambda module, args, output: widths.append(output.shape[1]))
    for chunk, expected in ((64, [60] * 5), (100, [100] * 3), (128, [100] * 3), (299, [150] * 2)):
        with token_chunks(chunk):
            chunked = tokenwise(mlp, x)
            widths.clear()
            (chunked_grad,) = torch.autograd.grad(chunked, x, torch.ones_like(chunked))
        assert torch.equal(out, chunked) and torch.equal(grad, chunked_grad)
        assert widths == expected  # recomputed in backward, chunk by chunk


def test_the_plan_shows_the_activation_drop():
    cfg = {**DEFAULTS, **dict(resolution=256, ae_path="ae.safetensors", t5_max_length=16, kernels="torch")}
    tiny = flux.FluxParams(hidden_size=128, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[16, 24, 24],
                           context_in_dim=64, vec_in_dim=32)
    whole = plan.plan(cfg, tiny)
    chunked = plan.plan(dict(cfg, chunk_feedforward=True, feedforward_chunk=64), tiny)
    drop = whole["device_high_water"][plan.ACTIVATIONS] - chunked["device_high_water"][plan.ACTIVATIONS]
    # 256 image tokens: a double block's image MLP holds (256 x 512) bf16 hidden values twice (before and
    # after GELU) whole; chunked, 64 tokens' worth. At least one of the two must have gone.
    assert drop >= (256 - 64) * 4 * 128 * 2, drop
    assert chunked["phases"]["training"] < whole["phases"]["training"]
    assert chunked["flops"] > whole["flops"]  # the price: each chunked part runs once more per step
