"""kernels.py on CPU under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
kernels.py is imported), against formulations written independently of kernels.py and
models/layers.py: F.layer_norm with the modulation as its affine weight and bias, torch.addcmul,
an explicit tanh formula for GELU, the erf formula for GEGLU, F.rms_norm and a complex-number RoPE
whose angles come from the positions (not from the rotation table the kernel reads).

Every kernel: outputs and gradients w.r.t. every input, fp32 and bf16, sizes that are not
multiples of the block sizes, strided inputs and upstream gradients, several programs per
reduction (and, with small tiles, several tiles per program). The torch references in kernels.py
(what "auto" falls back to) are checked against the same formulations and, bit for bit, against the
torch paths of models/layers.py. Then the custom-op plumbing (opcheck, FakeTensorMode,
torch.compile) and a tiny FLUX model with Triton vs torch. Without triton only the tests of the
references run; the rest are skipped with that reason.
"""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from models import layers
from models.flux import Flux, FluxParams, img_ids, txt_ids
from models.layers import EmbedND

needs_triton = pytest.mark.skipif(not kernels.HAVE_TRITON, reason="triton is not installed: no kernel to test")

# Kernel results (in the test dtype) vs the fp32 formulation run on the same rounded inputs:
# |result - reference| <= atol * max(1, max|reference|) + rtol * |reference|, element-wise.
# bf16 allows a few bf16 ulps (2**-8 relative each): results are rounded once at the end, and
# qk_norm_rope also after the norm and after the scale (as layers.py). atol scales with
# the tensor's largest value because token sums (dgate, dscale) cancel: their error follows the size
# of the summed terms, not of the sum.
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def assert_close(result, reference, dtype, what):
    atol = TOLERANCE[dtype]["atol"] * max(1.0, reference.abs().max().item())
    rtol = TOLERANCE[dtype]["rtol"]
    torch.testing.assert_close(result.float(), reference, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")

B, L, H = 2, 37, 80  # 37 tokens, 80 channels: neither is a multiple of any block size
HEADS, HEAD_DIM = 3, 24  # 12 rotation pairs in a block of 16


@pytest.fixture(params=["fp32", "bf16-strided", "fp32-strided-small-tiles"])
def variant(request, monkeypatch):
    """(dtype, strided). Small tiles: 4-row tiles, 3 reduction programs per sample that loop over
    several tiles (the last one partly past the end), one head per qk program."""
    if request.param.endswith("small-tiles"):
        monkeypatch.setattr(kernels, "TILE_ELEMENTS", 512)
        monkeypatch.setattr(kernels, "REDUCTION_PROGRAMS", 6)
        monkeypatch.setattr(kernels, "QK_HEADS_PER_PROGRAM", 1)
    dtype = torch.bfloat16 if request.param.startswith("bf16") else torch.float32
    return dtype, "strided" in request.param


def tokens(strided: bool, *shape) -> torch.Tensor:
    """A (B, L, W) tensor; strided: a transposed view (last-dim stride L) of a (B, W, L) leaf."""
    if not strided:
        return torch.randn(shape)
    return torch.randn(shape[0], shape[2], shape[1]).transpose(1, 2)


def per_sample(strided: bool) -> torch.Tensor:
    """A (B, 1, H) modulation vector; strided: every other element of a (B, 2H) row."""
    if not strided:
        return torch.randn(B, 1, H)
    return torch.randn(B, 2 * H)[:, ::2][:, None, :]


def compare(fused, reference, inputs, dtype, strided, constants=()):
    """Run fused on the inputs in `dtype` and reference on fp32 copies of the same rounded values;
    compare outputs and the gradients w.r.t. every input for random (strided) upstream gradients."""
    test_inputs = [t.to(dtype).requires_grad_() for t in inputs]  # .to keeps a strided layout
    fp32_inputs = [t.detach().float().requires_grad_() for t in test_inputs]
    outputs = fused(*test_inputs, *constants)
    expected = reference(*fp32_inputs, *constants)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    upstream = [(tokens(strided, *o.shape) if o.ndim == 3 else torch.randn(o.shape)).to(dtype) for o in outputs]
    grads = torch.autograd.grad(outputs, test_inputs, upstream)
    expected_grads = torch.autograd.grad(expected, fp32_inputs, [u.float() for u in upstream])
    for i, (out, exp) in enumerate(zip(outputs, expected)):
        assert out.dtype == dtype and out.shape == exp.shape
        assert_close(out, exp, dtype, f"output {i}")
    for i, (grad, exp) in enumerate(zip(grads, expected_grads)):
        assert grad.dtype == dtype and grad.shape == exp.shape, f"gradient of input {i}"
        assert_close(grad, exp, dtype, f"gradient of input {i}")


# --- independent formulations ---------------------------------------------------------------------
AXES_DIM, THETA = [4, 10, 10], 10_000  # the RoPE axes of HEAD_DIM = 24


def layer_norm_affine(x, shift, scale, eps=1e-6):
    """(1 + scale) * LN(x) + shift as LayerNorm's own affine transform, one sample at a time:
    F.layer_norm(x[b], weight=1 + scale[b], bias=shift[b])."""
    width = x.shape[-1:]
    return torch.stack([F.layer_norm(x[b], width, 1 + scale[b, 0], shift[b, 0], eps) for b in range(len(x))])


def residual_addcmul(x, gate, y):
    return torch.addcmul(x, gate, y)


def residual_then_layer_norm_affine(x, gate, y, shift, scale):
    h = torch.addcmul(x, gate, y)
    return h, layer_norm_affine(h, shift, scale)


def gelu_tanh_formula(x):
    """GELU's tanh approximation written out (Hendrycks and Gimpel, eq. in section 2)."""
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def geglu_erf_formula(x):
    """[a | b] -> a * b * Phi(b), Phi the normal CDF through erf."""
    a, b = x.chunk(2, dim=-1)
    return a * b * 0.5 * (1 + torch.erf(b / math.sqrt(2)))


def complex_rope(x, ids):
    """Rotate each pair (x[2i], x[2i+1]) as the complex number x[2i] + j x[2i+1] times e^(j angle),
    the angle of each pair from the positions: axis a, pair i of that axis -> pos_a * THETA^(-2i/dim_a)."""
    angles = []
    for axis, dim in enumerate(AXES_DIM):
        omega = THETA ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append(ids[..., axis : axis + 1].double() * omega)  # (B, L, dim/2)
    rotation = torch.polar(torch.ones(()), torch.cat(angles, -1).float())[:, None]  # (B, 1, L, D/2)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * rotation).flatten(-2)


def qk_rms_norm_complex_rope(q, k, q_scale, k_scale, ids):
    """F.rms_norm with the learned scale as its weight, then the complex rotation."""
    norm = lambda x, scale: F.rms_norm(x, x.shape[-1:], scale, 1e-6)  # noqa: E731
    return complex_rope(norm(q, q_scale), ids), complex_rope(norm(k, k_scale), ids)


def rope_ids(tokens: int) -> torch.Tensor:
    """Random 3-axis positions (B, L, 3), as the model's ids (whole numbers)."""
    return torch.randint(0, 50, (B, tokens, 3)).float()


def rope_table(ids: torch.Tensor) -> torch.Tensor:
    """pe (B, 1, L, D/2, 2, 2), as the model builds it."""
    return EmbedND(HEAD_DIM, THETA, AXES_DIM)(ids)


# --- each kernel -----------------------------------------------------------------------------------


@needs_triton
def test_norm_modulate(variant):
    dtype, strided = variant
    inputs = [tokens(strided, B, L, H), per_sample(strided), per_sample(strided)]
    compare(kernels.norm_modulate, layer_norm_affine, inputs, dtype, strided)


@needs_triton
def test_gated_residual(variant):
    dtype, strided = variant
    inputs = [tokens(strided, B, L, H), per_sample(strided), tokens(strided, B, L, H)]
    compare(kernels.gated_residual, residual_addcmul, inputs, dtype, strided)


@needs_triton
def test_gated_residual_norm_modulate(variant):
    dtype, strided = variant
    x, y = tokens(strided, B, L, H), tokens(strided, B, L, H)
    inputs = [x, per_sample(strided), y, per_sample(strided), per_sample(strided)]
    compare(kernels.gated_residual_norm_modulate, residual_then_layer_norm_affine, inputs, dtype, strided)


@needs_triton
def test_qk_norm_rope(variant):
    dtype, strided = variant
    L = 21  # two programs of 16 tokens per sample
    if strided:  # as in the model: q and k are views into the fused qkv Linear output
        qkv = torch.randn(B, L, 3 * HEADS * HEAD_DIM)
        q, k, _ = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=HEADS)
    else:
        q, k = torch.randn(2, B, HEADS, L, HEAD_DIM).unbind(0)
    ids = rope_ids(L + 5)
    pe = rope_table(ids)[:, :, 5:]  # a token slice of a longer table, as in the double block
    inputs = [q, k, 1 + 0.1 * torch.randn(HEAD_DIM), 1 + 0.1 * torch.randn(HEAD_DIM)]
    compare(lambda *qk: kernels.qk_norm_rope(*qk, pe), lambda *qk: qk_rms_norm_complex_rope(*qk, ids[:, 5:]),
            inputs, dtype, strided)


@needs_triton
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # sigmoid(-inf) = 0: tanh saturates
def test_gelu_tanh(variant):
    dtype, strided = variant
    x = 3 * tokens(strided, B, L, 2 * H)  # wide range: both tails of the tanh
    compare(kernels.gelu_tanh, gelu_tanh_formula, [x], dtype, strided)


@needs_triton
def test_geglu(variant):
    dtype, strided = variant
    if strided:  # a column slice: rows are strided, the last dim is contiguous
        x = 3 * torch.randn(B, L, 2 * H + 6)[..., 3:-3]
    else:
        x = 3 * torch.randn(B, L, 2 * H)
    compare(kernels.geglu, geglu_erf_formula, [x], dtype, strided)


# --- the torch references ("auto" falls back to them; without triton they are all that runs) -------


def test_references_match_the_independent_formulations():
    """fp32, outputs and gradients: kernels.py's references (so models/layers.py's torch paths, next
    test) against the formulations above. Runs with or without triton."""
    ids = rope_ids(L)
    cases = [
        (kernels.norm_modulate_reference, layer_norm_affine, "tss"),
        (kernels.gated_residual_reference, residual_addcmul, "tst"),
        (kernels.gated_residual_norm_modulate_reference, residual_then_layer_norm_affine, "tstss"),
        (kernels.gelu_tanh_reference, gelu_tanh_formula, "t"),
        (kernels.geglu_reference, geglu_erf_formula, "t"),
        (lambda *qk: kernels.qk_norm_rope_reference(*qk, rope_table(ids)),
         lambda *qk: qk_rms_norm_complex_rope(*qk, ids), "qqdd"),
    ]  # fmt: skip
    shapes = {"t": (B, L, H), "s": (B, 1, H), "q": (B, HEADS, L, HEAD_DIM), "d": (HEAD_DIM,)}
    for reference, independent, letters in cases:
        inputs = [3 * torch.randn(shapes[c]) for c in letters]
        compare(reference, independent, inputs, torch.float32, strided=False)


def test_references_match_models_layers():
    """kernels.py's references are the torch paths of models/layers.py (bit for bit, bf16)."""
    layers.set_kernels("torch")
    bf16 = dict(dtype=torch.bfloat16)
    x, y = torch.randn(B, L, H, **bf16), torch.randn(B, L, H, **bf16)
    shift, scale, gate = torch.randn(3, B, 1, H, **bf16).unbind(0)
    assert torch.equal(layers.norm_modulate(x, shift, scale), kernels.norm_modulate_reference(x, shift, scale))
    assert torch.equal(layers.gated_residual(x, gate, y), kernels.gated_residual_reference(x, gate, y))
    for a, b in zip(
        layers.gated_residual_norm_modulate(x, gate, y, shift, scale),
        kernels.gated_residual_norm_modulate_reference(x, gate, y, shift, scale),
    ):
        assert torch.equal(a, b)
    assert torch.equal(layers.gelu_tanh(x), kernels.gelu_tanh_reference(x))
    assert torch.equal(layers.geglu(x), kernels.geglu_reference(x))
    q, k = torch.randn(2, B, HEADS, L, HEAD_DIM, **bf16).unbind(0)
    scales = torch.randn(2, HEAD_DIM, **bf16).unbind(0)
    pe = rope_table(rope_ids(L))
    for a, b in zip(layers.qk_norm_rope(q, k, *scales, pe), kernels.qk_norm_rope_reference(q, k, *scales, pe)):
        assert torch.equal(a, b)


# --- custom-op plumbing --------------------------------------------------------------------------


def op_cases():
    x, y = torch.randn(2, 5, 24, requires_grad=True), torch.randn(2, 5, 24, requires_grad=True)
    v = [torch.randn(2, 1, 24, requires_grad=True) for _ in range(3)]
    q, k = torch.randn(2, 2, 2, 5, 8, requires_grad=True).unbind(0)
    scales = [torch.randn(8, requires_grad=True) for _ in range(2)]
    pe = torch.randn(2, 1, 5, 4, 2, 2)
    return [
        (kernels._norm_modulate, (x, v[0], v[1], 1e-6)),
        (kernels._gated_residual, (x, v[0], y)),
        (kernels._gated_residual_norm_modulate, (x, v[0], y, v[1], v[2], 1e-6)),
        (kernels._qk_norm_rope, (q, k, *scales, pe, 1e-6)),
        (kernels._gelu_tanh, (x,)),
        (kernels._geglu, (x,)),
    ]


@needs_triton
def test_fake_tensor_mode_runs_every_op_forward_and_backward():
    """The fake implementations of all forward and backward ops agree with the real ones on output
    shapes, dtypes and strides (what torch.compile and memory planning rely on)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for op, args in op_cases():
        real_out = op(*args)
        real_out = real_out if isinstance(real_out, tuple) else (real_out,)
        needs_grad = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        real_grads = torch.autograd.grad(real_out, needs_grad, [torch.ones_like(o) for o in real_out])
        with FakeTensorMode() as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake_out = op(*fake_args)
            fake_out = fake_out if isinstance(fake_out, tuple) else (fake_out,)
            fake_needs_grad = [a for a in fake_args if isinstance(a, torch.Tensor) and a.requires_grad]
            fake_grads = torch.autograd.grad(fake_out, fake_needs_grad, [torch.ones_like(o) for o in fake_out])
        for real, fake in zip(real_out + real_grads, fake_out + fake_grads):
            assert (real.shape, real.dtype, real.stride()) == (fake.shape, fake.dtype, fake.stride()), op


@needs_triton
def test_fake_tensor_mode_at_flux_shapes():
    """Shapes, dtypes and devices come out right without running anything (fake CUDA tensors
    forward; fake CPU tensors through backward, as autograd needs a device guard for CUDA)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(1, 4096, 3072, dtype=torch.bfloat16, device="cuda")
        vec = torch.empty(1, 1, 3072, dtype=torch.bfloat16, device="cuda")
        h, out = kernels.gated_residual_norm_modulate(x, vec, x, vec, vec)
        assert out.shape == h.shape == x.shape and out.device.type == "cuda" and out.dtype == torch.bfloat16
        qkv = torch.empty(1, 4096, 3 * 3072, dtype=torch.bfloat16, requires_grad=True)
        q, k, _ = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=24)
        scale = torch.empty(128, dtype=torch.bfloat16, requires_grad=True)
        q_out, k_out = kernels.qk_norm_rope(q, k, scale, scale, torch.empty(1, 1, 4096, 64, 2, 2))
        (q_out.sum() + k_out.sum()).backward()
        assert q_out.shape == (1, 24, 4096, 128) and qkv.grad.shape == qkv.shape and scale.grad.shape == (128,)


@needs_triton
def test_torch_compile_fullgraph():
    def chain(x, shift, scale, gate, y):
        h, normed = kernels.gated_residual_norm_modulate(x, gate, y, shift, scale)
        return kernels.gated_residual(h, gate, kernels.gelu_tanh(normed)).square().mean()

    inputs = [t.requires_grad_() for t in (torch.randn(2, 7, 24), *torch.randn(3, 2, 1, 24), torch.randn(2, 7, 24))]
    compiled = torch.compile(chain, backend="aot_eager", fullgraph=True)
    loss, expected = compiled(*inputs), chain(*inputs)
    torch.testing.assert_close(loss, expected)
    for a, b in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(expected, inputs)):
        torch.testing.assert_close(a, b)


@needs_triton
def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.gelu_tanh(torch.randn(4, 8))


def test_importable_without_triton():
    """Without triton, kernels.py imports and runs its torch references (checked against LayerNorm's
    affine form). Runs in a subprocess, so also where triton is installed."""
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch, kernels\n"
        "import torch.nn.functional as F\n"
        "assert not kernels.HAVE_TRITON\n"
        "x = torch.randn(2, 3, 8); v = torch.randn(2, 1, 8)\n"
        "expected = torch.stack([F.layer_norm(x[b], (8,), 1 + v[b, 0], v[b, 0], 1e-6) for b in range(2)])\n"
        "torch.testing.assert_close(kernels.norm_modulate(x, v, v), expected)\n"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# --- a tiny FLUX model ---------------------------------------------------------------------------


class OpRecorder(TorchDispatchMode):
    """Records the names of the `fused::` ops that run."""

    def __init__(self):
        super().__init__()
        self.fused = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fused":
            self.fused.add(func._schema.name.split("::")[-1])
        return func(*args, **(kwargs or {}))



@needs_triton
def test_tiny_flux_same_loss_and_gradients_with_triton():
    torch.manual_seed(0)
    params = FluxParams(
        in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=48, hidden_size=128, num_heads=2,
        depth=1, depth_single_blocks=1, axes_dim=[8, 28, 28],
    )  # fmt: skip
    model = Flux(params)
    for p in model.parameters():  # random non-trivial weights everywhere (zero-init layers included)
        torch.nn.init.normal_(p, std=0.05)
    img = torch.randn(2, 16, 16)  # 4 x 4 latent patches -> 16 image tokens
    txt = torch.randn(2, 7, 48)
    inputs = dict(
        img=img, img_ids=img_ids(2, 8, 8), txt=txt, txt_ids=txt_ids(2, 7), timesteps=torch.tensor([0.3, 0.8]),
        y=torch.randn(2, 32), guidance=torch.tensor([3.5, 3.5]),
    )  # fmt: skip
    target = torch.randn(2, 16, 16)

    def loss_and_grads(mode):
        layers.set_kernels(mode)
        try:
            model.zero_grad()
            loss = (model(**inputs) - target).square().mean()
            loss.backward()
        finally:
            layers.set_kernels("torch")
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_torch, grads_torch = loss_and_grads("torch")
    with OpRecorder() as recorder:
        loss_triton, grads_triton = loss_and_grads("triton")
    fused_ops = {"norm_modulate", "qk_norm_rope", "gated_residual", "gated_residual_norm_modulate", "gelu_tanh"}
    assert recorder.fused >= fused_ops | {f"{name}_backward" for name in fused_ops}
    torch.testing.assert_close(loss_triton, loss_torch, atol=1e-6, rtol=1e-5)
    for name, grad in grads_torch.items():
        torch.testing.assert_close(grads_triton[name], grad, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")


# --- bench/kernels.py's traffic counter ----------------------------------------------------------


@needs_triton
def test_traffic_counter_counts_what_a_fused_op_reads_and_writes():
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("bench_kernels", Path(__file__).resolve().parents[1] / "bench" / "kernels.py")
    bench = module_from_spec(spec)
    spec.loader.exec_module(bench)
    x, gate, y = bench.meta(2, 5, 8), bench.meta(2, 1, 8), bench.meta(2, 5, 8)
    fused_forward, fused_backward = bench.count_chain(layers.gated_residual, [x, gate, y], "triton")
    assert fused_forward == 2 * (2 * 5 * 8 * 3 + 2 * 8)  # bf16: read x, y and gate, write x + gate * y
    eager_forward, eager_backward = bench.count_chain(layers.gated_residual, [x, gate, y], "torch")
    assert eager_forward == 2 * (2 * 5 * 8 * 5 + 2 * 8)  # gate * y (read 2, write 1), then x + that
    assert 0 < fused_backward < eager_backward
