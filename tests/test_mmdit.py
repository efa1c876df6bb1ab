"""SD3 / SD3.5 MMDiT (models/mmdit.py) against two independent implementations: diffusers'
SD3Transformer2DModel (through its single-file converter) and Stability AI's reference
`mmditx.MMDiTX` (vendored unchanged under tests/oracles/sd3_5/). Tiny random weights in the
original key layout; every parameter and the pos_embed buffer are moved off their initial values.

The rest: full-size parameter counts on the meta device, inference of the config from shapes,
strict loading from an all-in-one dict, clear errors for other families, skip_layers, and
kohya's multi-resolution options (random crop and scaled positional embeddings).
"""
import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.flux import Flux, FluxParams
from models.layers import sincos_pos_embed_2d
from models.mmdit import MMDiT, MMDiTParams, infer_params, scaled_pos_embed_table

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 1e-5  # max abs difference, fp32
PREFIX = "model.diffusion_model."
SMALL = dict(adm_in_channels=24, context_embedder_in_features=40)
# Tiny stand-ins for the released variants (hidden = 64 x depth, heads = depth, as the reference).
CONFIGS = {
    # no qk-norm, no attn2; P = 6 covers the 4 x 6 patch grid exactly in width
    "sd3_medium": MMDiTParams(depth=2, pos_embed_max_size=6, **SMALL),
    # qk-norm, attn2 on blocks 0 and 1 (not the last), P much larger than needed
    "sd3.5_medium": MMDiTParams(depth=3, pos_embed_max_size=16, qk_norm="rms", x_block_self_attn_layers=(0, 1),
                                **SMALL),
    # qk-norm, no attn2, odd margins around the crop
    "sd3.5_large": MMDiTParams(depth=4, pos_embed_max_size=7, qk_norm="rms", **SMALL),
}
LATENT = (16, 8, 12)  # (C, H, W): non-square, 4 x 6 patches of 2 x 2
CONTEXT_LEN = 7
BATCH = 2


def random_state_dict(params: MMDiTParams, seed: int = 0, prefix: str = "") -> dict[str, torch.Tensor]:
    """Original-layout weights: our module at random init, every tensor then moved off its init
    (the QK-norm weights away from 1, the pos_embed buffer from 0, the rest by added noise)."""
    torch.manual_seed(seed)
    model = MMDiT(params)
    sd = {}
    for key, tensor in model.state_dict().items():
        noise = torch.randn_like(tensor)
        if key.endswith(("ln_q.weight", "ln_k.weight")):
            sd[prefix + key] = 1.0 + 0.3 * noise
        elif key == "pos_embed":
            sd[prefix + key] = 0.5 * noise
        else:
            sd[prefix + key] = tensor + 0.02 * noise
    return sd


def random_inputs(params: MMDiTParams, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(BATCH, *LATENT, generator=g),
        t=torch.tensor([0.3, 0.85]) * 1000,  # sigma * 1000
        y=torch.randn(BATCH, params.adm_in_channels, generator=g),
        context=torch.randn(BATCH, CONTEXT_LEN, params.context_embedder_in_features, generator=g),
    )


def diffusers_model(sd: dict, params: MMDiTParams):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    model = SD3Transformer2DModel(
        sample_size=32, patch_size=params.patch_size, in_channels=params.in_channels, num_layers=params.depth,
        attention_head_dim=64, num_attention_heads=params.num_heads,
        joint_attention_dim=params.context_embedder_in_features, caption_projection_dim=params.hidden_size,
        pooled_projection_dim=params.adm_in_channels, out_channels=params.out_channels,
        pos_embed_max_size=params.pos_embed_max_size, dual_attention_layers=params.x_block_self_attn_layers,
        qk_norm="rms_norm" if params.qk_norm else None,
    )
    original = dict(sd)  # the converter pops from (and renames in) the dict it is given
    converted = convert_sd3_transformer_checkpoint_to_diffusers(original)
    assert not original, f"the converter left keys unconverted: {sorted(original)}"
    model.load_state_dict(converted, strict=True)
    return model.eval()


def run_diffusers(model, x: dict, skip_layers=None) -> torch.Tensor:
    return model(hidden_states=x["x"], encoder_hidden_states=x["context"], pooled_projections=x["y"],
                 timestep=x["t"], skip_layers=skip_layers, return_dict=False)[0]


def reference_model(sd: dict, params: MMDiTParams):
    """mmditx.MMDiTX built the way sd3_impls.BaseModel builds it."""
    oracle_dir = str(Path(__file__).parent / "oracles" / "sd3_5")
    if oracle_dir not in sys.path:
        sys.path.insert(0, oracle_dir)  # mmditx.py imports other_impls by its top-level name
    import mmditx

    P = params.pos_embed_max_size
    model = mmditx.MMDiTX(
        input_size=None, pos_embed_scaling_factor=None, pos_embed_offset=None, pos_embed_max_size=P,
        patch_size=params.patch_size, in_channels=params.in_channels, depth=params.depth, num_patches=P * P,
        adm_in_channels=params.adm_in_channels, qk_norm=params.qk_norm,
        context_embedder_config={"target": "torch.nn.Linear", "params": {
            "in_features": params.context_embedder_in_features, "out_features": params.hidden_size}},
        x_block_self_attn_layers=list(params.x_block_self_attn_layers),
    )
    model.load_state_dict(sd, strict=True)
    return model.eval()


def load_ours(sd: dict, **overrides) -> MMDiT:
    return MMDiT.from_state_dict(dict(sd), **overrides).eval()


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_diffusers_and_the_reference(name):
    params = CONFIGS[name]
    sd = random_state_dict(params)
    x = random_inputs(params)
    with torch.no_grad():
        ours = load_ours({PREFIX + k: v for k, v in sd.items()})(**x)
        theirs = run_diffusers(diffusers_model(sd, params), x)
        reference = reference_model(sd, params)(**x)
    assert ours.shape == (BATCH, *LATENT)
    assert ours.abs().mean() > 0.1  # not a degenerate near-zero output
    to_diffusers, to_reference = (ours - theirs).abs().max().item(), (ours - reference).abs().max().item()
    print(f"{name}: max |ours - diffusers| {to_diffusers:.2e}, max |ours - reference| {to_reference:.2e}")
    assert to_diffusers <= TOLERANCE
    assert to_reference <= TOLERANCE


# One element of one tensor, changed in our copy only, must show against the oracle.
PERTURBATIONS = {
    "attn2": "joint_blocks.0.x_block.attn2.qkv.weight",
    "ln_k": "joint_blocks.2.context_block.attn.ln_k.weight",
    "pre_only_adaLN": "joint_blocks.2.context_block.adaLN_modulation.1.weight",
    "final_layer": "final_layer.adaLN_modulation.1.bias",
}


@pytest.mark.parametrize("key", PERTURBATIONS.values(), ids=PERTURBATIONS.keys())
def test_a_perturbed_weight_fails_the_comparison(key):
    params = CONFIGS["sd3.5_medium"]
    sd = random_state_dict(params)
    x = random_inputs(params)
    changed = dict(sd)
    changed[key] = sd[key].clone()
    changed[key].view(-1)[0] += 1.0
    with torch.no_grad():
        theirs = run_diffusers(diffusers_model(sd, params), x)
        same = (load_ours(sd)(**x) - theirs).abs().max().item()
        perturbed = (load_ours(changed)(**x) - theirs).abs().max().item()
    assert same <= TOLERANCE
    assert perturbed > 10 * TOLERANCE  # measured: 4e-4 (pre_only adaLN) to 1e-2


def test_pos_embed_is_centre_cropped():
    """Only the centre window of pos_embed matters: a change outside it leaves the output
    unchanged, a change inside it does not."""
    params = CONFIGS["sd3.5_medium"]  # P = 16, grid 4 x 6: rows 6..9, columns 5..10
    sd = random_state_dict(params)
    x = random_inputs(params)
    P = params.pos_embed_max_size
    outside, inside = dict(sd), dict(sd)
    change = torch.randn(params.hidden_size)  # not a constant: LayerNorm would remove that
    outside["pos_embed"] = sd["pos_embed"].clone()
    outside["pos_embed"][0, 5 * P + 5] += change  # row 5: just above the window
    inside["pos_embed"] = sd["pos_embed"].clone()
    inside["pos_embed"][0, 6 * P + 5] += change  # the window's top-left cell
    with torch.no_grad():
        base = load_ours(sd)(**x)
        assert torch.equal(load_ours(outside)(**x), base)
        assert (load_ours(inside)(**x) - base).abs().max().item() > 1e-3


def test_sincos_table_matches_the_reference():
    """layers.sincos_pos_embed_2d with integer coordinates is the table the checkpoints store."""
    reference_model(random_state_dict(CONFIGS["sd3_medium"]), CONFIGS["sd3_medium"])  # puts mmditx on the path
    import mmditx

    ours = sincos_pos_embed_2d(64, torch.arange(5.0), torch.arange(5.0))
    reference = torch.from_numpy(mmditx.get_2d_sincos_pos_embed(64, 5))
    assert ours.shape == (25, 64)
    assert (ours - reference).abs().max() <= 1e-12


# --- full size --------------------------------------------------------------------------------

FULL_SIZE = {
    "sd3_medium": (MMDiTParams(), 2_028_328_000),
    "sd3.5_medium": (MMDiTParams(pos_embed_max_size=384, qk_norm="rms", x_block_self_attn_layers=tuple(range(13))),
                     2_243_171_520),
    "sd3.5_large": (MMDiTParams(depth=38, qk_norm="rms"), 8_056_627_520),
}


@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_parameter_count_and_inference(name):
    params, count = FULL_SIZE[name]
    with torch.device("meta"):
        shapes = {PREFIX + k: v for k, v in MMDiT(params).state_dict().items()}  # a shape-only checkpoint
    assert infer_params(shapes) == params
    model = MMDiT.from_state_dict(shapes)
    assert model.params == params
    assert sum(p.numel() for p in model.parameters()) == count  # pos_embed apart: a buffer
    assert [name for name, _ in model.named_buffers()] == ["pos_embed"]
    assert model.pos_embed.shape == (1, params.pos_embed_max_size**2, 64 * params.depth)


def test_inference_of_every_field_from_a_tiny_checkpoint():
    odd = MMDiTParams(depth=3, patch_size=4, in_channels=8, out_channels=4, pos_embed_max_size=5,
                      adm_in_channels=12, context_embedder_in_features=20, mlp_ratio=2.0, qkv_bias=False,
                      qk_norm="rms", x_block_self_attn_layers=(1,))
    for params in [*CONFIGS.values(), odd]:
        assert infer_params(random_state_dict(params)) == params
    model = load_ours(random_state_dict(odd))
    x = torch.randn(1, 8, 12, 16)
    with torch.no_grad():
        out = model(x, torch.tensor([500.0]), torch.randn(1, 12), torch.randn(1, 3, 20))
    assert out.shape == (1, 4, 12, 16)


# --- loading ----------------------------------------------------------------------------------


def test_all_in_one_checkpoint_loads_strictly():
    params = CONFIGS["sd3.5_medium"]
    sd = random_state_dict(params)
    all_in_one = {PREFIX + k: v for k, v in sd.items()}
    all_in_one["first_stage_model.encoder.conv_in.weight"] = torch.zeros(32, 3, 3, 3)
    all_in_one["first_stage_model.decoder.conv_out.bias"] = torch.zeros(3)
    all_in_one["text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight"] = torch.zeros(10, 8)
    all_in_one["text_encoders.t5xxl.transformer.shared.weight"] = torch.zeros(10, 8)
    x = random_inputs(params)
    with torch.no_grad():
        assert torch.equal(load_ours(all_in_one)(**x), load_ours(sd)(**x))


def test_missing_and_unexpected_keys_are_named():
    sd = {PREFIX + k: v for k, v in random_state_dict(CONFIGS["sd3.5_medium"]).items()}
    missing = dict(sd)
    del missing[PREFIX + "joint_blocks.1.x_block.attn2.proj.bias"]
    with pytest.raises(ValueError, match=r"1 missing, 0 unexpected(.|\n)*joint_blocks\.1\.x_block\.attn2\.proj\.bias"):
        MMDiT.from_state_dict(missing)
    extra = {**sd, PREFIX + "joint_blocks.2.context_block.mlp.fc1.weight": torch.zeros(768, 192)}
    with pytest.raises(ValueError, match=r"0 missing, 1 unexpected(.|\n)*joint_blocks\.2\.context_block\.mlp\.fc1"):
        MMDiT.from_state_dict(extra)


def test_flux_checkpoint_is_refused_by_name():
    with torch.device("meta"):
        flux = Flux(FluxParams(hidden_size=128, num_heads=2, axes_dim=[8, 28, 28], depth=1,
                               depth_single_blocks=1)).state_dict()
    with pytest.raises(ValueError, match="expected an SD3/SD3.5 checkpoint, but this file looks like a FLUX.1"):
        MMDiT.from_state_dict(flux)


def test_sdxl_checkpoint_is_refused_by_name():
    sdxl = {
        PREFIX + "input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        PREFIX + "label_emb.0.0.weight": torch.zeros(1280, 2816),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(10, 8),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3),
    }
    with pytest.raises(ValueError, match="expected an SD3/SD3.5 checkpoint, but this file looks like an SDXL"):
        MMDiT.from_state_dict(sdxl)


def test_diffusers_layout_is_refused_with_a_hint():
    with pytest.raises(ValueError, match="diffusers-format SD3 transformer"):
        MMDiT.from_state_dict({"transformer_blocks.0.attn.to_q.weight": torch.zeros(4, 4)})


def test_bf16_load_runs_close_to_fp32():
    params = CONFIGS["sd3.5_medium"]
    sd = random_state_dict(params)
    x = random_inputs(params)
    with torch.no_grad():
        fp32 = load_ours(sd)(**x)
        model = load_ours(sd, dtype=torch.bfloat16)
        bf16 = model(x["x"].bfloat16(), x["t"], x["y"].bfloat16(), x["context"].bfloat16())
    assert model.pos_embed.dtype == torch.bfloat16 and bf16.dtype == torch.bfloat16
    assert (bf16.float() - fp32).abs().max() <= 0.05 * fp32.abs().max()


# --- skip_layers ------------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [(1,), (0, 2)], ids=["middle", "first_and_pre_only"])
def test_skip_layers_is_running_without_those_blocks(skip):
    params = CONFIGS["sd3.5_medium"]
    sd = random_state_dict(params)
    x = random_inputs(params)
    model = load_ours(sd)
    removed = copy.deepcopy(model)
    removed.joint_blocks = torch.nn.ModuleList(b for i, b in enumerate(model.joint_blocks) if i not in skip)
    with torch.no_grad():
        skipped = model(**x, skip_layers=skip)
        assert torch.equal(skipped, removed(**x))
        assert (skipped - model(**x)).abs().max() > 1e-3  # skipping does something
        assert (skipped - reference_model(sd, params)(**x, skip_layers=list(skip))).abs().max() <= TOLERANCE
        assert (skipped - run_diffusers(diffusers_model(sd, params), x, list(skip))).abs().max() <= TOLERANCE


def test_unknown_skip_layer_is_an_error():
    params = CONFIGS["sd3_medium"]
    model = load_ours(random_state_dict(params))
    with pytest.raises(ValueError, match=r"skip_layers \[5\] are not joint block indices \(0..1\)"):
        model(**random_inputs(params), skip_layers=(5,))


# --- kohya's multi-resolution options ---------------------------------------------------------


def positions_used(model: MMDiT, x: dict) -> torch.Tensor:
    """The (1, h*w, D) positions a forward added: block 0's image input minus the patch embedding."""
    seen = {}
    handle = model.joint_blocks[0].register_forward_pre_hook(lambda _, args: seen.update(x=args[1]))
    with torch.no_grad():
        model(**x)
        patches = model.x_embedder(x["x"])
    handle.remove()
    return (seen["x"] - patches)[:1]


def window(table: torch.Tensor, grid: int, top: int, left: int, h: int = 4, w: int = 6) -> torch.Tensor:
    return table.reshape(grid, grid, -1)[top : top + h, left : left + w].reshape(1, h * w, -1)


def test_random_crop_uses_other_cells_and_follows_the_generator():
    params = CONFIGS["sd3.5_medium"]  # P = 16 for a 4 x 6 grid: 13 x 11 possible windows
    model = load_ours(random_state_dict(params), pos_emb_random_crop_rate=1.0)
    x = random_inputs(params)
    P, table = params.pos_embed_max_size, model.pos_embed[0]
    centre = window(table, P, 6, 5)
    assert torch.allclose(positions_used(model, x), centre, atol=1e-6)  # eval: always the centre

    model.train()
    corners = set()
    for seed in range(20):
        model.pos_emb_generator = torch.Generator().manual_seed(seed)
        used = positions_used(model, x)
        replay = torch.Generator().manual_seed(seed)  # the draws: rate test, then top, then left
        assert torch.rand(1, generator=replay).item() < 1.0
        top, left = (int(torch.randint(0, n, (1,), generator=replay)) for n in (P - 4 + 1, P - 6 + 1))
        assert torch.allclose(used, window(table, P, top, left), atol=1e-6)
        corners.add((top, left))
    assert len(corners) > 10  # the windows really move


def test_random_crop_rate_is_a_probability_and_zero_draws_nothing():
    params = CONFIGS["sd3.5_medium"]
    x = random_inputs(params)
    model = load_ours(random_state_dict(params), pos_emb_random_crop_rate=0.3).train()
    model.pos_emb_generator = torch.Generator().manual_seed(0)
    centre = window(model.pos_embed[0], params.pos_embed_max_size, 6, 5)
    centred = sum(torch.allclose(positions_used(model, x), centre, atol=1e-6) for _ in range(40))
    assert 18 <= centred <= 38  # about 70% of 40 (a random window can also be the centre one)

    off = load_ours(random_state_dict(params)).train()  # rate 0 by default
    state = torch.random.get_rng_state()
    assert torch.allclose(positions_used(off, x), centre, atol=1e-6)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG was not touched


def kohya_scaled_table(dim: int, patched_size: int) -> np.ndarray:
    """The formula of kohya-ss/sd-scripts library/sd3_models.py get_scaled_2d_sincos_pos_embed
    (sample_size = patched_size, base_size = 16, grid = int(1.5 * patched_size)), in numpy."""
    grid_size, base = int(patched_size * 1.5), 16
    scale = base * grid_size / patched_size
    shift = scale * (grid_size - patched_size) / (2 * grid_size)
    coords = np.arange(grid_size, dtype=np.float32) / grid_size * scale - shift
    cols, rows = np.meshgrid(coords, coords)  # w first
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def one_axis(pos):
        angles = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([one_axis(cols), one_axis(rows)], axis=1)


def test_scaled_table_matches_kohya_and_the_reference_with_scaling():
    ours = scaled_pos_embed_table(32, 4)[0]  # a 4 x 4 bucket: a 6 x 6 table
    assert ours.shape == (36, 32) and ours.dtype == torch.float32
    assert (ours.double() - torch.from_numpy(kohya_scaled_table(32, 4))).abs().max() <= 1e-6
    # The same table is the reference's sin-cos table with scaling_factor S/16 and offset
    # (G - S)/2 * 16/S: its centre S x S window has coordinates 0, 16/S, ..., 16 - 16/S.
    reference_model(random_state_dict(CONFIGS["sd3_medium"]), CONFIGS["sd3_medium"])  # mmditx on the path
    import mmditx

    reference = mmditx.get_2d_sincos_pos_embed(32, 6, scaling_factor=4 / 16, offset=(6 - 4) / 2 * 16 / 4)
    assert (ours.double() - torch.from_numpy(reference)).abs().max() <= 1e-5


def test_scaled_pos_embed_in_the_forward():
    params = CONFIGS["sd3.5_medium"]
    x = random_inputs(params)  # 8 x 12 latent: a 4 x 6 patch grid
    model = load_ours(random_state_dict(params), enable_scaled_pos_embed=True, pos_embed_latent_sizes=(8,))
    # bucket 8 -> 4 x 4 patches -> a 6 x 6 table; the 4 x 6 grid takes rows 1..4, all columns
    expected = window(torch.from_numpy(kohya_scaled_table(params.hidden_size, 4)).float(), 6, 1, 0)
    assert (positions_used(model, x) - expected).abs().max() <= 1e-5
    plain = load_ours(random_state_dict(params))
    with torch.no_grad():
        assert (model(**x) - plain(**x)).abs().max() > 1e-3
    assert model.state_dict().keys() == plain.state_dict().keys()  # the tables are not saved


def test_scaled_pos_embed_picks_tables_as_kohya():
    model = MMDiT(MMDiTParams(depth=1, pos_embed_max_size=4, **SMALL))
    model.enable_scaled_pos_embed([128, 64, 96, 96])  # patched 32, 48, 64
    assert model.scaled_pos_embed_bounds == [(1664, 32), (3200, 48), (9216, 64)]
    assert model.scaled_pos_embed(40, 40, "cpu")[1] == 48  # area 1600 -> the 32 bucket, table 48
    assert model.scaled_pos_embed(30, 56, "cpu")[1] == 72  # area 1680 -> the 48 bucket, table 72
    assert model.scaled_pos_embed(96, 96, "cpu")[1] == 96  # the largest bucket's bound
    assert model.scaled_pos_embed(20, 100, "cpu")[1] == 150  # too wide for 72: a table for 100, kept
    assert (22500, 100) in model.scaled_pos_embed_bounds
    assert model.params.enable_scaled_pos_embed and model.params.pos_embed_latent_sizes == (64, 96, 128)
    model.enable_scaled_pos_embed(None)
    assert model.scaled_pos_embed_bounds is None and not model.params.enable_scaled_pos_embed


def test_fused_kernel_entry_points_serve_sd3():
    """The same forward and backward with layers.set_kernels("triton") (the Triton interpreter
    here): norm_modulate, gated_residual(_norm_modulate) and gelu_tanh run as kernels."""
    from models import layers

    params = CONFIGS["sd3.5_medium"]
    model = load_ours(random_state_dict(params))
    x = random_inputs(params)
    target = torch.randn(BATCH, *LATENT, generator=torch.Generator().manual_seed(2))

    def loss_and_grads(mode):
        layers.set_kernels(mode)
        try:
            model.zero_grad()
            loss = (model(**x) - target).square().mean()
            loss.backward()
        finally:
            layers.set_kernels("torch")
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_torch, grads_torch = loss_and_grads("torch")
    loss_triton, grads_triton = loss_and_grads("triton")
    assert abs(loss_triton - loss_torch) <= 1e-5 * loss_torch
    for name, grad in grads_torch.items():
        assert (grads_triton[name] - grad).abs().max() <= 1e-4 * grad.abs().max() + 1e-7, name
