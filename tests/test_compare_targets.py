"""tools/compare_targets.py on the tiny demo FLUX: two presets trained from one config, one report
with validation loss per noise level, gradient norms per block, parameters and a sample strip;
and the per-block gradient norms it reads (log_block_grad_norms) against autograd's own."""
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import train
import training
from config import ConfigError
from test_train import config_file, demo_files  # noqa: F401  (demo_files is a fixture)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import compare_targets  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_presets_give_one_report_that_tells_them_apart(tmp_path, demo_files):  # noqa: F811
    config = config_file(tmp_path, demo_files, max_train_steps=4, save_every=0, validation_count=2, validate_every=2,
                         sample_every=4, sample_steps=2, save_dtype="fp32")
    out = compare_targets.main([config, "--presets", "attention_only,late_blocks"])
    report = json.loads((out / "report.json").read_text())
    attention, late = report["attention_only"], report["late_blocks"]
    assert attention["parameters"] != late["parameters"]
    assert [v["step"] for v in attention["validations"]] == [2, 4]
    assert attention["validations"][-1]["by_sigma"].keys() == {f"{s:.1f}" for s in train.VALIDATION_LEVELS}
    assert attention["validations"][-1]["val_loss"] != pytest.approx(late["validations"][-1]["val_loss"], rel=1e-6)
    # attention_only trains the double blocks' attention and nothing in the single blocks (fused
    # attention + MLP); late_blocks trains the last half in running order: single blocks only
    assert set(attention["block_grad_norms"]) == {"double_blocks.0", "double_blocks.1"}
    assert set(late["block_grad_norms"]) == {"single_blocks.0", "single_blocks.1"}
    assert all(norm > 0 for norm in attention["block_grad_norms"].values())
    text = (out / "report.md").read_text()
    assert re.search(r"\| attention_only \| [\d,]+ \| [\d.]+ \| [\d.]+ \|", text) and "| single_blocks.1 |" in text
    strip = Image.open(out / "samples.png")
    assert strip.height == 2 * Image.open(attention["samples"][0]).height and len(attention["samples"]) >= 1


def test_a_config_without_held_out_images_is_refused_before_training(tmp_path, demo_files):  # noqa: F811
    with pytest.raises(ConfigError, match="set validation_count"):
        compare_targets.main([config_file(tmp_path, demo_files), "--presets", "attention_only"])
    with pytest.raises(ConfigError, match="not a preset of FLUX.1"):
        compare_targets.main([config_file(tmp_path, demo_files, validation_count=2, validate_every=2),
                              "--presets", "all,nope"])


def test_block_gradient_norms_are_autograds():
    from config import DEFAULTS
    from families.flux import FAMILY as FLUX
    from test_flux import random_inputs
    from test_lora_tools import TINY, tiny_flux

    model = tiny_flux()
    cfg = dict(DEFAULTS, network_dim=2, log_block_grad_norms=True, targets="blocks")
    prepared = training.prepare(model, FLUX, cfg, torch.device("cpu"))
    with torch.no_grad():
        for p in prepared.trainable.values():
            p.normal_(0, 0.1)
    x = random_inputs(model.params)
    x["txt"], x["y"] = torch.randn(2, 7, TINY["context_in_dim"]), torch.randn(2, TINY["vec_in_dim"])
    model(**x).square().mean().backward()
    norms = training.block_grad_norms(prepared)["block_grad_norms"]
    expected: dict[str, float] = {}
    for name, p in prepared.trainable.items():
        block = training.block_of(prepared.network.module_paths[name.split(".")[1]])
        expected[block] = expected.get(block, 0.0) + float(p.grad.square().sum())
    assert set(norms) == {"double_blocks.0", "double_blocks.1", "single_blocks.0", "single_blocks.1"}
    assert norms == pytest.approx({b: v ** 0.5 for b, v in expected.items()}, rel=1e-5)
    assert training.block_grad_norms(prepared) == {}  # each step's norms are read once


def test_help_names_the_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        compare_targets.main(["--help"])
    assert exit_.value.code == 0 and "usage: python tools/compare_targets.py" in capsys.readouterr().out
