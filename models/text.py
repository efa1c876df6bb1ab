"""Text encoders on transformers' model classes, loaded from the files people have.

FLUX.1 conditions on two encoders (black-forest-labs/flux: src/flux/modules/conditioner.py):
  - T5-XXL v1.1 encoder: `last_hidden_state`, (B, 512, 4096) for dev, (B, 256, 4096) for schnell,
    prompts padded to max_length and, in the reference, no attention mask;
  - CLIP-L text model: `pooler_output`, (B, 768) = the final-LayerNorm'd EOS token, not projected,
    from 77 tokens with truncation.
The other families' recipes are at the end of this file, one prompt-encoder class each:
  - SD3 / SD3.5 (SD3PromptEncoder): CLIP-L and CLIP-G penultimate states, T5 unmasked; parts
    assembled by sd3_conditioning, per-encoder caption dropout by drop_encoder_parts;
  - SDXL (SDXLPromptEncoder): CLIP-L + bigG penultimate states, projected bigG pooled, 75-token
    windows for longer captions;
  - DeepFloyd IF (IFPromptEncoder): T5 with its mask, IF's caption clean-up, the released
    unconditional embedding.
Each has `.identity`, `.encode(prompts) -> dict` of fp32 tensors (bool masks), `.to(device)` and
`.tokens_lost(caption)` (see truncated_token_count).

The weights come as
  - single files: `clip_l.safetensors` (HF keys `text_model.*`), `t5xxl_fp16.safetensors`,
    `t5xxl_fp8_e4m3fn.safetensors` (HF keys `shared.weight`, `encoder.block.N.layer...`), or the
    same keys under a ComfyUI / LDM prefix such as `text_encoders.clip_l.transformer.`; CLIP-G
    also in the OpenCLIP layout of SDXL checkpoints (see clip_g_state_dict);
  - Hugging Face folders: config.json + model.safetensors (or shards with an index).
A single file has no config: widths, layer counts, vocabulary and head counts are read from the
tensor shapes, and what shapes cannot tell (activation, epsilon, CLIP head width) is a known
constant of the released models.

The model is built on the meta device and the file's tensors are assigned into it
(models.loading.load_into), so a 9.5 GB T5 file is never held twice.

Tokenizers are read from disk only (local_files_only): a folder or a tokenizer.json the caller
names, or one found next to the weights (see `find_tokenizer`).
"""
import html
import json
import re
import unicodedata
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch
from einops import rearrange
from torch import Tensor
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizerFast,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from .loading import check_family, file_identity, load_into, load_state_dict, strip_prefix

T5_MAX_LENGTH = {"dev": 512, "schnell": 256}  # flux/util.py: max_length per variant
CLIP_MAX_LENGTH = 77

# ComfyUI / LDM checkpoints keep the encoders under a prefix; the part after it is the HF layout.
CLIP_PREFIXES = (
    "text_encoders.clip_l.transformer.",  # ComfyUI FLUX / SD3 all-in-one checkpoints
    "conditioner.embedders.0.transformer.",  # SDXL checkpoints (CLIP-L is embedder 0)
    "cond_stage_model.transformer.",  # SD 1.x checkpoints
)
T5_PREFIXES = ("text_encoders.t5xxl.transformer.",)

# Keys some CLIP files carry that CLIPTextModel has no place for: the projection and logit scale
# of the full CLIPModel (FLUX uses the unprojected pooled output), and its vision tower.
CLIP_EXTRA_PREFIXES = ("text_projection.", "logit_scale", "vision_model.", "visual_projection.")
# An encoder-decoder T5 file also has the decoder and LM head; the encoder ignores them.
T5_EXTRA_PREFIXES = ("decoder.", "lm_head.")

# CLIP-G (OpenCLIP ViT-bigG-14's text tower) comes in two layouts:
#  - HF `CLIPTextModelWithProjection` keys (`text_model.*`, `text_projection.weight`): the SD3.5
#    repos' text_encoders/clip_g.safetensors, SDXL/SD3 diffusers `text_encoder_2/`, and SD3
#    all-in-one files under `text_encoders.clip_g.transformer.`;
#  - OpenCLIP keys in SDXL checkpoints, under `conditioner.embedders.1.model.` (see OPENCLIP_*).
CLIP_G_PREFIXES = ("text_encoders.clip_g.transformer.",)
CLIP_G_EXTRA_PREFIXES = ("logit_scale", "vision_model.", "visual_projection.")
OPENCLIP_PREFIXES = ("conditioner.embedders.1.model.",)  # SDXL: bigG is embedder 1
# OpenCLIP key -> HF key, for the keys outside the residual blocks. `text_projection` is
# handled apart: OpenCLIP applies it as x @ P (P is width x embed_dim), nn.Linear as x @ W.T.
OPENCLIP_TO_HF = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
# Inside `transformer.resblocks.{i}.` -> `text_model.encoder.layers.{i}.`; `attn.in_proj_weight`
# and `attn.in_proj_bias` hold [q; k; v] stacked on the output dimension and are split.
OPENCLIP_BLOCK_TO_HF = {
    "ln_1.": "layer_norm1.",
    "ln_2.": "layer_norm2.",
    "attn.out_proj.": "self_attn.out_proj.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
}
# OpenCLIP keys with no place in a text model: the CLIP logit scale, the image tower.
OPENCLIP_EXTRA_PREFIXES = ("logit_scale", "visual.", "attn_mask")

MISSING_TOKENIZER_HELP = {
    "clip": (
        "CLIP-L tokenizer: a folder with vocab.json and merges.txt (or tokenizer.json), as in "
        "black-forest-labs/FLUX.1-dev `tokenizer/` or openai/clip-vit-large-patch14 (top level)"
    ),
    "clip_g": (
        "CLIP-G tokenizer: a folder with vocab.json and merges.txt (or tokenizer.json), as in "
        "stabilityai/stable-diffusion-xl-base-1.0 or stable-diffusion-3.5-large `tokenizer_2/` "
        "(the CLIP-L tokenizer files serve too: the vocabulary is the same)"
    ),
    "t5": (
        "T5 tokenizer: a folder with tokenizer.json (or spiece.model), as in "
        "black-forest-labs/FLUX.1-dev `tokenizer_2/` or google/t5-v1_1-xxl (top level)"
    ),
}
# Where a tokenizer is looked for next to the weights, first match wins: the diffusers folder
# names of FLUX.1-dev (tokenizer/ CLIP-L, tokenizer_2/ T5), SDXL (tokenizer/ CLIP-L,
# tokenizer_2/ CLIP-G), SD3 (tokenizer_3/ T5) and DeepFloyd IF (tokenizer/ T5). A folder of the
# other kind is passed over (see _holds_tokenizer), so the lists can overlap.
TOKENIZER_SUBFOLDERS = {
    "clip": ("tokenizer",),
    "clip_g": ("tokenizer_2", "tokenizer"),
    "t5": ("tokenizer_2", "tokenizer_3", "tokenizer"),
}
TOKENIZER_CLASSES = {"clip": CLIPTokenizerFast, "clip_g": CLIPTokenizerFast, "t5": T5TokenizerFast}
TOKENIZER_MODEL_TYPE = {"clip": "BPE", "clip_g": "BPE", "t5": "Unigram"}  # "model.type" in tokenizer.json


# ----------------------------------------------------------------------------- state dicts


def drop_keys(sd: dict, prefixes: tuple[str, ...]) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith(prefixes)}


def dequantize_scaled_fp8(sd: dict, dtype: torch.dtype | None = None) -> dict:
    """Undo ComfyUI's "scaled fp8" storage (t5xxl_fp8_e4m3fn_scaled.safetensors).

    Such files hold a marker key `scaled_fp8` and, per Linear, an fp8 `weight` with a float
    `scale_weight`: the real weight is weight * scale_weight (comfy/utils.py convert_old_quants).
    `scale_input` is an activation scale for fp8 matmuls and means nothing once upcast.
    The released t5xxl_fp8_e4m3fn.safetensors has no marker: its fp8 weights are plain casts
    and are upcast by load_into. Scaled weights come out in `dtype` (None: bf16, as load_into
    upcasts plain fp8), computed in float32."""
    if "scaled_fp8" not in sd:
        return sd
    out = {}
    for key, tensor in sd.items():
        if key == "scaled_fp8" or key.endswith((".scale_weight", ".scale_input")):
            continue
        scale = sd.get(key[: -len("weight")] + "scale_weight") if key.endswith(".weight") else None
        if scale is not None:
            tensor = (tensor.to(torch.float32) * scale.to(torch.float32)).to(dtype or torch.bfloat16)
        out[key] = tensor
    return out


def clip_state_dict(sd: dict) -> dict:
    """A CLIP text state dict in the released layout (`text_model.*`), extras dropped."""
    sd = strip_prefix(sd, CLIP_PREFIXES)[0]
    sd = drop_keys(sd, CLIP_EXTRA_PREFIXES)
    # Old LDM checkpoints and transformers>=5 saves lack the `text_model.` level.
    if not any(k.startswith("text_model.") for k in sd) and any(k.startswith("embeddings.") for k in sd):
        sd = {f"text_model.{k}": v for k, v in sd.items()}
    # position_ids is arange(77): rebuilt after loading, never read from a file (some SD-era
    # files store it as floats or with wrong values).
    return {k: v for k, v in sd.items() if not k.endswith("position_ids")}


def _openclip_block_tensors(key: str, tensor: Tensor) -> dict:
    """One `transformer.resblocks.{i}.*` tensor as the HF key(s) it becomes."""
    index, name = key[len("transformer.resblocks.") :].split(".", 1)
    layer = f"text_model.encoder.layers.{index}."
    if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = name.rsplit("_", 1)[1]  # weight (3W, W) or bias (3W,), rows [q; k; v]
        q, k, v = tensor.chunk(3, dim=0)
        return {f"{layer}self_attn.{p}_proj.{kind}": t for p, t in zip("qkv", (q, k, v))}
    for old, new in OPENCLIP_BLOCK_TO_HF.items():
        if name.startswith(old):
            return {layer + new + name[len(old) :]: tensor}
    return {key: tensor}  # unknown: kept under its own name, so the strict load names it


def openclip_text_state_dict(sd: dict) -> dict:
    """An OpenCLIP text tower (prefix removed) in the layout of CLIPTextModelWithProjection."""
    out = {}
    for key, tensor in drop_keys(sd, OPENCLIP_EXTRA_PREFIXES).items():
        if key == "text_projection":
            out["text_projection.weight"] = tensor.t().contiguous()  # x @ P == Linear with W = P.T
        elif key in OPENCLIP_TO_HF:
            out[OPENCLIP_TO_HF[key]] = tensor
        elif key.startswith("transformer.resblocks."):
            out.update(_openclip_block_tensors(key, tensor))
        else:
            out[key] = tensor
    return out


def clip_g_state_dict(sd: dict) -> dict:
    """A CLIP-G text state dict in the HF CLIPTextModelWithProjection layout, from any of the
    layouts above (an SDXL file's OpenCLIP keys, an SD3 all-in-one file, a separate file)."""
    if any(k.startswith(OPENCLIP_PREFIXES) for k in sd):
        sd = openclip_text_state_dict(strip_prefix(sd, OPENCLIP_PREFIXES)[0])
    elif "transformer.resblocks.0.attn.in_proj_weight" in sd:  # a bare OpenCLIP model file
        sd = openclip_text_state_dict(sd)
    else:
        sd = drop_keys(strip_prefix(sd, CLIP_G_PREFIXES)[0], CLIP_G_EXTRA_PREFIXES)
        if not any(k.startswith("text_model.") for k in sd) and any(k.startswith("embeddings.") for k in sd):
            sd = {k if k == "text_projection.weight" else f"text_model.{k}": v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if not k.endswith("position_ids")}


def t5_state_dict(sd: dict, dtype: torch.dtype | None = None) -> dict:
    """A T5 encoder state dict in the HF layout with `shared.weight` as the token embedding."""
    sd = strip_prefix(sd, T5_PREFIXES)[0]
    sd = drop_keys(sd, T5_EXTRA_PREFIXES)
    sd = dequantize_scaled_fp8(sd, dtype)
    # T5EncoderModel ties encoder.embed_tokens to shared; files carry one or both copies.
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    sd.pop("encoder.embed_tokens.weight", None)
    return sd


def match_model_layout(sd: dict, model: torch.nn.Module) -> dict:
    """Add or remove the `text_model.` level to match the installed transformers version
    (4.x: CLIPTextModel.text_model.embeddings..., 5.x: CLIPTextModel.embeddings...)."""
    model_has_level = any(k.startswith("text_model.") for k in model.state_dict())
    if model_has_level:
        return sd
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


# ----------------------------------------------------------------------------- configs


def _count_layers(sd: dict, prefix: str) -> int:
    indices = {int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)}
    if indices != set(range(len(indices))):
        raise ValueError(f"layer indices under {prefix} are not contiguous: {sorted(indices)}")
    return len(indices)


def infer_clip_config(sd: dict, **overrides) -> CLIPTextConfig:
    """CLIPTextConfig from shapes; quick_gelu, eps 1e-5 and 64-wide heads are CLIP-L constants."""
    vocab, hidden = sd["text_model.embeddings.token_embedding.weight"].shape
    fields = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_count_layers(sd, "text_model.encoder.layers."),
        num_attention_heads=max(1, hidden // 64),  # OpenAI CLIP text heads are 64 wide
        max_position_embeddings=sd["text_model.embeddings.position_embedding.weight"].shape[0],
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=49406,  # <|startoftext|>
        eos_token_id=49407,  # <|endoftext|>: the pooled output is taken at its first position
        pad_token_id=1,
    )
    fields.update(overrides)
    return CLIPTextConfig(**fields)


def infer_t5_config(sd: dict, **overrides) -> T5Config:
    """T5Config from shapes; relative attention max distance 128, eps 1e-6 are v1.1 constants."""
    vocab, d_model = sd["shared.weight"].shape
    attn = "encoder.block.0.layer.0.SelfAttention."
    num_buckets, num_heads = sd[attn + "relative_attention_bias.weight"].shape
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd  # v1.1: gated-gelu; v1.0: relu
    d_ff_key = "encoder.block.0.layer.1.DenseReluDense." + ("wi_0.weight" if gated else "wi.weight")
    num_layers = _count_layers(sd, "encoder.block.")
    fields = dict(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=sd[attn + "q.weight"].shape[0] // num_heads,
        d_ff=sd[d_ff_key].shape[0],
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu" if gated else "relu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,  # inference and caching only; FLUX never trains with T5 dropout
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    fields.update(overrides)
    return T5Config(**fields)


def read_hf_config(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    # A full CLIPModel folder (openai/clip-vit-large-patch14) nests the text config.
    if config.get("model_type") == "clip":
        config = config["text_config"]
    return {k: v for k, v in config.items() if k not in ("architectures", "transformers_version")}


# ----------------------------------------------------------------------------- models


def _build_and_load(model_class, config, sd: dict, dtype, device, what: str):
    with torch.device("meta"):
        model = model_class(config)
    load_into(model, match_model_layout(sd, model), dtype=dtype, device=device, what=what)
    return model.eval().requires_grad_(False)


CLIP_REQUIRED = ("text_model.embeddings.token_embedding.weight", "text_model.final_layer_norm.weight")


def _load_clip(model_class, sd: dict, path: Path, shape_defaults: dict, config_overrides: dict, dtype, device, what):
    """A CLIP text model: config.json for an HF folder, else from shapes plus `shape_defaults`."""
    if path.is_dir() and (path / "config.json").exists():
        config = CLIPTextConfig(**{**read_hf_config(path), **config_overrides})
    else:
        config = infer_clip_config(sd, **{**shape_defaults, **config_overrides})
    model = _build_and_load(model_class, config, sd, dtype, device, what=f"{what} {path}")
    # position_ids is a non-persistent buffer: not in the state dict, so still on the meta
    # device after loading. It is arange(max positions), rebuilt here.
    embeddings = model.text_model.embeddings if hasattr(model, "text_model") else model.embeddings
    positions = torch.arange(config.max_position_embeddings, device=embeddings.token_embedding.weight.device)
    embeddings.position_ids = positions.expand(1, -1)
    return model


def load_clip_model(path: str | Path, dtype=None, device=None, **config_overrides) -> CLIPTextModel:
    """CLIPTextModel from a single file (config from shapes) or an HF folder (its config.json)."""
    path = Path(path)
    sd = clip_state_dict(load_state_dict(path))
    check_family(sd, "clip", required=CLIP_REQUIRED)
    return _load_clip(CLIPTextModel, sd, path, {}, config_overrides, dtype, device, "CLIP text encoder")


def load_clip_g_model(path: str | Path, dtype=None, device=None, **config_overrides) -> CLIPTextModelWithProjection:
    """CLIP-G (bigG) with its text projection, from any layout clip_g_state_dict reads, or an HF
    folder. From shapes: width 1280, 32 layers, 20 heads of 64, MLP 5120 for the released model;
    exact GELU and eps 1e-5 are its constants (open_clip nn.GELU; sd3.5 sd3_infer.CLIPG_CONFIG)."""
    path = Path(path)
    sd = clip_g_state_dict(load_state_dict(path))
    check_family(sd, "clip", required=(*CLIP_REQUIRED, "text_projection.weight"))
    shape_defaults = {"hidden_act": "gelu", "projection_dim": sd["text_projection.weight"].shape[0]}
    return _load_clip(CLIPTextModelWithProjection, sd, path, shape_defaults, config_overrides, dtype, device,
                      "CLIP-G text encoder")  # fmt: skip


def load_t5_model(path: str | Path, dtype=None, device=None, **config_overrides) -> T5EncoderModel:
    """T5EncoderModel from a single file (fp32/fp16/bf16/fp8, scaled fp8) or an HF folder."""
    path = Path(path)
    sd = t5_state_dict(load_state_dict(path), dtype)
    required = ("shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.final_layer_norm.weight")
    check_family(sd, "t5", required=required)
    if path.is_dir() and (path / "config.json").exists():
        config = T5Config(**{**read_hf_config(path), **config_overrides})
    else:
        config = infer_t5_config(sd, **config_overrides)
    # The model has both `shared.weight` and `encoder.embed_tokens.weight` (one tied tensor);
    # the file's single copy is given under both names for the strict key check ...
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    model = _build_and_load(T5EncoderModel, config, sd, dtype, device, what=f"T5 encoder {path}")
    # ... and assignment (with a dtype conversion each) leaves two tensors: tie them again.
    model.encoder.embed_tokens.weight = model.shared.weight
    return model


# ----------------------------------------------------------------------------- tokenizers


def _tokenizer_json_type(file: Path) -> str | None:
    try:
        return json.loads(file.read_text())["model"]["type"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _holds_tokenizer(folder: Path, kind: str) -> bool:
    """Whether `folder` holds the files of this kind of tokenizer (not the other kind's)."""
    if not folder.is_dir():
        return False
    tokenizer_json = folder / "tokenizer.json"
    if tokenizer_json.exists():
        return _tokenizer_json_type(tokenizer_json) == TOKENIZER_MODEL_TYPE[kind]
    if TOKENIZER_MODEL_TYPE[kind] == "BPE":
        return (folder / "vocab.json").exists() and (folder / "merges.txt").exists()
    return (folder / "spiece.model").exists()


def find_tokenizer(weights: str | Path, kind: str, tokenizer: str | Path | None = None) -> Path:
    """The tokenizer folder or tokenizer.json for weights at `weights`.

    Looked for, in order: the path the caller gives; the weights folder itself (an HF folder);
    for a diffusers folder text_encoder[_N]/, the tokenizer[_N]/ beside it; the
    TOKENIZER_SUBFOLDERS of the kind beside the weights file or folder; the folder that
    holds a weights file. A tokenizer.json counts only if its model is BPE (CLIP) or Unigram
    (T5), so that a CLIP encoder never picks up T5's tokenizer or the reverse."""
    if tokenizer is not None:
        given = Path(tokenizer)
        if given.is_file() and _tokenizer_json_type(given) == TOKENIZER_MODEL_TYPE[kind]:
            return given
        if _holds_tokenizer(given, kind):
            return given
        raise FileNotFoundError(
            f"no {kind.upper()} tokenizer at {given}.\nExpected the {MISSING_TOKENIZER_HELP[kind]}."
        )
    weights = Path(weights)
    base = weights.parent
    candidates = [weights] if weights.is_dir() else []
    if weights.is_dir() and weights.name.startswith("text_encoder"):  # text_encoder_3/ -> tokenizer_3/
        candidates.append(base / weights.name.replace("text_encoder", "tokenizer", 1))
    candidates += [base / name for name in TOKENIZER_SUBFOLDERS[kind]]
    if weights.is_file():
        candidates.append(base)
    for folder in candidates:
        if _holds_tokenizer(folder, kind):
            return folder
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"no {kind.upper()} tokenizer found for {weights} (looked in: {looked}).\n"
        f"Put the {MISSING_TOKENIZER_HELP[kind]}, into `{base / TOKENIZER_SUBFOLDERS[kind][0]}`, "
        "or pass its path as the tokenizer argument. Nothing is downloaded."
    )


def load_tokenizer(location: Path, kind: str):
    """A transformers fast tokenizer from a folder or a tokenizer.json, offline."""
    tokenizer_class = TOKENIZER_CLASSES[kind]
    if location.is_file():
        return tokenizer_class(tokenizer_file=str(location))
    try:
        return tokenizer_class.from_pretrained(str(location), local_files_only=True)
    except (ImportError, ValueError) as error:
        # e.g. spiece.model without tokenizer.json needs the protobuf package to convert.
        raise ValueError(
            f"could not read the {kind.upper()} tokenizer in {location}: {error}\n"
            f"Use a tokenizer.json ({MISSING_TOKENIZER_HELP[kind]})."
        ) from error


# ----------------------------------------------------------------------------- encoders


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


@dataclass
class TextEncoder:
    """One encoder with its tokenizer; `identity` names everything its outputs depend on."""

    kind: str  # "clip" (CLIP-L), "clip_g" or "t5"
    model: torch.nn.Module
    tokenizer: object
    max_length: int
    identity: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """prompts -> input_ids, attention_mask, both (B, max_length), padded and truncated."""
        batch = self.tokenizer(
            list(prompts),
            truncation=True,
            max_length=self.max_length,
            padding="max_length",
            return_tensors="pt",
        )
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    def to(self, device) -> "TextEncoder":
        self.model.to(device)
        return self


def load_text_encoder(
    kind: str,
    weights: str | Path,
    tokenizer: str | Path | None = None,
    max_length: int | None = None,
    dtype: torch.dtype | None = None,
    device=None,
    **config_overrides,
) -> TextEncoder:
    """Load a CLIP-L ("clip"), CLIP-G ("clip_g") or T5 ("t5") encoder and its tokenizer from local files."""
    if kind not in ("clip", "clip_g", "t5"):
        raise ValueError(f"kind must be 'clip', 'clip_g' or 't5', not {kind!r}")
    weights = Path(weights)
    tokenizer_path = find_tokenizer(weights, kind, tokenizer)  # fail before reading gigabytes
    tok = load_tokenizer(tokenizer_path, kind)
    if kind in ("clip", "clip_g"):
        if not (weights.is_dir() and (weights / "config.json").exists()):
            # The pooled output is read at the tokenizer's EOS token; the file has no config.
            config_overrides = {"eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id, **config_overrides}
        load = load_clip_model if kind == "clip" else load_clip_g_model
        model = load(weights, dtype=dtype, device=device, **config_overrides)
        max_length = max_length or CLIP_MAX_LENGTH
    else:
        model = load_t5_model(weights, dtype=dtype, device=device, **config_overrides)
        max_length = max_length or T5_MAX_LENGTH["dev"]
    identity = (
        f"{kind}|{file_identity(weights)}|dtype={_model_dtype(model)}|max_length={max_length}"
        f"|tokenizer={tokenizer_path.resolve()}"
    )
    return TextEncoder(kind, model, tok, max_length, identity)


@dataclass
class FluxConditioning:
    t5: Tensor  # (B, max_length, 4096): T5 last_hidden_state
    clip_pooled: Tensor  # (B, 768): CLIP-L pooler_output, unprojected
    t5_mask: Tensor | None  # (B, max_length) 1 = token, 0 = padding; None unless the mask is applied


class FluxTextEncoder:
    """Prompts -> FLUX.1 conditioning, as black-forest-labs/flux `HFEmbedder` computes it.

    apply_t5_attn_mask=False is the reference: T5 runs on the padded prompt without a mask.
    True passes the padding mask to T5 and returns it, for a transformer that masks its
    attention too (kohya-ss/sd-scripts `--apply_t5_attn_mask`)."""

    def __init__(self, clip: TextEncoder, t5: TextEncoder, apply_t5_attn_mask: bool = False):
        if clip.kind != "clip" or t5.kind != "t5":
            raise ValueError("FluxTextEncoder(clip, t5): pass the CLIP-L encoder first, then the T5 encoder")
        self.clip = clip
        self.t5 = t5
        self.apply_t5_attn_mask = apply_t5_attn_mask

    @classmethod
    def load(
        cls,
        clip_weights: str | Path,
        t5_weights: str | Path,
        clip_tokenizer: str | Path | None = None,
        t5_tokenizer: str | Path | None = None,
        t5_max_length: int = T5_MAX_LENGTH["dev"],
        apply_t5_attn_mask: bool = False,
        dtype: torch.dtype | None = None,
        device=None,
    ) -> "FluxTextEncoder":
        """Both encoders from local files. dtype None keeps each file's dtype (fp8 -> bf16);
        bf16 suits T5-XXL best: in fp16 its activations overflow and transformers clamps them."""
        clip = load_text_encoder("clip", clip_weights, clip_tokenizer, CLIP_MAX_LENGTH, dtype, device)
        t5 = load_text_encoder("t5", t5_weights, t5_tokenizer, t5_max_length, dtype, device)
        return cls(clip, t5, apply_t5_attn_mask)

    @property
    def identity(self) -> str:
        return f"flux|{self.clip.identity}|{self.t5.identity}|t5_mask={self.apply_t5_attn_mask}"

    def to(self, device) -> "FluxTextEncoder":
        self.clip.to(device)
        self.t5.to(device)
        return self

    def networks(self) -> dict[str, torch.nn.Module]:
        return {"clip_l": self.clip.model, "t5": self.t5.model}

    def encode_t5(self, prompts: list[str]) -> tuple[Tensor, Tensor | None]:
        ids, mask = self.t5.tokenize(prompts)
        mask = mask if self.apply_t5_attn_mask else None
        hidden = self.t5.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden, mask

    def encode_clip(self, prompts: list[str]) -> Tensor:
        ids, _ = self.clip.tokenize(prompts)  # CLIP runs without a mask: causal attention only
        return self.clip.model(input_ids=ids, attention_mask=None).pooler_output

    def tokens_lost(self, caption: str) -> dict[str, int]:
        """Tokens each encoder drops from `caption` (0 when it fits)."""
        return {e.kind: truncated_token_count(e.tokenizer, caption, e.max_length) for e in (self.clip, self.t5)}

    def __call__(self, prompts: list[str]) -> FluxConditioning:
        if isinstance(prompts, str):
            prompts = [prompts]
        t5, mask = self.encode_t5(prompts)
        return FluxConditioning(t5=t5, clip_pooled=self.encode_clip(prompts), t5_mask=mask)


# ----------------------------------------------------------------------------- truncation


def truncated_token_count(tokenizer, caption: str, max_length: int) -> int:
    """How many of the caption's tokens do not fit in `max_length` positions, the tokenizer's
    special tokens (CLIP: BOS + EOS, T5: EOS) included. For SDXL's 75-token windows pass
    75 * windows + 2. The trainer warns with it (once per caption); nothing is printed here."""
    tokens = tokenizer(caption, add_special_tokens=False, verbose=False)["input_ids"]
    return max(0, len(tokens) + tokenizer.num_special_tokens_to_add(pair=False) - max_length)


# ----------------------------------------------------------------------------- CLIP windows

CLIP_WINDOW = CLIP_MAX_LENGTH - 2  # 75 caption tokens between BOS and EOS


def clip_window_ids(tokenizer, prompts: list[str], windows: int, pad_id: int) -> Tensor:
    """prompts -> (B, windows, 77) token ids: caption token k*75 .. k*75+74 in window k, each
    window `BOS tokens EOS pad...` (pad_id: EOS for CLIP-L, 0 for CLIP-G), a window past the end
    of the caption `BOS EOS pad...`. Tokens past 75 * windows are dropped.

    With one window this is the tokenizer's own max_length=77 truncation. With more it is the
    layout kohya-ss/sd-scripts builds for max_token_length 150 / 225 (train_util / strategy_base
    `_get_input_ids`: BOS + 75 + EOS-or-pad per window, the empty-window and full-window fixes),
    written by positions rather than by comparing ids with pad, so a caption whose token is id 0
    ("!") is not mistaken for padding."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    captions = tokenizer(list(prompts), add_special_tokens=False, verbose=False)["input_ids"]
    rows = []
    for tokens in captions:
        row = []
        for k in range(windows):
            text = tokens[k * CLIP_WINDOW : (k + 1) * CLIP_WINDOW]
            row.append([bos, *text, eos] + [pad_id] * (CLIP_WINDOW - len(text)))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def encode_clip(model: torch.nn.Module, ids: Tensor, eos_id: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """One forward of a CLIP text model on (N, 77) ids, causal attention only (no padding mask,
    as every reference runs CLIP). Returns
      - penultimate: (N, 77, D), the input of the last layer, without the final LayerNorm
        (hidden_states[-2]; SDXL's hidden_states[11] for the 12-layer CLIP-L);
      - pooled: (N, D), the final-LayerNorm'd state at the first EOS (the references take
        argmax(ids), the same token: EOS 49407 is the largest id);
      - projected: (N, P), text_projection(pooled), or None for a model without projection."""
    out = model(input_ids=ids, output_hidden_states=True)
    first_eos = (ids == eos_id).int().argmax(dim=-1)
    pooled = out.last_hidden_state[torch.arange(len(ids), device=ids.device), first_eos]
    projection = getattr(model, "text_projection", None)
    return out.hidden_states[-2], pooled, None if projection is None else projection(pooled)


def join_windows(states: Tensor, join: str) -> Tensor:
    """(B, n, 77, D) per-window states -> one sequence per caption.
    "concat": every window whole, n * 77 long: ComfyUI's layout of a caption that fills its n
    windows (ComfyUI makes only as many windows as a caption needs and moves a word that would
    cross token 75 into the next; here there are always n, so that every caption has one shape).
    "kohya": the first window's BOS, each window's 75 caption states, the last window's final
    token: 75 * n + 2 long (sd-scripts strategy_sdxl `_get_hidden_states_sdxl`)."""
    if join == "concat":
        return rearrange(states, "b n l d -> b (n l) d")
    if join == "kohya":
        inner = rearrange(states[:, :, 1:-1], "b n l d -> b (n l) d")
        return torch.cat([states[:, 0, :1], inner, states[:, -1, -1:]], dim=1)
    raise ValueError(f"join must be 'concat' or 'kohya', not {join!r}")


def _encode_clip_windows(encoder: "TextEncoder", prompts: list[str], windows: int, pad_id: int):
    """(B, n, 77, D) penultimate states per window, and the first window's pooled outputs."""
    ids = clip_window_ids(encoder.tokenizer, prompts, windows, pad_id).to(encoder.device)
    hidden, pooled, projected = encode_clip(encoder.model, ids.flatten(0, 1), encoder.tokenizer.eos_token_id)
    hidden = rearrange(hidden, "(b n) l d -> b n l d", n=windows)
    first = slice(None, None, windows)  # rows 0, n, 2n, ...: window 0 of each caption
    return hidden, pooled[first], None if projected is None else projected[first]


# ----------------------------------------------------------------------------- SD3 / SD3.5

SD3_CONTEXT_WIDTH = 4096  # the T5-XXL width: CLIP-L + CLIP-G (768 + 1280) are zero-padded to it
SD3_T5_LENGTH = 77  # other_impls.T5XXLTokenizer(min_length=77)
SD3_RECIPE = "sd3.5-reference-1"  # bump when the recipe below changes its output
# Which parts belong to which encoder, for per-encoder caption dropout.
SD3_ENCODER_PARTS = {
    "clip_l": ("clip_l", "clip_l_pooled"),
    "clip_g": ("clip_g", "clip_g_pooled"),
    "t5": ("t5", "t5_mask"),
}


def sd3_conditioning(parts: dict[str, Tensor], empty_t5_length: int = SD3_T5_LENGTH,
                     context_width: int = SD3_CONTEXT_WIDTH) -> tuple[Tensor, Tensor]:  # fmt: skip
    """SD3 parts (SD3PromptEncoder.encode, a cache, or drop_encoder_parts) -> (context, pooled),
    as sd3_infer.SD3Inferencer.get_cond assembles them:
      context = cat(pad(cat(clip_l, clip_g, -1) to the T5 width), t5) on the sequence
              = (B, 77 + T, 4096), 154 tokens at the default T5 length;
      pooled  = cat(clip_l_pooled, clip_g_pooled) = (B, 768 + 1280 = 2048).
    Without a "t5" part the T5 tokens are zeros, (B, empty_t5_length, context_width), what
    ComfyUI and kohya-ss/sd-scripts (`concat_encodings`) put there when no T5 is loaded."""
    clip = torch.cat([parts["clip_l"], parts["clip_g"]], dim=-1)  # (B, 77, 768 + 1280)
    t5 = parts.get("t5")
    if t5 is None:
        t5 = clip.new_zeros(clip.shape[0], empty_t5_length, context_width)
    if clip.shape[-1] > t5.shape[-1]:
        raise ValueError(f"CLIP-L + CLIP-G are {clip.shape[-1]} wide, more than the T5 width {t5.shape[-1]}")
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    context = torch.cat([clip, t5.to(clip.dtype)], dim=1)
    return context, torch.cat([parts["clip_l_pooled"], parts["clip_g_pooled"]], dim=-1)


def drop_encoder_parts(parts: dict[str, Tensor], rates: dict[str, float], generator: torch.Generator,
                       groups: dict[str, tuple[str, ...]] = SD3_ENCODER_PARTS) -> dict[str, Tensor]:  # fmt: skip
    """Per-sample, per-encoder caption dropout on encoder outputs, fresh or cached (kohya's
    clip_l_dropout_rate / clip_g_dropout_rate / t5_dropout_rate, keyed here "clip_l", "clip_g",
    "t5"). A dropped encoder's tensors become zeros (its mask False), as kohya's
    Sd3TextEncodingStrategy does both when encoding and in `drop_cached_text_encoder_outputs`.
    A pure function: returns a new dict. One uniform draw per sample and encoder on every call,
    whatever the rates, so a run reproduces and changing one rate leaves the others' draws."""
    unknown = set(rates) - set(groups)
    if unknown:
        raise ValueError(f"dropout rates for unknown encoders {sorted(unknown)}; known: {sorted(groups)}")
    present = [key for keys in groups.values() for key in keys if key in parts]  # other keys pass through
    if not present:
        raise ValueError(f"none of the encoder outputs {sorted(sum(groups.values(), ()))} is in {sorted(parts)}")
    batch = len(parts[present[0]])
    out = dict(parts)
    for encoder, keys in groups.items():
        drop = torch.rand(batch, generator=generator) < rates.get(encoder, 0.0)
        for key in (k for k in keys if k in parts):
            value = parts[key]
            keep = ~drop.to(value.device).view(-1, *[1] * (value.ndim - 1))  # (B, 1, ...)
            out[key] = torch.where(keep, value, torch.zeros((), dtype=value.dtype, device=value.device))
    return out


class SD3PromptEncoder:
    """Prompts -> the parts of SD3 / SD3.5 conditioning, as Stability-AI/sd3.5 computes them
    (sd3_infer.SD3Inferencer.get_cond with other_impls' SDClipModel, SDXLClipG, T5XXLModel):
      "clip_l": (B, 77, 768)   CLIP-L penultimate states, no final LN; prompt padded with EOS;
      "clip_g": (B, 77, 1280)  CLIP-G penultimate states, no final LN; padded with 0;
      "clip_l_pooled": (B, 768)  CLIP-L final-LN EOS state, NOT projected;
      "clip_g_pooled": (B, 1280) CLIP-G final-LN EOS state through text_projection;
      "t5": (B, t5_length, 4096) T5 last_hidden_state, no attention mask; absent without T5.
    Only the first 77-token CLIP window is used. sd3_conditioning(parts) assembles context and
    pooled; caches store the parts so that drop_encoder_parts can act on cached tensors.

    Others differ: diffusers' StableDiffusion3Pipeline uses the PROJECTED CLIP-L pooled output
    (text_embeds) and T5 max_sequence_length 256; kohya-ss/sd-scripts projects CLIP-L too
    (CLIPTextModelWithProjection) and pads T5 to t5xxl_max_token_length 256.
    Where this differs from the reference, by choice:
      - T5 gets exactly t5_length tokens, padded with 0 and truncated (EOS kept): the reference
        pads to at least 77 but lets a long prompt run longer (it cuts the text at 226
        characters); a cache needs one shape. truncated_token_count reports the loss.
      - The prompt goes to the tokenizer as it is; the reference tokenizes word by word and
        reads the weight syntax `(word:1.2)` (it drops the brackets and the weights), and moves a
        word that would cross token 75 into the (unused) second chunk instead of cutting it."""

    def __init__(self, clip_l: TextEncoder, clip_g: TextEncoder, t5: TextEncoder | None = None):
        if clip_l.kind != "clip" or clip_g.kind != "clip_g" or (t5 is not None and t5.kind != "t5"):
            raise ValueError("SD3PromptEncoder(clip_l, clip_g, t5): CLIP-L, CLIP-G and T5 (or None) encoders, in order")
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5

    def networks(self) -> dict[str, torch.nn.Module]:
        encoders = {"clip_l": self.clip_l, "clip_g": self.clip_g, "t5": self.t5}
        return {name: e.model for name, e in encoders.items() if e is not None}

    @classmethod
    def load(cls, clip_l: str | Path, clip_g: str | Path, t5: str | Path | None = None,
             clip_l_tokenizer: str | Path | None = None, clip_g_tokenizer: str | Path | None = None,
             t5_tokenizer: str | Path | None = None, t5_length: int = SD3_T5_LENGTH,
             dtype: torch.dtype | None = None, device=None) -> "SD3PromptEncoder":  # fmt: skip
        """From separate files (text_encoders/clip_l, clip_g, t5xxl_*.safetensors), HF folders,
        or one all-in-one file given three times (sd3_medium_incl_clips_t5xxlfp16.safetensors)."""
        encoders = [load_text_encoder("clip", clip_l, clip_l_tokenizer, CLIP_MAX_LENGTH, dtype, device),
                    load_text_encoder("clip_g", clip_g, clip_g_tokenizer, CLIP_MAX_LENGTH, dtype, device)]  # fmt: skip
        if t5 is not None:
            encoders.append(load_text_encoder("t5", t5, t5_tokenizer, t5_length, dtype, device))
        return cls(*encoders)

    @property
    def identity(self) -> str:
        t5 = self.t5.identity if self.t5 is not None else "t5=none"
        return f"sd3|{SD3_RECIPE}|{self.clip_l.identity}|{self.clip_g.identity}|{t5}"

    def to(self, device) -> "SD3PromptEncoder":
        for encoder in (self.clip_l, self.clip_g, self.t5):
            if encoder is not None:
                encoder.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        eos_l = self.clip_l.tokenizer.eos_token_id
        clip_l, clip_l_pooled, _ = _encode_clip_windows(self.clip_l, prompts, 1, pad_id=eos_l)
        clip_g, _, clip_g_pooled = _encode_clip_windows(self.clip_g, prompts, 1, pad_id=0)
        parts = {"clip_l": clip_l[:, 0], "clip_g": clip_g[:, 0],
                 "clip_l_pooled": clip_l_pooled, "clip_g_pooled": clip_g_pooled}  # fmt: skip
        if self.t5 is not None:
            ids, _ = self.t5.tokenize(prompts)  # no mask: the padding is attended, as in the reference
            parts["t5"] = self.t5.model(input_ids=ids).last_hidden_state
        return {name: tensor.float() for name, tensor in parts.items()}

    def tokens_lost(self, caption: str) -> dict[str, int]:
        """Tokens each encoder drops from `caption` (0 when it fits)."""
        encoders = {"clip_l": self.clip_l, "clip_g": self.clip_g, "t5": self.t5}
        return {name: truncated_token_count(e.tokenizer, caption, e.max_length)
                for name, e in encoders.items() if e is not None}  # fmt: skip


# ----------------------------------------------------------------------------- SDXL

SDXL_RECIPE = "sdxl-sgm-1"
SDXL_MAX_TOKEN_LENGTHS = (75, 150, 225)  # kohya's max_token_length: 1, 2 or 3 windows


class SDXLPromptEncoder:
    """Prompts -> SDXL conditioning, as Stability-AI/generative-models' conditioner computes it
    (sgm/modules/encoders/modules.py: FrozenCLIPEmbedder layer="hidden", layer_idx=11, and
    FrozenOpenCLIPEmbedder2 layer="penultimate", always_return_pooled, legacy=False):
      "context": (B, S, 2048) = cat(CLIP-L hidden_states[11], bigG penultimate) on channels,
                 both without final LayerNorm; CLIP-L pads with EOS, bigG with 0 (open_clip);
      "pooled":  (B, 1280)    = ln_final(bigG last layer) at the EOS token @ text_projection,
                 of the first window.
    S = 77 for max_token_length 75 (the reference). Longer captions (150, 225) are cut into
    75-token windows, each `BOS + 75 + EOS/pad`, encoded separately (clip_window_ids); join
    "concat" keeps every window whole (S = 77 * n, ComfyUI's layout), "kohya" drops the inner
    BOS/EOS states (S = 75 * n + 2, as kohya-ss/sd-scripts); see join_windows. Both take the
    pooled output of window 0, as kohya (`pool2[::n_size]`) and ComfyUI (first_pooled) do.
    The size and crop embeddings of the 2816-wide vector y are the family's, not the encoder's."""

    def __init__(self, clip_l: TextEncoder, clip_g: TextEncoder, max_token_length: int = 75, join: str = "concat"):
        if clip_l.kind != "clip" or clip_g.kind != "clip_g":
            raise ValueError("SDXLPromptEncoder(clip_l, clip_g): the CLIP-L encoder first, then CLIP-G (bigG)")
        if max_token_length not in SDXL_MAX_TOKEN_LENGTHS:
            raise ValueError(f"max_token_length must be one of {SDXL_MAX_TOKEN_LENGTHS}, not {max_token_length}")
        join_windows(torch.zeros(1, 1, 3, 1), join)  # rejects an unknown join now, not at the first batch
        self.clip_l, self.clip_g = clip_l, clip_g
        self.windows, self.join = max_token_length // CLIP_WINDOW, join

    def networks(self) -> dict[str, torch.nn.Module]:
        return {"clip_l": self.clip_l.model, "clip_g": self.clip_g.model}

    @classmethod
    def load(cls, clip_l: str | Path, clip_g: str | Path, clip_l_tokenizer: str | Path | None = None,
             clip_g_tokenizer: str | Path | None = None, max_token_length: int = 75, join: str = "concat",
             dtype: torch.dtype | None = None, device=None) -> "SDXLPromptEncoder":  # fmt: skip
        """From sd_xl_base_1.0.safetensors given twice (conditioner.embedders.0 and .1), or the
        diffusers folders text_encoder/ and text_encoder_2/."""
        clip_l_encoder = load_text_encoder("clip", clip_l, clip_l_tokenizer, CLIP_MAX_LENGTH, dtype, device)
        clip_g_encoder = load_text_encoder("clip_g", clip_g, clip_g_tokenizer, CLIP_MAX_LENGTH, dtype, device)
        return cls(clip_l_encoder, clip_g_encoder, max_token_length, join)

    @property
    def identity(self) -> str:
        return (f"sdxl|{SDXL_RECIPE}|{self.clip_l.identity}|{self.clip_g.identity}"
                f"|max_token_length={self.windows * CLIP_WINDOW}|join={self.join}")  # fmt: skip

    def to(self, device) -> "SDXLPromptEncoder":
        self.clip_l.to(device)
        self.clip_g.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        eos_l = self.clip_l.tokenizer.eos_token_id
        clip_l, _, _ = _encode_clip_windows(self.clip_l, prompts, self.windows, pad_id=eos_l)
        clip_g, _, pooled = _encode_clip_windows(self.clip_g, prompts, self.windows, pad_id=0)
        context = torch.cat([join_windows(clip_l, self.join), join_windows(clip_g, self.join)], dim=-1)
        return {"context": context.float(), "pooled": pooled.float()}

    def tokens_lost(self, caption: str) -> dict[str, int]:
        capacity = self.windows * CLIP_WINDOW + 2
        return {name: truncated_token_count(e.tokenizer, caption, capacity)
                for name, e in (("clip_l", self.clip_l), ("clip_g", self.clip_g))}  # fmt: skip


# ----------------------------------------------------------------------------- DeepFloyd IF

IF_T5_LENGTH = 77  # deepfloyd_if/modules/t5.py: max_length=77, padding, truncation
IF_RECIPE = "deepfloyd-if-1"

# IF's caption clean-up (deep-floyd/IF deepfloyd_if/modules/t5.py: T5Embedder.clean_caption,
# applied twice) without its extra dependencies ftfy and bs4. Kept as there: every regular-
# expression step, in order (some merged into one pattern with the same matches), urllib's
# unquote_plus, html.unescape. Approximated:
#   - BeautifulSoup(caption, "html.parser").text: HTML comments, declarations, tags and the
#     text inside <script> / <style> are removed by a pattern, then entities decoded. Not
#     reproduced: html.parser's handling of a tag left open at the very end of a caption.
#   - ftfy.fix_text: terminal escapes and control characters removed, curly quotes made
#     straight, the ligatures U+FB00-FB06 and full-width ASCII spelled out, line breaks unified,
#     NFC. Not reproduced: ftfy's repair of mojibake (UTF-8 read as Latin-1) that survives the
#     lower-casing before it (lower-cased mojibake such as "cafã©" ftfy leaves alone too).
# Measured against the original (ftfy 6.3.1, beautifulsoup4 4.15.0): the same output on 76
# hand-made and 2,000 generated captions.
IF_URL = re.compile(
    r"\b(?:https?:(?:/{1,3}|[a-zA-Z0-9%])"  # a scheme: only it and its slashes go ...
    r"|www:(?:/{1,3}|[a-zA-Z0-9%])"  # (the reference's second pattern, "www:" as written there)
    r"|[a-zA-Z0-9.\-]+\.(?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b/?(?!@))"  # ... and a host here, with its path
)
IF_MARKUP = re.compile(  # what html.parser reads as markup, and what bs4's .text leaves out
    r"<(script|style)\b[^<>]*>.*?</\1\s*>|<!--.*?-->|<[!?][^<>]*>|</?[a-zA-Z][^<>]*>", re.DOTALL
)
IF_DASHES = (  # the hyphen-minus and the Unicode dashes
    "\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40\u301c\u3030\u30a0"
    "\ufe31\ufe32\ufe58\ufe63\uff0d"
)
IF_FILE_TYPES = "png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4"
IF_STEPS_BEFORE_FIX = [(re.compile(pattern), replacement) for pattern, replacement in (
    (r"@\w+\b", ""),  # @handles
    (r"[\u31c0-\u9fff]+", ""),  # CJK strokes ... CJK unified ideographs (seven adjacent blocks)
    (f"[{IF_DASHES}]+", "-"),  # every kind of dash
    (r"[`´«»“”¨]", '"'),
    (r"[‘’]", "'"),
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IP addresses
    (r"\d:\d\d\s+$", ""),  # article ids at the end
    (r"\\n", " "),  # a written "\n"
    (r"#(?:\d{1,3}|\d{5,})\b", ""),  # "#123", "#12345..." (a four-digit "#1234" stays, as there)
    (r"\b\d{6,}\b", ""),  # long numbers
    (rf"\S+\.(?:{IF_FILE_TYPES})", ""),  # file names
    (r"[\"']{2,}", '"'),
    (r"\.{2,}", " "),
    (r"[#®•©™&@·º½¾¿¡§~)(\]\[}{|\\/*]+", " "),  # runs of symbols: ***SALE***, #tag
    (r"\s+\.\s+", " "),  # a lone " . "
)]  # fmt: skip
IF_STEPS_AFTER_FIX = [(re.compile(pattern), replacement) for pattern, replacement in (
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # product codes: jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (rf"\b(?:{IF_FILE_TYPES})(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # j2d1a2a...
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # sizes: 1920x1080 (Latin x, Cyrillic х, ×)
    (r"\b\s+\:\s+", ": "),
    (r"(\D[,\./])\b", r"\1 "),  # a space after , . / before a word
    (r"\s+", " "),  # (the reference then calls caption.strip() without keeping the result)
    (r"^[\"']([\w\W]+)[\"']$", r"\1"),  # quotes around the whole caption
    (r"^['_,\-:;]", ""),
    (r"['_,\-:+]$", ""),
    (r"^\.\S+$", ""),
)]  # fmt: skip
TERMINAL_ESCAPE = re.compile(r"\x1b\[[\d;]*[a-zA-Z]")
CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f\u206a-\u206f\ufeff\ufff9-\ufffc]")
FTFY_LIKE_CHARS = str.maketrans({
    **{c: "'" for c in "\u02bc\u2018\u2019\u201a\u201b"},  # curly single quotes
    **{c: '"' for c in "\u201c\u201d\u201e\u201f"},  # curly double quotes
    **{chr(c): unicodedata.normalize("NFKC", chr(c)) for c in range(0xFB00, 0xFB07)},  # ﬁ -> fi
    **{chr(c): chr(c - 0xFEE0) for c in range(0xFF01, 0xFF5F)},  # full-width ASCII
    "\u3000": " ",  # ideographic space
    "\u2028": "\n", "\u2029": "\n", "\x85": "\n",  # line and paragraph separators
})  # fmt: skip


def fix_text_like_ftfy(text: str) -> str:
    """The part of ftfy.fix_text that ordinary captions meet (see the note above)."""
    text = TERMINAL_ESCAPE.sub("", text).replace("\r\n", "\n").replace("\r", "\n")
    text = CONTROL_CHARS.sub("", text.translate(FTFY_LIKE_CHARS))
    return unicodedata.normalize("NFC", text)


def _clean_if_caption_once(caption: str) -> str:
    """One pass of T5Embedder.clean_caption."""
    caption = urllib.parse.unquote_plus(str(caption)).strip().lower()
    caption = caption.replace("<person>", "person")
    caption = IF_URL.sub("", IF_URL.sub("", caption))  # the reference runs two URL patterns
    caption = html.unescape(IF_MARKUP.sub("", caption))  # in place of BeautifulSoup(...).text
    for pattern, replacement in IF_STEPS_BEFORE_FIX:
        caption = pattern.sub(replacement, caption)
    if len(re.findall(r"[-_]", caption)) > 3:  # this-is-my-cute-cat, this_is_my_cute_cat
        caption = re.sub(r"[-_]", " ", caption)
    caption = html.unescape(html.unescape(fix_text_like_ftfy(caption))).strip()  # basic_clean
    for pattern, replacement in IF_STEPS_AFTER_FIX:
        caption = pattern.sub(replacement, caption)
    return caption.strip()


def clean_if_caption(caption: str) -> str:
    """DeepFloyd IF's caption clean-up, applied twice as T5Embedder.text_preprocessing does
    ("the exact text cleaning as was in the training stage")."""
    return _clean_if_caption_once(_clean_if_caption_once(caption))


def load_unconditional_embedding(path: str | Path) -> Tensor:
    """IF's released unconditional T5 embedding, resources/zero_t5-v1_1-xxl_vector.npy:
    (77, 4096) fp16, returned as fp32. Not zeros, despite the name."""
    array = numpy.load(Path(path), allow_pickle=False)
    return torch.from_numpy(array).float()


def _small_file_identity(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


class IFPromptEncoder:
    """Prompts -> DeepFloyd IF conditioning, as deep-floyd/IF T5Embedder.get_text_embeddings:
      "t5": (B, 77, 4096) T5 v1.1 XXL last_hidden_state, computed WITH the padding mask;
      "t5_mask": (B, 77) bool, True at the caption's tokens and its EOS.
    Captions are cleaned first (clean_if_caption) or, with clean_captions=False, lower-cased
    and stripped (IF's use_text_preprocessing=False). The IF UNet attends to all 77 states
    without a mask; the mask is returned for trainers that want it.

    An empty caption ("" or spaces) gets the unconditional embedding: the released
    zero_t5-v1_1-xxl_vector.npy when `unconditional_path` is given (what IF samples against
    when there is no negative prompt; its mask is all True, nothing in it is padding), else
    the encoding of "" (what diffusers' IF pipelines use). Caption dropout that encodes ""
    therefore trains against the same unconditional embedding that sampling uses."""

    def __init__(self, t5: TextEncoder, clean_captions: bool = True, unconditional_path: str | Path | None = None):
        if t5.kind != "t5":
            raise ValueError("IFPromptEncoder(t5): a T5 encoder")
        self.t5, self.clean_captions = t5, clean_captions
        self.unconditional_path = None if unconditional_path is None else Path(unconditional_path)
        self.unconditional_t5 = None
        if self.unconditional_path is not None:
            self.unconditional_t5 = load_unconditional_embedding(self.unconditional_path)
            expected = (t5.max_length, t5.model.config.d_model)
            if tuple(self.unconditional_t5.shape) != expected:
                raise ValueError(
                    f"{self.unconditional_path} holds a {tuple(self.unconditional_t5.shape)} embedding; this T5 "
                    f"gives {expected} (IF's zero_t5-v1_1-xxl_vector.npy is (77, 4096))"
                )

    def networks(self) -> dict[str, torch.nn.Module]:
        return {"t5": self.t5.model}

    @classmethod
    def load(cls, t5: str | Path, tokenizer: str | Path | None = None, unconditional_path: str | Path | None = None,
             clean_captions: bool = True, dtype: torch.dtype | None = None,
             device=None) -> "IFPromptEncoder":  # fmt: skip
        """T5 from an IF repository's text_encoder/ (tokenizer/ beside it), DeepFloyd/t5-v1_1-xxl
        or t5xxl_*.safetensors. IF runs it in bf16."""
        return cls(load_text_encoder("t5", t5, tokenizer, IF_T5_LENGTH, dtype, device), clean_captions,
                   unconditional_path)  # fmt: skip

    @property
    def identity(self) -> str:
        uncond = "encoded" if self.unconditional_path is None else _small_file_identity(self.unconditional_path)
        return f"if|{IF_RECIPE}|{self.t5.identity}|clean={self.clean_captions}|uncond={uncond}"

    def to(self, device) -> "IFPromptEncoder":
        self.t5.to(device)
        return self

    def preprocess(self, caption: str) -> str:
        return clean_if_caption(caption) if self.clean_captions else caption.lower().strip()

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids, mask = self.t5.tokenize([self.preprocess(p) for p in prompts])
        t5 = self.t5.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        mask = mask.bool()
        if self.unconditional_t5 is not None:
            empty = torch.tensor([not p.strip() for p in prompts], device=t5.device)
            t5 = torch.where(empty[:, None, None], self.unconditional_t5.to(t5.device), t5)
            mask = mask | empty[:, None]
        return {"t5": t5, "t5_mask": mask}

    def tokens_lost(self, caption: str) -> dict[str, int]:
        return {"t5": truncated_token_count(self.t5.tokenizer, self.preprocess(caption), self.t5.max_length)}


# ----------------------------------------------------------------------------- memory plan and placement

# The released encoders' shapes (for a memory plan made without the files): CLIP-L of OpenAI's
# ViT-L/14, OpenCLIP's bigG (its text tower), and T5-XXL v1.1's encoder.
RELEASED_CONFIGS = {
    "clip_l": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768),
    "clip_g": dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                   num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280),
    "t5": dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
               relative_attention_num_buckets=32, relative_attention_max_distance=128,
               feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0),
}
MODEL_CLASSES = {"clip_l": CLIPTextModel, "clip_g": CLIPTextModelWithProjection, "t5": T5EncoderModel}


def text_config(kind: str, path: str | Path = ""):
    """The config of a text encoder: from its file or folder when it exists (shapes only are
    read), else the released model's. kind: "clip_l", "clip_g" or "t5"."""
    path = Path(path) if path else None
    if path is not None and path.exists():
        if path.is_dir() and (path / "config.json").exists():
            fields = read_hf_config(path)
            return (T5Config if kind == "t5" else CLIPTextConfig)(**fields)
        sd = load_state_dict(path)  # memory-mapped: the header is read, no weight
        if kind == "t5":
            return infer_t5_config(t5_state_dict(sd))
        sd = clip_state_dict(sd) if kind == "clip_l" else clip_g_state_dict(sd)
        extra = {} if kind == "clip_l" else {"hidden_act": "gelu", "projection_dim": sd["text_projection.weight"].shape[0]}
        return infer_clip_config(sd, **extra)
    return (T5Config if kind == "t5" else CLIPTextConfig)(**RELEASED_CONFIGS[kind])


def build_text_model(kind: str, config) -> torch.nn.Module:
    """The encoder network on the current default device (meta for a plan), frozen."""
    return MODEL_CLASSES[kind](config).eval().requires_grad_(False)


def encoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """A text encoder's repeated layers (what streams through the device and goes to fp8)."""
    if isinstance(model, T5EncoderModel):
        return list(model.encoder.block)
    text_model = model.text_model if hasattr(model, "text_model") else model
    return list(text_model.encoder.layers)


def fp8_linears(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The Linear layers of an encoder's layers that can be stored in fp8. T5's feed-forward
    output `wo` stays in the compute dtype: transformers casts its input to wo's weight dtype
    (T5DenseGatedActDense.forward, for 8-bit weights kept in float32), which fp8 cannot take."""
    layers = [m for block in encoder_blocks(model) for m in block.modules() if isinstance(m, torch.nn.Linear)]
    if isinstance(model, T5EncoderModel):
        keep = {id(block.layer[-1].DenseReluDense.wo) for block in model.encoder.block}
        layers = [m for m in layers if id(m) not in keep]
    return layers
