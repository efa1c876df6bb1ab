"""Run metrics: one JSON line per logged step, and a loss plot drawn with Pillow
(no plotting library is a dependency)."""
import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

import atomic


class MetricsLog:
    def __init__(self, run_dir: Path, resume_step: int = 0, write: bool = True):
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

    def log(self, record: dict) -> None:
        self.records.append(record)
        if not self.write:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _rewrite(self) -> None:
        atomic.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in self.records if key in r and math.isfinite(r[key])]

    def plot(self) -> None:
        """loss.png: training loss (thin), its moving average (thick), validation loss (dots)."""
        train = self.series("loss")
        if len(train) < 2 or not self.write:
            return
        val = self.series("val_loss")
        plot_losses(train, val, self.plot_path)


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
    losses = [v for _, v in train] + [v for _, v in val]
    x0, x1 = min(steps), max(steps)
    y0, y1 = min(losses), max(losses)
    if y1 == y0:
        y1 = y0 + 1e-8

    def xy(step, loss):
        x = margin + (step - x0) / max(x1 - x0, 1) * (width - 2 * margin)
        y = height - margin - (loss - y0) / (y1 - y0) * (height - 2 * margin)
        return x, y

    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    draw.line([xy(s, v) for s, v in train], fill=(170, 190, 230), width=1)
    smooth = moving_average([v for _, v in train], max(1, len(train) // 20))
    draw.line([xy(s, v) for (s, _), v in zip(train, smooth)], fill=(20, 60, 160), width=3)
    for s, v in val:
        x, y = xy(s, v)
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(200, 60, 20))
    draw.text((margin, 15), "loss (blue: train, moving average bold; red: validation)", fill="black")
    draw.text((margin, height - margin + 8), f"step {x0}", fill="black")
    draw.text((width - margin - 80, height - margin + 8), f"step {x1}", fill="black")
    draw.text((5, margin), f"{y1:.4g}", fill="black")
    draw.text((5, height - margin - 10), f"{y0:.4g}", fill="black")
    atomic.write_file(path, lambda tmp: image.save(tmp, format="PNG"))
