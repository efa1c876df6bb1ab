"""SD3 / SD3.5 through the family seam (families/sd3.py), on tiny weights made here.

The real entry points: train.main (LoRA and full fine-tuning, resume, samples with CFG, APG and
skip-layer guidance, an all-in-one file with its VAE and text encoders), sample.main, and
`train.py CONFIG --plan` for every shipped SD3 config. The LoRA files as their readers see them:
diffusers' own SD3 loader (SD3LoraLoaderMixin, what StableDiffusion3Pipeline.load_lora_weights
runs), ComfyUI's key map, and lora.py's reader, all giving the same weight changes. And: detection
among the families, the family's config defaults (a FLUX config is untouched), kohya's targets at
full size, per-encoder dropout, block swap and the fp8 base on the pre-only last block.
"""
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import checkpoint
import demo_data
import families
import lora
import plan
import sample
import train
import training
from config import DEFAULTS, ConfigError, load_config
from families import sd3
from models.mmdit import MMDiT, MMDiTParams

pytestmark = pytest.mark.usefixtures("one_thread")

GiB = 2**30
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
FAMILY = families.get("sd3")
# SD3.5-Medium-like: QK RMSNorm, attn2 in block 0, the pre-only last context block (hidden 128).
TINY = MMDiTParams(depth=2, pos_embed_max_size=16, qk_norm="rms", x_block_self_attn_layers=(0,), adm_in_channels=24,
                   context_embedder_in_features=40)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return demo_data.make_sd3_demo(tmp_path_factory.mktemp("sd3demo"))


def config_file(tmp_path: Path, files: dict, **settings) -> str:
    base = dict(files, model_family="sd3", output_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"),
                run_name="t", device="cpu", dtype="fp32", resolution=16, t5_max_length=8, batch_size=4,
                network_dim=4, network_alpha=2.0, learning_rate=1e-3, max_train_steps=4, save_every=2,
                sample_every=0, sample_at_start=False, validate_every=0, gradient_checkpointing=False,
                lr_scheduler="constant")
    base.update(settings)
    if base.get("train_mode") == "full":  # LoRA keys are an error for full fine-tuning
        base = {k: v for k, v in base.items() if k not in ("network_dim", "network_alpha")}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.py"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in base.items()))
    return str(path)


def losses_of(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def randomize_(network: lora.LoRANetwork, seed: int = 2) -> lora.LoRANetwork:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.loras.values():
            for w in (module.lora_down.weight, module.lora_up.weight):
                w.copy_(torch.randn(w.shape, generator=g) * 0.05)
    return network


def tiny_model(params: MMDiTParams = TINY, seed: int = 0) -> MMDiT:
    torch.manual_seed(seed)
    model = MMDiT(params).requires_grad_(False)
    with torch.no_grad():
        model.pos_embed.normal_()
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


# --- detection, config ---------------------------------------------------------------------------


def test_detection_tells_sd3_from_flux_and_sdxl(demo):
    from models.loading import load_state_dict

    sd = load_state_dict(demo["model_path"])
    assert families.detect(sd) is FAMILY
    flux = load_state_dict(demo_data.make_flux(Path(demo["model_path"]).parent / "flux.safetensors"))
    assert families.detect(flux).name == "flux"
    assert not FAMILY.detect(flux)
    sdxl = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
            "model.diffusion_model.label_emb.0.0.weight": torch.zeros(1)}
    assert not FAMILY.detect(sdxl)
    assert families.detect(sdxl).name == "sdxl"
    with pytest.raises(ValueError, match="looks like"):
        families.detect({"model.diffusion_model.something.weight": torch.zeros(1)})
    diffusers_layout = {"pos_embed.proj.weight": torch.zeros(1), "transformer_blocks.0.attn.add_q_proj.weight": 0}
    assert FAMILY.detect(diffusers_layout)  # so that params() can say what to do instead
    with pytest.raises(ValueError, match="diffusers-format SD3 transformer"):
        FAMILY.params(diffusers_layout, dict(DEFAULTS))


def test_sd3_defaults_apply_only_where_the_config_is_silent_and_flux_is_untouched(tmp_path, demo):
    cfg = load_config(config_file(tmp_path, demo))
    assert (cfg["timestep_sampling"], cfg["model_prediction_type"], cfg["lora_format"]) == \
        ("logit_normal", "x0_preconditioned", "diffusers")
    cfg = load_config(config_file(tmp_path, demo, timestep_sampling="shift"), ["--model_prediction_type=raw"])
    assert (cfg["timestep_sampling"], cfg["model_prediction_type"]) == ("shift", "raw")
    auto = load_config(config_file(tmp_path, {k: v for k, v in demo.items()}, model_family="auto"))
    assert auto["model_family"] == "sd3" and auto["timestep_sampling"] == "logit_normal"

    flux = load_config(str(CONFIGS / "flux_12gb.py"), check_files=False)
    assert {k: flux[k] for k in ("timestep_sampling", "model_prediction_type", "lora_format", "run_name")} == \
        {"timestep_sampling": "shift", "model_prediction_type": "raw", "lora_format": "kohya",
         "run_name": "flux_lora_12gb"}
    with pytest.raises(ConfigError, match="clip_g_path: not used by FLUX.1"):
        load_config(str(CONFIGS / "flux_12gb.py"), ["--clip_g_path=x.safetensors"], check_files=False)
    with pytest.raises(ConfigError, match="guidance_scale: not used by SD3"):
        load_config(config_file(tmp_path, demo, guidance_scale=3.5))
    with pytest.raises(ConfigError, match="float16"):
        load_config(config_file(tmp_path, demo, dtype="fp16"))
    with pytest.raises(ConfigError, match="train_joint_blocks='0-x'"):
        load_config(config_file(tmp_path, demo, train_joint_blocks="0-x"))
    no_clips = {k: v for k, v in demo.items() if k not in ("clip_l_path", "clip_g_path")}
    with pytest.raises(ConfigError, match="clip_l_path and clip_g_path empty"):
        load_config(config_file(tmp_path, no_clips))


# --- training through train.main -----------------------------------------------------------------

LORA_RUN = dict(clip_l_dropout_rate=0.3, clip_g_dropout_rate=0.3, t5_dropout_rate=0.3, pos_emb_random_crop_rate=0.5,
                network_dropout=0.1, caption_dropout_rate=0.2, group_ranks={"t_embedder": 2, "x_mod": 2})


def test_lora_trains_resumes_identically_and_samples_from_its_file(tmp_path, demo):
    straight = tmp_path / "straight"
    final = train.main([config_file(straight, demo, **LORA_RUN)])
    split = tmp_path / "split"
    train.main([config_file(split, demo, **LORA_RUN, max_train_steps=2)])
    resumed = train.main([config_file(split, demo, **LORA_RUN, resume="latest")])
    assert losses_of(final.parent) == losses_of(resumed.parent)
    a, b = load_file(str(final)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(checkpoint.RunFolderError, match="train_joint_blocks: 'all' -> '1'"):  # other targets
        train.main([config_file(split, demo, **LORA_RUN, resume="latest", max_train_steps=6, train_joint_blocks="1")])

    # the SD3 default: diffusers names (every q/k/v slice its own module), kohya's metadata
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in a)
    assert "transformer.transformer_blocks.0.attn2.to_k.lora_A.weight" in a
    assert "transformer.time_text_embed.timestep_embedder.linear_1.lora_A.weight" in a  # group_ranks names it
    assert a["transformer.transformer_blocks.0.norm1.linear.lora_A.weight"].shape[0] == 2  # x_mod rank 2
    assert a["transformer.transformer_blocks.0.norm1_context.linear.lora_A.weight"].shape[0] == 4
    with safe_open(str(final), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-3-3-5-medium/lora"
    assert (meta["ss_base_model_version"], meta["ss_network_module"]) == ("3-5-medium", "networks.lora_sd3")
    assert json.loads(meta["ss_network_args"])["group_ranks"] == {"t_embedder": 2, "x_mod": 2}
    assert (meta["ss_weighting_scheme"], meta["ss_train_block_indices"]) == ("logit_normal", "all")

    image = tmp_path / "red.png"
    paths = sample.main(["--model", demo["model_path"], "--clip_l", demo["clip_l_path"],
                         "--clip_g", demo["clip_g_path"], "--t5", demo["t5_path"], "--t5_max_length", "8",
                         "--dtype", "fp32", "--device", "cpu",
                         "--prompt", "a red circle --n a blue square --l 3 --s 3 --w 16 --h 16 --d 4",
                         "--lora", f"{final}:0.8", "--out", str(image)])
    assert paths == [image] and image.exists()


def test_the_six_gb_recipe_trains_on_tiny_weights(tmp_path, demo):
    """configs/sd35_large_lora.py's switches (fp8 base, fused Adafactor step, checkpointing,
    offloaded activations) through train.main; block swap itself is in the block-swap test."""
    recipe = {k: v for k, v in load_config(str(CONFIGS / "sd35_large_lora.py"), check_files=False).items()
              if k in ("fp8_base", "optimizer", "fused_backward", "max_grad_norm", "offload_activations")}
    final = train.main([config_file(tmp_path, demo, dtype="bf16", gradient_checkpointing=True, pin_memory=False,
                                    max_train_steps=3, save_every=0, **recipe)])
    losses = losses_of(final.parent)
    assert len(losses) == 3 and all(0 < loss < 10 for loss in losses)
    assert recipe == {"fp8_base": True, "optimizer": "adafactor", "fused_backward": True, "max_grad_norm": 0.0,
                      "offload_activations": True}


def test_full_finetune_freezes_what_it_is_told_and_samples_with_cfg_apg_and_slg(tmp_path, demo):
    cfg = config_file(tmp_path, demo, train_mode="full", max_train_steps=2, save_every=0, sample_every=2,
                      save_dtype="fp32", sample_at_start=True, sample_steps=2, validation_count=2, validate_every=1,
                      train_joint_blocks="1", freeze_embedders=True, sample_apg=True, sample_slg_scale=2.0,
                      slg_layers=(1,), slg_start=0.0, slg_end=1.0)
    final = train.main([cfg])
    run = final.parent
    assert len(list((run / "samples").glob("step000000_*.png"))) == 4
    assert len(list((run / "samples").glob("step000002_*.png"))) == 4
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["val_loss"] > 0 for r in records)
    base, trained = load_file(demo["model_path"]), load_file(str(final))
    changed = {k for k in trained if not torch.equal(trained[k], base[f"model.diffusion_model.{k}"])}
    assert changed and all(k.startswith(("joint_blocks.1.", "final_layer.")) for k in changed), sorted(changed)[:5]
    assert "joint_blocks.1.x_block.attn.qkv.weight" in changed and "pos_embed" not in changed


def test_sampling_follows_the_guidance_settings(demo):
    """CFG against the negative, APG instead of CFG, SLG, the samplers: each changes the image;
    scale 1 ignores the negative."""
    from models.loading import load_state_dict

    cfg = load_config(None, [f"--{k}={v}" for k, v in demo.items()], check_files=False)
    model = FAMILY.load(load_state_dict(demo["model_path"]), cfg, torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    shapes = {"clip_l": (77, 32), "clip_g": (77, 48), "clip_l_pooled": (32,), "clip_g_pooled": (48,), "t5": (8, 96)}
    parts = lambda: {k: torch.randn(1, *shape, generator=g) for k, shape in shapes.items()}  # noqa: E731
    cond, neg = parts(), parts()
    noise = torch.randn(1, 3, 16, 16, generator=g)
    prompt = FAMILY.prompt_defaults(cfg, model.params)
    assert (prompt.steps, prompt.cfg_scale, prompt.sampler, prompt.shift) == (50, 5.0, "dpmpp_2m", 3.0)  # 3.5 Medium
    prompt = replace(prompt, steps=4)
    run = lambda p, n=neg: FAMILY.sample(model, p, cond, n, noise)  # noqa: E731
    cfg_image, plain = run(prompt), run(replace(prompt, cfg_scale=1.0))
    assert torch.equal(plain, run(replace(prompt, cfg_scale=1.0), None))
    others = [plain, run(replace(prompt, apg=FAMILY.prompt_defaults(dict(cfg, sample_apg=True), model.params).apg)),
              run(replace(prompt, slg=sd3.samplers.SkipLayerGuidance(2.5, (1,), 0.0, 1.0))),
              run(replace(prompt, sampler="euler"))]
    assert all((cfg_image - other).abs().max() > 1e-3 for other in others)


# --- LoRA files as diffusers, ComfyUI and lora.py read them ----------------------------------------


def lora_on_everything(tmp_path: Path, lora_format: str):
    """A tiny SD3.5-Medium-like model (base state dict `sd`), a LoRA with random ups and downs
    (alpha / rank != 1) on every default target and every embedder (x_embedder's conv too), and
    its file in `lora_format`."""
    from test_mmdit import random_state_dict

    sd = random_state_dict(TINY)
    model = MMDiT.from_state_dict(dict(sd)).eval()
    targets = sd3.lora_targets(model, 4, group_ranks={"x_mlp": 3}, embedders=True)
    network = randomize_(lora.LoRANetwork.inject(model, targets, alpha=2.0))
    path = tmp_path / f"{lora_format}.safetensors"
    lora.save_lora(network, path, {"ss_network_module": "networks.lora_sd3"}, torch.float32, FAMILY, lora_format)
    return sd, model, network, path


def merged_by_lora_py(sd: dict, path: Path) -> dict:
    fresh = MMDiT.from_state_dict({k: v.clone() for k, v in sd.items()})  # loading assigns: merge into copies
    lora.apply_lora_file(fresh, path, FAMILY)
    return fresh.state_dict()


def test_diffusers_sd3_loader_reads_our_file_with_no_key_left_and_the_same_deltas(tmp_path, monkeypatch):
    import diffusers.loaders.peft as diffusers_peft
    from diffusers.loaders import SD3LoraLoaderMixin
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    from test_mmdit import diffusers_model, random_inputs, run_diffusers

    sd, ours, network, path = lora_on_everything(tmp_path, "diffusers")
    theirs = diffusers_model(sd, TINY)
    reported = []
    monkeypatch.setattr(diffusers_peft, "_maybe_warn_for_unhandled_keys", lambda keys, name: reported.append(keys))
    # what StableDiffusion3Pipeline.load_lora_weights runs for the transformer
    state_dict, metadata = SD3LoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    SD3LoraLoaderMixin.load_lora_into_transformer(state_dict, transformer=theirs, metadata=metadata)
    assert reported and reported[0].unexpected_keys == []
    assert not [k for k in reported[0].missing_keys if ".lora_" in k]
    in_file = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in load_file(str(path))}
    adapted = {name for name, m in theirs.named_modules() if hasattr(m, "lora_A")}
    assert adapted == in_file and len(in_file) == len(network.loras) + 2 * 5  # each of 5 fused qkv is 3 modules

    x = random_inputs(TINY)
    assert (ours(**x) - run_diffusers(theirs, x)).abs().max() <= 1e-5

    theirs.fuse_lora()
    theirs.unload_lora()  # the base layers keep the fused deltas
    merged = merged_by_lora_py(sd, path)  # lora.py reads the diffusers file back
    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(merged))
    for key, weight in theirs.state_dict().items():
        torch.testing.assert_close(weight, converted[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
    for name, module in network.loras.items():  # and the deltas are the network's own
        path_ = network.module_paths[name]
        delta = merged[f"{path_}.weight"] - sd[f"{path_}.weight"]
        torch.testing.assert_close(delta, module.delta_weight(), rtol=1e-4, atol=1e-6, msg=lambda m: f"{path_}: {m}")


def test_kohya_and_diffusers_files_read_back_alike(tmp_path):
    sd, _, network, kohya_path = lora_on_everything(tmp_path, "kohya")
    keys = load_file(str(kohya_path))
    assert "lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_down.weight" in keys
    assert "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.alpha" in keys
    assert "lora_unet_x_embedder_proj.lora_down.weight" in keys and keys[
        "lora_unet_x_embedder_proj.lora_down.weight"].ndim == 4  # LoCon layout on the patch conv
    diffusers_path = tmp_path / "d.safetensors"
    lora.save_lora(network, diffusers_path, {}, torch.float32, FAMILY, "diffusers")
    from_kohya, from_diffusers = merged_by_lora_py(sd, kohya_path), merged_by_lora_py(sd, diffusers_path)
    for key in from_kohya:
        torch.testing.assert_close(from_kohya[key], from_diffusers[key], rtol=1e-5, atol=1e-6)


def test_comfyui_loads_every_key_of_a_full_size_sd35_medium_file():
    """Names and shapes at full SD3.5 Medium size (meta weights, rank-1 LoRA on the CPU), both formats."""
    from comfy_oracle import comfy_key_map, comfy_load

    model = full_size("sd3.5-medium")
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    network = lora.LoRANetwork.inject(model, sd3.lora_targets(model, 1, embedders=True), device="cpu")
    key_map = comfy_key_map("sd3", shapes)
    files = ((network.kohya_state_dict(), 263 + 8), (lora.diffusers_state_dict(network, FAMILY), 263 + 8 + 2 * 61))
    for sd, count in files:
        patches, not_loaded = comfy_load(sd, key_map)
        assert not_loaded == [] and len(patches) == count  # 61 qkv Linears (24 + 24 + 13 attn2): 3 slices each
        for target, patch in patches.items():
            key, offset = (target, None) if isinstance(target, str) else target[:2]
            up, down = patch.weights[:2]
            rows = shapes[key.removeprefix("diffusion_model.")]
            assert (up.shape[0], *down.shape[1:]) == ((offset[2] if offset else rows[0]), *rows[1:]), target


@pytest.mark.parametrize("lora_format", lora.LORA_FORMATS)
def test_comfyui_loads_every_key_of_both_formats_as_our_merge(tmp_path, lora_format):
    """ComfyUI's own key map, loader and patch arithmetic (tests/comfy_oracle.py over the code
    vendored in tests/oracles/comfyui/): every key loads, and the patched weights are lora.py's merge."""
    from comfy_oracle import comfy_apply, comfy_key_map, comfy_load

    sd, _, network, path = lora_on_everything(tmp_path, lora_format)
    base = {k: v.clone() for k, v in sd.items()}
    patches, not_loaded = comfy_load(load_file(str(path)), comfy_key_map("sd3", base))
    assert not_loaded == []
    fused_slices = 3 * 5 if lora_format == "diffusers" else 1 * 5  # 5 qkv Linears, 3 slices each in diffusers names
    assert len(patches) == len(network.loras) - 5 + fused_slices
    theirs = comfy_apply(base, patches, 0.7)
    fresh = MMDiT.from_state_dict({k: v.clone() for k, v in sd.items()})
    lora.apply_lora_file(fresh, path, FAMILY, multiplier=0.7)
    ours = fresh.state_dict()
    assert set(theirs) == {f"{p}.weight" for p in network.module_paths.values()}
    for key, weight in ours.items():
        torch.testing.assert_close(weight, theirs.get(key, base[key]).to(weight.dtype), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{key}: {m}")


# --- targets, block swap, fp8, dropout --------------------------------------------------------------


def full_size(variant: str) -> MMDiT:
    with torch.device("meta"):
        return MMDiT(MMDiTParams(**sd3.RELEASED[variant]))


def test_kohya_targets_at_full_size_and_seed_004_one_liners():
    large, medium = full_size("sd3.5-large"), full_size("sd3.5-medium")
    targets = sd3.lora_targets(large, 64)
    # 5 Linears per half-block, the pre-only last context block has qkv and adaLN only: 37 x 10 + 2 + 5
    assert len(targets) == 377 and set(targets.values()) == {64}
    names = {lora.kohya_name(p) for p in targets}
    assert {"lora_unet_joint_blocks_0_context_block_attn_qkv", "lora_unet_joint_blocks_12_x_block_mlp_fc2",
            "lora_unet_joint_blocks_37_context_block_adaLN_modulation_1"} <= names
    assert "lora_unet_joint_blocks_37_context_block_attn_proj" not in names
    medium_targets = sd3.lora_targets(medium, 8)
    assert len(medium_targets) == 23 * 10 + 7 + 13 * 2  # attn2 qkv and proj in blocks 0-12
    assert "joint_blocks.12.x_block.attn2.qkv" in medium_targets
    assert "joint_blocks.13.x_block.attn2.qkv" not in medium_targets

    def blocks(t):
        return {int(p.split(".")[1]) for p in t if p.startswith("joint_blocks.")}

    assert blocks(sd3.lora_targets(large, 8, blocks="30-37")) == set(range(30, 38))
    assert blocks(sd3.lora_targets(large, 8, blocks="0-33")) == set(range(34))
    attention = sd3.lora_targets(large, 8, group_ranks=sd3.ATTENTION_ONLY)
    assert attention and all(".attn." in p for p in attention)
    context = sd3.lora_targets(large, 8, group_ranks=sd3.CONTEXT_ONLY)
    assert context and all(".context_block." in p for p in context)
    embedders = sd3.lora_targets(large, 8, group_ranks={"t_embedder": 4}, embedders=True)
    assert {p: r for p, r in embedders.items() if not p.startswith("joint_blocks.")} == {
        "context_embedder": 8, "t_embedder.mlp.0": 4, "t_embedder.mlp.2": 4, "x_embedder.proj": 8,
        "y_embedder.mlp.0": 8, "y_embedder.mlp.2": 8, "final_layer.adaLN_modulation.1": 8, "final_layer.linear": 8}
    with pytest.raises(ValueError, match=r"unknown groups \['img_attn'\]"):
        sd3.lora_targets(large, 8, group_ranks={"img_attn": 4})
    with pytest.raises(ValueError, match="out of range; this model has 38 joint_blocks"):
        sd3.lora_targets(large, 8, blocks="30-38")


def test_block_swap_limit_is_kohyas_and_swapped_training_matches(tmp_path):
    cfg = dict(DEFAULTS, model_family="sd3", blocks_to_swap=36)
    assert FAMILY.swap_counts(full_size("sd3.5-large"), cfg) == {"joint_blocks": 36}
    with pytest.raises(ValueError, match="use 0 to 22"):
        FAMILY.swap_counts(full_size("sd3.5-medium"), dict(cfg, blocks_to_swap=23))

    params = replace(TINY, depth=4, x_block_self_attn_layers=(1,))
    batch = FAMILY.plan_batch(dict(DEFAULTS, batch_size=2, resolution=16, ae_path="x"), params, "cpu")

    def step(**changes):
        run_cfg = dict(DEFAULTS, model_family="sd3", dtype="fp32", network_dim=4, **changes)
        prepared = training.prepare(tiny_model(params), FAMILY, run_cfg, "cpu")
        assert (prepared.swap is not None) == bool(changes)  # blocks 2 and 3 (the pre-only one) swap
        randomize_(prepared.network)
        loss = training.training_loss(FAMILY, FAMILY.objective(run_cfg), prepared.model, batch, run_cfg,
                                      torch.Generator().manual_seed(0))[0]
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in prepared.trainable.items()}

    plain, swapped = step(), step(blocks_to_swap=2, pin_memory=False, swap_mode="h2d_only")
    assert torch.equal(plain[0], swapped[0])
    assert all(torch.allclose(plain[1][k], swapped[1][k], atol=1e-7) for k in plain[1])


def test_fp8_base_stores_the_block_linears_in_fp8_and_runs_close(demo):
    from models.loading import load_state_dict

    sd = load_state_dict(demo["model_path"])
    cfg = load_config(None, [f"--{k}={v}" for k, v in demo.items()] + ["--fp8_base=True"], check_files=False)
    fp8_model = FAMILY.load(sd, cfg, torch.bfloat16)
    bf16_model = FAMILY.load(sd, dict(cfg, fp8_base=False), torch.bfloat16)
    assert fp8_model.joint_blocks[1].context_block.adaLN_modulation[1].weight.dtype == torch.float8_e4m3fn
    assert fp8_model.context_embedder.weight.dtype == torch.bfloat16  # outside the blocks
    cond = {k: v[:1] for k, v in FAMILY.plan_batch(dict(cfg, batch_size=1, resolution=16), fp8_model.params,
                                                    "cpu").items() if k != "latent"}
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([0.5])
    a, b = FAMILY.predict(fp8_model, x, t, cond), FAMILY.predict(bf16_model, x, t, cond)
    assert (a - b).abs().max() <= 0.1 * b.abs().max()


def test_per_encoder_dropout_zeros_whole_parts_from_the_generator():
    cfg = dict(DEFAULTS, clip_l_dropout_rate=0.0, clip_g_dropout_rate=0.5, t5_dropout_rate=1.0)
    batch = FAMILY.plan_batch(dict(DEFAULTS, batch_size=64, resolution=16, ae_path="x", t5_path="t5"), TINY, "cpu")
    cond = FAMILY.conditioning(batch, cfg, torch.Generator().manual_seed(3))
    assert set(cond) == set(sd3.PARTS)
    assert torch.equal(cond["clip_l"], batch["clip_l"]) and torch.equal(cond["clip_l_pooled"], batch["clip_l_pooled"])
    assert not cond["t5"].any()
    dropped = (cond["clip_g"].flatten(1) == 0).all(dim=1)
    assert 16 < int(dropped.sum()) < 48  # about half
    assert torch.equal(dropped, (cond["clip_g_pooled"] == 0).all(dim=1))  # a dropped encoder loses both parts
    kept = ~dropped
    assert torch.equal(cond["clip_g"][kept], batch["clip_g"][kept])
    again = FAMILY.conditioning(batch, cfg, torch.Generator().manual_seed(3))
    assert all(torch.equal(cond[k], again[k]) for k in cond)
    assert all(torch.equal(v, batch[k]) for k, v in FAMILY.conditioning(batch, cfg).items())  # validation: none
    context, pooled = sd3.sd3_conditioning(cond, context_width=TINY.context_embedder_in_features)
    assert context.shape == (64, 77 + 77, 40) and pooled.shape == (64, 24)


# --- an all-in-one file: the VAE and the text encoders from the model file's own sections ---------


def all_in_one_file(folder: Path, demo: dict) -> Path:
    """The layout of sd3_medium_incl_clips_t5xxlfp16.safetensors: model.diffusion_model.,
    first_stage_model. (a tiny 16-channel VAE), text_encoders.{clip_l,clip_g,t5xxl}.transformer.;
    the tokenizer/ (CLIP) and tokenizer_3/ (T5) folders beside it, as in the released repository."""
    from models.vae import AutoEncoder, AutoEncoderParams

    torch.manual_seed(0)
    widths = demo_data.SD3_CLIP_WIDTHS
    mmdit = MMDiT(MMDiTParams(depth=2, pos_embed_max_size=8, qk_norm="rms", adm_in_channels=sum(widths),
                              context_embedder_in_features=demo_data.SD3_T5_WIDTH))
    vae = AutoEncoder(AutoEncoderParams(ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1, z_channels=16))
    tensors = {f"model.diffusion_model.{k}": v for k, v in mmdit.state_dict().items()}
    tensors |= {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}
    for section, name in (("clip_l", "clip_l_path"), ("clip_g", "clip_g_path"), ("t5xxl", "t5_path")):
        encoder = load_file(str(Path(demo[name]) / "model.safetensors"))
        tensors |= {f"text_encoders.{section}.transformer.{k}": v for k, v in encoder.items()}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sd3_tiny_incl_clips_t5.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    shutil.copytree(demo["clip_l_path"], folder / "tokenizer",
                    ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    (folder / "tokenizer_3").mkdir()
    shutil.copy(Path(demo["t5_path"]) / "tokenizer.json", folder / "tokenizer_3")
    return path


def test_all_in_one_file_gives_the_vae_and_the_text_encoders(tmp_path, demo):
    model_path = all_in_one_file(tmp_path / "models", demo)
    files = {"model_path": str(model_path), "dataset_dir": demo["dataset_dir"],
             "sample_prompts": demo["sample_prompts"]}
    cfg = config_file(tmp_path, files, model_family="auto", resolution=32, max_train_steps=2, save_every=0,
                      sample_every=2, sample_steps=2, lora_format="kohya")
    final = train.main([cfg])
    latents = list((tmp_path / "cache" / "latents").glob("*.safetensors"))
    assert latents and load_file(str(latents[0]))["latent"].shape == (16, 4, 4)  # the file's VAE, 8x down
    text = load_file(str(next((tmp_path / "cache" / "text").glob("*.safetensors"))))
    assert {k: tuple(v.shape) for k, v in text.items()} == {
        "clip_l": (77, 32), "clip_g": (77, 48), "clip_l_pooled": (32,), "clip_g_pooled": (48,), "t5": (8, 96)}
    assert len(list((final.parent / "samples").glob("step000002_*.png"))) == 4
    with safe_open(str(final), "pt") as f:
        assert all(k.startswith("lora_unet_joint_blocks_") for k in f.keys())
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-3-3-5-large/lora"  # QK-norm, no attn2


# --- the released shapes and the shipped configs' plans -------------------------------------------


@pytest.mark.parametrize("file_name, variant, parameters", [
    ("sd3_medium_incl_clips_t5xxlfp16.safetensors", "sd3-medium", 2_028_328_000),
    ("sd3.5_medium.safetensors", "sd3.5-medium", 2_243_171_520),
    ("sd3.5_large.safetensors", "sd3.5-large", 8_056_627_520),
    ("sd3.5_large_turbo.safetensors", "sd3.5-large-turbo", 8_056_627_520),
])
def test_released_shapes_from_the_file_name_for_plans_without_the_file(file_name, variant, parameters):
    cfg = dict(DEFAULTS, model_family="sd3", model_path=f"models/{file_name}")
    params = FAMILY.default_params(cfg)
    with torch.device("meta"):
        model = FAMILY.build(params)
    assert sum(p.numel() for p in model.parameters()) == parameters  # the buffer pos_embed apart
    assert FAMILY._variant(cfg) == variant and FAMILY.variant(params) == variant.removesuffix("-turbo")
    steps, scale, sampler = sd3.SAMPLING[variant]
    assert FAMILY.prompt_defaults(dict(cfg, sd3_variant=variant), params).steps == steps
    with pytest.raises(ValueError, match="set sd3_variant"):
        FAMILY.default_params(dict(cfg, model_path="models/my_finetune.safetensors"))


# goal of each config's whole-run plan on the plain-torch path, GiB (the GPU its header names, less margins)
GOALS_GIB = {"sd35_large_lora.py": 5.0, "sd35_large_lora_r768_bs6.py": 72.0, "sd35_large_full.py": 10.0,
             "sd35_medium_lora.py": 6.0, "sd3_medium_lora.py": 6.0}


def test_every_sd3_config_plans_its_whole_run_within_its_goal_and_states_it(tmp_path, capsys):
    shipped = {p.name for p in CONFIGS.glob("sd3*.py")}
    assert shipped == set(GOALS_GIB)
    for name, goal in GOALS_GIB.items():
        path = str(CONFIGS / name)
        model = load_config(path, check_files=False)["model_path"]
        absent = [f"--model_path={tmp_path / Path(model).name}", f"--dataset_dir={tmp_path / 'images'}"]
        with pytest.raises(ConfigError, match="not found"):
            load_config(path, absent)  # training refuses missing files ...
        header = Path(path).read_text()
        for kernels in ("torch", "auto"):
            result = train.main([path, "--plan", f"--kernels={kernels}", *absent])  # ... the plan reads none
            phases = result["phases"]
            assert result["model"].startswith("SD3 / SD3.5 sd3")
            if kernels == "torch":  # the goal holds on the path that certainly runs
                assert phases["whole run"] <= goal * GiB, (name, phases["whole run"] / GiB)
            stated = "whole run " + f"{phases['whole run'] / GiB:.2f} GiB"
            assert stated in header, f"{name}: update the header's {kernels} line to the planned figure, {stated}"
            assert f"planned peak, whole run: {phases['whole run'] / GiB:.2f} GiB" in capsys.readouterr().out


def test_sd35_large_full_swaps_the_fewest_blocks_that_meet_its_goal():
    result = train.main([str(CONFIGS / "sd35_large_full.py"), "--plan", "--kernels=torch", "--blocks_to_swap=18"])
    assert result["phases"]["whole run"] > GOALS_GIB["sd35_large_full.py"] * GiB


def test_plan_hooks_give_the_released_text_encoders_and_vae():
    """For the whole-run plan: CLIP-L, CLIP-G and T5-XXL at their released sizes (123,060,480;
    694,659,840; 4,762,310,656 parameters: the counts of the released files), run on the meta
    device with their caching inputs, and the 16-channel VAE with SD3's scale and shift."""
    cfg = load_config(str(CONFIGS / "sd35_large_lora.py"), check_files=False)
    params = FAMILY.default_params(cfg)
    counts = {}
    with torch.device("meta"):
        for name, build, inputs in FAMILY.plan_text_encoders(cfg, params):
            model = build()
            out = model(**inputs("meta"))
            counts[name] = sum(p.numel() for p in model.parameters())
            assert next(model.parameters()).dtype == torch.bfloat16 and out.last_hidden_state.shape[1] == 77
        vae = FAMILY.plan_codec(cfg, params)
    assert counts == {"clip_l": 123_060_480, "clip_g": 694_659_840, "t5": 4_762_310_656}
    assert (vae.params.z_channels, vae.scale_factor, vae.shift_factor) == (16, 1.5305, 0.0609)
    assert [n for n, _, _ in FAMILY.plan_text_encoders(dict(cfg, t5_path=""), params)] == ["clip_l", "clip_g"]
    all_in_one = load_config(str(CONFIGS / "sd3_medium_lora.py"), check_files=False)  # its file name says: T5 inside
    assert [n for n, _, _ in FAMILY.plan_text_encoders(all_in_one, params)] == ["clip_l", "clip_g", "t5"]
    assert FAMILY.plan_codec(dict(cfg, model_path=""), params) is not None
