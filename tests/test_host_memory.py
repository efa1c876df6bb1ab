"""Streaming every block on a 4 GB GPU with a 16 GB host (configs/flux_4gb.py): the ring and the
staging through the real entry point, the fp8 weights memory-mapped from a file of them, and the
whole-run plan of the 4 GB config (device and host, every phase, the time estimate)."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import demo_data
import plan
import train
import training
from config import DEFAULTS, load_config
from families.flux import FAMILY as FLUX
from models.loading import load_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

GiB = 2**30
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return demo_data.make_demo(tmp_path_factory.mktemp("host") / "demo")


def run(tmp_path, demo, name: str, **changes) -> dict:
    cfg = dict(dataset_dir=demo["dataset_dir"], model_path=demo["flux_path"], clip_l_path=demo["clip_l_path"],
               t5_path=demo["t5_path"], model_overrides={"axes_dim": [8, 20, 20]}, device="cpu", dtype="fp32",
               resolution=16, t5_max_length=8, batch_size=2, max_train_steps=3, save_every=0, sample_every=0,
               sample_at_start=False, validate_every=0, output_dir=str(tmp_path / "runs"), lr_scheduler="constant",
               network_dim=4, cache_dir=str(tmp_path / "cache"), run_name=name, fp8_base=True,
               gradient_checkpointing=True, **changes)
    path = tmp_path / f"{name}.py"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in cfg.items()))
    return load_file(str(train.main([str(path)])))


def test_every_block_through_a_ring_with_staging_trains_the_same_lora(tmp_path, demo):
    """train.main with all blocks streamed through two slots, read as loaded through the staging
    buffers, the block inputs offloaded and the fp8 weights memory-mapped from their own file: the
    LoRA file equals that of the run that keeps every block on the device, bit for bit."""
    still = run(tmp_path, demo, "still")
    streamed = run(tmp_path, demo, "streamed", swap_ring=2, swap_mode="h2d_only", swap_staging=True,
                   offload_activations=True, fp8_base_cache=str(tmp_path / "fp8"))
    assert still.keys() == streamed.keys()
    for key in still:
        assert torch.equal(still[key], streamed[key]), key
    assert len(list((tmp_path / "fp8").glob("*.safetensors"))) == 1


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process mapped from `path` (Linux /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the memory map of the process (Linux)")
@pytest.mark.parametrize("per_row", [False, True])
def test_fp8_weights_come_memory_mapped_from_their_file(tmp_path, demo, per_row):
    cfg = load_config(None, [f"--model_path={demo['flux_path']}", "--fp8_base=True", f"--fp8_per_row={per_row}",
                             f"--fp8_base_cache={tmp_path}", "--model_overrides={'axes_dim': [8, 20, 20]}"],
                      check_files=False)
    sd = load_state_dict(demo["flux_path"])
    quantized = FLUX.load(sd, cfg, dtype=torch.bfloat16)  # quantized now, in process memory
    cached = training.load_network(FLUX, cfg, sd, torch.bfloat16)  # writes the file, then reads it mapped
    (file,) = list(tmp_path.glob("*.safetensors"))
    written = file.stat().st_mtime_ns
    again = training.load_network(FLUX, cfg, sd, torch.bfloat16)
    assert file.stat().st_mtime_ns == written  # written once
    ranges = mapped_ranges(file.resolve())
    for model in (cached, again):
        assert model.state_dict().keys() == quantized.state_dict().keys()
        for (name, a), b in zip(quantized.state_dict().items(), model.state_dict().values()):
            assert a.dtype == b.dtype and torch.equal(a.float(), b.float()), name
        blocks = [b for group in FLUX.blocks(model).values() for b in group]
        weights = [m.weight for block in blocks for m in block.modules() if isinstance(m, torch.nn.Linear)]
        assert all(w.dtype == torch.float8_e4m3fn for w in weights)
        assert all(any(lo <= w.data_ptr() < hi for lo, hi in ranges) for w in weights)  # pages of the file


def test_the_4gb_config_plans_its_whole_run_within_3_gib_and_14_gib_of_host_memory(tmp_path, capsys):
    absent = [f"--model_path={tmp_path / 'flux1-dev.safetensors'}", f"--dataset_dir={tmp_path / 'images'}"]
    result = train.main([str(CONFIGS / "flux_4gb.py"), "--plan", "--kernels=torch", *absent])
    out = capsys.readouterr().out
    assert result["phases"]["whole run"] <= 3.0 * GiB
    assert [s.phase for s in result["stages"]] == ["caching", "caching", "training", "sampling", "sampling"]
    assert all(0 < s.peak <= 3.0 * GiB and s.host <= 14 * GiB for s in result["stages"])
    assert result["host_phases"]["whole run"] <= 14 * GiB
    # every block through one ring of two slots the size of an fp8 double block
    (ring,) = result["swap"].values()
    assert ring["ring"] and ring["of"] == 57 and ring["device_slots"] == 2
    assert result["device"][plan.SLOTS] == 2 * ring["bytes_per_block"] == 2 * 2 * 18 * 3072**2
    # staging: the weights as loaded (all 57 blocks, fp8) and two staging buffers, nothing pinned besides
    assert result["host"][plan.SWAPPED] == 19 * 2 * 18 * 3072**2 + 38 * 15 * 3072**2
    assert result["host"][plan.STAGING] == 2 * ring["bytes_per_block"] and result["host"][plan.SWAP_SPARE] == 0
    # per step every block comes in twice, but forward starts with double blocks 0, 1 in the slots and
    # backward with single blocks 36, 37
    blocks = result["host"][plan.SWAPPED]
    assert result["bytes_moved"]["block weights"] == 2 * blocks - 2 * (2 * 18 + 15) * 3072**2
    assert "transfer time:" in out and "at PCIe 3.0 x8" in out and "TFLOP per step" in out
    assert 200e12 < result["flops"] < 400e12  # about 3 forwards of FLUX.1 at 4608 tokens (74 TFLOP each)
