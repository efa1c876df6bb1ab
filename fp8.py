"""Frozen Linear weights stored in float8 (e4m3fn) with a scale, upcast inside the matmul.

fp8 halves the bytes of a frozen base against bf16: FLUX.1's 12B weights take ~12 GB
instead of ~24 GB, and block swap (blockswap.py) moves half the bytes per block.

    w (out, in) in bf16/fp32 -> w8 = round_to_fp8(w / s), s = max|w| / 448
    forward: y = x @ (w8 * s)^T + b, the product w8 * s computed in fp32, rounded once
             to the compute dtype (x's dtype), for one Linear at a time.

`s` is one fp32 number per tensor (default, as ComfyUI's "scaled fp8" files) or one per
output row (`per_row=True`, shape (out, 1): smaller error for rows of unequal size).
e4m3 keeps 3 mantissa bits, so each weight is off by up to 1/16 of itself.

Fp8Linear is an nn.Linear subclass, so LoRA (lora.py) wraps it unchanged: apply fp8
first, then LoRA. The weight is a Parameter that requires no grad; its backward saves the
fp8 weight (1 byte per element), not an upcast copy. Keep moving the model with
`.to(device)` only: `.to(dtype)` would upcast fp8 Parameters like any floating tensor.

Released fp8 checkpoints load with `fp8_state_dict_to_model` (a family's `load` calls it):
- plain fp8 files (weights stored as float8_e4m3fn, no scale: scale 1);
- ComfyUI "scaled fp8": a `scaled_fp8` marker tensor and a 0-dim fp32 `<linear>.scale_weight`
  per Linear (`<linear>.scale_input` is for fp8 x fp8 matmuls and is not needed here);
- the newer ComfyUI / modelopt spelling `<linear>.weight_scale`, `<linear>.input_scale`, with
  a per-layer `<linear>.comfy_quant` JSON tensor naming the format.
"""
import json

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.loading import FP8_DTYPES

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
SCALE_SUFFIXES = (".weight_scale", ".scale_weight")  # new and legacy ComfyUI names
INPUT_SCALE_SUFFIXES = (".input_scale", ".scale_input")
MARKER = "scaled_fp8"


# --- the numbers ---------------------------------------------------------------------------------


def quantize_weight(weight: Tensor, per_row: bool = False) -> tuple[Tensor, Tensor]:
    """(out, in) weight -> (fp8 weight, fp32 scale () or (out, 1)) with weight ~= fp8 * scale.
    A weight whose every value is already an fp8 number (a released fp8 file, upcast on load)
    is stored as those fp8 numbers with scale 1: it round-trips exactly."""
    w = weight.detach().float()
    if not w.is_meta:
        as_fp8 = w.clamp(-FP8_MAX, FP8_MAX).to(FP8)
        if torch.equal(as_fp8.float(), w):  # exactly representable: keep the file's fp8 values
            return as_fp8, torch.ones((w.shape[0], 1) if per_row else (), device=w.device)
    amax = w.abs().amax(dim=1, keepdim=True) if per_row else w.abs().amax()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))  # an all-zero row keeps scale 1
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


DEQUANTIZE_ELEMENTS = 2**23  # upcast at a time: 32 MiB of fp32, not a copy of the whole weight


def dequantize_weight(weight_fp8: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """fp8 * scale in fp32 (exact upcast, one product), rounded once to `dtype`. Done in blocks
    of rows into the result, so the fp32 product exists for DEQUANTIZE_ELEMENTS at a time (a
    FLUX single block's linear1 would otherwise make 252 MiB of fp32 beside its 126 MiB result)."""
    rows = weight_fp8.shape[0]
    step = max(1, DEQUANTIZE_ELEMENTS // max(1, weight_fp8[0].numel()))  # rows per block
    if rows <= step:
        return weight_fp8.float().mul_(scale).to(dtype)
    out = torch.empty(weight_fp8.shape, dtype=dtype, device=weight_fp8.device)
    for start in range(0, rows, step):
        end = start + step
        block_scale = scale if scale.ndim == 0 else scale[start:end]  # per tensor () or per row (out, 1)
        out[start:end] = weight_fp8[start:end].float().mul_(block_scale)  # the copy rounds to dtype
    return out


class _Fp8Matmul(torch.autograd.Function):
    """y = x @ dequantize(w8, s)^T + b, saving the fp8 weight for backward (not a bf16 copy)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight_fp8: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(weight_fp8, scale)
        ctx.bias_dtype = None if bias is None else bias.dtype
        weight = dequantize_weight(weight_fp8, scale, x.dtype)
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        weight_fp8, scale = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantize_weight(weight_fp8, scale, grad_out.dtype)  # (..., out) @ (out, in)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_bias


class Fp8Linear(nn.Linear):
    """A Linear whose frozen weight is stored in fp8 with a scale (buffer `weight_scale`)."""

    def __init__(self, weight_fp8: Tensor, scale: Tensor, bias: nn.Parameter | Tensor | None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: no full-precision weight is ever made
        if weight_fp8.dtype not in FP8_DTYPES:
            raise TypeError(f"Fp8Linear needs an fp8 weight, got {weight_fp8.dtype}")
        self.out_features, self.in_features = weight_fp8.shape
        self.weight = nn.Parameter(weight_fp8, requires_grad=False)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
        self.register_buffer("weight_scale", scale.float())

    @classmethod
    def from_linear(cls, linear: nn.Linear, per_row: bool = False) -> "Fp8Linear":
        weight_fp8, scale = quantize_weight(linear.weight, per_row)
        return cls(weight_fp8, scale, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return _Fp8Matmul.apply(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        kind = "per row" if self.weight_scale.ndim else "per tensor"
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.weight.dtype}, scale {kind}"


# --- converting a model --------------------------------------------------------------------------


def in_blocks(blocks: list[nn.Module] | None):
    """A selection of the Linears inside `blocks` (the lists a family names: nearly all of a
    network's weights), or of every Linear when blocks is None. The embedders and final layers
    outside the blocks stay in full precision: they are small, and some networks read their
    compute dtype from one of them (FLUX's img_in.weight)."""
    if blocks is None:
        return lambda name, module: True
    inside = {id(m) for block in blocks for m in block.modules() if isinstance(m, nn.Linear)}
    return lambda name, module: id(module) in inside


def quantize_linears_(model: nn.Module, blocks: list[nn.Module] | None = None, per_row: bool = False) -> list[str]:
    """Replace, in place, every nn.Linear inside `blocks` (every one when None) by an Fp8Linear.
    Returns the converted module names."""
    select = in_blocks(blocks)
    converted = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not select(name, module):
            continue
        if "forward" in module.__dict__:
            raise RuntimeError(f"{name} already has a patched forward (LoRA?): convert to fp8 before adding LoRA")
        if module.weight.requires_grad:
            raise ValueError(
                f"{name}.weight requires grad, but fp8 storage is for frozen weights: freeze the base first "
                "(model.requires_grad_(False), as for LoRA), or turn fp8_base off for full fine-tuning"
            )
        _replace(model, name, Fp8Linear.from_linear(module, per_row))
        converted.append(name)
    return converted


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


# --- loading released fp8 files ------------------------------------------------------------------


def _read_scales(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a state dict into (tensors, Linear name -> weight scale), dropping input scales,
    the `scaled_fp8` marker and `.comfy_quant` entries (after checking their format)."""
    tensors, scales = {}, {}
    for key, tensor in sd.items():
        if key == MARKER or key.endswith("." + MARKER) or key.endswith(INPUT_SCALE_SUFFIXES):
            continue
        if key.endswith(".comfy_quant"):
            layer_format = json.loads(bytes(tensor.tolist()).decode("utf-8")).get("format")
            if layer_format != "float8_e4m3fn":
                raise ValueError(f"{key}: quantization format {layer_format!r} is not supported; only float8_e4m3fn")
            continue
        suffix = next((s for s in SCALE_SUFFIXES if key.endswith(s)), None)
        if suffix is not None:
            scales[key[: -len(suffix)]] = tensor
        else:
            tensors[key] = tensor
    return tensors, scales


def _scale_shape(name: str, scale: Tensor, out_features: int) -> Tensor:
    if scale.numel() == 1:
        return scale.float().reshape(())
    if scale.numel() == out_features:
        return scale.float().reshape(out_features, 1)
    raise ValueError(
        f"{name}: a weight scale of shape {tuple(scale.shape)} is neither per tensor nor per output row "
        f"({out_features}); block-wise scales are not supported"
    )


def fp8_state_dict_to_model(
    model: nn.Module,
    sd: dict[str, Tensor],
    dtype: torch.dtype = torch.bfloat16,
    device=None,
    blocks: list[nn.Module] | None = None,
    per_row: bool = False,
) -> nn.Module:
    """Load `sd` (full precision, plain fp8 or scaled fp8) into a meta-built `model`.

    The Linears inside `blocks` (every Linear when None) are stored in fp8: fp8 weights as
    they are in the file, with the file's scale (or 1); others are quantized here (`per_row`).
    Every other floating tensor (and fp8 weights outside the selection, dequantized) becomes
    `dtype`. Loading is strict and by assignment, as models/loading.py does."""
    tensors, scales = _read_scales(sd)
    select = in_blocks(blocks)
    used_scales = set()
    converted = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or f"{name}.weight" not in tensors:
            continue
        weight = tensors[f"{name}.weight"]
        scale = None
        if name in scales:
            scale = _scale_shape(name, scales[name], weight.shape[0])
            used_scales.add(name)
        if select(name, module):
            if weight.dtype == FP8:
                weight_fp8, scale = weight, torch.ones(()) if scale is None else scale
            else:  # full precision, or e5m2: (re)quantize to e4m3 with a scale
                full = weight if scale is None else dequantize_weight(weight, scale, torch.float32)
                weight_fp8, scale = quantize_weight(full, per_row)
            weight_fp8, scale = weight_fp8.to(device), scale.to(device)
            _replace(model, name, Fp8Linear(weight_fp8, scale, module.bias))
            converted[f"{name}.weight"], converted[f"{name}.weight_scale"] = weight_fp8, scale
        elif scale is not None:
            converted[f"{name}.weight"] = dequantize_weight(weight, scale, dtype).to(device)
    unused = sorted(set(scales) - used_scales)
    if unused:
        raise ValueError(f"weight scales for modules that are not Linears with a weight: {unused[:5]}")
    for key, tensor in tensors.items():
        if key not in converted:
            converted[key] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    model.load_state_dict(converted, strict=True, assign=True)
    return model


def fp8_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the fp8 weights and of their scales, for the memory report."""
    linears = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    return {
        "fp8_weights": sum(m.weight.numel() * m.weight.element_size() for m in linears),
        "scales": sum(m.weight_scale.numel() * m.weight_scale.element_size() for m in linears),
    }
