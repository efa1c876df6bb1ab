"""FLUX training pinned by a reference run recorded before the family seam was built
(tests/data/flux_reference_run.json): losses, validation losses and the saved tensors of four
settings that together pass through LoRA dropout, caption dropout, validation, checkpointing,
block swap in both modes, the fused step with Adafactor, EMA, full fine-tuning, bf16, fp8,
per-group ranks, embedder LoRAs, block selection and the Huber loss. Any change to what
training computes shows here. The values were bit-identical on the recording machine; other
CPUs may round matmuls differently, so the comparison allows 1e-5 relative (1e-3 for bf16)."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import demo_data
import train

REFERENCE = json.loads((Path(__file__).parent / "data" / "flux_reference_run.json").read_text())
CASES = {
    "lora": dict(network_dropout=0.1, caption_dropout_rate=0.3, validation_count=2, validate_every=2),
    "lora_ckpt_swap": dict(deeper=True, gradient_checkpointing=True, double_blocks_to_swap=1,
                           single_blocks_to_swap=1, swap_mode="h2d_only", timestep_sampling="flux_shift"),
    "full_fused_swap": dict(deeper=True, train_mode="full", max_grad_norm=0.0, fused_backward=True,
                            gradient_checkpointing=True, optimizer="adafactor", double_blocks_to_swap=1,
                            single_blocks_to_swap=1, ema_decay=0.9),
    "lora_bf16_fp8": dict(dtype="bf16", fp8_base=True, group_ranks={"img_attn": 2, "single": 0}, lora_embedders=True,
                          train_double_blocks="0", loss_type="huber", huber_schedule="exponential"),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    made = demo_data.make_demo(root / "demo")
    torch.manual_seed(0)
    from models.flux import Flux, FluxParams

    model = Flux(FluxParams(**{**demo_data.FLUX_TINY, "depth": 3, "depth_single_blocks": 3}))
    deeper = root / "deeper.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(deeper))
    return dict(made, deeper=str(deeper), cache_dir=str(root / "cache"))


@pytest.mark.parametrize("name", list(CASES))
def test_training_matches_the_reference_run(tmp_path, files, name):
    changes = dict(CASES[name])
    flux_path = files["deeper"] if changes.pop("deeper", False) else files["flux_path"]
    cfg = dict({k: v for k, v in files.items() if k != "deeper"}, flux_path=flux_path,
               model_overrides={"axes_dim": [8, 20, 20]}, output_dir=str(tmp_path / "runs"), run_name="t",
               device="cpu", dtype="fp32", resolution=16, t5_max_length=8, batch_size=4, network_dim=4,
               network_alpha=4.0, learning_rate=1e-3, max_train_steps=4, save_every=0, sample_every=0,
               sample_at_start=False, validate_every=0, gradient_checkpointing=False, lr_scheduler="constant")
    cfg.update(changes)
    if cfg.get("train_mode") == "full":  # LoRA settings are refused for full fine-tuning
        cfg.pop("network_dim"), cfg.pop("network_alpha")
    path = tmp_path / "config.py"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in cfg.items()))
    final = train.main([str(path)])

    expected = REFERENCE[name]
    tolerance = 1e-3 if cfg["dtype"] == "bf16" else 1e-5
    records = [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records] == pytest.approx(expected["losses"], rel=tolerance)
    assert [r["val_loss"] for r in records if "val_loss" in r] == pytest.approx(expected["val_loss"], rel=tolerance)
    saved = load_file(str(final))
    assert len(saved) == expected["num_tensors"]
    for key, abs_sum in expected["tensor_abs_sums"].items():
        assert math.isclose(float(saved[key].double().abs().sum()), abs_sum, rel_tol=10 * tolerance), key
