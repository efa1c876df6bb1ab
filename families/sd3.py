"""SD3 Medium, SD3.5 Medium, SD3.5 Large (and Large Turbo): everything that makes the family itself.

Network    models/mmdit.py (Stability AI's reference names; the `model.diffusion_model.` section of
           sd3_medium*.safetensors, sd3.5_medium.safetensors, sd3.5_large.safetensors): 24 joint
           blocks (SD3 Medium; SD3.5 Medium with attn2 in blocks 0-12) or 38 (SD3.5 Large).
Text       CLIP-L and CLIP-G penultimate states, the CLIP-L pooled (unprojected) and CLIP-G pooled
           (projected) vectors, T5-XXL states (77 tokens, no mask), as sd3_infer.get_cond
           (models/text.py SD3PromptEncoder). The cache keeps these parts apart, so that each
           encoder's dropout (kohya's clip_l/clip_g/t5_dropout_rate) acts on cached tensors;
           sd3_conditioning assembles context (B, 77 + L, 4096) and pooled (B, 2048). Files:
           clip_l_path, clip_g_path, t5_path, or the text_encoders.* sections of an all-in-one
           model file; without T5 its part is zeros (77 tokens), as the reference allows.
Codec      the 16-channel autoencoder: ae_path, else the model file's first_stage_model section;
           z = 1.5305 (mean - 0.0609). Pixels when there is neither (the CPU demo).
Objective  flow matching as kohya's sd3_train_network: sigma from logit-normal (or mode, uniform, ...),
           training_shift, sigma discretised to 1/1000, the x0-preconditioned loss (x_t - sigma out
           against x0), weighting none / sigma_sqrt / cosmap (losses.FlowMatching).
Inputs     MMDiT(x_t, t = 1000 sigma, y = pooled, context); the output is a velocity either way.
Sampling   sd3_sigmas(steps, shift 3.0), DPM++ 2M (Euler for Large Turbo), CFG against the negative
           prompt (Large 4.5 and 40 steps, Medium 5 and 50, Turbo 1 and 4: sd3_infer.CONFIGS), APG
           instead of CFG on request (sample_apg), skip-layer guidance (sample_slg_scale; 3.5 Medium).
LoRA       kohya's networks.lora_sd3 targets: every Linear of both halves of each joint block
           (attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation.1, attn2.*), ranks per group
           (context_attn, context_mlp, context_mod, x_attn, x_mlp, x_mod), blocks by index
           (train_joint_blocks), the embedders on request (kohya's emb_dims: context_embedder,
           t_embedder, x_embedder, y_embedder, final_mod, final_linear). Files in diffusers names by
           default (what diffusers' StableDiffusion3Pipeline.load_lora_weights reads; ComfyUI reads
           them too), kohya names `lora_unet_joint_blocks_0_x_block_attn_qkv` with lora_format="kohya"
           (ComfyUI and kohya's tools; diffusers has no converter for them).
Memory     one group of blocks; blocks_to_swap up to depth - 2 (kohya: 36 for Large, 22 for Medium).

Seed 004's layer advice (SD3.5 Large, 38 blocks; speculative there too), one config line each:
    train_joint_blocks = "30-37"                                               # later blocks: fine detail
    train_joint_blocks = "12-24"                                               # earlier: composition
    train_joint_blocks = "0-33"                                                # last blocks frozen (photos)
    group_ranks = {"context_mlp": 0, "x_mlp": 0, "context_mod": 0, "x_mod": 0}  # attention only (anatomy)
    group_ranks = {"x_attn": 0, "x_mlp": 0, "x_mod": 0}                         # context blocks only
    lora_embedders = False      # embedders frozen: the default (full fine-tuning: freeze_embedders = True)
(ATTENTION_ONLY and CONTEXT_ONLY below are those two dicts.)
"""
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

import losses
import sample
import samplers
from config import DTYPES, ConfigError
from lora import Layer, parse_block_indices
from models import load_codec
from models import mmdit as network
from models.loading import list_weight_files, load_state_dict, strip_prefix
from models.text import CLIP_MAX_LENGTH, SD3_T5_LENGTH, SD3PromptEncoder, drop_encoder_parts, sd3_conditioning
from models.vae import LATENT_SCALING

from . import Family, check_ranks

VARIANTS = ("sd3-medium", "sd3.5-medium", "sd3.5-large", "sd3.5-large-turbo")
# The released networks (REFERENCE.md 2.2); Large Turbo has Large's shapes.
RELEASED = {
    "sd3-medium": dict(depth=24, pos_embed_max_size=192),
    "sd3.5-medium": dict(depth=24, pos_embed_max_size=384, qk_norm="rms", x_block_self_attn_layers=tuple(range(13))),
    "sd3.5-large": dict(depth=38, pos_embed_max_size=192, qk_norm="rms"),
}
# steps, CFG scale, sampler (Stability-AI/sd3.5 sd3_infer.CONFIGS; SD3 Medium as samplers.py says)
SAMPLING = {
    "sd3-medium": (50, 5.0, "dpmpp_2m"),
    "sd3.5-medium": (50, 5.0, "dpmpp_2m"),
    "sd3.5-large": (40, 4.5, "dpmpp_2m"),
    "sd3.5-large-turbo": (4, 1.0, "euler"),
}
SAMPLE_SHIFT = 3.0  # every released model samples with shift 3 (sd3_infer's comment; diffusers' scheduler)
SAMPLERS = ("euler", "dpmpp_2m")
# kohya's model_type (sd3_utils.analyze_state_dict_state): ss_base_model_version and modelspec.architecture
KOHYA_MODEL_TYPE = {"sd3-medium": "3-medium", "sd3.5-medium": "3-5-medium", "sd3.5-large": "3-5-large",
                    "sd3.5-large-turbo": "3-5-large"}
SCALE_FACTOR, SHIFT_FACTOR = LATENT_SCALING["sd3"]  # 1.5305, 0.0609
PARTS = ("clip_l", "clip_g", "clip_l_pooled", "clip_g_pooled", "t5")  # what the text cache holds
CLIP_WIDTHS = (768, 1280)  # CLIP-L, CLIP-G: the released pooled vector is 768 + 1280 = 2048
MIN_RESIDENT = 2  # blockswap.MIN_RESIDENT; kohya: at most depth - 2 blocks swap

# LoRA rank groups: kohya's type_dims (context_attn_dim, ...). attn2 (3.5 Medium) counts as x_attn.
GROUPS = ("context_attn", "context_mlp", "context_mod", "x_attn", "x_mlp", "x_mod")
# kohya's emb_dims, in its order: name -> the layers it covers (x_embedder.proj is a Conv2d)
EMBEDDERS = {
    "context_embedder": ("context_embedder",),
    "t_embedder": ("t_embedder.mlp.0", "t_embedder.mlp.2"),
    "x_embedder": ("x_embedder.proj",),
    "y_embedder": ("y_embedder.mlp.0", "y_embedder.mlp.2"),
    "final_mod": ("final_layer.adaLN_modulation.1",),
    "final_linear": ("final_layer.linear",),
}
ATTENTION_ONLY = {"context_mlp": 0, "x_mlp": 0, "context_mod": 0, "x_mod": 0}
CONTEXT_ONLY = {"x_attn": 0, "x_mlp": 0, "x_mod": 0}
FULL_FT_EMBEDDERS = ("x_embedder.", "t_embedder.", "y_embedder.", "context_embedder.")  # freeze_embedders


@dataclass
class SD3Prompt(sample.SamplePrompt):
    """A sample prompt with SD3's sampler settings (from the config; a prompt line sets the rest)."""

    sampler: str = "dpmpp_2m"
    shift: float = SAMPLE_SHIFT
    apg: samplers.APG | None = None
    slg: samplers.SkipLayerGuidance | None = None
    prediction: str = "x0_preconditioned"  # the training objective's; "additive" changes the velocity


class SD3(Family):
    name = "sd3"
    title = "SD3 / SD3.5"
    latent_multiple = 2  # 2x2 patches
    config_keys = ("sd3_variant", "clip_l_path", "clip_g_path", "t5_path", "clip_tokenizer", "clip_g_tokenizer",
                   "t5_tokenizer", "t5_max_length", "timestep_sampling", "sigmoid_scale", "discrete_flow_shift",
                   "logit_mean", "logit_std", "mode_scale", "model_prediction_type", "huber_schedule",
                   "weighting_scheme", "training_shift", "discrete_timesteps", "clip_l_dropout_rate",
                   "clip_g_dropout_rate", "t5_dropout_rate", "pos_emb_random_crop_rate", "enable_scaled_pos_embed",
                   "train_joint_blocks", "freeze_embedders", "lora_embedders", "sample_sampler", "sample_shift",
                   "sample_cfg", "sample_apg", "apg_eta", "apg_norm_threshold", "apg_momentum", "sample_slg_scale",
                   "slg_layers", "slg_start", "slg_end")
    lora_config_keys = ("lora_embedders",)
    trained_config_keys = ("train_joint_blocks", "freeze_embedders")  # LoRA targets, or what full fine-tuning trains
    target_config_keys = ("train_joint_blocks", "lora_embedders")
    split_qkv_layers = "the joint blocks' attn.qkv (and attn2.qkv)"
    lora_variants = ({"sd3_variant": "sd3.5-large"}, {"sd3_variant": "sd3.5-medium"})  # 38 blocks; attn2

    # --- the checkpoint ----------------------------------------------------------------------------

    def detect(self, sd: dict) -> bool:
        """The reference layout (joint_blocks), or diffusers' SD3 layout (pos_embed.proj), which
        params() then refuses with a hint."""
        sd, _ = strip_prefix(sd, network.PREFIXES)
        original = "x_embedder.proj.weight" in sd and any(k.startswith("joint_blocks.") for k in sd)
        return original or ("pos_embed.proj.weight" in sd and "transformer_blocks.0.attn.add_q_proj.weight" in sd)

    def params(self, sd: dict, cfg: dict) -> network.MMDiTParams:
        return network.infer_params(sd, **self._overrides(cfg, has_vae=_has_vae(cfg, sd)))

    def default_params(self, cfg: dict) -> network.MMDiTParams:
        base = self._variant(cfg).removesuffix("-turbo")
        return replace(network.MMDiTParams(**RELEASED[base]), **self._overrides(cfg, has_vae=True))

    def build(self, params: network.MMDiTParams) -> nn.Module:
        return network.MMDiT(params)

    def load(self, sd: dict, cfg: dict, dtype: torch.dtype, device="cpu") -> nn.Module:
        if not cfg["fp8_base"]:
            overrides = self._overrides(cfg, has_vae=_has_vae(cfg, sd))
            return network.MMDiT.from_state_dict(sd, dtype=dtype, device=device, **overrides)
        params = self.params(sd, cfg)
        return self.load_fp8(strip_prefix(sd, network.PREFIXES)[0], params, cfg, dtype, device)  # the denoiser's keys

    def variant(self, params: network.MMDiTParams) -> str:
        """kohya's reading of the shapes: no QK-norm is SD3 Medium, attn2 is SD3.5 Medium."""
        if params.qk_norm is None:
            return "sd3-medium"
        return "sd3.5-medium" if params.x_block_self_attn_layers else "sd3.5-large"

    def _variant(self, cfg: dict, params: network.MMDiTParams | None = None) -> str:
        """The config's sd3_variant, or the model's (Large Turbo: "turbo" in the file name)."""
        if cfg["sd3_variant"]:
            return cfg["sd3_variant"]
        name = Path(cfg["model_path"]).name.lower()
        found = self.variant(params) if params is not None else variant_from_file_name(name)
        if found is None:
            raise ValueError(f"model_path {cfg['model_path'] or '(empty)'} is not there and its name does not say "
                             f"which model it is: set sd3_variant to one of {', '.join(VARIANTS)}")
        return f"{found}-turbo" if found == "sd3.5-large" and "turbo" in name else found

    def _overrides(self, cfg: dict, has_vae: bool) -> dict:
        """model_overrides and kohya's multi-resolution options as MMDiTParams fields."""
        overrides = dict(cfg["model_overrides"])
        if cfg["pos_emb_random_crop_rate"]:
            overrides["pos_emb_random_crop_rate"] = cfg["pos_emb_random_crop_rate"]
        if cfg["enable_scaled_pos_embed"]:
            side = cfg["resolution"] // 8 if has_vae else cfg["resolution"]  # latent pixels (kohya: size // 8)
            overrides.update(enable_scaled_pos_embed=True, pos_embed_latent_sizes=(side,))
        return overrides

    # --- blocks ------------------------------------------------------------------------------------

    def blocks(self, model: nn.Module) -> dict[str, list[nn.Module]]:
        return {"joint_blocks": list(model.joint_blocks)}

    def swap_counts(self, model: nn.Module, cfg: dict) -> dict[str, int]:
        n, depth = cfg["blocks_to_swap"], len(model.joint_blocks)
        most = depth - MIN_RESIDENT
        if not 0 <= n <= most:
            raise ValueError(f"blocks_to_swap={n}: {MIN_RESIDENT} of the {depth} joint blocks must stay on the device "
                             f"(kohya's limit, depth - 2): use 0 to {most}")
        return {"joint_blocks": n}

    # --- config ------------------------------------------------------------------------------------

    def config_defaults(self) -> dict:
        """kohya's and diffusers' SD3 recipe: logit-normal sigmas, the x0-preconditioned loss; LoRA
        files in the names diffusers' SD3 pipeline reads (ComfyUI reads them too)."""
        return {"timestep_sampling": "logit_normal", "model_prediction_type": "x0_preconditioned",
                "lora_format": "diffusers", "run_name": "sd3_lora"}

    def check_config(self, cfg: dict) -> None:
        if cfg["dtype"] == "fp16":
            raise ConfigError("dtype='fp16': SD3.5's activations overflow in float16; use 'bf16' (or 'fp32' on CPU)")
        choices = {"sd3_variant": ("",) + VARIANTS, "sample_sampler": ("",) + SAMPLERS}
        for key, allowed in choices.items():
            if cfg[key] not in allowed:
                raise ConfigError(f"{key}={cfg[key]!r}: choose one of {', '.join(map(repr, allowed))}")
        for key in ("clip_l_dropout_rate", "clip_g_dropout_rate", "t5_dropout_rate", "pos_emb_random_crop_rate"):
            if not 0 <= cfg[key] < 1:
                raise ConfigError(f"{key} must be in [0, 1), got {cfg[key]}")
        for key in ("training_shift", "sample_shift", "sample_cfg", "sample_slg_scale", "apg_norm_threshold"):
            if cfg[key] < 0 or (key == "training_shift" and cfg[key] == 0):
                raise ConfigError(f"{key} must be {'positive' if key == 'training_shift' else 'at least 0'}, "
                                  f"got {cfg[key]}")
        if not 0 <= cfg["slg_start"] < cfg["slg_end"] <= 1:
            raise ConfigError(f"skip-layer guidance acts from slg_start to slg_end (fractions of the steps): need "
                              f"0 <= slg_start < slg_end <= 1, got {cfg['slg_start']} and {cfg['slg_end']}")
        try:
            parse_block_indices(cfg["train_joint_blocks"], 10**6, "train_joint_blocks")  # its form; depth comes later
        except (TypeError, ValueError) as error:
            raise ConfigError(str(error)) from None
        self._check_text_files(cfg)

    def _check_text_files(self, cfg: dict) -> None:
        """With the model file at hand (not for a plan): the CLIPs must come from somewhere."""
        if not cfg["model_path"] or not Path(cfg["model_path"]).exists():
            return
        missing = [key for key, file in zip(("clip_l_path", "clip_g_path"), text_files(cfg)[:2]) if file is None]
        if missing:
            raise ConfigError(f"{' and '.join(missing)} empty and {Path(cfg['model_path']).name} holds no such text "
                              "encoder: set them to text_encoders/clip_l.safetensors and clip_g.safetensors of the "
                              "SD3.5 repositories (see README, where the files come from)")

    # --- data --------------------------------------------------------------------------------------

    def codec(self, cfg: dict, dtype: torch.dtype, device):
        """ae_path, else the model file's own VAE, else pixels (a model file without one: the demo)."""
        path = cfg["ae_path"] or (cfg["model_path"] if uses_vae(cfg) else "")
        return load_codec(path, dtype=dtype, device=device, scale_factor=SCALE_FACTOR, shift_factor=SHIFT_FACTOR)

    def text_encoder(self, cfg: dict, params, dtype: torch.dtype, device) -> SD3PromptEncoder:
        clip_l, clip_g, t5 = text_files(cfg)
        if clip_l is None or clip_g is None:
            raise ConfigError("SD3 needs CLIP-L and CLIP-G: set clip_l_path and clip_g_path (text_encoders/ of the "
                              "SD3.5 repositories), or use a model file that holds them (sd3_medium_incl_clips*)")
        if t5 is None:
            print("no T5-XXL (t5_path empty and none in model_path): its part of the context is zeros, as the "
                  "reference allows; quality suffers on long prompts")
        return SD3PromptEncoder.load(clip_l, clip_g, t5, clip_l_tokenizer=cfg["clip_tokenizer"] or None,
                                     clip_g_tokenizer=cfg["clip_g_tokenizer"] or None,
                                     t5_tokenizer=cfg["t5_tokenizer"] or None, t5_length=self.text_length(cfg, params),
                                     dtype=dtype, device=device)

    def text_length(self, cfg: dict, params) -> int:
        """T5 tokens: 77 as the reference (kohya and diffusers use 256), or the config's."""
        return cfg["t5_max_length"] or SD3_T5_LENGTH

    # --- training ----------------------------------------------------------------------------------

    def objective(self, cfg: dict) -> losses.FlowMatching:
        return losses.FlowMatching(
            timestep_sampling=cfg["timestep_sampling"], sigmoid_scale=cfg["sigmoid_scale"],
            discrete_flow_shift=cfg["discrete_flow_shift"], logit_mean=cfg["logit_mean"], logit_std=cfg["logit_std"],
            mode_scale=cfg["mode_scale"], model_prediction_type=cfg["model_prediction_type"],
            loss_type=cfg["loss_type"], huber_c=cfg["huber_c"], huber_schedule=cfg["huber_schedule"],
            weighting_scheme=cfg["weighting_scheme"], training_shift=cfg["training_shift"],
            discrete_timesteps=cfg["discrete_timesteps"])

    def conditioning(self, batch: dict, cfg: dict, generator=None) -> dict:
        """The cached parts; in training each encoder's part is dropped (zeros) per sample at its rate."""
        parts = {k: batch[k] for k in PARTS if k in batch}
        rates = {name: cfg[f"{name}_dropout_rate"] for name in ("clip_l", "clip_g", "t5")}
        if generator is not None and any(rates.values()):
            parts = drop_encoder_parts(parts, rates, generator)
        return parts

    def predict(self, model: nn.Module, x_t: Tensor, t: Tensor, cond: dict) -> Tensor:
        return denoise(model, x_t, t * 1000, cond)  # the objective's t is sigma

    def lr_multipliers(self, cfg: dict, trainable: dict[str, nn.Parameter]) -> dict[str, float]:
        """Full fine-tuning: the joint blocks outside train_joint_blocks and (freeze_embedders) the
        embedders stay frozen. LoRA selects its targets instead."""
        if cfg["train_mode"] != "full":
            return {}
        indices = {int(m.group(1)) for name in trainable if (m := re.match(r"joint_blocks\.(\d+)\.", name))}
        kept = set(parse_block_indices(cfg["train_joint_blocks"], max(indices) + 1, "joint_blocks"))
        frozen = {}
        for name in trainable:
            block = re.match(r"joint_blocks\.(\d+)\.", name)
            if (block and int(block.group(1)) not in kept) or (cfg["freeze_embedders"]
                                                               and name.startswith(FULL_FT_EMBEDDERS)):
                frozen[name] = 0.0
        return frozen

    # --- sampling ----------------------------------------------------------------------------------

    def prompt_defaults(self, cfg: dict, params) -> SD3Prompt:
        steps, scale, sampler = SAMPLING[self._variant(cfg, params)]
        apg = samplers.APG(cfg["apg_eta"], cfg["apg_norm_threshold"], cfg["apg_momentum"]) if cfg["sample_apg"] \
            else None
        slg = samplers.SkipLayerGuidance(cfg["sample_slg_scale"], tuple(cfg["slg_layers"]), cfg["slg_start"],
                                         cfg["slg_end"]) if cfg["sample_slg_scale"] else None
        return SD3Prompt(prompt="", width=cfg["resolution"], height=cfg["resolution"], seed=cfg["seed"],
                         steps=cfg["sample_steps"] or steps, cfg_scale=cfg["sample_cfg"] or scale,
                         sampler=cfg["sample_sampler"] or sampler, shift=cfg["sample_shift"] or SAMPLE_SHIFT,
                         apg=apg, slg=slg, prediction=cfg["model_prediction_type"])

    def sample_conditioning(self, text: dict, prompt, device) -> dict:
        return {k: v.to(device) for k, v in text.items() if k in PARTS}

    def sample(self, model: nn.Module, prompt: SD3Prompt, cond: dict, neg_cond: dict | None, noise: Tensor) -> Tensor:
        """The prompt's sampler on sd3_sigmas(steps, shift), CFG or APG against the negative, SLG."""
        additive = prompt.prediction == "additive"

        def velocity(x: Tensor, t: Tensor, c: dict, skip_layers=()) -> Tensor:  # t = 1000 sigma
            out = denoise(model, x, t, c, skip_layers)
            return out + x if additive else out  # x0_preconditioned and raw both output the velocity

        guidance = samplers.Guidance(prompt.cfg_scale, apg=prompt.apg, slg=prompt.slg)
        return samplers.sample_flow(velocity, noise, samplers.sd3_sigmas(prompt.steps, prompt.shift), cond, neg_cond,
                                    guidance, sampler=prompt.sampler, time_scale=1000)

    # --- LoRA --------------------------------------------------------------------------------------

    def lora_targets(self, model: nn.Module, cfg: dict) -> dict[str, int]:
        return lora_targets(model, cfg["network_dim"], group_ranks=cfg["group_ranks"],
                            blocks=cfg["train_joint_blocks"], embedders=cfg["lora_embedders"])

    def lora_layers(self, model: nn.Module) -> dict[str, Layer]:
        """Every Linear of the joint blocks' context and x halves (the blocks run in index order),
        the embedders (x_embedder's patch Conv2d included) and the final layer; groups as kohya's
        type_dims and emb_dims."""
        layers, depth = {}, len(model.joint_blocks)
        for i, block in enumerate(model.joint_blocks):
            for half in ("context_block", "x_block"):
                for sub_path, module in getattr(block, half).named_modules():
                    if isinstance(module, nn.Linear):
                        layers[f"joint_blocks.{i}.{half}.{sub_path}"] = Layer(_group(half, sub_path), "joint_blocks", i,
                                                                              i / depth, _roles(half, sub_path))
        for name, paths in EMBEDDERS.items():
            roles = {"final_mod": {"final", "modulation"}, "final_linear": {"final"}}.get(name, {"embedder"})
            layers |= {path: Layer(name, roles=frozenset(roles)) for path in paths}
        return layers

    def lora_fused_rows(self, path: str, layer: nn.Module) -> list[int]:
        """q, k, v of a fused attention projection (the x half's attn2 too)."""
        if re.fullmatch(r"joint_blocks\.\d+\.(context_block\.attn|x_block\.attn2?)\.qkv", path):
            return [layer.out_features // 3] * 3
        return []

    def text_encoder_loras(self) -> dict[str, tuple[str, str]]:
        # kohya's lora_sd3: te1 CLIP-L, te2 CLIP-G, te3 T5; StableDiffusion3Pipeline's text_encoder(_2, _3)
        return {"clip_l": ("lora_te1", "text_encoder"), "clip_g": ("lora_te2", "text_encoder_2"),
                "t5": ("lora_te3", "text_encoder_3")}

    def lora_readers(self, lora_format: str) -> list[str]:
        readers = super().lora_readers(lora_format)  # diffusers' SD3 loader reads diffusers names only
        return [r for r in readers if not r.startswith("diffusers")] if lora_format != "diffusers" else readers

    def text_encoder_loader_notes(self, encoders: list[str]) -> list[str]:
        if "t5" not in encoders:
            return []
        return ["diffusers (T5, lora_te3): its SD3 loader reads the CLIP LoRAs (text_encoder, text_encoder_2) only; "
                "ComfyUI applies T5's"]

    def lora_metadata(self, cfg: dict, params) -> dict[str, str]:
        """As kohya's sd3_train_network writes it (load_target_model returns the model_type, 3-5-large
        etc., as the base model version; sai_model_spec puts it after "stable-diffusion-3-";
        update_metadata adds the attention masks and the sigma density as ss_weighting_scheme),
        then this trainer's own objective settings beside them."""
        model_type = KOHYA_MODEL_TYPE[self._variant(cfg, params)]
        meta = {
            "ss_base_model_version": model_type,
            "ss_network_module": "networks.lora_sd3",
            "modelspec.architecture": f"stable-diffusion-3-{model_type}/lora",
            "modelspec.implementation": "https://github.com/Stability-AI/sd3.5",
            "ss_apply_lg_attn_mask": "False",
            "ss_apply_t5_attn_mask": "False",
            "ss_weighting_scheme": kohya_weighting_scheme(cfg),
            "ss_train_block_indices": str(cfg["train_joint_blocks"]),
            "ss_t5xxl_max_token_length": str(self.text_length(cfg, params)),
        }
        for key in ("logit_mean", "logit_std", "mode_scale", "timestep_sampling", "model_prediction_type",
                    "training_shift", "discrete_timesteps", "clip_l_dropout_rate", "clip_g_dropout_rate",
                    "t5_dropout_rate"):
            meta[f"ss_{key}"] = str(cfg[key])
        meta["ss_loss_weighting"] = cfg["weighting_scheme"]  # ours: the loss weight alone (see losses.FlowMatching)
        return meta

    def lora_from_diffusers(self, module: str) -> tuple[str, int | None]:
        match = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module)
        if match and match.group(2) in BLOCK_FROM_DIFFUSERS:
            path, piece = BLOCK_FROM_DIFFUSERS[match.group(2)]
            return f"joint_blocks.{match.group(1)}.{path}", piece
        if module in TOP_FROM_DIFFUSERS:
            return TOP_FROM_DIFFUSERS[module], None
        raise ValueError(f"LoRA module {module!r} has no SD3 counterpart (is this an SD3 / SD3.5 LoRA?)")

    def lora_slice_sizes(self, path: str, down: Tensor, slices: dict) -> list[int]:
        """q, k, v rows of the input width each (attn.qkv, attn2.qkv)."""
        if not path.endswith("qkv"):
            raise ValueError(f"{path} is not a fused weight of SD3")
        return [down.shape[1]] * 3

    def lora_up_from_diffusers(self, path: str, up: Tensor, down: Tensor | None = None) -> Tensor:
        return swap_halves(up) if swapped_in_diffusers(path, up, down) else up

    def lora_to_diffusers(self, path: str, up: Tensor, down: Tensor) -> dict[str, Tensor]:
        if swapped_in_diffusers(path, up, down):
            up = swap_halves(up)
        match = re.fullmatch(r"joint_blocks\.(\d+)\.(.+)", path)
        names, where = (BLOCK_TO_DIFFUSERS.get(match.group(2)), f"transformer_blocks.{match.group(1)}.") if match \
            else (TOP_TO_DIFFUSERS.get(path), "")
        if names is None:
            raise ValueError(f"{path} has no diffusers name")
        pieces = up.chunk(len(names)) if len(names) > 1 else (up,)  # q, k, v rows of a fused qkv
        return {f"transformer.{where}{name}": piece for name, piece in zip(names, pieces)}

    def lora_loader_notes(self, targets: dict[str, int]) -> list[str]:
        return ["diffusers' StableDiffusion3Pipeline reads only diffusers names (lora_format='diffusers', the SD3 "
                "default); kohya names (lora_format='kohya') load in ComfyUI and kohya's tools"]

    # --- the memory plan ---------------------------------------------------------------------------

    def plan_batch(self, cfg: dict, params: network.MMDiTParams, device) -> dict:
        """A cached batch: fp32 latents and fp32 text parts, as the caches hold them."""
        b, clip_l, clip_g = cfg["batch_size"], *clip_widths(params)
        side = cfg["resolution"] // 8 if uses_vae(cfg) else cfg["resolution"]
        batch = {
            "latent": torch.randn(b, params.in_channels, side, side, device=device),
            "clip_l": torch.randn(b, CLIP_MAX_LENGTH, clip_l, device=device),
            "clip_g": torch.randn(b, CLIP_MAX_LENGTH, clip_g, device=device),
            "clip_l_pooled": torch.randn(b, clip_l, device=device),
            "clip_g_pooled": torch.randn(b, clip_g, device=device),
        }
        if text_files(cfg)[2] is not None:
            batch["t5"] = torch.randn(b, self.text_length(cfg, params), params.context_embedder_in_features,
                                      device=device)
        return batch

    def plan_text_encoders(self, cfg: dict, params) -> list:
        """CLIP-L, CLIP-G and T5-XXL (when the config has one), in the order caching runs them:
        shapes from their files when present (text_config), else the released encoders'."""
        from models import text

        b, dtype = cfg["text_batch_size"], DTYPES[cfg["dtype"]]
        files = dict(zip(("clip_l", "clip_g", "t5"), text_files(cfg)))
        tokens = {"clip_l": CLIP_MAX_LENGTH, "clip_g": CLIP_MAX_LENGTH, "t5": self.text_length(cfg, params)}
        out = []
        for kind, path in files.items():
            if kind == "t5" and path is None:
                continue  # no T5: its part is zeros
            config = text.text_config(kind, path or "")

            def build(kind=kind, config=config):
                return text.build_text_model(kind, config).to(dtype)

            def inputs(device, kind=kind):
                ids = torch.zeros(b, tokens[kind], dtype=torch.long, device=device)
                return {"input_ids": ids} if kind == "t5" else {"input_ids": ids, "output_hidden_states": True}

            out.append((kind, build, inputs))
        return out

    def plan_codec(self, cfg: dict, params) -> nn.Module | None:
        """The VAE of ae_path or of the model file (its shapes when present), else the released one."""
        from models.vae import autoencoder_skeleton

        if not uses_vae(cfg):
            return None
        return autoencoder_skeleton(cfg["ae_path"] or cfg["model_path"], "sd3")


# --- files -------------------------------------------------------------------------------------------

TEXT_SECTIONS = ("text_encoders.clip_l.", "text_encoders.clip_g.", "text_encoders.t5xxl.")


def _has_section(sd: dict, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in sd)


def kohya_weighting_scheme(cfg: dict) -> str:
    """kohya's one --weighting_scheme for this config's two settings: kohya draws sigma from
    logit_normal or mode (else uniform) and weights the loss by sigma_sqrt or cosmap (else 1)."""
    if cfg["weighting_scheme"] != "none":
        return cfg["weighting_scheme"]
    return cfg["timestep_sampling"] if cfg["timestep_sampling"] in ("logit_normal", "mode") else "uniform"


def _has_vae(cfg: dict, sd: dict) -> bool:
    """Whether the network denoises VAE latents: ae_path, or the model file's own VAE."""
    return bool(cfg["ae_path"]) or _has_section(sd, "first_stage_model.")


def _model_keys(cfg: dict) -> set[str]:
    """The keys of the model file (read from the safetensors headers), or none without the file."""
    path = cfg["model_path"]
    if not path or not Path(path).exists():
        return set()
    keys = set()
    for file in list_weight_files(path):
        if file.suffix != ".safetensors":
            return set(load_state_dict(path, allow_pickle=cfg["allow_pickle"]))
        with safe_open(str(file), framework="pt", device="cpu") as f:
            keys.update(f.keys())
    return keys


def uses_vae(cfg: dict) -> bool:
    """ae_path, or a model file with its VAE; a released file (absent: a plan) has one."""
    if cfg["ae_path"]:
        return True
    sd = _model_keys(cfg)
    return not sd or _has_section(sd, "first_stage_model.")


def text_files(cfg: dict) -> tuple[str | None, str | None, str | None]:
    """CLIP-L, CLIP-G and T5 files: the config's, else the model file when it holds that section
    (all-in-one files; without the file, a plan goes by the released names: "incl_clips",
    "t5xxl"), else None."""
    sd, name = _model_keys(cfg), Path(cfg["model_path"]).name.lower()
    named = ("clips" in name, "clips" in name, "t5xxl" in name)
    files = []
    for key, section, in_name in zip(("clip_l_path", "clip_g_path", "t5_path"), TEXT_SECTIONS, named):
        inside = _has_section(sd, section) if sd else in_name
        files.append(cfg[key] or (cfg["model_path"] if inside else None))
    return tuple(files)


def variant_from_file_name(name: str) -> str | None:
    """sd3.5_large*.safetensors, sd3.5_medium*, sd3_medium* (the released names) -> the variant."""
    name = name.lower().replace("_", "-")
    if re.search(r"3[.-]?5", name):
        return "sd3.5-large" if "large" in name else "sd3.5-medium" if "medium" in name else None
    return "sd3-medium" if "sd3" in name and "medium" in name else None


def clip_widths(params: network.MMDiTParams) -> tuple[int, int]:
    """CLIP-L and CLIP-G widths whose pooled vectors make y: (768, 1280) for the released models;
    for a tiny test model, the two halves of its pooled width."""
    if params.adm_in_channels == sum(CLIP_WIDTHS):
        return CLIP_WIDTHS
    return params.adm_in_channels // 2, params.adm_in_channels - params.adm_in_channels // 2


# --- inputs ------------------------------------------------------------------------------------------


def denoise(model: network.MMDiT, x: Tensor, timestep: Tensor, cond: dict, skip_layers=()) -> Tensor:
    """The MMDiT's output for x (B, C, H, W) at timestep = 1000 sigma (B,), conditioned on the
    text parts in `cond` (assembled by sd3_conditioning; without "t5", zeros of 77 tokens)."""
    dtype = model.context_embedder.weight.dtype
    context, pooled = sd3_conditioning(cond, context_width=model.params.context_embedder_in_features)
    out = model(x.to(dtype), timestep.float(), pooled.to(dtype), context.to(dtype), skip_layers=skip_layers)
    return out.to(x.dtype)


# --- LoRA targets ------------------------------------------------------------------------------------


def _group(half: str, sub_path: str) -> str:
    """kohya's type_dims group of a Linear in a block half: attn (attn and attn2), mlp or mod."""
    stream = "context" if half == "context_block" else "x"
    kind = "attn" if sub_path.startswith("attn") else "mlp" if sub_path.startswith("mlp.") else "mod"
    return f"{stream}_{kind}"


def _roles(half: str, sub_path: str) -> frozenset:
    """A block Linear's roles (lora.ROLES): the context half is the text stream, the x half the image's."""
    kind = "attention" if sub_path.startswith("attn") else "mlp" if sub_path.startswith("mlp.") else "modulation"
    return frozenset({"context" if half == "context_block" else "image", kind})


def lora_targets(model: nn.Module, rank: int, group_ranks: dict | None = None, blocks="all",
                 embedders: bool = False) -> dict[str, int]:
    """Module path -> rank for every layer that gets a LoRA, as kohya's networks.lora_sd3.

    Every Linear of the context_block and x_block of the joint blocks `blocks` ('all', 'none',
    '0-33' or a list; kohya's train_block_indices), with `rank` or the rank of its group in
    `group_ranks` (context_attn, context_mlp, context_mod, x_attn, x_mlp, x_mod; 0 removes it).
    The embedders (kohya's emb_dims: context_embedder, t_embedder, x_embedder, y_embedder,
    final_mod, final_linear) get one when `embedders` is True (rank `rank`) or when group_ranks
    names them."""
    group_ranks = dict(group_ranks or {})
    check_ranks(rank, group_ranks, GROUPS + tuple(EMBEDDERS), "SD3")
    targets = {}
    for i in parse_block_indices(blocks, len(model.joint_blocks), "joint_blocks"):
        for half in ("context_block", "x_block"):
            for sub_path, module in getattr(model.joint_blocks[i], half).named_modules():
                if isinstance(module, nn.Linear):
                    targets[f"joint_blocks.{i}.{half}.{sub_path}"] = group_ranks.get(_group(half, sub_path), rank)
    for name, paths in EMBEDDERS.items():
        for path in paths:
            targets[path] = group_ranks.get(name, rank if embedders else 0)
    return {path: r for path, r in targets.items() if r > 0}


# --- diffusers LoRA names ----------------------------------------------------------------------------

# diffusers module in transformer_blocks.N -> (path in joint_blocks.N, row slice of the fused qkv or
# None), as diffusers' convert_sd3_transformer_checkpoint_to_diffusers and ComfyUI's
# comfy/utils.py mmdit_to_diffusers name them.
BLOCK_FROM_DIFFUSERS = {
    "attn.to_q": ("x_block.attn.qkv", 0),
    "attn.to_k": ("x_block.attn.qkv", 1),
    "attn.to_v": ("x_block.attn.qkv", 2),
    "attn.add_q_proj": ("context_block.attn.qkv", 0),
    "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2),
    "attn.to_out.0": ("x_block.attn.proj", None),
    "attn.to_add_out": ("context_block.attn.proj", None),
    "attn2.to_q": ("x_block.attn2.qkv", 0),
    "attn2.to_k": ("x_block.attn2.qkv", 1),
    "attn2.to_v": ("x_block.attn2.qkv", 2),
    "attn2.to_out.0": ("x_block.attn2.proj", None),
    "ff.net.0.proj": ("x_block.mlp.fc1", None),
    "ff.net.2": ("x_block.mlp.fc2", None),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", None),
    "ff_context.net.2": ("context_block.mlp.fc2", None),
    "norm1.linear": ("x_block.adaLN_modulation.1", None),
    "norm1_context.linear": ("context_block.adaLN_modulation.1", None),  # the last block's rows are swapped
}
TOP_FROM_DIFFUSERS = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # rows (scale, shift) in diffusers
}


def _inverse(table: dict) -> dict[str, list[str]]:
    """native path -> its diffusers modules, in row-slice order."""
    out: dict[str, list] = {}
    for name, (path, piece) in sorted(table.items(), key=lambda item: item[1][1] or 0):
        out.setdefault(path, []).append(name)
    return out


BLOCK_TO_DIFFUSERS = _inverse(BLOCK_FROM_DIFFUSERS)
TOP_TO_DIFFUSERS = {path: [name] for name, path in TOP_FROM_DIFFUSERS.items()}


def swapped_in_diffusers(path: str, up: Tensor, down: Tensor | None) -> bool:
    """Whether diffusers orders this module's output rows (scale, shift) where the reference has
    (shift, scale): the final layer's modulation, and the last (pre-only) context block's, which
    alone has 2 chunks (2 x its input width) where the others have 6 (diffusers' swap_scale_shift)."""
    if path == "final_layer.adaLN_modulation.1":
        return True
    pre_only = down is not None and up.shape[0] == 2 * down.shape[1]
    return path.endswith("context_block.adaLN_modulation.1") and pre_only


def swap_halves(up: Tensor) -> Tensor:
    return torch.cat(up.chunk(2, dim=0)[::-1])


FAMILY = SD3()
