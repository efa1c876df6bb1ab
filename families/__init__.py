"""The model families and the surface each one offers the rest of the trainer.

A family is everything that makes FLUX.1, SD3, SDXL or DeepFloyd IF itself: how to tell its
checkpoint from others, its network (from models/), its text encoders and how a caption
becomes tensors, its codec, its objective, how a batch becomes the network's inputs, its
sampler, its LoRA targets and file naming, which blocks swap and checkpoint, its config
checks and the shapes the memory plan needs. One file per family (families/flux.py, ...)
implements `Family` below; a reader who wants to know how a family trains opens that file.

train.py, sample.py, plan.py, training.py, lora.py, cache.py, blockswap.py, losses.py and
optim.py never import a family module and never compare a family name: they ask this
registry for the family a config names (`get`, `resolve`) and call its methods.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import fp8
from models.loading import FAMILY_NAMES, detect_family, load_state_dict


class Family:
    """The surface. Methods a family must provide raise NotImplementedError here; the others
    have the default most families want. `cfg` is always a resolved config (config.py)."""

    name = ""  # the config's model_family value
    title = ""  # for messages: "FLUX.1"
    # Config keys of this family's section of config.py that it reads; setting a family key that
    # the chosen family does not read is a config error (it would be silently ignored).
    config_keys: tuple[str, ...] = ()
    # Config keys of the files this family needs besides model_path (checked before loading).
    required_paths: tuple[str, ...] = ()
    lora_prefix = "lora_unet"  # kohya's prefix of the denoiser's LoRA modules
    lora_config_keys: tuple[str, ...] = ()  # the family's LoRA keys, recorded in ss_network_args
    # Keys besides the LoRA keys that decide which weights train (full fine-tuning too): a resume
    # refuses to change them, as it refuses the LoRA keys; train_mode="full" accepts them.
    trained_config_keys: tuple[str, ...] = ()
    # Keys that choose the LoRA targets or their ranks, which a `targets` preset replaces (so
    # setting both is an error rather than one silently winning).
    target_config_keys: tuple[str, ...] = ()
    split_qkv_layers = ""  # the fused q/k/v weights split_qkv splits, in words ("": none, refused)
    latent_multiple = 1  # latent sides must be multiples of this (patch size, UNet downsamplings)

    # --- the checkpoint ----------------------------------------------------------------------------

    def detect(self, sd: dict) -> bool:
        """Whether a state dict (keys and shapes only are read) is this family's checkpoint."""
        raise NotImplementedError

    def detect_path(self, path: str) -> bool:
        """Whether the checkpoint at `path` is this family's, judged from the path itself (a
        model folder with the family's config file, say) before it is read as one state dict.
        False (the default) leaves it to `detect` on the state dict, as single files need."""
        return False

    def read_checkpoint(self, path: str, cfg: dict):
        """The checkpoint at `path` as `params` and `load` take it. By default its state dict,
        memory-mapped (no weight is read until used); a family whose checkpoints are folders
        with a config returns what it needs to build and load from them."""
        return load_state_dict(path, allow_pickle=cfg["allow_pickle"])

    def params(self, sd: dict, cfg: dict):
        """The network's hyper-parameters from the checkpoint's shapes (and cfg's model_overrides)."""
        raise NotImplementedError

    def default_params(self, cfg: dict):
        """The released model's hyper-parameters, for a memory plan without the file."""
        raise NotImplementedError

    def build(self, params) -> nn.Module:
        """The network with fresh weights on the current default device (meta for plans)."""
        raise NotImplementedError

    def load(self, sd: dict, cfg: dict, dtype: torch.dtype, device="cpu") -> nn.Module:
        """The network from a checkpoint, by assignment; frozen block Linears in fp8 when
        cfg["fp8_base"] (load_fp8)."""
        raise NotImplementedError

    def load_fp8(self, sd: dict, params, cfg: dict, dtype: torch.dtype, device="cpu") -> nn.Module:
        """The network of `params` from `sd` (the denoiser's keys, original names): the Linears
        of every swappable block stored in fp8, everything else in `dtype`."""
        with torch.device("meta"):
            model = self.build(params)
        blocks = [block for group in self.blocks(model).values() for block in group]
        return fp8.fp8_state_dict_to_model(model, sd, dtype=dtype, device=device, blocks=blocks,
                                           per_row=cfg["fp8_per_row"])

    def variant(self, params) -> str:
        """Which released model the shapes are ('dev', 'schnell', 'sd3.5-large', ...)."""
        return ""

    def describe(self, params) -> str:
        return f"{self.title} {self.variant(params)}".strip()

    # --- blocks: what swaps, checkpoints, goes to fp8 and is selected by index --------------------

    def blocks(self, model: nn.Module) -> dict[str, list[nn.Module]]:
        """Groups of repeated blocks, each in execution order, each block called as a module."""
        raise NotImplementedError

    def swap_counts(self, model: nn.Module, cfg: dict) -> dict[str, int]:
        """Blocks to swap per group from cfg (blocks_to_swap with the family's split rule, or
        the per-group keys). Raises ValueError with the possible range."""
        groups = self.blocks(model)
        n = cfg["blocks_to_swap"]
        if len(groups) != 1:
            raise NotImplementedError(f"{self.title} must say how blocks_to_swap splits over {list(groups)}")
        return {next(iter(groups)): n}

    # --- config ------------------------------------------------------------------------------------

    def config_defaults(self) -> dict:
        """Defaults of shared keys (config.py's DEFAULTS) that differ for this family, e.g. SD3's
        timestep_sampling="logit_normal": config.py applies them to the keys a config does not set."""
        return {}

    def check_config(self, cfg: dict) -> None:
        """Checks only this family needs, before any model loads; raise ConfigError."""

    def resolution_multiple(self, cfg: dict) -> int:
        """Image sides must be multiples of this (codec downscale x patch size)."""
        return 16

    # --- data: codec and text ----------------------------------------------------------------------

    def codec(self, cfg: dict, dtype: torch.dtype, device):
        """Images <-> what the network denoises: the family's VAE, or pixels."""
        from models import load_codec

        return load_codec(cfg["ae_path"], dtype=dtype, device=device)

    def codec_dtype(self, cfg: dict) -> torch.dtype:
        """The dtype the codec runs in (the memory plan builds it so): the run's, unless the
        family's autoencoder needs more (SDXL's overflows in fp16)."""
        from config import DTYPES

        return DTYPES[cfg["dtype"]]

    def text_encoder(self, cfg: dict, params, dtype: torch.dtype, device):
        """A prompt encoder: `.identity` (str), `.encode(list[str]) -> dict[str, Tensor]`
        (batch first; these are what the text cache stores), `.to(device)`."""
        raise NotImplementedError

    def text_length(self, cfg: dict, params) -> int:
        """Tokens per caption of the main text encoder (the cache key and the plan use it)."""
        raise NotImplementedError

    def text_mask(self, cfg: dict) -> bool:
        """Whether the text encoders' padding is masked (part of the cache key)."""
        return False

    # --- training ----------------------------------------------------------------------------------

    def objective(self, cfg: dict):
        """The training objective (losses.py) with this family's defaults and cfg's choices."""
        raise NotImplementedError

    def seq_len(self, latent: Tensor) -> int:
        """What resolution-dependent noise shifts read (FLUX: image tokens)."""
        return latent.shape[-2] * latent.shape[-1]

    def conditioning(self, batch: dict, cfg: dict, generator: torch.Generator | None = None) -> dict:
        """The network's conditioning from a training batch (text tensors, size and crop,
        guidance, low-resolution image ...). Anything random (per-encoder caption dropout, a
        noise augmentation) draws from `generator`: a CPU generator in training (resumable),
        None in validation (no dropout) and in the memory plan (draw on the batch's device)."""
        raise NotImplementedError

    def predict(self, model: nn.Module, x_t: Tensor, t: Tensor, cond: dict) -> Tensor:
        """The network's output for x_t (B, C, h, w) at the objective's time t (B,)."""
        raise NotImplementedError

    # --- sampling ----------------------------------------------------------------------------------

    def prompt_defaults(self, cfg: dict, params):
        """sample.SamplePrompt with this family's sampling defaults and cfg's sample_* keys."""
        raise NotImplementedError

    def sample_conditioning(self, text: dict, prompt, device) -> dict:
        """The network's conditioning for sampling from encoded text (batch of 1) and a prompt."""
        raise NotImplementedError

    def sample(self, model: nn.Module, prompt, cond: dict, neg_cond: dict | None, noise: Tensor) -> Tensor:
        """Denoise `noise` (1, C, h, w) into a latent with the family's sampler."""
        raise NotImplementedError

    def base_stage(self, cfg: dict, base_model: str, prompts: list, encoded: list, dtype: torch.dtype,
                   device) -> list:
        """A cascade: run the earlier stage's model (at `base_model`) for each prompt and put
        its output into the conditioning pairs `encoded` ((cond, neg) per prompt, from
        `sample_conditioning`) that this stage's `sample` reads. Returns the new pairs."""
        raise ValueError(f"{self.title} is not a later stage of a cascade: there is no base model to run first")

    # --- LoRA ----------------------------------------------------------------------------------------

    def lora_targets(self, model: nn.Module, cfg: dict) -> dict[str, int]:
        """Module path -> rank of every layer that gets a LoRA (block selection, group ranks)."""
        raise NotImplementedError

    def lora_alphas(self, cfg: dict, targets: dict[str, int]) -> dict[str, float]:
        """Module path -> alpha where a target's alpha is not the config's network_alpha (per-block
        alphas, a separate alpha for convolutions); {} when every target takes network_alpha."""
        return {}

    def lr_multipliers(self, cfg: dict, trainable: dict[str, nn.Parameter]) -> dict[str, float]:
        """Learning-rate factors by trainable parameter name (block-wise learning rates); {} for
        one learning rate."""
        return {}

    def lora_metadata(self, cfg: dict, params) -> dict[str, str]:
        """kohya / modelspec metadata particular to the family (architecture, base model, ...)."""
        return {}

    def lora_from_diffusers(self, module: str) -> tuple[str, int | None]:
        """A diffusers / PEFT LoRA module name -> (native module path, row slice of a fused
        weight or None). Raises ValueError for names without a counterpart."""
        raise ValueError(f"{self.title} LoRA files are read in the kohya format only; {module!r} is not one")

    def lora_slice_sizes(self, path: str, down: Tensor, slices: dict) -> list[int]:
        """Row sizes of the slices of a fused weight (q, k, v, ...), for re-fusing split LoRAs;
        `slices` (index -> {"down", "up", "alpha"}) are the ones the file has."""
        raise ValueError(f"{path} is not a fused weight of {self.title}")

    def lora_up_from_diffusers(self, path: str, up: Tensor, down: Tensor | None = None) -> Tensor:
        """A diffusers file's lora_up rows in the checkpoint's order (where the two differ); `down`
        (rank, in) tells the module's input width where the row order depends on it."""
        return up

    def lora_down_from_diffusers(self, path: str, down: Tensor) -> Tensor:
        """A diffusers file's lora_down in the checkpoint's layer shape (where the two differ:
        a Linear in diffusers that is a 1x1 convolution in the checkpoint)."""
        return down

    def for_network(self, model: nn.Module) -> "Family":
        """This family bound to one network's shapes, for what needs them (a LoRA module name
        whose place depends on the layer counts); the family itself by default."""
        return self

    def lora_to_diffusers(self, path: str, up: Tensor, down: Tensor) -> dict[str, Tensor]:
        """A LoRA of the native module `path` in diffusers names: diffusers module (with its
        pipeline prefix, "transformer.") -> the lora_up rows that module gets (one entry, or one
        per slice of a fused weight; `down` is shared by all). The inverse of lora_from_diffusers,
        lora_slice_sizes and lora_up_from_diffusers (lora.py: kohya_to_diffusers). Row-wise: it
        also places DoRA magnitudes given as `up` (out, 1)."""
        raise ValueError(f"{self.title} LoRA files are written in the kohya format only; set lora_format='kohya'")

    def lora_loader_notes(self, targets: dict[str, int]) -> list[str]:
        """What common loaders will not apply of a LoRA with these targets (said when saving)."""
        return []

    def lora_readers(self, lora_format: str) -> list[str]:
        """Who reads this family's LoRA files in `lora_format` ("kohya", "diffusers", "native")."""
        return ["ComfyUI: Load LoRA (its key map reads kohya, diffusers and native names)",
                "diffusers: pipe.load_lora_weights(FILE)", "this trainer: sample.py --lora, network_weights, "
                "python lora.py merge"]

    def text_encoder_loader_notes(self, encoders: list[str]) -> list[str]:
        """What common loaders will not apply of text-encoder LoRAs on these encoders."""
        return []

    # config settings that build each released model a LoRA file of this family may be for
    lora_variants: tuple[dict, ...] = ({},)

    def lora_skeletons(self) -> list[nn.Module]:
        """The released networks (lora_variants) on the meta device, for reading LoRA files
        without the checkpoint (python lora.py convert, info)."""
        from config import DEFAULTS

        if not hasattr(self, "_lora_skeletons"):
            with torch.device("meta"):
                self._lora_skeletons = [self.build(self.default_params(dict(DEFAULTS, model_family=self.name, **v)))
                                        for v in self.lora_variants]
        return self._lora_skeletons

    def lora_paths(self) -> list[str]:
        """Module paths of every layer a LoRA of this family can name (the released models', all
        variants), for reading kohya names without the checkpoint."""
        from lora import LORA_BASES

        paths = {p: None for model in self.lora_skeletons() for p, m in model.named_modules()
                 if isinstance(m, LORA_BASES)}
        return list(paths)  # in the networks' order, each once

    def lora_layers(self, model: nn.Module) -> dict:
        """Module path -> lora.Layer for every layer that can train (blocks, embedders, final
        layer): its rank group, block, place in the order the blocks run and roles. The
        layer-targeting presets (`targets = "late_blocks"`, lora.PRESETS) select from these."""
        raise NotImplementedError(f"{self.title} has no layer-targeting presets yet: leave targets empty")

    def target_presets(self) -> dict[str, tuple[str, object]]:
        """Presets of this family's own: name -> (what it trains, rule on a lora.Layer); they may
        replace the common ones of lora.PRESETS."""
        return {}

    def lora_fused_rows(self, path: str, layer: nn.Module) -> list[int]:
        """Row sizes of the slices of a fused weight (q, k, v[, mlp]) for split LoRAs
        (split_qkv); [] where the layer is not fused."""
        return []

    def text_encoder_loras(self) -> dict[str, tuple[str, str]]:
        """Text encoders a LoRA can train: encoder name (as the prompt encoder's networks() names
        it) -> (kohya prefix "lora_te1", diffusers prefix "text_encoder"). kohya's numbering:
        te1 CLIP-L, te2 CLIP-G, te3 T5."""
        return {}

    def text_encoder_lora_targets(self, encoder: str, model: nn.Module, rank: int) -> dict[str, int]:
        """Module path -> rank in a text encoder: kohya's targets, the Linears of CLIP's attention
        and MLP and of T5's attention and feed-forward (what ComfyUI and diffusers map)."""
        kinds = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP", "T5Attention", "T5DenseGatedActDense",
                 "T5DenseActDense")
        targets = {}
        for path, module in model.named_modules():
            if type(module).__name__ in kinds:
                targets |= {f"{path}.{name}": rank for name, child in module.named_children()
                            if isinstance(child, nn.Linear)}
        return targets

    # --- the memory plan -----------------------------------------------------------------------------

    def plan_batch(self, cfg: dict, params, device) -> dict:
        """A batch as the caches deliver it, with random values: the plan's step runs on it."""
        raise NotImplementedError

    def plan_text_encoders(self, cfg: dict, params) -> list:
        """The caching phase of the plan: each text-encoder network in the order caching runs
        them, as (name, build, inputs): build() makes the network (a transformers model) on the
        current default device in cfg's dtype; inputs(device) gives the keyword arguments of one
        encoding batch of cfg["text_batch_size"] captions (input_ids, attention_mask, ...)."""
        raise NotImplementedError

    def plan_codec(self, cfg: dict, params) -> nn.Module | None:
        """The autoencoder network (models.vae.AutoEncoder) built on the current default device,
        for the plan's caching (encode) and sampling (decode) phases; None for pixels."""
        return None


# --- shared by the DDPM families (SDXL, DeepFloyd IF) ---------------------------------------------

DDPM_KEYS = ("v_parameterization", "zero_terminal_snr", "min_timestep", "max_timestep", "min_snr_gamma",
             "debiased_estimation_loss", "scale_v_pred_loss_like_noise_pred", "v_pred_like_loss", "noise_offset",
             "noise_offset_random_strength", "adaptive_noise_scale", "multires_noise_iterations",
             "multires_noise_discount", "ip_noise_gamma", "ip_noise_gamma_random_strength", "huber_schedule")


def ddpm_options(cfg: dict) -> dict:
    """losses.DDPM's arguments from the config's DDPM_KEYS (kohya's names; 0 means off)."""
    return dict(
        prediction_type="v_prediction" if cfg["v_parameterization"] else "epsilon",
        zero_terminal_snr=cfg["zero_terminal_snr"], min_timestep=cfg["min_timestep"],
        max_timestep=cfg["max_timestep"], min_snr_gamma=cfg["min_snr_gamma"],
        scale_v_pred_loss_like_noise_pred=cfg["scale_v_pred_loss_like_noise_pred"],
        v_pred_like_loss=cfg["v_pred_like_loss"], debiased_estimation_loss=cfg["debiased_estimation_loss"],
        noise_offset=cfg["noise_offset"], noise_offset_random_strength=cfg["noise_offset_random_strength"],
        adaptive_noise_scale=cfg["adaptive_noise_scale"] or None,
        multires_noise_iterations=cfg["multires_noise_iterations"],
        multires_noise_discount=cfg["multires_noise_discount"], ip_noise_gamma=cfg["ip_noise_gamma"],
        ip_noise_gamma_random_strength=cfg["ip_noise_gamma_random_strength"], loss_type=cfg["loss_type"],
        huber_c=cfg["huber_c"], huber_schedule=cfg["huber_schedule"])


def check_ranks(rank: int, group_ranks: dict[str, int], known, title: str) -> None:
    """network_dim and each group_ranks entry a non-negative int, every group one of `known`."""
    unknown = sorted(set(group_ranks) - set(known))
    if unknown:
        raise ValueError(f"group_ranks: unknown groups {unknown}; {title}'s groups are {list(known)}")
    for name, r in {"rank": rank, **group_ranks}.items():
        if not isinstance(r, int) or r < 0:
            raise ValueError(f"LoRA {name} must be a non-negative integer, got {r!r}")


# --- the registry ----------------------------------------------------------------------------------


def _families() -> dict[str, Family]:
    """Every module in this package that defines FAMILY, in the order of ORDER (then by name)."""
    import importlib
    import pkgutil

    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if isinstance(getattr(module, "FAMILY", None), Family):
            found[module.FAMILY.name] = module.FAMILY
    return dict(sorted(found.items(), key=lambda item: (ORDER.index(item[0]) if item[0] in ORDER else len(ORDER),
                                                       item[0])))


ORDER = ("flux", "sd3", "sdxl", "deepfloyd")  # detection order and the order names() lists them


FAMILIES: dict[str, Family] = _families()


def names() -> list[str]:
    return list(FAMILIES)


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"model_family={name!r}: choose one of {', '.join(map(repr, FAMILIES))} or 'auto'")
    return FAMILIES[name]


def detect(sd: dict, path: str = "") -> Family:
    """The family whose checkpoint this is; an error that says what it looks like otherwise."""
    for family in FAMILIES.values():
        if family.detect(sd):
            return family
    found = FAMILY_NAMES[detect_family(sd)]
    raise ValueError(f"{path or 'the checkpoint'} looks like {found}, which is not a model this trainer "
                     f"trains ({', '.join(FAMILIES)}); set model_path to a denoiser checkpoint")


@dataclass
class Resolved:
    family: Family
    note: str  # what was found, for the log


def resolve(model_family: str, model_path: str, allow_pickle: bool = False) -> Resolved:
    """The family a config names, or the one its checkpoint's keys show ("auto")."""
    if model_family != "auto":
        family = get(model_family)
        if model_path and Path(model_path).exists() and not family.detect_path(model_path):
            sd = load_state_dict(model_path, allow_pickle=allow_pickle)  # the header only
            if not family.detect(sd):
                found = FAMILY_NAMES[detect_family(sd)]
                raise ValueError(f"model_family={model_family!r}, but {Path(model_path).name} looks like {found}; "
                                 "set model_family='auto' or the model_path of a "
                                 f"{family.title} checkpoint")
        return Resolved(family, f"model_family={model_family!r}")
    if not model_path or not Path(model_path).exists():
        return Resolved(get("flux"), "model_family='auto' and no model file to look at: FLUX.1")
    family = next((f for f in FAMILIES.values() if f.detect_path(model_path)), None)  # folders with a config
    if family is None:
        family = detect(load_state_dict(model_path, allow_pickle=allow_pickle), model_path)  # header only
    return Resolved(family, f"model_family='auto': {Path(model_path).name} is {family.title}")
