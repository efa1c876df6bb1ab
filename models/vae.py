"""The KL autoencoder (AutoencoderKL) shared by FLUX.1, SD3 / SD3.5 and SDXL, with the module
names of the reference code (black-forest-labs/flux: src/flux/modules/autoencoder.py, the same
tree as the LDM / sgm VAE), so that an original file loads with strict=True and no renaming.

    FLUX ae.safetensors      keys encoder.* decoder.*                 16 ch, scale 0.3611, shift 0.1159
    SD3 / SD3.5 checkpoint   first_stage_model.encoder.* ...          16 ch, scale 1.5305, shift 0.0609
    SDXL checkpoint / VAE    (first_stage_model.)encoder.* ...        4 ch, scale 0.13025, no shift,
                             plus quant_conv and post_quant_conv

Shapes: B batch, C channels, H x W pixels, h x w = H/8 x W/8 latent (for 4 levels).
Pixels are in [-1, 1]. `encode` returns the *scaled* latent that the denoiser sees,
scale * (z - shift); `decode` undoes the scaling and returns pixels.
"""
import re
from pathlib import Path
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .layers import attention
from .loading import check_family, load_into, strip_prefix


@dataclass
class AutoEncoderParams:
    resolution: int = 256  # kept from the reference code; the model runs at any size divisible by 8
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    use_quant_conv: bool = False  # SDXL: 1x1 convs between the encoder / decoder and the latent


# name -> (scale_factor, shift_factor): what each family's denoiser was trained on.
LATENT_SCALING = {
    "flux": (0.3611, 0.1159),
    "sd3": (1.5305, 0.0609),
    "sdxl": (0.13025, 0.0),
}


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions; q, k, v, proj_out are 1x1 convs."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        height, width = x.shape[2:]
        # (B, C, h, w) -> (B, 1 head, h*w tokens, C), contiguous: SDPA's fused kernels need the last
        # dim contiguous, and a strided view sends it to the math path with an (h w)^2 matrix
        # (1 GiB at 1024 px in bf16)
        q, k, v = (rearrange(proj(h), "B C h w -> B 1 (h w) C").contiguous() for proj in (self.q, self.k, self.v))
        out = rearrange(attention(q, k, v), "B (h w) C -> B C h w", h=height, w=width)
        return x + self.proj_out(out)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv, twice, plus a skip (a 1x1 conv `nin_shortcut` when widths differ)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # Asymmetric: one zero column on the right and one zero row at the bottom, none on the
        # left/top. A symmetric padding=1 conv gives the same shape but different numbers.
        x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0)
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def mid_block(channels: int) -> nn.Module:
    """`mid.block_1`, `mid.attn_1`, `mid.block_2` at the lowest resolution."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


def run_mid(mid: nn.Module, h: Tensor) -> Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """(B, in_channels, H, W) pixels -> (B, 2*z_channels, h, w) = [mean | logvar] moments."""

    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, kernel_size=3, stride=1, padding=1)
        # down.{i}: num_res_blocks ResnetBlocks at level i, then a downsample (all but the last level)
        self.down = nn.ModuleList()
        block_in = p.ch
        for level, mult in enumerate(p.ch_mult):
            down = nn.Module()
            down.block = nn.ModuleList()
            for _ in range(p.num_res_blocks):
                down.block.append(ResnetBlock(block_in, p.ch * mult))
                block_in = p.ch * mult
            if level != len(p.ch_mult) - 1:
                down.downsample = Downsample(block_in)
            self.down.append(down)
        self.mid = mid_block(block_in)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * p.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for down in self.down:
            for block in down.block:
                h = block(h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = run_mid(self.mid, h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) unscaled latent -> (B, out_ch, H, W) pixels."""

    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        levels = len(p.ch_mult)
        block_in = p.ch * p.ch_mult[-1]
        self.conv_in = nn.Conv2d(p.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = mid_block(block_in)
        # up.{i} belongs to resolution level i (same widths as encoder down.{i}), but is built,
        # and run, from the deepest level up: i = levels-1 ... 0. Each has num_res_blocks + 1
        # ResnetBlocks, then an upsample (all but level 0).
        up_by_level = {}
        for level in reversed(range(levels)):
            up = nn.Module()
            up.block = nn.ModuleList()
            for _ in range(p.num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, p.ch * p.ch_mult[level]))
                block_in = p.ch * p.ch_mult[level]
            if level != 0:
                up.upsample = Upsample(block_in)
            up_by_level[level] = up
        self.up = nn.ModuleList([up_by_level[level] for level in range(levels)])  # stored by level
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, p.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        # the levels, deepest first (the tiled decode runs them per tile); no name keeps the
        # middle block's output alive while they run
        return decoder_upsampling(self, run_mid(self.mid, self.conv_in(z)))


# The top-level modules that make up each half: loading one half never touches the other's tensors.
PARTS = {"encoder": ("encoder", "quant_conv"), "decoder": ("decoder", "post_quant_conv")}


class AutoEncoder(nn.Module):
    """`encoder` and `decoder` are separate submodules: caching latents needs only the encoder,
    sampling only the decoder. Build with `parts=("encoder",)` (or `("decoder",)`) to leave the
    other half out; the missing attribute is then None."""

    def __init__(self, params: AutoEncoderParams, parts: tuple[str, ...] = ("encoder", "decoder")):
        super().__init__()
        unknown = set(parts) - set(PARTS)
        if unknown or not parts:
            raise ValueError(f"parts must be a non-empty subset of {tuple(PARTS)}, got {parts}")
        self.params = params
        self.scale_factor = params.scale_factor
        self.shift_factor = params.shift_factor
        z2 = 2 * params.z_channels
        self.encoder = Encoder(params) if "encoder" in parts else None
        self.decoder = Decoder(params) if "decoder" in parts else None
        if params.use_quant_conv:  # 1x1 convs on the moments and on the latent (SDXL)
            self.quant_conv = nn.Conv2d(z2, z2, kernel_size=1) if "encoder" in parts else None
            self.post_quant_conv = (
                nn.Conv2d(params.z_channels, params.z_channels, kernel_size=1) if "decoder" in parts else None
            )

    def _require(self, part: str) -> nn.Module:
        module = getattr(self, part)
        if module is None:
            raise RuntimeError(f"this AutoEncoder was loaded without its {part}; load it with parts=('{part}',)")
        return module

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Pixels (B, 3, H, W) in [-1, 1] -> unscaled mean and logvar, each (B, z, h, w)."""
        moments = self._require("encoder")(x)
        if self.params.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar

    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> scaled latent (B, z, H/8, W/8) for the denoiser.

        The mean of the diagonal Gaussian by default (as the FLUX reference encode); with
        sample=True a draw mean + std * noise, the noise from `generator` when given."""
        z, logvar = self.moments(x)
        if sample:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # the clamp of the LDM / SD3 code
            noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            z = z + std * noise
        return self.scale_factor * (z - self.shift_factor)

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latent (B, z, h, w) -> pixels (B, 3, 8h, 8w), roughly in [-1, 1] (not clamped)."""
        decoder = self._require("decoder")
        z = z / self.scale_factor + self.shift_factor
        if self.params.use_quant_conv:
            z = self.post_quant_conv(z)
        return decoder(z)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    @classmethod
    def from_state_dict(
        cls,
        sd: dict,
        dtype: torch.dtype | None = None,
        device=None,
        parts: tuple[str, ...] = ("encoder", "decoder"),
        **overrides,
    ) -> "AutoEncoder":
        """Build from an original state dict: FLUX ae.safetensors, an SD3 / SDXL checkpoint
        (only the `first_stage_model.` keys are used), or a standalone VAE file.

        Channels and depth come from the shapes; scale and shift from what the file looks like
        (see `infer_params`), and any AutoEncoderParams field can be overridden, e.g.
        `scale_factor=0.18215, shift_factor=0.0` for an SD1.x VAE. The model is built on the
        meta device and the tensors are assigned, not copied."""
        sd, prefix = strip_prefix(sd, PREFIXES)
        if is_diffusers_vae(sd):
            sd = diffusers_vae_to_original(sd)
        sd = select_parts(sd, parts)
        params = infer_params(sd, prefix=prefix, parts=parts, **overrides)
        with torch.device("meta"):
            model = cls(params, parts=parts)
        load_into(model, sd, dtype=dtype, device=device, what="autoencoder")
        return model


PREFIXES = ("first_stage_model.", "vae.")


def select_parts(sd: dict, parts: tuple[str, ...]) -> dict:
    """Drop the keys of the halves not asked for; anything unknown stays (strict loading reports it)."""
    dropped = {name for part, names in PARTS.items() if part not in parts for name in names}
    return {k: v for k, v in sd.items() if k.split(".", 1)[0] not in dropped}


def _count(sd: dict, pattern: str) -> int:
    """How many distinct indices `(\\d+)` in `pattern` occur among the keys; they must be 0..n-1."""
    regex = re.compile(pattern)
    indices = {int(m.group(1)) for k in sd if (m := regex.match(k))}
    if indices != set(range(len(indices))):
        raise ValueError(f"autoencoder keys matching {pattern!r} have non-contiguous indices {sorted(indices)}")
    return len(indices)


def infer_params(sd: dict, prefix: str = "", parts: tuple[str, ...] = ("encoder", "decoder"), **overrides):
    """AutoEncoderParams from the keys and shapes of a prefix-stripped VAE state dict."""
    if any(".down_blocks." in k or ".up_blocks." in k for k in sd):
        raise ValueError(
            "this is a diffusers-format VAE (down_blocks / up_blocks keys): rename its keys with "
            "diffusers_vae_to_original first (AutoEncoder.from_state_dict does)"
        )
    level_keys = {"encoder": "encoder.down.0.block.0.conv1.weight", "decoder": "decoder.up.0.block.0.conv1.weight"}
    required = tuple(k for part in parts for k in (f"{part}.conv_in.weight", level_keys[part], f"{part}.conv_out.weight"))
    check_family(sd, "vae", required=required)
    if "encoder" in parts:
        ch, in_channels = sd["encoder.conv_in.weight"].shape[:2]
        levels = _count(sd, r"^encoder\.down\.(\d+)\.")
        # down.{i}.block.0.conv1 maps the previous width to ch * ch_mult[i]
        ch_mult = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels)]
        num_res_blocks = _count(sd, r"^encoder\.down\.0\.block\.(\d+)\.")
        z_channels = sd["encoder.conv_out.weight"].shape[0] // 2
    else:
        # The decoder alone knows only the products ch * ch_mult[i]; take ch_mult[0] = 1.
        levels = _count(sd, r"^decoder\.up\.(\d+)\.")
        widths = [sd[f"decoder.up.{i}.block.0.conv2.weight"].shape[0] for i in range(levels)]
        ch, ch_mult = widths[0], [w // widths[0] for w in widths]
        num_res_blocks = _count(sd, r"^decoder\.up\.0\.block\.(\d+)\.") - 1
        z_channels = sd["decoder.conv_in.weight"].shape[1]
        in_channels = 3
    out_ch = sd["decoder.conv_out.weight"].shape[0] if "decoder" in parts else 3
    use_quant_conv = "quant_conv.weight" in sd or "post_quant_conv.weight" in sd

    scale_shift = {k: overrides[k] for k in ("scale_factor", "shift_factor") if k in overrides}
    if len(scale_shift) < 2:
        family = latent_family(z_channels, use_quant_conv, prefix)
        scale_shift = dict(zip(("scale_factor", "shift_factor"), LATENT_SCALING[family])) | scale_shift
    params = AutoEncoderParams(
        in_channels=in_channels,
        ch=ch,
        out_ch=out_ch,
        ch_mult=ch_mult,
        num_res_blocks=num_res_blocks,
        z_channels=z_channels,
        use_quant_conv=use_quant_conv,
        **scale_shift,
    )
    return replace(params, **overrides)


def latent_family(z_channels: int, use_quant_conv: bool, prefix: str) -> str:
    """Whose latent scaling a VAE gets by default. The architectures are the same, so this
    is a guess from the layout: FLUX ships ae.safetensors without a prefix, SD3 bundles its
    VAE under `first_stage_model.`, SDXL has quant convs and 4 channels."""
    if z_channels == 16 and not use_quant_conv:
        return "sd3" if prefix == "first_stage_model." else "flux"
    if z_channels == 4 and use_quant_conv:
        return "sdxl"
    raise ValueError(
        f"unknown autoencoder ({z_channels} latent channels, quant convs: {use_quant_conv}): "
        "pass scale_factor= and shift_factor= for its latent space"
    )


# --- VAE files in the diffusers layout -------------------------------------------------------------
# diffusers' AutoencoderKL names the same modules differently (and some files, e.g. sdxl_vae.safetensors
# of madebyollin/sdxl-vae-fp16-fix, are saved that way). Its decoder `up_blocks` run in storage order,
# deepest first, where the original `up.{i}` is indexed by resolution level; its attention projections
# are Linear (C, C) where the original has 1x1 convs (C, C, 1, 1).

# (diffusers pattern, original replacement), applied to the key after `encoder.` / `decoder.`
DIFFUSERS_VAE_RENAMES = (
    (r"^down_blocks\.(\d+)\.resnets\.(\d+)\.", r"down.\1.block.\2."),
    (r"^down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample."),
    (r"^up_blocks\.(\d+)\.upsamplers\.0\.", r"up.\1.upsample."),  # level index fixed below
    (r"^up_blocks\.(\d+)\.resnets\.(\d+)\.", r"up.\1.block.\2."),
    (r"^mid_block\.resnets\.0\.", "mid.block_1."),
    (r"^mid_block\.resnets\.1\.", "mid.block_2."),
    (r"^mid_block\.attentions\.0\.group_norm\.", "mid.attn_1.norm."),
    (r"^mid_block\.attentions\.0\.(to_q|query)\.", "mid.attn_1.q."),  # to_q: newer files, query: older
    (r"^mid_block\.attentions\.0\.(to_k|key)\.", "mid.attn_1.k."),
    (r"^mid_block\.attentions\.0\.(to_v|value)\.", "mid.attn_1.v."),
    (r"^mid_block\.attentions\.0\.(to_out\.0|proj_attn)\.", "mid.attn_1.proj_out."),
    (r"^conv_norm_out\.", "norm_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
)


def is_diffusers_vae(sd: dict) -> bool:
    return any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in sd)


def diffusers_vae_to_original(sd: dict) -> dict:
    """A (prefix-stripped) diffusers-layout AutoencoderKL state dict -> the original layout that
    AutoEncoder loads. Only names and the attention weights' shapes change; tensors are not copied."""
    up_levels = len({k.split(".")[2] for k in sd if k.startswith("decoder.up_blocks.")})
    converted = {}
    for key, tensor in sd.items():
        part, _, rest = key.partition(".")
        if part in ("encoder", "decoder"):
            for pattern, replacement in DIFFUSERS_VAE_RENAMES:
                rest = re.sub(pattern, replacement, rest)
            if part == "decoder" and rest.startswith("up."):  # storage order -> resolution level
                index, _, tail = rest[len("up.") :].partition(".")
                rest = f"up.{up_levels - 1 - int(index)}.{tail}"
            key = f"{part}.{rest}"
            if ".mid.attn_1." in key and key.endswith(".weight") and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]  # Linear (C, C) -> 1x1 conv (C, C, 1, 1), a view
        converted[key] = tensor
    return converted


# --- Decoding a large latent in tiles, and the decoder's memory -----------------------------------
# The decoder's activations grow with the image: at 1024 px its top level holds several
# (128..256 channels x 1024 x 1024) tensors at once, about 2 GB in bf16. decode_tiled bounds that by
# running the upsampling half on overlapping latent tiles. The middle block (whose attention sees
# every latent position) runs once on the whole latent: it works at latent resolution, where memory
# is small. Each tile's GroupNorms see only the tile, which is where tiled and whole decodes differ.


def decoder_upsampling(decoder: Decoder, h: Tensor) -> Tensor:
    """The part of Decoder.forward after the middle block (the same modules in the same order):
    (B, C, h, w) middle-block output -> (B, out_ch, 8h, 8w) pixels for 4 levels."""
    for up in reversed(decoder.up):  # deepest level first
        for block in up.block:
            h = block(h)
        if hasattr(up, "upsample"):
            h = up.upsample(h)
    return decoder.conv_out(swish(decoder.norm_out(h)))


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of `tile` covering 0..size, neighbours overlapping by at least `overlap`."""
    if size <= tile:
        return [0]
    return [*range(0, size - tile, tile - overlap), size - tile]


def blend_ramp(length: int, ramp: int, first: bool, last: bool) -> Tensor:
    """A tile's weights along one axis: rising linearly over `ramp` pixels at an edge it shares with a
    neighbour, 1 elsewhere (the weights of overlapping tiles are normalised by their sum)."""
    weight = torch.ones(length)
    steps = (torch.arange(ramp) + 0.5) / ramp  # (0, 1) exclusive: every pixel keeps some weight
    if ramp and not first:
        weight[:ramp] = steps
    if ramp and not last:
        weight[length - ramp :] = steps.flip(0)
    return weight


def decode_tiled(vae: AutoEncoder, z: Tensor, tile_latent: int = 64, overlap_latent: int = 8) -> Tensor:
    """vae.decode(z) with the upsampling half in overlapping tiles of tile_latent x tile_latent
    latent pixels, blended with linear ramps over overlap_latent latent pixels (x8 in the image).
    Peak activation memory follows the tile, not the image (see decoder_peak_bytes)."""
    if not 0 <= overlap_latent < tile_latent:
        raise ValueError(f"need 0 <= overlap_latent < tile_latent, got {overlap_latent} and {tile_latent}")
    decoder = vae._require("decoder")
    z = z / vae.scale_factor + vae.shift_factor
    if vae.params.use_quant_conv:
        z = vae.post_quant_conv(z)
    h = run_mid(decoder.mid, decoder.conv_in(z))  # whole latent: attention sees every position
    factor = 2 ** (len(decoder.up) - 1)  # pixels per latent pixel
    B, _, height, width = h.shape
    out = torch.zeros(B, vae.params.out_ch, height * factor, width * factor, device=z.device)
    total = torch.zeros(height * factor, width * factor, device=z.device)
    rows, cols = tile_starts(height, tile_latent, overlap_latent), tile_starts(width, tile_latent, overlap_latent)
    for i, top in enumerate(rows):
        for j, left in enumerate(cols):
            tile = h[:, :, top : top + tile_latent, left : left + tile_latent].contiguous()
            piece = decoder_upsampling(decoder, tile)
            ph, pw = piece.shape[2:]
            ramp = overlap_latent * factor
            weight = (blend_ramp(ph, ramp, i == 0, i == len(rows) - 1)[:, None]
                      * blend_ramp(pw, ramp, j == 0, j == len(cols) - 1)[None, :]).to(z.device)
            y, x = top * factor, left * factor
            out[:, :, y : y + ph, x : x + pw] += piece.float() * weight
            total[y : y + ph, x : x + pw] += weight
            del piece
    return (out / total).to(h.dtype)


def decoder_peak_bytes(params: AutoEncoderParams, latent_height: int, latent_width: int, batch: int = 1,
                       dtype: torch.dtype = torch.bfloat16) -> int:
    """Estimated peak bytes of activations in one eager, no-grad decode of a (batch, z, h, w) latent
    (weights not included): the most that is live at once, op by op, as Decoder.forward allocates.
    For decode_tiled, the tile's size plus the whole-latent middle block and the output canvas.

    Per ResnetBlock (c_in -> c_out, n pixels), with its input held by the caller: during
    swish(norm(x)) the norm output, its sigmoid and their product are live (4 c_in n), and at the
    second norm x, conv1's output and three more of c_out (c_in n + 4 c_out n). Upsample holds its
    input, the 4x nearest copy and the conv output (9 c n). The middle block's attention holds
    about 8 (C x h x w) with fused attention (no L x L matrix: AttnBlock passes contiguous q, k, v,
    which SDPA's fused kernels need)."""
    level_widths = [params.ch * m for m in params.ch_mult]
    n = latent_height * latent_width  # pixels at the current level
    width = level_widths[-1]
    peaks = [n * (params.z_channels * 2 + width), 8 * width * n]  # conv_in; the middle block's attention
    peaks += [n * max(4 * width, 5 * width)] * 2  # middle ResnetBlocks (c_in = c_out)
    for level in reversed(range(len(level_widths))):
        for _ in range(params.num_res_blocks + 1):
            c_in, width = width, level_widths[level]
            peaks.append(n * max(4 * c_in, c_in + 4 * width))
        if level:
            peaks.append(9 * width * n)  # Upsample
            n *= 4
    peaks.append(n * max(4 * width, 2 * width + params.out_ch))  # norm_out + swish, conv_out
    return batch * max(peaks) * torch.finfo(dtype).bits // 8


# --- a skeleton for the memory plan -----------------------------------------------------------------

RELEASED_PARAMS = {  # the released autoencoders' shapes, by the family they serve
    "flux": dict(z_channels=16, scale_factor=0.3611, shift_factor=0.1159),
    "sd3": dict(z_channels=16, scale_factor=1.5305, shift_factor=0.0609),
    "sdxl": dict(z_channels=4, scale_factor=0.13025, shift_factor=0.0, use_quant_conv=True),
}


def autoencoder_skeleton(path: str | Path = "", kind: str = "flux") -> AutoEncoder:
    """The autoencoder on the current default device (meta for a memory plan): shapes from the
    file's header when it exists (a VAE file or a checkpoint holding first_stage_model.), else
    the released one of `kind`."""
    if path and Path(path).exists():
        from .loading import load_state_dict

        sd, prefix = strip_prefix(load_state_dict(path), PREFIXES)  # memory-mapped: the header only
        if is_diffusers_vae(sd):
            sd = diffusers_vae_to_original(sd)
        return AutoEncoder(infer_params(sd, prefix))
    return AutoEncoder(AutoEncoderParams(**RELEASED_PARAMS[kind]))
