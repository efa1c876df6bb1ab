"""Reading checkpoint files and loading them into meta-built models.

One code path for real and test files: safetensors memory-mapped (a single file, a
sharded set with a `*.safetensors.index.json`, or a folder of shards; `.sft` is the same
format under another name, as ComfyUI and some repositories ship it), then
`load_state_dict(strict=True, assign=True)` into a model built on the meta device, so
that the tensors are used where they lie and a 24 GB file never exists twice.
"""
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def list_weight_files(path: str | Path) -> list[Path]:
    """The safetensors files that make up a checkpoint: a file, an index, or a folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        index = sorted(path.glob("*.safetensors.index.json"))
        if index:
            return list_weight_files(index[0])
        files = sorted(f for suffix in SAFETENSORS_SUFFIXES for f in path.glob(f"*{suffix}"))
        if not files:
            raise FileNotFoundError(f"no .safetensors (or .sft) files in folder {path}")
        return files
    if path.name.endswith(".index.json"):
        weight_map = json.loads(path.read_text())["weight_map"]
        return [path.parent / name for name in sorted(set(weight_map.values()))]
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return [path]
    if path.suffix not in SAFETENSORS_SUFFIXES:
        raise ValueError(f"{path}: expected a .safetensors (or .sft) file, a sharded index or a folder")
    return [path]


def file_identity(path: str | Path) -> str:
    """What changes when a checkpoint is replaced: its path, total size and newest mtime over
    the files that make it up (one file, the shards of an index, or a folder). Caches key on it."""
    path = Path(path)
    files = list_weight_files(path)
    size = sum(f.stat().st_size for f in files)
    mtime = max(f.stat().st_mtime_ns for f in files)
    return f"{path.resolve()}|{size}|{mtime}"


def load_state_dict(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint, memory-mapped; nothing is copied until used.

    Pickle files (.ckpt/.pt/.bin) can run code when loaded: they are refused unless
    allow_pickle=True, and even then are read with torch.load(weights_only=True)."""
    sd, source = {}, {}
    for file in list_weight_files(path):
        if file.suffix not in SAFETENSORS_SUFFIXES:
            if not allow_pickle:
                raise ValueError(
                    f"{file} is a pickle checkpoint, which can execute code when loaded. Convert it to "
                    "safetensors, or set allow_pickle=True to read it with torch.load(weights_only=True)."
                )
            obj = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            sd.update(obj.get("state_dict", obj))
            continue
        for key, tensor in read_safetensors(file).items():
            if key in source:  # e.g. a folder holding two whole checkpoints
                raise ValueError(
                    f"{key} is in both {source[key].name} and {file.name}: {path} holds more than one "
                    "checkpoint. Pass the one file you mean, or a sharded index."
                )
            sd[key], source[key] = tensor, file
    return sd


def strip_prefix(sd: dict, prefixes: tuple[str, ...]) -> tuple[dict, str]:
    """The keys under the first of `prefixes` that occurs, without it, and that prefix; the whole
    dict and "" when none occurs. An all-in-one checkpoint (SD3: model.diffusion_model.,
    first_stage_model., text_encoders.) thus gives each loader only its own section."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}, prefix
    return sd, ""


class CheckpointReadError(ValueError):
    """A checkpoint file that exists but cannot be read (truncated, damaged, or not safetensors)."""


def read_safetensors(file: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file (.safetensors or .sft), memory-mapped. A file that is
    not valid safetensors gives a CheckpointReadError naming it, not the library's traceback."""
    file = Path(file)
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as error:
        size = file.stat().st_size
        raise CheckpointReadError(
            f"{file} ({size:,} bytes) is not a readable safetensors file: {error}. It may be truncated "
            "(an interrupted download or copy) or not a checkpoint at all; download or copy it again."
        ) from None


def detect_family(sd: dict) -> str:
    """A best guess at what a state dict holds, for error messages."""
    keys = list(sd)

    def has(fragment: str) -> bool:
        return any(fragment in k for k in keys)

    if has("double_blocks.") or has("single_blocks."):
        return "flux"
    if has("joint_blocks."):
        return "sd3"
    if has("conditioner.embedders.") or (has("input_blocks.") and has("label_emb.")):
        return "sdxl"
    if has("input_blocks.") and has("encoder_proj"):
        return "deepfloyd"
    if has("encoder.down.") or has("decoder.up."):
        return "vae"
    if has("text_model.encoder.layers."):
        return "clip"
    if has("encoder.block.") and has("SelfAttention"):
        return "t5"
    return "unknown"


FAMILY_NAMES = {
    "flux": "a FLUX.1 transformer (flux1-dev/schnell.safetensors)",
    "sd3": "an SD3/SD3.5 checkpoint",
    "sdxl": "an SDXL checkpoint",
    "deepfloyd": "a DeepFloyd IF UNet",
    "vae": "an autoencoder (ae.safetensors or a VAE)",
    "clip": "a CLIP text encoder",
    "t5": "a T5 encoder",
    "unknown": "something unrecognised",
}


def check_family(sd: dict, family: str, required: tuple[str, ...]) -> None:
    """Raise a clear error when the state dict is not what this loader expects."""
    missing = [k for k in required if k not in sd]
    if not missing:
        return
    found = detect_family(sd)
    sample = ", ".join(list(sd)[:5])
    raise ValueError(
        f"expected {FAMILY_NAMES.get(family, family)}, but this file looks like {FAMILY_NAMES[found]} "
        f"(missing {missing[:3]}; first keys: {sample})"
    )


def target_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a checkpoint tensor gets in the model: the caller's, or the file's with fp8
    upcast to bf16 (fp8 storage is a separate, explicit choice)."""
    if not tensor.is_floating_point():
        return tensor.dtype
    if dtype is not None:
        return dtype
    return torch.bfloat16 if tensor.dtype in FP8_DTYPES else tensor.dtype


def load_into(model: nn.Module, sd: dict, dtype=None, device=None, what: str = "model") -> nn.Module:
    """Strictly load `sd` into a meta-built `model` by assignment.

    Tensors already in the wanted dtype and device are used as they are (for a memory-mapped
    file, no copy). Buffers the checkpoint does not carry (none for the released files) stay
    as built. Missing and unexpected keys are listed in the error."""
    expected = set(model.state_dict().keys())
    given = set(sd.keys())
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise ValueError(
            f"{what}: the checkpoint does not match the model "
            f"({len(missing)} missing, {len(unexpected)} unexpected).\n"
            f"  missing: {missing[:10]}{' ...' if len(missing) > 10 else ''}\n"
            f"  unexpected: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}\n"
            f"  this file looks like {FAMILY_NAMES[detect_family(sd)]}"
        )
    expected_shapes = {k: v.shape for k, v in model.state_dict().items()}
    converted = {}
    for key, tensor in sd.items():
        if tensor.shape != expected_shapes[key]:
            raise ValueError(f"{what}: {key} has shape {tuple(tensor.shape)}, model expects {tuple(expected_shapes[key])}")
        converted[key] = tensor.to(device=device, dtype=target_dtype(tensor, dtype))
    model.load_state_dict(converted, strict=True, assign=True)
    return model
