"""Model definitions with the original checkpoints' module names, and the small glue that
train.py and sample.py use so they never branch on a file layout:

- `load_codec(ae_path)`: images <-> what the denoiser sees. The VAE for real models; pixels
  as they are when no autoencoder is given (the CPU demo trains on tiny images directly).
- `load_text_encoder(...)`: prompts -> conditioning tensors (see models/text.py).
"""
import torch
from torch import Tensor

from .loading import file_identity, load_state_dict


class VAECodec:
    """The autoencoder: encode to scaled latents (the mean), decode back to pixels."""

    def __init__(self, path: str, dtype: torch.dtype, device, **overrides):
        from .vae import AutoEncoder

        # overrides: AutoEncoderParams fields, e.g. a family's scale_factor and shift_factor
        self.vae = AutoEncoder.from_state_dict(load_state_dict(path), dtype=dtype, device=device, **overrides).eval()
        self.vae.requires_grad_(False)
        self.channels = self.vae.params.z_channels
        self.downscale = 2 ** (len(self.vae.params.ch_mult) - 1)  # 8 for the released autoencoders
        self.dtype = dtype
        self.identity = f"vae:{file_identity(path)}:{dtype}" + "".join(f":{k}={v}" for k, v in sorted(overrides.items()))

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        device = next(self.vae.parameters()).device
        return self.vae.encode(pixels.to(device, self.dtype)).float()

    @torch.no_grad()
    def decode(self, latent: Tensor, tile: int = 0) -> Tensor:
        """Pixels of a latent; with tile > 0 the decoder's upsampling half runs in overlapping
        tiles of tile x tile latent pixels (models/vae.py decode_tiled), seams blended."""
        from .vae import decode_tiled

        device = next(self.vae.parameters()).device
        z = latent.to(device, self.dtype)
        pixels = decode_tiled(self.vae, z, tile, max(1, tile // 8)) if tile else self.vae.decode(z)
        return pixels.float()

    def decode_bytes(self, latent: Tensor) -> int:
        """Activation bytes of a whole (untiled) decode of this latent."""
        from .vae import decoder_peak_bytes

        return decoder_peak_bytes(self.vae.params, latent.shape[-2], latent.shape[-1], latent.shape[0], self.dtype)

    def to(self, device) -> "VAECodec":
        self.vae.to(device)
        return self


class PixelCodec:
    """No autoencoder: the 'latent' is the image itself, 3 channels at full size."""

    downscale = 1
    channels = 3
    identity = "pixels"

    def encode(self, pixels: Tensor) -> Tensor:
        return pixels.float()

    def decode(self, latent: Tensor, tile: int = 0) -> Tensor:
        return latent.float()

    def decode_bytes(self, latent: Tensor) -> int:
        return 0

    def to(self, device) -> "PixelCodec":
        return self


def load_codec(ae_path: str, dtype: torch.dtype = torch.bfloat16, device="cpu", **overrides):
    return VAECodec(ae_path, dtype, device, **overrides) if ae_path else PixelCodec()


class FluxPromptEncoder:
    """Prompts -> {"t5": (B, L, 4096), "clip_pooled": (B, 768)[, "t5_mask": (B, L)]}, the
    tensors models.flux.denoise takes and cache.TextCache stores."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.identity = encoder.identity

    def tokens_lost(self, caption: str) -> dict[str, int]:
        return self.encoder.tokens_lost(caption)

    def networks(self) -> dict:
        return self.encoder.networks()

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        out = self.encoder(list(prompts))
        cond = {"t5": out.t5.float(), "clip_pooled": out.clip_pooled.float()}
        if out.t5_mask is not None:
            cond["t5_mask"] = out.t5_mask.bool()
        return cond


def load_text_encoder(clip_path: str, t5_path: str, clip_tokenizer: str = "", t5_tokenizer: str = "",
                      max_length: int = 512, apply_mask: bool = False, dtype=torch.bfloat16, device="cpu"):
    from .text import FluxTextEncoder

    encoder = FluxTextEncoder.load(clip_path, t5_path, clip_tokenizer=clip_tokenizer or None,
                                   t5_tokenizer=t5_tokenizer or None, t5_max_length=max_length,
                                   apply_t5_attn_mask=apply_mask, dtype=dtype, device=device)
    return FluxPromptEncoder(encoder)
