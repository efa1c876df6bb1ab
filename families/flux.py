"""FLUX.1 [dev] and [schnell]: everything that makes the family itself.

Network    models/flux.py (black-forest-labs/flux names); 19 double + 38 single blocks.
Text       T5-XXL states (512 tokens for dev, 256 for schnell; unmasked by default) and the
           CLIP-L pooled vector (models/text.py, models/__init__.py: FluxPromptEncoder).
Codec      the 16-channel autoencoder, z = 0.3611 (mean - 0.1159) (models/vae.py), or pixels.
Objective  flow matching (losses.FlowMatching): x_t = (1 - s) x0 + s noise, target noise - x0,
           s drawn by `timestep_sampling` (kohya's options; default sigmoid then shift 3.1582).
Inputs     the latent packed into 2x2 patches (64 channels per token), position ids, the time
           s in [0, 1] (x1000 inside the embedding), dev's embedded guidance (`guidance_scale`
           in training, 1.0 as kohya and ai-toolkit recommend; the prompt's --g when sampling).
Sampling   Euler from s = 1 to 0; dev shifts the schedule by mu, linear in the token count
           (0.5 at 256 tokens, 1.15 at 4096), schnell takes the plain linear one in 4 steps;
           optional true CFG with a negative prompt.
LoRA       every Linear of the double and single blocks (kohya's 304 at full size), ranks per
           group (img_attn, txt_attn, img_mlp, txt_mlp, img_mod, txt_mod, single, single_mod),
           blocks by index, the input embedders optionally; kohya names `lora_unet_<path>`;
           diffusers / PEFT files read back with q/k/v slices re-fused.
Memory     blocks_to_swap splits as kohya's: n -> n//2 double + (n - n//2)*2 single blocks.
"""
import re
from dataclasses import replace

import torch
from torch import Tensor, nn

import losses
import sample
import samplers
from lora import Layer, parse_block_indices
from config import ConfigError
from models import flux as network
from models import load_text_encoder
from models.loading import strip_prefix

from . import Family, check_ranks

DOUBLE_GROUPS = ("img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_mod", "txt_mod")
SINGLE_GROUPS = ("single", "single_mod")
EMBEDDERS = ("img_in", "time_in", "vector_in", "guidance_in", "txt_in")
MIN_RESIDENT = 2  # blockswap.MIN_RESIDENT: blocks of each kind that stay on the device


class Flux(Family):
    name = "flux"
    title = "FLUX.1"
    latent_multiple = 2  # 2x2 patches
    config_keys = ("clip_l_path", "t5_path", "clip_tokenizer", "t5_tokenizer", "t5_max_length",
                   "apply_t5_attn_mask", "guidance_scale", "sample_guidance", "double_blocks_to_swap",
                   "single_blocks_to_swap", "train_double_blocks", "train_single_blocks", "lora_embedders",
                   "timestep_sampling", "sigmoid_scale", "discrete_flow_shift", "logit_mean", "logit_std",
                   "mode_scale", "model_prediction_type", "huber_schedule")
    required_paths = ("clip_l_path", "t5_path")
    lora_config_keys = ("train_double_blocks", "train_single_blocks", "lora_embedders")
    trained_config_keys = ("train_double_blocks", "train_single_blocks")  # full fine-tuning freezes the others
    target_config_keys = ("train_double_blocks", "train_single_blocks", "lora_embedders")
    split_qkv_layers = "the double blocks' qkv and the single blocks' linear1"

    # --- the checkpoint ----------------------------------------------------------------------------

    def detect(self, sd: dict) -> bool:
        sd = strip_prefix(sd, network.PREFIXES)[0]
        return "img_in.weight" in sd and any(k.startswith(("double_blocks.", "single_blocks.")) for k in sd)

    def params(self, sd: dict, cfg: dict) -> network.FluxParams:
        return network.infer_params(sd, **cfg["model_overrides"])

    def default_params(self, cfg: dict) -> network.FluxParams:
        return replace(network.FluxParams(), **cfg["model_overrides"])  # FLUX.1-dev

    def build(self, params: network.FluxParams) -> nn.Module:
        return network.Flux(params)

    def load(self, sd: dict, cfg: dict, dtype: torch.dtype, device="cpu") -> nn.Module:
        if not cfg["fp8_base"]:
            return network.Flux.from_state_dict(sd, dtype=dtype, device=device, **cfg["model_overrides"])
        return self.load_fp8(strip_prefix(sd, network.PREFIXES)[0], self.params(sd, cfg), cfg, dtype, device)

    def variant(self, params: network.FluxParams) -> str:
        return "dev" if params.guidance_embed else "schnell"  # the guidance embedder tells them apart

    # --- blocks ------------------------------------------------------------------------------------

    def blocks(self, model: nn.Module) -> dict[str, list[nn.Module]]:
        return {"double_blocks": list(model.double_blocks), "single_blocks": list(model.single_blocks)}

    def swap_counts(self, model: nn.Module, cfg: dict) -> dict[str, int]:
        """kohya's one count, or the per-kind keys (-1: derive from blocks_to_swap)."""
        depth, depth_single = len(model.double_blocks), len(model.single_blocks)
        double, single = cfg["double_blocks_to_swap"], cfg["single_blocks_to_swap"]
        if double >= 0 or single >= 0:
            if cfg["blocks_to_swap"] > 0:
                raise ValueError("set either blocks_to_swap or double_blocks_to_swap/single_blocks_to_swap, not both")
            return {"double_blocks": max(double, 0), "single_blocks": max(single, 0)}
        n = cfg["blocks_to_swap"]
        double, single = kohya_split(n)
        most = max_blocks_to_swap(depth, depth_single)
        if n < 0 or n > most:
            raise ValueError(
                f"blocks_to_swap={n}: it swaps {double} of {depth} double and {single} of {depth_single} single "
                f"blocks, but {MIN_RESIDENT} of each kind must stay on the device. Use at most {most}, or set "
                "double_blocks_to_swap/single_blocks_to_swap separately.")
        return {"double_blocks": double, "single_blocks": single}

    # --- config ------------------------------------------------------------------------------------

    def check_config(self, cfg: dict) -> None:
        if cfg["dtype"] == "fp16":
            raise ConfigError("dtype='fp16' overflows in FLUX (NaN losses); use 'bf16' (or 'fp32' on CPU)")
        if bool(cfg["clip_l_path"]) != bool(cfg["t5_path"]):
            raise ConfigError("set both clip_l_path and t5_path (FLUX needs CLIP-L pooled and T5 states)")

    def resolution_multiple(self, cfg: dict) -> int:
        return 16  # 8x VAE and 2x2 patches (the demo's pixels only need 2; 16 keeps one rule)

    # --- data --------------------------------------------------------------------------------------

    def text_encoder(self, cfg: dict, params, dtype: torch.dtype, device):
        return load_text_encoder(cfg["clip_l_path"], cfg["t5_path"], cfg["clip_tokenizer"], cfg["t5_tokenizer"],
                                 max_length=self.text_length(cfg, params), apply_mask=cfg["apply_t5_attn_mask"],
                                 dtype=dtype, device=device)

    def plan_text_encoders(self, cfg: dict, params) -> list:
        from config import DTYPES
        from models import text

        b, dtype = cfg["text_batch_size"], DTYPES[cfg["dtype"]]
        tokens = {"clip_l": text.CLIP_MAX_LENGTH, "t5": self.text_length(cfg, params)}
        paths = {"clip_l": cfg["clip_l_path"], "t5": cfg["t5_path"]}
        out = []
        for kind in ("clip_l", "t5"):
            config = text.text_config(kind, paths[kind])

            def build(kind=kind, config=config):
                return text.build_text_model(kind, config).to(dtype)

            def inputs(device, kind=kind):
                ids = torch.zeros(b, tokens[kind], dtype=torch.long, device=device)
                mask = torch.ones_like(ids) if kind == "t5" and cfg["apply_t5_attn_mask"] else None
                return {"input_ids": ids, "attention_mask": mask}

            out.append((kind, build, inputs))
        return out

    def plan_codec(self, cfg: dict, params) -> nn.Module | None:
        from models.vae import autoencoder_skeleton

        return autoencoder_skeleton(cfg["ae_path"], "flux") if cfg["ae_path"] else None

    def text_length(self, cfg: dict, params) -> int:
        """T5 tokens: the config's, or the network's default (512 for dev, 256 for schnell)."""
        return cfg["t5_max_length"] or network.default_t5_max_length(params)

    def text_mask(self, cfg: dict) -> bool:
        return cfg["apply_t5_attn_mask"]

    # --- training ----------------------------------------------------------------------------------

    def objective(self, cfg: dict) -> losses.FlowMatching:
        return losses.FlowMatching(
            timestep_sampling=cfg["timestep_sampling"], sigmoid_scale=cfg["sigmoid_scale"],
            discrete_flow_shift=cfg["discrete_flow_shift"], logit_mean=cfg["logit_mean"], logit_std=cfg["logit_std"],
            mode_scale=cfg["mode_scale"], model_prediction_type=cfg["model_prediction_type"],
            loss_type=cfg["loss_type"], huber_c=cfg["huber_c"], huber_schedule=cfg["huber_schedule"])

    def seq_len(self, latent: Tensor) -> int:
        """Packed image tokens, what flux_shift's mu reads."""
        return (latent.shape[-2] // 2) * (latent.shape[-1] // 2)

    def conditioning(self, batch: dict, cfg: dict, generator=None) -> dict:
        cond = {k: batch[k] for k in ("t5", "clip_pooled", "t5_mask") if k in batch}
        b = batch["latent"].shape[0]
        cond["guidance"] = torch.full((b,), cfg["guidance_scale"], device=batch["latent"].device)
        return cond

    def predict(self, model: nn.Module, x_t: Tensor, t: Tensor, cond: dict) -> Tensor:
        return denoise(model, x_t, t, cond)

    # --- sampling ----------------------------------------------------------------------------------

    def prompt_defaults(self, cfg: dict, params) -> sample.SamplePrompt:
        steps = cfg["sample_steps"] or (28 if params.guidance_embed else 4)
        return sample.SamplePrompt(prompt="", width=cfg["resolution"], height=cfg["resolution"], steps=steps,
                                   guidance=cfg["sample_guidance"], seed=cfg["seed"])

    def sample_conditioning(self, text: dict, prompt: sample.SamplePrompt, device) -> dict:
        cond = {k: v.to(device) for k, v in text.items()}
        cond["guidance"] = torch.full((1,), prompt.guidance, device=device)
        return cond

    def sample(self, model: nn.Module, prompt: sample.SamplePrompt, cond: dict, neg_cond: dict | None,
               noise: Tensor) -> Tensor:
        """Euler on dev's shifted schedule (schnell: linear), true CFG when a negative is given."""
        sigmas = samplers.flux_sigmas(prompt.steps, self.seq_len(noise), shift=model.params.guidance_embed)
        velocity = lambda x, t, c: denoise(model, x, t, c)  # noqa: E731  (t is sigma itself)
        return samplers.sample_flow(velocity, noise, sigmas, cond, neg_cond, samplers.Guidance(prompt.cfg_scale))

    # --- LoRA --------------------------------------------------------------------------------------

    def lora_targets(self, model: nn.Module, cfg: dict) -> dict[str, int]:
        return lora_targets(model, cfg["network_dim"], group_ranks=cfg["group_ranks"],
                            double_blocks=cfg["train_double_blocks"], single_blocks=cfg["train_single_blocks"],
                            embedders=cfg["lora_embedders"])

    def lr_multipliers(self, cfg: dict, trainable: dict[str, nn.Parameter]) -> dict[str, float]:
        """Full fine-tuning: the blocks outside train_double_blocks / train_single_blocks stay frozen
        (factor 0), whole; LoRA selects its targets instead."""
        if cfg["train_mode"] != "full":
            return {}
        frozen = {}
        for kind, key in (("double_blocks", "train_double_blocks"), ("single_blocks", "train_single_blocks")):
            pattern = re.compile(rf"{kind}\.(\d+)\.")
            indices = {int(m.group(1)) for name in trainable if (m := pattern.match(name))}
            if not indices:
                continue
            kept = set(parse_block_indices(cfg[key], max(indices) + 1, kind))
            frozen |= {name: 0.0 for name in trainable if (m := pattern.match(name)) and int(m.group(1)) not in kept}
        return frozen

    def lora_layers(self, model: nn.Module) -> dict[str, Layer]:
        """Every Linear of the blocks (double blocks run first, then single blocks), the input
        embedders and the final layer. A single block's linear1 / linear2 hold attention and MLP of
        the joint stream together."""
        layers, total = {}, len(model.double_blocks) + len(model.single_blocks)
        for kind, offset in (("double_blocks", 0), ("single_blocks", len(model.double_blocks))):
            for i, block in enumerate(getattr(model, kind)):
                for sub_path, module in block.named_modules():
                    if isinstance(module, nn.Linear):
                        group = _block_group(kind, sub_path)
                        layers[f"{kind}.{i}.{sub_path}"] = Layer(group, kind, i, (offset + i) / total,
                                                                 _roles(kind, sub_path))
        for name in _embedder_names(model, True):
            for sub_path, module in getattr(model, name).named_modules():
                if isinstance(module, nn.Linear):
                    layers[f"{name}.{sub_path}" if sub_path else name] = Layer(name, roles=frozenset({"embedder"}))
        layers["final_layer.linear"] = Layer("final_layer", roles=frozenset({"final"}))
        layers["final_layer.adaLN_modulation.1"] = Layer("final_layer", roles=frozenset({"final", "modulation"}))
        return layers

    def lora_fused_rows(self, path: str, layer: nn.Module) -> list[int]:
        """q, k, v of a double block's qkv; q, k, v and the MLP input of a single block's linear1."""
        hidden = layer.in_features
        if re.fullmatch(r"double_blocks\.\d+\.(img|txt)_attn\.qkv", path):
            return [hidden] * 3
        if re.fullmatch(r"single_blocks\.\d+\.linear1", path):
            return [hidden] * 3 + [layer.out_features - 3 * hidden]
        return []

    def text_encoder_loras(self) -> dict[str, tuple[str, str]]:
        # kohya's lora_flux: CLIP-L is te1, T5 te3 ("ComfyUI compatible"); diffusers' FluxPipeline
        # has them as text_encoder and text_encoder_2
        return {"clip_l": ("lora_te1", "text_encoder"), "t5": ("lora_te3", "text_encoder_2")}

    def text_encoder_loader_notes(self, encoders: list[str]) -> list[str]:
        if "t5" not in encoders:
            return []
        return ["diffusers (T5, lora_te3): its FLUX loader reads CLIP-L LoRAs only and skips T5's with a warning; "
                "ComfyUI applies them"]

    def lora_metadata(self, cfg: dict, params) -> dict[str, str]:
        variant = self.variant(params)
        meta = {
            "ss_base_model_version": "flux1",
            "ss_network_module": "networks.lora_flux",
            "ss_model_type": "flux",
            "modelspec.architecture": f"flux-1-{variant}/lora",
            "modelspec.implementation": "https://github.com/black-forest-labs/flux",
        }
        for key in ("guidance_scale", "timestep_sampling", "discrete_flow_shift", "model_prediction_type",
                    "sigmoid_scale", "logit_mean", "logit_std", "mode_scale", "apply_t5_attn_mask"):
            meta[f"ss_{key}"] = str(cfg[key])
        meta["ss_weighting_scheme"] = "none"
        return meta

    def lora_from_diffusers(self, module: str) -> tuple[str, int | None]:
        match = re.fullmatch(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.+)", module)
        if match:
            kind, index, inner = match.groups()
            table = SINGLE_FROM_DIFFUSERS if kind == "single_transformer_blocks" else DOUBLE_FROM_DIFFUSERS
            block = "single_blocks" if kind == "single_transformer_blocks" else "double_blocks"
            if inner in table:
                path, piece = table[inner]
                return f"{block}.{index}.{path}", piece
        elif module in TOP_FROM_DIFFUSERS:
            return TOP_FROM_DIFFUSERS[module], None
        raise ValueError(f"LoRA module {module!r} has no FLUX.1 counterpart (is this a FLUX.1 LoRA?)")

    def lora_up_from_diffusers(self, path: str, up: Tensor, down: Tensor | None = None) -> Tensor:
        if path == "final_layer.adaLN_modulation.1":
            return torch.cat(up.chunk(2, dim=0)[::-1])  # diffusers (scale, shift) -> BFL (shift, scale)
        return up

    def lora_to_diffusers(self, path: str, up: Tensor, down: Tensor) -> dict[str, Tensor]:
        """Inverse of lora_from_diffusers: a fused weight's up cut into its q, k, v (and MLP) rows,
        the final layer's modulation rows swapped to diffusers' (scale, shift)."""
        names = DIFFUSERS_NAMES.get(re.sub(r"^(double_blocks|single_blocks)\.\d+\.", r"\1.", path))
        if names is None:
            raise ValueError(f"{path} has no diffusers name in FLUX.1 (diffusers' FluxTransformer2DModel)")
        block = re.match(r"(double_blocks|single_blocks)\.(\d+)\.", path)
        where = f"{DIFFUSERS_BLOCKS[block.group(1)]}.{block.group(2)}." if block else ""
        if path == "final_layer.adaLN_modulation.1":
            up = torch.cat(up.chunk(2, dim=0)[::-1])  # BFL (shift, scale) -> diffusers (scale, shift)
        if len(names) == 1:
            return {f"transformer.{where}{names[0]}": up}
        sizes = self.lora_slice_sizes(path, down, {3: {"up": up[3 * down.shape[1]:]}} if len(names) == 4 else {})
        return {f"transformer.{where}{name}": rows for name, rows in zip(names, up.split(sizes))}

    def lora_slice_sizes(self, path: str, down: Tensor, slices: dict) -> list[int]:
        """q, k, v rows of `hidden` each (FLUX's input width is hidden); a single block's linear1
        adds the MLP input rows (4 hidden when the file leaves that slice out)."""
        hidden = down.shape[1]
        sizes = [hidden] * 3
        if path.startswith("single_blocks."):
            sizes.append(slices[3]["up"].shape[0] if 3 in slices else MLP_RATIO * hidden)
        return sizes

    def lora_loader_notes(self, targets: dict[str, int]) -> list[str]:
        embedders = sorted({p.split(".")[0] for p in targets if p.split(".")[0] in EMBEDDERS})
        if not embedders:
            return []
        return [f"diffusers ({', '.join(embedders)}): its kohya converter names the embedder LoRAs without the "
                "'transformer.' prefix its FLUX loader keeps, so they are skipped there; ComfyUI applies them"]

    # --- the memory plan ---------------------------------------------------------------------------

    def plan_batch(self, cfg: dict, params: network.FluxParams, device) -> dict:
        """A cached batch: fp32 latents, T5 states and CLIP pooled in the model dtype."""
        from config import DTYPES

        b, dtype = cfg["batch_size"], DTYPES[cfg["dtype"]]
        side = cfg["resolution"] // 8 if cfg["ae_path"] else cfg["resolution"]  # pixels without a VAE (demo)
        tokens = self.text_length(cfg, params)
        batch = {
            "latent": torch.randn(b, params.in_channels // 4, side, side, device=device),
            "t5": torch.randn(b, tokens, params.context_in_dim, device=device, dtype=dtype),
            "clip_pooled": torch.randn(b, params.vec_in_dim, device=device, dtype=dtype),
        }
        if cfg["apply_t5_attn_mask"]:
            batch["t5_mask"] = torch.ones(b, tokens, dtype=torch.bool, device=device)
        return batch


# --- inputs ------------------------------------------------------------------------------------------


def denoise(model: network.Flux, x_t: Tensor, sigma: Tensor, cond: dict) -> Tensor:
    """Run the transformer on a latent (B, C, h, w) at noise level sigma (B,) in [0, 1].

    cond holds "t5" (B, L, 4096), "clip_pooled" (B, 768), "guidance" (B,) (dev only) and
    optionally "t5_mask" (B, L). Returns the output unpacked to (B, C, h, w) (the velocity
    noise - x0 when trained)."""
    b, _, h, w = x_t.shape
    dtype = model.img_in.weight.dtype if model.img_in.weight.is_floating_point() else x_t.dtype
    txt = cond["t5"].to(dtype)
    guidance = cond.get("guidance")
    out = model(
        img=network.pack(x_t).to(dtype),
        img_ids=network.img_ids(b, h, w, device=x_t.device),
        txt=txt,
        txt_ids=network.txt_ids(b, txt.shape[1], device=x_t.device),
        timesteps=sigma.float(),  # fp32: the embedding multiplies by 1000
        y=cond["clip_pooled"].to(dtype),
        guidance=guidance.float() if (guidance is not None and model.params.guidance_embed) else None,
        txt_mask=cond.get("t5_mask"),
    )
    return network.unpack(out.to(x_t.dtype), h, w)


# --- block swap counts -------------------------------------------------------------------------------


def kohya_split(blocks_to_swap: int) -> tuple[int, int]:
    """sd-scripts' FLUX split of one count: n -> (n // 2 double, (n - n // 2) * 2 single),
    since a single block holds about half the weights of a double block."""
    double = blocks_to_swap // 2
    return double, (blocks_to_swap - double) * 2


def max_blocks_to_swap(depth: int, depth_single: int) -> int:
    """The largest `blocks_to_swap` that leaves MIN_RESIDENT blocks of each kind (35 for FLUX.1)."""
    n = 0
    while True:
        double, single = kohya_split(n + 1)
        if double > depth - MIN_RESIDENT or single > depth_single - MIN_RESIDENT:
            return n
        n += 1


# --- LoRA targets ------------------------------------------------------------------------------------


def _block_group(kind: str, sub_path: str) -> str:
    """The per-layer rank group of a Linear inside a block ('img_attn', 'single_mod', ...)."""
    if kind == "double_blocks":
        return sub_path.split(".")[0]  # img_attn.qkv -> img_attn, txt_mlp.0 -> txt_mlp
    return "single_mod" if sub_path.startswith("modulation.") else "single"  # linear1 / linear2


def _roles(kind: str, sub_path: str) -> frozenset:
    """A block Linear's roles (lora.ROLES): double blocks have an image and a text (context)
    stream; a single block's linear1 / linear2 fuse attention and MLP of the joint stream."""
    if kind == "single_blocks":
        if sub_path.startswith("modulation."):
            return frozenset({"modulation", "image", "context"})
        return frozenset({"attention", "mlp", "image", "context"})
    stream = "image" if sub_path.startswith("img_") else "context"
    part = {"attn": "attention", "mlp": "mlp", "mod": "modulation"}[sub_path.split(".")[0].split("_")[1]]
    return frozenset({stream, part})


def _embedder_names(model: nn.Module, embedders) -> list[str]:
    present = [n for n in EMBEDDERS if any(isinstance(m, nn.Linear) for m in getattr(model, n).modules())]
    if embedders is True:
        return present
    if embedders is False or embedders is None:
        return []
    unknown = [n for n in embedders if n not in EMBEDDERS]
    if unknown:
        raise ValueError(f"embedders: unknown {unknown}; choose among {list(EMBEDDERS)} (or True for all)")
    absent = [n for n in embedders if n not in present]
    if absent:
        raise ValueError(f"embedders: {absent} not in this model (schnell has no guidance_in); remove them")
    return list(embedders)


def lora_targets(model: nn.Module, rank: int, group_ranks: dict[str, int] | None = None,
                 double_blocks="all", single_blocks="all", embedders=False) -> dict[str, int]:
    """Module path -> rank for every Linear that gets a LoRA.

    Default: every Linear in every double and single block (kohya's default: 304 at full
    size). `group_ranks` overrides the rank per group (img_attn, txt_attn, img_mlp, txt_mlp,
    img_mod, txt_mod, single = linear1/linear2, single_mod = modulation.lin, or an embedder
    name); 0 removes the group. `double_blocks` / `single_blocks` select blocks by index
    ('all', 'none', '0,1,4-7' or a list). `embedders` adds the input embedders' Linears (True,
    or a list among EMBEDDERS)."""
    group_ranks = dict(group_ranks or {})
    check_ranks(rank, group_ranks, DOUBLE_GROUPS + SINGLE_GROUPS + EMBEDDERS, "FLUX")
    targets = {}
    for kind, spec in (("double_blocks", double_blocks), ("single_blocks", single_blocks)):
        blocks = getattr(model, kind)
        for i in parse_block_indices(spec, len(blocks), kind):
            for sub_path, module in blocks[i].named_modules():
                if isinstance(module, nn.Linear):
                    targets[f"{kind}.{i}.{sub_path}"] = group_ranks.get(_block_group(kind, sub_path), rank)
    for name in _embedder_names(model, embedders):
        for sub_path, module in getattr(model, name).named_modules():
            if isinstance(module, nn.Linear):
                targets[f"{name}.{sub_path}" if sub_path else name] = group_ranks.get(name, rank)
    return {path: r for path, r in targets.items() if r > 0}


# --- diffusers LoRA names ----------------------------------------------------------------------------

# diffusers module name (inside one block) -> (BFL module path, index of the row slice of a fused
# weight or None). Row slices follow comfy/utils.py flux_to_diffusers.
DOUBLE_FROM_DIFFUSERS = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None),
    "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None),
    "ff_context.net.2": ("txt_mlp.2", None),
    "norm1.linear": ("img_mod.lin", None),
    "norm1_context.linear": ("txt_mod.lin", None),
}
SINGLE_FROM_DIFFUSERS = {
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None),
    "norm.linear": ("modulation.lin", None),
}
TOP_FROM_DIFFUSERS = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # rows are (scale, shift) in diffusers
}
MLP_RATIO = 4  # FLUX.1: the size of a single block's proj_mlp slice when a file leaves it out
DIFFUSERS_BLOCKS = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}


def _diffusers_names() -> dict[str, list[str]]:
    """BFL module path ('double_blocks.<sub>' for blocks) -> its diffusers modules in slice order."""
    names: dict[str, list[tuple[int, str]]] = {}
    for kind, table in (("double_blocks", DOUBLE_FROM_DIFFUSERS), ("single_blocks", SINGLE_FROM_DIFFUSERS)):
        for diffusers, (path, piece) in table.items():
            names.setdefault(f"{kind}.{path}", []).append((piece or 0, diffusers))
    for diffusers, path in TOP_FROM_DIFFUSERS.items():
        names[path] = [(0, diffusers)]
    return {path: [name for _, name in sorted(found)] for path, found in names.items()}


DIFFUSERS_NAMES = _diffusers_names()


FAMILY = Flux()
