"""Every LoRA file lora.py writes, for FLUX, as the loaders people use read it: diffusers' own
loaders (FluxPipeline.lora_state_dict, load_lora_into_transformer / _text_encoder, its kohya
converter at full width) and ComfyUI's own key map, loader and patch arithmetic (vendored under
tests/oracles/comfyui/). Features: DoRA, split q/k/v, embedders and final layer, text encoders
(CLIP-L te1, T5 te3), both formats and the round trips between them.
"""
import copy
from pathlib import Path

import pytest
import torch

import demo_data
import lora
from comfy_oracle import comfy_apply, comfy_clip_key_map, comfy_key_map, comfy_load
from families.flux import FAMILY as FLUX
from lora import LoRANetwork
from test_flux import diffusers_model, load_ours, random_inputs, random_state_dict, tiny_params
from log_capture import logged

pytestmark = pytest.mark.usefixtures("one_thread")


def randomize(network: LoRANetwork, seed: int = 1, scale: float = 0.05) -> LoRANetwork:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.loras.values():
            for w in [m.lora_down.weight] + [layer.weight for layer in m._ups()]:
                w.copy_(torch.randn(w.shape, generator=g) * scale)
            if m.dora_scale is not None:
                m.dora_scale.mul_(1 + 0.1 * torch.randn(m.dora_scale.shape, generator=g))
    return network


def flux_network(model, preset="all", dora=False, split=False, rank=4) -> LoRANetwork:
    targets = lora.preset_targets(FLUX.lora_layers(model), preset, FLUX, rank)
    modules = dict(model.named_modules())
    splits = {p: rows for p in targets if (rows := FLUX.lora_fused_rows(p, modules[p]))} if split else None
    return randomize(LoRANetwork.inject(model, targets, alpha=2.0, dora=dora, splits=splits, device="cpu"))


def diffusers_load(path, transformer=None, text_encoder=None):
    """diffusers' FluxPipeline loading path without a pipeline object: lora_state_dict, then
    load_lora_into_transformer / load_lora_into_text_encoder. Returns what diffusers logged."""
    from diffusers import FluxPipeline

    with logged("diffusers") as messages:
        state, alphas = FluxPipeline.lora_state_dict(str(path), return_alphas=True)
        if transformer is not None:
            FluxPipeline.load_lora_into_transformer(state, network_alphas=alphas, transformer=transformer)
        if text_encoder is not None:
            FluxPipeline.load_lora_into_text_encoder(state, network_alphas=alphas, text_encoder=text_encoder,
                                                     prefix="text_encoder")
    return [m for m in messages if any(w in m.lower() for w in ("unexpected", "missing", "unsupported"))]


def deltas(sd: dict) -> dict:
    """kohya name -> (delta, dora_scale or None)."""
    return {n: (lora.lora_delta(p["down"], p["up"], p["alpha"]), p.get("dora")) for n, p in lora.kohya_modules(sd).items()}


# --- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", ["fold", "metadata"])
def test_kohya_diffusers_kohya_round_trip_keeps_every_delta(alpha):
    model = load_ours(random_state_dict(tiny_params(True)), tiny_params(True))
    network = flux_network(model, dora=True, split=True)
    kohya = network.kohya_state_dict()
    sd, meta = lora.kohya_to_diffusers(kohya, FLUX, alpha)
    assert all(k.startswith("transformer.") and not k.startswith("transformer.transformer.") for k in sd)
    assert not any(".default" in k for k in sd) and ("lora_adapter_metadata" in meta) == (alpha == "metadata")
    assert "transformer.single_transformer_blocks.1.proj_mlp.lora_magnitude_vector" in sd
    back = lora.to_kohya(sd, FLUX, meta)
    ours, theirs = deltas(kohya), deltas(back)
    assert set(ours) == set(theirs) == set(network.loras)
    for name, (delta, dora) in ours.items():
        torch.testing.assert_close(theirs[name][0], delta, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(theirs[name][1].reshape(dora.shape), dora, msg=name)


# --- diffusers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("features", [dict(), dict(dora=True, split=True)], ids=["lora", "dora+split"])
def test_diffusers_loads_our_diffusers_file_as_trained(tmp_path, features):
    """Every layer (blocks, embedders, final layer) through FluxPipeline's own loading path into
    a tiny FluxTransformer2DModel: no key left over, the same velocity as our network gives."""
    params = tiny_params(True)
    sd = random_state_dict(params)
    ours, theirs = load_ours(sd, params), diffusers_model(sd, params)
    network = flux_network(ours, **features)
    path = tmp_path / "d.safetensors"
    lora.save_lora(network, path, {}, torch.float32, FLUX, "diffusers")
    assert diffusers_load(path, transformer=theirs) == []
    x = random_inputs(params)
    with torch.no_grad():
        expected = ours(**x)
        got = theirs(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                     timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0], guidance=x["guidance"],
                     return_dict=False)[0]
        network.set_multiplier(0.0)
        base = ours(**x)
    assert (expected - base).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def full_width_split():
    """A 1 double + 1 single block FLUX at full width (meta) with a split, te1-less LoRA on CPU."""
    with torch.device("meta"):
        from models.flux import Flux, FluxParams

        model = Flux(FluxParams(depth=1, depth_single_blocks=1))
    return model, flux_network(model, preset="blocks", split=True, rank=2)


def test_diffusers_kohya_converter_reads_split_and_refuses_kohya_dora(full_width_split):
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    model, network = full_width_split
    kohya = network.kohya_state_dict()
    converted = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    ours = lora.kohya_to_diffusers(kohya, FLUX)[0]
    probe = torch.randn(3072, 8, generator=torch.Generator().manual_seed(0))
    for key in (k for k in converted if k.endswith("lora_A.weight") and "transformer_blocks.0.attn.to_k" in k):
        a, b = converted[key].float(), converted[key.replace("lora_A", "lora_B")].float()
        mine_a, mine_b = ours[key].float(), ours[key.replace("lora_A", "lora_B")].float()
        torch.testing.assert_close(b @ (a @ probe), mine_b @ (mine_a @ probe), rtol=1e-5, atol=1e-6)
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    with_dora = dict(kohya, **{f"{name}.dora_scale": torch.ones(9216, 1)})
    with pytest.raises(ValueError, match="Incompatible keys"):  # what loader_notes tells the user
        _convert_kohya_flux_lora_to_diffusers(with_dora)
    notes = lora.format_notes(FLUX, "kohya", {}, [], dora=True)
    assert any("diffusers reads DoRA from diffusers-format files" in n for n in notes)


@pytest.fixture(scope="module")
def text_encoders(tmp_path_factory):
    from transformers import CLIPTextModel, T5EncoderModel

    root = tmp_path_factory.mktemp("te")
    clip = CLIPTextModel.from_pretrained(demo_data.make_clip(root / "clip")).eval()
    t5 = T5EncoderModel.from_pretrained(demo_data.make_t5(root / "t5")).eval()
    return clip, t5


def te_network(model, encoder: str) -> LoRANetwork:
    prefix, targets = FLUX.text_encoder_loras()[encoder][0], FLUX.text_encoder_lora_targets(encoder, model, 4)
    return randomize(LoRANetwork.inject(model, targets, alpha=2.0, prefix=prefix,
                                        names=lora.text_encoder_names(model, targets)), scale=0.1)


@pytest.mark.parametrize("lora_format", ["kohya", "diffusers"])
def test_clip_l_lora_loads_in_diffusers_text_encoder(tmp_path, text_encoders, lora_format):
    clip, _ = text_encoders
    theirs, ours = copy.deepcopy(clip), copy.deepcopy(clip)
    network = te_network(ours, "clip_l")
    path = tmp_path / "te.safetensors"
    lora.save_lora(network, path, {}, torch.float32, FLUX, lora_format)
    assert diffusers_load(path, text_encoder=theirs) == []
    ids = torch.tensor([[0, 5, 6, 7, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).last_hidden_state, ours(input_ids=ids).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
        assert (ours(input_ids=ids).last_hidden_state - clip(input_ids=ids).last_hidden_state).abs().max() > 1e-3
    assert any("T5" in n for n in FLUX.text_encoder_loader_notes(["t5"]))  # diffusers' FLUX loader skips T5's


# --- ComfyUI -------------------------------------------------------------------------------------


def test_comfyui_reads_split_and_dora_kohya_files():
    """Split modules load as plain fused LoRAs; DoRA modules load as DoRA, applied with ComfyUI's
    output-axis norm of the base weight (ComfyUI a125cd8; PR #15458), as loader_notes says."""
    params = tiny_params(True)
    model = load_ours(random_state_dict(params), params)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for features in (dict(split=True), dict(dora=True)):
        network = flux_network(model, **features)
        sd = network.kohya_state_dict()
        patches, not_loaded = comfy_load(sd, comfy_key_map("flux", base))
        assert not_loaded == [] and len(patches) == len(network.loras)
        theirs = comfy_apply(base, patches, strength=0.7)
        for name, path in network.module_paths.items():
            parts = {k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith(name + ".")}
            weight = base[f"{path}.weight"]
            if "dora_scale" in parts:  # ComfyUI: W + t (m (W + D) / ||W|| - W)
                adapted = weight + lora.lora_delta(parts["lora_down.weight"], parts["lora_up.weight"], parts["alpha"])
                expected = weight + 0.7 * (parts["dora_scale"] / weight.norm(dim=1, keepdim=True) * adapted - weight)
            else:
                expected = lora.merged_weight(weight, parts["lora_down.weight"], parts["lora_up.weight"],
                                              parts["alpha"], 0.7)
            torch.testing.assert_close(theirs[f"{path}.weight"], expected, rtol=1e-5, atol=1e-6, msg=name)
        network.remove()
    assert lora.COMFYUI_DORA_NOTE in lora.format_notes(FLUX, "kohya", {}, [], dora=True)


def test_comfyui_applies_our_diffusers_file_as_our_merge():
    params = tiny_params(True)
    model = load_ours(random_state_dict(params), params)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    network = flux_network(model, split=True)
    sd = lora.diffusers_state_dict(network, FLUX)
    patches, not_loaded = comfy_load(sd, comfy_key_map("flux", base))
    assert not_loaded == []
    theirs = comfy_apply(base, patches, strength=0.7)
    network.set_multiplier(0.7)
    network.merge()
    merged = model.state_dict()
    assert len(theirs) == len(network.loras)
    for key, weight in theirs.items():
        torch.testing.assert_close(weight, merged[key], rtol=1e-5, atol=1e-6, msg=key)


def test_comfyui_reads_text_encoder_loras(text_encoders):
    """CLIP-L as lora_te1_ and T5 as lora_te3_ (kohya's FLUX numbering): ComfyUI's CLIP key map
    loads every key, and its patches are our deltas at strength 0.7."""
    clip, t5 = text_encoders
    ours_clip, ours_t5 = copy.deepcopy(clip), copy.deepcopy(t5)
    network = LoRANetwork.join([te_network(ours_clip, "clip_l"), te_network(ours_t5, "t5")])
    sd = network.kohya_state_dict()
    weights = {f"clip_l.transformer.text_model.{k}": v for k, v in clip.state_dict().items()} | \
        {f"t5xxl.transformer.{k}": v for k, v in t5.state_dict().items()}  # ComfyUI's names (released files')
    patches, not_loaded = comfy_load(sd, comfy_clip_key_map(weights))
    assert not_loaded == [] and len(patches) == len(network.loras)
    theirs = comfy_apply(weights, patches, strength=0.7)
    network.set_multiplier(0.7)
    network.merge()
    merged = {f"clip_l.transformer.text_model.{k}": v for k, v in ours_clip.state_dict().items()} | \
        {f"t5xxl.transformer.{k}": v for k, v in ours_t5.state_dict().items()}
    for key, weight in theirs.items():
        torch.testing.assert_close(weight, merged[key], rtol=1e-5, atol=1e-6, msg=key)
