"""DeepFloyd IF through the trainer (families/deepfloyd.py): tiny stage I and stage II UNets train
through train.main and resume identically, the cascade sampler, the LoRA file in diffusers'
IFPipeline (an independent loader), the checkpoint layouts, stage II's augmented low-res input,
block swap, and the shipped configs' plans."""
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import demo_data
import lora
import plan
import sample
import samplers
import train
import training
from config import DEFAULTS, ConfigError, load_config
from families import deepfloyd
from families.deepfloyd import FAMILY
from models.deepfloyd import IFUNet, config_from_original, diffusers_config, to_diffusers

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
GiB = 2**30


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return demo_data.make_if_demo(tmp_path_factory.mktemp("if_demo"))


def config_file(tmp_path: Path, files: dict, stage: int = 1, **settings) -> str:
    base = dict(
        model_family="deepfloyd", model_path=files[f"if_stage{stage}"], t5_path=files["t5_path"],
        dataset_dir=files["dataset_dir"], output_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"),
        run_name="t", device="cpu", dtype="fp32", resolution=16 if stage == 1 else 32, batch_size=2,
        network_dim=4, network_alpha=2.0, learning_rate=1e-3, max_train_steps=4, save_every=2, sample_every=0,
        sample_at_start=False, validate_every=0, gradient_checkpointing=False, lr_scheduler="constant",
        caption_dropout_rate=0.3, save_dtype="fp32",
    )
    base.update(settings)
    if base.get("train_mode") == "full":  # LoRA settings are refused then
        del base["network_dim"], base["network_alpha"]
    path = tmp_path / "config.py"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in base.items()))
    return str(path)


def losses_of(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_split_and_straight(tmp_path: Path, files: dict, stage: int, **settings) -> tuple[Path, Path]:
    """The same run straight (4 steps) and stopped at 2 then resumed: (straight, split) run folders."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir()
    split.mkdir()
    train.main([config_file(straight, files, stage, **settings)])
    train.main([config_file(split, files, stage, max_train_steps=2, **settings)])
    train.main([config_file(split, files, stage, resume="latest", **settings)])
    return straight / "runs" / "t", split / "runs" / "t"


def assert_same_run(a: Path, b: Path) -> None:
    assert losses_of(a) == losses_of(b)
    fa, fb = load_file(str(a / "t.safetensors")), load_file(str(b / "t.safetensors"))
    assert fa.keys() == fb.keys()
    for key in fa:
        assert torch.equal(fa[key], fb[key]), key


# --- training through train.main -------------------------------------------------------------------


def test_stage1_lora_trains_resumes_identically_and_caches_text_in_bf16(tmp_path, files, capsys):
    a, b = train_split_and_straight(tmp_path, files, 1, model_family="auto", network_dropout=0.1,
                                    group_ranks={"res_conv": 2}, lora_format="diffusers", min_snr_gamma=5.0,
                                    noise_offset=0.05, apply_t5_attn_mask=True)
    assert_same_run(a, b)
    out = capsys.readouterr().out
    assert "DeepFloyd IF" in out  # model_family="auto" found the folder
    assert "text cache: 13 caption(s) to encode" in out and "bfloat16" in out  # 12 captions and ""
    entry = next((tmp_path / "straight" / "cache" / "text").glob("*.safetensors"))
    with safe_open(str(entry), "pt") as f:
        assert f.get_tensor("t5").dtype == torch.bfloat16 and f.get_tensor("t5").shape == (77, 32)
    with safe_open(str(a / "t.safetensors"), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["modelspec.architecture"] == "deepfloyd-if-i/lora"
    assert (meta["ss_min_snr_gamma"], meta["ss_noise_offset"], meta["ss_apply_t5_attn_mask"]) == ("5.0", "0.05", "True")
    assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert any(".conv1." in k for k in keys) and any(".to_q." in k for k in keys)
    assert all(torch.isfinite(torch.tensor(losses_of(a))))


def test_loss_falls_on_the_tiny_shapes(tmp_path, files):
    final = train.main([config_file(tmp_path, files, 1, train_mode="full", max_train_steps=30, save_every=0,
                                    batch_size=4, caption_dropout_rate=0.0)])
    losses = losses_of(final.parent)
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < 0.6 * first, (first, last)


@pytest.mark.parametrize("settings", [
    {"fp8_base": True, "dtype": "bf16"},  # the ResBlocks' emb_layers Linears in fp8 (convolutions stay bf16)
    {"train_mode": "full", "fused_backward": True, "max_grad_norm": 0.0, "optimizer": "adafactor"},
    {"dtype": "fp16"},  # the UNet in fp16 with loss scaling; T5 in bf16
], ids=["fp8-base", "full-fused", "fp16"])
def test_fp8_base_the_fused_step_and_fp16_train(tmp_path, files, settings):
    final = train.main([config_file(tmp_path, files, 1, max_train_steps=2, save_every=0, **settings)])
    assert all(torch.isfinite(torch.tensor(losses_of(final.parent))))
    if settings.get("dtype") == "fp16":
        cfg = load_config(str(tmp_path / "config.py"))
        params = FAMILY.read_checkpoint(files["if_stage1"], cfg).config
        assert FAMILY.text_encoder(cfg, params, torch.float16, "cpu").encoder.t5.model.dtype == torch.bfloat16
        (_, build, _), = FAMILY.plan_text_encoders(cfg, FAMILY.default_params(cfg))
        with torch.device("meta"):
            assert build().dtype == torch.bfloat16


def test_stage2_trains_validates_samples_and_resumes_identically(tmp_path, files):
    a, b = train_split_and_straight(tmp_path, files, 2, validation_count=2, validate_every=2,
                                    sample_prompts=files["sample_prompts"], sample_every=4, sample_steps=2,
                                    sample_sizes="32,64x32")
    assert_same_run(a, b)
    records = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["val_loss"])) for r in records if "val_loss" in r)
    sizes = sorted(Image.open(p).size for p in (a / "samples").glob("step000004_*.png"))
    assert sizes == [(32, 32)] * 4 + [(64, 32)] * 4  # 4 prompts at each size, upscaling the dataset's first image


def test_shares_the_ddpm_and_sampling_keys_with_the_other_families(tmp_path, files):
    """IF reads SDXL's DDPM keys, FLUX's apply_t5_attn_mask and the shared sample_cfg; it has no
    keys of its own for them, refuses v-prediction and zero terminal SNR, and other families' keys."""
    cfg = load_config(config_file(tmp_path, files, 1, min_snr_gamma=5.0, noise_offset=0.1, min_timestep=100,
                                  max_timestep=900, ip_noise_gamma=0.1, debiased_estimation_loss=True,
                                  apply_t5_attn_mask=True, sample_cfg=3.0))
    objective = FAMILY.objective(cfg)
    assert (objective.min_snr_gamma, objective.noise_offset, objective.ip_noise_gamma) == (5.0, 0.1, 0.1)
    assert (objective.min_timestep, objective.max_timestep, objective.debiased_estimation_loss) == (100, 900, True)
    assert objective.prediction_type == "epsilon" and objective.learned_variance == "learned_range"
    stage1 = FAMILY.read_checkpoint(files["if_stage1"], cfg).config
    assert FAMILY.prompt_defaults(cfg, stage1).cfg_scale == 3.0 and FAMILY.prompt_defaults(cfg, stage1).text_mask
    batch = {"latent": torch.zeros(1, 3, 16, 16), "t5": torch.zeros(1, 77, 32), "t5_mask": torch.ones(1, 77, dtype=bool)}
    assert "t5_mask" in FAMILY.conditioning(batch, cfg)
    for key in ("v_parameterization", "zero_terminal_snr"):
        with pytest.raises(ConfigError, match="DeepFloyd IF predicts epsilon with a learned variance"):
            load_config(config_file(tmp_path, files, 1, **{key: True}))
    with pytest.raises(ConfigError, match="block_dims: not used by DeepFloyd IF"):
        load_config(config_file(tmp_path, files, 1, block_dims="4," * 22 + "4"))
    for old in ("if_sample_cfg", "if_text_mask"):
        assert old not in DEFAULTS


def test_stage2_trains_in_aspect_ratio_buckets_on_multiples_of_its_downsampling(tmp_path, files):
    data = demo_data.make_dataset(tmp_path / "shapes", shapes_of_images=True)  # square, 60x20 and 20x60 images
    final = train.main([config_file(tmp_path, files, 2, dataset_dir=str(data), enable_bucket=True, batch_size=12,
                                    min_bucket_reso=16, max_bucket_reso=64, max_train_steps=6, save_every=0)])
    buckets = json.loads((final.parent / "buckets.json").read_text())
    assert {tuple(b["resolution"]) for b in buckets if "resolution" in b} == {(16, 48), (32, 32), (48, 16)}
    assert sum(b.get("batches", 0) for b in buckets) == 6  # one epoch: every bucket trains
    assert all(torch.isfinite(torch.tensor(losses_of(final.parent))))
    released = Path(__file__).parent / "data" / "deepfloyd"
    multiples = [FAMILY.resolution_multiple(dict(DEFAULTS, model_path=str(released / name)))
                 for name in ("IF-I-XL-v1.0", "IF-II-L-v1.0")]
    assert multiples == [8, 16]  # 3 and 4 downsamplings


# --- sampling -------------------------------------------------------------------------------------------


def test_cascade_runs_stage1_then_stage2_at_a_quarter_size(tmp_path, files):
    common = ["--model", files["if_stage2"], "--t5", files["t5_path"], "--dtype", "fp32", "--device", "cpu",
              "--prompt", "a red circle --s 3 --d 4 --l 3"]
    paths = sample.main(common + ["--base_model", files["if_stage1"], "--sizes", "32,64x32", "--out",
                                  str(tmp_path / "cascade")])
    assert [Image.open(p).size for p in paths] == [(32, 32), (64, 32)]
    again = sample.main(common + ["--base_model", files["if_stage1"], "--sizes", "32", "--out",
                                  str(tmp_path / "again.png")])
    assert np.array_equal(np.asarray(Image.open(again[0])), np.asarray(Image.open(paths[0])))  # seeded
    # the base stage's output is each conditioning's low_res, a quarter of the sample's size
    cfg = dict(DEFAULTS, model_family="deepfloyd", resolution=32, dtype="fp32")
    prompt = replace(FAMILY.prompt_defaults(cfg, FAMILY.read_checkpoint(files["if_stage2"], cfg).config),
                     width=64, height=32, steps=2, seed=3, cfg_scale=1.0)
    cond = {"t5": torch.randn(1, 77, 32)}
    (staged, neg), = FAMILY.base_stage(cfg, files["if_stage1"], [prompt], [(cond, None)], torch.float32, "cpu")
    assert staged["low_res"].shape == (1, 3, 8, 16) and neg is None and staged["t5"] is cond["t5"]
    assert staged["low_res"].abs().max() <= 1 and staged["low_res"].std() > 0.05
    with pytest.raises(ValueError, match="stage II UNet upscales an image: give sample.py --base_model"):
        sample.main(common + ["--out", str(tmp_path / "none.png"), "--sizes", "32"])
    with pytest.raises(ValueError, match="is a stage II UNet; give the stage I model"):
        sample.main(common + ["--base_model", files["if_stage2"], "--out", str(tmp_path / "x.png"), "--sizes", "32"])


def test_sampler_defaults_follow_the_stage(files):
    stage1 = FAMILY.read_checkpoint(files["if_stage1"], DEFAULTS).config
    stage2 = FAMILY.read_checkpoint(files["if_stage2"], DEFAULTS).config
    cfg = dict(DEFAULTS, resolution=64)
    one, two = FAMILY.prompt_defaults(cfg, stage1), FAMILY.prompt_defaults(dict(cfg, dataset_dir=files["dataset_dir"]),
                                                                           stage2)
    assert (one.respacing, one.cfg_scale, one.threshold_max) == ("150", 7.0, 1.5)
    assert (two.respacing, two.cfg_scale, two.threshold_max, two.aug_level) == ("smart50", 4.0, 1.0, 0.25)
    assert two.low_res.endswith(".png") and one.low_res == ""
    assert sample.parse_prompt_line("a cat --s 20", one).steps == 20  # --s N: respacing "N"
    assert one.learned_variance and not FAMILY.prompt_defaults(dict(cfg, if_freeze_variance=True), stage1).learned_variance


def test_sampling_after_an_epsilon_only_run_uses_the_fixed_small_variance(files, monkeypatch):
    cfg = dict(DEFAULTS, model_family="deepfloyd", resolution=16, dtype="fp32")
    checkpoint = FAMILY.read_checkpoint(files["if_stage1"], cfg)
    model = FAMILY.load(checkpoint, cfg, torch.float32).eval()
    seen = []
    real = samplers.sample_if
    monkeypatch.setattr(samplers, "sample_if", lambda *a, **k: seen.append(k["learned_variance"]) or real(*a, **k))
    images, cond = [], {"t5": torch.randn(1, 77, 32)}
    for freeze in (False, True):
        prompt = replace(FAMILY.prompt_defaults(dict(cfg, if_freeze_variance=freeze), checkpoint.config), steps=3,
                         cfg_scale=1.0)
        noise = sample.initial_noise(prompt, 3, 1, FAMILY.latent_multiple, "cpu")
        images.append(FAMILY.sample(model, prompt, cond, None, noise))
    assert seen == [True, False] and not torch.equal(*images)


# --- the LoRA file in diffusers ---------------------------------------------------------------------


def tiny_unet(params: dict, seed: int = 0) -> IFUNet:
    torch.manual_seed(seed)
    model = IFUNet(config_from_original(params)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the output conv starts at zero: move everything
    return model


@pytest.mark.parametrize("stage", [1, 2])
def test_lora_file_loads_in_diffusers_if_pipelines_with_no_key_left_over(tmp_path, stage):
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline, UNet2DConditionModel
    from peft.utils import get_peft_model_state_dict

    params = demo_data.IF_STAGE_I_TINY if stage == 1 else demo_data.IF_STAGE_II_TINY
    model = tiny_unet(params)
    config = model.config
    base = {k: v.clone() for k, v in model.state_dict().items()}
    network = lora.LoRANetwork.inject(model, deepfloyd.lora_targets(model, 4, {"res_conv": 2}), alpha=2.0)
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.1)
    path = tmp_path / "if.safetensors"
    lora.save_lora(network, path, {"ss_network_dim": "4"}, torch.float32, FAMILY.for_network(model), "diffusers")

    unet = UNet2DConditionModel(**diffusers_config(config))
    unet.load_state_dict(to_diffusers(base, config), strict=True)
    parts = dict(tokenizer=None, text_encoder=None, unet=unet, scheduler=DDPMScheduler(), safety_checker=None,
                 feature_extractor=None, watermarker=None, requires_safety_checker=False)
    if stage == 1:
        pipe = IFPipeline(**parts)
    else:
        pipe = IFSuperResolutionPipeline(**parts, image_noising_scheduler=DDPMScheduler())
    pipe.load_lora_weights(str(path))
    adapter = next(iter(pipe.unet.peft_config))
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name=adapter)
    in_file = {k.removeprefix("unet.") for k in load_file(str(path))}
    assert set(loaded) == in_file  # every key of the file is in the UNet, and nothing else

    torch.manual_seed(1)
    x, t, text = torch.randn(2, 3, 16, 16), torch.tensor([10, 700]), torch.randn(2, 5, 32)
    low_res, aug = (torch.randn(2, 3, 16, 16), torch.tensor([250, 0])) if stage == 2 else (None, None)
    with torch.no_grad():
        ours = model(x, t, text, low_res=low_res, aug_level=aug)
        network.set_multiplier(0.0)
        without = model(x, t, text, low_res=low_res, aug_level=aug)
        network.set_multiplier(1.0)
        inputs = x if stage == 1 else torch.cat([x, low_res], dim=1)  # the upsample is the identity at 16 px
        theirs = pipe.unet(inputs, t, encoder_hidden_states=text, class_labels=aug).sample
    assert (ours - without).abs().max() > 0.1  # the LoRA matters
    assert (ours - theirs).abs().max() < 1e-4

    # and back through this trainer's reader: on the fly exactly, merged to rounding
    for merge, tolerance in ((False, 0.0), (True, 1e-4)):
        fresh = IFUNet(config).eval()
        fresh.load_state_dict(base)
        lora.apply_lora_file(fresh, path, FAMILY, merge=merge)
        with torch.no_grad():
            assert (fresh(x, t, text, low_res=low_res, aug_level=aug) - ours).abs().max() <= tolerance


def test_lora_targets_groups():
    model = tiny_unet(demo_data.IF_STAGE_I_TINY)
    default = deepfloyd.lora_targets(model, 8)
    layers = {re.sub(r"^(input_blocks|output_blocks)\.\d+\.\d+\.|^middle_block\.\d+\.", "", p) for p in default}
    assert layers == {"qkv", "encoder_kv", "proj_out", "emb_layers.1", "skip_connection"}
    assert all(r == 8 for r in default.values())
    more = deepfloyd.lora_targets(model, 8, {"res_conv": 4, "attn_kv": 0})
    assert not any(p.endswith("encoder_kv") for p in more)
    assert {r for p, r in more.items() if p.endswith(("in_layers.2", "out_layers.3"))} == {4}
    with pytest.raises(ValueError, match="unknown groups \\['img_attn'\\]"):
        deepfloyd.lora_targets(model, 8, {"img_attn": 4})


# --- checkpoints -------------------------------------------------------------------------------------


def test_checkpoint_layouts_and_detection(tmp_path, files):
    original = Path(files["if_stage2"])
    sd = load_file(str(original / "pytorch_model.safetensors"))
    config = config_from_original(demo_data.IF_STAGE_II_TINY)
    cfg = dict(DEFAULTS, resolution=32)
    # the diffusers layout: an IF repository root with unet/config.json + safetensors
    unet = tmp_path / "diffusers" / "unet"
    unet.mkdir(parents=True)
    (unet / "config.json").write_text(json.dumps(diffusers_config(config)))
    save_file(to_diffusers(sd, config), str(unet / "diffusion_pytorch_model.safetensors"))
    # the original layout with the released pickle file
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.yml").write_text((original / "config.yml").read_text())
    torch.save(sd, pickled / "pytorch_model.bin")

    loaded = {}
    for name, folder, allow in (("original", original, False), ("diffusers", unet.parent, False),
                                ("pickle", pickled, True)):
        assert FAMILY.detect_path(str(folder))
        checkpoint = FAMILY.read_checkpoint(str(folder), dict(cfg, allow_pickle=allow))
        loaded[name] = FAMILY.load(checkpoint, cfg, torch.float32).state_dict()
    for name in ("diffusers", "pickle"):
        assert all(torch.equal(loaded[name][k], loaded["original"][k]) for k in sd), name
    with pytest.raises(ConfigError, match="is a pickle file .* set allow_pickle=True"):
        FAMILY.read_checkpoint(str(pickled), cfg)
    assert not FAMILY.detect_path(files["t5_path"])  # a T5 folder's config.json is not an IF UNet
    with pytest.raises(ConfigError, match="this UNet downsamples 8x"):
        FAMILY.params(FAMILY.read_checkpoint(str(original), cfg), dict(cfg, resolution=36))


def test_full_finetune_file_reloads_through_its_run_folder(tmp_path, files):
    final = train.main([config_file(tmp_path, files, 1, train_mode="full", max_train_steps=1, save_every=0)])
    checkpoint = FAMILY.read_checkpoint(str(final), dict(DEFAULTS, resolution=16))  # via run folder config.py
    model = FAMILY.load(checkpoint, dict(DEFAULTS, resolution=16), torch.float32)
    assert all(torch.equal(v, load_file(str(final))[k]) for k, v in model.state_dict().items())


# --- stage II's input ---------------------------------------------------------------------------------


def test_stage2_low_res_is_the_image_shrunk_regrown_and_noised_at_a_drawn_step():
    image = torch.rand(3, 3, 32, 32) * 2 - 1
    cfg = dict(DEFAULTS, if_aug_levels=(0.2, 0.4))
    low_res, steps = deepfloyd.augmented_low_res(image, cfg, torch.Generator().manual_seed(5))
    again, steps_again = deepfloyd.augmented_low_res(image, cfg, torch.Generator().manual_seed(5))
    assert torch.equal(low_res, again) and torch.equal(steps, steps_again)
    assert steps.dtype == torch.long and ((200 <= steps) & (steps < 400)).all()
    g = torch.Generator().manual_seed(5)  # the draws in order: steps, then noise
    torch.rand(3, generator=g)
    noise = torch.randn(image.shape, generator=g)
    shrunk = torch.nn.functional.interpolate(image, (8, 8), mode="bicubic", antialias=True).clamp(-1, 1)
    regrown = torch.nn.functional.interpolate(shrunk, (32, 32), mode="bilinear", align_corners=True)
    abar = samplers.if_alphas_cumprod()[steps].float().view(-1, 1, 1, 1)
    assert torch.allclose(low_res, abar.sqrt() * regrown + (1 - abar).sqrt() * noise, atol=1e-6)
    fixed, fixed_steps = deepfloyd.augmented_low_res(image, cfg, None)  # validation: the sampling level
    assert (fixed_steps == 250).all() and torch.equal(fixed, deepfloyd.augmented_low_res(image, cfg, None)[0])


# --- memory: swap and plans ----------------------------------------------------------------------------


def test_block_swap_gives_the_same_loss_and_gradients():
    params = dict(demo_data.IF_STAGE_I_TINY, image_size=16)
    cfg = dict(DEFAULTS, model_family="deepfloyd", resolution=16, dtype="fp32", network_dim=4,
               gradient_checkpointing=True)
    batch = {"latent": torch.randn(2, 3, 16, 16), "t5": torch.randn(2, 77, 32),
             "t5_mask": torch.ones(2, 77, dtype=torch.bool)}
    results = []
    for swap in (0, 3):
        model = tiny_unet(params)
        prepared = training.prepare(model, FAMILY, dict(cfg, blocks_to_swap=swap, swap_mode="h2d_only"), "cpu")
        with torch.no_grad():
            for p in prepared.trainable.values():
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
        generator = torch.Generator().manual_seed(0)
        loss = training.training_loss(FAMILY, FAMILY.objective(cfg), model, batch, cfg, generator)[0]
        loss.backward()
        assert (prepared.swap is not None) == bool(swap)
        results.append((loss.item(), [p.grad.clone() for p in prepared.trainable.values()]))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    with pytest.raises(ValueError, match="blocks_to_swap=40: .* use 0 to"):
        FAMILY.swap_counts(tiny_unet(params), dict(cfg, blocks_to_swap=40))


GOALS_GIB = {"if_stage1.py": 4.0, "if_stage1_medium.py": 4.0, "if_stage2.py": 4.0}  # whole run, plain torch


@pytest.mark.parametrize("name", sorted(GOALS_GIB))
def test_config_plans_within_its_goal_without_model_files(name, tmp_path, capsys):
    path = str(CONFIGS / name)
    absent = [f"--dataset_dir={tmp_path / 'images'}"]
    with pytest.raises(ConfigError, match="not found"):
        load_config(path, absent)  # training refuses missing files ...
    header = Path(path).read_text()
    # IF's element-wise chains are few: both paths plan the same; the Triton path is planned for the XL config
    for kernels in ("torch", "auto") if name == "if_stage1.py" else ("torch",):
        phases = train.main([path, "--plan", f"--kernels={kernels}", *absent])["phases"]  # ... the plan reads none
        assert phases["whole run"] == max(phases["caching"], phases["training"], phases["sampling"])
        if kernels == "torch":
            assert phases["whole run"] <= GOALS_GIB[name] * GiB
        stated = "whole run " + f"{phases['whole run'] / GiB:.2f} GiB"
        assert stated in header, f"{name}: update the header's {kernels} line to the planned figure, {stated}"
        out = capsys.readouterr().out
        assert f"planned peak, caching: {phases['caching'] / GiB:.2f} GiB" in out.splitlines()


def test_plan_reads_the_released_config_from_a_folder_without_weights():
    data = Path(__file__).parent / "data" / "deepfloyd"
    for folder, count in (("IF-I-XL-v1.0", 4_304_695_110), ("IF-II-L-v1.0", 1_243_277_190)):
        params, source = plan.model_params(FAMILY, dict(DEFAULTS, model_path=str(data / folder),
                                                        resolution=64 if "I-XL" in folder else 256))
        assert source.startswith("shapes read from")
        with torch.device("meta"):
            assert sum(p.numel() for p in FAMILY.build(params).parameters()) == count
        assert FAMILY.variant(params) == folder.removesuffix("-v1.0")


def test_plan_hooks_for_the_whole_run():
    cfg = dict(DEFAULTS, model_family="deepfloyd", resolution=64, dtype="bf16", batch_size=2)
    params = FAMILY.default_params(cfg)
    (name, build, inputs), = FAMILY.plan_text_encoders(cfg, params)
    with torch.device("meta"):
        t5 = build()
    assert name == "t5" and sum(p.numel() for p in t5.parameters()) == 4_762_310_656  # T5-XXL's encoder
    assert t5(**inputs("meta")).last_hidden_state.shape == (8, 77, 4096)
    assert FAMILY.plan_codec(cfg, params) is None  # pixels
    batch = FAMILY.plan_batch(cfg, params, "meta")
    assert batch["t5"].dtype == torch.bfloat16 and batch["latent"].shape == (2, 3, 64, 64)
