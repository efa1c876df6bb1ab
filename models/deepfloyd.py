"""DeepFloyd IF stage I and stage II UNets with the module names of the original code
(deep-floyd/IF: deepfloyd_if/model/unet.py `UNetModel`, `SuperResUNetModel`; nn.py), so that
the released `pytorch_model.bin` files load with strict=True.

Both layouts users have load through `load_unet(folder)`:
- the original folder: `config.yml` (its `params:` are the UNetModel arguments) and
  `pytorch_model.bin` (fp16, unprefixed keys; a pickle, read with weights_only=True);
- the diffusers `unet/` folder: `config.json` (UNet2DConditionModel) and
  `diffusion_pytorch_model.safetensors`, whose keys `to_original` maps (and `to_diffusers`
  maps back). Keys missing from an older config.json take diffusers' defaults.

Stage I (IF-I-M/L/XL) takes a noisy 64 px image; stage II (IF-II-M/L) also takes the
low-resolution image, upsampled inside and concatenated on channels (6 input channels),
and its augmentation level, embedded by `aug_proj`. Both return 6 channels: epsilon and
the learned variance range.

Shapes: B batch, C channels, N = h*w image tokens, T text tokens, E text width (4096),
heads H of width D. An attention block's fused `qkv` Conv1d has its rows per head,
[q_h0, k_h0, v_h0, q_h1, ...] (`encoder_kv`: [k_h0, v_h0, k_h1, ...]).
"""
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .layers import attention, timestep_embedding
from .loading import check_family, load_into, load_state_dict

IMAGE_CHANNELS = 3


@dataclass
class IFConfig:
    """The network's shape, in the original `UNetModel` terms (config.yml `params:`)."""

    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: tuple[int, ...]  # per level
    attention_ds: tuple[int, ...]  # downsampling rates with attention (image_size // resolution)
    encoder_channels: int  # cross-attention width (encoder_proj output)
    in_channels: int = 3  # 3: stage I; 6: stage II (image and upsampled low-res image)
    out_channels: int = 6
    encoder_dim: int = 4096  # T5 width
    att_pool_heads: int = 64
    num_head_channels: int = 64  # -1: a fixed num_heads instead
    num_heads: int = 1
    num_heads_upsample: int = -1  # -1: num_heads (used only when num_head_channels is -1)
    no_self_attention_ds: tuple[int, ...] = ()  # disable_self_attentions, as rates
    time_embed_dim: int = 0  # 0: model_channels * max(channel_mult)
    activation: str = "gelu"
    use_scale_shift_norm: bool = True
    efficient_activation: bool = False  # stage II: one activation on emb in the UNet, none in ResBlocks
    skip_scale: float = 1.0  # stage II: 0.7071 (scale_skip_connection)
    interpolate_mode: str = "bilinear"
    dropout: float = 0.0
    image_size: int = 64
    precision: str = "32"  # the original's dtype ("16", "bf16", "32"); used when load_unet gets dtype=None

    def __post_init__(self):
        self.time_embed_dim = self.time_embed_dim or self.model_channels * max(self.channel_mult)
        if self.in_channels not in (IMAGE_CHANNELS, 2 * IMAGE_CHANNELS):
            raise ValueError(f"in_channels must be 3 (stage I) or 6 (stage II), got {self.in_channels}")
        if len(self.num_res_blocks) != len(self.channel_mult):
            raise ValueError(f"num_res_blocks {self.num_res_blocks} needs one entry per level {self.channel_mult}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")

    @property
    def super_res(self) -> bool:
        return self.in_channels == 2 * IMAGE_CHANNELS

    def heads(self, channels: int, upsample: bool = False) -> int:
        if self.num_head_channels != -1:
            if channels % self.num_head_channels:
                raise ValueError(f"{channels} channels are not divisible by num_head_channels {self.num_head_channels}")
            return channels // self.num_head_channels
        return self.num_heads_upsample if (upsample and self.num_heads_upsample != -1) else self.num_heads


ACTIVATIONS = {"gelu": lambda: nn.GELU(), "silu": lambda: nn.SiLU(), "gelu_jit": lambda: nn.GELU(approximate="tanh")}


def normalization(channels: int) -> nn.GroupNorm:
    """GroupNorm32: 32 groups, eps 1e-5, computed in the input dtype (as nn.py does)."""
    return nn.GroupNorm(32, channels, eps=1e-5)


# --- blocks -----------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """GN -> act -> conv, emb (scale, shift) or + emb, GN -> act -> dropout -> conv, + skip.
    up/down resample both paths between the first activation and the first conv."""

    def __init__(self, cfg: IFConfig, channels: int, out_channels: int, up: bool = False, down: bool = False):
        super().__init__()
        act = ACTIVATIONS[cfg.activation]
        self.use_scale_shift_norm = cfg.use_scale_shift_norm
        self.skip_scale = cfg.skip_scale
        self.in_layers = nn.Sequential(normalization(channels), act(), nn.Conv2d(channels, out_channels, 3, padding=1))
        if up:
            self.h_upd, self.x_upd = nn.Upsample(scale_factor=2, mode="nearest"), nn.Upsample(scale_factor=2)
        elif down:
            self.h_upd, self.x_upd = nn.AvgPool2d(2), nn.AvgPool2d(2)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * out_channels if cfg.use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(
            nn.Identity() if cfg.efficient_activation else act(), nn.Linear(cfg.time_embed_dim, emb_out)
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels), act(), nn.Dropout(cfg.dropout), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers[1](self.in_layers[0](x))
        h = self.in_layers[2](self.h_upd(h))
        x = self.x_upd(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[..., None, None]  # (B, 2C or C, 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)  # (scale, shift) order
            h = self.out_layers[0](h) * (1 + scale) + shift
        else:
            h = self.out_layers[0](h + emb_out)
        h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        out = self.skip_connection(x) + h
        return out * self.skip_scale if self.skip_scale != 1.0 else out


class AttentionBlock(nn.Module):
    """Self-attention over the image tokens with the text tokens' keys and values in front
    (Imagen style): keys = [text, image]. Without self-attention, keys are the text alone."""

    def __init__(self, channels: int, heads: int, encoder_channels: int, self_attention: bool = True):
        super().__init__()
        self.heads = heads
        self.self_attention = self_attention
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * (3 if self_attention else 1), 1)
        self.encoder_kv = nn.Conv1d(encoder_channels, channels * 2, 1)
        self.norm_encoder = normalization(encoder_channels)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: Tensor, encoder_out: Tensor, text_mask: Tensor | None = None) -> Tensor:
        b, c, height, width = x.shape
        qkv = self.qkv(self.norm(x).flatten(2))  # (B, 3C, N)
        encoder_kv = self.encoder_kv(self.norm_encoder(encoder_out))  # (B, 2C, T)
        text_k, text_v = rearrange(encoder_kv, "B (H K D) T -> K B H T D", K=2, H=self.heads)
        if self.self_attention:
            q, k, v = rearrange(qkv, "B (H K D) N -> K B H N D", K=3, H=self.heads)
            k, v = torch.cat([text_k, k], dim=2), torch.cat([text_v, v], dim=2)
        else:
            q = rearrange(qkv, "B (H D) N -> B H N D", H=self.heads)
            k, v = text_k, text_v
        mask = None
        if text_mask is not None:  # masked text tokens leave the keys; image keys always stay
            mask = text_mask.bool()
            if self.self_attention:
                mask = torch.cat([mask, mask.new_ones(b, q.shape[2])], dim=1)
            else:  # no key left: attend to all text, as diffusers' -10000 bias on every key does
                mask = mask | ~mask.any(dim=1, keepdim=True)
        out = attention(q, k, v, mask)  # (B, N, C), channels (H D)
        return x + self.proj_out(out.transpose(1, 2)).reshape(b, c, height, width)


class TimestepEmbedSequential(nn.Sequential):
    """A block of the UNet: passes emb to ResBlocks and the text to AttentionBlocks."""

    def forward(self, x: Tensor, emb: Tensor, encoder_out: Tensor, text_mask: Tensor | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, AttentionBlock):
                x = layer(x, encoder_out, text_mask)
            else:
                x = layer(x)
        return x


class AttentionPooling(nn.Module):
    """Text tokens (B, T, E) -> (B, E): one query, mean(tokens) + positional_embedding,
    attends over [that class token, tokens]; no output projection and no mask."""

    def __init__(self, num_heads: int, embed_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.positional_embedding = nn.Parameter(torch.randn(1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        class_token = x.mean(dim=1, keepdim=True) + self.positional_embedding.to(x.dtype)  # (B, 1, E)
        x = torch.cat([class_token, x], dim=1)  # (B, 1 + T, E)

        def heads(t: Tensor) -> Tensor:
            return rearrange(t, "B L (H D) -> B H L D", H=self.num_heads)

        out = attention(heads(self.q_proj(class_token)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return out[:, 0]  # (B, E)


# --- the network ------------------------------------------------------------------------------


@dataclass
class BlockSpec:
    """One entry of input_blocks (after conv_in) or output_blocks, with its place in the
    diffusers layout: `level` (down_blocks.{level}; up_blocks count from the bottom) and
    `position` (resnets.{position} / attentions.{position})."""

    level: int
    position: int
    in_channels: int
    out_channels: int
    attention: bool
    self_attention: bool = True
    resample: str = ""  # "down": the block is one downsampling ResBlock; "up": it ends with one


def block_specs(cfg: IFConfig) -> tuple[list[BlockSpec], list[BlockSpec]]:
    """The input and output blocks in order, as UNetModel.__init__ lays them out."""
    ch = cfg.model_channels * cfg.channel_mult[0]
    skip_channels, inputs, outputs = [ch], [], []
    ds, last = 1, len(cfg.channel_mult) - 1
    for level, mult in enumerate(cfg.channel_mult):
        attn = dict(attention=ds in cfg.attention_ds, self_attention=ds not in cfg.no_self_attention_ds)
        for position in range(cfg.num_res_blocks[level]):
            inputs.append(BlockSpec(level, position, ch, cfg.model_channels * mult, **attn))
            ch = cfg.model_channels * mult
            skip_channels.append(ch)
        if level != last:
            inputs.append(BlockSpec(level, 0, ch, ch, attention=False, resample="down"))
            skip_channels.append(ch)
            ds *= 2
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        attn = dict(attention=ds in cfg.attention_ds, self_attention=ds not in cfg.no_self_attention_ds)
        for position in range(cfg.num_res_blocks[level] + 1):
            resample = "up" if level and position == cfg.num_res_blocks[level] else ""
            outputs.append(BlockSpec(level, position, ch + skip_channels.pop(), cfg.model_channels * mult,
                                     **attn, resample=resample))
            ch = cfg.model_channels * mult
        if level:  # the level's last block upsampled
            ds //= 2
    return inputs, outputs


def bottom_ds(cfg: IFConfig) -> int:
    return 2 ** (len(cfg.channel_mult) - 1)


class IFUNet(nn.Module):
    """The IF UNet, stage I or II (`config.super_res`).

    `input_blocks`, `middle_block` and `output_blocks` are the repeated blocks (block swap,
    checkpointing and LoRA act on them from outside); each is called as a module with
    (h, emb, encoder_out, text_mask)."""

    def __init__(self, config: IFConfig):
        super().__init__()
        self.config = cfg = config
        act, mc, temb = ACTIVATIONS[cfg.activation], cfg.model_channels, cfg.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(mc, temb), act(), nn.Linear(temb, temb))
        first = mc * cfg.channel_mult[0]
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, first, 3, padding=1))])
        inputs, outputs = block_specs(cfg)
        self.input_blocks.extend(self._block(spec, upsample=False) for spec in inputs)
        bottom = mc * cfg.channel_mult[-1]
        self.middle_block = TimestepEmbedSequential(
            ResBlock(cfg, bottom, bottom),
            AttentionBlock(bottom, cfg.heads(bottom), cfg.encoder_channels, bottom_ds(cfg) not in cfg.no_self_attention_ds),
            ResBlock(cfg, bottom, bottom),
        )
        self.output_blocks = nn.ModuleList(self._block(spec, upsample=True) for spec in outputs)
        self.out = nn.Sequential(normalization(first), act(), nn.Conv2d(first, cfg.out_channels, 3, padding=1))
        self.activation_layer = act() if cfg.efficient_activation else nn.Identity()
        self.encoder_pooling = nn.Sequential(
            nn.LayerNorm(cfg.encoder_dim),
            AttentionPooling(cfg.att_pool_heads, cfg.encoder_dim),
            nn.Linear(cfg.encoder_dim, temb),
            nn.LayerNorm(temb),
        )
        if cfg.encoder_dim != cfg.encoder_channels:
            self.encoder_proj = nn.Linear(cfg.encoder_dim, cfg.encoder_channels)
        else:
            self.encoder_proj = nn.Identity()
        if cfg.super_res:
            self.aug_proj = nn.Sequential(nn.Linear(mc, temb), act(), nn.Linear(temb, temb))

    def _block(self, spec: BlockSpec, upsample: bool) -> TimestepEmbedSequential:
        cfg = self.config
        if spec.resample == "down":
            return TimestepEmbedSequential(ResBlock(cfg, spec.in_channels, spec.out_channels, down=True))
        layers = [ResBlock(cfg, spec.in_channels, spec.out_channels)]
        if spec.attention:
            heads = cfg.heads(spec.out_channels, upsample)
            layers.append(AttentionBlock(spec.out_channels, heads, cfg.encoder_channels, spec.self_attention))
        if spec.resample == "up":
            layers.append(ResBlock(cfg, spec.out_channels, spec.out_channels, up=True))
        return TimestepEmbedSequential(*layers)

    def forward(
        self,
        x: Tensor,  # (B, 3, H, W) noisy image
        timesteps: Tensor,  # (B,) integer timesteps (original indices after respacing)
        text: Tensor,  # (B, T, E) T5 last hidden states
        text_mask: Tensor | None = None,  # (B, T), True = attend; None: every token (the original)
        low_res: Tensor | None = None,  # stage II: (B, 3, h, w), already noised to aug_level
        aug_level: Tensor | None = None,  # stage II: (B,) integer augmentation timesteps
    ) -> Tensor:
        cfg = self.config
        dtype = self.time_embed[0].weight.dtype
        x = self._with_low_res(x, low_res).to(dtype)
        text = text.to(dtype)
        # sinusoids in fp32, then the model dtype (the original builds them in the model dtype)
        emb = self.time_embed(timestep_embedding(timesteps, cfg.model_channels, time_factor=1.0).to(dtype))
        encoder_out = self.encoder_proj(text).transpose(1, 2)  # (B, encoder_channels, T)
        emb = emb + self.encoder_pooling(text)  # pools every token, masked or not
        if cfg.super_res:
            if aug_level is None:
                raise ValueError("stage II needs aug_level: (B,) integer augmentation timesteps")
            emb = emb + self.aug_proj(timestep_embedding(aug_level, cfg.model_channels, time_factor=1.0).to(dtype))
        emb = self.activation_layer(emb)

        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, encoder_out, text_mask)
            skips.append(h)
        h = self.middle_block(h, emb, encoder_out, text_mask)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, encoder_out, text_mask)
        return self.out(h)  # (B, out_channels, H, W)

    def _with_low_res(self, x: Tensor, low_res: Tensor | None) -> Tensor:
        """Stage II: [x, low_res upsampled to x's size] on channels. No noise is added here."""
        if not self.config.super_res:
            if low_res is not None:
                raise ValueError("low_res was given to a stage I model (3 input channels)")
            return x
        if low_res is None:
            raise ValueError("stage II needs low_res: the (B, 3, h, w) image to upsample")
        align = True if self.config.interpolate_mode != "nearest" else None
        upsampled = F.interpolate(low_res.to(x.dtype), x.shape[-2:], mode=self.config.interpolate_mode,
                                  align_corners=align)
        return torch.cat([x, upsampled], dim=1)

    @classmethod
    def from_state_dict(cls, sd: dict, config: IFConfig, dtype=None, device=None) -> "IFUNet":
        """Build on the meta device and assign the original-layout tensors (strict)."""
        check_family(sd, "deepfloyd", required=ORIGINAL_REQUIRED)
        with torch.device("meta"):
            model = cls(config)
        return load_into(model, sd, dtype=dtype, device=device, what="DeepFloyd IF UNet")


ORIGINAL_REQUIRED = ("input_blocks.0.0.weight", "time_embed.0.weight", "encoder_pooling.1.q_proj.weight")
DIFFUSERS_REQUIRED = ("conv_in.weight", "time_embedding.linear_1.weight", "add_embedding.pool.q_proj.weight")


# --- original <-> diffusers keys ---------------------------------------------------------------


@dataclass(frozen=True)
class ModulePair:
    """A module of this network and its diffusers name. kind "same": the same parameters
    under another prefix; "resblock" and "attention": renamed (and split) inside."""

    original: str
    diffusers: str
    kind: str = "same"
    heads: int = 0
    self_attention: bool = True


RESBLOCK_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                  "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
ATTENTION_NAMES = {"norm": "group_norm", "norm_encoder": "norm_cross", "proj_out": "to_out.0",
                   "qkv": ("to_q", "to_k", "to_v"), "encoder_kv": ("add_k_proj", "add_v_proj")}
CONV1D_MODULES = ("qkv", "encoder_kv", "proj_out")  # Conv1d here, Linear in diffusers


def module_pairs(cfg: IFConfig) -> list[ModulePair]:
    """Every module that holds parameters, with its diffusers (UNet2DConditionModel) name."""
    pairs = [ModulePair(o, d) for o, d in (
        ("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
        ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out"),
        ("encoder_pooling.0", "add_embedding.norm1"), ("encoder_pooling.1", "add_embedding.pool"),
        ("encoder_pooling.2", "add_embedding.proj"), ("encoder_pooling.3", "add_embedding.norm2"),
    )]
    if cfg.encoder_dim != cfg.encoder_channels:
        pairs.append(ModulePair("encoder_proj", "encoder_hid_proj"))
    if cfg.super_res:
        pairs += [ModulePair("aug_proj.0", "class_embedding.linear_1"), ModulePair("aug_proj.2", "class_embedding.linear_2")]
    inputs, outputs = block_specs(cfg)
    for index, spec in enumerate(inputs, start=1):
        down = f"down_blocks.{spec.level}"
        resnet = f"{down}.downsamplers.0" if spec.resample else f"{down}.resnets.{spec.position}"
        pairs += _block_pairs(cfg, spec, f"input_blocks.{index}", resnet, f"{down}.attentions.{spec.position}", "")
    bottom = cfg.model_channels * cfg.channel_mult[-1]
    pairs += [
        ModulePair("middle_block.0", "mid_block.resnets.0", "resblock"),
        ModulePair("middle_block.1", "mid_block.attentions.0", "attention", cfg.heads(bottom),
                   bottom_ds(cfg) not in cfg.no_self_attention_ds),
        ModulePair("middle_block.2", "mid_block.resnets.1", "resblock"),
    ]
    for index, spec in enumerate(outputs):
        up = f"up_blocks.{len(cfg.channel_mult) - 1 - spec.level}"
        pairs += _block_pairs(cfg, spec, f"output_blocks.{index}", f"{up}.resnets.{spec.position}",
                              f"{up}.attentions.{spec.position}", f"{up}.upsamplers.0")
    return pairs


def _block_pairs(cfg: IFConfig, spec: BlockSpec, block: str, resnet: str, attn: str, sampler: str) -> list[ModulePair]:
    pairs = [ModulePair(f"{block}.0", resnet, "resblock")]
    if spec.attention:
        heads = cfg.heads(spec.out_channels, upsample=bool(sampler))
        pairs.append(ModulePair(f"{block}.1", attn, "attention", heads, spec.self_attention))
    if spec.resample == "up":
        pairs.append(ModulePair(f"{block}.{len(pairs)}", sampler, "resblock"))
    return pairs


def _find_pair(key: str, by_original: dict[str, ModulePair]) -> tuple[ModulePair, str, str]:
    """(pair, module inside it, parameter name) for an original key."""
    parts = key.split(".")
    for n in (3, 2, 1):
        pair = by_original.get(".".join(parts[:n]))
        if pair is not None:
            rest = parts[n:]
            return pair, ".".join(rest[:-1]), rest[-1]
    raise ValueError(f"{key} is not a DeepFloyd IF UNet parameter")


def _diffusers_keys(pair: ModulePair, module: str, param: str) -> list[str]:
    if pair.kind == "same":
        return [".".join(filter(None, (pair.diffusers, module, param)))]
    new = (RESBLOCK_NAMES if pair.kind == "resblock" else ATTENTION_NAMES).get(module)
    if new is None:
        raise ValueError(f"{pair.original}.{module}.{param} is not a DeepFloyd IF UNet parameter")
    if module == "qkv" and not pair.self_attention:
        new = new[:1]  # q only
    return [f"{pair.diffusers}.{n}.{param}" for n in ([new] if isinstance(new, str) else new)]


def diffusers_module_names(module: str, cfg: IFConfig) -> list[str]:
    """The diffusers name(s) of one of this network's modules ("input_blocks.4.1.qkv" ->
    down_blocks.1.attentions.0.to_q, .to_k, .to_v): one name, or two or three for a fused
    attention projection, whose output rows split per head as `to_diffusers` splits them."""
    pair, inner, _ = _find_pair(f"{module}.weight", {p.original: p for p in module_pairs(cfg)})
    return [key.rsplit(".", 1)[0] for key in _diffusers_keys(pair, inner, "weight")]


def _split(tensor: Tensor, pair: ModulePair, module: str, parts: int) -> list[Tensor]:
    """An original tensor -> its diffusers tensors."""
    if pair.kind != "attention" or module not in CONV1D_MODULES:
        return [tensor]
    if tensor.ndim == 3:
        tensor = tensor[..., 0]  # Conv1d (out, in, 1) -> Linear (out, in)
    if module == "proj_out":
        return [tensor]
    # rows per head [q_h0, k_h0, v_h0, q_h1, ...] -> [q_h0, q_h1, ...], [k_h0, ...], [v_h0, ...]
    return list(rearrange(tensor, "(H K D) ... -> K (H D) ...", H=pair.heads, K=parts))


def _merge(tensors: list[Tensor], pair: ModulePair, module: str, param: str) -> Tensor:
    """The inverse of _split."""
    if pair.kind != "attention" or module not in CONV1D_MODULES:
        return tensors[0]
    if module == "proj_out":
        merged = tensors[0]
    else:
        merged = rearrange(torch.stack(tensors), "K (H D) ... -> (H K D) ...", H=pair.heads)
    return merged[..., None] if param == "weight" else merged


def to_diffusers(sd: dict[str, Tensor], cfg: IFConfig) -> dict[str, Tensor]:
    """Original keys (config.yml + pytorch_model.bin) -> UNet2DConditionModel keys."""
    by_original = {p.original: p for p in module_pairs(cfg)}
    out = {}
    for key, tensor in sd.items():
        pair, module, param = _find_pair(key, by_original)
        names = _diffusers_keys(pair, module, param)
        out.update(zip(names, _split(tensor, pair, module, len(names)), strict=True))
    return out


def to_original(sd: dict[str, Tensor], cfg: IFConfig, keys: list[str] | None = None) -> dict[str, Tensor]:
    """UNet2DConditionModel keys -> original keys. `keys`: the original keys wanted (default:
    the network's). Missing and left-over diffusers keys are listed in the error."""
    if keys is None:
        with torch.device("meta"):
            keys = list(IFUNet(cfg).state_dict())
    by_original = {p.original: p for p in module_pairs(cfg)}
    out, used, missing = {}, set(), []
    for key in keys:
        pair, module, param = _find_pair(key, by_original)
        names = _diffusers_keys(pair, module, param)
        used.update(names)
        if any(n not in sd for n in names):
            missing += [n for n in names if n not in sd]
            continue
        out[key] = _merge([sd[n] for n in names], pair, module, param)
    unexpected = sorted(set(sd) - used)
    if missing or unexpected:
        raise ValueError(
            f"the diffusers UNet does not match its config.json ({len(missing)} missing, {len(unexpected)} unexpected)\n"
            f"  missing: {missing[:10]}\n  unexpected: {unexpected[:10]}"
        )
    return out


# --- configs ----------------------------------------------------------------------------------

# UNetModel / SuperResUNetModel arguments a config.yml may set (anything else is a typo or another model).
ORIGINAL_PARAMS = {
    "in_channels", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions", "activation",
    "encoder_dim", "att_pool_heads", "encoder_channels", "image_size", "disable_self_attentions", "dropout",
    "channel_mult", "conv_resample", "dims", "num_classes", "precision", "num_heads", "num_head_channels",
    "num_heads_upsample", "use_scale_shift_norm", "resblock_updown", "efficient_activation",
    "scale_skip_connection", "interpolate_mode",
}


def _ints(value) -> tuple[int, ...]:
    """"1,2,3,4", [1, 2, 3, 4] or 3 -> a tuple of ints."""
    if isinstance(value, str):
        return tuple(int(v) for v in value.split(",") if v.strip())
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _rates(value, image_size: int) -> tuple[int, ...]:
    """attention_resolutions as UNetModel reads it: a string holds resolutions relative to
    image_size ("32,16,8" at 64 -> rates 2, 4, 8); a list holds the rates themselves."""
    if isinstance(value, (str, int)):
        return tuple(image_size // r for r in _ints(value))
    return _ints(value)


def config_from_original(params: dict) -> IFConfig:
    """IFConfig from config.yml's `params:` (UNetModel's arguments)."""
    unknown = sorted(set(params) - ORIGINAL_PARAMS)
    if unknown:
        raise ValueError(f"config.yml params has keys UNetModel does not take: {unknown}")
    if params.get("dims", 2) != 2 or params.get("num_classes") is not None:
        raise ValueError("only 2-D, text-conditioned IF UNets are supported (dims 2, num_classes null)")
    if not params.get("resblock_updown", False):
        raise ValueError("resblock_updown: false (convolution resampling) is not used by any released IF UNet "
                         "and is not supported")
    image_size = int(params["image_size"])
    attention_ds = _rates(params["attention_resolutions"], image_size)
    mult = _ints(params.get("channel_mult", (1, 2, 4, 8)))
    res_blocks = _ints(params["num_res_blocks"])
    disable = params.get("disable_self_attentions")
    if not disable:
        no_self = ()
    elif disable is True:  # unet.py means every attention rate (it stores the raw string)
        no_self = attention_ds
    else:
        no_self = _rates(disable, image_size)
    return IFConfig(
        model_channels=int(params["model_channels"]),
        channel_mult=mult,
        num_res_blocks=res_blocks * len(mult) if len(res_blocks) == 1 else res_blocks,
        attention_ds=attention_ds,
        encoder_channels=int(params["encoder_channels"]),
        in_channels=int(params["in_channels"]),
        out_channels=int(params["out_channels"]),
        encoder_dim=int(params["encoder_dim"]),
        att_pool_heads=int(params["att_pool_heads"]),
        num_head_channels=int(params.get("num_head_channels", -1)),
        num_heads=int(params.get("num_heads", 1)),
        num_heads_upsample=int(params.get("num_heads_upsample", -1)),
        no_self_attention_ds=no_self,
        activation=str(params["activation"]),
        use_scale_shift_norm=bool(params.get("use_scale_shift_norm", False)),
        efficient_activation=bool(params.get("efficient_activation", False)),
        skip_scale=0.7071 if params.get("scale_skip_connection", False) else 1.0,  # 1 / sqrt(2) as unet.py writes it
        interpolate_mode=str(params.get("interpolate_mode", "bilinear")),
        dropout=float(params.get("dropout", 0.0)),
        image_size=image_size,
        precision=str(params.get("precision", "32")),
    )


# UNet2DConditionModel.__init__ defaults (diffusers 0.42) of the keys read here: an older
# config.json that lacks a key means this value (tests check them against diffusers).
DIFFUSERS_DEFAULTS = {
    "sample_size": None, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "only_cross_attention": False, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
    "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-05,
    "cross_attention_dim": 1280, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "attention_head_dim": 8,
    "num_attention_heads": None, "class_embed_type": None, "addition_embed_type": None, "num_class_embeds": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}
# Settings every IF UNet has; another value means a network this file does not describe.
DIFFUSERS_FIXED = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "norm_num_groups": 32,
    "norm_eps": 1e-05, "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "addition_embed_type": "text",
    "cross_attention_norm": "group_norm", "time_embedding_type": "positional", "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "class_embeddings_concat": False,
    "num_class_embeds": None, "num_attention_heads": None,
}
DOWN_TYPES = {"SimpleCrossAttnDownBlock2D": True, "ResnetDownsampleBlock2D": False}  # -> has attention
UP_TYPES = {"SimpleCrossAttnUpBlock2D": True, "ResnetUpsampleBlock2D": False}
ACT_FNS = {"gelu": "gelu", "silu": "silu", "swish": "silu"}


def _check_diffusers(c: dict) -> None:
    wrong = {k: c[k] for k, v in DIFFUSERS_FIXED.items() if c[k] != v}
    if c["encoder_hid_dim_type"] not in (None, "text_proj") or c["class_embed_type"] not in (None, "timestep"):
        wrong.update(encoder_hid_dim_type=c["encoder_hid_dim_type"], class_embed_type=c["class_embed_type"])
    if any(t not in DOWN_TYPES for t in c["down_block_types"]) or any(t not in UP_TYPES for t in c["up_block_types"]):
        wrong.update(down_block_types=c["down_block_types"], up_block_types=c["up_block_types"])
    elif [DOWN_TYPES[t] for t in c["down_block_types"]] != [UP_TYPES[t] for t in reversed(c["up_block_types"])]:
        wrong.update(up_block_types=c["up_block_types"])
    if c["resnet_out_scale_factor"] != c["mid_block_scale_factor"] or c["act_fn"] not in ACT_FNS:
        wrong.update(resnet_out_scale_factor=c["resnet_out_scale_factor"], act_fn=c["act_fn"])
    if c["time_embedding_act_fn"] != (c["act_fn"] if c["resnet_skip_time_act"] else None):
        wrong.update(time_embedding_act_fn=c["time_embedding_act_fn"], resnet_skip_time_act=c["resnet_skip_time_act"])
    if not isinstance(c["attention_head_dim"], int):
        wrong.update(attention_head_dim=c["attention_head_dim"])
    if wrong:
        raise ValueError(f"config.json does not describe a DeepFloyd IF UNet: {wrong}")
    _check_stage(c)


def config_from_diffusers(config: dict) -> IFConfig:
    """IFConfig from a diffusers unet/config.json (keys it lacks take diffusers' defaults)."""
    c = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    _check_diffusers(c)
    channels = list(c["block_out_channels"])
    mc = channels[0]
    if any(ch % mc for ch in channels):
        raise ValueError(f"block_out_channels {channels} are not multiples of the first")
    layers = c["layers_per_block"]
    attention = [DOWN_TYPES[t] for t in c["down_block_types"]]
    return IFConfig(
        model_channels=mc,
        channel_mult=tuple(ch // mc for ch in channels),
        num_res_blocks=tuple([layers] * len(channels) if isinstance(layers, int) else layers),
        attention_ds=tuple(2**i for i, a in enumerate(attention) if a),
        encoder_channels=c["cross_attention_dim"],
        in_channels=c["in_channels"],
        out_channels=c["out_channels"],
        encoder_dim=c["encoder_hid_dim"] or c["cross_attention_dim"],
        att_pool_heads=c["addition_embed_type_num_heads"],
        num_head_channels=c["attention_head_dim"],
        no_self_attention_ds=_cross_only_rates(c, attention),
        time_embed_dim=c["time_embedding_dim"] or 4 * mc,  # diffusers' default: 4 x the first width
        activation=ACT_FNS[c["act_fn"]],
        use_scale_shift_norm=c["resnet_time_scale_shift"] == "scale_shift",
        efficient_activation=c["resnet_skip_time_act"],
        skip_scale=1.0 / c["resnet_out_scale_factor"],  # diffusers divides (skip + h) by the factor
        dropout=c["dropout"],
        image_size=c["sample_size"] or 64,
    )


def _cross_only_rates(c: dict, attention: list[bool]) -> tuple[int, ...]:
    """only_cross_attention (a bool or one per level) and the middle block's, as the rates
    whose attention has no self-attention (the original's disable_self_attentions)."""
    cross_only = c["only_cross_attention"]
    per_level = [cross_only] * len(attention) if isinstance(cross_only, bool) else list(cross_only)
    middle = c["mid_block_only_cross_attention"]
    if middle is None:
        middle = cross_only if isinstance(cross_only, bool) else False
    if attention[-1] and per_level[-1] != middle:
        raise ValueError("mid_block_only_cross_attention differs from the deepest level's only_cross_attention: "
                         "the original UNet decides both by the same rate")
    rates = {2**i for i, (a, off) in enumerate(zip(attention, per_level)) if a and off}
    if middle:
        rates.add(2 ** (len(attention) - 1))
    return tuple(sorted(rates))


def _check_stage(c: dict) -> None:
    if (c["class_embed_type"] == "timestep") != (c["in_channels"] == 2 * IMAGE_CHANNELS):
        raise ValueError(f"class_embed_type {c['class_embed_type']!r} with in_channels {c['in_channels']}: stage II "
                         "has class_embed_type 'timestep' (aug_proj) and 6 input channels, stage I neither")


def diffusers_config(cfg: IFConfig) -> dict:
    """The UNet2DConditionModel arguments (config.json) for this network."""
    if cfg.num_head_channels == -1:
        raise ValueError("diffusers describes attention by head width: num_head_channels must be set")
    levels = len(cfg.channel_mult)
    attention = [2**i in cfg.attention_ds for i in range(levels)]
    mid_cross_only = bottom_ds(cfg) in cfg.no_self_attention_ds
    cross_only = [2**i in cfg.no_self_attention_ds for i in range(levels)]
    if len({c for c, a in zip(cross_only, attention) if a} | {mid_cross_only}) == 1:
        cross_only = mid_cross_only  # one value (levels without attention ignore it)
    act = "gelu" if cfg.activation == "gelu_jit" else cfg.activation
    layers = list(cfg.num_res_blocks)
    return {
        "sample_size": cfg.image_size, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": [("SimpleCrossAttnDownBlock2D" if a else "ResnetDownsampleBlock2D") for a in attention],
        "up_block_types": [("SimpleCrossAttnUpBlock2D" if a else "ResnetUpsampleBlock2D") for a in reversed(attention)],
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
        "block_out_channels": [cfg.model_channels * m for m in cfg.channel_mult],
        "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "cross_attention_dim": cfg.encoder_channels,
        "encoder_hid_dim": cfg.encoder_dim if cfg.encoder_dim != cfg.encoder_channels else None,
        "attention_head_dim": cfg.num_head_channels,
        "addition_embed_type": "text", "addition_embed_type_num_heads": cfg.att_pool_heads,
        "class_embed_type": "timestep" if cfg.super_res else None,
        "act_fn": act, "cross_attention_norm": "group_norm",
        "resnet_time_scale_shift": "scale_shift" if cfg.use_scale_shift_norm else "default",
        "resnet_skip_time_act": cfg.efficient_activation,
        "resnet_out_scale_factor": 1.0 / cfg.skip_scale, "mid_block_scale_factor": 1.0 / cfg.skip_scale,
        "time_embedding_dim": cfg.time_embed_dim,
        "time_embedding_act_fn": act if cfg.efficient_activation else None,
        "only_cross_attention": cross_only,
        "mid_block_only_cross_attention": mid_cross_only,
        "dropout": cfg.dropout,
    }


# --- config.yml -------------------------------------------------------------------------------


def read_config_yml(path: str | Path) -> dict:
    """config.yml as a dict: with PyYAML when it is installed, else with `parse_simple_yaml`
    (PyYAML is not a dependency; the released files are plain `key: value` maps)."""
    text = Path(path).read_text()
    try:
        import yaml
    except ImportError:
        return parse_simple_yaml(text)
    return yaml.safe_load(text)


@dataclass
class _Line:
    number: int
    indent: int
    body: str


def parse_simple_yaml(text: str) -> dict:
    """The YAML that IF's config.yml uses: nested `key: value` maps, scalars (int, float,
    bool, null, quoted or plain strings), `[a, b]` and `- item` lists of scalars, comments.
    Anything else (anchors, flow maps, multi-line strings) raises ValueError."""
    lines = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise ValueError(f"config.yml line {number}: tabs in indentation")
        body = _strip_comment(raw).rstrip()
        if body.strip() and body.strip() != "---":
            lines.append(_Line(number, len(body) - len(body.lstrip(" ")), body.strip()))
    if not lines:
        return {}
    value, end = _parse_block(lines, 0, lines[0].indent)
    if end != len(lines) or not isinstance(value, dict):
        raise ValueError(f"config.yml line {lines[min(end, len(lines) - 1)].number}: not a simple key: value map")
    return value


def _parse_block(lines: list[_Line], i: int, indent: int):
    """The map or list whose lines start at lines[i] with this indent -> (value, next index)."""
    if lines[i].body.startswith("- ") or lines[i].body == "-":
        items = []
        while i < len(lines) and lines[i].indent == indent and lines[i].body.startswith("-"):
            items.append(_scalar(lines[i].body[1:].strip(), lines[i].number))
            i += 1
        return items, i
    mapping = {}
    while i < len(lines) and lines[i].indent == indent and not lines[i].body.startswith("-"):
        match = re.fullmatch(r"([^\s:'\"{}\[\]][^:]*?)\s*:(?:\s+(.*))?", lines[i].body)
        if match is None:
            raise ValueError(f"config.yml line {lines[i].number}: expected `key: value`, got {lines[i].body!r}")
        key, rest = match.group(1), match.group(2)
        i += 1
        nested = i < len(lines) and (lines[i].indent > indent or (lines[i].indent == indent and lines[i].body.startswith("-")))
        if rest:
            mapping[key] = _scalar(rest, lines[i - 1].number)
        elif nested:
            mapping[key], i = _parse_block(lines, i, lines[i].indent)
        else:
            mapping[key] = None
    if i < len(lines) and lines[i].indent > indent:
        raise ValueError(f"config.yml line {lines[i].number}: unexpected indentation")
    return mapping, i


def _strip_comment(line: str) -> str:
    """Drop a `#` comment that starts the line or follows a space, outside quotes."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1] in " \t"):
            return line[:index]
    return line


def _scalar(text: str, number: int):
    if text[:1] in ("'", '"'):
        if len(text) < 2 or text[-1] != text[0] or "\\" in text:
            raise ValueError(f"config.yml line {number}: unsupported quoted string {text}")
        return text[1:-1]
    if text.startswith("[") and text.endswith("]"):
        return [_scalar(item.strip(), number) for item in text[1:-1].split(",") if item.strip()]
    if text[:1] in "[{&*!|>%@`":
        raise ValueError(f"config.yml line {number}: YAML feature not supported here ({text}); install PyYAML")
    lowered = text.lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    if lowered in ("null", "~"):
        return None
    if re.fullmatch(r"[-+]?\d+", text):
        return int(text)
    if re.fullmatch(r"[-+]?(\d+\.\d*|\.\d+)([eE][-+]?\d+)?", text):
        return float(text)
    return text


# --- loading ----------------------------------------------------------------------------------

PRECISIONS = {"16": torch.float16, "fp16": torch.float16, "bf16": torch.bfloat16, "32": torch.float32, "fp32": torch.float32}
ORIGINAL_WEIGHTS = ("pytorch_model.safetensors", "pytorch_model.bin")
DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors.index.json", "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
)


def find_layout(path: str | Path) -> tuple[str, Path]:
    """("original" | "diffusers", the folder holding its config) for a model folder; a
    diffusers repository root is accepted for its unet/ folder."""
    folder = Path(path)
    if folder.is_file():
        raise ValueError(f"{folder} is a file: pass the folder that holds it and its config.yml or config.json")
    if not folder.is_dir():
        raise FileNotFoundError(f"DeepFloyd IF UNet folder not found: {folder}")
    for config, layout, where in (("config.yml", "original", folder), ("config.json", "diffusers", folder),
                                  ("unet/config.json", "diffusers", folder / "unet")):
        if (folder / config).is_file():
            return layout, where
    raise FileNotFoundError(
        f"{folder} holds neither layout of a DeepFloyd IF UNet: the original one (config.yml and "
        "pytorch_model.bin, as in DeepFloyd/IF-I-XL-v1.0) or the diffusers one (unet/config.json and "
        "unet/diffusion_pytorch_model.safetensors)"
    )


def read_config(path: str | Path) -> IFConfig:
    """The IFConfig of a model folder in either layout."""
    layout, folder = find_layout(path)
    if layout == "original":
        params = read_config_yml(folder / "config.yml")
        if not isinstance(params, dict) or not isinstance(params.get("params"), dict):
            raise ValueError(f"{folder / 'config.yml'} has no `params:` map (the UNetModel arguments)")
        return config_from_original(params["params"])
    return config_from_diffusers(json.loads((folder / "config.json").read_text()))


def load_unet(path: str | Path, dtype: torch.dtype | None = torch.float32, device="cpu") -> IFUNet:
    """An IF UNet from a folder in either layout (see the module docstring).

    `dtype` converts on the way in; None keeps the original config's `precision` (the
    diffusers files' dtype). device="meta" builds the full network without reading weights,
    so a folder with only the config is enough."""
    layout, folder = find_layout(path)
    cfg = read_config(folder)
    if dtype is None and layout == "original":
        dtype = PRECISIONS.get(cfg.precision, torch.float32)
    if str(device) == "meta":
        with torch.device("meta"):
            model = IFUNet(cfg)
        return model.to(dtype) if dtype is not None else model
    names = ORIGINAL_WEIGHTS if layout == "original" else DIFFUSERS_WEIGHTS
    weights = next((folder / n for n in names if (folder / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder} has a config but no weights (looked for {', '.join(names)}); "
                                "device='meta' builds the network without them")
    sd = load_state_dict(weights, allow_pickle=True)  # a .bin is read with torch.load(weights_only=True)
    if layout == "diffusers":
        check_family(sd, "deepfloyd", required=DIFFUSERS_REQUIRED)
        sd = to_original(sd, cfg)
    return IFUNet.from_state_dict(sd, cfg, dtype=dtype, device=device)
