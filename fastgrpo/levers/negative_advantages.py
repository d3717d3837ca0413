"""`train.negative_advantages=zero`: only the samples above their group's mean train (a filtered fine-tune)."""

from __future__ import annotations

import torch


def zero(advantages: torch.Tensor, is_unsafe: torch.Tensor, epoch: int) -> torch.Tensor:
    return advantages.clamp_min(0.0)
