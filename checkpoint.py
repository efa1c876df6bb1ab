"""Resumable training state: one folder per saved step under <run>/state/.

A state folder holds the trainable weights (safetensors), the optimizer, scheduler and
EMA state, the RNG states, the position in the data order and the resolved config.
It is written to a temporary folder and renamed into place, so a crash mid-save never
leaves a folder that looks complete; saving a step that already has a folder (a run
restarted from an older state) moves the old one aside first and deletes it only once the
new one is in place. The last `keep_last` folders are kept.
"""
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import atomic

STATE_DIR = "state"
PREFIX = "step_"
REPLACED = ".replaced_"  # an old folder of the same step, while its successor moves in


def state_dirs(run_dir: Path) -> list[Path]:
    """Complete state folders, oldest first."""
    root = Path(run_dir) / STATE_DIR
    if not root.is_dir():
        return []
    _recover(root)
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def _recover(root: Path) -> None:
    """A crash between moving an old folder aside and moving its successor in: put it back."""
    for old in root.glob(f"{REPLACED}{PREFIX}*"):
        final = root / old.name[len(REPLACED) :]
        if final.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, final)


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked (an existing run, no state to resume)."""


RUN_FILES = ("metrics.jsonl", "config.py", STATE_DIR)  # what shows that a folder holds a run


def holds_run(run_dir: Path, run_name: str) -> bool:
    run_dir = Path(run_dir)
    return any((run_dir / name).exists() for name in RUN_FILES) or any(run_dir.glob(f"{run_name}*.safetensors"))


def claim_run_dir(run_dir: Path, run_name: str, resume: str, overwrite: bool) -> None:
    """Before anything is written: a fresh run never mixes with an existing one. With
    overwrite, the old run is moved aside (renamed, not deleted)."""
    run_dir = Path(run_dir)
    if resume or not holds_run(run_dir, run_name):
        return
    if not overwrite:
        raise RunFolderError(
            f"{run_dir} already holds a run. Continue it with --resume=latest, start a new one with "
            f"--run_name=<another name>, or move it aside with --overwrite=True.")
    aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(run_dir, aside)
    print(f"moved the previous run aside to {aside}")


def find_resume_dir(run_dir: Path, resume: str) -> Path | None:
    """resume = "" (fresh start), "latest" (the newest state of this run; an error if there is
    none), "auto" (the newest state if there is one, else a fresh start: for job schedulers)
    or a state folder path."""
    if not resume:
        return None
    if resume in ("latest", "auto"):
        dirs = state_dirs(run_dir)
        if dirs:
            return dirs[-1]
        if resume == "auto":
            return None
        raise RunFolderError(f"--resume=latest: no saved state in {Path(run_dir) / STATE_DIR}. Check run_name and "
                             "output_dir, or use --resume=auto to start fresh when there is nothing to resume.")
    path = Path(resume)
    if not (path / "state.json").exists():
        raise RunFolderError(f"resume={resume!r}: no state.json there; pass a folder like {run_dir}/state/step_000100")
    return path


def config_changes(saved: dict, current: dict, frozen: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(refused, accepted) differences between a state's config and the resuming one: keys in
    `frozen` cannot change under trained weights; the others may."""
    refused, accepted = [], []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if _same(old, new):
            continue
        (refused if key in frozen else accepted).append(f"{key}: {old!r} -> {new!r}")
    return refused, accepted


def _same(a, b) -> bool:
    """Equal as JSON stores them (tuples come back as lists)."""
    return json.loads(json.dumps(a, default=str)) == json.loads(json.dumps(b, default=str))


def save_state(run_dir: Path, step: int, trainable: dict, optimizer, scheduler, ema, info: dict, keep_last: int) -> Path:
    """Write everything needed to continue from `step`; returns the folder."""
    tmp = begin_state(run_dir, step)
    atomic.write_safetensors({k: v.detach().contiguous().cpu() for k, v in trainable.items()},
                             tmp / "trainable.safetensors")
    extra = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "rng": info.pop("rng"),
    }
    return commit_state(run_dir, step, extra, info, keep_last)


def state_tmp_dir(run_dir: Path, step: int) -> Path:
    """Where a state is written before it moves into place."""
    return Path(run_dir) / STATE_DIR / f".tmp_{PREFIX}{step:06d}"


def begin_state(run_dir: Path, step: int) -> Path:
    """An empty temporary folder for the state of `step` (weights go in first)."""
    tmp = state_tmp_dir(run_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_state(run_dir: Path, step: int, extra: dict, info: dict, keep_last: int) -> Path:
    """The rest of a state (optimizer, scheduler, EMA, RNG in training_state.pt; state.json),
    then the folder moves into place and the oldest beyond `keep_last` go."""
    root, tmp = Path(run_dir) / STATE_DIR, state_tmp_dir(run_dir, step)
    final = root / f"{PREFIX}{step:06d}"
    atomic.write_file(tmp / "training_state.pt", lambda path: torch.save(extra, path))
    atomic.write_text(tmp / "state.json", json.dumps({"step": step, **info}, indent=1))
    replaced = root / f"{REPLACED}{final.name}"
    if final.exists():
        os.replace(final, replaced)
    os.replace(tmp, final)  # the folder appears complete or not at all
    if replaced.exists():
        shutil.rmtree(replaced)
    for old in state_dirs(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
    return final


def load_state(state_dir: Path) -> tuple[dict, dict, dict]:
    """(trainable tensors, training_state with optimizer/scheduler/ema/rng, state.json info).
    A sharded state (FSDP, torch.distributed.checkpoint) is read into memory here: its weights,
    and its optimizer state and EMA shadows by parameter name."""
    state_dir = Path(state_dir)
    extra, info = load_info(state_dir)
    import distributed

    if distributed.is_sharded(state_dir):
        sharded = distributed.read_sharded(state_dir)
        extra = {**extra, "optimizer": sharded["optimizer"], "ema_shadow": sharded.get("ema")}
        return sharded["model"], extra, info
    return load_file(str(state_dir / "trainable.safetensors")), extra, info


def load_trained(state_dir: Path, trainable: dict, opt) -> tuple[dict, dict]:
    """A state's trainable weights, optimizer state and EMA into a run's (training.Optimization
    `opt`). Returns (training_state, state.json info) for the rest: scheduler, RNG, data order."""
    import optim

    saved, extra, info = load_state(state_dir)
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(saved[name])
    (opt.fused or opt.optimizer).load_state_dict(extra["optimizer"])
    if opt.fused is None:
        optim.restore_state_dtypes_(opt.optimizer, extra["optimizer"])
    if opt.ema is not None and extra["ema"] is not None:
        opt.ema.load_state_dict(extra["ema"])
    return extra, info


def load_info(state_dir: Path) -> tuple[dict, dict]:
    """(training_state.pt, memory-mapped: optimizer, scheduler, EMA, RNG; state.json info)."""
    extra = torch.load(Path(state_dir) / "training_state.pt", map_location="cpu", weights_only=True, mmap=True)
    return extra, json.loads((Path(state_dir) / "state.json").read_text())


def rng_state(generator: torch.Generator) -> dict:
    """Every random stream the loop draws from: the noise/timestep generator and torch's global RNG
    (LoRA dropout)."""
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Settings that cannot change under trained weights (or without changing what the next batches
# are); everything else may change on resume and takes effect. The family adds its LoRA keys.
# batch_size is per GPU: the global batch (batch_size x GPUs, in the run identity) is what stays.
FROZEN_ON_RESUME = ("model_family", "train_mode", "network_dim", "network_alpha", "group_ranks", "optimizer",
                    "resolution", "repeats", "crop", "seed", "dtype", "caption_ext", "instance_prompt",
                    "targets", "use_dora", "split_qkv", "text_encoder_lr")


def run_identity(cfg: dict, dataset_fingerprint: str, gpus: int = 1) -> dict:
    """What a state records about the run besides its config: the model file, the dataset and
    the global batch (a resume on another number of GPUs keeps batch_size x GPUs)."""
    from models.loading import list_weight_files

    files = list_weight_files(cfg["model_path"])
    return {"model": f"{Path(cfg['model_path']).name} ({sum(f.stat().st_size for f in files)} bytes)",
            "dataset": dataset_fingerprint, "global_batch": cfg["batch_size"] * gpus}


def check_resume(resume_dir: Path, cfg: dict, family_keys: tuple[str, ...], identity: dict) -> None:
    """Refuse a resume whose config changes what trained (listing each difference); print the
    changes that take effect."""
    info = json.loads((resume_dir / "state.json").read_text())
    saved = {**info.get("config", {}), **info.get("identity", {})}
    saved.setdefault("global_batch", saved.get("batch_size"))  # states from before several GPUs: one GPU
    current = {**cfg, **identity}
    frozen = FROZEN_ON_RESUME + family_keys + ("model", "dataset", "global_batch")
    ignore = ("resume", "overwrite", "model_path", "dataset_dir", "cache_dir", "output_dir")  # where, not what
    refused, accepted = config_changes({k: v for k, v in saved.items() if k not in ignore},
                                                  {k: v for k, v in current.items() if k not in ignore}, frozen)
    if refused:
        raise RunFolderError(
            f"cannot resume {resume_dir}: these settings differ from the run's and cannot change under trained "
            "weights:\n  " + "\n  ".join(refused) + "\nStart a new run (--run_name=...) or put them back.")
    if accepted:
        print("resuming with changed settings (they take effect now):\n  " + "\n  ".join(accepted))
