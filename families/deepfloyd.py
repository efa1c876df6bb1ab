"""DeepFloyd IF stage I and stage II: everything that makes the family itself.

Network    models/deepfloyd.py (deep-floyd/IF module names). Stage I (IF-I-M/L/XL) denoises a
           64 px image (3 input channels); stage II (IF-II-M/L) a 256 px one, with the 64 px
           image upsampled beside it (6 input channels) and its augmentation step. Both output
           6 channels: epsilon, then the learned variance range. A checkpoint is a FOLDER: the
           original (config.yml + pytorch_model.bin / .safetensors) or the diffusers unet/ one
           (the IF repositories hold both; a .bin is read only with allow_pickle). A full
           fine-tune's .safetensors from this trainer takes its shapes from the run folder's config.
Text       T5-XXL v1.1, encoder only (4.76 B; the IF repositories' text_encoder/), 77 tokens, run
           with its padding mask, IF's caption clean-up, the released unconditional embedding
           for "" when given (models/text.py IFPromptEncoder). Cached in bf16: 77 x 4096 x 2
           bytes, 616 KiB a caption. The UNet attends to all 77 states, as released (apply_t5_attn_mask
           masks the padding). In an fp16 run T5 runs in bf16 (it overflows in fp16; t5_dtype).
Codec      none: the UNet denoises pixels in [-1, 1] (models.PixelCodec).
Objective  DDPM, cosine schedule (squaredcos_cap_v2), 1000 steps (losses.DDPM): epsilon in channels
           0:3 with MSE, the variance in 3:6 with improved-diffusion's hybrid VLB term, as the
           original trains; or epsilon only (if_freeze_variance).
Inputs     the integer step; the T5 states. Stage II: the training image downsampled 4x is the
           low-resolution image; it is upsampled back (bilinear, align_corners), noised by q_sample
           at an augmentation step drawn uniformly per sample (if_aug_levels; the original's
           SuperResUNetModel draws uniform [0, 1000) when given no level) and fed with that step.
Sampling   samplers.sample_if: respaced DDPM with the learned variance, dynamic thresholding (p
           0.95), CFG against the unconditional embedding. Stage I "150", CFG 7, max 1.5; stage II
           "smart50", CFG 4, max 1.0, augmentation 0.25 (deep-floyd/IF modules/stage_I.py,
           stage_II.py); with if_freeze_variance, the fixed-small variance instead of the learned one.
           The cascade, stage I then II: `base_stage` (sample.py --base_model).
LoRA       the attention projections (qkv, encoder_kv, proj_out: 1-wide Conv1d), each ResBlock's
           emb_layers Linear and 1x1 skip conv; the 3x3 convs on request (group_ranks res_conv).
           With lora_format="diffusers" (the configs' choice) the file has diffusers' PEFT names
           (`unet.down_blocks.1.attentions.0.to_q.lora_A.weight`): IFPipeline.load_lora_weights
           reads it. kohya files name IF's own modules, which only this trainer reads. ComfyUI
           has no DeepFloyd IF LoRA loader (nor an IF model loader).
Memory     two groups of blocks, each ResBlock and AttentionBlock of the down path with the
           middle ("down"), and of the up path ("up"); blocks_to_swap n swaps n of each group.
"""
import copy
import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

import cache
import losses
import sample
import samplers
from config import DTYPES, ConfigError, read_config_file, sections
from lora import LORA_BASES
from models import PixelCodec
from models import deepfloyd as network
from models.loading import check_family, load_state_dict
from models.text import IF_T5_LENGTH, IFPromptEncoder

from . import DDPM_KEYS, Family, check_ranks, ddpm_options

LOW_RES_FACTOR = 4  # stage II: 64 px -> 256 px
MIN_RESIDENT = 2  # blockswap.MIN_RESIDENT
TEXT_CACHE_DTYPE = torch.bfloat16
ABAR = samplers.if_alphas_cumprod()  # the cosine schedule q_sample noises the low-res image on

# The released UNets' config.yml `params`, for plans without the folder (REFERENCE.md 4.3). IF-I-XL
# and IF-II-L are the released values; IF-I-L and IF-I-M are ESTIMATES on the XL template
# (encoder_channels = 4 model_channels; 935 M and 372 M against the published 900 M and 400 M): the
# plan reads the real config.yml as soon as model_path holds it. IF-II-M is not known here.
IF_I_XL = dict(image_size=64, in_channels=3, model_channels=704, out_channels=6, num_res_blocks=3,
               attention_resolutions="32,16,8", channel_mult="1,2,3,4", num_heads=1, num_head_channels=64,
               use_scale_shift_norm=True, resblock_updown=True, encoder_dim=4096, encoder_channels=2816,
               activation="gelu", att_pool_heads=64, disable_self_attentions=False, precision="16")
IF_II_L = dict(IF_I_XL, image_size=256, in_channels=6, model_channels=160, num_res_blocks=[2, 2, 3, 5, 5],
               attention_resolutions="32,16", channel_mult="1,2,4,6,8", encoder_channels=1280,
               efficient_activation=True, scale_skip_connection=True)
RELEASED = {
    "IF-I-XL": IF_I_XL,
    "IF-I-L": dict(IF_I_XL, model_channels=320, encoder_channels=1280),
    "IF-I-M": dict(IF_I_XL, model_channels=192, encoder_channels=768),
    "IF-II-L": IF_II_L,
}
ESTIMATED = ("IF-I-L", "IF-I-M")

# LoRA groups: name -> the layer inside a block. res_conv (the 3x3 convs) is off unless group_ranks names it.
ATTENTION_GROUPS = {"attn_qkv": "qkv", "attn_kv": "encoder_kv", "attn_out": "proj_out"}
RESBLOCK_GROUPS = {"res_emb": "emb_layers.1", "res_skip": "skip_connection",
                   "res_conv": ("in_layers.2", "out_layers.3")}
OFF_BY_DEFAULT = ("res_conv",)


@dataclass
class IFCheckpoint:
    """What read_checkpoint finds: the network's shapes and where its weights are (None for a
    folder that holds only the config, enough for a plan)."""

    config: network.IFConfig
    weights: Path | None
    layout: str  # "original" or "diffusers" (keys mapped by models.deepfloyd.to_original)
    source: str


@dataclass
class IFSamplePrompt(sample.SamplePrompt):
    """A sample prompt with IF's sampler settings (from the config; kohya's --s N gives respacing "N")."""

    steps: int = 0  # 0: `respacing`
    respacing: str = "150"
    threshold_max: float = 1.5
    text_mask: bool = False
    learned_variance: bool = True  # False (if_freeze_variance): the fixed-small variance, as diffusers' IF LoRA docs
    aug_level: float = 0.25  # stage II
    low_res: str = ""  # stage II: the image to upscale (a cascade puts stage I's output in the conditioning)


class DeepFloydIF(Family):
    name = "deepfloyd"
    title = "DeepFloyd IF"
    latent_multiple = 8  # stage I's three downsamplings (sample checks the network's own count)
    # The DDPM keys are SDXL's (kohya's names); v_parameterization and zero_terminal_snr only to refuse them.
    config_keys = DDPM_KEYS + ("t5_path", "t5_tokenizer", "apply_t5_attn_mask", "sample_cfg",
                               "if_unconditional_embedding", "if_clean_captions", "if_freeze_variance",
                               "if_aug_levels", "if_sample_aug_level", "if_respacing", "if_dynamic_threshold",
                               "if_sample_low_res")
    required_paths = ("t5_path",)
    network_config: network.IFConfig | None = None  # set on the copy for_network returns

    # --- the checkpoint ----------------------------------------------------------------------------

    def detect(self, sd: dict) -> bool:
        return all(k in sd for k in network.ORIGINAL_REQUIRED) or all(k in sd for k in network.DIFFUSERS_REQUIRED)

    def detect_path(self, path: str) -> bool:
        if not Path(path).is_dir():
            return False
        try:
            network.read_config(path)
        except (ValueError, FileNotFoundError, KeyError, TypeError, json.JSONDecodeError):
            return False
        return True

    def read_checkpoint(self, path: str, cfg: dict) -> IFCheckpoint:
        path = Path(path)
        return trained_file(path, cfg) if path.is_file() else model_folder(path, cfg["allow_pickle"])

    def params(self, checkpoint: IFCheckpoint, cfg: dict) -> network.IFConfig:
        config = replace(checkpoint.config, **cfg["model_overrides"])
        check_resolution(config, cfg["resolution"])
        return config

    def default_params(self, cfg: dict) -> network.IFConfig:
        """The released UNet model_path names (IF-I-XL-v1.0, IF-II-L-v1.0, ...); IF-I-XL otherwise."""
        match = re.search(r"IF-(I|II)-(XL|L|M)", Path(cfg["model_path"]).name, re.IGNORECASE)
        name = f"IF-{match.group(1)}-{match.group(2)}".upper() if match else "IF-I-XL"
        if name not in RELEASED:
            raise ConfigError(f"{name}'s shapes are not known here: put its folder (config.yml or unet/config.json) "
                              "at model_path and the plan reads them")
        return replace(network.config_from_original(RELEASED[name]), **cfg["model_overrides"])

    def build(self, params: network.IFConfig) -> nn.Module:
        return network.IFUNet(params)

    def load(self, checkpoint: IFCheckpoint, cfg: dict, dtype: torch.dtype, device="cpu") -> nn.Module:
        if checkpoint.weights is None:
            raise FileNotFoundError(f"{checkpoint.source} holds the UNet's config but no weights")
        sd = load_state_dict(checkpoint.weights, allow_pickle=True)  # read_checkpoint asked for allow_pickle
        config = self.params(checkpoint, cfg)
        if checkpoint.layout == "diffusers":
            check_family(sd, "deepfloyd", required=network.DIFFUSERS_REQUIRED)
            sd = network.to_original(sd, config)
        if not cfg["fp8_base"]:
            return network.IFUNet.from_state_dict(sd, config, dtype=dtype, device=device)
        check_family(sd, "deepfloyd", required=network.ORIGINAL_REQUIRED)
        return self.load_fp8(sd, config, cfg, dtype, device)

    def describe(self, params: network.IFConfig) -> str:
        return f"DeepFloyd {self.variant(params)}"  # "DeepFloyd IF-I-XL"

    def variant(self, params: network.IFConfig) -> str:
        for name, released in RELEASED.items():
            if network.config_from_original(released) == replace(params, precision=released["precision"]):
                return f"{name} (estimated shapes)" if name in ESTIMATED else name
        stage = "II" if params.super_res else "I"
        return f"IF-{stage}, {params.model_channels} channels"

    # --- blocks ------------------------------------------------------------------------------------

    def blocks(self, model: nn.Module) -> dict[str, list[nn.Module]]:
        """Each ResBlock and AttentionBlock (not the levels' sequences: a deep level of IF-I-XL
        holds 0.3-0.45 B weights, too much for one swap slot), in the order they run."""
        down = [layer for block in model.input_blocks[1:] for layer in block] + list(model.middle_block)
        return {"down": down, "up": [layer for block in model.output_blocks for layer in block]}

    def swap_counts(self, model: nn.Module, cfg: dict) -> dict[str, int]:
        """blocks_to_swap n: n blocks of each group (the last n it runs), at most all but two."""
        n, groups = cfg["blocks_to_swap"], self.blocks(model)
        most = max(len(blocks) for blocks in groups.values()) - MIN_RESIDENT
        if not 0 <= n <= most:
            sizes = ", ".join(f"{len(b)} {name}" for name, b in groups.items())
            raise ValueError(f"blocks_to_swap={n}: this UNet has {sizes} blocks, of which {MIN_RESIDENT} per group "
                             f"stay on the device; use 0 to {most}")
        return {name: min(n, len(blocks) - MIN_RESIDENT) for name, blocks in groups.items()}

    # --- config ------------------------------------------------------------------------------------

    def check_config(self, cfg: dict) -> None:
        if cfg["v_parameterization"] or cfg["zero_terminal_snr"]:
            raise ConfigError("v_parameterization / zero_terminal_snr: DeepFloyd IF predicts epsilon with a learned "
                              "variance (its released weights and sampler), which needs abar > 0 at every step; "
                              "remove them")
        if cfg["ae_path"]:
            raise ConfigError("DeepFloyd IF denoises pixels: remove ae_path")
        levels = cfg["if_aug_levels"]
        if len(levels) != 2 or not 0 <= levels[0] <= levels[1] <= 1:
            raise ConfigError(f"if_aug_levels={cfg['if_aug_levels']!r}: two levels 0 <= low <= high <= 1")
        if not 0 <= cfg["if_sample_aug_level"] < 1:
            raise ConfigError(f"if_sample_aug_level={cfg['if_sample_aug_level']} must lie in [0, 1)")
        if cfg["if_dynamic_threshold"] and cfg["if_dynamic_threshold"] < 1:
            raise ConfigError("if_dynamic_threshold is a clip ratio of at least 1 (or 0 for the stage's default)")
        if cfg["if_respacing"]:
            try:
                samplers.space_timesteps(len(ABAR), cfg["if_respacing"])
            except ValueError as error:
                raise ConfigError(f"if_respacing={cfg['if_respacing']!r}: {error}") from None

    def resolution_multiple(self, cfg: dict) -> int:
        """The UNet's downsampling, 2^(levels - 1), from model_path's config when it is there (else
        the released shapes its name gives, else stage I's 8): what bucket sides are multiples of.
        Stage II's sides also hold a whole low-resolution pixel (4)."""
        try:
            path = Path(cfg["model_path"])
            config = self.read_checkpoint(str(path), cfg).config if path.exists() and cfg["model_path"] \
                else self.default_params(cfg)
            config = replace(config, **cfg["model_overrides"])
        except (ConfigError, OSError, ValueError, KeyError, TypeError):
            return 8  # params() then says what is wrong
        multiple = 2 ** (len(config.channel_mult) - 1)
        return math.lcm(multiple, LOW_RES_FACTOR) if config.super_res else multiple

    # --- data --------------------------------------------------------------------------------------

    def codec(self, cfg: dict, dtype: torch.dtype, device):
        return PixelCodec()

    def text_encoder(self, cfg: dict, params: network.IFConfig, dtype: torch.dtype, device):
        encoder = IFPromptEncoder.load(cfg["t5_path"], cfg["t5_tokenizer"] or None,
                                       cfg["if_unconditional_embedding"] or None, cfg["if_clean_captions"],
                                       dtype=t5_dtype(dtype), device=device)
        width = encoder.t5.model.config.d_model
        if width != params.encoder_dim:
            raise ConfigError(f"t5_path gives {width}-wide states; this UNet reads {params.encoder_dim} (T5-XXL: 4096)")
        return IFTextEncoder(encoder)

    def text_length(self, cfg: dict, params) -> int:
        return IF_T5_LENGTH

    def text_mask(self, cfg: dict) -> bool:
        return True  # T5 always runs with its mask; whether the UNet uses it does not change the cache

    # --- training ----------------------------------------------------------------------------------

    def objective(self, cfg: dict) -> losses.DDPM:
        """IF's schedule and learned variance, with the DDPM keys' timestep range, loss weights and
        noise (min_snr_gamma, noise_offset, ip_noise_gamma, ...; all off by default)."""
        return losses.DDPM(**dict(ddpm_options(cfg), num_train_timesteps=len(ABAR), beta_schedule="squaredcos_cap_v2",
                                  learned_variance="learned_range", freeze_variance=cfg["if_freeze_variance"]))

    def conditioning(self, batch: dict, cfg: dict, generator: torch.Generator | None = None) -> dict:
        """T5 states (and mask), and stage II's augmented low-resolution image with its step
        (made for every batch; a stage I network leaves them, see `predict`)."""
        cond = {"t5": batch["t5"]}
        if cfg["apply_t5_attn_mask"]:
            cond["t5_mask"] = batch["t5_mask"]
        cond["low_res"], cond["aug_level"] = augmented_low_res(batch["latent"], cfg, generator)
        return cond

    def predict(self, model: nn.Module, x_t: Tensor, t: Tensor, cond: dict) -> Tensor:
        """All 6 output channels, fp32."""
        stage2 = model.config.super_res
        return model(x_t, t, cond["t5"], cond.get("t5_mask"), cond["low_res"] if stage2 else None,
                     cond["aug_level"] if stage2 else None).float()

    # --- sampling ----------------------------------------------------------------------------------

    def prompt_defaults(self, cfg: dict, params: network.IFConfig) -> IFSamplePrompt:
        stage2 = params.super_res
        return IFSamplePrompt(
            prompt="", width=cfg["resolution"], height=cfg["resolution"], seed=cfg["seed"], steps=cfg["sample_steps"],
            cfg_scale=cfg["sample_cfg"] or (4.0 if stage2 else 7.0),
            respacing=cfg["if_respacing"] or ("smart50" if stage2 else "150"),
            threshold_max=cfg["if_dynamic_threshold"] or (1.0 if stage2 else 1.5), text_mask=cfg["apply_t5_attn_mask"],
            learned_variance=not cfg["if_freeze_variance"],
            aug_level=cfg["if_sample_aug_level"], low_res=sample_low_res(cfg) if stage2 else "")

    def sample_conditioning(self, text: dict, prompt: IFSamplePrompt, device) -> dict:
        cond = {"t5": text["t5"].to(device)}
        if prompt.text_mask:
            cond["t5_mask"] = text["t5_mask"].to(device)
        if prompt.low_res:  # stage II: the image to upscale, at a quarter of the sample's size
            size = (prompt.height // LOW_RES_FACTOR, prompt.width // LOW_RES_FACTOR)
            cond["low_res"] = cache.load_image(prompt.low_res, size)[0].unsqueeze(0).to(device)
        return cond

    def sample(self, model: nn.Module, prompt: IFSamplePrompt, cond: dict, neg_cond: dict | None,
               noise: Tensor) -> Tensor:
        """IF's sampler; the ancestral noise continues the start noise's seed, as diffusers' IF
        pipelines pass one generator on."""
        check_resolution(model.config, (noise.shape[-2], noise.shape[-1]))
        generator = torch.Generator().manual_seed(prompt.seed)
        torch.randn(noise.shape, generator=generator)  # past the start noise (sample.initial_noise)
        low_res = aug = None
        if model.config.super_res:
            low_res, aug = sampling_low_res(cond, prompt, noise, generator)

        def denoise(x: Tensor, t: Tensor, c: dict) -> Tensor:
            return model(x, t, c["t5"], c.get("t5_mask"), low_res, aug).float()

        respacing = str(prompt.steps) if prompt.steps else prompt.respacing
        return samplers.sample_if(denoise, noise, cond, neg_cond, respacing=respacing,
                                  guidance=samplers.Guidance(prompt.cfg_scale), threshold_max=prompt.threshold_max,
                                  generator=generator, abar=ABAR, learned_variance=prompt.learned_variance)

    def base_stage(self, cfg: dict, base_model: str, prompts: list, encoded: list, dtype: torch.dtype,
                   device) -> list:
        """Stage I at a quarter of each prompt's size (stage I's sampler defaults; the prompt's
        text, negative, seed and --s); its image becomes each conditioning's low_res."""
        import training  # the placement (swap) of training and sampling; training imports no family

        checkpoint = self.read_checkpoint(base_model, cfg)
        base_cfg = dict(cfg, resolution=checkpoint.config.image_size, model_overrides={})
        params = self.params(checkpoint, base_cfg)
        if params.super_res:
            raise ValueError(f"--base_model {base_model} is a stage II UNet; give the stage I model it upscales")
        model = self.load(checkpoint, base_cfg, dtype=dtype, device="cpu").requires_grad_(False).eval()
        swap = training.place(model, self, base_cfg, device, mode="h2d_only")
        defaults = self.prompt_defaults(dict(base_cfg, sample_cfg=0.0, if_respacing="", sample_steps=0,
                                             if_dynamic_threshold=0.0), params)
        out = []
        for prompt, (cond, neg) in zip(prompts, encoded):
            first = replace(defaults, prompt=prompt.prompt, negative=prompt.negative, seed=prompt.seed,
                            steps=prompt.steps, width=prompt.width // LOW_RES_FACTOR,
                            height=prompt.height // LOW_RES_FACTOR)
            noise = sample.initial_noise(first, 3, 1, self.latent_multiple, device)
            image = self.sample(model, first, cond, neg if first.cfg_scale != 1.0 else None, noise).clamp(-1, 1)
            out.append(({**cond, "low_res": image}, neg))
        if swap is not None:
            swap.remove()
        del model
        return out

    # --- LoRA --------------------------------------------------------------------------------------

    def lora_targets(self, model: nn.Module, cfg: dict) -> dict[str, int]:
        return lora_targets(model, cfg["network_dim"], cfg["group_ranks"])

    def lora_metadata(self, cfg: dict, params: network.IFConfig) -> dict[str, str]:
        stage = "ii" if params.super_res else "i"
        meta = {
            "ss_base_model_version": f"deepfloyd_if_{stage}",
            "ss_network_module": "networks.lora",
            "ss_model_type": "deepfloyd_if",
            "modelspec.architecture": f"deepfloyd-if-{stage}/lora",
            "modelspec.implementation": "https://github.com/deep-floyd/IF",
            "modelspec.prediction_type": "epsilon",
            "ss_debiased_estimation": str(cfg["debiased_estimation_loss"]),
        }
        for key in ("min_snr_gamma", "noise_offset", "noise_offset_random_strength", "adaptive_noise_scale",
                    "multires_noise_iterations", "multires_noise_discount", "ip_noise_gamma",
                    "ip_noise_gamma_random_strength", "min_timestep", "max_timestep", "apply_t5_attn_mask",
                    "if_freeze_variance"):
            meta[f"ss_{key}"] = str(cfg[key])
        return meta

    def for_network(self, model: nn.Module) -> "DeepFloydIF":
        bound = copy.copy(self)
        bound.network_config = model.config
        return bound

    def lora_loader_notes(self, targets: dict[str, int]) -> list[str]:
        return ["DeepFloyd IF: diffusers' IFPipeline.load_lora_weights reads lora_format='diffusers' files; kohya "
                "files (IF's own module names) load in this trainer only. ComfyUI has no IF LoRA loader"]

    def lora_to_diffusers(self, path: str, up: Tensor, down: Tensor) -> dict[str, Tensor]:
        """A fused projection splits per head as its weight does (qkv -> to_q/to_k/to_v, encoder_kv
        -> add_k_proj/add_v_proj, sharing lora_A); a 1-wide Conv1d's up becomes a Linear's."""
        config = self._layout().config
        ups = network.to_diffusers({f"{path}.weight": up}, config)  # split and squeezed as the weight is
        return {f"unet.{module}": ups[f"{module}.weight"] for module in network.diffusers_module_names(path, config)}

    def lora_from_diffusers(self, module: str) -> tuple[str, int | None]:
        layout = self._layout()
        if module not in layout.from_diffusers:
            raise ValueError(f"LoRA module {module!r} has no counterpart in this DeepFloyd IF UNet")
        return layout.from_diffusers[module]

    def lora_slice_sizes(self, path: str, down: Tensor, slices: dict) -> list[int]:
        layout = self._layout()
        parts = len(network.diffusers_module_names(path, layout.config))
        return [layout.out_rows[path] // parts] * parts

    def lora_up_from_diffusers(self, path: str, up: Tensor, down: Tensor | None = None) -> Tensor:
        """[q rows; k rows; v rows] -> the fused weight's per-head interleaved rows (and the
        Conv1d's trailing 1)."""
        layout = self._layout()
        names = network.diffusers_module_names(path, layout.config)
        pieces = up.split(layout.out_rows[path] // len(names))
        merged = network.to_original({f"{n}.weight": p for n, p in zip(names, pieces)}, layout.config,
                                     keys=[f"{path}.weight"])
        return merged[f"{path}.weight"]

    def lora_down_from_diffusers(self, path: str, down: Tensor) -> Tensor:
        return down[..., None] if self._layout().conv1d[path] and down.ndim == 2 else down

    def _layout(self) -> "LoRALayout":
        if self.network_config is None:
            raise ValueError("DeepFloyd IF LoRA module names depend on the UNet's shapes: use the family bound to "
                             "the network (family.for_network(model)), as lora.apply_lora_file does")
        return lora_layout(self.network_config)

    # --- the memory plan ---------------------------------------------------------------------------

    def plan_batch(self, cfg: dict, params: network.IFConfig, device) -> dict:
        """A cached batch: fp32 pixels, bf16 T5 states (the text cache's dtype) and their mask."""
        b, side = cfg["batch_size"], cfg["resolution"]
        return {
            "latent": torch.randn(b, 3, side, side, device=device),
            "t5": torch.randn(b, IF_T5_LENGTH, params.encoder_dim, device=device, dtype=TEXT_CACHE_DTYPE),
            "t5_mask": torch.ones(b, IF_T5_LENGTH, dtype=torch.bool, device=device),
        }

    def plan_text_encoders(self, cfg: dict, params: network.IFConfig) -> list:
        from models import text

        config = text.text_config("t5", cfg["t5_path"])  # the file's, or T5-XXL v1.1's: 4.76 B

        def build() -> nn.Module:
            return text.build_text_model("t5", config).to(t5_dtype(DTYPES[cfg["dtype"]]))

        def inputs(device) -> dict:
            # No attention_mask: transformers reads its values (.all()), which meta tensors lack; the
            # (B, 1, 77, 77) mask it would build from it is a few KiB.
            ids = torch.zeros(cfg["text_batch_size"], IF_T5_LENGTH, dtype=torch.long, device=device)
            return {"input_ids": ids}

        return [("t5", build, inputs)]


# --- the checkpoint -----------------------------------------------------------------------------------


FOLDER_LAYOUTS = (("original", "config.yml", network.ORIGINAL_WEIGHTS),  # (layout, config file, weight files)
                  ("diffusers", "config.json", network.DIFFUSERS_WEIGHTS),
                  ("diffusers", "unet/config.json", network.DIFFUSERS_WEIGHTS))


def model_folder(folder: Path, allow_pickle: bool) -> IFCheckpoint:
    """An IF model folder: the original layout (config.yml) or the diffusers one (config.json or
    unet/config.json), whichever has safetensors weights; a pickle (.bin) only with allow_pickle;
    a folder with only a config gives the shapes without weights."""
    found = []  # (layout, folder of the config, weights or None)
    for layout, config, names in FOLDER_LAYOUTS:
        where = (folder / config).parent
        if (folder / config).is_file():
            found.append((layout, where, next((where / n for n in names if (where / n).is_file()), None)))
    if not found:
        network.find_layout(folder)  # raises the error that names both layouts
    safe = [f for f in found if f[2] is not None and f[2].suffix != ".bin"]
    pickled = [f for f in found if f[2] is not None and f[2].suffix == ".bin"]
    layout, where, weights = (safe or pickled or found)[0]
    if weights is not None and weights.suffix == ".bin" and not allow_pickle:
        raise ConfigError(f"{weights} is a pickle file (it can run code when loaded). Use the repository's "
                          "unet/ folder (safetensors), or set allow_pickle=True to read it with "
                          "torch.load(weights_only=True)")
    return IFCheckpoint(network.read_config(where), weights, layout, str(folder))


def trained_file(path: Path, cfg: dict) -> IFCheckpoint:
    """A single .safetensors in the original keys (a full fine-tune from this trainer): its shapes
    from a config.yml beside it, or from the model folder that the run folder's config.py (the
    resolved config, written beside the file) names."""
    with safe_open(str(path), framework="pt") as f:
        if not all(k in f.keys() for k in network.ORIGINAL_REQUIRED):
            raise ConfigError(f"{path} is not a DeepFloyd IF UNet in the original keys (a LoRA file? give it to "
                              "sample.py --lora); pass the model folder")
    if (path.parent / "config.yml").is_file():
        return IFCheckpoint(network.read_config(path.parent), path, "original", str(path))
    base = read_config_file(path.parent / "config.py").get("model_path") if (path.parent / "config.py").is_file() \
        else None
    if not base or not Path(base).is_dir():
        raise ConfigError(f"{path}: a DeepFloyd IF UNet file needs its shapes: put the model's config.yml beside it, "
                          "or pass the model folder")
    return IFCheckpoint(model_folder(Path(base), cfg["allow_pickle"]).config, path, "original", str(path))


def check_resolution(config: network.IFConfig, size) -> None:
    """Every side a multiple of the UNet's downsampling, 2^(levels - 1)."""
    multiple = 2 ** (len(config.channel_mult) - 1)
    sides = (size, size) if isinstance(size, int) else tuple(size)
    if any(side % multiple for side in sides):
        raise ConfigError(f"size {sides}: this UNet downsamples {multiple}x, so each side must be a multiple of "
                          f"{multiple}")


# --- stage II's low-resolution input -------------------------------------------------------------------


def downsample(image: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 3, H/4, W/4): bicubic with antialiasing, as an image is shrunk."""
    h, w = image.shape[-2] // LOW_RES_FACTOR, image.shape[-1] // LOW_RES_FACTOR
    return F.interpolate(image, (h, w), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def upsample(low_res: Tensor, size) -> Tensor:
    """SuperResUNetModel's upsampling (bilinear, align_corners=True), done before the noise is
    added as the original does; the network's own interpolation is then the identity."""
    return F.interpolate(low_res, tuple(size), mode="bilinear", align_corners=True)


def augmented_low_res(image: Tensor, cfg: dict, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """(low-res image upsampled to the image's size and noised by q_sample, its steps (B,)).
    Training: steps uniform over if_aug_levels x 1000, drawn with the noise from `generator`
    (steps, then noise). Without one (validation, the plan): if_sample_aug_level and fixed noise."""
    b = image.shape[0]
    if generator is None:
        steps = torch.full((b,), int(cfg["if_sample_aug_level"] * len(ABAR)), dtype=torch.long)
        generator = torch.Generator().manual_seed(0)
    else:
        low, high = cfg["if_aug_levels"]
        steps = ((low + torch.rand(b, generator=generator) * (high - low)) * len(ABAR)).long().clamp(max=len(ABAR) - 1)
    noise = torch.randn(image.shape, generator=generator).to(image.device)
    upsampled = upsample(downsample(image.float()), image.shape[-2:])
    return samplers.q_sample(upsampled, steps, noise, ABAR), steps.to(image.device)


def sampling_low_res(cond: dict, prompt: IFSamplePrompt, noise: Tensor,
                     generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """cond's low-res image (stage I's output, or an image) upsampled to the sample's size and
    noised once at the prompt's augmentation level (diffusers' IFSuperResolutionPipeline; the
    original draws new noise at every call)."""
    if "low_res" not in cond:
        raise ValueError("a stage II UNet upscales an image: give sample.py --base_model (a stage I model), or set "
                         "if_sample_low_res to an image")
    step = int(prompt.aug_level * len(ABAR))
    upsampled = upsample(cond["low_res"].float(), noise.shape[-2:])
    aug_noise = torch.randn(upsampled.shape, generator=generator).to(noise.device)
    aug = torch.full((noise.shape[0],), step, dtype=torch.long, device=noise.device)
    return samplers.q_sample(upsampled, step, aug_noise, ABAR), aug


def sample_low_res(cfg: dict) -> str:
    """The image stage II samples upscale during training: if_sample_low_res, else the first image of
    the first dataset section (dataset_dir, or datasets[0])."""
    first = sections(cfg)[0] if cfg["dataset_dir"] or cfg["datasets"] else None
    if cfg["if_sample_low_res"] or first is None or not Path(first["dataset_dir"]).is_dir():
        return cfg["if_sample_low_res"]
    items = cache.scan_dataset(first["dataset_dir"], caption_ext=first["caption_ext"])
    return str(items[0].image_path)


# --- text ------------------------------------------------------------------------------------------------


def t5_dtype(run_dtype: torch.dtype) -> torch.dtype:
    """T5-XXL runs in the run's dtype, except fp16, where its activations overflow: bf16 then (an fp16
    run, for GPUs without bf16 matmuls, trains the UNet in fp16 with loss scaling; T5 only caches)."""
    return torch.bfloat16 if run_dtype == torch.float16 else run_dtype


class IFTextEncoder:
    """IFPromptEncoder with its T5 states in bf16, what the text cache stores (616 KiB a caption)."""

    def __init__(self, encoder: IFPromptEncoder):
        self.encoder = encoder
        self.identity = f"{encoder.identity}|stored={TEXT_CACHE_DTYPE}"

    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        out = self.encoder.encode(prompts)
        return {"t5": out["t5"].to(TEXT_CACHE_DTYPE), "t5_mask": out["t5_mask"]}

    def networks(self) -> dict[str, nn.Module]:
        return self.encoder.networks()

    def tokens_lost(self, caption: str) -> dict[str, int]:
        return self.encoder.tokens_lost(caption)

    def to(self, device) -> "IFTextEncoder":
        self.encoder.to(device)
        return self


# --- LoRA targets and names ------------------------------------------------------------------------------


def _block_layers(model: nn.Module):
    """(path, layer) of every AttentionBlock and ResBlock in the UNet's blocks."""
    for top in ("input_blocks", "middle_block", "output_blocks"):
        for path, module in getattr(model, top).named_modules(prefix=top):
            if isinstance(module, (network.AttentionBlock, network.ResBlock)):
                yield path, module


def lora_candidates(model: nn.Module) -> dict[str, str]:
    """Module path -> LoRA group of every layer a LoRA can sit on."""
    out = {}
    for path, module in _block_layers(model):
        groups = ATTENTION_GROUPS if isinstance(module, network.AttentionBlock) else RESBLOCK_GROUPS
        for group, names in groups.items():
            for name in (names,) if isinstance(names, str) else names:
                if isinstance(module.get_submodule(name), LORA_BASES):  # skip_connection may be an Identity
                    out[f"{path}.{name}"] = group
    return out


def lora_targets(model: nn.Module, rank: int, group_ranks: dict[str, int] | None = None) -> dict[str, int]:
    """Module path -> rank. Default: every attention projection (attn_qkv, attn_kv, attn_out) and
    each ResBlock's emb_layers Linear (res_emb) and 1x1 skip conv (res_skip) at `rank`;
    `group_ranks` sets a group's rank (0 removes it) and adds res_conv, the ResBlocks' 3x3 convs."""
    group_ranks = dict(group_ranks or {})
    known = list(ATTENTION_GROUPS) + list(RESBLOCK_GROUPS)
    check_ranks(rank, group_ranks, known, "DeepFloyd IF")
    ranks = {g: group_ranks.get(g, 0 if g in OFF_BY_DEFAULT else rank) for g in known}
    return {path: ranks[group] for path, group in lora_candidates(model).items() if ranks[group] > 0}


@dataclass
class LoRALayout:
    """A UNet's LoRA names: diffusers module -> (module path, slice), whether a module is a
    Conv1d, and its output rows."""

    config: network.IFConfig
    from_diffusers: dict[str, tuple[str, int | None]]
    conv1d: dict[str, bool]
    out_rows: dict[str, int]


_LAYOUTS: dict[str, LoRALayout] = {}  # repr(config) -> layout: built once per network shape


def lora_layout(config: network.IFConfig) -> LoRALayout:
    key = repr(config)
    if key not in _LAYOUTS:
        with torch.device("meta"):
            model = network.IFUNet(config)
        layers = {path: model.get_submodule(path) for path in lora_candidates(model)}
        from_diffusers = {}
        for path in layers:
            names = network.diffusers_module_names(path, config)
            from_diffusers.update({n: (path, i if len(names) > 1 else None) for i, n in enumerate(names)})
        _LAYOUTS[key] = LoRALayout(config, from_diffusers,
                                   {p: isinstance(m, nn.Conv1d) for p, m in layers.items()},
                                   {p: m.weight.shape[0] for p, m in layers.items()})
    return _LAYOUTS[key]


FAMILY = DeepFloydIF()
