"""Several processes on CPU (gloo) through torchrun and train.py's real entry point:
data-parallel LoRA in aspect-ratio buckets (and with the fused step) against one process with
the same global batch, a stop on one rank and the resume, a one-GPU full fine-tuning config
(bf16, Adafactor) data parallel, FSDP2 full fine-tuning of FLUX and SD3 against one
process, stopped and resumed on one process from its two-process checkpoint, its model file in
the one-GPU loader, an error on one rank; and without processes: the refusals, the caching split
and the plan per GPU."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import demo_data
import distributed
import plan
import train
from config import DEFAULTS, ConfigError
from models.flux import Flux

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


FLUX = dict(model_overrides={"axes_dim": [8, 20, 20]}, t5_max_length=8)


def write_config(folder: Path, files: dict, **settings) -> str:
    cfg = dict(FLUX, **files, output_dir=str(folder / "runs"), cache_dir=str(folder / "cache"), device="cpu",
               dtype="fp32", resolution=16, learning_rate=1e-3, max_train_steps=4, save_every=2, sample_every=0,
               sample_at_start=False, validate_every=0, gradient_checkpointing=False, lr_scheduler="constant",
               caption_dropout_rate=0.3, save_dtype="fp32")
    cfg = {k: v for k, v in {**cfg, **settings}.items() if v is not None}  # None: the default
    path = folder / f"{settings['run_name']}.py"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in cfg.items()))
    return str(path)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """Two processes on this machine (--standalone: a free port of their own)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r[key] for r in records if key in r}


def sd3_files(root: Path) -> dict:
    """SD3's demo files (an SD3.5-shaped MMDiT with CLIP-L, CLIP-G and T5; no VAE)."""
    return dict(demo_data.make_sd3_demo(root / "sd3"), model_family="sd3", model_overrides={}, sample_prompts="")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every multi-process run once, in one torchrun of the worker (tests/distributed_worker.py):
    `train.py CONFIG` as a program (data-parallel LoRA), then the other jobs; then the
    one-process references."""
    root = tmp_path_factory.mktemp("distributed")
    files = demo_data.make_demo(root / "demo")
    files = {"model_path" if k == "flux_path" else k: v for k, v in files.items()}
    lora, full = dict(network_dim=4, network_alpha=4.0), dict(train_mode="full", ema_decay=0.9)
    # square, landscape and portrait images in their aspect-ratio buckets (32x32, 48x16, 16x48)
    shapes = demo_data.make_demo(root / "demo", shapes_of_images=True)["dataset_dir"]
    lora_buckets = dict(lora, dataset_dir=shapes, enable_bucket=True, resolution=32, min_bucket_reso=16,
                        max_bucket_reso=48)
    watched = dict(validation_count=2, validate_every=2, sample_every=4, sample_steps=2)  # every rank runs them
    fused = dict(fused_backward=True, max_grad_norm=0.0, **lora)
    # a one-GPU full fine-tuning config: bf16 weights, stochastic rounding from torch's generator
    whole = dict(train_mode="full", optimizer="adafactor", dtype="bf16", max_train_steps=3, save_every=0)
    sd3 = dict(sd3_files(root), max_train_steps=3, save_every=0, train_mode="full", gradient_checkpointing=True)
    configs = {name: write_config(root, files, run_name=name, **settings) for name, settings in {
        "one": dict(batch_size=4, **lora_buckets), "dp": dict(batch_size=2, **lora_buckets),
        "dp_split": dict(batch_size=2, **lora_buckets),
        "one_fused": dict(batch_size=4, **fused), "dp_fused": dict(batch_size=2, **fused),
        "full_one": dict(batch_size=4, **full, **watched), "fsdp": dict(batch_size=2, **full, **watched),
        "fsdp_split": dict(batch_size=2, validation_count=2, **full), "broken": dict(batch_size=2, **lora),
        "sd3_one": dict(batch_size=4, **sd3), "sd3_fsdp": dict(batch_size=2, **sd3),
        "whole_one": dict(batch_size=4, **whole), "whole_dp": dict(batch_size=2, **whole)}.items()}
    jobs = [{"argv": [configs["dp"]], "script": True},
            {"argv": [configs["dp_split"]], "rank": 1, "stop_at": 3},  # SIGTERM on rank 1 in step 3
            {"argv": [configs["dp_split"], "--resume=latest"]},
            {"argv": [configs["dp_fused"]]},
            {"argv": [configs["fsdp"]]},
            {"argv": [configs["fsdp_split"]], "rank": 1, "stop_at": 3},
            {"argv": [configs["broken"], "--recache=True"], "rank": 1, "fail_caching": True},
            {"argv": [configs["sd3_fsdp"]]},
            {"argv": [configs["whole_dp"]]}]
    jobs_file = root / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    worker = torchrun("tests/distributed_worker.py", str(jobs_file))
    assert worker.returncode == 0, worker.stderr[-3000:]
    results = [json.loads(jobs_file.with_suffix(f".rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r[0]["code"] for r in results] == [0, 0], results[0][0]["stderr"]
    for name in ("one", "one_fused", "full_one", "sd3_one", "whole_one"):
        train.main([configs[name]])
    return {"root": root, "runs": root / "runs", "configs": configs, "results": results,
            "dp_output": results[0][0]["stdout"]}


def test_data_parallel_lora_equals_one_process_and_resumes_after_a_stop(runs):
    """In aspect-ratio buckets: a global batch (2 per GPU x 2) never mixes buckets."""
    one, dp, split = (losses(runs["runs"] / name) for name in ("one", "dp", "dp_split"))
    buckets = [b for b in json.loads((runs["runs"] / "dp" / "buckets.json").read_text()) if "resolution" in b]
    assert sorted(b["resolution"] for b in buckets) == [[16, 48], [32, 32], [48, 16]]
    assert {b["batch_size"] for b in buckets} == {4}  # the global batch
    assert sorted(one) == sorted(dp) == sorted(split) == [1, 2, 3, 4]
    print("data parallel LoRA, 2 processes against 1, largest loss difference:",
          max(abs(dp[step] - one[step]) for step in one))
    for step in one:
        assert abs(dp[step] - one[step]) < 1e-5, (step, dp[step], one[step])
        assert split[step] == dp[step]  # the resumed run continues the unbroken one exactly
    a, b = (load_file(str(runs["runs"] / name / f"{name}.safetensors")) for name in ("one", "dp"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert "a global batch of 4 samples per step" in runs["dp_output"]
    assert "batch 2 per GPU x 2 GPUs" in runs["dp_output"]
    stopped, resumed = ([ranks[job] for ranks in runs["results"]] for job in (1, 2))
    assert [r["code"] for r in stopped] == [143, 143] and [r["code"] for r in resumed] == [0, 0]
    assert "stopped at step 3 (SIGTERM)" in stopped[0]["stderr"]  # rank 0 stopped for rank 1's signal
    states = sorted(p.name for p in (runs["runs"] / "dp_split" / "state").iterdir())
    assert states == ["step_000002", "step_000003", "step_000004"]


def test_data_parallel_with_the_fused_step_equals_one_process(runs):
    """The fused step averages each gradient over the GPUs in its hook, before the update."""
    one, dp = losses(runs["runs"] / "one_fused"), losses(runs["runs"] / "dp_fused")
    assert sorted(one) == sorted(dp) == [1, 2, 3, 4]
    print("data parallel LoRA, fused step, largest loss difference:", max(abs(dp[s] - one[s]) for s in one))
    assert all(abs(dp[step] - one[step]) < 1e-5 for step in one), (dp, one)
    a, b = (load_file(str(runs["runs"] / n / f"{n}.safetensors")) for n in ("one_fused", "dp_fused"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_fsdp_full_fine_tuning_of_sd3_equals_one_process(runs):
    """SD3's joint blocks as FSDP units after their gradient checkpointing; the gathered file."""
    one, fsdp = (losses(runs["runs"] / f"sd3_{kind}") for kind in ("one", "fsdp"))
    assert sorted(one) == sorted(fsdp) == [1, 2, 3]
    print("SD3 FSDP2, 2 processes against 1, largest loss difference:", max(abs(fsdp[s] - one[s]) for s in one))
    assert all(abs(fsdp[step] - one[step]) < 1e-5 for step in one), (fsdp, one)
    a, b = (load_file(str(runs["runs"] / f"sd3_{kind}" / f"sd3_{kind}.safetensors")) for kind in ("one", "fsdp"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_fsdp_trains_like_one_process_and_resumes_on_one_from_two(runs, tmp_path):
    full_one, fsdp = losses(runs["runs"] / "full_one"), losses(runs["runs"] / "fsdp")
    val_one, val_fsdp = (losses(runs["runs"] / name, "val_loss") for name in ("full_one", "fsdp"))
    assert sorted(val_one) == sorted(val_fsdp) == [2, 4]
    assert all(abs(val_fsdp[step] - val_one[step]) < 1e-5 for step in val_one), (val_fsdp, val_one)
    samples = sorted(p.name for p in (runs["runs"] / "fsdp" / "samples").glob("*.png"))
    assert samples == sorted(p.name for p in (runs["runs"] / "full_one" / "samples").glob("*.png"))
    assert samples == [f"step000004_0{i}.png" for i in range(4)]
    print("FLUX FSDP2, 2 processes against 1, largest loss difference:",
          max(abs(fsdp[step] - full_one[step]) for step in full_one))
    for step in full_one:
        assert abs(fsdp[step] - full_one[step]) < 1e-5, (step, fsdp[step], full_one[step])
    fsdp_split = runs["runs"] / "fsdp_split"
    assert [r[5]["code"] for r in runs["results"]] == [143, 143]
    assert distributed.is_sharded(fsdp_split / "state" / "step_000003")
    assert len(list((fsdp_split / "state" / "step_000003" / "sharded").glob("*.distcp"))) == 2  # a shard per rank
    weights, extra, info = checkpoint.load_state(fsdp_split / "state" / "step_000003")  # read whole, for a look
    assert info["step"] == 3 and weights.keys() == load_file(str(runs["runs"] / "fsdp" / "fsdp.safetensors")).keys()
    # one process, global batch kept (batch_size 4 = 2 x 2 GPUs)
    final = train.main([runs["configs"]["fsdp_split"], "--resume=latest", "--batch_size=4"])
    resumed = losses(fsdp_split)
    assert abs(resumed[4] - full_one[4]) < 1e-5 and resumed[3] == fsdp[3]
    # the two-process model file (gathered tensor by tensor) in the one-GPU path, and the resumed one's
    reference = load_file(str(runs["runs"] / "full_one" / "full_one.safetensors"))
    for path in (runs["runs"] / "fsdp" / "fsdp.safetensors", runs["runs"] / "fsdp" / "fsdp_ema.safetensors", final):
        sd = load_file(str(path))
        assert sd.keys() == reference.keys()
        model = Flux.from_state_dict(sd, axes_dim=[8, 20, 20])
        assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in reference.values())
    ema, ema_one = (load_file(str(runs["runs"] / n / f"{n}_ema.safetensors")) for n in ("fsdp", "full_one"))
    assert all(torch.allclose(ema[k], ema_one[k], atol=1e-5) for k in ema)
    assert all(torch.allclose(load_file(str(final))[k], reference[k], atol=1e-4) for k in reference)


def test_an_error_on_one_rank_stops_every_rank_with_its_message(runs):
    broken = [r[6] for r in runs["results"]]
    assert [r["code"] for r in broken] == [1, 1]
    assert "error (rank 1): cannot read image broken.png" in broken[1]["stderr"]  # its own error
    assert "error (rank 0): rank 1 stopped while caching: ImageReadError: cannot read image broken.png" \
        in broken[0]["stderr"]


# --- without processes --------------------------------------------------------------------------


def test_a_one_gpu_full_fine_tuning_config_runs_data_parallel_like_one_process(runs):
    """distributed="auto" with what FSDP cannot run (Adafactor) trains data parallel; every GPU
    draws the same stochastic rounding, so the replicas stay equal and equal one process."""
    one, dp = losses(runs["runs"] / "whole_one"), losses(runs["runs"] / "whole_dp")
    assert sorted(one) == sorted(dp) == [1, 2, 3]
    print("full fine-tuning data parallel, bf16, largest loss difference:", max(abs(dp[s] - one[s]) for s in one))
    assert all(abs(dp[step] - one[step]) < 1e-3 for step in one), (dp, one)  # bf16 compute
    a, b = (load_file(str(runs["runs"] / n / f"{n}.safetensors")) for n in ("whole_one", "whole_dp"))
    assert all((a[k].float() - b[k].float()).abs().max() <= 2**-6 for k in a)  # two bf16 steps near 1


@pytest.mark.parametrize("settings, message", [
    (dict(train_mode="lora", distributed="fsdp"), "LoRA trains data parallel"),
    (dict(train_mode="full", blocks_to_swap=4, fused_backward=True, max_grad_norm=0.0), "block swap: FSDP already"),
    (dict(train_mode="full", fused_backward=True, max_grad_norm=0.0), "fused_backward: FSDP"),
    (dict(train_mode="full", optimizer="adafactor"), "optimizer='adafactor': FSDP"),
    (dict(train_mode="full", dtype="fp16"), "dtype='fp16': FSDP"),
])
def test_combinations_that_cannot_work_are_refused_before_loading(settings, message):
    cfg = {**DEFAULTS, **settings}
    with pytest.raises(ConfigError, match=message):
        distributed.check({**cfg, "distributed": "fsdp"}, 2)
    assert distributed.check({**cfg, "distributed": "ddp"}, 2) == "ddp"  # the same config, data parallel
    assert distributed.check({**cfg, "distributed": "auto"}, 2) == "ddp"  # what "auto" picks for it


def test_modes():
    lora, full = {**DEFAULTS, "train_mode": "lora"}, {**DEFAULTS, "train_mode": "full"}
    assert [distributed.choose_mode(c, n) for c, n in ((lora, 1), (lora, 2), (full, 1), (full, 8))] == \
        ["single", "ddp", "single", "fsdp"]
    assert distributed.choose_mode({**full, "distributed": "ddp"}, 8) == "ddp"
    one_gpu_config = {**full, "blocks_to_swap": 20, "fused_backward": True, "optimizer": "adafactor"}
    assert distributed.choose_mode(one_gpu_config, 8) == "ddp"  # the same config on several GPUs
    assert "FSDP cannot run this config" in distributed.auto_note(one_gpu_config, "ddp")
    assert distributed.auto_note(full, "fsdp") == "" == distributed.auto_note(lora, "ddp")
    with pytest.raises(ConfigError, match="launch with torchrun"):
        distributed.init({**full, "distributed": "fsdp"}, torch.device("cpu"))


class FakeCache:
    def __init__(self):
        self.recache, self.calls = True, []

    def build(self, items, encode, batch_size=1, progress=True):
        self.calls.append((list(items), self.recache, progress))
        return items


class TwoRanks(distributed.World):
    """Rank 1 of 2 without processes: agreeing is trivial."""

    def agree(self, what):
        return distributed.World.agree(distributed.World(), what)


def test_caching_is_split_and_then_read_whole():
    fake = FakeCache()
    shared = distributed.build_shared(TwoRanks(rank=1, size=2), fake, list(range(7)), None, batch_size=3)
    assert shared == list(range(7))
    assert fake.calls == [([1, 3, 5], True, True), (list(range(7)), False, False)]  # its share, then all from disk
    assert fake.recache  # the setting is back for the next cache


def test_the_plan_per_gpu_divides_what_fsdp_shards(tmp_path):
    from models import flux

    tiny = flux.FluxParams(hidden_size=128, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[16, 24, 24],
                           context_in_dim=64, vec_in_dim=32)
    cfg = {**DEFAULTS, "resolution": 128, "ae_path": "ae.safetensors", "t5_max_length": 16, "kernels": "torch",
           "train_mode": "full"}
    one, eight = plan.plan(cfg, tiny), plan.plan(cfg, tiny, gpus=8)
    parts, n = eight["several"]["parts"], one["parameters"]
    assert parts[plan.FSDP_MASTERS] == 4 * n // 8 and parts[plan.FSDP_OPTIMIZER] == 8 * n // 8
    assert eight["phases"]["training"] == sum(parts.values()) < one["phases"]["training"]
    assert plan.plan({**cfg, "train_mode": "lora"}, tiny, gpus=8)["phases"] == plan.plan({**cfg, "train_mode": "lora"},
                                                                                        tiny)["phases"]
