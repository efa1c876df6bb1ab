"""FLUX.1 [dev] / [schnell] transformer with the module names of the reference code
(black-forest-labs/flux: src/flux/model.py, src/flux/modules/layers.py), so that
flux1-dev.safetensors and flux1-schnell.safetensors load with strict=True.

Shapes: B batch, L tokens, H hidden width (3072), D head dim (128).
An image latent (B, 16, h, w) becomes (B, h/2 * w/2, 64) tokens by `pack`.
"""
import re
from dataclasses import dataclass, field, replace

import torch
from einops import rearrange
from torch import Tensor, nn

from .layers import (
    EmbedND,
    MLPEmbedder,
    Modulation,
    QKNorm,
    TanhGELU,
    attention,
    gated_residual,
    gated_residual_norm_modulate,
    norm_modulate,
    qk_norm_rope,
    timestep_embedding,
    tokenwise,
)
from .loading import check_family, load_into, load_state_dict, strip_prefix


@dataclass
class FluxParams:
    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: list[int] = field(default_factory=lambda: [16, 56, 56])
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True  # dev: True, schnell: False


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor, pe: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, H) -> normed q, k and v (B, heads, L, D); rows of qkv are [q | k | v]."""
        q, k, v = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = qk_norm_rope(q, k, self.norm.query_norm.scale, self.norm.key_norm.scale, pe)
        return q, k.to(v.dtype), v


class DoubleStreamBlock(nn.Module):
    """Separate weights for the image and text streams, one joint attention over [txt, img].
    The reference's parameterless LayerNorms (img_norm1, ...) are folded into norm_modulate."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), TanhGELU(), nn.Linear(mlp_hidden, hidden_size))
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), TanhGELU(), nn.Linear(mlp_hidden, hidden_size))

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor, mask: Tensor | None = None):
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)

        # pe covers [txt, img] tokens: rotate each stream's q/k with its own slice.
        txt_len = txt.shape[1]
        img_q, img_k, img_v = self.img_attn.qkv_heads(
            norm_modulate(img, img_mod1.shift, img_mod1.scale), pe[:, :, txt_len:]
        )
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(
            norm_modulate(txt, txt_mod1.shift, txt_mod1.scale), pe[:, :, :txt_len]
        )
        q = torch.cat((txt_q, img_q), dim=2)
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        attn = attention(q, k, v, mask)
        txt_attn, img_attn = attn[:, :txt_len], attn[:, txt_len:]

        # x = x + gate1 * attn; x = x + gate2 * mlp(modulate2(LN(x))): the first residual update and
        # the MLP's input norm are one fused step (same result as gated_residual then norm_modulate).
        # The MLPs are token-wise (layers.tokenwise: in token chunks when the trainer asks).
        img, img_mlp_in = gated_residual_norm_modulate(
            img, img_mod1.gate, self.img_attn.proj(img_attn), img_mod2.shift, img_mod2.scale
        )
        img = gated_residual(img, img_mod2.gate, tokenwise(self.img_mlp, img_mlp_in))
        txt, txt_mlp_in = gated_residual_norm_modulate(
            txt, txt_mod1.gate, self.txt_attn.proj(txt_attn), txt_mod2.shift, txt_mod2.scale
        )
        txt = gated_residual(txt, txt_mod2.gate, tokenwise(self.txt_mlp, txt_mlp_in))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One weight set over [txt, img]; attention and MLP run in parallel from one linear1.
    The reference's parameterless pre_norm is folded into norm_modulate."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden_dim = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)  # [q | k | v | mlp_in]
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)  # [attn | mlp_act] -> H
        self.norm = QKNorm(hidden_size // num_heads)
        self.mlp_act = TanhGELU()
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor, mask: Tensor | None = None) -> Tensor:
        mod, _ = self.modulation(vec)
        x_mod = norm_modulate(x, mod.shift, mod.scale)
        # linear1 and linear2 (over [attention | GELU(mlp)]) are token-wise: layers.tokenwise runs them
        # in token chunks when the trainer asks (linear1 keeps nothing new, so it is not recomputed).
        qkv_mlp = tokenwise(self.linear1, x_mod, recompute=False)
        qkv, mlp = torch.split(qkv_mlp, [3 * self.hidden_dim, self.mlp_hidden_dim], dim=-1)
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = qk_norm_rope(q, k, self.norm.query_norm.scale, self.norm.key_norm.scale, pe)
        attn = attention(q, k.to(v.dtype), v, mask)
        output = tokenwise(lambda a, m: self.linear2(torch.cat((a, self.mlp_act(m)), dim=2)), attn, mlp)
        return gated_residual(x, mod.gate, output)


class LastLayer(nn.Module):
    """(shift, scale) modulation of the final LayerNorm (parameterless: folded into norm_modulate)."""

    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)  # (shift, scale) order
        return self.linear(norm_modulate(x, shift, scale))


class Flux(nn.Module):
    """The FLUX.1 flow transformer.

    `double_blocks` and `single_blocks` are the repeated blocks. Gradient checkpointing, block
    swap and LoRA act on them from outside (activations.py, blockswap.py, lora.py), through the
    lists families/flux.py names; the forward below is the reference's.
    """

    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = params
        p = params
        if p.hidden_size % p.num_heads:
            raise ValueError(f"hidden_size {p.hidden_size} is not divisible by num_heads {p.num_heads}")
        head_dim = p.hidden_size // p.num_heads
        if sum(p.axes_dim) != head_dim:
            raise ValueError(f"sum(axes_dim)={sum(p.axes_dim)} must equal the head dim {head_dim}; pass axes_dim=")
        self.in_channels = p.in_channels
        self.out_channels = p.out_channels
        self.hidden_size = p.hidden_size
        self.num_heads = p.num_heads
        self.pe_embedder = EmbedND(dim=head_dim, theta=p.theta, axes_dim=p.axes_dim)
        self.img_in = nn.Linear(p.in_channels, p.hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=256, hidden_dim=p.hidden_size)
        self.vector_in = MLPEmbedder(p.vec_in_dim, p.hidden_size)
        self.guidance_in = MLPEmbedder(in_dim=256, hidden_dim=p.hidden_size) if p.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(p.context_in_dim, p.hidden_size)
        self.double_blocks = nn.ModuleList(
            [DoubleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio, p.qkv_bias) for _ in range(p.depth)]
        )
        self.single_blocks = nn.ModuleList(
            [SingleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio) for _ in range(p.depth_single_blocks)]
        )
        self.final_layer = LastLayer(p.hidden_size, p.out_channels)

    def forward(
        self,
        img: Tensor,  # (B, L_img, in_channels) packed latent tokens
        img_ids: Tensor,  # (B, L_img, 3)
        txt: Tensor,  # (B, L_txt, context_in_dim) T5 states
        txt_ids: Tensor,  # (B, L_txt, 3)
        timesteps: Tensor,  # (B,) in [0, 1]
        y: Tensor,  # (B, vec_in_dim) CLIP pooled
        guidance: Tensor | None = None,  # (B,) in the same units as timesteps
        txt_mask: Tensor | None = None,  # optional (B, L_txt) bool, True = attend
    ) -> Tensor:
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError("img and txt must be (B, L, C) token tensors; use pack() for latents")
        dtype = self.img_in.weight.dtype if self.img_in.weight.is_floating_point() else img.dtype
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256).to(dtype))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("this is a guidance-distilled model (dev): pass guidance")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(dtype))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)

        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        mask = None
        if txt_mask is not None:  # image tokens always attend
            mask = torch.cat((txt_mask.bool(), torch.ones(img.shape[:2], dtype=torch.bool, device=img.device)), 1)

        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe, mask)
        x = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            x = block(x, vec, pe, mask)
        img = x[:, txt.shape[1] :, ...]
        return self.final_layer(img, vec)  # (B, L_img, out_channels)

    @classmethod
    def from_state_dict(cls, sd: dict, dtype: torch.dtype | None = None, device=None, **overrides) -> "Flux":
        """Build from an original BFL (or ComfyUI `model.diffusion_model.`) state dict.

        The model is built on the meta device and the tensors are assigned, not copied, so a
        memory-mapped 24 GB file never exists twice. `dtype` converts on the way in (None keeps
        the file's dtype; fp8 files are upcast to bf16 unless a dtype is given)."""
        sd = strip_prefix(sd, PREFIXES)[0]
        params = infer_params(sd, **overrides)
        with torch.device("meta"):
            model = cls(params)
        load_into(model, sd, dtype=dtype, device=device, what="FLUX.1 transformer")
        return model


def load(path, dtype: torch.dtype | None = None, device=None, allow_pickle: bool = False, **overrides) -> Flux:
    """Flux from a file, a sharded index or a folder (memory-mapped; see models/loading.py)."""
    return Flux.from_state_dict(load_state_dict(path, allow_pickle=allow_pickle), dtype=dtype, device=device, **overrides)


PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def _count_blocks(sd: dict, kind: str) -> int:
    pattern = re.compile(rf"^{kind}\.(\d+)\.")
    indices = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    if indices and indices != set(range(len(indices))):
        raise ValueError(f"{kind} indices are not contiguous: {sorted(indices)}")
    return len(indices)


def infer_params(sd: dict, **overrides) -> FluxParams:
    """FluxParams from the keys and shapes of an original checkpoint."""
    sd = strip_prefix(sd, PREFIXES)[0]
    check_family(sd, "flux", required=("img_in.weight", "txt_in.weight", "final_layer.linear.weight"))
    hidden, in_channels = sd["img_in.weight"].shape
    depth = _count_blocks(sd, "double_blocks")
    depth_single = _count_blocks(sd, "single_blocks")
    norm_key = "double_blocks.0.img_attn.norm.query_norm.scale" if depth else "single_blocks.0.norm.query_norm.scale"
    head_dim = sd[norm_key].shape[0]
    if depth:
        mlp_hidden = sd["double_blocks.0.img_mlp.0.weight"].shape[0]
    else:
        mlp_hidden = sd["single_blocks.0.linear1.weight"].shape[0] - 3 * hidden
    params = FluxParams(
        in_channels=in_channels,
        out_channels=sd["final_layer.linear.weight"].shape[0],
        vec_in_dim=sd["vector_in.in_layer.weight"].shape[1],
        context_in_dim=sd["txt_in.weight"].shape[1],
        hidden_size=hidden,
        mlp_ratio=mlp_hidden / hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        depth_single_blocks=depth_single,
        qkv_bias=(not depth) or "double_blocks.0.img_attn.qkv.bias" in sd,
        guidance_embed="guidance_in.in_layer.weight" in sd,
    )
    return replace(params, **overrides)


def variant(params: FluxParams) -> str:
    """'dev' or 'schnell' (the guidance embedder is what tells them apart)."""
    return "dev" if params.guidance_embed else "schnell"


# --- latents <-> tokens ------------------------------------------------------------------------


def pack(latent: Tensor) -> Tensor:
    """(B, C, h, w) latent -> (B, h/2 * w/2, C*4) tokens, channel order (c, ph, pw), row-major."""
    return rearrange(latent, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack(tokens: Tensor, latent_h: int, latent_w: int) -> Tensor:
    """Inverse of pack for a latent of (latent_h, latent_w)."""
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=latent_h // 2, w=latent_w // 2, ph=2, pw=2)


def img_ids(batch: int, latent_h: int, latent_w: int, device=None, dtype=torch.float32) -> Tensor:
    """(B, h/2 * w/2, 3): axis 0 zero, axis 1 row, axis 2 column, row-major."""
    h, w = latent_h // 2, latent_w // 2
    ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w, device=device, dtype=dtype)[None, :]
    return ids.reshape(1, h * w, 3).expand(batch, -1, -1)


def txt_ids(batch: int, txt_len: int, device=None, dtype=torch.float32) -> Tensor:
    """(B, L_txt, 3) zeros: text tokens get the identity rotation."""
    return torch.zeros(batch, txt_len, 3, device=device, dtype=dtype)


# --- the family surface used by train.py and sample.py ------------------------------------------


def default_t5_max_length(params: FluxParams) -> int:
    """512 tokens for dev, 256 for schnell (black-forest-labs/flux: cli.py)."""
    return 512 if params.guidance_embed else 256


def image_seq_len(latent_h: int, latent_w: int) -> int:
    return (latent_h // 2) * (latent_w // 2)


def denoise(model: Flux, x_t: Tensor, sigma: Tensor, cond: dict, guidance: Tensor | None) -> Tensor:
    """Run the transformer on a latent (B, C, h, w) at noise level sigma (B,) in [0, 1].

    cond holds "t5" (B, L, 4096), "clip_pooled" (B, 768) and optionally "t5_mask" (B, L).
    Returns the model output unpacked to (B, C, h, w) (the velocity noise - x0 when trained)."""
    b, _, h, w = x_t.shape
    dtype = model.img_in.weight.dtype if model.img_in.weight.is_floating_point() else x_t.dtype
    txt = cond["t5"].to(dtype)
    out = model(
        img=pack(x_t).to(dtype),
        img_ids=img_ids(b, h, w, device=x_t.device),
        txt=txt,
        txt_ids=txt_ids(b, txt.shape[1], device=x_t.device),
        timesteps=sigma.float(),  # fp32: the embedding multiplies by 1000
        y=cond["clip_pooled"].to(dtype),
        guidance=guidance.float() if (guidance is not None and model.params.guidance_embed) else None,
        txt_mask=cond.get("t5_mask"),
    )
    return unpack(out.to(x_t.dtype), h, w)
