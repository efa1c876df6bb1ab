"""SDXL base 1.0 and the single-file fine-tunes built on it: everything that makes the family itself.

Network    models/unet.py (sgm module names): the `model.diffusion_model.*` part of
           sd_xl_base_1.0.safetensors, loaded strictly; the block Linears in fp8 optionally.
Text       context (B, 77 n, 2048) = cat(CLIP-L hidden_states[11], bigG penultimate), no final
           LayerNorm, n = max_token_length / 75 windows; pooled (B, 1280) = the projected bigG
           EOS state (models/text.py SDXLPromptEncoder). Both encoders come from the checkpoint's
           `conditioner.embedders.0` (HF layout) and `.1` (OpenCLIP layout), or from
           clip_l_path / clip_g_path.
Codec      the 4-channel VAE, latent = 0.13025 z, in fp32 unless no_half_vae=False (the released
           VAE overflows in fp16): from ae_path (original or diffusers layout, e.g. the fp16-fix
           sdxl_vae.safetensors) or the checkpoint's `first_stage_model.*`; pixels when neither
           holds one (the CPU demo).
Objective  DDPM (losses.DDPM): scaled-linear betas 0.00085..0.012 over 1000 steps, integer t;
           epsilon, or v with v_parameterization; kohya's options by kohya's names (zero terminal
           SNR, min-SNR gamma, debiased estimation, noise offset, pyramid noise, input
           perturbation, Huber, the timestep range).
Inputs     y (B, 2816) = [pooled | size_embedding(original size, crop top-left, target size)],
           each sample's own numbers from the cache; x, context and y in the weights' dtype.
Sampling   samplers.sample_ddpm on the training betas: euler (default), euler_ancestral, ddim,
           dpmpp_2m; leading spacing with steps_offset 1 (diffusers' SDXL scheduler config),
           trailing, linspace or Karras sigmas; CFG against the negative prompt (5 by default).
LoRA       kohya's networks/lora.py for SDXL: every Linear of every SpatialTransformer (proj_in,
           proj_out; per transformer block attn1 and attn2 to_q/to_k/to_v/to_out.0, ff.net.0.proj,
           ff.net.2): 722 modules at full size; with conv_dim also LoCon on the 3x3 convs of the
           ResBlocks, Downsamples and Upsamples (and, as kohya, the ResBlocks' time Linear and 1x1
           skip at network_dim). Ranks per group (group_ranks: attn1, attn2, ff, proj, resnet),
           ranks, alphas and learning rates per kohya block (23: base, 9 input, 3 middle, 9
           output, out). Names `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`;
           diffusers / PEFT files (`unet.down_blocks.1.attentions.0...`) read back.
Memory     the blocks are every ResBlock and every transformer block, grouped by resolution
           level and kind, so that the blocks of a group are alike in size (block swap sizes each
           slot for the largest block of its group). blocks_to_swap fills the deepest level's
           transformer blocks first (60 of SDXL's 70, 81 % of its weights), then that level's
           ResBlocks, then the next level up.
"""
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor, nn

import losses
from blockswap import MIN_RESIDENT  # blocks of each group that stay on the device
import sample
import samplers
from config import DTYPES, ConfigError
from lora import Layer
from models import PixelCodec, VAECodec
from models import unet as network
from models.loading import load_state_dict, strip_prefix
from models.text import CLIP_MAX_LENGTH, CLIP_WINDOW, SDXL_MAX_TOKEN_LENGTHS, SDXLPromptEncoder

from . import DDPM_KEYS, Family, ddpm_options

VAE_DOWNSCALE = 8
SIZE_EMBEDDING = 6 * 256  # the size and crop part of y
LORA_GROUPS = ("attn1", "attn2", "ff", "proj", "resnet")
SAMPLE_SCHEDULES = ("leading", "trailing", "linspace", "karras")
SAMPLE_CFG = 5.0  # the default CFG scale of the samples ("sample_cfg" 0); a prompt's --l overrides it
# kohya's SDXL blocks (networks/lora.py: get_block_index, SDXL_NUM_OF_BLOCKS = 9, SDXL_NUM_OF_MID_BLOCKS = 3):
# 0 base (time_embed, label_emb), 1-9 input_blocks.0-8, 10-12 middle_block.0-2, 13-21 output_blocks.0-8, 22 out.
KOHYA_IO_BLOCKS, KOHYA_MID_BLOCKS = 9, 3
KOHYA_BLOCKS = 1 + 2 * KOHYA_IO_BLOCKS + KOHYA_MID_BLOCKS + 1  # 23
LR_WEIGHT_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")
CONV_3X3 = (".in_layers.2", ".out_layers.3", ".op", ".conv")  # the 3x3 convs LoCon reaches, by name


class SDXL(Family):
    name = "sdxl"
    title = "SDXL"
    latent_multiple = 4  # two downsamplings in the UNet
    config_keys = DDPM_KEYS + (
        "clip_l_path", "clip_g_path", "clip_tokenizer", "max_token_length", "no_half_vae", "conv_dim", "conv_alpha",
        "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight", "mid_lr_weight",
        "up_lr_weight", "block_lr_zero_threshold", "sample_sampler", "sample_schedule", "sample_cfg")
    lora_config_keys = ("conv_dim", "conv_alpha", "block_dims", "block_alphas", "conv_block_dims",
                        "conv_block_alphas", "down_lr_weight", "mid_lr_weight", "up_lr_weight",
                        "block_lr_zero_threshold")
    target_config_keys = ("conv_dim", "block_dims", "conv_block_dims")  # what a `targets` preset replaces

    # --- the checkpoint ----------------------------------------------------------------------------

    def detect(self, sd: dict) -> bool:
        sd = strip_prefix(sd, network.PREFIXES)[0]
        return "label_emb.0.0.weight" in sd and "input_blocks.0.0.weight" in sd

    def params(self, sd: dict, cfg: dict) -> network.UNetParams:
        return network.infer_params(sd, **cfg["model_overrides"])

    def default_params(self, cfg: dict) -> network.UNetParams:
        return replace(network.UNetParams(), **cfg["model_overrides"])  # SDXL base 1.0

    def build(self, params: network.UNetParams) -> nn.Module:
        return network.UNet(params)

    def load(self, sd: dict, cfg: dict, dtype: torch.dtype, device="cpu") -> nn.Module:
        if not cfg["fp8_base"]:
            return network.UNet.from_state_dict(sd, dtype=dtype, device=device, **cfg["model_overrides"])
        return self.load_fp8(strip_prefix(sd, network.PREFIXES)[0], self.params(sd, cfg), cfg, dtype, device)

    def variant(self, params: network.UNetParams) -> str:
        return "base 1.0" if params == network.UNetParams() else "(custom shapes)"

    # --- blocks ------------------------------------------------------------------------------------

    def blocks(self, model: nn.Module) -> dict[str, list[nn.Module]]:
        """Every ResBlock and transformer block, in execution order, grouped as
        `level{L}_resnets` / `level{L}_transformer_blocks` (L: 0 at full resolution)."""
        groups: dict[str, list[nn.Module]] = {}
        for group, block in block_units(model):
            groups.setdefault(group, []).append(block)
        return dict(sorted(groups.items(), key=lambda item: _group_order(item[0])))

    def swap_counts(self, model: nn.Module, cfg: dict) -> dict[str, int]:
        groups = self.blocks(model)
        order = sorted(groups, key=lambda name: _swap_priority(name))
        room = {name: max(len(groups[name]) - MIN_RESIDENT, 0) for name in order}
        n, most = cfg["blocks_to_swap"], sum(room.values())
        if not 0 <= n <= most:
            raise ValueError(f"blocks_to_swap={n}: SDXL swaps at most {most} blocks ({MIN_RESIDENT} of each group stay "
                             f"on the device: {', '.join(f'{k} {len(v)}' for k, v in groups.items())})")
        counts = {}
        for name in order:  # the deepest level's transformer blocks first, then its ResBlocks, then up
            counts[name] = min(n, room[name])
            n -= counts[name]
        return {name: counts[name] for name in groups}

    # --- config ------------------------------------------------------------------------------------

    def check_config(self, cfg: dict) -> None:
        """fp16 is allowed (loss scaling, training.LossScaler); everything else is checked here."""
        if cfg["max_token_length"] not in SDXL_MAX_TOKEN_LENGTHS:
            raise ConfigError(f"max_token_length={cfg['max_token_length']}: choose one of {SDXL_MAX_TOKEN_LENGTHS}")
        if cfg["sample_sampler"] not in ("",) + samplers.DDPM_SAMPLERS:
            raise ConfigError(f"sample_sampler={cfg['sample_sampler']!r}: choose one of {samplers.DDPM_SAMPLERS}")
        if cfg["sample_schedule"] not in SAMPLE_SCHEDULES:
            raise ConfigError(f"sample_schedule={cfg['sample_schedule']!r}: choose one of {SAMPLE_SCHEDULES}")
        unknown = sorted(set(cfg["group_ranks"]) - set(LORA_GROUPS))
        if unknown:
            raise ConfigError(f"group_ranks: {unknown} are no SDXL groups; choose among {list(LORA_GROUPS)}")
        try:
            self.objective(cfg)
            block_settings(cfg)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def resolution_multiple(self, cfg: dict) -> int:
        return self.latent_multiple * downscale(cfg)

    # --- data --------------------------------------------------------------------------------------

    def codec(self, cfg: dict, dtype: torch.dtype, device):
        path = vae_path(cfg)
        return PixelCodec() if path is None else VAECodec(path, self.codec_dtype(cfg), device)

    def codec_dtype(self, cfg: dict) -> torch.dtype:
        return torch.float32 if cfg["no_half_vae"] else DTYPES[cfg["dtype"]]

    def text_encoder(self, cfg: dict, params, dtype: torch.dtype, device) -> SDXLPromptEncoder:
        clip_l, clip_g = cfg["clip_l_path"] or cfg["model_path"], cfg["clip_g_path"] or cfg["model_path"]
        for key, path in (("clip_l_path", clip_l), ("clip_g_path", clip_g)):
            if path == cfg["model_path"] and not has_section(path, "conditioner.embedders.", cfg["allow_pickle"]):
                raise ValueError(f"{path} holds no text encoders (no conditioner.embedders.* keys): set {key} to the "
                                 "encoder file, or use a full SDXL checkpoint")
        tokenizer = cfg["clip_tokenizer"] or None  # one vocabulary: the CLIP-L tokenizer serves bigG too
        return SDXLPromptEncoder.load(clip_l, clip_g, tokenizer, tokenizer, max_token_length=cfg["max_token_length"],
                                      dtype=dtype, device=device)

    def text_length(self, cfg: dict, params) -> int:
        return CLIP_MAX_LENGTH * (cfg["max_token_length"] // CLIP_WINDOW)  # windows kept whole ("concat")

    # --- training ----------------------------------------------------------------------------------

    def objective(self, cfg: dict) -> losses.DDPM:
        return losses.DDPM(**ddpm_options(cfg))

    def conditioning(self, batch: dict, cfg: dict, generator=None) -> dict:
        pooled = batch["pooled"]
        sizes = network.size_embedding(batch["original_size"], batch["crop_top_left"], batch["target_size"])
        return {"context": batch["context"], "y": torch.cat([pooled, sizes.to(pooled.device, pooled.dtype)], dim=1)}

    def predict(self, model: nn.Module, x_t: Tensor, t: Tensor, cond: dict) -> Tensor:
        return denoise(model, x_t, t, cond)

    # --- sampling ----------------------------------------------------------------------------------

    def prompt_defaults(self, cfg: dict, params) -> "SDXLPrompt":
        return SDXLPrompt(prompt="", width=cfg["resolution"], height=cfg["resolution"], seed=cfg["seed"],
                          steps=cfg["sample_steps"] or 30, cfg_scale=cfg["sample_cfg"] or SAMPLE_CFG,
                          sampler=cfg["sample_sampler"] or "euler", schedule=cfg["sample_schedule"],
                          v_prediction=cfg["v_parameterization"], zero_terminal_snr=cfg["zero_terminal_snr"])

    def sample_conditioning(self, text: dict, prompt: sample.SamplePrompt, device) -> dict:
        """Generated at the prompt's size: original = target = (height, width), crop (0, 0)."""
        size = (prompt.height, prompt.width)
        batch = {"pooled": text["pooled"].to(device), "context": text["context"].to(device), "original_size": size,
                 "crop_top_left": (0, 0), "target_size": size}
        return self.conditioning(batch, {})

    def sample(self, model: nn.Module, prompt: sample.SamplePrompt, cond: dict, neg_cond: dict | None,
               noise: Tensor) -> Tensor:
        """DDPM sampling with the prompt's sampler settings (SDXLPrompt; a plain SamplePrompt gets
        Euler on the leading schedule, epsilon)."""
        settings = prompt if isinstance(prompt, SDXLPrompt) else SDXLPrompt(prompt="")
        abar = losses.alphas_cumprod(losses.DDPM(zero_terminal_snr=settings.zero_terminal_snr).betas)
        karras = settings.schedule == "karras"
        schedule = samplers.ddpm_schedule(abar, prompt.steps, "leading" if karras else settings.schedule,
                                          steps_offset=1, karras=karras)
        return samplers.sample_ddpm(lambda x, t, c: denoise(model, x, t, c), noise, schedule, cond, neg_cond,
                                    samplers.Guidance(prompt.cfg_scale), sampler=settings.sampler,
                                    prediction="v" if settings.v_prediction else "epsilon",
                                    generator=torch.Generator().manual_seed(prompt.seed))

    # --- LoRA --------------------------------------------------------------------------------------

    def lora_targets(self, model: nn.Module, cfg: dict) -> dict[str, int]:
        return {path: rank for path, (rank, _) in lora_targets(model, cfg).items()}

    def lora_alphas(self, cfg: dict, targets: dict[str, int]) -> dict[str, float]:
        settings = block_settings(cfg)
        return {path: target_alpha(path, cfg, settings) for path in targets}

    def lr_multipliers(self, cfg: dict, trainable: dict[str, nn.Parameter]) -> dict[str, float]:
        """kohya's block learning rates: learning_rate times the factor of the block a LoRA sits in."""
        weights = block_settings(cfg).lr_weight
        if weights is None or cfg["train_mode"] != "lora":
            return {}
        return {name: weights[kohya_block(name.split(".")[1])] for name in trainable
                if name.split(".")[1].startswith("lora_unet_")}  # text-encoder LoRAs: their own rates

    def lora_layers(self, model: nn.Module) -> dict[str, Layer]:
        """Every layer kohya's LoRA reaches with LoCon (the SpatialTransformers' Linears, the
        ResBlocks' Linears and convs, the Down- and Upsamples), in kohya's blocks 2-21 in the order
        they run; conv_in, the time and label embedders and the output conv outside the blocks."""
        layers = {}
        for path, group, is_3x3 in _candidates(model, conv=True):
            kind, index = path.split(".")[:2]
            depth = (kohya_block(path) - 2) / (KOHYA_BLOCKS - 3)  # input_blocks.1 is 2, output_blocks.8 is 21
            layers[path] = Layer(group, kind, int(index), depth, _roles(path, group, is_3x3))
        for path, module in model.named_modules():
            group = next((g for prefix, g in OUTSIDE_BLOCKS.items() if path.startswith(prefix)), None)
            if group is not None and isinstance(module, (nn.Linear, nn.Conv2d)):
                layers[path] = Layer(group, roles=frozenset({"final" if group == "out" else "embedder"}))
        return layers

    def target_presets(self) -> dict[str, tuple[str, object]]:
        return {"transformer_blocks": ("the SpatialTransformers' Linears (kohya's LoRA without LoCon)",
                                       lambda l: l.group in ("attn1", "attn2", "ff", "proj"))}

    def text_encoder_loras(self) -> dict[str, tuple[str, str]]:
        # kohya's SDXL LoRA: te1 CLIP-L, te2 OpenCLIP bigG; StableDiffusionXLPipeline's text_encoder(_2)
        return {"clip_l": ("lora_te1", "text_encoder"), "clip_g": ("lora_te2", "text_encoder_2")}

    def lora_metadata(self, cfg: dict, params) -> dict[str, str]:
        meta = {
            "ss_base_model_version": "sdxl_base_v1-0",
            "ss_network_module": "networks.lora",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "modelspec.prediction_type": "v" if cfg["v_parameterization"] else "epsilon",
            "ss_v_parameterization": str(cfg["v_parameterization"]),
            "ss_debiased_estimation": str(cfg["debiased_estimation_loss"]),
        }
        for key in ("max_token_length", "min_snr_gamma", "noise_offset", "noise_offset_random_strength",
                    "adaptive_noise_scale", "multires_noise_iterations", "multires_noise_discount", "ip_noise_gamma",
                    "ip_noise_gamma_random_strength", "zero_terminal_snr", "min_timestep", "max_timestep"):
            meta[f"ss_{key}"] = str(cfg[key])
        return meta

    def lora_from_diffusers(self, module: str) -> tuple[str, int | None]:
        return sgm_path(module), None

    def lora_to_diffusers(self, path: str, up: Tensor, down: Tensor) -> dict[str, Tensor]:
        return {f"unet.{diffusers_path(path)}": up}

    # --- the memory plan ---------------------------------------------------------------------------

    def plan_batch(self, cfg: dict, params: network.UNetParams, device) -> dict:
        """A cached batch: fp32 latents, text states in the model dtype, the sizes as integers."""
        b, dtype, res = cfg["batch_size"], DTYPES[cfg["dtype"]], cfg["resolution"]
        side = res // downscale(cfg)
        size = torch.full((b, 2), res, dtype=torch.long, device=device)
        return {
            "latent": torch.randn(b, params.in_channels, side, side, device=device),
            "context": torch.randn(b, self.text_length(cfg, params), params.context_dim, device=device, dtype=dtype),
            "pooled": torch.randn(b, params.adm_in_channels - SIZE_EMBEDDING, device=device, dtype=dtype),
            "original_size": size, "crop_top_left": torch.zeros_like(size), "target_size": size,
        }

    def plan_text_encoders(self, cfg: dict, params) -> list:
        """CLIP-L, then bigG, with the shapes of their files (the checkpoint's conditioner when no
        separate file is named), else as released; one encoding batch is text_batch_size captions
        of max_token_length / 75 windows each."""
        from models import text

        dtype, rows = DTYPES[cfg["dtype"]], cfg["text_batch_size"] * (cfg["max_token_length"] // CLIP_WINDOW)
        paths = {"clip_l": cfg["clip_l_path"] or cfg["model_path"], "clip_g": cfg["clip_g_path"] or cfg["model_path"]}
        out = []
        for kind in ("clip_l", "clip_g"):
            config = text.text_config(kind, paths[kind])

            def build(kind=kind, config=config):
                return text.build_text_model(kind, config).to(dtype)

            def inputs(device):
                ids = torch.zeros(rows, CLIP_MAX_LENGTH, dtype=torch.long, device=device)
                return {"input_ids": ids, "output_hidden_states": True}  # the penultimate states are read

            out.append((kind, build, inputs))
        return out

    def plan_codec(self, cfg: dict, params) -> nn.Module | None:
        from models.vae import autoencoder_skeleton

        path = vae_path(cfg)
        return None if downscale(cfg) == 1 else autoencoder_skeleton(path or "", "sdxl")


# --- files -------------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _keys(path: str, stamp: int, allow_pickle: bool) -> tuple[str, ...]:
    return tuple(load_state_dict(path, allow_pickle=allow_pickle))  # memory-mapped: the header is read


def has_section(path: str, prefix: str, allow_pickle: bool = False) -> bool:
    """Whether the checkpoint at `path` has keys under `prefix` (read once per file version)."""
    return any(k.startswith(prefix) for k in _keys(path, Path(path).stat().st_mtime_ns, allow_pickle))


def vae_path(cfg: dict) -> str | None:
    """The file the VAE comes from: ae_path, else the checkpoint when it holds first_stage_model.*;
    None (pixels) when neither does. A checkpoint not on disk (a plan) counts as having one."""
    if cfg["ae_path"]:
        return cfg["ae_path"]
    path = cfg["model_path"]
    if path and Path(path).exists() and not has_section(path, "first_stage_model.", cfg["allow_pickle"]):
        return None
    return path or None


def downscale(cfg: dict) -> int:
    """Pixels per latent position: 8 with the VAE, 1 on pixels. Without any file named (a plan of a
    config without model_path) the released layout is assumed: 8."""
    if not cfg["ae_path"] and not cfg["model_path"]:
        return VAE_DOWNSCALE
    return VAE_DOWNSCALE if vae_path(cfg) is not None else 1


# --- the network's inputs --------------------------------------------------------------------------


def denoise(model: network.UNet, x_t: Tensor, t: Tensor, cond: dict) -> Tensor:
    """The UNet's output (eps or v) for x_t (B, C, h, w) at DDPM indices t (B,); cond holds
    "context" (B, S, 2048) and "y" (B, 2816). Runs in the weights' dtype, returns x_t's."""
    dtype = model.input_blocks[0][0].weight.dtype  # conv_in: never fp8
    out = model(x_t.to(dtype), t, cond["context"].to(dtype), cond["y"].to(dtype))
    return out.to(x_t.dtype)


@dataclass
class SDXLPrompt(sample.SamplePrompt):
    """A sample prompt with the sampler settings it is drawn with (written into the PNG too)."""
    sampler: str = "euler"
    schedule: str = "leading"
    v_prediction: bool = False
    zero_terminal_snr: bool = False


# --- blocks ------------------------------------------------------------------------------------------


def block_levels(params: network.UNetParams) -> tuple[list[int], list[int]]:
    """The resolution level of every input block (conv_in and the Downsample closing a level
    included) and of every output block (deepest level first)."""
    last = len(params.channel_mult) - 1
    inputs = [0]
    for level, count in enumerate(params.num_res_blocks):
        inputs += [level] * count + ([level] if level != last else [])
    outputs = [level for level in reversed(range(last + 1)) for _ in range(params.num_res_blocks[level] + 1)]
    return inputs, outputs


def block_units(model: network.UNet) -> list[tuple[str, nn.Module]]:
    """(group, block) for every ResBlock and transformer block in execution order. conv_in, the
    Downsamples and Upsamples, the SpatialTransformers' norm and projections stay outside (small)."""
    inputs, outputs = block_levels(model.params)
    placed = list(zip(inputs, model.input_blocks)) + [(len(model.params.channel_mult) - 1, model.middle_block)]
    placed += list(zip(outputs, model.output_blocks))
    units = []
    for level, block in placed:
        for layer in block:
            if isinstance(layer, network.ResBlock):
                units.append((f"level{level}_resnets", layer))
            elif isinstance(layer, network.SpatialTransformer):
                units += [(f"level{level}_transformer_blocks", b) for b in layer.transformer_blocks]
    return units


def _level(group: str) -> int:
    return int(re.match(r"level(\d+)_", group).group(1))


def _group_order(group: str) -> tuple[int, bool]:
    return _level(group), group.endswith("_transformer_blocks")


def _swap_priority(group: str) -> tuple[int, bool]:
    return -_level(group), group.endswith("_resnets")


# --- LoRA targets ------------------------------------------------------------------------------------


@dataclass
class BlockSettings:
    """kohya's block-wise settings, one entry per kohya block (KOHYA_BLOCKS), or None when unset."""
    dims: list[int] | None
    alphas: list[float] | None
    conv_dims: list[int] | None
    conv_alphas: list[float] | None
    lr_weight: list[float] | None


def _numbers(key: str, text: str, kind, count: int | None = None) -> list | None:
    """kohya's comma-separated network_args values -> numbers (an empty entry is 0), or None for ""."""
    if not text.strip():
        return None
    try:
        values = [kind(v) if v.strip() else kind(0) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{key}={text!r}: expected comma-separated numbers") from None
    if count is not None and len(values) != count:
        raise ValueError(f"{key} has {len(values)} entries; kohya's SDXL layout has {count} (base, 9 input, "
                         "3 middle, 9 output blocks, out)")
    return values


def _lr_weights(key: str, text: str, count: int) -> list[float] | None:
    """kohya's down_lr_weight / up_lr_weight / mid_lr_weight: `count` factors (fewer are filled
    with 1), or for input and output blocks a preset name with an optional "+base"."""
    name, _, base = text.partition("+")
    if name.strip() in LR_WEIGHT_PRESETS:
        if count != KOHYA_IO_BLOCKS:
            raise ValueError(f"{key}: presets are for the 9 input or output blocks, give 3 numbers")
        ramp = [i / (count - 1) for i in range(count)]
        shapes = {"cosine": [_sine(r) for r in reversed(ramp)], "sine": [_sine(r) for r in ramp], "linear": ramp,
                  "reverse_linear": ramp[::-1], "zeros": [0.0] * count}
        return [w + float(base or 0.0) for w in shapes[name.strip()]]
    values = _numbers(key, text, float)
    if values is None:
        return None
    if len(values) > count:
        raise ValueError(f"{key} has {len(values)} entries; SDXL has {count} such blocks")
    return values + [1.0] * (count - len(values))


def _sine(r: float) -> float:
    import math

    return math.sin(math.pi * r / 2)


def block_settings(cfg: dict) -> BlockSettings:
    """kohya's create_network for SDXL: block mode is on when block_dims or a learning-rate
    weight is given; then every kohya block has a rank and alpha (network_dim / network_alpha by
    default), LoCon ranks come from conv_block_dims or conv_dim, and a block whose learning-rate
    factor is 0 (at or below block_lr_zero_threshold) gets no LoRA."""
    down = _lr_weights("down_lr_weight", cfg["down_lr_weight"], KOHYA_IO_BLOCKS)
    mid = _lr_weights("mid_lr_weight", cfg["mid_lr_weight"], KOHYA_MID_BLOCKS)
    up = _lr_weights("up_lr_weight", cfg["up_lr_weight"], KOHYA_IO_BLOCKS)
    lr_weight = None
    if down or mid or up:
        parts = [down or [1.0] * KOHYA_IO_BLOCKS, mid or [1.0] * KOHYA_MID_BLOCKS, up or [1.0] * KOHYA_IO_BLOCKS]
        threshold = cfg["block_lr_zero_threshold"]
        lr_weight = [1.0] + [w if w > threshold else 0.0 for part in parts for w in part] + [1.0]
    dims = _numbers("block_dims", cfg["block_dims"], int, KOHYA_BLOCKS)
    alphas = _numbers("block_alphas", cfg["block_alphas"], float, KOHYA_BLOCKS)
    conv_dims = _numbers("conv_block_dims", cfg["conv_block_dims"], int, KOHYA_BLOCKS)
    conv_alphas = _numbers("conv_block_alphas", cfg["conv_block_alphas"], float, KOHYA_BLOCKS)
    if dims is None and lr_weight is None:
        if alphas or conv_dims or conv_alphas:
            raise ValueError("block_alphas / conv_block_dims / conv_block_alphas need block_dims (or a learning-rate "
                             "weight), as in kohya")
        return BlockSettings(None, None, None, None, None)
    dims = dims or [cfg["network_dim"]] * KOHYA_BLOCKS
    alphas = alphas or [cfg["network_alpha"]] * KOHYA_BLOCKS
    if conv_dims is None and cfg["conv_dim"]:
        conv_dims = [cfg["conv_dim"]] * KOHYA_BLOCKS
    if conv_dims is not None:
        conv_alphas = conv_alphas or [cfg["conv_alpha"]] * KOHYA_BLOCKS
    if lr_weight is not None:  # kohya's remove_block_dims_and_alphas
        dims = [0 if w == 0 else d for d, w in zip(dims, lr_weight)]
        conv_dims = conv_dims and [0 if w == 0 else d for d, w in zip(conv_dims, lr_weight)]
    return BlockSettings(dims, alphas, conv_dims, conv_alphas, lr_weight)


def kohya_block(name: str) -> int:
    """kohya's block index of a module, from its path or kohya name ("input_blocks.4.1.proj_in",
    "lora_unet_input_blocks_4_1_proj_in"): 0 base, 1-9 input, 10-12 middle, 13-21 output, 22 out."""
    name = name.removeprefix("lora_unet_").replace(".", "_")
    match = re.match(r"(input_blocks|middle_block|output_blocks)_(\d+)", name)
    if match is None:
        return KOHYA_BLOCKS - 1 if name.startswith("out_") else 0
    offset = {"input_blocks": 1, "middle_block": 1 + KOHYA_IO_BLOCKS,
              "output_blocks": 1 + KOHYA_IO_BLOCKS + KOHYA_MID_BLOCKS}[match.group(1)]
    return offset + int(match.group(2))


def _group(inner: str) -> str:
    """The group_ranks group of a Linear inside a SpatialTransformer ("transformer_blocks.0.attn1.to_q")."""
    if inner.startswith(("proj_in", "proj_out")):
        return "proj"
    return inner.split(".")[2]  # attn1, attn2 or ff


def _candidates(model: network.UNet, conv: bool) -> list[tuple[str, str, bool]]:
    """(module path, group, is a 3x3 conv) of every layer kohya's SDXL LoRA can reach: the Linears
    of the SpatialTransformers, and with LoCon every Linear and conv of the ResBlocks, Downsamples
    and Upsamples (networks/lora.py: UNET_TARGET_REPLACE_MODULE[_CONV2D_3X3])."""
    found = []
    for path, module in model.named_modules():
        if isinstance(module, network.SpatialTransformer):
            found += [(f"{path}.{inner}", _group(inner), False) for inner, layer in module.named_modules()
                      if isinstance(layer, nn.Linear)]
        elif conv and isinstance(module, (network.ResBlock, network.Downsample, network.Upsample)):
            for inner, layer in module.named_modules():
                if isinstance(layer, (nn.Linear, nn.Conv2d)):
                    is_3x3 = isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)
                    found.append((f"{path}.{inner}", "conv" if is_3x3 else "resnet", is_3x3))
    return found


OUTSIDE_BLOCKS = {"input_blocks.0.": "conv_in", "time_embed.": "time_embed", "label_emb.": "label_emb", "out.": "out"}


def _roles(path: str, group: str, is_3x3: bool) -> frozenset:
    """A block layer's roles (lora.ROLES): cross-attention's keys and values read the text
    (context), everything else works on the image; a ResBlock's emb_layers is its modulation."""
    if group in ("attn1", "attn2"):
        return frozenset({"attention", "context" if re.search(r"attn2\.to_[kv]$", path) else "image"})
    if group == "ff":
        return frozenset({"mlp", "image"})
    if ".emb_layers." in path:
        return frozenset({"modulation", "image"})
    return frozenset({"conv", "image"} if is_3x3 or group == "resnet" else {"image"})  # proj_in / proj_out: Linears


def lora_targets(model: network.UNet, cfg: dict) -> dict[str, tuple[int, float]]:
    """Module path -> (rank, alpha) of every layer that gets a LoRA, as kohya's create_network
    for SDXL chooses them: network_dim / network_alpha on the transformer Linears, conv_dim /
    conv_alpha on the 3x3 convs (with the ResBlocks' other layers at network_dim), or the
    block-wise ranks; group_ranks then sets a group's rank everywhere (0 removes it)."""
    settings = block_settings(cfg)
    if settings.dims is not None and (len(model.input_blocks), len(model.output_blocks)) != (KOHYA_IO_BLOCKS,) * 2:
        raise ValueError(f"block-wise ranks and learning rates use kohya's SDXL layout of {KOHYA_IO_BLOCKS} input and "
                         f"output blocks; this UNet has {len(model.input_blocks)} and {len(model.output_blocks)}")
    conv = bool(cfg["conv_dim"] or settings.conv_dims)
    targets = {}
    for path, group, is_3x3 in _candidates(model, conv):
        if settings.dims is None:
            rank = cfg["conv_dim"] if is_3x3 else cfg["network_dim"]
        else:
            ranks = settings.conv_dims if is_3x3 else settings.dims
            rank = ranks[kohya_block(path)] if ranks is not None else 0
        rank = cfg["group_ranks"].get(group, rank)
        if rank > 0:
            targets[path] = (rank, target_alpha(path, cfg, settings))
    return targets


def target_alpha(path: str, cfg: dict, settings: BlockSettings | None = None) -> float:
    """The alpha of a LoRA at `path` (0 means alpha = rank, as network_alpha 0 does)."""
    settings = settings or block_settings(cfg)
    is_3x3 = path.endswith(CONV_3X3)
    if settings.dims is None:
        return cfg["conv_alpha"] if is_3x3 else cfg["network_alpha"]
    alphas = settings.conv_alphas if is_3x3 else settings.alphas
    return alphas[kohya_block(path)]


# --- diffusers names ---------------------------------------------------------------------------------

RESNET_FROM_DIFFUSERS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                         "conv_shortcut": "skip_connection"}
TOP_FROM_DIFFUSERS = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
                      "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
                      "add_embedding.linear_2": "label_emb.0.2"}
PER_LEVEL = 3  # SDXL's 2 ResBlocks per level + the Downsample (inputs) / 3 ResBlocks (outputs)


def _inner(kind: str, rest: str) -> str:
    """The part of a diffusers name inside a ResBlock or SpatialTransformer, in sgm names."""
    if kind == "resnets":
        layer, _, tail = rest.partition(".")
        if layer not in RESNET_FROM_DIFFUSERS:
            raise ValueError(f"unknown ResBlock layer {layer!r}")
        return f"0.{RESNET_FROM_DIFFUSERS[layer]}{('.' + tail) if tail else ''}"
    return f"1.{rest}"  # attentions: the same names inside (proj_in, transformer_blocks.N.attn1.to_q, ...)


def sgm_path(module: str) -> str:
    """A diffusers UNet2DConditionModel module name (SDXL layout: 2 ResBlocks per level, attention
    at the levels that upsample) -> the sgm module path, e.g. down_blocks.1.attentions.0.proj_in
    -> input_blocks.4.1.proj_in. Raises ValueError for names without a counterpart."""
    if module in TOP_FROM_DIFFUSERS:
        return TOP_FROM_DIFFUSERS[module]
    try:
        if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
            return f"input_blocks.{PER_LEVEL * (int(match.group(1)) + 1)}.0.op"
        if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
            return f"output_blocks.{PER_LEVEL * int(match.group(1)) + 2}.2.conv"
        if match := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
            side, level, kind, index, rest = match.groups()
            block = PER_LEVEL * int(level) + int(index) + (1 if side == "down" else 0)
            return f"{'input' if side == 'down' else 'output'}_blocks.{block}.{_inner(kind, rest)}"
        if match := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", module):
            kind, index, rest = match.groups()
            block = 1 if kind == "attentions" else 2 * int(index)
            return f"middle_block.{block}.{_inner(kind, rest)[2:]}"
    except ValueError as error:
        raise ValueError(f"LoRA module {module!r}: {error}") from None
    raise ValueError(f"LoRA module {module!r} has no SDXL UNet counterpart (is this an SDXL LoRA?)")


def diffusers_path(path: str) -> str:
    """The inverse of sgm_path for SDXL's layout: input_blocks.4.1.proj_in ->
    down_blocks.1.attentions.0.proj_in."""
    top = {sgm: diffusers for diffusers, sgm in TOP_FROM_DIFFUSERS.items()}
    resnet = {sgm: diffusers for diffusers, sgm in RESNET_FROM_DIFFUSERS.items()}
    if path in top:
        return top[path]
    if match := re.fullmatch(r"input_blocks\.(\d+)\.0\.op", path):
        return f"down_blocks.{int(match.group(1)) // PER_LEVEL - 1}.downsamplers.0.conv"
    if match := re.fullmatch(r"output_blocks\.(\d+)\.2\.conv", path):
        return f"up_blocks.{int(match.group(1)) // PER_LEVEL}.upsamplers.0.conv"
    match = re.fullmatch(r"(input_blocks|output_blocks|middle_block)\.(\d+)\.(?:(\d)\.)?(.+)", path)
    if match is None:
        raise ValueError(f"{path} has no diffusers name in SDXL's UNet")
    kind, block, layer, rest = match.group(1), int(match.group(2)), match.group(3), match.group(4)
    if kind == "middle_block":  # ResBlock, SpatialTransformer, ResBlock
        where, layer = ("mid_block.attentions.0", "1") if block == 1 else (f"mid_block.resnets.{block // 2}", "0")
    else:
        level, index = divmod(block - 1, PER_LEVEL) if kind == "input_blocks" else divmod(block, PER_LEVEL)
        side = "down" if kind == "input_blocks" else "up"
        where = f"{side}_blocks.{level}.{'attentions' if layer == '1' else 'resnets'}.{index}"
    if layer == "1":
        return f"{where}.{rest}"
    name = next((sgm for sgm in resnet if rest == sgm or rest.startswith(sgm + ".")), None)
    if name is None:
        raise ValueError(f"{path} has no diffusers name in SDXL's UNet")
    return f"{where}.{resnet[name]}{rest[len(name):]}"


FAMILY = SDXL()
