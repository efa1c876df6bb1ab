"""The memory plan (plan.py): its accounting against the bytes the CPU allocator actually
hands out, weight bytes against parameter counts, block swap, the fused step, and the
shipped low-memory configs against the goals their headers state."""
import concurrent.futures
import multiprocessing
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
    return {**DEFAULTS, **dict(resolution=128, ae_path="ae.safetensors", t5_max_length=16, kernels="torch"), **changes}


def allocator_increase(prof) -> int:
    """Highest bytes held by tensors during the profiled region, above what was held when it
    began, from the CPU allocator's own events (profile_memory=True), leaving out two kinds of
    allocation that are not tensors of the step and that differ from machine to machine:
      - scratch inside one operator call: freed before the operator that was running when it was
        allocated (or one around it) returned (the buffers a CPU kernel uses internally, whose
        size depends on the CPU's vector width and thread count; CUDA kernels have their own,
        printed as margins);
      - allocations made outside any operator: the CPU RNG state torch.utils.checkpoint copies
        for each checkpointed block (host memory on a GPU run) and Python scalars.
    What remains is every storage an operator hands back, which is what the plan counts."""
    allocations = []  # (time, size (negative: a free), address, the operator calls running, innermost last)

    def visit(event, running):
        if event.tag == _EventType.Allocation:
            fields = event.extra_fields
            allocations.append((event.start_time_ns, fields.alloc_size, fields.ptr, running))
        if event.tag == _EventType.TorchOp and event.name.startswith("aten::"):  # operator calls, not annotations
            running = running + ((event.name, event.start_time_ns, event.extra_fields.sequence_number),)
        for child in event.children:
            visit(child, running)

    for event in prof.profiler.kineto_results.experimental_event_tree():
        visit(event, ())
    allocations.sort(key=lambda a: a[0])
    made_in, excluded = {}, set()
    for i, (_, size, ptr, running) in enumerate(allocations):
        if size > 0:
            made_in[ptr] = (i, running)
        elif ptr in made_in:
            j, while_making = made_in.pop(ptr)
            if not while_making or (running and running[-1] in while_making):
                excluded.update((i, j))
    held = peak = 0
    for i, (_, size, _, _) in enumerate(allocations):
        if i not in excluded:
            held += size
            peak = max(peak, held)
    return peak


def in_fresh_process(function, *args):
    """function(*args) in a new Python process (spawned), its result returned. The profiler's
    allocator events are the whole process's: inside the full suite (never alone, nor after the
    28 test files before this one) the allocator's peak of the first comparison came out at a
    sixth of the tracker's in 2 of 5 runs, from a cause inside the long pytest process not found."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


# --- (1) the accounting, on real tensors -----------------------------------------------------------


def measure_accounting(changes: dict) -> dict:
    """One training step of the tiny model on real CPU tensors, the tracker's peak beside the
    allocator's (profiler), and the same walk on meta tensors."""
    torch.set_num_threads(1)
    cfg = tiny_cfg(**changes)
    real = plan.build(cfg, "cpu", TINY)
    profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    plan.walk(real, measure=lambda: profiler)
    meta = plan.build(cfg, "meta", TINY)
    plan.walk(meta)
    return dict(tracked=real.tracker.peak_bytes - real.tracker.start_bytes, allocated=allocator_increase(profiler),
                real_peak=real.tracker.peak_bytes, meta_peak=meta.tracker.peak_bytes,
                real_trainable=real.tracker.peak_breakdown[plan.TRAINABLE],
                meta_trainable=meta.tracker.peak_breakdown[plan.TRAINABLE])


@pytest.mark.parametrize("changes", [
    {},  # LoRA on a bf16 base, AdamW, checkpointing
    {"train_mode": "full", "dtype": "fp32", "optimizer": "adafactor", "fused_backward": True, "max_grad_norm": 0.0},
    {"fp8_base": True, "gradient_checkpointing": False},
], ids=["lora-bf16", "full-fused-adafactor", "fp8-no-checkpointing"])
def test_accounting_matches_the_allocator_and_the_meta_plan(changes):
    m = in_fresh_process(measure_accounting, changes)
    # Measured: equal to the byte on the recording machine, with and without checkpointing. The
    # bound allows for allocations an operator makes on some CPUs and keeps past its return.
    assert abs(m["tracked"] - m["allocated"]) <= 0.001 * m["allocated"], (m["tracked"], m["allocated"])
    # The same walk on meta tensors: only CPU scalars (AdamW's step counts) and the flash
    # kernel's RNG seed and offset differ. Measured: at most 1.5 KB at a peak of 8.6-10 MB.
    assert abs(m["meta_peak"] - m["real_peak"]) <= 0.005 * m["real_peak"]
    assert m["meta_trainable"] == m["real_trainable"]


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

GOALS_GIB = {"flux_24gb.py": 20.0, "flux_12gb.py": 8.0, "flux_8gb.py": 6.0, "flux_6gb.py": 4.5, "flux_4gb.py": 3.0,
             "flux_finetune_12gb.py": 10.0,  # whole run, plain-torch path
             # SDXL: the issue's goals for the 4 GB recipe and full fine-tuning; seed 001's own figures for its two
             "sdxl_4gb.py": 3.0, "sdxl_full.py": 10.0, "sdxl_12gb.py": 11.9, "sdxl_14gb.py": 14.0}
# host memory for tensors, whole run: the 4 GB and 6 GB recipes fit a machine with 16 GB of RAM
HOST_GOALS_GIB = {"flux_4gb.py": 14.0, "flux_6gb.py": 14.0}


@pytest.mark.parametrize("name", sorted(GOALS_GIB))
def test_config_plans_within_its_goal_without_model_files(name, tmp_path, capsys):
    path = str(CONFIGS / name)
    absent = [f"--model_path={tmp_path / 'flux1-dev.safetensors'}", f"--dataset_dir={tmp_path / 'images'}"]
    with pytest.raises(ConfigError, match="not found"):
        load_config(path, absent)  # training refuses missing files ...
    header = Path(path).read_text()
    for kernels in ("torch", "auto"):
        result = train.main([path, "--plan", f"--kernels={kernels}", *absent])  # ... the plan reads none
        phases = result["phases"]
        assert phases["whole run"] == max(phases["caching"], phases["training"], phases["sampling"])
        if kernels == "torch":  # the goal holds on the path that certainly runs
            assert phases["whole run"] <= GOALS_GIB[name] * GiB
            assert result["host_phases"]["whole run"] <= HOST_GOALS_GIB.get(name, float("inf")) * GiB
        stated = "whole run " + f"{phases['whole run'] / GiB:.2f} GiB"
        assert stated in header, f"{name}: update the header's {kernels} line to the planned figure, {stated}"
        out = capsys.readouterr().out
        for phase in ("caching", "training", "sampling", "whole run"):  # the summary lines scripts read
            assert f"planned peak, {phase}: {phases[phase] / GiB:.2f} GiB" in out.splitlines()


def test_flux_12gb_swaps_at_most_one_block_more_than_its_goal_needs():
    """Its header: 23 blocks, one more than the fewest (22) that plan within 8 GiB, for a margin."""
    result = train.main([str(CONFIGS / "flux_12gb.py"), "--plan", "--kernels=torch", "--blocks_to_swap=21"])
    assert result["phases"]["whole run"] > GOALS_GIB["flux_12gb.py"] * GiB


# --- (6) the phases around the training step, on real tensors --------------------------------------


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """A tiny autoencoder in the ae.safetensors layout and the demo's tiny CLIP-L and T5 folders."""
    import demo_data
    from safetensors.torch import save_file

    from models.vae import AutoEncoder, AutoEncoderParams

    root = tmp_path_factory.mktemp("phases")
    torch.manual_seed(0)
    ae = AutoEncoder(AutoEncoderParams(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=16))
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, str(root / "ae.safetensors"))
    files = demo_data.make_demo(root / "demo")
    return {"ae_path": str(root / "ae.safetensors"), "clip_l_path": files["clip_l_path"], "t5_path": files["t5_path"]}


def profiled(profilers: list):
    """A `measure` for the plan's stages: one CPU allocator profile per stage."""

    def measure():
        profilers.append(profile(activities=[ProfilerActivity.CPU], profile_memory=True))
        return profilers[-1]

    return measure


def caching_stages(cfg: dict) -> list:
    """(what, planned increase, allocator increase) of each caching stage, on the CPU."""
    from families.flux import FAMILY

    torch.set_num_threads(1)
    profilers = []
    stages = plan.plan_caching(cfg, FAMILY, TINY, device="cpu", measure=profiled(profilers))
    return [(s.what, s.increase, allocator_increase(prof)) for s, prof in zip(stages, profilers)]


def sampling_stages(cfg: dict) -> list:
    """(what, planned increase, allocator increase) of each sampling stage, on the CPU."""
    torch.set_num_threads(1)
    real = plan.build(cfg, "cpu", TINY)
    plan.walk(real)
    profilers = []
    stages = plan.plan_sampling(real, training_peak=real.tracker.peak_bytes, measure=profiled(profilers))
    return [(s.what, s.increase, allocator_increase(prof)) for s, prof in zip(stages, profilers)]


@pytest.mark.parametrize("changes", [{}, {"text_encoder_fp8": True, "vae_batch_size": 2, "text_batch_size": 3}],
                         ids=["bf16", "fp8-text-batches"])
def test_caching_stages_match_the_allocator(tiny_files, changes):
    cfg = tiny_cfg(**tiny_files, t5_max_length=16, resolution=32, **changes)
    stages = in_fresh_process(caching_stages, cfg)
    assert [what.split(" ")[1] for what, _, _ in stages] == ["autoencoder", "text"]
    for what, planned, allocated in stages:
        assert planned > 0
        assert abs(planned - allocated) <= 0.001 * planned, (what, planned, allocated)


@pytest.mark.parametrize("tile", [0, 2])
def test_sampling_stages_match_the_allocator(tiny_files, tile):
    cfg = tiny_cfg(ae_path=tiny_files["ae_path"], resolution=32, vae_tile_size=tile)
    stages = in_fresh_process(sampling_stages, cfg)
    assert [what for what, _, _ in stages] == ["the denoiser, no gradients",
                                               f"the decode ({f'tiles of {tile} latent px' if tile else 'whole'})"]
    for what, planned, allocated in stages:
        assert abs(planned - allocated) <= 0.001 * planned, (what, planned, allocated)


def test_whole_run_plan_phases_and_auto_tiling():
    """At 1024 px the FLUX decoder's whole decode raises the 8 GB config's peak, so vae_tile_size=-1
    tiles it; forcing a whole decode plans more for sampling."""
    path = str(CONFIGS / "flux_8gb.py")
    auto = train.main([path, "--plan", "--kernels=torch"])
    whole = train.main([path, "--plan", "--kernels=torch", "--vae_tile_size=0"])
    assert "tiles of 64" in auto["stages"][-1].what and "whole" in whole["stages"][-1].what
    assert whole["phases"]["sampling"] > auto["phases"]["training"] >= auto["phases"]["sampling"]
    resident = train.main([path, "--plan", "--kernels=torch", "--text_encoder_placement=device"])
    assert resident["phases"]["caching"] > 4 * auto["phases"]["caching"]  # T5-XXL whole on the GPU


def test_a_text_encoder_that_trains_is_resident_in_the_planned_step():
    """SDXL's CLIP-L with a LoRA (text_encoder_lr): its bf16 weights (123,060,480 parameters, the
    released CLIP ViT-L/14 text model, plus the int64 position ids) sit on the device in the
    training step, and its LoRA trains with the UNet's."""
    config = str(CONFIGS / "sdxl_12gb.py")
    frozen = train.main([config, "--plan", "--kernels=torch"])
    trains = train.main([config, "--plan", "--kernels=torch", '--text_encoder_lr={"clip_l": 1e-5}'])
    assert frozen["device"].get("text encoders", 0) == 0
    assert trains["device"]["text encoders"] == 123_060_480 * 2 + 77 * 8
    assert trains["device"]["trainable weights"] > frozen["device"]["trainable weights"]
    assert trains["phases"]["training"] - frozen["phases"]["training"] >= 123_060_480 * 2
