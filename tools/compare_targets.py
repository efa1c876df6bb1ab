"""Which layers should I train? Train each layer-targeting preset from one config and compare.

    python tools/compare_targets.py CONFIG --presets attention_only,late_blocks,no_last_blocks [--key=value ...]

Each preset (`targets = ...`; `python lora.py presets CONFIG` lists them with their layers;
"default" is the family's own selection) trains from the same config: the same data, held-out
images, seed and step budget, one run folder each, <output_dir>/<run_name>_<preset>. The report
goes beside them, in <output_dir>/<run_name>_compare/:

  report.md, report.json   per preset: trainable parameters, the last training loss, the
                           validation loss per noise level at each validation (the same held-out
                           images and noise for every preset), the gradient norm per block
                           averaged over training (log_block_grad_norms)
  samples.png              the last samples of every preset, one row each

The config must hold out images (validation_count > 0) and validate (validate_every); samples
come from its sample_prompts at the end of each run.
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from PIL import Image, ImageDraw  # noqa: E402

import lora  # noqa: E402
import train  # noqa: E402
from config import ConfigError, load_config  # noqa: E402

DEFAULT = "default"  # the family's own selection keys (targets = "")


def run_preset(config: str, preset: str, overrides: list[str], run_name: str) -> Path:
    """One training run with `preset`; returns its run folder."""
    final = train.main([config, *overrides, f"--targets={'' if preset == DEFAULT else preset}",
                        f"--run_name={run_name}_{preset}", "--log_block_grad_norms=True"])
    return Path(final).parent


def summarize(run_dir: Path) -> dict:
    """What the report shows of one run, from its metrics.jsonl and its LoRA file."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    validations = [{"step": r["step"], "val_loss": r["val_loss"], "by_sigma": r["val_loss_by_sigma"]}
                   for r in records if "val_loss" in r]
    norms: dict[str, list[float]] = {}
    for r in records:
        for block, norm in r.get("block_grad_norms", {}).items():
            norms.setdefault(block, []).append(norm)
    sd, _ = lora.read_lora_file(run_dir / f"{run_dir.name}.safetensors")  # the final file is named after the run
    return {"run_dir": str(run_dir), "parameters": sum(t.numel() for k, t in sd.items() if not k.endswith(".alpha")),
            "last_loss": records[-1]["loss"], "validations": validations,
            "block_grad_norms": {b: sum(v) / len(v) for b, v in norms.items()},
            "samples": [str(p) for p in last_samples(run_dir)]}


def last_samples(run_dir: Path) -> list[Path]:
    paths = sorted((run_dir / "samples").glob("step*_*.png"))
    last = max((p.name.split("_")[0] for p in paths), default=None)
    return [p for p in paths if p.name.startswith(f"{last}_")]


def sample_strip(results: dict[str, dict], path: Path) -> Path | None:
    """One row per preset: its name, then its last samples."""
    rows = {name: [Image.open(p).convert("RGB") for p in r["samples"]] for name, r in results.items()}
    if not any(rows.values()):
        return None
    side = max(im.height for images in rows.values() for im in images)
    label = 8 * max(len(name) for name in rows) + 8
    width = label + side * max(len(images) for images in rows.values())
    strip = Image.new("RGB", (width, side * len(rows)), "white")
    draw = ImageDraw.Draw(strip)
    for row, (name, images) in enumerate(rows.items()):
        draw.text((4, row * side + side // 2 - 6), name, fill="black")
        for col, image in enumerate(images):
            strip.paste(image, (label + col * side, row * side))
    strip.save(path)
    return path


def markdown(results: dict[str, dict]) -> list[str]:
    """The report's tables: one row per preset, then the mean gradient norm per block."""
    sigmas = next((list(r["validations"][-1]["by_sigma"]) for r in results.values() if r["validations"]), [])
    lines = ["| preset | parameters | last loss | val loss | " + " | ".join(f"val @ {s}" for s in sigmas) + " |",
             "|---" * (4 + len(sigmas)) + "|"]
    for name, r in results.items():
        last = r["validations"][-1] if r["validations"] else {"val_loss": float("nan"), "by_sigma": {}}
        lines.append(f"| {name} | {r['parameters']:,} | {r['last_loss']:.4f} | {last['val_loss']:.4f} | " +
                     " | ".join(f"{last['by_sigma'].get(s, float('nan')):.4f}" for s in sigmas) + " |")
    blocks = sorted({b for r in results.values() for b in r["block_grad_norms"]}, key=block_order)
    lines += ["", "Gradient norm per block, mean over training (blank: the preset trains nothing there)", "",
              "| block | " + " | ".join(results) + " |", "|---" * (1 + len(results)) + "|"]
    for block in blocks:
        cells = [f"{r['block_grad_norms'][block]:.3g}" if block in r["block_grad_norms"] else ""
                 for r in results.values()]
        lines.append(f"| {block} | " + " | ".join(cells) + " |")
    return lines


def block_order(block: str) -> tuple:
    kind, _, index = block.rpartition(".")
    return (kind, int(index)) if index.isdigit() else (block, -1)


def compare(config: str, presets: list[str], overrides: list[str]) -> Path:
    """Train every preset, then write the report; returns its folder."""
    cfg = load_config(config, overrides)
    if not cfg["validation_count"] or not cfg["validate_every"]:
        raise ConfigError("compare_targets compares validation losses: set validation_count (held-out images, e.g. "
                          "--validation_count=4) and validate_every")
    if cfg["train_mode"] != "lora":
        raise ConfigError("compare_targets compares LoRA presets: set train_mode='lora'")
    for preset in presets:  # every name checked before the first run starts
        if preset != DEFAULT:
            load_config(config, [*overrides, f"--targets={preset}"])
    results = {p: summarize(run_preset(config, p, overrides, cfg["run_name"])) for p in presets}
    out = Path(cfg["output_dir"]) / f"{cfg['run_name']}_compare"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(results, indent=1))
    strip = sample_strip(results, out / "samples.png")
    title = [f"# Layer-targeting presets: {Path(config).name}, {cfg['max_train_steps']} steps, seed {cfg['seed']}", ""]
    pictures = ["", f"![samples]({strip.name})"] if strip else []
    (out / "report.md").write_text("\n".join(title + markdown(results) + pictures) + "\n")
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python tools/compare_targets.py", description=__doc__.split("\n")[0],
                                     epilog="Other --key=value arguments override the config for every run.")
    parser.add_argument("config")
    parser.add_argument("--presets", required=True, help=f"comma-separated presets ({DEFAULT!r}: the family's own)")
    args, overrides = parser.parse_known_args(argv)
    out = compare(args.config, [p.strip() for p in args.presets.split(",") if p.strip()], overrides)
    print(f"report: {out / 'report.md'}")
    return out


if __name__ == "__main__":
    main()
