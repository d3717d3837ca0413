"""`train.safe_advantages=zero`: safe prompts' groups carry no safety signal, so their advantages are 0 and only the
KL penalty (if any) moves them."""

from __future__ import annotations

import torch


def zero(advantages: torch.Tensor, is_unsafe: torch.Tensor, epoch: int) -> torch.Tensor:
    return advantages.masked_fill(~is_unsafe, 0.0)
