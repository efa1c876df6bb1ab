import copy
import io
import math

import pytest
import torch
import transformers.optimization as hf_optim
from torch import nn

from optim import (EMA, Adafactor, FusedBackwardStep, adamw_step_, build_optimizer, build_scheduler,
                   clip_grad_norm_, lr_factor, stochastic_round_)


def _tiny_model(dtype=torch.float32, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 4)).to(dtype)


def _batches(n: int, seed=1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 6, generator=g), torch.randn(5, 4, generator=g)) for _ in range(n)]


def _loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    dtype = next(model.parameters()).dtype
    return (model(x.to(dtype)).float() - y).square().mean()


# ---------------------------------------------------------------- Adafactor

ADAFACTOR_SETTINGS = [
    dict(lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False),
    dict(lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False, beta1=0.9, weight_decay=0.1),
    dict(lr=3e-2, relative_step=False, scale_parameter=False, warmup_init=False, clip_threshold=0.5, decay_rate=-0.6),
    dict(lr=None, relative_step=True, scale_parameter=True, warmup_init=True),
]


@pytest.mark.parametrize("settings", ADAFACTOR_SETTINGS)
def test_adafactor_matches_transformers(settings):
    torch.manual_seed(0)
    shapes = [(8, 6), (2, 4, 5), (7,)]  # factored 2-D, factored over the last two dims of 3-D, unfactored 1-D
    ours = [nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    opt_ours = Adafactor(ours, **settings)
    opt_theirs = hf_optim.Adafactor(theirs, **settings)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt_ours.step()
        opt_theirs.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert opt_ours.state[ours[0]]["exp_avg_sq_row"].shape == (8,)
    assert opt_ours.state[ours[1]]["exp_avg_sq_col"].shape == (2, 5)


def test_adafactor_option_errors():
    p = [nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(ValueError, match="explicit lr"):
        Adafactor(p)
    with pytest.raises(ValueError, match="relative_step"):
        Adafactor(p, lr=1e-3, relative_step=True)
    with pytest.raises(ValueError, match="warmup_init"):
        Adafactor(p, lr=1e-3, warmup_init=True)
    with pytest.raises(ValueError, match="clip_threshold"):
        build_optimizer(p, "adafactor", lr=1e-3, clip_treshold=1.0)
    with pytest.raises(ValueError, match="adamw, adafactor"):
        build_optimizer(p, "lion", lr=1e-3)
    with pytest.raises(ValueError, match="no parameters"):
        build_optimizer([], "adamw", lr=1e-3)


def test_build_optimizer():
    p = [nn.Parameter(torch.zeros(2, 2))]
    adamw = build_optimizer(p, "adamw", lr=1e-3, weight_decay=0.01, betas=(0.8, 0.9), eps=1e-6)
    assert isinstance(adamw, torch.optim.AdamW)
    group = adamw.param_groups[0]
    settings = (group["lr"], group["weight_decay"], group["betas"], group["eps"], group["foreach"])
    assert settings == (1e-3, 0.01, (0.8, 0.9), 1e-6, True)
    ada = build_optimizer(p, "adafactor", lr=1e-3, beta1=0.9, adafactor_eps=(1e-30, 1e-2))
    assert isinstance(ada, Adafactor)
    assert ada.param_groups[0]["eps"] == (1e-30, 1e-2) and ada.param_groups[0]["beta1"] == 0.9


# ---------------------------------------------------------------- AdamW per parameter

@pytest.mark.parametrize("foreach", [False, True])
def test_adamw_step_matches_torch_bitwise(foreach):
    torch.manual_seed(0)
    ref = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(4))]
    ours = [p.detach().clone() for p in ref]
    opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=foreach)
    states = [{} for _ in ours]
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in ref]
        for p, grad in zip(ref, grads):
            p.grad = grad
        opt.step()
        for p, grad, state in zip(ours, grads, states):
            adamw_step_(p, grad, state, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- stochastic rounding

def test_stochastic_rounding_keeps_small_updates():
    # 1000 steps of +1e-4 on 1.0: bf16's spacing at 1.0 is 2^-7 = 0.0078, so nearest rounding never moves.
    g = torch.Generator().manual_seed(0)
    weights_sr = torch.ones(4096, dtype=torch.bfloat16)
    weights_nearest = torch.ones(4096, dtype=torch.bfloat16)
    for _ in range(1000):
        stochastic_round_(weights_sr, weights_sr.float() + 1e-4, generator=g)
        weights_nearest.copy_(weights_nearest.float() + 1e-4)
    assert torch.all(weights_nearest == 1.0)
    # each weight is a random walk with std ~0.03; the mean of 4096 has std ~5e-4
    assert weights_sr.float().mean().item() == pytest.approx(1.1, abs=3e-3)


@pytest.mark.parametrize("value", [1.0 + 0.3 * 2**-7, -(1.0 + 0.3 * 2**-7), 3.0e-3 + 0.77 * 2**-16, -1e20 - 1.3e17])
def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours(value):
    src = torch.full((200_000,), value, dtype=torch.float32)
    value = src[0].item()  # the value as fp32 holds it
    dst = torch.empty_like(src, dtype=torch.bfloat16)
    stochastic_round_(dst, src, generator=torch.Generator().manual_seed(1))
    # the two bf16 values around src: truncation towards zero, and one bf16 step further out
    toward_zero = (src.view(torch.int32) & -65536).view(torch.float32)[0].item()
    away = ((src.view(torch.int32) & -65536) + 65536).view(torch.float32)[0].item()
    assert set(dst.float().unique().tolist()) == {toward_zero, away}
    fraction_away = (value - toward_zero) / (away - toward_zero)
    assert (dst.float() == away).float().mean().item() == pytest.approx(fraction_away, abs=5e-3)
    # the mean of 200k roundings has a standard deviation below 1.2e-3 of the spacing
    assert abs(dst.double().mean().item() - value) < 5e-3 * abs(away - toward_zero)


def test_stochastic_rounding_special_values():
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 2.0, -0.5])
    # a NaN whose payload lies only in the low 16 bits, and one at the top of the int32 range
    odd_nans = torch.tensor([0x7F800001, 0x7FFFFFFF, -1], dtype=torch.int32).view(torch.float32)
    src = torch.cat([specials, odd_nans]).repeat(1000)
    dst = torch.empty_like(src, dtype=torch.bfloat16)
    stochastic_round_(dst, src, generator=torch.Generator().manual_seed(2))
    assert torch.equal(torch.isnan(dst), torch.isnan(src))
    finite = ~torch.isnan(src)
    assert torch.equal(dst.float()[finite], src[finite])  # exactly representable values are untouched
    assert torch.equal(torch.signbit(dst.float()[finite]), torch.signbit(src[finite]))
    with pytest.raises(ValueError, match="bf16"):
        stochastic_round_(torch.empty(3, dtype=torch.float16), torch.zeros(3))


def test_stochastic_rounding_is_reproducible_with_a_generator():
    src = torch.randn(1000)
    a, b = torch.empty(1000, dtype=torch.bfloat16), torch.empty(1000, dtype=torch.bfloat16)
    stochastic_round_(a, src, torch.Generator().manual_seed(3))
    stochastic_round_(b, src, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# ---------------------------------------------------------------- fused step in backward

def _make(name: str, model: nn.Module, **extra):
    options = dict(weight_decay=0.05, **extra)
    if name == "adafactor":
        options["beta1"] = 0.9
    return build_optimizer(model.parameters(), name, lr=1e-2, **options)


def _train_unfused(model, optimizer, scheduler, batches):
    for batch in batches:
        _loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()


def _train_fused(model, fused, scheduler, batches):
    for batch in batches:
        _loss(model, batch).backward()
        assert all(p.grad is None for p in model.parameters())  # no gradient outlives its hook
        fused.step()
        scheduler.step()


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_fused_step_equals_unfused_step_in_fp32(name):
    batches = _batches(5)
    plain, fused_model = _tiny_model(), _tiny_model()
    opt_plain, opt_fused = _make(name, plain), _make(name, fused_model)
    # warmup 2 of 5: the LR changes every step, so the hooks must follow the scheduler
    sched_plain = build_scheduler(opt_plain, "cosine_with_warmup", warmup_steps=2, total_steps=5)
    fused = FusedBackwardStep(opt_fused)
    sched_fused = build_scheduler(opt_fused, "cosine_with_warmup", warmup_steps=2, total_steps=5)
    _train_unfused(plain, opt_plain, sched_plain, batches)
    _train_fused(fused_model, fused, sched_fused, batches)
    start = _tiny_model()
    for a, b, p0 in zip(plain.parameters(), fused_model.parameters(), start.parameters()):
        assert torch.equal(a, b)
        assert not torch.equal(a, p0)  # it did train
    assert fused.num_steps == 5


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_fused_bf16_step_rounds_the_fp32_result_to_a_neighbour(name):
    # A linear loss makes the gradient independent of the weights, so a bf16 and
    # an fp32 copy of the same weights get identical gradients.
    torch.manual_seed(0)
    w0 = torch.randn(16, 12).bfloat16()
    coeff = torch.randn(16, 12).bfloat16().float()  # bf16-representable: the bf16 grad is exact
    w_bf16 = nn.Parameter(w0.clone())
    w_fp32 = nn.Parameter(w0.float())
    extra = dict(beta1=0.9) if name == "adafactor" else {}
    opt_bf16 = build_optimizer([w_bf16], name, lr=1e-3, **extra)
    opt_fp32 = build_optimizer([w_fp32], name, lr=1e-3, **extra)
    fused = FusedBackwardStep(opt_bf16, seed=0)
    (w_bf16.float() * coeff).sum().backward()
    fused.step()
    (w_fp32 * coeff).sum().backward()
    opt_fp32.step()
    assert w_bf16.dtype == torch.bfloat16 and w_bf16.grad is None
    down = (w_fp32.detach().view(torch.int32) & -65536).view(torch.float32)  # towards zero
    up = ((w_fp32.detach().view(torch.int32) & -65536) + 65536).view(torch.float32)
    result = w_bf16.detach().float()
    assert torch.all((result == down) | (result == up))
    assert not torch.equal(result, w0.float())
    nearest = w_fp32.detach().bfloat16().float()
    assert not torch.equal(result, nearest)  # stochastic, not nearest rounding
    # with stochastic_rounding=False the fused step rounds to nearest
    w_nearest = nn.Parameter(w0.clone())
    FusedBackwardStep(build_optimizer([w_nearest], name, lr=1e-3, **extra), stochastic_rounding=False)
    (w_nearest.float() * coeff).sum().backward()
    assert torch.equal(w_nearest.detach().float(), nearest)
    # the optimizer state stays fp32 for bf16 weights
    assert all(t.dtype == torch.float32 for t in opt_bf16.state[w_bf16].values() if torch.is_tensor(t))


def test_fused_gradients_never_coexist():
    model = _tiny_model()
    params = list(model.parameters())
    grads_alive = []
    # registered before the fused hooks, so it runs first, while this parameter's gradient exists
    for p in params:
        p.register_post_accumulate_grad_hook(lambda p: grads_alive.append(sum(q.grad is not None for q in params)))
    fused = FusedBackwardStep(_make("adamw", model))
    _loss(model, _batches(1)[0]).backward()
    fused.step()
    assert grads_alive == [1] * len(params)


def test_fused_refuses_accumulation_and_global_clipping():
    model = _tiny_model()
    opt = _make("adamw", model)
    with pytest.raises(ValueError, match="gradient accumulation"):
        FusedBackwardStep(opt, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="max_grad_norm_per_param"):
        FusedBackwardStep(opt, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="adamw, adafactor"):
        FusedBackwardStep(torch.optim.SGD(model.parameters(), lr=0.1))
    fused = FusedBackwardStep(opt)
    batch = _batches(1)[0]
    _loss(model, batch).backward()
    with pytest.raises(RuntimeError, match="gradient accumulation"):
        _loss(model, batch).backward()  # a second backward without step()


def test_fused_per_parameter_clipping_and_grad_norm():
    batch = _batches(1)[0]
    plain, fused_model = _tiny_model(), _tiny_model()
    opt_plain = _make("adamw", plain)
    fused = FusedBackwardStep(_make("adamw", fused_model), max_grad_norm_per_param=0.05)
    _loss(plain, batch).backward()
    global_norm = clip_grad_norm_(plain.parameters(), max_norm=0)
    for p in plain.parameters():  # clip each tensor on its own
        torch.nn.utils.clip_grad_norm_([p], 0.05)
    opt_plain.step()
    _loss(fused_model, batch).backward()
    fused.step()
    for a, b in zip(plain.parameters(), fused_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)
    torch.testing.assert_close(fused.last_grad_norm, global_norm)


def _save(*objects) -> bytes:
    buffer = io.BytesIO()
    torch.save(objects, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_fused_state_dict_round_trip_continues_identically(name):
    batches = _batches(6, seed=3)
    model = _tiny_model(torch.bfloat16)
    opt = _make(name, model)
    fused = FusedBackwardStep(opt, seed=7)
    sched = build_scheduler(opt, "linear", warmup_steps=1, total_steps=6)
    _train_fused(model, fused, sched, batches[:3])
    checkpoint = _save(model.state_dict(), fused.state_dict(), sched.state_dict())
    _train_fused(model, fused, sched, batches[3:])

    resumed = _tiny_model(torch.bfloat16, seed=123)
    opt2 = _make(name, resumed)
    fused2 = FusedBackwardStep(opt2, seed=0)
    sched2 = build_scheduler(opt2, "linear", warmup_steps=1, total_steps=6)
    model_sd, fused_sd, sched_sd = torch.load(io.BytesIO(checkpoint))
    resumed.load_state_dict(model_sd)
    fused2.load_state_dict(fused_sd)
    sched2.load_state_dict(sched_sd)
    for state in opt2.state.values():  # torch's loader would have cast these to bf16
        assert all(t.dtype == torch.float32 for t in state.values() if torch.is_tensor(t))
    _train_fused(resumed, fused2, sched2, batches[3:])
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert fused2.num_steps == 6


def test_unfused_adafactor_keeps_fp32_state_across_load():
    model = _tiny_model(torch.bfloat16)
    opt = _make("adafactor", model)
    _loss(model, _batches(1)[0]).backward()
    opt.step()
    opt2 = _make("adafactor", copy.deepcopy(model))
    opt2.load_state_dict(torch.load(io.BytesIO(_save(opt.state_dict())))[0])
    for state, state2 in zip(opt.state.values(), opt2.state.values()):
        for key, value in state.items():
            if torch.is_tensor(value):
                assert state2[key].dtype == torch.float32 and torch.equal(state2[key], value)


# ---------------------------------------------------------------- schedules

def _lrs(scheduler, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return lrs


HF_SCHEDULES = {
    "constant_with_warmup": lambda opt: hf_optim.get_constant_schedule_with_warmup(opt, 10),
    "linear": lambda opt: hf_optim.get_linear_schedule_with_warmup(opt, 10, 50),
    "cosine_with_warmup": lambda opt: hf_optim.get_cosine_schedule_with_warmup(opt, 10, 50),
    "polynomial": lambda opt: hf_optim.get_polynomial_decay_schedule_with_warmup(opt, 10, 50, lr_end=0.0, power=2.0),
}


@pytest.mark.parametrize("name", list(HF_SCHEDULES))
def test_schedules_match_transformers(name):
    def optimizer():
        return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    ours = _lrs(build_scheduler(optimizer(), name, warmup_steps=10, total_steps=50, power=2.0), 51)
    theirs = _lrs(HF_SCHEDULES[name](optimizer()), 51)
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_schedule_key_steps_with_end_ratio():
    e = 0.1
    def f(name, step, power=1.0):
        return lr_factor(step, name, warmup_steps=10, total_steps=110, end_lr_ratio=e, power=power)
    for name in ("linear", "polynomial", "cosine_with_warmup", "constant_with_warmup"):
        assert f(name, 0) == 0.0 and f(name, 5) == 0.5 and f(name, 10) == 1.0
    assert f("linear", 60) == pytest.approx(e + (1 - e) * 0.5)
    assert f("polynomial", 60, power=2.0) == pytest.approx(e + (1 - e) * 0.25)
    assert f("cosine_with_warmup", 60) == pytest.approx((1 + e) / 2)
    for name in ("linear", "polynomial", "cosine_with_warmup"):
        assert f(name, 110) == pytest.approx(e) and f(name, 500) == pytest.approx(e)
    assert f("constant_with_warmup", 500) == 1.0 and lr_factor(0, "constant", 0, 10) == 1.0
    # the LambdaLR actually sets group["lr"]
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    lrs = _lrs(build_scheduler(opt, "linear", warmup_steps=10, total_steps=110, end_lr_ratio=e), 61)
    assert lrs[5] == pytest.approx(1.0) and lrs[60] == pytest.approx(2.0 * (e + (1 - e) * 0.5))


def test_schedule_errors():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="constant, constant_with_warmup, linear"):
        build_scheduler(opt, "cosine", 0, 10)
    with pytest.raises(ValueError, match="constant_with_warmup"):
        build_scheduler(opt, "constant", 5, 10)
    with pytest.raises(ValueError, match="total_steps"):
        build_scheduler(opt, "linear", 10, 10)


# ---------------------------------------------------------------- clipping

def test_clip_grad_norm():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    assert clip_grad_norm_([a, b], max_norm=0).item() == pytest.approx(5.0)
    assert a.grad.tolist() == [3.0, 0.0]  # no clipping with max_norm 0
    assert clip_grad_norm_([a, b], max_norm=1.0).item() == pytest.approx(5.0)
    torch.testing.assert_close(torch.cat([a.grad, b.grad]), torch.tensor([0.6, 0.0, 0.8]), atol=1e-6, rtol=0)
    assert clip_grad_norm_([nn.Parameter(torch.zeros(1))], 1.0).item() == 0.0


# ---------------------------------------------------------------- EMA

def test_ema_math_and_update_every():
    p = nn.Parameter(torch.tensor([0.0, 10.0]))
    ema = EMA([p], decay=0.9, update_every=2)
    expected = p.detach().clone()
    for step, value in enumerate([1.0, 2.0, 3.0, 4.0, 5.0], start=1):
        with torch.no_grad():
            p.fill_(value)
        updated = ema.update(step)
        assert updated == (step % 2 == 0)
        if updated:
            expected = 0.9 * expected + 0.1 * value
        torch.testing.assert_close(ema.shadow[0], expected)
    assert ema.num_updates == 2
    # closed form of two updates from (0, 10) with weights 2 then 4
    two_updates = [0.81 * start + 0.09 * 2 + 0.1 * 4 for start in (0.0, 10.0)]
    torch.testing.assert_close(ema.shadow[0], torch.tensor(two_updates))


def test_ema_swapped_copy_to_and_state_dict():
    model = _tiny_model(torch.bfloat16)
    params = list(model.parameters())
    ema = EMA(params, decay=0.5)
    trained = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    ema.update(1)
    after_update = [p.detach().clone() for p in params]
    with ema.swapped():
        for p, s in zip(params, ema.shadow):
            assert torch.equal(p, s.to(p.dtype))
    for p, w in zip(params, after_update):
        assert torch.equal(p, w)  # the trained weights came back
    assert all(s.dtype == torch.float32 for s in ema.shadow)

    restored = EMA(_tiny_model(torch.bfloat16, seed=5).parameters())
    restored.load_state_dict(torch.load(io.BytesIO(_save(ema.state_dict())))[0])
    assert restored.decay == 0.5 and restored.num_updates == 1
    for a, b in zip(restored.shadow, ema.shadow):
        assert torch.equal(a, b)
    target = _tiny_model(torch.float32, seed=9)
    restored.copy_to(target.parameters())
    for p, t0 in zip(target.parameters(), trained):
        torch.testing.assert_close(p, t0.float() + 0.5, atol=1e-2, rtol=0)
    with pytest.raises(ValueError, match="do not match"):
        ema.copy_to([nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="decay"):
        EMA(params, decay=1.0)
