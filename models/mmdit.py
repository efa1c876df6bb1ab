"""SD3 / SD3.5 MMDiT (and SD3.5 Medium's MMDiT-X) with the module names of the reference code
(Stability-AI/sd3.5: mmditx.py, sd3_impls.py), so that sd3_medium*.safetensors,
sd3.5_medium.safetensors and sd3.5_large.safetensors load with strict=True from their
`model.diffusion_model.` section.

Shapes: B batch, C latent channels (16), H x W latent pixels, p patch (2), h x w = H/p x W/p
patches, L = h*w image tokens, T context tokens, D hidden width = 64 * depth, heads = depth
(head dim 64). The network takes a latent (B, 16, H, W), t = sigma * 1000 (B,), the pooled
text vector y (B, 2048) and the text context (B, T, 4096), and returns (B, 16, H, W).

LayerNorms without affine weights (norm1, norm2, norm_final: eps 1e-6) hold no parameters,
so they are not modules here; they run inside `norm_modulate`.
"""
import math
import re
from dataclasses import dataclass, replace

import torch
from einops import rearrange
from torch import Tensor, nn

from .layers import (
    attention,
    gated_residual,
    gated_residual_norm_modulate,
    gelu_tanh,
    norm_modulate,
    qk_norm_rope,
    rms_norm,
    sincos_pos_embed_2d,
    timestep_embedding,
)
from .loading import check_family, load_into, load_state_dict, strip_prefix


@dataclass
class MMDiTParams:
    """The reference's MMDiTX arguments (kohya-ss/sd-scripts SD3Params names), all read from the
    shapes of a checkpoint, plus two multi-resolution training options that are not."""

    depth: int = 24  # joint blocks; hidden = 64 * depth, heads = depth
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    pos_embed_max_size: int = 192  # P: pos_embed is a P x P grid (SD3.5 Medium: 384)
    adm_in_channels: int = 2048  # pooled CLIP-L + CLIP-G
    context_embedder_in_features: int = 4096  # T5-XXL width
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_norm: str | None = None  # "rms" for SD3.5, None for SD3
    x_block_self_attn_layers: tuple[int, ...] = ()  # MMDiT-X attn2 (SD3.5 Medium: 0..12)
    # Training options (kohya-ss/sd-scripts --pos_emb_random_crop_rate, --enable_scaled_pos_embed)
    pos_emb_random_crop_rate: float = 0.0
    enable_scaled_pos_embed: bool = False
    pos_embed_latent_sizes: tuple[int, ...] = ()  # latent sizes (pixels / 8) of the training buckets

    @property
    def hidden_size(self) -> int:
        return 64 * self.depth  # the reference's "magic": head dim 64

    @property
    def num_heads(self) -> int:
        return self.depth


class RMSNorm(nn.Module):
    """QK RMSNorm over the head dim (eps 1e-6); the reference names its parameter `weight`."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class SelfAttention(nn.Module):
    """qkv (rows [q | k | v], heads inside each), optional QK RMSNorm, proj (absent when pre_only)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, pre_only: bool = False, qk_norm: str | None = None):
        super().__init__()
        if qk_norm not in (None, "rms"):
            raise ValueError(f"qk_norm must be 'rms' or None (the released models), got {qk_norm!r}")
        self.num_heads = num_heads
        self.qk_norm = qk_norm
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)
        if qk_norm == "rms":
            self.ln_q = RMSNorm(dim // num_heads)
            self.ln_k = RMSNorm(dim // num_heads)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, D) -> q, k, v (B, heads, L, 64), q and k normed when qk_norm is set."""
        q, k, v = rearrange(self.qkv(x), "B L (K H d) -> K B H L d", K=3, H=self.num_heads)
        if self.qk_norm:
            q, k = qk_norm_rope(q, k, self.ln_q.weight, self.ln_k.weight, pe=None)  # no RoPE in SD3
        return q.to(v.dtype), k.to(v.dtype), v


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 (other_impls.Mlp)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


class DismantledBlock(nn.Module):
    """One stream's half of a joint block: modulation, q/k/v for the joint attention, and the
    update after it. adaLN_modulation chunks, each (B, 1, D):
        6: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
        9: the 6, then shift_msa2, scale_msa2, gate_msa2 (x_block with attn2, MMDiT-X)
        2: shift_msa, scale_msa (pre_only: the last context block, whose output is dropped)"""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, pre_only: bool,
                 qk_norm: str | None, x_block_self_attn: bool = False):
        super().__init__()
        if pre_only and x_block_self_attn:
            raise ValueError("a pre_only block cannot have attn2")
        self.pre_only = pre_only
        self.x_block_self_attn = x_block_self_attn
        self.attn = SelfAttention(dim, num_heads, qkv_bias, pre_only=pre_only, qk_norm=qk_norm)
        if x_block_self_attn:
            self.attn2 = SelfAttention(dim, num_heads, qkv_bias, qk_norm=qk_norm)
        if not pre_only:
            self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.n_mods = 9 if x_block_self_attn else 2 if pre_only else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, self.n_mods * dim))

    def pre_attention(self, x: Tensor, c: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, ...]]:
        """x (B, L, D), c (B, D) -> this stream's q, k, v (B, heads, L, 64) and its modulation chunks."""
        mods = self.adaLN_modulation(c)[:, None, :].chunk(self.n_mods, dim=-1)
        shift_msa, scale_msa = mods[:2]
        return self.attn.qkv_heads(norm_modulate(x, shift_msa, scale_msa)), mods

    def post_attention(self, x: Tensor, attn: Tensor, mods: tuple[Tensor, ...]) -> Tensor:
        """x (B, L, D) the block input, attn (B, L, D) this stream's rows of the joint attention."""
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        if self.x_block_self_attn:
            # attn2: self-attention over the image tokens alone, on the same LN(x) modulated by
            # its own shift/scale; both attention outputs are added before the MLP.
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            attn2 = attention(*self.attn2.qkv_heads(norm_modulate(x, shift_msa2, scale_msa2)))
            x = gated_residual(x, gate_msa, self.attn.proj(attn))
            x, mlp_in = gated_residual_norm_modulate(x, gate_msa2, self.attn2.proj(attn2), shift_mlp, scale_mlp)
        else:
            x, mlp_in = gated_residual_norm_modulate(x, gate_msa, self.attn.proj(attn), shift_mlp, scale_mlp)
        return gated_residual(x, gate_mlp, self.mlp(mlp_in))


class JointBlock(nn.Module):
    """context_block and x_block with one attention over [context, x] (`block_mixing`)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, pre_only: bool,
                 qk_norm: str | None, x_block_self_attn: bool):
        super().__init__()
        self.context_block = DismantledBlock(dim, num_heads, mlp_ratio, qkv_bias, pre_only, qk_norm)
        self.x_block = DismantledBlock(dim, num_heads, mlp_ratio, qkv_bias, False, qk_norm, x_block_self_attn)

    def forward(self, context: Tensor, x: Tensor, c: Tensor) -> tuple[Tensor | None, Tensor]:
        """context (B, T, D), x (B, L, D), c (B, D) -> (context or None after the pre_only block, x)."""
        context_qkv, context_mods = self.context_block.pre_attention(context, c)
        x_qkv, x_mods = self.x_block.pre_attention(x, c)
        q, k, v = (torch.cat(pair, dim=2) for pair in zip(context_qkv, x_qkv))  # (B, heads, T + L, 64)
        attn = attention(q, k, v)  # (B, T + L, D)
        context_len = context.shape[1]
        context_attn, x_attn = attn[:, :context_len], attn[:, context_len:]
        if self.context_block.pre_only:
            context = None
        else:
            context = self.context_block.post_attention(context, context_attn, context_mods)
        return context, self.x_block.post_attention(x, x_attn, x_mods)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, h*w, D) tokens, row-major, by a p x p stride-p conv."""

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return rearrange(self.proj(x), "B D h w -> B (h w) D")


class Embedder(nn.Module):
    """Linear -> SiLU -> Linear as `mlp.{0,2}` (the reference's TimestepEmbedder / VectorEmbedder)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None, :].chunk(2, dim=-1)  # (shift, scale) order
        return self.linear(norm_modulate(x, shift, scale))  # (B, L, p*p*C), channels (p, q, c)


# --- positional embedding ------------------------------------------------------------------------

POS_EMBED_MAX_RATIO = 1.5  # kohya: a scaled table is 1.5 x its bucket's patched size per side
SCALED_POS_EMBED_BASE = 16  # kohya's base_size: every bucket's centre window spans [0, 16)


def crop_pos_embed(table: Tensor, grid: int, h: int, w: int, top: int, left: int) -> Tensor:
    """(1, grid*grid, D) row-major table -> (1, h*w, D): rows top.., columns left.., row-major."""
    spatial = rearrange(table, "1 (gh gw) D -> gh gw D", gh=grid, gw=grid)
    return rearrange(spatial[top : top + h, left : left + w], "h w D -> 1 (h w) D")


def crop_offsets(grid: int, h: int, w: int, random_crop: bool, generator: torch.Generator | None) -> tuple[int, int]:
    """(top, left) of an h x w window in a grid x grid table: centred (the reference), or uniform
    over every position that fits (kohya's random crop), drawn from `generator` (a CPU generator;
    None = torch's global CPU RNG)."""
    if h > grid or w > grid:
        raise ValueError(
            f"a {h} x {w} patch grid does not fit the {grid} x {grid} positional embedding: "
            f"the latent is at most {grid} patches per side for this model"
        )
    if not random_crop:
        return (grid - h) // 2, (grid - w) // 2
    top = int(torch.randint(0, grid - h + 1, (1,), generator=generator))
    left = int(torch.randint(0, grid - w + 1, (1,), generator=generator))
    return top, left


def scaled_pos_embed_table(dim: int, patched_size: int) -> Tensor:
    """kohya-ss/sd-scripts `get_scaled_2d_sincos_pos_embed` (by KohakuBlueleaf) for an S x S
    bucket, S = patched_size: a G x G table, G = int(1.5 S), whose coordinates step by 16/S and
    whose centre S x S window spans [0, 16). Every bucket thus sees the same coordinate range
    whatever its resolution, sampled more finely when it is larger. (1, G*G, dim) float32, CPU."""
    grid = int(patched_size * POS_EMBED_MAX_RATIO)
    scale = SCALED_POS_EMBED_BASE * grid / patched_size
    shift = scale * (grid - patched_size) / (2 * grid)
    coords = torch.arange(grid, dtype=torch.float32, device="cpu") / grid * scale - shift  # fp32, as kohya's numpy
    return sincos_pos_embed_2d(dim, coords, coords).float()[None]


def scaled_pos_embed_bounds(latent_sizes, patch_size: int) -> list[tuple[int, int]]:
    """kohya's table choice: (largest h*w, patched bucket size), ascending. An h x w grid takes the
    first bucket whose bound holds h*w: half-way between consecutive squared sizes, then
    (1.5 x the largest)^2."""
    patched = sorted({size // patch_size for size in latent_sizes})
    bounds = [(a * a + b * b) // 2 for a, b in zip(patched, patched[1:])]
    bounds.append(int((patched[-1] * POS_EMBED_MAX_RATIO) ** 2))
    return list(zip(bounds, patched))


# --- the network ---------------------------------------------------------------------------------


class MMDiT(nn.Module):
    """The SD3 / SD3.5 diffusion transformer (the reference's MMDiTX).

    `joint_blocks` are the repeated blocks (each `block(context, x, c) -> (context, x)`); gradient
    checkpointing, block swap and LoRA act on them from outside.

    Multi-resolution training options (kohya-ss/sd-scripts, meant for SD3.5 Medium), off by default:
    - `pos_emb_random_crop_rate`: in training mode (`model.train()`), with this probability per
      forward the whole batch takes a random crop of the positional table instead of the centre
      crop. kohya also does it in eval; here eval (sampling, validation) always centres. The draws
      come from `pos_emb_generator` (a CPU torch.Generator; None = torch's global CPU RNG, which
      the trainer's resume state restores). With rate 0 nothing is drawn.
    - scaled positional embeddings (`enable_scaled_pos_embed(latent_sizes)`, or the params
      `enable_scaled_pos_embed` + `pos_embed_latent_sizes`): each bucket size gets its own sin-cos
      table (see `scaled_pos_embed_table`) in place of the checkpoint's `pos_embed`, which stays
      in the state dict unchanged.
    """

    def __init__(self, params: MMDiTParams):
        super().__init__()
        self.params = p = params
        dim, heads = p.hidden_size, p.num_heads
        self.patch_size = p.patch_size
        self.out_channels = p.out_channels
        self.x_embedder = PatchEmbed(p.patch_size, p.in_channels, dim)
        self.t_embedder = Embedder(256, dim)
        self.y_embedder = Embedder(p.adm_in_channels, dim)
        self.context_embedder = nn.Linear(p.context_embedder_in_features, dim)
        # fixed 2-D sin-cos table, stored in the checkpoint (filled when loading)
        self.register_buffer("pos_embed", torch.zeros(1, p.pos_embed_max_size**2, dim))
        self.joint_blocks = nn.ModuleList(
            JointBlock(dim, heads, p.mlp_ratio, p.qkv_bias, pre_only=i == p.depth - 1, qk_norm=p.qk_norm,
                       x_block_self_attn=i in p.x_block_self_attn_layers)
            for i in range(p.depth)
        )
        self.final_layer = FinalLayer(dim, p.patch_size, p.out_channels)
        self.pos_emb_random_crop_rate = p.pos_emb_random_crop_rate
        self.pos_emb_generator: torch.Generator | None = None
        if p.enable_scaled_pos_embed and not p.pos_embed_latent_sizes:
            raise ValueError("enable_scaled_pos_embed needs pos_embed_latent_sizes: the latent sizes of the buckets")
        self.enable_scaled_pos_embed(p.pos_embed_latent_sizes if p.enable_scaled_pos_embed else None)

    def enable_scaled_pos_embed(self, latent_sizes) -> None:
        """Scaled positional tables for these latent sizes (latent pixels, e.g. 1024 px -> 128;
        kohya: round(sqrt(width * height)) // 8 per bucket); None or empty turns them off."""
        sizes = tuple(sorted(set(latent_sizes or ())))
        self.params = replace(self.params, enable_scaled_pos_embed=bool(sizes), pos_embed_latent_sizes=sizes)
        self.scaled_pos_embed_bounds = scaled_pos_embed_bounds(sizes, self.patch_size) if sizes else None
        self.scaled_pos_embeds: dict[int, Tensor] = {}  # patched size -> table; not in the state dict

    def scaled_pos_embed(self, h: int, w: int, device) -> tuple[Tensor, int]:
        """The scaled table for an h x w patch grid and its side, built on first use."""
        bounds = self.scaled_pos_embed_bounds
        size = next((s for bound, s in bounds if h * w <= bound), bounds[-1][1])
        if max(h, w) > int(size * POS_EMBED_MAX_RATIO):  # too tall or wide for its bucket: a larger
            size = max(h, w)  # table, which later grids of up to its area also use (as kohya)
            entry = (int(size * POS_EMBED_MAX_RATIO) ** 2, size)
            if entry not in bounds:
                self.scaled_pos_embed_bounds = sorted(bounds + [entry])
        table = self.scaled_pos_embeds.get(size)
        if table is None or table.device != torch.device(device):
            table = self.scaled_pos_embeds[size] = scaled_pos_embed_table(self.params.hidden_size, size).to(device)
        return table, int(size * POS_EMBED_MAX_RATIO)

    def cropped_pos_embed(self, h: int, w: int, random_crop: bool = False,
                          generator: torch.Generator | None = None) -> Tensor:
        """(1, h*w, D) positions for an h x w patch grid: a window of `pos_embed` (P x P), or of
        the scaled table when those are on; centred unless random_crop."""
        if self.scaled_pos_embed_bounds:
            table, grid = self.scaled_pos_embed(h, w, self.pos_embed.device)
        else:
            table, grid = self.pos_embed, self.params.pos_embed_max_size
        top, left = crop_offsets(grid, h, w, random_crop, generator)
        return crop_pos_embed(table, grid, h, w, top, left)

    def _draw_random_crop(self) -> bool:
        rate = self.pos_emb_random_crop_rate
        if not (self.training and rate > 0):
            return False
        return torch.rand(1, generator=self.pos_emb_generator).item() < rate

    def forward(self, x: Tensor, t: Tensor, y: Tensor, context: Tensor, skip_layers=()) -> Tensor:
        """x (B, C, H, W) latent, t (B,) = sigma * 1000, y (B, adm) pooled text, context (B, T, 4096)
        -> (B, out_channels, H, W). `skip_layers`: indices of joint blocks to leave out
        (skip-layer guidance, sd3_infer.py)."""
        height, width = x.shape[-2:]
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {height} x {width} must be a multiple of the patch size {p}")
        h, w = height // p, width // p
        unknown = set(skip_layers) - set(range(len(self.joint_blocks)))
        if unknown:
            raise ValueError(f"skip_layers {sorted(unknown)} are not joint block indices (0..{len(self.joint_blocks) - 1})")

        pos = self.cropped_pos_embed(h, w, self._draw_random_crop(), self.pos_emb_generator)
        x = self.x_embedder(x)  # (B, L, D)
        x = x + pos.to(x.dtype)
        c = self.t_embedder(timestep_embedding(t, 256, time_factor=1.0).to(x.dtype))  # t is already sigma * 1000
        c = c + self.y_embedder(y)  # (B, D)
        context = self.context_embedder(context)  # (B, T, D)
        for i, block in enumerate(self.joint_blocks):
            if i in skip_layers:
                continue
            context, x = block(context, x, c)
        x = self.final_layer(x, c)  # (B, L, p*p*C)
        return rearrange(x, "B (h w) (p q C) -> B C (h p) (w q)", h=h, w=w, p=p, q=p)

    @classmethod
    def from_state_dict(cls, sd: dict, dtype: torch.dtype | None = None, device=None, **overrides) -> "MMDiT":
        """Build from an SD3 / SD3.5 state dict: an all-in-one file (only `model.diffusion_model.`
        is read; `first_stage_model.` and `text_encoders.` are left to their own loaders) or the
        transformer alone. Built on the meta device, tensors assigned, not copied. `dtype` converts
        on the way in (None keeps the file's; fp8 is upcast to bf16). Any MMDiTParams field can be
        overridden, e.g. pos_emb_random_crop_rate=0.2."""
        sd, _ = strip_prefix(sd, PREFIXES)
        params = infer_params(sd, **overrides)
        with torch.device("meta"):
            model = cls(params)
        load_into(model, sd, dtype=dtype, device=device, what="SD3 MMDiT")
        return model


def load(path, dtype: torch.dtype | None = None, device=None, allow_pickle: bool = False, **overrides) -> MMDiT:
    """MMDiT from a file, a sharded index or a folder (memory-mapped; see models/loading.py)."""
    return MMDiT.from_state_dict(load_state_dict(path, allow_pickle=allow_pickle), dtype=dtype, device=device,
                                 **overrides)


PREFIXES = ("model.diffusion_model.", "diffusion_model.")
REQUIRED_KEYS = ("x_embedder.proj.weight", "pos_embed", "y_embedder.mlp.0.weight", "context_embedder.weight",
                 "joint_blocks.0.x_block.attn.qkv.weight", "final_layer.linear.weight")


def _block_indices(sd: dict, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd if (m := regex.match(k))})


def infer_params(sd: dict, **overrides) -> MMDiTParams:
    """MMDiTParams from the keys and shapes of a checkpoint, as sd3_impls.BaseModel reads them."""
    sd, _ = strip_prefix(sd, PREFIXES)
    if any(k.startswith("transformer_blocks.") for k in sd):
        raise ValueError("this is a diffusers-format SD3 transformer (transformer_blocks.* keys); give the "
                         "original single file (sd3_medium*.safetensors, sd3.5_*.safetensors) instead")
    check_family(sd, "sd3", required=REQUIRED_KEYS)
    hidden, in_channels, patch = sd["x_embedder.proj.weight"].shape[:3]
    depth = hidden // 64
    blocks = _block_indices(sd, r"^joint_blocks\.(\d+)\.")
    if hidden % 64 or blocks != list(range(depth)):
        raise ValueError(f"SD3 MMDiT: width {hidden} should be 64 x the {len(blocks)} joint blocks "
                         f"(indices {blocks[:3]}...{blocks[-3:]})")
    num_patches = sd["pos_embed"].shape[1]
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(f"SD3 MMDiT: pos_embed has {num_patches} positions, not a square grid")
    params = MMDiTParams(
        depth=depth,
        patch_size=patch,
        in_channels=in_channels,
        out_channels=sd["final_layer.linear.weight"].shape[0] // (patch * patch),
        pos_embed_max_size=grid,
        adm_in_channels=sd["y_embedder.mlp.0.weight"].shape[1],
        context_embedder_in_features=sd["context_embedder.weight"].shape[1],
        mlp_ratio=sd["joint_blocks.0.x_block.mlp.fc1.weight"].shape[0] / hidden,
        qkv_bias="joint_blocks.0.x_block.attn.qkv.bias" in sd,
        qk_norm="rms" if "joint_blocks.0.x_block.attn.ln_k.weight" in sd else None,
        x_block_self_attn_layers=tuple(_block_indices(sd, r"^joint_blocks\.(\d+)\.x_block\.attn2\.qkv\.weight$")),
    )
    return replace(params, **overrides)
