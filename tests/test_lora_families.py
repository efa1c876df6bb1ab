"""The LoRA features and tools on SD3 and SDXL (FLUX: test_lora_training.py, test_lora_formats.py,
test_lora_tools.py): layer-targeting presets on the released shapes, training through train.main
with DoRA, split q/k/v (SD3), LoCon (SDXL), text-encoder LoRA (CLIP-L, CLIP-G, T5); the files in
ComfyUI's key map (vendored, tests/comfy_oracle.py) and diffusers' loaders; python lora.py
convert, merge, extract and info on the families' own checkpoint layouts; what a family cannot do
is a config error."""
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import demo_data
import families
import lora
import lora_tools
import train
from comfy_oracle import comfy_clip_key_map, comfy_key_map, comfy_load
from config import ConfigError, load_config
from log_capture import logged

pytestmark = pytest.mark.usefixtures("one_thread")

SD3, SDXL = families.get("sd3"), families.get("sdxl")
PREFIX = "model.diffusion_model."


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    root = tmp_path_factory.mktemp("demos")
    sdxl = demo_data.make_sdxl_demo(root / "sdxl")
    # SDXL's layout (2 ResBlocks per level, 9 input and 9 output blocks): the one diffusers' names describe
    sdxl["model_path"] = str(demo_data.make_sdxl(root / "sdxl" / "tiny" / "sdxl_tiny.safetensors",
                                                 unet=dict(demo_data.SDXL_TINY, num_res_blocks=[2, 2, 2])))
    return {"sd3": demo_data.make_sd3_demo(root / "sd3"), "sdxl": sdxl}


def config_file(folder: Path, files: dict, family: str, **settings) -> str:
    base = dict(files, model_family=family, output_dir=str(folder / "runs"), cache_dir=str(folder / "cache"),
                run_name="t", device="cpu", dtype="fp32", resolution=16, batch_size=2, network_dim=4,
                network_alpha=2.0, learning_rate=1e-3, max_train_steps=2, save_every=0, sample_every=0,
                sample_at_start=False, validate_every=0, gradient_checkpointing=False, lr_scheduler="constant",
                sample_prompts="", save_dtype="fp32")
    base |= {"t5_max_length": 8} if family == "sd3" else {"model_overrides": {"num_head_channels": 16}}
    base.update(settings)
    if base.get("train_mode") == "full":  # LoRA settings are refused for full fine-tuning
        base = {k: v for k, v in base.items() if k not in ("network_dim", "network_alpha")}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.py"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in base.items()))
    return str(path)


def denoiser_keys(model_path: str) -> dict:
    with safe_open(model_path, "pt") as f:
        return {k.removeprefix(PREFIX): f.get_slice(k).get_shape() for k in f.keys() if k.startswith(PREFIX)}


def parts_by_prefix(sd: dict) -> dict[str, dict]:
    modules = lora.kohya_modules(sd)
    return {prefix: {n: p for n, p in modules.items() if n.startswith(prefix + "_")}
            for prefix in ("lora_unet", "lora_te1", "lora_te2", "lora_te3")}


# --- presets on the released shapes ----------------------------------------------------------------


def test_presets_select_by_role_on_the_released_models():
    sd35_medium = SD3.lora_skeletons()[1]
    layers = SD3.lora_layers(sd35_medium)
    depth = len(sd35_medium.joint_blocks)
    select = {name: lora.preset_layers(layers, name, SD3) for name in lora.presets(SD3)}
    assert all(".attn." in p or ".attn2." in p for p in select["attention_only"])
    assert all(".context_block." in p for p in select["context_blocks"])
    assert {int(p.split(".")[1]) for p in select["late_blocks"]} == set(range(depth // 2, depth))
    assert set(select["all"]) - set(select["no_embedders"]) == {
        "context_embedder", "t_embedder.mlp.0", "t_embedder.mlp.2", "x_embedder.proj", "y_embedder.mlp.0",
        "y_embedder.mlp.2"}
    # the default (kohya's lora_sd3: every Linear of the blocks) is the "blocks" preset
    assert set(SD3.lora_targets(sd35_medium, load_config(None, ["--model_family=sd3"], check_files=False))) == \
        set(select["blocks"])

    unet = SDXL.lora_skeletons()[0]
    layers = SDXL.lora_layers(unet)
    select = {name: lora.preset_layers(layers, name, SDXL) for name in lora.presets(SDXL)}
    assert select["context_blocks"] and all(p.endswith(("attn2.to_k", "attn2.to_v")) for p in select["context_blocks"])
    assert len(select["transformer_blocks"]) == 722  # kohya's SDXL LoRA
    assert not any(p.startswith("input_blocks") for p in select["late_blocks"])
    assert not any(p.startswith("output_blocks") for p in select["early_blocks"])
    conv = [p for p in select["blocks"] if isinstance(dict(unet.named_modules())[p], torch.nn.Conv2d)]
    assert len(conv) == len(set(select["blocks"]) - set(select["transformer_blocks"]) -
                            {p for p in select["blocks"] if ".emb_layers." in p})  # LoCon on every conv


@pytest.mark.parametrize("family, setting, message", [
    ("sdxl", dict(split_qkv=True), "split_qkv: SDXL has no fused q/k/v weights this trainer splits"),
    ("sdxl", dict(text_encoder_lr={"t5": 1e-4}), r"SDXL has no text encoder \['t5'\] to train; choose among"),
    ("sdxl", dict(targets="late_blocks", conv_dim=4), "targets='late_blocks' is a whole selection; conv_dim"),
    ("sd3", dict(targets="attention_only", train_joint_blocks="0"), "train_joint_blocks would change it"),
    ("sd3", dict(targets="transformer_blocks"), "not a preset of SD3 / SD3.5"),
])
def test_what_a_family_cannot_do_is_a_config_error(tmp_path, demos, family, setting, message):
    with pytest.raises(ConfigError, match=message):
        load_config(config_file(tmp_path, demos[family], family, **setting), [])


# --- SD3: DoRA, split q/k/v, a preset, all three text encoders ---------------------------------------


def test_sd3_split_dora_and_three_text_encoders_train_and_load_in_comfyui(tmp_path, demos, capsys):
    files = demos["sd3"]
    final = train.main([config_file(tmp_path, files, "sd3", use_dora=True, split_qkv=True, targets="all",
                                    text_encoder_lr={"clip_l": 1e-3, "clip_g": 1e-3, "t5": 1e-3},
                                    caption_dropout_rate=0.5, lora_format="kohya")])
    out = capsys.readouterr().out
    assert "text encoder clip_g (lora_te2)" in out and "note: diffusers (T5, lora_te3)" in out
    sd = load_file(final)
    parts = parts_by_prefix(sd)
    assert all(parts[p] for p in parts) and all("dora" in m for m in parts["lora_unet"].values())
    assert all(m["up"].abs().sum() > 0 for group in parts.values() for m in group.values())  # all trained
    qkv = parts["lora_unet"]["lora_unet_joint_blocks_0_x_block_attn_qkv"]
    assert qkv["down"].shape[0] == 3 * 4 and lora_tools.block_diagonal(qkv)  # split, saved fused
    _, not_loaded = comfy_load({k: v for k, v in sd.items() if k.startswith("lora_unet")},
                               comfy_key_map("sd3", denoiser_keys(files["model_path"])))
    assert not_loaded == []
    te_keys = [f"{clip}.transformer.text_model.{k.removeprefix('text_model.')}" for clip in ("clip_l", "clip_g")
               for k in load_file(Path(files[f"{clip}_path"]) / "model.safetensors")] + \
        [f"t5xxl.transformer.{k}" for k in load_file(Path(files["t5_path"]) / "model.safetensors")]  # ComfyUI's names
    _, not_loaded = comfy_load({k: v for k, v in sd.items() if k.startswith("lora_te")}, comfy_clip_key_map(te_keys))
    assert not_loaded == []
    round_trip(final, tmp_path, SD3)


def round_trip(path, folder: Path, family) -> None:
    """-> diffusers -> kohya with python lora.py convert: every module's delta and magnitude kept."""
    diffusers, back = folder / "d.safetensors", folder / "k.safetensors"
    assert lora_tools.main(["convert", str(path), str(diffusers), "--to", "diffusers"]) == 0
    assert lora_tools.main(["convert", str(diffusers), str(back), "--to", "kohya"]) == 0
    before = lora.kohya_modules(lora.load_lora_file(path, family)[0])
    after = lora.kohya_modules(load_file(back))
    assert set(before) == set(after)
    for name, p in before.items():
        q = after[name]
        torch.testing.assert_close(lora.lora_delta(q["down"], q["up"], q["alpha"]),
                                   lora.lora_delta(p["down"], p["up"], p["alpha"]), rtol=1e-5, atol=1e-7, msg=name)
        if "dora" in p:
            torch.testing.assert_close(q["dora"].flatten(), p["dora"].flatten())
    resized = folder / "r.safetensors"
    assert lora_tools.main(["resize", str(back), str(resized), "--rank", "2"]) == 0
    assert {parts["down"].shape[0] for parts in lora.kohya_modules(load_file(resized)).values()} == {2}
    lines = lora_tools.info(str(diffusers))
    assert f"{family.title} LoRA, diffusers format, {len(before)} modules" in lines[0]
    assert any(line.startswith("  text encoder clip_g (lora_te2): ") for line in lines)


# --- SDXL: LoCon everywhere with DoRA, both CLIPs, written for diffusers ------------------------------


def test_sdxl_locon_dora_and_both_clips_train_and_load_in_diffusers_and_comfyui(tmp_path, demos, capsys):
    from diffusers import StableDiffusionXLPipeline
    from test_sdxl_family import diffusers_unet

    from models.unet import UNet

    files = demos["sdxl"]
    final = train.main([config_file(tmp_path, files, "sdxl", use_dora=True, targets="blocks", lora_format="diffusers",
                                    text_encoder_lr={"clip_l": 1e-3, "clip_g": 5e-4}, loraplus_lr_ratio=4.0)])
    assert "text encoder clip_g (lora_te2)" in capsys.readouterr().out
    sd = load_file(final)
    assert {k.split(".")[0] for k in sd} == {"unet", "text_encoder", "text_encoder_2"}
    base = {k.removeprefix(PREFIX): v for k, v in load_file(files["model_path"]).items() if k.startswith(PREFIX)}
    unet = UNet.from_state_dict(dict(base), num_head_channels=16)
    theirs = diffusers_unet(base, unet.params)
    with logged("diffusers", logging.WARNING) as warnings:
        state_dict, alphas = StableDiffusionXLPipeline.lora_state_dict(str(final), unet_config=theirs.config)
        StableDiffusionXLPipeline.load_lora_into_unet(state_dict, alphas, unet=theirs, adapter_name="t")
    assert warnings == []
    adapted = {n for n, m in theirs.named_modules() if hasattr(m, "lora_magnitude_vector") and "t" in m.lora_A}
    assert adapted == {k.removeprefix("unet.").split(".lora_")[0] for k in sd if k.startswith("unet.")}
    modules = dict(theirs.named_modules())
    assert any(isinstance(modules[n].base_layer, torch.nn.Conv2d) for n in adapted)  # LoCon, as DoRA
    assert_same_outputs(unet, theirs, final)
    kohya = lora.to_kohya(sd, SDXL, {})
    _, not_loaded = comfy_load({k: v for k, v in kohya.items() if k.startswith("lora_unet")},
                               comfy_key_map("sdxl", {k: v.shape for k, v in base.items()}))
    assert not_loaded == []
    clip_keys = [f"{clip}.transformer.text_model.encoder.layers.{i}.{m}.weight" for clip in ("clip_l", "clip_g")
                 for i in range(2) for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                             "self_attn.out_proj", "mlp.fc1", "mlp.fc2")]  # ComfyUI's names
    _, not_loaded = comfy_load({k: v for k, v in kohya.items() if k.startswith("lora_te")}, comfy_clip_key_map(clip_keys))
    assert not_loaded == [] and {k.split("_")[1] for k in kohya if k.startswith("lora_te")} == {"te1", "te2"}
    round_trip(final, tmp_path, SDXL)


def assert_same_outputs(ours, theirs, path) -> None:
    """Our UNet with the file merged (lora.py) and diffusers' with it loaded (PEFT, on the fly) agree."""
    from models.unet import size_embedding

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, ours.params.in_channels, 8, 8, generator=g)
    context = torch.randn(2, 5, ours.params.context_dim, generator=g)
    pooled = torch.randn(2, demo_data.SDXL_TEXT_WIDTH, generator=g)
    time_ids = torch.tensor([[24.0, 40, 0, 5, 16, 16], [16, 16, 0, 0, 16, 16]])
    y = torch.cat([pooled, size_embedding(time_ids[:, :2], time_ids[:, 2:4], time_ids[:, 4:])], dim=1)
    t = torch.tensor([999, 10])
    with torch.no_grad():
        plain = ours(x, t, context, y)
        with pytest.warns(UserWarning, match="24 LoRA modules are not for this network"):  # the CLIPs' 2 x 12
            lora.apply_lora_file(ours, path, SDXL)
        got = ours(x, t, context, y)
        expected = theirs(x, t, encoder_hidden_states=context, return_dict=False,
                          added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})[0]
    assert (got - plain).abs().max() > 1e-4  # the LoRA changes the output, as diffusers applies it
    print("SDXL DoRA + LoCon, ours merged vs diffusers (PEFT) on the fly: max abs difference",
          (got - expected).abs().max().item())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# --- python lora.py merge / extract on the families' single files ----------------------------------


@pytest.mark.parametrize("family_name", ["sd3", "sdxl"])
def test_merge_into_the_single_file_then_extract_gives_the_lora_back(tmp_path, demos, family_name):
    """SDXL: CLIP-L (HF layout) and bigG (OpenCLIP's, q / k / v stacked in in_proj_weight) merge
    into the checkpoint's conditioner too."""
    from models.text import OPENCLIP_PREFIXES, openclip_text_state_dict

    files, family = demos[family_name], families.get(family_name)
    sdxl = dict(conv_alpha=0.0, text_encoder_lr={"clip_l": 1e-3, "clip_g": 1e-3}) if family_name == "sdxl" else {}
    final = train.main([config_file(tmp_path, files, family_name, targets="all", max_train_steps=1, **sdxl)])
    merged, extracted = tmp_path / "merged.safetensors", tmp_path / "extracted.safetensors"
    assert lora_tools.main(["merge", files["model_path"], str(merged), "--lora", f"{final}:0.5"]) == 0
    with safe_open(str(merged), "pt") as f, safe_open(files["model_path"], "pt") as g:
        assert list(f.keys()) == list(g.keys())  # the whole file (text encoders too), in its layout
    base, tuned = load_file(files["model_path"]), load_file(merged)
    views = {"lora_unet": (base, tuned, PREFIX), "lora_te1": (base, tuned, "conditioner.embedders.0.transformer.")}
    bigg = [openclip_text_state_dict({k[len(OPENCLIP_PREFIXES[0]):]: v for k, v in sd.items()
                                      if k.startswith(OPENCLIP_PREFIXES[0])}) for sd in (base, tuned)]
    views["lora_te2"] = (*bigg, "")  # in HF names
    modules = lora.kohya_modules(lora.load_lora_file(final, family)[0])  # SD3 writes diffusers names by default
    paths = lora.module_paths(family, modules)
    assert {prefix for prefix, _ in paths.values()} == ({"lora_unet", "lora_te1", "lora_te2"} if sdxl else {"lora_unet"})
    for name, parts in modules.items():
        before, after, prefix = views[paths[name][0]]
        key = f"{prefix}{paths[name][1]}.weight"
        delta = lora.lora_delta(parts["down"], parts["up"], parts["alpha"], 0.5)
        torch.testing.assert_close(after[key] - before[key], delta.reshape(before[key].shape), rtol=1e-4, atol=1e-6,
                                   msg=name)
    assert lora_tools.main(["extract", files["model_path"], str(merged), str(extracted), "--rank", "4",
                            "--dtype", "fp32"]) == 0
    back = lora.kohya_modules(load_file(extracted))  # the denoiser's (kohya's extract leaves text encoders out)
    assert set(back) == {name for name in modules if name.startswith("lora_unet")}
    for name in back:
        parts = modules[name]
        expected = lora.lora_delta(parts["down"], parts["up"], parts["alpha"], 0.5)
        got = lora.lora_delta(back[name]["down"], back[name]["up"], back[name]["alpha"])
        torch.testing.assert_close(got.reshape(expected.shape), expected, rtol=1e-3, atol=1e-5, msg=name)


def test_sd3_dora_split_file_in_diffusers_loader_gives_our_output(tmp_path, monkeypatch):
    """A DoRA LoRA trained split on the fused q/k/v, on every layer, written in diffusers names:
    diffusers' SD3 loader (PEFT, applied on the fly) leaves no key and gives lora.py's merged output."""
    import diffusers.loaders.peft as diffusers_peft
    from diffusers.loaders import SD3LoraLoaderMixin
    from test_mmdit import diffusers_model, random_inputs, random_state_dict, run_diffusers
    from test_sd3_family import TINY

    from models.mmdit import MMDiT

    sd = random_state_dict(TINY)
    ours = MMDiT.from_state_dict(dict(sd)).eval()
    modules = dict(ours.named_modules())
    targets = lora.preset_targets(SD3.lora_layers(ours), "all", SD3, 4)
    splits = {p: rows for p in targets if (rows := SD3.lora_fused_rows(p, modules[p]))}
    network = lora.LoRANetwork.inject(ours, targets, alpha=2.0, dora=True, splits=splits)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in network.loras.values():
            for w in [m.lora_down.weight] + [layer.weight for layer in m._ups()]:
                w.copy_(torch.randn(w.shape, generator=g) * 0.05)
            m.dora_scale.mul_(1 + 0.1 * torch.randn(m.dora_scale.shape, generator=g))
    path = tmp_path / "dora.safetensors"
    lora.save_lora(network, path, {}, torch.float32, SD3, "diffusers")
    x = random_inputs(TINY)
    with torch.no_grad():
        expected = ours(**x)  # the LoRA on the fly in our network
    theirs = diffusers_model(sd, TINY)
    with torch.no_grad():
        plain = run_diffusers(theirs, x)
    reported = []
    monkeypatch.setattr(diffusers_peft, "_maybe_warn_for_unhandled_keys", lambda keys, name: reported.append(keys))
    state_dict, metadata = SD3LoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    SD3LoraLoaderMixin.load_lora_into_transformer(state_dict, transformer=theirs, metadata=metadata)
    assert reported and reported[0].unexpected_keys == [] and not [k for k in reported[0].missing_keys if "lora" in k]
    assert len(splits) == 5 and sum(hasattr(m, "lora_magnitude_vector") for m in theirs.modules()) == \
        len(network.loras) + 2 * len(splits)  # each fused qkv is three diffusers modules
    with torch.no_grad():
        got = run_diffusers(theirs, x)
    print("SD3 DoRA split, ours vs diffusers (PEFT): max abs difference", (got - expected).abs().max().item())
    assert (got - plain).abs().max() > 1e-3  # the LoRA changes the output
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_sdxl_full_finetuning_trains_only_what_a_preset_selects(tmp_path, demos):
    files = demos["sdxl"]
    final = train.main([config_file(tmp_path, files, "sdxl", train_mode="full", targets="context_blocks",
                                    max_train_steps=1)])
    base, tuned = load_file(files["model_path"]), load_file(final)
    changed = {k for k in tuned if not torch.equal(base[PREFIX + k].float(), tuned[k].float())}
    assert changed and all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in changed)


def test_if_dora_file_in_diffusers_if_pipeline_gives_our_output(tmp_path):
    """DeepFloyd IF: DoRA in diffusers names (the fused qkv split per head, its magnitudes with it)
    through IFPipeline.load_lora_weights equals ours, and reads back through lora.py."""
    from diffusers import DDPMScheduler, IFPipeline, UNet2DConditionModel
    from test_if_family import tiny_unet

    from families import deepfloyd
    from models.deepfloyd import IFUNet, diffusers_config, to_diffusers

    model = tiny_unet(demo_data.IF_STAGE_I_TINY)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    network = lora.LoRANetwork.inject(model, deepfloyd.lora_targets(model, 4, {}), alpha=2.0, dora=True)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in network.loras.values():
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.1)
            m.dora_scale.mul_(1 + 0.1 * torch.randn(m.dora_scale.shape, generator=g))
    family = deepfloyd.FAMILY.for_network(model)
    path = tmp_path / "if_dora.safetensors"
    lora.save_lora(network, path, {}, torch.float32, family, "diffusers")
    unet = UNet2DConditionModel(**diffusers_config(model.config))
    unet.load_state_dict(to_diffusers(base, model.config), strict=True)
    pipe = IFPipeline(tokenizer=None, text_encoder=None, unet=unet, scheduler=DDPMScheduler(), safety_checker=None,
                      feature_extractor=None, watermarker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(path))
    torch.manual_seed(1)
    x, t, text = torch.randn(2, 3, 16, 16), torch.tensor([10, 700]), torch.randn(2, 5, 32)
    with torch.no_grad():
        ours = model(x, t, text)
        theirs = pipe.unet(x, t, encoder_hidden_states=text).sample
    print("IF DoRA, ours vs diffusers (PEFT): max abs difference", (ours - theirs).abs().max().item())
    assert (ours - theirs).abs().max() < 1e-4
    fresh = IFUNet(model.config).eval()
    fresh.load_state_dict(base)
    lora.apply_lora_file(fresh, path, deepfloyd.FAMILY, merge=False)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, text), ours, rtol=1e-5, atol=1e-6)
    # python lora.py merge into an IF model folder: its names bound to the folder's UNet
    folder = tmp_path / "IF-I-tiny"
    folder.mkdir()
    (folder / "config.yml").write_text(demo_data.if_config_yml(demo_data.IF_STAGE_I_TINY))
    save_file({k: v.contiguous() for k, v in base.items()}, str(folder / "pytorch_model.safetensors"))
    assert lora_tools.main(["merge", str(folder), str(tmp_path / "merged.safetensors"), "--lora", str(path)]) == 0
    merged = IFUNet(model.config).eval()
    merged.load_state_dict(load_file(tmp_path / "merged.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, text), ours, rtol=1e-4, atol=1e-5)
