"""Sampling: the prompt syntax, image files, and the sampling CLI. The schedule and the
sampler of each model come from its family (families/, with the algorithms in samplers.py),
so this file holds what every family shares:

    python sample.py --model flux1-dev.safetensors --ae ae.safetensors \
        --clip_l clip_l.safetensors --t5 t5xxl_fp16.safetensors \
        --prompt "a photo of a cat" --lora my_lora.safetensors:0.8 --out cat.png
    python sample.py --config configs/flux_8gb.py --prompt "..."   # files and memory settings of a config
    python sample.py --config configs/if_stage2.py --base_model models/IF-I-XL-v1.0 --prompt "..."
                                     # a cascade: the base model's image is what this model refines
    python sample.py --compare runs/my_lora [--prompt "..."] [--seed 7]   # every saved file, one strip

Prompt files use the kohya syntax, one prompt a line:
    a red circle --n blurry --w 1024 --h 768 --d 42 --l 1.0 --g 3.5 --s 28
(--n negative prompt, --w/--h size, --d seed, --l CFG scale, --g embedded guidance, --s steps;
lines starting with # are comments).
"""
import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

import atomic


@dataclass
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int = 1024
    height: int = 1024
    seed: int = 0
    cfg_scale: float = 1.0  # classifier-free guidance (two passes) only when != 1
    guidance: float = 3.5  # embedded guidance (FLUX dev); ignored where a model has none
    steps: int = 28


PROMPT_FLAGS = {"n": ("negative", str), "w": ("width", int), "h": ("height", int), "d": ("seed", int),
                "l": ("cfg_scale", float), "g": ("guidance", float), "s": ("steps", int)}


def parse_prompt_line(line: str, defaults: SamplePrompt | None = None) -> SamplePrompt | None:
    """One line of a kohya prompt file -> SamplePrompt, or None for blanks and # comments."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    parts = line.split(" --")
    fields = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        flag, _, value = part.partition(" ")
        if flag not in PROMPT_FLAGS:
            raise ValueError(f"unknown prompt option --{flag} in {line!r}; known: " + ", ".join(f"--{f}" for f in PROMPT_FLAGS))
        name, kind = PROMPT_FLAGS[flag]
        try:
            fields[name] = kind(value.strip())
        except ValueError:
            raise ValueError(f"--{flag} expects a {kind.__name__}, got {value.strip()!r} in {line!r}") from None
        if flag in ("w", "h", "s") and fields[name] < 1:
            raise ValueError(f"--{flag} must be at least 1, got {fields[name]} in {line!r}")
    return replace(defaults or SamplePrompt(prompt=""), **fields)


def read_prompt_file(path: str | Path, defaults: SamplePrompt | None = None) -> list[SamplePrompt]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [p for line in lines if (p := parse_prompt_line(line, defaults)) is not None]


def at_sizes(prompts: list[SamplePrompt], sizes: str) -> list[SamplePrompt]:
    """Every prompt at each size of `sizes` ("64,96,64x96": WxH or a square side, as
    SimpleTuner's validation_resolution); "" leaves the prompts as they are."""
    if not sizes.strip():
        return list(prompts)
    pairs = []
    for part in sizes.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:x\s*(\d+)\s*)?", part)
        if not match or int(match.group(1)) < 1:
            raise ValueError(f"sample_sizes={sizes!r}: cannot read {part!r}; write e.g. '64,96,64x96' (width x height)")
        width = int(match.group(1))
        pairs.append((width, int(match.group(2) or width)))
    return [replace(p, width=w, height=h) for p in prompts for w, h in pairs]


def initial_noise(prompt: SamplePrompt, channels: int, downscale: int, multiple: int, device) -> Tensor:
    """Seeded noise on the CPU (the same image on every device), (1, C, h, w)."""
    if prompt.width % multiple or prompt.height % multiple:
        raise ValueError(f"width and height must be multiples of {multiple}, got {prompt.width}x{prompt.height}")
    generator = torch.Generator().manual_seed(prompt.seed)
    shape = (1, channels, prompt.height // downscale, prompt.width // downscale)
    return torch.randn(shape, generator=generator).to(device)


def generate_latent(family, model, codec, prompt: SamplePrompt, cond: dict, neg_cond: dict | None = None) -> Tensor:
    """The latent of one prompt (the decoder is not needed yet). `cond`/`neg_cond` are the
    family's sampling conditioning (family.sample_conditioning)."""
    device = next(model.parameters()).device
    multiple = family.latent_multiple * codec.downscale
    noise = initial_noise(prompt, codec.channels, codec.downscale, multiple, device)
    use_cfg = neg_cond is not None and prompt.cfg_scale != 1.0
    return family.sample(model, prompt, cond, neg_cond if use_cfg else None, noise)


def decode_images(codec, latents: list[Tensor], device, tile_setting: int = -1, headroom=None) -> list[Image.Image]:
    """The latents as images: the decoder visits the device only for this. tile_setting is the
    config's vae_tile_size (-1: tile when a whole decode does not fit the headroom, headroom()
    giving the bytes it may take; 0: never; N: tiles of N latent pixels)."""
    codec.to(device)
    try:
        return [to_pil(codec.decode(z, tile=decode_tile(codec, z, device, tile_setting, headroom))) for z in latents]
    finally:
        codec.to("cpu")


AUTO_TILE = 64  # latent pixels per tile side when tiling is chosen automatically (512 image pixels)


def decode_tile(codec, latent: Tensor, device, setting: int, headroom=None) -> int:
    """The tile size for one decode: the setting, or with -1 on CUDA AUTO_TILE when the whole
    decode's activations exceed the headroom (default: the device's free memory)."""
    if setting >= 0:
        return setting
    if torch.device(device).type != "cuda":
        return 0
    available = headroom() if headroom is not None else torch.cuda.mem_get_info(device)[0]
    return AUTO_TILE if codec.decode_bytes(latent) > available else 0


def to_pil(pixels: Tensor) -> Image.Image:
    """(1, 3, H, W) in [-1, 1] -> PIL image."""
    array = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
LABEL_HEIGHT = 14  # pixels of the text band above each image of a grid


def image_grid(images: list[Image.Image], labels: list[str], columns: int | None = None) -> Image.Image:
    """Images in rows of `columns` (default: a near-square grid), each cell the size of the
    largest image plus a LABEL_HEIGHT band with its label: columns x cell width by rows x
    (cell height + LABEL_HEIGHT) pixels."""
    from PIL import ImageDraw

    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    cell_w, cell_h = max(im.width for im in images), max(im.height for im in images)
    grid = Image.new("RGB", (columns * cell_w, rows * (cell_h + LABEL_HEIGHT)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, label) in enumerate(zip(images, labels)):
        x, y = (i % columns) * cell_w, (i // columns) * (cell_h + LABEL_HEIGHT)
        draw.text((x + 2, y + 1), label[: max(1, cell_w // 6)], fill="black")  # ~6 px per character
        grid.paste(image, (x, y + LABEL_HEIGHT))
    return grid


def save_image(image: Image.Image, path: str | Path, prompt: SamplePrompt, extra: dict | None = None) -> None:
    """PNG (the prompt and settings in its text metadata), JPEG or WebP by the suffix; atomic."""
    path = Path(path)
    kind = IMAGE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: choose a .png, .jpg or .webp file name")
    options = {"quality": 95} if kind in ("JPEG", "WEBP") else {}
    if kind == "PNG":
        info = PngInfo()
        info.add_text("parameters", json.dumps({**asdict(prompt), **(extra or {})}))
        info.add_text("prompt", prompt.prompt)
        options["pnginfo"] = info
    atomic.write_file(path, lambda tmp: image.save(tmp, format=kind, **options))


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """'file.safetensors:0.8' or kohya's 'file.safetensors;0.8' -> (path, 0.8); no strength
    means 1.0. A file that exists under the whole name is taken as it is."""
    if Path(arg).exists():
        return arg, 1.0
    cut = max(arg.rfind(":"), arg.rfind(";"))
    if cut <= 0 or not arg[:cut].lower().endswith(".safetensors"):
        return arg, 1.0
    path, strength = arg[:cut], arg[cut + 1 :]
    try:
        return path, float(strength)
    except ValueError:
        raise ValueError(f"--lora {arg}: {strength!r} is not a strength; write FILE:0.8 or FILE;0.8") from None


# --- the CLI -----------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Sample images from a diffusion model (FLUX.1), with LoRAs.")
    parser.add_argument("--config", default="", help="a training config: model files and memory settings from it")
    parser.add_argument("--model", "--flux", dest="model", default="", help="the denoiser checkpoint (model_path)")
    parser.add_argument("--model_family", default="", help="'auto' (default) or a family name")
    parser.add_argument("--ae", default=None, help="ae.safetensors ('' decodes nothing: pixel-space models)")
    parser.add_argument("--clip_l", default=None)
    parser.add_argument("--clip_g", default=None, help="CLIP-G (SD3); '' reads an all-in-one --model's text encoders")
    parser.add_argument("--t5", default=None)
    parser.add_argument("--clip_tokenizer", default=None)
    parser.add_argument("--clip_g_tokenizer", default=None)
    parser.add_argument("--t5_tokenizer", default=None)
    parser.add_argument("--prompt", help="a prompt, kohya options allowed (--w 768 --s 20 ...)")
    parser.add_argument("--prompt_file", help="a kohya prompt file")
    parser.add_argument("--lora", action="append", default=[], help="FILE[:STRENGTH] or FILE;STRENGTH, repeatable")
    parser.add_argument("--lora_on_the_fly", action="store_true", help="apply LoRAs as modules instead of merging")
    parser.add_argument("--base_model", default="", help="a cascade's earlier stage, run first (DeepFloyd IF stage I "
                                                          "for a stage II --model)")
    parser.add_argument("--sizes", default=None, help="every prompt at each size: '64,96,64x96' (WxH)")
    parser.add_argument("--out", default="samples", help="output image (.png, .jpg, .webp; one prompt) or folder")
    parser.add_argument("--seed", type=int, default=None, help="the seed of every prompt without its own --d")
    parser.add_argument("--dtype", default=None, choices=("bf16", "fp32", "fp16"), help="fp16 where the family allows it (SDXL, DeepFloyd IF)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--t5_max_length", type=int, default=None, help="0: the family's default")
    parser.add_argument("--apply_t5_attn_mask", action="store_true", default=None, help="mask T5 padding")
    parser.add_argument("--model_overrides", default=None, help="JSON of network overrides (tiny models)")
    parser.add_argument("--fp8_base", action="store_true", default=None, help="block weights in fp8")
    parser.add_argument("--blocks_to_swap", type=int, default=None, help="kohya's count of blocks kept in host memory")
    parser.add_argument("--compare", default="", metavar="RUN_DIR",
                        help="one prompt at one seed through every file a run saved, side by side in one strip")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if not args.prompt and not args.prompt_file and not args.compare:
        parser.error("give --prompt or --prompt_file (or --compare RUN_DIR)")
    return args


CLI_KEYS = {"model": "model_path", "model_family": "model_family", "ae": "ae_path", "clip_l": "clip_l_path",
            "clip_g": "clip_g_path", "t5": "t5_path", "clip_tokenizer": "clip_tokenizer",
            "clip_g_tokenizer": "clip_g_tokenizer", "t5_tokenizer": "t5_tokenizer", "dtype": "dtype",
            "device": "device", "t5_max_length": "t5_max_length", "apply_t5_attn_mask": "apply_t5_attn_mask",
            "fp8_base": "fp8_base", "blocks_to_swap": "blocks_to_swap", "sizes": "sample_sizes"}


def sampling_config(args) -> dict:
    """A resolved config (config.py) from --config and the flags, with the model files checked."""
    from config import ConfigError, load_config, validate

    cfg = load_config(args.config or None, check_files=False)
    for flag, key in CLI_KEYS.items():
        value = getattr(args, flag)
        if value not in (None, ""):
            cfg[key] = value
    if args.model_overrides is not None:
        cfg["model_overrides"] = json.loads(args.model_overrides)
    if not args.config:
        cfg["model_family"] = args.model_family or "auto"
    validate(cfg, check_files=False)
    for key in ("model_path", "ae_path", "clip_l_path", "clip_g_path", "t5_path"):
        if cfg[key] and not Path(cfg[key]).exists():
            raise ConfigError(f"{key}: file or folder not found: {cfg[key]}")
    if not cfg["model_path"]:
        raise ConfigError("give --model (or --config with model_path)")
    return cfg


def encode_prompts(family, cfg: dict, params, prompts: list[SamplePrompt], dtype, device, loras=()) -> list:
    """Every prompt's conditioning, computed before the denoiser loads (with the text-encoder
    parts of `loras` merged); the text encoders then leave the device."""
    import lora
    import training

    text = family.text_encoder(cfg, params, dtype, training.text_encoder_load_device(cfg, device))
    for path, strength in loras:
        lora.apply_text_encoder_loras(text.networks(), path, family, strength)
    swaps = training.place_text_encoders(text.networks(), cfg, device)
    encoded = []
    for prompt in prompts:
        cond = family.sample_conditioning(text.encode([prompt.prompt]), prompt, device)
        neg = family.sample_conditioning(text.encode([prompt.negative]), prompt, device) \
            if prompt.cfg_scale != 1.0 else None
        encoded.append((cond, neg))
    del text, swaps
    return encoded


def run_cli(args) -> list[Path]:
    import families
    import lora
    import training
    from config import DTYPES

    cfg = sampling_config(args)
    family = families.get(cfg["model_family"])
    device = torch.device(cfg["device"] if cfg["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[cfg["dtype"]]
    sd = family.read_checkpoint(cfg["model_path"], cfg)  # memory-mapped
    params = family.params(sd, cfg)
    defaults = replace(family.prompt_defaults(cfg, params), seed=args.seed if args.seed is not None else 0)
    prompts = read_prompt_file(args.prompt_file, defaults) if args.prompt_file \
        else [parse_prompt_line(args.prompt, defaults)]
    prompts = at_sizes(prompts, cfg["sample_sizes"])
    loras = [parse_lora_arg(spec) for spec in args.lora]
    encoded = encode_prompts(family, cfg, params, prompts, dtype, device, loras)
    if args.base_model:  # a cascade: the earlier stage runs (and leaves the device) before this one loads
        encoded = family.base_stage(cfg, args.base_model, prompts, encoded, dtype, device)
    model = family.load(sd, cfg, dtype=dtype, device="cpu").requires_grad_(False).eval()
    del sd
    for path, strength in loras:
        lora.apply_lora_file(model, path, family, multiplier=strength, merge=not args.lora_on_the_fly)
    training.place(model, family, cfg, device, mode="h2d_only")
    codec = family.codec(cfg, dtype, "cpu")  # on the device only while it decodes
    return write_samples(args, family, model, codec, prompts, encoded, cfg)


def write_samples(args, family, model, codec, prompts, encoded, cfg) -> list[Path]:
    out, paths = Path(args.out), []
    device = next(model.parameters()).device
    latents = [generate_latent(family, model, codec, p, cond, neg) for p, (cond, neg) in zip(prompts, encoded)]
    images = decode_images(codec, latents, device, cfg["vae_tile_size"])
    for i, (prompt, image) in enumerate(zip(prompts, images)):
        single = len(prompts) == 1 and out.suffix.lower() in IMAGE_FORMATS
        path = out if single else out / f"{i:03d}.png"
        save_image(image, path, prompt, {"loras": args.lora, "model": Path(cfg["model_path"]).name})
        print(f"saved {path}")
        paths.append(path)
    return paths


def saved_files(run_dir: Path, run_name: str) -> list[tuple[str, Path]]:
    """(label, file) of every step file of a run, by step, then the final file (EMA twins left out)."""
    steps = [p for p in run_dir.glob(f"{run_name}_step*.safetensors") if not p.stem.endswith("_ema")]
    found = [(f"step {int(p.stem.rsplit('_step', 1)[1])}", p) for p in steps]
    final = run_dir / f"{run_name}.safetensors"
    return sorted(found, key=lambda lp: int(lp[0].split()[1])) + ([("final", final)] if final.exists() else [])


def compare_run(args) -> Path:
    """`--compare RUN_DIR`: the base model (LoRA runs) and every saved file of the run render one
    prompt (--prompt, or the run's first sample prompt) at one seed; the images go side by side
    into one strip, labelled, written to --out (an image name) or RUN_DIR/compare.png."""
    import families
    import lora
    from config import DTYPES, load_config
    from models.loading import load_state_dict

    run_dir = Path(args.compare)
    if not (run_dir / "config.py").is_file():
        raise FileNotFoundError(f"--compare {run_dir}: no config.py there; give a run folder (runs/<run_name>)")
    cfg = load_config(str(run_dir / "config.py"), check_files=False)
    files = saved_files(run_dir, cfg["run_name"])
    if not files:
        raise FileNotFoundError(f"--compare {run_dir}: the run saved no {cfg['run_name']}*.safetensors files yet")
    for flag in ("device", "dtype"):
        if getattr(args, flag):
            cfg[flag] = getattr(args, flag)
    family, dtype = families.get(cfg["model_family"]), DTYPES[cfg["dtype"]]
    device = torch.device(cfg["device"] if cfg["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    sd = load_state_dict(cfg["model_path"], allow_pickle=cfg["allow_pickle"])
    params = family.params(sd, cfg)
    defaults = family.prompt_defaults(cfg, params)
    prompt = parse_prompt_line(args.prompt, defaults) if args.prompt else \
        (read_prompt_file(cfg["sample_prompts"], defaults)[:1] or [None])[0]
    if prompt is None:
        raise ValueError(f"--compare {run_dir}: the run has no sample prompts; give --prompt")
    prompt = replace(prompt, seed=args.seed) if args.seed is not None else prompt
    (cond, neg), = encode_prompts(family, cfg, params, [prompt], dtype, device)
    codec, latents, labels = family.codec(cfg, dtype, "cpu"), [], []
    lora_run = cfg["train_mode"] == "lora"
    if lora_run:
        files = [("base", None)] + files
        model = family.load(sd, cfg, dtype=dtype, device="cpu").requires_grad_(False).eval().to(device)
    for label, path in files:
        if lora_run and path is not None:
            network = lora.apply_lora_file(model, path, family, merge=False)
        elif not lora_run:
            model = family.load(load_state_dict(str(path)), cfg, dtype=dtype, device=device)
            model.requires_grad_(False).eval()
        latents.append(generate_latent(family, model, codec, prompt, cond, neg))
        if lora_run and path is not None:
            network.remove()
        labels.append(label)
    images = decode_images(codec, latents, device, cfg["vae_tile_size"])
    strip = image_grid(images, labels, columns=len(images))
    out = Path(args.out) if Path(args.out).suffix.lower() in IMAGE_FORMATS else run_dir / "compare.png"
    save_image(strip, out, prompt, {"files": labels})
    print(f"saved {out}: {', '.join(labels)} ({prompt.prompt!r}, seed {prompt.seed})")
    return out


def main(argv=None) -> list[Path]:
    args = parse_args(argv)
    if Path(args.out).suffix and Path(args.out).suffix.lower() not in IMAGE_FORMATS:
        raise SystemExit(f"error: --out {args.out}: choose a .png, .jpg or .webp file name, or a folder")
    if args.compare:
        return [compare_run(args)]
    return run_cli(args)


if __name__ == "__main__":
    debug = "--debug" in sys.argv
    try:
        main()
    except (ValueError, FileNotFoundError, OSError) as error:  # ConfigError is a ValueError
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
