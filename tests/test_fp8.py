"""fp8 storage of frozen Linear weights on a tiny FLUX: error, bytes, LoRA on top, loading
released fp8 files (plain, ComfyUI scaled_fp8, weight_scale + comfy_quant)."""
import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fp8 import (
    FP8,
    Fp8Linear,
    dequantize_weight,
    fp8_weight_bytes,
    quantize_linears_,
    quantize_weight,
)
from activations import checkpoint_blocks
from families.flux import FAMILY as FLUX
from families.flux import lora_targets as flux_lora_targets
from lora import LoRANetwork
from models.flux import Flux, FluxParams, img_ids, txt_ids
from models.loading import load_state_dict

PARAMS = FluxParams(
    in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=48, hidden_size=64,
    num_heads=2, depth=4, depth_single_blocks=6, axes_dim=[4, 14, 14],
)
# Measured with relative_error(fp8 model, bf16 model) on frozen_flux(seed), make_batch(seed),
# seeds 0-2: 0.79-1.01 % per tensor, 0.82-1.08 % per row; bf16 vs fp32 on the same model is
# 0.69-0.82 %. (Random init: block outputs enter through small gates, which keeps this low.)
OUTPUT_ERROR_BOUND = 0.03


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def blocks(model: Flux) -> list[nn.Module]:
    return [b for group in FLUX.blocks(model).values() for b in group]


def load_flux_fp8(sd: dict, dtype=torch.bfloat16, per_row: bool = False, **overrides) -> Flux:
    """The family's loader with fp8_base on, as train.py calls it."""
    cfg = {"fp8_base": True, "fp8_per_row": per_row, "model_overrides": overrides}
    return FLUX.load(sd, cfg, dtype=dtype)


def frozen_flux(seed=0, dtype=torch.bfloat16) -> Flux:
    torch.manual_seed(seed)
    return Flux(PARAMS).to(dtype).requires_grad_(False)


def make_batch(seed=0, dtype=torch.bfloat16) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        img=torch.randn(1, 16, 16, generator=g).to(dtype),
        img_ids=img_ids(1, 8, 8),
        txt=torch.randn(1, 8, 48, generator=g).to(dtype),
        txt_ids=txt_ids(1, 8),
        timesteps=torch.rand(1, generator=g),
        y=torch.randn(1, 32, generator=g).to(dtype),
        guidance=torch.full((1,), 3.5),
    )


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x.float() - reference.float()).norm() / reference.float().norm()).item()


@pytest.mark.parametrize("per_row", [False, True])
def test_quantize_rounds_each_weight_to_nearest_fp8(per_row):
    weight = torch.randn(96, 64) * torch.logspace(-3, 0, 96)[:, None]  # rows of very different size
    weight_fp8, scale = quantize_weight(weight, per_row)
    assert weight_fp8.dtype == FP8 and scale.dtype == torch.float32
    assert scale.shape == ((96, 1) if per_row else ())
    error = (dequantize_weight(weight_fp8, scale, torch.float32) - weight).abs()
    # e4m3: 3 mantissa bits -> half an ulp is 2^-4 of the value; subnormal steps are 2^-9 * scale
    bound = torch.maximum(weight.abs() * 2**-4, 2**-10 * scale.expand_as(weight)) * (1 + 1e-6)
    assert (error <= bound).all()


@pytest.mark.parametrize("per_row", [False, True])
def test_dequantize_in_blocks_of_rows_is_the_one_product(per_row, monkeypatch):
    """Upcasting a few rows at a time (no fp32 copy of the whole weight) gives the same numbers."""
    import fp8

    weight_fp8, scale = quantize_weight(torch.randn(100, 48) * torch.logspace(-2, 0, 100)[:, None], per_row)
    monkeypatch.setattr(fp8, "DEQUANTIZE_ELEMENTS", 32 * 48)  # 100 rows of 48 -> 32, 32, 32, 4
    for dtype in (torch.bfloat16, torch.float32):
        assert torch.equal(dequantize_weight(weight_fp8, scale, dtype), (weight_fp8.float() * scale).to(dtype))


@pytest.mark.parametrize("per_row", [False, True])
def test_fp8_flux_output_stays_close_to_bf16(per_row):
    model = frozen_flux()
    quantized = copy.deepcopy(model)
    names = quantize_linears_(quantized, blocks(quantized), per_row=per_row)
    assert len(names) == 4 * 10 + 6 * 3  # every Linear of every block, nothing outside them
    assert all(n.split(".")[0] in ("double_blocks", "single_blocks") for n in names)
    batch = make_batch()
    error = relative_error(quantized(**batch), model(**batch))
    assert 0 < error < OUTPUT_ERROR_BOUND


@pytest.mark.parametrize("per_row", [False, True])
def test_stored_bytes_halve(per_row):
    model = frozen_flux()
    quantized = copy.deepcopy(model)
    names = quantize_linears_(quantized, blocks(quantized), per_row=per_row)
    bf16 = sum(model.get_submodule(n).weight.untyped_storage().nbytes() for n in names)
    fp8 = sum(quantized.get_submodule(n).weight.untyped_storage().nbytes() for n in names)
    assert fp8 * 2 == bf16
    scale_bytes = sum(4 * (quantized.get_submodule(n).out_features if per_row else 1) for n in names)
    assert fp8_weight_bytes(quantized) == {"fp8_weights": fp8, "scales": scale_bytes}


def dequantized_copy(model: Flux) -> Flux:
    """The same model with each Fp8Linear replaced by an nn.Linear holding its dequantized weight."""
    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        if isinstance(module, Fp8Linear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight = nn.Parameter(dequantize_weight(module.weight, module.weight_scale, torch.float32), False)
            linear.bias = module.bias
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent), child, linear)
    return plain


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_trains_on_an_fp8_base(checkpointing):
    quantized = frozen_flux(dtype=torch.float32)
    quantize_linears_(quantized, blocks(quantized))
    plain = dequantized_copy(quantized)
    grads = []
    for model in (quantized, plain):
        checkpoint_blocks(blocks(model), checkpointing)
        torch.manual_seed(1)
        network = LoRANetwork.inject(model, flux_lora_targets(model, rank=4))
        for lora in network.loras.values():
            nn.init.normal_(lora.lora_up.weight, std=0.05)
        model(**make_batch(dtype=torch.float32)).square().mean().backward()
        grads.append([p.grad for p in network.parameters()])
    assert all(g is not None and g.abs().sum() > 0 for g in grads[0])  # through every fp8 Linear
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)  # fp8 backward = dequantized
    for module in quantized.modules():
        if isinstance(module, Fp8Linear):
            assert module.weight.grad is None and not module.weight.requires_grad


def test_fp8_linear_backward_to_input_and_bias():
    torch.manual_seed(0)
    linear = nn.Linear(24, 40).requires_grad_(False)
    fp8 = Fp8Linear.from_linear(linear, per_row=True)
    fp8.bias.requires_grad_(True)
    reference = nn.Linear(24, 40)
    reference.weight = nn.Parameter(dequantize_weight(fp8.weight, fp8.weight_scale, torch.float32), False)
    reference.bias = nn.Parameter(fp8.bias.detach().clone())
    x = torch.randn(2, 5, 24, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, out_ref = fp8(x), reference(x_ref)
    assert torch.equal(out, out_ref)  # forward: the same F.linear on the same weight
    grad = torch.randn_like(out)
    out.backward(grad)
    out_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(fp8.bias.grad, reference.bias.grad)


def released_state_dict(model: Flux, style: str) -> dict:
    """The model's weights as an fp8 file in the wild stores them (block Linears in fp8)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    prefix = ""
    for kind in FLUX.blocks(model):
        for name, module in getattr(model, kind).named_modules():
            if not isinstance(module, nn.Linear):
                continue
            key = f"{kind}.{name}"
            if style == "plain":  # cast to fp8, no scale (scale 1)
                sd[f"{key}.weight"] = module.weight.to(FP8)
                continue
            weight_fp8, scale = quantize_weight(module.weight, per_row=style == "per_row")
            sd[f"{key}.weight"] = weight_fp8
            if style == "comfy_scaled":  # legacy ComfyUI: scale_weight, scale_input, a marker
                sd[f"{key}.scale_weight"], sd[f"{key}.scale_input"] = scale, torch.ones(())
            else:  # weight_scale (per row as (out,)), input_scale, per-layer comfy_quant JSON
                sd[f"{key}.weight_scale"], sd[f"{key}.input_scale"] = scale.flatten(), torch.ones(())
                conf = json.dumps({"format": "float8_e4m3fn"}).encode()
                sd[f"{key}.comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
    if style == "comfy_scaled":
        sd["scaled_fp8"] = torch.zeros(2).to(FP8)
        prefix = "model.diffusion_model."  # as in a full ComfyUI checkpoint
    return {prefix + k: v for k, v in sd.items()}


@pytest.mark.parametrize("style", ["plain", "comfy_scaled", "weight_scale", "per_row"])
def test_released_fp8_files_load(style, tmp_path):
    model = frozen_flux()
    path = tmp_path / "flux_fp8.safetensors"
    save_file(released_state_dict(model, style), str(path))
    loaded = load_flux_fp8(load_state_dict(path), dtype=torch.bfloat16, axes_dim=PARAMS.axes_dim)

    if style == "plain":  # expected: the bf16 model with its block weights rounded to fp8
        expected = copy.deepcopy(model)
        for kind in FLUX.blocks(model):
            for module in getattr(expected, kind).modules():
                if isinstance(module, nn.Linear):
                    module.weight.data = module.weight.to(FP8).to(torch.bfloat16)
    else:  # expected: the same model quantized here
        expected = copy.deepcopy(model)
        quantize_linears_(expected, blocks(expected), per_row=style == "per_row")
    fp8_linears = [m for m in loaded.modules() if isinstance(m, Fp8Linear)]
    assert len(fp8_linears) == 4 * 10 + 6 * 3
    assert all(m.weight_scale.shape == ((m.out_features, 1) if style == "per_row" else ()) for m in fp8_linears)
    assert loaded.img_in.weight.dtype == torch.bfloat16
    batch = make_batch()
    assert torch.equal(loaded(**batch), expected(**batch))


def test_full_precision_file_is_quantized_at_load():
    model = frozen_flux()
    loaded = load_flux_fp8(model.state_dict(), per_row=True, axes_dim=PARAMS.axes_dim)
    expected = copy.deepcopy(model)
    quantize_linears_(expected, blocks(expected), per_row=True)
    batch = make_batch()
    assert torch.equal(loaded(**batch), expected(**batch))


def test_clear_errors():
    sd = released_state_dict(frozen_flux(), "weight_scale")
    key = next(k for k in sd if k.endswith(".comfy_quant"))
    sd[key] = torch.tensor(list(json.dumps({"format": "int8_tensorwise"}).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="int8_tensorwise"):
        load_flux_fp8(sd, axes_dim=PARAMS.axes_dim)
    sd = released_state_dict(frozen_flux(), "weight_scale")
    sd["single_blocks.0.linear2.weight_scale"] = torch.ones(64, 4)  # block-wise
    with pytest.raises(ValueError, match="block-wise"):
        load_flux_fp8(sd, axes_dim=PARAMS.axes_dim)
    unfrozen = Flux(PARAMS)
    with pytest.raises(ValueError, match="frozen"):
        quantize_linears_(unfrozen, blocks(unfrozen))  # weights still require grad
    model = frozen_flux()
    LoRANetwork.inject(model, flux_lora_targets(model, rank=2))
    with pytest.raises(RuntimeError, match="before adding LoRA"):
        quantize_linears_(model, blocks(model))
