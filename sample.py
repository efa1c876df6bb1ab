"""FLUX.1 sampling: Euler on the flow, the dev time-shifted schedule, embedded guidance,
optional true CFG with a negative prompt, LoRAs with strengths. A function to call from
code (`generate`) and a CLI:

    python sample.py --flux flux1-dev.safetensors --ae ae.safetensors \
        --clip_l clip_l.safetensors --t5 t5xxl_fp16.safetensors \
        --prompt "a photo of a cat" --lora my_lora.safetensors:0.8 --out cat.png

Prompt files use the kohya syntax, one prompt a line:
    a red circle --n blurry --w 1024 --h 768 --d 42 --l 1.0 --g 3.5 --s 28
(--n negative prompt, --w/--h size, --d seed, --l true-CFG scale, --g embedded guidance,
--s steps; lines starting with # are comments).
"""
import argparse
import json
import math
import shlex
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

from models import flux


@dataclass
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int = 1024
    height: int = 1024
    seed: int = 0
    cfg_scale: float = 1.0  # true CFG (two passes) only when > 1 and a negative prompt exists
    guidance: float = 3.5  # embedded guidance (dev); ignored by schnell
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
    return replace(defaults or SamplePrompt(prompt=""), **fields)


def read_prompt_file(path: str | Path, defaults: SamplePrompt | None = None) -> list[SamplePrompt]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [p for line in lines if (p := parse_prompt_line(line, defaults)) is not None]


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def get_schedule(num_steps: int, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15,
                 shift: bool = True) -> list[float]:
    """Noise levels from 1 to 0. dev shifts toward high noise by mu, linear in the token count
    through (256, base_shift) and (4096, max_shift); schnell uses the plain linear schedule."""
    timesteps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    if shift:
        slope = (max_shift - base_shift) / (4096 - 256)
        mu = base_shift + slope * (image_seq_len - 256)
        timesteps[:-1] = time_shift(mu, 1.0, timesteps[:-1])  # t=0 stays 0 (1/0 would be inf)
    return timesteps.tolist()


@torch.no_grad()
def sample_latent(model, cond: dict, noise: Tensor, steps: int, guidance: float, shift: bool,
                  neg_cond: dict | None = None, cfg_scale: float = 1.0) -> Tensor:
    """Euler from noise (B, C, h, w) at t=1 down to t=0; x_t = (1-t) x0 + t noise."""
    x = noise
    b, _, h, w = x.shape
    guidance_vec = torch.full((b,), guidance, device=x.device)
    schedule = get_schedule(steps, flux.image_seq_len(h, w), shift=shift)
    for t_curr, t_prev in zip(schedule[:-1], schedule[1:]):
        t_vec = torch.full((b,), t_curr, device=x.device)
        velocity = flux.denoise(model, x, t_vec, cond, guidance_vec)
        if neg_cond is not None and cfg_scale != 1.0:
            velocity_neg = flux.denoise(model, x, t_vec, neg_cond, guidance_vec)
            velocity = velocity_neg + cfg_scale * (velocity - velocity_neg)
        x = x + (t_prev - t_curr) * velocity
    return x


def initial_noise(prompt: SamplePrompt, channels: int, downscale: int, device) -> Tensor:
    """Seeded noise on the CPU (the same image on every device), (1, C, h, w)."""
    if prompt.width % (2 * downscale) or prompt.height % (2 * downscale):
        raise ValueError(f"width and height must be multiples of {2 * downscale}, got {prompt.width}x{prompt.height}")
    generator = torch.Generator().manual_seed(prompt.seed)
    shape = (1, channels, prompt.height // downscale, prompt.width // downscale)
    return torch.randn(shape, generator=generator).to(device)


def generate(model, codec, prompt: SamplePrompt, cond: dict, neg_cond: dict | None = None) -> Image.Image:
    """One image for one prompt. `codec` turns latents into pixels (the VAE, or identity);
    `cond`/`neg_cond` are batched text conditionings (see models.flux.denoise)."""
    device = next(model.parameters()).device
    noise = initial_noise(prompt, codec.channels, codec.downscale, device)
    use_cfg = neg_cond is not None and prompt.cfg_scale != 1.0
    latent = sample_latent(model, cond, noise, prompt.steps, prompt.guidance, shift=model.params.guidance_embed,
                           neg_cond=neg_cond if use_cfg else None, cfg_scale=prompt.cfg_scale)
    return to_pil(codec.decode(latent))


def to_pil(pixels: Tensor) -> Image.Image:
    """(1, 3, H, W) in [-1, 1] -> PIL image."""
    array = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def save_png(image: Image.Image, path: str | Path, prompt: SamplePrompt, extra: dict | None = None) -> None:
    """PNG with the prompt and settings in its text metadata; written atomically."""
    info = PngInfo()
    info.add_text("parameters", json.dumps({**asdict(prompt), **(extra or {})}))
    info.add_text("prompt", prompt.prompt)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    image.save(tmp, pnginfo=info)
    tmp.replace(path)


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """'file.safetensors:0.8' -> (path, 0.8); no ':strength' means 1.0."""
    path, sep, strength = arg.rpartition(":")
    if sep and path and not Path(arg).exists():
        try:
            return path, float(strength)
        except ValueError:
            pass
    return arg, 1.0


def main(argv=None):
    from models import load_codec, load_text_encoder  # the CLI loads everything; generate() does not
    import lora

    parser = argparse.ArgumentParser(description="FLUX.1 sampling")
    parser.add_argument("--flux", required=True, help="flux1-dev/schnell.safetensors")
    parser.add_argument("--ae", default="", help="ae.safetensors ('' decodes nothing: pixel-space models)")
    parser.add_argument("--clip_l", required=True)
    parser.add_argument("--t5", required=True)
    parser.add_argument("--clip_tokenizer", default="")
    parser.add_argument("--t5_tokenizer", default="")
    parser.add_argument("--prompt", help="a prompt, kohya options allowed (--w 768 --s 20 ...)")
    parser.add_argument("--prompt_file", help="a kohya prompt file")
    parser.add_argument("--lora", action="append", default=[], help="file.safetensors[:strength], repeatable")
    parser.add_argument("--lora_on_the_fly", action="store_true", help="apply LoRAs as modules instead of merging")
    parser.add_argument("--out", default="samples", help="output PNG (one prompt) or folder")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--t5_max_length", type=int, default=0, help="0: 512 for dev, 256 for schnell")
    parser.add_argument("--apply_t5_attn_mask", action="store_true", help="mask T5 padding (if the LoRA trained so)")
    parser.add_argument("--model_overrides", default="{}", help="JSON of FluxParams overrides (tiny models)")
    args = parser.parse_args(argv)
    if not args.prompt and not args.prompt_file:
        parser.error("give --prompt or --prompt_file")

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = flux.load(args.flux, dtype=dtype, device=args.device, **json.loads(args.model_overrides))
    model.requires_grad_(False).eval()
    for spec in args.lora:
        path, strength = parse_lora_arg(spec)
        lora.apply_lora_file(model, path, multiplier=strength, merge=not args.lora_on_the_fly)
    is_dev = model.params.guidance_embed
    defaults = SamplePrompt(prompt="", steps=28 if is_dev else 4, guidance=3.5)
    prompts = read_prompt_file(args.prompt_file, defaults) if args.prompt_file else [parse_prompt_line(args.prompt, defaults)]
    max_length = args.t5_max_length or flux.default_t5_max_length(model.params)
    text = load_text_encoder(args.clip_l, args.t5, args.clip_tokenizer, args.t5_tokenizer, max_length=max_length,
                             apply_mask=args.apply_t5_attn_mask, dtype=dtype, device=args.device)
    codec = load_codec(args.ae, dtype=dtype, device=args.device)
    out = Path(args.out)
    for i, prompt in enumerate(prompts):
        cond = text.encode([prompt.prompt])
        neg = text.encode([prompt.negative]) if prompt.cfg_scale != 1.0 else None
        image = generate(model, codec, prompt, cond, neg)
        path = out if (len(prompts) == 1 and out.suffix == ".png") else out / f"{i:03d}.png"
        save_png(image, path, prompt, {"loras": args.lora, "model": Path(args.flux).name})
        print(f"saved {path}")


if __name__ == "__main__":
    main()
