"""The sampler: kohya prompt syntax, schedules, and the CLI end to end on tiny files."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import demo_data
import lora
import sample
from models import flux


def test_prompt_line_kohya_syntax():
    defaults = sample.SamplePrompt(prompt="", steps=20, guidance=3.5)
    p = sample.parse_prompt_line("a cat, 4k --n blurry, dark --w 768 --h 512 --d 7 --l 2.5 --g 4 --s 9", defaults)
    assert p == sample.SamplePrompt("a cat, 4k", "blurry, dark", 768, 512, 7, 2.5, 4.0, 9)
    assert sample.parse_prompt_line("# a comment") is None
    assert sample.parse_prompt_line("   ") is None
    assert sample.parse_prompt_line("just a prompt", defaults).steps == 20
    with pytest.raises(ValueError, match="unknown prompt option --x"):
        sample.parse_prompt_line("a cat --x 3")
    with pytest.raises(ValueError, match="--w expects a int"):
        sample.parse_prompt_line("a cat --w wide")


def test_schedules():
    from samplers import flux_sigmas as get_schedule

    schnell = get_schedule(4, 4096, shift=False)
    assert schnell == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    dev = get_schedule(4, 4096)  # mu = 1.15 at 4096 tokens
    mu = 1.15
    assert dev[1] == pytest.approx(math.exp(mu) / (math.exp(mu) + (1 / 0.75 - 1)))
    assert dev[0] == 1.0 and dev[-1] == 0.0
    assert all(a > b for a, b in zip(dev, dev[1:]))
    # mu through (256, 0.5): fewer tokens shift less
    assert get_schedule(4, 256)[2] < dev[2]


def test_euler_follows_a_straight_flow():
    """With the exact velocity of a straight path the sampler lands on its start point."""
    import samplers

    x0 = torch.randn(1, 3, 4, 4)
    noise = torch.randn_like(x0)
    out = samplers.sample_flow(lambda x_t, t, cond: noise - x0, noise, samplers.flux_sigmas(5, 4), None)
    assert torch.allclose(out, x0, atol=1e-5)


def test_parse_lora_arg(tmp_path):
    assert sample.parse_lora_arg("a.safetensors:0.8") == ("a.safetensors", 0.8)
    assert sample.parse_lora_arg("a.safetensors") == ("a.safetensors", 1.0)
    odd = tmp_path / "name:with:colons.safetensors"
    odd.write_bytes(b"")
    assert sample.parse_lora_arg(str(odd)) == (str(odd), 1.0)


def test_cli_with_a_lora_writes_pngs_with_metadata(tmp_path):
    files = demo_data.make_demo(tmp_path / "demo")
    model = flux.load(files["flux_path"], axes_dim=[8, 20, 20])
    from families.flux import lora_targets

    targets = lora_targets(model, 4)
    network = lora.LoRANetwork.inject(model, targets, alpha=4.0)
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.05)
    lora_path = tmp_path / "l.safetensors"
    network.save(lora_path, {"ss_network_dim": "4"}, dtype=torch.float32)

    common = ["--flux", files["flux_path"], "--clip_l", files["clip_l_path"], "--t5", files["t5_path"],
              "--dtype", "fp32", "--device", "cpu", "--t5_max_length", "8", "--apply_t5_attn_mask",
              "--model_overrides", json.dumps({"axes_dim": [8, 20, 20]})]
    out_plain = tmp_path / "plain.png"
    sample.main(common + ["--prompt", "a red circle --w 16 --h 16 --s 3 --d 5", "--out", str(out_plain)])
    out_lora = tmp_path / "lora.png"
    sample.main(common + ["--prompt", "a red circle --w 16 --h 16 --s 3 --d 5", "--out", str(out_lora),
                          "--lora", f"{lora_path}:0.7"])
    out_fly = tmp_path / "fly.png"
    sample.main(common + ["--prompt", "a red circle --w 16 --h 16 --s 3 --d 5", "--out", str(out_fly),
                          "--lora", f"{lora_path}:0.7", "--lora_on_the_fly"])

    image = Image.open(out_lora)
    assert image.size == (16, 16)
    settings = json.loads(image.text["parameters"])
    assert settings["prompt"] == "a red circle" and settings["seed"] == 5 and settings["steps"] == 3
    assert settings["loras"] == [f"{lora_path}:0.7"]
    pixels = {name: torch.from_numpy(np.asarray(Image.open(p))).int() for name, p in
              (("plain", out_plain), ("lora", out_lora), ("fly", out_fly))}
    assert not torch.equal(pixels["plain"], pixels["lora"])  # the LoRA changes the image
    assert (pixels["lora"] - pixels["fly"]).abs().max() <= 1  # merged == on the fly, up to rounding

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na red circle --w 16 --h 16 --s 2\na blue square --w 16 --h 16 --s 2 --l 2\n")
    folder = tmp_path / "many"
    sample.main(common + ["--prompt_file", str(prompts), "--out", str(folder)])
    assert sorted(p.name for p in folder.iterdir()) == ["000.png", "001.png"]
