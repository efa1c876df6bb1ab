"""Optimizers, the optimizer step fused into backward, stochastic rounding,
learning-rate schedules and an EMA of the trained weights.

Reading order:
  build_optimizer        AdamW (torch's), Adafactor or AdamW with 8-bit state (below)
  adafactor_step_        Adafactor for one parameter; the Adafactor class loops it
  adamw_step_            torch's AdamW arithmetic for one parameter, fp32 math
  adamw8bit_step_        the same with both moments stored in 8 bits; the AdamW8bit class loops it
  stochastic_round_      fp32 -> bf16 without losing small updates on average
  FusedBackwardStep      steps each parameter inside backward, then frees its gradient
  clip_grad_norm_, build_scheduler, EMA

Every per-parameter step does its arithmetic in fp32 and writes the result
back once: in place for fp32 weights, by stochastic rounding for bf16
weights (plain rounding when that is switched off), by a plain copy for fp16.
Optimizer state is kept in fp32 whatever the weight dtype, except AdamW8bit's, whose moments
are stored as float8 numbers with one fp32 scale per block of 256.

adamw_step_ and adafactor_step_ are also the reference for the Triton
updates in kernels_optim.py (one kernel pass instead of a dozen torch ops,
rounding noise from Philox instead of a noise tensor). They call them when
the kernel mode of models.layers.set_kernels allows ("triton", or "auto"
with the parameter on CUDA) and the kernels handle the parameter
(kernels_optim.can_update_with_triton); everything before the arithmetic
(state, step count, lr and beta2 schedules) is shared.
"""
import hashlib
import math
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor

from models.layers import use_fused_optimizer as _use_triton  # the public kernel switch (models/layers.py)

OPTIMIZERS = ("adamw", "adafactor", "adamw8bit")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine_with_warmup", "polynomial")
# build_optimizer(..., name="adafactor", **extra) passes these through to Adafactor.
ADAFACTOR_OPTIONS = ("adafactor_eps", "clip_threshold", "decay_rate", "beta1", "scale_parameter",
                     "relative_step", "warmup_init", "stochastic_rounding")


def _params_of(params_or_groups: list) -> list[Tensor]:
    """The parameters in a list of tensors or of param-group dicts."""
    if params_or_groups and isinstance(params_or_groups[0], dict):
        return [p for group in params_or_groups for p in group["params"]]
    return list(params_or_groups)


def build_optimizer(params_or_groups, name: str, lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, foreach: bool | None = None,
                    **extra) -> torch.optim.Optimizer:
    """An optimizer by name.

    adamw:     torch.optim.AdamW, the fused CUDA kernel when every parameter is on
               CUDA, else the foreach implementation (foreach=False: one tensor at a
               time, which the memory plan uses as the nearest relative of the fused
               kernel: no temporaries of the whole set). Takes no extra options.
    adafactor: Adafactor below with an explicit lr. `betas` and `eps` are AdamW's
               and are not used; Adafactor's own options come through `extra`
               (see ADAFACTOR_OPTIONS; `adafactor_eps` is its (eps1, eps2) pair).
    adamw8bit: AdamW8bit below (2 bytes of state per weight instead of 8); takes
               `stochastic_rounding` (for bf16 weights) through `extra`.
    """
    params_or_groups = list(params_or_groups)
    params = _params_of(params_or_groups)
    if not params:
        raise ValueError("build_optimizer got no parameters: nothing is marked trainable.")
    if name == "adamw":
        if extra:
            raise ValueError(f"Unknown option(s) {sorted(extra)} for adamw; it takes lr, weight_decay, betas, eps.")
        on_cuda = all(p.is_cuda for p in params)
        implementation = {"fused": True} if on_cuda else {"foreach": True if foreach is None else foreach}
        return torch.optim.AdamW(params_or_groups, lr=lr, betas=tuple(betas), eps=eps,
                                 weight_decay=weight_decay, **implementation)
    if name == "adamw8bit":
        if set(extra) - {"stochastic_rounding"}:
            raise ValueError(f"Unknown option(s) {sorted(set(extra) - {'stochastic_rounding'})} for adamw8bit.")
        return AdamW8bit(params_or_groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **extra)
    if name == "adafactor":
        unknown = sorted(set(extra) - set(ADAFACTOR_OPTIONS))
        if unknown:
            raise ValueError(f"Unknown option(s) {unknown} for adafactor; valid: {', '.join(ADAFACTOR_OPTIONS)}.")
        if "adafactor_eps" in extra:
            extra["eps"] = tuple(extra.pop("adafactor_eps"))
        return Adafactor(params_or_groups, lr=lr, weight_decay=weight_decay, **extra)
    raise ValueError(f"optimizer={name!r} is not one of {', '.join(OPTIMIZERS)}.")


# ---------------------------------------------------------------------------
# Adafactor (Shazeer & Stern 2018), as transformers.optimization.Adafactor
# computes it, split so that one parameter can be stepped on its own.
# ---------------------------------------------------------------------------

def _rms(x: Tensor) -> Tensor:
    return x.norm(2) / (x.numel() ** 0.5)


def _adafactor_lr(lr: float | None, step: int, weight: Tensor, eps2: float, scale_parameter: bool,
                  relative_step: bool, warmup_init: bool) -> float:
    """The step size: the given lr, or with relative_step min(1e-2 (or 1e-6 step), 1/sqrt(step));
    with scale_parameter times max(eps2, RMS(weight)) (a host sync on GPU)."""
    if relative_step:
        lr = min(1e-6 * step if warmup_init else 1e-2, 1.0 / math.sqrt(step))
    if scale_parameter:
        lr = lr * max(eps2, float(_rms(weight.float())))
    return lr


def adafactor_step_(p: Tensor, grad: Tensor, state: dict, lr: float | None, eps: tuple[float, float] = (1e-30, 1e-3),
                    clip_threshold: float = 1.0, decay_rate: float = -0.8, beta1: float | None = None,
                    weight_decay: float = 0.0, scale_parameter: bool = False, relative_step: bool = False,
                    warmup_init: bool = False, stochastic_rounding: bool = True,
                    generator: torch.Generator | None = None, seed: int | None = None) -> None:
    """One Adafactor step of parameter p with gradient grad; `state` is p's state dict.

    The second moment of a >= 2-D gradient is stored factored: an EMA of the
    mean of grad^2 over the last dim (`exp_avg_sq_row`, shape[:-1]) and over
    the second-to-last dim (`exp_avg_sq_col`, shape[:-2] + shape[-1:]); their
    outer product divided by the row mean approximates the full matrix.
    1-D parameters keep the full `exp_avg_sq`.

    generator feeds the torch path's rounding noise, seed the Triton path's (see _kernel_seed).
    """
    factored = grad.ndim >= 2
    if not state:
        _adafactor_state(state, grad, factored, beta1)
    state["step"] += 1
    step = state["step"]
    lr = _adafactor_lr(lr, step, p, eps[1], scale_parameter, relative_step, warmup_init)
    beta2 = 1.0 - math.pow(step, decay_rate)  # 1 - step^-0.8: grows towards 1, so early steps adapt fast

    moments = {key: state[key] for key in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "exp_avg") if key in state}
    if _triton_update_wanted(p, grad, list(moments.values()), stochastic_rounding, factored):
        from kernels_optim import adafactor_update_triton_

        adafactor_update_triton_(p, grad, **moments, lr=lr, beta2=beta2, eps1=eps[0], clip_threshold=clip_threshold,
                                 beta1=beta1, weight_decay=weight_decay, seed=_kernel_seed(p, seed, generator))
        return

    grad = grad.float()
    weight = p.float()  # p itself when p is fp32: the update then happens in place
    grad_sq = grad.square().add_(eps[0])
    if factored:
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        row.mul_(beta2).add_(grad_sq.mean(dim=-1), alpha=1.0 - beta2)
        col.mul_(beta2).add_(grad_sq.mean(dim=-2), alpha=1.0 - beta2)
        # 1 / sqrt(v) with v[i, j] ~= row[i] * col[j] / mean(row)
        row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)  # (..., rows, 1)
        col_factor = col.unsqueeze(-2).rsqrt()                                       # (..., 1, cols)
        update = torch.mul(row_factor, col_factor).mul_(grad)
    else:
        exp_avg_sq = state["exp_avg_sq"]
        exp_avg_sq.mul_(beta2).add_(grad_sq, alpha=1.0 - beta2)
        update = exp_avg_sq.rsqrt().mul_(grad)

    update.div_((_rms(update) / clip_threshold).clamp_(min=1.0))  # cap the update's RMS at clip_threshold
    update.mul_(lr)
    if beta1 is not None:
        exp_avg = state["exp_avg"]
        exp_avg.mul_(beta1).add_(update, alpha=1 - beta1)
        update = exp_avg
    if weight_decay != 0:
        weight.add_(weight, alpha=-weight_decay * lr)
    weight.add_(-update)
    _write_back_(p, weight, stochastic_rounding, generator)


def _adafactor_state(state: dict, grad: Tensor, factored: bool, beta1: float | None) -> None:
    """A new parameter's fp32 state: the factored (or full) second moment, and the first moment
    when beta1 is set."""
    fp32 = dict(dtype=torch.float32, device=grad.device)
    state["step"] = 0
    if beta1 is not None:
        state["exp_avg"] = torch.zeros(grad.shape, **fp32)
    if factored:
        state["exp_avg_sq_row"] = torch.zeros(grad.shape[:-1], **fp32)
        state["exp_avg_sq_col"] = torch.zeros(grad.shape[:-2] + grad.shape[-1:], **fp32)
    else:
        state["exp_avg_sq"] = torch.zeros(grad.shape, **fp32)


class Adafactor(torch.optim.Optimizer):
    """Adafactor with an external learning rate by default (relative_step,
    scale_parameter and warmup_init off), which is how FLUX fine-tunes use it.

    Numerically the same as transformers.optimization.Adafactor with the same
    options, except that bf16 weights are written back by stochastic rounding
    (stochastic_rounding=True) and the state stays fp32 across load_state_dict.
    """

    def __init__(self, params, lr: float | None = None, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, beta1: float | None = None,
                 weight_decay: float = 0.0, scale_parameter: bool = False, relative_step: bool = False,
                 warmup_init: bool = False, stochastic_rounding: bool = True):
        if relative_step and lr is not None:
            raise ValueError("Adafactor: relative_step=True computes its own step size; "
                             "pass lr=None or relative_step=False.")
        if not relative_step and lr is None:
            raise ValueError("Adafactor: relative_step is off, so an explicit lr is required (e.g. lr=1e-4).")
        if warmup_init and not relative_step:
            raise ValueError("Adafactor: warmup_init=True needs relative_step=True.")
        if beta1 is not None and not 0.0 <= beta1 < 1.0:
            raise ValueError(f"Adafactor: beta1={beta1} must be None or in [0, 1).")
        defaults = dict(lr=lr, eps=tuple(eps), clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
                        weight_decay=weight_decay, scale_parameter=scale_parameter, relative_step=relative_step,
                        warmup_init=warmup_init, stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults)

    @staticmethod
    def step_options(group: dict) -> dict:
        """The keyword arguments of adafactor_step_ for a parameter of this group."""
        return {key: group[key] for key in ("lr", "eps", "clip_threshold", "decay_rate", "beta1", "weight_decay",
                                            "scale_parameter", "relative_step", "warmup_init")}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients.")
                adafactor_step_(p, p.grad, self.state[p], stochastic_rounding=group["stochastic_rounding"],
                                **self.step_options(group))
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        restore_state_dtypes_(self, state_dict)


def restore_state_dtypes_(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Undo torch's cast of loaded optimizer state to the parameter dtype.

    Optimizer.load_state_dict turns every floating state tensor into the
    parameter's dtype, so bf16 weights would come back with bf16 moments.
    The steps here keep fp32 state, so the saved tensors are put back as they were
    (copied, and "step" left where it was saved).
    """
    saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for saved_id, p in zip(saved_ids, params):
        for key, value in state_dict["state"].get(saved_id, {}).items():
            if torch.is_tensor(value) and value.is_floating_point():
                device = value.device if key == "step" else p.device
                optimizer.state[p][key] = value.to(device=device, copy=True)


# ---------------------------------------------------------------------------
# AdamW for one parameter
# ---------------------------------------------------------------------------

def adamw_step_(p: Tensor, grad: Tensor, state: dict, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                eps: float = 1e-8, weight_decay: float = 0.0, stochastic_rounding: bool = True,
                generator: torch.Generator | None = None, seed: int | None = None) -> None:
    """One AdamW step of parameter p, with torch.optim.AdamW's operations in its
    order (single-tensor and foreach paths), so fp32 results agree bit for bit.
    The state layout is torch's as well ("step" a CPU fp32 tensor, "exp_avg",
    "exp_avg_sq"), so one state dict serves both the fused and the plain step.
    generator feeds the torch path's rounding noise, seed the Triton path's (see _kernel_seed).
    """
    if not state:
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(grad, dtype=torch.float32, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(grad, dtype=torch.float32, memory_format=torch.preserve_format)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    beta1, beta2 = betas
    lr = float(lr)
    state["step"] += 1
    step = state["step"].item()  # on the CPU: no device sync

    if _triton_update_wanted(p, grad, [exp_avg, exp_avg_sq], stochastic_rounding):
        from kernels_optim import adamw_update_triton_

        adamw_update_triton_(p, grad, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                             weight_decay=weight_decay, step=step, seed=_kernel_seed(p, seed, generator))
        return

    grad = grad.float()
    weight = p.float()  # p itself when p is fp32
    if weight_decay != 0:
        weight.mul_(1 - lr * weight_decay)  # decoupled weight decay
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
    weight.addcdiv_(exp_avg, denom, value=-step_size)
    _write_back_(p, weight, stochastic_rounding, generator)


def _triton_update_wanted(p: Tensor, grad: Tensor, moments: list[Tensor], stochastic_rounding: bool,
                          factored: bool = False) -> bool:
    """Whether this step runs as a Triton kernel (kernels_optim.py) instead of the torch code:
    the kernel mode allows it and the kernels handle this weight and state."""
    if not _use_triton(p):
        return False
    from kernels_optim import can_update_with_triton

    return can_update_with_triton(p, grad, moments, stochastic_rounding, factored)


def _kernel_seed(p: Tensor, seed: int | None, generator: torch.Generator | None) -> int:
    """The Philox seed of a Triton update: `seed` if given (FusedBackwardStep passes one per step
    and parameter), else drawn from `generator` or torch's global RNG (on the CPU; a CUDA
    generator costs a host sync). fp32 weights are not rounded, so they draw nothing."""
    if seed is not None:
        return seed
    if p.dtype == torch.float32:
        return 0
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(2**62, (), generator=generator, device=device))


def step_seed(seed: int, step: int, index: int) -> int:
    """A 62-bit seed for (run seed, step number, parameter index): a hash, so that neighbouring
    steps or parameters get unrelated Philox streams, and a resumed run gets the same ones."""
    digest = hashlib.blake2b(f"{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


# ---------------------------------------------------------------------------
# AdamW with 8-bit state (block-wise quantized moments, as Dettmers et al. 2022,
# "8-bit Optimizers via Block-wise Quantization", with float8 as the 8-bit code)
# ---------------------------------------------------------------------------

STATE_BLOCK = 256  # values that share one scale
FP8_STATE = torch.float8_e4m3fn
FP8_STATE_MAX = 448.0  # e4m3fn's largest finite value: a block's largest magnitude maps to it


def quantize_state(x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """fp32 x -> (float8 e4m3 codes (blocks, 256), fp32 scale per block (blocks, 1)), x flattened and
    padded to whole blocks. Each value is rounded up or down to a neighbouring fp8 number at
    random, in proportion to its distance (unbiased), so an EMA that moves by less than fp8's
    resolution (3 mantissa bits) still moves on average instead of sticking."""
    flat = x.detach().float().flatten()
    blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % STATE_BLOCK)).view(-1, STATE_BLOCK)
    amax = blocks.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_STATE_MAX, torch.ones_like(amax))
    return _round_fp8_stochastic(blocks / scale, generator), scale


def dequantize_state(codes: Tensor, scale: Tensor, like: Tensor) -> Tensor:
    """The fp32 values quantize_state stored, in `like`'s shape."""
    return (codes.float() * scale).flatten()[: like.numel()].view(like.shape)


def _round_fp8_stochastic(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """fp32 |x| <= 448 -> float8 e4m3fn, rounded stochastically. Normal fp8 numbers (>= 2^-6) keep
    the top 3 of fp32's 23 mantissa bits: noise added to the 20 dropped bits carries into the kept
    ones with the probability of the remainder (as stochastic_round_ does for bf16). Below 2^-6 the
    fp8 grid is uniform, steps of 2^-9: floor(x / step + noise) steps."""
    magnitude = x.abs()
    noise = torch.randint(0, 1 << 20, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    normal = (magnitude.view(torch.int32) + noise).bitwise_and_(-(1 << 20)).view(torch.float32)
    step = 2.0**-9
    subnormal = torch.floor(magnitude / step + noise.float() / (1 << 20)) * step
    rounded = torch.where(magnitude < 2.0**-6, subnormal, normal).clamp_(max=FP8_STATE_MAX)
    return rounded.copysign(x).to(FP8_STATE)


def adamw8bit_step_(p: Tensor, grad: Tensor, state: dict, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8, weight_decay: float = 0.0, stochastic_rounding: bool = True,
                    generator: torch.Generator | None = None, seed: int | None = None) -> None:
    """adamw_step_'s arithmetic (fp32) on moments kept in 8 bits: the first moment m and the
    square root of the second, r = sqrt(v) (half the dynamic range of v), each as float8 codes
    with a scale per block of 256 (quantize_state): about 2 bytes of state per weight instead of
    8. Where r rounds to zero, m is dropped too (|m| hardly exceeds r in Adam), so a vanished r
    never divides a surviving m. `seed` is not used (no Triton path)."""
    if not state:
        state["step"] = torch.tensor(0.0)
        zeros = torch.zeros(grad.shape, dtype=torch.float32, device=grad.device)
        state["exp_avg"], state["exp_avg_scale"] = quantize_state(zeros)
        state["exp_avg_sq_root"], state["exp_avg_sq_root_scale"] = quantize_state(zeros)
    beta1, beta2 = betas
    state["step"] += 1
    step = state["step"].item()
    root = dequantize_state(state["exp_avg_sq_root"], state["exp_avg_sq_root_scale"], grad)
    exp_avg = dequantize_state(state["exp_avg"], state["exp_avg_scale"], grad).masked_fill_(root == 0, 0.0)
    exp_avg_sq = root.square_()

    grad = grad.float()
    weight = p.float()  # p itself when p is fp32
    if weight_decay != 0:
        weight.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    weight.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
    state["exp_avg"], state["exp_avg_scale"] = quantize_state(exp_avg, generator)
    state["exp_avg_sq_root"], state["exp_avg_sq_root_scale"] = quantize_state(exp_avg_sq.sqrt_(), generator)
    _write_back_(p, weight, stochastic_rounding, generator)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with its moments in 8 bits (adamw8bit_step_): for LoRA at rank 16 on FLUX.1 the state
    takes 0.15 GiB instead of 0.57. bf16 weights are written back by stochastic rounding."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, stochastic_rounding: bool = True):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    adamw8bit_step_(p, p.grad, self.state[p], lr=group["lr"], betas=group["betas"], eps=group["eps"],
                                    weight_decay=group["weight_decay"],
                                    stochastic_rounding=group["stochastic_rounding"])
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        restore_state_dtypes_(self, state_dict)  # torch would cast the fp8 codes to the weight dtype


# ---------------------------------------------------------------------------
# Stochastic rounding fp32 -> bf16
# ---------------------------------------------------------------------------

def stochastic_round_(dst: Tensor, src: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Write fp32 `src` into bf16 `dst`, rounding up or down at random so that
    the expected result equals src.

    bf16 is the top 16 bits of fp32. Adding a uniform integer in [0, 2^16) to
    the fp32 bit pattern carries into bit 16 with probability (low 16 bits) / 2^16,
    i.e. the fraction of the way to the next bf16 value (away from zero, as the
    pattern is sign-magnitude); masking off the low bits then leaves an exact
    bf16 value. An update far below bf16's resolution (~0.4% of the weight)
    thus survives on average instead of always rounding away.
    NaN stays NaN, +-inf stays +-inf; finite values within half a bf16 step of
    the fp32 maximum may round up to inf, as nearest rounding also does.
    """
    if dst.dtype != torch.bfloat16 or src.dtype != torch.float32 or dst.shape != src.shape:
        raise ValueError(f"stochastic_round_ wants a bf16 dst and an fp32 src of the same shape, "
                         f"got {dst.dtype} {tuple(dst.shape)} and {src.dtype} {tuple(src.shape)}.")
    bits = src.view(torch.int32)
    rounded = torch.randint(0, 1 << 16, src.shape, dtype=torch.int32, device=src.device, generator=generator)
    rounded.add_(bits).bitwise_and_(-65536)  # -65536 == 0xFFFF0000: keep sign, exponent, top 7 mantissa bits
    result = rounded.view(torch.float32)
    # A NaN whose payload sits in the low bits could carry into inf or wrap the sign: keep NaNs as they are.
    result = torch.where(torch.isnan(src), src, result)
    return dst.copy_(result)


def _write_back_(p: Tensor, weight_fp32: Tensor, stochastic_rounding: bool, generator: torch.Generator | None) -> None:
    """Store the fp32 result of a step into the parameter."""
    if weight_fp32 is p:
        return  # an fp32 parameter was updated in place
    if p.dtype == torch.bfloat16 and stochastic_rounding:
        stochastic_round_(p, weight_fp32, generator)
    else:
        p.copy_(weight_fp32)


# ---------------------------------------------------------------------------
# The optimizer step fused into backward
# ---------------------------------------------------------------------------

class FusedBackwardStep:
    """Step each parameter the moment its gradient is complete, then free that gradient.

    A hook (`register_post_accumulate_grad_hook`) on every parameter of
    `optimizer` runs the optimizer's arithmetic for that one parameter (fp32
    math, fp32 state, bf16 weights written back by stochastic rounding) and
    sets `p.grad = None`, so a full set of gradients never exists: peak memory
    drops by about the size of the trainable weights' gradients.

    The loop stays the usual one, and the optimizer, its state and the LR
    scheduler stay ordinary torch objects:

        fused = FusedBackwardStep(optimizer)           # optimizer from build_optimizer
        scheduler = build_scheduler(optimizer, ...)    # the hooks read group["lr"]
        loss.backward(); fused.step(); scheduler.step()

    What this mode cannot do, and refuses with a clear error:
      * global-norm gradient clipping: the global norm is known only after the
        last gradient, when every other parameter has already been updated.
        Per-parameter clipping (`max_grad_norm_per_param`) is offered instead;
        the global norm is still measured (`last_grad_norm`) for logging.
      * gradient accumulation: each backward would update the weights. It could
        be done by keeping the gradients until a last micro-batch, but keeping
        them is exactly the memory this mode exists to save, so it is refused.
        A second backward before step() raises.

    stochastic_rounding applies to bf16 weights for both optimizers (Adafactor's
    own option covers its plain step() only). With `seed`, the rounding noise
    comes from per-device generators whose state is part of state_dict() (torch
    path) or from Philox seeded by step_seed(seed, step, parameter index)
    (Triton path, see kernels_optim.py), so a resumed run continues bit for bit;
    without, it uses torch's global RNG.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None = 0.0,
                 max_grad_norm_per_param: float | None = None, gradient_accumulation_steps: int = 1,
                 stochastic_rounding: bool = True, seed: int | None = None, average=None):
        if max_grad_norm:
            raise ValueError(f"max_grad_norm={max_grad_norm}: global-norm clipping is impossible with the optimizer "
                             "step fused into backward (each parameter is updated before the global norm is known). "
                             "Set max_grad_norm=0 and, if you want clipping, max_grad_norm_per_param.")
        if gradient_accumulation_steps != 1:
            raise ValueError(f"gradient_accumulation_steps={gradient_accumulation_steps}: gradient accumulation is not "
                             "supported with the optimizer step fused into backward (every backward updates the "
                             "weights). Set gradient_accumulation_steps=1, or turn the fused step off.")
        if isinstance(optimizer, Adafactor):
            self.kind = "adafactor"
        elif isinstance(optimizer, AdamW8bit):
            self.kind = "adamw8bit"
        elif isinstance(optimizer, torch.optim.AdamW):
            self.kind = "adamw"
            for group in optimizer.param_groups:
                if group.get("amsgrad") or group.get("maximize"):
                    raise ValueError("The fused AdamW step implements plain AdamW: set amsgrad=False, maximize=False.")
        else:
            raise ValueError(f"The fused step supports {', '.join(OPTIMIZERS)}, not {type(optimizer).__name__}.")
        self.optimizer = optimizer
        self.average = average  # data parallel: averages a gradient over the GPUs, in place, before it is used
        self.max_grad_norm_per_param = max_grad_norm_per_param
        self.stochastic_rounding = stochastic_rounding
        self.seed = seed
        self.generators: dict[str, torch.Generator] = {}
        self.num_steps = 0
        self.last_grad_norm: Tensor | None = None  # global norm before clipping, of the last step
        self._grad_sq_sum: Tensor | None = None    # sum of squared per-parameter norms in this step
        self._stepped: set[int] = set()            # id() of the parameters updated in this step
        # Group by index, not the dict itself: Optimizer.load_state_dict replaces the group dicts.
        self._group_index = {p: i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
        self._param_index = {p: i for i, p in enumerate(self._group_index)}  # for step_seed
        self._handles = [p.register_post_accumulate_grad_hook(self._hook)
                         for p in self._group_index if p.requires_grad]

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        key = str(device)
        if key not in self.generators:
            self.generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self.generators[key]

    @torch.no_grad()
    def _hook(self, p: Tensor) -> None:
        if id(p) in self._stepped:
            raise RuntimeError("A parameter got a second gradient before FusedBackwardStep.step(): gradient "
                               "accumulation (several backward passes per step) is not supported with the fused "
                               "step. Call step() after every backward, or turn the fused step off.")
        grad = p.grad
        if self.average is not None:
            self.average(grad)
        norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
        self._grad_sq_sum = norm.square() if self._grad_sq_sum is None else self._grad_sq_sum + norm.square()
        if self.max_grad_norm_per_param:
            # torch.nn.utils.clip_grad_norm_'s rule, applied to this one tensor
            grad = grad.float() * (self.max_grad_norm_per_param / (norm + 1e-6)).clamp(max=1.0)
        group = self.optimizer.param_groups[self._group_index[p]]
        state = self.optimizer.state[p]
        rounding = dict(stochastic_rounding=self.stochastic_rounding, generator=self._generator(p.device),
                        seed=None if self.seed is None else step_seed(self.seed, self.num_steps, self._param_index[p]))
        if self.kind in ("adamw", "adamw8bit"):
            step = adamw_step_ if self.kind == "adamw" else adamw8bit_step_
            step(p, grad, state, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                 weight_decay=group["weight_decay"], **rounding)
        else:
            adafactor_step_(p, grad, state, **rounding, **Adafactor.step_options(group))
        p.grad = None  # the point of the exercise: this gradient's memory is free again
        self._stepped.add(id(p))

    def step(self) -> None:
        """Close the step: the hooks have already updated the weights.

        Calls optimizer.step(), which finds no gradients and changes nothing but
        keeps torch's LR-scheduler bookkeeping (it checks the optimizer stepped).
        """
        self.optimizer.step()
        if self._grad_sq_sum is not None:
            self.last_grad_norm = self._grad_sq_sum.sqrt()
        self._grad_sq_sum = None
        self._stepped.clear()
        self.num_steps += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: the hooks already dropped every gradient. Kept so the loop reads the same."""
        self.optimizer.zero_grad(set_to_none=True)

    def remove(self) -> None:
        """Unregister the hooks (the optimizer and its state remain usable unfused)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "num_steps": self.num_steps,
                "generators": {device: g.get_state() for device, g in self.generators.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict["optimizer"])
        restore_state_dtypes_(self.optimizer, state_dict["optimizer"])
        self.num_steps = state_dict["num_steps"]
        if self.seed is None and state_dict["generators"]:
            raise ValueError("This state was saved with a seeded FusedBackwardStep: pass seed= to resume it exactly.")
        for device, generator_state in state_dict["generators"].items():
            self._generator(torch.device(device)).set_state(generator_state)


# ---------------------------------------------------------------------------
# Gradient clipping, LR schedules, EMA
# ---------------------------------------------------------------------------

def clip_grad_norm_(params, max_norm: float | None) -> Tensor:
    """Global L2 norm of the gradients (fp32, before clipping); clips to max_norm when it is > 0."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    if max_norm:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float32) for p in params]
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


def lr_factor(step: int, name: str, warmup_steps: int, total_steps: int, end_lr_ratio: float = 0.0,
              power: float = 1.0) -> float:
    """The multiplier of the base LR used by optimizer step number `step` (0-based).

    Warmup is linear from 0: step / warmup_steps (the transformers/diffusers
    convention, so step 0 runs at LR 0). After warmup, with progress
    p = (step - warmup) / (total - warmup) capped at 1, and e = end_lr_ratio:
      constant_with_warmup  1
      linear                e + (1 - e)(1 - p)
      polynomial            e + (1 - e)(1 - p)^power
      cosine_with_warmup    e + (1 - e)(1 + cos(pi p)) / 2
    `constant` is 1 throughout.
    """
    if name == "constant":
        return 1.0
    if step < warmup_steps:
        return step / warmup_steps
    if name == "constant_with_warmup":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if name == "linear":
        decay = 1.0 - progress
    elif name == "polynomial":
        decay = (1.0 - progress) ** power
    else:  # cosine_with_warmup
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return end_lr_ratio + (1.0 - end_lr_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int,
                    end_lr_ratio: float = 0.0, power: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over lr_factor; call scheduler.step() once after every optimizer step."""
    if name not in SCHEDULERS:
        raise ValueError(f"lr_scheduler={name!r} is not one of {', '.join(SCHEDULERS)}.")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} must be >= 0.")
    if name == "constant" and warmup_steps:
        raise ValueError(f"lr_scheduler='constant' has no warmup but warmup_steps={warmup_steps}: "
                         "use 'constant_with_warmup' or set warmup_steps=0.")
    decays = name in ("linear", "polynomial", "cosine_with_warmup")
    if decays and total_steps <= warmup_steps:
        raise ValueError(f"lr_scheduler={name!r} needs total_steps ({total_steps}) > warmup_steps ({warmup_steps}).")
    if not 0.0 <= end_lr_ratio <= 1.0:
        raise ValueError(f"end_lr_ratio={end_lr_ratio} must lie in [0, 1] (the final LR as a fraction of the base LR).")
    if power <= 0:
        raise ValueError(f"power={power} must be > 0.")
    factor = partial(lr_factor, name=name, warmup_steps=warmup_steps, total_steps=total_steps,
                     end_lr_ratio=end_lr_ratio, power=power)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EMA:
    """Exponential moving average of trainable weights, kept in fp32.

    update(step) does shadow <- decay * shadow + (1 - decay) * weight when
    step % update_every == 0 (call it after each optimizer step with the
    number of steps done). With update_every = k the average spans about
    k / (1 - decay) steps. `device="cpu"` keeps the copy off the GPU.
    """

    def __init__(self, params, decay: float = 0.999, update_every: int = 1, device=None):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay={decay} must lie in [0, 1).")
        if update_every < 1:
            raise ValueError(f"ema update_every={update_every} must be >= 1.")
        self.params = list(params)
        self.decay = decay
        self.update_every = update_every
        self.num_updates = 0
        self.shadow = [p.detach().to(device=device or p.device, dtype=torch.float32, copy=True) for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Fold the current weights in if this step is an update step; returns whether it was."""
        if step % self.update_every:
            return False
        for shadow, p in zip(self.shadow, self.params):
            shadow.lerp_(p.detach().to(shadow.device, torch.float32), 1.0 - self.decay)
        self.num_updates += 1
        return True

    @torch.no_grad()
    def copy_to(self, params=None) -> None:
        """Write the averaged weights into params (default: the tracked ones)."""
        for p, shadow in zip(self._check(params), self.shadow):
            p.copy_(shadow)

    @contextmanager
    def swapped(self, params=None):
        """Put the averaged weights in for the duration (e.g. sampling); the
        trained weights wait on the CPU and come back afterwards."""
        params = self._check(params)
        with torch.no_grad():
            saved = [p.detach().to("cpu", copy=True) for p in params]
            self.copy_to(params)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, weight in zip(params, saved):
                    p.copy_(weight)

    def _check(self, params) -> list[Tensor]:
        params = self.params if params is None else list(params)
        if len(params) != len(self.shadow) or any(p.shape != s.shape for p, s in zip(params, self.shadow)):
            raise ValueError("EMA: these parameters do not match the ones the EMA was built from (count or shapes).")
        return params

    def state_dict(self) -> dict:
        return {"decay": self.decay, "update_every": self.update_every, "num_updates": self.num_updates,
                "shadow": list(self.shadow)}

    def load_state_dict(self, state_dict: dict) -> None:
        shadow = state_dict["shadow"]
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow)):
            raise ValueError("EMA state does not match the trainable parameters (count or shapes): "
                             "was it saved with a different set of trained layers?")
        for mine, saved in zip(self.shadow, shadow):
            mine.copy_(saved)
        self.decay, self.update_every = state_dict["decay"], state_dict["update_every"]
        self.num_updates = state_dict["num_updates"]
