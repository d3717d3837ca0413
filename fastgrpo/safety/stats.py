"""Rates with bootstrap confidence intervals, resampling prompts (the images of one prompt share its seed and text, so
they are not independent draws; resampling whole prompts keeps that correlation in the interval).

Every prompt has the same number of images, so a rate is the mean of the per-prompt means. The percentile interval
of `resamples` bootstrap replicates is reported; the replicates come from a fixed seed, so a report is reproducible.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

RESAMPLES, LEVEL, SEED = 2000, 0.95, 0


@dataclass(frozen=True)
class Estimate:
    value: float  # the mean over all images
    low: float    # the bootstrap percentile interval
    high: float

    def as_dict(self) -> dict:
        return {key: round(value, 6) for key, value in asdict(self).items()}


def bootstrap_replicates(per_prompt: torch.Tensor, *, resamples: int = RESAMPLES, seed: int = SEED) -> torch.Tensor:
    """(resamples,) means of `per_prompt` (P,) over prompts drawn with replacement."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(per_prompt.shape[0], (resamples, per_prompt.shape[0]), generator=gen)
    return per_prompt.double()[rows].mean(dim=1)


def estimate(values: torch.Tensor, *, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED) -> Estimate:
    """The mean of values (P, N) (P prompts, N images each; bool flags give a rate) with its bootstrap interval."""
    per_prompt = values.double().reshape(values.shape[0], -1).mean(dim=1)
    replicates = bootstrap_replicates(per_prompt, resamples=resamples, seed=seed)
    tail = (1 - level) / 2
    low, high = torch.quantile(replicates, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return Estimate(float(per_prompt.mean()), low, high)
