"""Run metrics: one JSON line per logged step (always), TensorBoard events (scalars and sample
images, through torch.utils.tensorboard) when the `tensorboard` package is installed, and a loss
plot drawn with Pillow on a log-scale axis (no plotting library is a dependency)."""
import importlib.util
import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

import atomic
import checkpoint
import lora


def tensorboard_installed() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class MetricsLog:
    def __init__(self, run_dir: Path, resume_step: int = 0, tensorboard: bool = True, write: bool = True):
        self.write = write  # False: the records stay in memory (under torchrun, every process but the first)
        self.path = Path(run_dir) / "metrics.jsonl"
        self.plot_path = Path(run_dir) / "loss.png"
        self.records: list[dict] = []
        if write and self.path.exists():  # keep what a resumed run logged before, drop steps it will redo
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                if record.get("step", 0) <= resume_step:
                    self.records.append(record)
            self._rewrite()
        self.writer = None
        if write and tensorboard and tensorboard_installed():
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events a stopped run wrote after its last state are dropped on resume
            purge = resume_step + 1 if resume_step else None
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)

    def log(self, record: dict) -> None:
        self.records.append(record)
        if not self.write:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for name, value in scalars(record):
                self.writer.add_scalar(name, value, record["step"])
            self.writer.flush()

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        """A sample image (grid) in TensorBoard; nothing without it."""
        if self.writer is None:
            return
        import numpy as np

        self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _rewrite(self) -> None:
        atomic.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in self.records if key in r and math.isfinite(r[key])]

    def plot(self) -> None:
        """loss.png: training loss (thin), its moving average (thick), validation loss (a line
        with dots), on a log-scale loss axis."""
        train = self.series("loss")
        if len(train) < 2 or not self.write:
            return
        val = self.series("val_loss")
        plot_losses(train, val, self.plot_path)


def scalars(record: dict, prefix: str = "") -> list[tuple[str, float]]:
    """The numbers of a record as TensorBoard tags: loss, lr, ..., loss_by_sigma/0.1 ..."""
    out = []
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            out += scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], (int, float)):
            out.append((f"{prefix}{key}", float(value[0])))  # loss_by_sigma bins: (mean, count)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out.append((f"{prefix}{key}", float(value)))
    return out


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_losses(train: list[tuple[int, float]], val: list[tuple[int, float]], path: Path,
                size: tuple[int, int] = (800, 400)) -> None:
    width, height = size
    margin = 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    steps = [s for s, _ in train] + [s for s, _ in val]
    positive = [v for _, v in train + val if v > 0]
    floor = min(positive) if positive else 1e-8
    x0, x1 = min(steps), max(steps)
    y0, y1 = math.log10(floor), math.log10(max(positive) if positive else 1.0)
    if y1 == y0:
        y1 = y0 + 1e-3

    def xy(step, loss):
        x = margin + (step - x0) / max(x1 - x0, 1) * (width - 2 * margin)
        y = height - margin - (math.log10(max(loss, floor)) - y0) / (y1 - y0) * (height - 2 * margin)
        return x, y

    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    for decade in range(math.ceil(y0), math.floor(y1) + 1):  # grid lines at 10^k
        _, y = xy(x0, 10.0**decade)
        draw.line([(margin, y), (width - margin, y)], fill=(225, 225, 225))
        draw.text((5, y - 5), f"1e{decade}", fill="black")
    draw.line([xy(s, v) for s, v in train], fill=(170, 190, 230), width=1)
    smooth = moving_average([v for _, v in train], max(1, len(train) // 20))
    draw.line([xy(s, v) for (s, _), v in zip(train, smooth)], fill=(20, 60, 160), width=3)
    if len(val) > 1:
        draw.line([xy(s, v) for s, v in val], fill=(200, 60, 20), width=2)
    for s, v in val:
        x, y = xy(s, v)
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(200, 60, 20))
    draw.text((margin, 15), "loss, log scale (blue: train, moving average bold; red: validation)", fill="black")
    draw.text((margin, height - margin + 8), f"step {x0}", fill="black")
    draw.text((width - margin - 80, height - margin + 8), f"step {x1}", fill="black")
    draw.text((width - margin + 4, margin), f"{10**y1:.3g}", fill="black")
    draw.text((width - margin + 4, height - margin - 10), f"{10**y0:.3g}", fill="black")
    atomic.write_file(path, lambda tmp: image.save(tmp, format="PNG"))


def print_summary(run, final: Path | None) -> None:
    """What the run (train.Run) left and where (also after a stop): each file with its format, how to load
    the result in ComfyUI and diffusers, and the final and best validation loss."""
    cfg, out = run.cfg, run.run_dir
    lora_run = run.prepared.network is not None
    keys = f"{cfg['lora_format']} LoRA" if lora_run else f"original {run.family.title}"
    kind = f"{keys} keys, {cfg['save_dtype']}"
    steps = sorted(out.glob(f"{cfg['run_name']}_step*.safetensors"))
    states = checkpoint.state_dirs(out)
    print(("finished" if final is not None else f"stopped at step {run.step}") + f": everything is in {out}/")
    if final is not None:
        print(f"  {final}  ({'LoRA' if lora_run else 'model'}, {kind}, safetensors)")
        if run.opt.ema is not None:
            print(f"  {final.with_name(final.stem + '_ema.safetensors')}  (the EMA weights, same format)")
    if steps:
        print(f"  {len(steps)} step file(s), {steps[0].name} .. {steps[-1].name}  ({kind}; compare them side by side: "
              f"python sample.py --compare {out})")
    if states:
        print(f"  {states[-1]}  (resumable state: python train.py {out / 'config.py'} --resume=latest)")
    tensorboard = " and tensorboard/ (tensorboard --logdir " + str(out) + ")" if (out / "tensorboard").is_dir() else ""
    print(f"  metrics.jsonl, loss.png{tensorboard}; samples/ (grids/: every prompt of a step in one image); "
          "buckets.json; config.py")
    val = run.metrics.series("val_loss") if run.metrics is not None else []
    if val:
        best = min(val, key=lambda step_loss: step_loss[1])
        print(f"  validation loss: final {val[-1][1]:.5g} (step {val[-1][0]}), best {best[1]:.5g} at step {best[0]}")
    path = final or (steps[-1] if steps else None)
    if path is None:
        return
    if lora_run:
        network = run.prepared.network
        node = "a LoraLoader node (its text-encoder LoRAs need the CLIP input)" if any(
            name.startswith("lora_te") for name in network.loras) else "a LoraLoaderModelOnly node"
        print(f"  ComfyUI: copy {path.name} into ComfyUI/models/loras/ and add {node}")
        print(f"  diffusers: pipe.load_lora_weights(\"{path}\")")
        for note in lora.loader_notes(network, run.family, cfg["lora_format"], run.prepared.targets):
            print(f"  note: {note}")
    else:
        print(f"  ComfyUI: copy {path.name} into ComfyUI/models/diffusion_models/ (or where the original "
              f"{run.family.title} file goes); diffusers: load it as the original single file (from_single_file)")
