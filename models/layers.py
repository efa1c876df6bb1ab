"""Pieces shared by several models: timestep embedding, RMSNorm, modulation,
RoPE, attention, MLP embedders, and the small fused-op entry points.

The element-wise chains that dominate a DiT block outside its matmuls
(norm + modulate, QK-norm + RoPE, gated residual, GELU) go through the
functions at the bottom of this file. They run plain torch by default;
`set_kernels("triton")` (or "auto" on CUDA) routes them to kernels.py, so
that reading a model never requires reading Triton.
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of t (B,) -> (B, dim), [cos | sin] order.

    FLUX passes t in [0, 1]; the x1000 happens here, as in the reference code.
    Computed in fp32 whatever t's dtype, returned in t's dtype if floating.
    """
    t = time_factor * t.float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_pos_embed_2d(dim: int, rows: Tensor, cols: Tensor) -> Tensor:
    """Fixed 2-D sin-cos positions (MAE / DiT / SD3 `pos_embed`) for a grid of coordinates.

    rows (h,) and cols (w,) are the coordinates of each grid row and column (0, 1, 2, ... for
    the plain table). Returns (h*w, dim) float64, tokens row-major. Each token is
    [sin(col*f) | cos(col*f) | sin(row*f) | cos(row*f)] with f = 10000^(-k/(dim/4)),
    k = 0..dim/4-1: the column comes first, as in the reference code (its meshgrid puts w first)."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=rows.device) / quarter)

    def axis(pos: Tensor) -> Tensor:  # (n,) -> (n, dim/2) = [sin | cos]
        angles = pos.double()[:, None] * freqs[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    col_emb, row_emb = axis(cols), axis(rows)
    h, w = len(rows), len(cols)
    grid = torch.cat([col_emb[None].expand(h, w, -1), row_emb[:, None].expand(h, w, -1)], dim=-1)
    return rearrange(grid, "h w d -> (h w) d")


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (FLUX time_in, guidance_in, vector_in)."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class TanhGELU(nn.Module):
    """GELU with the tanh approximation, as a module (nn.GELU(approximate="tanh") in the reference
    code) that runs through the fused-op entry point `gelu_tanh` below."""

    def forward(self, x: Tensor) -> Tensor:
        return gelu_tanh(x)


class RMSNorm(nn.Module):
    """RMSNorm whose learned parameter is called `scale` (FLUX/SD3 QK-norm).
    The statistics are computed in fp32 (eps 1e-6)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.scale, self.eps)


def rms_norm(x: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    x_dtype = x.dtype
    x = x.float()
    rrms = torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + eps)
    return (x * rrms).to(x_dtype) * scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)


@dataclass
class ModulationOut:
    shift: Tensor  # (B, 1, H)
    scale: Tensor  # (B, 1, H)
    gate: Tensor  # (B, 1, H)


class Modulation(nn.Module):
    """lin(silu(vec)) chunked as (shift, scale, gate), once or twice."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.is_double else None


# --- RoPE on adjacent pairs (FLUX) ---------------------------------------------------------------


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Rotation matrices for positions pos (B, L) on one axis -> (B, L, dim/2, 2, 2), fp32.
    Frequencies are built in float64 (as diffusers does) and rounded once."""
    assert dim % 2 == 0
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta**scale)
    out = torch.einsum("...n,d->...nd", pos.to(torch.float64), omega)
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return rearrange(out, "b n d (i j) -> b n d i j", i=2, j=2).float()


class EmbedND(nn.Module):
    """ids (B, L, n_axes) -> pe (B, 1, L, sum(axes_dim)/2, 2, 2); no parameters."""

    def __init__(self, dim: int, theta: int, axes_dim: list[int]):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.axes_dim = axes_dim

    def forward(self, ids: Tensor) -> Tensor:
        n_axes = ids.shape[-1]
        emb = torch.cat([rope(ids[..., i], self.axes_dim[i], self.theta) for i in range(n_axes)], dim=-3)
        return emb.unsqueeze(1)


def apply_rope(xq: Tensor, xk: Tensor, freqs_cis: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate adjacent pairs (x[2k], x[2k+1]) of q and k (B, H, L, D) in fp32.

    With R = freqs_cis[..., k, :, :] the 2x2 rotation of pair k, the reference code computes
        out[2k]   = R00 x[2k] + R01 x[2k+1]
        out[2k+1] = R10 x[2k] + R11 x[2k+1]
    Written here as x * [R00, R11] + swap(x) * [R01, R10], swap exchanging the two entries of
    each pair: the same products and sums (bit for bit), but on full-shape (B, H, L, D) tensors,
    so that backward is element-wise too, where the pairwise form (B, H, L, D/2, 1) x
    (B, 1, L, D/2, 2) sums over a size-2 axis and scatters into zeros."""
    same = torch.stack((freqs_cis[..., 0, 0], freqs_cis[..., 1, 1]), dim=-1).flatten(-2)  # (B, 1, L, D)
    cross = torch.stack((freqs_cis[..., 0, 1], freqs_cis[..., 1, 0]), dim=-1).flatten(-2)  # (B, 1, L, D)

    def rotate(x: Tensor) -> Tensor:
        x32 = x.float()
        swapped = x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # [x1, x0, x3, x2, ...]
        return (x32 * same + swapped * cross).type_as(x)

    return rotate(xq), rotate(xk)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """SDPA over (B, H, L, D) -> (B, L, H*D). `mask` is a boolean (B, L) key mask or None.
    Inside `with attention_impl(fn):` (below) the call goes to fn instead."""
    if _attention_route is not None:
        return _routed_attention(q, k, v, mask)
    if mask is not None:
        mask = mask[:, None, None, :]  # broadcast over heads and queries
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return rearrange(x, "B H L D -> B L (H D)")


# --- routing attention -------------------------------------------------------------------------
# The memory plan runs a model on meta tensors with attention through the operators CUDA's SDPA
# would pick; `attention_impl` lets it do that without patching any model module.

_attention_route = None  # the function every `attention` call goes to, or None


@contextmanager
def attention_impl(fn):
    """While active, every `attention(q, k, v, mask)` call (so every model's attention) returns
    fn(q, k, v, mask) instead. Inside fn, `attention` is plain SDPA again, so fn may call it.
    `attention_impl(None)` restores plain SDPA for the duration; contexts nest."""
    global _attention_route
    previous, _attention_route = _attention_route, fn
    try:
        yield
    finally:
        _attention_route = previous


def _routed_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    route = _attention_route
    with attention_impl(None):
        return route(q, k, v, mask)


# --- token-wise parts of a block ------------------------------------------------------------------
# A feed-forward computes each token from that token alone, so it can run on a few tokens at a
# time: its hidden activations (4x the width) then exist for one chunk of tokens instead of all
# of them. A network marks such parts of its forward with `tokenwise(fn, *inputs)`, which is a
# plain call unless the trainer sets a chunk size (training.py, from the config's
# chunk_feedforward / feedforward_chunk); it must be marked inside the network because parts of
# a feed-forward are lines of a block's forward rather than modules (FLUX's single blocks feed
# GELU(mlp) and the attention output, concatenated, to linear2).

_token_chunk = 0  # tokens per chunk; 0: whole


def set_token_chunk(tokens: int) -> None:
    """Run `tokenwise` parts in chunks of this many tokens (0: whole)."""
    global _token_chunk
    if tokens < 0:
        raise ValueError(f"a token chunk is a positive number of tokens (or 0 for none), got {tokens}")
    _token_chunk = tokens


@contextmanager
def token_chunks(tokens: int):
    """set_token_chunk(tokens) for the duration of the context, then the previous size again."""
    previous = _token_chunk
    set_token_chunk(tokens)
    try:
        yield
    finally:
        set_token_chunk(previous)


def tokenwise(fn, *inputs: Tensor, recompute: bool = True) -> Tensor:
    """fn(*inputs) for inputs (B, L, ...) of which fn computes each token on its own; returns
    (B, L, ...). With a chunk size set, fn runs on chunks of the tokens (dim 1) and the outputs
    are concatenated: every token goes through the same operations, so the result is the same
    (bit for bit where the matmul rounds a row the same whatever the number of rows: CPU BLAS
    on one thread for chunks of some dozens of tokens or more).
    While gradients are recorded, each chunk runs under torch.utils.checkpoint (`recompute`), so
    it keeps only its inputs and its intermediates exist again, one chunk at a time, in backward;
    recompute=False keeps what fn saves (for a single Linear that is its input: nothing new)."""
    length = inputs[0].shape[1]
    if not _token_chunk or length <= _token_chunk:
        return fn(*inputs)
    # Chunks of equal size (to a token), at most _token_chunk: no small remainder, for which a
    # matmul library may pick another kernel that rounds differently.
    count = -(-length // _token_chunk)
    sizes = [length // count + (i < length % count) for i in range(count)]
    shared = [{"left": count, "buffer": None, "shape": x.shape} for x in inputs]
    outputs, start = [], 0
    for size in sizes:
        # Each chunk is cut just before it runs, so in backward its gradient is written out as soon as
        # its own backward is done (autograd runs later-made nodes first), not after every chunk's.
        chunk = [_chunk_of(x, start, size, s) for x, s in zip(inputs, shared)]
        start += size
        use_checkpoint = recompute and torch.is_grad_enabled()
        outputs.append(checkpoint(fn, *chunk, use_reentrant=False) if use_checkpoint else fn(*chunk))
    return torch.cat(outputs, dim=1)


def _chunk_of(x: Tensor, start: int, size: int, shared: dict) -> Tensor:
    """x[:, start:start + size]. With gradients, the chunk's gradient is written into one buffer
    for x (_ChunkOf) instead of each chunk's being kept until the last and concatenated (as
    x.split's backward would): one copy of x's gradient instead of two."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x.narrow(1, start, size)
    return _ChunkOf.apply(x, start, size, shared)


class _ChunkOf(torch.autograd.Function):
    """x[:, start:start + size]; in backward the gradient goes into the buffer in `shared`, and the
    chunk whose gradient completes it returns the buffer as x's gradient (the others return none)."""

    @staticmethod
    def forward(ctx, x: Tensor, start: int, size: int, shared: dict) -> Tensor:
        ctx.start, ctx.size, ctx.shared = start, size, shared
        return x.narrow(1, start, size)

    @staticmethod
    def backward(ctx, grad: Tensor):
        shared = ctx.shared
        if shared["buffer"] is None:
            shared["buffer"] = grad.new_empty(shared["shape"])
        shared["buffer"].narrow(1, ctx.start, ctx.size).copy_(grad)
        shared["left"] -= 1
        if shared["left"]:
            return None, None, None, None
        buffer, shared["buffer"] = shared["buffer"], None
        return buffer, None, None, None


# --- fused-op entry points -----------------------------------------------------------------------
# Each function below is a chain of element-wise passes in eager torch. kernels.py provides a
# Triton version of each with the same signature; the kernel mode chooses which one runs:
#   "torch"   the torch code below (the default);
#   "triton"  every fused kernel, unchecked (tests, the memory plan on meta tensors);
#   "auto"    on CUDA, each fused kernel that passed its self-check (kernels.self_check: compiled
#             and run forward and backward once per process, device and dtype, against its torch
#             reference); a kernel that fails is replaced by its reference with one warning.
# Per kernel, not all or nothing: each entry point asks `use_fused(its name, x)`.

KERNEL_MODES = ("auto", "torch", "triton")
# Device types on which "auto" considers the fused kernels. The tests add "cpu" to run the same
# selection through the Triton interpreter (TRITON_INTERPRET=1).
AUTO_DEVICE_TYPES = ("cuda",)
OPTIMIZER_KERNELS = ("adamw", "adafactor")  # kernels_optim.py, for optim.py

_kernel_mode = "torch"


def set_kernels(mode: str) -> None:
    """'torch' (reference), 'triton' (kernels.py, unchecked), or 'auto' (self-checked Triton on CUDA).
    'triton' without the triton package runs the references on real tensors (config.py refuses it
    for training) and the custom ops' shape functions on meta tensors (the memory plan)."""
    global _kernel_mode
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernels must be 'auto', 'torch' or 'triton', got {mode!r}")
    _kernel_mode = mode


def kernel_mode() -> str:
    """The mode set_kernels last set."""
    return _kernel_mode


@contextmanager
def using_kernels(mode: str):
    """set_kernels(mode) for the duration of the context, then the previous mode again."""
    previous = _kernel_mode
    set_kernels(mode)
    try:
        yield
    finally:
        set_kernels(previous)


def triton_installed() -> bool:
    from importlib.util import find_spec

    return find_spec("triton") is not None


def use_fused(name: str, x: Tensor) -> bool:
    """Whether the fused kernel `name` runs for inputs like x (its device and dtype); names are
    kernels.SELF_CHECKS's and kernels_optim.SELF_CHECKS's ("norm_modulate", ..., "adamw")."""
    if _kernel_mode == "torch":
        return False
    if _kernel_mode == "triton":
        return True
    if x.device.type not in AUTO_DEVICE_TYPES or not triton_installed():
        return False
    import kernels

    return kernels.passes_self_check(name, x.device, x.dtype)


def use_fused_optimizer(p: Tensor) -> bool:
    """Whether optim.py may run the Triton updates of kernels_optim.py for parameter p: both
    (AdamW and Adafactor) passed their self-check on p's device in "auto". optim.py calls one switch
    for both, so a failing one switches off the other too; `use_fused("adamw", p)` asks for one."""
    return all(use_fused(name, p) for name in OPTIMIZER_KERNELS)


def layer_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """LayerNorm over the last dim without affine weights."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def norm_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """(1 + scale) * LN(x) + shift, with shift and scale (B, 1, H) broadcast over tokens."""
    if use_fused("norm_modulate", x):
        from kernels import norm_modulate as fused

        return fused(x, shift, scale, eps)
    return (1 + scale) * layer_norm(x, eps) + shift


def gated_residual(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """x + gate * y, gate (B, 1, H)."""
    if use_fused("gated_residual", x):
        from kernels import gated_residual as fused

        return fused(x, gate, y)
    return x + gate * y


def gated_residual_norm_modulate(
    x: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """h = x + gate * y, and h's modulated norm (1 + scale) * LN(h) + shift: the residual update
    that is followed directly by the next sub-block's input norm. Returns (h, normed)."""
    if use_fused("gated_residual_norm_modulate", x):
        from kernels import gated_residual_norm_modulate as fused

        return fused(x, gate, y, shift, scale, eps)
    h = gated_residual(x, gate, y)
    return h, norm_modulate(h, shift, scale, eps)


def gelu_tanh(x: Tensor) -> Tensor:
    if use_fused("gelu_tanh", x):
        from kernels import gelu_tanh as fused

        return fused(x)
    return F.gelu(x, approximate="tanh")


def qk_norm_rope(q: Tensor, k: Tensor, q_scale: Tensor, k_scale: Tensor, pe: Tensor | None) -> tuple[Tensor, Tensor]:
    """RMSNorm q and k (B, H, L, D) with their learned scales, then RoPE on adjacent pairs.
    Returns q, k in the input dtype. pe=None skips the rotation (SD3)."""
    if pe is not None and use_fused("qk_norm_rope", q):
        from kernels import qk_norm_rope as fused

        return fused(q, k, q_scale, k_scale, pe)
    q, k = rms_norm(q, q_scale), rms_norm(k, k_scale)
    if pe is None:
        return q, k
    return apply_rope(q, k, pe)


def geglu(x: Tensor) -> Tensor:
    """[a | b] = x split in halves on the last dim -> a * GELU(b), exact erf GELU (SDXL GEGLU)."""
    if use_fused("geglu", x):
        from kernels import geglu as fused

        return fused(x)
    a, b = x.chunk(2, dim=-1)
    return a * F.gelu(b)
