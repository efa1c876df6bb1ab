"""LoRA: targets and kohya names at full FLUX size, the file as ComfyUI and diffusers read it,
merge equivalence, save/load round trips and errors.

Oracles: diffusers' own kohya -> diffusers FLUX LoRA converter, read through ComfyUI's own
diffusers -> BFL key table (comfy/utils.py flux_to_diffusers, vendored). ComfyUI's loader itself
reads our files in tests/test_lora_comfyui.py."""
import os

import pytest
import torch
from torch import nn
from safetensors.torch import save_file

import atomic
import lora
from activations import checkpoint_blocks
from families.flux import FAMILY as FLUX
from families.flux import lora_targets as flux_lora_targets
from lora import LoRANetwork, kohya_metadata
from models.flux import Flux, FluxParams, img_ids, txt_ids

# ---- helpers ------------------------------------------------------------------------------------


def load_lora_file(path):
    return lora.load_lora_file(path, FLUX)


def apply_lora_file(model, path_or_sd, **options):
    return lora.apply_lora_file(model, path_or_sd, FLUX, **options)


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


TINY = dict(
    in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=48, hidden_size=128,
    num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 28, 28],
)


def tiny_model(seed=0, **overrides) -> Flux:
    torch.manual_seed(seed)
    model = Flux(FluxParams(**{**TINY, **overrides})).float().eval()
    model.requires_grad_(False)
    return model


def meta_model(**overrides) -> Flux:
    with torch.device("meta"):
        return Flux(FluxParams(**overrides))


def tiny_inputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    p = model.params
    return dict(
        img=torch.randn(2, 16, p.in_channels, generator=g),
        img_ids=img_ids(2, 8, 8),
        txt=torch.randn(2, 5, p.context_in_dim, generator=g),
        txt_ids=txt_ids(2, 5),
        timesteps=torch.rand(2, generator=g),
        y=torch.randn(2, p.vec_in_dim, generator=g),
        guidance=torch.full((2,), 3.5),
    )


def randomize(network: LoRANetwork, seed=2, scale=0.05):
    """Non-zero ups (a trained-looking LoRA) and fresh downs, reproducibly, on the weights' device."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.loras.values():
            for w in (m.lora_down.weight, m.lora_up.weight):
                w.copy_(torch.randn(w.shape, generator=g) * scale)


def our_deltas(sd: dict) -> dict[str, torch.Tensor]:
    """kohya name -> delta W = up @ down * alpha / rank."""
    names = {k.split(".")[0] for k in sd}
    return {
        n: lora.lora_delta(sd[f"{n}.lora_down.weight"], sd[f"{n}.lora_up.weight"], sd[f"{n}.alpha"]) for n in names
    }


def diffusers_to_bfl(params: FluxParams) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """diffusers module name -> (BFL module path, (row offset, rows) or None), from ComfyUI's own
    comfy/utils.py flux_to_diffusers (vendored unchanged, tests/oracles/comfyui/)."""
    from comfy_oracle import comfy

    config = dict(depth=params.depth, depth_single_blocks=params.depth_single_blocks, hidden_size=params.hidden_size)
    out = {}
    for name, target in comfy.utils.flux_to_diffusers(config).items():
        if not name.endswith(".weight"):
            continue
        key, rows = (target, None) if isinstance(target, str) else (target[0], target[1])
        if rows is not None:
            rows = rows[1:]  # (dim 0, offset, size) -> (offset, size)
        out[name.removesuffix(".weight")] = (key.removesuffix(".weight"), rows)
    return out


# ---- targets and names at full size -------------------------------------------------------------


def test_full_size_default_targets_are_kohyas_304():
    model = meta_model()
    targets = flux_lora_targets(model, rank=16)
    network = LoRANetwork.inject(model, targets)
    sd = network.kohya_state_dict()
    names = {k.split(".")[0] for k in sd}
    expected = {
        f"lora_unet_double_blocks_{i}_{s}_{m}"
        for i in range(19)
        for s in ("img", "txt")
        for m in ("attn_qkv", "attn_proj", "mlp_0", "mlp_2", "mod_lin")
    } | {f"lora_unet_single_blocks_{i}_{m}" for i in range(38) for m in ("linear1", "linear2", "modulation_lin")}
    assert len(targets) == 304 and names == expected
    assert len(sd) == 3 * 304
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"] == (16, 3072)
    assert shapes["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] == (9216, 16)
    assert shapes["lora_unet_double_blocks_18_txt_mod_lin.lora_up.weight"] == (18432, 16)
    assert shapes["lora_unet_single_blocks_37_linear1.lora_up.weight"] == (21504, 16)
    assert shapes["lora_unet_single_blocks_0_linear2.lora_down.weight"] == (16, 15360)
    assert shapes["lora_unet_single_blocks_5_modulation_lin.lora_up.weight"] == (9216, 16)
    assert shapes["lora_unet_double_blocks_3_img_mlp_0.lora_up.weight"] == (12288, 16)
    assert shapes["lora_unet_double_blocks_3_img_attn_qkv.alpha"] == ()
    # 76.6 M trainable parameters at rank 16 (about 153 MB in bf16, the size of kohya's rank-16 files)
    assert sum(p.numel() for p in network.parameters()) == 76_578_816
    # the model's own state dict keys do not change
    assert set(meta_model().state_dict()) == set(model.state_dict())
    network.remove()
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_group_ranks_block_selection_and_embedders():
    model = meta_model()
    targets = flux_lora_targets(model, 16, double_blocks="0,2-3", single_blocks="none")
    assert len(targets) == 3 * 10 and {p.split(".")[1] for p in targets} == {"0", "2", "3"}
    assert not any(p.startswith("single_blocks") for p in targets)

    ranks = flux_lora_targets(model, 16, group_ranks={"img_attn": 8, "txt_mlp": 0, "single_mod": 4})
    assert len(ranks) == 304 - 19 * 2
    assert ranks["double_blocks.5.img_attn.qkv"] == ranks["double_blocks.5.img_attn.proj"] == 8
    assert "double_blocks.5.txt_mlp.0" not in ranks and ranks["double_blocks.5.img_mlp.0"] == 16
    assert ranks["single_blocks.7.modulation.lin"] == 4 and ranks["single_blocks.7.linear1"] == 16

    with_embedders = flux_lora_targets(model, 16, double_blocks="none", single_blocks="none", embedders=True)
    assert set(with_embedders) == {
        "img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer",
        "vector_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer",
    }
    only_txt_in = flux_lora_targets(model, 4, double_blocks="none", single_blocks="none", embedders=["txt_in"])
    assert set(only_txt_in) == {"txt_in"}

    with pytest.raises(ValueError, match=r"\[19\].*19 double_blocks \(0-18\)"):
        flux_lora_targets(model, 16, double_blocks="0,19")
    with pytest.raises(ValueError, match="cannot read"):
        flux_lora_targets(model, 16, single_blocks="0-x")
    with pytest.raises(ValueError, match="unknown groups"):
        flux_lora_targets(model, 16, group_ranks={"img_atn": 8})
    with pytest.raises(ValueError, match="guidance_in"):
        flux_lora_targets(meta_model(guidance_embed=False), 16, embedders=["guidance_in"])


# ---- what ComfyUI and diffusers read ------------------------------------------------------------


@pytest.fixture(scope="module")
def width_3072_lora():
    """A 1 double + 1 single block FLUX at full width (meta), with a random rank-4 LoRA on CPU,
    and diffusers' conversion of its kohya state dict."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    model = meta_model(depth=1, depth_single_blocks=1)
    network = LoRANetwork.inject(model, flux_lora_targets(model, 4, embedders=True), alpha=1.0, device="cpu")
    randomize(network)
    sd = network.kohya_state_dict()
    converted = _convert_kohya_flux_lora_to_diffusers(dict(sd))  # it pops from its argument
    return model, sd, converted


def probes(width: int, seed: int = 0) -> torch.Tensor:
    """(width, 16) random columns. Two weight deltas are equal iff they agree on random probes
    (almost surely); at width 3072, comparing delta W @ P is much cheaper than comparing W."""
    return torch.randn(width, 16, generator=torch.Generator().manual_seed(seed))


def our_probed_deltas(sd: dict) -> dict[str, torch.Tensor]:
    """kohya name -> (up @ down * alpha / rank) @ P, with P = probes(in_features)."""
    out = {}
    for name in {k.split(".")[0] for k in sd}:
        down, up, alpha = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"], sd.get(f"{name}.alpha")
        scale = (float(alpha) if alpha is not None else down.shape[0]) / down.shape[0]
        out[name] = up.float() @ (down.float() @ probes(down.shape[1])) * scale
    return out


def diffusers_probed_deltas(converted: dict, params: FluxParams, row_counts: dict[str, int]) -> dict:
    """BFL path -> delta W @ P assembled from the diffusers modules' B @ A @ P, placed at their rows."""
    table = diffusers_to_bfl(params)
    deltas = {}
    for key in converted:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
        path, rows = table[module]
        a, b = converted[key].float(), converted[key.replace("lora_A", "lora_B")].float()
        delta = b @ (a @ probes(a.shape[1]))
        full = deltas.setdefault(path, torch.zeros(row_counts[path], delta.shape[1]))
        offset, size = rows or (0, row_counts[path])
        assert delta.shape[0] == size
        full[offset : offset + size] += delta
    return deltas


def test_diffusers_converter_reads_our_file_with_the_same_deltas(width_3072_lora):
    model, sd, converted = width_3072_lora
    # diffusers 0.42 prefixes the block modules only; its embedder keys come out bare (x_embedder, ...)
    assert all(k.startswith("transformer.") for k in converted if "blocks." in k)
    ours = our_probed_deltas(sd)
    modules = dict(model.named_modules())
    paths = {lora.kohya_name(p): p for p in modules}
    row_counts = {paths[n]: modules[paths[n]].out_features for n in ours}
    theirs = diffusers_probed_deltas(converted, model.params, row_counts)
    assert set(theirs) == {paths[n] for n in ours}
    for name, delta in ours.items():
        torch.testing.assert_close(theirs[paths[name]], delta)


def test_diffusers_format_file_loads_with_the_same_deltas(width_3072_lora, tmp_path):
    model, sd, converted = width_3072_lora
    # diffusers' split q/k/v share one down tensor; safetensors wants distinct storage
    save_file({k: v.clone().contiguous() for k, v in converted.items()}, str(tmp_path / "d.safetensors"))
    loaded, _ = load_lora_file(tmp_path / "d.safetensors")
    assert set(loaded) == set(sd)
    # the q/k/v of a fused LoRA share one down, so re-fusing gives back the rank-4 shapes
    assert loaded["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (21504, 4)
    ours, back = our_probed_deltas(sd), our_probed_deltas(loaded)
    for name in ours:
        torch.testing.assert_close(back[name], ours[name])

    # slices with their own downs (one missing): stacked downs and a block-diagonal up
    edited = dict(converted)
    block = "transformer.transformer_blocks.0.attn"
    g = torch.Generator().manual_seed(3)
    edited[f"{block}.to_k.lora_A.weight"] = torch.randn(2, 3072, generator=g) * 0.05
    edited[f"{block}.to_k.lora_B.weight"] = torch.randn(3072, 2, generator=g) * 0.05
    del edited[f"{block}.to_v.lora_A.weight"], edited[f"{block}.to_v.lora_B.weight"]
    fused = lora.to_kohya(edited, FLUX)
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    assert fused[f"{name}.lora_up.weight"].shape == (9216, 6)
    p = probes(3072)
    expected = torch.cat([
        edited[f"{block}.to_q.lora_B.weight"] @ (edited[f"{block}.to_q.lora_A.weight"] @ p),
        edited[f"{block}.to_k.lora_B.weight"] @ (edited[f"{block}.to_k.lora_A.weight"] @ p),
        torch.zeros(3072, 16),
    ])
    torch.testing.assert_close(our_probed_deltas(fused)[name], expected, rtol=1e-5, atol=1e-6)


def test_diffusers_adapter_metadata_alpha_and_final_layer_swap():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 128, generator=g), torch.randn(256, 4, generator=g)
    sd = {"transformer.norm_out.linear.lora_A.weight": a, "transformer.norm_out.linear.lora_B.weight": b}
    meta = {"lora_adapter_metadata": '{"transformer.lora_alpha": 2, "transformer.r": 4}'}
    kohya = lora.to_kohya(sd, FLUX, meta)
    name = "lora_unet_final_layer_adaLN_modulation_1"
    assert float(kohya[f"{name}.alpha"]) == 2.0
    delta = our_deltas(kohya)[name]
    scale, shift = (b @ a * 0.5).chunk(2)  # diffusers' norm_out rows are (scale, shift); BFL's (shift, scale)
    torch.testing.assert_close(delta, torch.cat([shift, scale]))


# ---- behaviour on a tiny model ------------------------------------------------------------------


def test_merge_equals_unmerged_and_unmerge_restores():
    model = tiny_model()
    x = tiny_inputs(model)
    base_out = model(**x)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    network = LoRANetwork.inject(model, flux_lora_targets(model, 4, embedders=True), alpha=2.0)
    torch.testing.assert_close(model(**x), base_out, rtol=0, atol=0)  # zero ups: the base model
    randomize(network)
    lora_out = model(**x)
    assert (lora_out - base_out).abs().max() > 1e-3

    network.merge()
    torch.testing.assert_close(model(**x), lora_out, rtol=1e-5, atol=1e-5)
    network.unmerge()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, original[k], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(**x), lora_out, rtol=1e-5, atol=1e-5)

    network.set_multiplier(0.0)
    torch.testing.assert_close(model(**x), base_out, rtol=1e-6, atol=1e-6)
    network.remove()
    torch.testing.assert_close(model(**x), base_out, rtol=1e-6, atol=1e-6)


def test_only_lora_trains_with_checkpointing_and_dropout():
    model = tiny_model()
    x = tiny_inputs(model)
    network = LoRANetwork.inject(model, flux_lora_targets(model, 4), dropout=0.5)
    randomize(network)
    checkpoint_blocks([b for group in FLUX.blocks(model).values() for b in group])
    model.train()  # LoRA dropout follows the model's mode
    model(**x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        torch.manual_seed(0)
        dropped = model(**x)
        model.eval()
        assert (model(**x) - dropped).abs().max() > 1e-4  # dropout acts only in train mode


def test_save_load_round_trip_metadata_and_atomic_write(tmp_path, monkeypatch):
    model = tiny_model()
    targets = flux_lora_targets(model, 4, group_ranks={"single": 2})
    network = LoRANetwork.inject(model, targets, alpha=1.5)
    randomize(network)
    config = {"seed": 42, "learning_rate": 1e-4, "optimizer": "adamw", "resolution": 512, "network_dim": 4,
              "network_alpha": 1.5, "group_ranks": {"single": 2}, "instance_prompt": "ohwx"}
    config = {**config, "guidance_scale": 1.0, "timestep_sampling": "shift", "discrete_flow_shift": 3.1582,
              "model_prediction_type": "raw", "sigmoid_scale": 1.0, "logit_mean": 0.0, "logit_std": 1.0,
              "mode_scale": 1.29, "apply_t5_attn_mask": False}
    meta = kohya_metadata(config, model.params, FLUX.lora_metadata(config, model.params), step=10,
                          run={"num_train_images": 3})
    path = tmp_path / "lora.safetensors"
    network.save(path, meta, dtype=torch.float32)
    sd, read_meta = load_lora_file(path)
    assert read_meta == meta and all(isinstance(v, str) for v in read_meta.values())
    for key in ("ss_network_dim", "ss_network_alpha", "ss_base_model_version", "modelspec.architecture", "ss_seed"):
        assert key in read_meta
    assert read_meta["modelspec.architecture"] == "flux-1-dev/lora" and read_meta["ss_network_alpha"] == "1.5"
    assert read_meta["ss_network_dim"] == "4" and read_meta["ss_steps"] == "10" and read_meta["ss_num_train_images"] == "3"
    assert '"single": 2' in read_meta["ss_network_args"] and read_meta["modelspec.trigger_phrase"] == "ohwx"
    assert read_meta["modelspec.resolution"] == "512x512" and '"seed": 42' in read_meta["trainer_config"]

    other = tiny_model(seed=5)
    restored = LoRANetwork.inject(other, lora.targets_from_state_dict(other, sd))
    restored.load_kohya_state_dict(sd)
    for k, v in network.kohya_state_dict().items():
        assert torch.equal(restored.kohya_state_dict()[k], v), k

    # bf16 (the default): equal to the bf16-rounded weights; alpha stays exact
    network.save(path)
    sd16, _ = load_lora_file(path)
    assert sd16["lora_unet_single_blocks_0_linear1.lora_up.weight"].dtype == torch.bfloat16
    assert float(sd16["lora_unet_single_blocks_0_linear1.alpha"]) == 1.5
    restored.load_kohya_state_dict(sd16)
    w = network.loras["lora_unet_double_blocks_1_txt_mlp_2"].lora_up.weight
    assert torch.equal(restored.loras["lora_unet_double_blocks_1_txt_mlp_2"].lora_up.weight, w.bfloat16().float())

    # a failed write leaves the old file as it was and no temp file behind
    before = path.read_bytes()

    def failing_save(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(atomic.safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        network.save(path, meta)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["lora.safetensors"]
    with pytest.raises(TypeError, match="ss_steps"):
        network.save(path, {"ss_steps": 10})


def test_apply_lora_file_matches_the_network_at_multiplier(tmp_path):
    model = tiny_model()
    x = tiny_inputs(model)
    network = LoRANetwork.inject(model, flux_lora_targets(model, 4, embedders=True), alpha=2.0)
    randomize(network)
    network.save(tmp_path / "a.safetensors", dtype=torch.float32)
    network.set_multiplier(0.5)
    expected = model(**x)
    network.remove()

    merged = tiny_model()
    assert apply_lora_file(merged, tmp_path / "a.safetensors", multiplier=0.5) is None
    torch.testing.assert_close(merged(**x), expected, rtol=1e-5, atol=1e-5)

    live = tiny_model()
    live_net = apply_lora_file(live, tmp_path / "a.safetensors", multiplier=0.5, merge=False)
    torch.testing.assert_close(live(**x), expected, rtol=1e-5, atol=1e-5)

    # two files one after another: on the fly and merged agree
    second = LoRANetwork.inject(tiny_model(), flux_lora_targets(tiny_model(), 2))
    randomize(second, seed=9)
    second.save(tmp_path / "b.safetensors", dtype=torch.float32)
    live_b = apply_lora_file(live, tmp_path / "b.safetensors", multiplier=0.7, merge=False)
    apply_lora_file(merged, tmp_path / "b.safetensors", multiplier=0.7)
    torch.testing.assert_close(live(**x), merged(**x), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="reverse order"):
        live_net.remove()
    live_b.remove()
    live_net.remove()
    torch.testing.assert_close(live(**x), tiny_model()(**x), rtol=0, atol=0)


def test_mismatched_files_give_clear_errors(tmp_path):
    model = tiny_model()
    network = LoRANetwork.inject(model, flux_lora_targets(model, 4))
    sd = network.kohya_state_dict()
    del sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    sd["lora_unet_double_blocks_9_img_attn_qkv.lora_down.weight"] = torch.zeros(4, 128)
    with pytest.raises(KeyError) as err:
        network.load_kohya_state_dict(sd)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in str(err.value)
    assert "lora_unet_double_blocks_9_img_attn_qkv.lora_down.weight" in str(err.value)

    wrong_rank = LoRANetwork.inject(tiny_model(), flux_lora_targets(tiny_model(), 8)).kohya_state_dict()
    with pytest.raises(ValueError, match="rank"):
        network.load_kohya_state_dict(wrong_rank)
    with pytest.raises(ValueError, match="name no Linear"):
        apply_lora_file(tiny_model(), {"lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight": torch.zeros(4, 128),
                                       "lora_unet_double_blocks_7_img_attn_qkv.lora_up.weight": torch.zeros(384, 4)})
    # fp8 base weights: merging would round the delta away, so apply_lora_file goes on the fly
    fp8_model = tiny_model()
    qkv = fp8_model.double_blocks[0].img_attn.qkv
    qkv.weight.data = qkv.weight.data.to(torch.float8_e4m3fn)
    with pytest.warns(UserWarning, match="on the fly"):
        live = apply_lora_file(fp8_model, network.kohya_state_dict(), merge=True)
    assert isinstance(live, LoRANetwork) and qkv.weight.dtype == torch.float8_e4m3fn
    with pytest.raises(ValueError, match="fp8"):
        live.merge()
    with pytest.raises(ValueError, match="no FLUX.1 counterpart"):
        lora.to_kohya({"transformer.foo.lora_A.weight": torch.ones(1, 1), "transformer.foo.lora_B.weight": torch.ones(1, 1)},
                      FLUX)


@pytest.mark.parametrize("conv", ["conv2d_3x3_stride2", "conv1d_1"])
def test_lora_on_convolutions_merges_exactly(conv):
    """LoCon: a LoRA beside a Conv2d (kohya: down with the base's kernel, stride and padding, up
    1x1) and beside IF's Conv1d(k=1) projections; the on-the-fly output equals the base layer
    with up @ down merged into its kernel, and the file has kohya's conv shapes."""
    torch.manual_seed(0)
    if conv == "conv2d_3x3_stride2":
        base, x = nn.Conv2d(6, 10, 3, stride=2, padding=1), torch.randn(2, 6, 9, 7)
        shapes = ((4, 6, 3, 3), (10, 4, 1, 1))
    else:
        base, x = nn.Conv1d(6, 10, 1), torch.randn(2, 6, 5)
        shapes = ((4, 6, 1), (10, 4, 1))
    model = nn.Sequential(base).requires_grad_(False)
    network = LoRANetwork.inject(model, {"0": 4}, alpha=2.0)
    randomize(network)
    live = model(x)
    sd = network.kohya_state_dict()
    assert (tuple(sd["lora_unet_0.lora_down.weight"].shape), tuple(sd["lora_unet_0.lora_up.weight"].shape)) == shapes
    expected = base._conv_forward(x, base.weight + lora.lora_delta(*(sd[f"lora_unet_0.{k}"] for k in (
        "lora_down.weight", "lora_up.weight", "alpha"))), base.bias)
    torch.testing.assert_close(live, expected, rtol=1e-5, atol=1e-6)
    assert (live - base._conv_forward(x, base.weight, base.bias)).abs().max() > 1e-3  # the LoRA acts
    network.merge()
    torch.testing.assert_close(model(x), live, rtol=1e-5, atol=1e-6)
    network.unmerge()
    network.remove()
    fresh = nn.Sequential(base)
    assert lora.apply_lora_file(fresh, sd, FLUX, multiplier=1.0) is None  # merged by file, same result
    torch.testing.assert_close(fresh(x), live, rtol=1e-5, atol=1e-6)
