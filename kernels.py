"""Triton kernels for the element-wise chains of a DiT block, each beside the plain-torch
reference it must match.

  norm_modulate                 (1 + scale) * LayerNorm(x) + shift
  gated_residual                x + gate * y
  gated_residual_norm_modulate  both of the above in one pass: h = x + gate * y, then h's modulated norm
  qk_norm_rope                  RMSNorm of q and k with learned scales, then RoPE on adjacent pairs (FLUX)
  gelu_tanh                     GELU, tanh approximation (FLUX MLPs)
  geglu                         a * GELU(b) for [a | b] = x, exact erf GELU (SDXL feed-forward)

Each has a forward and a backward kernel. They are registered as custom ops (namespace `fused`)
with fake implementations and autograd formulas, so they work with autograd, FakeTensorMode and
torch.compile. models/layers.py chooses between these and plain torch (`set_kernels`).

Conventions inside every kernel:
  - values are upcast to fp32 right after loading and computed in fp32 (bf16 arithmetic is also
    wrong under TRITON_INTERPRET=1), then cast explicitly to the output's dtype before storing;
  - inputs are read through their strides (no hidden .contiguous() copies); outputs are contiguous;
  - per-channel gradients (of shift, scale, gate, q/k scales) are summed over tokens in two
    deterministic stages: each program writes its own fp32 partial sum, torch adds them up.
    No atomics, so two backward passes give bit-identical gradients;
  - no libdevice (unsupported by the interpreter): tanh(x) = 2 * sigmoid(2x) - 1.

Without triton installed this file still imports and every function runs its torch reference.
On CPU the kernels run only under the Triton interpreter (TRITON_INTERPRET=1, set before import).
"""
import os
import warnings
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # the kernels below are then plain functions that are never launched
    HAVE_TRITON = False

    class _NoTriton:
        constexpr = None

        @staticmethod
        def jit(fn=None, **options):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()

# Triton reads this when a kernel is decorated, i.e. when this file is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Launch shapes. Reductions over tokens use at most REDUCTION_PROGRAMS programs per call, each
# summing at least MIN_REDUCTION_TOKENS tokens into one partial sum (so the partial buffers stay
# small next to the tensors); tests lower these to force several programs and loops.
TILE_ELEMENTS = 4096  # elements in one (rows, whole row) tile
REDUCTION_PROGRAMS = 256
MIN_REDUCTION_TOKENS = 16
QK_BLOCK_TOKENS = 16
QK_HEADS_PER_PROGRAM = 4


# =================================================================================================
# Plain-torch references (the semantics of models/layers.py)
# =================================================================================================


def norm_modulate_reference(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    return (1 + scale) * F.layer_norm(x, x.shape[-1:], eps=eps) + shift


def gated_residual_reference(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    return x + gate * y


def gated_residual_norm_modulate_reference(x, gate, y, shift, scale, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    h = gated_residual_reference(x, gate, y)
    return h, norm_modulate_reference(h, shift, scale, eps)


def qk_norm_rope_reference(q, k, q_scale, k_scale, pe, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """RMSNorm (fp32 statistics, rounded to the input dtype, times the scale), then rotate
    adjacent pairs by pe (B, 1, L, D/2, 2, 2) in fp32, rounded to the normed dtype."""

    def rms_norm(x, scale):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * scale

    def rope(x):
        pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)  # (..., D/2, 1, [even, odd])
        out = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]  # (..., D/2, 2)
        return out.reshape(x.shape).type_as(x)

    return rope(rms_norm(q, q_scale)), rope(rms_norm(k, k_scale))


def gelu_tanh_reference(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def geglu_reference(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return a * F.gelu(b)


# =================================================================================================
# Public functions (what models/layers.py calls)
# =================================================================================================


def _launchable(x: Tensor) -> bool:
    """Whether the custom op can run: with triton installed, or on meta tensors (the memory plan),
    where only its fake (shape) implementation runs, so the plan of the Triton path does not
    depend on triton being installed where it is made."""
    return HAVE_TRITON or x.is_meta


def norm_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """x (B, L, H); shift, scale broadcastable to (B, 1, H)."""
    if not _launchable(x):
        return norm_modulate_reference(x, shift, scale, eps)
    B, L, H = _check_tokens(x, "x")
    return _norm_modulate(x, shift.expand(B, 1, H), scale.expand(B, 1, H), eps)


def gated_residual(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """x, y (B, L, H); gate broadcastable to (B, 1, H)."""
    if not _launchable(x):
        return gated_residual_reference(x, gate, y)
    B, L, H = _check_tokens(x, "x")
    return _gated_residual(x, gate.expand(B, 1, H), y.expand(B, L, H))


def gated_residual_norm_modulate(x, gate, y, shift, scale, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """(h, (1 + scale) * LN(h) + shift) for h = x + gate * y; one read of x and y, no LN copy saved."""
    if not _launchable(x):
        return gated_residual_norm_modulate_reference(x, gate, y, shift, scale, eps)
    B, L, H = _check_tokens(x, "x")
    per_sample = (B, 1, H)
    return _gated_residual_norm_modulate(
        x, gate.expand(per_sample), y.expand(B, L, H), shift.expand(per_sample), scale.expand(per_sample), eps
    )


def qk_norm_rope(q: Tensor, k: Tensor, q_scale: Tensor, k_scale: Tensor, pe: Tensor, eps: float = 1e-6):
    """q, k (B, heads, L, D), any strides; scales (D,); pe (B or 1, 1, L, D/2, 2, 2)."""
    if not _launchable(q):
        return qk_norm_rope_reference(q, k, q_scale, k_scale, pe, eps)
    if q.ndim != 4 or q.shape != k.shape or q.shape[-1] % 2:
        raise ValueError(f"q and k must both be (B, heads, L, D) with D even, got {tuple(q.shape)}, {tuple(k.shape)}")
    B, _, L, D = q.shape
    return _qk_norm_rope(q, k, q_scale, k_scale, pe.expand(B, 1, L, D // 2, 2, 2), eps)


def gelu_tanh(x: Tensor) -> Tensor:
    return _gelu_tanh(x) if _launchable(x) else gelu_tanh_reference(x)


def geglu(x: Tensor) -> Tensor:
    """x (..., 2N) -> (..., N): first half times exact GELU of the second half."""
    if x.shape[-1] % 2:
        raise ValueError(f"geglu needs an even last dimension, got {tuple(x.shape)}")
    return _geglu(x) if _launchable(x) else geglu_reference(x)


# =================================================================================================
# Launch helpers (shapes only: nothing here touches torch.cuda for CPU tensors)
# =================================================================================================


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _num_warps(tile_elements: int) -> int:
    return 8 if tile_elements >= 4096 else 4


def _row_tile(width: int) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_WIDTH) for tiles of whole rows, about TILE_ELEMENTS elements each."""
    block_width = _next_pow2(width)
    return max(1, min(64, TILE_ELEMENTS // block_width)), block_width


def _token_chunks(batch: int, tokens: int, block_rows: int) -> tuple[int, int]:
    """Split each sample's tokens into (n_chunks, rows_per_chunk) for a two-stage reduction:
    one program per (sample, chunk), about REDUCTION_PROGRAMS programs in all; rows_per_chunk
    is a multiple of block_rows so that every tile lies inside one chunk."""
    n_blocks = _cdiv(tokens, block_rows)
    n_chunks = max(1, min(n_blocks, _cdiv(REDUCTION_PROGRAMS, batch), tokens // MIN_REDUCTION_TOKENS))
    rows_per_chunk = _cdiv(n_blocks, n_chunks) * block_rows
    return _cdiv(tokens, rows_per_chunk), rows_per_chunk


def _heads_per_program(heads: int) -> int:
    """The largest divisor of `heads` up to QK_HEADS_PER_PROGRAM, so every head group is full."""
    return max(d for d in range(1, min(heads, QK_HEADS_PER_PROGRAM) + 1) if heads % d == 0)


def _qk_grid(q: Tensor) -> tuple[int, int, int]:
    B, heads, L, _ = q.shape
    return B, _cdiv(L, QK_BLOCK_TOKENS), heads // _heads_per_program(heads)


def _promote(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_tokens(x: Tensor, name: str) -> tuple[int, int, int]:
    if x.ndim != 3:
        raise ValueError(f"{name} must be a (batch, tokens, width) tensor, got shape {tuple(x.shape)}")
    return tuple(x.shape)


def launching_on(x: Tensor):
    """Context for a launch: the tensor's CUDA device, or nothing for the CPU interpreter."""
    if x.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "Triton kernels need CUDA tensors. On CPU, set TRITON_INTERPRET=1 before importing "
            "kernels.py (slow; the tests do this), or use set_kernels('auto') to run plain torch."
        )
    return torch.cuda.device(x.device) if x.is_cuda else nullcontext()


def _as_rows(x: Tensor) -> Tensor:
    """x (..., N) as a 2-D (rows, N) view when its leading dims collapse, else a copy."""
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:  # e.g. a transposed tensor: leading dims not mergeable into one stride
        return x.reshape(-1, x.shape[-1])


def _sum_partials(partials: Tensor, dtype: torch.dtype) -> Tensor:
    """Second reduction stage: (B, n_chunks, H) fp32 partial sums -> (B, 1, H) in dtype."""
    return partials.sum(1, keepdim=True).to(dtype)


# =================================================================================================
# Shared pieces of kernels
# =================================================================================================


@triton.jit
def _load_tile(ptr, rows, cols, stride_row, stride_col, mask):
    """A (rows, cols) tile as fp32; masked-out entries are 0."""
    offsets = rows[:, None] * stride_row + cols[None, :] * stride_col
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_vector(ptr, cols, stride, width):
    return tl.load(ptr + cols * stride, mask=cols < width, other=0.0).to(tl.float32)


@triton.jit
def _store_tile(ptr, rows, cols, width, value, mask):
    """Store into a contiguous (rows, width) output, casting to its dtype explicitly (an implicit
    fp32 -> bf16 store truncates under the interpreter instead of rounding)."""
    tl.store(ptr + rows[:, None] * width + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_rows(x, mask, width, eps):
    """Normalise each row of an fp32 tile: (x_hat, rstd). Padding stays 0 in x_hat."""
    mean = tl.sum(x, axis=1) / width
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.math.rsqrt(tl.sum(centred * centred, axis=1) / width + eps)
    return centred * rstd[:, None], rstd


@triton.jit
def _layer_norm_rows_backward(dx_hat, x_hat, rstd, width):
    """dL/dx from dL/dx_hat for x_hat = (x - mean) * rstd (the usual three-term formula)."""
    mean_dx_hat = tl.sum(dx_hat, axis=1) / width
    mean_dx_hat_x_hat = tl.sum(dx_hat * x_hat, axis=1) / width
    return rstd[:, None] * (dx_hat - mean_dx_hat[:, None] - x_hat * mean_dx_hat_x_hat[:, None])


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


# =================================================================================================
# 1. LayerNorm (no affine, eps 1e-6) + modulation:  out = (1 + scale) * LN(x) + shift
#    x, out (B, L, H); shift, scale (B, 1, H). Backward saves only x and scale; mean and rstd
#    are recomputed (the row is loaded anyway).
# =================================================================================================


@triton.jit
def _norm_modulate_fwd_kernel(
    x_ptr, sx_b, sx_l, sx_h,
    shift_ptr, sshift_b, sshift_h,
    scale_ptr, sscale_b, sscale_h,
    out_ptr,
    L, H, eps,
    BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    # grid (B, cdiv(L, BLOCK_L)): one tile of BLOCK_L whole rows of one sample
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows[:, None] < L) & (cols[None, :] < H)
    x = _load_tile(x_ptr + b * sx_b, rows, cols, sx_l, sx_h, mask)
    shift = _load_vector(shift_ptr + b * sshift_b, cols, sshift_h, H)
    scale = _load_vector(scale_ptr + b * sscale_b, cols, sscale_h, H)
    x_hat, _ = _layer_norm_rows(x, mask, H, eps)
    out = x_hat * (1.0 + scale[None, :]) + shift[None, :]
    _store_tile(out_ptr + b * L * H, rows, cols, H, out, mask)


@triton.jit
def _norm_modulate_bwd_kernel(
    dout_ptr, sd_b, sd_l, sd_h,
    x_ptr, sx_b, sx_l, sx_h,
    scale_ptr, sscale_b, sscale_h,
    dx_ptr, dshift_partial_ptr, dscale_partial_ptr,
    L, H, eps, ROWS_PER_CHUNK,
    BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    # grid (B, n_chunks): one program per chunk of ROWS_PER_CHUNK tokens of one sample; it writes
    # dx for its rows and one partial sum of dshift and dscale at [b, chunk, :]
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK_H)
    scale = _load_vector(scale_ptr + b * sscale_b, cols, sscale_h, H)
    dshift_acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    dscale_acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for start in range(chunk * ROWS_PER_CHUNK, (chunk + 1) * ROWS_PER_CHUNK, BLOCK_L):
        rows = start + tl.arange(0, BLOCK_L)
        mask = (rows[:, None] < L) & (cols[None, :] < H)
        x = _load_tile(x_ptr + b * sx_b, rows, cols, sx_l, sx_h, mask)
        dout = _load_tile(dout_ptr + b * sd_b, rows, cols, sd_l, sd_h, mask)
        x_hat, rstd = _layer_norm_rows(x, mask, H, eps)
        dx = _layer_norm_rows_backward(dout * (1.0 + scale[None, :]), x_hat, rstd, H)
        _store_tile(dx_ptr + b * L * H, rows, cols, H, dx, mask)
        dshift_acc += tl.sum(dout, axis=0)
        dscale_acc += tl.sum(dout * x_hat, axis=0)
    partial = (b * tl.num_programs(1) + chunk) * H + cols
    tl.store(dshift_partial_ptr + partial, dshift_acc, mask=cols < H)
    tl.store(dscale_partial_ptr + partial, dscale_acc, mask=cols < H)


@torch.library.custom_op("fused::norm_modulate", mutates_args=())
def _norm_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    B, L, H = x.shape
    out = torch.empty((B, L, H), dtype=_promote(x, shift, scale), device=x.device)
    block_l, block_h = _row_tile(H)
    with launching_on(x):
        _norm_modulate_fwd_kernel[(B, _cdiv(L, block_l))](
            x, *x.stride(), shift, shift.stride(0), shift.stride(2), scale, scale.stride(0), scale.stride(2),
            out, L, H, eps, BLOCK_L=block_l, BLOCK_H=block_h, num_warps=_num_warps(block_l * block_h),
        )  # fmt: skip
    return out


@_norm_modulate.register_fake
def _(x, shift, scale, eps):
    return x.new_empty(x.shape, dtype=_promote(x, shift, scale))


@torch.library.custom_op("fused::norm_modulate_backward", mutates_args=())
def _norm_modulate_backward(dout: Tensor, x: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """-> dx (B, L, H), dshift and dscale partial sums (B, n_chunks, H) fp32."""
    B, L, H = x.shape
    block_l, block_h = _row_tile(H)
    n_chunks, rows_per_chunk = _token_chunks(B, L, block_l)
    dx = torch.empty((B, L, H), dtype=x.dtype, device=x.device)
    dshift_partial = torch.empty((B, n_chunks, H), dtype=torch.float32, device=x.device)
    dscale_partial = torch.empty_like(dshift_partial)
    with launching_on(x):
        _norm_modulate_bwd_kernel[(B, n_chunks)](
            dout, *dout.stride(), x, *x.stride(), scale, scale.stride(0), scale.stride(2),
            dx, dshift_partial, dscale_partial, L, H, eps, rows_per_chunk,
            BLOCK_L=block_l, BLOCK_H=block_h, num_warps=_num_warps(block_l * block_h),
        )  # fmt: skip
    return dx, dshift_partial, dscale_partial


@_norm_modulate_backward.register_fake
def _(dout, x, scale, eps):
    B, L, H = x.shape
    n_chunks, _ = _token_chunks(B, L, _row_tile(H)[0])
    partial = x.new_empty((B, n_chunks, H), dtype=torch.float32)
    return x.new_empty(x.shape), partial, torch.empty_like(partial)


def _norm_modulate_setup(ctx, inputs, output):
    x, shift, scale, eps = inputs
    ctx.save_for_backward(x, scale)
    ctx.eps, ctx.shift_dtype = eps, shift.dtype


def _norm_modulate_grad(ctx, dout):
    x, scale = ctx.saved_tensors
    dx, dshift, dscale = _norm_modulate_backward(dout, x, scale, ctx.eps)
    return dx, _sum_partials(dshift, ctx.shift_dtype), _sum_partials(dscale, scale.dtype), None


_norm_modulate.register_autograd(_norm_modulate_grad, setup_context=_norm_modulate_setup)


# =================================================================================================
# 3a. Gated residual:  h = x + gate * y.   x, y, h (B, L, H); gate (B, 1, H).
#     dx = dh;  dy = dh * gate;  dgate = sum over tokens of dh * y.
# =================================================================================================


@triton.jit
def _gated_residual_fwd_kernel(
    x_ptr, sx_b, sx_l, sx_h,
    gate_ptr, sg_b, sg_h,
    y_ptr, sy_b, sy_l, sy_h,
    h_ptr, L, H,
    BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows[:, None] < L) & (cols[None, :] < H)
    x = _load_tile(x_ptr + b * sx_b, rows, cols, sx_l, sx_h, mask)
    y = _load_tile(y_ptr + b * sy_b, rows, cols, sy_l, sy_h, mask)
    gate = _load_vector(gate_ptr + b * sg_b, cols, sg_h, H)
    _store_tile(h_ptr + b * L * H, rows, cols, H, x + gate[None, :] * y, mask)


@triton.jit
def _gated_residual_bwd_kernel(
    dh_ptr, sd_b, sd_l, sd_h,
    gate_ptr, sg_b, sg_h,
    y_ptr, sy_b, sy_l, sy_h,
    dy_ptr, dgate_partial_ptr,
    L, H, ROWS_PER_CHUNK,
    BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    # grid (B, n_chunks), as in _norm_modulate_bwd_kernel
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK_H)
    gate = _load_vector(gate_ptr + b * sg_b, cols, sg_h, H)
    dgate_acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for start in range(chunk * ROWS_PER_CHUNK, (chunk + 1) * ROWS_PER_CHUNK, BLOCK_L):
        rows = start + tl.arange(0, BLOCK_L)
        mask = (rows[:, None] < L) & (cols[None, :] < H)
        dh = _load_tile(dh_ptr + b * sd_b, rows, cols, sd_l, sd_h, mask)
        y = _load_tile(y_ptr + b * sy_b, rows, cols, sy_l, sy_h, mask)
        _store_tile(dy_ptr + b * L * H, rows, cols, H, dh * gate[None, :], mask)
        dgate_acc += tl.sum(dh * y, axis=0)
    tl.store(dgate_partial_ptr + (b * tl.num_programs(1) + chunk) * H + cols, dgate_acc, mask=cols < H)


@torch.library.custom_op("fused::gated_residual", mutates_args=())
def _gated_residual(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    B, L, H = x.shape
    h = torch.empty((B, L, H), dtype=_promote(x, gate, y), device=x.device)
    block_l, block_h = _row_tile(H)
    with launching_on(x):
        _gated_residual_fwd_kernel[(B, _cdiv(L, block_l))](
            x, *x.stride(), gate, gate.stride(0), gate.stride(2), y, *y.stride(), h, L, H,
            BLOCK_L=block_l, BLOCK_H=block_h, num_warps=_num_warps(block_l * block_h),
        )  # fmt: skip
    return h


@_gated_residual.register_fake
def _(x, gate, y):
    return x.new_empty(x.shape, dtype=_promote(x, gate, y))


@torch.library.custom_op("fused::gated_residual_backward", mutates_args=())
def _gated_residual_backward(dh: Tensor, gate: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """-> dy (B, L, H), dgate partial sums (B, n_chunks, H) fp32."""
    B, L, H = y.shape
    block_l, block_h = _row_tile(H)
    n_chunks, rows_per_chunk = _token_chunks(B, L, block_l)
    dy = torch.empty((B, L, H), dtype=y.dtype, device=y.device)
    dgate_partial = torch.empty((B, n_chunks, H), dtype=torch.float32, device=y.device)
    with launching_on(y):
        _gated_residual_bwd_kernel[(B, n_chunks)](
            dh, *dh.stride(), gate, gate.stride(0), gate.stride(2), y, *y.stride(), dy, dgate_partial,
            L, H, rows_per_chunk, BLOCK_L=block_l, BLOCK_H=block_h, num_warps=_num_warps(block_l * block_h),
        )  # fmt: skip
    return dy, dgate_partial


@_gated_residual_backward.register_fake
def _(dh, gate, y):
    B, L, H = y.shape
    n_chunks, _ = _token_chunks(B, L, _row_tile(H)[0])
    return y.new_empty(y.shape), y.new_empty((B, n_chunks, H), dtype=torch.float32)


def _gated_residual_setup(ctx, inputs, output):
    x, gate, y = inputs
    ctx.save_for_backward(gate, y)
    ctx.x_dtype = x.dtype


def _gated_residual_grad(ctx, dh):
    gate, y = ctx.saved_tensors
    dy, dgate = _gated_residual_backward(dh, gate, y)
    return dh.to(ctx.x_dtype), _sum_partials(dgate, gate.dtype), dy


_gated_residual.register_autograd(_gated_residual_grad, setup_context=_gated_residual_setup)


# =================================================================================================
# 3b. Gated residual fused with the next norm + modulate (DoubleStreamBlock, before the MLP):
#     h = x + gate * y;  out = (1 + scale) * LN(h) + shift.   Returns (h, out).
#     Backward saves h (an output, kept alive anyway as the residual stream), y, gate and scale:
#     no normalised copy. dh_total = dh + LN-backward(dout * (1 + scale)), then as in 3a.
# =================================================================================================


@triton.jit
def _gated_residual_norm_modulate_fwd_kernel(
    x_ptr, sx_b, sx_l, sx_h,
    gate_ptr, sg_b, sg_h,
    y_ptr, sy_b, sy_l, sy_h,
    shift_ptr, sshift_b, sshift_h,
    scale_ptr, sscale_b, sscale_h,
    h_ptr, out_ptr,
    L, H, eps,
    BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows[:, None] < L) & (cols[None, :] < H)
    x = _load_tile(x_ptr + b * sx_b, rows, cols, sx_l, sx_h, mask)
    y = _load_tile(y_ptr + b * sy_b, rows, cols, sy_l, sy_h, mask)
    gate = _load_vector(gate_ptr + b * sg_b, cols, sg_h, H)
    shift = _load_vector(shift_ptr + b * sshift_b, cols, sshift_h, H)
    scale = _load_vector(scale_ptr + b * sscale_b, cols, sscale_h, H)
    h = x + gate[None, :] * y
    _store_tile(h_ptr + b * L * H, rows, cols, H, h, mask)
    # normalise h as stored (rounded to its dtype), exactly as the unfused chain would read it
    h = h.to(h_ptr.dtype.element_ty).to(tl.float32)
    h_hat, _ = _layer_norm_rows(h, mask, H, eps)
    _store_tile(out_ptr + b * L * H, rows, cols, H, h_hat * (1.0 + scale[None, :]) + shift[None, :], mask)


@triton.jit
def _gated_residual_norm_modulate_bwd_kernel(
    dh_ptr, sdh_b, sdh_l, sdh_h,
    dout_ptr, sd_b, sd_l, sd_h,
    h_ptr, sh_b, sh_l, sh_h,
    gate_ptr, sg_b, sg_h,
    y_ptr, sy_b, sy_l, sy_h,
    scale_ptr, sscale_b, sscale_h,
    dx_ptr, dy_ptr, dgate_partial_ptr, dshift_partial_ptr, dscale_partial_ptr,
    L, H, eps, ROWS_PER_CHUNK,
    BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK_H)
    gate = _load_vector(gate_ptr + b * sg_b, cols, sg_h, H)
    scale = _load_vector(scale_ptr + b * sscale_b, cols, sscale_h, H)
    dgate_acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    dshift_acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    dscale_acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for start in range(chunk * ROWS_PER_CHUNK, (chunk + 1) * ROWS_PER_CHUNK, BLOCK_L):
        rows = start + tl.arange(0, BLOCK_L)
        mask = (rows[:, None] < L) & (cols[None, :] < H)
        h = _load_tile(h_ptr + b * sh_b, rows, cols, sh_l, sh_h, mask)
        dout = _load_tile(dout_ptr + b * sd_b, rows, cols, sd_l, sd_h, mask)
        h_hat, rstd = _layer_norm_rows(h, mask, H, eps)
        dh = _load_tile(dh_ptr + b * sdh_b, rows, cols, sdh_l, sdh_h, mask)
        dh += _layer_norm_rows_backward(dout * (1.0 + scale[None, :]), h_hat, rstd, H)
        y = _load_tile(y_ptr + b * sy_b, rows, cols, sy_l, sy_h, mask)
        _store_tile(dx_ptr + b * L * H, rows, cols, H, dh, mask)
        _store_tile(dy_ptr + b * L * H, rows, cols, H, dh * gate[None, :], mask)
        dgate_acc += tl.sum(dh * y, axis=0)  # y is 0 in the padding
        dshift_acc += tl.sum(dout, axis=0)
        dscale_acc += tl.sum(dout * h_hat, axis=0)
    partial = (b * tl.num_programs(1) + chunk) * H + cols
    tl.store(dgate_partial_ptr + partial, dgate_acc, mask=cols < H)
    tl.store(dshift_partial_ptr + partial, dshift_acc, mask=cols < H)
    tl.store(dscale_partial_ptr + partial, dscale_acc, mask=cols < H)


@torch.library.custom_op("fused::gated_residual_norm_modulate", mutates_args=())
def _gated_residual_norm_modulate(
    x: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    B, L, H = x.shape
    h = torch.empty((B, L, H), dtype=_promote(x, gate, y), device=x.device)
    out = torch.empty((B, L, H), dtype=_promote(h, shift, scale), device=x.device)
    block_l, block_h = _row_tile(H)
    with launching_on(x):
        _gated_residual_norm_modulate_fwd_kernel[(B, _cdiv(L, block_l))](
            x, *x.stride(), gate, gate.stride(0), gate.stride(2), y, *y.stride(),
            shift, shift.stride(0), shift.stride(2), scale, scale.stride(0), scale.stride(2),
            h, out, L, H, eps, BLOCK_L=block_l, BLOCK_H=block_h, num_warps=_num_warps(block_l * block_h),
        )  # fmt: skip
    return h, out


@_gated_residual_norm_modulate.register_fake
def _(x, gate, y, shift, scale, eps):
    h = x.new_empty(x.shape, dtype=_promote(x, gate, y))
    return h, x.new_empty(x.shape, dtype=_promote(h, shift, scale))


@torch.library.custom_op("fused::gated_residual_norm_modulate_backward", mutates_args=())
def _gated_residual_norm_modulate_backward(
    dh: Tensor, dout: Tensor, h: Tensor, gate: Tensor, y: Tensor, scale: Tensor, x_dtype: torch.dtype, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> dx, dy (B, L, H); dgate, dshift, dscale partial sums (B, n_chunks, H) fp32."""
    B, L, H = h.shape
    block_l, block_h = _row_tile(H)
    n_chunks, rows_per_chunk = _token_chunks(B, L, block_l)
    dx = torch.empty((B, L, H), dtype=x_dtype, device=h.device)
    dy = torch.empty((B, L, H), dtype=y.dtype, device=h.device)
    partials = [torch.empty((B, n_chunks, H), dtype=torch.float32, device=h.device) for _ in range(3)]
    with launching_on(h):
        _gated_residual_norm_modulate_bwd_kernel[(B, n_chunks)](
            dh, *dh.stride(), dout, *dout.stride(), h, *h.stride(), gate, gate.stride(0), gate.stride(2),
            y, *y.stride(), scale, scale.stride(0), scale.stride(2), dx, dy, *partials,
            L, H, eps, rows_per_chunk, BLOCK_L=block_l, BLOCK_H=block_h, num_warps=_num_warps(block_l * block_h),
        )  # fmt: skip
    return dx, dy, *partials


@_gated_residual_norm_modulate_backward.register_fake
def _(dh, dout, h, gate, y, scale, x_dtype, eps):
    B, L, H = h.shape
    n_chunks, _ = _token_chunks(B, L, _row_tile(H)[0])
    partials = [h.new_empty((B, n_chunks, H), dtype=torch.float32) for _ in range(3)]
    return h.new_empty(h.shape, dtype=x_dtype), y.new_empty(y.shape), *partials


def _gated_residual_norm_modulate_setup(ctx, inputs, output):
    x, gate, y, shift, scale, eps = inputs
    ctx.save_for_backward(output[0], gate, y, scale)
    ctx.eps, ctx.x_dtype, ctx.shift_dtype = eps, x.dtype, shift.dtype


def _gated_residual_norm_modulate_grad(ctx, dh, dout):
    h, gate, y, scale = ctx.saved_tensors
    dh = torch.zeros_like(h) if dh is None else dh
    dout = torch.zeros_like(h) if dout is None else dout
    dx, dy, dgate, dshift, dscale = _gated_residual_norm_modulate_backward(
        dh, dout, h, gate, y, scale, ctx.x_dtype, ctx.eps
    )
    dgate, dshift, dscale = (
        _sum_partials(dgate, gate.dtype),
        _sum_partials(dshift, ctx.shift_dtype),
        _sum_partials(dscale, scale.dtype),
    )
    return dx, dgate, dy, dshift, dscale, None


_gated_residual_norm_modulate.register_autograd(
    _gated_residual_norm_modulate_grad, setup_context=_gated_residual_norm_modulate_setup
)


# =================================================================================================
# 2. QK RMSNorm + RoPE on adjacent pairs (FLUX).  q, k (B, heads, L, D); scales (D,);
#    pe (B, 1, L, D/2, 2, 2) holds one 2x2 rotation per pair (x[2i], x[2i+1]):
#      n = x * rrms (rounded to x's dtype);  m = n * scale (rounded);  out_pair = R @ m_pair.
#    Backward (casts are straight-through):  dm = R^T dout;  dscale = sum(dm * n);
#      dn = dm * scale;  dx = rrms * (dn - n * mean(dn * n)).
#    One program handles QK_BLOCK_TOKENS tokens of one sample and a group of heads for both q and
#    k, so each rotation tile is loaded once and reused; the even and odd elements of each pair
#    are loaded as two (tokens, D/2) tiles.
# =================================================================================================


@triton.jit
def _load_rotation(pe_ptr, rows, pairs, s_l, s_p, s_i, s_j, mask):
    """The four entries of the 2x2 rotation of each (token, pair): r[i][j] tiles."""
    base = pe_ptr + rows[:, None] * s_l + pairs[None, :] * s_p
    r00 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    r01 = tl.load(base + s_j, mask=mask, other=0.0).to(tl.float32)
    r10 = tl.load(base + s_i, mask=mask, other=0.0).to(tl.float32)
    r11 = tl.load(base + s_i + s_j, mask=mask, other=0.0).to(tl.float32)
    return r00, r01, r10, r11


@triton.jit
def _rms_norm_rope_head(
    x_ptr, s_l, s_d, out_ptr, w_even, w_odd, r00, r01, r10, r11, rows, pairs, mask, D, eps,
):  # fmt: skip
    """One head's (tokens, D) tile: load, normalise, scale, rotate, store (contiguous rows of D)."""
    even_offsets = rows[:, None] * s_l + (2 * pairs[None, :]) * s_d  # odd elements: + s_d
    x_even = tl.load(x_ptr + even_offsets, mask=mask, other=0.0).to(tl.float32)
    x_odd = tl.load(x_ptr + even_offsets + s_d, mask=mask, other=0.0).to(tl.float32)
    rrms = tl.math.rsqrt((tl.sum(x_even * x_even, axis=1) + tl.sum(x_odd * x_odd, axis=1)) / D + eps)
    # round where the reference rounds: x * rrms to x's dtype, times the scale to the output dtype
    n_even = (x_even * rrms[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    n_odd = (x_odd * rrms[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    m_even = (n_even * w_even[None, :]).to(out_ptr.dtype.element_ty).to(tl.float32)
    m_odd = (n_odd * w_odd[None, :]).to(out_ptr.dtype.element_ty).to(tl.float32)
    out_offsets = rows[:, None] * D + 2 * pairs[None, :]
    out_even, out_odd = r00 * m_even + r01 * m_odd, r10 * m_even + r11 * m_odd
    tl.store(out_ptr + out_offsets, out_even.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + out_offsets + 1, out_odd.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_rope_head_backward(
    dout_ptr, sd_l, sd_d, x_ptr, s_l, s_d, dx_ptr, w_even, w_odd, r00, r01, r10, r11, rows, pairs, mask, D, eps,
):  # fmt: skip
    """Writes dx for one head's tile; returns this tile's (dscale_even, dscale_odd) sums."""
    even_offsets = rows[:, None] * s_l + (2 * pairs[None, :]) * s_d
    x_even = tl.load(x_ptr + even_offsets, mask=mask, other=0.0).to(tl.float32)
    x_odd = tl.load(x_ptr + even_offsets + s_d, mask=mask, other=0.0).to(tl.float32)
    rrms = tl.math.rsqrt((tl.sum(x_even * x_even, axis=1) + tl.sum(x_odd * x_odd, axis=1)) / D + eps)
    n_even, n_odd = x_even * rrms[:, None], x_odd * rrms[:, None]
    dout_offsets = rows[:, None] * sd_l + (2 * pairs[None, :]) * sd_d
    dout_even = tl.load(dout_ptr + dout_offsets, mask=mask, other=0.0).to(tl.float32)
    dout_odd = tl.load(dout_ptr + dout_offsets + sd_d, mask=mask, other=0.0).to(tl.float32)
    dm_even = r00 * dout_even + r10 * dout_odd  # transpose of the rotation
    dm_odd = r01 * dout_even + r11 * dout_odd
    dn_even, dn_odd = dm_even * w_even[None, :], dm_odd * w_odd[None, :]
    mean_dn_n = (tl.sum(dn_even * n_even, axis=1) + tl.sum(dn_odd * n_odd, axis=1)) / D
    dx_even = rrms[:, None] * (dn_even - n_even * mean_dn_n[:, None])
    dx_odd = rrms[:, None] * (dn_odd - n_odd * mean_dn_n[:, None])
    dx_offsets = rows[:, None] * D + 2 * pairs[None, :]
    tl.store(dx_ptr + dx_offsets, dx_even.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + dx_offsets + 1, dx_odd.to(dx_ptr.dtype.element_ty), mask=mask)
    return tl.sum(dm_even * n_even, axis=0), tl.sum(dm_odd * n_odd, axis=0)


@triton.jit
def _qk_norm_rope_fwd_kernel(
    q_ptr, sq_b, sq_h, sq_l, sq_d,
    k_ptr, sk_b, sk_h, sk_l, sk_d,
    q_scale_ptr, s_qs, k_scale_ptr, s_ks,
    pe_ptr, spe_b, spe_l, spe_p, spe_i, spe_j,
    q_out_ptr, k_out_ptr,
    NH, L, D, eps, HEADS_PER_PROGRAM,
    BLOCK_L: tl.constexpr, BLOCK_PAIRS: tl.constexpr,
):  # fmt: skip
    # grid (B, cdiv(L, BLOCK_L), NH // HEADS_PER_PROGRAM)
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    pairs = tl.arange(0, BLOCK_PAIRS)
    mask = (rows[:, None] < L) & (pairs[None, :] < D // 2)
    r00, r01, r10, r11 = _load_rotation(pe_ptr + b * spe_b, rows, pairs, spe_l, spe_p, spe_i, spe_j, mask)
    q_w_even = _load_vector(q_scale_ptr, 2 * pairs, s_qs, D)
    q_w_odd = _load_vector(q_scale_ptr + s_qs, 2 * pairs, s_qs, D)  # element 2i + 1
    k_w_even = _load_vector(k_scale_ptr, 2 * pairs, s_ks, D)
    k_w_odd = _load_vector(k_scale_ptr + s_ks, 2 * pairs, s_ks, D)
    first_head = tl.program_id(2) * HEADS_PER_PROGRAM
    for head in range(first_head, first_head + HEADS_PER_PROGRAM):
        out_offset = (b * NH + head) * L * D  # outputs are contiguous (B, NH, L, D)
        _rms_norm_rope_head(
            q_ptr + b * sq_b + head * sq_h, sq_l, sq_d, q_out_ptr + out_offset, q_w_even, q_w_odd,
            r00, r01, r10, r11, rows, pairs, mask, D, eps,
        )  # fmt: skip
        _rms_norm_rope_head(
            k_ptr + b * sk_b + head * sk_h, sk_l, sk_d, k_out_ptr + out_offset, k_w_even, k_w_odd,
            r00, r01, r10, r11, rows, pairs, mask, D, eps,
        )  # fmt: skip


@triton.jit
def _qk_norm_rope_bwd_kernel(
    dq_out_ptr, sdq_b, sdq_h, sdq_l, sdq_d,
    dk_out_ptr, sdk_b, sdk_h, sdk_l, sdk_d,
    q_ptr, sq_b, sq_h, sq_l, sq_d,
    k_ptr, sk_b, sk_h, sk_l, sk_d,
    q_scale_ptr, s_qs, k_scale_ptr, s_ks,
    pe_ptr, spe_b, spe_l, spe_p, spe_i, spe_j,
    dq_ptr, dk_ptr, dq_scale_partial_ptr, dk_scale_partial_ptr,
    NH, L, D, eps, HEADS_PER_PROGRAM,
    BLOCK_L: tl.constexpr, BLOCK_PAIRS: tl.constexpr,
):  # fmt: skip
    # same grid as the forward; each program writes one (D,) partial sum per scale
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    pairs = tl.arange(0, BLOCK_PAIRS)
    mask = (rows[:, None] < L) & (pairs[None, :] < D // 2)
    r00, r01, r10, r11 = _load_rotation(pe_ptr + b * spe_b, rows, pairs, spe_l, spe_p, spe_i, spe_j, mask)
    q_w_even = _load_vector(q_scale_ptr, 2 * pairs, s_qs, D)
    q_w_odd = _load_vector(q_scale_ptr + s_qs, 2 * pairs, s_qs, D)  # element 2i + 1
    k_w_even = _load_vector(k_scale_ptr, 2 * pairs, s_ks, D)
    k_w_odd = _load_vector(k_scale_ptr + s_ks, 2 * pairs, s_ks, D)
    dq_scale_even = tl.zeros([BLOCK_PAIRS], dtype=tl.float32)
    dq_scale_odd = tl.zeros([BLOCK_PAIRS], dtype=tl.float32)
    dk_scale_even = tl.zeros([BLOCK_PAIRS], dtype=tl.float32)
    dk_scale_odd = tl.zeros([BLOCK_PAIRS], dtype=tl.float32)
    first_head = tl.program_id(2) * HEADS_PER_PROGRAM
    for head in range(first_head, first_head + HEADS_PER_PROGRAM):
        out_offset = (b * NH + head) * L * D
        dq_even, dq_odd = _rms_norm_rope_head_backward(
            dq_out_ptr + b * sdq_b + head * sdq_h, sdq_l, sdq_d, q_ptr + b * sq_b + head * sq_h, sq_l, sq_d,
            dq_ptr + out_offset, q_w_even, q_w_odd, r00, r01, r10, r11, rows, pairs, mask, D, eps,
        )  # fmt: skip
        dk_even, dk_odd = _rms_norm_rope_head_backward(
            dk_out_ptr + b * sdk_b + head * sdk_h, sdk_l, sdk_d, k_ptr + b * sk_b + head * sk_h, sk_l, sk_d,
            dk_ptr + out_offset, k_w_even, k_w_odd, r00, r01, r10, r11, rows, pairs, mask, D, eps,
        )  # fmt: skip
        dq_scale_even += dq_even
        dq_scale_odd += dq_odd
        dk_scale_even += dk_even
        dk_scale_odd += dk_odd
    program = (b * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
    partial = program * D + 2 * pairs
    pair_mask = pairs < D // 2
    tl.store(dq_scale_partial_ptr + partial, dq_scale_even, mask=pair_mask)
    tl.store(dq_scale_partial_ptr + partial + 1, dq_scale_odd, mask=pair_mask)
    tl.store(dk_scale_partial_ptr + partial, dk_scale_even, mask=pair_mask)
    tl.store(dk_scale_partial_ptr + partial + 1, dk_scale_odd, mask=pair_mask)


def _pe_strides(pe: Tensor) -> tuple[int, ...]:
    """pe (B, 1, L, D/2, 2, 2): strides of batch, token, pair, row i, column j."""
    s = pe.stride()
    return s[0], s[2], s[3], s[4], s[5]


@torch.library.custom_op("fused::qk_norm_rope", mutates_args=())
def _qk_norm_rope(
    q: Tensor, k: Tensor, q_scale: Tensor, k_scale: Tensor, pe: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    B, NH, L, D = q.shape
    q_out = torch.empty((B, NH, L, D), dtype=_promote(q, q_scale), device=q.device)
    k_out = torch.empty((B, NH, L, D), dtype=_promote(k, k_scale), device=q.device)
    block_pairs = _next_pow2(D // 2)
    with launching_on(q):
        _qk_norm_rope_fwd_kernel[_qk_grid(q)](
            q, *q.stride(), k, *k.stride(), q_scale, q_scale.stride(0), k_scale, k_scale.stride(0),
            pe, *_pe_strides(pe), q_out, k_out, NH, L, D, eps, _heads_per_program(NH),
            BLOCK_L=QK_BLOCK_TOKENS, BLOCK_PAIRS=block_pairs, num_warps=4,
        )  # fmt: skip
    return q_out, k_out


@_qk_norm_rope.register_fake
def _(q, k, q_scale, k_scale, pe, eps):
    return q.new_empty(q.shape, dtype=_promote(q, q_scale)), k.new_empty(k.shape, dtype=_promote(k, k_scale))


@torch.library.custom_op("fused::qk_norm_rope_backward", mutates_args=())
def _qk_norm_rope_backward(
    dq_out: Tensor, dk_out: Tensor, q: Tensor, k: Tensor, q_scale: Tensor, k_scale: Tensor, pe: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> dq, dk (B, NH, L, D); dq_scale, dk_scale partial sums (n_programs, D) fp32."""
    B, NH, L, D = q.shape
    grid = _qk_grid(q)
    dq = torch.empty((B, NH, L, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, NH, L, D), dtype=k.dtype, device=q.device)
    n_programs = grid[0] * grid[1] * grid[2]
    dq_scale = torch.empty((n_programs, D), dtype=torch.float32, device=q.device)
    dk_scale = torch.empty_like(dq_scale)
    with launching_on(q):
        _qk_norm_rope_bwd_kernel[grid](
            dq_out, *dq_out.stride(), dk_out, *dk_out.stride(), q, *q.stride(), k, *k.stride(),
            q_scale, q_scale.stride(0), k_scale, k_scale.stride(0), pe, *_pe_strides(pe),
            dq, dk, dq_scale, dk_scale, NH, L, D, eps, _heads_per_program(NH),
            BLOCK_L=QK_BLOCK_TOKENS, BLOCK_PAIRS=_next_pow2(D // 2), num_warps=4,
        )  # fmt: skip
    return dq, dk, dq_scale, dk_scale


@_qk_norm_rope_backward.register_fake
def _(dq_out, dk_out, q, k, q_scale, k_scale, pe, eps):
    grid = _qk_grid(q)
    partial = q.new_empty((grid[0] * grid[1] * grid[2], q.shape[-1]), dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), partial, torch.empty_like(partial)


def _qk_norm_rope_setup(ctx, inputs, output):
    q, k, q_scale, k_scale, pe, eps = inputs
    ctx.save_for_backward(q, k, q_scale, k_scale, pe)
    ctx.eps = eps


def _qk_norm_rope_grad(ctx, dq_out, dk_out):
    q, k, q_scale, k_scale, pe = ctx.saved_tensors
    dq_out = torch.zeros_like(q) if dq_out is None else dq_out
    dk_out = torch.zeros_like(k) if dk_out is None else dk_out
    dq, dk, dq_scale, dk_scale = _qk_norm_rope_backward(dq_out, dk_out, q, k, q_scale, k_scale, pe, ctx.eps)
    return dq, dk, dq_scale.sum(0).to(q_scale.dtype), dk_scale.sum(0).to(k_scale.dtype), None, None


_qk_norm_rope.register_autograd(_qk_norm_rope_grad, setup_context=_qk_norm_rope_setup)


# =================================================================================================
# 4. GELU (tanh approximation) and GEGLU (exact erf GELU), on (rows, N) views of the input.
#    gelu_tanh(x) = x/2 * (1 + tanh(u)),  u = sqrt(2/pi) * (x + 0.044715 x^3)
#    geglu([a | b]) = a * gelu(b),  gelu(b) = b/2 * (1 + erf(b / sqrt 2))
#    Backward saves only the input and recomputes the activation.
# =================================================================================================


@triton.jit
def _gelu_tanh_and_grad(x):
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2/pi) * (...)
    t = _tanh(u)
    du_dx = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
    return 0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du_dx


@triton.jit
def _gelu_erf_and_grad(x):
    cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))  # Phi(x)
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327  # phi(x) = exp(-x^2/2) / sqrt(2 pi)
    return x * cdf, cdf + x * pdf


@triton.jit
def _gelu_tanh_kernel(
    x_ptr, sx_r, sx_c, dout_ptr, sd_r, sd_c, out_ptr, R, N,
    BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # grid (cdiv(R, BLOCK_R), cdiv(N, BLOCK_N)); forward: out = gelu(x); backward: out = dout * gelu'(x)
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # R * N may pass 2**31
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < R) & (cols[None, :] < N)
    x = _load_tile(x_ptr, rows, cols, sx_r, sx_c, mask)
    gelu, grad = _gelu_tanh_and_grad(x)
    if BACKWARD:
        out = _load_tile(dout_ptr, rows, cols, sd_r, sd_c, mask) * grad
    else:
        out = gelu
    _store_tile(out_ptr, rows, cols, N, out, mask)


@triton.jit
def _geglu_kernel(
    x_ptr, sx_r, sx_c, dout_ptr, sd_r, sd_c, out_ptr, R, N,
    BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # x (R, 2N) = [a | b]. Forward: out (R, N) = a * gelu(b).
    # Backward: out (R, 2N) = [dout * gelu(b) | dout * a * gelu'(b)].
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # R * N may pass 2**31
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < R) & (cols[None, :] < N)
    a = _load_tile(x_ptr, rows, cols, sx_r, sx_c, mask)
    b = _load_tile(x_ptr, rows, cols + N, sx_r, sx_c, mask)
    gelu, grad = _gelu_erf_and_grad(b)
    if BACKWARD:
        dout = _load_tile(dout_ptr, rows, cols, sd_r, sd_c, mask)
        _store_tile(out_ptr, rows, cols, 2 * N, dout * gelu, mask)
        _store_tile(out_ptr, rows, cols + N, 2 * N, dout * a * grad, mask)
    else:
        _store_tile(out_ptr, rows, cols, N, a * gelu, mask)


def _launch_elementwise(kernel, x: Tensor, dout: Tensor | None, out: Tensor, n_cols: int, backward: bool) -> None:
    """Launch a (rows, n_cols) element-wise kernel over x's (rows, width) view."""
    x_rows = _as_rows(x)
    d_rows = _as_rows(dout) if dout is not None else x_rows  # unused in the forward
    R = x_rows.shape[0]
    block_n = min(_next_pow2(n_cols), 1024)
    block_r = max(1, min(64, TILE_ELEMENTS // block_n))
    with launching_on(x):
        kernel[(_cdiv(R, block_r), _cdiv(n_cols, block_n))](
            x_rows, *x_rows.stride(), d_rows, *d_rows.stride(), out, R, n_cols,
            BACKWARD=backward, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=_num_warps(block_r * block_n),
        )  # fmt: skip


@torch.library.custom_op("fused::gelu_tanh", mutates_args=())
def _gelu_tanh(x: Tensor) -> Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch_elementwise(_gelu_tanh_kernel, x, None, out, x.shape[-1], backward=False)
    return out


@_gelu_tanh.register_fake
def _(x):
    return x.new_empty(x.shape)


@torch.library.custom_op("fused::gelu_tanh_backward", mutates_args=())
def _gelu_tanh_backward(dout: Tensor, x: Tensor) -> Tensor:
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch_elementwise(_gelu_tanh_kernel, x, dout, dx, x.shape[-1], backward=True)
    return dx


@_gelu_tanh_backward.register_fake
def _(dout, x):
    return x.new_empty(x.shape)


def _save_input(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


_gelu_tanh.register_autograd(
    lambda ctx, dout: _gelu_tanh_backward(dout, ctx.saved_tensors[0]), setup_context=_save_input
)


@torch.library.custom_op("fused::geglu", mutates_args=())
def _geglu(x: Tensor) -> Tensor:
    out = torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=x.dtype, device=x.device)
    _launch_elementwise(_geglu_kernel, x, None, out, x.shape[-1] // 2, backward=False)
    return out


@_geglu.register_fake
def _(x):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.custom_op("fused::geglu_backward", mutates_args=())
def _geglu_backward(dout: Tensor, x: Tensor) -> Tensor:
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch_elementwise(_geglu_kernel, x, dout, dx, x.shape[-1] // 2, backward=True)
    return dx


@_geglu_backward.register_fake
def _(dout, x):
    return x.new_empty(x.shape)


_geglu.register_autograd(lambda ctx, dout: _geglu_backward(dout, ctx.saved_tensors[0]), setup_context=_save_input)


# =================================================================================================
# Self-check: before "auto" mode (models/layers.py) lets a kernel run, the kernel is compiled and
# run forward and backward once on small random inputs on the target device and dtype, and
# compared with its reference. A kernel that raises (compile or launch) or differs beyond
# SELF_CHECK_TOLERANCE is replaced by its reference, with one KernelSelfCheckWarning naming it.
# Results are cached per process for each (kernel, device, dtype). The device is a parameter:
# the tests run the same code on CPU under TRITON_INTERPRET=1.
# =================================================================================================


class KernelSelfCheckWarning(RuntimeWarning):
    """A fused kernel failed its self-check and is replaced by its torch reference."""


class KernelMismatch(AssertionError):
    """A kernel's result differs from its reference beyond the self-check tolerance."""


# |result - reference| <= tol * (max(1, max|reference|) + |reference|), element-wise: a few ulps of
# the dtype with room for GPU approximations (rsqrt, exp) and summation order. A broken kernel
# is off by O(1), far beyond these.
SELF_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}

_self_check_results: dict[tuple[str, str, torch.dtype], str | None] = {}  # None: passed, else why not


def assert_matches(result: Tensor, reference: Tensor, dtype: torch.dtype, what: str) -> None:
    """Raise KernelMismatch when result is off from the (fp32) reference beyond the tolerance of dtype."""
    tol = SELF_CHECK_TOLERANCE.get(dtype, SELF_CHECK_TOLERANCE[torch.float32])
    if result.shape != reference.shape:
        raise KernelMismatch(f"{what}: shape {tuple(result.shape)}, expected {tuple(reference.shape)}")
    reference = reference.float()
    error = (result.float() - reference).abs()
    allowed = tol * (max(1.0, reference.abs().max().item()) + reference.abs())
    if not bool((error <= allowed).all()):  # NaN fails too
        raise KernelMismatch(f"{what} differs from the reference by up to {error.max().item():.3g} (tolerance {tol:g})")


def compare_with_reference(fused, reference, inputs: list[Tensor], dtype: torch.dtype, constants=()) -> None:
    """Run `fused` on the inputs in dtype and `reference` on fp32 copies of the same rounded values;
    compare the outputs and the gradients w.r.t. every input for random upstream gradients."""
    test_inputs = [t.to(dtype).requires_grad_() for t in inputs]
    fp32_inputs = [t.detach().float().requires_grad_() for t in test_inputs]
    outputs, expected = fused(*test_inputs, *constants), reference(*fp32_inputs, *constants)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    generator = torch.Generator().manual_seed(1)
    upstream = [torch.randn(o.shape, generator=generator).to(o.device, dtype) for o in outputs]
    grads = torch.autograd.grad(outputs, test_inputs, upstream)
    expected_grads = torch.autograd.grad(expected, fp32_inputs, [u.float() for u in upstream])
    for i, (out, exp) in enumerate(zip(outputs, expected)):
        assert_matches(out, exp, dtype, f"output {i}")
    for i, (grad, exp) in enumerate(zip(grads, expected_grads)):
        assert_matches(grad, exp, dtype, f"gradient of input {i}")


def _random(generator: torch.Generator, device, *shape) -> Tensor:
    """Normal values drawn on the CPU (the check never touches the global or a CUDA RNG)."""
    return torch.randn(shape, generator=generator).to(device)


def _token_check(fused, reference, shapes: str, spread: float = 1.0):
    """The check of a kernel on token inputs, one letter of `shapes` per input: t tokens (2, 19, 40),
    s per-sample vectors (2, 1, 40), w wide tokens (2, 19, 80). 19 and 40 are no block multiples."""
    sizes = {"t": (2, 19, 40), "s": (2, 1, 40), "w": (2, 19, 80)}

    def check(device, dtype) -> None:
        g = torch.Generator().manual_seed(0)
        compare_with_reference(fused, reference, [spread * _random(g, device, *sizes[c]) for c in shapes], dtype)

    return check


def _check_qk_norm_rope(device, dtype) -> None:
    """q, k as views into one (B, L, 3 * heads * D) projection, as in the model; a random rotation per pair."""
    g = torch.Generator().manual_seed(0)
    B, heads, L, D = 2, 2, 19, 16
    q, k, _ = _random(g, device, B, L, 3, heads, D).permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, L, D) views
    angle = _random(g, device, B, 1, L, D // 2)
    pe = torch.stack([angle.cos(), -angle.sin(), angle.sin(), angle.cos()], -1).unflatten(-1, (2, 2))
    scales = [1 + 0.1 * _random(g, device, D) for _ in range(2)]
    compare_with_reference(qk_norm_rope, qk_norm_rope_reference, [q, k, *scales], dtype, constants=(pe,))


SELF_CHECKS = {
    "norm_modulate": _token_check(norm_modulate, norm_modulate_reference, "tss"),
    "gated_residual": _token_check(gated_residual, gated_residual_reference, "tst"),
    "gated_residual_norm_modulate": _token_check(
        gated_residual_norm_modulate, gated_residual_norm_modulate_reference, "tstss"
    ),
    "qk_norm_rope": _check_qk_norm_rope,
    "gelu_tanh": _token_check(gelu_tanh, gelu_tanh_reference, "t", spread=3.0),  # both tails of the tanh
    "geglu": _token_check(geglu, geglu_reference, "w", spread=3.0),
}


def _all_checks() -> dict:
    """These kernels' checks and the optimizer kernels' (kernels_optim.SELF_CHECKS)."""
    import kernels_optim

    return {**SELF_CHECKS, **kernels_optim.SELF_CHECKS}


def _device_key(device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def _run_check(check, device, dtype) -> str | None:
    """None if the check passes, else one line saying why not. Autograd on, autocast off, whatever
    context the first kernel call happened in."""
    device_type = torch.device(device).type
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device_type, enabled=False):
            with warnings.catch_warnings():  # e.g. the interpreter's numpy overflow in exp: not a failure
                warnings.simplefilter("ignore")
                check(device, dtype)
        return None
    except Exception as error:  # any failure to compile, launch or match replaces the kernel
        message = str(error).strip().splitlines()
        return f"{type(error).__name__}: {message[0] if message else ''}"[:300]


def self_check(device, names=None, dtype: torch.dtype = torch.bfloat16) -> dict[str, str | None]:
    """Check the named kernels (default: all, this file's and kernels_optim.py's) on `device` in
    `dtype`, each once per process. Returns {name: None if it is kept, else why it was replaced};
    each replaced kernel is reported by one KernelSelfCheckWarning when it is first checked."""
    checks = _all_checks()
    names = list(checks) if names is None else list(names)
    unknown = [n for n in names if n not in checks]
    if unknown:
        raise ValueError(f"no self-check for kernels {unknown}; known: {sorted(checks)}")
    results = {}
    for name in names:
        key = (name, _device_key(device), dtype)
        if key not in _self_check_results:
            reason = _run_check(checks[name], device, dtype) if HAVE_TRITON else "triton is not installed"
            _self_check_results[key] = reason
            if reason is not None:
                warnings.warn(
                    f"fused kernel {name!r} failed its self-check on {key[1]} ({str(dtype).removeprefix('torch.')}) "
                    f"and is replaced by its torch reference: {reason}",
                    KernelSelfCheckWarning,
                    stacklevel=3,
                )
        results[name] = _self_check_results[key]
    return results


def passes_self_check(name: str, device, dtype: torch.dtype) -> bool:
    """Whether kernel `name` may run on device in dtype (models/layers.py asks this in "auto" mode).
    While torch.compile traces or a dispatch mode (FakeTensorMode, a memory tracker) is active, an
    unchecked kernel is not checked but answered False (the reference runs), and nothing is cached."""
    key = (name, _device_key(device), dtype)
    if key in _self_check_results:
        return _self_check_results[key] is None
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    return self_check(device, [name], dtype)[name] is None


def forget_self_checks() -> None:
    """Drop the cached results, so the next use checks again (tests; after swapping a kernel)."""
    _self_check_results.clear()
