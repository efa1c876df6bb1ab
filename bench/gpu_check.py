"""The first thing to run on a machine with a CUDA GPU: everything this project has only
planned or tested on the CPU, checked on the device, as tables a person can paste.

    python bench/gpu_check.py            # about 5 minutes on one large GPU
    python bench/gpu_check.py --device cpu --tiny   # the same code on tiny shapes (the test runs this)

  1. the CUDA-only tests (side stream, events and pinned memory of block swap, ...)
  2. the kernel self-check (each fused kernel against its torch reference, on the device)
  3. kernel timings: eager torch, torch.compile and Triton (bench/kernels.py)
  4. block swap on vs off: the same losses bit for bit, and the step time of each
  5. the memory plan against the device: one real training step of a FLUX-shaped model with
     random weights at full width (2 double + 4 single blocks) at 512 and 1024 px, for
     settings like the configs', measured peak (torch.cuda.max_memory_allocated) next to the
     plan's figure for the same model and setting

Without CUDA (and without --device cpu) it says so and exits 0.
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import families  # noqa: E402
from activations import offload_activations  # noqa: E402
import plan  # noqa: E402
import training  # noqa: E402
from config import DEFAULTS, DTYPES  # noqa: E402
from models.flux import FluxParams  # noqa: E402
from models.layers import using_kernels  # noqa: E402

FLUX = families.get("flux")
GiB = 2**30

# Config-like settings for section 5 (and 4): what the shipped configs switch on.
SETTINGS = {
    "lora bf16": dict(),
    "lora fp8 base": dict(fp8_base=True),
    "lora fp8 + swap + offload": dict(fp8_base=True, double_blocks_to_swap=0, single_blocks_to_swap=2,
                                      offload_activations=True),
    "lora fp8 + h2d swap + fused adafactor": dict(fp8_base=True, single_blocks_to_swap=2, swap_mode="h2d_only",
                                                   optimizer="adafactor", fused_backward=True, max_grad_norm=0.0),
    "full bf16 + fused adafactor + swap": dict(train_mode="full", optimizer="adafactor", fused_backward=True,
                                               max_grad_norm=0.0, single_blocks_to_swap=2),
}


def model_params(tiny: bool) -> FluxParams:
    """FLUX.1-dev at full width with 2 double + 4 single blocks (tiny: width 128)."""
    if tiny:
        return FluxParams(hidden_size=128, num_heads=2, depth=2, depth_single_blocks=4, axes_dim=[16, 24, 24],
                          context_in_dim=64, vec_in_dim=32)
    return FluxParams(depth=2, depth_single_blocks=4)


def setting_config(name: str, resolution: int, tiny: bool) -> dict:
    return {**DEFAULTS, "model_family": "flux", "resolution": resolution, "ae_path": "ae.safetensors",
            "t5_max_length": 16 if tiny else 512, **SETTINGS[name]}


# --- 1, 2, 3 ----------------------------------------------------------------------------------------


def cuda_only_tests() -> str:
    """The tests that skip without CUDA, run here."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "tests", "-k", "cuda"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-500:]


def kernel_self_check(device: str) -> list[str]:
    import kernels

    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        start = time.perf_counter()
        verdicts = kernels.self_check(device, dtype=dtype)
        seconds = time.perf_counter() - start
        for name, reason in verdicts.items():
            rows.append(f"| {name} | {str(dtype).removeprefix('torch.')} | {'kept' if reason is None else reason} |")
        rows.append(f"| (all) | {str(dtype).removeprefix('torch.')} | {seconds:.2f} s |")
    return ["| kernel | dtype | verdict |", "|---|---|---|"] + rows


def kernel_timings(device: str, tiny: bool) -> None:
    """bench/kernels.py's table (loaded by path: it shares its name with the project's kernels.py)."""
    import importlib.util

    import kernels

    if device != "cuda" and not kernels.INTERPRETED:
        print("(skipped: Triton kernels run on the CPU only under TRITON_INTERPRET=1)")
        return
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.print_timings(device, tiny=tiny)


# --- 4, 5: real training steps ----------------------------------------------------------------------


def real_steps(cfg: dict, params: FluxParams, device: str, steps: int = 3, seed: int = 0) -> tuple[list, float, int]:
    """`steps` training steps of a random FLUX-shaped model through training.py: (losses,
    seconds per step after the first, peak bytes allocated on the device during the steps)."""
    torch.manual_seed(seed)
    model = FLUX.build(params).to(DTYPES[cfg["dtype"]]).requires_grad_(False)
    if cfg["fp8_base"]:
        import fp8

        fp8.quantize_linears_(model, [b for g in FLUX.blocks(model).values() for b in g], per_row=cfg["fp8_per_row"])
    prepared = training.prepare(model, FLUX, cfg, device)
    opt = training.build_optimization(prepared.trainable, cfg, seed=seed)
    objective, generator = FLUX.objective(cfg), torch.Generator().manual_seed(seed)
    losses, times = [], []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps):
        start = time.perf_counter()
        batch = {k: v.to(device) for k, v in FLUX.plan_batch(cfg, params, "cpu").items()}
        with offload_activations(cfg["offload_activations"], pin_memory=cfg["pin_memory"]):
            loss = training.training_loss(FLUX, objective, prepared.model, batch, cfg, generator)[0]
        loss.backward()
        training.close_gradients(opt, cfg)
        training.apply_step(opt, step + 1)
        losses.append(loss.item())
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    return losses, sum(times[1:]) / max(len(times) - 1, 1), peak


def swap_on_off(device: str, tiny: bool) -> list[str]:
    """The same three steps with block swap off and on: identical losses, and the step times."""
    params = model_params(tiny)
    rows = ["| setting | losses equal | s/step off | s/step on |", "|---|---|---|---|"]
    for mode in ("exchange", "h2d_only"):
        base = setting_config("lora fp8 base", 512 if not tiny else 32, tiny)
        off, t_off, _ = real_steps(dict(base, kernels="torch"), params, device)
        on, t_on, _ = real_steps(dict(base, kernels="torch", single_blocks_to_swap=2, double_blocks_to_swap=0,
                                      swap_mode=mode), params, device)
        rows.append(f"| lora fp8, swap {mode} | {off == on} | {t_off:.3f} | {t_on:.3f} |")
    return rows


def planned_vs_measured(device: str, tiny: bool) -> list[str]:
    rows = ["| setting | px | kernels | planned GiB | measured GiB | measured / planned |", "|---|---|---|---|---|---|"]
    params = model_params(tiny)
    for name in SETTINGS:
        for resolution in ((32, 64) if tiny else (512, 1024)):
            for kernels in ("torch", "auto"):
                cfg = setting_config(name, resolution, tiny) | {"kernels": kernels}
                planned = plan.plan(cfg, params)["phases"]["training"]
                with using_kernels(kernels):
                    _, _, measured = real_steps(cfg, params, device, steps=2)
                ratio = f"{measured / planned:.3f}" if measured else "n/a (no CUDA)"
                rows.append(f"| {name} | {resolution} | {kernels} | {planned / GiB:.3f} | {measured / GiB:.3f} | {ratio} |")
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke test of the same code)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible, so there is nothing to check here "
              "(python bench/gpu_check.py --device cpu --tiny runs the same code on tiny CPU shapes).")
        return 0
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"# gpu_check on {name}: torch {torch.__version__}, CUDA {torch.version.cuda}\n")
    if args.device == "cuda":
        print("## 1. CUDA-only tests\n\n" + cuda_only_tests() + "\n")
    print("## 2. kernel self-check\n\n" + "\n".join(kernel_self_check(args.device)) + "\n")
    print("## 3. kernel timings\n")
    kernel_timings(args.device, args.tiny)
    print("\n## 4. block swap on vs off\n\n" + "\n".join(swap_on_off(args.device, args.tiny)) + "\n")
    print("## 5. the training step's plan against the device\n\n" + "\n".join(planned_vs_measured(args.device, args.tiny)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
