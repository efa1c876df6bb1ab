"""Triton parameter updates for AdamW and Adafactor, writing bf16 weights by stochastic rounding.

  adamw_update_triton_       one AdamW step of one parameter: one launch
  adafactor_update_triton_   one Adafactor step of one parameter: three launches (factored, >= 2-D)
                             or two (unfactored, 1-D)
  can_update_with_triton     which parameters these kernels handle

The plain-torch reference of each is in optim.py: `adamw_step_` and `adafactor_step_` do the same
arithmetic in the same order, and they call the functions here when the kernel mode allows it
(models.layers.set_kernels: "triton", or "auto" with the parameter on CUDA). optim.py keeps the
state dict, the step counter and the learning-rate and beta2 schedules; this file only sees tensors
and numbers.

Why a kernel: the torch step of one parameter is a dozen element-wise passes, each reading and
writing the whole tensor in fp32 (and bf16 weights need an fp32 working copy and an int32 noise
tensor for the rounding). A kernel loads the weight, gradient and moments once, does the math in
fp32 registers and stores each result once; the rounding noise comes from Philox
(`tl.randint(seed, offsets)`), so it costs no memory and is reproducible from the seed.

Conventions inside every kernel:
  - values are upcast to fp32 right after loading (bf16 arithmetic is also wrong under
    TRITON_INTERPRET=1) and the weight is rounded once, at the final store;
  - scalars that depend only on the step (bias corrections, 1 - beta) are computed in Python doubles,
    as torch computes them, and arrive as fp32 kernel arguments, as torch's scalars do;
  - reductions are two-stage and deterministic: each program stores a partial sum, torch adds them;
  - tensors are contiguous (checked), offsets are int32 (fewer than 2^31 elements, checked).

Without triton installed this file still imports; optim.py then never calls it.
On CPU the kernels run only under the Triton interpreter (TRITON_INTERPRET=1, set before import).
"""
from contextlib import contextmanager

import torch
from torch import Tensor

# triton (or a stand-in when it is not installed), the interpreter flag and the launch context
# are shared with the model kernels
from kernels import HAVE_TRITON, INTERPRETED, launching_on, tl, triton

# Launch shapes; the tests lower them to get several programs out of small tensors.
BLOCK = 1024  # elements per program of the element-wise kernels (AdamW, unfactored Adafactor)
TILE_ROWS, TILE_COLS = 32, 128  # (rows, cols) tile per program of the factored Adafactor kernels


# =================================================================================================
# Which parameters the kernels handle
# =================================================================================================


def can_update_with_triton(p: Tensor, grad: Tensor, moments: list[Tensor], stochastic_rounding: bool,
                           factored: bool = False) -> bool:
    """True for fp32 weights, and for bf16 weights written back by stochastic rounding, with a
    floating gradient of the same shape and fp32 moments, all contiguous on p's device, fewer than
    2^31 elements. Anything else (fp16 weights, bf16 with nearest rounding, strided views) takes
    optim.py's torch path. Factored Adafactor also needs fewer than 65536 matrices in p
    (CUDA's limit on the grid's third dimension): a 4-D conv weight (out, in, 3, 3) is out * in
    tiny matrices, better served by torch anyway."""
    weight_ok = p.dtype == torch.float32 or (p.dtype == torch.bfloat16 and stochastic_rounding)
    grad_ok = grad.is_floating_point() and grad.shape == p.shape
    moments_ok = all(m.dtype == torch.float32 and m.is_contiguous() for m in moments)
    same_device = all(t.device == p.device for t in [grad, *moments])
    size_ok = 0 < p.numel() < 2**31 and (not factored or p.numel() // (p.shape[-2] * p.shape[-1]) < 65536)
    return ((HAVE_TRITON or p.is_meta) and weight_ok and grad_ok and moments_ok and same_device and size_ok
            and p.is_contiguous() and grad.is_contiguous())  # on meta: the plan, launches skipped


def _check(p: Tensor, grad: Tensor, moments: list[Tensor], factored: bool = False) -> None:
    if not can_update_with_triton(p, grad, moments, stochastic_rounding=True, factored=factored):
        raise ValueError(
            f"The Triton optimizer kernels need an fp32 or bf16 contiguous weight, a gradient of the same shape "
            f"and contiguous fp32 moments on one device (see can_update_with_triton), got weight {p.dtype} "
            f"{tuple(p.shape)}, gradient "
            f"{grad.dtype} {tuple(grad.shape)}, moments {[(m.dtype, tuple(m.shape)) for m in moments]}. "
            "Use optim.adamw_step_ / optim.adafactor_step_, which fall back to torch for such tensors."
        )



def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# =================================================================================================
# Launching, or not: the memory plan runs the optimizer step on meta tensors, where the host code
# (checks, the buffers it allocates, the torch work between launches) must run but no kernel can.
# =================================================================================================

_launches_are_skipped = False


@contextmanager
def launches_skipped():
    """While active, the update functions below run all their host code but launch no kernel."""
    global _launches_are_skipped
    previous, _launches_are_skipped = _launches_are_skipped, True
    try:
        yield
    finally:
        _launches_are_skipped = previous


def _no_launch(*args, **kwargs) -> None:
    return None


def _launch(kernel, grid):
    """kernel[grid], to be called with the kernel's arguments; a no-op inside launches_skipped()."""
    return _no_launch if _launches_are_skipped else kernel[grid]


# =================================================================================================
# Shared pieces of kernels
# =================================================================================================


@triton.jit
def _store_weight(p_ptr, offsets, mask, weight, seed, STOCHASTIC_ROUND: tl.constexpr):
    """Store the fp32 result into the parameter: as it is for fp32 weights; for bf16 weights,
    stochastically rounded (optim.stochastic_round_'s bit trick, with Philox noise).

    bf16 is the top half of fp32. Adding a uniform 16-bit integer to the fp32 bit pattern carries
    into the kept half with probability (dropped low bits) / 2^16, so the result rounds away from
    zero with exactly the probability that makes its expectation the fp32 value. The noise for
    element i is Philox(seed, i): deterministic per seed, no memory."""
    if STOCHASTIC_ROUND:
        bits = weight.to(tl.uint32, bitcast=True)
        noise = tl.randint(seed, offsets).to(tl.uint32, bitcast=True) & 0xFFFF
        rounded = ((bits + noise) & 0xFFFF0000).to(tl.float32, bitcast=True)  # low half zero: exact in bf16
        weight = tl.where(weight != weight, weight, rounded)  # a NaN's low bits could carry into inf: keep it
    tl.store(p_ptr + offsets, weight.to(p_ptr.dtype.element_ty), mask=mask)


# =================================================================================================
# AdamW. Reference: optim.adamw_step_ (torch.optim.AdamW's operations in its order):
#   weight *= 1 - lr * wd                              (decoupled weight decay)
#   m = lerp(m, grad, 1 - beta1);  v = v * beta2 + (1 - beta2) * grad^2
#   weight -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
# =================================================================================================


@triton.jit(do_not_specialize=["seed"])
def _adamw_kernel(
    p_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, n,
    decay_factor, lerp_weight, beta2, one_minus_beta2, step_size, bias_correction2_sqrt, eps, seed,
    WEIGHT_DECAY: tl.constexpr, SMALL_LERP_WEIGHT: tl.constexpr, STOCHASTIC_ROUND: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    # grid (cdiv(n, BLOCK),): one block of the flattened parameter
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    weight = tl.load(p_ptr + offsets, mask=mask).to(tl.float32)
    grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask)

    if WEIGHT_DECAY:
        weight = weight * decay_factor
    # torch.lerp's two formulas (the second for weights >= 0.5 keeps it exact at weight 1)
    if SMALL_LERP_WEIGHT:
        exp_avg = exp_avg + lerp_weight * (grad - exp_avg)
    else:
        exp_avg = grad - (grad - exp_avg) * (1.0 - lerp_weight)
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * grad * grad
    # div_rn / sqrt_rn: IEEE-rounded, as torch's / and sqrt (plain / and sqrt may be approximate on GPU)
    denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), bias_correction2_sqrt) + eps
    weight = weight - step_size * tl.div_rn(exp_avg, denom)

    tl.store(exp_avg_ptr + offsets, exp_avg, mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask=mask)
    _store_weight(p_ptr, offsets, mask, weight, seed, STOCHASTIC_ROUND)


def adamw_update_triton_(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, lr: float, beta1: float,
                         beta2: float, eps: float, weight_decay: float, step: int | float, seed: int) -> None:
    """One AdamW step of p in one launch; `step` is the step number counting this one (>= 1).

    p: fp32 (updated exactly) or bf16 (rounded stochastically with Philox noise from `seed`; use a
    different seed for every (step, parameter)). grad: any float dtype. exp_avg, exp_avg_sq: fp32,
    updated in place. All of p's shape and contiguous.
    """
    _check(p, grad, [exp_avg, exp_avg_sq])
    lr = float(lr)
    # step-dependent scalars, computed in doubles exactly as optim.adamw_step_ computes them
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    n = p.numel()
    with launching_on(p):
        _launch(_adamw_kernel, (_cdiv(n, BLOCK),))(
            p, grad, exp_avg, exp_avg_sq, n,
            1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, lr / bias_correction1, bias_correction2**0.5, eps,
            seed,
            WEIGHT_DECAY=weight_decay != 0, SMALL_LERP_WEIGHT=abs(1 - beta1) < 0.5,
            STOCHASTIC_ROUND=p.dtype == torch.bfloat16, BLOCK=BLOCK,
        )  # fmt: skip


# =================================================================================================
# Adafactor. Reference: optim.adafactor_step_ (transformers' Adafactor arithmetic):
#   g2 = grad^2 + eps1
#   factored (..., R, C):  row = EMA_beta2(mean_cols g2)   (..., R)
#                          col = EMA_beta2(mean_rows g2)   (..., C)
#                          update = rsqrt(row / mean(row))[:, None] * rsqrt(col)[None, :] * grad
#   unfactored:            v = EMA_beta2(g2);  update = rsqrt(v) * grad
#   update /= max(1, RMS(update) / clip_threshold);  update *= lr
#   with beta1:            m = m * beta1 + (1 - beta1) * update;  update = m
#   weight += -wd * lr * weight;  weight -= update
#
# Launches. Two quantities need the whole tensor before any element can be updated: the row and
# column means of g2 (every update element depends on all of its row and its column), and the
# RMS of the update (the clip scales every element). So the gradient is read three times:
#   factored    1. tile sums of g2 along rows and columns -> partial sums
#                  (torch: row and column EMAs, row_factor, col_factor: vectors of R and C)
#               2. tile sums of update^2 -> partial sums    (torch: the clip divisor, on device)
#               3. the update itself: moments, weight decay, weight, stochastic rounding
#   unfactored  1. v's EMA and block sums of update^2       (torch: the clip divisor)
#               2. the update, as 3. above
# Each pass is one launch over the whole tensor; the torch work between them is on vectors and
# partial sums (1/TILE_COLS + 1/TILE_ROWS of the tensor's size) and needs no host sync.
# =================================================================================================


@triton.jit
def _adafactor_finish(p_ptr, exp_avg_ptr, offsets, mask, update, clip_divisor, lr, beta1, one_minus_beta1,
                      decay_alpha, seed, HAS_BETA1: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                      STOCHASTIC_ROUND: tl.constexpr):
    """From the unclipped update to the stored weight (the last five lines of the formula above)."""
    update = tl.div_rn(update, clip_divisor)
    update = update * lr
    if HAS_BETA1:
        exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask)
        exp_avg = exp_avg * beta1 + one_minus_beta1 * update
        tl.store(exp_avg_ptr + offsets, exp_avg, mask=mask)
        update = exp_avg
    weight = tl.load(p_ptr + offsets, mask=mask).to(tl.float32)
    if WEIGHT_DECAY:
        weight = weight + decay_alpha * weight
    weight = weight - update
    _store_weight(p_ptr, offsets, mask, weight, seed, STOCHASTIC_ROUND)


@triton.jit
def _tile(R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (col block, row block, matrix)'s tile of a contiguous (B, R, C) tensor:
    row and column indices, element offsets and the in-bounds mask."""
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    matrix = tl.program_id(2)
    offsets = matrix * R * C + rows[:, None] * C + cols[None, :]
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    return matrix, rows, cols, offsets, mask


@triton.jit
def _factored_grad_sq_sums_kernel(
    grad_ptr, row_partial_ptr, col_partial_ptr, R, C, eps1,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # grid (col blocks, row blocks, B). Partial sums of g2 = grad^2 + eps1 over this tile:
    #   row_partial (B, R, col blocks): summed over the tile's columns
    #   col_partial (B, row blocks, C): summed over the tile's rows
    matrix, rows, cols, offsets, mask = _tile(R, C, BLOCK_R, BLOCK_C)
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    grad_sq = tl.where(mask, grad * grad + eps1, 0.0)
    col_blocks, row_blocks = tl.num_programs(0), tl.num_programs(1)
    row_out = (matrix * R + rows) * col_blocks + tl.program_id(0)
    col_out = (matrix * row_blocks + tl.program_id(1)) * C + cols
    tl.store(row_partial_ptr + row_out, tl.sum(grad_sq, axis=1), mask=rows < R)
    tl.store(col_partial_ptr + col_out, tl.sum(grad_sq, axis=0), mask=cols < C)


@triton.jit
def _factored_update(grad_ptr, row_factor_ptr, col_factor_ptr, matrix, rows, cols, offsets, mask, R, C):
    """The unclipped update on a tile: row_factor[:, None] * col_factor[None, :] * grad."""
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    row_factor = tl.load(row_factor_ptr + matrix * R + rows, mask=rows < R, other=0.0)
    col_factor = tl.load(col_factor_ptr + matrix * C + cols, mask=cols < C, other=0.0)
    return (row_factor[:, None] * col_factor[None, :]) * grad


@triton.jit
def _factored_update_sq_sums_kernel(
    grad_ptr, row_factor_ptr, col_factor_ptr, partial_ptr, R, C,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # grid (col blocks, row blocks, B): sum of update^2 over this tile -> partial (B, row blocks, col blocks)
    matrix, rows, cols, offsets, mask = _tile(R, C, BLOCK_R, BLOCK_C)
    update = _factored_update(grad_ptr, row_factor_ptr, col_factor_ptr, matrix, rows, cols, offsets, mask, R, C)
    program = (matrix * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) + tl.program_id(0)
    tl.store(partial_ptr + program, tl.sum(update * update))  # masked entries are 0


@triton.jit(do_not_specialize=["seed"])
def _factored_apply_kernel(
    p_ptr, grad_ptr, exp_avg_ptr, row_factor_ptr, col_factor_ptr, clip_divisor_ptr, R, C,
    lr, beta1, one_minus_beta1, decay_alpha, seed,
    HAS_BETA1: tl.constexpr, WEIGHT_DECAY: tl.constexpr, STOCHASTIC_ROUND: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # grid (col blocks, row blocks, B)
    matrix, rows, cols, offsets, mask = _tile(R, C, BLOCK_R, BLOCK_C)
    update = _factored_update(grad_ptr, row_factor_ptr, col_factor_ptr, matrix, rows, cols, offsets, mask, R, C)
    _adafactor_finish(p_ptr, exp_avg_ptr, offsets, mask, update, tl.load(clip_divisor_ptr), lr, beta1,
                      one_minus_beta1, decay_alpha, seed, HAS_BETA1, WEIGHT_DECAY, STOCHASTIC_ROUND)


@triton.jit
def _unfactored_second_moment_kernel(
    grad_ptr, exp_avg_sq_ptr, partial_ptr, n, beta2, one_minus_beta2, eps1,
    BLOCK: tl.constexpr,
):  # fmt: skip
    # grid (cdiv(n, BLOCK),): v's EMA in place, and this block's sum of update^2 -> partial (blocks,)
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=1.0)
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * (grad * grad + eps1)
    tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask=mask)
    update = tl.div_rn(1.0, tl.sqrt_rn(exp_avg_sq)) * grad  # rsqrt, IEEE-rounded as torch's
    tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.where(mask, update * update, 0.0), axis=0))


@triton.jit(do_not_specialize=["seed"])
def _unfactored_apply_kernel(
    p_ptr, grad_ptr, exp_avg_sq_ptr, exp_avg_ptr, clip_divisor_ptr, n,
    lr, beta1, one_minus_beta1, decay_alpha, seed,
    HAS_BETA1: tl.constexpr, WEIGHT_DECAY: tl.constexpr, STOCHASTIC_ROUND: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # grid (cdiv(n, BLOCK),)
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=1.0)
    update = tl.div_rn(1.0, tl.sqrt_rn(exp_avg_sq)) * grad
    _adafactor_finish(p_ptr, exp_avg_ptr, offsets, mask, update, tl.load(clip_divisor_ptr), lr, beta1,
                      one_minus_beta1, decay_alpha, seed, HAS_BETA1, WEIGHT_DECAY, STOCHASTIC_ROUND)


def _clip_divisor(update_sq_partials: Tensor, numel: int, clip_threshold: float) -> Tensor:
    """max(1, RMS(update) / clip_threshold) as a 1-element device tensor (no host sync);
    RMS = sqrt(sum of squares) / sqrt(numel), as optim._rms computes it."""
    rms = update_sq_partials.sum().sqrt() / numel**0.5
    return (rms / clip_threshold).clamp_(min=1.0).reshape(1)


def _factored_second_moment_(grad: Tensor, row: Tensor, col: Tensor, beta2: float, eps1: float):
    """Launch 1 and the torch work after it: update the row and column EMAs of g2 in place and
    return row_factor (B, R) and col_factor (B, C), whose outer product is 1/sqrt(v), and the
    grid (col blocks, row blocks, B) that the next two launches share."""
    R, C = grad.shape[-2:]
    B = grad.numel() // (R * C)
    grid = (_cdiv(C, TILE_COLS), _cdiv(R, TILE_ROWS), B)
    row_partial = grad.new_empty((B, R, grid[0]), dtype=torch.float32)
    col_partial = grad.new_empty((B, grid[1], C), dtype=torch.float32)
    _launch(_factored_grad_sq_sums_kernel, grid)(grad, row_partial, col_partial, R, C, eps1,
                                                 BLOCK_R=TILE_ROWS, BLOCK_C=TILE_COLS, num_warps=8)
    row, col = row.view(B, R), col.view(B, C)
    row.mul_(beta2).add_(row_partial.sum(-1) / C, alpha=1.0 - beta2)  # EMA of the mean over columns
    col.mul_(beta2).add_(col_partial.sum(-2) / R, alpha=1.0 - beta2)  # EMA of the mean over rows
    row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_()
    col_factor = col.rsqrt()
    return row_factor, col_factor, grid


def adafactor_update_triton_(p: Tensor, grad: Tensor, *, exp_avg_sq_row: Tensor | None = None,
                             exp_avg_sq_col: Tensor | None = None, exp_avg_sq: Tensor | None = None,
                             exp_avg: Tensor | None = None, lr: float, beta2: float, eps1: float,
                             clip_threshold: float, beta1: float | None, weight_decay: float, seed: int) -> None:
    """One Adafactor step of p (the state tensors are optim.adafactor_step_'s, updated in place).

    Factored (p has >= 2 dims): pass exp_avg_sq_row (shape[:-1]) and exp_avg_sq_col
    (shape[:-2] + shape[-1:]); three launches. Unfactored: pass exp_avg_sq; two launches.
    exp_avg only with beta1. `lr` and `beta2` are this step's values (optim.adafactor_step_ computes
    the relative-step / parameter-scale lr and the 1 - step^decay_rate schedule). p: fp32, or bf16
    rounded stochastically with Philox noise from `seed` (a different seed per (step, parameter)).
    """
    factored = exp_avg_sq_row is not None
    moments = [exp_avg_sq_row, exp_avg_sq_col] if factored else [exp_avg_sq]
    _check(p, grad, [m for m in [*moments, exp_avg] if m is not None], factored)
    has_beta1 = beta1 is not None
    if has_beta1 != (exp_avg is not None):
        raise ValueError("adafactor_update_triton_: pass exp_avg exactly when beta1 is set.")
    finish = dict(lr=float(lr), beta1=beta1 or 0.0, one_minus_beta1=1.0 - (beta1 or 0.0),
                  decay_alpha=-weight_decay * lr, seed=seed, HAS_BETA1=has_beta1,
                  WEIGHT_DECAY=weight_decay != 0, STOCHASTIC_ROUND=p.dtype == torch.bfloat16)
    exp_avg = exp_avg if has_beta1 else p  # an unused pointer argument when there is no beta1
    n = p.numel()
    with launching_on(p):
        if factored:
            R, C = p.shape[-2:]
            row_factor, col_factor, grid = _factored_second_moment_(grad, exp_avg_sq_row, exp_avg_sq_col, beta2, eps1)
            partials = grad.new_empty(grid[0] * grid[1] * grid[2], dtype=torch.float32)
            tiles = dict(BLOCK_R=TILE_ROWS, BLOCK_C=TILE_COLS, num_warps=8)
            _launch(_factored_update_sq_sums_kernel, grid)(grad, row_factor, col_factor, partials, R, C, **tiles)
            clip_divisor = _clip_divisor(partials, n, clip_threshold)
            _launch(_factored_apply_kernel, grid)(p, grad, exp_avg, row_factor, col_factor, clip_divisor, R, C,
                                                  **finish, **tiles)
        else:
            grid = (_cdiv(n, BLOCK),)
            partials = grad.new_empty(grid[0], dtype=torch.float32)
            _launch(_unfactored_second_moment_kernel, grid)(grad, exp_avg_sq, partials, n, beta2, 1.0 - beta2,
                                                            eps1, BLOCK=BLOCK)
            clip_divisor = _clip_divisor(partials, n, clip_threshold)
            _launch(_unfactored_apply_kernel, grid)(p, grad, exp_avg_sq, exp_avg, clip_divisor, n, **finish,
                                                    BLOCK=BLOCK)


# =================================================================================================
# Self-checks (kernels.self_check runs them, once per process, device and dtype, before "auto"
# mode lets optim.py use these kernels). fp32 weights are updated without rounding and must match
# the reference: torch.optim.AdamW, optim.adafactor_step_'s torch code. bf16 weights are rounded
# stochastically, so that is checked statistically: every result is one of the two bf16
# neighbours of the fp32 result, and over 4096 weights their mean is the fp32 result.
# =================================================================================================

ADAMW_CHECK = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
ADAFACTOR_CHECK = dict(lr=1e-2, beta1=0.9, weight_decay=0.1)


def _reference_adamw(p: Tensor, grads: list[Tensor]) -> Tensor:
    """torch.optim.AdamW (single-tensor code) from p through the given gradients."""
    weight = p.detach().clone().requires_grad_()
    c = ADAMW_CHECK
    optimizer = torch.optim.AdamW([weight], lr=c["lr"], betas=(c["beta1"], c["beta2"]), eps=c["eps"],
                                  weight_decay=c["weight_decay"], foreach=False)
    for grad in grads:
        weight.grad = grad.clone()
        optimizer.step()
    return weight.detach()


def _reference_adafactor(p: Tensor, grads: list[Tensor]) -> Tensor:
    """optim.adafactor_step_'s torch code (transformers' arithmetic) from p through the gradients."""
    import optim
    from models.layers import using_kernels

    weight, state = p.clone(), {}
    with using_kernels("torch"):
        for grad in grads:
            optim.adafactor_step_(weight, grad, state, **ADAFACTOR_CHECK)
    return weight


def _adamw_steps(p: Tensor, grads: list[Tensor], seed: int) -> None:
    exp_avg, exp_avg_sq = torch.zeros_like(p, dtype=torch.float32), torch.zeros_like(p, dtype=torch.float32)
    for step, grad in enumerate(grads, start=1):
        adamw_update_triton_(p, grad, exp_avg, exp_avg_sq, step=step, seed=seed + step, **ADAMW_CHECK)


def _adafactor_steps(p: Tensor, grads: list[Tensor], seed: int) -> None:
    """The same steps as optim.adafactor_step_ with ADAFACTOR_CHECK (its default eps, clip and
    decay rate: beta2 = 1 - step^-0.8)."""
    fp32 = dict(dtype=torch.float32, device=p.device)
    if p.ndim >= 2:
        moments = dict(exp_avg_sq_row=torch.zeros(p.shape[:-1], **fp32),
                       exp_avg_sq_col=torch.zeros(p.shape[:-2] + p.shape[-1:], **fp32))
    else:
        moments = dict(exp_avg_sq=torch.zeros(p.shape, **fp32))
    exp_avg = torch.zeros(p.shape, **fp32)
    for step, grad in enumerate(grads, start=1):
        adafactor_update_triton_(p, grad, **moments, exp_avg=exp_avg, beta2=1.0 - step**-0.8, eps1=1e-30,
                                 clip_threshold=1.0, seed=seed + step, **ADAFACTOR_CHECK)


def _check_fp32(steps, reference, device) -> None:
    """Two steps on a (19, 45) matrix and on a (45,) vector from random weights and gradients."""
    from kernels import assert_matches

    g = torch.Generator().manual_seed(0)
    for shape in [(19, 45), (45,)]:
        start = torch.randn(shape, generator=g).to(device)
        grads = [torch.randn(shape, generator=g).to(device) for _ in range(2)]
        weight = start.clone()
        steps(weight, grads, seed=0)
        assert_matches(weight, reference(start, grads), torch.float32, f"fp32 weight {shape} after two steps")


def _check_bf16_rounding(steps, reference, device) -> None:
    """4096 weights at 1.0 with gradient 1: one step moves every weight to the same fp32 value v
    (0.989 for AdamW, 0.998 for Adafactor) between two bf16 values. Nearest rounding or truncation
    put every weight on one of them, off from v by 7e-4 or more; stochastic rounding gives a mix
    whose mean is v (standard deviation 3e-5; the check allows 2e-4)."""
    from kernels import KernelMismatch

    start, grads = torch.ones(64, 64, device=device), [torch.ones(64, 64, device=device)]
    exact = reference(start, grads)
    weight = start.bfloat16()
    steps(weight, grads, seed=12345)
    below = (exact.view(torch.int32) & -65536).view(torch.float32)  # bf16 is fp32's upper half
    above = (below.view(torch.int32) + 65536).view(torch.float32)
    result = weight.float()
    if not bool(((result == below) | (result == above)).all()):
        raise KernelMismatch("bf16 weights are not a bf16 neighbour of the fp32 result")
    bias = (result.double().mean() - exact.double().mean()).abs().item()
    if bias > 2e-4:
        raise KernelMismatch(f"bf16 stochastic rounding is biased: mean off by {bias:.2g} (tolerance 2e-4)")


def _self_check_of(steps, reference):
    def check(device, dtype) -> None:
        if dtype == torch.bfloat16:
            _check_bf16_rounding(steps, reference, device)
        else:  # fp32 (what else reaches the kernels: can_update_with_triton)
            _check_fp32(steps, reference, device)

    return check


SELF_CHECKS = {
    "adamw": _self_check_of(_adamw_steps, _reference_adamw),
    "adafactor": _self_check_of(_adafactor_steps, _reference_adafactor),
}
