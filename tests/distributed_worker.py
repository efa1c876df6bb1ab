"""train.py's command line (train.run_cli), run several times in each process torchrun starts,
with faults injected on one rank; what each run returned goes to a JSON file per rank. Used by
tests/test_distributed.py:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py JOBS.json

JOBS.json is a list of {"argv": [...], "rank": r, "stop_at": n, "fail_caching": bool, "script": bool}:
on rank r, SIGTERM arrives during the n-th batch load (as a scheduler's would), or the latent
cache fails; "script" runs train.py itself as `torchrun ... train.py ARGV` would (its __main__
block, fresh from the file) and keeps its output.
"""
import contextlib
import faulthandler
import io
import json
import os
import runpy
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cache  # noqa: E402
import distributed  # noqa: E402
import train  # noqa: E402


def run(job: dict) -> dict:
    rank = int(os.environ["RANK"])
    faulty = rank == job.get("rank", -1)
    real_load, real_build, calls = train.load_batch, cache.LatentCache.build, {"n": 0}

    def load_batch(dataset, indices, device):
        calls["n"] += 1
        if faulty and calls["n"] == job.get("stop_at"):
            os.kill(os.getpid(), signal.SIGTERM)
        return real_load(dataset, indices, device)

    def build(self, items, *args, **kwargs):
        if faulty and job.get("fail_caching"):
            raise cache.ImageReadError("cannot read image broken.png (injected on this rank)")
        return real_build(self, items, *args, **kwargs)

    train.load_batch, cache.LatentCache.build = load_batch, build
    sys.argv = ["train.py", *job["argv"]]
    errors, output = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(output):
            code = script() if job.get("script") else train.run_cli()
    finally:
        train.load_batch, cache.LatentCache.build = real_load, real_build
    return {"code": code, "stderr": errors.getvalue()[-3000:], "stdout": output.getvalue()[-3000:]}


def script() -> int:
    """train.py run as a program: its `if __name__ == "__main__"` block, exit status and all."""
    try:
        runpy.run_path(str(Path(__file__).resolve().parents[1] / "train.py"), run_name="__main__")
    except SystemExit as exit:
        return exit.code
    return 0


if __name__ == "__main__":
    faulthandler.enable()  # a crash in C++ (gloo) prints every thread's Python stack
    jobs_file = Path(sys.argv[1])
    results = [run(job) for job in json.loads(jobs_file.read_text())]
    jobs_file.with_suffix(f".rank{os.environ['RANK']}.json").write_text(json.dumps(results))
    distributed.shutdown()
    # Leave without interpreter shutdown. After FSDP2 (DTensor) has used the process group, torch
    # keeps the group alive past destroy_process_group, and gloo's worker threads with it; one that
    # frees the last collective's tensors while the interpreter shuts down needs the GIL, cannot
    # have it, and aborts the process ("terminate called without an active exception": about 1
    # run in 10 on 2 cores, always after this point, seen under gdb).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
