"""The Triton optimizer updates (kernels_optim.py), run on CPU under the Triton interpreter
(TRITON_INTERPRET=1 is set by conftest.py), against implementations written independently of it and
of optim.py: torch.optim.AdamW, and Adafactor written out below as the paper's formula with its
second moment as a full matrix (transformers' conventions; tests/test_optim.py checks optim.py
against transformers' own Adafactor).

fp32 weights: the kernels compute in fp32 and are compared with torch.optim.AdamW in fp32 and with
the formula in float64; sums run in a different order (tile partial sums vs torch's reductions)
and torch's CPU kernels may fuse a multiply-add, so results agree to about one fp32 ulp per step,
not bit for bit. Tolerance used throughout: rtol 1e-6 with atol 1e-7 on weights, rtol 1e-5 with
atol 1e-8 on optimizer state. bf16 weights are rounded stochastically: checked against the fp32
result of the same oracles (within one bf16 step, unbiased over seeds). Without triton the whole
file is skipped (there is no kernel to test).
"""
import pytest
import torch
from torch import nn

pytest.importorskip("triton", reason="triton is not installed: no optimizer kernel to test")

import kernels_optim  # noqa: E402
import optim  # noqa: E402
from models import layers  # noqa: E402
from optim import FusedBackwardStep, adafactor_step_, adamw_step_, build_optimizer  # noqa: E402

WEIGHT_TOL = dict(rtol=1e-6, atol=1e-7)
STATE_TOL = dict(rtol=1e-5, atol=1e-8)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks small enough that the test tensors span several programs, with ragged edges:
    (37, 29) is 9 AdamW programs of 128 and 3 x 2 Adafactor tiles of 16 x 16."""
    monkeypatch.setattr(kernels_optim, "BLOCK", 128)
    monkeypatch.setattr(kernels_optim, "TILE_ROWS", 16)
    monkeypatch.setattr(kernels_optim, "TILE_COLS", 16)


@pytest.fixture
def kernel_mode():
    """set_kernels for the duration of a test; "torch" again afterwards."""
    yield layers.set_kernels
    layers.set_kernels("torch")


# ---------------------------------------------------------------- the independent oracles


def torch_adamw(start: torch.Tensor, grads: list, lr: float, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """torch.optim.AdamW (single-tensor code) from `start` through `grads`: (weight, state)."""
    weight = start.float().clone().requires_grad_()
    optimizer = torch.optim.AdamW([weight], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
    for grad in grads:
        weight.grad = grad.float().clone()
        optimizer.step()
    state = optimizer.state[weight]
    return weight.detach(), {"exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}


def adafactor_formula(start: torch.Tensor, grads: list, lr: float, beta1=None, weight_decay=0.0, clip_threshold=1.0,
                      decay_rate=-0.8, scale_parameter=False, eps1=1e-30, eps2=1e-3):
    """Adafactor (Shazeer and Stern 2018, Algorithms 4 and 5, as transformers applies them), in float64,
    with the second moment written out as a full matrix V: for >= 2-D weights V = R C^T / mean(R)
    from the EMAs R and C of the row and column means of grad^2 + eps1; else an EMA of its own.
    Returns (weight, state) with optim.py's state names."""
    rms = lambda x: x.square().mean().sqrt().item()  # noqa: E731
    w = start.double()
    factored = w.ndim >= 2
    R, C = torch.zeros(w.shape[:-1], dtype=w.dtype), torch.zeros(w.shape[:-2] + w.shape[-1:], dtype=w.dtype)
    V, M = torch.zeros_like(w), torch.zeros_like(w)
    for t, grad in enumerate(grads, start=1):
        g = grad.double()
        beta2 = 1 - t**decay_rate
        sq = g * g + eps1
        if factored:
            R, C = beta2 * R + (1 - beta2) * sq.mean(-1), beta2 * C + (1 - beta2) * sq.mean(-2)
            V = R[..., :, None] * C[..., None, :] / R.mean(-1)[..., None, None]
        else:
            V = beta2 * V + (1 - beta2) * sq
        U = g / V.sqrt()
        U = U / max(1.0, rms(U) / clip_threshold)
        step = lr * (max(eps2, rms(w)) if scale_parameter else 1.0)
        U = step * U
        if beta1 is not None:
            M = beta1 * M + (1 - beta1) * U
            U = M
        if weight_decay:  # (0 * inf would be NaN)
            w = w - weight_decay * step * w
        w = w - U
    state = {"exp_avg_sq_row": R, "exp_avg_sq_col": C} if factored else {"exp_avg_sq": V}
    if beta1 is not None:
        state["exp_avg"] = M
    return w.float(), {k: v.float() for k, v in state.items()}


def oracle(name: str, start: torch.Tensor, grads: list, **options):
    if name == "adamw":
        return torch_adamw(start, grads, **options)
    return adafactor_formula(start, grads, **options)


def triton_steps(name: str, start: torch.Tensor, grads: list, seed=None, **options):
    """optim.py's step function in "triton" mode (so through kernels_optim) from start: (weight, state)."""
    step_fn = adamw_step_ if name == "adamw" else adafactor_step_
    weight, state = start.clone(), {}
    with layers.using_kernels("triton"):
        for grad in grads:
            step_fn(weight, grad, state, **options, **({} if seed is None else {"seed": seed}))
    return weight, state


def within_one_bf16_step(result: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Element-wise: result lies within one bf16 step of the fp32 value exact (as its two bf16
    neighbours do), with one fp32 ulp of slack for the oracle's own rounding."""
    below = (exact.view(torch.int32) & -65536).view(torch.float32)
    spacing = ((below.view(torch.int32) + 65536).view(torch.float32) - below).abs()
    return (result.float() - exact).abs() <= spacing + 2 * torch.finfo(torch.float32).eps * exact.abs()


def _assert_kernel_matches_oracle(name, shape, steps, **options):
    """`steps` steps from a fixed start with fixed gradients: weights and state against the oracle."""
    start = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    gradients = torch.Generator().manual_seed(1)
    grads = [torch.randn(shape, generator=gradients) for _ in range(steps)]
    weight, state = triton_steps(name, start, grads, **options)
    expected_weight, expected_state = oracle(name, start, grads, **options)
    assert not torch.equal(weight, start)  # it trained
    torch.testing.assert_close(weight, expected_weight, **WEIGHT_TOL)
    for key, value in expected_state.items():
        torch.testing.assert_close(state[key], value, **STATE_TOL, msg=lambda m: f"{key}: {m}")


# ---------------------------------------------------------------- fp32: equal to the oracles


@pytest.mark.parametrize("shape", [(37, 29), (130,)])
@pytest.mark.parametrize("options", [
    dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1),
    dict(lr=3e-3, betas=(0.3, 0.95), eps=1e-6),  # lerp weight 0.7: torch.lerp's other formula
])  # fmt: skip
def test_adamw_kernel_matches_torch_optim_adamw_fp32(small_blocks, shape, options):
    _assert_kernel_matches_oracle("adamw", shape, steps=3, **options)


@pytest.mark.parametrize("shape", [(37, 29), (2, 9, 21), (130,)])  # factored 2-D, factored 3-D, unfactored
@pytest.mark.parametrize("options", [
    dict(lr=1e-2),
    # momentum, decay, a clip that bites (the first update's RMS is ~1), another beta2 schedule,
    # and the lr scaled by the weight's RMS
    dict(lr=1e-2, beta1=0.9, weight_decay=0.1, clip_threshold=0.5, decay_rate=-0.6, scale_parameter=True),
])  # fmt: skip
def test_adafactor_kernel_matches_the_written_out_formula_fp32(small_blocks, shape, options):
    _assert_kernel_matches_oracle("adafactor", shape, steps=3, **options)


def test_fused_backward_step_triton_equals_torch_fp32(small_blocks):
    def train(mode: str, name: str) -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 20), nn.GELU(), nn.Linear(20, 3))  # 2-D weights (2 tiles), 1-D biases
        extra = dict(beta1=0.9) if name == "adafactor" else {}
        fused = FusedBackwardStep(build_optimizer(model.parameters(), name, lr=1e-2, weight_decay=0.05, **extra))
        data = torch.Generator().manual_seed(1)
        layers.set_kernels(mode)
        try:
            for _ in range(2):
                x, y = torch.randn(5, 6, generator=data), torch.randn(5, 3, generator=data)
                (model(x) - y).square().mean().backward()
                fused.step()
        finally:
            layers.set_kernels("torch")
        return model

    for name in ["adamw", "adafactor"]:
        with_torch, with_triton = train("torch", name), train("triton", name)
        for a, b in zip(with_triton.parameters(), with_torch.parameters()):
            torch.testing.assert_close(a, b, **WEIGHT_TOL)


# ---------------------------------------------------------------- bf16: stochastic rounding


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two bf16 values around each fp32 value: towards zero, and one bf16 step further out."""
    truncated = x.view(torch.int32) & -65536
    return truncated.view(torch.float32), (truncated + 65536).view(torch.float32)


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_bf16_result_is_within_one_bf16_step_of_the_fp32_result(small_blocks, name):
    options = dict(lr=1e-3, weight_decay=0.1) | (dict(beta1=0.9) if name == "adafactor" else {})
    start = torch.randn(37, 29, generator=torch.Generator().manual_seed(0)).bfloat16()
    grad = torch.randn(37, 29, generator=torch.Generator().manual_seed(1)).bfloat16()  # a bf16 grad, as in training
    exact, _ = oracle(name, start.float(), [grad.float()], **options)
    result, state = triton_steps(name, start, [grad], seed=7, **options)
    assert result.dtype == torch.bfloat16
    assert torch.all(within_one_bf16_step(result, exact))
    assert not torch.equal(result, exact.bfloat16())  # not nearest rounding
    assert not torch.equal(result, start)  # the update survived
    assert all(t.dtype == torch.float32 for t in state.values() if torch.is_tensor(t))


def test_bf16_rounding_is_unbiased_over_seeds(monkeypatch):
    # 2048 weights: half at +1, half at -1, every one moved by -lr (AdamW's first step is lr * sign(grad)).
    # +1 - 1e-3 lies 74% of the way from 0.99609 to 1.0; -1.001 lies 13% of the way from -1.0 to -1.0078.
    # Nearest rounding leaves both at +-1.0 (errors of 1e-3); the mean of 32 x 1024 stochastic roundings
    # has a standard deviation of about 1e-5 (+1 side) and 2e-5 (-1 side).
    monkeypatch.setattr(kernels_optim, "BLOCK", 2048)  # one program per call
    start = torch.cat([torch.ones(1024), -torch.ones(1024)])
    grad = torch.ones(2048)
    options = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    target, _ = torch_adamw(start, [grad], lr=1e-3, betas=(0.9, 0.999), eps=1e-8)  # the fp32 result
    results = []
    for seed in range(32):
        p = start.bfloat16()
        kernels_optim.adamw_update_triton_(p, grad, torch.zeros(2048), torch.zeros(2048), seed=seed, **options)
        results.append(p.float())
    results = torch.stack(results)  # (seeds, 2048)
    down, up = _neighbours(target)
    assert torch.all((results == down) | (results == up))
    for half in (slice(0, 1024), slice(1024, 2048)):
        value = target[half][0].item()
        assert abs(results[:, half].double().mean().item() - value) < 1e-4
        fraction_away = (value - down[half][0].item()) / (up[half][0].item() - down[half][0].item())
        assert (results[:, half] == up[half]).float().mean().item() == pytest.approx(fraction_away, abs=0.02)
    assert not torch.equal(results[0], results[1])  # each seed draws its own noise


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_bf16_rounding_is_deterministic_for_a_seed(name):
    def step(seed: int) -> torch.Tensor:
        p = torch.randn(40, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
        grad = torch.randn(40, 64, generator=torch.Generator().manual_seed(1))
        if name == "adamw":
            kernels_optim.adamw_update_triton_(p, grad, torch.zeros(40, 64), torch.zeros(40, 64), lr=1e-3, beta1=0.9,
                                               beta2=0.999, eps=1e-8, weight_decay=0.0, step=1, seed=seed)
        else:
            row, col = torch.zeros(40), torch.zeros(64)
            kernels_optim.adafactor_update_triton_(p, grad, exp_avg_sq_row=row, exp_avg_sq_col=col, lr=1e-3, beta2=0.0,
                                                   eps1=1e-30, clip_threshold=1.0, beta1=None, weight_decay=0.0,
                                                   seed=seed)
        return p

    assert torch.equal(step(5), step(5))
    assert not torch.equal(step(5), step(6))


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_bf16_nan_and_inf_preserved(name):
    # no weight decay for Adafactor: its w += -wd * lr * w turns inf into NaN (inf - inf), in torch too
    options = dict(lr=1e-3, weight_decay=0.1 if name == "adamw" else 0.0)
    start = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    start[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    start[1, 7] = 3.3e38  # within a bf16 step of fp32's maximum
    grad = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    if name == "adamw":
        grad[2, 5] = float("nan")  # an AdamW NaN gradient poisons only its own weight
    exact, _ = oracle(name, start.bfloat16().float(), [grad], **options)
    result, _ = triton_steps(name, start.bfloat16(), [grad], seed=3, **options)
    result = result.float()
    assert torch.isnan(exact).sum() == (2 if name == "adamw" else 1)
    assert torch.equal(torch.isnan(result), torch.isnan(exact))
    infinite = torch.isinf(exact)
    assert infinite.sum() == 2
    assert torch.equal(result[infinite], exact[infinite])
    finite = torch.isfinite(exact)
    assert torch.all(within_one_bf16_step(result, exact) | ~finite)  # 3.3e38 may round up to inf, as documented


def test_fused_bf16_run_with_seed_is_reproducible(kernel_mode):
    def train() -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3)).bfloat16()
        fused = FusedBackwardStep(build_optimizer(model.parameters(), "adamw", lr=1e-3), seed=11)
        data = torch.Generator().manual_seed(1)
        for _ in range(2):
            x = torch.randn(5, 6, generator=data).bfloat16()
            model(x).float().square().mean().backward()
            fused.step()
        return [p.detach().clone() for p in model.parameters()]

    kernel_mode("triton")
    first, second = train(), train()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # the seed of each (step, parameter) differs: same run seed, another step or parameter
    assert len({optim.step_seed(11, step, index) for step in range(3) for index in range(4)}) == 12


# ---------------------------------------------------------------- which path runs


def test_dispatch_chooses_triton_only_where_it_applies(kernel_mode):
    p32, pbf16, grad = torch.zeros(4, 4), torch.zeros(4, 4, dtype=torch.bfloat16), torch.zeros(4, 4)
    moments = [torch.zeros(4, 4)]
    wanted = optim._triton_update_wanted
    kernel_mode("auto")  # CPU tensors: torch
    assert not wanted(p32, grad, moments, stochastic_rounding=True)
    kernel_mode("triton")
    assert wanted(p32, grad, moments, stochastic_rounding=True)
    assert wanted(pbf16, grad.bfloat16(), moments, stochastic_rounding=True)
    assert not wanted(pbf16, grad, moments, stochastic_rounding=False)  # nearest rounding: torch
    assert not wanted(p32.half(), grad, moments, stochastic_rounding=True)  # fp16 weights: torch
    assert not wanted(torch.zeros(4, 8)[:, ::2], grad, moments, stochastic_rounding=True)  # strided: torch
    conv = torch.zeros(300, 300, 3, 3)  # 90000 3x3 matrices: too many for the factored grid, torch
    assert wanted(conv, conv, [torch.zeros_like(conv)] * 2, stochastic_rounding=True)  # AdamW: element-wise
    row_and_col = [torch.zeros(300, 300, 3), torch.zeros(300, 300, 3)]
    assert not wanted(conv, conv, row_and_col, stochastic_rounding=True, factored=True)
    with pytest.raises(ValueError, match="contiguous"):
        kernels_optim.adamw_update_triton_(torch.zeros(4, 8)[:, ::2], grad, *moments * 2, lr=1e-3, beta1=0.9,
                                           beta2=0.999, eps=1e-8, weight_decay=0.0, step=1, seed=0)
