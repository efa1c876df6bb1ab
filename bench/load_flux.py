"""Loading benchmark: our memory-mapped loader against the usual load-then-copy.

Writes a FLUX-layout safetensors file of about 2 GB (full width 3072, random bf16 weights,
2 double + 2 single blocks by default), then, each in a fresh Python process:

  ours      models.loading.load_state_dict + Flux.from_state_dict(dtype=bfloat16):
            the model is built on the meta device and the file's tensors are assigned;
  baseline  safetensors.torch.load_file + Flux(params) built on CPU in bf16 +
            model.load_state_dict(sd): the usual way, which holds the weights twice.

Both then read every weight once (a checksum, as moving the model to a GPU would), so
that the lazily mapped file is really paged in. Reported: wall time to a loaded model,
time including that read, and the peak resident set (VmHWM) of the process, which counts
file pages mapped in as well as allocated memory. Ours should stay under file size + 10%.

    python bench/load_flux.py                      # temp file, deleted afterwards
    python bench/load_flux.py --path /tmp/f.safetensors --keep
    python bench/load_flux.py --warm               # do not drop the page cache first

Not part of the test suite (it writes ~2 GB and takes a minute).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from models.flux import Flux, FluxParams  # noqa: E402
from models.loading import load_state_dict  # noqa: E402

GB = 1e9


def bench_params(double: int, single: int) -> FluxParams:
    """The released FLUX.1 dev widths with fewer blocks (2 + 2 blocks is about 2.05 GB in bf16)."""
    return FluxParams(depth=double, depth_single_blocks=single)


# --- the file -------------------------------------------------------------------------------


def write_checkpoint(path: Path, params: FluxParams) -> None:
    """Random bf16 weights in the original key layout; written to a temp name, then renamed."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Flux(params).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith(".scale"):  # RMSNorm scales
            sd[key] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            sd[key] = (torch.randn(shape, generator=generator, dtype=torch.bfloat16) * 0.02)
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp))
    os.replace(tmp, path)


def drop_page_cache(path: Path) -> str:
    """Evict the file from the page cache so that the next load reads the disk.
    Returns how ('drop_caches', 'fadvise') or 'warm' when neither worked."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")  # needs root
        return "cold (drop_caches)"
    except OSError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages of this file only
        os.close(fd)
        return "cold (fadvise DONTNEED)"
    except (OSError, AttributeError):
        return "warm"


def cached_kb() -> int | None:
    """The kernel's page cache size (/proc/meminfo Cached), to show the drop took effect."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("Cached:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


# --- what runs in the fresh processes ---------------------------------------------------------


def memory_status() -> dict[str, int]:
    """Peak and current resident set in bytes (Linux /proc; ru_maxrss elsewhere)."""
    status = Path("/proc/self/status")
    if status.exists():
        fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        kb = {k: int(fields[k].split()[0]) for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile") if k in fields}
        return {k: v * 1024 for k, v in kb.items()}
    return {"VmHWM": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def read_every_weight(model: torch.nn.Module) -> float:
    """Sum every weight in 1 M-element chunks: pages the whole file in without a big copy."""
    total = 0.0
    for tensor in model.state_dict().values():
        for chunk in tensor.reshape(-1).split(1 << 20):
            total += chunk.float().sum().item()
    return total


def load_ours(path: str) -> torch.nn.Module:
    return Flux.from_state_dict(load_state_dict(path), dtype=torch.bfloat16)


def load_baseline(path: str, params: FluxParams) -> torch.nn.Module:
    from safetensors.torch import load_file

    sd = load_file(path)
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly, not fp32 then convert
    model = Flux(params)
    model.load_state_dict(sd, strict=True)
    del sd
    return model


def child(mode: str, path: str, double: int, single: int) -> None:
    before = memory_status()
    start = time.perf_counter()
    model = load_ours(path) if mode == "ours" else load_baseline(path, bench_params(double, single))
    loaded = time.perf_counter()
    after_load = memory_status()
    read_every_weight(model)
    done = time.perf_counter()
    print(json.dumps({
        "mode": mode,
        "load_s": loaded - start,
        "load_and_read_s": done - start,
        "rss_before_bytes": before.get("VmRSS"),
        "rss_after_load_bytes": after_load.get("VmRSS"),
        "peak_rss_bytes": memory_status()["VmHWM"],
        "final": memory_status(),
        "dtype": str(next(model.parameters()).dtype),
    }))


# --- the driver ------------------------------------------------------------------------------


def run_child(mode: str, path: Path, args) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--path", str(path),
               "--double", str(args.double), "--single", str(args.single)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{mode} process failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(path: Path, results: list[dict], cache: list[str]) -> None:
    size = path.stat().st_size
    print(f"file: {path} ({size / GB:.3f} GB); torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(f"{'':9} {'load s':>8} {'+read s':>8} {'RSS before':>11} {'peak RSS':>9} {'peak/file':>9}  cache")
    for r, c in zip(results, cache):
        print(f"{r['mode']:9} {r['load_s']:8.2f} {r['load_and_read_s']:8.2f} "
              f"{r['rss_before_bytes'] / GB:9.3f}GB {r['peak_rss_bytes'] / GB:7.3f}GB "
              f"{r['peak_rss_bytes'] / size:9.2f}  {c}")
    # The peak includes the interpreter, torch and its libraries (the 'RSS before'), which
    # is there whatever the loader does; the second check is what loading itself added.
    ours = next(r for r in results if r["mode"] == "ours")
    limit = 1.10 * size
    added = ours["peak_rss_bytes"] - ours["rss_before_bytes"]
    for what, value in (("peak RSS", ours["peak_rss_bytes"]), ("peak RSS - RSS before", added)):
        ok = value <= limit
        print(f"ours: {what} = {value / GB:.3f} GB {'<=' if ok else '>'} file size + 10% ({limit / GB:.3f} GB): "
              f"{'yes' if ok else 'NO'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", type=Path, help="checkpoint to write (if missing) and load; default: a temp file")
    parser.add_argument("--double", type=int, default=2, help="double blocks in the written file")
    parser.add_argument("--single", type=int, default=2, help="single blocks in the written file")
    parser.add_argument("--keep", action="store_true", help="keep the written file")
    parser.add_argument("--warm", action="store_true", help="do not drop the page cache before each load")
    parser.add_argument("--child", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, str(args.path), args.double, args.single)

    tmpdir = None
    if args.path is None:
        tmpdir = tempfile.mkdtemp(prefix="flux_load_bench_")
        args.path = Path(tmpdir) / "flux-bench.safetensors"
    written = not args.path.exists()
    if written:
        start = time.perf_counter()
        write_checkpoint(args.path, bench_params(args.double, args.single))
        print(f"wrote {args.path} in {time.perf_counter() - start:.1f} s")
    try:
        results, cache = [], []
        for mode in ("ours", "baseline"):
            before = cached_kb()
            how = "warm" if args.warm else drop_page_cache(args.path)
            after = cached_kb()
            if before is not None and not args.warm:
                how += f", page cache {before / 1e6:.2f} -> {after / 1e6:.2f} GB"
            cache.append(how)
            results.append(run_child(mode, args.path, args))
        report(args.path, results, cache)
    finally:
        if written and not args.keep:
            args.path.unlink(missing_ok=True)
            if tmpdir:
                os.rmdir(tmpdir)


if __name__ == "__main__":
    main()
