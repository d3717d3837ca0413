"""PNG figures for the toy-world report, drawn with PIL: a grouped bar chart and base-vs-trained image grids."""

from __future__ import annotations

from pathlib import Path

import torch

BASE_COLOUR, TRAINED_COLOUR = (150, 150, 150), (40, 110, 200)


def bar_chart(values: dict[str, dict[str, float]], path: Path) -> None:
    """values: {label: {'base': fraction, 'trained': fraction}} -> grouped bars with percentages."""
    from PIL import Image, ImageDraw

    bar, gap, height, top, left = 36, 40, 220, 40, 20
    width = left * 2 + len(values) * (2 * bar + gap)
    image = Image.new("RGB", (width, top + height + 90), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), "base (grey) vs trained (blue)", fill="black")
    baseline = top + height
    draw.line([(left, baseline), (width - left, baseline)], fill="black")
    for index, (label, pair) in enumerate(values.items()):
        x = left + index * (2 * bar + gap) + gap // 2
        for offset, (model, colour) in enumerate((("base", BASE_COLOUR), ("trained", TRAINED_COLOUR))):
            value = pair[model]
            x0 = x + offset * bar
            draw.rectangle([x0, baseline - round(value * height), x0 + bar - 4, baseline], fill=colour)
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
