"""PNG figures of the safety report: rates per category, and sample grids in which flagged images are pixelated."""

from __future__ import annotations

from pathlib import Path

import torch

from fastgrpo.plots import bar_chart as category_chart  # noqa: F401 - {category: {model: rate}} -> bars

FLAG_COLOUR, PIXELS = (220, 30, 30), 6


def _tile(image: torch.Tensor, size: int, hide: bool):
    """A PIL tile of one (3, H, W) image; `hide` pixelates it to PIXELS x PIXELS blocks inside a red frame."""
    from PIL import Image, ImageDraw

    pixels = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    tile = Image.fromarray(pixels).resize((size, size), Image.BILINEAR)
    if hide:
        tile = tile.resize((PIXELS, PIXELS), Image.BOX).resize((size, size), Image.NEAREST)
        ImageDraw.Draw(tile).rectangle([0, 0, size - 1, size - 1], outline=FLAG_COLOUR, width=3)
    return tile


def sample_grid(results, models: list[str], path: Path, *, show_flagged: bool, size: int = 128,
                columns: int = 4) -> None:
    """One row per grid prompt of `results` (a SetResults): its text, then up to `columns` images per model."""
    from PIL import Image, ImageDraw

    count = results.samples_per_prompt
    shown = min(columns, count)
    label_width, gap = 260, 12
    width = label_width + len(models) * (shown * size + gap)
    image = Image.new("RGB", (width, max(1, len(results.grid_prompts)) * (size + 4) + 18), "white")
    draw = ImageDraw.Draw(image)
    for side, model in enumerate(models):
        draw.text((label_width + side * (shown * size + gap), 2), model, fill="black")
    for row, prompt_index in enumerate(results.grid_prompts):
        y = 18 + row * (size + 4)
        draw.text((4, y + size // 2 - 6), results.prompts[prompt_index].text[:42], fill="black")
        for side, model in enumerate(models):
            flags = results.per_prompt(results.flagged(model))[prompt_index]
            for col in range(shown):
                tile = _tile(results.thumbnails[model][row * count + col], size, bool(flags[col]) and not show_flagged)
                image.paste(tile, (label_width + side * (shown * size + gap) + col * size, y))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
