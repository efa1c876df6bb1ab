"""The lean LoRA state on the CPU demo: bf16 LoRA weights (stochastically rounded updates) and
the factored (Adafactor) or 8-bit (AdamW8bit) optimizer state, each against the fp32 baseline
(fp32 LoRA weights, torch's AdamW), with the same data, noise and seed.

    python bench/lean_state.py                  # 200 steps per variant, 8 runs
    python bench/lean_state.py --steps 50       # quicker, noisier

Each variant trains a rank-16 LoRA on the demo's tiny FLUX-shaped model (configs/demo.py,
train_mode="lora", on the demo's 48 square images without buckets: the data it was measured on
before the demo gained landscape and portrait images) and reports the mean training loss of the last quarter of its steps and the
validation loss at the end (held-out images at fixed noise levels with fixed noise). Every
variant runs with the same seed (same held-out images, batches, noise and LoRA init), so its
difference from the baseline is its own; the baseline runs twice more with other seeds (which
also pick other held-out images): their spread is the scale to read a difference against. Not part of the test suite (minutes on 2 cores).
"""
import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import demo_data  # noqa: E402
import train  # noqa: E402

# name -> overrides of configs/demo.py
VARIANTS = {
    "fp32 LoRA, AdamW (baseline)": [],
    "baseline, seed 1": ["--seed=1"],
    "baseline, seed 2": ["--seed=2"],
    "fp32 LoRA, AdamW8bit": ["--optimizer=adamw8bit"],
    "fp32 LoRA, Adafactor": ["--optimizer=adafactor"],
    "bf16 LoRA, AdamW8bit": ["--lora_dtype=bf16", "--optimizer=adamw8bit"],
    "bf16 LoRA, Adafactor": ["--lora_dtype=bf16", "--optimizer=adafactor"],
    "bf16 LoRA, Adafactor, fused (4 GB recipe)": ["--lora_dtype=bf16", "--optimizer=adafactor",
                                                  "--fused_backward=True", "--max_grad_norm=0.0"],
}


def run_variant(name: str, overrides: list[str], steps: int, root: Path) -> dict:
    """One LoRA run of the demo; the losses its metrics log recorded."""
    run_name = "v" + str(list(VARIANTS).index(name))
    square_images = demo_data.make_demo(root / "data")["dataset_dir"]
    args = [str(ROOT / "configs/demo.py"), f"--dataset_dir={square_images}", "--enable_bucket=False",
            "--train_mode=lora", "--network_dim=16", "--network_alpha=16.0",
            f"--max_train_steps={steps}", f"--validate_every={steps}", "--sample_every=0", "--save_every=0",
            "--sample_at_start=False", f"--output_dir={root / 'runs'}", f"--cache_dir={root / 'cache'}",
            f"--run_name={run_name}", *overrides]
    train.main(args)
    records = [json.loads(line) for line in (root / "runs" / run_name / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    tail = losses[-max(1, len(losses) // 4):]
    return {"train": statistics.mean(tail), "val": [r["val_loss"] for r in records if "val_loss" in r][-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a busy machine)")
    parser.add_argument("--only", default="", help="run the variants whose name contains this (e.g. baseline)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in VARIANTS.items():
            if args.only in name:
                results[name] = run_variant(name, overrides, args.steps, Path(tmp))
    base = results.get("fp32 LoRA, AdamW (baseline)", {"val": float("nan")})
    print(f"\nLoRA rank 16 on the CPU demo, {args.steps} steps: training loss (mean of the last quarter) "
          "and validation loss at the end")
    print(f"{'variant':<44}{'train':>8}{'val':>8}{'val - baseline':>16}")
    for name, r in results.items():
        print(f"{name:<44}{r['train']:>8.4f}{r['val']:>8.4f}{r['val'] - base['val']:>+16.4f}")
    seeds = [results[n]["val"] for n in results if n.startswith("baseline") or n.endswith("(baseline)")]
    if seeds:
        print(f"seed-to-seed spread of the baseline (3 seeds): val {min(seeds):.4f}-{max(seeds):.4f}")


if __name__ == "__main__":
    main()
