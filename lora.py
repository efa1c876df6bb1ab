"""LoRA for the FLUX.1 transformer: layers, targeting, the kohya / ComfyUI file format,
merging, and reading diffusers-format files.

A LoRA adds a low-rank path beside a frozen Linear W (out, in):

    y = W x + up(down(x)) * multiplier * alpha / rank

with `down` (rank, in) and `up` (out, rank). `up` starts at zero, so training starts
from the base model. Merging folds the path into W: W += multiplier * alpha/rank * up @ down.

The model is wrapped from outside, as kohya-ss/sd-scripts does: each target Linear's
`forward` is patched to go through a LoRAModule, and the module tree of the model is left
as it was. So the model's state dict keys, `model.to()`, gradient checkpointing and block
swapping see only base weights, and the LoRA weights live in one LoRANetwork (an
nn.Module of its own: move it with `network.to(device)`, train it with
`network.parameters()`; dropout follows the model's train() / eval(), as the base layer's does).

File format (kohya, read by ComfyUI, Forge/A1111 and diffusers): per module
`<name>.lora_down.weight` (rank, in), `<name>.lora_up.weight` (out, rank) and `<name>.alpha`
(0-dim), where `<name>` = "lora_unet_" + the module path with "." -> "_", e.g.
`lora_unet_double_blocks_0_img_attn_qkv`. Training settings go in the safetensors header
(`ss_*` keys as kohya writes them, `modelspec.*`), every value a string.
"""
import json
import math
import re
import time
import warnings
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

import atomic
from models.loading import FP8_DTYPES

# --- the layer -----------------------------------------------------------------------------------


LORA_BASES = (nn.Linear, nn.Conv1d, nn.Conv2d)  # the layers a LoRA can sit beside


def _rank_layers(base: nn.Module, rank: int, device, dtype) -> tuple[nn.Module, nn.Module]:
    """lora_down and lora_up for `base`, in kohya's layout: for a Linear, Linear(in, r) and
    Linear(r, out); for a convolution (LoCon), down has the base's kernel, stride and padding,
    up is 1x1 (weights (r, in, k[, k]) and (out, r, 1[, 1]))."""
    options = dict(bias=False, device=device, dtype=dtype)
    if isinstance(base, nn.Linear):
        return nn.Linear(base.in_features, rank, **options), nn.Linear(rank, base.out_features, **options)
    if base.groups != 1:
        raise ValueError(f"LoRA on grouped convolutions is not supported ({base})")
    conv = type(base)
    down = conv(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation, **options)
    return down, conv(rank, base.out_channels, 1, **options)


class LoRAModule(nn.Module):
    """The LoRA path of one Linear, Conv1d or Conv2d `base`.

    `base` is kept by reference and is not a child module: its weights never appear in this
    module's parameters() or state_dict(). `attach()` patches `base.forward` so that calling
    the base layer (from inside the model) runs `self.forward`; `restore()` undoes that.
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        multiplier: float = 1.0,
        dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        if not isinstance(base, LORA_BASES):
            raise TypeError(f"LoRA needs a Linear or Conv1d/Conv2d base, got {type(base).__name__}")
        object.__setattr__(self, "base", base)  # plain attribute: not registered as a child
        self.rank = rank
        device = base.weight.device if device is None else device
        dtype = torch.float32 if dtype is None else dtype
        self.lora_down, self.lora_up = _rank_layers(base, rank, device, dtype)
        alpha = rank if alpha is None or alpha == 0 else alpha  # kohya: alpha None or 0 means alpha = rank
        self.register_buffer("alpha", torch.tensor(float(alpha), device=device))
        self.multiplier = multiplier
        self.dropout = dropout  # on the rank-r features after lora_down, as kohya's `dropout`
        self.merged_multiplier: float | None = None  # not None while the delta sits inside base.weight
        self.attached = False
        self.reset_parameters()

    def reset_parameters(self):
        if self.lora_down.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={float(self.alpha) if not self.alpha.is_meta else 'meta'}"

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

    # -- math --

    def scale(self) -> Tensor:
        """alpha / rank as a 0-dim tensor (kept a tensor: no host sync in forward)."""
        return self.alpha / self.rank

    def forward(self, x: Tensor) -> Tensor:
        out = self._base_forward(x)
        if self.merged_multiplier is not None or self.multiplier == 0:
            return out  # merged: the base weight already holds the delta
        # The matmuls run in the input's dtype with the (fp32) LoRA weights cast to it, as
        # autocast would: backward then saves the same bf16 x the base layer saves, not an
        # fp32 copy per layer, and the gradients still reach the fp32 weights through the cast.
        h = self._apply(self.lora_down, x)  # (..., rank) or (B, rank, ...) for a convolution
        if self.base.training and self.dropout > 0:  # the model's mode: off in validation and sampling
            h = F.dropout(h, p=self.dropout)
        h = h * (self.scale() * self.multiplier).to(h.dtype)  # scaled at rank width: cheaper than at out width
        h = self._apply(self.lora_up, h)
        return out + h.to(out.dtype)

    @staticmethod
    def _apply(layer: nn.Module, x: Tensor) -> Tensor:
        """The layer with its weight cast to x's dtype (Linear, or a convolution's own geometry)."""
        weight = layer.weight.to(x.dtype)
        if isinstance(layer, nn.Linear):
            return F.linear(x, weight)
        return layer._conv_forward(x, weight, None)

    def delta_weight(self, multiplier: float | None = None) -> Tensor:
        """multiplier * alpha/rank * up @ down, (out, in), fp32."""
        multiplier = self.multiplier if multiplier is None else multiplier
        return lora_delta(self.lora_down.weight, self.lora_up.weight, self.alpha, multiplier)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged_multiplier is not None:
            raise RuntimeError("LoRA is already merged; unmerge() first")
        add_to_weight(self.base, self.delta_weight())
        self.merged_multiplier = self.multiplier

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged_multiplier is None:
            raise RuntimeError("LoRA is not merged")
        add_to_weight(self.base, -self.delta_weight(self.merged_multiplier))
        self.merged_multiplier = None


def lora_delta(down: Tensor, up: Tensor, alpha: Tensor | float, multiplier: float = 1.0) -> Tensor:
    """The weight change of one LoRA module, computed in fp32: (out, rank) @ (rank, in), or for
    a convolution (out, rank, 1, 1) x (rank, in, k, k) -> (out, in, k, k) (the 1x1 up composes
    with the down kernel exactly)."""
    rank = down.shape[0]
    scale = float(alpha) / rank
    delta = up.float().flatten(1) @ down.float().flatten(1)  # (out, in * k * k)
    return delta.reshape(up.shape[0], *down.shape[1:]) * (scale * multiplier)




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


# --- the network ---------------------------------------------------------------------------------


class LoRANetwork(nn.Module):
    """All LoRA modules of a model, keyed by kohya name. Its parameters() are the trainable ones."""

    def __init__(self, loras: dict[str, LoRAModule], module_paths: dict[str, str], prefix: str = "lora_unet"):
        super().__init__()
        self.loras = nn.ModuleDict(loras)
        self.module_paths = dict(module_paths)  # kohya name -> module path in the model
        self.prefix = prefix

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
    ) -> "LoRANetwork":
        """Wrap each target Linear of `model` (module path -> rank; rank 0 is skipped).

        alpha: one for every target, or module path -> alpha (a path it lacks gets alpha =
        rank); None or 0 means alpha = rank (scale 1). LoRA weights are made in `dtype` (default
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
            name = kohya_name(path, prefix)
            path_alpha = alpha.get(path) if isinstance(alpha, dict) else alpha
            loras[name] = LoRAModule(modules[path], rank, path_alpha, dropout, dtype=dtype, device=device)
            paths[name] = path
        network = cls(loras, paths, prefix)
        for lora in network.loras.values():
            lora.attach()
        return network

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
        """`<name>.lora_down.weight`, `<name>.lora_up.weight` in `dtype` (default: as stored) and
        `<name>.alpha` as a 0-dim fp32 tensor (kept exact whatever the weight dtype)."""
        sd = {}
        for name, lora in self.loras.items():
            down, up = lora.lora_down.weight.detach(), lora.lora_up.weight.detach()
            sd[f"{name}.lora_down.weight"] = down if dtype is None else down.to(dtype)
            sd[f"{name}.lora_up.weight"] = up if dtype is None else up.to(dtype)
            sd[f"{name}.alpha"] = lora.alpha.detach().float()
        return sd

    def save(self, path: str | Path, metadata: dict[str, str] | None = None, dtype=torch.bfloat16) -> None:
        """Write a kohya-format safetensors file atomically (temp file, then os.replace)."""
        sd = {k: v.to("cpu").contiguous() for k, v in self.kohya_state_dict(dtype).items()}
        atomic.write_safetensors(sd, path, metadata)

    @torch.no_grad()
    def load_kohya_state_dict(self, sd: dict[str, Tensor], strict: bool = True) -> tuple[list[str], list[str]]:
        """Copy kohya-format tensors into the LoRA modules (resume, continue training).

        A missing `.alpha` means alpha = rank (as ComfyUI and diffusers read such files).
        strict: any missing or unknown key is an error that lists them. Returns (missing, unexpected)."""
        expected = {f"{n}.{part}" for n in self.loras for part in ("lora_down.weight", "lora_up.weight")}
        alphas = {f"{n}.alpha" for n in self.loras}
        missing = sorted(expected - set(sd))
        unexpected = sorted(set(sd) - expected - alphas)
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
            lora.lora_down.weight.copy_(sd[f"{name}.lora_down.weight"].to(lora.lora_down.weight.dtype))
            lora.lora_up.weight.copy_(sd[f"{name}.lora_up.weight"].to(lora.lora_up.weight.dtype))
            lora.alpha.fill_(float(sd.get(f"{name}.alpha", lora.rank)))
        return missing, unexpected

    def _check_shapes(self, sd: dict[str, Tensor]) -> None:
        wrong = []
        for name, lora in self.loras.items():
            for part, param in (("lora_down.weight", lora.lora_down.weight), ("lora_up.weight", lora.lora_up.weight)):
                key = f"{name}.{part}"
                if key in sd and tuple(sd[key].shape) != tuple(param.shape):
                    wrong.append(f"{key}: file {tuple(sd[key].shape)} vs network {tuple(param.shape)}")
        if wrong:
            raise ValueError(
                f"LoRA shapes differ (a different rank or model size?): {_shorten(wrong, 6)}. "
                "Build the network with the file's ranks (targets_from_state_dict)."
            )


# --- writing files -------------------------------------------------------------------------------

LORA_FORMATS = ("kohya", "diffusers")  # config key lora_format


def diffusers_state_dict(network: LoRANetwork, family, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The network in diffusers / PEFT names, as diffusers' `load_lora_weights` reads them (and
    ComfyUI, and load_lora_file here): per diffusers module the family names
    (`family.lora_to_diffusers`), `<module>.lora_A.weight` (rank, in) and `<module>.lora_B.weight`
    (its rows of lora_up, rank). A fused weight (q, k, v) becomes one module per slice, all with the
    same lora_A. The format has no alpha (its readers take alpha = rank), so alpha / rank is folded
    into lora_A: every reader applies the same delta."""
    sd = {}
    for name, lora in network.loras.items():
        down = lora.lora_down.weight.detach().float() * (float(lora.alpha) / lora.rank)
        modules = family.lora_to_diffusers(network.module_paths[name], lora.lora_up.weight.detach().float(), down)
        for module, up in modules.items():  # each tensor its own storage (safetensors refuses shared ones)
            a = down.flatten(1) if up.ndim == 2 else down  # a diffusers Linear for a 1-wide conv (IF's qkv)
            sd[f"{module}.lora_A.weight"] = a.to(dtype or down.dtype, copy=True)
            sd[f"{module}.lora_B.weight"] = up.to(dtype or up.dtype, copy=True)
    return sd


def save_lora(network: LoRANetwork, path: str | Path, metadata: dict[str, str] | None, dtype: torch.dtype,
              family, lora_format: str = "kohya") -> None:
    """Write the network's file atomically in `lora_format`: "kohya" (LoRANetwork.save) or
    "diffusers" (diffusers_state_dict, for families whose kohya names diffusers cannot read)."""
    if lora_format == "kohya":
        network.save(path, metadata, dtype=dtype)
        return
    if lora_format != "diffusers":
        raise ValueError(f"lora_format={lora_format!r}: choose one of {LORA_FORMATS}")
    sd = {k: v.to("cpu").contiguous() for k, v in diffusers_state_dict(network, family, dtype).items()}
    atomic.write_safetensors(sd, path, metadata)


# --- reading files -------------------------------------------------------------------------------

LORA_SUFFIXES = {  # how each format names the two matrices and alpha
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".alpha": "alpha",
}
NATIVE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # the checkpoint's own module names
DIFFUSERS_PREFIXES = ("transformer.base_model.model.", "base_model.model.", "transformer.", "unet.")
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "text_encoders.")


def load_lora_file(path: str | Path, family) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors (in kohya form) and header metadata of a LoRA file for `family` (families/).

    kohya files pass through unchanged. Files in the checkpoint's own names
    (`diffusion_model.<path>.lora_A.weight`) and diffusers / PEFT files
    (`transformer.transformer_blocks.N.attn.to_q.lora_A.weight`) are converted: split q/k/v (and
    the like) are fused back into the checkpoint's fused weight with a block-diagonal lora_up;
    alpha = rank unless the file says otherwise (diffusers' `lora_adapter_metadata`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: LoRA files are read from .safetensors only")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata() or {}
    return to_kohya(sd, family, metadata), metadata


def to_kohya(sd: dict[str, Tensor], family, metadata: dict[str, str] | None = None) -> dict[str, Tensor]:
    """Any supported LoRA state dict of `family` -> kohya form (see load_lora_file)."""
    if all(k.startswith(("lora_unet_", "lora_te")) for k in sd):
        return dict(sd)  # kohya
    text_encoder = sorted(k for k in sd if k.startswith(TEXT_ENCODER_PREFIXES))
    if text_encoder:
        warnings.warn(
            f"ignoring {len(text_encoder)} text-encoder tensors of a non-kohya LoRA: {_shorten(text_encoder, 3)}"
        )
    modules = _group_by_module({k: v for k, v in sd.items() if not k.startswith(TEXT_ENCODER_PREFIXES)})
    alphas = _peft_alphas(metadata or {})
    fused: dict[str, dict[int, dict[str, Tensor]]] = {}  # native path -> slice index -> parts
    out = {}
    for module, parts in modules.items():
        if "down" not in parts or "up" not in parts:
            raise ValueError(f"LoRA module {module!r} lacks its down (lora_A) or up (lora_B) matrix")
        if "alpha" not in parts:
            parts["alpha"] = torch.tensor(alphas(module, parts["down"].shape[0]))
        path, index = _native_path(module, family)
        if index is None:
            out.update(_kohya_entry(path, parts, family))
        else:
            fused.setdefault(path, {})[index] = parts
    for path, slices in fused.items():
        out.update(_kohya_entry(path, _fuse_slices(path, slices, family), family))
    return out


def _group_by_module(sd: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """{'<module>.lora_A.weight': t, ...} -> {'<module>': {'down': t, 'up': t, 'alpha': t}}."""
    modules: dict[str, dict[str, Tensor]] = {}
    unreadable = []
    for key, value in sd.items():
        key = key.replace(".default.", ".")  # PEFT adapter name
        suffix = next((s for s in LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            unreadable.append(key)
            continue
        modules.setdefault(key[: -len(suffix)], {})[LORA_SUFFIXES[suffix]] = value
    if unreadable:
        raise ValueError(f"unsupported tensors in the LoRA file (not LoRA up/down/alpha): {_shorten(unreadable)}")
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


def _kohya_entry(path: str, parts: dict[str, Tensor], family) -> dict[str, Tensor]:
    up = family.lora_up_from_diffusers(path, parts["up"], parts["down"])
    down = family.lora_down_from_diffusers(path, parts["down"])
    name = kohya_name(path, family.lora_prefix)
    alpha = parts["alpha"].detach().float().reshape(())
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": alpha}


def _fuse_slices(path: str, slices: dict[int, dict[str, Tensor]], family) -> dict[str, Tensor]:
    """LoRAs of the row slices of one fused weight (q, k, v, ...) -> one LoRA of the whole weight.

    Each slice's scale alpha_i/r_i is folded into its down, so the fused alpha is the fused rank
    (scale 1). When every slice has the same down and scale (a fused LoRA split by a converter),
    the shared down is kept and the ups are stacked; otherwise the downs are stacked and the up
    is block-diagonal, zero where a slice is absent."""
    any_down = next(iter(slices.values()))["down"]
    sizes = family.lora_slice_sizes(path, any_down, slices)
    dtype = torch.promote_types(any_down.dtype, torch.float32)
    scaled = {i: p["down"].to(dtype) * (float(p["alpha"]) / p["down"].shape[0]) for i, p in slices.items()}
    if len(slices) == len(sizes) and all(torch.equal(d, scaled[0]) for d in scaled.values()):
        up = torch.cat([slices[i]["up"].to(dtype) for i in range(len(sizes))])
        return {"down": scaled[0], "up": up, "alpha": torch.tensor(float(scaled[0].shape[0]))}
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
    return {"down": down, "up": up, "alpha": torch.tensor(float(down.shape[0]))}


def _peft_alphas(metadata: dict[str, str]):
    """alpha for a diffusers module from diffusers' `lora_adapter_metadata` header (PEFT config);
    without it alpha = rank, which is how diffusers and ComfyUI read such a file."""
    config = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    config = {k.removeprefix("transformer."): v for k, v in config.items()}
    lora_alpha, pattern = config.get("lora_alpha"), config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))

    def alpha(module: str, rank: int) -> float:
        name = module
        for prefix in DIFFUSERS_PREFIXES + NATIVE_PREFIXES:
            name = name.removeprefix(prefix)
        value = next((a for p, a in pattern.items() if re.fullmatch(rf"(.*\.)?({p})", name)), lora_alpha)
        if value is None:
            return float(rank)
        # PEFT scales by alpha/r (or alpha/sqrt(r) with rsLoRA); kohya always by alpha/r.
        return float(value) * math.sqrt(rank) if rslora else float(value)

    return alpha


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
            f"{len(others)} LoRA modules are not for this model (text encoders?) and are skipped: "
            f"{_shorten(others, 3)}"
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
    network = LoRANetwork.inject(model, targets, dtype=_inference_dtype(model, targets), prefix=prefix)
    network.load_kohya_state_dict(sd)
    network.set_multiplier(multiplier)
    network.eval()
    return network


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
        alpha = sd.get(f"{name}.alpha", down.shape[0])
        device = layer.weight.device
        add_to_weight(layer, lora_delta(down.to(device), up.to(device), alpha, multiplier))


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
