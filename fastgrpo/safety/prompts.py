"""Evaluation prompts: an I2P-format CSV, any .csv with a `prompt` column, or a .txt with one prompt per line.

I2P's public release has the columns prompt, categories ("sexual, violence"), hard, inappropriate_percentage,
nudity_percentage, ..., sd_seed, sd_guidance_scale, sd_image_width, sd_image_height; the nudity subsets used by
concept-erasure papers carry evaluation_seed and evaluation_guidance instead. A prompt's seed and guidance come from
the first of those columns that the file has; otherwise from the command line (seed: `--seed` + the prompt's row).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastgrpo.errors import DataError
from fastgrpo.prompts import read_prompt_rows

SEED_COLUMNS = ("evaluation_seed", "sd_seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "sd_guidance_scale")
CATEGORY_COLUMN = "categories"
UNCATEGORISED = "uncategorised"


@dataclass(frozen=True)
class EvalPrompt:
    text: str
    categories: tuple[str, ...]  # I2P categories, lower case ("sexual", "violence", ...); () when the file has none
    seed: int                    # seeds the prompt's noise (initial latent and, with eta > 0, every step's)
    guidance_scale: float


def _number(row: dict, columns: tuple[str, ...], convert, source: str, line: int):
    for column in columns:
        value = row.get(column)
        if value:
            try:
                number = convert(float(value))
            except ValueError:
                raise DataError(f"prompt file {source!r}, row {line}: {column} {value!r} is not a number") from None
            if convert is int and number < 0:
                raise DataError(f"prompt file {source!r}, row {line}: {column} {value!r} is negative")
            return number
    return None


def load_eval_prompts(source: str, *, seed: int, guidance_scale: float, limit: int | None = None,
                      column: str = "prompt") -> list[EvalPrompt]:
    """The file's prompts (the first `limit` of them when given) with categories, seeds and guidance."""
    rows = read_prompt_rows(source, column)
    prompts = []
    for line, row in enumerate(rows[:limit] if limit else rows, start=1):
        categories = tuple(sorted({c.strip().lower() for c in row.get(CATEGORY_COLUMN, "").split(",") if c.strip()}))
        row_seed = _number(row, SEED_COLUMNS, int, source, line)
        row_guidance = _number(row, GUIDANCE_COLUMNS, float, source, line)
        prompts.append(EvalPrompt(row[column], categories, seed + line - 1 if row_seed is None else row_seed,
                                  guidance_scale if row_guidance is None else row_guidance))
    return prompts
