"""The kernel self-check (kernels.self_check) and the public hooks around the kernels, on CPU under
the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py): the same code "auto" mode runs on
CUDA, with the device as a parameter.

Broken kernels are injected by replacing a Triton kernel of kernels.py / kernels_optim.py (the
custom ops and update functions look their kernels up when they launch): one that computes the
wrong thing, one that fails to compile, and an optimizer update that rounds to nearest instead of
stochastically. Each must be replaced by its reference with one warning that names it; the others
stay fused.
"""
import warnings

import pytest
import torch
import torch.utils._python_dispatch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
import kernels_optim
from models import layers
from models.flux import Flux, FluxParams, img_ids, txt_ids

pytestmark = [
    pytest.mark.skipif(not kernels.HAVE_TRITON, reason="triton is not installed: no kernel to check"),
    pytest.mark.usefixtures("one_thread"),
]
triton, tl = kernels.triton, kernels.tl

MODEL_KERNELS = ["norm_modulate", "gated_residual", "gated_residual_norm_modulate", "qk_norm_rope", "gelu_tanh",
                 "geglu"]


@pytest.fixture(autouse=True)
def fresh_checks(monkeypatch):
    """No cached results from other tests; "auto" considers CPU tensors (through the interpreter)."""
    kernels.forget_self_checks()
    monkeypatch.setattr(layers, "AUTO_DEVICE_TYPES", ("cpu",))
    yield
    kernels.forget_self_checks()
    layers.set_kernels("torch")


class FusedOps(TorchDispatchMode):
    """Records the names of the `fused::` ops that run."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fused":
            self.names.add(func._schema.name.split("::")[-1])
        return func(*args, **(kwargs or {}))


# --- broken kernels ------------------------------------------------------------------------------


@triton.jit
def gelu_that_returns_its_input(
    x_ptr, sx_r, sx_c, dout_ptr, sd_r, sd_c, out_ptr, R, N,
    BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """_gelu_tanh_kernel's signature; writes x (forward) or dout (backward): wrong, but runs."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < R) & (cols[None, :] < N)
    if BACKWARD:
        value = kernels._load_tile(dout_ptr, rows, cols, sd_r, sd_c, mask)
    else:
        value = kernels._load_tile(x_ptr, rows, cols, sx_r, sx_c, mask)
    kernels._store_tile(out_ptr, rows, cols, N, value, mask)


@triton.jit
def norm_modulate_that_does_not_compile(
    x_ptr, sx_b, sx_l, sx_h, shift_ptr, sshift_b, sshift_h, scale_ptr, sscale_b, sscale_h, out_ptr, L, H, eps,
    BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    cols = tl.arange(0, 3)  # not a power of 2: a compile error (an InterpreterError on CPU)
    tl.store(out_ptr + cols, tl.load(x_ptr + cols))


@triton.jit
def store_weight_rounding_to_nearest(p_ptr, offsets, mask, weight, seed, STOCHASTIC_ROUND: tl.constexpr):
    """kernels_optim._store_weight without the stochastic rounding: bf16 weights round to nearest."""
    tl.store(p_ptr + offsets, weight.to(p_ptr.dtype.element_ty), mask=mask)


# --- the check itself ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_kernel_passes_as_it_is(dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("error", kernels.KernelSelfCheckWarning)
        results = kernels.self_check("cpu", dtype=dtype)
    assert results == {name: None for name in MODEL_KERNELS + ["adamw", "adafactor"]}


def test_a_wrong_kernel_is_replaced_with_one_warning_and_the_rest_stay_fused(monkeypatch):
    monkeypatch.setattr(kernels, "_gelu_tanh_kernel", gelu_that_returns_its_input)
    with pytest.warns(kernels.KernelSelfCheckWarning) as caught:
        results = kernels.self_check("cpu", dtype=torch.float32)
    assert [str(w.message) for w in caught] == [
        "fused kernel 'gelu_tanh' failed its self-check on cpu (float32) and is replaced by its torch reference: "
        + results["gelu_tanh"]
    ]
    assert results["gelu_tanh"].startswith("KernelMismatch: output 0 differs from the reference by up to")
    assert all(reason is None for name, reason in results.items() if name != "gelu_tanh")

    # what the model's entry points do with that, in "auto" mode: only gelu falls back
    layers.set_kernels("auto")
    x = torch.randn(2, 5, 40, requires_grad=True)
    vec = torch.randn(3, 2, 1, 40, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the result is cached: no second warning
        with FusedOps() as ops:
            out = layers.gelu_tanh(layers.norm_modulate(x, vec[0], vec[1]))
            out.sum().backward()
    assert ops.names == {"norm_modulate", "norm_modulate_backward"}
    expected = torch.nn.functional.gelu(kernels.norm_modulate_reference(x, vec[0], vec[1]), approximate="tanh")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_a_kernel_that_does_not_compile_is_replaced(monkeypatch):
    monkeypatch.setattr(kernels, "_norm_modulate_fwd_kernel", norm_modulate_that_does_not_compile)
    with pytest.warns(kernels.KernelSelfCheckWarning, match=r"^fused kernel 'norm_modulate' failed .*arange"):
        results = kernels.self_check("cpu", ["norm_modulate", "gated_residual"], dtype=torch.bfloat16)
    assert "must be a power of 2" in results["norm_modulate"] and results["gated_residual"] is None
    layers.set_kernels("auto")
    x = torch.randn(2, 5, 40, dtype=torch.bfloat16)
    shift, scale = torch.randn(2, 2, 1, 40, dtype=torch.bfloat16)
    assert not layers.use_fused("norm_modulate", x)
    assert layers.use_fused("gated_residual", x)
    torch.testing.assert_close(layers.norm_modulate(x, shift, scale), kernels.norm_modulate_reference(x, shift, scale))


def test_optimizer_rounding_to_nearest_fails_only_the_bf16_check(monkeypatch):
    monkeypatch.setattr(kernels_optim, "_store_weight", store_weight_rounding_to_nearest)
    fp32 = kernels.self_check("cpu", ["adamw", "adafactor"], dtype=torch.float32)
    assert fp32 == {"adamw": None, "adafactor": None}  # fp32 weights are not rounded: same results
    with pytest.warns(kernels.KernelSelfCheckWarning) as caught:
        bf16 = kernels.self_check("cpu", ["adamw", "adafactor"], dtype=torch.bfloat16)
    assert len(caught) == 2 and all("stochastic rounding is biased" in reason for reason in bf16.values())
    layers.set_kernels("auto")
    p = torch.zeros(4, 4, dtype=torch.bfloat16)
    assert not layers.use_fused_optimizer(p) and layers.use_fused_optimizer(p.float())


def test_a_wrong_optimizer_update_is_replaced_per_kernel(monkeypatch):
    """AdamW's update without its weight decay: only AdamW is replaced, Adafactor stays."""
    real_update = kernels_optim.adamw_update_triton_
    monkeypatch.setattr(kernels_optim, "adamw_update_triton_",
                        lambda *args, weight_decay, **kwargs: real_update(*args, weight_decay=0.0, **kwargs))
    layers.set_kernels("auto")
    p = torch.zeros(4, 4)
    with pytest.warns(kernels.KernelSelfCheckWarning, match=r"'adamw' failed .*fp32 weight \(19, 45\) after two"):
        assert not layers.use_fused("adamw", p)
    assert layers.use_fused("adafactor", p)
    assert not layers.use_fused_optimizer(p)  # optim.py's one switch for both


def test_the_check_runs_once_per_kernel_device_and_dtype(monkeypatch):
    calls = []
    monkeypatch.setitem(kernels.SELF_CHECKS, "gelu_tanh", lambda device, dtype: calls.append((device, dtype)))
    layers.set_kernels("auto")
    for _ in range(3):
        layers.gelu_tanh(torch.randn(4, 8))
        layers.gelu_tanh(torch.randn(4, 8, dtype=torch.bfloat16))
    assert calls == [(torch.device("cpu"), torch.float32), (torch.device("cpu"), torch.bfloat16)]
    with pytest.raises(ValueError, match=r"no self-check for kernels \['gelu'\]"):
        kernels.self_check("cpu", ["gelu"])


def test_no_check_under_a_dispatch_mode_or_outside_auto(monkeypatch):
    """Fake tensors or a memory tracker must not run (and cache) a check: the reference runs instead."""
    calls = []
    monkeypatch.setitem(kernels.SELF_CHECKS, "gelu_tanh", lambda device, dtype: calls.append(device))
    layers.set_kernels("auto")
    with FusedOps():
        assert not layers.use_fused("gelu_tanh", torch.randn(4, 8))
    assert calls == []
    assert layers.use_fused("gelu_tanh", torch.randn(4, 8)) and len(calls) == 1
    monkeypatch.setattr(layers, "AUTO_DEVICE_TYPES", ("cuda",))
    assert not layers.use_fused("gelu_tanh", torch.randn(4, 8))  # "auto" on CPU: torch
    with layers.using_kernels("triton"):
        assert layers.kernel_mode() == "triton" and layers.use_fused("geglu", torch.randn(4, 8))  # unchecked
    assert layers.kernel_mode() == "auto" and len(calls) == 1


# --- the public hooks ----------------------------------------------------------------------------


def tiny_flux() -> tuple[Flux, dict]:
    torch.manual_seed(0)
    params = FluxParams(in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=48, hidden_size=128,
                        num_heads=2, depth=2, depth_single_blocks=1, axes_dim=[8, 28, 28])
    inputs = dict(img=torch.randn(1, 16, 16), img_ids=img_ids(1, 8, 8), txt=torch.randn(1, 7, 48),
                  txt_ids=txt_ids(1, 7), timesteps=torch.tensor([0.3]), y=torch.randn(1, 32),
                  guidance=torch.tensor([3.5]))
    return Flux(params).eval(), inputs


def test_attention_impl_routes_every_model_attention():
    model, inputs = tiny_flux()
    with torch.no_grad():
        expected = model(**inputs)
        seen = []

        def doubled_values(q, k, v, mask):
            seen.append(tuple(q.shape))
            return layers.attention(q, k, 2 * v, mask)  # plain SDPA inside the route

        with layers.attention_impl(doubled_values):
            routed = model(**inputs)
            with layers.attention_impl(None):  # nested: plain again
                torch.testing.assert_close(model(**inputs), expected, rtol=0, atol=0)
        again = model(**inputs)
    assert seen == [(1, 2, 7 + 16, 64)] * 3  # 2 double blocks and 1 single block, over [txt, img]
    assert (routed - expected).abs().max() > 1e-3
    torch.testing.assert_close(again, expected, rtol=0, atol=0)  # restored on exit


class RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    """The names of the operators that run while active."""

    def __enter__(self):
        self.names = set()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


def test_launches_skipped_runs_the_host_code_only():
    p, grad = torch.randn(19, 45), torch.randn(19, 45)
    moments = dict(exp_avg_sq_row=torch.zeros(19), exp_avg_sq_col=torch.zeros(45))
    options = dict(lr=1e-2, beta2=0.5, eps1=1e-30, clip_threshold=1.0, beta1=None, weight_decay=0.0, seed=0)
    before = p.clone()
    with kernels_optim.launches_skipped():
        with RecordOps() as ops:
            kernels_optim.adafactor_update_triton_(p, grad, **moments, **options)
        assert torch.equal(p, before)  # no kernel ran
        # the torch work between launches did (on buffers no kernel filled: their values are whatever
        # memory held, so the check is on what ran, not on what came out)
        assert {"aten.sum.dim_IntList", "aten.mul_.Tensor", "aten.add_.Tensor"} <= ops.names
        with pytest.raises(ValueError, match="contiguous"):  # and so do the checks
            kernels_optim.adamw_update_triton_(p[:, ::2], grad[:, ::2], *[torch.zeros(19, 23)] * 2, lr=1e-3,
                                               beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1, seed=0)
        with torch.device("meta"):  # as the memory plan runs it
            meta = torch.empty(64, 64)
            kernels_optim.adamw_update_triton_(meta, meta, torch.zeros(64, 64), torch.zeros(64, 64), lr=1e-3,
                                               beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1, seed=0)
    kernels_optim.adafactor_update_triton_(p, grad, **moments, **options)
    assert not torch.equal(p, before)  # launches again outside
