"""models/vae.py against diffusers' AutoencoderKL (an independent implementation), loaded from the
same tiny random state dicts in the original key layout through diffusers' own LDM converter."""
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from models.flux import Flux, FluxParams
from models.vae import AutoEncoder, AutoEncoderParams, infer_params

TOLERANCE = 1e-5  # max abs difference, fp32


def random_vae_state_dict(params: AutoEncoderParams, prefix: str = "", seed: int = 0) -> dict:
    """Original-layout weights from our module at random init, with every GroupNorm moved away
    from the identity (weight 1, bias 0) so that a skipped or misplaced norm shows."""
    torch.manual_seed(seed)
    model = AutoEncoder(params)
    for module in model.modules():
        if isinstance(module, torch.nn.GroupNorm):
            torch.nn.init.normal_(module.weight, mean=1.0, std=0.2)
            torch.nn.init.normal_(module.bias, std=0.2)
    return {prefix + k: v.detach().clone() for k, v in model.state_dict().items()}


def diffusers_vae(sd: dict, params: AutoEncoderParams) -> AutoencoderKL:
    """The oracle, its config written by hand from the same params."""
    levels = len(params.ch_mult)
    config = dict(
        in_channels=params.in_channels,
        out_channels=params.out_ch,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(params.ch * m for m in params.ch_mult),
        layers_per_block=params.num_res_blocks,
        latent_channels=params.z_channels,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=params.scale_factor,
        shift_factor=params.shift_factor,
        use_quant_conv=params.use_quant_conv,
        use_post_quant_conv=params.use_quant_conv,
    )
    vae = AutoencoderKL(**config)
    converted = convert_ldm_vae_checkpoint(dict(sd), config)  # the converter may modify what it is given
    vae.load_state_dict(converted, strict=True)
    return vae.eval()


def images(seed: int = 1) -> torch.Tensor:
    """Batch 2, non-square 48 x 64, in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, 48, 64, generator=generator) * 2 - 1


def compare_with_diffusers(sd: dict, expected: AutoEncoderParams):
    ours = AutoEncoder.from_state_dict(sd).eval()
    assert ours.params == expected
    oracle = diffusers_vae(sd, expected)
    scale, shift = expected.scale_factor, expected.shift_factor
    x = images()
    with torch.no_grad():
        latent = ours.encode(x)
        reference_latent = scale * (oracle.encode(x).latent_dist.mean - shift)
        levels = len(expected.ch_mult)
        assert latent.shape == (2, expected.z_channels, 48 >> (levels - 1), 64 >> (levels - 1))
        assert (latent - reference_latent).abs().max() <= TOLERANCE

        decoded = ours.decode(latent)
        reference_decoded = oracle.decode(latent / scale + shift).sample
        assert decoded.shape == x.shape
        assert (decoded - reference_decoded).abs().max() <= TOLERANCE
        # not a vacuous match: the outputs carry signal
        assert latent.std() > 1000 * TOLERANCE and decoded.std() > 1000 * TOLERANCE


def test_flux_layout_matches_diffusers():
    # 3 levels: up.1 and up.2 have equal shapes, so only the numbers show a wrong up order.
    params = AutoEncoderParams(ch=32, ch_mult=[1, 2, 2], num_res_blocks=2, z_channels=16)
    compare_with_diffusers(random_vae_state_dict(params), params)


def test_sdxl_layout_matches_diffusers():
    params = AutoEncoderParams(
        ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, use_quant_conv=True, scale_factor=0.13025, shift_factor=0.0
    )
    sd = random_vae_state_dict(params, prefix="first_stage_model.", seed=2)
    # a full SDXL file also holds the UNet and text encoders: only the VAE keys must be used
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)
    sd["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.zeros(1)
    compare_with_diffusers(sd, params)


def tiny_16ch_state_dict(prefix: str = "") -> dict:
    return random_vae_state_dict(AutoEncoderParams(ch=32, ch_mult=[1, 2], num_res_blocks=1), prefix=prefix)


def test_latent_scaling_is_picked_from_the_layout():
    flux = AutoEncoder.from_state_dict(tiny_16ch_state_dict())
    assert (flux.scale_factor, flux.shift_factor) == (0.3611, 0.1159)
    sd3 = AutoEncoder.from_state_dict(tiny_16ch_state_dict("first_stage_model."))
    assert (sd3.scale_factor, sd3.shift_factor) == (1.5305, 0.0609)
    overridden = AutoEncoder.from_state_dict(tiny_16ch_state_dict(), shift_factor=0.0)
    assert (overridden.scale_factor, overridden.shift_factor) == (0.3611, 0.0)

    # 4 channels without quant convs (an SD1.x-style VAE) has no default: the error says what to pass
    four_channels = AutoEncoderParams(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4)
    with pytest.raises(ValueError, match="scale_factor= and shift_factor="):
        AutoEncoder.from_state_dict(random_vae_state_dict(four_channels))
    sd1 = AutoEncoder.from_state_dict(random_vae_state_dict(four_channels), scale_factor=0.18215, shift_factor=0.0)
    assert sd1.scale_factor == 0.18215


def test_full_size_flux_ae_on_meta():
    with torch.device("meta"):
        model = AutoEncoder(AutoEncoderParams())
    assert sum(p.numel() for p in model.parameters()) == 83_819_683
    # the full-size key layout infers back to the FLUX params
    assert infer_params(model.state_dict()) == AutoEncoderParams()


def test_transformer_state_dict_is_refused():
    with torch.device("meta"):
        transformer_sd = Flux(FluxParams()).state_dict()
    with pytest.raises(ValueError, match="autoencoder.*looks like a FLUX.1 transformer"):
        AutoEncoder.from_state_dict(transformer_sd)


def test_diffusers_layout_round_trips():
    # original -> diffusers' converter -> our diffusers_vae_to_original: the same tensors under the same keys
    params = AutoEncoderParams(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1)
    original = random_vae_state_dict(params)
    diffusers_sd = diffusers_vae(original, params).state_dict()
    back = AutoEncoder.from_state_dict(diffusers_sd).state_dict()
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_sample_is_reproducible_and_differs_from_mean():
    model = AutoEncoder.from_state_dict(tiny_16ch_state_dict()).eval()
    x = images()
    with torch.no_grad():
        mean = model.encode(x)
        first = model.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
        again = model.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
        other = model.encode(x, sample=True, generator=torch.Generator().manual_seed(8))
        # the draw is mean + std * noise, scaled like the mean
        z, logvar = model.moments(x)
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(7))
        expected = model.scale_factor * (z + torch.exp(0.5 * logvar) * noise - model.shift_factor)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert (first - mean).abs().mean() > 1e-3
    torch.testing.assert_close(first, expected)


def test_encoder_or_decoder_alone():
    sd = tiny_16ch_state_dict()
    full = AutoEncoder.from_state_dict(sd).eval()
    encoder_only = AutoEncoder.from_state_dict(sd, parts=("encoder",)).eval()
    decoder_only = AutoEncoder.from_state_dict({k: v for k, v in sd.items() if k.startswith("decoder.")}, parts=("decoder",))
    assert encoder_only.decoder is None and decoder_only.encoder is None
    x = images()
    with torch.no_grad():
        latent = encoder_only.encode(x)
        assert torch.equal(latent, full.encode(x))
        assert torch.equal(decoder_only.eval().decode(latent), full.decode(latent))
    with pytest.raises(RuntimeError, match="without its decoder"):
        encoder_only.decode(latent)


def test_loads_in_the_requested_dtype():
    model = AutoEncoder.from_state_dict(tiny_16ch_state_dict(), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
