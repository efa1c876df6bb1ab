"""SDXL UNet (models/unet.py) against diffusers' UNet2DConditionModel, and VAE files in the
diffusers layout (models/vae.py) against diffusers' AutoencoderKL.

Tiny random weights in the original sgm key layout (`model.diffusion_model.*`) are loaded into
our UNet with UNet.from_state_dict, and into diffusers through its own single-file converter
(`convert_ldm_unet_checkpoint`); both must predict the same noise. The rest checks the
full-size parameter count, strict loading of a whole SDXL file and the size conditioning.
"""
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from models.flux import Flux, FluxParams
from models.unet import UNet, UNetParams, infer_params, size_embedding
from models.vae import AutoEncoder, AutoEncoderParams

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 1e-5  # max abs difference, fp32
PREFIX = "model.diffusion_model."
POOLED = 32  # width of the pooled text vector; y = [pooled | 6 x 256 size embedding]
# 3 levels of widths 32, 64, 96; no attention at level 0, depth 1 at level 1, depth 2 at level 2
# and in the middle; heads of 16 channels (4 and 6 heads).
TINY = UNetParams(
    model_channels=32,
    channel_mult=[1, 2, 3],
    num_res_blocks=[2, 2, 2],
    transformer_depth=[0, 1, 2],
    transformer_depth_middle=2,
    context_dim=48,
    adm_in_channels=POOLED + 1536,
    num_head_channels=16,
)
BATCH, LATENT_HW, TEXT_LEN = 2, (8, 12), 7  # non-square; two downsamplings need multiples of 4


def random_unet_state_dict(params: UNetParams, seed: int = 0) -> dict[str, torch.Tensor]:
    """Original-layout keys with `model.diffusion_model.`, every tensor moved off its init: norm
    weights around 1, everything else (biases included) plus noise, so a skipped norm, a wrong
    key or a swapped GEGLU half changes the output."""
    torch.manual_seed(seed)
    sd = {}
    for key, tensor in UNet(params).state_dict().items():
        noise = torch.randn_like(tensor)
        is_norm_weight = tensor.ndim == 1 and key.endswith(".weight") and torch.all(tensor == 1)
        sd[PREFIX + key] = (1.0 + 0.2 * noise) if is_norm_weight else tensor + 0.05 * noise
    return sd


def diffusers_unet(sd: dict, params: UNetParams) -> UNet2DConditionModel:
    """The oracle, configured by hand from the same params (see REFERENCE 6.2 for the traps)."""
    levels = len(params.channel_mult)
    widths = [params.model_channels * m for m in params.channel_mult]
    has_attention = [depth > 0 for depth in params.transformer_depth]
    config = dict(
        sample_size=LATENT_HW[0],
        in_channels=params.in_channels,
        out_channels=params.out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention)),
        block_out_channels=tuple(widths),
        layers_per_block=params.num_res_blocks[0],  # the converter needs an int
        transformer_layers_per_block=tuple(max(d, 1) for d in params.transformer_depth),
        # "attention_head_dim" is the head COUNT per level in diffusers' UNet2DConditionModel
        attention_head_dim=tuple(w // params.num_head_channels for w in widths),
        use_linear_projection=True,
        cross_attention_dim=params.context_dim,
        addition_embed_type="text_time",  # label_emb -> add_embedding in the converter
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=params.adm_in_channels,
        norm_num_groups=32,
    )
    assert params.transformer_depth_middle == params.transformer_depth[-1]  # diffusers ties them
    assert levels == len(config["down_block_types"])
    model = UNet2DConditionModel(**config)
    converted = convert_ldm_unet_checkpoint(dict(sd), config)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def random_inputs(params: UNetParams, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    orig_hw, crop_tl, target_hw = [[1024, 768], [832, 1216]], [[0, 64], [32, 0]], [[1024, 768], [896, 1152]]
    return dict(
        x=torch.randn(BATCH, params.in_channels, *LATENT_HW, generator=g),
        timesteps=torch.tensor([999, 17]),
        context=torch.randn(BATCH, TEXT_LEN, params.context_dim, generator=g),
        pooled=torch.randn(BATCH, POOLED, generator=g),
        time_ids=torch.tensor([o + c + t for o, c, t in zip(orig_hw, crop_tl, target_hw)], dtype=torch.float32),
        sizes=(orig_hw, crop_tl, target_hw),
    )


def run_ours(model: UNet, inputs: dict) -> torch.Tensor:
    y = torch.cat([inputs["pooled"], size_embedding(*inputs["sizes"])], dim=1)
    with torch.no_grad():
        return model(inputs["x"], inputs["timesteps"], inputs["context"], y)


@pytest.fixture(scope="module")
def tiny():
    """(state dict, our output, diffusers' output) for TINY, computed once, on one thread like the
    tests that use it (a module fixture is made before the per-test one_thread fixture)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sd = random_unet_state_dict(TINY)
    inputs = random_inputs(TINY)
    ours = run_ours(UNet.from_state_dict(dict(sd), num_head_channels=16).eval(), inputs)
    with torch.no_grad():
        theirs = diffusers_unet(sd, TINY)(
            inputs["x"],
            inputs["timesteps"],
            encoder_hidden_states=inputs["context"],
            added_cond_kwargs={"text_embeds": inputs["pooled"], "time_ids": inputs["time_ids"]},
            return_dict=False,
        )[0]
    torch.set_num_threads(threads)
    return sd, ours, theirs


def test_matches_diffusers(tiny):
    _, ours, theirs = tiny
    assert ours.shape == (BATCH, 4, *LATENT_HW)
    assert ours.abs().mean() > 0.1  # not a degenerate near-zero output
    print("UNet vs diffusers: max abs difference", (ours - theirs).abs().max().item())
    assert (ours - theirs).abs().max() <= TOLERANCE


def test_a_perturbed_weight_shows(tiny):
    # one weight of the second transformer block of the deepest level, 1% larger
    sd, ours, _ = tiny
    key = PREFIX + "input_blocks.7.1.transformer_blocks.1.attn2.to_v.weight"
    perturbed = {**sd, key: sd[key] * 1.01}
    changed = run_ours(UNet.from_state_dict(perturbed, num_head_channels=16).eval(), random_inputs(TINY))
    print("perturbed UNet weight: max abs change", (changed - ours).abs().max().item())
    assert (changed - ours).abs().max() > 100 * TOLERANCE


def test_bf16_weights_run_close_to_fp32(tiny):
    sd, ours, _ = tiny
    model = UNet.from_state_dict(dict(sd), dtype=torch.bfloat16, num_head_channels=16).eval()
    inputs = random_inputs(TINY)
    y = torch.cat([inputs["pooled"], size_embedding(*inputs["sizes"])], dim=1).bfloat16()
    with torch.no_grad():
        out = model(inputs["x"].bfloat16(), inputs["timesteps"], inputs["context"].bfloat16(), y)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ours).abs().mean() < 0.02 * ours.abs().mean()


def test_every_block_is_called_as_a_module_once_in_order(tiny):
    # what checkpointing, block swap and LoRA rely on: hooks on the family's blocks (every
    # ResBlock and transformer block, families/sdxl.py) see every call, in execution order
    from families.sdxl import block_units

    sd, _, _ = tiny
    model = UNet.from_state_dict(dict(sd), num_head_channels=16).eval()
    calls = []
    units = block_units(model)
    for i, (_, block) in enumerate(units):
        block.register_forward_pre_hook(lambda module, args, i=i: calls.append(i))
    run_ours(model, random_inputs(TINY))
    assert calls == list(range(len(units)))
    resnets = 2 * 3 + 2 + 3 * 3  # per level in and out, middle
    transformer_blocks = 2 * 1 + 3 * 1 + 2 * 2 + 3 * 2 + 2  # level 1 in/out, level 2 in/out, middle
    assert len(calls) == resnets + transformer_blocks


def test_infers_every_field_from_the_shapes():
    sd = random_unet_state_dict(TINY)
    assert infer_params(sd, num_head_channels=16) == TINY
    # the head width is not in the shapes: without the override it is SDXL's 64
    assert infer_params(sd).num_head_channels == 64
    with pytest.raises(ValueError, match="num_head_channels=64"):
        UNet.from_state_dict(sd)  # 96 channels do not split into heads of 64


def test_full_size_parameter_count():
    with torch.device("meta"):
        model = UNet(UNetParams())
    assert sum(p.numel() for p in model.parameters()) == 2_567_463_684
    # the full-size key layout infers back to SDXL's params
    assert infer_params(model.state_dict()) == UNetParams()
    assert UNetParams().attention_resolutions == [2, 4]  # sgm's [4, 2]


def sdxl_like_checkpoint(unet_sd: dict) -> dict:
    """A whole single file: the UNet plus the keys its other loaders read."""
    others = {
        "first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
        "first_stage_model.quant_conv.weight": torch.zeros(8, 8, 1, 1),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
        "conditioner.embedders.1.model.logit_scale": torch.zeros(()),
        "conditioner.embedders.1.model.text_projection": torch.zeros(8, 8),
        "denoiser.sigmas": torch.ones(1000),
    }
    return {**unet_sd, **others}


def test_whole_checkpoint_loads_strictly(tiny):
    sd, ours, _ = tiny
    model = UNet.from_state_dict(sdxl_like_checkpoint(sd), num_head_channels=16).eval()
    assert torch.equal(run_ours(model, random_inputs(TINY)), ours)
    # a bare UNet file (no prefix) loads the same
    bare = {k[len(PREFIX) :]: v for k, v in sd.items()}
    assert torch.equal(run_ours(UNet.from_state_dict(bare, num_head_channels=16).eval(), random_inputs(TINY)), ours)
    # but a stray key inside the UNet's own section is an error that names it
    stray = {**sd, PREFIX + "input_blocks.1.0.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"1 unexpected(.|\n)*input_blocks\.1\.0\.extra\.weight"):
        UNet.from_state_dict(stray, num_head_channels=16)


@pytest.mark.parametrize("prefix", ["", PREFIX], ids=["bfl", "comfyui"])
def test_flux_checkpoint_is_named(prefix):
    with torch.device("meta"):
        flux_sd = Flux(FluxParams(depth=1, depth_single_blocks=1)).state_dict()
    with pytest.raises(ValueError, match="expected an SDXL checkpoint, but this file looks like a FLUX.1 transformer"):
        UNet.from_state_dict({prefix + k: v for k, v in flux_sd.items()})


def test_size_embedding_matches_diffusers_add_time_ids():
    from diffusers.models.embeddings import Timesteps

    add_time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)  # UNet2DConditionModel's
    orig_hw, crop_tl, target_hw = [[1024, 1024], [768, 1344]], [[0, 0], [48, 16]], [[1024, 1024], [832, 1216]]
    time_ids = torch.tensor([o + c + t for o, c, t in zip(orig_hw, crop_tl, target_hw)], dtype=torch.float32)
    expected = add_time_proj(time_ids.flatten()).reshape(2, -1)  # as UNet2DConditionModel.get_aug_embed
    ours = size_embedding(orig_hw, crop_tl, target_hw)
    assert ours.shape == (2, 1536)
    assert (ours - expected).abs().max() <= 1e-6
    # the [cos | sin] order of one scalar: crop top 0 gives cos 1 then sin 0
    assert torch.all(ours[0, 512:640] == 1) and torch.all(ours[0, 640:768] == 0)
    # one pair for a batch of one
    assert torch.equal(size_embedding((1024, 1024), (0, 0), (1024, 1024)), ours[:1])


def test_the_tiny_model_differs_from_a_wrong_size_conditioning(tiny):
    # y's size part reaches the output: a different crop changes the prediction
    sd, ours, _ = tiny
    inputs = random_inputs(TINY)
    orig_hw, crop_tl, target_hw = inputs["sizes"]
    inputs["sizes"] = (orig_hw, [[0, 0], [0, 0]], target_hw)
    other = run_ours(UNet.from_state_dict(dict(sd), num_head_channels=16).eval(), inputs)
    assert (other - ours).abs().max() > 100 * TOLERANCE


# --- VAE files in the diffusers layout ----------------------------------------------------------


def diffusers_layout_vae(seed: int = 0) -> AutoencoderKL:
    """A tiny SDXL-like AutoencoderKL (quant convs, 4 latent channels), every tensor moved off its init."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        scaling_factor=0.13025,
    )
    with torch.no_grad():
        for name, tensor in vae.state_dict().items():
            is_norm_weight = "norm" in name and name.endswith(".weight")
            tensor.copy_(1.0 + 0.2 * torch.randn_like(tensor) if is_norm_weight else tensor + 0.05 * torch.randn_like(tensor))
    return vae.eval()


def old_attention_names(sd: dict) -> dict:
    """The names of older diffusers files: query / key / value / proj_attn."""
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    out = {}
    for key, tensor in sd.items():
        for new, old in renames.items():
            key = key.replace(new, old)
        out[key] = tensor
    return out


@pytest.mark.parametrize("names", ["current", "old"])
def test_diffusers_layout_vae_matches_diffusers(names):
    oracle = diffusers_layout_vae()
    sd = oracle.state_dict()
    if names == "old":
        sd = old_attention_names(sd)
        assert "encoder.mid_block.attentions.0.query.weight" in sd
    ours = AutoEncoder.from_state_dict(sd).eval()
    expected = AutoEncoderParams(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=4, use_quant_conv=True,
                                 scale_factor=0.13025, shift_factor=0.0)
    assert ours.params == expected
    x = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(3)) * 2 - 1  # non-square
    with torch.no_grad():
        latent = ours.encode(x)
        reference_latent = 0.13025 * oracle.encode(x).latent_dist.mean
        decoded = ours.decode(latent)
        reference_decoded = oracle.decode(latent / 0.13025).sample
    assert latent.shape == (2, 4, 6, 10) and decoded.shape == x.shape
    assert latent.std() > 0.01 and decoded.std() > 0.1  # outputs carry signal
    print(f"VAE ({names} names) vs diffusers: latent {(latent - reference_latent).abs().max().item():.2e}, "
          f"decoded {(decoded - reference_decoded).abs().max().item():.2e}")
    assert (latent - reference_latent).abs().max() <= TOLERANCE
    assert (decoded - reference_decoded).abs().max() <= TOLERANCE


def test_diffusers_layout_vae_perturbed_weight_shows():
    oracle = diffusers_layout_vae()
    sd = dict(oracle.state_dict())
    key = "decoder.mid_block.attentions.0.to_v.weight"
    sd[key] = sd[key] * 1.05  # 5% larger
    latent = torch.randn(1, 4, 6, 10, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        changed = AutoEncoder.from_state_dict(sd).eval().decode(latent)
        reference = oracle.decode(latent / 0.13025).sample
    print("perturbed VAE weight: max abs change", (changed - reference).abs().max().item())
    assert (changed - reference).abs().max() > 100 * TOLERANCE
