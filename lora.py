"""LoRA: layers, targeting, the kohya / ComfyUI and diffusers / PEFT file formats, merging and
metadata. The tools on files (convert, merge into a checkpoint, extract, resize, info) are
`python lora.py COMMAND` (lora_tools.py).

A LoRA adds a low-rank path beside a frozen Linear (or convolution) W (out, in):

    y = W x + up(down(x)) * multiplier * alpha / rank

with `down` (rank, in) and `up` (out, rank). `up` starts at zero, so training starts
from the base model. Merging folds the path into W: W += multiplier * alpha/rank * up @ down.
Variants, each a switch (kohya's network_args where kohya has one):
  - dropout on the rank features, rank dropout (each of the r features per sample), module
    dropout (the whole path skipped for a step), all only while the model trains;
  - DoRA (weight-decomposed, Liu et al. 2024, as PEFT computes it): W' = m * V / ||V|| row by
    row, V = W + alpha/rank * up @ down, with a trained magnitude m per output row (the file's
    `dora_scale`, (out, 1)); the norm is not differentiated (the paper's section 4.3);
  - split: one LoRA per row slice of a fused weight (q, k, v of a fused qkv), trained apart,
    saved as one LoRA of the fused weight (stacked downs, block-diagonal up) that every loader reads.

The model is wrapped from outside, as kohya-ss/sd-scripts does: each target Linear's
`forward` is patched to go through a LoRAModule, and the module tree of the model is left
as it was. So the model's state dict keys, `model.to()`, gradient checkpointing and block
swapping see only base weights, and the LoRA weights live in one LoRANetwork (an
nn.Module of its own: move it with `network.to(device)`, train it with
`network.parameters()`; dropout follows the model's train() / eval(), as the base layer's does).

File format (kohya, read by ComfyUI, Forge/A1111 and diffusers): per module
`<name>.lora_down.weight` (rank, in), `<name>.lora_up.weight` (out, rank), `<name>.alpha`
(0-dim) and for DoRA `<name>.dora_scale` (out, 1), where `<name>` = "lora_unet_" + the module
path with "." -> "_", e.g. `lora_unet_double_blocks_0_img_attn_qkv`; text encoders `lora_te1_`,
`lora_te2_`, `lora_te3_` + the transformers module path. The diffusers / PEFT format names the
diffusers modules (`transformer.<module>.lora_A.weight`, `.lora_B.weight`,
`.lora_magnitude_vector`), the family says how (Family.lora_to_diffusers). Training settings
go in the safetensors header (`ss_*` keys as kohya writes them, `modelspec.*`), every value a string.
"""
import json
import math
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

import atomic
from models.loading import FP8_DTYPES

# --- the layer -----------------------------------------------------------------------------------


LORA_BASES = (nn.Linear, nn.Conv1d, nn.Conv2d)  # the layers a LoRA can sit beside


def _rank_layers(base: nn.Module, rank: int, device, dtype, split: tuple[int, ...] = ()) -> tuple[nn.Module, nn.Module]:
    """lora_down and lora_up for `base`, in kohya's layout: for a Linear, Linear(in, r) and
    Linear(r, out); for a convolution (LoCon), down has the base's kernel, stride and padding,
    up is 1x1 (weights (r, in, k[, k]) and (out, r, 1[, 1])). With `split` (row sizes of a fused
    Linear) down is the n slices' downs stacked, Linear(in, n r), and up one Linear(r, size) per slice."""
    options = dict(bias=False, device=device, dtype=dtype)
    if isinstance(base, nn.Linear):
        if split:
            ups = nn.ModuleList(nn.Linear(rank, size, **options) for size in split)
            return nn.Linear(base.in_features, rank * len(split), **options), ups
        return nn.Linear(base.in_features, rank, **options), nn.Linear(rank, base.out_features, **options)
    if split:
        raise ValueError(f"split LoRA is for fused Linear weights, not {type(base).__name__}")
    if base.groups != 1:
        raise ValueError(f"LoRA on grouped convolutions is not supported ({base})")
    conv = type(base)
    down = conv(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation, **options)
    return down, conv(rank, base.out_channels, 1, **options)


def base_weight(layer: nn.Module) -> Tensor:
    """A layer's weight in fp32, fp8 storage (fp8.Fp8Linear's weight_scale) undone."""
    weight = layer.weight.float()
    scale = getattr(layer, "weight_scale", None)
    return weight if scale is None else weight * scale


class LoRAModule(nn.Module):
    """The LoRA path of one Linear, Conv1d or Conv2d `base`.

    `base` is kept by reference and is not a child module: its weights never appear in this
    module's parameters() or state_dict(). `attach()` patches `base.forward` so that calling
    the base layer (from inside the model) runs `self.forward`; `restore()` undoes that.
    `rank` is per slice when `split` is given (the file's rank is rank x slices).
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
                 multiplier: float = 1.0, dtype: torch.dtype | None = None, device=None, *,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, dora: bool = False,
                 split: tuple[int, ...] | list[int] = ()):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
        for name, p in (("dropout", dropout), ("rank_dropout", rank_dropout), ("module_dropout", module_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"LoRA {name} must be in [0, 1), got {p}")
        if not isinstance(base, LORA_BASES):
            raise TypeError(f"LoRA needs a Linear or Conv1d/Conv2d base, got {type(base).__name__}")
        if split and sum(split) != base.weight.shape[0]:
            raise ValueError(f"split {list(split)} does not add up to the {base.weight.shape[0]} output rows")
        object.__setattr__(self, "base", base)  # plain attribute: not registered as a child
        self.rank, self.split = rank, tuple(split)
        device = base.weight.device if device is None else device
        dtype = torch.float32 if dtype is None else dtype
        self.lora_down, self.lora_up = _rank_layers(base, rank, device, dtype, self.split)
        alpha = rank if alpha is None or alpha == 0 else alpha  # kohya: alpha None or 0 means alpha = rank
        self.register_buffer("alpha", torch.tensor(float(alpha), device=device))
        out_shape = (base.weight.shape[0],) + (1,) * (base.weight.ndim - 1)  # (out, 1[, 1, 1]): kohya's dora_scale
        self.dora_scale = nn.Parameter(torch.ones(out_shape, device=device, dtype=dtype)) if dora else None
        self.multiplier = multiplier
        self.dropout = dropout  # on the rank-r features after lora_down, as kohya's `dropout`
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        self.merged_multiplier: float | None = None  # not None while the delta sits inside base.weight
        self._merged_factor: Tensor | None = None  # DoRA: the row factors of the merge, for unmerge
        self.attached = False
        self.reset_parameters()

    def reset_parameters(self):
        if self.lora_down.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        for layer in self._ups():
            nn.init.zeros_(layer.weight)
        if self.dora_scale is not None and not self.base.weight.is_meta:
            with torch.no_grad():  # m = ||W|| per row: the module starts as the base layer
                self.dora_scale.copy_(base_weight(self.base).flatten(1).norm(dim=1).reshape(self.dora_scale.shape))

    def extra_repr(self) -> str:
        alpha = float(self.alpha) if not self.alpha.is_meta else "meta"
        extras = (", dora" if self.dora_scale is not None else "") + (f", split={list(self.split)}" if self.split else "")
        return f"rank={self.rank}, alpha={alpha}{extras}"

    def _ups(self) -> list[nn.Module]:
        return list(self.lora_up) if self.split else [self.lora_up]

    # -- patching the base Linear --

    def attach(self) -> None:
        if self.attached:
            raise RuntimeError("this LoRA is already attached to its base layer")
        # Whatever forward the base has now (its class's, or an earlier LoRA's) becomes the inner call,
        # so LoRAs attached one after another stack.
        self._saved_forward = self.base.__dict__.get("forward")  # None: the class's forward
        self._base_forward = self.base.forward
        self.base.forward = self.forward
        self.attached = True

    def restore(self) -> None:
        if not self.attached:
            return
        if self.base.__dict__.get("forward") != self.forward:
            raise RuntimeError(
                "another LoRA was attached to this layer after this one: remove LoRAs in reverse order"
            )
        if self._saved_forward is None:
            del self.base.forward  # back to the class's forward
        else:
            self.base.forward = self._saved_forward
        self.attached = False

    # -- the file's view: one down, one up, one alpha --

    def up_weight(self) -> Tensor:
        """(out, file rank) lora_up; block-diagonal over the slices when split."""
        if not self.split:
            return self.lora_up.weight
        return torch.block_diag(*(layer.weight for layer in self.lora_up))

    def file_alpha(self) -> Tensor:
        """The alpha that keeps alpha / rank with the file's rank (rank x slices when split), 0-dim fp32."""
        return self.alpha.detach().float() * max(len(self.split), 1)

    # -- math --

    def scale(self) -> Tensor:
        """alpha / rank as a 0-dim tensor (kept a tensor: no host sync in forward)."""
        return self.alpha / self.rank

    def forward(self, x: Tensor) -> Tensor:
        out = self._base_forward(x)
        if self.merged_multiplier is not None or self.multiplier == 0:
            return out  # merged: the base weight already holds the delta
        training = self.base.training  # the model's mode: off in validation and sampling
        if training and self.module_dropout > 0 and torch.rand(()) < self.module_dropout:
            return out  # kohya's module dropout: this LoRA sits the step out
        # The matmuls run in the input's dtype with the (fp32) LoRA weights cast to it, as
        # autocast would: backward then saves the same bf16 x the base layer saves, not an
        # fp32 copy per layer, and the gradients still reach the fp32 weights through the cast.
        h = self._apply(self.lora_down, x)  # (..., rank) or (B, rank, ...) for a convolution
        if training and self.dropout > 0:
            h = F.dropout(h, p=self.dropout)
        if training and self.rank_dropout > 0:
            h = h * self._rank_mask(h)
        if self.dora_scale is not None:
            return self._dora_forward(out, self._up(h * self.scale().to(h.dtype)))
        h = h * (self.scale() * self.multiplier).to(h.dtype)  # scaled at rank width: cheaper than at out width
        return out + self._up(h).to(out.dtype)

    def _up(self, h: Tensor) -> Tensor:
        if not self.split:
            return self._apply(self.lora_up, h)
        parts = h.split(self.rank, dim=-1)  # slice i's rank features -> slice i's rows
        return torch.cat([self._apply(layer, part) for layer, part in zip(self.lora_up, parts)], dim=-1)

    def _rank_mask(self, h: Tensor) -> Tensor:
        """kohya's rank dropout: per sample, each rank feature kept with probability 1 - p, the kept
        ones scaled by 1 / (1 - p). The rank axis is the last for a Linear, the second for a conv."""
        rank_dim = -1 if isinstance(self.lora_down, nn.Linear) else 1
        shape = [1] * h.ndim
        shape[0], shape[rank_dim] = h.shape[0], h.shape[rank_dim]
        keep = torch.rand(shape, device=h.device) >= self.rank_dropout
        return keep.to(h.dtype) / (1.0 - self.rank_dropout)

    def _dora_forward(self, out: Tensor, lora_out: Tensor) -> Tensor:
        """out + multiplier * (m / ||W + s up down|| * (W x + s up down x) - W x), the bias kept
        apart; PEFT's (factor - 1) * W x + factor * lora form keeps bf16 precision."""
        factor = self._per_channel((self.dora_scale.flatten() / self.dora_norm()).to(out.dtype), out)
        plain = out if self.base.bias is None else out - self._per_channel(self.base.bias.to(out.dtype), out)
        change = (factor - 1) * plain + factor * lora_out.to(out.dtype)
        return out + change * self.multiplier

    def _per_channel(self, vector: Tensor, out: Tensor) -> Tensor:
        """An (out,) vector shaped to broadcast over the layer's output: the last axis of a
        Linear's, the second of a convolution's (B, out, ...)."""
        return vector if isinstance(self.base, nn.Linear) else vector.view(-1, *[1] * (out.ndim - 2))

    @torch.no_grad()
    def dora_norm(self) -> Tensor:
        """||W + alpha/rank * up @ down|| per output row, (out,) fp32, without gradient (DoRA's
        section 4.3); the base weight is read as it is now."""
        return dora_row_norm(base_weight(self.base), self.lora_down.weight, self.up_weight(), self.scale().float())

    @staticmethod
    def _apply(layer: nn.Module, x: Tensor) -> Tensor:
        """The layer with its weight cast to x's dtype (Linear, or a convolution's own geometry)."""
        weight = layer.weight.to(x.dtype)
        if isinstance(layer, nn.Linear):
            return F.linear(x, weight)
        return layer._conv_forward(x, weight, None)

    def delta_weight(self, multiplier: float | None = None) -> Tensor:
        """multiplier * alpha/rank * up @ down, (out, in), fp32 (DoRA: its change of the weight as it is now)."""
        multiplier = self.multiplier if multiplier is None else multiplier
        if self.dora_scale is None:
            return lora_delta(self.lora_down.weight, self.up_weight(), self.file_alpha(), multiplier)
        weight = base_weight(self.base)
        return merged_weight(weight, self.lora_down.weight, self.up_weight(), self.file_alpha(), multiplier,
                             self.dora_scale) - weight

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged_multiplier is not None:
            raise RuntimeError("LoRA is already merged; unmerge() first")
        if self.dora_scale is not None:  # the row factors m / ||V|| of this weight, to undo the merge exactly
            self._merged_factor = self.dora_scale.flatten().float() / self.dora_norm()
        add_to_weight(self.base, self.delta_weight())
        self.merged_multiplier = self.multiplier

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged_multiplier is None:
            raise RuntimeError("LoRA is not merged")
        t = self.merged_multiplier
        if self.dora_scale is None:
            add_to_weight(self.base, -self.delta_weight(t))
        else:  # W' = W (1 - t + t f) + t f s D  ->  W = (W' - t f s D) / (1 - t + t f), row by row
            merged = base_weight(self.base)
            c = (t * self._merged_factor).view(-1, *[1] * (merged.ndim - 1))
            delta = lora_delta(self.lora_down.weight, self.up_weight(), self.file_alpha())
            add_to_weight(self.base, (merged - c * delta) / (1 - t + c) - merged)
        self.merged_multiplier = None

    # -- the file's tensors --

    def file_tensors(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """kohya's tensors of this module by suffix: down and up in `dtype` (default: as stored),
        alpha 0-dim fp32 (exact whatever the weight dtype), dora_scale (out, 1[, 1, 1])."""
        cast = (lambda t: t.detach()) if dtype is None else (lambda t: t.detach().to(dtype))
        parts = {"lora_down.weight": cast(self.lora_down.weight), "lora_up.weight": cast(self.up_weight()),
                 "alpha": self.file_alpha()}
        if self.dora_scale is not None:
            parts["dora_scale"] = cast(self.dora_scale)
        return parts

    def file_shapes(self) -> dict[str, tuple[int, ...]]:
        down = tuple(self.lora_down.weight.shape)
        kernel = (1,) * (self.base.weight.ndim - 2)  # a convolution's 1x1 up
        shapes = {"lora_down.weight": down, "lora_up.weight": (self.base.weight.shape[0], down[0], *kernel)}
        if self.dora_scale is not None:
            shapes["dora_scale"] = tuple(self.dora_scale.shape)
        return shapes

    @torch.no_grad()
    def load_file_tensors(self, parts: dict[str, Tensor]) -> None:
        """Copy a file's tensors (file_tensors' suffixes) in. A split module takes a fused file's
        block-diagonal up apart (an up with weights off its diagonal blocks is an error)."""
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        alpha = float(parts.get("alpha", down.shape[0]))
        self.lora_down.weight.copy_(down.to(self.lora_down.weight.dtype))
        if self.split:
            self._load_split_up(up)
            alpha /= len(self.split)
        else:
            self.lora_up.weight.copy_(up.to(self.lora_up.weight.dtype))
        self.alpha.fill_(alpha)
        if self.dora_scale is not None:
            if "dora_scale" not in parts:
                raise KeyError("a DoRA network needs the file's dora_scale (this file is a plain LoRA); "
                               "set use_dora=False to continue it as one")
            self.dora_scale.copy_(parts["dora_scale"].reshape(self.dora_scale.shape).to(self.dora_scale.dtype))
        elif "dora_scale" in parts:
            raise KeyError("the file is a DoRA (it has dora_scale): set use_dora=True to continue it")

    def _load_split_up(self, up: Tensor) -> None:
        row = col = 0
        for layer, size in zip(self.lora_up, self.split):
            block = up[row : row + size, col : col + self.rank]
            outside = up[row : row + size].abs().sum() - block.abs().sum()
            if outside > 0:
                raise ValueError("this LoRA's up is not block-diagonal over the q/k/v slices, so it cannot train "
                                 "split: set split_qkv=False to continue it fused")
            layer.weight.copy_(block.to(layer.weight.dtype))
            row, col = row + size, col + self.rank


def lora_delta(down: Tensor, up: Tensor, alpha: Tensor | float, multiplier: float = 1.0) -> Tensor:
    """The weight change of one LoRA module, computed in fp32: (out, rank) @ (rank, in), or for
    a convolution (out, rank, 1, 1) x (rank, in, k, k) -> (out, in, k, k) (the 1x1 up composes
    with the down kernel exactly)."""
    rank = down.shape[0]
    scale = float(alpha) / rank
    delta = up.float().flatten(1) @ down.float().flatten(1)  # (out, in * k * k)
    return delta.reshape(up.shape[0], *down.shape[1:]) * (scale * multiplier)


def dora_row_norm(weight: Tensor, down: Tensor, up: Tensor, scale: Tensor | float) -> Tensor:
    """||W + scale * up @ down|| of each output row, (out,) fp32, without forming up @ down:
    ||W||^2 + 2 scale <W, U D> + scale^2 ||U D||^2 per row, each term (out, rank) wide."""
    w, d, u = weight.float().flatten(1), down.float().flatten(1).to(weight.device), up.float().flatten(1).to(weight.device)
    cross = (u * (w @ d.T)).sum(dim=1)  # <W_i, (U D)_i> = U_i . (W D^T)_i
    square = (u @ (d @ d.T) * u).sum(dim=1)  # ||(U D)_i||^2 = U_i (D D^T) U_i^T
    return (w.pow(2).sum(dim=1) + 2 * scale * cross + scale**2 * square).clamp_min(0).sqrt()


def merged_weight(weight: Tensor, down: Tensor, up: Tensor, alpha, multiplier: float = 1.0,
                  dora_scale: Tensor | None = None) -> Tensor:
    """The weight with one LoRA merged at `multiplier`, fp32. Plain LoRA: W + t s U D. DoRA:
    W + t (m / ||W + s U D|| * (W + s U D) - W), rows of the output axis (what PEFT computes, and
    ComfyUI's strength)."""
    weight = weight.float()
    delta = lora_delta(down, up, alpha).to(weight.device)  # s U D, multiplier 1
    if dora_scale is None:
        return weight + multiplier * delta
    adapted = weight + delta
    norm = adapted.flatten(1).norm(dim=1).view(-1, *[1] * (weight.ndim - 1))
    dora = dora_scale.float().to(weight.device).reshape(norm.shape) / norm * adapted
    return weight + multiplier * (dora - weight)


def add_to_weight(layer: nn.Module, delta: Tensor) -> None:
    """layer.weight += delta, summed in fp32 and rounded once to the weight's dtype."""
    weight = layer.weight
    if weight.dtype in FP8_DTYPES:
        # fp8 keeps 3 mantissa bits: a LoRA delta is mostly below one rounding step and would vanish
        raise ValueError("cannot merge a LoRA into fp8 weights (it would be rounded away); apply it on the fly")
    merged = weight.float() + delta.to(weight.device)
    weight.data.copy_(merged.to(weight.dtype))


# --- which Linears get a LoRA --------------------------------------------------------------------

def parse_block_indices(spec: str | list[int] | tuple[int, ...], depth: int, what: str) -> list[int]:
    """'all', 'none', '0,1,4-7' or a list of ints -> sorted block indices, checked against depth."""
    if isinstance(spec, (list, tuple)):
        indices = {int(i) for i in spec}
    elif not isinstance(spec, str):
        raise TypeError(f"{what}: expected 'all', 'none', a string like '0,1,4-7' or a list of ints, got {spec!r}")
    elif spec.strip().lower() == "all":
        return list(range(depth))
    elif spec.strip().lower() in ("none", ""):
        return []
    else:
        indices = set()
        for part in spec.split(","):
            match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if not match:
                raise ValueError(f"{what}={spec!r}: cannot read {part!r}; write e.g. '0,1,4-7', 'all' or 'none'")
            first, last = int(match.group(1)), int(match.group(2) or match.group(1))
            if last < first:
                raise ValueError(f"{what}={spec!r}: range {part.strip()!r} runs backwards; write {last}-{first}")
            indices.update(range(first, last + 1))
    out_of_range = sorted(i for i in indices if not 0 <= i < depth)
    if out_of_range:
        raise ValueError(
            f"{what}={spec!r}: indices {out_of_range} are out of range; this model has {depth} {what} (0-{depth - 1})"
        )
    return sorted(indices)


def kohya_name(module_path: str, prefix: str = "lora_unet") -> str:
    """'double_blocks.0.img_attn.qkv' -> 'lora_unet_double_blocks_0_img_attn_qkv'."""
    return f"{prefix}_{module_path.replace('.', '_')}"


def linear_names(model: nn.Module, prefix: str = "lora_unet") -> dict[str, str]:
    """kohya name -> module path for every Linear in the model (how a file's names are resolved)."""
    return {kohya_name(path, prefix): path for path, m in model.named_modules() if isinstance(m, LORA_BASES)}


def targets_from_state_dict(model: nn.Module, sd: dict[str, Tensor], prefix: str = "lora_unet") -> dict[str, int]:
    """Module path -> rank for the modules a kohya state dict holds (rank = lora_down rows)."""
    names = linear_names(model, prefix)
    down = ".lora_down.weight"
    ranks = {k.removesuffix(down): v.shape[0] for k, v in sd.items() if k.endswith(down)}  # rank = rows of down
    unknown = sorted(n for n in ranks if n.startswith(prefix + "_") and n not in names)
    if unknown:
        raise ValueError(
            f"{len(unknown)} LoRA modules name no Linear of this model (a different model or prefix?): "
            f"{_shorten(unknown)}"
        )
    return {names[n]: r for n, r in ranks.items() if n in names}


def _shorten(items: list, limit: int = 12) -> str:
    shown = ", ".join(map(str, items[:limit]))
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# --- layer-targeting presets ---------------------------------------------------------------------
# "Which layers should I train?" as one line of config: `targets = "attention_only"`. A family
# describes each layer that can hold a LoRA (Family.lora_layers: its group, block and place in
# the order the blocks run, and roles); a preset is a rule over those descriptions, so one rule
# serves every family. A family may add presets of its own (Family.target_presets).


@dataclass(frozen=True)
class Layer:
    """One layer that can train. `group`: its rank group (group_ranks keys); `block`: the block
    list it sits in ("" outside the blocks) and `index` its place there; `depth`: its block's
    place in the order all blocks run, from 0 (the first) to below 1 (the last), -1 outside the
    blocks; `roles`: among ROLES."""

    group: str
    block: str = ""
    index: int = -1
    depth: float = -1.0
    roles: frozenset = field(default_factory=frozenset)


# attention: q, k, v and out projections (cross-attention too); mlp: feed-forward; modulation:
# adaLN / time conditioning inside blocks; image / context: the image stream and the text stream
# (FLUX's txt_*, SD3's context blocks, a UNet's cross-attention keys and values); embedder: the
# input embedders; final: the output layer; conv: convolutions (LoCon).
ROLES = ("attention", "mlp", "modulation", "image", "context", "embedder", "final", "conv")


def _in_blocks(layer: Layer) -> bool:
    return layer.depth >= 0


def _only(role: str, other: str):
    """Layers in the blocks with `role` and without `other` (a fused layer holding both, like a
    FLUX single block's linear1 of attention and MLP, is neither attention-only nor MLP-only)."""
    return lambda l: _in_blocks(l) and role in l.roles and other not in l.roles


PRESETS = {  # name -> (what it trains, rule)
    "blocks": ("every layer in the blocks", _in_blocks),
    "all": ("every layer that can train: the blocks, the input embedders and the final layer", lambda l: True),
    "attention_only": ("the attention projections in the blocks (q, k, v, out; cross-attention too): "
                       "changes style while protecting anatomy", _only("attention", "mlp")),
    "mlp_only": ("the feed-forward layers in the blocks", _only("mlp", "attention")),
    "context_blocks": ("the text stream only (context blocks, text-side layers, cross-attention keys and "
                       "values): for small datasets", _only("context", "image")),
    "image_blocks": ("the image stream only", _only("image", "context")),
    "early_blocks": ("the first half of the blocks in the order they run: composition",
                     lambda l: 0 <= l.depth < 0.5),
    "late_blocks": ("the second half of the blocks in the order they run: fine detail", lambda l: l.depth >= 0.5),
    "no_embedders": ("every layer except the input embedders (embedders frozen)", lambda l: "embedder" not in l.roles),
    "no_last_blocks": ("the blocks except the last quarter (the last blocks frozen: photorealism)",
                       lambda l: 0 <= l.depth < 0.75),
    "no_modulation": ("the blocks without their modulation layers",
                      lambda l: _in_blocks(l) and "modulation" not in l.roles),
}


def presets(family) -> dict[str, tuple[str, object]]:
    """The presets a family offers: the common ones and its own (which may replace them)."""
    return {**PRESETS, **family.target_presets()}


def preset_layers(layers: dict[str, Layer], name: str, family) -> list[str]:
    """Module paths of the layers preset `name` selects, in the family's order."""
    available = presets(family)
    if name not in available:
        raise ValueError(f"targets={name!r}: not a preset of {family.title}; choose one of "
                         f"{', '.join(map(repr, available))} (python lora.py presets CONFIG lists them)")
    rule = available[name][1]
    selected = [path for path, layer in layers.items() if rule(layer)]
    if not selected:
        raise ValueError(f"targets={name!r} selects no layer of this {family.title} model")
    return selected


def preset_targets(layers: dict[str, Layer], name: str, family, rank: int,
                   group_ranks: dict[str, int] | None = None) -> dict[str, int]:
    """Module path -> rank for a preset: network_dim, or the group's rank in group_ranks (0 drops it)."""
    group_ranks = group_ranks or {}
    unknown = sorted(set(group_ranks) - {layer.group for layer in layers.values()})
    if unknown:
        raise ValueError(f"group_ranks: unknown groups {unknown}; valid groups are "
                         f"{sorted({layer.group for layer in layers.values()})}")
    targets = {path: group_ranks.get(layers[path].group, rank) for path in preset_layers(layers, name, family)}
    return {path: r for path, r in targets.items() if r > 0}


def describe_paths(paths, limit: int = 40) -> list[str]:
    """Module paths folded on their first index: 'double_blocks.{0-18}.img_attn.qkv'."""
    folded: dict[str, list[int]] = {}
    for path in paths:
        match = re.search(r"(^|\.)(\d+)(\.|$)", path)
        if match is None:
            folded.setdefault(path, [])
            continue
        pattern = f"{path[: match.start(2)]}{{}}{path[match.end(2):]}"
        folded.setdefault(pattern, []).append(int(match.group(2)))
    lines = [pattern.replace("{}", "{" + _ranges(indices) + "}") if indices else pattern
             for pattern, indices in folded.items()]
    return lines[:limit] + ([f"... ({len(lines) - limit} more patterns)"] if len(lines) > limit else [])


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    out, indices = [], sorted(set(indices))
    start = prev = indices[0]
    for i in indices[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}-{prev}" if prev > start else f"{start}")
        if i is not None:
            start = prev = i
    return ",".join(out)


def lora_parameter_count(model: nn.Module, targets: dict[str, int], dora: bool = False) -> int:
    """Trainable parameters of LoRAs on `targets`: rank x (in + out) each (x kernel for a conv's
    down), plus the out magnitudes of DoRA."""
    modules, total = dict(model.named_modules()), 0
    for path, rank in targets.items():
        weight = modules[path].weight
        total += rank * (weight[0].numel() + weight.shape[0]) + (weight.shape[0] if dora else 0)
    return total


# --- the network ---------------------------------------------------------------------------------


class LoRANetwork(nn.Module):
    """All LoRA modules of a model (or of several: the denoiser and text encoders, `join`), keyed
    by kohya name, whose prefix says the model (lora_unet_, lora_te1_, ...). Its parameters()
    are the trainable ones."""

    def __init__(self, loras: dict[str, LoRAModule], module_paths: dict[str, str], prefix: str = "lora_unet",
                 prefixes: dict[str, str] | None = None):
        super().__init__()
        self.loras = nn.ModuleDict(loras)
        self.module_paths = dict(module_paths)  # kohya name -> module path in its model
        self.prefix = prefix
        self.prefixes = dict(prefixes) if prefixes is not None else dict.fromkeys(loras, prefix)  # kohya name -> prefix

    @classmethod
    def inject(
        cls,
        model: nn.Module,
        targets: dict[str, int],
        alpha: float | dict[str, float] | None = None,
        dropout: float = 0.0,
        dtype: torch.dtype | None = None,
        prefix: str = "lora_unet",
        device=None,
        *,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        dora: bool | set[str] = False,
        splits: dict[str, list[int]] | None = None,
        names: dict[str, str] | None = None,
    ) -> "LoRANetwork":
        """Wrap each target layer of `model` (module path -> rank; rank 0 is skipped).

        alpha: one for every target, or module path -> alpha (a path it lacks gets alpha =
        rank); None or 0 means alpha = rank (scale 1). rank_dropout, module_dropout, dora: see
        LoRAModule (dora: for every target, or the set of module paths that have it). splits: module path -> row sizes of the targets that train one LoRA per slice
        (q, k, v), each of the target's rank. names: module path -> the path the file names it
        by, where the two differ (text_encoder_names). LoRA weights are made in `dtype` (default
        fp32) on `device` (default: where the base weight is, meta included)."""
        modules = dict(model.named_modules())
        missing = sorted(p for p in targets if p not in modules)
        not_linear = sorted(p for p in targets if p in modules and not isinstance(modules[p], LORA_BASES))
        if missing or not_linear:
            raise ValueError(
                f"LoRA targets must be Linear or Conv layers of the model; not found: {_shorten(missing)}; "
                f"not Linear or Conv: {_shorten(not_linear)}"
            )
        loras, paths = {}, {}
        for path, rank in targets.items():
            if rank == 0:
                continue
            name = kohya_name((names or {}).get(path, path), prefix)
            path_alpha = alpha.get(path) if isinstance(alpha, dict) else alpha
            loras[name] = LoRAModule(modules[path], rank, path_alpha, dropout, dtype=dtype, device=device,
                                     rank_dropout=rank_dropout, module_dropout=module_dropout,
                                     dora=path in dora if isinstance(dora, (set, frozenset)) else dora,
                                     split=(splits or {}).get(path, ()))
            paths[name] = path
        network = cls(loras, paths, prefix)
        for lora in network.loras.values():
            lora.attach()
        return network

    @classmethod
    def join(cls, networks: list["LoRANetwork"]) -> "LoRANetwork":
        """One network of several (the denoiser's and the text encoders'): one optimizer, one file."""
        loras, paths, prefixes = {}, {}, {}
        for network in networks:
            clash = sorted(set(loras) & set(network.loras))
            if clash:
                raise ValueError(f"two networks name the same LoRA modules (same prefix?): {_shorten(clash)}")
            loras.update(network.loras)
            paths.update(network.module_paths)
            prefixes.update(network.prefixes)
        return cls(loras, paths, networks[0].prefix, prefixes)

    def remove(self) -> None:
        """Put the original forwards back (unmerging first if merged); the network is then inert."""
        for lora in reversed(list(self.loras.values())):
            if lora.merged_multiplier is not None:
                lora.unmerge()
            lora.restore()

    def set_multiplier(self, multiplier: float) -> None:
        for lora in self.loras.values():
            lora.multiplier = multiplier

    def merge(self) -> None:
        for lora in self.loras.values():
            lora.merge()

    def unmerge(self) -> None:
        for lora in self.loras.values():
            lora.unmerge()

    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """`<name>.lora_down.weight`, `<name>.lora_up.weight` (and DoRA's `<name>.dora_scale`) in
        `dtype` (default: as stored) and `<name>.alpha` as a 0-dim fp32 tensor (kept exact whatever
        the weight dtype). Split modules are written fused: stacked downs, block-diagonal up."""
        return {f"{name}.{suffix}": tensor for name, lora in self.loras.items()
                for suffix, tensor in lora.file_tensors(dtype).items()}

    def save(self, path: str | Path, metadata: dict[str, str] | None = None, dtype=torch.bfloat16) -> None:
        """Write a kohya-format safetensors file atomically (temp file, then os.replace)."""
        sd = {k: v.to("cpu").contiguous() for k, v in self.kohya_state_dict(dtype).items()}
        atomic.write_safetensors(sd, path, metadata)

    @torch.no_grad()
    def load_kohya_state_dict(self, sd: dict[str, Tensor], strict: bool = True) -> tuple[list[str], list[str]]:
        """Copy kohya-format tensors into the LoRA modules (resume, continue training).

        A missing `.alpha` means alpha = rank (as ComfyUI and diffusers read such files).
        strict: any missing or unknown key is an error that lists them. Returns (missing, unexpected)."""
        expected = {f"{n}.{suffix}" for n, lora in self.loras.items() for suffix in lora.file_shapes()}
        optional = {f"{n}.alpha" for n in self.loras} | {f"{n}.dora_scale" for n in self.loras}
        missing = sorted(expected - set(sd))
        unexpected = sorted(set(sd) - expected - optional)
        if strict and (missing or unexpected):
            raise KeyError(
                "the LoRA state dict does not match this network (different targets, block selection or "
                f"model?). Missing {len(missing)}: {_shorten(missing)}. Unknown {len(unexpected)}: "
                f"{_shorten(unexpected)}. Build the network with the targets the file was trained with "
                "(targets_from_state_dict), or pass strict=False."
            )
        self._check_shapes(sd)
        for name, lora in self.loras.items():
            if f"{name}.lora_down.weight" not in sd:
                continue  # (strict=False) left as it is
            prefix = f"{name}."
            lora.load_file_tensors({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
        return missing, unexpected

    def _check_shapes(self, sd: dict[str, Tensor]) -> None:
        wrong = []
        for name, lora in self.loras.items():
            for suffix, shape in lora.file_shapes().items():
                key = f"{name}.{suffix}"
                if key in sd and tuple(sd[key].shape) != shape and not (suffix == "dora_scale" and
                                                                        sd[key].numel() == math.prod(shape)):
                    wrong.append(f"{key}: file {tuple(sd[key].shape)} vs network {shape}")
        if wrong:
            raise ValueError(
                f"LoRA shapes differ (a different rank or model size?): {_shorten(wrong, 6)}. "
                "Build the network with the file's ranks (targets_from_state_dict)."
            )


# --- reading files -------------------------------------------------------------------------------

LORA_SUFFIXES = {  # how each format names the two matrices, alpha and DoRA's magnitude
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".alpha": "alpha",
    ".dora_scale": "dora",
    ".lora_magnitude_vector": "dora",  # diffusers / PEFT
    ".lora_magnitude_vector.weight": "dora",
}
NATIVE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # the checkpoint's own module names
DIFFUSERS_PREFIXES = ("transformer.base_model.model.", "base_model.model.", "transformer.", "unet.")
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "text_encoders.")
KOHYA_PREFIXES = ("lora_unet_", "lora_te")
LORA_FORMATS = ("kohya", "diffusers")  # what `python lora.py convert --to` and lora_format write


def load_lora_file(path: str | Path, family) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors (in kohya form) and header metadata of a LoRA file for `family` (families/).

    kohya files pass through unchanged. Files in the checkpoint's own names
    (`diffusion_model.<path>.lora_A.weight`) and diffusers / PEFT files
    (`transformer.transformer_blocks.N.attn.to_q.lora_A.weight`, text encoders
    `text_encoder.<module>...`) are converted: split q/k/v (and the like) are fused back into the
    checkpoint's fused weight with a block-diagonal lora_up; alpha = rank unless the file says
    otherwise (diffusers' `lora_adapter_metadata`); `lora_magnitude_vector` becomes `dora_scale`."""
    sd, metadata = read_lora_file(path)
    return to_kohya(sd, family, metadata), metadata


def read_lora_file(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A LoRA file's tensors as they are stored, and its header metadata."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: LoRA files are read from .safetensors only")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def is_kohya(sd: dict) -> bool:
    return all(k.startswith(KOHYA_PREFIXES) for k in sd)


def to_kohya(sd: dict[str, Tensor], family, metadata: dict[str, str] | None = None) -> dict[str, Tensor]:
    """Any supported LoRA state dict of `family` -> kohya form (see load_lora_file)."""
    if is_kohya(sd):
        return dict(sd)
    te_prefixes = {f"{diffusers}.": kohya for kohya, diffusers in family.text_encoder_loras().values()}
    other_te = sorted(k for k in sd if k.startswith(TEXT_ENCODER_PREFIXES)
                      and not k.startswith(tuple(te_prefixes)))
    if other_te:
        warnings.warn(f"ignoring {len(other_te)} tensors of text encoders {family.title} has no LoRA names for: "
                      f"{_shorten(other_te, 3)}")
    modules = _group_by_module({k: v for k, v in sd.items() if k not in other_te})
    alphas = _peft_alphas(metadata or {})
    fused: dict[str, dict[int, dict[str, Tensor]]] = {}  # native path -> slice index -> parts
    out = {}
    for module, parts in modules.items():
        if "down" not in parts or "up" not in parts:
            raise ValueError(f"LoRA module {module!r} lacks its down (lora_A) or up (lora_B) matrix")
        if "alpha" not in parts:
            parts["alpha"] = torch.tensor(alphas(module, parts["down"].shape[0]))
        te = next((p for p in sorted(te_prefixes, key=len, reverse=True) if module.startswith(p)), None)
        if te is not None:  # transformers module names are the same in both formats
            out.update(_entry(kohya_name(module[len(te):], te_prefixes[te]), parts))
            continue
        path, index = _native_path(module, family)
        if index is None:
            out.update(_kohya_entry(path, parts, family))
        else:
            fused.setdefault(path, {})[index] = parts
    for path, slices in fused.items():
        out.update(_kohya_entry(path, _fuse_slices(path, slices, family), family))
    return out


def _group_by_module(sd: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """{'<module>.lora_A.weight': t, ...} -> {'<module>': {'down': t, 'up': t, 'alpha': t, 'dora': t}}."""
    modules: dict[str, dict[str, Tensor]] = {}
    unreadable = []
    for key, value in sd.items():
        key = key.replace(".default.", ".").removesuffix(".default")  # PEFT adapter name
        suffix = next((s for s in sorted(LORA_SUFFIXES, key=len, reverse=True) if key.endswith(s)), None)
        if suffix is None:
            unreadable.append(key)
            continue
        modules.setdefault(key[: -len(suffix)], {})[LORA_SUFFIXES[suffix]] = value
    if unreadable:
        raise ValueError(f"unsupported tensors in the LoRA file (not LoRA up/down/alpha/DoRA): {_shorten(unreadable)}")
    return modules


def _native_path(module: str, family) -> tuple[str, int | None]:
    """A module name of a native-named or diffusers file -> (module path in the checkpoint's
    network, fused slice index or None)."""
    for prefix in NATIVE_PREFIXES:
        if module.startswith(prefix):
            return module[len(prefix) :], None
    for prefix in DIFFUSERS_PREFIXES:
        if module.startswith(prefix):
            module = module[len(prefix) :]
            break
    return family.lora_from_diffusers(module)


def _entry(name: str, parts: dict[str, Tensor]) -> dict[str, Tensor]:
    entry = {f"{name}.lora_down.weight": parts["down"], f"{name}.lora_up.weight": parts["up"],
             f"{name}.alpha": parts["alpha"].detach().float().reshape(())}
    if "dora" in parts:  # kohya's layout: (out, 1[, 1, 1])
        entry[f"{name}.dora_scale"] = parts["dora"].reshape(parts["up"].shape[0], *[1] * (parts["up"].ndim - 1))
    return entry


def _kohya_entry(path: str, parts: dict[str, Tensor], family) -> dict[str, Tensor]:
    parts = dict(parts, up=family.lora_up_from_diffusers(path, parts["up"], parts["down"]),
                 down=family.lora_down_from_diffusers(path, parts["down"]))
    if "dora" in parts:  # magnitudes are per output row: rows move as the up's rows do
        parts["dora"] = family.lora_up_from_diffusers(path, parts["dora"].reshape(-1, 1), parts["down"]).flatten()
    return _entry(kohya_name(path, family.lora_prefix), parts)


def _fuse_slices(path: str, slices: dict[int, dict[str, Tensor]], family) -> dict[str, Tensor]:
    """LoRAs of the row slices of one fused weight (q, k, v, ...) -> one LoRA of the whole weight.

    Each slice's scale alpha_i/r_i is folded into its down, so the fused alpha is the fused rank
    (scale 1). When every slice has the same down and scale (a fused LoRA split by a converter),
    the shared down is kept and the ups are stacked; otherwise the downs are stacked and the up
    is block-diagonal, zero where a slice is absent. DoRA magnitudes are stacked (every slice
    must have its own: the norm of a row the file leaves out is the base weight's, not known here)."""
    any_down = next(iter(slices.values()))["down"]
    sizes = family.lora_slice_sizes(path, any_down, slices)
    dtype = torch.promote_types(any_down.dtype, torch.float32)
    scaled = {i: p["down"].to(dtype) * (float(p["alpha"]) / p["down"].shape[0]) for i, p in slices.items()}
    fused = _stacked_magnitudes(path, slices, len(sizes))
    if len(slices) == len(sizes) and all(torch.equal(d, scaled[0]) for d in scaled.values()):
        up = torch.cat([slices[i]["up"].to(dtype) for i in range(len(sizes))])
        return fused | {"down": scaled[0], "up": up, "alpha": torch.tensor(float(scaled[0].shape[0]))}
    down = torch.cat([scaled[i] for i in sorted(slices)])  # (sum r_i, in)
    up = torch.zeros(sum(sizes), down.shape[0], dtype=dtype)
    row_starts = [sum(sizes[:i]) for i in range(len(sizes))]
    col = 0
    for i in sorted(slices):
        part_up = slices[i]["up"]
        if part_up.shape[0] != sizes[i]:
            raise ValueError(f"{path} slice {i}: {part_up.shape[0]} rows, expected {sizes[i]}")
        up[row_starts[i] : row_starts[i] + sizes[i], col : col + part_up.shape[1]] = part_up.to(dtype)
        col += part_up.shape[1]
    return fused | {"down": down, "up": up, "alpha": torch.tensor(float(down.shape[0]))}


def _stacked_magnitudes(path: str, slices: dict[int, dict[str, Tensor]], count: int) -> dict[str, Tensor]:
    with_dora = [i for i, p in slices.items() if "dora" in p]
    if not with_dora:
        return {}
    if len(with_dora) != count:
        raise ValueError(f"{path}: a DoRA file must hold every slice of a fused weight (it has {sorted(with_dora)} "
                         f"of {count}): the magnitude of a missing slice depends on the base weight")
    return {"dora": torch.cat([slices[i]["dora"].reshape(-1) for i in range(count)])}


def _peft_alphas(metadata: dict[str, str]):
    """alpha for a diffusers module from diffusers' `lora_adapter_metadata` header (PEFT config,
    its keys `<component>.lora_alpha`, ...); without it alpha = rank, which is how diffusers and
    ComfyUI read such a file."""
    raw = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    configs: dict[str, dict] = {}  # component ("transformer", "text_encoder", "" unprefixed) -> its config
    for key, value in raw.items():
        component, _, name = key.rpartition(".")
        configs.setdefault(component, {})[name] = value

    def alpha(module: str, rank: int) -> float:
        component = next((c for c in configs if c and module.startswith(c + ".")), "")
        config = configs.get(component) or configs.get("transformer") or {}
        name = module.removeprefix(component + ".") if component else module
        for prefix in DIFFUSERS_PREFIXES + NATIVE_PREFIXES:
            name = name.removeprefix(prefix)
        pattern = config.get("alpha_pattern") or {}
        value = next((a for p, a in pattern.items() if re.fullmatch(rf"(.*\.)?({p})", name)), config.get("lora_alpha"))
        if value is None:
            return float(rank)
        # PEFT scales by alpha/r (or alpha/sqrt(r) with rsLoRA); kohya always by alpha/r.
        return float(value) * math.sqrt(rank) if config.get("use_rslora") else float(value)

    return alpha


# --- writing files -------------------------------------------------------------------------------

# transformers module names inside kohya's text-encoder names (lora_te1_<these, "." as "_">):
# the layers kohya, ComfyUI and diffusers give a LoRA in CLIP and T5.
_TEXT_MODULE = re.compile(r"text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])|text_projection"
                          r"|encoder_block_\d+_layer_\d+_(SelfAttention_[qkvo]|DenseReluDense_(wi_0|wi_1|wi|wo))")
_COMPOUNDS = ("text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "text_projection", "wi_0", "wi_1")


def text_encoder_names(model: nn.Module, paths) -> dict[str, str]:
    """Text-encoder module path -> the path kohya, ComfyUI and diffusers name it by: CLIP's layers
    under `text_model.` (transformers 5 builds CLIPTextModel without that level; the released
    files and CLIPTextModelWithProjection keep it). T5's paths are the same either way."""
    nested = hasattr(model, "text_model")
    return {p: p if nested or not p.startswith("encoder.layers.") else f"text_model.{p}" for p in paths}


def text_module_path(kohya_rest: str) -> str:
    """'text_model_encoder_layers_0_self_attn_q_proj' -> 'text_model.encoder.layers.0.self_attn.q_proj'."""
    if not _TEXT_MODULE.fullmatch(kohya_rest):
        raise ValueError(f"{kohya_rest!r} is not a CLIP or T5 layer kohya names")
    path = kohya_rest
    for compound in _COMPOUNDS:
        path = path.replace(compound, compound.replace("_", "\0"))
    return path.replace("_", ".").replace("\0", "_")


def kohya_modules(sd: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """A kohya state dict by module: name -> {"down", "up", "alpha" (rank if absent), "dora"}."""
    modules = _group_by_module(sd)
    for name, parts in modules.items():
        if "down" not in parts or "up" not in parts:
            raise ValueError(f"LoRA module {name!r} lacks its lora_down or lora_up")
        parts.setdefault("alpha", torch.tensor(float(parts["down"].shape[0])))
    return modules


def module_paths(family, names, model: nn.Module | None = None) -> dict[str, tuple[str, str]]:
    """kohya module name -> (kohya prefix, module path in its model) for the denoiser (from
    `model`, or the family's own list of layer paths) and the text encoders the family names."""
    denoiser = linear_names(model, family.lora_prefix) if model is not None else \
        {kohya_name(p, family.lora_prefix): p for p in family.lora_paths()}
    te = {kohya: encoder for encoder, (kohya, _) in family.text_encoder_loras().items()}
    out, unknown = {}, []
    for name in names:
        if name in denoiser:
            out[name] = (family.lora_prefix, denoiser[name])
            continue
        prefix = next((p for p in te if name.startswith(p + "_")), None)
        try:
            out[name] = (prefix, text_module_path(name[len(prefix) + 1 :]))
        except (TypeError, ValueError):
            unknown.append(name)
    if unknown:
        raise ValueError(f"{len(unknown)} LoRA modules name no layer of {family.title} (another model, or a "
                         f"text encoder it does not have?): {_shorten(sorted(unknown))}")
    return out


def kohya_to_diffusers(sd: dict[str, Tensor], family, alpha: str = "fold", model: nn.Module | None = None,
                       paths: dict[str, tuple[str, str]] | None = None,
                       dtype: torch.dtype | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A kohya state dict -> (diffusers / PEFT state dict, its header metadata).

    Names: the family's diffusers modules with their pipeline prefix (`transformer.`,
    `text_encoder.`, ...), `<module>.lora_A.weight` (rank, in), `.lora_B.weight` (out, rank),
    DoRA `.lora_magnitude_vector` (out,). Never PEFT's `.default.` adapter names. A fused weight
    (q, k, v) becomes one module per row slice, each with the rows of up and the down, minus the
    rank columns that are zero in its rows (a LoRA trained split gets its own q, k, v back).
    alpha: "fold" multiplies lora_A by alpha / rank (every reader takes alpha = rank: ComfyUI,
    diffusers, PEFT); "metadata" keeps the weights and writes diffusers' `lora_adapter_metadata`
    (r, lora_alpha, rank_pattern, alpha_pattern per component; ComfyUI does not read it).
    `paths` (kohya name -> (prefix, module path)) or `model` name the layers; by default the family's."""
    if alpha not in ("fold", "metadata"):
        raise ValueError(f"alpha={alpha!r}: 'fold' or 'metadata'")
    modules = kohya_modules(sd)
    paths = paths or module_paths(family, modules, model)
    te = {kohya: diffusers for kohya, diffusers in family.text_encoder_loras().values()}
    out, configs = {}, {}
    for name, parts in modules.items():
        prefix, path = paths[name]
        down, up, rank = parts["down"], parts["up"], parts["down"].shape[0]
        scale = float(parts["alpha"]) / rank
        rows = family.lora_to_diffusers(path, up, down) if prefix == family.lora_prefix else {f"{te[prefix]}.{path}": up}
        magnitudes = {}
        if "dora" in parts:
            magnitude = parts["dora"].reshape(-1, 1)
            magnitudes = family.lora_to_diffusers(path, magnitude, down) if prefix == family.lora_prefix \
                else {module: magnitude for module in rows}
        for module, module_up in rows.items():
            used = module_up.flatten(1).abs().sum(0) > 0 if module_up.flatten(1).abs().sum() > 0 else \
                torch.ones(rank, dtype=torch.bool)
            a, b = down[used], module_up[:, used]
            a = a.flatten(1) if b.ndim == 2 else a  # a diffusers Linear for a 1-wide conv (IF's qkv)
            out[f"{module}.lora_A.weight"] = (a.float() * scale).to(a.dtype) if alpha == "fold" else a
            out[f"{module}.lora_B.weight"] = b
            if module in magnitudes:  # PEFT's shape: (out,), a convolution's (1, out, 1[, 1])
                shape = (-1,) if b.ndim == 2 else (1, -1, *[1] * (b.ndim - 2))
                out[f"{module}.lora_magnitude_vector"] = magnitudes[module].reshape(shape)
            component, _, inner = module.partition(".")
            configs.setdefault(component, {})[inner] = (int(used.sum()), scale * int(used.sum()))
    out = {k: (v if dtype is None else v.to(dtype)).contiguous().clone() for k, v in out.items()}
    return out, (_adapter_metadata(configs, any("dora" in p for p in modules.values())) if alpha == "metadata" else {})


def _adapter_metadata(configs: dict[str, dict[str, tuple[int, float]]], dora: bool) -> dict[str, str]:
    """diffusers' `lora_adapter_metadata`: per component the PEFT LoraConfig fields, each key
    `<component>.<field>` (as diffusers' save_lora_weights writes them)."""
    raw = {}
    for component, modules in configs.items():
        ranks = [r for r, _ in modules.values()]
        r = max(set(ranks), key=ranks.count)  # the most common rank, the rest in rank_pattern
        alphas = [a for _, a in modules.values()]
        lora_alpha = max(set(alphas), key=alphas.count)
        raw |= {f"{component}.r": r, f"{component}.lora_alpha": lora_alpha, f"{component}.use_dora": dora,
                f"{component}.target_modules": sorted(modules),
                f"{component}.rank_pattern": {m: rank for m, (rank, _) in modules.items() if rank != r},
                f"{component}.alpha_pattern": {m: a for m, (_, a) in modules.items() if a != lora_alpha}}
    return {"lora_adapter_metadata": json.dumps(raw, sort_keys=True)}


def diffusers_state_dict(network: LoRANetwork, family, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The network in diffusers / PEFT names (kohya_to_diffusers, alpha folded)."""
    paths = {}
    for name, path in network.module_paths.items():
        prefix = network.prefixes[name]  # a text encoder's path in the file may differ from its module path
        paths[name] = (prefix, path if prefix == family.lora_prefix else text_module_path(name[len(prefix) + 1:]))
    return kohya_to_diffusers(network.kohya_state_dict(), family, "fold", paths=paths, dtype=dtype)[0]


def save_lora(network: LoRANetwork, path: str | Path, metadata: dict[str, str] | None, dtype: torch.dtype,
              family, lora_format: str = "kohya") -> None:
    """Write the network's file atomically in `lora_format`: "kohya" (LoRANetwork.save) or
    "diffusers" (kohya_to_diffusers, alpha folded: diffusers' load_lora_weights and ComfyUI)."""
    if lora_format == "kohya":
        network.save(path, metadata, dtype=dtype)
        return
    if lora_format != "diffusers":
        raise ValueError(f"lora_format={lora_format!r}: choose one of {LORA_FORMATS}")
    sd = {k: v.to("cpu") for k, v in diffusers_state_dict(network, family, dtype).items()}
    atomic.write_safetensors(sd, path, metadata)


COMFYUI_DORA_NOTE = ("DoRA: ComfyUI loads dora_scale as DoRA, but (at ComfyUI a125cd8) divides by the norm of the base "
                     "weight rows, not of the adapted ones (Comfy-Org/ComfyUI PR #15458), so its result differs a little")


def loader_notes(network: LoRANetwork, family, lora_format: str, targets: dict[str, int]) -> list[str]:
    """What common loaders do not apply as trained, of this network saved in `lora_format`."""
    encoders = [e for e, (prefix, _) in family.text_encoder_loras().items()
                if any(name.startswith(prefix + "_") for name in network.loras)]
    dora = any(m.dora_scale is not None for m in network.loras.values())
    return format_notes(family, lora_format, targets, encoders, dora)


def format_notes(family, lora_format: str, targets, encoders: list[str], dora: bool) -> list[str]:
    """The same for a file: its format, denoiser targets, text encoders with LoRAs, DoRA or not."""
    notes = list(family.lora_loader_notes(targets)) if lora_format == "kohya" else []  # kohya names' readers
    notes += family.text_encoder_loader_notes(encoders) if encoders else []
    if dora and lora_format == "kohya":
        notes += [COMFYUI_DORA_NOTE, "DoRA: diffusers reads DoRA from diffusers-format files only: python lora.py "
                  "convert FILE OUT --to diffusers (or lora_format='diffusers')"]
    elif dora:
        notes.append("DoRA: ComfyUI does not read lora_magnitude_vector (it applies a plain LoRA): give ComfyUI "
                     "the kohya file (python lora.py convert FILE OUT --to kohya)")
    return notes


# --- applying files for inference ----------------------------------------------------------------


def apply_lora_file(
    model: nn.Module,
    path_or_sd: str | Path | dict[str, Tensor],
    family,
    multiplier: float = 1.0,
    merge: bool = True,
) -> LoRANetwork | None:
    """Apply a LoRA file (or state dict) of `family` (families/) to the model for inference.

    merge=True adds multiplier * alpha/rank * up @ down into the base weights (no cost per step;
    returns None). merge=False wraps the Linears and returns the LoRANetwork (change its
    multiplier any time; `remove()` undoes it). Several files can be applied one after another."""
    family = family.for_network(model)  # where module names depend on the network's shapes
    prefix = family.lora_prefix
    if isinstance(path_or_sd, (str, Path)):
        sd, _ = load_lora_file(path_or_sd, family)
    else:
        sd = to_kohya(path_or_sd, family)
    others = sorted({k.split(".")[0] for k in sd if not k.startswith(prefix + "_")})
    if others:
        warnings.warn(
            f"{len(others)} LoRA modules are not for this network and are skipped here: {_shorten(others, 3)} "
            "(text-encoder parts, lora_te*, go through lora.apply_text_encoder_loras, as sample.py does)"
        )
        sd = {k: v for k, v in sd.items() if k.startswith(prefix + "_")}
    targets = targets_from_state_dict(model, sd, prefix)
    modules = dict(model.named_modules())
    if merge and any(modules[p].weight.dtype in FP8_DTYPES for p in targets):
        warnings.warn("the base weights are fp8: applying the LoRA on the fly instead of merging it")
        merge = False
    if merge:
        _merge_state_dict(model, sd, targets, multiplier, prefix)
        return None
    names = linear_names(model, prefix)
    dora = {names[k.removesuffix(".dora_scale")] for k in sd if k.endswith(".dora_scale")}
    network = LoRANetwork.inject(model, targets, dtype=_inference_dtype(model, targets), prefix=prefix, dora=dora)
    network.load_kohya_state_dict(sd)
    network.set_multiplier(multiplier)
    network.eval()
    return network


def apply_text_encoder_loras(networks: dict[str, nn.Module], path: str | Path, family,
                             multiplier: float = 1.0) -> list[str]:
    """The lora_te* parts of a LoRA file merged into the text encoders they are for, for
    inference (sample.py): `networks` by encoder name, as a prompt encoder's networks() gives
    them (HF module names, which kohya's te names spell). Returns the encoders changed."""
    sd, _ = load_lora_file(path, family)
    changed = []
    for encoder, (prefix, _) in family.text_encoder_loras().items():
        if encoder not in networks or not any(k.startswith(prefix + "_") for k in sd):
            continue
        model = networks[encoder]
        linears = [p for p, m in model.named_modules() if isinstance(m, nn.Linear)]
        # the file's names (CLIP under text_model.) -> this model's (transformers 5 drops that level)
        own = {kohya_name(spelled, prefix): kohya_name(p, prefix)
               for p, spelled in text_encoder_names(model, linears).items()}
        part = {own.get(k.split(".")[0], k.split(".")[0]) + "." + k.split(".", 1)[1]: v for k, v in sd.items()
                if k.startswith(prefix + "_")}
        _merge_state_dict(model, part, targets_from_state_dict(model, part, prefix), multiplier, prefix)
        changed.append(encoder)
    return changed


def load_network_weights(network: LoRANetwork, path: str | Path, family) -> list[str]:
    """Continue training from a LoRA file (kohya's network_weights), in any format the family
    reads. Every module of the file must be one of the network's, with its shapes (the same
    targets, ranks, DoRA); split modules take a fused file's block-diagonal up apart. Returns
    the network's modules the file lacks: they start fresh."""
    sd, _ = load_lora_file(path, family)
    missing, unexpected = network.load_kohya_state_dict(sd, strict=False)
    if unexpected:
        raise ValueError(f"network_weights={str(path)!r} holds {len(unexpected)} tensors this network has no place "
                         f"for (other targets or text encoders?): {_shorten(unexpected, 6)}")
    return sorted({key.split(".")[0] for key in missing})


def _inference_dtype(model: nn.Module, targets: dict[str, int]) -> torch.dtype:
    """The base weights' dtype for on-the-fly LoRA weights; bf16 when the base is stored in fp8."""
    modules = dict(model.named_modules())
    dtype = modules[next(iter(targets))].weight.dtype if targets else torch.float32
    return dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.bfloat16


@torch.no_grad()
def _merge_state_dict(model: nn.Module, sd: dict, targets: dict[str, int], multiplier: float, prefix: str):
    modules = dict(model.named_modules())
    for path in targets:
        name, layer = kohya_name(path, prefix), modules[path]
        down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
        shape = (up.shape[0], *down.shape[1:])
        if shape != tuple(layer.weight.shape):
            raise ValueError(f"{name}: LoRA {shape} does not fit {path} {tuple(layer.weight.shape)}; "
                             "is it for another model size?")
        alpha, device = sd.get(f"{name}.alpha", down.shape[0]), layer.weight.device
        merged = merged_weight(layer.weight, down.to(device), up.to(device), alpha, multiplier, sd.get(f"{name}.dora_scale"))
        add_to_weight(layer, merged - layer.weight.float())


# --- metadata ------------------------------------------------------------------------------------
# The safetensors header as kohya-ss/sd-scripts writes it (train_network.py at 48d368fa: the
# metadata dict of NetworkTrainer.train, the single-dataset update, the model name, then
# ss_training_finished_at / ss_steps / ss_epoch at each save; flux_train_network.py
# update_metadata; library/sai_model_spec.py for modelspec.*). Every value is a string, made
# as kohya makes it: str() of the Python value ("True", "None", "0.0001", "(1024, 1024)").

# kohya ss_* key -> the config key it is read from.
CONFIG_METADATA = {
    "ss_output_name": "run_name",
    "ss_learning_rate": "learning_rate",
    "ss_unet_lr": "learning_rate",
    "ss_gradient_checkpointing": "gradient_checkpointing",
    "ss_gradient_accumulation_steps": "gradient_accumulation_steps",
    "ss_max_train_steps": "max_train_steps",
    "ss_lr_warmup_steps": "lr_warmup_steps",
    "ss_lr_scheduler": "lr_scheduler",
    "ss_network_dropout": "network_dropout",
    "ss_seed": "seed",
    "ss_max_grad_norm": "max_grad_norm",
    "ss_caption_dropout_rate": "caption_dropout_rate",
    "ss_loss_type": "loss_type",
    "ss_huber_schedule": "huber_schedule",
    "ss_huber_c": "huber_c",
    "ss_fp8_base": "fp8_base",
    "ss_batch_size_per_device": "batch_size",
}
# What this trainer never does, written as kohya writes it in that case.
FIXED_METADATA = {
    "ss_v2": "False", "ss_full_fp16": "False", "ss_cache_latents": "True", "ss_num_reg_images": "0",
    "ss_text_encoder_lr": "None", "ss_color_aug": "False", "ss_flip_aug": "False", "ss_shuffle_caption": "False",
    "ss_keep_tokens": "0", "ss_enable_bucket": "False", "ss_bucket_no_upscale": "False",
    "ss_reg_dataset_dirs": "{}", "ss_prior_loss_weight": "1.0",
}
MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}  # kohya's --mixed_precision names
# network_args recorded in ss_network_args: these config keys (a family adds Family.lora_config_keys)
NETWORK_CONFIG_KEYS = ("network_dim", "network_alpha", "network_dropout", "group_ranks")
TRAINER_CONFIG_KEY = "trainer_config"  # the whole resolved config, JSON (paths as base names)


def _metadata_string(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return json.dumps(value, default=str)
    return str(value)


def kohya_metadata(config: dict, model_params, family_metadata: dict[str, str], network_args: dict | None = None,
                   *, step: int = 0, epoch: int = 0, run: dict | None = None, title: str | None = None) -> dict[str, str]:
    """Header metadata as kohya writes it (ss_* and modelspec.*), all strings.

    config: the resolved training config (paths already cut to base names); its keys fill ss_*
    (CONFIG_METADATA) and all of it goes, as JSON, under "trainer_config". family_metadata:
    what the family adds and overrides (ss_base_model_version, ss_network_module,
    modelspec.architecture, its training keys). network_args (default: NETWORK_CONFIG_KEYS of
    the config) go to ss_network_args. run: facts of the run kohya records (session id, start
    time, image and batch counts, dataset folders, optimizer class, model file name)."""
    run = dict(run or {})
    network_args = network_args if network_args is not None else {k: config[k] for k in NETWORK_CONFIG_KEYS
                                                                     if k in config}
    now = time.time()
    rank = network_args.get("network_dim", config.get("network_dim"))
    alpha = network_args.get("network_alpha", config.get("network_alpha")) or rank  # 0 / None: alpha = rank
    meta = dict(FIXED_METADATA)
    meta.update({key: _metadata_string(config[name]) for key, name in CONFIG_METADATA.items() if name in config})
    meta.update({
        "ss_network_dim": _metadata_string(rank),
        "ss_network_alpha": _metadata_string(float(alpha)),
        "ss_network_args": json.dumps(network_args, default=str),
        "ss_mixed_precision": MIXED_PRECISION.get(config.get("dtype"), str(config.get("dtype"))),
        "ss_random_crop": str(config.get("crop") == "random"),
        "ss_training_finished_at": str(now),
        "ss_steps": str(step),
        "ss_epoch": str(epoch),
    })
    if config.get("resolution"):
        size = config["resolution"]
        width, height = (size, size) if isinstance(size, int) else size
        meta["ss_resolution"] = f"({width}, {height})"  # kohya writes the tuple
        meta["modelspec.resolution"] = f"{width}x{height}"
    meta.update({f"ss_{k}": _metadata_string(v) for k, v in run.items()})
    meta.update(modelspec(config, model_params, now, title))
    meta.update(family_metadata)
    return meta


def modelspec(config: dict, model_params, now: float, title: str | None) -> dict[str, str]:
    """modelspec.* as library/sai_model_spec.py writes it (the family adds architecture and
    implementation); the trainer's own settings go beside it."""
    meta = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.title": title or str(config.get("run_name") or "LoRA"),
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(int(now))),
        "modelspec.implementation_version": "diffusion-fine-tuning",
    }
    if config.get("instance_prompt"):
        meta["modelspec.trigger_phrase"] = str(config["instance_prompt"])
    params = asdict(model_params) if is_dataclass(model_params) else dict(model_params or {})
    meta["trainer_model_params"] = json.dumps(params, default=str)
    meta[TRAINER_CONFIG_KEY] = json.dumps(config, default=str, sort_keys=True)
    return meta


if __name__ == "__main__":  # python lora.py convert|merge|extract|resize|info|presets ... (lora_tools.py)
    import lora_tools

    sys.exit(lora_tools.main())
