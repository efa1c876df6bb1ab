"""SD3 / SD3.5, SDXL and DeepFloyd IF text conditioning (models/text.py) against independent code.

Tiny random encoders are written in the layouts the released files use: separate HF-keyed
clip_l / clip_g / t5xxl files, an SD3 all-in-one file (`text_encoders.*.transformer.`), an SDXL
file (CLIP-L under `conditioner.embedders.0.transformer.`, bigG in the OpenCLIP layout under
`conditioner.embedders.1.model.`) and a diffusers folder. Oracles:
  - transformers' own CLIPTextModel / CLIPTextModelWithProjection / T5EncoderModel, on the
    in-memory models that were saved, and loaded through diffusers' convert_open_clip_checkpoint;
  - Stability-AI/sd3.5 other_impls.py, vendored unchanged in tests/oracles/, for the SD3 recipe.
"""
import importlib.util
import json
from pathlib import Path

import numpy
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizerFast,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from models.text import (
    IFPromptEncoder,
    SD3PromptEncoder,
    SDXLPromptEncoder,
    TextEncoder,
    clean_if_caption,
    clip_g_state_dict,
    clip_window_ids,
    drop_encoder_parts,
    encode_clip,
    infer_clip_config,
    load_clip_g_model,
    load_clip_model,
    load_text_encoder,
    sd3_conditioning,
    truncated_token_count,
)

pytestmark = pytest.mark.usefixtures("one_thread")

LETTERS = "abcdefghijklmnopqrstuvwxyz"
PROMPTS = ["a photo of the cat", "the red car on the grass at night"]
CLIP_L = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
              hidden_act="quick_gelu")  # fmt: skip
CLIP_G = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
              hidden_act="gelu", projection_dim=128)  # square, as bigG's 1280 x 1280  # fmt: skip
T5 = dict(d_model=256, d_kv=32, num_heads=8, d_ff=64, num_layers=2, feed_forward_proj="gated-gelu",
          relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0)  # fmt: skip


def words(n: int, start: int = 0) -> str:
    """n one-letter words: n CLIP tokens (each is `x</w>`)."""
    return " ".join(LETTERS[(start + i) % 26] for i in range(n))


# ----------------------------------------------------------------------------- tiny tokenizers


def write_clip_tokenizer(folder: Path) -> int:
    """vocab.json + merges.txt: letters, letters ending a word, a few merges, BOS and EOS last
    (EOS is the largest id, as 49407 in the real vocabulary)."""
    folder.mkdir()
    vocab = {c: i for i, c in enumerate(LETTERS)}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate(LETTERS)})
    merges = ["p h", "ph o", "pho t", "phot o</w>", "c a", "ca t</w>", "o f</w>", "t h", "th e</w>", "r e", "re d</w>"]
    for merge in merges:
        vocab[merge.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def write_t5_tokenizer(folder: Path) -> int:
    """tokenizer.json, Unigram (<pad>=0, </s>=1, <unk>=2): a few whole words, then letters."""
    folder.mkdir()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"\u2581{w}", -1.0) for w in ("a", "photo", "of", "the", "cat", "red", "car", "on", "grass")]
    pieces += [("\u2581", -5.0)] + [(c, -5.0) for c in LETTERS]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    return tok.get_vocab_size()


# ----------------------------------------------------------------------------- tiny models and files


def randomize(model, seed):
    """Weights larger than the default init, rounded to fp16 values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.randn(p.shape, generator=gen) * 0.2).half().float())
    return model.eval().requires_grad_(False)


def hf_clip_keys(model) -> dict:
    """The released HF layout: `text_model.*` (+ `text_projection.weight`), whatever the
    transformers version keeps inside."""
    out = {}
    for key, value in model.state_dict().items():
        if not key.startswith(("text_model.", "text_projection.")):
            key = f"text_model.{key}"
        out[key] = value.contiguous()
    return out


def to_openclip(sd: dict) -> dict:
    """HF CLIP-G keys -> the OpenCLIP text tower of SDXL files, written independently of the
    loader (fused [q; k; v] in_proj, resblocks, ln_final, text_projection as x @ P)."""
    out = {
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].t().contiguous(),
        "logit_scale": torch.tensor(4.6052),
    }
    layers = {int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers.")}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}  # fmt: skip
    for i in sorted(layers):
        hf, oc = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd[f"{hf}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{oc}attn.in_proj_{kind}"] = torch.cat(qkv).contiguous()
            for hf_name, oc_name in names.items():
                out[f"{oc}{oc_name}.{kind}"] = sd[f"{hf}{hf_name}.{kind}"]
    return out


def clip_config(vocab, ids, **fields):
    return CLIPTextConfig(vocab_size=vocab, max_position_embeddings=77, bos_token_id=ids[0], eos_token_id=ids[1],
                          pad_token_id=ids[1], **fields)  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    clip_vocab = write_clip_tokenizer(root / "tokenizer")  # CLIP-L and CLIP-G share the vocabulary
    t5_vocab = write_t5_tokenizer(root / "tokenizer_3")
    ids = (clip_vocab - 2, clip_vocab - 1)
    clip_l = randomize(CLIPTextModel(clip_config(clip_vocab, ids, **CLIP_L)), seed=0)
    clip_g = randomize(CLIPTextModelWithProjection(clip_config(clip_vocab, ids, **CLIP_G)), seed=1)
    t5 = randomize(T5EncoderModel(T5Config(vocab_size=t5_vocab, **T5)), seed=2)
    l_sd, g_sd = hf_clip_keys(clip_l), hf_clip_keys(clip_g)
    t5_sd = {k: v.contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(l_sd, root / "clip_l.safetensors")
    save_file(g_sd, root / "clip_g.safetensors")
    save_file(t5_sd, root / "t5xxl.safetensors")
    clip_g.save_pretrained(root / "text_encoder_2")  # a diffusers folder: config.json + weights
    sd3 = {f"text_encoders.clip_l.transformer.{k}": v for k, v in l_sd.items()}
    sd3 |= {f"text_encoders.clip_g.transformer.{k}": v for k, v in g_sd.items()}
    sd3 |= {f"text_encoders.t5xxl.transformer.{k}": v for k, v in t5_sd.items()}
    sd3["model.diffusion_model.x_embedder.proj.weight"] = torch.zeros(8, 16, 2, 2)
    save_file(sd3, root / "sd3_all_in_one.safetensors")
    sdxl = {f"conditioner.embedders.0.transformer.{k}": v for k, v in l_sd.items()}
    sdxl["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77.0)[None]
    sdxl |= {f"conditioner.embedders.1.model.{k}": v for k, v in to_openclip(g_sd).items()}
    sdxl["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(8, 4, 3, 3)
    sdxl["first_stage_model.encoder.conv_in.weight"] = torch.zeros(8, 3, 3, 3)
    save_file(sdxl, root / "sdxl.safetensors")
    return {"root": root, "clip_l": clip_l, "clip_g": clip_g, "t5": t5}


def clip_tokenizer(files) -> CLIPTokenizerFast:
    return CLIPTokenizerFast.from_pretrained(str(files["root"] / "tokenizer"), local_files_only=True)


def t5_tokenizer(files) -> T5TokenizerFast:
    return T5TokenizerFast.from_pretrained(str(files["root"] / "tokenizer_3"), local_files_only=True)


def clip_ids(files, texts, pad_with_zero=False) -> torch.Tensor:
    """The tokenizer's own 77-token ids; CLIP-G's padding is 0 (open_clip, sd3.5 pad_with_end=False)."""
    batch = clip_tokenizer(files)(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids = batch.input_ids
    return ids.masked_fill(batch.attention_mask == 0, 0) if pad_with_zero else ids


def assert_same(ours, theirs):
    assert torch.equal(ours, theirs), f"max difference {(ours - theirs).abs().max().item():.3g}"


def sd3_encoder(files, t5=True, **kwargs) -> SD3PromptEncoder:
    root = files["root"]
    return SD3PromptEncoder.load(root / "clip_l.safetensors", root / "clip_g.safetensors",
                                 root / "t5xxl.safetensors" if t5 else None, clip_g_tokenizer=root / "tokenizer",
                                 dtype=torch.float32, **kwargs)  # fmt: skip


# ----------------------------------------------------------------------------- CLIP-G loading


def test_openclip_layout_matches_diffusers_conversion(files):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    checkpoint = load_file(files["root"] / "sdxl.safetensors")
    oracle = CLIPTextModelWithProjection(files["clip_g"].config).eval()
    converted = convert_open_clip_checkpoint(oracle, checkpoint, prefix="conditioner.embedders.1.model.")
    missing, unexpected = oracle.load_state_dict(converted, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    oracle.requires_grad_(False)

    ours = load_clip_g_model(files["root"] / "sdxl.safetensors", dtype=torch.float32)
    assert ours.config.hidden_act == "gelu" and ours.config.projection_dim == 128
    ids = clip_ids(files, PROMPTS, pad_with_zero=True)
    eos = clip_tokenizer(files).eos_token_id
    hidden, pooled, projected = encode_clip(ours, ids, eos)
    theirs = oracle(input_ids=ids, output_hidden_states=True)
    assert_same(hidden, theirs.hidden_states[-2])
    assert_same(projected, theirs.text_embeds)
    # and both equal the model that was written out
    original = files["clip_g"](input_ids=ids, output_hidden_states=True)
    assert_same(hidden, original.hidden_states[-2])
    assert_same(projected, original.text_embeds)


@pytest.mark.parametrize("name", ["clip_g.safetensors", "sd3_all_in_one.safetensors", "text_encoder_2"])
def test_clip_g_from_separate_file_sd3_section_and_folder(files, name):
    eos = files["clip_g"].config.eos_token_id
    ours = load_clip_g_model(files["root"] / name, dtype=torch.float32, eos_token_id=eos)
    ids = clip_ids(files, PROMPTS, pad_with_zero=True)
    hidden, pooled, projected = encode_clip(ours, ids, clip_tokenizer(files).eos_token_id)
    original = files["clip_g"](input_ids=ids, output_hidden_states=True)
    assert_same(hidden, original.hidden_states[-2])
    assert_same(projected, original.text_embeds)
    assert_same(pooled, original.last_hidden_state[torch.arange(2), (ids == ids.max()).int().argmax(-1)])


@pytest.mark.parametrize("name", ["sdxl.safetensors", "sd3_all_in_one.safetensors"])
def test_clip_l_from_sdxl_and_sd3_files(files, name):
    ours = load_clip_model(files["root"] / name, dtype=torch.float32, eos_token_id=files["clip_l"].config.eos_token_id)
    ids = clip_ids(files, PROMPTS)
    out = ours(input_ids=ids, output_hidden_states=True)
    original = files["clip_l"](input_ids=ids, output_hidden_states=True)
    assert_same(out.hidden_states[-2], original.hidden_states[-2])
    assert_same(out.pooler_output, original.pooler_output)


def test_full_size_clip_g_config_from_openclip_shapes():
    """bigG shapes on the meta device, through the OpenCLIP layout: the released configuration."""
    big_g = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                           num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                           projection_dim=1280)  # fmt: skip
    with torch.device("meta"):
        sd = hf_clip_keys(CLIPTextModelWithProjection(big_g))
    openclip = {f"conditioner.embedders.1.model.{k}": v for k, v in to_openclip(sd).items()}
    converted = clip_g_state_dict(openclip)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in sd.items()
                                                                  if not k.endswith("position_ids")}  # fmt: skip
    inferred = infer_clip_config(converted, hidden_act="gelu")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings"):  # fmt: skip
        assert getattr(inferred, key) == getattr(big_g, key), key


def test_clip_g_loader_rejects_a_clip_l_file(files):
    with pytest.raises(ValueError, match="missing \\['text_projection.weight'\\]"):
        load_clip_g_model(files["root"] / "clip_l.safetensors")


# ----------------------------------------------------------------------------- CLIP windows, truncation


def test_clip_window_ids_layout(files):
    tok = clip_tokenizer(files)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    captions = [words(160), words(80), words(75), "ab ab"]  # "a" inside a word is id 0, the CLIP-G pad
    ids = clip_window_ids(tok, captions, windows=2, pad_id=0)
    assert ids.shape == (4, 2, 77)
    assert (ids[:, :, 0] == bos).all()
    content = [tok(c, add_special_tokens=False).input_ids for c in captions]
    # a full window ends in EOS; a partial one is `BOS text EOS pad...`; an empty one `BOS EOS pad...`
    assert ids[0, 0].tolist() == [bos, *content[0][:75], eos] and ids[0, 1].tolist() == [bos, *content[0][75:150], eos]
    assert ids[1, 1].tolist() == [bos, *content[1][75:], eos] + [0] * 70
    assert ids[2, 1].tolist() == [bos, eos] + [0] * 75
    assert ids[3, 0, :6].tolist() == [bos, 0, 27, 0, 27, eos] and ids[3, 1].tolist() == [bos, eos] + [0] * 75
    # one window is the tokenizer's own truncation
    one = clip_window_ids(tok, captions, windows=1, pad_id=eos)[:, 0]
    assert_same(one, clip_ids(files, captions))


def test_truncated_token_count(files):
    clip, t5 = clip_tokenizer(files), t5_tokenizer(files)
    assert truncated_token_count(clip, words(80), 77) == 5  # 80 tokens, 75 fit between BOS and EOS
    assert truncated_token_count(clip, words(75), 77) == 0
    assert truncated_token_count(clip, words(160), 152) == 10  # SDXL max_token_length 150
    t5_tokens = len(t5(words(100)).input_ids)  # with EOS
    assert truncated_token_count(t5, words(100), 77) == t5_tokens - 77 > 0
    assert truncated_token_count(t5, "a cat", 77) == 0
    encoder = sd3_encoder(files)
    assert encoder.tokens_lost(words(80)) == {"clip_l": 5, "clip_g": 5, "t5": len(t5(words(80)).input_ids) - 77}


# ----------------------------------------------------------------------------- SD3


def load_reference_impls():
    path = Path(__file__).parent / "oracles" / "sd3_other_impls.py"
    spec = importlib.util.spec_from_file_location("sd3_other_impls", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def clip_fields(config) -> dict:
    """A CLIP config as sd3_infer's CLIPL_CONFIG / CLIPG_CONFIG dicts."""
    keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "hidden_act")
    return {k: getattr(config, k) for k in keys}


def reference_models(files, ref):
    """sd3.5's own SDClipModel (ClipL settings), SDXLClipG and T5XXLModel with the test weights."""
    with torch.no_grad():  # their constructors fill text_projection in place
        clip_l = ref.SDClipModel(layer="hidden", layer_idx=-2, dtype=torch.float32, layer_norm_hidden_state=False,
                                 return_projected_pooled=False,
                                 textmodel_json_config=clip_fields(files["clip_l"].config))  # sd3_infer.ClipL
        clip_g = ref.SDXLClipG(clip_fields(files["clip_g"].config), dtype=torch.float32)
        t5_keys = ("d_ff", "d_model", "num_heads", "num_layers", "vocab_size")
        t5_fields = {k: getattr(files["t5"].config, k) for k in t5_keys}
        t5 = ref.T5XXLModel(t5_fields, dtype=torch.float32)
    for model, source in ((clip_l, files["clip_l"]), (clip_g, files["clip_g"])):
        vocab, width = source.config.vocab_size, source.config.hidden_size
        model.transformer.text_model.embeddings.token_embedding = torch.nn.Embedding(vocab, width)  # theirs: 49408
        missing, unexpected = model.transformer.load_state_dict(hf_clip_keys(source), strict=False)
        assert not unexpected and set(missing) <= {"text_projection.weight"}, (missing, unexpected)
    missing, unexpected = t5.transformer.load_state_dict(files["t5"].state_dict(), strict=False)
    assert not missing and set(unexpected) == {"shared.weight"}, (missing, unexpected)
    return clip_l, clip_g, t5


def reference_get_cond(ref, tokenizers, encoders, prompt):
    """sd3_infer.SD3Inferencer.get_cond, on the tiny models (T5 width instead of 4096)."""
    clip_l_tok, clip_g_tok, t5_tok = tokenizers
    tokens = {"l": clip_l_tok.tokenize_with_weights(prompt), "g": clip_g_tok.tokenize_with_weights(prompt),
              "t5xxl": t5_tok.tokenize_with_weights(prompt[:226])}  # as SD3Tokenizer  # fmt: skip
    l_out, l_pooled = encoders[0].encode_token_weights(tokens["l"])
    g_out, g_pooled = encoders[1].encode_token_weights(tokens["g"])
    t5_out, _ = encoders[2].encode_token_weights(tokens["t5xxl"])
    lg_out = torch.cat([l_out, g_out], dim=-1)
    lg_out = torch.nn.functional.pad(lg_out, (0, t5_out.shape[-1] - lg_out.shape[-1]))
    return torch.cat([lg_out, t5_out], dim=-2), torch.cat((l_pooled, g_pooled), dim=-1)


def test_sd3_matches_reference_implementation(files):
    ref = load_reference_impls()
    clip_tok, t5_tok = clip_tokenizer(files), t5_tokenizer(files)
    tokenizers = (ref.SDTokenizer(tokenizer=clip_tok), ref.SDXLClipGTokenizer(clip_tok),
                  ref.SDTokenizer(pad_with_end=False, tokenizer=t5_tok, has_start_token=False,
                                  pad_to_max_length=False, max_length=99999999,
                                  min_length=77))  # the arguments of T5XXLTokenizer  # fmt: skip
    encoders = reference_models(files, ref)
    prompts = PROMPTS + [words(30)]  # T5 under 77 tokens: the reference never truncates
    context, pooled = sd3_conditioning(sd3_encoder(files).encode(prompts))
    assert context.shape == (3, 154, 256) and pooled.shape == (3, 256)
    for i, prompt in enumerate(prompts):
        ref_context, ref_pooled = reference_get_cond(ref, tokenizers, encoders, prompt)
        torch.testing.assert_close(context[i : i + 1], ref_context, rtol=0, atol=1e-5)  # measured 1.4e-6
        torch.testing.assert_close(pooled[i : i + 1], ref_pooled, rtol=0, atol=1e-5)  # measured 2.4e-7


def transformers_sd3(files, prompts, t5_length=77):
    """The reference recipe recomputed directly on transformers' models."""
    l_ids, g_ids = clip_ids(files, prompts), clip_ids(files, prompts, pad_with_zero=True)
    l_out = files["clip_l"](input_ids=l_ids, output_hidden_states=True)
    g_out = files["clip_g"](input_ids=g_ids, output_hidden_states=True)
    t5_ids = t5_tokenizer(files)(prompts, padding="max_length", max_length=t5_length, truncation=True,
                                 return_tensors="pt").input_ids  # fmt: skip
    t5 = files["t5"](input_ids=t5_ids).last_hidden_state
    lg = torch.cat([l_out.hidden_states[-2], g_out.hidden_states[-2]], dim=-1)
    context = torch.cat([torch.nn.functional.pad(lg, (0, t5.shape[-1] - lg.shape[-1])), t5], dim=1)
    return context, torch.cat([l_out.pooler_output, g_out.text_embeds], dim=-1)


def test_sd3_matches_transformers_recipe_and_t5_length(files):
    for t5_length in (77, 96):
        encoder = sd3_encoder(files, t5_length=t5_length)
        parts = encoder.encode(PROMPTS)
        assert {k: tuple(v.shape) for k, v in parts.items()} == {
            "clip_l": (2, 77, 128), "clip_g": (2, 77, 128), "clip_l_pooled": (2, 128), "clip_g_pooled": (2, 128),
            "t5": (2, t5_length, 256)}  # fmt: skip
        assert all(v.dtype == torch.float32 for v in parts.values())
        context, pooled = sd3_conditioning(parts)
        ref_context, ref_pooled = transformers_sd3(files, PROMPTS, t5_length)
        assert context.shape == (2, 77 + t5_length, 256)
        assert_same(context, ref_context)
        assert_same(pooled, ref_pooled)
    # the all-in-one file gives the same parts
    root = files["root"]
    aio = root / "sd3_all_in_one.safetensors"
    single = SD3PromptEncoder.load(aio, aio, aio, root / "tokenizer", root / "tokenizer", root / "tokenizer_3",
                                   dtype=torch.float32).encode(PROMPTS)  # fmt: skip
    for name, value in sd3_encoder(files).encode(PROMPTS).items():
        assert_same(single[name], value)


def test_sd3_full_width_shapes(files):
    """Released widths (CLIP-L 768, CLIP-G 1280, T5 4096) with thin layers."""
    clip_tok = clip_tokenizer(files)
    vocab, ids = len(clip_tok), (clip_tok.bos_token_id, clip_tok.eos_token_id)
    clip_l = randomize(CLIPTextModel(clip_config(vocab, ids, hidden_size=768, intermediate_size=32,
                                                 num_hidden_layers=2, num_attention_heads=12)), seed=3)  # fmt: skip
    clip_g = randomize(CLIPTextModelWithProjection(clip_config(vocab, ids, hidden_size=1280, intermediate_size=32,
                       num_hidden_layers=2, num_attention_heads=20, projection_dim=1280)), seed=4)  # fmt: skip
    t5_config = T5Config(vocab_size=len(t5_tokenizer(files)), d_model=4096, d_kv=8, num_heads=2, d_ff=16, num_layers=1)
    t5 = TextEncoder("t5", randomize(T5EncoderModel(t5_config), seed=5), t5_tokenizer(files), 77, "t5")
    encoders = [TextEncoder("clip", clip_l, clip_tok, 77, "l"), TextEncoder("clip_g", clip_g, clip_tok, 77, "g")]
    context, pooled = sd3_conditioning(SD3PromptEncoder(*encoders, t5).encode(PROMPTS))
    assert context.shape == (2, 154, 4096) and pooled.shape == (2, 2048)
    assert (context[:, :77, 2048:] == 0).all() and context[:, :77, :2048].abs().min(dim=-1).values.gt(0).all()
    no_t5 = SD3PromptEncoder(*encoders).encode(PROMPTS)
    assert "t5" not in no_t5
    context, pooled = sd3_conditioning(no_t5)  # the reference's zero T5
    assert context.shape == (2, 154, 4096) and pooled.shape == (2, 2048)
    assert (context[:, 77:] == 0).all()


def test_sd3_without_t5(files):
    encoder = sd3_encoder(files, t5=False)
    parts = encoder.encode(PROMPTS)
    assert set(parts) == {"clip_l", "clip_g", "clip_l_pooled", "clip_g_pooled"}
    context, pooled = sd3_conditioning(parts)
    assert context.shape == (2, 154, 4096) and pooled.shape == (2, 256)
    ref_context, ref_pooled = transformers_sd3(files, PROMPTS)
    assert_same(context[:, :77, :256], ref_context[:, :77, :256])
    assert (context[:, :77, 256:] == 0).all() and (context[:, 77:] == 0).all()
    assert_same(pooled, ref_pooled)
    assert "t5=none" in encoder.identity and encoder.identity != sd3_encoder(files).identity


def test_sd3_per_encoder_dropout(files):
    parts = sd3_encoder(files).encode(PROMPTS * 4)  # a batch of 8
    before = {k: v.clone() for k, v in parts.items()}
    all_l = drop_encoder_parts(parts, {"clip_l": 1.0}, torch.Generator().manual_seed(0))
    assert (all_l["clip_l"] == 0).all() and (all_l["clip_l_pooled"] == 0).all()
    for name in ("clip_g", "clip_g_pooled", "t5"):
        assert_same(all_l[name], parts[name])
    for name, value in before.items():  # pure: the input is untouched
        assert_same(parts[name], value)
    context, pooled = sd3_conditioning(all_l)
    assert (context[:, :77, :128] == 0).all() and (pooled[:, :128] == 0).all() and pooled[:, 128:].abs().sum() > 0

    rates = {"clip_l": 0.5, "clip_g": 0.5, "t5": 0.5}
    once = drop_encoder_parts(parts, rates, torch.Generator().manual_seed(1))
    again = drop_encoder_parts(parts, rates, torch.Generator().manual_seed(1))
    for name in parts:
        assert_same(once[name], again[name])
    for name in ("clip_l", "clip_g", "t5"):
        dropped = (once[name] == 0).flatten(1).all(dim=1)
        assert 0 < dropped.sum() < 8, name  # some samples dropped, not all (seed 1)
        kept = ~dropped
        assert_same(once[name][kept], parts[name][kept])
    # a rate of one encoder does not move the draws of the others
    only_t5 = drop_encoder_parts(parts, {"clip_l": 0.5, "clip_g": 0.5, "t5": 0.0}, torch.Generator().manual_seed(1))
    assert_same(only_t5["clip_l"], once["clip_l"])
    assert_same(only_t5["t5"], parts["t5"])
    masks = drop_encoder_parts({"t5": parts["t5"], "t5_mask": torch.ones(8, 77, dtype=torch.bool)}, {"t5": 1.0},
                               torch.Generator())  # fmt: skip
    assert not masks["t5_mask"].any()
    with pytest.raises(ValueError, match="unknown encoders \\['clip_x'\\]"):
        drop_encoder_parts(parts, {"clip_x": 0.1}, torch.Generator())
    batch = {"caption": ["x"] * 8, **parts}  # other entries of a batch pass through untouched
    assert drop_encoder_parts(batch, {"clip_g": 1.0}, torch.Generator())["caption"] is batch["caption"]
    with pytest.raises(ValueError, match="none of the encoder outputs"):
        drop_encoder_parts({"context": parts["t5"]}, {"t5": 0.5}, torch.Generator())


def test_sd3_identity_and_dtype(files):
    base = sd3_encoder(files)
    assert base.identity == sd3_encoder(files).identity
    others = [sd3_encoder(files, t5_length=96).identity, sd3_encoder(files, t5=False).identity]
    root = files["root"]
    bf16 = SD3PromptEncoder.load(root / "clip_l.safetensors", root / "clip_g.safetensors", root / "t5xxl.safetensors",
                                 clip_g_tokenizer=root / "tokenizer", dtype=torch.bfloat16)  # fmt: skip
    others.append(bf16.identity)
    assert len({base.identity, *others}) == 4
    assert all(v.dtype == torch.float32 for v in bf16.to("cpu").encode(PROMPTS).values())


# ----------------------------------------------------------------------------- SDXL


def sdxl_encoder(files, **kwargs) -> SDXLPromptEncoder:
    path = files["root"] / "sdxl.safetensors"
    return SDXLPromptEncoder.load(path, path, files["root"] / "tokenizer", files["root"] / "tokenizer",
                                  dtype=torch.float32, **kwargs)  # fmt: skip


def by_hand_windows(files, captions, windows):
    """Each window's text encoded by the oracles as its own 77-token caption (one-letter words
    are one token each, so window k is words k*75 .. k*75+74)."""
    texts = [" ".join(c.split()[k * 75 : (k + 1) * 75]) for c in captions for k in range(windows)]
    l_out = files["clip_l"](input_ids=clip_ids(files, texts), output_hidden_states=True)
    g_out = files["clip_g"](input_ids=clip_ids(files, texts, pad_with_zero=True), output_hidden_states=True)
    hidden = torch.cat([l_out.hidden_states[-2], g_out.hidden_states[-2]], dim=-1)
    return hidden.reshape(len(captions), windows, 77, -1), g_out.text_embeds.reshape(len(captions), windows, -1)[:, 0]


def test_sdxl_150_tokens_in_75_token_windows(files):
    captions = [words(150), words(80, start=3), words(12, start=7)]
    encoder = sdxl_encoder(files, max_token_length=150)
    out = encoder.encode(captions)
    assert out["context"].shape == (3, 154, 256) and out["pooled"].shape == (3, 128)
    windows, pooled = by_hand_windows(files, captions, 2)
    assert_same(out["context"], windows.flatten(1, 2))  # window 0 then window 1, each whole
    assert_same(out["pooled"], pooled)  # window 0's pooled output
    kohya = sdxl_encoder(files, max_token_length=150, join="kohya").encode(captions)
    assert kohya["context"].shape == (3, 152, 256)
    expected = torch.cat([windows[:, 0, :1], windows[:, 0, 1:76], windows[:, 1, 1:76], windows[:, 1, 76:]], dim=1)
    assert_same(kohya["context"], expected)
    assert encoder.tokens_lost(words(160)) == {"clip_l": 10, "clip_g": 10}
    identities = {encoder.identity, sdxl_encoder(files).identity}
    identities.add(sdxl_encoder(files, max_token_length=150, join="kohya").identity)
    assert len(identities) == 3


def test_sdxl_one_window_is_the_reference_conditioner(files):
    out = sdxl_encoder(files).encode(PROMPTS)
    assert out["context"].shape == (2, 77, 256)
    l_out = files["clip_l"](input_ids=clip_ids(files, PROMPTS), output_hidden_states=True)
    g_out = files["clip_g"](input_ids=clip_ids(files, PROMPTS, pad_with_zero=True), output_hidden_states=True)
    assert_same(out["context"], torch.cat([l_out.hidden_states[-2], g_out.hidden_states[-2]], dim=-1))
    assert_same(out["pooled"], g_out.text_embeds)
    with pytest.raises(ValueError, match="max_token_length must be one of \\(75, 150, 225\\), not 100"):
        sdxl_encoder(files, max_token_length=100)
    with pytest.raises(ValueError, match="join must be 'concat' or 'kohya', not 'middle'"):
        sdxl_encoder(files, join="middle")


# ----------------------------------------------------------------------------- DeepFloyd IF

# Inputs and what deep-floyd/IF's T5Embedder.text_preprocessing (clean_caption twice, with ftfy
# 6.3.1 and beautifulsoup4 4.15.0) returns for them.
IF_CLEANED = [
    ("A photo of a cat", "a photo of a cat"),
    ("<b>Hello</b> World! https://www.example.com/foo @user visit site.com/x #123 ***SALE***",
     'hello world! visit sale'),
    ("a cat.jpg on a mat...", "a on a mat"),
    ("this-is-my-cute-cat", "this is my cute cat"),
    ("“Quoted” text — with ‘dashes’ – and more", '"quoted" text - with \'dashes\' - and more'),
    ("Free shipping worldwide! Click for details", "worldwide!"),
    ("Image 1920x1080 px, page 3", "image px"),
    ("product jc6640 and jc6640vc and 6640vc231 and j2d1a2a3", "product and and and"),
    ("IP 192.168.0.1 address", "ip address"),
    ("#1234 and #12 and #123456", "1234 and and"),  # "#" goes with the symbols
    ("&quot;quoted&quot; &amp; ampersand", '"quoted" ampersand'),
    ("'whole caption quoted'", "whole caption quoted"),
    ("漢字 and かな mixed 中文", "and かな mixed"),
    ("ﬁne ligature and ＦＵＬＬＷＩＤＴＨ text", "fine ligature and fullwidth text"),
    ("<!-- comment -->visible <br/> text", "visible text"),
    ("<script>alert(1)</script>text", "text"),
    ("a,b and c.d", "a, b and c. d"),
    ("\"\"\"AUSVERKAUFT\"\"\"", "ausverkauft"),
]  # fmt: skip


@pytest.mark.parametrize("caption, cleaned", IF_CLEANED)
def test_if_caption_cleanup(caption, cleaned):
    assert clean_if_caption(caption) == cleaned


def if_encoder(files, **kwargs) -> IFPromptEncoder:
    return IFPromptEncoder.load(files["root"] / "t5xxl.safetensors", dtype=torch.float32, **kwargs)


def test_if_t5_mask_and_77_tokens(files):
    captions = ["A Photo of the CAT https://cats.com/x", words(100)]
    out = if_encoder(files).encode(captions)
    assert out["t5"].shape == (2, 77, 256) and out["t5_mask"].dtype == torch.bool
    batch = t5_tokenizer(files)(["a photo of the cat", words(100)], padding="max_length", max_length=77,
                                truncation=True, return_tensors="pt")  # fmt: skip
    assert torch.equal(out["t5_mask"], batch.attention_mask.bool()) and out["t5_mask"][1].all()
    expected = files["t5"](input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    assert_same(out["t5"], expected)
    unmasked = files["t5"](input_ids=batch.input_ids).last_hidden_state
    assert (out["t5"][0] - unmasked[0]).abs().max() > 1e-3  # the mask matters for a short caption
    raw = if_encoder(files, clean_captions=False)
    assert raw.preprocess("  A B  ") == "a b" and raw.identity != if_encoder(files).identity
    lost = truncated_token_count(t5_tokenizer(files), words(100), 77)
    assert lost > 0 and if_encoder(files).tokens_lost(words(100)) == {"t5": lost}


def test_if_unconditional_embedding(files, tmp_path):
    released = torch.randn(77, 256).half()
    path = tmp_path / "zero_t5-v1_1-xxl_vector.npy"
    numpy.save(path, released.numpy())
    encoder = if_encoder(files, unconditional_path=path)
    out = encoder.encode(["a cat", "", "  "])
    assert_same(out["t5"][1], released.float())
    assert_same(out["t5"][2], released.float())
    assert out["t5_mask"][1:].all()
    assert_same(out["t5"][:1], if_encoder(files).encode(["a cat"])["t5"])
    # without the file, "" is encoded like any caption (diffusers' choice)
    plain = if_encoder(files).encode([""])
    assert plain["t5_mask"][0].sum() == 1 and (plain["t5"][0] - released.float()).abs().max() > 0.1
    assert encoder.identity != if_encoder(files).identity
    numpy.save(tmp_path / "wrong.npy", numpy.zeros((77, 4096), dtype=numpy.float16))
    with pytest.raises(ValueError, match=r"holds a \(77, 4096\) embedding; this T5 gives \(77, 256\)"):
        if_encoder(files, unconditional_path=tmp_path / "wrong.npy")


def test_tokenizers_found_in_diffusers_folders(files, tmp_path):
    """IF's text_encoder/ + tokenizer/ (T5), SD3's text_encoder_3/ + tokenizer_3/, SDXL's text_encoder_2/."""
    from models.text import find_tokenizer

    t5_json = (files["root"] / "tokenizer_3" / "tokenizer.json").read_bytes()
    for repo, folder in (("if", "tokenizer"), ("sd3", "tokenizer_3")):
        (tmp_path / repo / folder).mkdir(parents=True)
        (tmp_path / repo / folder / "tokenizer.json").write_bytes(t5_json)
        (tmp_path / repo / folder.replace("tokenizer", "text_encoder")).mkdir()
    (tmp_path / "sd3" / "tokenizer").mkdir()  # SD3's CLIP-L tokenizer/ is passed over for T5
    (tmp_path / "sd3" / "tokenizer" / "tokenizer.json").write_bytes(t5_json)
    assert find_tokenizer(tmp_path / "if" / "text_encoder", "t5") == tmp_path / "if" / "tokenizer"
    assert find_tokenizer(tmp_path / "sd3" / "text_encoder_3", "t5") == tmp_path / "sd3" / "tokenizer_3"
    assert find_tokenizer(files["root"] / "text_encoder_2", "clip_g") == files["root"] / "tokenizer"
    assert find_tokenizer(files["root"] / "t5xxl.safetensors", "t5") == files["root"] / "tokenizer_3"
    encoder = load_text_encoder("clip_g", files["root"] / "clip_g.safetensors", dtype=torch.float32)
    assert encoder.kind == "clip_g" and encoder.identity.startswith("clip_g|")
