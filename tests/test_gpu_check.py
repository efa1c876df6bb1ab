"""bench/gpu_check.py: without CUDA it says so and exits cleanly; its sections run on tiny
CPU shapes through the same code the GPU run uses (the device is a parameter)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_says_so(tmp_path):
    if torch.cuda.is_available():
        return  # a GPU machine runs the real thing
    result = subprocess.run([sys.executable, "bench/gpu_check.py"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "no CUDA GPU is visible" in result.stdout


def test_every_section_runs_on_tiny_cpu_shapes(capsys):
    gpu_check = load()
    torch.set_num_threads(1)
    assert gpu_check.main(["--device", "cpu", "--tiny"]) == 0
    out = capsys.readouterr().out
    for section in ("## 2. kernel self-check", "## 3. kernel timings", "## 4. block swap on vs off",
                    "## 5. the training step's plan against the device"):
        assert section in out
    assert "| norm_modulate | bfloat16 | kept |" in out  # interpreted Triton against its reference
    swap_rows = [line for line in out.splitlines() if line.startswith("| lora fp8, swap")]
    assert len(swap_rows) == 2 and all("| True |" in row for row in swap_rows)  # bit-identical losses
    plan_rows = [line for line in out.splitlines() if line.startswith("| lora bf16 |")]
    assert len(plan_rows) == 4 and all(float(row.split("|")[4]) > 0 for row in plan_rows)
