"""Our LoRA files as ComfyUI reads them, through ComfyUI's own code (vendored unchanged under
tests/oracles/comfyui/: model_lora_keys_unet, flux_to_diffusers, convert_lora, load_lora,
calculate_weight; see tests/comfy_oracle.py for the model stand-in and the shim).

Each key of a file written by lora.py must be loaded (ComfyUI logs the others as 'lora key not
loaded'), every patch must land on a weight of the model, and applying the patches ComfyUI's way
(W += strength * alpha / rank * up @ down on the mapped weight or slice) must give the weights that
lora.py's own merge gives.
"""
import pytest
import torch

import lora
from comfy_oracle import comfy, comfy_apply, comfy_clip_key_map, comfy_key_map, comfy_load, stand_in_model
from families.flux import FAMILY as FLUX
from families.flux import lora_targets as flux_lora_targets
from lora import LoRANetwork


def load_lora_file(path):
    return lora.load_lora_file(path, FLUX)


def apply_lora_file(model, path_or_sd, **options):
    return lora.apply_lora_file(model, path_or_sd, FLUX, **options)
from models.flux import Flux, FluxParams

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=48, hidden_size=128,
            num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 28, 28])


def tiny_flux(seed=0) -> Flux:
    torch.manual_seed(seed)
    return Flux(FluxParams(**TINY)).float().requires_grad_(False)


def randomized_network(model, rank=4, alpha=2.0) -> LoRANetwork:
    """A LoRA on every default target and the embedders, with random ups and downs (alpha / rank != 1)."""
    network = LoRANetwork.inject(model, flux_lora_targets(model, rank, embedders=True), alpha=alpha)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in network.loras.values():
            for w in (module.lora_down.weight, module.lora_up.weight):
                w.copy_(torch.randn(w.shape, generator=g) * 0.05)
    return network


def test_every_key_of_a_full_size_file_loads():
    """Names and shapes at full FLUX.1 size (meta weights, rank-1 LoRA on the CPU)."""
    with torch.device("meta"):
        model = Flux(FluxParams())
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    network = LoRANetwork.inject(model, flux_lora_targets(model, 1, embedders=True), device="cpu")
    sd = network.kohya_state_dict()
    patches, not_loaded = comfy_load(sd, comfy_key_map("flux", shapes))
    assert not_loaded == [] and len(patches) == 304 + 8 == len(network.loras)
    for target, patch in patches.items():
        assert isinstance(target, str), target  # kohya names whole modules: no slices
        up, down = patch.weights[:2]
        assert (up.shape[0], down.shape[1]) == tuple(shapes[target.removeprefix("diffusion_model.")]), target


def test_comfyui_applies_our_file_as_our_merge(tmp_path):
    model = tiny_flux()
    network = randomized_network(model)
    path = tmp_path / "ours.safetensors"
    network.save(path, dtype=torch.float32)
    network.remove()
    base = {k: v.clone() for k, v in model.state_dict().items()}

    sd, _ = load_lora_file(path)
    patches, not_loaded = comfy_load(sd, comfy_key_map("flux", base))
    assert not_loaded == [] and len(patches) == len(network.loras)
    theirs = comfy_apply(base, patches, strength=0.7)

    apply_lora_file(model, path, multiplier=0.7)  # lora.py's merge
    ours = model.state_dict()
    assert set(theirs) == {f"{p}.weight" for p in lora.targets_from_state_dict(model, sd)}
    for key, weight in ours.items():
        expected = theirs.get(key, base[key])
        torch.testing.assert_close(weight, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
    assert all((theirs[k] - base[k]).abs().max() > 1e-4 for k in theirs)  # every patch did something


def diffusers_format_lora(rank: int = 2) -> dict[str, torch.Tensor]:
    """A diffusers / PEFT-format FLUX LoRA for the tiny model, made here: split q, k, v (and the
    single block's proj_mlp) with their own A and B, some whole modules, no alpha (scale 1)."""
    g = torch.Generator().manual_seed(5)
    h, mlp = TINY["hidden_size"], 4 * TINY["hidden_size"]
    modules = {f"transformer_blocks.0.attn.{m}": (h, h) for m in ("to_q", "to_k", "to_v", "add_q_proj", "add_v_proj")}
    modules |= {"transformer_blocks.1.attn.to_out.0": (h, h), "transformer_blocks.1.ff.net.0.proj": (mlp, h)}
    modules |= {f"single_transformer_blocks.1.attn.{m}": (h, h) for m in ("to_q", "to_k", "to_v")}
    modules |= {"single_transformer_blocks.1.proj_mlp": (mlp, h), "single_transformer_blocks.0.proj_out": (h, h + mlp)}
    sd = {}
    for name, (rows, cols) in modules.items():
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, cols, generator=g) * 0.05
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(rows, rank, generator=g) * 0.05
    return sd


def test_comfyui_slices_of_a_diffusers_file_match_our_reading_of_it():
    """ComfyUI adds each split q / k / v / proj_mlp LoRA to its row slice of the fused weight
    (flux_to_diffusers offsets); lora.py re-fuses them into one kohya LoRA (to_kohya) and merges.
    Both must give the same weights."""
    model = tiny_flux()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    sd = diffusers_format_lora()
    patches, not_loaded = comfy_load(sd, comfy_key_map("flux", base))
    assert not_loaded == []
    sliced = {t for t in patches if not isinstance(t, str)}
    h = TINY["hidden_size"]
    assert ("diffusion_model.double_blocks.0.txt_attn.qkv.weight", (0, 2 * h, h)) in sliced  # add_v_proj
    assert ("diffusion_model.single_blocks.1.linear1.weight", (0, 3 * h, 4 * h)) in sliced  # proj_mlp rows
    theirs = comfy_apply(base, patches)
    apply_lora_file(model, lora.to_kohya(sd, FLUX))
    assert len(theirs) == 6  # img qkv, txt qkv, proj, mlp 0, linear1, linear2
    for key, weight in model.state_dict().items():
        torch.testing.assert_close(weight, theirs.get(key, base[key]), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{key}: {m}")


def test_a_key_comfyui_does_not_know_is_reported():
    """The oracle can fail: a misspelled module and a stray tensor are left over."""
    model = tiny_flux()
    network = randomized_network(model, rank=2)
    sd = network.kohya_state_dict()
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    sd[f"{name}v.lora_up.weight"] = sd.pop(f"{name}.lora_up.weight")
    sd["lora_unet_single_blocks_0_linear1.scale"] = torch.ones(())
    _, not_loaded = comfy_load(sd, comfy_key_map("flux", model.state_dict()))
    assert not_loaded == ["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
                          "lora_unet_double_blocks_0_img_attn_qkvv.lora_up.weight",
                          "lora_unet_single_blocks_0_linear1.scale"]


# --- the helper for the families that come next ---------------------------------------------------

SDXL_UNET_CONFIG = dict(num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10],
                        transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10)


def test_sdxl_config_is_read_back_from_the_keys():
    """SDXL's original UNet keys (every target of ComfyUI's own unet_to_diffusers for SDXL's
    config) give back that config, so the kohya SDXL names map as in ComfyUI."""
    config = dict(SDXL_UNET_CONFIG, channel_mult=[1, 2, 4])
    keys = set(comfy.utils.unet_to_diffusers(config).values())
    derived = stand_in_model("sdxl", keys).model_config.unet_config
    assert {k: derived[k] for k in SDXL_UNET_CONFIG} == SDXL_UNET_CONFIG
    key_map = comfy_key_map("sdxl", keys)
    assert key_map["lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k"] == \
        "diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"
    # diffusers-style kohya names (old SDXL trainers): down_blocks.1.attentions.0 is input block 4
    assert key_map["lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k"] == \
        "diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"


def test_sd3_slices_follow_the_width():
    keys = {"x_embedder.proj.weight": (1536, 16, 2, 2),
            **{f"joint_blocks.{i}.x_block.attn.qkv.weight": (4608, 1536) for i in range(24)}}
    key_map = comfy_key_map("sd3", keys)
    assert key_map["transformer.transformer_blocks.3.attn.to_k"] == \
        ("diffusion_model.joint_blocks.3.x_block.attn.qkv.weight", (0, 1536, 1536))
    qkv = "diffusion_model.joint_blocks.3.x_block.attn.qkv.weight"
    assert key_map["lora_unet_joint_blocks_3_x_block_attn_qkv"] == qkv


def test_clip_key_map_names_kohyas_text_encoder_prefixes():
    keys = [f"clip_l.transformer.text_model.encoder.layers.0.{m}.weight" for m in ("self_attn.q_proj", "mlp.fc1")]
    keys += ["t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"]
    key_map = comfy_clip_key_map(keys)
    assert key_map["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] == keys[0]
    assert key_map["lora_te3_encoder_block_0_layer_0_SelfAttention_q"] == keys[2]  # FLUX: T5 is te3 after CLIP-L
