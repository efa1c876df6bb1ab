"""Benchmarks for kernels.py at FLUX.1 shapes (1024 px: 4096 image + 512 text tokens, width 3072,
24 heads x 128), and a GPU-free count of the memory traffic the fused kernels save.

  python bench/kernels.py            time each kernel: eager torch vs torch.compile vs Triton,
                                     forward and forward+backward, with achieved bandwidth (CUDA)
  python bench/kernels.py --traffic  bytes read + written by the element-wise chains of one FLUX
                                     double block and one single block, eager vs fused (no GPU)
  python bench/kernels.py --tiny     the timing loop on tiny shapes on any device (a smoke test)

Traffic is counted, not estimated: the chains run on meta tensors (no memory, no GPU) under a
dispatch mode that adds up, for every operator that is not a view, the bytes of every tensor it
reads and writes. In eager mode those operators are aten's kernels; in fused mode they are the
custom ops of kernels.py (plus the small torch sums of their partial buffers). Bandwidth in the
timing table is the fused op's traffic divided by the time, for all three variants alike.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch
from einops import rearrange
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels  # noqa: E402
from models import layers  # noqa: E402

# FLUX.1 at 1024 x 1024 px, batch 1
IMG_TOKENS, TXT_TOKENS, WIDTH, HEADS, HEAD_DIM, MLP_WIDTH = 4096, 512, 3072, 24, 128, 4 * 3072
DOUBLE_BLOCKS, SINGLE_BLOCKS = 19, 38


# --- counting bytes ------------------------------------------------------------------------------


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses (a broadcast (B, 1, H) vector counts once)."""
    distinct = math.prod(size for size, stride in zip(t.shape, t.stride()) if stride != 0)
    return distinct * t.element_size()


def is_view(func) -> bool:
    returns = func._schema.returns
    return bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write


class TrafficCounter(TorchDispatchMode):
    """Adds up bytes read and written per operator (inputs + outputs; views and allocations are free)."""

    FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias"}

    def __init__(self):
        super().__init__()
        self.by_op: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name.split("::")[-1]
        if not is_view(func) and name not in self.FREE:
            tensors = {id(t): t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)}
            moved = sum(tensor_bytes(t) for t in tensors.values())  # x * x reads x once
            key = str(func.overloadpacket)
            self.by_op[key] = self.by_op.get(key, 0) + moved
        return out

    @property
    def total(self) -> int:
        return sum(self.by_op.values())


def meta(*shape, dtype=torch.bfloat16, grad=True) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta", requires_grad=grad)


def count_chain(run, inputs: list[torch.Tensor], mode: str) -> tuple[int, int]:
    """(forward bytes, backward bytes) of run(*inputs) with models.layers in kernel `mode`."""
    layers.set_kernels(mode)
    try:
        with TrafficCounter() as forward:
            outputs = run(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        upstream = [torch.empty_like(o) for o in outputs]  # made outside the counter: not traffic
        needs_grad = [t for t in inputs if t.requires_grad]
        with TrafficCounter() as backward:
            torch.autograd.grad(outputs, needs_grad, upstream)
    finally:
        layers.set_kernels("torch")
    return forward.total, backward.total


def q_and_k(tokens: int, row_width: int) -> list[torch.Tensor]:
    """q and k (B, heads, L, D) as the strided views a fused qkv Linear output gives."""
    qkv = torch.empty(1, tokens, row_width, dtype=torch.bfloat16, device="meta")
    q, k = rearrange(qkv[..., : 2 * WIDTH], "B L (K H D) -> K B H L D", K=2, H=HEADS)
    return [q.requires_grad_(), k.requires_grad_()]


def rope_table(tokens: int) -> torch.Tensor:
    return torch.empty(1, 1, tokens, HEAD_DIM // 2, 2, 2, dtype=torch.float32, device="meta")


def vector() -> torch.Tensor:
    return meta(1, 1, WIDTH)


def block_chains() -> dict[str, list[tuple[str, callable, callable]]]:
    """For each block kind: (chain, function of models.layers, inputs factory), once per stream."""
    double, single = [], []
    for stream, L in (("img", IMG_TOKENS), ("txt", TXT_TOKENS)):
        pe = rope_table(L)
        double += [
            (
                f"{stream} norm_modulate (attn in)",
                layers.norm_modulate,
                lambda L=L: [meta(1, L, WIDTH), vector(), vector()],
            ),
            (
                f"{stream} qk_norm_rope",
                lambda q, k, qs, ks, pe=pe: layers.qk_norm_rope(q, k, qs, ks, pe),
                lambda L=L: q_and_k(L, 3 * WIDTH) + [meta(HEAD_DIM, dtype=torch.bfloat16), meta(HEAD_DIM)],
            ),
            (
                f"{stream} gated_residual + norm_modulate (mlp in)",
                layers.gated_residual_norm_modulate,
                lambda L=L: [meta(1, L, WIDTH), vector(), meta(1, L, WIDTH), vector(), vector()],
            ),
            (f"{stream} gelu_tanh", layers.gelu_tanh, lambda L=L: [meta(1, L, MLP_WIDTH)]),
            (
                f"{stream} gated_residual (mlp out)",
                layers.gated_residual,
                lambda L=L: [meta(1, L, WIDTH), vector(), meta(1, L, WIDTH)],
            ),
        ]
    L = IMG_TOKENS + TXT_TOKENS
    pe = rope_table(L)
    linear1_out = 3 * WIDTH + MLP_WIDTH  # [q | k | v | mlp_in]: q, k and the MLP input are strided views

    def mlp_in():
        out = torch.empty(1, L, linear1_out, dtype=torch.bfloat16, device="meta")
        return [out[..., 3 * WIDTH :].requires_grad_()]

    single += [
        ("norm_modulate", layers.norm_modulate, lambda: [meta(1, L, WIDTH), vector(), vector()]),
        (
            "qk_norm_rope",
            lambda q, k, qs, ks: layers.qk_norm_rope(q, k, qs, ks, pe),
            lambda: q_and_k(L, linear1_out) + [meta(HEAD_DIM), meta(HEAD_DIM)],
        ),
        ("gelu_tanh", layers.gelu_tanh, mlp_in),
        ("gated_residual", layers.gated_residual, lambda: [meta(1, L, WIDTH), vector(), meta(1, L, WIDTH)]),
    ]
    return {"double block": double, "single block": single}


def traffic_table() -> dict[str, list[tuple[str, int, int, int, int]]]:
    """{block kind: [(chain, eager fwd, eager bwd, fused fwd, fused bwd) bytes]}."""
    table = {}
    for kind, chains in block_chains().items():
        rows = []
        for name, run, make_inputs in chains:
            eager = count_chain(run, make_inputs(), "torch")
            fused = count_chain(run, make_inputs(), "triton")
            rows.append((name, *eager, *fused))
        table[kind] = rows
    return table


def print_traffic() -> None:
    print("Memory traffic of the element-wise chains, FLUX.1 1024 px (4096 img + 512 txt tokens), batch 1, bf16.")
    print("Counted on meta tensors: bytes read + written by every non-view operator; MB = 1e6 bytes.")
    print("All inputs need gradients (full fine-tuning); pe (fp32 rotations) does not.\n")
    totals = {}
    for kind, rows in traffic_table().items():
        print(f"{kind}:")
        print(f"  {'chain':42s} " + " ".join(f"{h:>10s}" for h in COLUMNS) + f" {'saved':>7s}")
        sums = [0, 0, 0, 0]
        for name, *counts in rows:
            sums = [s + c for s, c in zip(sums, counts)]
            print(_traffic_row(name, counts))
        print(_traffic_row("total per block (MB)", sums) + "\n")
        totals[kind] = sums
    blocks = {"double block": DOUBLE_BLOCKS, "single block": SINGLE_BLOCKS}
    whole = [sum(totals[k][i] * n for k, n in blocks.items()) for i in range(4)]
    print(f"whole model ({DOUBLE_BLOCKS} double + {SINGLE_BLOCKS} single blocks), GB:")
    for label, forward, backward in (("eager", *whole[:2]), ("fused", *whole[2:])):
        total = forward + backward
        print(f"  {label}  forward {forward / 1e9:6.1f}  backward {backward / 1e9:6.1f}  total {total / 1e9:6.1f}")


COLUMNS = ("eager fwd", "eager bwd", "fused fwd", "fused bwd")


def _traffic_row(name: str, counts) -> str:
    eager, fused = counts[0] + counts[1], counts[2] + counts[3]
    megabytes = " ".join(f"{c / 1e6:10.1f}" for c in counts)
    return f"  {name:42s} {megabytes} {100 * (1 - fused / eager):6.0f}%"


# --- timing (CUDA) -------------------------------------------------------------------------------


def cases(device: str, tiny: bool) -> list[tuple[str, callable, callable, list]]:
    """(name, Triton function, torch reference, inputs) at FLUX shapes (SDXL shapes for GEGLU)."""
    scale = 64 if tiny else 1
    L, H, D = (IMG_TOKENS + TXT_TOKENS) // scale, WIDTH // scale, HEAD_DIM
    heads = max(1, HEADS // scale)

    def x(*shape, grad=True, dtype=torch.bfloat16):
        return torch.randn(shape, device=device, dtype=dtype, requires_grad=grad)

    qkv = torch.randn(1, L, 3 * heads * D, device=device, dtype=torch.bfloat16)
    q, k, _ = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=heads)
    angles = torch.rand(1, 1, L, D // 2, device=device) * 6.28
    pe = torch.stack([angles.cos(), -angles.sin(), angles.sin(), angles.cos()], -1).reshape(1, 1, L, D // 2, 2, 2)
    return [
        ("norm_modulate", kernels.norm_modulate, kernels.norm_modulate_reference, [x(1, L, H), x(1, 1, H), x(1, 1, H)]),
        (
            "gated_residual",
            kernels.gated_residual,
            kernels.gated_residual_reference,
            [x(1, L, H), x(1, 1, H), x(1, L, H)],
        ),
        (
            "gated_residual_norm_modulate",
            kernels.gated_residual_norm_modulate,
            kernels.gated_residual_norm_modulate_reference,
            [x(1, L, H), x(1, 1, H), x(1, L, H), x(1, 1, H), x(1, 1, H)],
        ),
        (
            "qk_norm_rope",
            kernels.qk_norm_rope,
            kernels.qk_norm_rope_reference,
            [q.requires_grad_(), k.requires_grad_(), x(D), x(D), pe],
        ),
        ("gelu_tanh", kernels.gelu_tanh, kernels.gelu_tanh_reference, [x(1, L, 4 * H)]),
        # SDXL 1024 px, first transformer level: 64 x 64 tokens, width 640 -> GEGLU 2 x 2560
        ("geglu (SDXL)", kernels.geglu, kernels.geglu_reference, [x(2, 4096 // scale, 2 * 2560 // scale)]),
    ]


def time_ms(fn, device: str) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()  # warm-up, then one timed run (the interpreter is far too slow for more)
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def forward_backward(fn, inputs):
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    needs_grad = [t for t in inputs if t.requires_grad]
    return lambda: torch.autograd.grad(fn(*inputs), needs_grad, [torch.ones_like(o) for o in outputs])


def fused_bytes(fn, inputs) -> tuple[int, int]:
    """Traffic of the fused op, counted on meta copies of the inputs (strides kept)."""
    metas = []
    for t in inputs:
        m = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
        metas.append(m.requires_grad_(t.requires_grad))
    return count_chain(fn, metas, "torch")


def print_timings(device: str, tiny: bool) -> None:
    name = torch.cuda.get_device_name() if device == "cuda" else device
    print(f"Kernel timings on {name}, bf16; bandwidth = fused op's bytes / time (GB/s)\n")
    print(f"{'kernel':30s} {'pass':8s} {'eager ms':>9s} {'compile ms':>10s} {'triton ms':>9s}", end="  ")
    print(f"{'eager':>6s} {'compile':>7s} {'triton':>6s}")
    for label, fused, reference, inputs in cases(device, tiny):
        compiled = torch.compile(reference, backend="inductor" if device == "cuda" else "aot_eager")
        byte_counts = fused_bytes(fused, inputs)
        for pass_name, nbytes, wrap in (
            ("fwd", byte_counts[0], lambda f: (lambda: f(*inputs))),
            ("fwd+bwd", sum(byte_counts), lambda f: forward_backward(f, inputs)),
        ):
            with torch.no_grad() if pass_name == "fwd" else torch.enable_grad():
                ms = [time_ms(wrap(f), device) for f in (reference, compiled, fused)]
            bandwidth = " ".join(f"{nbytes / (m * 1e-3) / 1e9:6.0f}" for m in ms)
            print(f"{label:30s} {pass_name:8s} {ms[0]:9.3f} {ms[1]:10.3f} {ms[2]:9.3f}  {bandwidth}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traffic", action="store_true", help="count bytes moved per block (no GPU needed)")
    parser.add_argument("--tiny", action="store_true", help="time tiny shapes on any device (smoke test)")
    args = parser.parse_args()
    if args.traffic:
        print_traffic()
        return
    if args.tiny:
        print_timings("cuda" if torch.cuda.is_available() else "cpu", tiny=True)
        return
    if not torch.cuda.is_available() or not kernels.HAVE_TRITON:
        print("bench/kernels.py needs a CUDA GPU and triton to time kernels; --traffic runs without one.")
        return
    print_timings("cuda", tiny=False)


if __name__ == "__main__":
    main()
