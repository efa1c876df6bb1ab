"""Tools on LoRA files and checkpoints: `python lora.py COMMAND` (lora.py hands its command line here).

    python lora.py convert IN OUT --to kohya|diffusers
    python lora.py merge BASE OUT --lora FILE[:STRENGTH] [--lora ...] [--dtype fp32|bf16|fp16|fp8]
    python lora.py extract BASE TUNED OUT --rank R [--energy E] [--dtype ...]
    python lora.py resize IN OUT --rank R [--energy E]
    python lora.py info FILE
    python lora.py presets CONFIG [--preset NAME]

Each works for every family (families/): the family is read from the LoRA file's names or the
checkpoint's keys (`--family` to say it), and the family says how its layers are named.
Checkpoints are read one tensor at a time with plain file reads (a memory map would keep every
page it touched resident) and written one tensor at a time (atomic.write_safetensors_streaming),
so merging into, or extracting from, a 24 GB FLUX file takes memory for its largest tensors and
the LoRA, not for the file.
"""
import argparse
import json
import math
import os
import re
import resource
import struct
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

import atomic
import families
import lora
from models.loading import SAFETENSORS_SUFFIXES, list_weight_files
from models.text import CLIP_G_PREFIXES, CLIP_PREFIXES, OPENCLIP_BLOCK_TO_HF, OPENCLIP_PREFIXES, T5_PREFIXES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}
NATIVE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # a denoiser inside a whole checkpoint
# where a text encoder's HF-layout keys sit inside a whole checkpoint (models/text.py), by encoder name
TEXT_SECTIONS = {"clip_l": CLIP_PREFIXES, "clip_g": CLIP_G_PREFIXES, "t5": T5_PREFIXES}


# --- checkpoints, one tensor at a time ----------------------------------------------------------------


class Checkpoint:
    """A safetensors checkpoint (a file, a sharded index or a folder) read tensor by tensor:
    the header gives every key's dtype, shape and place; `read(key)` reads that tensor alone."""

    TORCH_DTYPES = {name: dtype for dtype, name in atomic.SAFETENSORS_DTYPES.items()}

    def __init__(self, path: str | Path):
        self.path, self.entries, self.metadata = Path(path), {}, {}
        for file in list_weight_files(path):
            if file.suffix not in SAFETENSORS_SUFFIXES:
                raise ValueError(f"{file}: the LoRA tools read safetensors checkpoints only")
            with open(file, "rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(size))
            self.metadata.update(header.pop("__metadata__", None) or {})
            for key, info in header.items():
                start, end = (8 + size + o for o in info["data_offsets"])
                self.entries[key] = (file, self.TORCH_DTYPES[info["dtype"]], tuple(info["shape"]), start, end)

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype(self, key: str) -> torch.dtype:
        return self.entries[key][1]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][2]

    def meta_state_dict(self) -> dict[str, Tensor]:
        """Keys with meta tensors of their shapes and dtypes: what detection and params() read."""
        return {k: torch.empty(shape, dtype=dtype, device="meta") for k, (_, dtype, shape, _, _) in self.entries.items()}

    def read(self, key: str) -> Tensor:
        file, dtype, shape, start, end = self.entries[key]
        buffer = bytearray(end - start)
        with open(file, "rb") as f:
            f.seek(start)
            f.readinto(buffer)
            if hasattr(os, "posix_fadvise"):  # the page cache may let these pages go
                os.posix_fadvise(f.fileno(), start, end - start, os.POSIX_FADV_DONTNEED)
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(shape)


def default_config(family) -> dict:
    from config import DEFAULTS

    return dict(DEFAULTS, model_family=family.name, **family.lora_variants[0])


def checkpoint_family(ckpt: Checkpoint, name: str | None = None):
    return families.get(name) if name else families.detect(ckpt.meta_state_dict(), str(ckpt.path))


def denoiser_prefix(keys) -> str:
    """The prefix of the denoiser's keys in a checkpoint ("" for a bare denoiser file)."""
    return next((p for p in NATIVE_PREFIXES if any(k.startswith(p) for k in keys)), "")


def skeleton(family, ckpt: Checkpoint | None = None) -> nn.Module:
    """The family's network on the meta device: the checkpoint's shapes, or the released model's."""
    cfg = default_config(family)
    if ckpt is None:
        params = family.default_params(cfg)
    else:
        sd, prefix = ckpt.meta_state_dict(), denoiser_prefix(ckpt.keys())
        params = family.params({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, cfg)
    with torch.device("meta"):
        return family.build(params)


def network_at(family, path: str) -> nn.Module | None:
    """The checkpoint's own network on the meta device (its shapes, as training reads them), for
    the LoRA names that depend on them (family.for_network: IF's diffusers names); None where the
    family cannot read it that way (the released shapes serve then)."""
    cfg = default_config(family)
    try:
        with torch.device("meta"):
            return family.build(family.params(family.read_checkpoint(path, cfg), cfg))
    except (ValueError, KeyError, NotImplementedError):  # shapes it cannot tell without a config (ConfigError)
        return None


def peak_memory_gib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# --- which family a LoRA file is for ------------------------------------------------------------------


def lora_file_format(sd: dict) -> str:
    if lora.is_kohya(sd):
        return "kohya"
    if any(k.startswith(lora.NATIVE_PREFIXES) for k in sd):
        return "native"
    return "diffusers"


def reads(family, sd: dict, metadata: dict) -> bool:
    """Whether every module of the file names a layer of `family`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kohya = lora.to_kohya(sd, family, metadata)
        lora.module_paths(family, lora.kohya_modules(kohya))
        return True
    except (ValueError, KeyError, NotImplementedError):
        return False


def lora_family(sd: dict, metadata: dict, name: str | None = None):
    """The family a LoRA file is for: --family, else the one whose layers its names all name
    (ties broken by the file's modelspec.architecture / ss_base_model_version)."""
    if name:
        return families.get(name)
    found = [f for f in families.FAMILIES.values() if reads(f, sd, metadata)]
    if len(found) > 1:
        said = (metadata.get("modelspec.architecture", "") + " " + metadata.get("ss_base_model_version", "")).lower()
        found = [f for f in found if f.name in said] or found
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(f"no family of this trainer ({', '.join(families.names())}) has every layer this file "
                         "names; pass --family if it is one of them")
    raise ValueError(f"the file's names fit {', '.join(f.name for f in found)}: pass --family")


def read_lora(path: str | Path, family_name: str | None = None):
    """(kohya state dict, metadata, family, the file's format) of a LoRA file."""
    sd, metadata = lora.read_lora_file(path)
    family = lora_family(sd, metadata, family_name)
    return lora.to_kohya(sd, family, metadata), metadata, family, lora_file_format(sd)


def write_lora(sd: dict[str, Tensor], path: str | Path, family, to: str, metadata: dict[str, str],
               dtype: torch.dtype | None = None) -> None:
    """A kohya state dict written as kohya or diffusers (alpha folded), with `metadata`."""
    if to == "diffusers":
        sd, extra = lora.kohya_to_diffusers(sd, family, "fold", dtype=dtype)
        metadata = {**metadata, **extra}
    elif dtype is not None:
        sd = {k: v if k.endswith(".alpha") else v.to(dtype) for k, v in sd.items()}
    atomic.write_safetensors({k: v.contiguous() for k, v in sd.items()}, path, metadata)


# --- convert ---------------------------------------------------------------------------------------


def convert(src: str, dst: str, to: str, family_name: str | None = None, alpha: str = "fold") -> str:
    """A LoRA file in another format: kohya (ComfyUI, Forge, diffusers) or diffusers / PEFT."""
    kohya, metadata, family, fmt = read_lora(src, family_name)
    if to == "diffusers":
        sd, extra = lora.kohya_to_diffusers(kohya, family, alpha)
        atomic.write_safetensors(sd, dst, {**metadata, **extra})
    elif to == "kohya":
        atomic.write_safetensors({k: v.contiguous() for k, v in kohya.items()}, dst, metadata)
    else:
        raise ValueError(f"--to {to!r}: choose kohya or diffusers")
    return f"{src} ({family.title}, {fmt}) -> {dst} ({to}, {len(lora.kohya_modules(kohya))} modules)"


# --- merge -----------------------------------------------------------------------------------------


def merge(base: str, out: str, loras: list[tuple[str, float]], dtype: str | None = None, family_name: str | None = None,
          text_encoders: dict[str, tuple[str, str]] | None = None) -> list[str]:
    """LoRAs (each at its strength, applied in order) merged into a checkpoint, written in its
    own layout and keys, one tensor at a time. `text_encoders` (encoder -> (file in, file out))
    takes the lora_te* parts to separate text-encoder files; parts for encoders that sit in the
    checkpoint itself (SD3 / SDXL single files) merge there. Returns report lines."""
    ckpt = Checkpoint(base)
    family = checkpoint_family(ckpt, family_name)
    network = network_at(family, base)
    family = family.for_network(network) if network is not None else family
    modules: dict[str, list] = {}
    for path, strength in loras:
        sd, _ = lora.load_lora_file(path, family)
        for name, parts in lora.kohya_modules(sd).items():
            modules.setdefault(name, []).append((parts, strength))
    sources = [(ckpt, out, None)] + [(Checkpoint(src), dst, encoder) for encoder, (src, dst) in
                                     (text_encoders or {}).items()]
    report, left = [], dict(modules)
    for reader, target, encoder in sources:
        patches = match_keys(reader, left, family, encoder)
        report.append(f"{target}: {len(patches)} weights merged, {len(reader.keys())} tensors written")
        write_merged(reader, target, patches, dtype)
    if left:
        te = sorted({name.split("_")[1] for name in left if name.startswith("lora_te")})
        hint = f" (text encoder parts {te}: pass --text_encoder NAME=IN:OUT for each)" if te else ""
        raise ValueError(f"{len(left)} LoRA modules name no weight of the checkpoint{hint}: "
                         f"{lora._shorten(sorted(left), 6)}; the files written hold the others merged")
    return report


def match_keys(reader: Checkpoint, modules: dict[str, list], family, encoder: str | None) -> dict[str, list]:
    """Checkpoint key -> the LoRA patches for it, (parts, strength, rows or None); the matched
    modules leave `modules`. The denoiser's keys (its prefix stripped) take lora_unet_ names;
    text-encoder sections (or, for a separate encoder file, its bare keys) take that encoder's
    lora_te* names; SDXL's bigG in OpenCLIP's layout takes them through openclip_patches."""
    te = family.text_encoder_loras()
    sections = [(te[encoder][0], prefix) for prefix in TEXT_SECTIONS.get(encoder, ()) + ("",)] if encoder else \
        [(family.lora_prefix, denoiser_prefix(reader.keys()))] + \
        [(kohya, prefix) for name, (kohya, _) in te.items() for prefix in TEXT_SECTIONS.get(name, ())]
    openclip = (OPENCLIP_PREFIXES + (("",) if encoder == "clip_g" else ())) if "clip_g" in te else ()
    patches = {}
    for key in reader.keys():
        prefix = next((p for p in openclip if key.startswith(p + "transformer.resblocks.")), None)
        if prefix is not None:
            found = openclip_patches(key[len(prefix):], reader.shape(key), modules, te["clip_g"][0])
            if found:
                patches[key] = found
            continue
        if not key.endswith(".weight"):
            continue
        for kohya_prefix, prefix in sections:
            name = lora.kohya_name(key[len(prefix):-len(".weight")], kohya_prefix) if key.startswith(prefix) else None
            if name in modules:
                patches[key] = [(parts, strength, None) for parts, strength in modules.pop(name)]
                break
    return patches


def openclip_patches(key: str, shape: tuple, modules: dict[str, list], kohya_prefix: str) -> list:
    """The patches of one tensor of an OpenCLIP text tower (`transformer.resblocks.N.*`, as SDXL
    checkpoints hold bigG) from LoRAs on its HF modules (models/text.py: OPENCLIP_BLOCK_TO_HF):
    q, k and v each on a third of the rows of attn.in_proj_weight."""
    match = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(attn\.in_proj_|attn\.out_proj\.|mlp\.c_fc\.|mlp\.c_proj\.)weight",
                         key)
    if match is None:
        return []
    layer = f"text_model.encoder.layers.{match.group(1)}."
    if match.group(2) == "attn.in_proj_":  # rows [q; k; v]
        third = shape[0] // 3
        places = [(f"{layer}self_attn.{p}_proj", (i * third, (i + 1) * third)) for i, p in enumerate("qkv")]
    else:
        places = [(layer + OPENCLIP_BLOCK_TO_HF[match.group(2)].rstrip("."), None)]
    found = []
    for path, rows in places:
        name = lora.kohya_name(path, kohya_prefix)
        found += [(parts, strength, rows) for parts, strength in modules.pop(name, [])]
    return found


def write_merged(reader: Checkpoint, out: str, patches: dict[str, list], dtype: str | None) -> None:
    """Every tensor of `reader`, patched ones merged in fp32 and rounded once, in `dtype`."""
    if any(k.endswith((".scale_weight", ".weight_scale")) or k == "scaled_fp8" for k in reader.keys()):
        raise ValueError(f"{reader.path} is a scaled-fp8 checkpoint; merge into the bf16 / fp16 release instead")
    layout = [(key, out_dtype(reader.dtype(key), reader.shape(key), dtype), reader.shape(key)) for key in reader.keys()]

    def tensors():
        for key, target, _ in layout:
            tensor = reader.read(key)
            if key in patches:
                weight = tensor.to(torch.float32, copy=True)
                for parts, strength, rows in patches.pop(key):
                    start, stop = rows or (0, len(weight))  # rows: q, k or v of a fused in_proj_weight
                    weight[start:stop] = lora.merged_weight(weight[start:stop], parts["down"], parts["up"],
                                                            parts["alpha"], strength, parts.get("dora"))
                tensor = weight
            yield cast(tensor, target)

    atomic.write_safetensors_streaming(out, layout, tensors(), reader.metadata)


def out_dtype(dtype: torch.dtype, shape: tuple, choice: str | None) -> torch.dtype:
    """The dtype a tensor is written in: its own, or the chosen one for floating tensors (fp8:
    matrices and kernels in float8_e4m3fn, vectors in bf16, as the released fp8 files)."""
    if choice is None or not dtype.is_floating_point:
        return dtype
    if choice == "fp8":
        return torch.float8_e4m3fn if len(shape) >= 2 else torch.bfloat16
    return DTYPES[choice]


def cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    if dtype == torch.float8_e4m3fn and tensor.dtype != dtype:
        limit = torch.finfo(dtype).max
        return tensor.float().clamp(-limit, limit).to(dtype)
    return tensor.to(dtype)


# --- extract and resize ------------------------------------------------------------------------------


def rank_for(singular: Tensor, rank: int, energy: float | None) -> int:
    """How many singular values to keep: at most `rank`, and with `energy` the fewest whose
    squares hold that fraction of the sum of squares."""
    keep = min(rank, len(singular))
    squares = singular.double().pow(2)
    if energy is not None and squares.sum() > 0:
        reached = (squares.cumsum(0) / squares.sum() >= energy - 1e-12).nonzero()
        keep = min(keep, int(reached[0]) + 1 if len(reached) else len(singular))
    return max(keep, 1)


def energy_kept(singular: Tensor, keep: int) -> float:
    squares = singular.double().pow(2)
    return float(squares[:keep].sum() / squares.sum()) if squares.sum() > 0 else 1.0


def low_rank(matrix: Tensor, rank: int, energy: float | None) -> tuple[Tensor, Tensor, Tensor, int]:
    """Truncated SVD of (out, in) `matrix`: (up (out, k), down (k, in), singular values, k), with
    up @ down the best rank-k approximation (Eckart-Young) and sqrt(S) in both factors."""
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    keep = rank_for(s, rank, energy)
    root = s[:keep].sqrt()
    return u[:, :keep] * root, root[:, None] * vh[:keep], s, keep


def as_lora(name: str, up: Tensor, down: Tensor, like: Tensor, alpha: float) -> dict[str, Tensor]:
    """kohya tensors of a factorization of a weight shaped `like` (a conv's down keeps its kernel)."""
    kernel = like.shape[2:]
    return {f"{name}.lora_down.weight": down.reshape(down.shape[0], *like.shape[1:]).contiguous(),
            f"{name}.lora_up.weight": up.reshape(up.shape[0], up.shape[1], *[1] * len(kernel)).contiguous(),
            f"{name}.alpha": torch.tensor(float(alpha))}


def extract(base: str, tuned: str, out: str, rank: int, energy: float | None = None, dtype: str = "bf16",
            family_name: str | None = None, to: str = "kohya", min_diff: float = 0.0) -> list[str]:
    """A LoRA of `tuned` - `base` by truncated SVD of each layer's difference (kohya's
    flux_extract_lora.py), one layer at a time. Returns report lines: per module the rank, the
    energy kept and the relative error sqrt(1 - energy) that the discarded singular values give."""
    a, b = Checkpoint(base), Checkpoint(tuned)
    family = checkpoint_family(a, family_name)
    network = network_at(family, base)
    paths = [p for p, m in network.named_modules() if isinstance(m, lora.LORA_BASES)] if network is not None \
        else family.lora_paths()  # every layer a LoRA can name, in the network's order
    family = family.for_network(network) if network is not None else family
    prefix = denoiser_prefix(a.keys())
    keys = set(a.keys()) & set(b.keys())
    sd, report = {}, []
    for path in paths:
        key = f"{prefix}{path}.weight"
        if key not in keys:
            continue
        diff = b.read(key).float() - a.read(key).float()
        if diff.abs().max() <= min_diff:
            continue
        up, down, singular, keep = low_rank(diff.flatten(1), rank, energy)
        name = lora.kohya_name(path, family.lora_prefix)
        sd |= as_lora(name, up, down, diff, keep)  # alpha = rank: scale 1
        kept = energy_kept(singular, keep)
        report.append(f"{name}: rank {keep}, energy kept {kept:.6f}, relative error {math.sqrt(max(1 - kept, 0)):.3e}")
    if not sd:
        raise ValueError(f"{tuned} and {base} have the same weights in every layer a LoRA can hold")
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(float(rank)),
            "lora_extracted": json.dumps({"base": Path(base).name, "tuned": Path(tuned).name, "rank": rank,
                                          "energy": energy})}
    write_lora(sd, out, family, to, meta, DTYPES[dtype])
    return report + [f"{out}: {len(report)} modules (peak memory {peak_memory_gib():.2f} GiB)"]


def resize_module(parts: dict[str, Tensor], rank: int, energy: float | None) -> tuple[dict[str, Tensor], float, int]:
    """One module at a lower rank: the best approximation of up @ down of rank k, from the SVD of
    the small (r, r) core R_u R_d^T of the QR factors (up = Q_u R_u, down^T = Q_d R_d). alpha / rank
    is kept (alpha scales with the rank), DoRA's magnitude is kept. Returns (parts, energy kept, k)."""
    up, down = parts["up"].float().flatten(1), parts["down"].float().flatten(1)
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    core_up, core_down, singular, keep = low_rank(r_up @ r_down.T, rank, energy)
    scale = float(parts["alpha"]) / down.shape[0]
    new = {"up": (q_up @ core_up).reshape(up.shape[0], keep, *parts["up"].shape[2:]),
           "down": (core_down @ q_down.T).reshape(keep, *parts["down"].shape[1:]),
           "alpha": torch.tensor(scale * keep)}
    if "dora" in parts:
        new["dora"] = parts["dora"]
    return new, energy_kept(singular, keep), keep


def resize(src: str, dst: str, rank: int, energy: float | None = None, family_name: str | None = None,
           to: str | None = None, dtype: str | None = None) -> list[str]:
    """A LoRA file at rank <= `rank` (or the energy threshold), each module's kept energy reported."""
    kohya, metadata, family, fmt = read_lora(src, family_name)
    sd, report = {}, []
    for name, parts in lora.kohya_modules(kohya).items():
        new, kept, keep = resize_module(parts, rank, energy)
        sd |= lora._entry(name, new)
        report.append(f"{name}: rank {parts['down'].shape[0]} -> {keep}, energy kept {kept:.6f}")
    metadata = {**metadata, "ss_network_dim": str(rank), "lora_resized": json.dumps({"rank": rank, "energy": energy})}
    metadata.pop("lora_adapter_metadata", None)
    like = next(v for k, v in kohya.items() if k.endswith(".lora_down.weight")).dtype
    write_lora(sd, dst, family, to or ("diffusers" if fmt == "diffusers" else "kohya"), metadata,
               DTYPES[dtype] if dtype else like)
    return report


# --- info and presets ------------------------------------------------------------------------------

SHOWN_METADATA = ("ss_output_name", "ss_base_model_version", "modelspec.architecture", "ss_network_module",
                  "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_steps", "ss_epoch", "ss_learning_rate",
                  "ss_text_encoder_lr", "ss_training_finished_at", "lora_extracted", "lora_resized")


def info(path: str, family_name: str | None = None) -> list[str]:
    """What a LoRA file is: family, format, modules and ranks per group, alphas, DoRA, text
    encoders, the metadata that matters, and which loaders read it (and what they leave out)."""
    sd, metadata = lora.read_lora_file(path)
    family, fmt = lora_family(sd, metadata, family_name), lora_file_format(sd)
    modules = lora.kohya_modules(lora.to_kohya(sd, family, metadata))
    paths = lora.module_paths(family, modules)
    groups = module_groups(family, paths)
    count = sum(t.numel() for k, t in sd.items() if not k.endswith(".alpha"))
    lines = [f"{path}: {family.title} LoRA, {fmt} format, {len(modules)} modules, {count:,} parameters "
             f"({Path(path).stat().st_size / 2**20:.1f} MiB, {next(iter(sd.values())).dtype})"]
    for group, names in groups.items():
        ranks = sorted({modules[n]["down"].shape[0] for n in names})
        scales = sorted({round(float(modules[n]["alpha"]) / modules[n]["down"].shape[0], 6) for n in names})
        alphas = sorted({float(modules[n]["alpha"]) for n in names})
        lines.append(f"  {group}: {len(names)} modules, rank {'/'.join(map(str, ranks))}, alpha "
                     f"{'/'.join(f'{a:g}' for a in alphas)} (scale {'/'.join(f'{x:g}' for x in scales)})")
    dora = sum("dora" in parts for parts in modules.values())
    lines.append(f"  DoRA: {f'{dora} modules with dora_scale' if dora else 'no'}; split q/k/v (block-diagonal up): "
                 f"{sum(block_diagonal(p) for p in modules.values())} modules")
    shown = {k: metadata[k] for k in SHOWN_METADATA if k in metadata}
    lines += ["metadata:"] + [f"  {k} = {v[:160]}" for k, v in shown.items()] + \
        [f"  (and {len(metadata) - len(shown)} more keys{': trainer_config holds the run config' if 'trainer_config' in metadata else ''})"]
    targets = {p: modules[n]["down"].shape[0] for n, (prefix, p) in paths.items() if prefix == family.lora_prefix}
    encoders = [e for e, (prefix, _) in family.text_encoder_loras().items() if any(n.startswith(prefix + "_") for n in modules)]
    lines.append("loaders:")
    lines += [f"  {reader}" for reader in family.lora_readers(fmt)]
    lines += [f"  note: {note}" for note in lora.format_notes(family, fmt, targets, encoders, bool(dora))]
    return lines


def module_groups(family, paths: dict[str, tuple[str, str]]) -> dict[str, list[str]]:
    """LoRA modules by the family's rank group (text encoders by encoder)."""
    try:
        layers = {path: layer for model in family.lora_skeletons() for path, layer in family.lora_layers(model).items()}
    except NotImplementedError:
        layers = {}
    encoders = {prefix: f"text encoder {e} ({prefix})" for e, (prefix, _) in family.text_encoder_loras().items()}
    groups: dict[str, list[str]] = {}
    for name, (prefix, path) in paths.items():
        group = encoders.get(prefix) or (layers[path].group if path in layers else "other layers")
        groups.setdefault(group, []).append(name)
    return groups


def block_diagonal(parts: dict[str, Tensor]) -> bool:
    """Whether an up is block-diagonal over two or more row blocks (a LoRA trained split, fused)."""
    used = parts["up"].flatten(1) != 0
    spans = sorted({(int(r.min()), int(r.max())) for r in (used[:, j].nonzero() for j in range(used.shape[1]))
                    if len(r)})
    return len(spans) > 1 and all(nxt[0] > prev[1] for prev, nxt in zip(spans, spans[1:]))


def presets(config_path: str, overrides: list[str], preset: str | None = None) -> list[str]:
    """Every layer-targeting preset of a config's family on its model: layers, LoRA parameters at
    the config's rank, full fine-tuning parameters; with `preset`, the layers themselves."""
    from config import load_config
    from models.loading import load_state_dict

    cfg = load_config(config_path, overrides, check_files=False)
    family = families.get(cfg["model_family"])
    path = cfg["model_path"]
    params = family.params(load_state_dict(path), cfg) if path and Path(path).exists() else family.default_params(cfg)
    with torch.device("meta"):
        model = family.build(params)
    layers, modules = family.lora_layers(model), dict(model.named_modules())
    rank, lines = cfg["network_dim"], [f"{family.describe(params)}: presets (targets = ...) at rank {cfg['network_dim']}"]
    selections = {"": ("the family's selection keys (the default)", family.lora_targets(model, cfg))}
    for name, (description, _) in lora.presets(family).items():
        selections[name] = (description, lora.preset_targets(layers, name, family, rank, cfg["group_ranks"]))
    for name, (description, targets) in selections.items():
        full = sum(p.numel() for t in targets for p in modules[t].parameters(recurse=False))
        lines.append(f"  {name or '(default)':18} {len(targets):5} layers  LoRA {lora.lora_parameter_count(model, targets, cfg['use_dora']):>13,}"
                     f"  full {full:>15,}  {description}")
    if preset is not None:
        lines += [f"{preset or '(default)'}:"] + [f"  {line}" for line in lora.describe_paths(selections[preset][1], 200)]
    return lines


# --- the command line --------------------------------------------------------------------------------

COMMANDS = """commands (python lora.py COMMAND --help for each):
  convert IN OUT --to kohya|diffusers            a LoRA file in the other format
  merge BASE OUT --lora FILE[:STRENGTH] ...      LoRAs merged into a checkpoint, one tensor at a time
  extract BASE TUNED OUT --rank R [--energy E]   a LoRA of the difference of two checkpoints (truncated SVD)
  resize IN OUT --rank R [--energy E]            a LoRA at a lower rank, the energy kept per module
  info FILE                                      family, format, ranks, alphas, metadata, loaders
  presets CONFIG [--preset NAME]                 the layer-targeting presets of a config's model"""


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python lora.py", description="Tools on LoRA files and checkpoints.",
                                  epilog=COMMANDS, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    family = dict(default=None, help="the model family (default: read from the file); one of " + ", ".join(families.names()))
    p = sub.add_parser("convert", help="kohya <-> diffusers", description=convert.__doc__)
    p.add_argument("src", metavar="IN"), p.add_argument("dst", metavar="OUT")
    p.add_argument("--to", required=True, choices=lora.LORA_FORMATS)
    p.add_argument("--alpha", default="fold", choices=("fold", "metadata"),
                   help="diffusers: fold alpha/rank into lora_A (every loader) or keep it in lora_adapter_metadata "
                        "(diffusers only)")
    p.add_argument("--family", **family)
    p = sub.add_parser("merge", help="LoRAs into a checkpoint", description=merge.__doc__)
    p.add_argument("base", metavar="BASE"), p.add_argument("out", metavar="OUT")
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:STRENGTH]", help="repeatable")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="precision of the file written (default: as the base's)")
    p.add_argument("--text_encoder", action="append", default=[], metavar="NAME=IN:OUT",
                   help="a separate text-encoder file for the lora_te* parts, e.g. clip_l=clip_l.safetensors:out.safetensors")
    p.add_argument("--family", **family)
    p = sub.add_parser("extract", help="a LoRA from two checkpoints", description=extract.__doc__)
    p.add_argument("base", metavar="BASE"), p.add_argument("tuned", metavar="TUNED"), p.add_argument("out", metavar="OUT")
    p.add_argument("--rank", type=int, required=True, help="the largest rank of a module")
    p.add_argument("--energy", type=float, help="keep the fewest singular values holding this fraction of the energy")
    p.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--min_diff", type=float, default=0.0, help="skip layers whose largest change is at most this")
    p.add_argument("--to", default="kohya", choices=lora.LORA_FORMATS), p.add_argument("--family", **family)
    p = sub.add_parser("resize", help="a LoRA at a lower rank", description=resize.__doc__)
    p.add_argument("src", metavar="IN"), p.add_argument("dst", metavar="OUT")
    p.add_argument("--rank", type=int, required=True), p.add_argument("--energy", type=float)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16")), p.add_argument("--to", choices=lora.LORA_FORMATS)
    p.add_argument("--family", **family)
    p = sub.add_parser("info", help="what a LoRA file is", description=info.__doc__)
    p.add_argument("file", metavar="FILE"), p.add_argument("--family", **family)
    p = sub.add_parser("presets", help="layer-targeting presets of a config", description=presets.__doc__)
    p.add_argument("config", metavar="CONFIG"), p.add_argument("--preset", help="list this preset's layers ('' the default)")
    return top


def run(args, overrides: list[str]) -> list[str]:
    from sample import parse_lora_arg

    if args.command == "convert":
        return [convert(args.src, args.dst, args.to, args.family, args.alpha)]
    if args.command == "merge":
        encoders = {}
        for spec in args.text_encoder:
            name, _, files = spec.partition("=")
            src, _, dst = files.rpartition(":")
            if not (name and src and dst):
                raise ValueError(f"--text_encoder {spec!r}: write NAME=IN:OUT, e.g. clip_l=clip_l.safetensors:merged.safetensors")
            encoders[name] = (src, dst)
        lines = merge(args.base, args.out, [parse_lora_arg(s) for s in args.lora], args.dtype, args.family, encoders)
        return lines + [f"peak memory {peak_memory_gib():.2f} GiB"]
    if args.command == "extract":
        return extract(args.base, args.tuned, args.out, args.rank, args.energy, args.dtype, args.family, args.to,
                       args.min_diff)
    if args.command == "resize":
        return resize(args.src, args.dst, args.rank, args.energy, args.family, args.to, args.dtype)
    if args.command == "info":
        return info(args.file, args.family)
    return presets(args.config, overrides, args.preset)


def main(argv: list[str] | None = None) -> int:
    """The command line; errors a user can cause are one line (--debug: the traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    overrides = [a for a in argv if a.startswith("--") and "=" in a and argv[:1] == ["presets"]]
    args = parser().parse_args([a for a in argv if a not in overrides])
    try:
        for line in run(args, overrides):
            print(line)
    except (ValueError, KeyError, FileNotFoundError, OSError) as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
