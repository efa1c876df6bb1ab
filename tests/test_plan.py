"""The memory plan (plan.py): its accounting against the bytes the CPU allocator actually
hands out, weight bytes against parameter counts, block swap, the fused step, and the
shipped low-memory configs against the goals their headers state."""
from pathlib import Path

import pytest
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

import plan
import train
from config import DEFAULTS, ConfigError, load_config
from models import flux

GiB = 2**30
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TINY = flux.FluxParams(hidden_size=128, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[16, 24, 24],
                       context_in_dim=64, vec_in_dim=32)

# FLUX.1-dev (REFERENCE.md 1.1): 11,901,408,320 parameters, H = 3072, 19 double + 38 single blocks.
DEV_PARAMETERS = 11_901_408_320
H = 3072
# Linear weights of one block (what block swap and fp8 act on), counted from the module table:
# double: per stream qkv 3H^2 + proj H^2 + mlp 4H^2 + 4H^2 + mod 6H^2; single: linear1 7H^2 +
# linear2 5H^2 + modulation 3H^2.
DOUBLE_LINEAR = 2 * 18 * H * H
SINGLE_LINEAR = 15 * H * H
BLOCK_LINEARS = 19 * 10 + 38 * 3  # fp8 Linears, each with one fp32 scale
BLOCK_LINEAR_PARAMETERS = 19 * DOUBLE_LINEAR + 38 * SINGLE_LINEAR


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def tiny_cfg(**changes) -> dict:
    # ae_path is only named (the plan reads no file): with a VAE the latent is 1/8 of 128 px
    return dict(DEFAULTS, resolution=128, ae_path="ae.safetensors", t5_max_length=16, kernels="torch", **changes)


def allocator_increase(prof) -> int:
    """Highest bytes held by tensors during the profiled region, above what was held when it
    began, from the CPU allocator's own events (profile_memory=True), leaving out two kinds of
    allocation that are not tensors of the step and that differ from machine to machine:
      - scratch inside one operator call: allocated and freed within the same innermost
        operator (the buffers a CPU kernel uses internally; their size depends on the CPU's
        vector width and thread count, and CUDA kernels have their own, printed as margins);
      - allocations made outside any operator: the CPU RNG state torch.utils.checkpoint copies
        for each checkpointed block (host memory on a GPU run) and Python scalars.
    What remains is every storage an operator hands back, which is what the plan counts."""
    allocations = []  # (time, size (negative: a free), address, innermost operator instance)

    def visit(event, operator):
        if event.tag == _EventType.Allocation:
            fields = event.extra_fields
            allocations.append((event.start_time_ns, fields.alloc_size, fields.ptr, operator))
        if event.tag == _EventType.TorchOp:
            operator = (event.name, event.start_time_ns, event.extra_fields.sequence_number)
        for child in event.children:
            visit(child, operator)

    for event in prof.profiler.kineto_results.experimental_event_tree():
        visit(event, None)
    allocations.sort(key=lambda a: a[0])
    made_in, excluded = {}, set()
    for i, (_, size, ptr, operator) in enumerate(allocations):
        if size > 0:
            made_in[ptr] = (i, operator)
        elif ptr in made_in:
            j, where = made_in.pop(ptr)
            if where is None or where == operator:
                excluded.update((i, j))
    held = peak = 0
    for i, (_, size, _, _) in enumerate(allocations):
        if i not in excluded:
            held += size
            peak = max(peak, held)
    return peak


# --- (1) the accounting, on real tensors -----------------------------------------------------------


@pytest.mark.parametrize("changes", [
    {},  # LoRA on a bf16 base, AdamW, checkpointing
    {"train_mode": "full", "dtype": "fp32", "optimizer": "adafactor", "fused_backward": True, "max_grad_norm": 0.0},
    {"fp8_base": True, "gradient_checkpointing": False},
], ids=["lora-bf16", "full-fused-adafactor", "fp8-no-checkpointing"])
def test_accounting_matches_the_allocator_and_the_meta_plan(changes):
    cfg = tiny_cfg(**changes)
    real = plan.build(cfg, "cpu", TINY)
    profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    plan.walk(real, measure=lambda: profiler)
    tracked = real.tracker.peak_bytes - real.tracker.start_bytes
    allocated = allocator_increase(profiler)
    # Measured: equal to the byte on the recording machine, with and without checkpointing. The
    # bound allows for allocations an operator makes on some CPUs and keeps past its return.
    assert abs(tracked - allocated) <= 0.001 * allocated, (tracked, allocated)

    meta = plan.build(cfg, "meta", TINY)
    plan.walk(meta)
    # The same walk on meta tensors: only CPU scalars (AdamW's step counts) and the flash
    # kernel's RNG seed and offset differ. Measured: at most 1.5 KB at a peak of 8.6-10 MB.
    assert abs(meta.tracker.peak_bytes - real.tracker.peak_bytes) <= 0.005 * real.tracker.peak_bytes
    assert meta.tracker.peak_breakdown[plan.TRAINABLE] == real.tracker.peak_breakdown[plan.TRAINABLE]


# --- (2) weights: parameter count times dtype size ------------------------------------------------


@pytest.mark.parametrize("changes, expected", [
    ({}, 2 * DEV_PARAMETERS),
    ({"dtype": "fp32"}, 4 * DEV_PARAMETERS),
    ({"fp8_base": True}, BLOCK_LINEAR_PARAMETERS + 2 * (DEV_PARAMETERS - BLOCK_LINEAR_PARAMETERS) + 4 * BLOCK_LINEARS),
    ({"fp8_base": True, "fp8_per_row": True},  # one fp32 scale per output row: 988 H rows
     BLOCK_LINEAR_PARAMETERS + 2 * (DEV_PARAMETERS - BLOCK_LINEAR_PARAMETERS) + 4 * 988 * H),
], ids=["bf16", "fp32", "fp8", "fp8-per-row"])
def test_weight_bytes_are_parameter_count_times_dtype_size(changes, expected):
    setup = plan.build(dict(DEFAULTS, **changes))  # full-size FLUX.1-dev on the meta device
    assert sum(p.numel() for p in setup.model.parameters()) == DEV_PARAMETERS
    assert setup.tracker.live[("device", plan.FROZEN)] == expected
    lora_parameters = 16 * H * (19 * 46 + 38 * 18)  # rank * (in + out) summed over the 304 Linears
    assert setup.tracker.live[("device", plan.TRAINABLE)] == 4 * lora_parameters + 4 * 304  # fp32, + alphas


# --- (3) block swap --------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, double, single, bytes_per_weight", [
    ({"blocks_to_swap": 7}, 3, 8, 2),
    ({"blocks_to_swap": 29, "fp8_base": True, "swap_mode": "h2d_only"}, 14, 30, 1),
    ({"double_blocks_to_swap": 17, "single_blocks_to_swap": 0}, 17, 0, 2),
], ids=["bf16-exchange", "fp8-h2d-only", "double-only"])
def test_block_swap_moves_exactly_the_swapped_blocks_linear_weights(changes, double, single, bytes_per_weight):
    base = plan.build(dict(DEFAULTS, fp8_base=changes.get("fp8_base", False)))
    swapped = plan.build(dict(DEFAULTS, **changes))
    saved = bytes_per_weight * (double * DOUBLE_LINEAR + single * SINGLE_LINEAR)

    def on_device(setup):
        return sum(n for (place, _), n in setup.tracker.live.items() if place == "device")

    assert on_device(base) - on_device(swapped) == saved
    assert swapped.tracker.live[("host", plan.SWAPPED)] == saved
    assert plan.swap_summary(swapped)["double_blocks"]["bytes_per_block"] == bytes_per_weight * DOUBLE_LINEAR


# --- the fused step and activation offload ---------------------------------------------------------


def test_gradients_all_exist_without_the_fused_step_and_one_at_a_time_with_it():
    plain = plan.plan(tiny_cfg(train_mode="full", optimizer="adafactor"), TINY)
    fused = plan.plan(tiny_cfg(train_mode="full", optimizer="adafactor", fused_backward=True, max_grad_norm=0.0),
                      TINY)
    weight_bytes = 2 * sum(p.numel() for p in flux.Flux(TINY).parameters())  # bf16 gradients
    assert plain["device_high_water"][plan.GRADIENTS] == weight_bytes  # the whole set before the step
    largest_block = 2 * max(sum(p.numel() for p in b.parameters()) for b in list(flux.Flux(TINY).double_blocks) + list(flux.Flux(TINY).single_blocks))
    assert 0 < fused["device_high_water"][plan.GRADIENTS] <= largest_block


def test_offloaded_activations_are_counted_in_host_memory():
    kept = plan.plan(tiny_cfg(), TINY)
    offloaded = plan.plan(tiny_cfg(offload_activations=True), TINY)
    assert offloaded["host"][plan.OFFLOADED] > 0
    assert offloaded["device_high_water"][plan.ACTIVATIONS] < kept["device_high_water"][plan.ACTIVATIONS]


# --- (4, 5) the shipped configs, planned through train.py with the model files absent -------------

GOALS_GIB = {"flux_12gb.py": 8.0, "flux_8gb.py": 6.0, "flux_6gb.py": 4.5, "flux_finetune_12gb.py": 10.0,
             # SDXL: the issue's goals for the 4 GB recipe and full fine-tuning; seed 001's own figures for its two
             "sdxl_4gb.py": 3.0, "sdxl_full.py": 10.0, "sdxl_12gb.py": 11.9, "sdxl_14gb.py": 14.0}


@pytest.mark.parametrize("name", sorted(GOALS_GIB))
def test_config_plans_within_its_goal_without_model_files(name, tmp_path, capsys):
    path = str(CONFIGS / name)
    absent = [f"--flux_path={tmp_path / 'flux1-dev.safetensors'}", f"--dataset_dir={tmp_path / 'images'}"]
    with pytest.raises(ConfigError, match="not found"):
        load_config(path, absent)  # training refuses missing files ...
    result = train.main([path, "--plan", *absent])  # ... the plan reads none
    assert result["peak_bytes"] <= GOALS_GIB[name] * GiB
    stated = f"{result['peak_bytes'] / GiB:.2f} GiB"
    assert stated in Path(path).read_text(), f"{name}: update the header comment to the planned peak, {stated}"
    assert "planned peak (bytes torch allocates)" in capsys.readouterr().out


def test_flux_12gb_swaps_the_fewest_blocks_that_meet_its_goal():
    result = train.main([str(CONFIGS / "flux_12gb.py"), "--plan", "--blocks_to_swap=21"])
    assert result["peak_bytes"] > GOALS_GIB["flux_12gb.py"] * GiB
