"""PNG figures drawn with PIL: grouped bar charts, base-vs-trained image grids, and training curves of runs (the
toy-world and the safety reports share them)."""

from __future__ import annotations

from pathlib import Path

import torch

BASE_COLOUR, TRAINED_COLOUR = (150, 150, 150), (40, 110, 200)


def bar_chart(values: dict[str, dict[str, float]], path: Path) -> None:
    """values: {label: {model: fraction}} (models 'base' and 'trained', or 'base' alone) -> grouped bars with
    percentages."""
    from PIL import Image, ImageDraw

    models = list(next(iter(values.values())))
    colours = dict(zip(models, (BASE_COLOUR, TRAINED_COLOUR)))
    bar, gap, height, top, left = 36, 40, 220, 40, 20
    width = max(left * 2 + len(values) * (len(models) * bar + gap), 260)
    image = Image.new("RGB", (width, top + height + 90), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), " vs ".join(f"{m} ({'grey' if i == 0 else 'blue'})" for i, m in enumerate(models)),
              fill="black")
    baseline = top + height
    draw.line([(left, baseline), (width - left, baseline)], fill="black")
    for index, (label, by_model) in enumerate(values.items()):
        x = left + index * (len(models) * bar + gap) + gap // 2
        for offset, model in enumerate(models):
            value = by_model[model]
            x0 = x + offset * bar
            draw.rectangle([x0, baseline - round(value * height), x0 + bar - 4, baseline], fill=colours[model])
            draw.text((x0, baseline - round(value * height) - 12), f"{100 * value:.0f}%", fill="black")
        for line, words in enumerate(_wrap(label, 14)):
            draw.text((x, baseline + 6 + 12 * line), words, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _wrap(text: str, width: int) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}".strip()
    return lines + [current]


def comparison_grid(prompts: list[str], base: torch.Tensor, trained: torch.Tensor, samples_per_prompt: int,
                    path: Path, *, max_rows: int = 12, scale: int = 2) -> None:
    """One row per prompt (up to max_rows, evenly spaced): the prompt, base samples, then trained samples."""
    from PIL import Image, ImageDraw

    rows = sorted({round(i * (len(prompts) - 1) / max(1, min(max_rows, len(prompts)) - 1))
                   for i in range(min(max_rows, len(prompts)))})
    size = base.shape[-1] * scale
    label_width, gap = 230, 12
    columns = min(samples_per_prompt, 4)
    width = label_width + 2 * columns * size + gap
    image = Image.new("RGB", (width, len(rows) * (size + 2)), "white")
    draw = ImageDraw.Draw(image)
    for row, prompt_index in enumerate(rows):
        y = row * (size + 2)
        draw.text((4, y + size // 2 - 6), prompts[prompt_index][:38], fill="black")
        for side, images in enumerate((base, trained)):
            for col in range(columns):
                tile = images[prompt_index * samples_per_prompt + col]
                pixels = (tile.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
                tile_image = Image.fromarray(pixels).resize((size, size), Image.NEAREST)
                image.paste(tile_image, (label_width + side * (columns * size + gap) + col * size, y))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


RUN_COLOURS = ((40, 110, 200), (200, 60, 40), (40, 150, 70), (150, 80, 180), (120, 120, 120))


def training_curves(runs: dict[str, list[dict]], metrics: list[str], path: Path, *, panel=(300, 170)) -> None:
    """One panel per metric, one line per run over epochs. runs: {name: epoch records (metrics.jsonl's epoch
    lines)}; values that are None (a kind of prompt absent from a run) leave gaps."""
    from PIL import Image, ImageDraw

    width, height = panel
    left, top, columns = 64, 22, min(3, len(metrics))
    rows = -(-len(metrics) // columns)
    image = Image.new("RGB", (columns * (width + left) + 10, rows * (height + top + 24) + 20 * len(runs) + 10),
                      "white")
    draw = ImageDraw.Draw(image)
    last_epoch = max((r["epoch"] for records in runs.values() for r in records), default=1) or 1
    for index, metric in enumerate(metrics):
        x0 = (index % columns) * (width + left) + left
        y0 = (index // columns) * (height + top + 24) + top
        values = [r.get(metric) for records in runs.values() for r in records if r.get(metric) is not None]
        low, high = (min(values), max(values)) if values else (0.0, 1.0)
        low, high = (min(low, 0.0), high) if metric.startswith("judged") else (low, high)
        high = high if high > low else low + 1.0
        draw.text((x0, y0 - 16), metric, fill="black")
        draw.rectangle([x0, y0, x0 + width, y0 + height], outline=(180, 180, 180))
        draw.text((x0 - 56, y0 - 4), f"{high:.3g}", fill="black")
        draw.text((x0 - 56, y0 + height - 8), f"{low:.3g}", fill="black")
        draw.text((x0 + width - 40, y0 + height + 2), f"ep {last_epoch}", fill="black")
        for colour, records in zip(RUN_COLOURS, runs.values()):
            points = [(x0 + width * r["epoch"] / last_epoch, y0 + height * (high - r[metric]) / (high - low))
                      for r in records if r.get(metric) is not None]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
    legend_y = rows * (height + top + 24) + 4
    for row, (colour, name) in enumerate(zip(RUN_COLOURS, runs)):
        draw.rectangle([10, legend_y + 20 * row + 4, 30, legend_y + 20 * row + 14], fill=colour)
        draw.text((36, legend_y + 20 * row + 2), name, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


CURVE_METRICS = ["judged_safe_accuracy", "judged_unsafe_rate", "judged_content_kept", "reward_group_std_safe",
                 "reward_group_std_unsafe", "advantage_abs_safe", "advantage_abs_unsafe", "reward_mean_safe",
                 "reward_mean_unsafe"]


def main(argv: list[str] | None = None) -> int:
    """python -m fastgrpo.plots OUT.png NAME=RUN_DIR [NAME=RUN_DIR ...]: training curves of runs."""
    import json
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or not all("=" in a for a in argv[1:]):
        print("usage: python -m fastgrpo.plots OUT.png NAME=RUN_DIR [NAME=RUN_DIR ...]", file=sys.stderr)
        return 2
    runs = {}
    for name, directory in (a.split("=", 1) for a in argv[1:]):
        metrics = Path(directory) / "metrics.jsonl"
        if not metrics.is_file():
            print(f"error: {metrics} does not exist", file=sys.stderr)
            return 2
        runs[name] = [r for r in map(json.loads, metrics.read_text(encoding="utf-8").splitlines()) if "rollout_s" in r]
    training_curves(runs, CURVE_METRICS, Path(argv[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
