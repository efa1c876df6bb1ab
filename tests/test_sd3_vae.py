"""The SD3 / SD3.5 VAE through models/vae.py: the `first_stage_model.` section of an all-in-one
checkpoint, latent scale 1.5305 and shift 0.0609 inferred from that layout, against diffusers'
AutoencoderKL configured as diffusers' SD3 VAE (scaling_factor 1.5305, shift_factor 0.0609) and
loaded through its LDM converter."""
import pytest
import torch
from test_vae import diffusers_vae, images, random_vae_state_dict

from models.vae import AutoEncoder, AutoEncoderParams

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 1e-5  # max abs difference, fp32
# diffusers' stabilityai/stable-diffusion-3*-/vae/config.json values, written here independently of vae.py
SD3_SCALING_FACTOR, SD3_SHIFT_FACTOR = 1.5305, 0.0609


def all_in_one_state_dict(params: AutoEncoderParams) -> dict:
    """A tiny SD3-like file: the VAE under first_stage_model., beside a transformer and text encoders."""
    sd = random_vae_state_dict(params, prefix="first_stage_model.", seed=3)
    sd["model.diffusion_model.x_embedder.proj.weight"] = torch.zeros(64, 16, 2, 2)
    sd["model.diffusion_model.pos_embed"] = torch.zeros(1, 16, 64)
    sd["text_encoders.clip_g.transformer.text_model.final_layer_norm.weight"] = torch.zeros(8)
    sd["text_encoders.t5xxl.transformer.shared.weight"] = torch.zeros(10, 8)
    return sd


def test_sd3_vae_matches_diffusers():
    # 4 levels like the released VAE (ch_mult 1, 2, 4, 4), at ch 32; 16 latent channels, no quant convs
    params = AutoEncoderParams(ch=32, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=16,
                               scale_factor=SD3_SCALING_FACTOR, shift_factor=SD3_SHIFT_FACTOR)
    sd = all_in_one_state_dict(params)
    # float64 on both sides: in fp32 diffusers' own rounding on this 4-level decoder reaches 1.7e-5
    # (measured against its float64 result; ours 6e-6), above the tolerance.
    ours = AutoEncoder.from_state_dict(sd, dtype=torch.float64).eval()
    assert ours.params == params  # scale and shift inferred from the first_stage_model. layout
    oracle = diffusers_vae(sd, params).double()
    assert (oracle.config.scaling_factor, oracle.config.shift_factor) == (SD3_SCALING_FACTOR, SD3_SHIFT_FACTOR)
    scale, shift = oracle.config.scaling_factor, oracle.config.shift_factor
    x = images().double()
    with torch.no_grad():
        latent = ours.encode(x)
        reference_latent = (oracle.encode(x).latent_dist.mean - shift) * scale  # diffusers' SD3 pipelines
        decoded = ours.decode(latent)
        reference_decoded = oracle.decode(latent / scale + shift).sample
    assert latent.shape == (2, 16, 6, 8)
    assert (latent - reference_latent).abs().max() <= TOLERANCE
    assert (decoded - reference_decoded).abs().max() <= TOLERANCE
    assert latent.std() > 1000 * TOLERANCE and decoded.std() > 1000 * TOLERANCE  # outputs carry signal
    # and the scaling matters: FLUX's constants would give another latent
    assert (ours.moments(x)[0] - reference_latent).abs().max() > 100 * TOLERANCE
