"""FLUX.1 transformer (models/flux.py) against diffusers' FluxTransformer2DModel.

Tiny random weights in the original BFL key layout are loaded into our model with
Flux.from_state_dict, and into diffusers through its single-file converter; both must
give the same velocity. The rest checks packing, ids, inference of the config from the
keys, checkpointing and the text mask.
"""
import pytest
import torch

from models.flux import Flux, FluxParams, img_ids, infer_params, pack, txt_ids, unpack, variant

# 2 heads x 64 dims; the three RoPE axes must sum to the head dim and be even.
TINY = dict(hidden_size=128, num_heads=2, axes_dim=[8, 28, 28], depth=2, depth_single_blocks=2,
            context_in_dim=32, vec_in_dim=24)
LATENT = (16, 6, 10)  # (C, h, w): non-square, 3 x 5 = 15 tokens of 64 channels
TXT_LEN = 7
BATCH = 2


def tiny_params(guidance_embed: bool, **changes) -> FluxParams:
    return FluxParams(**{**TINY, "guidance_embed": guidance_embed, **changes})


def random_state_dict(params: FluxParams, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict in the original key layout with every tensor moved off its initial value.

    The RMSNorm `scale`s start at ones and the Linear biases near zero; perturbing them all
    means a wrong key, a transposed split or a skipped norm scale changes the output."""
    torch.manual_seed(seed)
    model = Flux(params)
    sd = {}
    for key, tensor in model.state_dict().items():
        noise = torch.randn_like(tensor)
        sd[key] = (1.0 + 0.3 * noise) if key.endswith(".scale") else tensor + 0.02 * noise
    return sd


def to_diffusers(sd: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    """The diffusers state dict for an original one, through diffusers' own converter.

    The converter hard-codes inner_dim = 3072 (and mlp_ratio 4) when it splits
    single_blocks.*.linear1 into q, k, v and proj_mlp, which fails at a tiny width. We split
    linear1 ourselves at the real width and hand the converter a zero-width placeholder with
    the row count it expects (3 * 3072 + 4 * 3072); its wrongly split pieces are then
    overwritten. Everything else is converted by diffusers unchanged."""
    # imported here: diffusers takes seconds to import, and only the oracle test needs it
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    sd = dict(sd)  # the converter pops from the dict it is given
    full_rows = 3 * 3072 + 4 * 3072
    ours = {}
    single = sorted({int(k.split(".")[1]) for k in sd if k.startswith("single_blocks.")})
    for i in single:
        weight, bias = sd[f"single_blocks.{i}.linear1.weight"], sd[f"single_blocks.{i}.linear1.bias"]
        sizes = [hidden, hidden, hidden, weight.shape[0] - 3 * hidden]  # [q | k | v | mlp_in]
        prefix = f"single_transformer_blocks.{i}."
        for name, w, b in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
                              weight.split(sizes), bias.split(sizes)):
            ours[f"{prefix}{name}.weight"], ours[f"{prefix}{name}.bias"] = w, b
        sd[f"single_blocks.{i}.linear1.weight"] = torch.empty(full_rows, 0)
        sd[f"single_blocks.{i}.linear1.bias"] = torch.empty(full_rows)
    converted = convert_flux_transformer_checkpoint_to_diffusers(sd)
    assert not sd, f"the converter left keys unconverted: {sorted(sd)}"
    converted.update(ours)
    return converted


def diffusers_model(sd: dict, params: FluxParams):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=params.in_channels,
        num_layers=params.depth,
        num_single_layers=params.depth_single_blocks,
        attention_head_dim=params.hidden_size // params.num_heads,
        num_attention_heads=params.num_heads,
        joint_attention_dim=params.context_in_dim,
        pooled_projection_dim=params.vec_in_dim,
        guidance_embeds=params.guidance_embed,
        axes_dims_rope=tuple(params.axes_dim),
    )
    model.load_state_dict(to_diffusers(sd, params.hidden_size), strict=True)
    return model.eval()


def random_inputs(params: FluxParams, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c, h, w = LATENT
    return dict(
        img=pack(torch.randn(BATCH, c, h, w, generator=g)),
        img_ids=img_ids(BATCH, h, w),
        txt=torch.randn(BATCH, TXT_LEN, params.context_in_dim, generator=g),
        txt_ids=txt_ids(BATCH, TXT_LEN),
        timesteps=torch.tensor([0.3, 0.85]),
        y=torch.randn(BATCH, params.vec_in_dim, generator=g),
        guidance=torch.tensor([3.5, 1.0]) if params.guidance_embed else None,
    )


def load_ours(sd: dict, params: FluxParams) -> Flux:
    return Flux.from_state_dict(dict(sd), axes_dim=params.axes_dim).eval()


@pytest.mark.parametrize("guidance_embed", [True, False], ids=["dev", "schnell"])
def test_matches_diffusers(guidance_embed):
    params = tiny_params(guidance_embed)
    sd = random_state_dict(params)
    x = random_inputs(params)
    with torch.no_grad():
        ours = load_ours(sd, params)(**x)
        theirs = diffusers_model(sd, params)(
            hidden_states=x["img"],
            encoder_hidden_states=x["txt"],
            pooled_projections=x["y"],
            timestep=x["timesteps"],  # diffusers multiplies by 1000 itself, as BFL does
            img_ids=x["img_ids"][0],  # diffusers takes 2-D (L, 3) ids
            txt_ids=x["txt_ids"][0],
            guidance=x["guidance"],
            return_dict=False,
        )[0]
    assert ours.shape == (BATCH, 15, 64)
    assert ours.abs().mean() > 0.1  # not a degenerate near-zero output
    assert (ours - theirs).abs().max() <= 1e-5


def test_pack_channel_order_by_hand():
    # two channels, a 2 x 4 latent -> two tokens; each token lists c0's 2x2 patch, then c1's
    latent = torch.arange(16.0).reshape(1, 2, 2, 4)  # c0 = [[0..3], [4..7]], c1 = [[8..11], [12..15]]
    expected = torch.tensor([[[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]]], dtype=torch.float32)
    assert torch.equal(pack(latent), expected)
    # one channel, 4 x 4 -> 2 x 2 tokens in row-major order
    latent = torch.arange(16.0).reshape(1, 1, 4, 4)
    expected = torch.tensor([[[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]], dtype=torch.float32)
    assert torch.equal(pack(latent), expected)


def test_pack_unpack_round_trip():
    latent = torch.randn(BATCH, *LATENT)
    tokens = pack(latent)
    assert tokens.shape == (BATCH, 15, 64)
    assert torch.equal(unpack(tokens, *LATENT[1:]), latent)


def test_ids_layout():
    ids = img_ids(BATCH, 6, 10)  # a 3 x 5 token grid
    assert ids.shape == (BATCH, 15, 3)
    expected = torch.tensor([[0, r, c] for r in range(3) for c in range(5)], dtype=torch.float32)
    assert torch.equal(ids[0], expected) and torch.equal(ids[1], expected)
    assert torch.equal(txt_ids(BATCH, TXT_LEN), torch.zeros(BATCH, TXT_LEN, 3))


def test_comfyui_prefix_loads_the_same():
    params = tiny_params(True)
    sd = random_state_dict(params)
    x = random_inputs(params)
    prefixed = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    with torch.no_grad():
        assert torch.equal(load_ours(prefixed, params)(**x), load_ours(sd, params)(**x))


def _blocks(model: Flux) -> list:
    from families.flux import FAMILY

    return [b for group in FAMILY.blocks(model).values() for b in group]


def _forward_backward(model: Flux, x: dict, checkpointing: bool):
    from activations import checkpoint_blocks

    checkpoint_blocks(_blocks(model), checkpointing)
    model.zero_grad()
    img = x["img"].clone().requires_grad_(True)
    calls = []
    # a pre-hook on each block's first layer (its modulation), which runs once in forward and once
    # more in a checkpoint's recomputation (the recompute calls the block's own forward, not the
    # block as a module, so hooks on the block itself fire once)
    first_layers = [next(iter(block.children())) for block in _blocks(model)]
    handles = [layer.register_forward_pre_hook(lambda *_: calls.append(1)) for layer in first_layers]
    out = model(**{**x, "img": img})
    out.square().mean().backward()
    for handle in handles:
        handle.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return out.detach(), img.grad, grads, len(calls)


def test_gradient_checkpointing_same_outputs_and_gradients():
    params = tiny_params(True)
    model = Flux.from_state_dict(random_state_dict(params), axes_dim=params.axes_dim)
    x = random_inputs(params)
    out_off, img_grad_off, grads_off, calls_off = _forward_backward(model, x, checkpointing=False)
    out_on, img_grad_on, grads_on, calls_on = _forward_backward(model, x, checkpointing=True)
    n_blocks = params.depth + params.depth_single_blocks
    assert (calls_off, calls_on) == (n_blocks, 2 * n_blocks)  # on: each block is recomputed in backward
    assert torch.equal(out_on, out_off)
    assert torch.equal(img_grad_on, img_grad_off)
    assert grads_on.keys() == grads_off.keys()
    for name in grads_off:
        assert torch.equal(grads_on[name], grads_off[name]), name


def test_blocks_lists_every_repeated_block():
    from families.flux import FAMILY

    model = Flux(tiny_params(True, depth=3, depth_single_blocks=2))
    listed = [(kind, i, b) for kind, blocks in FAMILY.blocks(model).items() for i, b in enumerate(blocks)]
    expected = [("double_blocks", i, b) for i, b in enumerate(model.double_blocks)]
    expected += [("single_blocks", i, b) for i, b in enumerate(model.single_blocks)]
    assert [(k, i) for k, i, _ in listed] == [(k, i) for k, i, _ in expected]
    assert all(a is b for (_, _, a), (_, _, b) in zip(listed, expected))


INFERENCE_CASES = {
    "dev": tiny_params(True),
    "schnell": tiny_params(False),
    # head dim 32 (so heads must come from the qk-norm size, not a fixed 128), 128 input
    # channels (Canny/Depth), mlp ratio 2, no qkv bias, uneven depths
    "odd": FluxParams(in_channels=128, out_channels=64, vec_in_dim=20, context_in_dim=40, hidden_size=96,
                      mlp_ratio=2.0, num_heads=3, depth=3, depth_single_blocks=1, axes_dim=[8, 12, 12],
                      qkv_bias=False, guidance_embed=True),
    # no double blocks: everything about the blocks comes from single_blocks.0
    "single_only": tiny_params(False, depth=0, depth_single_blocks=3, mlp_ratio=3.0),
}


@pytest.mark.parametrize("name", INFERENCE_CASES)
def test_from_state_dict_infers_every_field(name):
    params = INFERENCE_CASES[name]
    with torch.device("meta"):
        sd = Flux(params).state_dict()
    inferred = infer_params(sd, axes_dim=params.axes_dim)  # axes_dim is not stored in the file
    for field in ("in_channels", "out_channels", "vec_in_dim", "context_in_dim", "hidden_size", "mlp_ratio",
                  "num_heads", "depth", "depth_single_blocks", "qkv_bias", "guidance_embed", "theta"):
        assert getattr(inferred, field) == getattr(params, field), field
    assert variant(inferred) == ("dev" if params.guidance_embed else "schnell")
    model = Flux.from_state_dict(random_state_dict(params), axes_dim=params.axes_dim)
    assert model.params == params


@pytest.mark.parametrize("guidance_embed, count", [(True, 11_901_408_320), (False, 11_891_178_560)],
                         ids=["dev", "schnell"])
def test_full_size_parameter_count(guidance_embed, count):
    with torch.device("meta"):
        model = Flux(FluxParams(guidance_embed=guidance_embed))
    assert sum(p.numel() for p in model.parameters()) == count


def test_masked_text_tokens_do_not_reach_the_image():
    params = tiny_params(True)
    model = load_ours(random_state_dict(params), params)
    x = random_inputs(params)
    mask = torch.ones(BATCH, TXT_LEN, dtype=torch.bool)
    mask[:, 4:] = False  # the last 3 tokens are padding
    other_padding = x["txt"].clone()
    other_padding[:, 4:] = torch.randn(BATCH, TXT_LEN - 4, params.context_in_dim) * 5
    other_words = x["txt"].clone()
    other_words[:, :4] = torch.randn(BATCH, 4, params.context_in_dim)
    with torch.no_grad():
        base = model(**x, txt_mask=mask)
        padding_changed = model(**{**x, "txt": other_padding}, txt_mask=mask)
        words_changed = model(**{**x, "txt": other_words}, txt_mask=mask)
        all_true = model(**x, txt_mask=torch.ones(BATCH, TXT_LEN, dtype=torch.bool))
        unmasked = model(**x)
    assert (padding_changed - base).abs().max() <= 1e-6
    assert (words_changed - base).abs().max() > 1e-3  # the attended tokens do matter
    assert (base - unmasked).abs().max() > 1e-3  # the mask does something
    assert (all_true - unmasked).abs().max() <= 1e-6
