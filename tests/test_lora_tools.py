"""python lora.py convert | merge | extract | resize | info | presets, on tiny FLUX files made here.

merge: the merged checkpoint's forward equals the base with the LoRAs applied; layout, keys and
dtypes as asked. extract: the LoRA merged back reproduces the difference up to exactly the
discarded singular values. resize: the kept energy reported is the energy kept, and the result is
the best approximation of that rank (both checked against torch.linalg.svd)."""
import math
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lora
import lora_tools
from families.flux import FAMILY as FLUX
from lora import LoRANetwork
from models.flux import Flux, FluxParams
from test_flux import random_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(hidden_size=64, num_heads=2, axes_dim=[4, 14, 14], depth=2, depth_single_blocks=2, context_in_dim=24,
            vec_in_dim=16)


def tiny_flux(seed: int = 0) -> Flux:
    torch.manual_seed(seed)
    return Flux(FluxParams(**TINY)).eval().requires_grad_(False)


def write_checkpoint(model, path, prefix: str = "") -> str:
    save_file({prefix + k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def lora_file(model, path, seed: int, **options) -> str:
    targets = lora.preset_targets(FLUX.lora_layers(model), options.pop("preset", "all"), FLUX, 4)
    network = LoRANetwork.inject(model, targets, alpha=2.0, **options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.loras.values():
            for w in [m.lora_down.weight] + [layer.weight for layer in m._ups()]:
                w.copy_(torch.randn(w.shape, generator=g) * 0.05)
            if m.dora_scale is not None:
                m.dora_scale.mul_(1.1)
    network.save(path, {"ss_network_dim": "4"}, dtype=torch.float32)
    network.remove()
    return str(path)


def forward(model):
    x = random_inputs(model.params)
    x["txt"] = torch.randn(2, 7, TINY["context_in_dim"], generator=torch.Generator().manual_seed(3))
    x["y"] = torch.randn(2, TINY["vec_in_dim"], generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        return model(**x)


def load_flux(path) -> Flux:
    return Flux.from_state_dict(load_file(path), dtype=torch.float32, axes_dim=TINY["axes_dim"]).eval()


# --- merge ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_merged_checkpoint_is_the_base_plus_the_loras(tmp_path, capsys, prefix):
    model = tiny_flux()
    base = write_checkpoint(model, tmp_path / "base.safetensors", prefix)
    dora = lora_file(model, tmp_path / "dora.safetensors", 1, dora=True)
    split = lora_file(model, tmp_path / "split.safetensors", 2, preset="blocks",
                      splits={p: FLUX.lora_fused_rows(p, m) for p, m in model.named_modules()
                              if isinstance(m, torch.nn.Linear) and FLUX.lora_fused_rows(p, m)})
    out = tmp_path / "merged.safetensors"
    assert lora_tools.main(["merge", base, str(out), "--lora", f"{dora}:0.8", "--lora", f"{split}:0.5"]) == 0
    assert re.search(r"peak memory \d+\.\d\d GiB", capsys.readouterr().out)
    with safe_open(str(out), "pt") as f, safe_open(base, "pt") as g:
        assert list(f.keys()) == list(g.keys())  # the original layout and order
    # the expectation: LoRAs applied on the fly, DoRA first (the merge applies them in order)
    lora.apply_lora_file(model, dora, FLUX, multiplier=0.8, merge=False)
    lora.apply_lora_file(model, split, FLUX, multiplier=0.5, merge=False)
    merged = Flux.from_state_dict({k.removeprefix(prefix): v for k, v in load_file(out).items()}, dtype=torch.float32,
                                  axes_dim=TINY["axes_dim"]).eval()
    torch.testing.assert_close(forward(merged), forward(model), rtol=1e-4, atol=1e-5)
    assert (forward(merged) - forward(tiny_flux())).abs().max() > 1e-2


def test_merge_precision_and_text_encoders(tmp_path):
    from transformers import CLIPTextModel

    import demo_data

    model = tiny_flux()
    base = write_checkpoint(model, tmp_path / "base.safetensors")
    clip = CLIPTextModel.from_pretrained(demo_data.make_clip(tmp_path / "clip")).eval()
    clip_file = tmp_path / "clip_l.safetensors"
    save_file({f"text_model.{k}": v.contiguous() for k, v in clip.state_dict().items()}, str(clip_file))  # released layout
    targets = FLUX.text_encoder_lora_targets("clip_l", clip, 4)
    network = LoRANetwork.inject(clip, targets, prefix="lora_te1", names=lora.text_encoder_names(clip, targets))
    with torch.no_grad():
        for m in network.loras.values():
            m.lora_up.weight.normal_(0, 0.1)
    te_lora = tmp_path / "te.safetensors"
    sd = network.kohya_state_dict() | load_file(lora_file(model, tmp_path / "u.safetensors", 1))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(te_lora))
    with pytest.raises(ValueError, match=r"text encoder parts \['te1'\]: pass --text_encoder"):
        lora_tools.merge(base, str(tmp_path / "m.safetensors"), [(str(te_lora), 1.0)])
    lora_tools.merge(base, str(tmp_path / "fp8.safetensors"), [(str(tmp_path / "u.safetensors"), 1.0)], "fp8")
    lora_tools.merge(base, str(tmp_path / "m.safetensors"), [(str(te_lora), 1.0)],
                     text_encoders={"clip_l": (str(clip_file), str(tmp_path / "clip_merged.safetensors"))})
    with safe_open(str(tmp_path / "fp8.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["double_blocks.0.img_attn.qkv.weight"] == "F8_E4M3" and dtypes["img_in.bias"] == "BF16"
    merged_clip = load_file(tmp_path / "clip_merged.safetensors")
    ids = torch.tensor([[0, 5, 6, 1]])
    with torch.no_grad():
        expected = clip(input_ids=ids).last_hidden_state  # the LoRA still attached
        fresh = CLIPTextModel.from_pretrained(demo_data.make_clip(tmp_path / "clip")).eval()
        fresh.load_state_dict({k.removeprefix("text_model."): v for k, v in merged_clip.items()})
        torch.testing.assert_close(fresh(input_ids=ids).last_hidden_state, expected, rtol=1e-5, atol=1e-5)


def test_merge_refuses_a_lora_of_another_model(tmp_path):
    model = tiny_flux()
    base = write_checkpoint(model, tmp_path / "base.safetensors")
    other = Flux(FluxParams(**{**TINY, "depth": 3}))
    wrong = lora_file(other, tmp_path / "other.safetensors", 1, preset="blocks")
    with pytest.raises(ValueError, match="name no layer of FLUX.1|name no weight of the checkpoint"):
        lora_tools.merge(base, str(tmp_path / "m.safetensors"), [(wrong, 1.0)])


# --- extract and resize --------------------------------------------------------------------------


def test_extract_then_merge_reproduces_the_difference_within_the_discarded_singular_values(tmp_path, capsys):
    base_model, tuned_model = tiny_flux(), tiny_flux()
    g = torch.Generator().manual_seed(5)
    changed = ["double_blocks.0.img_attn.qkv", "single_blocks.1.linear2", "img_in"]
    modules = dict(tuned_model.named_modules())
    with torch.no_grad():
        for path in changed:  # a rank-3 change plus a little noise: every singular value non-zero
            w = modules[path].weight
            w += torch.randn(w.shape[0], 3, generator=g) @ torch.randn(3, w.shape[1], generator=g) * 0.1
            w += torch.randn(w.shape, generator=g) * 1e-3
    base = write_checkpoint(base_model, tmp_path / "base.safetensors")
    tuned = write_checkpoint(tuned_model, tmp_path / "tuned.safetensors")
    out = tmp_path / "extracted.safetensors"
    assert lora_tools.main(["extract", base, tuned, str(out), "--rank", "2", "--dtype", "fp32"]) == 0
    report = capsys.readouterr().out
    merged = tmp_path / "merged.safetensors"
    lora_tools.merge(base, str(merged), [(str(out), 1.0)])
    merged_sd, tuned_sd, base_sd = load_file(merged), load_file(tuned), load_file(base)
    assert len(lora.kohya_modules(load_file(out))) == len(changed)
    for path in changed:
        diff = tuned_sd[f"{path}.weight"] - base_sd[f"{path}.weight"]
        singular = torch.linalg.svdvals(diff.double())
        discarded = singular[2:].square().sum().sqrt()
        error = (tuned_sd[f"{path}.weight"] - merged_sd[f"{path}.weight"]).double().norm()
        assert error == pytest.approx(float(discarded), rel=1e-3), path  # Eckart-Young: exactly the discarded part
        kept = float(singular[:2].square().sum() / singular.square().sum())
        name = lora.kohya_name(path)
        reported = float(re.search(rf"{name}: rank 2, energy kept ([\d.]+)", report).group(1))
        assert reported == pytest.approx(kept, abs=2e-6)
    out_energy = tmp_path / "energy.safetensors"
    lora_tools.extract(base, tuned, str(out_energy), rank=64, energy=0.99, dtype="fp32")
    ranks = {n: p["down"].shape[0] for n, p in lora.kohya_modules(load_file(out_energy)).items()}
    assert set(ranks.values()) == {3}  # the rank-3 change holds >= 99 % of the energy, 2 singular values do not


def test_resize_keeps_the_reported_energy_and_the_best_approximation(tmp_path, capsys):
    model = tiny_flux()
    src = lora_file(model, tmp_path / "r4.safetensors", 1, preset="blocks")
    out = tmp_path / "r2.safetensors"
    assert lora_tools.main(["resize", src, str(out), "--rank", "2"]) == 0
    report = capsys.readouterr().out
    before, after = lora.kohya_modules(load_file(src)), lora.kohya_modules(load_file(out))
    for name, parts in before.items():
        old = lora.lora_delta(parts["down"], parts["up"], parts["alpha"]).double()
        new = lora.lora_delta(after[name]["down"], after[name]["up"], after[name]["alpha"]).double()
        u, s, vh = torch.linalg.svd(old.flatten(1))
        best = (u[:, :2] * s[:2]) @ vh[:2]
        torch.testing.assert_close(new.flatten(1), best, rtol=1e-4, atol=1e-6)
        reported = float(re.search(rf"{name}: rank 4 -> 2, energy kept ([\d.]+)", report).group(1))
        assert reported == pytest.approx(float(new.square().sum() / old.square().sum()), abs=2e-6)
        assert float(after[name]["alpha"]) / 2 == pytest.approx(float(parts["alpha"]) / 4)  # alpha / rank kept


# --- convert, info, presets, help ----------------------------------------------------------------


def test_convert_and_info(tmp_path, capsys):
    model = tiny_flux()
    src = lora_file(model, tmp_path / "k.safetensors", 1, dora=True)
    dst = tmp_path / "d.safetensors"
    assert lora_tools.main(["convert", src, str(dst), "--to", "diffusers"]) == 0
    with safe_open(str(dst), "pt") as f:
        assert all(k.startswith("transformer.") for k in f.keys())
    assert lora_tools.main(["convert", str(dst), str(tmp_path / "k2.safetensors"), "--to", "kohya"]) == 0
    back, original = load_file(tmp_path / "k2.safetensors"), load_file(src)
    for name, parts in lora.kohya_modules(original).items():
        theirs = lora.kohya_modules(back)[name]
        torch.testing.assert_close(lora.lora_delta(theirs["down"], theirs["up"], theirs["alpha"]),
                                   lora.lora_delta(parts["down"], parts["up"], parts["alpha"]), rtol=1e-5, atol=1e-7)
    capsys.readouterr()
    assert lora_tools.main(["info", src]) == 0
    text = capsys.readouterr().out
    assert "FLUX.1 LoRA, kohya format, 36 modules" in text and "img_attn: 4 modules, rank 4, alpha 2 (scale 0.5)" in text
    assert "DoRA: 36 modules with dora_scale" in text and "note: DoRA: ComfyUI loads dora_scale as DoRA" in text
    assert lora_tools.main(["info", str(tmp_path / "missing.safetensors")]) == 1


def test_presets_command_lists_every_preset_with_counts(capsys):
    assert lora_tools.main(["presets", "configs/flux_24gb.py"]) == 0
    text = capsys.readouterr().out
    rows = {line.split()[0]: line for line in text.splitlines()[1:]}
    assert set(lora.PRESETS) <= set(rows)
    assert re.search(r"attention_only\s+76 layers", rows["attention_only"])
    assert lora_tools.main(["presets", "configs/flux_24gb.py", "--preset", "context_blocks"]) == 0
    assert "double_blocks.{0-18}.txt_attn.qkv" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["convert", "merge", "extract", "resize", "info", "presets"])
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        lora_tools.main([command, "--help"])
    assert exit_.value.code == 0 and "usage: python lora.py " + command in capsys.readouterr().out


def test_rank_for_energy():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5])
    total = float((s**2).sum())
    assert lora_tools.rank_for(s, 10, None) == 4 and lora_tools.rank_for(s, 2, None) == 2
    assert lora_tools.rank_for(s, 10, 9 / total) == 1 and lora_tools.rank_for(s, 10, 13.01 / total) == 3
    assert math.isclose(lora_tools.energy_kept(s, 2), 13 / total)
