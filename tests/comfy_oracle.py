"""ComfyUI as an oracle for LoRA files: its own key map, loader and patch arithmetic, vendored
unchanged under tests/oracles/comfyui/ (see the README there for origin, commit and the shim).

  comfy_key_map(family, unet_keys)   ComfyUI's key map for a diffusion model: LoRA key prefix ->
                                     model key, or (model key, (dim, offset, size)) for a slice
  comfy_clip_key_map(te_keys)        the same for text encoders (ComfyUI's clip_l./clip_g./t5xxl. names)
  comfy_load(lora_sd, key_map)       convert_lora + load_lora: (patches, keys ComfyUI leaves unloaded)
  comfy_apply(weights, patches, s)   ModelPatcher.add_patches + calculate_weight: the patched weights

ComfyUI's functions take its model object. The stand-in built here has what they read: a
state_dict() with the diffusion model's keys under `diffusion_model.` (as ComfyUI's BaseModel holds
it), model_config.unet_config with the fields its *_to_diffusers helpers read (derived from the
keys, and from shapes where a width is needed), and the class comfy.model_base.<Family> that
model_lora_keys_unet tests with isinstance to add the family's diffusers names.
"""
import re
from collections.abc import Mapping
from types import SimpleNamespace

import torch

from oracles.comfyui import shim

shim.install()
import comfy.lora  # noqa: E402  (the vendored files, after the shim)
import comfy.lora_convert  # noqa: E402
import comfy.model_base  # noqa: E402
from log_capture import logged

# family name -> ComfyUI's model class for it (comfy/model_base.py names)
MODEL_CLASSES = {"flux": "Flux", "sd3": "SD3", "sdxl": "SDXL"}


def _count(keys, pattern: str) -> int:
    """How many distinct indices (\\d+) in `pattern` occur among the keys."""
    regex = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := regex.match(k))})


def _flux_config(keys, shapes) -> dict:
    """What flux_to_diffusers reads: block counts, and the width for the q/k/v/mlp slices."""
    if "img_in.weight" not in shapes:
        raise ValueError("a FLUX key map needs shapes (the width sets the q/k/v slices): pass {key: tensor or shape}")
    return dict(depth=_count(keys, r"double_blocks\.(\d+)\."),
                depth_single_blocks=_count(keys, r"single_blocks\.(\d+)\."),
                hidden_size=tuple(shapes["img_in.weight"])[0])


def _sd3_config(keys, shapes) -> dict:
    """What mmdit_to_diffusers reads: depth (width / 64, the slice size) and the number of joint blocks."""
    blocks = _count(keys, r"joint_blocks\.(\d+)\.")
    width = tuple(shapes["x_embedder.proj.weight"])[0] if "x_embedder.proj.weight" in shapes else 64 * blocks
    return dict(depth=width // 64, num_blocks=blocks)


def _sdxl_config(keys, shapes) -> dict:
    """What unet_to_diffusers reads, from the LDM UNet's key names: per level the ResBlock count, and
    per input / output block the number of transformer blocks (the output list in the order
    ComfyUI's UNet pops it: last output block first)."""

    def transformers_in(prefix: str) -> int:
        return _count(keys, re.escape(prefix) + r"\.1\.transformer_blocks\.(\d+)\.")

    n_input = _count(keys, r"input_blocks\.(\d+)\.")
    downsamples = [n for n in range(n_input) if f"input_blocks.{n}.0.op.weight" in keys]
    bounds = [0, *downsamples, n_input]  # input block 0 is conv_in
    num_res_blocks = [bounds[i + 1] - bounds[i] - 1 for i in range(len(bounds) - 1)]
    if num_res_blocks[-1] == 0:  # a downsample after the last level (unet_to_diffusers names one)
        num_res_blocks.pop()
    resnets = [n for n in range(1, n_input) if n not in downsamples]
    n_output = _count(keys, r"output_blocks\.(\d+)\.")
    return dict(num_res_blocks=num_res_blocks, channel_mult=[None] * len(num_res_blocks),
                transformer_depth=[transformers_in(f"input_blocks.{n}") for n in resnets],
                transformer_depth_output=[transformers_in(f"output_blocks.{n}") for n in reversed(range(n_output))],
                transformer_depth_middle=transformers_in("middle_block"))


CONFIGS = {"flux": _flux_config, "sd3": _sd3_config, "sdxl": _sdxl_config}


def stand_in_model(family_name: str, unet_state_dict_keys):
    """The object ComfyUI's model_lora_keys_unet takes, for a model with these keys."""
    shapes = {k: getattr(v, "shape", v) for k, v in unet_state_dict_keys.items()} \
        if isinstance(unet_state_dict_keys, Mapping) else {}
    keys = list(unet_state_dict_keys)
    model_class = getattr(comfy.model_base, MODEL_CLASSES[family_name])

    class StandIn(model_class):
        model_config = SimpleNamespace(unet_config=CONFIGS[family_name](keys, shapes))

        def state_dict(self):
            return dict.fromkeys(f"diffusion_model.{k}" for k in keys)

    return StandIn()


def comfy_key_map(family_name: str, unet_state_dict_keys) -> dict:
    """ComfyUI's LoRA key map for a `family_name` ("flux", "sd3", "sdxl") diffusion model with these
    state-dict keys (original layout, no prefix). Pass a {key: tensor or shape} mapping where widths
    are needed (FLUX; SD3 for its slice size)."""
    return comfy.lora.model_lora_keys_unet(stand_in_model(family_name, unet_state_dict_keys), {})


def comfy_clip_key_map(text_encoder_state_dict_keys) -> dict:
    """ComfyUI's key map for text encoders, keys as ComfyUI names them: clip_l.transformer.text_model...,
    clip_g.transformer..., t5xxl.transformer...."""
    keys = list(text_encoder_state_dict_keys)
    return comfy.lora.model_lora_keys_clip(SimpleNamespace(state_dict=lambda: dict.fromkeys(keys)), {})


def comfy_load(lora_sd: dict, key_map: dict) -> tuple[dict, list[str]]:
    """What ComfyUI's LoRA loader does with a file's tensors (comfy/sd.py load_lora_for_models):
    convert_lora, then load_lora. Returns the patches by target and the file keys it logs as
    'lora key not loaded' (sorted); also fails on any error it logs."""
    with logged() as messages:
        patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(lora_sd)), key_map)
    not_loaded = sorted(m.removeprefix("lora key not loaded: ") for m in messages
                        if m.startswith("lora key not loaded: "))
    return patches, not_loaded


def comfy_apply(weights: dict[str, torch.Tensor], patches: dict, strength: float = 1.0) -> dict[str, torch.Tensor]:
    """The weights ComfyUI runs with after loading `patches` at `strength`: ModelPatcher.add_patches
    (mirrored here: a target is a key or (key, offset[, function]); only keys of the model count),
    then for each patched key comfy.lora.calculate_weight on an fp32 copy, as
    ModelPatcher.patch_weight_to_device does. weights: the model's state dict without prefix.
    Returns the patched weights (fp32) by key; raises if a target names no weight or ComfyUI logs
    an error while applying."""
    by_key = {}
    for target, patch in patches.items():
        key, offset, function = (target, None, None) if isinstance(target, str) else (*target, None)[:3]
        name = key.removeprefix("diffusion_model.")
        if name not in weights:
            raise KeyError(f"ComfyUI patch target {target} is no weight of the model")
        by_key.setdefault(key, []).append((strength, patch, 1.0, offset, function))
    with logged() as messages:
        out = {key.removeprefix("diffusion_model."): comfy.lora.calculate_weight(
            plist, weights[key.removeprefix("diffusion_model.")].float().clone(), key) for key, plist in by_key.items()}
    errors = [m for m in messages if "ERROR" in m or "Failed" in m or "MISMATCH" in m]
    if errors:
        raise RuntimeError(f"ComfyUI could not apply the patches: {errors[:3]}")
    return out
