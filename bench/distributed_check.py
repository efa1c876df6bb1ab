"""Several GPUs against one, on the demo's tiny FLUX: what tests/test_distributed.py checks on
the CPU with gloo, run on GPUs with NCCL (nothing of distributed.py has run there before this).

    python bench/distributed_check.py                 # every visible GPU (at least 2)
    python bench/distributed_check.py --gpus 2 --steps 20
    python bench/distributed_check.py --device cpu --gpus 2 --steps 3   # the same code on gloo

For each case the same global batch trains once in one process and once under torchrun
(batch_size per GPU = global / GPUs); it prints the largest loss difference over the steps
and each run's seconds per step. In fp32 the differences should be below 1e-5 (the tests'
bound on the CPU). In bf16 they show the rounding of a different summation order, and for full
fine-tuning more: one process trains the bf16 weights themselves, FSDP fp32 master weights.
On 2 CPU processes (gloo; `--device cpu --gpus 2 --steps 3 --batch 4`) it printed 2.38e-07,
9.35e-05, 1.19e-07 and 6.30e-03 for the four cases.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CASES = {  # name: settings beyond the demo's (configs/demo.py)
    "LoRA, data parallel, fp32": dict(train_mode="lora", network_dim=8, dtype="fp32"),
    "LoRA, data parallel, fused step, bf16": dict(train_mode="lora", network_dim=8, dtype="bf16",
                                                  fused_backward=True, max_grad_norm=0.0),
    "full, FSDP2, fp32": dict(train_mode="full", dtype="fp32", gradient_checkpointing=True),
    "full, FSDP2, bf16 compute": dict(train_mode="full", dtype="bf16", gradient_checkpointing=True),
}


def run(command: list[str], gpus: int) -> None:
    launcher = [sys.executable] if gpus == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus)]
    done = subprocess.run(launcher + command, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def compare(name: str, settings: dict, args, folder: Path) -> str:
    """One case: the one-process run and the torchrun one, as a table row."""
    common = [f"--{k}={v}" for k, v in {**settings, "device": args.device, "max_train_steps": args.steps,
                                         "output_dir": folder / "runs", "cache_dir": folder / "cache",
                                         "save_every": args.steps, "sample_every": 0, "sample_at_start": False,
                                         "validate_every": 0, "lr_scheduler": "constant",
                                         "lr_warmup_steps": 0}.items()]
    per_gpu = args.batch // args.gpus
    tag = name.split(",")[0].lower() + str(abs(hash(name)) % 10_000)
    run(["train.py", "configs/demo.py", *common, f"--batch_size={args.batch}", f"--run_name={tag}_one"], 1)
    run(["train.py", "configs/demo.py", *common, f"--batch_size={per_gpu}", f"--run_name={tag}_many"], args.gpus)
    one, many = records(folder / "runs" / f"{tag}_one"), records(folder / "runs" / f"{tag}_many")
    worst = max(abs(a["loss"] - b["loss"]) for a, b in zip(one, many))
    return f"| {name} | {worst:.2e} | {one[-1]['s_per_it']:.3f} | {many[-1]['s_per_it']:.3f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="the global batch (a multiple of --gpus)")
    args = parser.parse_args()
    if args.gpus < 2 or args.batch % args.gpus:
        raise SystemExit(f"needs at least 2 GPUs (found {args.gpus}) and --batch a multiple of them")
    print(f"global batch {args.batch}, {args.steps} steps, {args.gpus} processes on {args.device}\n")
    print(f"| case | largest loss difference | s/it, 1 process | s/it, {args.gpus} processes |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name, settings in CASES.items():
            print(compare(name, settings, args, Path(folder)), flush=True)


if __name__ == "__main__":
    main()
