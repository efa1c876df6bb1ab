"""The LoRA features through the real entry point (train.main) on the tiny demo FLUX: DoRA, split
q/k/v, rank and module dropout, LoRA+, a preset, text-encoder LoRA with the text cache bypassed,
continuing from a file (network_weights), freezing for full fine-tuning, resume."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora
import train
from comfy_oracle import comfy_clip_key_map, comfy_key_map, comfy_load
from families.flux import FAMILY as FLUX
from test_train import config_file as _config_file
from test_train import demo_files, losses_of  # noqa: F401  (demo_files is a fixture)


def config_file(folder, demo_files, **settings) -> str:  # noqa: F811
    folder.mkdir(parents=True, exist_ok=True)
    return _config_file(folder, demo_files, **settings)


def test_dora_split_dropouts_loraplus_and_a_preset_train_and_resume(tmp_path, demo_files, capsys):
    settings = dict(use_dora=True, split_qkv=True, rank_dropout=0.2, module_dropout=0.1, loraplus_lr_ratio=4.0,
                    targets="no_last_blocks", save_dtype="fp32", max_train_steps=4, save_every=2)
    straight = train.main([config_file(tmp_path / "a", demo_files, **settings)])
    # 2 double + 2 single blocks run at depths 0, 1/4, 2/4, 3/4: the last quarter is single block 1
    assert "LoRA on 23 layers (preset 'no_last_blocks')" in capsys.readouterr().out
    sd = load_file(straight)
    modules = lora.kohya_modules(sd)
    assert set(modules) == {f"lora_unet_single_blocks_0_{m}" for m in ("linear1", "linear2", "modulation_lin")} | \
        {f"lora_unet_double_blocks_{i}_{s}_{m}" for i in (0, 1) for s in ("img", "txt")
         for m in ("attn_qkv", "attn_proj", "mlp_0", "mlp_2", "mod_lin")}
    linear1 = modules["lora_unet_single_blocks_0_linear1"]
    assert linear1["down"].shape[0] == 4 * 4 and "dora" in linear1  # q, k, v, mlp of rank 4, fused
    assert modules["lora_unet_double_blocks_1_txt_attn_qkv"]["down"].shape[0] == 3 * 4
    hidden = 96
    assert linear1["up"][:hidden, 4:].abs().sum() == 0 and linear1["up"][:hidden, :4].abs().sum() > 0  # block-diagonal
    model_keys = {k: v.shape for k, v in load_file(config_value(straight, "model_path")).items()}
    _, not_loaded = comfy_load(sd, comfy_key_map("flux", model_keys))
    assert not_loaded == []
    # stop after 2 steps, resume to 4: the same losses and the same file
    stopped_dir = tmp_path / "b"
    train.main([config_file(stopped_dir, demo_files, **{**settings, "max_train_steps": 2})])
    resumed = train.main([config_file(stopped_dir, demo_files, **settings), "--resume=latest"])
    assert losses_of(resumed.parent) == pytest.approx(losses_of(straight.parent), rel=1e-6)
    for key, value in load_file(resumed).items():
        torch.testing.assert_close(value, sd[key], rtol=1e-5, atol=1e-7, msg=key)


def config_value(final, key):
    text = (final.parent / "config.py").read_text()
    return next(line.split(" = ", 1)[1].strip("'\"") for line in text.splitlines() if line.startswith(f"{key} = "))


def test_text_encoder_lora_trains_live_and_is_saved_with_kohyas_prefixes(tmp_path, demo_files, capsys):
    final = train.main([config_file(tmp_path, demo_files, text_encoder_lr={"clip_l": 2e-3, "t5": 1e-3},
                                    caption_dropout_rate=0.3, validation_count=2, validate_every=3,
                                    sample_every=3, sample_steps=2, save_dtype="fp32", max_train_steps=3)])
    out = capsys.readouterr().out
    assert "text encoder clip_l (lora_te1)" in out and "text encoder t5 (lora_te3)" in out
    assert "note: diffusers (T5, lora_te3)" in out  # said when saving
    sd = load_file(final)
    te1 = lora.kohya_modules({k: v for k, v in sd.items() if k.startswith("lora_te1_")})
    te3 = lora.kohya_modules({k: v for k, v in sd.items() if k.startswith("lora_te3_")})
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in te1
    assert "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0" in te3
    assert all(parts["up"].abs().sum() > 0 for parts in (te1 | te3).values())  # they trained (ups start at zero)
    records = [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in records) and len(list((final.parent / "samples").glob("*.png"))) >= 2
    clip_keys = [f"clip_l.transformer.text_model.encoder.layers.{i}.{m}.weight" for i in range(2)
                 for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                           "mlp.fc1", "mlp.fc2")]
    t5_keys = [f"t5xxl.transformer.encoder.block.{i}.layer.{l}.{m}.weight" for i in range(2) for l, ms in
               ((0, ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o")),
                (1, ("DenseReluDense.wi_0", "DenseReluDense.wi_1", "DenseReluDense.wo"))) for m in ms]
    _, not_loaded = comfy_load({k: v for k, v in sd.items() if k.startswith("lora_te")},
                               comfy_clip_key_map(clip_keys + t5_keys))
    assert not_loaded == []
    # sample.py merges the text-encoder parts into the encoders it loads
    from transformers import CLIPTextModel, T5EncoderModel

    clip = CLIPTextModel.from_pretrained(demo_files["clip_l_path"])
    t5 = T5EncoderModel.from_pretrained(demo_files["t5_path"])
    q_proj = next(m for p, m in clip.named_modules() if p.endswith("layers.0.self_attn.q_proj")).weight
    before = q_proj.detach().clone()
    assert lora.apply_text_encoder_loras({"clip_l": clip, "t5": t5}, final, FLUX, 0.5) == ["clip_l", "t5"]
    parts = te1["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"]
    torch.testing.assert_close(q_proj.detach() - before, lora.lora_delta(parts["down"], parts["up"], parts["alpha"], 0.5),
                               rtol=1e-4, atol=1e-7)


def test_continuing_from_a_file_starts_from_its_weights(tmp_path, demo_files):
    first = train.main([config_file(tmp_path / "a", demo_files, save_dtype="fp32", max_train_steps=3)])
    # a diffusers-format copy of it: network_weights reads any format the family reads
    copy = tmp_path / "d.safetensors"
    sd, meta = lora.kohya_to_diffusers(load_file(first), FLUX)
    save_file(sd, str(copy))
    final = train.main([config_file(tmp_path / "b", demo_files, save_dtype="fp32", max_train_steps=1,
                                    learning_rate=1e-12, network_weights=str(copy))])
    before, after = lora.kohya_modules(load_file(first)), lora.kohya_modules(load_file(final))
    for name, parts in before.items():
        torch.testing.assert_close(lora.lora_delta(after[name]["down"], after[name]["up"], after[name]["alpha"]),
                                   lora.lora_delta(parts["down"], parts["up"], parts["alpha"]), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="holds .* tensors this network has no place for"):
        train.main([config_file(tmp_path / "c", demo_files, train_single_blocks="none", network_weights=str(first))])


@pytest.mark.parametrize("selection", [dict(targets="attention_only"),
                                       dict(train_double_blocks="0", train_single_blocks="none")],
                         ids=["preset", "blocks"])
def test_full_finetuning_freezes_what_the_selection_leaves_out(tmp_path, demo_files, selection):
    final = train.main([config_file(tmp_path, demo_files, train_mode="full", learning_rate=1e-3, save_dtype="fp32",
                                    max_train_steps=2, **selection)])
    base, tuned = load_file(config_value(final, "model_path")), load_file(final)
    changed = {k for k in base if not torch.equal(base[k].float(), tuned[k].float())}
    if "targets" in selection:
        assert changed and all(".img_attn." in k or ".txt_attn." in k for k in changed)
        assert any(k.endswith(".bias") for k in changed)
    else:
        # the blocks left out stay as they were; the selected block trains whole, as do the layers
        # outside the blocks (embedders, final layer: as SD3's train_joint_blocks)
        assert not any(k.startswith(("double_blocks.1.", "single_blocks.")) for k in changed)
        assert "double_blocks.0.img_attn.norm.query_norm.scale" in changed and "img_in.weight" in changed


class OneClip:
    """A prompt encoder as models/text.py shapes them: networks(), and encode under no_grad."""

    def __init__(self, model):
        self.model = model

    def networks(self) -> dict:
        return {"clip_l": self.model}

    @torch.no_grad()
    def encode(self, captions: list[str]) -> dict:
        ids = torch.tensor([[0] + [2 + len(c) % 7] * 3 + [1] for c in captions])
        return {"clip": self.model(input_ids=ids).last_hidden_state}


def test_text_encoder_loras_drop_out_in_training_only(tmp_path):
    """rank / module dropout reach the text encoders' LoRAs while training (with gradients), not
    when validation or samples read the encoders (data.LiveText.load), and the encoder's own
    layers stay in eval mode throughout."""
    from transformers import CLIPTextModel

    import data
    import demo_data
    import training
    from config import DEFAULTS
    from test_lora_tools import tiny_flux

    clip = CLIPTextModel.from_pretrained(demo_data.make_clip(tmp_path / "clip"))
    live = data.LiveText(OneClip(clip))
    cfg = dict(DEFAULTS, network_dim=4, text_encoder_lr={"clip_l": 1e-4}, rank_dropout=0.5)
    network, _, _ = training.choose_trainable(tiny_flux(), FLUX, cfg, text_networks=live.networks)
    with torch.no_grad():
        for name, module in network.loras.items():
            if name.startswith("lora_te1"):
                module.lora_up.weight.normal_(0, 0.5)
    evaluated = [live.load("a cat")["clip"] for _ in range(2)]
    torch.testing.assert_close(evaluated[0], evaluated[1])  # no dropout
    trained = [live(["a cat"])["clip"][0] for _ in range(2)]
    assert trained[0].requires_grad and (trained[0] - trained[1]).abs().max() > 1e-3  # rank dropout
    assert not any(m.training for m in clip.modules() if isinstance(m, torch.nn.Dropout))
