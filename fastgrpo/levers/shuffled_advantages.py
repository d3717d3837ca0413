"""`train.advantage_control=shuffle`: a placebo control. Each epoch the advantages are permuted within each group
(a function of the seed and epoch), so an update has the real one's magnitudes and zero-sum groups but no relation
between an image and its credit: what it does to the model is what the noise of an update does."""

from __future__ import annotations

import torch

from fastgrpo.rng import generator


def within_groups(group_size: int, seed: int):
    def shuffle(advantages: torch.Tensor, is_unsafe: torch.Tensor, epoch: int) -> torch.Tensor:
        gen = generator(seed, "advantage-control", epoch, 0)
        groups = advantages.view(-1, group_size)
        order = torch.argsort(torch.rand(groups.shape, generator=gen), dim=1).to(advantages.device)
        return torch.gather(groups, 1, order).view(-1)

    return shuffle
