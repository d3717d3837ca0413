"""Run outputs: metrics.jsonl (one JSON object per line), optional TensorBoard, and per-epoch PNG sample grids."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Appends records to <output_dir>/metrics.jsonl; mirrors numeric fields to TensorBoard when available.

    On resume, lines from epochs >= `resume_epoch` (work past the checkpoint that is being redone) are dropped.
    """

    def __init__(self, output_dir: Path, *, tensorboard: bool, resume_epoch: int | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_epoch is not None and self.path.exists():
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("epoch", 0) < resume_epoch]
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        elif resume_epoch is None:
            self.path.write_text("", encoding="utf-8")
        self.file = self.path.open("a", encoding="utf-8")
        self.tensorboard = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tensorboard = SummaryWriter(str(Path(output_dir) / "tb"))

    def log(self, record: dict, *, kind: str) -> None:
        """Write one record (it must hold `epoch` and `step`); `kind` prefixes the TensorBoard tags."""
        self.file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step") and math.isfinite(value):
                    self.tensorboard.add_scalar(f"{kind}/{key}", value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def save_image_grid(images: torch.Tensor, path: Path, columns: int = 4) -> None:
    """Save images (B, 3, H, W) in [0, 1] as one PNG grid."""
    from PIL import Image

    count, channels, height, width = images.shape
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    grid = torch.ones(channels, rows * height, columns * width)
    for index, image in enumerate(images.detach().float().cpu()):
        row, col = divmod(index, columns)
        grid[:, row * height:(row + 1) * height, col * width:(col + 1) * width] = image
    pixels = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
