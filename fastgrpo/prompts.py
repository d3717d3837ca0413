"""Prompt sources (text or CSV files) and the per-epoch safe/unsafe mix."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import torch

from fastgrpo.builtin import asset_path
from fastgrpo.errors import DataError
from fastgrpo.rng import generator

def read_prompt_rows(source: str, column: str = "prompt") -> list[dict[str, str]]:
    """Rows of a .txt (one prompt per line: {column: line}) or a .csv (its header's columns), rows whose `column` is
    blank dropped, values stripped. DataError when the file is missing, not UTF-8, lacks the column or holds no
    prompts."""
    path = asset_path(source)
    if path.is_dir():
        raise DataError(f"prompt file {source!r} is a directory, not a .txt or .csv file")
    if not path.is_file():
        raise DataError(f"prompt file {source!r} not found")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"prompt file {source!r} is not UTF-8 text (bad byte at offset {error.start})") from None
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text), strict=True)
        if reader.fieldnames is None or column not in reader.fieldnames:
            found = ", ".join(reader.fieldnames or []) or "none"
            raise DataError(f"prompt file {source!r} has no column {column!r} (columns: {found})")
        try:
            rows = [{key: (value or "").strip() for key, value in row.items() if key is not None} for row in reader]
        except csv.Error as error:  # strict: a quote that never closes is an error, not one prompt to the end
            raise DataError(f"prompt file {source!r} is not valid CSV ({error}: a quote that never closes?)") from None
        broken = next((n for n, row in enumerate(rows, start=2) if any(c in row.get(column, "") for c in "\r\n")),
                      None)
        if broken is not None:
            raise DataError(f"prompt file {source!r}: the {column!r} of data row {broken - 1} spans several lines "
                            "(a quote that never closes?); a prompt is one line")
    else:
        rows = [{column: line.strip()} for line in text.splitlines()]
    rows = [row for row in rows if row.get(column)]
    if not rows:
        raise DataError(f"prompt file {source!r} holds no prompts")
    return rows


def load_prompts(source: str, column: str = "prompt") -> list[str]:
    """Prompts from a .txt (one per line, blank lines skipped) or a .csv (the named column). DataError on problems."""
    return [row[column] for row in read_prompt_rows(source, column)]


def _draw(pool: list[str], count: int, gen: torch.Generator) -> list[str]:
    """`count` prompts from `pool` without replacement, cycling through fresh permutations when count > len(pool)."""
    order: list[int] = []
    while len(order) < count:
        order.extend(torch.randperm(len(pool), generator=gen).tolist())
    return [pool[i] for i in order[:count]]


@dataclass
class EpochPrompts:
    prompts: list[str]          # (P,) prompt texts in rollout order
    is_unsafe: torch.Tensor     # (P,) bool


@dataclass
class PromptMixer:
    """Each epoch: round(unsafe_fraction * P) unsafe and the rest safe prompts, shuffled; a function of (seed, epoch)."""

    safe: list[str]
    unsafe: list[str]
    unsafe_fraction: float
    prompts_per_epoch: int
    seed: int

    def epoch(self, epoch: int) -> EpochPrompts:
        gen = generator(self.seed, "prompts", epoch)
        num_unsafe = round(self.unsafe_fraction * self.prompts_per_epoch)
        num_safe = self.prompts_per_epoch - num_unsafe
        chosen = _draw(self.unsafe, num_unsafe, gen) + _draw(self.safe, num_safe, gen)
        flags = torch.tensor([True] * num_unsafe + [False] * num_safe)
        order = torch.randperm(self.prompts_per_epoch, generator=gen)
        return EpochPrompts([chosen[i] for i in order.tolist()], flags[order])
