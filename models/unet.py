"""The SDXL UNet with the module names of the reference code (Stability-AI/generative-models:
sgm/modules/diffusionmodules/openaimodel.py `UNetModel`, sgm/modules/attention.py
`SpatialTransformer`), so that the `model.diffusion_model.*` part of sd_xl_base_1.0.safetensors
and of the single-file fine-tunes built on it loads with strict=True and no renaming.

    time_embed.{0,2}          Linear mc -> 4mc, SiLU, Linear (on a [cos | sin] embedding of t)
    label_emb.0.{0,2}         Linear adm -> 4mc, SiLU, Linear (on y, the 2816-wide vector)
    input_blocks.{i}          conv_in; per level: ResBlock (+ SpatialTransformer); Downsample `op`
    middle_block.{0,1,2}      ResBlock, SpatialTransformer, ResBlock
    output_blocks.{i}         per level, deepest first: ResBlock on [h | skip] (+ ST) (+ Upsample `conv`)
    out.{0,2}                 GroupNorm, SiLU, conv -> out_channels

SDXL base: model channels 320, channel_mult [1, 2, 4], 2 ResBlocks per level, transformer
depth [0, 2, 10] (no attention at level 0), 64 channels per head, context 2048, adm 2816.

Shapes: B batch, C channels, h x w latent (1/8 of the image), L = h*w tokens, T text tokens.
The timesteps are integer DDPM indices 0..999 (no x1000 as in FLUX).
"""
import re
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .layers import attention, geglu, timestep_embedding
from .loading import check_family, load_into, load_state_dict, strip_prefix


@dataclass
class UNetParams:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4])
    num_res_blocks: list[int] = field(default_factory=lambda: [2, 2, 2])  # per level
    # SpatialTransformer depth per level; 0 = no attention at that level. sgm spells SDXL's as
    # attention_resolutions [4, 2] (downsampling factors 2**level) with transformer_depth [1, 2, 10].
    transformer_depth: list[int] = field(default_factory=lambda: [0, 2, 10])
    transformer_depth_middle: int = 10
    context_dim: int = 2048
    adm_in_channels: int = 2816
    num_head_channels: int = 64  # not in the shapes: heads = channels // num_head_channels

    @property
    def attention_resolutions(self) -> list[int]:
        """The sgm field: the downsampling factors at which SpatialTransformers sit."""
        return [2**level for level, depth in enumerate(self.transformer_depth) if depth > 0]


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 and cast back (sgm `normalization`: 32 groups, eps 1e-5)."""

    def __init__(self, channels: int):
        super().__init__(num_groups=32, num_channels=channels, eps=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.weight.float(), self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


class ResBlock(nn.Module):
    """GN-SiLU-conv, plus the projected time embedding, GN-SiLU-conv, plus a skip (a 1x1 conv
    when the width changes). use_scale_shift_norm=False in SDXL: the embedding is added."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, kernel_size=3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Identity(),  # dropout (p = 0) in the reference: keeps the conv at index 3
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]  # (B, C) over h x w
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """3x3 conv with stride 2 and symmetric padding 1 (unlike the VAE's asymmetric pad)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class CrossAttention(nn.Module):
    """Multi-head attention of x (B, L, C) over context (B, T, context_dim), or over x itself
    when context is None. q, k, v without bias; to_out.0 with bias."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Identity())  # index 1: dropout (p = 0)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        q, k, v = (
            rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (self.to_q(x), self.to_k(context), self.to_v(context))
        )
        return self.to_out(attention(q, k, v))  # attention returns (B, L, heads * dim_head)


class GEGLU(nn.Module):
    """proj: C -> 2 * inner, chunked as (x, gate) -> x * GELU(gate) (exact erf GELU)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        return geglu(self.proj(x))


class FeedForward(nn.Module):
    """net.0 GEGLU C -> 4C, net.1 dropout (p = 0), net.2 Linear 4C -> C."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Identity(), nn.Linear(inner_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, GEGLU feed-forward; LayerNorm eps 1e-5."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head)  # self-attention
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim=context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """GroupNorm (eps 1e-6), Linear proj_in on the h*w tokens, `depth` transformer blocks,
    Linear proj_out, back to (B, C, h, w), plus the input (use_linear_in_transformer=True)."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int):
        super().__init__()
        inner_dim = heads * dim_head
        self.norm = nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner_dim)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner_dim, heads, dim_head, context_dim) for _ in range(depth)]
        )
        self.proj_out = nn.Linear(inner_dim, channels)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        height, width = x.shape[2:]
        h = self.proj_in(rearrange(self.norm(x), "b c h w -> b (h w) c"))
        for block in self.transformer_blocks:
            h = block(h, context)
        h = rearrange(self.proj_out(h), "b (h w) c -> b c h w", h=height, w=width)
        return h + x


class TimestepEmbedSequential(nn.Sequential):
    """One input / middle / output block: its layers in order, each given what it takes
    (ResBlocks the embedding, SpatialTransformers the context, the rest only h)."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """The SDXL denoiser: eps prediction for x (B, 4, h, w) at integer timesteps.

    `input_blocks`, `middle_block` and `output_blocks` are the repeated blocks, each called as
    `block(h, emb, context)`; checkpointing, block swap and LoRA act on them from outside."""

    def __init__(self, params: UNetParams):
        super().__init__()
        p = self.params = params
        _check_params(p)
        emb_dim = 4 * p.model_channels
        mc = p.model_channels
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # num_classes="sequential" in sgm: one Sequential nested in another
        self.label_emb = nn.Sequential(
            nn.Sequential(nn.Linear(p.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        )
        self.input_blocks, skip_widths = self._build_input_blocks(emb_dim)
        width = mc * p.channel_mult[-1]
        self.middle_block = TimestepEmbedSequential(
            ResBlock(width, emb_dim, width),
            self._transformer(width, p.transformer_depth_middle),
            ResBlock(width, emb_dim, width),
        )
        self.output_blocks = self._build_output_blocks(emb_dim, skip_widths)
        self.out = nn.Sequential(GroupNorm32(mc), nn.SiLU(), nn.Conv2d(mc, p.out_channels, kernel_size=3, padding=1))

    def _transformer(self, channels: int, depth: int) -> SpatialTransformer:
        heads = channels // self.params.num_head_channels
        return SpatialTransformer(channels, heads, self.params.num_head_channels, depth, self.params.context_dim)

    def _build_input_blocks(self, emb_dim: int) -> tuple[nn.ModuleList, list[int]]:
        """conv_in, then per level num_res_blocks x [ResBlock (+ ST)] and a Downsample (all but
        the deepest level). Also returns the width of every block's output: the skips."""
        p = self.params
        blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(p.in_channels, p.model_channels, 3, padding=1))])
        widths = [p.model_channels]
        width = p.model_channels
        for level, mult in enumerate(p.channel_mult):
            for _ in range(p.num_res_blocks[level]):
                layers = [ResBlock(width, emb_dim, mult * p.model_channels)]
                width = mult * p.model_channels
                if p.transformer_depth[level]:
                    layers.append(self._transformer(width, p.transformer_depth[level]))
                blocks.append(TimestepEmbedSequential(*layers))
                widths.append(width)
            if level != len(p.channel_mult) - 1:
                blocks.append(TimestepEmbedSequential(Downsample(width)))
                widths.append(width)
        return blocks, widths

    def _build_output_blocks(self, emb_dim: int, skip_widths: list[int]) -> nn.ModuleList:
        """Per level, deepest first, num_res_blocks + 1 x [ResBlock on [h | skip] (+ ST)], the
        last of each level but level 0 ending with an Upsample. Skips are taken last-in first-out."""
        p = self.params
        skip_widths = list(skip_widths)
        blocks = nn.ModuleList()
        width = p.model_channels * p.channel_mult[-1]
        for level in reversed(range(len(p.channel_mult))):
            for i in range(p.num_res_blocks[level] + 1):
                layers = [ResBlock(width + skip_widths.pop(), emb_dim, p.model_channels * p.channel_mult[level])]
                width = p.model_channels * p.channel_mult[level]
                if p.transformer_depth[level]:
                    layers.append(self._transformer(width, p.transformer_depth[level]))
                if level and i == p.num_res_blocks[level]:
                    layers.append(Upsample(width))
                blocks.append(TimestepEmbedSequential(*layers))
        return blocks

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor) -> Tensor:
        """x (B, in, h, w), timesteps (B,) integer indices 0..999, context (B, T, context_dim),
        y (B, adm) = [pooled text | size_embedding(...)] -> (B, out, h, w); h, w multiples of 4
        for SDXL's two downsamplings (2**(levels-1) in general). x, context and y in the weights'
        dtype; the timestep embedding is made in fp32 and cast here."""
        t_emb = timestep_embedding(timesteps, self.params.model_channels, time_factor=1.0)  # fp32 [cos | sin]
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype)) + self.label_emb(y)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h.type(x.dtype))

    @classmethod
    def from_state_dict(cls, sd: dict, dtype: torch.dtype | None = None, device=None, **overrides) -> "UNet":
        """Build from an SDXL checkpoint (its `model.diffusion_model.` keys; the VAE, text encoder
        and `denoiser.sigmas` keys are left to their own loaders) or a bare UNet state dict.

        Built on the meta device, the tensors assigned, not copied. `dtype` converts on the way in
        (None keeps the file's dtype); `overrides` set UNetParams fields, e.g. num_head_channels."""
        sd = strip_prefix(sd, PREFIXES)[0]
        params = infer_params(sd, **overrides)
        with torch.device("meta"):
            model = cls(params)
        load_into(model, sd, dtype=dtype, device=device, what="SDXL UNet")
        return model


def _check_params(p: UNetParams) -> None:
    levels = len(p.channel_mult)
    if len(p.num_res_blocks) != levels or len(p.transformer_depth) != levels:
        raise ValueError(
            f"num_res_blocks {p.num_res_blocks} and transformer_depth {p.transformer_depth} need one entry "
            f"per level of channel_mult {p.channel_mult}"
        )
    widths = [p.model_channels * m for m in p.channel_mult]
    for width, depth in [*zip(widths, p.transformer_depth), (widths[-1], p.transformer_depth_middle)]:
        if depth and width % p.num_head_channels:
            raise ValueError(f"{width} channels do not split into heads of num_head_channels={p.num_head_channels}")


def load(path, dtype: torch.dtype | None = None, device=None, allow_pickle: bool = False, **overrides) -> UNet:
    """The UNet of an SDXL single file (or a bare UNet file), memory-mapped (models/loading.py)."""
    return UNet.from_state_dict(load_state_dict(path, allow_pickle=allow_pickle), dtype=dtype, device=device, **overrides)


PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def _indices(sd: dict, pattern: str) -> list[int]:
    """The distinct indices `(\\d+)` in `pattern` among the keys; they must be 0..n-1."""
    regex = re.compile(pattern)
    indices = sorted({int(m.group(1)) for k in sd if (m := regex.match(k))})
    if indices != list(range(len(indices))):
        raise ValueError(f"UNet keys matching {pattern!r} have non-contiguous indices {indices}")
    return indices


def _levels(sd: dict, model_channels: int) -> tuple[list[int], list[int], list[int]]:
    """Walk input_blocks 1..: a Downsample (`.0.op`) closes a level; a ResBlock's out width gives
    the level's channel multiplier and its SpatialTransformer (`.1`) the depth.
    Returns (channel_mult, num_res_blocks, transformer_depth)."""
    mult, res_blocks, depth = [], [], []
    new_level = True
    for i in _indices(sd, r"^input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in sd:
            new_level = True
            continue
        width = sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0]
        block_depth = len(_indices(sd, rf"^input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\."))
        if new_level:
            mult.append(width // model_channels)
            res_blocks.append(0)
            depth.append(block_depth)
            new_level = False
        if width != mult[-1] * model_channels or block_depth != depth[-1]:
            raise ValueError(f"input_blocks.{i} differs in width or transformer depth from the rest of its level")
        res_blocks[-1] += 1
    return mult, res_blocks, depth


def infer_params(sd: dict, **overrides) -> UNetParams:
    """UNetParams from the keys and shapes of an SDXL-layout UNet state dict (prefix optional).
    The head width is not in the shapes: num_head_channels stays 64 unless overridden."""
    sd = strip_prefix(sd, PREFIXES)[0]
    check_family(sd, "sdxl", required=("input_blocks.0.0.weight", "time_embed.0.weight", "label_emb.0.0.weight"))
    model_channels, in_channels = sd["input_blocks.0.0.weight"].shape[:2]
    channel_mult, num_res_blocks, transformer_depth = _levels(sd, model_channels)
    context_keys = [k for k in sd if k.endswith(".attn2.to_k.weight")]
    params = UNetParams(
        in_channels=in_channels,
        out_channels=sd["out.2.weight"].shape[0],
        model_channels=model_channels,
        channel_mult=channel_mult,
        num_res_blocks=num_res_blocks,
        transformer_depth=transformer_depth,
        transformer_depth_middle=len(_indices(sd, r"^middle_block\.1\.transformer_blocks\.(\d+)\.")),
        context_dim=sd[context_keys[0]].shape[1] if context_keys else UNetParams.context_dim,
        adm_in_channels=sd["label_emb.0.0.weight"].shape[1],
    )
    return replace(params, **overrides)


def size_embedding(orig_hw, crop_tl, target_hw) -> Tensor:
    """The size and crop part of y: (B, 1536) = [orig_h | orig_w | crop_top | crop_left |
    target_h | target_w], each a 256-wide [cos | sin] embedding (max_period 1e4, no x1000), as
    sgm's ConcatTimestepEmbedderND. Each argument is (B, 2) or one (2,) pair, in pixels."""
    values = [torch.as_tensor(v, dtype=torch.float32) for v in (orig_hw, crop_tl, target_hw)]
    values = torch.cat([v.reshape(-1, 2) for v in values], dim=1)  # (B, 6)
    emb = timestep_embedding(values.flatten(), 256, time_factor=1.0)  # (B*6, 256)
    return rearrange(emb, "(b n) d -> b (n d)", n=6)
