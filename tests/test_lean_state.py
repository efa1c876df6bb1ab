"""Lean LoRA state (configs/flux_4gb.py): bf16 LoRA weights with stochastically rounded updates,
and AdamW with 8-bit moments (optim.AdamW8bit). The 8-bit code is float8 e4m3 with a scale per
block of 256, written with unbiased stochastic rounding; the optimizer tracks fp32 AdamW."""
import pytest
import torch
from torch import nn

import optim
import train
from config import ConfigError, load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def test_stochastic_fp8_rounding_is_unbiased_and_lands_on_fp8_numbers():
    g = torch.Generator().manual_seed(0)
    # between two normal fp8 numbers (1.0 and 1.125), between two subnormals, exactly on the grid
    for value, below, above in ((1.03, 1.0, 1.125), (-0.0041, -2 * 2**-9, -3 * 2**-9), (0.5, 0.5, 0.5)):
        x = torch.full((200_000,), value)
        codes = optim._round_fp8_stochastic(x, g)
        assert codes.dtype == torch.float8_e4m3fn
        assert set(codes.float().unique().tolist()) <= {below, above}
        assert abs(codes.float().mean().item() - value) < 2e-3 * abs(value) + 1e-6
    top = optim._round_fp8_stochastic(torch.full((1000,), 447.9), g).float()
    assert top.max().item() == 448.0 and torch.isfinite(top).all()


def test_state_round_trip_per_block_of_256():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 300, generator=g) * torch.logspace(-3, 0, 300)  # 900 values: 4 blocks, the last padded
    codes, scale = optim.quantize_state(x, g)
    assert codes.shape == (4, 256) and scale.shape == (4, 1)
    back = optim.dequantize_state(codes, scale, x)
    assert back.shape == x.shape
    # within one fp8 step: 2^-3 of the value, or the block's subnormal step 2^-9 * scale
    step = torch.maximum(x.abs() * 2**-3, 2**-9 * scale.flatten().repeat_interleave(256)[:900].view(3, 300))
    assert ((back - x).abs() <= step * (1 + 1e-6)).all()
    zeros, zero_scale = optim.quantize_state(torch.zeros(10))
    assert zeros.float().eq(0).all() and zero_scale.eq(1).all()


def regression(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, w_true = torch.randn(256, 32, generator=g), torch.randn(32, 8, generator=g)
    return x, x @ w_true


@pytest.mark.parametrize("fused", [False, True])
def test_adamw8bit_tracks_fp32_adamw_with_a_quarter_of_the_state(fused):
    x, y = regression()
    torch.manual_seed(0)
    reference = nn.Linear(32, 8, bias=False)
    lean = nn.Linear(32, 8, bias=False)
    lean.load_state_dict(reference.state_dict())
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.01)
    opt = optim.build_optimizer(list(lean.parameters()), "adamw8bit", lr=1e-2, weight_decay=0.01)
    fused_step = optim.FusedBackwardStep(opt, seed=0) if fused else None
    for _ in range(200):
        for model, optimizer in ((reference, ref_opt), (lean, opt)):
            (model(x) - y).square().mean().backward()
            if optimizer is opt and fused_step is not None:
                fused_step.step()
            else:
                optimizer.step()
                optimizer.zero_grad()
    start = (y.square().mean()).item()
    ref_loss, lean_loss = ((m(x) - y).square().mean().item() for m in (reference, lean))
    assert ref_loss < 0.05 * start and lean_loss < 0.05 * start
    assert abs(lean_loss - ref_loss) < 0.25 * ref_loss + 1e-4
    relative = ((lean.weight - reference.weight).norm() / reference.weight.norm()).item()
    assert relative < 0.02, relative
    state = opt.state[lean.weight]
    state_bytes = sum(t.numel() * t.element_size() for k, t in state.items() if k != "step")
    assert state_bytes == 2 * (256 + 4)  # 32 x 8 = 256 weights: one block of fp8 codes + one fp32 scale, twice


def write_config(path, **values) -> str:
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in values.items()))
    return str(path)


@pytest.mark.parametrize("optimizer,fused", [("adafactor", False), ("adamw8bit", True), ("adamw8bit", False)])
def test_bf16_lora_weights_train_and_resume_through_the_entry_point(tmp_path, optimizer, fused):
    """Four steps straight, and two steps then --resume=latest to four: the same LoRA file bit for
    bit; the state holds bf16 LoRA weights (and fp8 moments for adamw8bit)."""
    import demo_data
    from safetensors.torch import load_file

    files = demo_data.make_demo(tmp_path / "demo")
    cfg = dict(dataset_dir=files["dataset_dir"], model_path=files["flux_path"], clip_l_path=files["clip_l_path"],
               t5_path=files["t5_path"], model_overrides={"axes_dim": [8, 20, 20]}, device="cpu", dtype="fp32",
               resolution=16, t5_max_length=8, batch_size=2, max_train_steps=4, save_every=2, sample_every=0,
               sample_at_start=False, validate_every=0, output_dir=str(tmp_path / "runs"), lr_scheduler="constant",
               network_dim=4, lora_dtype="bf16", optimizer=optimizer, fused_backward=fused,
               max_grad_norm=0.0 if fused else 1.0, cache_dir=str(tmp_path / "cache"))
    straight = train.main([write_config(tmp_path / "a.py", **cfg, run_name="straight")])
    resumed_cfg = write_config(tmp_path / "b.py", **cfg, run_name="resumed")
    train.main([resumed_cfg, "--max_train_steps=2"])
    resumed = train.main([resumed_cfg, "--resume=latest"])
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = sorted((tmp_path / "runs" / "straight" / "state").iterdir())[-1]
    weights = load_file(str(state / "trainable.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    moments = torch.load(state / "training_state.pt", weights_only=True)["optimizer"]
    moments = moments.get("optimizer", moments)["state"]  # the fused step wraps the optimizer's state
    if optimizer == "adamw8bit":
        assert {s["exp_avg"].dtype for s in moments.values()} == {torch.float8_e4m3fn}


def test_lora_dtype_needs_stochastically_rounded_updates(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("lora_dtype = 'bf16'\n")
    with pytest.raises(ConfigError, match="torch's AdamW does not make"):
        load_config(str(path), check_files=False)
    with pytest.raises(ConfigError, match="train_mode='full' trains the model's own"):
        load_config(str(path), ["--train_mode=full", "--optimizer=adafactor"], check_files=False)
    cfg = load_config(str(path), ["--optimizer=adamw8bit"], check_files=False)
    assert cfg["lora_dtype"] == "bf16"
