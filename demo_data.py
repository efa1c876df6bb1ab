"""Everything the CPU demo needs, made on the spot: no downloads.

- a dataset of coloured shapes on a dark background, 32x32 px, captioned "a red circle";
- a tiny FLUX-architecture transformer with random weights, saved in the original BFL key
  layout (so it loads through the same code as flux1-dev.safetensors);
- tiny CLIP-L-shaped and T5-shaped text encoders with random weights and a word-level
  tokenizer over the demo's vocabulary, saved as Hugging Face folders.

Random text encoders still give each word its own embedding, which is all the demo needs
for the model to learn which colour and shape a prompt asks for.
"""
import json
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 230), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle")
IMAGE_SIZE = 32
VARIANTS = 4  # images per (colour, shape)

FLUX_TINY = dict(in_channels=12, out_channels=12, vec_in_dim=32, context_in_dim=32, hidden_size=96,
                 num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 20, 20])


WIDE, TALL = (60, 20), (20, 60)  # landscape and portrait images: the demo's buckets 48x16 and 16x48


def draw_shape(colour: str, shape: str, rng: random.Random, size=(IMAGE_SIZE, IMAGE_SIZE)) -> Image.Image:
    """A shape on a dark background in an image of (width, height) `size`."""
    width, height = size
    image = Image.new("RGB", size, (25, 25, 35))
    draw = ImageDraw.Draw(image)
    side = rng.randint(min(width, height) * 7 // 16, min(width, height) * 11 // 16)
    x, y = rng.randint(2, width - side - 2), rng.randint(2, height - side - 2)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([x, y, x + side, y + side], fill=fill)
    elif shape == "square":
        draw.rectangle([x, y, x + side, y + side], fill=fill)
    else:
        draw.polygon([(x + side / 2, y), (x, y + side), (x + side, y + side)], fill=fill)
    return image


def make_dataset(folder: Path, seed: int = 0, shapes_of_images: bool = False) -> Path:
    """VARIANTS square images per (colour, shape), and with `shapes_of_images` one landscape and
    one portrait image each (the demo trains them in aspect-ratio buckets)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sizes = [(f"{v}", (IMAGE_SIZE, IMAGE_SIZE)) for v in range(VARIANTS)]
    if shapes_of_images:
        sizes += [("wide", WIDE), ("tall", TALL)]
    for colour in COLOURS:
        for shape in SHAPES:
            for name, size in sizes:
                stem = folder / f"{colour}_{shape}_{name}"
                image = draw_shape(colour, shape, rng, size)  # drawn either way: the same images every time
                if not stem.with_suffix(".png").exists():
                    image.save(stem.with_suffix(".png"))
                    stem.with_suffix(".txt").write_text(f"a {colour} {shape}")
    return folder


def make_flux(path: Path, seed: int = 0) -> Path:
    """Random tiny FLUX weights in the BFL layout, initialised like the reference (PyTorch defaults)."""
    from models.flux import Flux, FluxParams

    if not path.exists():
        torch.manual_seed(seed)
        model = Flux(FluxParams(**FLUX_TINY))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def demo_sentences() -> list[str]:
    words = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
    return words + ["a photo of a blurry shape", "the red green blue yellow circle square triangle"]


def make_clip_tokenizer(folder: Path) -> int:
    """vocab.json + merges.txt (byte-pair encoding with </w> word ends, the CLIP layout) for the
    demo's words. Written by hand rather than trained: the BPE trainer breaks frequency ties in
    an order that changes from run to run, and the demo must give the same tokens every time.
    Each word is merged left to right from its letters; the last letter carries </w>."""
    words = sorted({w for sentence in demo_sentences() for w in sentence.split()})
    letters = sorted({c for w in words for c in w})
    vocab = ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters]
    merges = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            if (merged, piece) not in merges:
                merges.append((merged, piece))
                vocab.append(merged + piece)
            merged += piece
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return len(vocab)


def make_t5_tokenizer(folder: Path) -> int:
    """tokenizer.json with a Unigram model (the T5 layout: <pad>=0, </s>=1, <unk>=2) whose
    pieces are the demo's whole words, plus single letters for anything else."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    words = sorted({w for sentence in demo_sentences() for w in sentence.split()})
    letters = sorted({c for w in words for c in w})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"\u2581{w}", -1.0) for w in words] + [("\u2581", -5.0)] + [(c, -5.0) for c in letters]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return tokenizer.get_vocab_size()


def make_clip(folder: Path, seed: int = 1, layers: int = 2) -> Path:
    from transformers import CLIPTextConfig, CLIPTextModel

    if not (folder / "config.json").exists():
        vocab_size = make_clip_tokenizer(folder)
        torch.manual_seed(seed)
        config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
                                bos_token_id=0, eos_token_id=1, pad_token_id=1)  # ids of the special tokens above
        CLIPTextModel(config).save_pretrained(folder)
    return folder


def make_t5(folder: Path, seed: int = 2, layers: int = 2) -> Path:
    from transformers import T5Config, T5EncoderModel

    if not (folder / "config.json").exists():
        vocab_size = make_t5_tokenizer(folder)
        torch.manual_seed(seed)
        config = T5Config(vocab_size=vocab_size, d_model=32, d_kv=16, d_ff=64, num_layers=layers, num_heads=2,
                          feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        T5EncoderModel(config).save_pretrained(folder)
    return folder


def make_prompts(path: Path) -> Path:
    lines = ["# demo prompts: the step-0 samples are noise; the last ones show these colours and shapes.",
             "# --l 3: classifier-free guidance against the empty caption (the demo trains with caption dropout)",
             "a red circle --d 1 --l 3", "a blue square --d 2 --l 3", "a green triangle --d 3 --l 3",
             "a yellow circle --d 4 --l 3"]
    path.write_text("\n".join(lines) + "\n")
    return path


def make_demo(root: str | Path = "runs/demo_data", shapes_of_images: bool = False) -> dict:
    """Create (once) and return the paths the demo config points at; shapes_of_images adds the
    landscape and portrait images (in their own folder, "shapes_buckets")."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    data = root / ("shapes_buckets" if shapes_of_images else "shapes")
    return dict(
        dataset_dir=str(make_dataset(data, shapes_of_images=shapes_of_images)),
        flux_path=str(make_flux(root / "flux_tiny.safetensors")),
        clip_l_path=str(make_clip(root / "clip_l")),
        t5_path=str(make_t5(root / "t5")),
        sample_prompts=str(make_prompts(root / "prompts.txt")),
    )


# --- SD3 demo (configs/demo_sd3.py) ---------------------------------------------------------------

# An SD3.5-shaped MMDiT: QK RMSNorm, attn2 in block 0 (MMDiT-X, as SD3.5 Medium), a pre-only last
# context block; width 64 x depth. It denoises the 3-channel image itself (no VAE), like the FLUX demo.
SD3_TINY = dict(depth=2, pos_embed_max_size=24, in_channels=3, out_channels=3, adm_in_channels=80,
                context_embedder_in_features=96, qk_norm="rms", x_block_self_attn_layers=(0,))
SD3_CLIP_WIDTHS = (32, 48)  # CLIP-L, CLIP-G: pooled 32 + 48 = adm_in_channels
SD3_T5_WIDTH = 96  # = context_embedder_in_features, at least 32 + 48


def make_sd3(path: Path, seed: int = 0) -> Path:
    """Random tiny MMDiT weights under `model.diffusion_model.` (the released single-file layout),
    with the fixed sin-cos pos_embed table the released files store."""
    from models.layers import sincos_pos_embed_2d
    from models.mmdit import MMDiT, MMDiTParams

    if not path.exists():
        torch.manual_seed(seed)
        model = MMDiT(MMDiTParams(**SD3_TINY))
        grid = torch.arange(float(SD3_TINY["pos_embed_max_size"]))
        model.pos_embed.copy_(sincos_pos_embed_2d(model.params.hidden_size, grid, grid)[None].float())
        tensors = {f"model.diffusion_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(path))
    return path


def make_sd3_clip(folder: Path, width: int, projection: bool, seed: int) -> Path:
    """A tiny CLIP text model (CLIP-G: with its projection and exact GELU) and the demo tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if not (folder / "config.json").exists():
        vocab_size = make_clip_tokenizer(folder)
        torch.manual_seed(seed)
        config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
                                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                projection_dim=width, hidden_act="gelu" if projection else "quick_gelu",
                                bos_token_id=0, eos_token_id=1, pad_token_id=1)
        (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).save_pretrained(folder)
    return folder


def make_sd3_t5(folder: Path, seed: int = 5) -> Path:
    from transformers import T5Config, T5EncoderModel

    if not (folder / "config.json").exists():
        vocab_size = make_t5_tokenizer(folder)
        torch.manual_seed(seed)
        config = T5Config(vocab_size=vocab_size, d_model=SD3_T5_WIDTH, d_kv=16, d_ff=128, num_layers=2, num_heads=2,
                          feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        T5EncoderModel(config).save_pretrained(folder)
    return folder


def make_sd3_demo(root: str | Path = "runs/demo_sd3_data") -> dict:
    """Create (once) and return the paths configs/demo_sd3.py points at."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    prompts = root / "prompts.txt"
    if not prompts.exists():
        make_prompts(prompts)
    return dict(
        dataset_dir=str(make_dataset(root / "shapes")),
        model_path=str(make_sd3(root / "sd3_tiny.safetensors")),
        clip_l_path=str(make_sd3_clip(root / "clip_l", SD3_CLIP_WIDTHS[0], projection=False, seed=3)),
        clip_g_path=str(make_sd3_clip(root / "clip_g", SD3_CLIP_WIDTHS[1], projection=True, seed=4)),
        t5_path=str(make_sd3_t5(root / "t5")),
        sample_prompts=str(prompts),
    )



# --- SDXL demo (configs/demo_sdxl.py) -------------------------------------------------------------

# A tiny SDXL-shaped checkpoint in the layout of sd_xl_base_1.0.safetensors, so the demo loads
# through the real code: the UNet under model.diffusion_model. (3 levels of 32, 64, 64 channels,
# 1 ResBlock each, attention at levels 1 and 2 and in the middle), CLIP-L under
# conditioner.embedders.0.transformer. (HF layout) and bigG under conditioner.embedders.1.model.
# (OpenCLIP layout: fused q/k/v, text_projection used as x @ P). No VAE: the UNet denoises the
# 3-channel image (ae_path = "" and no first_stage_model keys), as the FLUX demo does.
SDXL_TEXT_WIDTH = 32  # each tiny encoder's width: context 64 = CLIP-L 32 + bigG 32; pooled 32
SDXL_TINY = dict(in_channels=3, out_channels=3, model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=[1, 1, 1],
                 transformer_depth=[0, 1, 1], transformer_depth_middle=1, context_dim=2 * SDXL_TEXT_WIDTH,
                 adm_in_channels=SDXL_TEXT_WIDTH + 6 * 256, num_head_channels=16)


def openclip_text_tower(sd: dict) -> dict:
    """A CLIPTextModelWithProjection state dict as the OpenCLIP text tower SDXL files hold:
    [q; k; v] fused into attn.in_proj, transformer.resblocks.N, ln_final, text_projection (P, x @ P)."""
    out = {"token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           "ln_final.bias": sd["text_model.final_layer_norm.bias"],
           "text_projection": sd["text_projection.weight"].t().contiguous()}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    layers = {int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers.")}
    for i in sorted(layers):
        hf, oc = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{oc}attn.in_proj_{kind}"] = torch.cat([sd[f"{hf}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out.update({f"{oc}{new}.{kind}": sd[f"{hf}{old}.{kind}"] for old, new in names.items()})
    return out


def _text_model_keys(model) -> dict:
    """The released HF layout `text_model.*` (+ text_projection.weight), whichever transformers."""
    return {(k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}"): v.contiguous()
            for k, v in model.state_dict().items()}


def make_sdxl(path: Path, unet: dict | None = None, seed: int = 0) -> Path:
    """The tiny SDXL single file (see above), with the demo's CLIP tokenizer in tokenizer/ beside it
    (where the loader looks for a single file's tokenizer). `unet` overrides SDXL_TINY's fields."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from models.unet import UNet, UNetParams

    if path.exists():
        return path
    vocab_size = make_clip_tokenizer(path.parent / "tokenizer")
    torch.manual_seed(seed)
    text = dict(vocab_size=vocab_size, hidden_size=SDXL_TEXT_WIDTH, intermediate_size=2 * SDXL_TEXT_WIDTH,
                num_hidden_layers=2, num_attention_heads=1, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                pad_token_id=1)
    clip_l = CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu", **text))
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_act="gelu", projection_dim=SDXL_TEXT_WIDTH, **text))
    model = UNet(UNetParams(**{**SDXL_TINY, **(unet or {})}))
    sd = {f"model.diffusion_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    sd |= {f"conditioner.embedders.0.transformer.{k}": v for k, v in _text_model_keys(clip_l).items()}
    sd |= {f"conditioner.embedders.1.model.{k}": v.contiguous()
           for k, v in openclip_text_tower(_text_model_keys(clip_g)).items()}
    save_file(sd, str(path))
    return path


def make_sdxl_demo(root: str | Path = "runs/demo_sdxl_data") -> dict:
    """Create (once) and return the paths configs/demo_sdxl.py points at."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return dict(dataset_dir=str(make_dataset(root / "shapes")), model_path=str(make_sdxl(root / "sdxl_tiny.safetensors")),
                sample_prompts=str(make_prompts(root / "prompts.txt")))


# --- DeepFloyd IF demo (configs/demo_if.py) -------------------------------------------------------

# Tiny UNets in IF's config.yml terms (deep-floyd/IF UNetModel / SuperResUNetModel arguments),
# widths at GroupNorm's minimum of 32. Stage I denoises the 32 px shapes; stage II upscales
# 32 px to 128 px, four times, as IF-II does 64 -> 256. Both read the demo T5's 32-wide states.
IF_STAGE_I_TINY = dict(
    image_size=32, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
    attention_resolutions="8", channel_mult="1,2,2", num_heads=1, num_head_channels=32,
    use_scale_shift_norm=True, resblock_updown=True, encoder_dim=32, encoder_channels=64,
    activation="gelu", att_pool_heads=2, disable_self_attentions=False, precision="32",
)
IF_STAGE_II_TINY = dict(
    IF_STAGE_I_TINY, image_size=128, in_channels=6, num_res_blocks=[1, 1, 1, 1], attention_resolutions="16",
    channel_mult="1,1,2,2", efficient_activation=True, scale_skip_connection=True,
)


def if_config_yml(params: dict) -> str:
    """A config.yml as the released IF folders hold it: the UNet's arguments under `params:`."""
    return "params:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in params.items())


def make_if_unet(folder: Path, params: dict, seed: int = 0) -> Path:
    """An IF model folder in the original layout: config.yml + pytorch_model.safetensors (random
    weights, initialised as the network builds them)."""
    from models.deepfloyd import IFUNet, config_from_original

    if not (folder / "pytorch_model.safetensors").exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yml").write_text(if_config_yml(params))
        torch.manual_seed(seed)
        model = IFUNet(config_from_original(params))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "pytorch_model.safetensors"))
    return folder


def make_if_prompts(path: Path) -> Path:
    """The demo's prompts with IF's own sampling defaults (CFG 7 against the empty caption)."""
    lines = ["# IF demo prompts: the step-0 samples are noise; the last ones show these colours and shapes.",
             "a red circle --d 1", "a blue square --d 2", "a green triangle --d 3", "a yellow circle --d 4"]
    path.write_text("\n".join(lines) + "\n")
    return path


def make_if_demo(root: str | Path = "runs/demo_data") -> dict:
    """Create (once) and return the paths configs/demo_if.py and demo_if_stage2.py point at: the
    shapes, the demo T5, a stage I and a stage II UNet folder, the prompts."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return dict(
        dataset_dir=str(make_dataset(root / "shapes")),  # the square images
        t5_path=str(make_t5(root / "t5")),
        if_stage1=str(make_if_unet(root / "if_stage1_tiny", IF_STAGE_I_TINY, seed=3)),
        if_stage2=str(make_if_unet(root / "if_stage2_tiny", IF_STAGE_II_TINY, seed=4)),
        sample_prompts=str(make_if_prompts(root / "if_prompts.txt")),
    )
