"""models/text.py against transformers' own CLIPTextModel / T5EncoderModel.

Tiny random encoders are written to disk in each layout users have (single file with HF keys,
ComfyUI-prefixed file, fp16, fp8 and scaled-fp8 files, HF folder with config.json); tiny
tokenizers are built offline. Our loaders must give the outputs that transformers gives when it
loads the same weights itself (`from_pretrained` on an HF folder).
"""
import json
import os

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizerFast, T5Config, T5EncoderModel, T5TokenizerFast

from models.text import (
    FluxTextEncoder,
    find_tokenizer,
    load_clip_model,
    load_t5_model,
    load_text_encoder,
)

PROMPTS = ["a photo of the cat", "a red car in the street at sunset on the grass"]
FP8 = torch.float8_e4m3fn
LINEAR_WEIGHTS = tuple(f".{name}.weight" for name in ("q", "k", "v", "o", "wi_0", "wi_1", "wo"))


# ----------------------------------------------------------------------------- tiny tokenizers


def write_clip_tokenizer(folder):
    """vocab.json + merges.txt, the files of FLUX.1-dev `tokenizer/` (byte-level BPE, `</w>`)."""
    folder.mkdir()
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": len(letters) + i for i, c in enumerate(letters)})
    merges = ["p h", "ph o", "pho t", "phot o</w>", "c a", "ca t</w>", "o f</w>", "t h", "th e</w>"]
    for merge in merges:
        vocab[merge.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def write_t5_tokenizer(folder):
    """tokenizer.json with a Unigram model, as in FLUX.1-dev `tokenizer_2/` (<pad>=0, </s>=1)."""
    folder.mkdir()
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=60, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tok.train_from_iterator(PROMPTS + ["a painting of mountains", "the dog on the grass"], trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    return tok.get_vocab_size()


# ----------------------------------------------------------------------------- tiny models


def randomize(model, seed):
    """Weights larger than the default init, rounded to fp16 so fp16 and fp32 files agree."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.randn(p.shape, generator=gen) * 0.2).half().float())
    return model


def released_clip_keys(sd):
    """The key layout of clip_l.safetensors and FLUX.1-dev text_encoder/: `text_model.*`."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v.contiguous() for k, v in sd.items()}


def write_hf_folder(model, folder, sd):
    """config.json from transformers, weights as the released files store them."""
    model.save_pretrained(folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


def quantize_fp8_scaled(sd):
    """ComfyUI scaled fp8: per Linear weight/scale in e4m3fn plus the scale (and scale_input)."""
    out, reference = {"scaled_fp8": torch.empty(0, dtype=FP8)}, {}
    for key, w in sd.items():
        if key.endswith(LINEAR_WEIGHTS):
            scale = w.abs().max() / 448.0
            q = (w / scale).to(FP8)
            out[key], out[key[:-6] + "scale_weight"] = q, scale.reshape(())
            out[key[:-6] + "scale_input"] = torch.ones(())
            reference[key] = q.float() * scale
        else:
            out[key] = w.to(FP8)
            reference[key] = out[key].float()
    return out, reference


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    clip_vocab = write_clip_tokenizer(root / "tokenizer")
    write_t5_tokenizer(root / "tokenizer_2")
    clip_tok = CLIPTokenizerFast.from_pretrained(str(root / "tokenizer"), local_files_only=True)

    clip_config = CLIPTextConfig(
        vocab_size=clip_vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="quick_gelu",
        eos_token_id=clip_tok.eos_token_id, bos_token_id=clip_tok.bos_token_id, pad_token_id=clip_tok.pad_token_id,
    )  # fmt: skip
    clip = randomize(CLIPTextModel(clip_config), seed=0)
    clip_sd = released_clip_keys(clip.state_dict())
    write_hf_folder(clip, root / "text_encoder", clip_sd)
    extras = {"text_projection.weight": torch.randn(128, 128), "logit_scale": torch.tensor(4.6)}
    extras["text_model.embeddings.position_ids"] = torch.arange(77.0)[None]  # stored as floats by old tools
    save_file({**clip_sd, **extras}, root / "clip_l.safetensors")
    comfy = {f"text_encoders.clip_l.transformer.{k}": v for k, v in clip_sd.items()}
    comfy["model.diffusion_model.img_in.weight"] = torch.zeros(4, 4)  # an all-in-one file's other parts
    save_file(comfy, root / "comfy_clip_l.safetensors")

    t5_config = T5Config(
        vocab_size=40, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
    )  # fmt: skip
    t5 = randomize(T5EncoderModel(t5_config), seed=1)
    t5_sd = {k: v.contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    write_hf_folder(t5, root / "text_encoder_2", t5_sd)
    # t5xxl_fp16: fp16 values, and the tied embedding stored twice as some exports do.
    fp16 = {k: v.half() for k, v in t5_sd.items()}
    save_file({**fp16, "encoder.embed_tokens.weight": fp16["shared.weight"].clone()}, root / "t5xxl_fp16.safetensors")
    save_file({f"text_encoders.t5xxl.transformer.{k}": v for k, v in fp16.items()}, root / "comfy_t5.safetensors")
    # t5xxl_fp8_e4m3fn: every tensor cast to e4m3fn; the oracle gets the same rounded values.
    fp8 = {k: v.to(FP8) for k, v in t5_sd.items()}
    save_file(fp8, root / "t5xxl_fp8_e4m3fn.safetensors")
    write_hf_folder(t5, root / "ref_fp8", {k: v.float() for k, v in fp8.items()})
    scaled, scaled_reference = quantize_fp8_scaled(t5_sd)
    save_file(scaled, root / "t5xxl_fp8_e4m3fn_scaled.safetensors")
    write_hf_folder(t5, root / "ref_fp8_scaled", scaled_reference)
    return root


def reference(model_class, folder):
    """transformers loading the weights itself: the oracle. Frozen like ours: SDPA on CPU picks
    another kernel when inputs require grad, which moves results by ~1e-7."""
    return model_class.from_pretrained(str(folder), dtype=torch.float32).eval().requires_grad_(False)


def clip_ids(root, max_length=77):
    tok = CLIPTokenizerFast.from_pretrained(str(root / "tokenizer"), local_files_only=True)
    return tok(PROMPTS, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")


def t5_batch(root, max_length=16):
    tok = T5TokenizerFast.from_pretrained(str(root / "tokenizer_2"), local_files_only=True)
    return tok(PROMPTS, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")


def assert_same(ours, theirs):
    """Same weights, same kernels: bit-exact."""
    assert torch.equal(ours, theirs), f"max difference {(ours - theirs).abs().max().item():.3g}"


# ----------------------------------------------------------------------------- CLIP


@pytest.mark.parametrize("name", ["clip_l.safetensors", "comfy_clip_l.safetensors", "text_encoder"])
def test_clip_matches_transformers(files, name):
    encoder = load_text_encoder("clip", files / name, dtype=torch.float32)
    ref = reference(CLIPTextModel, files / "text_encoder")
    ids = clip_ids(files).input_ids
    assert torch.equal(encoder.tokenize(PROMPTS)[0], ids)
    ours, theirs = encoder.model(input_ids=ids), ref(input_ids=ids)
    assert_same(ours.pooler_output, theirs.pooler_output)
    assert_same(ours.last_hidden_state, theirs.last_hidden_state)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "max_position_embeddings", "hidden_act", "eos_token_id"):  # fmt: skip
        assert getattr(encoder.model.config, key) == getattr(ref.config, key), key


def test_clip_position_ids_rebuilt_not_read(files):
    model = load_clip_model(files / "clip_l.safetensors", dtype=torch.float32)
    emb = model.text_model.embeddings if hasattr(model, "text_model") else model.embeddings
    assert emb.position_ids.device.type == "cpu" and emb.position_ids.dtype == torch.int64
    assert torch.equal(emb.position_ids[0], torch.arange(77))
    assert not any(p.is_meta for p in model.parameters())


# ----------------------------------------------------------------------------- T5


@pytest.mark.parametrize(
    "name, oracle",
    [
        ("t5xxl_fp16.safetensors", "text_encoder_2"),
        ("comfy_t5.safetensors", "text_encoder_2"),
        ("text_encoder_2", "text_encoder_2"),
        ("t5xxl_fp8_e4m3fn.safetensors", "ref_fp8"),
        ("t5xxl_fp8_e4m3fn_scaled.safetensors", "ref_fp8_scaled"),
    ],
)
def test_t5_matches_transformers(files, name, oracle):
    encoder = load_text_encoder("t5", files / name, max_length=16, dtype=torch.float32)
    ref = reference(T5EncoderModel, files / oracle)
    batch = t5_batch(files)
    assert torch.equal(encoder.tokenize(PROMPTS)[0], batch.input_ids)
    for mask in (None, batch.attention_mask):
        ours = encoder.model(input_ids=batch.input_ids, attention_mask=mask).last_hidden_state
        assert_same(ours, ref(input_ids=batch.input_ids, attention_mask=mask).last_hidden_state)
    for key in ("d_model", "d_ff", "d_kv", "num_heads", "num_layers", "vocab_size", "relative_attention_num_buckets",
                "relative_attention_max_distance", "is_gated_act", "dense_act_fn"):  # fmt: skip
        assert getattr(encoder.model.config, key) == getattr(ref.config, key), key


def test_t5_fp8_upcast_and_tied_embedding(files):
    model = load_t5_model(files / "t5xxl_fp8_e4m3fn.safetensors")  # no dtype: fp8 becomes bf16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.encoder.embed_tokens.weight is model.shared.weight
    fp16 = load_t5_model(files / "t5xxl_fp16.safetensors")  # no dtype: the file's fp16 is kept
    assert {p.dtype for p in fp16.parameters()} == {torch.float16}
    assert fp16.encoder.embed_tokens.weight is fp16.shared.weight
    scaled = load_t5_model(files / "t5xxl_fp8_e4m3fn_scaled.safetensors")  # scaled weights: bf16 too
    assert {p.dtype for p in scaled.parameters()} == {torch.bfloat16}


# ----------------------------------------------------------------------------- FLUX conditioning


def test_flux_conditioning_matches_reference_pipeline(files):
    flux = FluxTextEncoder.load(files / "clip_l.safetensors", files / "t5xxl_fp16.safetensors", t5_max_length=16,
                                dtype=torch.float32)  # fmt: skip
    cond = flux(PROMPTS)
    assert cond.t5.shape == (2, 16, 32) and cond.clip_pooled.shape == (2, 128) and cond.t5_mask is None
    batch = t5_batch(files)
    t5_ref = reference(T5EncoderModel, files / "text_encoder_2")
    assert_same(cond.t5, t5_ref(input_ids=batch.input_ids).last_hidden_state)
    clip_ref = reference(CLIPTextModel, files / "text_encoder")
    ids = clip_ids(files).input_ids
    assert_same(cond.clip_pooled, clip_ref(input_ids=ids).pooler_output)
    # pooled = final-LN state at the first EOS token (prompts are padded with EOS)
    first_eos = (ids == clip_ref.config.eos_token_id).int().argmax(-1)
    hidden = clip_ref(input_ids=ids).last_hidden_state
    assert_same(cond.clip_pooled, hidden[torch.arange(2), first_eos])

    flux.apply_t5_attn_mask = True
    masked = flux(PROMPTS)
    assert torch.equal(masked.t5_mask, batch.attention_mask)
    assert_same(masked.t5, t5_ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state)
    short = batch.attention_mask[0].bool()  # the short prompt has padding, so the mask changes its tokens
    assert not short.all()
    assert (masked.t5[0, short] - cond.t5[0, short]).abs().max() > 1e-4
    assert_same(masked.clip_pooled, cond.clip_pooled)
    assert "t5_mask=True" in flux.identity


def test_identity_names_file_dtype_and_length(files):
    a = load_text_encoder("t5", files / "t5xxl_fp16.safetensors", max_length=16, dtype=torch.float32)
    b = load_text_encoder("t5", files / "t5xxl_fp16.safetensors", max_length=16, dtype=torch.float32)
    c = load_text_encoder("t5", files / "t5xxl_fp16.safetensors", max_length=8, dtype=torch.float32)
    d = load_text_encoder("t5", files / "t5xxl_fp16.safetensors", max_length=16, dtype=torch.bfloat16)
    assert a.identity == b.identity
    assert len({a.identity, c.identity, d.identity}) == 3
    assert "t5xxl_fp16.safetensors" in a.identity
    path = files / "t5xxl_fp16.safetensors"
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert load_text_encoder("t5", path, max_length=16, dtype=torch.float32).identity != a.identity


# ----------------------------------------------------------------------------- errors and discovery


def test_missing_tokenizer_names_files_and_repos(files, tmp_path):
    (tmp_path / "clip_l.safetensors").write_bytes((files / "clip_l.safetensors").read_bytes())
    (tmp_path / "t5xxl_fp16.safetensors").write_bytes((files / "t5xxl_fp16.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError) as clip_error:
        load_text_encoder("clip", tmp_path / "clip_l.safetensors")
    for fragment in ("vocab.json", "merges.txt", "openai/clip-vit-large-patch14", "FLUX.1-dev `tokenizer/`"):
        assert fragment in str(clip_error.value)
    with pytest.raises(FileNotFoundError) as t5_error:
        load_text_encoder("t5", tmp_path / "t5xxl_fp16.safetensors")
    for fragment in ("tokenizer.json", "spiece.model", "FLUX.1-dev `tokenizer_2/`", "google/t5-v1_1-xxl"):
        assert fragment in str(t5_error.value)
    with pytest.raises(FileNotFoundError, match="no CLIP tokenizer at"):
        load_text_encoder("clip", files / "clip_l.safetensors", tokenizer=files / "tokenizer_2")
    with pytest.raises(FileNotFoundError, match="no CLIP tokenizer at"):
        load_text_encoder("clip", files / "clip_l.safetensors", tokenizer=files / "tokenizer_2" / "tokenizer.json")


def test_tokenizer_found_next_to_weights(files, tmp_path):
    # the diffusers layout: text_encoder/ beside tokenizer/, text_encoder_2/ beside tokenizer_2/
    assert find_tokenizer(files / "text_encoder", "clip") == files / "tokenizer"
    assert find_tokenizer(files / "text_encoder_2", "t5") == files / "tokenizer_2"
    # a tokenizer.json beside a single file counts only for the matching kind
    (tmp_path / "t5xxl_fp16.safetensors").write_bytes((files / "t5xxl_fp16.safetensors").read_bytes())
    (tmp_path / "tokenizer.json").write_bytes((files / "tokenizer_2" / "tokenizer.json").read_bytes())
    assert find_tokenizer(tmp_path / "t5xxl_fp16.safetensors", "t5") == tmp_path
    with pytest.raises(FileNotFoundError):
        find_tokenizer(tmp_path / "t5xxl_fp16.safetensors", "clip")
    # a tokenizer.json named by the caller
    encoder = load_text_encoder("t5", files / "t5xxl_fp16.safetensors", tmp_path / "tokenizer.json", max_length=16)
    assert torch.equal(encoder.tokenize(PROMPTS)[0], t5_batch(files).input_ids)


def test_wrong_file_gives_clear_error(files, tmp_path):
    flux_sd = {
        "img_in.weight": torch.zeros(8, 4),
        "txt_in.weight": torch.zeros(8, 4),
        "double_blocks.0.img_attn.qkv.weight": torch.zeros(24, 8),
        "final_layer.linear.weight": torch.zeros(4, 8),
    }
    save_file(flux_sd, tmp_path / "flux1-dev.safetensors")
    with pytest.raises(ValueError, match="expected a CLIP text encoder, but this file looks like a FLUX.1 transformer"):
        load_clip_model(tmp_path / "flux1-dev.safetensors")
    with pytest.raises(ValueError, match="expected a T5 encoder, but this file looks like a FLUX.1 transformer"):
        load_t5_model(tmp_path / "flux1-dev.safetensors")
    with pytest.raises(ValueError, match="looks like a CLIP text encoder"):
        load_t5_model(files / "clip_l.safetensors")
    with pytest.raises(ValueError, match="looks like a T5 encoder"):
        load_clip_model(files / "t5xxl_fp16.safetensors")


def test_full_size_configs_from_shapes():
    """CLIP-L and T5-XXL v1.1 shapes (meta tensors, no memory) give the released configs."""
    from models.text import clip_state_dict, infer_clip_config, infer_t5_config, t5_state_dict

    def meta_sd(model_class, config):
        with torch.device("meta"):
            return model_class(config).state_dict()

    clip_l = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")  # fmt: skip
    inferred = infer_clip_config(clip_state_dict(meta_sd(CLIPTextModel, clip_l)))
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "hidden_act", "layer_norm_eps"):  # fmt: skip
        assert getattr(inferred, key) == getattr(clip_l, key), key
    assert inferred.eos_token_id == 49407

    t5_xxl = T5Config(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                      feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                      relative_attention_max_distance=128)  # fmt: skip
    inferred = infer_t5_config(t5_state_dict(meta_sd(T5EncoderModel, t5_xxl)))
    for key in ("vocab_size", "d_model", "d_ff", "d_kv", "num_heads", "num_layers", "relative_attention_num_buckets",
                "relative_attention_max_distance", "is_gated_act", "dense_act_fn", "layer_norm_epsilon"):  # fmt: skip
        assert getattr(inferred, key) == getattr(t5_xxl, key), key
