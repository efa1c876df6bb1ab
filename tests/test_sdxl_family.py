"""The SDXL family (families/sdxl.py) through the real entry points on a tiny SDXL single file
(UNet, CLIP-L and OpenCLIP bigG in the layout of sd_xl_base_1.0.safetensors, made by
demo_data.make_sdxl): training for epsilon and v, min-SNR on and off, fp16 with loss scaling and
bf16 with fp8 and block swap, resume, sampling with CFG and LoRA strength, the LoRA file in
diffusers' SDXL loader and ComfyUI's key map, kohya's targets and block-wise settings, the VAE
and text encoders from the checkpoint or separate files."""
import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import demo_data
import families
import lora
import sample
import train
import training
from config import DEFAULTS, ConfigError, load_config
from families import sdxl
from models.unet import UNet, UNetParams
from log_capture import logged

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILY = families.get("sdxl")
POOLED = demo_data.SDXL_TEXT_WIDTH
# 3 levels of 32, 64, 64 channels with 2 ResBlocks each: kohya's 9 input and 9 output blocks
TINY = dict(demo_data.SDXL_TINY, num_res_blocks=[2, 2, 2])
OVERRIDES = {"num_head_channels": 16}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    made = demo_data.make_sdxl_demo(root)  # the demo's tiny file and data ...
    model_path = demo_data.make_sdxl(root / "tiny" / "sdxl_tiny.safetensors", unet=TINY)  # ... with 9 + 9 blocks
    return dict(made, model_path=str(model_path), cache_dir=str(root / "cache"))


def config_file(tmp_path: Path, files: dict, **settings) -> str:
    base = dict(files, model_overrides=OVERRIDES, output_dir=str(tmp_path / "runs"), run_name="t", device="cpu",
                dtype="fp32", resolution=16, batch_size=4, network_dim=4, network_alpha=4.0, learning_rate=1e-3,
                max_train_steps=4, save_every=0, sample_every=0, sample_at_start=False, validate_every=0,
                gradient_checkpointing=False, lr_scheduler="constant", sample_prompts="")
    base.update(settings)
    path = tmp_path / f"config_{len(list(tmp_path.glob('config_*.py')))}.py"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in base.items()))
    return str(path)


def losses_of(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def tiny_unet(files) -> UNet:
    return UNet.from_state_dict(load_file(files["model_path"]), **OVERRIDES).eval()


# --- training through train.main -------------------------------------------------------------------


def test_epsilon_with_min_snr_learns_and_writes_a_kohya_sdxl_lora(tmp_path, files):
    cfg = config_file(tmp_path, files, max_train_steps=30, learning_rate=3e-3, min_snr_gamma=5.0, conv_dim=2,
                      conv_alpha=1.0)
    final = train.main([cfg])
    losses = losses_of(final.parent)
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert all(math.isfinite(x) for x in losses) and last < 0.85 * first, (first, last)
    meta = metadata(final)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.prediction_type"] == "epsilon" and meta["ss_min_snr_gamma"] == "5.0"
    assert json.loads(meta["ss_network_args"])["conv_dim"] == 2
    sd = load_file(str(final))
    assert sd["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha"].item() == 4.0
    assert sd["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"].shape == (2, 32, 3, 3)  # LoCon
    assert sd["lora_unet_input_blocks_1_0_in_layers_2.alpha"].item() == 1.0  # conv_alpha
    assert sd["lora_unet_input_blocks_1_0_emb_layers_1.alpha"].item() == 4.0  # kohya: network_dim there


def test_v_prediction_trains_without_min_snr(tmp_path, files):
    final = train.main([config_file(tmp_path, files, v_parameterization=True, zero_terminal_snr=True)])
    assert all(math.isfinite(x) for x in losses_of(final.parent))
    assert metadata(final)["modelspec.prediction_type"] == "v"
    assert any(v.abs().sum() > 0 for k, v in load_file(str(final)).items() if "lora_up" in k)


def test_fp16_with_loss_scaling_resumes_identically(tmp_path, files):
    noise = dict(dtype="fp16", noise_offset=0.1, ip_noise_gamma=0.1, multires_noise_iterations=2, max_train_steps=6,
                 network_dropout=0.1, save_every=3, caption_dropout_rate=0.3)
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir(), split.mkdir()
    train.main([config_file(straight, files, **noise)])
    train.main([config_file(split, files, **dict(noise, max_train_steps=3))])
    train.main([config_file(split, files, **noise, resume="latest")])
    a_dir, b_dir = straight / "runs" / "t", split / "runs" / "t"
    records = [json.loads(line) for line in (a_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_scale"] > 1 for r in records) and all(math.isfinite(r["loss"]) for r in records)
    assert losses_of(a_dir) == losses_of(b_dir)
    a, b = load_file(str(a_dir / "t.safetensors")), load_file(str(b_dir / "t.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((b_dir / "state" / "step_000006" / "state.json").read_text())["loss_scaler"]["scale"] > 1


def test_bf16_with_fp8_base_block_swap_and_checkpointing(tmp_path, files):
    cfg = config_file(tmp_path, files, dtype="bf16", fp8_base=True, blocks_to_swap=3, swap_mode="h2d_only",
                      gradient_checkpointing=True, max_train_steps=3)
    final = train.main([cfg])
    assert all(math.isfinite(x) for x in losses_of(final.parent))
    assert any(v.float().abs().sum() > 0 for k, v in load_file(str(final)).items() if "lora_up" in k)


def test_each_sample_is_conditioned_on_its_own_size_and_crop(tmp_path, files, monkeypatch):
    data = tmp_path / "wide"
    data.mkdir()
    for i, (w, h) in enumerate([(40, 24), (24, 40)]):  # resized to cover 16 x 16, then centre-cropped
        Image.new("RGB", (w, h), (200, 30 * i, 40)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a red circle")
    seen = []
    real = sdxl.SDXL.conditioning

    def spy(self, batch, cfg, generator=None):
        cond = real(self, batch, cfg, generator)
        seen.append({k: batch[k].tolist() for k in ("original_size", "crop_top_left", "target_size")} | {"y": cond["y"]})
        return cond

    monkeypatch.setattr(sdxl.SDXL, "conditioning", spy)
    train.main([config_file(tmp_path, files, dataset_dir=str(data), batch_size=2, max_train_steps=1)])
    batch = seen[0]
    by_size = {tuple(o): (tuple(c), tuple(t)) for o, c, t in zip(batch["original_size"], batch["crop_top_left"],
                                                                 batch["target_size"])}
    assert by_size == {(24, 40): ((0, 5), (16, 16)), (40, 24): ((5, 0), (16, 16))}  # (h, w), (top, left)
    from models.unet import size_embedding

    expected = size_embedding(batch["original_size"], batch["crop_top_left"], batch["target_size"])
    assert torch.equal(batch["y"][:, POOLED:], expected)


def test_objective_takes_kohyas_options_and_min_snr_follows_the_formula():
    """min(SNR, gamma) / SNR (epsilon) and min(SNR, gamma) / (SNR + 1) (v) on SDXL's schedule, computed
    here from the betas (seed 001's table is wrong: at t = 999, 500, 50 the SNR is 0.0047, 0.38, 19.6
    and the epsilon weights 1, 1, 0.254)."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1 - betas)
    snr = abar / (1 - abar)
    t = torch.tensor([0, 50, 500, 999])
    for v in (False, True):
        weight = FAMILY.objective(kohya_cfg(min_snr_gamma=5.0, v_parameterization=v)).timestep_weight(t)
        expected = np.minimum(snr, 5.0) / (snr + 1 if v else snr)
        assert torch.allclose(weight, torch.tensor(expected[t.numpy()], dtype=torch.float32), rtol=1e-5)
    assert torch.equal(FAMILY.objective(kohya_cfg()).timestep_weight(t), torch.ones(4))  # off by default
    options = dict(noise_offset=0.1, noise_offset_random_strength=True, adaptive_noise_scale=0.01,
                   multires_noise_iterations=6, multires_noise_discount=0.4, ip_noise_gamma=0.1,
                   ip_noise_gamma_random_strength=True, debiased_estimation_loss=True, min_timestep=100,
                   max_timestep=900, loss_type="huber", huber_schedule="snr", huber_c=0.2)
    objective = FAMILY.objective(kohya_cfg(**options))
    for key, value in options.items():
        assert getattr(objective, key) == value, key
    assert objective.prediction_type == "epsilon" and objective.min_snr_gamma == 0


# --- sampling ------------------------------------------------------------------------------------


def test_samples_during_training_and_lora_strength_in_the_cli(tmp_path, files):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --n a blue square --l 4 --s 3 --d 1\na green triangle --s 3 --d 2\n")
    cfg = config_file(tmp_path, files, sample_prompts=str(prompts), sample_every=2, sample_at_start=True,
                      max_train_steps=2, sample_sampler="dpmpp_2m", sample_schedule="karras", learning_rate=5e-2)
    final = train.main([cfg])
    pngs = sorted(p.name for p in (final.parent / "samples").glob("*.png"))
    assert pngs == ["step000000_00.png", "step000000_01.png", "step000002_00.png", "step000002_01.png"]
    settings = json.loads(Image.open(final.parent / "samples" / "step000002_00.png").text["parameters"])
    assert (settings["sampler"], settings["schedule"], settings["cfg_scale"]) == ("dpmpp_2m", "karras", 4.0)

    common = ["--model", files["model_path"], "--dtype", "fp32", "--device", "cpu", "--model_overrides",
              json.dumps(OVERRIDES), "--prompt", "a red circle --n a blue square --w 16 --h 16 --s 3 --d 5 --l 3"]
    images = {}
    for name, extra in (("plain", []), ("zero", ["--lora", f"{final}:0"]), ("merged", ["--lora", f"{final}:0.7"]),
                        ("fly", ["--lora", f"{final}:0.7", "--lora_on_the_fly"])):
        out = tmp_path / f"{name}.png"
        sample.main(common + extra + ["--out", str(out)])
        images[name] = torch.from_numpy(np.asarray(Image.open(out))).int()
    assert images["plain"].shape == (16, 16, 3)
    assert torch.equal(images["zero"], images["plain"])
    assert not torch.equal(images["merged"], images["plain"])
    assert (images["merged"] - images["fly"]).abs().max() <= 1  # merged vs on the fly: rounding only


@pytest.mark.parametrize("sampler, schedule", [("euler", "leading"), ("euler_ancestral", "leading"),
                                               ("ddim", "trailing"), ("dpmpp_2m", "karras")])
def test_every_sampler_runs_with_cfg_and_depends_on_the_negative(files, sampler, schedule):
    model = tiny_unet(files)
    cfg = dict(DEFAULTS, model_family="sdxl", sample_sampler=sampler, sample_schedule=schedule, resolution=16)
    prompt = replace(FAMILY.prompt_defaults(cfg, model.params), steps=4, cfg_scale=3.0)
    text = {"context": torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(0)), "pooled": torch.randn(1, POOLED)}
    cond = FAMILY.sample_conditioning(text, prompt, "cpu")
    neg = FAMILY.sample_conditioning({k: torch.zeros_like(v) for k, v in text.items()}, prompt, "cpu")
    noise = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = FAMILY.sample(model, prompt, cond, neg, noise)
        again = FAMILY.sample(model, prompt, cond, neg, noise)
        other = FAMILY.sample(model, prompt, cond, FAMILY.sample_conditioning(text, prompt, "cpu"), noise)
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert torch.equal(out, again)  # seeded (euler_ancestral's noise too)
    assert not torch.allclose(out, other)  # the negative prompt takes part


# --- LoRA targets, names and block-wise settings -------------------------------------------------


def kohya_cfg(**changes) -> dict:
    return dict(DEFAULTS, model_family="sdxl", **changes)


def full_size_unet() -> UNet:
    with torch.device("meta"):
        return UNet(UNetParams())


def test_full_size_targets_are_kohyas_722_and_the_seed_recipe_counts():
    model = full_size_unet()
    targets = FAMILY.lora_targets(model, kohya_cfg(network_dim=16))
    assert len(targets) == 722  # 70 transformer blocks x 10 Linears + 11 SpatialTransformers x proj_in/out
    assert all(isinstance(dict(model.named_modules())[p], torch.nn.Linear) for p in targets)
    attention = FAMILY.lora_targets(model, kohya_cfg(network_dim=16, group_ranks={"ff": 0, "proj": 0}))
    assert len(attention) == 560
    modules = dict(model.named_modules())
    params = sum(16 * (modules[p].in_features + modules[p].out_features) for p in attention)
    # per transformer block of width C with context 2048: attn1 4 x 2C, attn2 2 x 2C + 2 x (2048 + C)
    assert params == 16 * (10 * (14 * 640 + 4096) + 60 * (14 * 1280 + 4096)) == 23_224_320
    locon = FAMILY.lora_targets(model, kohya_cfg(network_dim=16, conv_dim=8))
    convs = [p for p in locon if isinstance(modules[p], torch.nn.Conv2d) and modules[p].kernel_size == (3, 3)]
    assert len(convs) == 2 * 17 + 2 + 2 and all(locon[p] == 8 for p in convs)  # ResBlocks, Downsamples, Upsamples
    assert "input_blocks.0.0" not in locon and "out.2" not in locon  # conv_in, conv_out: no LoRA, as kohya


def test_kohya_blocks_are_23_and_take_ranks_alphas_and_learning_rates():
    model = full_size_unet()
    assert sdxl.KOHYA_BLOCKS == 23  # networks/lora.py: 1 base + 9 input + 3 middle + 9 output + 1 out
    assert [sdxl.kohya_block(n) for n in ("time_embed.0", "input_blocks.0.0", "lora_unet_input_blocks_8_1_proj_in",
                                          "middle_block.1.proj_in", "output_blocks.0.0.in_layers.2",
                                          "output_blocks.8.1.proj_out", "out.2")] == [0, 1, 9, 11, 13, 21, 22]
    dims = [0] * 5 + [4] * 18  # no LoRA in input blocks 0-3 (kohya blocks 1-4)
    cfg = kohya_cfg(network_dim=16, block_dims=",".join(map(str, dims)), block_alphas=",".join(["2"] * 23),
                    down_lr_weight="0,1,1,1,1,1,1,1,0.5", mid_lr_weight="2,2,2", up_lr_weight="zeros+0.25")
    targets = FAMILY.lora_targets(model, cfg)
    assert not any(p.startswith(("input_blocks.0.", "input_blocks.1.", "input_blocks.2.", "input_blocks.3."))
                   for p in targets)
    assert set(targets.values()) == {4} and set(FAMILY.lora_alphas(cfg, targets).values()) == {2.0}
    trainable = {f"loras.{lora.kohya_name(p)}.lora_down.weight": None for p in targets}
    factors = FAMILY.lr_multipliers(cfg, trainable)
    assert factors["loras.lora_unet_input_blocks_8_1_proj_in.lora_down.weight"] == 0.5
    assert factors["loras.lora_unet_middle_block_1_proj_in.lora_down.weight"] == 2.0
    assert factors["loras.lora_unet_output_blocks_0_1_proj_in.lora_down.weight"] == 0.25
    zero_first = kohya_cfg(down_lr_weight="0,1,1,1,1,1,1,1,1")  # lr 0: the block gets no LoRA (kohya)
    assert not any(p.startswith("input_blocks.0.") for p in FAMILY.lora_targets(model, zero_first))
    assert sdxl._lr_weights("d", "cosine", 9)[0] == pytest.approx(1.0) and sdxl._lr_weights("d", "cosine", 9)[-1] == 0


def test_block_learning_rates_reach_the_optimizer(files):
    model = tiny_unet(files)
    cfg = kohya_cfg(network_dim=4, learning_rate=1e-4, down_lr_weight="1,1,1,1,1,1,1,1,2", mid_lr_weight="3,3,3")
    network, trainable, targets = training.choose_trainable(model, FAMILY, cfg)
    opt = training.build_optimization(trainable, cfg, lr_multipliers=FAMILY.lr_multipliers(cfg, trainable))
    lr_of = {id(p): group["lr"] for group in opt.optimizer.param_groups for p in group["params"]}
    assert lr_of[id(network.loras["lora_unet_input_blocks_8_1_proj_in"].lora_up.weight)] == pytest.approx(2e-4)
    assert lr_of[id(network.loras["lora_unet_middle_block_1_proj_out"].lora_down.weight)] == pytest.approx(3e-4)
    assert lr_of[id(network.loras["lora_unet_output_blocks_3_1_proj_in"].lora_down.weight)] == pytest.approx(1e-4)
    assert len(lr_of) == len(trainable)


@pytest.mark.parametrize("setting, message", [
    ({"block_dims": "4,4"}, "block_dims has 2 entries; kohya's SDXL layout has 23"),
    ({"block_alphas": ",".join(["1"] * 23)}, "need block_dims"),
    ({"up_lr_weight": "1,1,1,1,1,1,1,1,1,1"}, "up_lr_weight has 10 entries"),
    ({"group_ranks": {"img_attn": 4}}, r"group_ranks: \['img_attn'\] are no SDXL groups"),
    ({"max_token_length": 100}, "max_token_length=100"),
    ({"min_timestep": 500, "max_timestep": 400}, "min_timestep=500"),
    ({"sample_sampler": "heun"}, "sample_sampler='heun'"),
])
def test_bad_settings_are_config_errors(tmp_path, setting, message):
    path = tmp_path / "c.py"
    path.write_text("model_family = 'sdxl'\n" + "".join(f"{k} = {v!r}\n" for k, v in setting.items()))
    with pytest.raises(ConfigError, match=message):
        load_config(str(path), check_files=False)


def test_flux_refuses_sdxl_keys(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("model_family = 'flux'\nmin_snr_gamma = 5.0\n")
    with pytest.raises(ConfigError, match="min_snr_gamma: not used by FLUX.1"):
        load_config(str(path), check_files=False)


# --- the LoRA file in diffusers and ComfyUI --------------------------------------------------------


def trained_lora(model: UNet, seed: int = 0, **cfg_changes) -> dict:
    """A kohya state dict on every default target plus LoCon, with random (nonzero) ups."""
    cfg = kohya_cfg(network_dim=4, network_alpha=2.0, conv_dim=2, conv_alpha=4.0, **cfg_changes)
    targets = FAMILY.lora_targets(model, cfg)
    alphas = {p: training.network_alpha(cfg) for p in targets} | FAMILY.lora_alphas(cfg, targets)
    network = lora.LoRANetwork.inject(model, targets, alpha=alphas)
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in network.loras.values():
            module.lora_up.weight.normal_(std=0.05)
    sd = network.kohya_state_dict()
    network.remove()
    return sd


def diffusers_unet(sd: dict, params: UNetParams):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    widths = [params.model_channels * m for m in params.channel_mult]
    attention = [d > 0 for d in params.transformer_depth]
    config = dict(sample_size=8, in_channels=params.in_channels, out_channels=params.out_channels,
                  down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
                  up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
                  block_out_channels=tuple(widths), layers_per_block=params.num_res_blocks[0],
                  transformer_layers_per_block=tuple(max(d, 1) for d in params.transformer_depth),
                  attention_head_dim=tuple(w // params.num_head_channels for w in widths), use_linear_projection=True,
                  cross_attention_dim=params.context_dim, addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=params.adm_in_channels, norm_num_groups=32)
    model = UNet2DConditionModel(**config)
    model.load_state_dict(convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v for k, v in sd.items()},
                                                      config), strict=True)
    return model.eval()


def test_lora_loads_in_diffusers_sdxl_loader_with_every_key_and_the_same_strength(files, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    ours = tiny_unet(files)
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    kohya = trained_lora(ours)
    path = tmp_path / "lora.safetensors"
    save_file(kohya, str(path))
    theirs = diffusers_unet(base, ours.params)
    with logged("diffusers", logging.WARNING) as warnings:  # diffusers' loggers do not propagate to the root
        # what pipe.load_lora_weights(path) runs: lora_state_dict with the UNet's config (the sgm block
        # map needs layers_per_block), then load_lora_into_unet
        state_dict, alphas = StableDiffusionXLPipeline.lora_state_dict(str(path), unet_config=theirs.config)
        StableDiffusionXLPipeline.load_lora_into_unet(state_dict, alphas, unet=theirs, adapter_name="t")
        logging.getLogger("diffusers.loaders.peft").warning("the handler hears diffusers")
    assert warnings == ["the handler hears diffusers"]  # no unexpected or missing keys reported
    from peft.tuners.lora import LoraLayer

    loaded = [m for m in theirs.modules() if isinstance(m, LoraLayer)]
    assert len(loaded) == len({k.split(".")[0] for k in kohya})

    lora.apply_lora_file(ours, kohya, FAMILY, multiplier=0.7)  # merged at strength 0.7
    g = torch.Generator().manual_seed(3)
    x, context, pooled = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 5, 64, generator=g), torch.randn(2, POOLED)
    time_ids = torch.tensor([[24.0, 40, 0, 5, 16, 16], [16, 16, 0, 0, 16, 16]])
    from models.unet import size_embedding

    y = torch.cat([pooled, size_embedding(time_ids[:, :2], time_ids[:, 2:4], time_ids[:, 4:])], dim=1)
    t = torch.tensor([999, 10])
    with torch.no_grad():
        expected = theirs(x, t, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": pooled,
                          "time_ids": time_ids}, cross_attention_kwargs={"scale": 0.7}, return_dict=False)[0]
        got = ours(x, t, context, y)
        plain = theirs(x, t, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": pooled,
                       "time_ids": time_ids}, cross_attention_kwargs={"scale": 0.0}, return_dict=False)[0]
    assert (got - plain).abs().max() > 1e-3  # the LoRA changes the output ...
    print("ours vs diffusers with the LoRA at 0.7: max abs difference", (got - expected).abs().max().item())
    assert (got - expected).abs().max() <= 1e-5, (got - expected).abs().max()  # ... as diffusers applies it

    # diffusers / PEFT names (and the alphas in the header diffusers writes) read back to the same deltas
    from peft import get_peft_model_state_dict

    peft_sd = {f"unet.{k}": v for k, v in get_peft_model_state_dict(theirs, adapter_name="t").items()}
    header = {"lora_adapter_metadata": json.dumps(theirs.peft_config["t"].to_dict(), default=sorted)}
    back = lora.to_kohya(peft_sd, FAMILY, header)
    assert {k.split(".")[0] for k in back} == {k.split(".")[0] for k in kohya}
    for name in {k.split(".")[0] for k in kohya}:
        parts = [(d[f"{name}.lora_down.weight"], d[f"{name}.lora_up.weight"], d[f"{name}.alpha"]) for d in (kohya, back)]
        assert torch.allclose(lora.lora_delta(*parts[0]), lora.lora_delta(*parts[1]), atol=1e-7), name


def comfy_patched(weights: dict, kohya: dict, strength: float) -> tuple[dict, list[str]]:
    """The weights ComfyUI runs with after loading `kohya` at `strength`, and the file keys it leaves
    unloaded. With tests/comfy_oracle.py (ComfyUI's own key map, loader and patch arithmetic,
    vendored) when the tree has it; else a re-implementation of what it does for SDXL kohya files
    (Comfy-Org/ComfyUI a125cd84b054a57729b5eecab930ca9408719832, comfy/lora.py model_lora_keys_unet:
    `lora_unet_<key with . -> _>` reaches `diffusion_model.<key>.weight`; comfy/weight_adapter/lora.py:
    W += strength * alpha / rank * (up.flatten(1) @ down.flatten(1)).reshape(W.shape))."""
    try:
        from comfy_oracle import comfy_apply, comfy_key_map, comfy_load
    except ImportError:
        key_map = {f"lora_unet_{k[:-len('.weight')].replace('.', '_')}": k for k in weights if k.endswith(".weight")}
        names = {k.split(".")[0] for k in kohya}
        patched = {}
        for name in names & set(key_map):
            down, up, alpha = (kohya[f"{name}.{part}"] for part in ("lora_down.weight", "lora_up.weight", "alpha"))
            w = weights[key_map[name]].float()
            diff = (up.float().flatten(1) @ down.float().flatten(1)).reshape(w.shape)
            patched[key_map[name]] = w + strength * (float(alpha) / down.shape[0]) * diff
        not_loaded = sorted(k for k in kohya if k.split(".")[0] not in key_map)
        return patched, not_loaded
    patches, not_loaded = comfy_load(kohya, comfy_key_map("sdxl", {k: v.shape for k, v in weights.items()}))
    return comfy_apply(weights, patches, strength), not_loaded


def test_comfyui_loads_every_key_at_the_same_strength(files):
    model = tiny_unet(files)
    kohya = trained_lora(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    patched, not_loaded = comfy_patched(weights, kohya, 0.7)
    assert not_loaded == []
    assert len(patched) == len({k.split(".")[0] for k in kohya})
    lora.apply_lora_file(model, kohya, FAMILY, multiplier=0.7)
    ours = model.state_dict()
    for key, weight in patched.items():
        assert torch.allclose(weight, ours[key], atol=1e-6), key


# --- files: VAE and text encoders ------------------------------------------------------------------


def tiny_vae_state_dict(seed: int = 0) -> dict:
    from models.vae import AutoEncoder, AutoEncoderParams

    torch.manual_seed(seed)
    vae = AutoEncoder(AutoEncoderParams(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, use_quant_conv=True,
                                        scale_factor=0.13025, shift_factor=0.0))
    return {k: v + 0.01 * torch.randn_like(v) for k, v in vae.state_dict().items()}


def test_vae_from_the_checkpoint_or_a_diffusers_file_in_fp32(tmp_path, files):
    from diffusers import AutoencoderKL

    vae_sd = tiny_vae_state_dict()
    checkpoint = load_file(files["model_path"]) | {f"first_stage_model.{k}": v for k, v in vae_sd.items()}
    model_path = tmp_path / "with_vae.safetensors"
    save_file(checkpoint, str(model_path))
    theirs = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                           up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                           norm_num_groups=32, scaling_factor=0.13025)
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    theirs.load_state_dict(convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in vae_sd.items()},
                                                      theirs.config), strict=True)
    ae_path = tmp_path / "sdxl_vae.safetensors"  # the diffusers layout, as madebyollin/sdxl-vae-fp16-fix
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(ae_path))

    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    cfg = dict(DEFAULTS, model_family="sdxl", model_path=str(model_path), dtype="bf16")
    from_checkpoint = FAMILY.codec(cfg, torch.bfloat16, "cpu")
    from_file = FAMILY.codec(dict(cfg, ae_path=str(ae_path)), torch.bfloat16, "cpu")
    assert from_checkpoint.dtype == torch.float32  # no_half_vae: the SDXL VAE overflows in fp16
    assert FAMILY.codec(dict(cfg, no_half_vae=False), torch.bfloat16, "cpu").dtype == torch.bfloat16
    latent = from_checkpoint.encode(pixels)
    assert torch.allclose(latent, from_file.encode(pixels), atol=1e-5)
    with torch.no_grad():
        expected = theirs.encode(pixels).latent_dist.mean * 0.13025
    assert torch.allclose(latent, expected, atol=1e-5)
    assert FAMILY.resolution_multiple(cfg) == 32
    from models import PixelCodec

    assert isinstance(FAMILY.codec(dict(cfg, model_path=files["model_path"]), torch.float32, "cpu"), PixelCodec)


def test_text_encoders_from_the_checkpoint_equal_separate_files(tmp_path, files):
    from models.text import clip_g_state_dict, clip_state_dict

    whole = load_file(files["model_path"])
    clip_l, clip_g = tmp_path / "clip_l.safetensors", tmp_path / "clip_g.safetensors"
    save_file(clip_state_dict(whole), str(clip_l))
    save_file({k: v.contiguous() for k, v in clip_g_state_dict(whole).items()}, str(clip_g))
    tokenizer = str(Path(files["model_path"]).parent / "tokenizer")
    cfg = dict(DEFAULTS, model_family="sdxl", model_path=files["model_path"], max_token_length=150)
    captions = ["a red circle", "a blue square"]
    one = FAMILY.text_encoder(cfg, None, torch.float32, "cpu").encode(captions)
    two = FAMILY.text_encoder(dict(cfg, clip_l_path=str(clip_l), clip_g_path=str(clip_g), clip_tokenizer=tokenizer),
                              None, torch.float32, "cpu").encode(captions)
    assert one["context"].shape == (2, 2 * 77, 64) and one["pooled"].shape == (2, POOLED)
    assert FAMILY.text_length(cfg, None) == 154
    assert all(torch.equal(one[k], two[k]) for k in one)
    bare = tmp_path / "unet_only.safetensors"
    save_file({k: v for k, v in whole.items() if k.startswith("model.")}, str(bare))
    with pytest.raises(ValueError, match="holds no text encoders .* set clip_l_path"):
        FAMILY.text_encoder(dict(cfg, model_path=str(bare)), None, torch.float32, "cpu")


# --- checkpoint, blocks, plan ----------------------------------------------------------------------


def test_detection_fp8_load_and_block_groups(files):
    sd = load_file(files["model_path"])
    assert families.detect(sd) is FAMILY
    cfg = kohya_cfg(model_overrides=OVERRIDES, fp8_base=True)
    model = FAMILY.load(sd, cfg, torch.bfloat16)
    import fp8

    groups = FAMILY.blocks(model)
    assert list(groups) == ["level0_resnets", "level1_resnets", "level1_transformer_blocks", "level2_resnets",
                            "level2_transformer_blocks"]
    assert [len(g) for g in groups.values()] == [5, 5, 5, 7, 6]
    in_blocks = {id(m) for g in groups.values() for b in g for m in b.modules()}
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(isinstance(m, fp8.Fp8Linear) == (id(m) in in_blocks) for m in linears)
    full = full_size_unet()
    counts = FAMILY.swap_counts(full, kohya_cfg(blocks_to_swap=63))
    assert counts["level2_transformer_blocks"] == 58 and counts["level2_resnets"] == 5
    with pytest.raises(ValueError, match="SDXL swaps at most"):
        FAMILY.swap_counts(full, kohya_cfg(blocks_to_swap=200))


def test_plan_batch_and_text_encoders_have_the_released_shapes():
    cfg = kohya_cfg(resolution=1024, max_token_length=150, dtype="fp16", text_batch_size=3)
    batch = FAMILY.plan_batch(cfg, UNetParams(), "meta")
    assert batch["latent"].shape == (1, 4, 128, 128) and batch["context"].shape == (1, 154, 2048)
    assert batch["pooled"].shape == (1, 1280) and batch["context"].dtype == torch.float16
    with torch.device("meta"):
        (name_l, build_l, inputs_l), (name_g, build_g, _) = FAMILY.plan_text_encoders(cfg, UNetParams())
        clip_l, clip_g = build_l(), build_g()
    assert (name_l, name_g) == ("clip_l", "clip_g")
    assert sum(p.numel() for p in clip_l.parameters()) == 123_060_480  # CLIP-L text model
    assert sum(p.numel() for p in clip_g.parameters()) == 694_659_840  # bigG text model with projection
    assert inputs_l("meta")["input_ids"].shape == (6, 77)  # 3 captions x 2 windows
    with torch.device("meta"):
        vae = FAMILY.plan_codec(cfg, UNetParams())
    assert vae.params.z_channels == 4 and vae.params.use_quant_conv
    assert FAMILY.codec_dtype(cfg) == torch.float32 and FAMILY.codec_dtype(dict(cfg, no_half_vae=False)) == torch.float16
