"""Text encoders on transformers' model classes, loaded from the files people have.

FLUX.1 conditions on two encoders (black-forest-labs/flux: src/flux/modules/conditioner.py):
  - T5-XXL v1.1 encoder: `last_hidden_state`, (B, 512, 4096) for dev, (B, 256, 4096) for schnell,
    prompts padded to max_length and, in the reference, no attention mask;
  - CLIP-L text model: `pooler_output`, (B, 768) = the final-LayerNorm'd EOS token, not projected,
    from 77 tokens with truncation.

The weights come as
  - single files: `clip_l.safetensors` (HF keys `text_model.*`), `t5xxl_fp16.safetensors`,
    `t5xxl_fp8_e4m3fn.safetensors` (HF keys `shared.weight`, `encoder.block.N.layer...`), or the
    same keys under a ComfyUI / LDM prefix such as `text_encoders.clip_l.transformer.`;
  - Hugging Face folders: config.json + model.safetensors (or shards with an index).
A single file has no config: widths, layer counts, vocabulary and head counts are read from the
tensor shapes, and what shapes cannot tell (activation, epsilon, CLIP head width) is a known
constant of the released models.

The model is built on the meta device and the file's tensors are assigned into it
(models.loading.load_into), so a 9.5 GB T5 file is never held twice.

Tokenizers are read from disk only (local_files_only): a folder or a tokenizer.json the caller
names, or one found next to the weights (see `find_tokenizer`).
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizerFast, T5Config, T5EncoderModel, T5TokenizerFast

from .loading import check_family, file_identity, load_into, load_state_dict

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

MISSING_TOKENIZER_HELP = {
    "clip": (
        "CLIP-L tokenizer: a folder with vocab.json and merges.txt (or tokenizer.json), as in "
        "black-forest-labs/FLUX.1-dev `tokenizer/` or openai/clip-vit-large-patch14 (top level)"
    ),
    "t5": (
        "T5 tokenizer: a folder with tokenizer.json (or spiece.model), as in "
        "black-forest-labs/FLUX.1-dev `tokenizer_2/` or google/t5-v1_1-xxl (top level)"
    ),
}
# Where a tokenizer is looked for next to the weights: the diffusers folder names used by
# FLUX.1-dev (text_encoder/ + tokenizer/, text_encoder_2/ + tokenizer_2/).
TOKENIZER_SUBFOLDERS = {"clip": "tokenizer", "t5": "tokenizer_2"}
TOKENIZER_CLASSES = {"clip": CLIPTokenizerFast, "t5": T5TokenizerFast}
TOKENIZER_MODEL_TYPE = {"clip": "BPE", "t5": "Unigram"}  # "model.type" inside tokenizer.json


# ----------------------------------------------------------------------------- state dicts


def strip_known_prefix(sd: dict, prefixes: tuple[str, ...]) -> dict:
    """Keep only the keys under the first prefix found, without it; otherwise return sd as is."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


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
    sd = strip_known_prefix(sd, CLIP_PREFIXES)
    sd = drop_keys(sd, CLIP_EXTRA_PREFIXES)
    # Old LDM checkpoints and transformers>=5 saves lack the `text_model.` level.
    if not any(k.startswith("text_model.") for k in sd) and any(k.startswith("embeddings.") for k in sd):
        sd = {f"text_model.{k}": v for k, v in sd.items()}
    # position_ids is arange(77): rebuilt after loading, never read from a file (some SD-era
    # files store it as floats or with wrong values).
    return {k: v for k, v in sd.items() if not k.endswith("position_ids")}


def t5_state_dict(sd: dict, dtype: torch.dtype | None = None) -> dict:
    """A T5 encoder state dict in the HF layout with `shared.weight` as the token embedding."""
    sd = strip_known_prefix(sd, T5_PREFIXES)
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


def load_clip_model(path: str | Path, dtype=None, device=None, **config_overrides) -> CLIPTextModel:
    """CLIPTextModel from a single file (config from shapes) or an HF folder (its config.json)."""
    path = Path(path)
    sd = clip_state_dict(load_state_dict(path))
    required = ("text_model.embeddings.token_embedding.weight", "text_model.final_layer_norm.weight")
    check_family(sd, "clip", required=required)
    if path.is_dir() and (path / "config.json").exists():
        config = CLIPTextConfig(**{**read_hf_config(path), **config_overrides})
    else:
        config = infer_clip_config(sd, **config_overrides)
    model = _build_and_load(CLIPTextModel, config, sd, dtype, device, what=f"CLIP text encoder {path}")
    # position_ids is a non-persistent buffer: not in the state dict, so still on the meta
    # device after loading. It is arange(max positions), rebuilt here.
    embeddings = model.text_model.embeddings if hasattr(model, "text_model") else model.embeddings
    positions = torch.arange(config.max_position_embeddings, device=embeddings.token_embedding.weight.device)
    embeddings.position_ids = positions.expand(1, -1)
    return model


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
    if kind == "clip":
        return (folder / "vocab.json").exists() and (folder / "merges.txt").exists()
    return (folder / "spiece.model").exists()


def find_tokenizer(weights: str | Path, kind: str, tokenizer: str | Path | None = None) -> Path:
    """The tokenizer folder or tokenizer.json for weights at `weights`.

    Looked for, in order: the path the caller gives; the weights folder itself (an HF folder);
    `tokenizer/` (CLIP) or `tokenizer_2/` (T5) beside the weights file or folder; the folder
    that holds a weights file. A tokenizer.json counts only if its model is BPE (CLIP) or
    Unigram (T5), so that the CLIP encoder never picks up T5's tokenizer or the reverse."""
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
    candidates.append(base / TOKENIZER_SUBFOLDERS[kind])
    if weights.is_file():
        candidates.append(base)
    for folder in candidates:
        if _holds_tokenizer(folder, kind):
            return folder
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"no {kind.upper()} tokenizer found for {weights} (looked in: {looked}).\n"
        f"Put the {MISSING_TOKENIZER_HELP[kind]}, into `{base / TOKENIZER_SUBFOLDERS[kind]}`, "
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

    kind: str  # "clip" or "t5"
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
    """Load a CLIP-L ("clip") or T5 ("t5") encoder and its tokenizer from local files."""
    if kind not in ("clip", "t5"):
        raise ValueError(f"kind must be 'clip' or 't5', not {kind!r}")
    weights = Path(weights)
    tokenizer_path = find_tokenizer(weights, kind, tokenizer)  # fail before reading gigabytes
    tok = load_tokenizer(tokenizer_path, kind)
    if kind == "clip":
        if not (weights.is_dir() and (weights / "config.json").exists()):
            # The pooled output is read at the tokenizer's EOS token; the file has no config.
            config_overrides = {"eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id, **config_overrides}
        model = load_clip_model(weights, dtype=dtype, device=device, **config_overrides)
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

    def encode_t5(self, prompts: list[str]) -> tuple[Tensor, Tensor | None]:
        ids, mask = self.t5.tokenize(prompts)
        mask = mask if self.apply_t5_attn_mask else None
        hidden = self.t5.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden, mask

    def encode_clip(self, prompts: list[str]) -> Tensor:
        ids, _ = self.clip.tokenize(prompts)  # CLIP runs without a mask: causal attention only
        return self.clip.model(input_ids=ids, attention_mask=None).pooler_output

    def __call__(self, prompts: list[str]) -> FluxConditioning:
        if isinstance(prompts, str):
            prompts = [prompts]
        t5, mask = self.encode_t5(prompts)
        return FluxConditioning(t5=t5, clip_pooled=self.encode_clip(prompts), t5_mask=mask)
