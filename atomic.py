"""Writing files so that a crash, a kill or a full disk never leaves half of one.

Every file the trainer writes (LoRA and model files, cache entries, states, metrics, plots,
samples, the run's config) goes through `write_file`: the content is written to a temporary
name beside the target (a dot-file ending in .tmp, never mistaken for the real thing),
flushed to disk, then renamed over the target in one step. Readers see the old file or the
new one, never a mixture.
"""
import os
from pathlib import Path
from typing import Callable

import safetensors.torch
from torch import Tensor


def write_file(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` to produce the content, then move it into place at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as file:
            os.fsync(file.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_safetensors(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file; metadata values must be strings (the format stores only strings)."""
    metadata = dict(metadata or {})
    not_strings = sorted(k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str))
    if not_strings:
        raise TypeError(f"safetensors metadata values must be strings; convert these keys: {not_strings}")
    return write_file(path, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=metadata))
