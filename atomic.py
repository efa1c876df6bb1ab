"""Writing files so that a crash, a kill or a full disk never leaves half of one.

Every file the trainer writes (LoRA and model files, cache entries, states, metrics, plots,
samples, the run's config) goes through `write_file`: the content is written to a temporary
name beside the target (a dot-file ending in .tmp, never mistaken for the real thing),
flushed to disk, then renamed over the target in one step. Readers see the old file or the
new one, never a mixture.
"""
import json
import math
import os
import struct
from pathlib import Path
from typing import Callable, Iterable

import safetensors.torch
import torch
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


SAFETENSORS_DTYPES = {  # torch dtype -> the format's name
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def write_safetensors_streaming(path: str | Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                                tensors: Iterable[Tensor], metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file written one tensor at a time, for files larger than memory: `layout`
    names every tensor's key, dtype and shape up front (the header comes first), then `tensors`
    yields them in that order; each is written and dropped. Same atomic rename as write_file."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, dtype, shape in layout:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as file:
            file.write(struct.pack("<Q", len(encoded)) + encoded)
            for (key, dtype, shape), tensor in zip(layout, tensors, strict=True):
                if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                    raise ValueError(f"{key}: got {tensor.dtype} {tuple(tensor.shape)}, the header says {dtype} {shape}")
                file.write(memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))

    return write_file(path, write)
