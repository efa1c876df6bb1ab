"""LoRA features on single layers and on the FLUX skeleton: DoRA against PEFT's own DoRA layers,
rank and module dropout (kohya's), split q/k/v trained apart and saved fused, presets, LoRA+ and
per-encoder learning rates, the config checks."""
import copy

import pytest
import torch
from torch import nn

import lora
import training
from config import DEFAULTS, ConfigError, check_training_settings
from families.flux import FAMILY as FLUX
from lora import LoRAModule, LoRANetwork
from models.flux import Flux, FluxParams

pytestmark = pytest.mark.usefixtures("one_thread")


def randomized(module: LoRAModule, seed: int = 0, scale: float = 0.2) -> LoRAModule:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in [module.lora_down, *module._ups()]:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * scale)
        if module.dora_scale is not None:
            module.dora_scale.mul_(1 + 0.2 * torch.randn(module.dora_scale.shape, generator=g))
    return module


def peft_dora(base: nn.Module, module: LoRAModule):
    """PEFT's DoRA layer on a copy of `base`, holding our module's weights."""
    from peft import LoraConfig, get_peft_model

    holder = nn.Sequential()
    holder.add_module("layer", copy.deepcopy(base))
    config = LoraConfig(r=module.rank, lora_alpha=float(module.alpha), target_modules=["layer"], use_dora=True)
    model = get_peft_model(holder, config)
    layer = model.base_model.model.layer
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(module.lora_down.weight)
        layer.lora_B["default"].weight.copy_(module.lora_up.weight)
        magnitude = layer.lora_magnitude_vector["default"].weight  # (out,); a conv's (1, out, 1, 1)
        magnitude.copy_(module.dora_scale.reshape(magnitude.shape))
    return model, layer


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_dora_matches_peft_forward_and_gradients(kind):
    torch.manual_seed(0)
    base = nn.Linear(12, 20) if kind == "linear" else nn.Conv2d(6, 10, 3, padding=1)
    x = torch.randn(3, 5, 12) if kind == "linear" else torch.randn(2, 6, 7, 7)
    plain, clean = base(x).detach(), copy.deepcopy(base)
    ours = LoRAModule(base, 4, alpha=2.0, dora=True)
    ours.attach()
    torch.testing.assert_close(base(x), plain)  # m = ||W|| per row and up = 0: the base layer
    randomized(ours)
    model, layer = peft_dora(clean, ours)
    ours_out, theirs_out = base(x), model(x)
    assert (ours_out - plain).abs().max() > 1e-2
    torch.testing.assert_close(ours_out, theirs_out, rtol=1e-5, atol=1e-5)
    (ours_out.square().sum()).backward()
    (theirs_out.square().sum()).backward()
    pairs = [(ours.lora_down.weight, layer.lora_A["default"].weight), (ours.lora_up.weight, layer.lora_B["default"].weight),
             (ours.dora_scale, layer.lora_magnitude_vector["default"].weight)]
    for a, b in pairs:
        torch.testing.assert_close(a.grad.reshape(b.grad.shape), b.grad, rtol=1e-4, atol=1e-5)


def test_dora_merge_strength_and_unmerge():
    torch.manual_seed(1)
    base = nn.Linear(16, 8)
    original = base.weight.detach().clone()
    module = randomized(LoRAModule(base, 3, alpha=3.0, dora=True), seed=2)
    module.attach()
    x = torch.randn(4, 16)
    module.multiplier = 0.6
    live = base(x).detach()
    # strength t: W + t (m / ||W + s U D|| (W + s U D) - W), as ComfyUI's strength
    adapted = original + lora.lora_delta(module.lora_down.weight, module.lora_up.weight, module.alpha)
    dora = module.dora_scale.detach() / adapted.norm(dim=1, keepdim=True) * adapted
    expected = x @ (original + 0.6 * (dora - original)).T + base.bias
    torch.testing.assert_close(live, expected, rtol=1e-5, atol=1e-5)
    module.merge()
    torch.testing.assert_close(base(x), live, rtol=1e-5, atol=1e-5)
    module.unmerge()
    torch.testing.assert_close(base.weight, original, rtol=1e-5, atol=1e-6)


def test_rank_and_module_dropout_act_only_in_training():
    torch.manual_seed(3)
    base = nn.Linear(8, 8)
    module = randomized(LoRAModule(base, 64, rank_dropout=0.5))
    module.attach()
    x = torch.randn(256, 8)
    torch.manual_seed(4)
    h = module._apply(module.lora_down, x)
    mask = module._rank_mask(h)
    kept = (mask > 0).float()
    assert abs(kept.mean().item() - 0.5) < 0.05  # each rank feature kept with probability 1 - p
    assert torch.equal(mask[kept.bool()], torch.full_like(mask[kept.bool()], 2.0))  # and scaled by 1 / (1 - p)
    base.eval()
    first, second = base(x), base(x)
    torch.testing.assert_close(first, second)  # eval: no dropout
    base.train()
    assert (base(x) - first).abs().max() > 1e-3

    skipping = randomized(LoRAModule(nn.Linear(8, 8), 4, module_dropout=0.3), seed=5)
    skipping.attach()
    layer, plain = skipping.base, skipping._base_forward
    torch.manual_seed(6)
    skipped = sum(torch.equal(layer(x), plain(x)) for _ in range(400))
    assert 90 < skipped < 150  # about 30 % of steps without the LoRA path
    layer.eval()
    assert not torch.equal(layer(x), plain(x))


def test_split_qkv_trains_each_slice_and_saves_fused_block_diagonal():
    torch.manual_seed(7)
    base = nn.Linear(6, 3 * 6 + 10)  # q, k, v of 6 and an MLP slice of 10 (a FLUX single block's linear1)
    split = randomized(LoRAModule(base, 2, alpha=1.0, split=[6, 6, 6, 10]))
    split.attach()
    x = torch.randn(5, 6)
    out = base(x)
    parts = split.file_tensors()
    assert parts["lora_down.weight"].shape == (8, 6) and parts["lora_up.weight"].shape == (28, 8)
    assert float(parts["alpha"]) == 4.0  # alpha / rank kept: 1 / 2 = 4 / 8
    up = parts["lora_up.weight"]
    assert up[:6, 2:].abs().sum() == 0 and up[6:12, :2].abs().sum() == 0  # block-diagonal
    split.restore()
    fused = LoRAModule(base, 8)
    fused.load_file_tensors(parts)
    fused.attach()
    torch.testing.assert_close(base(x), out)  # the fused file computes what the split LoRA did
    fused.restore()
    again = LoRAModule(base, 2, split=[6, 6, 6, 10])
    again.load_file_tensors(parts)  # continuing split training from the fused file
    torch.testing.assert_close(again.up_weight(), up)
    with pytest.raises(ValueError, match="not block-diagonal"):
        again.load_file_tensors(dict(parts, **{"lora_up.weight": torch.ones(28, 8)}))


def test_split_qkv_diffusers_file_gives_each_slice_its_own_rank():
    with torch.device("meta"):
        model = Flux(FluxParams(hidden_size=128, num_heads=2, axes_dim=[8, 28, 28], depth=1, depth_single_blocks=1,
                                context_in_dim=32, vec_in_dim=24))
    targets = {"double_blocks.0.img_attn.qkv": 2, "single_blocks.0.linear1": 2}
    modules = dict(model.named_modules())
    splits = {p: FLUX.lora_fused_rows(p, modules[p]) for p in targets}
    assert splits == {"double_blocks.0.img_attn.qkv": [128] * 3, "single_blocks.0.linear1": [128] * 3 + [512]}
    network = LoRANetwork.inject(model, targets, splits=splits, device="cpu")
    for m in network.loras.values():
        randomized(m)
    sd = lora.diffusers_state_dict(network, FLUX)
    assert sd["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"].shape == (2, 128)  # not 6: its own rows
    assert sd["transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight"].shape == (512, 2)
    back = lora.to_kohya(sd, FLUX)
    kohya = network.kohya_state_dict()
    for name in network.loras:
        ours = lora.lora_delta(kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"], kohya[f"{name}.alpha"])
        theirs = lora.lora_delta(back[f"{name}.lora_down.weight"], back[f"{name}.lora_up.weight"], back[f"{name}.alpha"])
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)


# --- presets on the full-size FLUX skeleton ---------------------------------------------------------


@pytest.fixture(scope="module")
def flux_layers():
    with torch.device("meta"):
        model = Flux(FluxParams())
    return model, FLUX.lora_layers(model)


def preset(flux_layers, name):
    model, layers = flux_layers
    return lora.preset_targets(layers, name, FLUX, 16)


def test_presets_select_what_their_names_say(flux_layers):
    model, layers = flux_layers
    assert len(preset(flux_layers, "blocks")) == 304  # kohya's default targets
    assert set(preset(flux_layers, "blocks")) == set(FLUX.lora_targets(model, dict(DEFAULTS, network_dim=16)))
    assert len(preset(flux_layers, "all")) == 304 + 8 + 2  # and the embedders and the final layer
    attention = preset(flux_layers, "attention_only")
    assert len(attention) == 19 * 4 and all(".img_attn." in p or ".txt_attn." in p for p in attention)
    context = preset(flux_layers, "context_blocks")
    assert len(context) == 19 * 5 and all(".txt_" in p for p in context)
    late, early = preset(flux_layers, "late_blocks"), preset(flux_layers, "early_blocks")
    assert set(late) | set(early) == set(preset(flux_layers, "blocks")) and not set(late) & set(early)
    assert "single_blocks.9.linear1" in early and "single_blocks.10.linear1" in late  # 19 + 10 = 29 of 57 run first
    assert "img_in" not in preset(flux_layers, "no_embedders") and "final_layer.linear" in preset(flux_layers,
                                                                                                   "no_embedders")
    no_last = preset(flux_layers, "no_last_blocks")
    assert "single_blocks.23.linear1" in no_last and "single_blocks.24.linear1" not in no_last  # 43 / 57 < 0.75
    ranks = lora.preset_targets(layers, "attention_only", FLUX, 16, {"img_attn": 4, "txt_attn": 0})
    assert set(ranks.values()) == {4} and len(ranks) == 19 * 2
    with pytest.raises(ValueError, match="not a preset of FLUX.1"):
        preset(flux_layers, "attention")


def test_presets_print_their_modules_folded():
    paths = [f"double_blocks.{i}.img_attn.qkv" for i in (0, 1, 2, 5, 7, 8)] + ["img_in"]
    assert lora.describe_paths(paths) == ["double_blocks.{0-2,5,7-8}.img_attn.qkv", "img_in"]


# --- learning rates and config checks ---------------------------------------------------------------


def test_loraplus_and_text_encoder_rates():
    trainable = {name: nn.Parameter(torch.zeros(1)) for name in (
        "loras.lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
        "loras.lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight",
        "loras.lora_unet_single_blocks_0_linear1.lora_up.0.weight",  # a split module's up
        "loras.lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
        "loras.lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight")}
    cfg = dict(DEFAULTS, learning_rate=1e-4, loraplus_lr_ratio=16.0, text_encoder_lr={"clip_l": 5e-5, "t5": 0.0})
    factors = training.lr_multipliers(FLUX, cfg, trainable)
    assert factors == {"loras.lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": 16.0,
                       "loras.lora_unet_single_blocks_0_linear1.lora_up.0.weight": 16.0,
                       "loras.lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": 0.5,
                       "loras.lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": 0.0}
    opt = training.build_optimization(dict(trainable), cfg, lr_multipliers=factors)
    rates = sorted(group["lr"] for group in opt.optimizer.param_groups)
    assert rates == pytest.approx([5e-5, 1e-4, 1.6e-3])  # t5 frozen: no group, no gradient
    assert not trainable["loras.lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"].requires_grad


def test_selection_keys_work_for_full_finetuning_and_ranks_do_not():
    check_training_settings(dict(DEFAULTS, train_mode="full", train_double_blocks="0-3"))
    check_training_settings(dict(DEFAULTS, train_mode="full", targets="late_blocks"))
    with pytest.raises(ConfigError, match="use_dora: LoRA settings, but train_mode='full'"):
        check_training_settings(dict(DEFAULTS, train_mode="full", use_dora=True))
    with pytest.raises(ConfigError, match="train_double_blocks would change it silently"):
        check_training_settings(dict(DEFAULTS, targets="late_blocks", train_double_blocks="0-3"))
    with pytest.raises(ConfigError, match="rank_dropout must be in"):
        check_training_settings(dict(DEFAULTS, rank_dropout=1.0))


def test_full_finetuning_with_a_preset_trains_only_its_layers():
    torch.manual_seed(0)
    model = Flux(FluxParams(hidden_size=64, num_heads=2, axes_dim=[4, 14, 14], depth=2, depth_single_blocks=2,
                            context_in_dim=16, vec_in_dim=8))
    _, trainable, _ = training.choose_trainable(model, FLUX, dict(DEFAULTS, train_mode="full",
                                                                 targets="attention_only"))
    assert set(trainable) == {f"double_blocks.{i}.{s}_attn.{m}.{p}" for i in range(2) for s in ("img", "txt")
                              for m in ("qkv", "proj") for p in ("weight", "bias")}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(trainable)
    frozen = FLUX.lr_multipliers(dict(DEFAULTS, train_mode="full", train_single_blocks="1"),
                                 dict(model.named_parameters()))
    assert frozen and all(name.startswith("single_blocks.0.") for name in frozen)
