"""`train.kl_prompts`: which samples the KL penalty covers: 'all', or 'safe' (only the safe prompts' samples, so the
unsafe prompts may move while the safe ones are held to the base model)."""

from __future__ import annotations

from typing import Callable

import torch


def every_row(is_unsafe: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(is_unsafe, dtype=torch.bool)


def safe_rows(is_unsafe: torch.Tensor) -> torch.Tensor:
    return ~is_unsafe


def covers(prompts: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return {"all": every_row, "safe": safe_rows}[prompts]
