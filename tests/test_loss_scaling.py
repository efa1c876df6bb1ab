"""fp16 dynamic loss scaling (training.LossScaler, training.backward / close_gradients /
apply_step): gradients that underflow in an fp16 backward survive, an overflow skips the step
and lowers the scale, the scale grows back after a run of good steps, and its state resumes.
The whole-run check (a tiny SDXL through train.py in fp16, resumed) is in test_sdxl_family.py."""
import pytest
import torch
from torch import nn

import training
from config import DEFAULTS, ConfigError, load_config

pytestmark = pytest.mark.usefixtures("one_thread")


def fp16_setup(**changes):
    """An fp32 trainable weight seen through an fp16 computation, as a LoRA on an fp16 base is."""
    weight = nn.Parameter(torch.tensor([1.0, 2.0]))
    cfg = dict(DEFAULTS, dtype="fp16", learning_rate=0.1, max_grad_norm=0.0, weight_decay=0.0, **changes)
    return weight, training.build_optimization({"w": weight}, cfg), cfg


def fp16_loss(weight, factor: float):
    """factor * sum(w * 3): the gradient 3 * factor per element passes through fp16."""
    return (weight.half() * torch.tensor(3.0, dtype=torch.float16)).float().sum() * factor


def test_a_gradient_below_fp16s_range_survives_only_with_the_scale():
    weight, opt, cfg = fp16_setup()
    fp16_loss(weight, 1e-8).backward()  # d loss / d out = 1e-8: below fp16's smallest subnormal (6e-8)
    assert torch.equal(weight.grad, torch.zeros(2))
    weight.grad = None

    training.backward(opt, fp16_loss(weight, 1e-8))
    norm = training.close_gradients(opt, cfg)
    assert not opt.skipped and torch.isfinite(norm)
    # 1e-8 * 65536 is an fp16 normal number; the product with 3 and the division are exact to fp16's 11 bits
    assert torch.allclose(weight.grad, torch.full((2,), 3e-8), rtol=1e-3), weight.grad


def test_an_overflow_skips_the_step_and_halves_the_scale():
    weight, opt, cfg = fp16_setup()
    before = weight.detach().clone()
    training.backward(opt, fp16_loss(weight, 0.5))  # 0.5 * 65536 * 3 > 65504, the fp16 maximum
    norm = training.close_gradients(opt, cfg)
    assert opt.skipped and not torch.isfinite(norm)
    training.apply_step(opt, 1)
    assert torch.equal(weight.detach(), before) and weight.grad is None
    assert opt.scaler.scale == 2.0**15
    assert opt.scheduler.last_epoch == 1  # the schedule counts the skipped step

    training.backward(opt, fp16_loss(weight, 0.5))  # 0.5 * 32768 * 3 fits: this one updates
    training.close_gradients(opt, cfg)
    training.apply_step(opt, 2)
    assert not opt.skipped and not torch.equal(weight.detach(), before)
    assert opt.scaler.scale == 2.0**15  # one good step of 2000 before it grows


def test_the_scale_grows_after_the_interval_and_resumes():
    scaler = training.LossScaler(init_scale=8.0, growth_interval=3)
    for _ in range(3):
        scaler.update(finite=True)
    assert scaler.scale == 16.0 and scaler.good_steps == 0
    scaler.update(finite=True)
    other = training.LossScaler()
    other.load_state_dict(scaler.state_dict())
    assert (other.scale, other.good_steps) == (16.0, 1)
    other.update(finite=False)
    assert (other.scale, other.good_steps) == (8.0, 0)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_bf16_and_fp32_have_no_scaler(dtype):
    opt = training.build_optimization({"w": nn.Parameter(torch.ones(2))}, dict(DEFAULTS, dtype=dtype))
    assert opt.scaler is None


def test_fp16_with_the_fused_step_is_refused(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("dtype = 'fp16'\nfused_backward = True\nmax_grad_norm = 0.0\n")
    with pytest.raises(ConfigError, match="fused_backward updates the weights inside backward"):
        load_config(str(path), check_files=False)
