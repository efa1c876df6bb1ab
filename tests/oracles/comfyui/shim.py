"""Stand-ins for the ComfyUI modules that the vendored files (comfy/lora.py, comfy/utils.py,
comfy/lora_convert.py, comfy/weight_adapter/) import but that are not vendored: each pulls in the
whole application (device management, every model class, the command line parser). Ours, not
ComfyUI's; install() must run before anything imports `comfy.*`.

  comfy.model_management  only `cast_to_device(tensor, device, dtype, copy=False)` is called (by
                          calculate_weight and the adapters). ComfyUI's version (model_management.py
                          at the vendored commit) returns the tensor itself when device and dtype
                          already match and copy is False, else a converted copy; so does this one,
                          with tensor.to (the non-blocking flag only matters between devices).
  comfy.model_base        lora.py asks isinstance(model, comfy.model_base.Flux / SD3 / ...) to pick
                          the family's extra key names. Here every attribute is an empty class,
                          made once per name, so a stand-in model of class model_base.Flux takes
                          the FLUX branch exactly as ComfyUI's Flux model does.
  comfy.cli_args          utils.py reads args.mmap_torch_files and args.disable_mmap at import
                          (for load_torch_file, which the tests do not call): both False, ComfyUI's
                          defaults.
  comfy.checkpoint_pickle utils.py imports it for torch.load of pickle files (not called): empty.
"""
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent  # holds the vendored `comfy` folder


def cast_to_device(tensor: torch.Tensor, device, dtype, copy: bool = False) -> torch.Tensor:
    if not copy and tensor.device == torch.device(device) and (dtype is None or tensor.dtype == dtype):
        return tensor
    return tensor.to(device=device, dtype=dtype, copy=copy)


class _ModelClasses(types.ModuleType):
    """comfy.model_base: any attribute is an (empty) class, the same object every time."""

    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        cls = type(name, (), {"__module__": "comfy.model_base"})
        setattr(self, name, cls)
        return cls


def install() -> None:
    """Put the stand-ins into sys.modules and the vendored files on sys.path (idempotent)."""
    if "comfy.model_management" in sys.modules:
        return
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import comfy  # the vendored folder, a namespace package (ComfyUI's comfy/ has no __init__.py)

    management = types.ModuleType("comfy.model_management")
    management.cast_to_device = cast_to_device
    cli_args = types.ModuleType("comfy.cli_args")
    cli_args.args = types.SimpleNamespace(mmap_torch_files=False, disable_mmap=False)
    stand_ins = {
        "model_management": management,
        "model_base": _ModelClasses("comfy.model_base"),
        "cli_args": cli_args,
        "checkpoint_pickle": types.ModuleType("comfy.checkpoint_pickle"),
    }
    for name, module in stand_ins.items():
        sys.modules[f"comfy.{name}"] = module
        setattr(comfy, name, module)  # `comfy.model_management.cast_to_device` is looked up this way
